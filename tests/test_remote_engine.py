"""GRPO sampling from a real `align serve` subprocess on 127.0.0.1, which is killed and restarted mid-run."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from servers import kill_tree, start_align_serve, wait_ready

from align.engines import trainer_logprobs
from align.recipes.ppo.config import PPOConfig
from align.recipes.ppo.trainer import PPOTrainer
from align.train.config_parser import load_config

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
KEY = "remote-test-key"
TOL = 1e-4  # float32: engines match the trainer within ~1e-6
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [17]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m align.serve` on a fixed port, started (and restarted) as a real subprocess."""

    def __init__(self, base: Path, adapter_dir: Path, port: int, log: Path):
        self.base, self.adapter_dir, self.port, self.log = base, adapter_dir, port, log
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        self.proc = start_align_serve(["--base", str(self.base), "--adapter_dir", str(self.adapter_dir), "--port",
                                       str(self.port), "--dtype", "float32", "--", "--enforce-eager"],
                                      self.log, api_key=KEY, append=True)

    def wait_ready(self, timeout: float = 300) -> None:
        wait_ready(self.proc, self.log, timeout)

    def kill(self) -> None:
        """SIGKILL the server and its vLLM child: no clean shutdown, as in a crash."""
        if self.proc is not None:
            kill_tree(self.proc)


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    """One server for the module (a vLLM start is most of these tests' time); the restart test goes last."""
    root = tmp_path_factory.mktemp("remote")
    adapter_dir = root / "adapters"
    adapter_dir.mkdir()
    srv = Server(Path(tiny_llama), adapter_dir, free_port(), root / "server.log")
    srv.start()
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.kill()


def perturb(base, seed: int) -> None:
    """Random non-zero B, so the adapter differs from the base (a fresh one has B = 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in base.adapter_parameters("policy").items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def test_remote_engine_syncs_adapter_and_matches_trainer(server, tiny_llama):
    """Each sync's probe catches a stale adapter; samples of adapter and base requests, mixed in one
    batch, carry the trainer's log-probs (float32: within 1e-4)."""
    from align.core.base import SharedBase
    from align.core.lora import LoraSettings
    from align.engines import AdapterSyncError, make_engine, trainer_logprobs, verify_adapter

    base = SharedBase.load(str(tiny_llama))
    base.add_adapter("policy", LoraSettings(rank=4, alpha=32))
    perturb(base, seed=0)
    engine = make_engine("remote", str(tiny_llama), base, url=server.url, api_key=KEY,
                         adapter_dir=str(server.adapter_dir))
    try:
        stats = engine.sync(base, "policy")
        assert 32768 <= stats.bytes <= 32768 + 16384  # the adapter files only, not the model
        perturb(base, seed=1)
        with pytest.raises(AdapterSyncError):
            verify_adapter(engine, base, "policy", *engine.probe, tol=TOL)
        engine.sync(base, "policy")  # a fresh adapter name: the server must now serve the new weights
        adapters = ["policy", None, "policy", None]
        out = engine.generate(PROMPTS, n=2, max_new_tokens=8, temperature=0.7, seed=0, adapter=adapters)
        for prompt, samples, name in zip(PROMPTS, out, adapters, strict=True):
            assert len(samples) == 2
            for s in samples:
                diff = max(abs(a - b) for a, b in zip(s.logprobs, trainer_logprobs(base, prompt, s.completion_ids,
                                                                                  name), strict=True))
                assert diff <= TOL, (name, diff)
    finally:
        engine.close()


class RestartingTrainer(PPOTrainer):
    """Kills the server after step 1 and starts it again on the same port, without waiting for it."""

    server: Server

    def ppo_step(self, step: int) -> dict:
        if step == 2:
            self.server.kill()
            self.server.start()  # the engine itself must wait for it, re-send the adapter and re-verify
        return super().ppo_step(step)


