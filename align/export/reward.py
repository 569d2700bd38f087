"""`align export --reward`: a reward model as a plain transformers sequence classifier.

The reward adapter is merged into the base's decoder, the scalar head becomes the
classifier's `score` layer (num_labels=1), and the folder holds safetensors weights and the
tokenizer: `AutoModelForSequenceClassification.from_pretrained(OUT)` scores sequences with no
align and no PEFT installed (e.g. as a TRL GRPO `reward_funcs` model).

Where the score is read (the pad token) is reward/as_classifier.py's concern, shared with a full
fine-tuning reward run, which writes the same kind of folder.

transformers' score layer has no bias, and neither has the head `align reward` trains now
(reward.model.new_head), so the classifier's logits are the reward model's scores. Reward models
saved before then have a bias: it shifts every reward by the same constant, which no pairwise loss
sees (Bradley–Terry depends on r_c - r_r) and GRPO's group-normalised advantages cancel; the export
leaves it out, checks the logits against `score - bias`, and records it as head_bias_left_out in
align_export.json (0.0 for a bias-free head; the command prints a non-zero one).
"""

from __future__ import annotations

from pathlib import Path

import torch

from align.core.checked_write import write_checked
from align.core.errors import UserError
from align.export import guard
from reward.as_classifier import CHECK_PAIRS, classifier_from, classifier_scores


def find_reward_dir(path: str | Path) -> Path:
    """A reward run folder (holding reward_model/) or the reward model folder itself."""
    from reward.model import META, find_reward_folder

    found = find_reward_folder(path)
    if found is not None and found[1] == "classifier":
        raise UserError(f"--reward {path}: {found[0]} was trained with use_peft: false and is already a sequence "
                        f"classifier (AutoModelForSequenceClassification loads it); nothing to export")
    if found is not None:
        return found[0]
    raise UserError(f"--reward {path}: expected a reward run folder (with reward_model/) or a saved reward "
                    f"model folder (with {META})")


def build_classifier(base_path: Path, reward_dir: Path, dtype: torch.dtype, tokenizer):
    """The merged decoder with the head's weight as `score`, num_labels=1, pad_token_id set (in memory)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from reward.model import HEAD

    causal = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, use_safetensors=True)
    merged = PeftModel.from_pretrained(causal, reward_dir).merge_and_unload()
    return classifier_from(merged, load_file(str(reward_dir / HEAD))["weight"], tokenizer, dtype)


@torch.no_grad()
def reward_scores(base_path: Path, reward_dir: Path, dtype: str, seqs: list[list[int]]) -> torch.Tensor:
    """(N,) scores of the reward model itself (RewardModel.score_ids on the same sequences)."""
    from align.core.base import SharedBase
    from reward.model import RewardModel, pad_sequences

    base = SharedBase.load(str(base_path), dtype)
    rm = RewardModel.attach(base, reward_dir)
    ids, mask = pad_sequences(seqs, base.tokenizer.pad_token_id, side="right")
    return rm.score_ids(ids, mask).float()


def checked_sources(reward: str | Path, out: Path, base: str | Path | None,
                    overwrite: bool) -> tuple[Path, Path, dict]:
    """Every check that needs no model: the output policy, the reward folder's files, the base.

    Returns (reward model folder, base folder, reward_meta.json).
    """
    from align.core.adapter_files import BaseInfo, find_base
    from reward.model import HEAD, META

    reward_dir = find_reward_dir(reward)
    guard.check_output(out, guard.source_folders(reward_dir, "reward model folder"), overwrite)
    guard.checked_adapter(reward_dir, "--reward")
    meta = guard.check_reward_meta(reward_dir / META)
    base_path = find_base(reward_dir, None if base is None else str(base))
    guard.check_apart(out, [("base model folder", guard.real(base_path))])
    try:
        hidden_size = BaseInfo.read(base_path).field("hidden_size")
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"base model folder: {e}") from None
    guard.check_head(reward_dir / HEAD, hidden_size)
    return reward_dir, base_path, meta


def export_reward(reward: str | Path, out: str | Path, base: str | Path | None = None, dtype: str = "float32",
                  tol: float = 1e-4, overwrite: bool = False) -> tuple[Path, float]:
    """Write the reward model at `reward` as a sequence-classification model to `out`, checked, atomically.

    `out` must be new or empty (or `overwrite`), and apart from the reward folder, its run folder and the base.
    Returns (out, the head bias left out: exported logit = RewardModel score - bias; 0.0 for a bias-free head).
    """
    from transformers import AutoModelForSequenceClassification

    from align.core.loading import load_tokenizer, resolve_dtype
    from reward.model import encode, pad_sequences

    reward_dir, base_path, meta = checked_sources(reward, Path(out), base, overwrite)
    tokenizer = load_tokenizer(str(base_path))
    seqs = [encode(tokenizer, p, c, meta.get("chat_template", True), meta.get("max_length")) for p, c in CHECK_PAIRS]
    want = reward_scores(base_path, reward_dir, dtype, seqs)
    model = build_classifier(base_path, reward_dir, resolve_dtype(dtype), tokenizer)
    bias = head_bias(reward_dir)

    def check(reloaded) -> str | dict:
        got = classifier_scores(reloaded, *pad_sequences(seqs, tokenizer.pad_token_id, side="right"))
        worst = (got - (want - bias)).abs().max().item()
        if worst > tol:
            return f"exported classifier's logits differ from the reward model's scores by {worst:.2e} (> {tol:g})"
        return {"max_abs_diff": worst}

    written = write_checked(out, model, tokenizer, AutoModelForSequenceClassification, dtype, check, {
        "reward_model": str(reward_dir.resolve()), "base": str(base_path.resolve()), "dtype": dtype,
        "chat_template": meta.get("chat_template", True), "max_length": meta.get("max_length"),
        "head_bias_left_out": bias})
    return written, bias


def head_bias(reward_dir: Path) -> float:
    """The saved head's bias; 0.0 when it has none (every head trained since the head lost its bias)."""
    from safetensors.torch import load_file

    from reward.model import HEAD

    bias = load_file(str(reward_dir / HEAD)).get("bias")
    return 0.0 if bias is None else float(bias.reshape(-1)[0])
