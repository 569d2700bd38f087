"""The attack run's own cases, beyond the issue's: what a demanding user tries next (scripts/attack_round2.py)."""

from __future__ import annotations

import json
import shutil

from attack_round2_cases import damaged_adapter, init_run, permissions, resume_recipe
from attack_round2_kit import (
    DATA,
    SFT_DATA,
    Ctx,
    align,
    clean,
    edit_json,
    one_line,
    recipe,
    refused_untouched,
)


def export(ctx: Ctx) -> None:
    P, ad = ctx.policy, ctx.policy / "adapter"
    link = ctx.tmp / "link-into-run"
    link.symlink_to(P / "exported", target_is_directory=True)  # dangling: the export would create it in the run
    refused_untouched(ctx, "export", "--merge to a symlink pointing into the run", ["export", "--adapter", ad,
                      "--merge", link], P, link)
    blocker = ctx.tmp / "a-file"
    blocker.write_text("x")
    refused_untouched(ctx, "export", "--merge under a path whose parent is a file", ["export", "--adapter", ad,
                      "--merge", blocker / "out"], blocker, "which is a file")
    refused_untouched(ctx, "export", "--merge onto the run folder with --overwrite", ["export", "--adapter", ad,
                      "--merge", P, "--overwrite"], P, P.resolve())
    refused_untouched(ctx, "export", "--reward onto its reward_model/ with --overwrite", ["export", "--reward",
                      ctx.reward, ctx.reward / "reward_model", "--overwrite"], ctx.reward, "reward_model")
    done = align("export", "--adapter", ad / "adapter_model.safetensors", "--merge", ctx.tmp / "e-x")
    ctx.add("export", "--adapter names the weights file, not the folder", "one line naming it, exit 2",
            one_line(done, "adapter_model.safetensors") and not (ctx.tmp / "e-x").exists(), done)
    refused_untouched(ctx, "export", "--reward given a policy run (no reward_model/)", ["export", "--reward", P,
                      ctx.tmp / "e-y"], P, P)
    done = align("export", "--adapter", ad, "--merge", "/proc/align-export")
    ctx.add("export", "--merge under /proc (not writable, even by root)", "one line naming the output, exit 2",
            one_line(done, "/proc/align-export"), done)


def adapters(ctx: Ctx) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    def nan(f):
        t = load_file(str(f / "adapter_model.safetensors"))
        k = sorted(t)[0]
        t[k] = t[k].clone().fill_(float("nan"))
        save_file(t, str(f / "adapter_model.safetensors"))

    def half(f):
        t = load_file(str(f / "adapter_model.safetensors"))
        save_file({k: v.to(torch.float16) for k, v in t.items()}, str(f / "adapter_model.safetensors"))

    cases = {
        "NaN in one tensor": (nan, "non-finite"),
        "0-byte adapter_model.safetensors": (lambda f: (f / "adapter_model.safetensors").write_bytes(b""),
                                             "adapter_model.safetensors"),
        "lora_alpha: -8": (lambda f: edit_json(f / "adapter_config.json", lambda c: {**c, "lora_alpha": -8}),
                           "lora_alpha"),
        "target_modules names a module the base lacks": (lambda f: edit_json(
            f / "adapter_config.json", lambda c: {**c, "target_modules": ["foo_proj"]}), "unexpected"),
        "adapter_config.json is 'null'": (lambda f: (f / "adapter_config.json").write_text("null"), "JSON object"),
    }
    for case, (hurt, what) in cases.items():
        folder = damaged_adapter(ctx, hurt)
        done = init_run(ctx, folder)
        ctx.add("adapters", f"init_adapter: {case}", f"one line naming {folder.name} and '{what}', exit 2",
                one_line(done, folder, what), done)
    for case, hurt in (("adapter_config.json with unknown keys", lambda f: edit_json(
            f / "adapter_config.json", lambda c: {**c, "my_note": "v2", "future_option": {"x": 1}})),
                       ("float16 weights", half)):
        done = init_run(ctx, damaged_adapter(ctx, hurt))
        ctx.add("adapters", f"init_adapter: {case}", "trains (as PEFT reads it), exit 0, no traceback",
                done.returncode == 0 and clean(done), done)
    done = align("serve", "--base", ctx.model, "--adapter", f"p={ctx.tmp / 'no-adapter-here'}", "--port", "0")
    ctx.add("adapters", "serve: --adapter names a missing folder", "one line naming it, exit 2",
            one_line(done, "no-adapter-here"), done)


