"""Issue 26's own cases, by class (scripts/attack_round2.py runs them)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from attack_round2_kit import (
    DATA,
    ROOT,
    SFT_DATA,
    Ctx,
    align,
    ar,
    clean,
    edit_json,
    launch,
    max_diff,
    measured,
    modes_ok,
    one_line,
    recipe,
    refused_untouched,
    rename_tensors,
    tree_hash,
    truncate,
    write_rows,
)


# -- export: never touches its source ----------------------------------------------------------------
def export(ctx: Ctx) -> None:
    P, R = ctx.policy, ctx.reward
    ad = P / "adapter"
    refused_untouched(ctx, "export", "--merge onto its own adapter (--adapter A --merge A)",
                      ["export", "--adapter", ad, "--merge", ad], P, ad.resolve())
    refused_untouched(ctx, "export", "--reward onto its own run (--reward R R)", ["export", "--reward", R, R], R,
                      R.resolve())
    for flag in ("--merge", "--reward"):
        f = ctx.tmp / f"out-file{flag}"
        f.write_text("keep me")
        src = ["--adapter", ad, "--merge", f] if flag == "--merge" else ["--reward", R, f]
        done = align("export", *src)
        ctx.add("export", f"{flag} to an existing file", "one line 'is a file'; file unchanged, no .old copy",
                one_line(done, f, "is a file") and f.read_text() == "keep me"
                and not list(ctx.tmp.glob(f".{f.name}*")), done)
    out = ctx.tmp / "merged"
    before = tree_hash(P)
    done = align("export", "--adapter", ad, "--merge", out, "--max_new_tokens", "2")
    ctx.add("export", "--merge to a new folder", "exit 0, model.safetensors written, run unchanged (hash)",
            done.returncode == 0 and (out / "model.safetensors").is_file() and tree_hash(P) == before, done)
    refused_untouched(ctx, "export", "--merge over an existing export without --overwrite",
                      ["export", "--adapter", ad, "--merge", out], out, out, "--overwrite")
    done = align("export", "--reward", R, ctx.tmp / "rm-out")
    ctx.add("export", "--reward to a new folder", "exit 0, config.json + model.safetensors",
            done.returncode == 0 and (ctx.tmp / "rm-out" / "model.safetensors").is_file(), done)
    rm = "reward_model"
    damage = {
        "reward_meta.json not JSON": (f"{rm}/reward_meta.json", lambda p: p.write_text("{nope"), "not valid JSON"),
        "reward_meta.json an array": (f"{rm}/reward_meta.json", lambda p: p.write_text("[1, 2]"), "got list"),
        "reward_meta.json bad field": (f"{rm}/reward_meta.json", lambda p: edit_json(p, lambda m: {
            **m, "max_length": "long"}), "max_length"),
        "head.safetensors truncated": (f"{rm}/head.safetensors", truncate, "head.safetensors"),
        "reward adapter truncated": (f"{rm}/adapter_model.safetensors", truncate, "adapter_model.safetensors"),
        "reward adapter_config.json an array": (f"{rm}/adapter_config.json", lambda p: p.write_text("[]"),
                                                "adapter_config.json"),
    }
    for case, (rel, hurt, what) in damage.items():
        r2 = ctx.copy(R, "reward-damaged")
        hurt(r2 / rel)
        refused_untouched(ctx, "export", f"--reward, {case}", ["export", "--reward", r2, ctx.tmp / "rm-x"], r2,
                          r2 / rel, what)
    for case, (rel, hurt, what) in {
        "adapter truncated": ("adapter_model.safetensors", truncate, "adapter_model.safetensors"),
        "adapter_config.json not JSON": ("adapter_config.json", lambda p: p.write_text("{"), "not valid JSON"),
        "adapter_config.json r: 'four'": ("adapter_config.json", lambda p: edit_json(p, lambda c: {**c, "r": "four"}),
                                          "'r'"),
    }.items():
        p2 = ctx.copy(P, "policy-damaged")
        hurt(p2 / "adapter" / rel)
        refused_untouched(ctx, "export", f"--merge, {case}", ["export", "--adapter", p2 / "adapter", "--merge",
                                                             ctx.tmp / "m-x"], p2, p2 / "adapter" / rel, what)


# -- adapters: verified before they are trusted ------------------------------------------------------
def damaged_adapter(ctx: Ctx, hurt, name: str = "init") -> Path:
    folder = ctx.copy(ctx.policy / "adapter", name)
    hurt(folder)
    return folder


def init_run(ctx: Ctx, adapter: Path, *extra) -> subprocess.CompletedProcess:
    out = ctx.tmp / "from-init"
    shutil.rmtree(out, ignore_errors=True)
    return align(*recipe("dpo", ctx.model, out, "--init_adapter", adapter, "--max_steps", "1", "--save_steps", "0",
                         *extra))


ADAPTER_DAMAGE = {
    "tensor names do not match the base": (lambda f: rename_tensors(f / "adapter_model.safetensors", "q_proj",
                                                                    "qq_proj"), "unexpected"),
    "weights truncated": (lambda f: truncate(f / "adapter_model.safetensors"), "adapter_model.safetensors"),
    "adapter_config.json not JSON": (lambda f: (f / "adapter_config.json").write_text("{r: 8"), "not valid JSON"),
    "adapter_config.json an array": (lambda f: (f / "adapter_config.json").write_text("[8]"), "got list"),
    "r: 16 over rank-8 weights": (lambda f: edit_json(f / "adapter_config.json", lambda c: {**c, "r": 16}), "16"),
}


def adapters(ctx: Ctx) -> None:
    for case, (hurt, what) in ADAPTER_DAMAGE.items():
        folder = damaged_adapter(ctx, hurt)
        done = init_run(ctx, folder)
        ctx.add("adapters", f"init_adapter: {case}", f"one line naming {folder.name} and '{what}', exit 2",
                one_line(done, folder, what), done)
    folder = damaged_adapter(ctx, lambda f: (f / "align_meta.json").unlink())
    done = init_run(ctx, folder)
    ctx.add("adapters", "init_adapter without align_meta.json (base unknown)",
            "trains; a warning says the base cannot be checked",
            done.returncode == 0 and "cannot check" in done.stderr and clean(done), done)
    for case in ("r: 16 over rank-8 weights", "weights truncated"):
        folder = damaged_adapter(ctx, ADAPTER_DAMAGE[case][0], "served")
        done = align("serve", "--base", ctx.model, "--adapter", f"p={folder}", "--port", "0")
        ctx.add("adapters", f"serve: {case}", "one line naming the adapter file, exit 2, before vLLM starts",
                one_line(done, folder), done)
    rows = ctx.tmp / "score.jsonl"
    rows.write_text(json.dumps({"prompt": "What is 1+1?", "completion": "2"}) + "\n")
    for case, (rel, hurt, what) in {
        "adapter tensors renamed": ("adapter_model.safetensors", lambda p: rename_tensors(p, "v_proj", "vv_proj"),
                                    "unexpected"),
        "adapter truncated": ("adapter_model.safetensors", truncate, "adapter_model.safetensors"),
    }.items():
        rm = ctx.copy(ctx.reward / "reward_model", "rm-damaged")
        hurt(rm / rel)
        done = align("reward", "score", rows, "--model_name_or_path", rm, "--base", ctx.model)
        ctx.add("adapters", f"reward model (align reward score): {case}", f"one line naming {rm.name}, exit 2",
                one_line(done, rm, what), done)


# -- resume: compares before it continues ------------------------------------------------------------
RESUME_SETS = ["--per_device_train_batch_size", "2", "--max_steps", "3", "--save_steps", "1"]


def resume_recipe(ctx: Ctx, out: Path, *extra, data=None) -> list:
    """The 3-step SFT run the resume cases start from (1 process, accumulation 2), with `extra` flags after."""
    return recipe("sft", ctx.model, out, *RESUME_SETS, "--gradient_accumulation_steps", "2", *extra, data=data)


def resume(ctx: Ctx) -> None:
    sets = RESUME_SETS
    one, two = ctx.tmp / "res-one", ctx.tmp / "res-two"
    d1 = align(*recipe("sft", ctx.model, one, *sets, "--gradient_accumulation_steps", "2"))
    d2 = launch(2, *recipe("sft", ctx.model, two, *sets, "--gradient_accumulation_steps", "1"))
    # Resumed from step 2 (as if killed after it) on 1 process with the same flags.
    done = align(*recipe("sft", ctx.model, two, *sets, "--gradient_accumulation_steps", "1", "--resume",
                         "step-000002"))
    rel = "adapter/adapter_model.safetensors"
    diff = max_diff(one / rel, two / rel) if done.returncode == 0 and d1.returncode == 0 else float("inf")
    ctx.add("resume", f"2 processes -> 1, same flags (adapter vs 1 process at the same global batch: {diff:.1e})",
            "global batch kept (accumulation 1 -> 2, said), steps 1..3 once, adapter within 1e-5",
            d2.returncode == 0 and "keeps the global batch" in done.stdout and diff <= 1e-5
            and ar.run_is_sound(two, 3), done if d2.returncode == 0 else d2)
    run = ctx.copy(one, "res-changed")
    config_before = (run / "config.yaml").read_bytes()
    done = align(*recipe("sft", ctx.model, run, *sets, "--gradient_accumulation_steps", "2", "--resume",
                         "--packing", "true", "--max_steps", "4"))
    ctx.add("resume", "changed setting (packing false -> true) without --resume_changed",
            "refused, exit 2, 'packing: was False, now True' listed; config.yaml untouched",
            done.returncode == 2 and "packing: was False, now True" in done.stderr and "--resume_changed" in
            done.stderr and clean(done) and (run / "config.yaml").read_bytes() == config_before, done)
    done = align(*recipe("sft", ctx.model, run, *sets, "--gradient_accumulation_steps", "2", "--resume",
                         "--packing", "true", "--max_steps", "4", "--resume_changed"))
    history = (run / "config_history.yaml").read_text() if (run / "config_history.yaml").is_file() else ""
    ctx.add("resume", "changed setting with --resume_changed",
            "trains on; config_history.yaml records packing [false, true] at step 3; config.yaml kept",
            done.returncode == 0 and "step: 3" in history and "packing" in history and ar.run_is_sound(run, 4)
            and (run / "config.yaml").read_bytes() == config_before, done)


# -- data: read safely, before the model -------------------------------------------------------------
def data(ctx: Ctx) -> None:
    d = ctx.tmp / "data"
    d.mkdir(exist_ok=True)
    prefs = [json.loads(x) for x in DATA.read_text().splitlines()]
    good = {"prompt": "What is 2+2?", "completion": "4"}
    bad = write_rows(d / "mostly_bad.jsonl", [good] + [{"prompt": "q", "completion": ""}] * 8)
    out = ctx.tmp / "d-skip"
    done = align(*recipe("sft", ctx.model, out, "--on_bad_rows", "skip", "--max_steps", "1", data=bad))
    ctx.add("data", "on_bad_rows: skip with 8 of 9 rows bad", "stops before training: '8 of 9 rows are bad', the "
            "first reasons, exit 2, no final_metrics.json", done.returncode == 2 and "8 of 9 rows are bad" in
            done.stderr and f"{bad}:2" in done.stderr and clean(done) and not (out / "final_metrics.json").exists(),
            done)
    deep = write_rows(d / "deep.jsonl", [good, "[" * 100_000 + "]" * 100_000, good])
    done = align("data", "check", deep, "--recipe", "sft", "--model_name_or_path", ctx.model)
    ctx.add("data", "deep nesting ([[[[... 100k) in data check", f"{deep.name}:2 listed as nested deeper than 64; "
            "exit 1", done.returncode == 1 and f"{deep}:2" in done.stdout + done.stderr and "nested deeper" in
            done.stdout + done.stderr and clean(done), done)
    out = ctx.tmp / "d-deep"
    done = align(*recipe("sft", ctx.model, out, "--max_steps", "1", data=deep))
    ctx.add("data", "deep nesting in align sft", f"exit 2 naming {deep.name}:2, before the model (no run folder)",
            done.returncode == 2 and f"{deep}:2" in done.stderr and clean(done) and not out.exists(), done)
    csv = d / "ragged.csv"
    csv.write_text('prompt,chosen,rejected\n"What is 34+36?",70,68\n"What is 1+1?",2,3,extra\nq,"a, b",c\n')
    done = align("data", "check", csv, "--recipe", "dpo", "--model_name_or_path", ctx.model)
    ctx.add("data", "ragged CSV", f"{csv.name}:3 named: 4 fields; expected 3; exit 1",
            done.returncode == 1 and f"{csv}:3" in done.stdout and "4 fields; expected 3" in done.stdout
            and clean(done), done)
    big_json_array(ctx, d, prefs)
    for case, source in (("missing train file", ctx.tmp / "nowhere" / "train.jsonl"),
                         ("uncached dataset name", "someorg/not_cached_anywhere")):
        out = ctx.tmp / "d-missing"
        done = align(*recipe("sft", ctx.model, out, "--max_steps", "1", data=source))
        ctx.add("data", case, f"one line naming {source}, exit 2, before the model (no run folder)",
                one_line(done, source) and not out.exists(), done)
    done = align("advise", DATA, "--model_name_or_path", ctx.model, "--recipe", "sft")
    ctx.add("data", "advise on a preference file with --recipe sft", "refused in one line (no completion tokens), "
            "no rank or learning rate", one_line(done, DATA) and "learning rate" not in done.stdout.lower(), done)
    done = align("data", "check", SFT_DATA, "--model_name_or_path", ctx.model)
    ctx.add("data", "data check on SFT rows", "read as SFT rows: exit 0, no \"field 'chosen'\"",
            done.returncode == 0 and "chosen" not in done.stdout + done.stderr and clean(done), done)


def big_json_array(ctx: Ctx, d, prefs: list) -> None:
    """A JSON array checked in bounded memory: peak RSS against the same check of a 2-row array."""
    small, big = d / "small.json", d / "big.json"
    small.write_text(json.dumps(prefs[:2]))
    with open(big, "w") as f:
        f.write("[\n")
        for i in range(40_000):
            r = prefs[i % len(prefs)]
            f.write(("," if i else "") + json.dumps({**r, "prompt": f"{r['prompt']} #{i}"}, indent=1) + "\n")
        f.write("]\n")
    mb = big.stat().st_size / 2**20
    (done_s, rss_s, _), (done, rss, sec) = (measured(ctx, p) for p in (small, big))
    grew = (rss - rss_s) / 2**20
    ctx.add("data", f"big JSON array, {mb:.1f} MB, checked with a tokenizer: {sec:.0f} s, peak RSS +{grew:.0f} MB "
            f"({grew / mb:.1f}x the file) over a 2-row array", "exit 0; peak RSS growth at most 6x the file (the rows "
            "are held, their token ids not; the issue measured 38x)",
            done.returncode == 0 and done_s.returncode == 0 and grew <= 6 * mb, done)


# -- permissions: outputs as the umask says ----------------------------------------------------------
def permissions(ctx: Ctx, masks=(0o022, 0o027)) -> None:
    for umask in masks:
        out = ctx.tmp / f"umask{umask:03o}"
        done = align(*recipe("sft", ctx.model, out, "--max_steps", "2", "--save_steps", "1"), umask=umask)
        want = f"folders {0o777 & ~umask:o}, files {0o666 & ~umask:o}"
        ctx.add("permissions", f"umask {umask:03o}: run folder (adapter/, checkpoints/, every file)", want,
                done.returncode == 0 and (out / "checkpoints").is_dir() and modes_ok(out, umask), done)
        exp = ctx.tmp / f"export-umask{umask:03o}"
        done = align("export", "--adapter", out / "adapter", "--merge", exp, "--max_new_tokens", "2", umask=umask)
        ctx.add("permissions", f"umask {umask:03o}: align export --merge output", want,
                done.returncode == 0 and modes_ok(exp, umask), done)


# -- a newcomer's first hour -------------------------------------------------------------------------
def newcomer(ctx: Ctx) -> None:
    home = ctx.tmp / "newcomer"
    home.mkdir(exist_ok=True)
    shutil.copy(DATA, home / "my_pairs.jsonl")
    for flag in ("--model_name_or_path", "--model"):
        done = align("data", "check", "my_pairs.jsonl", flag, "smollm2", "--max_length", "256", cwd=home)
        ctx.add("newcomer", f"README: align data check my_pairs.jsonl {flag} smollm2 --max_length 256",
                "exit 0, no traceback, no hub access", done.returncode == 0 and clean(done), done)
    runs = ctx.tmp / "runs-folder"
    for name, src in (("demo/dpo", ctx.policy), ("rm", ctx.reward)):
        (runs / name).mkdir(parents=True)
        shutil.copy(src / "metrics.jsonl", runs / name / "metrics.jsonl")
    done = align("plot", runs)
    ctx.add("newcomer", "align plot on a folder of runs (runs/ holding demo/dpo and rm)", "exit 0, a metrics.png "
            "beside each run's metrics.jsonl", done.returncode == 0 and (runs / "demo/dpo/metrics.png").is_file()
            and (runs / "rm/metrics.png").is_file(), done)
    out = ctx.tmp / "n-sft"
    done = align(*recipe("sft", ctx.model, out, "--max_steps", "1", "--save_steps", "0"))
    hints = [x for x in (done.stdout + done.stderr).splitlines() if "faster" in x]
    ctx.add("newcomer", f"an SFT run's precision hint ({len(hints)} printed)", "names SFT, never claims DPO's "
            "speed-up for SFT", done.returncode == 0 and all("sft" in x.lower() for x in hints), done)
    for config in sorted((ROOT / "configs").glob("*_tiny.yaml")):
        # the command a config's own header runs it with (online_dpo_tiny.yaml is `align online-dpo`)
        name = re.search(r"align ([a-z-]+) --config", config.read_text()).group(1)
        done = align(name, "--config", config.relative_to(ROOT), "--model_name_or_path", ctx.model,
                     "--output_dir", ctx.tmp / f"chk-{name}", "--check_config")
        ctx.add("newcomer", f"{config.name} --check_config on the tiny model", "exit 0, nothing written",
                done.returncode == 0 and clean(done) and not (ctx.tmp / f"chk-{name}").exists(), done)
    done = align("demo", "--quick", "--output_dir", ctx.tmp / "demo")
    ctx.add("newcomer", "align demo --quick: progress for evaluation and sampling", "exit 0, tqdm bars on stderr, "
            "last line JSON", done.returncode == 0 and "it/s]" in done.stderr + done.stdout and clean(done), done)
