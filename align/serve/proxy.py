"""The front proxy clients talk to; vLLM listens only on a private unix socket behind it.

It owns the policy vLLM does not have: the API key, which model names exist (404 otherwise), runtime
adapter loading only from the allowed folder and only for this base, and the zero-adapter routing of
base-model requests (docs/design.md, "vLLM on CPU"). Request and response bodies pass through
unchanged otherwise, streaming included.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from aiohttp import ClientError, ClientSession, ClientTimeout, UnixConnector, web

from align.serve.adapters import AdapterRefused, BaseInfo, check_adapter, read_adapter, resolve_in_folder

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


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
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise web.HTTPBadRequest(text=json.dumps({"error": {
            "message": f"request body is not valid JSON: {e}", "type": "BadRequestError", "param": None,
            "code": 400}}), content_type="application/json") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text=json.dumps({"error": {
            "message": f"request body must be a JSON object, got {type(body).__name__}",
            "type": "BadRequestError", "param": None, "code": 400}}), content_type="application/json")
    return body


class Proxy:
    """The handlers of `align serve`: each request checked here, then passed to vLLM over its socket."""

    def __init__(self, state: ServeState):
        self.state = state
        self.session: ClientSession | None = None

    async def open_session(self, app):
        # No total timeout: a long generation is not an error. Connections are per socket, so unbounded.
        self.session = ClientSession(connector=UnixConnector(path=str(self.state.uds), limit=0),
                                     timeout=ClientTimeout(total=None, sock_connect=10))

    async def close_session(self, app):
        await self.session.close()

    @web.middleware
    async def upstream_down(self, request: web.Request, handler):
        try:
            return await handler(request)
        except ClientError as e:
            return error(502, f"vLLM is not answering: {e}", err_type="BadGatewayError")

    @web.middleware
    async def auth(self, request: web.Request, handler):
        key = self.state.api_key
        if key is not None and request.path != "/health":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
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
            return error(400, f"'model': expected a model name, got {model!r}", param="model")
        if model == state.base_name:
            target = state.zero_name or state.base_name
        elif model in state.adapters:
            target = model
        else:
            return error(404, f"model {model!r} is not served here; available: {state.models}",
                         param="model")
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
            raise AdapterRefused(403, "runtime adapter loading is off; start `align serve` with --adapter-dir")
        name = body.get("lora_name")
        if not isinstance(name, str) or not name or "/" in name:
            raise AdapterRefused(400, f"'lora_name': expected a non-empty name without '/', got {name!r}")
        return name

    def checked_load(self, body: dict) -> tuple[str, Path, bool]:
        """(name, folder, in place) of a load request that passes every check; AdapterRefused otherwise."""
        state = self.state
        name = self.adapter_name(body)
        if name in (state.base_name, state.zero_name):
            raise AdapterRefused(409, f"'lora_name' {name!r} is the served base model's name")
        inplace = bool(body.get("load_inplace", False))
        if name in state.adapters and not inplace:
            raise AdapterRefused(409, f"adapter {name!r} is already loaded; send load_inplace: true to "
                                      "replace its weights")
        requested = body.get("lora_path")
        if not isinstance(requested, str) or not requested:
            raise AdapterRefused(400, f"'lora_path': expected a folder inside {state.adapter_dir}, "
                                      f"got {requested!r}")
        path = resolve_in_folder(requested, state.adapter_dir)
        check_adapter(read_adapter(path), state.base, state.max_lora_rank)
        return name, path, inplace

    async def load_adapter(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        try:
            name, path, inplace = self.checked_load(body)
        except AdapterRefused as e:
            return error(e.status, e.message)
        async with self.forward("/v1/load_lora_adapter",
                                {"lora_name": name, "lora_path": str(path), "load_inplace": inplace}) as upstream:
            text = await upstream.text()
        if upstream.status != 200:
            # What vLLM rejects here is still the adapter's fault (e.g. unsupported modules): a 4xx.
            return error(422 if upstream.status >= 500 else upstream.status,
                         f"vLLM could not load {path}: {_message(text)}")
        self.state.adapters[name] = path
        return web.json_response({"loaded": name, "path": str(path), "models": self.state.models})

    async def unload_adapter(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        try:
            name = self.adapter_name(body)
            if name not in self.state.adapters:
                raise AdapterRefused(404, f"no adapter named {name!r} is loaded; loaded: "
                                          f"{list(self.state.adapters)}")
        except AdapterRefused as e:
            return error(e.status, e.message)
        async with self.forward("/v1/unload_lora_adapter", {"lora_name": name}) as upstream:
            text = await upstream.text()
        if upstream.status != 200:
            return error(upstream.status, f"vLLM could not unload {name!r}: {_message(text)}")
        del self.state.adapters[name]
        return web.json_response({"unloaded": name, "models": self.state.models})

    async def not_served(self, request: web.Request) -> web.Response:
        return error(404, f"{request.method} {request.path} is not an endpoint of align serve")


def build_app(state: ServeState) -> web.Application:
    proxy = Proxy(state)
    app = web.Application(middlewares=[proxy.upstream_down, proxy.auth], client_max_size=64 * 1024 * 1024)
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