def resume(ctx: Ctx) -> None:
    run = ctx.copy(ctx.tmp / "res-one", "res-new")
    for case, extra, needle in (("a different seed", ["--seed", "7"], "seed: was 0, now 7"),
                                ("another base (model_name_or_path)", ["--model_name_or_path", ctx.tmp / "tiny2"],
                                 "model_name_or_path: was")):
        if case.startswith("another"):
            from align.core.tiny import build_tiny_model

            build_tiny_model(ctx.tmp / "tiny2", "llama", seed=1)
        done = align(*resume_recipe(ctx, run, "--resume", *extra))
        ctx.add("resume", f"--resume with {case}", f"refused, exit 2, '{needle}' listed", done.returncode == 2
                and needle in done.stderr and clean(done), done)
    edited = ctx.tmp / "edited.jsonl"
    shutil.copy(SFT_DATA, edited)
    fresh = ctx.tmp / "res-data"
    assert align(*resume_recipe(ctx, fresh, data=edited)).returncode == 0
    edited.write_text(edited.read_text().replace("Reply with the number only", "Answer"))
    done = align(*resume_recipe(ctx, fresh, "--resume", "--max_steps", "4", data=edited))
    ctx.add("resume", "--resume after the train_file was edited in place", "refused, exit 2, train_file listed",
            done.returncode == 2 and "train_file" in done.stderr and clean(done), done)
    empty = ctx.tmp / "res-empty"
    empty.mkdir()
    done = align(*resume_recipe(ctx, empty, "--resume"))  # by design: a kill before the first checkpoint
    ctx.add("resume", "--resume in a folder with no run", "starts fresh and says so ('no checkpoint in ...')",
            done.returncode == 0 and "no checkpoint in" in done.stdout + done.stderr and clean(done), done)
    done = align(*resume_recipe(ctx, run, "--resume", "step-000099"))
    ctx.add("resume", "--resume step-000099 (no such checkpoint)", "one line naming step-000099, exit 2",
            one_line(done, "step-000099"), done)
    done = align(*recipe("sft", ctx.model, ctx.copy(ctx.policy, "dpo-as-sft"), "--resume", "--max_steps", "3"))
    ctx.add("resume", "a DPO run resumed with align sft", "refused, exit 2, no traceback",
            done.returncode == 2 and clean(done), done)


def data(ctx: Ctx) -> None:
    d = ctx.tmp / "data-new"
    d.mkdir(exist_ok=True)
    text = DATA.read_text()
    lines = text.splitlines()
    hostile = {
        "a BOM before the first row": ("bom.jsonl", "\ufeff" + text, 0, None),
        "CRLF line ends": ("crlf.jsonl", text.replace("\n", "\r\n"), 0, None),
        "a NUL byte inside a line": ("nul.jsonl", "\n".join([lines[0], lines[1][:-2] + "\x00\"}", *lines[2:]]), 1,
                                     ":2"),
        "invalid UTF-8 in a line": ("utf8.jsonl", None, 1, ":2"),
        "a line that is a JSON array": ("array.jsonl", "\n".join([lines[0], "[1, 2]", *lines[2:]]), 1, ":2"),
        "a row with a duplicated key": ("dup.jsonl", "\n".join([lines[0], lines[1][:-1] + ', "chosen": "x"}',
                                                                 *lines[2:]]), 1, ":2"),
    }
    for case, (name, content, rc, where) in hostile.items():
        path = d / name
        if content is None:
            path.write_bytes(lines[0].encode() + b"\n" + lines[1].encode()[:-3] + b"\xff\xfe\"}\n"
                             + "\n".join(lines[2:]).encode() + b"\n")
        else:
            path.write_text(content, encoding="utf-8")
        done = align("data", "check", path, "--recipe", "dpo", "--model_name_or_path", ctx.model)
        out = done.stdout + done.stderr
        want = "read, exit 0" if rc == 0 else f"{name}{where} named, exit 1"
        ctx.add("data", case, want, done.returncode == rc and clean(done) and (where is None or f"{path}{where}" in
                out), done)
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(x) for x in lines]
    pq.write_table(pa.table({"prompt": [r["prompt"] for r in rows], "chosen": list(range(len(rows))),
                             "rejected": [r["rejected"] for r in rows]}), d / "ints.parquet")
    done = align("data", "check", d / "ints.parquet", "--recipe", "dpo", "--model_name_or_path", ctx.model)
    ctx.add("data", "parquet whose 'chosen' column holds integers", "every row listed as field 'chosen', exit 1",
            done.returncode == 1 and "'chosen'" in done.stdout and clean(done), done)
    (d / "empty.jsonl").write_bytes(b"")
    (d / "no-files").mkdir(exist_ok=True)
    (d / "notes.txt").write_text("prompt\tchosen\n")
    for case, source in (("a 0-byte train_file", d / "empty.jsonl"), ("an empty folder as train_file",
                                                                      d / "no-files"),
                         ("a .txt train_file", d / "notes.txt")):
        out = ctx.tmp / "d-new"
        done = align(*recipe("sft", ctx.model, out, "--max_steps", "1", data=source))
        ctx.add("data", f"align sft on {case}", f"one line naming {source.name}, exit 2, no run folder",
                one_line(done, source.name) and not out.exists(), done)