def test_remote_engine_sampling_knobs(server, tiny_llama):
    """align serve forwards TRL's knobs to vLLM (sent as completions-request fields)."""
    from test_sampling_knobs import check_knobs

    from align.core.base import SharedBase
    from align.core.lora import LoraSettings
    from align.engines import make_engine

    base = SharedBase.load(str(tiny_llama))
    base.add_adapter("policy", LoraSettings(rank=4, alpha=32))
    perturb(base, seed=0)
    engine = make_engine("remote", str(tiny_llama), base, url=server.url, api_key=KEY,
                         adapter_dir=str(server.adapter_dir))
    try:
        engine.sync(base, "policy")
        check_knobs(engine, base, lambda token: {"logit_bias": {str(token): -100.0}})
    finally:
        engine.close()


def test_two_servers_share_the_prompts_and_one_restarts(server, tiny_llama, tmp_path):
    """Prompts are split over two real servers; when the second is killed and restarted, only its shard
    waits for it, has the adapter re-sent and probed, and is redrawn with the same seeds."""
    from align.core.base import SharedBase
    from align.core.lora import LoraSettings
    from align.engines import make_engine

    base = SharedBase.load(str(tiny_llama))
    base.add_adapter("policy", LoraSettings(rank=4, alpha=32))
    perturb(base, seed=0)
    other = Server(server.base, server.adapter_dir, free_port(), tmp_path / "second.log")
    other.start()
    engines = []
    try:
        other.wait_ready()
        pair = make_engine("remote", str(tiny_llama), base, url=[server.url, other.url], api_key=KEY,
                           adapter_dir=str(server.adapter_dir))
        single = make_engine("remote", str(tiny_llama), base, url=server.url, api_key=KEY,
                             adapter_dir=str(server.adapter_dir))
        engines += [pair, single]
        stats = pair.sync(base, "policy")
        assert stats.max_abs_diff <= TOL and stats.bytes >= 2 * 32768  # each server got the adapter
        single.sync(base, "policy")

        def draw(engine):
            out = engine.generate(PROMPTS, n=2, max_new_tokens=6, temperature=0.7, seed=3)
            return [[s.completion_ids for s in samples] for samples in out], out

        before, _ = draw(pair)
        assert [s.prompts_served for s in pair.servers] == [2, 2]
        assert draw(single)[0] == before  # the split does not change what a seed draws
        other.kill()
        other.start()  # not waited for: the engine's shard for it must wait, re-send and re-probe
        after, out = draw(pair)
        assert other.starts == 2 and [s.recoveries for s in pair.servers] == [0, 1]
        assert [s.prompts_served for s in pair.servers] == [4, 4]
        assert after == before
        for prompt, samples in zip(PROMPTS, out, strict=True):
            for s in samples:
                want = trainer_logprobs(base, prompt, s.completion_ids)
                assert max(abs(a - b) for a, b in zip(s.logprobs, want, strict=True)) <= TOL
        perturb(base, seed=1)
        assert pair.sync(base, "policy").max_abs_diff <= TOL  # the restarted server takes the next sync too
        restarted = pair.servers[1]
        assert restarted._loras["policy"][0] in {m["id"] for m in restarted._request("GET", "/v1/models")["data"]}
    finally:
        for engine in engines:
            engine.close()
        other.kill()


