"""An adapter is verified before it is trusted: each damaged or foreign adapter is one line naming its file,
through a real `align dpo` run (init_adapter) and through `align serve --adapter`'s loader."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from align.cli import main
from align.core.adapter_files import BaseInfo
from align.core.adapter_verify import AdapterInvalid, header_linears, verify_adapter
from align.core.base import SharedBase
from align.core.errors import UserError
from align.core.lora import LoraSettings
from align.core.tiny import build_tokenizer, tiny_config
from align.serve.fs import FsGuard
from align.serve.server import _startup_adapters

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "prefs_tiny.jsonl"
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def saved_adapter(base_path: Path, out: Path, seed: int = 1) -> Path:
    """A rank-8 policy adapter on `base_path` with random nonzero A and B, as `SharedBase.save_adapter` writes it."""
    base = SharedBase.load(str(base_path))
    base.add_adapter("policy", LoraSettings(rank=8))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in base.adapter_parameters("policy").values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return base.save_adapter("policy", out)


def wider_model(path: Path) -> Path:
    """A tiny Llama like conftest's, but 96 wide instead of 64: another base."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = tiny_config("llama", len(tokenizer))
    config.hidden_size = 96
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def good(tiny_llama, tmp_path_factory) -> Path:
    return saved_adapter(tiny_llama, tmp_path_factory.mktemp("verify") / "good")


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Path:
    """An adapter trained on the wider base, without align_meta.json (a plain PEFT folder)."""
    root = tmp_path_factory.mktemp("foreign")
    adapter = saved_adapter(wider_model(root / "wide"), root / "adapter")
    (adapter / "align_meta.json").unlink()
    return adapter


@pytest.fixture(scope="module")
def twin_base_adapter(tiny_llama, tmp_path_factory) -> Path:
    """An adapter trained on a base of the same shapes but other weights: only its fingerprint tells."""
    from align.core.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("twin")
    return saved_adapter(build_tiny_model(root / "base", "llama", seed=7), root / "adapter")


def edit_tensors(folder: Path, change) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS))


def renamed(d):
    edit_tensors(d, lambda t: t.__setitem__(f"{Q0}x.lora_A.weight", t.pop(f"{Q0}.lora_A.weight")))


def missing(d):
    edit_tensors(d, lambda t: t.pop(f"{Q0}.lora_B.weight"))


def extra(d):
    edit_tensors(d, lambda t: t.__setitem__("base_model.model.model.layers.5.mlp.up_proj.lora_A.weight",
                                            torch.zeros(8, 64)))


def truncated(d):
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[:-100])


def cut_header(d):
    (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:40])


def config_text(text):
    return lambda d: (d / CONFIG).write_text(text)


def rank_16(d):
    config = json.loads((d / CONFIG).read_text())
    (d / CONFIG).write_text(json.dumps({**config, "r": 16}))


def nan_entry(d):
    edit_tensors(d, lambda t: t[f"{Q0}.lora_B.weight"].__setitem__((0, 0), float("nan")))


# (case, damage, the file the line names, words in it)
CASES = [
    ("renamed tensor", renamed, WEIGHTS, r"missing 1 tensor\(s\).*q_proj.lora_A.weight; 1 unexpected.*q_projx"),
    ("missing tensor", missing, WEIGHTS, r"missing 1 tensor\(s\).*layers.0.self_attn.q_proj.lora_B.weight"),
    ("extra tensor", extra, WEIGHTS, r"1 unexpected tensor\(s\).*layers.5.mlp.up_proj.lora_A.weight"),
    ("truncated weights", truncated, WEIGHTS, "do not fit the file"),
    ("cut header", cut_header, WEIGHTS, "safetensors header length .* does not fit the file"),
    ("non-JSON config", config_text("{not json"), CONFIG, "line 1: not valid JSON"),
    ("array config", config_text("[1, 2]"), CONFIG, "expected a JSON object, got list"),
    ("r 16 over rank-8 weights", rank_16, WEIGHTS, r"r=16|rank 8, but adapter_config.json says r=16"),
    ("a NaN weight", nan_entry, WEIGHTS, r"q_proj.lora_B.weight' holds 1 non-finite value\(s\)"),
]


def damaged(good: Path, tmp_path: Path, damage) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(good, folder)
    damage(folder)
    return folder


