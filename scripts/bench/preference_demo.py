"""Held-out task reward before and after each newer preference recipe, all from the same start.

    python scripts/bench/preference_demo.py            # SmolLM2-135M, the arithmetic demo task (~40 min, 2 idle cores)
    python scripts/bench/preference_demo.py --quick    # tiny random model, a smoke run (no learning expected)
    python scripts/bench/preference_demo.py --only online_dpo kto
    python scripts/bench/preference_demo.py --start runs/preference-demo/start.json   # sample once, then re-use

The start is the demo's (align/recipes/demo.py, align/tasks/arithmetic.py): the base samples 4
answers per training prompt with vLLM (temperature 0.7), scored by the task reward. Then:
  kto         KTO on the demo's pairs, unpaired as TRL's unpair_preference_dataset does (chosen desirable, rejected
              not): 91 of each, so equal weights (--kto-data samples: every sample, desirable when its task reward
              is above 0, 115 of 1,114, desirable_weight balancing them as TRL advises);
  orpo        ORPO on the demo's pairs (best vs worst sample of a prompt);
  simpo       SimPO (CPO with loss_type simpo, cpo_alpha 0, as TRL runs it) on the same pairs;
  online_dpo  online DPO from scratch: the policy samples as it learns (align/recipes/online_dpo.py).
Each is scored greedily on the same held-out prompts through the same engine (the adapter folded in).
KTO, ORPO and SimPO train with configs/<recipe>_smollm2.yaml's settings (each value's reason is there):
chat_template true above all, since every answer was sampled after the chat template's prompt (before, the
bench built the configs from defaults and trained on plain-text prompts: orpo 0.18 -> 0.225, simpo -> 0.26,
kto -> 0.04; with the template, ORPO at those settings, lr 1e-4 and one epoch, measured 0.18 -> 0.19, so the
wrong format was not what held the gains back). The files' values, 2 epochs each, were chosen among the
few settings tried (every one is in the configs' comments): KTO at 2e-5 (at 1e-4 its loss reached ~0
within 30 steps on every labelled sample and the held-out reward fell to 0.00-0.04), ORPO at 2e-4 (1e-4 for
one epoch gained 0.01), SimPO at 1e-4 (the DPO demo's); on 2 idle cores, from one start (0.18): KTO 0.295,
ORPO 0.31, SimPO 0.35.
On a 2-core CPU shared with other jobs (load 30-55) sampling took 41 min and an ORPO step 105-260 s:
--start keeps the start, so recipes can be re-run without sampling again.
A recipe whose module is absent (built elsewhere) or refuses these settings is skipped with a line.
Last line: one JSON object with `<recipe>_before` / `<recipe>_after`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from measure import ROOT

RECIPES = ("kto", "orpo", "simpo", "online_dpo")
# recipe -> (module, config class, train function). Each trains with the settings of configs/<recipe>_smollm2.yaml
# (learning rate, epochs, beta, ..., each value's reason there), so the bench measures what a user runs.
OFFLINE = {"kto": ("align.recipes.kto", "KTOConfig", "train_kto"),
           "orpo": ("align.recipes.orpo", "ORPOConfig", "train_orpo"),
           "simpo": ("align.recipes.cpo", "CPOConfig", "train_cpo")}
# What the bench changes in those files: its own model and run folder, every row trained on (no held-out
# split: the held-out prompts are the score), no checkpoints or trackers.
BENCH_SETTINGS = ("eval_fraction=0", "save_steps=0", "report_to=[none]")
# The settings a result depends on, printed before each run so that a JSON line can be traced to them.
SHOWN = ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "beta", "loss_type", "simpo_gamma",
         "cpo_alpha", "desirable_weight", "undesirable_weight", "chat_template")


def kto_rows(rows: list[dict], samples) -> list[dict]:
    """TRL's unpaired format: every distinct sampled answer, desirable when its task reward is above 0.

    Not "is 1": the base model rarely answers with the bare number (1.0), so that label left one
    desirable row in 1,114 and KTO learned only what to avoid; a right final number (0.5 or 1.0) is the
    signal the pairs carry too."""
    from align.tasks import arithmetic

    out, seen = [], set()
    for row, group in zip(rows, samples, strict=True):
        for s in group:
            text = s.text.strip()
            if text and (row["prompt"], text) not in seen:
                seen.add((row["prompt"], text))
                out.append({"prompt": row["prompt"], "completion": text,
                            "label": arithmetic.score(text, row["answer"]) > 0})
    return out


def kto_weights(rows: list[dict]) -> list[str]:
    """desirable_weight balancing the two labels' weighted counts, as TRL's KTO advice asks (ratio 1 to 4/3):
    with equal weights the demo's few right answers (~1 in 10) left KTO pushing answers down only, and the
    held-out reward fell to 0."""
    good = sum(r["label"] for r in rows)
    return [f"desirable_weight={(len(rows) - good) / good:.4f}"] if good else []


def offline_recipe(name: str, model: str, data: list[dict], out: Path, settings, result: dict) -> Path | str:
    """Train one recipe from its own module on `data` with configs/<name>_smollm2.yaml's settings, then
    `settings` (the values used go to result["<name>_settings"]); the adapter folder, or why it was skipped."""
    module, config_name, train_name = OFFLINE[name]
    try:
        mod = importlib.import_module(module)
        config_cls, train = getattr(mod, config_name), getattr(mod, train_name)
    except (ImportError, AttributeError) as e:
        return f"{module}.{train_name} is not there ({e})"
    from align.train.config_parser import ConfigError, load_config

    try:
        config = load_config(config_cls, ROOT / "configs" / f"{name}_smollm2.yaml",
                             [f"model_name_or_path={model}", f"output_dir={out / name}", *BENCH_SETTINGS, *settings])
    except ConfigError as e:
        return f"{config_name} refused the bench's settings: {str(e)[:200]}"
    result[f"{name}_settings"] = {k: getattr(config, k) for k in SHOWN if hasattr(config, k)}
    print(f"[bench] {name}: {json.dumps(result[f'{name}_settings'])}", file=sys.stderr)
    return train(config, overwrite=True, train_dataset=data)


def online_dpo(args, model: str, base, engine, train_rows, eval_rows, out: Path) -> Path:
    """Online DPO on the bench's base and engine (one copy of each), from the zero adapter."""
    from align.recipes.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
    from align.train.config_parser import load_config

    chat = [{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} for r in train_rows]
    held = [{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} for r in eval_rows]
    config = load_config(OnlineDPOConfig, None, [
        f"model_name_or_path={model}", f"output_dir={out / 'online_dpo'}", f"max_steps={args.online_steps}",
        "num_generations=4", f"max_new_tokens={args.max_new_tokens}", f"temperature={args.temperature}",
        "learning_rate=1e-4", "lr_scheduler_type=constant", "per_device_train_batch_size=8", "beta=0.1",
        "eval_steps=0", "save_steps=0", "report_to=[none]", f"seed={args.seed}",
        # --quick: the random tiny model never sums right, so the task reward ties every prompt; lengths differ.
        f"reward_funcs=[{'length_penalty' if args.quick else 'arithmetic'}]"])
    trainer = OnlineDPOTrainer(config, base=base, engine=engine, overwrite=True, train_dataset=chat,
                               eval_dataset=held)
    return trainer.train()  # not closed: the engine is the bench's


