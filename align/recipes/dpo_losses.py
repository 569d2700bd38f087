"""Every DPO loss type of TRL 1.16 as pure tensor functions, and their weighted sum.

Inputs are per-pair sequence log-probabilities, shape (B,), of the policy and the reference for the
chosen and the rejected completion (`PairLogps`). The log-ratios are ρc = πc - ref_c, ρr = πr - ref_r;
`f_divergence_type` maps each through f'(exp ρ) into a score (reverse_kl: the log-ratio itself), and
δ = score_c - score_r. Each loss type is one function of those terms in `LOSSES` (TRL's formulas):

  sigmoid       -log σ(βδ)                            (cdpo: (1-ε)·that + ε·(-log σ(-βδ)), opt-in)
  hinge         max(0, 1 - βδ)                        ipo     (δ̄ - 1/(2β))², δ̄ from per-token averages
  exo_pair      KL(softmax(βδ, 0) ‖ (1-ε, ε))         nca_pair  -log σ(βρc) - ½log σ(-βρc) - ½log σ(-βρr)
  robust        ((1-ε)(-log σ(βδ)) - ε(-log σ(-βδ))) / (1-2ε)
  bco_pair      -log σ(βρc) - log σ(-βρr)             sppo_hard (ρc - 1/(2β))² + (ρr + 1/(2β))²
  aot           sigmoid(ε) on sorted (π_c-π_r) minus sorted (ref_c-ref_r)
  aot_unpaired  sigmoid(ε) on sorted ρc minus sorted ρr
  apo_zero      1 - σ(βρc) + σ(βρr)                   apo_down  σ(βρc) + 1 - σ(β(ρc - ρr))
  discopop      -log σ(βδ)·(1 - σ(βδ/τ)) + exp(-βδ)·σ(βδ/τ)
  sft           mean NLL of the batch's chosen tokens sigmoid_norm  -log σ(βδ̄)

`preference_loss` sums Σ_k w_k · mean_pairs(loss_k · wpo) over `loss_type` (TRL's loss_weights, MPO;
each weight 1.0 when not given). TRL 1.16's bco_pair keeps no running reward mean, so no loss here has
state across steps. The implicit rewards β·ρ use the (LD-weighted) summed log-probs, as TRL logs them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The f-DPO reparameterisation cancels log Z(x) only in the chosen - rejected difference (TRL's list).
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
SMOOTHED_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")  # TRL 1.16 reads label_smoothing in these only
SORTED_LOSSES = ("aot", "aot_unpaired")  # they sort the batch: a per-pair WPO weight would be misaligned


@dataclass
class PairLogps:
    """Per-pair sequence log-probs (B,) and what some losses need besides them."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_lengths: torch.Tensor | None = None  # completion tokens: ipo, sigmoid_norm
    rejected_lengths: torch.Tensor | None = None
    chosen_nll: torch.Tensor | None = None  # sft's scalar; default: -Σ policy_chosen / Σ chosen_lengths
    weights: torch.Tensor | None = None  # WPO's per-pair weight (no gradient), or None


@dataclass(frozen=True)
class LossSettings:
    beta: float
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    cdpo: bool = False  # sigmoid reads label_smoothing (conservative DPO); TRL 1.16's sigmoid does not


@dataclass
class Terms:
    """What the loss functions read: the inputs, log-ratios, f-divergence scores and their difference."""

    lp: PairLogps
    chosen_logratios: torch.Tensor
    rejected_logratios: torch.Tensor
    chosen_scores: torch.Tensor
    rejected_scores: torch.Tensor
    delta: torch.Tensor


def f_divergence_scores(logratio: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """f'(t) at t = exp(logratio): the score that replaces the log-ratio in the f-DPO losses (TRL's formulas)."""
    if kind == "reverse_kl":
        return logratio
    if kind == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-logratio)
    if kind == "js_divergence":  # f'(t) = log(2t / (t + 1)) = log 2 + log σ(log t)
        return math.log(2) + F.logsigmoid(logratio)
    if kind == "alpha_divergence":  # f'(t) = (t^(α-1) - 1) / (α - 1); α = 1 is reverse KL
        if abs(alpha - 1.0) < 1e-6:
            return logratio
        t = (alpha - 1.0) * logratio
        clamp_max = {torch.float16: 11.0}.get(t.dtype, 80.0)  # exp stays finite after the cast back
        return (torch.exp(torch.clamp(t.float(), max=clamp_max)) - 1.0).to(t.dtype) * (1.0 / (alpha - 1.0))
    raise ValueError(f"f_divergence_type: expected one of {F_DIVERGENCES}, got {kind!r}")


