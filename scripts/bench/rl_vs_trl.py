"""GRPO, align vs TRL's GRPOTrainer: seconds per rollout step, peak memory and held-out reward.

    python scripts/bench/rl_vs_trl.py --quick              # tiny model, 1 seed, 2 steps (a minute or two)
    python scripts/bench/rl_vs_trl.py --steps 4 --seeds 0,1  # SmolLM2-135M-Instruct, the demo task
    python scripts/bench/rl_vs_trl.py --bf16 ...           # ours: bf16 base + bf16 engine; TRL: bf16=True (autocast)

Both contenders get identical settings: the demo's task and reward (configs/grpo_demo.yaml,
align/tasks/arithmetic.py), LoRA r 8 / alpha 32 on every linear layer, learning rate, group size,
prompts per step, max new tokens, temperature, KL coefficient (beta) and number of rollout steps;
the same training prompts and the same held-out set. Each run is its own subprocess (its peak RSS
is its own), and so is every held-out evaluation: greedy completions from transformers on the
base plus the saved adapter, scored by the task's reward; the same function for both.

- align: `align ppo` (PPOTrainer) with algorithm grpo, the in-process vLLM engine, fold sync.
- TRL: GRPOTrainer + a PEFT LoraConfig. Generation: vLLM colocate is tried first; when it cannot
  run with the CPU build of vLLM, transformers generation (the reason is reported).

One rollout step = one batch of prompts x generations and the optimizer steps over it (2 here:
16 completions, 8 per optimizer step, one pass). TRL counts optimizer steps, so it runs twice as
many; its time per rollout step is the time of each pair. The first step (warm-up: compilation,
first sync) is left out of the medians when there are more than two. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from measure import ROOT, bench_environment, peak_rss_mb, run_child, steady_median

from align.tasks.arithmetic import SYSTEM_PROMPT  # after measure, which puts the repository first on sys.path

PHASES = ("rollout", "score", "old_logprobs", "ref_logprobs", "values", "update", "sync")


def settings(quick: bool, steps: int) -> dict:
    """The shared settings: configs/grpo_demo.yaml's, smaller in quick mode."""
    return {
        "lora_r": 8, "lora_alpha": 32, "learning_rate": 3e-3 if quick else 1e-4,
        "prompts_per_step": 2, "num_generations": 4 if quick else 8, "per_device_train_batch_size": 4 if quick else 8,
        "max_completion_length": 8 if quick else 16, "temperature": 0.8, "beta": 0.0, "epsilon": 0.2,
        "loss_type": "dapo",  # TRL's default, on both sides
        "max_grad_norm": 1.0, "steps": steps,
        "system_prompt": None if quick else SYSTEM_PROMPT,
        "num_train_prompts": 64 if quick else 1000, "num_eval_prompts": 8 if quick else 64,
    }


def steps_per_generation(s: dict) -> int:
    """TRL's steps_per_generation for prompts_per_step prompts x num_generations, per_device_train_batch_size each."""
    return s["prompts_per_step"] * s["num_generations"] // s["per_device_train_batch_size"]


# -- the shared held-out evaluation -----------------------------------------------------------------
def evaluate(model: str, adapter: str | None, eval_file: str, s: dict) -> dict:
    """Mean task reward of greedy completions on the held-out rows (transformers, same for both)."""
    from align.core.base import SharedBase
    from align.data.prompts import encode_prompts
    from align.engines import HFEngine
    from align.tasks.arithmetic import score

    rows = [json.loads(line) for line in Path(eval_file).read_text().splitlines()]
    base = SharedBase.load(model)
    base.model.eval()
    name = None
    if adapter:
        base.load_adapter("policy", adapter)
        name = "policy"
    ids = encode_prompts(base.tokenizer, rows, s["system_prompt"], 128)
    samples = HFEngine(base).generate(ids, n=1, max_new_tokens=s["max_completion_length"], temperature=0.0,
                                      adapter=name)
    rewards = [score(g[0].text, r["answer"]) for g, r in zip(samples, rows, strict=True)]
    return {"reward": sum(rewards) / len(rewards)}