def sample_start(args, engine, base, train_rows, eval_rows) -> dict:
    """The "before" score and every recipe's rows, from the base's own samples (the demo's start)."""
    from align.data.prompts import encode_prompts
    from align.engines import generate_with_progress
    from align.recipes.demo import build_pairs, evaluate
    from align.tasks import arithmetic

    t0 = time.perf_counter()
    before, _ = evaluate(engine, base, eval_rows, None, args.max_new_tokens, "evaluate before")
    samples = generate_with_progress(engine, encode_prompts(base.tokenizer, train_rows), "sample x4", n=4,
                                     max_new_tokens=args.max_new_tokens, temperature=args.temperature, adapter=None)
    pairs, sample_reward = build_pairs(train_rows, samples)
    unpaired = kto_rows(train_rows, samples)
    if args.quick and len(pairs) < 8:  # a random tiny model never sums right: synthetic rows, as `align demo --quick`
        pairs = arithmetic.preference_pairs(len(train_rows), seed=args.seed)
        unpaired = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                    for r in pairs for side in ("chosen", "rejected")]
    summary = {"metric": "heldout_task_reward", "eval_prompts": len(eval_rows), "pairs": len(pairs),
               "kto_rows": len(unpaired), "kto_desirable": sum(r["label"] for r in unpaired),
               "sample_reward": round(sample_reward, 4), "sample_s": round(time.perf_counter() - t0, 1)}
    return {"before": before, "pairs": pairs, "unpaired": unpaired, "summary": summary}