def newcomer(ctx: Ctx) -> None:
    c = ctx.tmp / "cfg"
    c.mkdir(exist_ok=True)
    (c / "list.yaml").write_text("- learning_rate: 1e-4\n- beta: 0.1\n")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
    (c / "bomb.yaml").write_text(bomb + "lora_target_modules: *i\n")
    (c / "mbomb.yaml").write_text("a: &a {x: 1, y: 1, z: 1, w: 1}\n" + "".join(
        f"{n}: &{n} {{{', '.join(f'k{i}: *{p}' for i in range(9))}}}\n" for p, n in zip("abcdefgh", "bcdefghi")))
    (c / "dup.yaml").write_text("learning_rate: 1.0e-3\nbeta: 0.1\nlearning_rate: 1.0e-4\n")
    blocker = ctx.tmp / "blocker"
    blocker.write_text("x")
    for case, args, needle in (
            ("config YAML that is a list", ["--config", c / "list.yaml"], "list.yaml"),
            ("YAML anchor bomb under a list field (9^9 items)", ["--config", c / "bomb.yaml"], "bomb.yaml"),
            ("YAML anchor bomb of mappings", ["--config", c / "mbomb.yaml"], "mbomb.yaml"),
            ("config YAML with a key given twice", ["--config", c / "dup.yaml"], "learning_rate"),
            ("missing --config file", ["--config", c / "nowhere.yaml"], "nowhere.yaml"),
            ("--output_dir is a file", ["--config", "configs/dpo_tiny.yaml", "--output_dir", blocker], "output_dir"),
            ("--output_dir under /proc", ["--config", "configs/dpo_tiny.yaml", "--output_dir", "/proc/align-run"],
             "output_dir")):
        done = align("dpo", *args, "--model_name_or_path", ctx.model, "--train_file", DATA, "--report_to", "none",
                     "--check_config")
        ctx.add("newcomer", case, f"one line naming {needle}, exit 2", one_line(done, needle), done)
    done = align()
    ctx.add("newcomer", "`align` with no command", "usage and the command list, exit 2, no traceback",
            done.returncode == 2 and "commands:" in done.stdout + done.stderr and clean(done), done)
    done = align("plot", c)
    ctx.add("newcomer", "align plot on a folder without runs", "one line saying no metrics.jsonl, exit 2",
            one_line(done, "no metrics.jsonl"), done)
    (c / "empty-run").mkdir(exist_ok=True)
    (c / "empty-run" / "metrics.jsonl").write_text("")
    done = align("plot", c / "empty-run")
    ctx.add("newcomer", "align plot on a run whose metrics.jsonl is empty", "one line 'no metrics to plot', exit 2",
            one_line(done, "no metrics to plot"), done)


CASES = {"export": export, "adapters": adapters, "resume": resume, "data": data,
         "permissions": lambda ctx: permissions(ctx, masks=(0o077,)), "newcomer": newcomer}
