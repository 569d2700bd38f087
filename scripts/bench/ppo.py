"""PPO benchmark: memory of one shared base vs four models, adapter-only sync, rollout speed, learning.

    python scripts/bench/ppo.py --quick                     # tiny model, about a minute
    python scripts/bench/ppo.py                             # SmolLM2-135M; trains configs/grpo_demo.yaml
    python scripts/bench/ppo.py --reuse-run runs/grpo-demo  # take reward_before/after from a finished run

Each memory figure is the peak RSS (sampled from /proc every 2 ms while the step runs, after the
loads; ru_maxrss, which includes loading transients, is reported alongside) of its own child process
running one PPO step (policy/reference/critic/reward forward passes, then a policy+critic update):
  shared: PPOTrainer.ppo_step itself, every role on one SharedBase (adapters "policy", "critic" and a
          saved reward model attached as "reward"; reference = adapters off), transformers rollouts
  four:   the same step written out over separate policy, reference, critic and reward models
          (4 loads of the base): what the toolkit saves, since it has no four-model trainer
with the same batch shape. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from measure import ROOT, bench_environment, peak_rss_mb, run_child


# -- one PPO step in a child process -------------------------------------------------------------
def memory_child(model: str, mode: str, batch: int, prompt_len: int, completion_len: int) -> dict:
    import torch

    from align.core.base import SharedBase
    from align.core.logprobs import completion_logprobs
    from align.recipes.ppo import algorithms as A
    from align.recipes.ppo import grpo_losses as G
    from align.recipes.ppo.heads import ValueHead

    torch.manual_seed(0)

    def load():
        # from_pretrained maps the safetensors file: weights are file pages that become resident when
        # touched, and several loads of one file would share them. Separate models (other checkpoints
        # in practice) own their memory, so give every load its own anonymous copy, in both modes alike.
        b = SharedBase.load(model)
        with torch.no_grad():
            for p in b.model.parameters():
                p.data = p.data.clone()
        return b

    if mode == "shared":
        return trainer_child(model, batch, completion_len)
    roles = {}
    for role in ("policy", "reference", "critic", "reward"):
        b = load()
        if role != "reference":
            b.add_adapter(role, trainable=role != "reward")
        roles[role] = (b, None if role == "reference" else role)
    bases = [b for b, _ in roles.values()]
    for b in bases:
        b.model.eval()
    H = bases[0].hidden_size
    value_head, reward_head = ValueHead(H, seed=0), ValueHead(H, seed=1)
    vocab = bases[0].model.config.vocab_size
    L = prompt_len + completion_len
    ids = torch.randint(0, vocab, (batch, L), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    cmask = torch.zeros_like(ids)
    cmask[:, prompt_len:] = 1
    mask = torch.ones(batch, completion_len)
    P = prompt_len

    def logp(role, grad=False):
        b, name = roles[role]
        ctx = b.reference() if name is None else b.adapter(name)
        with ctx, torch.set_grad_enabled(grad):
            return completion_logprobs(b, ids, attn, cmask)[:, P - 1:]

    def hidden(role, grad=False):
        b, name = roles[role]
        with b.adapter(name), torch.set_grad_enabled(grad):
            return b.hidden(ids, attn)

    meter = RssMeter()
    old_logp, ref_logp = logp("policy"), logp("reference")
    old_values = value_head(hidden("critic")[:, P - 1:P - 1 + completion_len]).detach()
    scores = reward_head(hidden("reward")[:, -1]).detach()
    kl = A.kl_penalty(old_logp, ref_logp, "k1")
    adv, ret = A.gae_advantages(A.token_rewards(scores, kl, mask, 0.05), old_values, mask, 1.0, 0.95)
    adv = A.masked_whiten(adv, mask)
    trained = list(roles["policy"][0].adapter_parameters("policy").values()) + \
        list(roles["critic"][0].adapter_parameters("critic").values()) + list(value_head.parameters())
    opt = torch.optim.AdamW(trained, lr=1e-4)
    pg, _ = G.grpo_loss(logp("policy", grad=True), old_logp, adv, mask, loss_type="bnpo")
    values = value_head(hidden("critic", grad=True)[:, P - 1:P - 1 + completion_len])
    vf, _ = A.value_loss(values, old_values, ret, mask, 0.2)
    (pg + 0.5 * vf).backward()
    opt.step()
    return {**meter.stop(), "base_mb": bases[0].base_bytes() / 2 ** 20, "bases": len(bases),
            "batch_shape": [batch, prompt_len, completion_len]}


class RssMeter:
    """Peak RSS of this process while a step runs, sampled from /proc every 2 ms.

    Loading leaves transient peaks (mmapped checkpoint pages, freed copies); the step itself is
    measured: freed memory is given back first, then sampling starts.
    """

    def __init__(self):
        import ctypes
        import gc
        import threading

        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.samples, self._stop = [], threading.Event()
        self.before = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.start = time.perf_counter()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self):
        while not self._stop.is_set():
            self.samples.append(self.rss())
            time.sleep(0.002)

    def stop(self) -> dict:
        seconds = time.perf_counter() - self.start
        self._stop.set()
        self._thread.join()
        self.samples.append(self.rss())
        return {"peak_mb": max(self.samples) / 2 ** 20, "rss_before_step_mb": self.before / 2 ** 20,
                "ru_maxrss_mb": peak_rss_mb(), "step_s": seconds}


def trainer_child(model: str, batch: int, completion_len: int) -> dict:
    """One real PPOTrainer.ppo_step (policy, critic, attached reward model, reference) on one base."""
    import gc

    import torch

    from align.core.base import SharedBase
    from align.recipes.ppo import PPOConfig, PPOTrainer
    from align.train.config_parser import load_config
    from reward.model import RewardModel

    tmp = Path(tempfile.mkdtemp(prefix="bench-ppo-child-"))
    scratch = SharedBase.load(model)  # a saved reward model to attach, as `align reward` writes one
    RewardModel.create(scratch, seed=0).save(tmp / "reward_model")
    del scratch
    gc.collect()
    cfg = load_config(PPOConfig, ROOT / "configs" / "ppo_demo.yaml", [
        f"model_name_or_path={model}", f"output_dir={tmp / 'run'}", "engine=hf", "report_to=[none]",
        f"reward_model_name_or_path={tmp / 'reward_model'}", "prompts_per_step=1", f"num_generations={batch}",
        f"max_completion_length={completion_len}", f"per_device_train_batch_size={batch}", "num_iterations=1",
        "num_train_prompts=8", "num_eval_prompts=1"])
    trainer = PPOTrainer(cfg)
    trainer.setup()
    # Copy the weights into anonymous memory, as the four-model child does for each of its loads.
    with torch.no_grad():
        for p in trainer.base.model.parameters():
            p.data = p.data.clone()
    meter = RssMeter()
    metrics = trainer.ppo_step(1)
    out = meter.stop()
    shape = [batch, max(len(ids) for ids in trainer.train_ids), round(metrics["completions/mean_length"], 1)]
    trainer.close()
    return {**out, "base_mb": trainer.base.base_bytes() / 2 ** 20, "bases": 1, "batch_shape": shape,
            "adapters": trainer.base.adapters}


def copies_child(model: str, sync_mode: str, dtype: str, batch: int, completion_len: int) -> dict:
    """Base copies a PPO step holds with its colocated vLLM engine (`sync_mode`; trainer base and engine in `dtype`).

    (peak RSS while `PPOTrainer.ppo_step` runs - RSS of this process before any model is loaded)
    / the base's size in float32. Modules (torch, transformers, peft, vLLM) are imported first, so
    the difference is models, engine, KV cache and the step's activations.
    """
    import torch

    from align.engines import vllm_compat
    from align.recipes.ppo import GRPOConfig, PPOTrainer
    from align.train.config_parser import load_config

    vllm_compat.import_vllm()
    import peft  # noqa: F401
    import transformers  # noqa: F401

    torch.set_num_threads(max(1, torch.get_num_threads()))
    before = RssMeter().stop()["rss_before_step_mb"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-ppo-copies-"))
    cfg = load_config(GRPOConfig, ROOT / "configs" / "grpo_demo.yaml", [
        f"model_name_or_path={model}", f"output_dir={tmp / 'run'}", "engine=vllm", "report_to=[none]",
        f"dtype={dtype}", f"rollout_dtype={dtype}", f"engine_options={{sync_mode: {sync_mode}}}", "prompts_per_step=1",
        f"num_generations={batch}", f"max_completion_length={completion_len}",
        f"per_device_train_batch_size={batch}", "num_iterations=1", "num_train_prompts=8", "num_eval_prompts=1"])
    trainer = PPOTrainer(cfg)
    trainer.setup()
    meter = RssMeter()
    trainer.ppo_step(1)
    out = meter.stop()
    fp32_mb = sum(p.numel() for p in trainer.base.base_parameters().values()) * 4 / 2 ** 20
    linear_mb = sum(m.weight.numel() for n, m in trainer.base._plain_model().named_modules()
                    if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}") * 4 / 2 ** 20
    trainer.close()
    return {"sync_mode": sync_mode, "dtype": dtype, "rss_before_models_mb": before, "peak_step_mb": out["peak_mb"],
            "ru_maxrss_mb": out["ru_maxrss_mb"], "base_fp32_mb": fp32_mb, "linear_fp32_mb": linear_mb,
            "process_base_copies": (out["peak_mb"] - before) / fp32_mb}


# -- sync and rollout speed (one process, vLLM in-process) ----------------------------------------
def sync_and_rollouts(model: str, n_prompts: int, max_new_tokens: int, repeats: int, dtypes: list[str]) -> dict:
    """Adapter sync and rollout throughput per vLLM dtype (fold mode, the trainer's default), and HF.

    Throughput is scripts/bench/rollout.py's `measure`: `n_prompts` prompts x exactly `max_new_tokens`
    tokens (EOS ignored; *_natural: stopping at EOS). The sync figures come from the float32 engine,
    whose probe must match the trainer within 1e-4.
    """
    import importlib.util

    from align.core.base import SharedBase
    from align.engines import make_engine
    from align.tasks.arithmetic import make_prompts

    spec = importlib.util.spec_from_file_location("bench_rollout", Path(__file__).with_name("rollout.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    std = 2e-3  # a trained-looking adapter: non-zero B, so the probe check means something

    base = SharedBase.load(model)
    base.model.eval()
    base.add_adapter("policy")
    tok = base.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for r in make_prompts(n_prompts, 0)]
    prompts = [list(p.tolist() if hasattr(p, "tolist") else p) for p in prompts]
    out = {"full_weight_bytes": base.base_bytes(), "rollout_prompts": n_prompts, "rollout_new_tokens": max_new_tokens}
    for dtype in dtypes:
        engine = make_engine("vllm", model, base, dtype=dtype)
        try:
            r = bench.measure(engine, base, prompts, max_new_tokens, repeats, syncs=repeats, std=std)
        finally:
            engine.close()
        out[f"rollout_tok_per_s_vllm_{dtype}"] = r["tok_per_s"]
        out[f"rollout_tok_per_s_vllm_{dtype}_natural"] = r["tok_per_s_natural"]
        out[f"logprob_max_abs_diff_{dtype}"] = r["max_abs_diff"]
        if dtype == "float32" or "sync_bytes" not in out:
            out.update(sync_bytes=r["sync_bytes"], sync_s=r["sync_seconds"], logprob_max_abs_diff=r["max_abs_diff"])
    best = max(dtypes, key=lambda d: out[f"rollout_tok_per_s_vllm_{d}"])
    out.update(rollout_tok_per_s_vllm=out[f"rollout_tok_per_s_vllm_{best}"], rollout_vllm_dtype=best)
    hf = make_engine("hf", model, base, dtype="float32")
    r = bench.measure(hf, base, prompts, max_new_tokens, repeats, syncs=1, std=std)
    out.update(rollout_tok_per_s_hf=r["tok_per_s"], rollout_tok_per_s_hf_natural=r["tok_per_s_natural"])
    out["sync_ratio"] = out["full_weight_bytes"] / max(out["sync_bytes"], 1)
    return out


# -- learning --------------------------------------------------------------------------------------
def digit_fraction(completions, **kwargs):
    """Quick-mode reward a tiny random model can learn in a few steps: share of digit characters."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def learning(config: str, overrides: list[str], reuse_run: str | None) -> dict:
    if reuse_run:
        from align.train.metrics import read_metrics

        evals = [r["eval/reward"] for r in read_metrics(reuse_run) if "eval/reward" in r]
        return {"reward_before": evals[0], "reward_after": evals[-1], "reward_source": reuse_run}
    from align.recipes.ppo import GRPOConfig, PPOTrainer
    from align.train.config_parser import load_config

    cfg = load_config(GRPOConfig, config, overrides)
    trainer = PPOTrainer(cfg)
    start = time.perf_counter()
    try:
        trainer.train()
    finally:
        trainer.close()
    return {"reward_before": trainer.summary["eval/reward_before"], "reward_after": trainer.summary["eval/reward"],
            "train_s": time.perf_counter() - start, "train_steps": cfg.max_steps, "reward_source": config}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model instead of SmolLM2-135M")
    p.add_argument("--train-steps", type=int, default=None, help="steps of the learning run (default: config's)")
    p.add_argument("--reuse-run", help="read reward_before/after from this finished run instead of training")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", default="float32,bfloat16", help="vLLM engine dtypes to time rollouts with")
    p.add_argument("--reuse-speed", help="JSON file with the sync/rollout figures of an earlier run (skips them)")
    p.add_argument("--copies-only", action="store_true",
                   help="only process_base_copies (PPO step + colocated vLLM engine, fold and lora sync)")
    p.add_argument("--copies-dtypes", default="float32,bfloat16", help="trainer base + engine dtypes (process_base_copies)")
    p.add_argument("--copies-child", nargs=5, metavar=("MODEL", "SYNC", "DTYPE", "B", "T"), help=argparse.SUPPRESS)
    p.add_argument("--child", nargs=5, metavar=("MODEL", "MODE", "B", "P", "T"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        model, mode, b, pl, cl = args.child
        print(json.dumps(memory_child(model, mode, int(b), int(pl), int(cl))))
        return
    if args.copies_child:
        model, sync, dtype, b, cl = args.copies_child
        print(json.dumps(copies_child(model, sync, dtype, int(b), int(cl))))
        return

    bench_environment(vllm=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    if args.quick:
        from align.core.tiny import build_tiny_model

        model = str(build_tiny_model(tmp / "tiny"))
        name = "tiny-llama"
        shape = ("16", "32", "16")
        config = str(ROOT / "configs" / "grpo_demo.yaml")
        overrides = [f"model_name_or_path={model}", f"output_dir={tmp / 'run'}",
                     "max_steps=" + str(args.train_steps or 15), "reward_funcs=[__main__.digit_fraction]",
                     "system_prompt=null", "learning_rate=3.0e-3", "num_eval_prompts=16", "eval_steps=0",
                     "max_completion_length=8", "temperature=1.0", "engine=hf"]
        rollout_shape = (16, 16)
    else:
        from align.core.smollm import ensure_smollm2

        model = str(ensure_smollm2())
        name = "SmolLM2-135M-Instruct"
        shape = ("4", "48", "16")  # a small batch: weights, not activations, dominate the peak
        config = str(ROOT / "configs" / "grpo_demo.yaml")
        overrides = [f"output_dir={tmp / 'run'}"] + ([f"max_steps={args.train_steps}"] if args.train_steps else [])
        rollout_shape = (64, 48)  # the workload: 64 prompts x 48 new tokens

    print(f"[bench] model {name}: base copies of a PPO step with its colocated vLLM engine", flush=True)
    copies = {f"{m}_{d}": run_child(__file__, "--copies-child", model, m, d, shape[0], shape[2])
              for d in args.copies_dtypes.split(",") for m in ("fold", "lora")}
    copy_figures = {f"process_base_copies_{k}": round(c["process_base_copies"], 3) for k, c in copies.items()}
    copy_figures.update({f"peak_step_mb_{k}": round(c["peak_step_mb"], 1) for k, c in copies.items()})
    first = next(iter(copies.values()))
    copy_figures.update(rss_before_models_mb=round(first["rss_before_models_mb"], 1),
                        base_fp32_mb=round(first["base_fp32_mb"], 1),
                        linear_share_of_base=round(first["linear_fp32_mb"] / first["base_fp32_mb"], 3))
    print(f"  {copy_figures}", flush=True)
    if args.copies_only:
        print(json.dumps({"model": name, **copy_figures}))
        return
    print(f"[bench] model {name}: memory of one PPO step, each mode in its own process", flush=True)
    shared = run_child(__file__, "--child", model, "shared", *shape)
    four = run_child(__file__, "--child", model, "four", *shape)
    base_mb = shared["base_mb"]
    print(f"  shared base: peak {shared['peak_mb']:.0f} MB   four models: peak {four['peak_mb']:.0f} MB   "
          f"base {base_mb:.1f} MB", flush=True)
    print("[bench] adapter sync to vLLM and rollout speed", flush=True)
    if args.reuse_speed:
        speed = json.loads(Path(args.reuse_speed).read_text())
    else:
        speed = sync_and_rollouts(model, *rollout_shape, args.repeats, args.dtypes.split(","))
        (tmp / "speed.json").write_text(json.dumps(speed))
    print(f"  sync {speed['sync_bytes']} B of {speed['full_weight_bytes']} B (x{speed['sync_ratio']:.0f}) in "
          f"{speed['sync_s']:.2f} s, probe max |diff| {speed['logprob_max_abs_diff']:.2e}; rollout tok/s "
          f"vLLM {speed['rollout_tok_per_s_vllm']:.0f}, HF {speed['rollout_tok_per_s_hf']:.0f}", flush=True)
    print("[bench] learning run", flush=True)
    learn = learning(config, overrides, args.reuse_run)
    print(f"  held-out reward {learn['reward_before']:.3f} -> {learn['reward_after']:.3f}", flush=True)
    result = {
        "model": name,
        "base_mb": round(base_mb, 2),
        **copy_figures,
        "peak_mb_shared": round(shared["peak_mb"], 1),
        "peak_mb_four_models": round(four["peak_mb"], 1),
        "saved_base_copies": round((four["peak_mb"] - shared["peak_mb"]) / base_mb, 3),
        "ru_maxrss_mb_shared": round(shared["ru_maxrss_mb"], 1),
        "ru_maxrss_mb_four_models": round(four["ru_maxrss_mb"], 1),
        "step_s_shared": round(shared["step_s"], 3),
        "step_s_four_models": round(four["step_s"], 3),
        "batch_shape_shared": shared["batch_shape"],
        "batch_shape_four_models": four["batch_shape"],
        "sync_bytes": speed["sync_bytes"],
        "full_weight_bytes": speed["full_weight_bytes"],
        "sync_ratio": round(speed["sync_ratio"], 1),
        "sync_s": round(speed["sync_s"], 4),
        **{k: round(v, 1) for k, v in speed.items() if k.startswith("rollout_tok_per_s")},
        "rollout_vllm_dtype": speed["rollout_vllm_dtype"],
        "rollout_workload": f"{speed['rollout_prompts']} prompts x {speed['rollout_new_tokens']} new tokens",
        "logprob_max_abs_diff": speed["logprob_max_abs_diff"],
        **{k: v for k, v in speed.items() if k.startswith("logprob_max_abs_diff_")},
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in learn.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
