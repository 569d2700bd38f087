"""Every DPO loss of TRL 1.16 against TRL's own DPOTrainer, on the same model, adapter and batch.

TRL runs for real: a DPOTrainer on the tiny Llama with a PEFT LoRA adapter initialised non-zero
(init_lora_weights=False, seeded), its `_compute_loss` on a collated batch of ragged pairs. Ours scores
the very same PeftModel through align's path (align.recipes.dpo_scoring.score_pairs: completion tokens
only, the reference with the adapter off) and `preference_loss`. Compared: the loss, the mean chosen and
rejected rewards TRL logs, and the LoRA gradients, each within 1e-6 relative (gradients: relative to the
norm of TRL's gradient for each tensor, since single entries can be ~0).

TRL 1.16's use_weighting multiplies the per-pair loss in place (`per_sequence_loss *= weights`). With hinge
(autograd needs relu's output) and sft (an expanded scalar) that raises, so TRL cannot train those two with
WPO at all. For them the test first asserts TRL's unmodified code still raises, then compares with TRL's
source where that one statement is made out of place (`= per_sequence_loss *`), which is what ours computes.
"""

from __future__ import annotations

import inspect
import textwrap
import types

import pytest
import torch

from align.core.base import SharedBase
from align.data.preference import TokenizedPair, collate_pairs
from align.recipes.dpo_losses import (
    F_DIVERGENCE_LOSSES,
    LOSS_TYPES,
    SORTED_LOSSES,
    LossSettings,
    PairLogps,
    chosen_nll,
    loss_list,
    preference_loss,
)
from align.recipes.dpo_scoring import score_pairs

SEED = 1234
RTOL = 1e-6
# Gradients sum over more terms than the loss: float32 kernels of another CPU (AVX2 against AVX-512) order
# those sums differently, seen up to 1.03e-6 relative on an AVX2-only EPYC. A wrong term moves them far more.
GRAD_RTOL = 1e-5


@pytest.fixture(scope="module")
def trl(tiny_llama, tmp_path_factory):
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(SEED)
    rows = datasets.Dataset.from_list([{"prompt": "2+2=", "chosen": "4", "rejected": "5"}] * 2)
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl-dpo")), per_device_train_batch_size=4,
                     report_to=[], use_cpu=True, label_smoothing=0.1, beta=0.1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    trainer = DPOTrainer(model=model, args=args, train_dataset=rows, peft_config=lora,
                         processing_class=AutoTokenizer.from_pretrained(tiny_llama))
    trainer.model.train()
    base = SharedBase(trainer.model, trainer.processing_class)  # ours, on TRL's very PeftModel
    base.trainable.add("default")
    base._restore_requires_grad()
    return trainer, base


def _batch(base, seed: int = SEED) -> dict:
    """Four pairs with different prompt, chosen and rejected lengths (LD-DPO's split and IPO's averages matter)."""
    g = torch.Generator().manual_seed(seed)
    vocab = base.tokenizer.vocab_size

    def ids(n):
        return torch.randint(10, vocab, (n,), generator=g).tolist()

    shapes = [(3, 4, 2), (5, 2, 6), (2, 5, 5), (4, 3, 1)]
    pairs = [TokenizedPair(ids(p), ids(c), ids(r), f"row {i}") for i, (p, c, r) in enumerate(shapes)]
    return collate_pairs(pairs, base.tokenizer.pad_token_id)


def _configure(trainer, settings: LossSettings, loss_types, loss_weights, ld_alpha, use_weighting):
    from trl.trainer.dpo_trainer import add_fused_lm_head

    trainer.beta, trainer.label_smoothing = settings.beta, settings.label_smoothing
    trainer.f_divergence_type, trainer.f_alpha_divergence_coef = settings.f_divergence_type, \
        settings.f_alpha_divergence_coef
    trainer.args.discopop_tau = settings.discopop_tau
    trainer.loss_types = loss_list(loss_types)
    trainer.loss_weights = loss_weights or [1.0] * len(trainer.loss_types)
    trainer.ld_alpha, trainer.use_weighting = ld_alpha, use_weighting
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1") + (("log_sum_sq_probs",) if use_weighting else ())
    add_fused_lm_head(trainer.model.get_base_model(), outputs=outputs)  # what TRL's __init__ does for these args


IN_PLACE = "per_sequence_loss *= chosen_weights * rejected_weights"


def _out_of_place_compute_loss(trainer):
    """TRL's own _compute_loss with its in-place WPO product written out of place (see the module docstring)."""
    from trl.trainer import dpo_trainer

    src = textwrap.dedent(inspect.getsource(dpo_trainer.DPOTrainer._compute_loss))
    assert src.count(IN_PLACE) == 1
    namespace = dict(vars(dpo_trainer))
    exec(compile(src.replace(IN_PLACE, "per_sequence_loss = per_sequence_loss * chosen_weights * rejected_weights"),
                 "trl_dpo_compute_loss_out_of_place", "exec"), namespace)
    return types.MethodType(namespace["_compute_loss"], trainer)