def start(args, out: Path):
    """The shared start: the base, one engine, the demo's prompts, the "before" score, the samples' rows.

    With --start FILE the score and rows are written there, or read back when it exists (made with the same
    model, seed and sampling settings), so recipes can be re-run from the very same start without re-sampling."""
    from align.core.atomic import atomic_write_text
    from align.core.base import SharedBase
    from align.core.loading import resolve_model
    from align.engines import make_engine
    from align.recipes.demo import DemoSettings, demo_prompts

    s = DemoSettings(seed=args.seed)
    if args.quick:
        from align.core.tiny import build_tiny_model

        tiny = out / "tiny-model"
        if not (tiny / "config.json").exists():
            build_tiny_model(tiny)
        s.model, s.train_prompts, s.eval_prompts = str(tiny), 24, 8
    key = {"model": s.model, "seed": args.seed, "temperature": args.temperature,
           "max_new_tokens": args.max_new_tokens, "train_prompts": s.train_prompts, "eval_prompts": s.eval_prompts}
    cache = Path(args.start) if args.start else None
    state = json.loads(cache.read_text()) if cache and cache.is_file() else None
    if state is not None and state.get("key") != key:
        raise SystemExit(f"--start {cache}: made with {state.get('key')}, this run is {key}")
    model = resolve_model(s.model)
    base = SharedBase.load(model)
    engine = make_engine("auto", model, base, seed=args.seed)
    train_rows, eval_rows = demo_prompts(s)
    if state is None:
        state = {"key": key, **sample_start(args, engine, base, train_rows, eval_rows)}
        if cache:
            atomic_write_text(cache, json.dumps(state))
    else:
        print(f"[bench] the start read from {cache} (no sampling)", file=sys.stderr)
    summary = {**state["summary"], **({"start": str(cache)} if cache else {})}
    return model, base, engine, (train_rows, eval_rows), (state["pairs"], state["unpaired"]), state["before"], summary


def main() -> None:
    from align.recipes.demo import evaluate

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="runs/preference-demo")
    p.add_argument("--only", nargs="+", choices=RECIPES, default=list(RECIPES))
    p.add_argument("--online-steps", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kto-data", choices=["pairs", "samples"], default="pairs",
                   help="KTO's rows: the pairs unpaired (default) or every labelled sample")
    p.add_argument("--start", default=None, metavar="FILE",
                   help="keep the start (before score, pairs, KTO rows) in FILE: written if absent, else read")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting over configs/<recipe>_smollm2.yaml for every offline recipe run (e.g. to try a "
                        "learning rate); the values used are in the JSON's <recipe>_settings")
    args = p.parse_args()
    if args.quick:
        args.online_steps, args.max_new_tokens, args.temperature = 2, 8, 1.0
    out = ROOT / args.out
    model, base, engine, (train_rows, eval_rows), (pairs, unpaired), before, result = start(args, out)
    settings = [f"seed={args.seed}", *args.overrides]
    if "kto" in args.only:
        result["kto_data"] = args.kto_data
    for name in args.only:
        t0 = time.perf_counter()
        if name == "online_dpo":
            online_dpo(args, model, base, engine, train_rows, eval_rows, out)
            adapter = "policy"
        else:
            samples = name == "kto" and args.kto_data == "samples"
            folder = offline_recipe(name, model, unpaired if samples else pairs, out,
                                    settings + (kto_weights(unpaired) if samples else []), result)
            if isinstance(folder, str):
                print(f"[bench] {name}: skipped: {folder}", file=sys.stderr)
                result[f"{name}_skipped"] = folder
                continue
            base.load_adapter(name, folder)
            adapter = name
        engine.sync(base, adapter)  # adapter only, checked by the probe
        after, _ = evaluate(engine, base, eval_rows, adapter, args.max_new_tokens, f"evaluate {name}")
        result.update({f"{name}_before": round(before, 4), f"{name}_after": round(after, 4),
                       f"{name}_s": round(time.perf_counter() - t0, 1)})
        print(f"[bench] {name}: {before:.3f} -> {after:.3f}", file=sys.stderr)
    engine.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
