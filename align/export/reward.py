"""`align export --reward`: a reward model as a plain transformers sequence classifier.

The reward adapter is merged into the base's decoder, the scalar head becomes the
classifier's `score` layer (num_labels=1), and the folder holds safetensors weights and the
tokenizer: `AutoModelForSequenceClassification.from_pretrained(OUT)` scores sequences with no
align and no PEFT installed (e.g. as a TRL GRPO `reward_funcs` model).

Where the score is read must agree. RewardModel reads the last position whose attention
mask is 1; transformers reads the rightmost token that is not `pad_token_id`. Sequences end
in EOS, and many tokenizers pad with EOS, so with that pad id transformers would read the
token before EOS. The export therefore gives the tokenizer a pad token of its own when its pad
token could appear in a sequence (one new embedding row, used by nothing else), and pads on the
right, where positions count from 0 as RewardModel's do.

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

from align.core.errors import UserError
from align.export import guard
from align.export.checked import write_checked

PAD_TOKEN = "<|align_pad|>"
CHECK_PAIRS = (
    ("What is 12+7?", "19"),
    ("What is 12+7?", "12 + 7 = 20"),
    ("Say hello.", "Hello! How can I help you today?"),
    ("The quick brown fox", "jumps over the lazy dog."),
)


def find_reward_dir(path: str | Path) -> Path:
    """A reward run folder (holding reward_model/) or the reward model folder itself."""
    from reward.model import META

    path = Path(path)
    for candidate in (path, path / "reward_model"):
        if (candidate / META).is_file():
            return candidate
    raise UserError(f"--reward {path}: expected a reward run folder (with reward_model/) or a saved reward "
                    f"model folder (with {META})")


def needs_own_pad(tokenizer) -> bool:
    """True when the pad token is missing or may occur inside a sequence (EOS, BOS, the chat template's)."""
    pad = tokenizer.pad_token_id
    if pad is None or pad in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        return True
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and tokenizer.pad_token in template


def build_classifier(base_path: Path, reward_dir: Path, dtype: torch.dtype, tokenizer):
    """The merged decoder with the head's weight as `score`, num_labels=1, pad_token_id set (in memory)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from reward.model import HEAD

    head = load_file(str(reward_dir / HEAD))
    causal = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, use_safetensors=True)
    merged = PeftModel.from_pretrained(causal, reward_dir).merge_and_unload()
    config = AutoConfig.from_pretrained(base_path)
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    decoder = getattr(model, model.base_model_prefix)
    decoder.load_state_dict(getattr(merged, merged.base_model_prefix).state_dict())
    if not isinstance(getattr(model, "score", None), torch.nn.Linear):
        raise UserError(f"{type(model).__name__}: no `score` layer to hold the reward head")
    with torch.no_grad():
        model.score.weight.copy_(head["weight"].to(dtype))
    if needs_own_pad(tokenizer):
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


@torch.no_grad()
def classifier_scores(model, tokenizer, seqs: list[list[int]]) -> torch.Tensor:
    """(N,) logits of the exported classifier on token id lists, right-padded with its pad id."""
    from reward.model import pad_sequences

    ids, mask = pad_sequences(seqs, tokenizer.pad_token_id, side="right")
    return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()


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
    from reward.model import encode

    reward_dir, base_path, meta = checked_sources(reward, Path(out), base, overwrite)
    tokenizer = load_tokenizer(str(base_path))
    seqs = [encode(tokenizer, p, c, meta.get("chat_template", True), meta.get("max_length")) for p, c in CHECK_PAIRS]
    want = reward_scores(base_path, reward_dir, dtype, seqs)
    model = build_classifier(base_path, reward_dir, resolve_dtype(dtype), tokenizer)
    bias = head_bias(reward_dir)

    def check(reloaded) -> str | dict:
        worst = (classifier_scores(reloaded, tokenizer, seqs) - (want - bias)).abs().max().item()
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
