"""`align serve`'s file-system side, without a server: hostile adapter folders, the time-limited file
threads, the sweep of dead servers' private folders and the KV-cache sizing. Real files, FIFOs,
symlinks and processes throughout.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_serve import make_adapters

from align.core.adapter_files import BaseInfo
from align.serve.adapters import AdapterRefused, check_adapter, check_name, read_adapter, snapshot_adapter
from align.serve.fs import FsGuard, check_path_text


@pytest.fixture(scope="module")
def good(tiny_llama, tmp_path_factory):
    """One real rank-8 PEFT adapter on the tiny base (never modified: cases copy it)."""
    root = tmp_path_factory.mktemp("good")
    return make_adapters(tiny_llama, root, ["blue"])["blue"]


def variant(good: Path, root: Path, name: str) -> Path:
    out = root / name
    shutil.copytree(good, out)
    return out


def write_safetensors(path: Path, header: object, data: bytes = b"", length: int | None = None) -> None:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def edit_json(path: Path, **fields) -> None:
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


# Each case: (name, how to spoil a copy of the good adapter, expected status, words in the reason).
def _fifo_config(d):
    (d / "adapter_config.json").unlink()
    os.mkfifo(d / "adapter_config.json")


def _fifo_weights(d):
    (d / "adapter_model.safetensors").unlink()
    os.mkfifo(d / "adapter_model.safetensors")


def _device_config(d):
    (d / "adapter_config.json").unlink()
    (d / "adapter_config.json").symlink_to("/dev/zero")


def _escaping_file_link(d):
    secret = d.parent.parent / "outside-secret.json"
    secret.write_text(json.dumps(json.loads((d / "adapter_config.json").read_text())))
    (d / "adapter_config.json").unlink()
    (d / "adapter_config.json").symlink_to(secret)


def _escaping_weights_link(d):
    outside = d.parent.parent / f"outside-{d.name}.safetensors"
    shutil.move(d / "adapter_model.safetensors", outside)
    (d / "adapter_model.safetensors").symlink_to(outside)


def _wrong_shapes(d):
    from safetensors.torch import load_file, save_file

    t = load_file(d / "adapter_model.safetensors")
    t = {k: torch.zeros(v.shape[0], 999) if k.endswith("lora_A.weight") else v for k, v in t.items()}
    save_file(t, d / "adapter_model.safetensors")


HOSTILE_ADAPTERS = [
    ("missing weights", lambda d: (d / "adapter_model.safetensors").unlink(), 404, "adapter_model.safetensors"),
    ("missing config", lambda d: (d / "adapter_config.json").unlink(), 404, "not a PEFT adapter"),
    ("config not JSON", lambda d: (d / "adapter_config.json").write_text('{"r": 8,\n "oops"}'), 400, "line 2"),
    ("config a list", lambda d: (d / "adapter_config.json").write_text("[8]"), 400, "expected a JSON object"),
    ("config not UTF-8", lambda d: (d / "adapter_config.json").write_bytes(b'{"r": "\xff"}'), 400, "UTF-8"),
    ("config nested 100k deep", lambda d: (d / "adapter_config.json").write_text("[" * 100_000), 400, "JSON"),
    ("config 5000-digit integer", lambda d: edit_json(d / "adapter_config.json", r=None) or
     (d / "adapter_config.json").write_text('{"r": ' + "9" * 5000 + "}"), 400, "JSON"),
    ("config 2 MiB", lambda d: (d / "adapter_config.json").write_text(" " * (2 << 20) + "{}"), 413, "at most"),
    ("r = 0", lambda d: edit_json(d / "adapter_config.json", r=0), 400, "'r'"),
    ("r = true", lambda d: edit_json(d / "adapter_config.json", r=True), 400, "'r'"),
    ("r = '8'", lambda d: edit_json(d / "adapter_config.json", r="8"), 400, "'r'"),
    ("r disagrees with tensors", lambda d: edit_json(d / "adapter_config.json", r=4), 400, "has rank 8"),
    ("rank_pattern not ints", lambda d: edit_json(d / "adapter_config.json", rank_pattern={"q": "x"}), 400,
     "rank_pattern"),
    ("rank above the server's", lambda d: edit_json(d / "adapter_config.json", r=16, rank_pattern={"x": 16}),
     422, "exceeds"),
    ("safetensors empty", lambda d: (d / "adapter_model.safetensors").write_bytes(b""), 400, "too short"),
    ("header length past the file", lambda d: write_safetensors(d / "adapter_model.safetensors", {}, length=1 << 40),
     400, "does not fit"),
    ("header not JSON", lambda d: write_safetensors(d / "adapter_model.safetensors", b"\x00garbage"), 400, "JSON"),
    ("offsets past the data", lambda d: write_safetensors(d / "adapter_model.safetensors", {
        "base_model.model.x.lora_A.weight": {"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 2048]}}),
     400, "do not fit"),
    ("shape a string", lambda d: write_safetensors(d / "adapter_model.safetensors", {
        "x.lora_A.weight": {"dtype": "F32", "shape": "8x64", "data_offsets": [0, 0]}}), 400, "expected dtype"),
    ("no LoRA tensors", lambda d: write_safetensors(d / "adapter_model.safetensors", {
        "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), 400, "no LoRA tensors"),
    ("FIFO as adapter_config.json", _fifo_config, 400, "a FIFO"),
    ("FIFO as adapter_model.safetensors", _fifo_weights, 400, "a FIFO"),
    ("config a link to /dev/zero", _device_config, 403, "outside the allowed folder"),
    ("config a link out of the root", _escaping_file_link, 403, "outside the allowed folder"),
    ("weights a link out of the root", _escaping_weights_link, 403, "outside the allowed folder"),
    ("fingerprint of another base", lambda d: (d / "align_meta.json").write_text(
        json.dumps({"base_fingerprint": {"hidden_size": 4096}})), 422, "trained on another base"),
    ("fingerprint not an object", lambda d: (d / "align_meta.json").write_text(
        json.dumps({"base_fingerprint": [1]})), 400, "base_fingerprint"),
    ("meta a FIFO", lambda d: (d / "align_meta.json").unlink() or os.mkfifo(d / "align_meta.json"), 400, "a FIFO"),
    ("matrices of another base", _wrong_shapes, 422, "does not fit the served base"),
]


@pytest.mark.parametrize("case", HOSTILE_ADAPTERS, ids=[c[0] for c in HOSTILE_ADAPTERS])
def test_hostile_adapter_is_refused_with_its_reason(case, good, tiny_llama, tmp_path):
    name, spoil, status, words = case
    root = tmp_path / "allowed"
    root.mkdir()
    folder = variant(good, root, "a")
    spoil(folder)
    base = BaseInfo.read(tiny_llama)
    with pytest.raises(AdapterRefused) as e:
        # What the proxy runs for a load request: copy (confined) into a private folder, read the copy, check.
        # A FIFO opened for reading would wait forever here: its cases return only if refused before the open.
        info = snapshot_adapter(folder, root.resolve(), tmp_path / "copy", 1 << 30)
        check_adapter(info, base, max_rank=8)
    assert e.value.status == status, e.value.message
    assert words in e.value.message
    assert not (tmp_path / "copy").exists() or status != 200


def test_good_adapter_copy_is_what_vllm_gets(good, tiny_llama, tmp_path):
    root = tmp_path / "allowed"
    (root / "sub").mkdir(parents=True)
    folder = variant(good, root / "sub", "a")
    # A symlinked file whose target stays inside the root is fine; the copy is a regular file.
    shutil.move(folder / "adapter_model.safetensors", root / "weights.safetensors")
    (folder / "adapter_model.safetensors").symlink_to(root / "weights.safetensors")
    info = snapshot_adapter(folder, root.resolve(), tmp_path / "copy", 1 << 30)
    check_adapter(info, BaseInfo.read(tiny_llama), max_rank=8)
    assert info.rank == 8 and info.snapshot == tmp_path / "copy"
    copied = tmp_path / "copy" / "adapter_model.safetensors"
    assert not copied.is_symlink() and copied.read_bytes() == (root / "weights.safetensors").read_bytes()
    with pytest.raises(AdapterRefused, match="--max_adapter_mib") as e:
        snapshot_adapter(folder, root.resolve(), tmp_path / "copy2", 100)
    assert e.value.status == 413


def test_read_adapter_without_root_still_reads_regular_files_only(good, tmp_path):
    folder = variant(good, tmp_path, "a")
    _device_config(folder)
    with pytest.raises(AdapterRefused, match="a character device"):
        read_adapter(folder)


@pytest.mark.parametrize("text", ["a\0b", "a\u202eb", "\udc80", "x\n", "", "a" * 5000, 5, None])
def test_hostile_path_text_is_400(text):
    with pytest.raises(AdapterRefused) as e:
        check_path_text(text, "lora_path")
    assert e.value.status == 400


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "rеd", "red\0", "a b", "x" * 200, 7, "tiny\u200b"])
def test_hostile_names_are_400(name):
    with pytest.raises(AdapterRefused) as e:
        check_name(name, "lora_name")
    assert e.value.status == 400


# -- the time limit ------------------------------------------------------------------------------
def test_guard_refuses_a_stuck_read_and_the_loop_keeps_running(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    guard = FsGuard(timeout_s=0.5, slots=1)
    reading, returned = threading.Event(), threading.Event()

    def blocking_read():
        reading.set()
        with open(fifo) as f:  # blocks until a writer opens the FIFO
            text = f.read()
        returned.set()
        return text

    async def main():
        ticks_while_stuck = 0

        async def tick():
            nonlocal ticks_while_stuck
            while True:
                await asyncio.sleep(0.01)
                ticks_while_stuck += reading.is_set() and not returned.is_set()

        ticker = asyncio.create_task(tick())
        with pytest.raises(AdapterRefused) as e:
            await guard.arun("fifo", blocking_read)
        ticker.cancel()
        return e.value, returned.is_set(), ticks_while_stuck

    refused, read_had_returned, ticks = asyncio.run(main())
    # The time limit fired (the refusal says so) while the read was still stuck, and the event loop ran
    # other work meanwhile.
    assert refused.status == 422 and "did not answer within 0.5 s" in refused.message
    assert not read_had_returned and ticks >= 1
    # Its only slot is still held by the stuck thread: the next call is refused at once, not queued.
    with pytest.raises(AdapterRefused) as e:
        guard.run("again", lambda: 1)
    assert e.value.status == 429
    with open(fifo, "w") as w:  # release the stuck thread
        w.write("x")
    assert returned.wait(60), "the read never finished after the FIFO got a writer"
    # The slot is given back just after the read returns; a refusal now can only be that short gap.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            assert guard.run("after", lambda: 2) == 2
            break
        except AdapterRefused as e:
            assert e.status == 429, e.message
            time.sleep(0.05)
    else:
        raise AssertionError("the slot was never given back")
    assert threading.active_count() < 50


# -- private folders of dead servers -------------------------------------------------------------
def _identity(pid):
    import psutil

    return {"pid": pid, "started": psutil.Process(pid).create_time()}


def test_sweep_removes_folders_of_dead_servers_only(tmp_path):
    from align.serve.private import make_private, sweep_stale

    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ident_dead, ident_live = _identity(dead.pid), _identity(live.pid)
        dead.wait()
        folders = {}
        for label, server, vllm in (("dead", ident_dead, None), ("live-server", ident_live, None),
                                    ("live-vllm", ident_dead, ident_live)):
            f = tmp_path / f"align-serve-{server['pid']}-{label}"
            f.mkdir()
            (f / "owner.json").write_text(json.dumps({"server": server, "vllm": vllm}))
            (f / "tmp").mkdir()
            (f / "tmp" / "vllm.sock").write_text("")
            folders[label] = f
        # pid reused by another process: a different start time means the owner is gone.
        reused = tmp_path / f"align-serve-{live.pid}-reused"
        reused.mkdir()
        (reused / "owner.json").write_text(json.dumps({"server": {"pid": live.pid, "started": 1.0}, "vllm": None}))
        no_owner = tmp_path / f"align-serve-{dead.pid}-noowner"  # killed before it wrote owner.json
        no_owner.mkdir()
        target = tmp_path / "not-ours"
        target.mkdir()
        (tmp_path / f"align-serve-{dead.pid}-link").symlink_to(target)
        mine = make_private(str(tmp_path))
        logged = []
        removed = sweep_stale(str(tmp_path), log=logged.append)
        assert sorted(removed) == sorted([folders["dead"], reused, no_owner])
        assert len(logged) == 3 and all("left by a server that is gone" in m for m in logged)
        assert folders["live-server"].exists() and folders["live-vllm"].exists() and mine.exists()
        assert target.exists() and (tmp_path / f"align-serve-{dead.pid}-link").is_symlink()
    finally:
        live.kill()
        live.wait()


# -- KV cache sizing ------------------------------------------------------------------------------
def test_kv_cache_sized_from_model_length_and_sequences(tiny_llama, tmp_path):
    from align.core.errors import UserError
    from align.engines.kv_cache import MIB
    from align.serve.server import kv_settings

    base = BaseInfo.read(tiny_llama)
    cfg = base.config
    per_token = 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) \
        * (cfg["hidden_size"] // cfg["num_attention_heads"]) * 4
    small = kv_settings(base, "float32", None, 16, None)
    assert small["max_model_len"] == cfg["max_position_embeddings"] and small["max_num_seqs"] == 16
    assert small["kv_cache_memory_bytes"] == max(16 * MIB, int(512 * 16 * per_token * 1.25))
    big = kv_settings(base, "float32", 512, 400, None)
    assert big["kv_cache_memory_bytes"] == int(512 * 400 * per_token * 1.25) > 16 * MIB
    assert kv_settings(base, "bfloat16", 512, 400, None)["kv_cache_memory_bytes"] == \
        big["kv_cache_memory_bytes"] // 2
    assert kv_settings(base, "float32", None, 16, 0.5)["kv_cache_memory_bytes"] == 512 * MIB
    with pytest.raises(UserError, match="--kv_cache_gib"):
        kv_settings(base, "float32", None, 16, -1)
    broken = BaseInfo(base.path, {"max_position_embeddings": 64}, base.shapes, base.digest)
    with pytest.raises(UserError, match="cannot size the KV cache"):
        kv_settings(broken, "float32", None, 16, None)