# -- the contenders -----------------------------------------------------------------------------------
def run_align(model: str, seed: int, train_file: str, out: str, s: dict, rollout_dtype: str) -> dict:
    from align.recipes.ppo import GRPOConfig, PPOTrainer
    from align.train.config_parser import load_config

    # The same conversational prompts TRL gets (system_prompt adds the system turn to each, as TRL's rows hold it).
    chat_file = Path(out).parent / f"{Path(out).name}-prompts.jsonl"
    rows = [json.loads(line) for line in Path(train_file).read_text().splitlines()]
    chat_file.write_text("".join(json.dumps({**r, "prompt": [{"role": "user", "content": r["prompt"]}]}) + "\n"
                                 for r in rows))
    overrides = [
        f"model_name_or_path={model}", f"output_dir={out}", f"seed={seed}", "engine=vllm",
        f"dtype={'bfloat16' if s.get('bf16') else 'float32'}", f"rollout_dtype={rollout_dtype}", "engine_options={sync_mode: fold}", f"train_file={chat_file}",
        f"num_train_prompts={s['num_train_prompts']}", f"lora_r={s['lora_r']}", f"lora_alpha={s['lora_alpha']}",
        f"learning_rate={s['learning_rate']}", f"steps_per_generation={steps_per_generation(s)}",
        f"num_generations={s['num_generations']}", f"max_completion_length={s['max_completion_length']}",
        f"per_device_train_batch_size={s['per_device_train_batch_size']}", f"temperature={s['temperature']}",
        f"beta={s['beta']}", f"epsilon={s['epsilon']}", f"loss_type={s['loss_type']}",
        f"max_grad_norm={s['max_grad_norm']}", f"max_steps={s['steps']}", "num_iterations=1",
        f"save_steps={s['steps']}", "eval_steps=0",
        "report_to=[none]", "system_prompt=" + ("null" if s["system_prompt"] is None else json.dumps(s["system_prompt"]))]
    cfg = load_config(GRPOConfig, ROOT / "configs" / "grpo_demo.yaml", overrides)
    step_s, phases = [], []

    class Timed(PPOTrainer):
        def training_step(self):
            start = time.perf_counter()
            stats = super().training_step()
            step_s.append(time.perf_counter() - start)
            phases.append({k: stats[f"time/{k}"] for k in PHASES if f"time/{k}" in stats})
            return stats

    trainer = Timed(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    return {"step_s": step_s, "phases": phases, "adapter": str(Path(out) / "policy"), "peak_mb": peak_rss_mb()}


def run_trl(model: str, seed: int, train_file: str, out: str, s: dict, use_vllm: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from align.tasks.arithmetic import score

    rows = [json.loads(line) for line in Path(train_file).read_text().splitlines()]

    def prompt(text):
        turns = [] if s["system_prompt"] is None else [{"role": "system", "content": s["system_prompt"]}]
        return turns + [{"role": "user", "content": text}]

    data = Dataset.from_list([{"prompt": prompt(r["prompt"]), "answer": r["answer"]} for r in rows])

    def arithmetic(completions, answer, **_):
        return [score(c[-1]["content"] if isinstance(c, list) else c, a) for c, a in zip(completions, answer)]

    per_step = steps_per_generation(s)  # optimizer steps per rollout batch
    args = GRPOConfig(
        output_dir=out, seed=seed, learning_rate=s["learning_rate"], lr_scheduler_type="constant",
        per_device_train_batch_size=s["per_device_train_batch_size"], gradient_accumulation_steps=1,
        steps_per_generation=per_step, num_generations=s["num_generations"],
        max_completion_length=s["max_completion_length"], temperature=s["temperature"], top_p=1.0,
        beta=s["beta"], num_iterations=1, epsilon=s["epsilon"], loss_type=s["loss_type"],
        max_grad_norm=s["max_grad_norm"],
        max_steps=s["steps"] * per_step, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        bf16=bool(s.get("bf16")), disable_dropout=True, dataloader_num_workers=0, use_vllm=use_vllm,
        **({"vllm_mode": "colocate", "vllm_max_model_length": 128 + s["max_completion_length"]} if use_vllm else {}))
    tok = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    lora = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    marks = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    trainer = GRPOTrainer(model=policy, reward_funcs=arithmetic, args=args, train_dataset=data,
                          processing_class=tok, peft_config=lora, callbacks=[Clock()])
    trainer.train()
    step_s = [marks[i + per_step] - marks[i] for i in range(0, len(marks) - per_step, per_step)]
    trainer.model.save_pretrained(str(Path(out) / "policy"))
    return {"step_s": step_s, "adapter": str(Path(out) / "policy"), "peak_mb": peak_rss_mb()}


# -- the parent -------------------------------------------------------------------------------------
def child(kind: str, *rest: str) -> dict:
    return run_child(__file__, "--child", kind, *rest)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 1 seed, 2 steps")
    p.add_argument("--steps", type=int, default=None, help="rollout steps per run (default 4; quick 2)")
    p.add_argument("--seeds", default=None, help="comma-separated training seeds (default 0,1; quick 0)")
    p.add_argument("--rollout-dtype", default="float32", help="align's vLLM engine dtype (float32: fast on AVX2)")
    p.add_argument("--trl-generation", choices=("auto", "vllm", "transformers"), default="auto",
                   help="auto: vLLM colocate, falling back to transformers when it cannot run")
    p.add_argument("--bf16", action="store_true", help="ours: bfloat16 base and engine; TRL: bf16=True (autocast)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bf16:
        args.rollout_dtype = "bfloat16"
    if args.child:
        kind, *rest = args.child
        s = json.loads(rest[-1])
        if kind == "eval":
            print(json.dumps(evaluate(rest[0], rest[1] or None, rest[2], s)))
        elif kind == "align":
            print(json.dumps(run_align(rest[0], int(rest[1]), rest[2], rest[3], s, rest[4])))
        else:
            print(json.dumps(run_trl(rest[0], int(rest[1]), rest[2], rest[3], s, rest[4] == "vllm")))
        return

    bench_environment(vllm=True)
    steps = args.steps or (2 if args.quick else 4)
    seeds = [int(x) for x in (args.seeds or ("0" if args.quick else "0,1")).split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-rl-vs-trl-"))
    if args.quick:
        from align.core.tiny import build_tiny_model

        model, name = str(build_tiny_model(tmp / "tiny")), "tiny-llama"
    else:
        from align.core.smollm import ensure_smollm2

        model, name = str(ensure_smollm2()), "SmolLM2-135M-Instruct"
    s = {**settings(args.quick, steps), "bf16": args.bf16}
    from align.recipes.ppo.batch import load_rows

    train = load_rows("arithmetic", s["num_train_prompts"], 0)
    held_out = load_rows("arithmetic", s["num_eval_prompts"], 1, exclude={r["prompt"] for r in train})
    train_file, eval_file = tmp / "train.jsonl", tmp / "eval.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in train))
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in held_out))
    sj = json.dumps(s)

    print(f"[bench] {name}: held-out reward of the base", flush=True)
    before = child("eval", model, "", str(eval_file), sj)["reward"]
    trl_generation = "vllm colocate" if args.trl_generation != "transformers" else "transformers"
    trl_note = None
    runs = {"align": [], "trl": []}
    for seed in seeds:
        print(f"[bench] seed {seed}: align", flush=True)
        a = child("align", model, str(seed), str(train_file), str(tmp / f"align-{seed}"), args.rollout_dtype, sj)
        a["reward_after"] = child("eval", model, a["adapter"], str(eval_file), sj)["reward"]
        runs["align"].append(a)
        print(f"  {steady_median(a['step_s']):.2f} s/step, peak {a['peak_mb']:.0f} MB, reward {a['reward_after']:.3f}",
              flush=True)
        print(f"[bench] seed {seed}: TRL ({trl_generation})", flush=True)
        out = str(tmp / f"trl-{seed}")
        try:
            t = child("trl", model, str(seed), str(train_file), out, "vllm" if trl_generation != "transformers"
                      else "transformers", sj)
        except RuntimeError as e:
            if args.trl_generation != "auto" or trl_generation == "transformers":
                raise
            # The child's last stderr lines are often progress bars: name the exception line instead.
            lines = [line for line in str(e).splitlines() if line.strip() and "|" not in line]
            errors = [line for line in lines if "Error" in line or "Exception" in line] or lines
            trl_note = f"vllm colocate failed with the CPU build: {errors[-1][:300] if errors else e}"
            print(f"  {trl_note}; using transformers generation", flush=True)
            trl_generation = "transformers"
            t = child("trl", model, str(seed), str(train_file), out, "transformers", sj)
        t["reward_after"] = child("eval", model, t["adapter"], str(eval_file), sj)["reward"]
        runs["trl"].append(t)
        print(f"  {steady_median(t['step_s']):.2f} s/step, peak {t['peak_mb']:.0f} MB, reward {t['reward_after']:.3f}",
              flush=True)

    def med(kind, key):
        return statistics.median(r[key] for r in runs[kind])

    align_s = statistics.median(steady_median(r["step_s"]) for r in runs["align"])
    trl_s = statistics.median(steady_median(r["step_s"]) for r in runs["trl"])
    phases = {f"align_time_{k}": round(statistics.median(steady_median([ph.get(k, 0.0) for ph in r["phases"]])
                                                         for r in runs["align"]), 3)
              for k in PHASES}
    result = {
        "model": name, "align_s_per_step": round(align_s, 3), "trl_s_per_step": round(trl_s, 3),
        "step_speed_ratio": round(trl_s / align_s, 3),
        "align_reward_after": round(med("align", "reward_after"), 4),
        "trl_reward_after": round(med("trl", "reward_after"), 4), "reward_before": round(before, 4),
        "align_peak_mb": round(med("align", "peak_mb"), 1), "trl_peak_mb": round(med("trl", "peak_mb"), 1),
        "memory_ratio": round(med("align", "peak_mb") / med("trl", "peak_mb"), 3),
        "steps": steps, "seeds": seeds, "trl_generation": trl_generation, "align_rollout_dtype": args.rollout_dtype,
        **phases,
        "align_step_s": [[round(x, 2) for x in r["step_s"]] for r in runs["align"]],
        "trl_step_s": [[round(x, 2) for x in r["step_s"]] for r in runs["trl"]],
        "settings": s,
    }
    if trl_note:
        result["trl_generation_note"] = trl_note
    print(json.dumps(result))


if __name__ == "__main__":
    main()
