"""One short check of every recipe on a CUDA device; run by scripts/gpu_check.sh (see there).

Each recipe (SFT when this checkout has it, DPO, reward, PPO with the transformers engine) runs a few
steps on the tiny model in this process; the last line printed is one JSON object: per recipe pass or
fail, step times and peak GPU memory. Only torch, transformers, peft and accelerate are needed: data
comes from JSONL files (no `datasets`), rollouts from transformers (no vLLM), metrics go to JSONL only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# The GPU machine has torch, transformers, peft and accelerate only: run as it would there, with
# `datasets`, vLLM and TRL unimportable (an import of one of them is then an ImportError, not a pass).
for _missing in ("datasets", "vllm", "trl"):
    sys.modules.setdefault(_missing, None)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PREFS = REPO / "tests" / "data" / "prefs_tiny.jsonl"


def recipes(model: str, out: Path, device: str, steps: int) -> dict:
    """name -> (config class path, YAML, --set overrides, trainer class path) of each recipe to check."""
    common = [f"model_name_or_path={model}", f"device={device}", "dtype=auto", f"max_steps={steps}",
              "report_to=[none]", "save_steps=0"]  # dtype auto: bfloat16 on a GPU that has it, checked below
    table = {
        "dpo": ("align.recipes.dpo:DPOConfig", "dpo_tiny.yaml", [f"train_file={PREFS}"], "align.recipes.dpo:DPOTrainer"),
        "reward": ("reward.train:RewardConfig", "reward_tiny.yaml", [f"train_file={PREFS}"],
                   "reward.train:RewardTrainer"),
        "ppo": ("align.recipes.ppo.config:PPOConfig", "ppo_tiny.yaml", ["engine=hf", "algorithm=ppo"],
                "align.recipes.ppo.trainer:PPOTrainer"),
    }
    if sft_note() is None:
        table = {"sft": ("align.recipes.sft:SFTConfig", "sft_tiny.yaml", [], "align.recipes.sft:SFTTrainer"), **table}
    return {name: (cfg, yaml, common + [f"output_dir={out / name}", *extra], tr)
            for name, (cfg, yaml, extra, tr) in table.items()}


def sft_note() -> str | None:
    """Why SFT is skipped, or None when this checkout has `align sft` with a tiny config to run."""
    if not _has_module("align.recipes.sft"):
        return "this checkout has no `align sft`"
    if not (REPO / "configs" / "sft_tiny.yaml").is_file():
        return "no configs/sft_tiny.yaml to run `align sft` with"
    import align.recipes.sft

    if not (hasattr(align.recipes.sft, "SFTConfig") and hasattr(align.recipes.sft, "SFTTrainer")):
        return "align.recipes.sft has no SFTConfig/SFTTrainer"
    return None


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _load(path: str):
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def run_recipe(config_cls: str, yaml: str, sets: list[str], trainer_cls: str, cuda: bool) -> dict:
    import torch

    from align.train.config_parser import load_config

    config = load_config(_load(config_cls), REPO / "configs" / yaml, sets)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = _load(trainer_cls)(config)
    step_s: list[float] = []
    inner = trainer.training_step

    def timed():
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        stats = inner()
        if cuda:
            torch.cuda.synchronize()
        step_s.append(round(time.perf_counter() - t, 4))
        return stats

    trainer.training_step = timed
    try:
        trainer.train()
    finally:
        trainer.close()
    on_cuda = any(p.is_cuda for p in trainer.base.model.parameters())
    if cuda and not on_cuda:
        raise RuntimeError("the base model is not on the GPU")
    if cuda and torch.cuda.is_bf16_supported() and trainer.dtype != "bfloat16":
        raise RuntimeError(f"dtype: auto gave {trainer.dtype} on a GPU with bfloat16")
    return {"ok": True, "dtype": trainer.dtype, "steps": len(step_s), "step_s": step_s,
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None}


def two_process_dpo(model: str, out: Path, steps: int) -> dict:
    """`accelerate launch --num_processes 2` of a DPO run: both ranks must finish."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "-m", "align", "dpo",
           "--config", str(REPO / "configs" / "dpo_tiny.yaml"), "--set", f"model_name_or_path={model}",
           "--set", f"train_file={PREFS}", "--set", f"max_steps={steps}", "--set", "report_to=[none]",
           "--set", "device=cuda", "--set", "save_steps=0", "--output_dir", str(out / "dpo-2proc")]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"))
    result = {"ok": proc.returncode == 0, "seconds": round(time.perf_counter() - t, 2)}
    if proc.returncode != 0:
        result["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--allow-cpu", action="store_true", help="Without CUDA, run the same checks on the CPU.")
    p.add_argument("--steps", type=int, default=3, help="Training steps per recipe.")
    p.add_argument("--keep", action="store_true", help="Keep the run folders (printed).")
    args = p.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        print("gpu_check: no CUDA device" + ("; --allow-cpu: running the checks on the CPU" if args.allow_cpu
                                              else " (pass --allow-cpu to run the checks on the CPU)"),
              file=sys.stderr, flush=True)
        if not args.allow_cpu:
            return 2
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    from align.core.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="align-gpu-check-"))
    model = str(build_tiny_model(work / "tiny", "llama"))
    device = "cuda" if cuda else "cpu"
    report: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "gpus": torch.cuda.device_count(),
                    "torch": torch.__version__, "recipes": {}}
    if sft_note() is not None:
        report["recipes"]["sft"] = {"ok": None, "skipped": sft_note()}
    for name, (cfg, yaml, sets, trainer) in recipes(model, work, device, args.steps).items():
        t = time.perf_counter()
        try:
            report["recipes"][name] = run_recipe(cfg, yaml, sets, trainer, cuda)
        except Exception as e:  # a failing recipe is reported; the others still run
            traceback.print_exc()
            report["recipes"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
        report["recipes"][name]["seconds"] = round(time.perf_counter() - t, 2)
        print(f"gpu_check: {name}: {report['recipes'][name]}", file=sys.stderr, flush=True)
    if cuda and torch.cuda.device_count() >= 2:
        report["recipes"]["dpo_2proc"] = two_process_dpo(model, work, args.steps)
    else:
        report["recipes"]["dpo_2proc"] = {"ok": None, "skipped": "fewer than 2 GPUs"}
    # The GPU machine has neither: these recipes must not have imported them.
    report["imported"] = {m: sys.modules.get(m) is not None for m in ("datasets", "vllm", "trl")}
    report["ok"] = all(r["ok"] is not False for r in report["recipes"].values()) and not any(
        report["imported"].values())
    if args.keep:
        report["runs"] = str(work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
