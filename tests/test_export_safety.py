"""`align export` never touches what it exports: an output that overlaps the source, is a file or
already holds files is refused, and a damaged source is one line naming the file, all before any
model loads, with every source file byte-identical afterwards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from align.cli import main as align_main


def folder_hash(folder: Path) -> str:
    """Every file's relative path and bytes (and every link's target) under `folder`."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_symlink():
            h.update(b"->" + str(p.readlink()).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def refused(argv: list[str], capsys, *needles: str) -> str:
    """Run `align` with argv; assert exit 2 and one `error:` line holding every needle."""
    capsys.readouterr()
    assert align_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def made(tiny_llama, tmp_path_factory):
    """A policy run folder (adapter/ beside metrics.jsonl) and a reward run folder (reward_model/ beside
    checkpoints/ and metrics.jsonl), built once and copied by each test that damages them."""
    from align.core.base import SharedBase
    from align.core.lora import LoraSettings
    from reward.model import RewardModel

    root = tmp_path_factory.mktemp("sources")
    sb = SharedBase.load(str(tiny_llama))
    torch.manual_seed(0)
    sb.add_adapter("policy", LoraSettings(rank=4))
    policy = root / "policy"
    sb.save_adapter("policy", policy / "adapter")
    (policy / "metrics.jsonl").write_text('{"step": 1}\n')
    rm = RewardModel.create(SharedBase.load(str(tiny_llama)), seed=0)
    reward = root / "reward"
    rm.save(reward / "reward_model")
    (reward / "checkpoints" / "step-1").mkdir(parents=True)
    (reward / "checkpoints" / "step-1" / "state.json").write_text("{}")
    (reward / "metrics.jsonl").write_text('{"step": 1}\n')
    return policy, reward


@pytest.fixture
def sources(made, tmp_path):
    import shutil

    policy, reward = (Path(shutil.copytree(p, tmp_path / p.name, symlinks=True)) for p in made)
    return policy, reward


# -- the output overlaps the source --------------------------------------------------------------------
@pytest.mark.parametrize("where", ["adapter", "adapter/merged", "run", "run/merged", "parent", "link"])
def test_merge_output_overlapping_the_adapter_is_refused(sources, tmp_path, capsys, where):
    policy, _ = sources
    adapter = policy / "adapter"
    (tmp_path / "link").symlink_to(adapter, target_is_directory=True)
    out = {"adapter": adapter, "adapter/merged": adapter / "merged", "run": policy, "run/merged": policy / "merged",
           "parent": tmp_path, "link": tmp_path / "link"}[where]
    source = policy.resolve() if where == "run/merged" else adapter.resolve()  # the folder the message names
    before = folder_hash(policy)
    refused(["export", "--adapter", str(adapter), "--merge", str(out)], capsys, out, source)
    assert folder_hash(policy) == before
    assert not (adapter / "merged").exists() and not (policy / "merged").exists()


@pytest.mark.parametrize("given, where", [("run", "run"), ("run", "reward_model"), ("reward_model", "run"),
                                          ("reward_model", "reward_model/out"), ("run", "run/exported")])
def test_reward_output_overlapping_the_run_is_refused(sources, capsys, given, where):
    _, reward = sources
    model = reward / "reward_model"
    paths = {"run": reward, "reward_model": model, "reward_model/out": model / "out", "run/exported": reward / "exported"}
    before = folder_hash(reward)
    refused(["export", "--reward", str(paths[given]), str(paths[where])], capsys, paths[where])
    assert folder_hash(reward) == before
    assert sorted(p.name for p in reward.iterdir()) == ["checkpoints", "metrics.jsonl", "reward_model"]


@pytest.mark.parametrize("flag", ["--merge", "--reward"])
def test_the_base_is_never_an_output_even_with_overwrite(sources, tiny_llama, capsys, flag):
    policy, reward = sources
    before = folder_hash(tiny_llama)
    source = ["--adapter", str(policy / "adapter"), "--merge"] if flag == "--merge" else ["--reward", str(reward)]
    refused(["export", *source, str(tiny_llama), "--overwrite"], capsys, tiny_llama, "base model folder")
    assert folder_hash(tiny_llama) == before


# -- the output already exists -------------------------------------------------------------------------
def test_an_output_that_is_a_file_is_refused(sources, tmp_path, capsys):
    policy, reward = sources
    out = tmp_path / "out.txt"
    out.write_text("keep me")
    refused(["export", "--adapter", str(policy / "adapter"), "--merge", str(out)], capsys, out, "is a file")
    refused(["export", "--reward", str(reward), str(out)], capsys, out, "is a file")
    assert out.read_text() == "keep me" and not list(tmp_path.glob(".out.txt*"))
    refused(["export", "--reward", str(reward), str(out / "inside")], capsys, out, "which is a file")


@pytest.mark.parametrize("flag", ["--merge", "--reward"])
def test_an_output_where_nothing_can_be_made_is_refused_before_loading(sources, capsys, flag):
    """/proc takes no new folder, even from root: one line before any model loads, not a traceback after the merge."""
    policy, reward = sources
    source = ["--adapter", str(policy / "adapter"), "--merge"] if flag == "--merge" else ["--reward", str(reward)]
    refused(["export", *source, "/proc/align-export"], capsys, "output: cannot write /proc/align-export",
            "/proc does not take new files or folders")


def test_a_non_empty_output_needs_overwrite(sources, tmp_path, capsys):
    policy, reward = sources
    out = tmp_path / "exported"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = folder_hash(out)
    refused(["export", "--adapter", str(policy / "adapter"), "--merge", str(out)], capsys, out, "--overwrite",
            "notes.txt")
    refused(["export", "--reward", str(reward), str(out)], capsys, out, "--overwrite")
    assert folder_hash(out) == before

    sources_before = folder_hash(policy)
    assert align_main(["export", "--adapter", str(policy / "adapter"), "--merge", str(out), "--overwrite",
                       "--max-new-tokens", "2"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()
    assert folder_hash(policy) == sources_before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or old copy left behind


def test_an_empty_output_folder_is_used_without_overwrite(sources, tmp_path, capsys):
    policy, _ = sources
    out = tmp_path / "empty"
    out.mkdir()
    assert align_main(["export", "--adapter", str(policy / "adapter"), "--merge", str(out),
                       "--max-new-tokens", "2"]) == 0
    assert (out / "model.safetensors").is_file()


# -- damaged sources -----------------------------------------------------------------------------------
def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {
    "reward_meta.json: not JSON": ("reward_model/reward_meta.json", lambda p: p.write_text("{not json"),
                                   "not valid JSON"),
    "reward_meta.json: an array": ("reward_model/reward_meta.json", lambda p: p.write_text("[1, 2]"),
                                   "expected a JSON object, got list"),
    "reward_meta.json: bad field": ("reward_model/reward_meta.json",
                                    lambda p: p.write_text(json.dumps({"kind": "reward_model", "max_length": "long"})),
                                    "max_length"),
    "head truncated": ("reward_model/head.safetensors", truncate, "head.safetensors"),
    "head header cut": ("reward_model/head.safetensors", lambda p: truncate(p, 0.02), "head.safetensors"),
    "reward adapter truncated": ("reward_model/adapter_model.safetensors", truncate, "do not fit the file"),
    "reward adapter_config.json": ("reward_model/adapter_config.json", lambda p: p.write_text("[]"),
                                   "expected a JSON object"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_reward_folder_is_one_line(sources, tmp_path, capsys, case):
    _, reward = sources
    name, damage, what = DAMAGE[case]
    damage(reward / name)
    before = folder_hash(reward)
    refused(["export", "--reward", str(reward), str(tmp_path / "out")], capsys, reward / name, what)
    assert folder_hash(reward) == before and not (tmp_path / "out").exists()


def test_a_head_of_the_wrong_shape_is_one_line(sources, tmp_path, capsys):
    from safetensors.torch import save_file

    _, reward = sources
    head = reward / "reward_model" / "head.safetensors"
    save_file({"weight": torch.zeros(1, 3)}, str(head))
    refused(["export", "--reward", str(reward), str(tmp_path / "out")], capsys, head, "weight")


@pytest.mark.parametrize("case", ["truncated", "header cut", "config not JSON", "config an array", "config rank"])
def test_a_damaged_adapter_is_one_line(sources, tmp_path, capsys, case):
    policy, _ = sources
    adapter = policy / "adapter"
    weights, config = adapter / "adapter_model.safetensors", adapter / "adapter_config.json"
    name, damage, what = {
        "truncated": (weights, truncate, "do not fit the file"),
        "header cut": (weights, lambda p: truncate(p, 0.01), "does not fit the file"),
        "config not JSON": (config, lambda p: p.write_text("{"), "not valid JSON"),
        "config an array": (config, lambda p: p.write_text("[]"), "expected a JSON object, got list"),
        "config rank": (config, lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "r": "four"})),
                        "field 'r'"),
    }[case]
    damage(name)
    before = folder_hash(policy)
    refused(["export", "--adapter", str(adapter), "--merge", str(tmp_path / "out")], capsys, name, what)
    assert folder_hash(policy) == before and not (tmp_path / "out").exists()
