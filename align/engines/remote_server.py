"""`RemoteServer`: one running vLLM OpenAI-compatible server (or `align serve`), sent adapter folders by path.

`RemoteEngine` (remote.py) spreads its prompts over one or several of these.

The server may restart under a run (a crash, a redeploy): it then forgets every adapter loaded at run
time. A request that finds the server gone (connection refused or reset, 502/503) or that names an
adapter it no longer knows (404) waits for the server with backoff, re-sends every adapter from the
trainer's current weights, re-runs the sync probe on each, and is then retried once
(docs/design.md, "Remote rollouts and server restarts").
"""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
import weakref
from pathlib import Path

from align.core.adapter_files import ZERO_ADAPTER_NAME, ZeroAdapter, folder_bytes, scratch_dir
from align.engines.protocol import (
    AdapterArg,
    Sample,
    VerifiedSyncEngine,
    check_generation_kwargs,
    check_sampling,
    per_prompt_adapters,
    verify_adapter,
)

# HTTP statuses that mean "the server is (re)starting", not "your request is wrong".
UNAVAILABLE_STATUSES = (502, 503, 504)
# generation_kwargs a vLLM server takes in a completions request: fields of both its CompletionRequest and
# SamplingParams that leave the reply's shape alone (tests/test_sampling_knobs.py checks both).
COMPLETION_SAMPLING_FIELDS = frozenset({
    "frequency_penalty", "presence_penalty", "logit_bias", "stop", "stop_token_ids", "include_stop_str_in_output",
    "min_tokens", "skip_special_tokens", "spaces_between_special_tokens", "allowed_token_ids", "bad_words"})


class ServerUnavailable(RuntimeError):
    """The server did not answer (down, restarting, or its backend is)."""


class UnknownModel(RuntimeError):
    """The server does not know the model name asked for (404): after a restart, our adapters are gone."""


def completion_knobs(top_k: int, min_p: float, repetition_penalty: float, generation_kwargs: dict | None) -> dict:
    """The completions-request fields for TRL's extra sampling knobs (vLLM extensions of the OpenAI API).

    Sent even at their "off" values: a vLLM server fills a missing field from the model's
    generation_config.json, which may turn e.g. top_k on."""
    extra = check_generation_kwargs(generation_kwargs, COMPLETION_SAMPLING_FIELDS, "a vLLM completions request")
    return {"top_k": max(top_k, 0), "min_p": min_p, "repetition_penalty": repetition_penalty, **extra}


