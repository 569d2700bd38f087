"""The front proxy clients talk to; vLLM listens only on a private unix socket behind it.

It owns the policy vLLM does not have: the API key, which model names exist (404 otherwise), runtime
adapter loading only from the allowed folder and only for this base, and the zero-adapter routing of
base-model requests (docs/design.md, "vLLM on CPU"). Request and response bodies pass through
unchanged otherwise, streaming included.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import ClientError, ClientSession, ClientTimeout, UnixConnector, web

from align.core.adapter_files import BaseInfo
from align.serve.adapters import AdapterInfo, check_adapter, check_name, resolve_in_folder, snapshot_adapter
from align.serve.fs import FsGuard, check_path_text, short
from align.serve.refusal import AdapterRefused

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
MAX_BODY_BYTES = 16 << 20  # a 100k-token prompt is well under 1 MiB of JSON
MAX_SEQUENCES = 256  # prompts x n in one request: each one is a vLLM request holding memory


@dataclass
class ServeState:
    """What the proxy knows; it is vLLM's only client, so its adapter table is the truth."""

    uds: Path
    base: BaseInfo
    base_name: str
    max_lora_rank: int
    adapters: dict[str, Path]
    zero_name: str | None = None  # hidden adapter that base requests are routed to; None: no workaround
    adapter_dir: Path | None = None
    api_key: str | None = None
    guard: FsGuard = field(default_factory=FsGuard)
    copies: Path | None = None  # where runtime-loaded adapters are copied for vLLM (the private folder)
    adapter_limit: int = 2048 << 20  # bytes of adapter_model.safetensors copied at most
    sources: dict[str, Path] = field(default_factory=dict)  # adapter name -> the folder it was copied from

    @property
    def models(self) -> list[str]:
        return [self.base_name, *self.adapters]


def error(status: int, message: str, err_type: str | None = None, param: str | None = None) -> web.Response:
    # The OpenAI error shape, which the `openai` client turns into its exception's message.
    err_type = err_type or {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
                            404: "NotFoundError", 409: "ConflictError",
                            422: "UnprocessableEntityError"}.get(status, "Error")
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return web.json_response(body, status=status)