def test_grpo_samples_from_align_serve_and_survives_a_restart(tiny_llama, tmp_path, server, monkeypatch):
    from align.core.base import SharedBase
    from align.engines import RemoteEngine

    with pytest.raises(RuntimeError, match="HTTP 401"):  # the server enforces its key; the engine sends it
        RemoteEngine(str(tiny_llama), SharedBase.load(str(tiny_llama)), url=server.url, api_key="wrong")
    monkeypatch.setenv("ALIGN_API_KEY", KEY)
    cfg = load_config(PPOConfig, CONFIGS / "ppo_tiny.yaml", [
        f"model_name_or_path={tiny_llama}", f"output_dir={tmp_path / 'run'}", "algorithm=grpo", "max_steps=3",
        "save_steps=0", "num_generations=4", "reward_funcs=[length_penalty]", "engine=remote", f"vllm_server_base_url={server.url}", f"engine_adapter_dir={server.adapter_dir}"])
    trainer = RestartingTrainer(cfg)
    trainer.server = server
    trainer.train()
    engine = trainer.engine
    try:
        assert server.starts == 2
        assert engine.recoveries >= 1  # the adapter was re-sent to the restarted server
        steps = [json.loads(line) for line in (trainer.out / "metrics.jsonl").read_text().splitlines()]
        steps = [s for s in steps if "reward" in s]
        assert [s["step"] for s in steps] == [1, 2, 3]
        for s in steps:
            # Rollouts came from the trainer's current policy: the server's sampling log-probs equal the
            # trainer's recomputation, and each sync's probe passed (float32 tolerance).
            assert s["logprob/mismatch_max"] < 1e-3, s
            assert s["sync/max_abs_diff"] <= 1e-4, s
        assert steps[-1]["kl"] != 0.0  # the policy moved: the probe compared a trained adapter
        # After the restart the server serves our current adapter under a fresh name.
        only = engine.servers[0]
        served = only._request("GET", "/v1/models")["data"]
        assert only._loras["policy"][0] in {m["id"] for m in served}
    finally:
        trainer.close()


def test_remote_engine_config_is_checked(tmp_path):
    with pytest.raises(Exception, match="vllm_server_base_url: rollouts from servers need their URLs"):
        load_config(PPOConfig, CONFIGS / "ppo_tiny.yaml", ["engine=remote"])
    with pytest.raises(Exception, match="vllm_server_base_url: only used with use_vllm: true"):
        load_config(PPOConfig, CONFIGS / "ppo_tiny.yaml", ["vllm_server_base_url=http://127.0.0.1:1"])
    with pytest.raises(Exception, match="vllm_server_base_url: .* names a server twice"):
        load_config(PPOConfig, CONFIGS / "ppo_tiny.yaml", ["engine=remote", "vllm_server_base_url=[http://a:1, http://a:1]"])
    # TRL's switches choose the engine; a list of servers reaches the engine as a list
    urls = ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    cfg = load_config(PPOConfig, CONFIGS / "ppo_tiny.yaml", ["use_vllm=true", "vllm_mode=server",
                                                             f"vllm_server_base_url=[{', '.join(urls)}]"])
    assert (cfg.rollout_engine, cfg.rollout_engine_options()["url"]) == ("remote", urls)
    assert load_config(PPOConfig, CONFIGS / "ppo_tiny.yaml", ["use_vllm=true"]).rollout_engine == "vllm"
    assert load_config(PPOConfig, CONFIGS / "ppo_tiny.yaml", ["use_vllm=false", "engine=vllm"]).rollout_engine == "hf"
    with pytest.raises(Exception, match="vllm_enable_sleep_mode: .*CUDA"):
        load_config(PPOConfig, CONFIGS / "ppo_tiny.yaml", ["engine=vllm", "vllm_enable_sleep_mode=true"])
    with pytest.raises(Exception, match="load_in_4bit: a remote engine"):
        load_config(PPOConfig, CONFIGS / "ppo_tiny.yaml", ["engine=remote", "vllm_server_base_url=http://127.0.0.1:1",
                                                           "load_in_4bit=true"])
    assert load_config(PPOConfig, CONFIGS / "ppo_tiny.yaml", ["engine=auto", "load_in_4bit=true"]).rollout_engine == "hf"
    cfg = load_config(PPOConfig, CONFIGS / "ppo_tiny.yaml", ["engine=vllm", "device=cuda"])
    assert cfg.rollout_engine_options()["gpu_memory_utilization"] == 0.3
    cfg = load_config(PPOConfig, CONFIGS / "ppo_tiny.yaml", ["engine=vllm"])
    assert "gpu_memory_utilization" not in cfg.rollout_engine_options()  # CPU: vLLM-CPU sizes its cache itself
