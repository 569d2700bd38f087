"""A reward model is a LoRA adapter on the shared base plus a scalar head (or, trained with
`use_peft: false`, the base itself plus the head, saved as a sequence classifier).

The score of a (prompt, completion) sequence is `head(h_last)`, where `h_last` is the
final hidden state of its last non-padding token with the reward adapter active.
Nothing else is copied: the base weights stay the one copy in `SharedBase`, so a
trained reward model can be attached to a base that is busy training a policy.

Saved layout (one folder, written atomically):
    adapter_model.safetensors, adapter_config.json   the PEFT adapter
    align_meta.json                                  adapter name, base name and fingerprint, LoRA settings
    head.safetensors                                 head weight (1, H), float32 (folders written before
                                                     the head lost its bias also hold bias (1,))
    reward_meta.json                                 how sequences were encoded (chat template, max length)

A full fine-tuning run (name None: no adapter) writes what TRL's RewardTrainer writes instead: a
transformers sequence classifier (config.json, model.safetensors, tokenizer; reward/as_classifier.py),
with reward_meta.json beside it saying kind "reward_classifier". `find_reward_folder` tells the two apart.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from align.core.atomic import atomic_dir
from align.core.base import SharedBase
from align.core.errors import UserError
from align.core.lora import LoraSettings
from align.core.packing import last_positions, pack_batch

META = "reward_meta.json"
HEAD = "head.safetensors"
FORMAT_VERSION = 1
CLASSIFIER = "reward_classifier"  # reward_meta.json's kind for a full fine-tuning run's folder


class RewardModelError(UserError, ValueError):
    """A reward-model folder that is missing, malformed, or made for another base."""


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last position with mask 1 in each row: works for left and right padding.

    Example: mask [0, 1, 1, 0] -> positions*mask = [0, 1, 2, 0] -> argmax 2.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T), got {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    if not mask.any(-1).all():
        empty = (~mask.any(-1)).nonzero().flatten().tolist()
        raise ValueError(f"rows {empty} have no tokens (attention_mask all zero)")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask).argmax(-1)


def encode(tokenizer, prompt, completion, chat_template: bool = True,
           max_length: int | None = None) -> list[int]:
    """Token ids of one (prompt, completion), exactly as training reads a preference pair.

    The same function as training (`align.data.preference.tokenize_answers`): chat template choice, EOS and
    the completion cut to fit `max_length`. Training refuses a prompt that leaves no room; a
    score is still owed, so such a prompt keeps its last `max_length - 1` tokens.
    """
    from align.data.preference import tokenize_answers

    p_ids, (c_ids,) = tokenize_answers(prompt, [completion], tokenizer, max_length, chat_template, "score")
    if max_length is not None and len(p_ids) >= max_length:
        p_ids = p_ids[len(p_ids) - (max_length - 1):]
    return p_ids + c_ids


def pad_sequences(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T) long, padded on `side`."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def new_head(hidden_size: int, device=None, seed: int | None = None) -> nn.Linear:
    """Linear(H, 1, bias=False) in float32, weights ~ N(0, 1/(H+1)): initial scores of order 1.

    No bias, as transformers' `score` layer (TRL's reward classifier): the exported classifier then
    scores exactly as this model does. A bias would shift every reward equally, which neither the
    pairwise loss nor GRPO's group-normalised advantages see, so nothing is lost.
    """
    head = nn.Linear(hidden_size, 1, bias=False, dtype=torch.float32, device=device)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) / (hidden_size + 1) ** 0.5)
    return head


def load_head(path: Path, hidden_size: int, device=None) -> nn.Linear:
    """The saved head: weight (1, H), and the bias (1,) that folders from before bias-free heads hold."""
    sd = load_file(str(path))
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    if shapes not in ({"weight": (1, hidden_size)}, {"weight": (1, hidden_size), "bias": (1,)}):
        raise RewardModelError(f"{path}: expected weight (1, {hidden_size}) (and, in older folders, bias (1,)), "
                               f"got {{{', '.join(f'{k}: {s}' for k, s in shapes.items())}}}")
    head = nn.Linear(hidden_size, 1, bias="bias" in sd, dtype=torch.float32, device=device)
    head.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()})
    return head


def find_reward_folder(path: str | os.PathLike) -> tuple[Path, str] | None:
    """(folder, kind) of align's reward model at `path` or `path`/reward_model (a run folder): kind "adapter"
    (RewardModel.attach loads it) or "classifier" (a sequence classifier, from use_peft: false); else None."""
    path = Path(path)
    for candidate in (path, path / "reward_model"):
        if (candidate / META).is_file():
            try:
                kind = json.loads((candidate / META).read_text()).get("kind")
            except (OSError, ValueError, AttributeError):
                kind = None
            return candidate, "classifier" if kind == CLASSIFIER else "adapter"
    return None


def _check_base(base: SharedBase, meta: dict, path: Path) -> None:
    saved = meta.get("base_fingerprint")
    if not isinstance(saved, dict):
        raise RewardModelError(f"{path / 'align_meta.json'}: no base_fingerprint; cannot check which base "
                               f"this reward model was trained on")
    here = base.fingerprint()
    diffs = [f"{k}: trained on {saved.get(k)!r}, this base has {here.get(k)!r}"
             for k in sorted(set(saved) | set(here)) if saved.get(k) != here.get(k)]
    if diffs:
        raise RewardModelError(
            f"{path}: this reward model was trained on a different base ({meta.get('base')!r}) than the one "
            f"it is being attached to ({base.name_or_path!r}); its scores would be meaningless. "
            f"Differences: " + "; ".join(diffs))


class RewardModel:
    """Reward adapter `name` on `base` plus a scalar `head`.

    - `create(base)`: fresh adapter (starts equal to the base) and head, to be trained; `name=None`: no adapter,
      the base's own weights train with the head (full fine-tuning).
    - `attach(base, path)`: a saved reward model, frozen, on a base that may carry other adapters.
    - `score_ids(ids, mask)` / `score(prompts, completions)`: (B,) float32 rewards.
    """

    def __init__(self, base: SharedBase, name: str | None, head: nn.Linear, chat_template: bool = True,
                 max_length: int | None = None):
        self.base = base
        self.name = name
        self.head = head
        self.chat_template = chat_template
        self.max_length = max_length

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, base: SharedBase, name: str | None = "reward", lora: LoraSettings | None = None,
               chat_template: bool = True, max_length: int | None = None, seed: int | None = None,
               ) -> "RewardModel":
        """A fresh trainable adapter `name` (B = 0) and a new head; the active adapter is left as it was.
        `name` None adds no adapter: the base itself is what trains (use_peft: false)."""
        if name is not None:
            with _keep_active(base):
                base.add_adapter(name, lora or LoraSettings(), trainable=True)
        device = next(base.model.parameters()).device
        return cls(base, name, new_head(base.hidden_size, device, seed), chat_template, max_length)

    @classmethod
    def attach(cls, base: SharedBase, path: str | os.PathLike, name: str = "reward",
               trainable: bool = False) -> "RewardModel":
        """Load a saved reward model onto `base` (which may hold other adapters) under `name`.

        Refuses a reward model trained on another base (architecture or weight fingerprint
        differ). The other adapters, and which one is active, are left untouched.
        """
        path = Path(path)
        for f in ("adapter_model.safetensors", "align_meta.json", HEAD, META):
            if not (path / f).is_file():
                raise RewardModelError(f"{path}: not a saved reward model (missing {f}); expected the folder "
                                       f"written by RewardModel.save / `align reward`")
        meta = json.loads((path / "align_meta.json").read_text())
        rmeta = json.loads((path / META).read_text())
        _check_base(base, meta, path)
        base.check_adapter_base(path, "reward model")  # whole files, exactly the tensors its config implies
        if name in base.adapters:
            raise RewardModelError(f"adapter {name!r} already exists on this base; attach under another name")
        device = next(base.model.parameters()).device
        head = load_head(path / HEAD, base.hidden_size, device)
        # PEFT puts the whole model in eval mode when it loads a frozen adapter; a policy being
        # trained on this base (dropout on) must not notice, so the mode is put back.
        was_training = base.model.training
        with _keep_active(base):
            base.load_adapter(name, path, trainable=trainable)
            base.model.train(was_training)
            if "lora" in meta:
                base.settings[name] = LoraSettings(**meta["lora"])
        head.requires_grad_(trainable)
        return cls(base, name, head, rmeta.get("chat_template", True), rmeta.get("max_length"))

    # -- scoring ------------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """What training updates: the adapter's LoRA tensors (without one, every base weight) and the head."""
        body = self.base.model.parameters() if self.name is None else self.base.adapter_parameters(self.name).values()
        return list(body) + list(self.head.parameters())

    def _body(self):
        """The adapter on, for a forward; full fine-tuning has none to switch."""
        return nullcontext() if self.name is None else self.base.adapter(self.name)

    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  padding_free: bool = False) -> torch.Tensor:
        """(B,) float32 rewards read at the last non-padding token of each row (left or right padding);
        `padding_free`: the rows run as one packed row and each score is read at its sequence's last token."""
        if padding_free:
            packed = pack_batch(input_ids, attention_mask)
            with self._body():
                out = self.base.decoder(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)
            h = out.last_hidden_state[0, last_positions(packed.seq_lens)]
            return self.head(h.float()).squeeze(-1)
        with self._body():
            hidden = self.base.hidden(input_ids, attention_mask)
        last = last_token_index(attention_mask)
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(h.float()).squeeze(-1)

    def encode(self, prompt, completion) -> list[int]:
        """Token ids of one (prompt, completion) as this model was trained to read them."""
        return encode(self.base.tokenizer, prompt, completion, self.chat_template, self.max_length)

    @torch.no_grad()
    def score(self, prompts: list, completions: list, batch_size: int = 16) -> torch.Tensor:
        """(N,) float32 rewards of (prompt, completion) pairs given as text or chat messages."""
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts and {len(completions)} completions")
        device = next(self.base.model.parameters()).device
        pad = self.base.tokenizer.pad_token_id
        seqs = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        # Sorting by length keeps padding (wasted compute) small; scores go back in input order.
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = torch.empty(len(seqs), dtype=torch.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = pad_sequences([seqs[i] for i in idx], pad)
            out[idx] = self.score_ids(ids.to(device), mask.to(device)).cpu()
        return out

    def as_reward_fn(self, batch_size: int = 16):
        """This model as a reward function fn(prompts, completions, **kwargs) -> list[float].

        TRL calls reward functions by keyword with the batch's other columns (completion_ids, answers,
        ...); they, and a positional `answers`, are accepted and not read. `fn.model` is this model.
        """

        def reward_model(prompts, completions, *_, **__):
            return self.score(prompts, completions, batch_size).tolist()

        reward_model.__name__ = f"reward_model:{self.name}"
        reward_model.model = self
        return reward_model

    # -- saving -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write adapter (PEFT safetensors) + head.safetensors + metadata into `path`, atomically; without an
        adapter, a sequence classifier (`save_classifier`)."""
        path = Path(path)
        if self.name is None:
            return self.save_classifier(path, extra)
        with atomic_dir(path) as tmp:
            self.base.save_adapter(self.name, tmp / "adapter")
            for f in (tmp / "adapter").iterdir():
                f.rename(tmp / f.name)
            (tmp / "adapter").rmdir()
            save_file({k: v.detach().float().cpu().contiguous() for k, v in self.head.state_dict().items()},
                      str(tmp / HEAD))
            (tmp / META).write_text(json.dumps(self.meta("reward_model", extra), indent=2))
        return path

    def meta(self, kind: str, extra: dict | None) -> dict:
        return {"format": FORMAT_VERSION, "kind": kind, "adapter": self.name, "hidden_size": self.base.hidden_size,
                "chat_template": self.chat_template, "max_length": self.max_length, **(extra or {})}

    def save_classifier(self, path: Path, extra: dict | None = None) -> Path:
        """The base and head as a float32 sequence classifier with its tokenizer (TRL's RewardTrainer output),
        reloaded and checked against this model's scores before the folder appears (atomically)."""
        import copy

        from transformers import AutoModelForSequenceClassification

        from align.core.checked_write import write_checked
        from reward.as_classifier import CHECK_PAIRS, classifier_from, classifier_scores

        seqs = [self.encode(p, c) for p, c in CHECK_PAIRS]
        device = next(self.base.model.parameters()).device
        with torch.no_grad():
            want = self.score_ids(*(t.to(device) for t in pad_sequences(seqs, self.base.tokenizer.pad_token_id)))
        tokenizer = copy.deepcopy(self.base.tokenizer)  # the classifier may get a pad token of its own
        model = classifier_from(self.base.model, self.head.weight.detach().float().cpu(), tokenizer, torch.float32)

        def check(reloaded) -> str | dict:
            got = classifier_scores(reloaded, *pad_sequences(seqs, tokenizer.pad_token_id))
            worst = (got - want.cpu()).abs().max().item()
            return f"the classifier's logits differ from the trained scores by {worst:.2e}" if worst > 1e-4 else \
                {"max_abs_diff": worst}

        return write_checked(path, model, tokenizer, AutoModelForSequenceClassification, "float32", check,
                             self.meta(CLASSIFIER, extra), META)

    def remove(self) -> None:
        """Take the reward adapter off the base (frees its tensors; other adapters are untouched)."""
        with _keep_active(self.base, dropping=self.name):
            self.base.peft.delete_adapter(self.name)
        self.base.trainable.discard(self.name)
        self.base.settings.pop(self.name, None)


class _keep_active:
    """Context that restores the base's active adapter (PEFT activates whatever was added last)."""

    def __init__(self, base: SharedBase, dropping: str | None = None):
        self.base, self.dropping = base, dropping

    def __enter__(self):
        peft = self.base.peft
        self.previous = peft.active_adapter if peft is not None else None
        return self

    def __exit__(self, *exc):
        prev = self.previous
        if prev is not None and prev != self.dropping and prev in self.base.adapters:
            self.base.set_active(prev)
        return False