def _averaged_delta(t: Terms) -> torch.Tensor:
    lp = t.lp
    if lp.chosen_lengths is None or lp.rejected_lengths is None:
        return t.delta  # inputs already per-token averages
    lc = lp.chosen_lengths.to(t.chosen_scores).clamp(min=1.0)
    lr = lp.rejected_lengths.to(t.rejected_scores).clamp(min=1.0)
    return t.chosen_scores / lc - t.rejected_scores / lr


def _smoothed_sigmoid(x: torch.Tensor, eps: float) -> torch.Tensor:
    return -F.logsigmoid(x) * (1 - eps) - F.logsigmoid(-x) * eps


def _sigmoid(t: Terms, s: LossSettings) -> torch.Tensor:
    if s.cdpo:
        return _smoothed_sigmoid(s.beta * t.delta, s.label_smoothing)
    return -F.logsigmoid(s.beta * t.delta)


def _hinge(t: Terms, s: LossSettings) -> torch.Tensor:
    return torch.relu(1 - s.beta * t.delta)


def _ipo(t: Terms, s: LossSettings) -> torch.Tensor:
    # Per-token averages (Azar et al. Eq. 17 as its authors normalise it; TRL's note): β is IPO's τ.
    return (_averaged_delta(t) - 1 / (2 * s.beta)) ** 2


def _exo_pair(t: Terms, s: LossSettings) -> torch.Tensor:
    # EXO-pref (Ji et al. 2024, Eq. 16) for K = 2: KL(softmax over {chosen, rejected} ‖ (1-ε, ε)).
    x = s.beta * t.delta
    eps = torch.tensor(s.label_smoothing, device=x.device)
    return (torch.sigmoid(x) * (F.logsigmoid(x) - torch.log1p(-eps))
            + torch.sigmoid(-x) * (F.logsigmoid(-x) - torch.log(eps)))


def _nca_pair(t: Terms, s: LossSettings) -> torch.Tensor:
    rc, rr = s.beta * t.chosen_logratios, s.beta * t.rejected_logratios
    return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)


def _robust(t: Terms, s: LossSettings) -> torch.Tensor:
    eps, x = s.label_smoothing, s.beta * t.delta
    return (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)


def _bco_pair(t: Terms, s: LossSettings) -> torch.Tensor:
    return -F.logsigmoid(s.beta * t.chosen_logratios) - F.logsigmoid(-s.beta * t.rejected_logratios)


def _sppo_hard(t: Terms, s: LossSettings) -> torch.Tensor:
    # SPPO with hard probabilities: P = 1 for the winner, 0 for the loser (Wu et al. 2024, Eq. 4.7).
    return (t.chosen_logratios - 0.5 / s.beta) ** 2 + (t.rejected_logratios + 0.5 / s.beta) ** 2


def _aot(t: Terms, s: LossSettings) -> torch.Tensor:
    lp = t.lp
    policy, _ = torch.sort(lp.policy_chosen - lp.policy_rejected, dim=0)
    ref, _ = torch.sort(lp.ref_chosen - lp.ref_rejected, dim=0)
    return _smoothed_sigmoid(s.beta * (policy - ref), s.label_smoothing)


def _aot_unpaired(t: Terms, s: LossSettings) -> torch.Tensor:
    chosen, _ = torch.sort(t.chosen_logratios, dim=0)
    rejected, _ = torch.sort(t.rejected_logratios, dim=0)
    return _smoothed_sigmoid(s.beta * (chosen - rejected), s.label_smoothing)


def _apo_zero(t: Terms, s: LossSettings) -> torch.Tensor:
    # APO-zero (D'Oosterlinck et al. 2024, Eq. 7): chosen up, rejected down.
    return 1 - torch.sigmoid(s.beta * t.chosen_logratios) + torch.sigmoid(s.beta * t.rejected_logratios)


def _apo_down(t: Terms, s: LossSettings) -> torch.Tensor:
    # APO-down (Eq. 8): both down, rejected more; for chosen answers worse than the model's own.
    return (torch.sigmoid(s.beta * t.chosen_logratios)
            + 1 - torch.sigmoid(s.beta * (t.chosen_logratios - t.rejected_logratios)))


def _discopop(t: Terms, s: LossSettings) -> torch.Tensor:
    # DiscoPOP (Chris Lu et al. 2024, Eq. 5): logistic and exponential losses mixed by σ(βδ/τ).
    x = s.beta * t.delta
    mix = torch.sigmoid(x / s.discopop_tau)
    return -F.logsigmoid(x) * (1 - mix) + torch.exp(-x) * mix


def _sft(t: Terms, s: LossSettings) -> torch.Tensor:
    lp = t.lp
    nll = lp.chosen_nll
    if nll is None:
        lengths = lp.chosen_lengths if lp.chosen_lengths is not None else torch.ones_like(lp.policy_chosen)
        nll = chosen_nll(lp.policy_chosen, lengths)
    return nll.expand(lp.policy_chosen.shape[0])  # one batch value per pair: its mean is the value


