"""Outputs get the modes the umask gives a plain mkdir/open, not tempfile's private 0700/0600.

A server running as another account reads adapters, checkpoints and exports; under umask 022 it must
be able to, under umask 077 it must not.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
import torch

from align.core.adapter_files import scratch_dir
from align.core.atomic import atomic_dir, atomic_write_bytes, atomic_write_text
from align.recipes.sft import SFTConfig, SFTTrainer
from align.train.config_parser import load_config

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# umask -> (folder mode, file mode): what os.mkdir(0o777) and open() give under it.
MODES = {0o022: (0o755, 0o644), 0o077: (0o700, 0o600)}


@pytest.fixture(params=sorted(MODES), ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Every folder and file under `root` (itself included) -> its permission bits."""
    found = {".": stat.S_IMODE(root.stat().st_mode) & 0o777}
    for p in root.rglob("*"):
        found[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode) & 0o777
    return found


def assert_modes(root: Path, umask: int, executables: tuple[str, ...] = ()) -> None:
    folder, file = MODES[umask]
    want = {name: folder if name == "." or (root / name).is_dir() or name in executables else file
            for name in modes(root)}
    assert modes(root) == want


def test_atomic_dir_gives_the_umask_modes_to_the_folder_and_what_it_holds(umask, tmp_path):
    from safetensors.torch import save_file

    out = tmp_path / "adapter"
    for attempt in range(2):  # first a new folder, then one replacing it
        with atomic_dir(out) as tmp:
            assert stat.S_IMODE(tmp.stat().st_mode) & 0o777 == MODES[umask][0]  # before the rename too
            save_file({"w": torch.zeros(2)}, str(tmp / "adapter_model.safetensors"))
            fd, _ = tempfile.mkstemp(dir=tmp)  # 0600 whatever the umask
            os.close(fd)
            inner = Path(tempfile.mkdtemp(dir=tmp))  # 0700 whatever the umask
            (inner / "config.json").write_text("{}")
            os.chmod(inner / "config.json", 0o600)
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(tmp / "run.sh", 0o700)
            with atomic_dir(tmp / "nested") as sub:
                (sub / "x.json").write_text(str(attempt))
        assert_modes(out, umask, executables=("run.sh",))
        assert (out / "nested" / "x.json").read_text() == str(attempt)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary left beside it


def test_atomic_writes_give_the_umask_file_mode(umask, tmp_path):
    atomic_write_text(tmp_path / "LATEST", "step-000002")
    atomic_write_bytes(tmp_path / "sub" / "cache.safetensors", b"\0" * 8)
    atomic_write_text(tmp_path / "LATEST", "step-000004")  # replacing keeps the umask's mode
    assert_modes(tmp_path / "sub", umask)
    assert stat.S_IMODE((tmp_path / "LATEST").stat().st_mode) == MODES[umask][1]
    assert (tmp_path / "LATEST").read_text() == "step-000004"


def test_scratch_dir_for_servers_follows_the_umask_and_stays_private_in_ram(umask, tmp_path):
    shared = scratch_dir(tmp_path / "adapters")  # `engine_adapter_dir`: a server may run as another account
    ram = scratch_dir()  # /dev/shm is every account's: private whatever the umask
    try:
        assert stat.S_IMODE(shared.stat().st_mode) == MODES[umask][0]
        assert shared.parent == tmp_path / "adapters" and shared.name.startswith("align-rollout-")
        assert stat.S_IMODE(ram.stat().st_mode) == 0o700
    finally:
        ram.rmdir()


def test_sft_run_outputs_follow_the_umask(umask, tiny_llama, tmp_path):
    """Checkpoints, the final adapter and every file of a run: readable exactly as the umask says."""
    out = tmp_path / "run"
    config = load_config(SFTConfig, REPO / "configs" / "sft_tiny.yaml",
                         [f"model_name_or_path={tiny_llama}", f"output_dir={out}", "report_to=[none]",
                          f"train_file={REPO / 'tests' / 'data' / 'sft_tiny.jsonl'}", "num_train_epochs=1",
                          "save_steps=2"])
    trainer = SFTTrainer(config)
    trainer.setup()
    trainer.train()
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert checkpoints and (checkpoints[-1] / "adapters" / "policy" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert_modes(out, umask)