async def _json_body(request: web.Request) -> dict:
    raw = await request.read()  # over MAX_BODY_BYTES: aiohttp raises 413 (turned into JSON by `errors`)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # also bad UTF-8, huge integers, absurd nesting
        raise AdapterRefused(400, f"request body is not valid JSON: {short(str(e), 200)}") from None
    if not isinstance(body, dict):
        raise AdapterRefused(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _sequences(body: dict) -> int:
    """How many sequences a generation request asks vLLM for (prompts x n); 1 when vLLM will refuse it anyway."""
    prompt = body.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and not all(isinstance(t, int) for t in prompt) else 1
    n = max((v for v in (body.get("n"), body.get("best_of")) if isinstance(v, int)), default=1)
    return prompts * max(n, 1)


class Proxy:
    """The handlers of `align serve`: each request checked here, then passed to vLLM over its socket."""

    def __init__(self, state: ServeState):
        self.state = state
        self.session: ClientSession | None = None
        self.lock = asyncio.Lock()
        self.counter = itertools.count(1)

    async def open_session(self, app):
        # No total timeout: a long generation is not an error. Connections are per socket, so unbounded.
        self.session = ClientSession(connector=UnixConnector(path=str(self.state.uds), limit=0),
                                     timeout=ClientTimeout(total=None, sock_connect=10))

    async def close_session(self, app):
        await self.session.close()

    @web.middleware
    async def errors(self, request: web.Request, handler):
        """Every refusal in the OpenAI error shape; aiohttp's own (413, 405, ...) included."""
        if (request.content_length or 0) > MAX_BODY_BYTES:  # refused before a byte of it is read
            return error(413, f"request body of {request.content_length} bytes; at most {MAX_BODY_BYTES}")
        try:
            return await handler(request)
        except AdapterRefused as e:
            return error(e.status, e.message)
        except ClientError as e:
            return error(502, f"vLLM is not answering: {e}", err_type="BadGatewayError")
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return error(e.status, e.reason if e.status != 413 else
                         f"request body larger than {MAX_BODY_BYTES} bytes")

    @web.middleware
    async def auth(self, request: web.Request, handler):
        key = self.state.api_key
        if key is not None and request.path != "/health":
            # surrogateescape: header bytes that are not UTF-8 compare as bytes instead of raising.
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, f"Bearer {key}".encode()):
                return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
        return await handler(request)

    def forward(self, path: str, body: dict | None, method: str = "POST"):
        """A request to vLLM over its socket, to be used as `async with self.forward(...) as upstream`."""
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        return self.session.request(method, f"http://vllm{path}", data=data, headers=headers)

    # -- generation --------------------------------------------------------------------------------
    async def generate(self, request: web.Request) -> web.StreamResponse:
        state = self.state
        body = await _json_body(request)
        model = body.get("model", state.base_name)
        if not isinstance(model, str):
            return error(400, f"'model': expected a model name, got {short(model)}", param="model")
        if model == state.base_name:
            target = state.zero_name or state.base_name
        elif model in state.adapters:
            target = model
        else:
            return error(404, f"model {short(model)} is not served here; available: {state.models}",
                         param="model")
        if _sequences(body) > MAX_SEQUENCES:
            return error(400, f"this request asks for {_sequences(body)} sequences (prompts x n); at most "
                              f"{MAX_SEQUENCES} per request", param="n")
        body["model"] = target
        async with self.forward(request.path, body) as upstream:
            ctype = upstream.headers.get("Content-Type", "")
            if "text/event-stream" not in ctype:
                payload = await upstream.read()
                if target != model and upstream.status == 200:
                    out = json.loads(payload)
                    out["model"] = model
                    payload = json.dumps(out).encode()
                return web.Response(body=payload, status=upstream.status, content_type="application/json")
            # Streaming: each SSE line names the model; clients must see the name they asked for.
            resp = web.StreamResponse(status=upstream.status, headers={"Content-Type": ctype,
                                                                       "Cache-Control": "no-cache"})
            await resp.prepare(request)
            old = f'"model":{json.dumps(target)}'.encode()
            new = f'"model":{json.dumps(model)}'.encode()
            async for line in upstream.content:
                await resp.write(line.replace(old, new) if target != model else line)
            await resp.write_eof()
            return resp

    async def models(self, request: web.Request) -> web.Response:
        async with self.forward("/v1/models", None, method="GET") as upstream:
            out = await upstream.json()
        out["data"] = [m for m in out.get("data", []) if m.get("id") != self.state.zero_name]
        return web.json_response(out, status=upstream.status)

    async def health(self, request: web.Request) -> web.Response:
        async with self.forward("/health", None, method="GET") as upstream:
            return web.Response(status=upstream.status)

    # -- adapters at run time ----------------------------------------------------------------------
    def adapter_name(self, body: dict) -> str:
        """The request's 'lora_name', once runtime loading is known to be on."""
        if self.state.adapter_dir is None:
            raise AdapterRefused(403, "runtime adapter loading is off; start `align serve` with --adapter_dir")
        return check_name(body.get("lora_name"), "lora_name")

    def checked_request(self, body: dict) -> tuple[str, str, bool]:
        """(name, path, in place) of a load request whose fields are well formed; AdapterRefused otherwise."""
        state = self.state
        name = self.adapter_name(body)
        if name in (state.base_name, state.zero_name):
            raise AdapterRefused(409, f"'lora_name' {name!r} is the served base model's name")
        inplace = body.get("load_inplace", False)
        if not isinstance(inplace, bool):
            raise AdapterRefused(400, f"'load_inplace': expected true or false, got {short(inplace)}")
        if name in state.adapters and not inplace:
            raise AdapterRefused(409, f"adapter {name!r} is already loaded; send load_inplace: true to "
                                      "replace its weights")
        return name, check_path_text(body.get("lora_path"), "lora_path"), inplace

    def prepare(self, requested: str, dest: Path) -> AdapterInfo:
        """Runs on a file-system thread: confine, copy to `dest`, check; `dest` is removed on refusal."""
        state = self.state
        try:
            path = resolve_in_folder(requested, state.adapter_dir)
            info = snapshot_adapter(path, state.adapter_dir, dest, state.adapter_limit)
            check_adapter(info, state.base, state.max_lora_rank)
            return info
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise

    async def load_adapter(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        name, requested, inplace = self.checked_request(body)
        state = self.state
        async with self.lock:  # one change of the adapter table at a time
            if name in state.adapters and not inplace:
                raise AdapterRefused(409, f"adapter {name!r} is already loaded")
            dest = state.copies / f"{next(self.counter)}-{name}"
            info = await state.guard.arun(f"adapter path {short(requested)}", self.prepare, requested, dest)
            async with self.forward("/v1/load_lora_adapter",
                                    {"lora_name": name, "lora_path": str(dest), "load_inplace": inplace}) as up:
                text = await up.text()
            old = state.adapters.get(name)
            if up.status != 200:
                await asyncio.to_thread(shutil.rmtree, dest, True)
                # What vLLM rejects here is still the adapter's fault (e.g. unsupported modules): a 4xx.
                return error(422 if up.status >= 500 else up.status,
                             f"vLLM could not load {info.path}: {short(_message(text), 500)}")
            state.adapters[name], state.sources[name] = dest, info.path
            if old is not None and old != dest:
                await asyncio.to_thread(shutil.rmtree, old, True)
        return web.json_response({"loaded": name, "path": str(info.path), "models": state.models})

    async def unload_adapter(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        name = self.adapter_name(body)
        state = self.state
        async with self.lock:
            if name not in state.adapters:
                raise AdapterRefused(404, f"no adapter named {name!r} is loaded; loaded: {list(state.adapters)}")
            async with self.forward("/v1/unload_lora_adapter", {"lora_name": name}) as upstream:
                text = await upstream.text()
            if upstream.status != 200:
                return error(upstream.status, f"vLLM could not unload {name!r}: {short(_message(text), 500)}")
            copy = state.adapters.pop(name)
            state.sources.pop(name, None)
            if state.copies is not None and state.copies in copy.parents:
                await asyncio.to_thread(shutil.rmtree, copy, True)
        return web.json_response({"unloaded": name, "models": state.models})

    async def not_served(self, request: web.Request) -> web.Response:
        return error(404, f"{request.method} {request.path} is not an endpoint of align serve")


def build_app(state: ServeState) -> web.Application:
    proxy = Proxy(state)
    app = web.Application(middlewares=[proxy.errors, proxy.auth], client_max_size=MAX_BODY_BYTES)
    app.on_startup.append(proxy.open_session)
    app.on_cleanup.append(proxy.close_session)
    for path in GENERATION_PATHS:
        app.router.add_post(path, proxy.generate)
    app.router.add_get("/v1/models", proxy.models)
    app.router.add_get("/health", proxy.health)
    app.router.add_post("/v1/load_lora_adapter", proxy.load_adapter)
    app.router.add_post("/v1/unload_lora_adapter", proxy.unload_adapter)
    app.router.add_route("*", "/{tail:.*}", proxy.not_served)
    return app


def _message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text.strip()[:500]