def _sigmoid_norm(t: Terms, s: LossSettings) -> torch.Tensor:
    return -F.logsigmoid(s.beta * _averaged_delta(t))


LOSSES: dict[str, Callable[[Terms, LossSettings], torch.Tensor]] = {
    "sigmoid": _sigmoid, "hinge": _hinge, "ipo": _ipo, "exo_pair": _exo_pair, "nca_pair": _nca_pair,
    "robust": _robust, "bco_pair": _bco_pair, "sppo_hard": _sppo_hard, "aot": _aot, "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero, "apo_down": _apo_down, "discopop": _discopop, "sft": _sft, "sigmoid_norm": _sigmoid_norm,
}
assert tuple(LOSSES) == LOSS_TYPES


def loss_terms(lp: PairLogps, s: LossSettings) -> Terms:
    rho_c, rho_r = lp.policy_chosen - lp.ref_chosen, lp.policy_rejected - lp.ref_rejected
    score_c = f_divergence_scores(rho_c, s.f_divergence_type, s.f_alpha_divergence_coef)
    score_r = f_divergence_scores(rho_r, s.f_divergence_type, s.f_alpha_divergence_coef)
    return Terms(lp, rho_c, rho_r, score_c, score_r, score_c - score_r)


def per_pair_loss(lp: PairLogps, s: LossSettings, loss_type: str) -> torch.Tensor:
    """One loss type's per-pair values (B,), before any WPO weight."""
    if loss_type not in LOSSES:
        raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
    return LOSSES[loss_type](loss_terms(lp, s), s)


def preference_loss(lp: PairLogps, s: LossSettings, loss_types: list[str] | tuple[str, ...],
                    loss_weights: list[float] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen rewards, rejected rewards): Σ_k w_k · mean(loss_k · WPO weight), TRL's combination."""
    weights = loss_weights if loss_weights is not None else [1.0] * len(loss_types)
    check_losses(list(loss_types), weights, s.f_divergence_type, lp.weights is not None)
    terms = loss_terms(lp, s)
    loss = 0.0
    for loss_type, weight in zip(loss_types, weights, strict=True):
        per_pair = LOSSES[loss_type](terms, s)
        if lp.weights is not None:
            per_pair = per_pair * lp.weights
        loss = loss + per_pair.mean() * weight
    return loss, s.beta * terms.chosen_logratios.detach(), s.beta * terms.rejected_logratios.detach()


def check_losses(loss_types: list[str], loss_weights: list[float] | None, f_divergence_type: str = "reverse_kl",
                 use_weighting: bool = False) -> None:
    """TRL's refusals, each a ValueError naming the field."""
    if not loss_types:
        raise ValueError(f"loss_type: expected one or more of {LOSS_TYPES}, got []")
    unknown = [t for t in loss_types if t not in LOSSES]
    if unknown:
        raise ValueError(f"loss_type: expected each in {LOSS_TYPES}, got {unknown[0]!r}")
    if loss_weights is not None and len(loss_weights) != len(loss_types):
        raise ValueError(f"loss_weights: expected one weight per loss_type ({len(loss_types)}: {loss_types}), "
                         f"got {len(loss_weights)}")
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type: expected one of {F_DIVERGENCES}, got {f_divergence_type!r}")
    if f_divergence_type != "reverse_kl" and not set(loss_types) <= set(F_DIVERGENCE_LOSSES):
        raise ValueError(f"f_divergence_type: {f_divergence_type} only works with {F_DIVERGENCE_LOSSES}, not "
                         f"{[t for t in loss_types if t not in F_DIVERGENCE_LOSSES]}; use reverse_kl")
    if use_weighting and set(loss_types) & set(SORTED_LOSSES):
        raise ValueError("use_weighting: not with aot or aot_unpaired (they sort the batch, which would misalign "
                         "the per-pair weights)")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None, *, cdpo: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) of one loss type and the implicit rewards β·(π - ref) (detached).

    Log-probs are sums over completion tokens; `ipo` and `sigmoid_norm` average them with the completion
    lengths (without lengths the inputs are taken as averages). As TRL 1.16, sigmoid ignores
    label_smoothing unless `cdpo`.
    """
    lp = PairLogps(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths)
    s = LossSettings(beta, label_smoothing, cdpo=cdpo)
    losses = per_pair_loss(lp, s, loss_type)
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def chosen_nll(policy_chosen: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """RPO's extra term (Pang et al. 2024; TRL's rpo_alpha) and TRL's `sft` loss: the chosen completions'
    negative log-likelihood per token, over the batch's chosen tokens. `policy_chosen` are summed log-probs."""
    return -policy_chosen.sum() / chosen_lengths.to(policy_chosen).sum().clamp(min=1)


def loss_list(loss_type: str | list[str]) -> list[str]:
    """TRL's loss_type: one name or a list of names."""
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)
