"""The shared AdamW: torch's fused kernel where it applies, the same updates as the reference loop."""

from __future__ import annotations

import torch

from align.train.optim import adamw


def test_fused_adamw_matches_the_reference_loop():
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(16, 8, generator=gen), torch.randn(8, 32, generator=gen)]
    grads = [[torch.randn(t.shape, generator=gen) for t in init] for _ in range(5)]
    runs = []
    for make in (lambda ps: adamw([{"params": ps[:1], "lr": 1e-2}, {"params": ps[1:], "lr": 1e-3}],
                                  weight_decay=0.1),
                 lambda ps: torch.optim.AdamW([{"params": ps[:1], "lr": 1e-2}, {"params": ps[1:], "lr": 1e-3}],
                                              weight_decay=0.1, foreach=False)):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = make(params)
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            opt.step()
        runs.append((opt, [p.detach() for p in params]))
    (ours, got), (_, want) = runs
    assert ours.defaults["fused"]  # CPU float32: the fused kernel, not the per-tensor loop
    for a, b, start in zip(got, want, init, strict=True):
        assert (a - start).abs().max() > 1e-3  # the steps moved the parameters
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unsupported_devices_keep_the_default_implementation():
    # Fused runs on CPU and CUDA only; parameters elsewhere (here: meta) get torch's default AdamW.
    assert not adamw([torch.zeros(3, device="meta", requires_grad=True)], lr=1e-3).defaults["fused"]
