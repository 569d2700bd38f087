"""`RemoteEngine`: a running vLLM OpenAI-compatible server, sent adapter folders by path."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

from align.adapter_files import ZERO_ADAPTER_NAME, ZeroAdapter, folder_bytes, scratch_dir
from align.engines.protocol import AdapterArg, Sample, VerifiedSyncEngine, check_sampling, per_prompt_adapters


class RemoteEngine(VerifiedSyncEngine):
    """`RolloutEngine` on a running vLLM OpenAI-compatible server (e.g. on other machines, tensor parallel).

    The server must run with `--enable-lora --max-lora-rank R` and the environment variable
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; adapters reach it through /v1/load_lora_adapter as a
    folder path the SERVER can read (`adapter_dir`: default /dev/shm, i.e. the same host; give a
    shared filesystem path otherwise). Each sync loads the adapter under a fresh name (a reused
    name would keep the old weights) and unloads the previous one. Requests with adapter=None are
    served by an all-zero adapter once any adapter is loaded: other clients' adapter requests may be
    batched with them, and vLLM gets no-adapter requests wrong in such batches.
    """

    def __init__(self, model_path: str, base, dtype: str = "float32", url: str = "http://127.0.0.1:8000",
                 adapter_dir: str | None = None, served_model: str | None = None,
                 verify_tol: float | None = None, probe: tuple[list[int], list[int]] | None = None,
                 timeout: float = 600.0, max_concurrency: int = 64):
        import uuid

        self.url = url.rstrip("/")
        self.timeout = timeout
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
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read().decode()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            hint = (" (is the server running with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True?)"
                    if "lora" in path else "")
            raise RuntimeError(f"{method} {self.url}{path}: HTTP {e.code}: {detail}{hint}") from None
        except urllib.error.URLError as e:
            raise RuntimeError(f"{method} {self.url}{path}: cannot reach the vLLM server ({e.reason})") from None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw

    def _load(self, name: str, folder: Path) -> None:
        self._request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)})

    def _send(self, base, adapter: str) -> int:
        k = self._next_id
        self._next_id += 1
        name = f"{adapter}-{self._tag}-{k}"
        folder = base.save_adapter(adapter, self._scratch / name)
        self._load(name, folder)
        old = self._loras.get(adapter)
        self._loras[adapter] = (name, folder)
        if old is not None:
            self._request("POST", "/v1/unload_lora_adapter", {"lora_name": old[0]})
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
                 adapter: AdapterArg = "policy", ignore_eos: bool = False) -> list[list[Sample]]:
        from concurrent.futures import ThreadPoolExecutor

        check_sampling(prompt_ids, n, max_new_tokens, temperature, top_p)
        names = [self._served_name(a) for a in per_prompt_adapters(adapter, len(prompt_ids))]

        def one(i: int) -> list[Sample]:
            # One request per prompt, sent concurrently so the server batches them; seeds as VLLMEngine.
            body = {"model": names[i], "prompt": list(prompt_ids[i]), "n": n, "max_tokens": max_new_tokens,
                    "temperature": temperature, "top_p": top_p, "logprobs": 0, "return_token_ids": True}
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
