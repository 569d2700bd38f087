"""What one PPO step works on: the prompt rows, and the sampled batch packed into padded tensors."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """One step's sampled batch, packed for the trainer. B = prompts x generations, T = completion width.

    input_ids, attention_mask: (B, P + T), prompts left-padded to P, completions right-padded to T.
    mask: (B, T) 1 on real completion tokens. sampler_logprobs: (B, T) from the engine.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor
    sampler_logprobs: torch.Tensor
    prompt_width: int
    rows: list[dict]          # the prompt row of each sequence (repeated per generation)
    texts: list[str]          # decoded completions
    stopped: torch.Tensor     # (B,) 1 where the completion ended with EOS
    places: list[str] | None = None  # where each sequence's prompt row came from ("prompts.jsonl:3")

    def completion_ids(self) -> list[list[int]]:
        """Each completion's token ids, padding dropped (what TRL passes reward functions)."""
        lengths = self.mask.sum(1).long().tolist()
        return [self.input_ids[i, self.prompt_width:self.prompt_width + n].tolist() for i, n in enumerate(lengths)]

    def select(self, idx: torch.Tensor) -> "Rollout":
        return Rollout(self.input_ids[idx], self.attention_mask[idx], self.mask[idx], self.sampler_logprobs[idx],
                       self.prompt_width, [self.rows[i] for i in idx.tolist()],
                       [self.texts[i] for i in idx.tolist()], self.stopped[idx])


def load_rows(spec: str, n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """Prompt rows (a `PromptRows`, places beside the rows): the arithmetic task draws `n`; any other
    source (align/data/prompt_rows.py) is read whole, as before, with every column kept."""
    from align.data.prompt_rows import DEMO_TASK, load_prompt_rows

    return load_prompt_rows(spec, n=n if spec == DEMO_TASK else None, seed=seed, exclude=exclude)


def pack(samples: list[list], rows: list[dict], pad_id: int) -> Rollout:
    """Flatten engine samples (prompts x generations) into padded tensors."""
    flat = [(s, row) for group, row in zip(samples, rows, strict=True) for s in group]
    P = max(len(s.prompt_ids) for s, _ in flat)
    T = max(1, max(len(s.completion_ids) for s, _ in flat))
    B = len(flat)
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, P + T, dtype=torch.long)
    mask = torch.zeros(B, T)
    old = torch.zeros(B, T)
    for i, (s, _) in enumerate(flat):
        p, c = s.prompt_ids, s.completion_ids
        ids[i, P - len(p):P] = torch.tensor(p)
        ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
        attn[i, P - len(p):P + len(c)] = 1
        mask[i, :len(c)] = 1
        old[i, :len(c)] = torch.tensor(s.logprobs, dtype=torch.float32)
    stopped = torch.tensor([float(s.finish_reason == "stop") for s, _ in flat])
    return Rollout(ids, attn, mask, old, P, [r for _, r in flat], [s.text for s, _ in flat], stopped)


def prompt_indices(n_rows: int, prompts_per_step: int, seed: int, step: int) -> list[int]:
    """Step `step`'s prompts (1-based): a fixed shuffle of the rows per pass, so resume sees the same ones."""
    out = []
    for j in range((step - 1) * prompts_per_step, step * prompts_per_step):
        order = list(range(n_rows))
        random.Random(seed * 7919 + j // n_rows).shuffle(order)
        out.append(order[j % n_rows])
    return out