def _grads(base, loss) -> list[torch.Tensor]:
    base.model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in base.model.parameters() if p.requires_grad]


def ours_loss(base, batch, settings: LossSettings, loss_types, loss_weights=None, ld_alpha=None,
              use_weighting=False):
    with torch.no_grad(), base.reference():
        ref = score_pairs(base, batch, ld_alpha)
    scores = score_pairs(base, batch, ld_alpha, use_weighting)
    n = batch["completion_mask"][:, 1:].sum(-1)
    len_c, len_r = n.chunk(2)
    lp = PairLogps(scores.chosen, scores.rejected, ref.chosen, ref.rejected, len_c, len_r,
                   chosen_nll(scores.chosen_raw, len_c), scores.weights)
    return preference_loss(lp, settings, loss_list(loss_types), loss_weights)


def compare(trl, settings: LossSettings, loss_types, loss_weights=None, ld_alpha=None, use_weighting=False,
            out_of_place=False):
    trainer, base = trl
    batch = _batch(base)
    _configure(trainer, settings, loss_types, loss_weights, ld_alpha, use_weighting)
    trainer._metrics["train"].clear()
    compute_loss = _out_of_place_compute_loss(trainer) if out_of_place else trainer._compute_loss
    trl_loss = compute_loss(trainer.model, dict(batch), return_outputs=False)
    trl_grads = _grads(base, trl_loss)
    loss, r_c, r_r = ours_loss(base, batch, settings, loss_types, loss_weights, ld_alpha, use_weighting)
    ours_grads = _grads(base, loss)
    torch.testing.assert_close(loss.detach(), trl_loss.detach(), rtol=RTOL, atol=0.0)
    metrics = trainer._metrics["train"]
    assert r_c.mean().item() == pytest.approx(metrics["rewards/chosen"][-1], rel=RTOL)
    assert r_r.mean().item() == pytest.approx(metrics["rewards/rejected"][-1], rel=RTOL)
    assert len(ours_grads) == len(trl_grads) > 0
    for ours_g, trl_g in zip(ours_grads, trl_grads, strict=True):
        scale = trl_g.norm().item()
        assert (ours_g - trl_g).norm().item() <= GRAD_RTOL * scale + 1e-12, ((ours_g - trl_g).norm().item(), scale)
    assert any(g.abs().max() > 0 for g in trl_grads)
    return loss.item()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_type_equals_trl(trl, loss_type):
    compare(trl, LossSettings(beta=0.1, label_smoothing=0.1), loss_type)


def test_mpo_list_with_loss_weights_equals_trl(trl):
    compare(trl, LossSettings(beta=0.1), ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])


WEIGHTED = [t for t in LOSS_TYPES if t not in SORTED_LOSSES]
TRL_WPO_RAISES = ("hinge", "sft")


@pytest.mark.parametrize("loss_type", WEIGHTED)
def test_use_weighting_equals_trl(trl, loss_type):
    compare(trl, LossSettings(beta=0.1, label_smoothing=0.1), loss_type, use_weighting=True,
            out_of_place=loss_type in TRL_WPO_RAISES)


@pytest.mark.parametrize("loss_type", TRL_WPO_RAISES)
def test_trls_own_wpo_raises_for_hinge_and_sft(trl, loss_type):
    """Kept so that a TRL that fixes the in-place product is noticed (then compare with it directly)."""
    trainer, base = trl
    _configure(trainer, LossSettings(beta=0.1), loss_type, None, None, True)
    with pytest.raises(RuntimeError):
        trainer._compute_loss(trainer.model, _batch(base), return_outputs=False).backward()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_ld_alpha_equals_trl(trl, loss_type):
    compare(trl, LossSettings(beta=0.1, label_smoothing=0.1), loss_type, ld_alpha=0.5)


def test_ld_alpha_zero_and_weighting_with_a_list(trl):
    compare(trl, LossSettings(beta=0.2, label_smoothing=0.05), ["sigmoid", "ipo", "apo_down"], [0.5, 2.0, 1.0],
            ld_alpha=0.0, use_weighting=True)


F_CASES = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 1.0),
           ("alpha_divergence", 2.0)]


@pytest.mark.parametrize("kind,alpha", F_CASES)
@pytest.mark.parametrize("loss_type", F_DIVERGENCE_LOSSES)
def test_f_divergence_equals_trl(trl, kind, alpha, loss_type):
    compare(trl, LossSettings(beta=0.1, label_smoothing=0.1, f_divergence_type=kind, f_alpha_divergence_coef=alpha),
            loss_type)


def test_f_divergence_on_a_weighted_list(trl):
    compare(trl, LossSettings(beta=0.1, label_smoothing=0.1, f_divergence_type="js_divergence"),
            list(F_DIVERGENCE_LOSSES), [0.1 * (i + 1) for i in range(len(F_DIVERGENCE_LOSSES))])
