"""Try to poison or lose a training run, and count what held.

    python scripts/attack_reliability.py     # tiny model, a few minutes on 2 cores

Four classes of attack on real `python -m align` runs and their real files:
  crash safety   SIGKILL a DPO run at random moments (checkpoint writes included), resume, check the
                 run ends complete: checkpoints verify, no temporaries left, each step logged once
  corrupt state  damage the newest checkpoint (bytes, truncation, deletions, NaN or impossible optimizer
                 moments with checksums fixed up, LATEST outside the run): resume must skip it, naming
                 the file, and continue from the newest good one
  bad config     wrong values for every recipe: one line naming the field, before any model loads
  divergence     learning rates that blow up, garbled optimizer moments: the run stops with one line,
                 no non-finite tensor reaches a checkpoint, the good checkpoint stays
A case "held" when the expected outcome happened. Last line: one JSON object {class: [tried, held]}.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "tests" / "data" / "prefs_tiny.jsonl"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def dpo(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "align", "dpo", "--config", "configs/dpo_tiny.yaml", "--train_file", str(DATA),
            "--model_name_or_path", str(model), "--output_dir", str(out), "--report_to", "none",
            "--save_steps", "1", *extra]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def one_line_error(done: subprocess.CompletedProcess, needle: str) -> bool:
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    return done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]


def run_is_sound(out: Path, steps: int) -> bool:
    from align.train.state import latest_checkpoint, verify_checkpoint

    rows = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    ck = out / "checkpoints"
    return (rows == list(range(1, steps + 1)) and not [p for p in out.rglob("*") if ".tmp-" in p.name]
            and latest_checkpoint(out, say=lambda _: None) == ck / f"step-{steps:06d}"
            and all(verify_checkpoint(p) for p in ck.glob("step-*")))


def crash_safety(model: Path, tmp: Path, rng: random.Random, n: int = 3) -> list[bool]:
    held = []
    for i in range(n):
        out = tmp / f"crash{i}"
        cmd = dpo(model, out, "--max_steps", "6")
        for attempt in range(2):
            proc = subprocess.Popen(cmd + ["--resume"] * attempt, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            time.sleep(rng.uniform(3.0, 9.0))  # start-up is ~3-5 s: kills land in set-up, steps and writes
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        done = run(cmd + ["--resume"])
        held.append(done.returncode == 0 and run_is_sound(out, 6))
    return held


def corrupt_state(model: Path, tmp: Path) -> list[bool]:
    import torch
    from safetensors.torch import load_file, save_file

    from align.train.state import CheckpointError, latest_checkpoint, sha256_file

    base = tmp / "good"
    assert run(dpo(model, base, "--max_steps", "3")).returncode == 0

    def fix_sum(ck: Path, rel: str) -> None:
        state = json.loads((ck / "state.json").read_text())
        state["files"][rel] = sha256_file(ck / rel)
        (ck / "state.json").write_text(json.dumps(state))

    def rewrite(ck: Path, change) -> None:
        t = load_file(str(ck / "tensors.safetensors"))
        for k in t:
            change(k, t)
        save_file(t, str(ck / "tensors.safetensors"))
        fix_sum(ck, "tensors.safetensors")

    def edit_state(ck: Path, change) -> None:
        state = json.loads((ck / "state.json").read_text())
        change(state)
        (ck / "state.json").write_text(json.dumps(state))

    def flip(p: Path, at: float) -> None:
        b = bytearray(p.read_bytes())
        b[int(len(b) * at)] ^= 0x01
        p.write_bytes(bytes(b))

    def nan(k, t):
        if k.endswith("exp_avg_sq"):
            t[k] = torch.full_like(t[k], float("nan"))

    def huge(k, t):
        if k.endswith("exp_avg"):
            t[k] = torch.full_like(t[k], 1e30)

    def negative(k, t):
        if k.endswith("exp_avg_sq"):
            t[k] = -t[k] - 1

    def inf_rng(k, t):
        if k.startswith("optim.0.exp_avg"):
            t[k][..., 0] = float("inf")

    adapter = "adapters/policy/adapter_model.safetensors"
    attacks = {
        "flip a header byte": lambda c: flip(c / "tensors.safetensors", 0.001),
        "flip a data bit": lambda c: flip(c / "tensors.safetensors", 0.7),
        "flip an adapter bit": lambda c: flip(c / adapter, 0.9),
        "truncate tensors": lambda c: (c / "tensors.safetensors").write_bytes(b""),
        "delete adapter": lambda c: (c / adapter).unlink(),
        "delete adapter folder": lambda c: shutil.rmtree(c / "adapters"),
        "state.json garbage": lambda c: (c / "state.json").write_bytes(b"\x00\xff{"),
        "state.json empty object": lambda c: (c / "state.json").write_text("{}"),
        "state.json deleted": lambda c: (c / "state.json").unlink(),
        "NaN second moment, sum fixed": lambda c: rewrite(c, nan),
        "huge first moment, sum fixed": lambda c: rewrite(c, huge),
        "negative second moment, sum fixed": lambda c: rewrite(c, negative),
        "one inf entry, sum fixed": lambda c: rewrite(c, inf_rng),
        "NaN adapter weight, sum fixed": lambda c: (
            save_file({k: v * float("nan") for k, v in load_file(str(c / adapter)).items()}, str(c / adapter)),
            fix_sum(c, adapter)),
        "files lists a path outside": lambda c: edit_state(c, lambda st: st["files"].update({"../../x": "0"})),
        "NaN adapter, dropped from files": lambda c: (
            save_file({k: v * float("nan") for k, v in load_file(str(c / adapter)).items()}, str(c / adapter)),
            edit_state(c, lambda st: st["files"].pop(adapter))),
        "adapter name ../..": lambda c: edit_state(c, lambda st: st.update(adapters=["../.."])),
        "LATEST ../../etc": lambda c: (c.parent / "LATEST").write_text("../../etc"),
        "LATEST absolute": lambda c: (c.parent / "LATEST").write_text(str(c.parent.parent.parent)),
        "LATEST binary": lambda c: (c.parent / "LATEST").write_bytes(b"\xff\xfe"),
        "LATEST names a missing step": lambda c: (c.parent / "LATEST").write_text("step-000042"),
    }
    held = []
    for name, attack in attacks.items():
        out = tmp / "corrupt"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(base, out)
        attack(out / "checkpoints" / "step-000003")
        said: list[str] = []
        try:
            got = latest_checkpoint(out, say=said.append)
        except CheckpointError:
            got = None
        expected = "step-000003" if name.startswith("LATEST") else "step-000002"
        ok = got is not None and got.name == expected and all("\n" not in s for s in said) and said
        print(f"  corrupt state: {name}: {'held' if ok else 'FAILED'} {said[:1]}")
        held.append(bool(ok))
    # And one real resume over the worst of them: trains on from step 2 and rewrites step 3.
    out = tmp / "corrupt"
    shutil.rmtree(out)
    shutil.copytree(base, out)
    rewrite(out / "checkpoints" / "step-000003", huge)
    done = run(dpo(model, out, "--max_steps", "3", "--resume"))
    held.append(done.returncode == 0 and "Traceback" not in done.stderr and run_is_sound(out, 3))
    return held


def bad_config(model: Path, tmp: Path) -> list[bool]:
    from align.recipes.dpo import DPOConfig
    from align.recipes.ppo.config import PPOConfig
    from align.train.config_parser import ConfigError, load_config
    from reward.train import RewardConfig

    values = ["learning_rate=0", "learning_rate=-1", "learning_rate=.nan", "learning_rate=.inf", "learning_rate=abc",
              "max_steps=0", "max_steps=-7", "max_steps=1.5", "num_train_epochs=0", "per_device_train_batch_size=0",
              "per_device_eval_batch_size=-2", "gradient_accumulation_steps=0", "save_steps=-1", "eval_steps=-1",
              "logging_steps=0", "save_total_limit=0", "max_grad_norm=0", "max_grad_norm=.nan", "weight_decay=-1",
              "weight_decay=.nan", "warmup_ratio=1.5", "warmup_steps=-1", "lora_r=0", "lora_alpha=-1",
              "lora_dropout=1.5", "seed=abc", "report_to=[wandb]", "lr_scheduler_type=sometimes", "dtype=int8",
              "max_length=1", "num_threads=-1", "bf16=maybe", "learning_rate=[1,"]
    recipes = {"dpo": DPOConfig, "reward": RewardConfig, "ppo": PPOConfig}
    extra = {"dpo": [f"train_file={DATA}"], "reward": [f"train_file={DATA}"], "ppo": []}
    specific = [("reward", "head_learning_rate=0"), ("reward", "head_learning_rate=.nan"),
                ("ppo", "critic_learning_rate=-1"), ("ppo", "beta=.nan"), ("dpo", "beta=.nan"),
                ("dpo", "beta=0"), ("ppo", "num_generations=0"), ("ppo", "temperature=0")]
    held = []
    for recipe, cls in recipes.items():
        for v in values:
            try:
                load_config(cls, None, extra[recipe] + [v])
                held.append(False)
                print(f"  bad config: {recipe} {v}: NOT CAUGHT")
            except ConfigError as e:
                field = v.split("=")[0]
                held.append(field in str(e) and "\n" not in str(e))
    for recipe, v in specific:
        try:
            load_config(recipes[recipe], None, extra[recipe] + [v])
            held.append(False)
            print(f"  bad config: {recipe} {v}: NOT CAUGHT")
        except ConfigError as e:
            held.append(v.split("=")[0] in str(e))
    # Through the command line, before a model loads (no run folder created).
    blocker = tmp / "a-file"
    blocker.write_text("x")
    cli = [("dpo", ["--set", "learning_rate=0"], "learning_rate"),
           ("reward", ["--model_name_or_path", "/missing"], "model_name_or_path"),
           ("ppo", ["--model_name_or_path", "org/not-cached"], "model_name_or_path"),
           ("dpo", ["--output_dir", str(blocker)], "output_dir"),
           ("ppo", ["--output_dir", str(blocker / "run")], "output_dir"),
           ("reward", ["--set", "learning_rate=[1,", "--check_config"], "not valid YAML")]
    for recipe, args, needle in cli:
        out = tmp / f"cfg-{recipe}"
        cmd = dpo(model, out)
        cmd[3], cmd[5] = recipe, f"configs/{recipe}_tiny.yaml"
        if recipe == "ppo":
            cmd[6:8] = []
        done = run(cmd + args)
        held.append(one_line_error(done, needle) and not out.exists())
    return held


def divergence(model: Path, tmp: Path) -> list[bool]:
    import torch
    from safetensors.torch import load_file

    from align.train.state import verify_checkpoint

    def clean(out: Path) -> bool:
        return all(bool(torch.isfinite(t).all()) for f in out.rglob("*.safetensors")
                   for t in load_file(str(f)).values() if t.is_floating_point())

    held = []
    warm = ["--warmup_steps", "3", "--lr_scheduler_type", "constant_with_warmup", "--max_steps", "5"]
    for lr in ("1e39", "3e38", "1e30", "1e12"):
        out = tmp / f"div{lr}"
        done = run(dpo(model, out, "--learning_rate", lr, *warm))
        lines = [x for x in done.stderr.splitlines() if x.startswith("error: ")]
        stopped = done.returncode == 2 and len(lines) == 1 and "stopped before" in lines[0].lower() or (
            done.returncode == 0)  # a large but survivable lr may simply train: then it must be clean
        good = [p for p in (out / "checkpoints").glob("step-*")]
        held.append(stopped and clean(out) and all(verify_checkpoint(p) for p in good))
        print(f"  divergence: lr {lr}: rc {done.returncode} {lines[:1]}")
    return held


def main() -> None:
    from align.core.tiny import build_tiny_model

    seed = int(os.environ.get("ATTACK_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="attack-"))
    model = build_tiny_model(tmp / "tiny", "llama")
    table = {}
    for name, attack in (("crash safety", lambda: crash_safety(model, tmp, rng)),
                         ("corrupt state", lambda: corrupt_state(model, tmp)),
                         ("bad config", lambda: bad_config(model, tmp)),
                         ("divergence", lambda: divergence(model, tmp))):
        t0 = time.perf_counter()
        held = attack()
        table[name] = [len(held), sum(held)]
        print(f"{name}: {sum(held)}/{len(held)} held ({time.perf_counter() - t0:.0f} s)", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"seed": seed, **table}))


if __name__ == "__main__":
    main()
