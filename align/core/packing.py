"""Padding-free batches (TRL's `padding_free`): a batch's sequences laid end to end in one row.

The row carries per-sequence position ids that restart at 0. With no 2-D attention mask, transformers
(masking_utils.find_packed_sequence_indices) reads each restart as a new sequence and builds a
block-diagonal causal mask, for sdpa and eager as well as flash-attention, so no token attends across
a sequence boundary. `check_packed_attention` verifies that on the loaded model before training: an
architecture whose mask ignores position ids (e.g. ALiBi models) is refused in one line.

Pure functions, on lists or tensors: `pack_sequences` (lists in, one row out), `pack_batch` (a padded
(B, T) batch, left or right padded, to one (1, N) row), `unpack_tokens` (per-token values of the row
back into the padded (B, T) layout), `sequence_sums`, `last_positions`, `pad_fraction`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from align.core.errors import UserError


def pack_sequences(seqs: list[list[int]], masks: list[list[int]] | None = None) -> dict[str, list[int]]:
    """One row from `seqs`: input_ids, position_ids (restarting at 0), seq_lens, cu_seqlens (flash-attention's
    [0, n1, n1+n2, ...]) and, with `masks`, the label mask with each sequence's first token set to 0 (it is never
    predicted: the token before it belongs to another sequence)."""
    out: dict[str, list[int]] = {"input_ids": [], "position_ids": [], "seq_lens": [], "cu_seqlens": [0]}
    if masks is not None:
        out["mask"] = []
    for i, seq in enumerate(seqs):
        if not seq:
            raise ValueError(f"sequence {i} is empty")
        out["input_ids"] += list(seq)
        out["position_ids"] += list(range(len(seq)))
        out["seq_lens"].append(len(seq))
        out["cu_seqlens"].append(out["cu_seqlens"][-1] + len(seq))
        if masks is not None:
            out["mask"] += [0] + list(masks[i][1:len(seq)])
    return out


def split_sequences(values: list, seq_lens: list[int]) -> list[list]:
    """The inverse of laying sequences end to end: `values` of the packed row cut back per sequence."""
    if sum(seq_lens) != len(values):
        raise ValueError(f"seq_lens sum to {sum(seq_lens)}, the row has {len(values)} values")
    out, start = [], 0
    for n in seq_lens:
        out.append(list(values[start:start + n]))
        start += n
    return out


@dataclass
class PackedBatch:
    """A padded (B, T) batch as one row: its tokens in row-major order, padding dropped."""

    input_ids: torch.Tensor  # (1, N)
    position_ids: torch.Tensor  # (1, N), restarting at 0 where each sequence begins
    where: torch.Tensor  # (B, T) bool: the padded slots the N tokens came from (row-major)
    seq_lens: torch.Tensor  # (S,) tokens of each sequence, in row order

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return torch.nn.functional.pad(self.seq_lens.cumsum(0), (1, 0)).to(torch.int32)


def pack_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor | None = None) -> PackedBatch:
    """Drop the padding of a (B, T) batch (each row's real tokens contiguous, on either side).

    `position_ids` (B, T): rows that are already packed (SFT's packing) keep their restarts; without them each
    row is one sequence counted from 0.
    """
    where = attention_mask.bool()
    edges = where.int().diff(dim=1).ne(0).sum(dim=1) + where[:, 0].int() + where[:, -1].int()
    if (edges > 2).any() or (~where.any(dim=1)).any():
        raise ValueError("padding_free: every row needs one contiguous run of tokens (attention_mask 1 ... 1)")
    if position_ids is None:
        position_ids = (where.long().cumsum(-1) - 1).clamp(min=0)
    pos = position_ids[where]
    starts = torch.nonzero(pos == 0).flatten()
    ends = torch.cat([starts[1:], starts.new_tensor([pos.numel()])])
    return PackedBatch(input_ids[where].unsqueeze(0), pos.unsqueeze(0), where, ends - starts)


def unpack_tokens(flat: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """(N, ...) values of the packed row -> (B, T, ...) in the padded layout, zero at padding (differentiable)."""
    out = flat.new_zeros((*packed.where.shape, *flat.shape[1:]))
    return out.index_put((packed.where,), flat)


def sequence_sums(values: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """(S,) sums of (N,) per-token `values` over each sequence of the row."""
    owner = torch.repeat_interleave(torch.arange(len(seq_lens), device=values.device), seq_lens.to(values.device))
    return values.new_zeros(len(seq_lens)).index_add(0, owner, values)


def last_positions(seq_lens: torch.Tensor) -> torch.Tensor:
    """(S,) index in the row of each sequence's last token (a reward model's score token)."""
    return seq_lens.cumsum(0) - 1


def pad_fraction(batches: list[list[int]], padding_free: bool = False) -> tuple[int, int]:
    """(pad tokens, all tokens) a forward of these batches (sequence lengths each) processes: right-padded to the
    longest sequence of each batch, or, padding-free, none."""
    pads = 0 if padding_free else sum(len(b) * max(b) - sum(b) for b in batches if b)
    return pads, sum(sum(b) for b in batches) + pads


# -- the model check ------------------------------------------------------------------------------------------
def check_packed_attention(decoder, vocab_size: int, what: str) -> None:
    """Refuse padding-free batches for a decoder that lets packed sequences see each other.

    Two sequences are run apart and packed into one row (position ids restarting at 0, no attention mask);
    the second one's hidden states must not change. `what` names the model in the message.
    """
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(3, vocab_size, (1, n), generator=gen) for n in (5, 4))
    device = next(decoder.parameters()).device
    a, b = a.to(device), b.to(device)
    packed = pack_sequences([a[0].tolist(), b[0].tolist()])
    ids = torch.tensor([packed["input_ids"]], device=device)
    pos = torch.tensor([packed["position_ids"]], device=device)
    with torch.no_grad():
        try:
            alone = decoder(input_ids=b, position_ids=pos[:, 5:], use_cache=False).last_hidden_state.float()
            together = decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[:, 5:].float()
        except TypeError as e:  # a forward without position_ids
            raise UserError(f"padding_free: {what} does not take position_ids ({e}); set padding_free: false") from e
    # float32 sdpa/eager agree to ~1e-6 packed or not; half precision rounds differently per shape
    tolerance = 1e-3 if next(decoder.parameters()).dtype == torch.float32 else 5e-2
    scale = alone.abs().max().clamp_min(1e-6)
    gap = ((alone - together).abs().max() / scale).item()
    if not gap <= tolerance:
        impl = getattr(getattr(decoder, "config", None), "_attn_implementation", "?")
        raise UserError(f"padding_free: {what} (attention {impl}) lets packed sequences attend to each other (a "
                        f"sequence's hidden states moved by {gap:.2g} of their scale when packed after another); "
                        f"set padding_free: false (SFT: packing: false too) for this model")