def dpo_cli(tiny_llama, tmp_path, adapter, capsys) -> str:
    """`align dpo` on the tiny config from `adapter`: must exit 2 with one line on stderr; that line."""
    code = main(["dpo", "--config", str(REPO / "configs" / "dpo_tiny.yaml"), "--model_name_or_path", str(tiny_llama),
                 "--train_file", str(DATA), "--output_dir", str(tmp_path / "run"), "--report_to", "none",
                 "--init_adapter", str(adapter)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1, err
    assert "\n" not in err[0]
    return err[0]


def serve_line(tiny_llama, tmp_path, adapter) -> str:
    """`align serve --adapter a=FOLDER`'s start-up check (copy, then verify against the base): the refusal."""
    with pytest.raises(UserError) as e:
        _startup_adapters({"a": str(adapter)}, None, BaseInfo.read(tiny_llama), None, tmp_path / "copies",
                          FsGuard(), 1 << 30)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_damaged_init_adapter_is_one_line_naming_the_file(case, good, tiny_llama, tmp_path, capsys):
    _, damage, fname, words = case
    folder = damaged(good, tmp_path, damage)
    line = dpo_cli(tiny_llama, tmp_path, folder, capsys)
    assert f"init_adapter: {folder / fname}" in line or f"{folder / fname}:" in line, line
    assert re.search(words, line), line


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_damaged_adapter_is_refused_by_serve(case, good, tiny_llama, tmp_path):
    _, damage, fname, words = case
    folder = damaged(good, tmp_path, damage)
    line = serve_line(tiny_llama, tmp_path, folder)
    assert line.startswith("--adapter a") and f"{folder / fname}" in line, line
    assert re.search(words, line), line


def test_adapter_of_a_wider_base_without_metadata_is_refused(foreign, tiny_llama, tmp_path, capsys):
    for line in (dpo_cli(tiny_llama, tmp_path, foreign, capsys), serve_line(tiny_llama, tmp_path, foreign)):
        assert f"{foreign / WEIGHTS}:" in line and "wrong shape" in line and "expected [8, 64]" in line, line


def test_adapter_of_a_same_shaped_base_is_refused_by_its_fingerprint(twin_base_adapter, tiny_llama, tmp_path,
                                                                     capsys):
    line = dpo_cli(tiny_llama, tmp_path, twin_base_adapter, capsys)
    assert f"{twin_base_adapter}: trained on another base" in line and "weights_sha256" in line, line
    # serve reads no weights of its base, so its fingerprint has no hash: the recorded base folder tells.
    line = serve_line(tiny_llama, tmp_path, twin_base_adapter)
    assert f"{twin_base_adapter}: trained on another base" in line and "holds different weights" in line, line


def test_good_adapter_passes_and_one_without_metadata_is_a_one_line_warning(good, tiny_llama, tmp_path):
    modules = header_linears(BaseInfo.read(tiny_llama).shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a whole adapter with its fingerprint: no warning
        files = verify_adapter(good, modules, BaseInfo.read(tiny_llama).fingerprint(), "the tiny base")
    assert len(files.shapes) == 2 * 7 * 2  # A and B on 7 linears in 2 layers
    bare = damaged(good, tmp_path, lambda d: (d / "align_meta.json").unlink())
    with pytest.warns(UserWarning) as record:
        verify_adapter(bare, modules, {"hidden_size": 64}, "the tiny base")
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert f"{bare}: no align_meta.json base_fingerprint; cannot check" in str(record[0].message)


def test_config_fields_are_checked(good, tiny_llama, tmp_path):
    modules = header_linears(BaseInfo.read(tiny_llama).shapes)
    for field, value, words in (("r", 0, "field 'r': expected a positive integer"),
                                ("lora_alpha", "x", "field 'lora_alpha': expected a positive number"),
                                ("target_modules", [], "field 'target_modules': expected")):
        folder = damaged(good, tmp_path / field, lambda d, f=field, v=value: (d / CONFIG).write_text(
            json.dumps({**json.loads((good / CONFIG).read_text()), f: v})))
        with pytest.raises(AdapterInvalid, match=f"{folder / CONFIG}: {words}"):
            verify_adapter(folder, modules, None, "the tiny base")


def test_moe_adapter_with_expert_parameters_passes(tiny_models, tmp_path):
    """target_parameters (fused experts) are PEFT tensors the linear-based check does not derive: allowed."""
    path = tiny_models["qwen3_moe"]
    base = SharedBase.load(str(path))
    base.add_adapter("p")
    adapter = base.save_adapter("p", tmp_path / "moe")
    assert json.loads((adapter / CONFIG).read_text())["target_parameters"]
    SharedBase.load(str(path)).check_adapter_base(adapter, "init_adapter")  # loaded model's linears
    info = BaseInfo.read(path)
    verify_adapter(adapter, header_linears(info.shapes), info.fingerprint(), "the MoE base")  # weight headers
