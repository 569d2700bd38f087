"""`RemoteEngine`: rollouts from one or several running vLLM servers (or `align serve`s), one client each.

Each `generate` cuts its prompts into contiguous shards, one per server, sends them concurrently and
returns the completions in prompt order; seeds are those of a single engine (prompt i's children get
seed + i*n ..), so the servers' split does not change what a seeded rollout draws. `sync` sends the
adapter to every server and probes each. A server that restarts is recovered on its own
(align/engines/remote_server.py: wait, re-send every adapter, re-probe, retry its shard once) while
the others' shards go on (docs/design.md, "Remote rollouts and server restarts").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from align.engines.protocol import AdapterArg, Sample, SyncStats, check_sampling, per_prompt_adapters
from align.engines.remote_server import (
    COMPLETION_SAMPLING_FIELDS,
    RemoteServer,
    ServerUnavailable,
    UnknownModel,
    completion_knobs,
)

__all__ = ["COMPLETION_SAMPLING_FIELDS", "RemoteEngine", "RemoteServer", "ServerUnavailable", "UnknownModel",
           "shard_bounds"]


def shard_bounds(count: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges cutting `count` items into `parts` shards, sizes differing by at most 1."""
    size, extra = divmod(count, parts)
    bounds, start = [], 0
    for k in range(parts):
        stop = start + size + (k < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def server_urls(url: str | Sequence[str]) -> list[str]:
    """`url` (one base URL or several) as a list; a one-line ValueError when empty or repeated."""
    urls = [url] if isinstance(url, str) else list(url)
    if not urls:
        raise ValueError("url: expected a server's base URL or a non-empty list of them")
    stripped = [u.rstrip("/") if isinstance(u, str) else u for u in urls]
    repeated = sorted({u for u in stripped if stripped.count(u) > 1})
    if repeated:
        raise ValueError(f"url: each server once; {repeated[0]!r} is listed {stripped.count(repeated[0])} times")
    return urls


class RemoteEngine:
    """`RolloutEngine` over running vLLM OpenAI-compatible servers: `url` is one base URL or a list of them.

    Every server must serve the same base model and read `adapter_dir` (see RemoteServer for the
    server's flags). The other options go to each server's client. `logprobs` (the sync probe's call)
    asks the first server; `sync` probes every server itself.
    """

    def __init__(self, model_path: str, base, dtype: str = "float32",
                 url: str | Sequence[str] = "http://127.0.0.1:8000", **options):
        lock = threading.Lock()  # recoveries run the trainer's model for the probe: one at a time
        self.servers = [RemoteServer(model_path, base, dtype, url=u, recover_lock=lock, **options)
                        for u in server_urls(url)]
        first = self.servers[0]
        self.tokenizer, self.probe, self.verify_tol = first.tokenizer, first.probe, first.verify_tol
        self.sync_mode = "lora"

    @property
    def url(self) -> str | list[str]:
        urls = [s.url for s in self.servers]
        return urls[0] if len(urls) == 1 else urls

    @property
    def recoveries(self) -> int:
        """Times a restarted server was re-sent its adapters, over all servers."""
        return sum(s.recoveries for s in self.servers)

    def sync(self, base, adapter: str = "policy") -> SyncStats:
        """Send `adapter` to every server and probe each: bytes summed, max_abs_diff the worst server's."""
        if adapter is None:
            raise ValueError("a remote engine receives adapters only, not full weights (use_peft: false); use an "
                             "in-process engine (vllm or hf)")
        start = time.perf_counter()
        stats = [s.sync(base, adapter) for s in self.servers]
        diffs = [st.max_abs_diff for st in stats if st.max_abs_diff is not None]
        return SyncStats(bytes=sum(st.bytes for st in stats), seconds=time.perf_counter() - start,
                         max_abs_diff=max(diffs) if diffs else None)

    def generate(self, prompt_ids, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, seed=None,
                 adapter: AdapterArg = "policy", ignore_eos: bool = False, *, top_k: int = 0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, generation_kwargs: dict | None = None) -> list[list[Sample]]:
        # Checked here once, before any server is asked.
        check_sampling(prompt_ids, n, max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty)
        completion_knobs(top_k, min_p, repetition_penalty, generation_kwargs)
        adapters = per_prompt_adapters(adapter, len(prompt_ids))
        shards = [(server, a, b) for server, (a, b) in zip(self.servers, shard_bounds(len(prompt_ids),
                                                                                       len(self.servers)), strict=True)
                  if b > a]

        def run(shard) -> list[list[Sample]]:
            server, a, b = shard
            # The shard's seed makes prompt i's children draw seed + i*n .., as on a single server.
            return server.generate(prompt_ids[a:b], n, max_new_tokens, temperature, top_p,
                                   None if seed is None else seed + a * n, adapters[a:b], ignore_eos, top_k=top_k,
                                   min_p=min_p, repetition_penalty=repetition_penalty,
                                   generation_kwargs=generation_kwargs)

        if len(shards) == 1:
            return run(shards[0])
        with ThreadPoolExecutor(max_workers=len(shards)) as pool:
            return [samples for part in pool.map(run, shards) for samples in part]

    def logprobs(self, prompt_ids, completion_ids, adapter="policy") -> list[float]:
        return self.servers[0].logprobs(prompt_ids, completion_ids, adapter)

    def close(self) -> None:
        for server in self.servers:
            server.close()
