"""The SFT studies: lr-ratio, layers and batch, on held-out NLL of three-digit sums (align/study/data.py).

Every run: constant learning rate, alpha 32, LoRA's standard PEFT init, batch BATCH (batch: 1, 4, 16),
the same rows in a seed-shuffled order, held-out NLL per completion token (eval/loss) at the end.
"""

from __future__ import annotations

from align.study import plots
from align.study.data import arithmetic_files
from align.study.plan import Plan, Run
from align.study.runner import Outcome, Study, seed_table, sweep_runs, sweep_then_seeds
from align.study.runs import Context, by_seed, sft_run
from align.study.verdict import batch as batch_rule
from align.study.verdict import layers as layers_rule
from align.study.verdict import lr_ratio as lr_ratio_rule

BATCH = 8
EVAL_ROWS = 64
LORA_R = 8  # align's default rank
GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)  # one grid for both modes, so the ratio is not built into it
LAYER_LRS = (1e-4, 3e-4, 1e-3)
BATCH_SIZES = (1, 4, 16)
MODES = {"lora": {"use_peft": True, "lora_r": LORA_R}, "full": {"use_peft": False}}


def data(ctx: Context, rows: int, name: str = "data"):
    return arithmetic_files(ctx.out / name, rows, EVAL_ROWS)


def probe(**fields):
    """A calibration probe: a short SFT run with `fields`, on rows of its own."""
    def run(ctx: Context, key: str, steps: int) -> dict:
        batch = fields.get("per_device_train_batch_size", BATCH)
        train, held_out = data(ctx, steps * batch, "data-probe")
        return sft_run(ctx, key, ctx.seeds[0], train, held_out, steps,
                       **{"per_device_train_batch_size": BATCH, **fields})
    return run


def setup_lines(ctx: Context, plan: Plan, extra: str) -> list[str]:
    return [f"model `{ctx.model}`; seeds {ctx.seeds}; {plan.units} optimizer steps per run; data: three-digit sums "
            f"(prompt-completion, chat template), {EVAL_ROWS} held-out prompts never trained on; constant learning "
            f"rate, alpha 32, standard PEFT init; held-out NLL = eval/loss, nats per completion token.", extra]


# -- lr-ratio ------------------------------------------------------------------------------------
def lr_ratio_runs(ctx: Context) -> list[Run]:
    return [Run(f"{mode}/lr={lr:g}/seed={s}", mode) for mode in MODES for lr in GRID for s in ctx.seeds]


def lr_ratio_execute(ctx: Context, plan: Plan) -> Outcome:
    train, held_out = data(ctx, plan.units * BATCH)
    nll = {mode: {} for mode in MODES}
    for mode, fields in MODES.items():
        for lr in GRID:
            for s in ctx.seeds:
                sft_run(ctx, f"{mode}/lr={lr:g}/seed={s}", s, train, held_out, plan.units, learning_rate=lr,
                        per_device_train_batch_size=BATCH, **fields)
            nll[mode][lr] = by_seed(ctx, f"{mode}/lr={lr:g}", "eval/loss")
    verdict = lr_ratio_rule(GRID, nll)
    tables = [seed_table(f"{mode} lr", {f"{lr:g}": nll[mode][lr] for lr in GRID}, ctx.seeds) for mode in MODES]
    return Outcome(verdict, setup_lines(ctx, plan, f"LoRA r={LORA_R} on all linear layers vs full fine-tuning, "
                                                   f"batch {BATCH}, learning rates {list(GRID)} for both."),
                   tables, [plots.nll_vs_lr(ctx.out / "nll_vs_lr.png", GRID, nll, verdict)])


# -- layers --------------------------------------------------------------------------------------
def matched_ranks(model: str, all_rank: int = 6) -> dict[str, tuple[int, int]]:
    """placement -> (rank, parameters): attention-only and MLP-only ranks that come closest to all-layer LoRA
    at `all_rank` (on SmolLM2-135M: attention 16, MLP 10, all 6, align.core.lora_count.MATCHED)."""
    from transformers import AutoConfig

    from align.core.loading import resolve_model
    from align.core.lora_count import count_lora_params

    config = AutoConfig.from_pretrained(resolve_model(model))
    target = count_lora_params(config, "all", all_rank)
    out = {"all": (all_rank, target)}
    for placement in ("attention", "mlp"):
        rank = max(1, round(target / count_lora_params(config, placement, 1)))
        out[placement] = (rank, count_lora_params(config, placement, rank))
    return out


def layers_runs(ctx: Context) -> list[Run]:
    return [r for p in ("attention", "mlp", "all") for r in sweep_runs(p, "lora", LAYER_LRS, ctx.seeds)]


