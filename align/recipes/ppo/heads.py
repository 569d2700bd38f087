"""The critic's value head: one linear map from the critic adapter's final hidden state to a scalar."""

from __future__ import annotations

import torch
from torch import nn


class ValueHead(nn.Module):
    """V(s_t) = w . h_t + b for hidden states h (..., H) -> (...).

    Initialised small and from its own generator, so that the same seed gives the
    same head whatever else consumed the global RNG, and early values stay near 0
    (returns are rewards in [0, 1]-ish ranges).
    """

    def __init__(self, hidden_size: int, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, dtype=dtype)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(1, hidden_size, generator=g) * (0.1 / hidden_size ** 0.5))
            self.linear.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1).float()
