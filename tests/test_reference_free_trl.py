"""ORPO, CPO (sigmoid) and SimPO equal TRL's own ORPOTrainer / CPOTrainer on identical inputs.

Both sides hold the same tiny Llama in float32 with the same LoRA adapter (rank 4, all linear layers),
perturbed to seeded non-zero values so every gradient is non-trivial. TRL's trainer scores a batch built
from our tokenised pairs with its own `get_batch_loss_metrics` (its forward, log-probs, loss and metrics);
ours runs `pair_loss`. Loss, every metric both log, and every LoRA gradient agree within 1e-6 relative, for
ORPO and every CPO loss type (sigmoid with label smoothing, hinge, ipo, simpo with and without the NLL,
alphapo).
TRL logs `logits/chosen|rejected` (means over the full vocabulary at every position, padding included)
too; align does not compute full logits, so those two are not compared (nor logged).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from align.train.config_parser import load_config

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "prefs_tiny.jsonl"
SEED = 1234
REL = 1e-6

CASES = {  # name -> (our config module:class, yaml, TRL class path, TRL/our settings)
    "orpo": ("align.recipes.orpo:ORPOConfig", "orpo_tiny.yaml", "trl.experimental.orpo", {"beta": 0.2}),
    "cpo_sigmoid": ("align.recipes.cpo:CPOConfig", "cpo_tiny.yaml", "trl.experimental.cpo",
                    {"beta": 0.2, "loss_type": "sigmoid", "cpo_alpha": 0.7, "label_smoothing": 0.1}),
    "simpo": ("align.recipes.cpo:CPOConfig", "cpo_tiny.yaml", "trl.experimental.cpo",
              {"beta": 2.0, "loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 0.4}),
    "simpo_with_nll": ("align.recipes.cpo:CPOConfig", "cpo_tiny.yaml", "trl.experimental.cpo",
                       {"beta": 2.0, "loss_type": "simpo", "cpo_alpha": 0.5, "simpo_gamma": 0.4}),
    "cpo_hinge": ("align.recipes.cpo:CPOConfig", "cpo_tiny.yaml", "trl.experimental.cpo",
                  {"beta": 0.2, "loss_type": "hinge", "cpo_alpha": 1.0}),
    "cpo_ipo": ("align.recipes.cpo:CPOConfig", "cpo_tiny.yaml", "trl.experimental.cpo",
                {"beta": 0.5, "loss_type": "ipo", "cpo_alpha": 1.0}),
    "alphapo": ("align.recipes.cpo:CPOConfig", "cpo_tiny.yaml", "trl.experimental.cpo",
                {"beta": 2.0, "loss_type": "alphapo", "alpha": 0.25, "simpo_gamma": 0.4}),
}


def _ours(case: str, model: Path, out: Path):
    import importlib

    target, yaml_name, _, settings = CASES[case]
    module, cls = target.split(":")
    mod = importlib.import_module(module)
    sets = [f"model_name_or_path={model}", f"output_dir={out}", f"train_file={DATA}", "report_to=[none]",
            "dtype=float32", "lora_r=4", "lora_alpha=8", "eval_fraction=0.0"]
    sets += [f"{k}={v}" for k, v in settings.items()]
    config = load_config(getattr(mod, cls), REPO / "configs" / yaml_name, sets)
    trainer_cls = getattr(mod, cls.replace("Config", "Trainer"))
    trainer = trainer_cls(config)
    trainer.setup()
    g = torch.Generator().manual_seed(SEED)
    print(f"seed {SEED}")
    with torch.no_grad():  # B starts at 0: without this, the adapter would be the base and half the grads zero
        for p in trainer.base.adapter_parameters(config.adapter_name).values():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return trainer


def _trl(case: str, model: Path, out: Path):
    import importlib

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, module, settings = CASES[case]
    trl_mod = importlib.import_module(module)
    name = "ORPO" if module.endswith("orpo") else "CPO"
    args = getattr(trl_mod, f"{name}Config")(output_dir=str(out), report_to="none", use_cpu=True, bf16=False,
                                           gradient_checkpointing=False, max_length=96, save_strategy="no",
                                           **settings)
    rows = Dataset.from_list([{"prompt": "What is 1+1?", "chosen": "2", "rejected": "3"}] * 2)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = getattr(trl_mod, f"{name}Trainer")(model=net, args=args, train_dataset=rows,
                                                 processing_class=AutoTokenizer.from_pretrained(model),
                                                 peft_config=lora)
    trainer.model.train()
    return trainer


def _trl_batch(pairs, pad_id: int) -> dict:
    """TRL's collated batch (chosen_* / rejected_*, labels -100 on the prompt and padding) of our pairs."""
    batch = {}
    for side in ("chosen", "rejected"):
        seqs = [p.prompt_ids + getattr(p, f"{side}_ids") for p in pairs]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad_id)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100)
        for i, (p, s) in enumerate(zip(pairs, seqs)):
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
            labels[i, len(p.prompt_ids):len(s)] = torch.tensor(s[len(p.prompt_ids):])
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return batch


def _lora_grads(named: dict, rename) -> dict[str, torch.Tensor]:
    return {rename(n): p.grad.detach().clone() for n, p in named.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_metrics_and_gradients_equal_trl(case, tiny_llama, tmp_path):
    ours = _ours(case, tiny_llama, tmp_path / "ours")
    trl = _trl(case, tiny_llama, tmp_path / "trl")
    name = ours.config.adapter_name
    our_params = ours.base.adapter_parameters(name)
    trl_params = {n: p for n, p in trl.model.named_parameters() if "lora_" in n}
    as_trl = lambda n: n.replace(f".{name}.", ".default.")  # noqa: E731
    assert {as_trl(n) for n in our_params} == set(trl_params), "the two adapters cover different layers"
    with torch.no_grad():
        for n, p in our_params.items():
            trl_params[as_trl(n)].copy_(p)

    pairs = ours.pairs[:4]
    ours.base.model.train()
    loss, stats = ours.pair_loss(pairs, None, train=True)
    loss.backward()
    trl_loss, trl_metrics = trl.get_batch_loss_metrics(trl.model, _trl_batch(pairs, ours.base.tokenizer.pad_token_id))
    trl_loss.backward()

    assert loss.item() == pytest.approx(trl_loss.item(), rel=REL)
    logged = set(stats)
    assert logged == set(trl_metrics) - {"logits/chosen", "logits/rejected"}, sorted(set(trl_metrics) ^ logged)
    for key, value in stats.items():
        assert value == pytest.approx(trl_metrics[key], rel=REL, abs=1e-9), key
    ours_g, trl_g = _lora_grads(our_params, as_trl), _lora_grads(trl_params, lambda n: n)
    assert all(g.abs().max() > 0 for g in trl_g.values())
    for n, g in trl_g.items():
        worst = (ours_g[n] - g).abs().max().item()
        assert worst <= REL * g.abs().max().item(), (n, worst, g.abs().max().item())
    ours.close()