def layers_execute(ctx: Context, plan: Plan) -> Outcome:
    train, held_out = data(ctx, plan.units * BATCH)
    ranks = matched_ranks(ctx.model)
    nll, best, sweeps = {}, {}, {}
    for placement, (rank, _) in ranks.items():
        def run(key, seed, lr, placement=placement, rank=rank):
            return sft_run(ctx, key, seed, train, held_out, plan.units, learning_rate=lr, lora_r=rank,
                           lora_target_modules=placement if placement != "all" else "all-linear",
                           per_device_train_batch_size=BATCH)
        best[placement], nll[placement], sweeps[placement] = sweep_then_seeds(ctx, placement, LAYER_LRS, run,
                                                                              "eval/loss")
    params = {p: n for p, (_, n) in ranks.items()}
    verdict = layers_rule(nll, params)
    tables = [seed_table("placement at its best lr", {f"{p} r={ranks[p][0]} lr={best[p]:g}": v
                                                      for p, v in nll.items()}, ctx.seeds),
              seed_table("lr sweep (first seed)", {p: [sweeps[p][lr] for lr in LAYER_LRS] for p in sweeps},
                         [f"lr {lr:g}" for lr in LAYER_LRS])]
    lines = ", ".join(f"{p} r={r} ({n:,} parameters)" for p, (r, n) in ranks.items())
    return Outcome(verdict, setup_lines(ctx, plan, f"placements matched on trainable parameters: {lines}; batch "
                                                   f"{BATCH}; each at its best of {list(LAYER_LRS)} on seed "
                                                   f"{ctx.seeds[0]}, then reseeded there."),
                   tables, [plots.bars(ctx.out / "layers.png", nll, "held-out NLL at the best lr", verdict)])


# -- batch ---------------------------------------------------------------------------------------
def batch_runs(ctx: Context) -> list[Run]:
    # A unit is one batch of the largest size: every run sees units x 16 examples. A step's cost is taken
    # as the probe's (batch 4) below 4 rows and proportional above.
    top = max(BATCH_SIZES)
    return [Run(f"{mode}/batch={b}/seed={s}", mode, steps_per_unit=top // b, step_factor=max(1.0, b / 4))
            for mode in MODES for b in BATCH_SIZES for s in ctx.seeds]


def batch_lrs() -> dict[str, float]:
    """The toolkit's defaults: SFTConfig's LoRA learning rate, and full fine-tuning's from align advise."""
    from align.recipes.sft import SFTConfig
    from align.train.advise import FULL_FT_LR

    return {"lora": SFTConfig.__dataclass_fields__["learning_rate"].default, "full": FULL_FT_LR["sft"]}


def batch_execute(ctx: Context, plan: Plan) -> Outcome:
    top = max(BATCH_SIZES)
    train, held_out = data(ctx, plan.units * top)
    lrs = batch_lrs()
    nll = {mode: {} for mode in MODES}
    for mode, fields in MODES.items():
        for b in BATCH_SIZES:
            for s in ctx.seeds:
                sft_run(ctx, f"{mode}/batch={b}/seed={s}", s, train, held_out, plan.units * top // b,
                        learning_rate=lrs[mode], per_device_train_batch_size=b, **fields)
            nll[mode][b] = by_seed(ctx, f"{mode}/batch={b}", "eval/loss")
    verdict = batch_rule(nll["lora"], nll["full"])
    tables = [seed_table(f"{mode} batch", {str(b): nll[mode][b] for b in BATCH_SIZES}, ctx.seeds) for mode in MODES]
    return Outcome(verdict, setup_lines(ctx, plan, f"LoRA r={LORA_R} (lr {lrs['lora']:g}) vs full fine-tuning (lr "
                                                   f"{lrs['full']:g}), the toolkit's defaults, at batch sizes "
                                                   f"{list(BATCH_SIZES)} over the same {plan.units * top} examples "
                                                   f"(steps per run above = batches of {top})."),
                   tables, [plots.nll_vs_batch(ctx.out / "nll_vs_batch.png", nll, verdict)],
                   notes=["One learning rate per mode (the toolkit's defaults), not each batch size's best: the "
                          "post tuned the learning rate per batch size."])


LR_RATIO = Study("lr-ratio", "LoRA's best learning rate is about 10x full fine-tuning's.",
                 {"lora": probe(learning_rate=1e-4, **MODES["lora"]), "full": probe(learning_rate=1e-5,
                                                                                    **MODES["full"])},
                 lr_ratio_runs, lr_ratio_execute)
LAYERS = Study("layers", "LoRA on the MLP (or all layers) beats attention-only LoRA at matched parameters.",
               {"lora": probe(learning_rate=3e-4, lora_r=6)}, layers_runs, layers_execute)
BATCH_STUDY = Study("batch", "LoRA loses more than full fine-tuning as the batch grows.",
                    {mode: probe(learning_rate=1e-4, per_device_train_batch_size=4, **fields)
                     for mode, fields in MODES.items()}, batch_runs, batch_execute)