class RemoteServer(VerifiedSyncEngine):
    """`RolloutEngine` on ONE running vLLM OpenAI-compatible server (e.g. on other machines, tensor parallel).

    The server must run with `--enable-lora --max-lora-rank R` and the environment variable
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; adapters reach it through /v1/load_lora_adapter as a
    folder path the SERVER can read (`adapter_dir`: default /dev/shm, i.e. the same host; give a
    shared filesystem path otherwise). Each sync loads the adapter under a fresh name (a reused
    name would keep the old weights) and unloads the previous one. Requests with adapter=None are
    served by an all-zero adapter once any adapter is loaded: other clients' adapter requests may be
    batched with them, and vLLM gets no-adapter requests wrong in such batches.

    With `align serve`, start it with `--adapter_dir D` and give the same `adapter_dir=D` here.
    `api_key` is sent as a bearer token. `reconnect_timeout`: how long a request waits for a
    restarted server before the run fails. `recover_lock` (shared by the servers of one RemoteEngine)
    keeps two servers' recoveries from using the trainer's model at once.
    """

    def __init__(self, model_path: str, base, dtype: str = "float32", url: str = "http://127.0.0.1:8000",
                 adapter_dir: str | None = None, served_model: str | None = None,
                 verify_tol: float | None = None, probe: tuple[list[int], list[int]] | None = None,
                 timeout: float = 600.0, max_concurrency: int = 64, api_key: str | None = None,
                 reconnect_timeout: float = 600.0, recover_lock: threading.Lock | None = None):
        import uuid

        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url: expected a server's http:// or https:// base URL, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.api_key = api_key
        self.reconnect_timeout = reconnect_timeout
        self.recoveries = 0  # times the adapters were re-sent to a restarted server
        self._base = None  # the trainer's SharedBase, kept from the last sync to re-send adapters
        self._recovering = False
        self._recover_lock = recover_lock or threading.Lock()
        self.prompts_served = 0  # prompts this server sampled completions for
        self.max_concurrency = max_concurrency
        self._init_probe(base, dtype, verify_tol, probe)
        self.sync_mode = "lora"
        self._tag = uuid.uuid4().hex[:8]  # names unique to this client: several trainers may share a server
        self._scratch = scratch_dir(adapter_dir)
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._scratch, True)
        self._loras: dict[str, tuple[str, Path]] = {}  # adapter -> (served name, folder)
        self._next_id = 1
        self._zero = ZeroAdapter.for_trainer(base)
        models = self._request("GET", "/v1/models")["data"]
        if served_model is None:
            roots = [m["id"] for m in models if not m.get("parent")]
            if not roots:
                raise RuntimeError(f"{self.url}/v1/models lists no base model: {models}")
            served_model = roots[0]
        self.served_model = served_model

    def _request(self, method: str, path: str, body: dict | None = None):
        import urllib.error
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read().decode()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            if e.code in UNAVAILABLE_STATUSES:
                raise ServerUnavailable(f"{method} {self.url}{path}: HTTP {e.code}: {detail}") from None
            if e.code == 404 and path in ("/v1/completions", "/v1/chat/completions"):
                raise UnknownModel(f"{method} {self.url}{path}: HTTP 404: {detail}") from None
            hint = (" (is the server running with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or "
                    "`align serve --adapter_dir` holding adapter_dir?)" if "lora" in path else "")
            raise RuntimeError(f"{method} {self.url}{path}: HTTP {e.code}: {detail}{hint}") from None
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException, TimeoutError) as e:
            reason = getattr(e, "reason", None) or e
            raise ServerUnavailable(f"{method} {self.url}{path}: cannot reach the vLLM server ({reason})") from None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw

    def _load(self, name: str, folder: Path) -> None:
        self._request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)})

    # -- restarts ----------------------------------------------------------------------------------
    def _resilient(self, call):
        """`call()`, and once more after re-sending every adapter if the server restarted under it."""
        if self._recovering:
            return call()
        try:
            return call()
        except (ServerUnavailable, UnknownModel) as e:
            self._recover(e)
            return call()

    def _wait_for_server(self, why: Exception) -> None:
        deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.5
        while True:
            try:
                self._request("GET", "/v1/models")
                return
            except ServerUnavailable as e:
                if time.monotonic() + delay > deadline:
                    raise ServerUnavailable(f"{e}; still down after {self.reconnect_timeout:g} s "
                                            f"(first failure: {why})") from None
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _recover(self, why: Exception) -> None:
        """Wait for the server, then load every adapter again from the trainer's weights and verify each."""
        self._wait_for_server(why)
        with self._recover_lock:  # the probe runs the trainer's model: one server at a time
            self._recovering = True
            try:
                self._resend_all(why)
            finally:
                self._recovering = False

    def _resend_all(self, why: Exception) -> None:
        adapters = [a for a in self._loras if a != ZERO_ADAPTER_NAME]
        stale = self._loras
        self._loras = {}  # a restarted server knows none of them: nothing to unload
        for _, folder in stale.values():
            shutil.rmtree(folder, ignore_errors=True)
        if adapters and self._base is None:
            raise ServerUnavailable(f"{self.url} restarted and this engine has no trainer base to re-send "
                                    f"{adapters} from ({why})")
        for adapter in adapters:
            self._send(self._base, adapter)
            verify_adapter(self, self._base, adapter, *self.probe, tol=self.verify_tol, history=self._probe_history)
        self.recoveries += 1

    def sync(self, base, adapter: str = "policy"):
        self._base = base
        return self._resilient(lambda: super(RemoteServer, self).sync(base, adapter))

    # -- adapters ----------------------------------------------------------------------------------
    def _send(self, base, adapter: str) -> int:
        self._base = base
        k = self._next_id
        self._next_id += 1
        name = f"{adapter}-{self._tag}-{k}"
        folder = base.save_adapter(adapter, self._scratch / name)
        self._load(name, folder)
        old = self._loras.get(adapter)
        self._loras[adapter] = (name, folder)
        if old is not None:
            try:
                self._request("POST", "/v1/unload_lora_adapter", {"lora_name": old[0]})
            except RuntimeError:
                pass  # e.g. a restarted server that never had it; the new name is what serves
            shutil.rmtree(old[1], ignore_errors=True)
        return folder_bytes(folder)

    def _served_name(self, adapter: str | None) -> str:
        if adapter is not None:
            if adapter not in self._loras:
                raise ValueError(f"adapter {adapter!r} was never synced to this engine; call engine.sync(base, "
                                 f"{adapter!r})")
            return self._loras[adapter][0]
        if not self._loras:
            return self.served_model
        if ZERO_ADAPTER_NAME not in self._loras:
            name = f"{ZERO_ADAPTER_NAME}-{self._tag}"
            folder = self._zero.write(self._scratch / name)
            self._load(name, folder)
            self._loras[ZERO_ADAPTER_NAME] = (name, folder)
        return self._loras[ZERO_ADAPTER_NAME][0]

    def generate(self, prompt_ids, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, seed=None,
                 adapter: AdapterArg = "policy", ignore_eos: bool = False, *, top_k: int = 0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, generation_kwargs: dict | None = None) -> list[list[Sample]]:
        check_sampling(prompt_ids, n, max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty)
        knobs = completion_knobs(top_k, min_p, repetition_penalty, generation_kwargs)
        adapters = per_prompt_adapters(adapter, len(prompt_ids))
        out = self._resilient(lambda: self._generate(prompt_ids, adapters, n, max_new_tokens, temperature, top_p,
                                                     seed, ignore_eos, knobs))
        self.prompts_served += len(prompt_ids)
        return out

    def _generate(self, prompt_ids, adapters, n, max_new_tokens, temperature, top_p, seed,
                  ignore_eos, knobs) -> list[list[Sample]]:
        from concurrent.futures import ThreadPoolExecutor

        names = [self._served_name(a) for a in adapters]

        def one(i: int) -> list[Sample]:
            # One request per prompt, sent concurrently so the server batches them; seeds as VLLMEngine.
            body = {"model": names[i], "prompt": list(prompt_ids[i]), "n": n, "max_tokens": max_new_tokens,
                    "temperature": temperature, "top_p": top_p, "logprobs": 0, "return_token_ids": True, **knobs}
            if seed is not None:
                body["seed"] = seed + i * n
            if ignore_eos:
                body["ignore_eos"] = True  # a vLLM extension of the completions API
            choices = sorted(self._request("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
            samples = []
            for c in choices:
                ids = list(c["token_ids"])
                logprobs = [float(x) for x in c["logprobs"]["token_logprobs"]]
                if len(logprobs) != len(ids):
                    raise RuntimeError(f"server returned {len(logprobs)} log-probs for {len(ids)} tokens")
                samples.append(Sample(prompt_ids=list(prompt_ids[i]), completion_ids=ids, logprobs=logprobs,
                                      text=self.tokenizer.decode(ids, skip_special_tokens=True),
                                      finish_reason="length" if c["finish_reason"] == "length" else "stop"))
            return samples

        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompt_ids))) as pool:
            return list(pool.map(one, range(len(prompt_ids))))

    def logprobs(self, prompt_ids, completion_ids, adapter="policy") -> list[float]:
        if not completion_ids:
            return []
        return self._resilient(lambda: self._logprobs(prompt_ids, completion_ids, adapter))

    def _logprobs(self, prompt_ids, completion_ids, adapter) -> list[float]:
        ids = list(prompt_ids) + list(completion_ids)
        body = {"model": self._served_name(adapter), "prompt": ids, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": 0, "return_token_ids": True}
        scored = self._request("POST", "/v1/completions", body)["choices"][0]["prompt_logprobs"]
        return [float(scored[j][str(ids[j])]["logprob"]) for j in range(len(prompt_ids), len(ids))]

    def close(self) -> None:
        for name, _ in list(self._loras.values()):
            try:
                self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
            except RuntimeError:
                pass  # the server may already be gone
        self._loras.clear()
        self._finalizer()
