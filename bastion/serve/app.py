"""The HTTP API: OpenAI-compatible routes over the continuous-batching engine, locked down.

Order of checks for a generation request (each failure is an OpenAI-style JSON error):
body size (413, before the body is read) -> API key (401) -> JSON / UTF-8 / schema (400,
unknown fields included) -> model name (404) -> prompt and parameter limits (400) -> rate
limit (429 + Retry-After) -> queue space (503 + Retry-After) -> generation, bounded by the
request timeout (504) and cancelled as soon as the client goes away.

Routes: /health (liveness, open), /ready, /v1/models, /v1/completions,
/v1/chat/completions (both with SSE streaming), /metrics (Prometheus; a separate key when
serve.metrics_key_env is set), and with serve.chat_page the chat page's static files (/,
/chat.js, /chat.css, /favicon.svg: open, no data; chatpage.py). Every other route needs a
key whenever keys are configured - and they must be, unless the server only listens on
loopback.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from bastion.config.schema import GenerateConfig, ServeConfig
from bastion.errors import DataError, EngineClosedError, GenerationLimitError, QueueFullError
from bastion.infer.engine import Engine
from bastion.infer.generate import check_prompt_ids
from bastion.infer.structured import GrammarError
from bastion.infer.loading import LoadedModel
from bastion.serve import constrain as C
from bastion.serve import protocol as P
from bastion.serve.accesslog import AccessLog
from bastion.serve.chatpage import PAGE_FILES, add_chat_page
from bastion.serve.filters import OutputFilter, StreamFilter
from bastion.serve.keys import KeyStore, bearer_token
from bastion.serve.ratelimit import RateLimiter, RequestTooLarge
from bastion.tokenizer.chat import check_conversation

OPEN_PATHS = {"/health"}


class ApiError(Exception):
    """An error answered as {"error": {...}} with `status` (and optional headers)."""

    def __init__(self, status: int, message: str, kind: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(P.error_body(self.message, self.kind, param=self.param, code=self.code),
                            status_code=self.status, headers=self.headers)


class Metrics:
    """Prometheus metrics in a registry of the app's own (no global state between servers)."""

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("bastion_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.rejections = Counter("bastion_rejections", "Requests refused, by reason", ["reason"], registry=r)
        self.tokens = Counter("bastion_tokens", "Tokens processed", ["kind"], registry=r)
        self.latency = Histogram("bastion_request_latency_seconds", "Request latency", ["route"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        # Labelled by served model: the base and serve.adapters only (an unknown name is a 404
        # before this counts), so the label set is bounded by serve.max_adapters.
        self.model_requests = Counter("bastion_model_requests", "Generation requests accepted, by model (the base "
                                      "or an adapter)", ["model"], registry=r)
        self.ttft = Histogram("bastion_time_to_first_token_seconds", "Time to the first streamed token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        queue = Gauge("bastion_queue_depth", "Requests waiting for a batch slot", registry=r)
        running = Gauge("bastion_running", "Sequences being decoded", registry=r)
        kv = Gauge("bastion_kv_cache_bytes", "Keys/values held: running requests' caches and the prefix cache",
                   registry=r)
        queue.set_function(lambda: engine.stats["waiting"])
        running.set_function(lambda: engine.stats["running"])
        kv.set_function(lambda: engine.kv_cache_bytes)
        r.register(PrefixCacheCollector(engine))


class PrefixCacheCollector:
    """The engine's prefix-cache counters, read at scrape time (absent when caching is off):
    hit rate = bastion_prefix_cache_hit_tokens_total / bastion_prefix_cache_queried_tokens_total."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        stats = self.engine.prefix_cache_stats
        if stats is None:
            return
        yield CounterMetricFamily("bastion_prefix_cache_queried_tokens", "Prompt tokens of requests that looked up "
                                  "the prefix cache", value=stats["queried_tokens"])
        yield CounterMetricFamily("bastion_prefix_cache_hit_tokens", "Prompt tokens whose keys/values came from the "
                                  "prefix cache", value=stats["hit_tokens"])
        yield CounterMetricFamily("bastion_prefix_cache_evictions", "Prefix-cache blocks evicted (LRU)",
                                  value=stats["evictions"])
        yield GaugeMetricFamily("bastion_prefix_cache_blocks_used", "Prefix-cache blocks holding a prompt block",
                                value=stats["blocks_used"])
        yield GaugeMetricFamily("bastion_prefix_cache_blocks", "Prefix-cache capacity in blocks of "
                                f"{stats['block_tokens']} tokens", value=stats["blocks"])


@dataclass
class ServerState:
    loaded: LoadedModel
    cfg: ServeConfig
    limits: GenerateConfig
    engine: Engine
    keys: KeyStore
    limiter: RateLimiter
    log: AccessLog
    model_name: str
    require_keys: bool
    adapters: tuple[str, ...] = ()  # LoRA adapters served beside the base, by model name (serve.adapters)
    metrics: Metrics = field(init=False)
    ready: bool = False

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.engine)


# ---- request plumbing ------------------------------------------------------------------------


class Guard:
    """Pure ASGI middleware in front of every route: body size (413, by Content-Length
    before reading and by counting while reading, so a chunked or lying client cannot get
    more in), the API key (401), then one access-log line and the request metrics when the
    response has been sent completely (streams included). The status logged is the status
    sent (`_Exchange`): an exception in the app is a 500 sent here, never one propagated to
    uvicorn, and a client gone before its response began is logged as 499."""

    def __init__(self, app: Any, state: ServerState):
        self.app, self.state = app, state
        # The chat page's files hold no data; its API calls are keyed like any client's.
        page = set(PAGE_FILES) if state.cfg.chat_page else set()
        self.open_paths = OPEN_PATHS | page
        self.known_routes = KNOWN_ROUTES | page

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = self.state
        start = time.perf_counter()
        info: dict[str, Any] = {"key_id": None, "prompt_tokens": 0, "completion_tokens": 0}
        scope.setdefault("state", {})["info"] = info
        exchange = _Exchange(receive, send)
        limit = state.cfg.max_body_bytes
        too_big = ApiError(413, f"request body over {limit} bytes", "invalid_request_error", code="body_too_large")
        request = Request(scope)
        try:
            declared = request.headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                raise too_big if declared.isdigit() else ApiError(400, "invalid Content-Length", "invalid_request_error")
            if request.url.path not in self.open_paths:
                info["key_id"] = _authenticate(state, request)
            replay = await _read_body(exchange, limit, too_big)
            await self.app(scope, replay, exchange.send)
        except ApiError as exc:
            info.setdefault("error", exc.code or exc.kind)
            if exchange.status is None:
                await exc.response()(scope, exchange.receive, exchange.send)
        except _ClientGone:
            info.setdefault("error", "client_disconnected")
        except Exception as exc:  # noqa: BLE001 - a bug, not the client's input: answered and logged as 500
            info["error"] = type(exc).__name__
            _log_internal_error(request.url.path, exc)
            await exchange.fail(scope)
        finally:
            code = exchange.status or 499  # nothing sent: the client went away first
            path = request.url.path
            route = path if path in self.known_routes else "other"
            elapsed = time.perf_counter() - start
            state.metrics.requests.labels(route, str(code)).inc()
            state.metrics.latency.labels(route).observe(elapsed)
            if code >= 400:
                state.metrics.rejections.labels(str(info.get("error") or code)).inc()
            state.log.write(request_id=info.get("request_id"), key_id=info["key_id"], method=scope.get("method"),
                            path=path, status=code, latency_ms=round(elapsed * 1000, 2),
                            model=info.get("model"), prompt_tokens=info["prompt_tokens"],
                            completion_tokens=info["completion_tokens"],
                            finish_reason=info.get("finish_reason"), error=info.get("error"),
                            prompt=info.get("prompt"), completion=info.get("completion"))


class _ClientGone(Exception):
    """The client disconnected before its request body was read."""


class _Exchange:
    """One request's ASGI receive and send, recording what the client actually got: the
    status sent, or none when the client had gone before the response began (uvicorn drops
    such a response silently, so it is not passed on and the log says 499)."""

    def __init__(self, receive: Callable, send: Callable):
        self._receive, self._send = receive, send
        self.status: int | None = None
        self.client_gone = self.finished = False

    async def receive(self) -> dict:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.client_gone = True
        return message

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            if self.client_gone:
                return
            self.status = message["status"]
            headers = list(message.get("headers", []))
            if not any(name.lower() == b"x-content-type-options" for name, _ in headers):
                # every response, JSON and errors included: a browser must not sniff a reply
                # that echoes client text into something it renders
                message = {**message, "headers": [*headers, (b"x-content-type-options", b"nosniff")]}
        elif self.status is None:
            return  # the body of a response that was never started
        elif not message.get("more_body", False):
            self.finished = True
        await self._send(message)

    async def fail(self, scope: dict) -> None:
        """After an exception in the app: a 500 if nothing was sent, else end the open body."""
        with contextlib.suppress(Exception):  # the client may be gone: nothing left to tell it
            if self.status is None:
                await ApiError(500, "internal error", "server_error").response()(scope, self.receive, self.send)
            elif not self.finished:
                await self.send({"type": "http.response.body", "body": b"", "more_body": False})


def _log_internal_error(path: str, exc: Exception) -> None:
    """Where the bug is (the stack), without the exception's message: it may quote the request."""
    stack = "".join(traceback.format_tb(exc.__traceback__))
    logging.getLogger("bastion.serve").error("internal error on %s: %s (message withheld)\n%s", path,
                                             type(exc).__name__, stack)


async def _read_body(exchange: _Exchange, limit: int, too_big: ApiError) -> Callable:
    """Read the whole body first, counting (a chunked or lying client cannot get more than
    `limit` bytes in; reading is async, so a slow client holds no worker), then hand the
    app a receive that replays it and afterwards passes through (disconnect detection)."""
    chunks, size, more = [], 0, True
    while more:
        message = await exchange.receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        body = message.get("body", b"")
        size += len(body)
        if size > limit:
            raise too_big
        chunks.append(body)
        more = message.get("more_body", False)
    return _replay(b"".join(chunks), exchange.receive)


def _replay(body: bytes, receive: Callable) -> Callable:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _authenticate(state: ServerState, request: Request) -> str:
    """The caller's key id ("anonymous" when keys are not required)."""
    token = bearer_token(request.headers.get("authorization"))
    if request.url.path == "/metrics" and state.cfg.metrics_key_env:
        if state.keys.authenticate_metrics(token):
            return "metrics"
        raise ApiError(401, "a valid metrics key is required", "authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    if not state.require_keys:
        return "anonymous"
    key_id = state.keys.authenticate(token)
    if key_id is None:
        raise ApiError(401, "a valid API key is required (Authorization: Bearer ...)", "authentication_error",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return key_id


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


# ---- the app ---------------------------------------------------------------------------------


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app over a started-or-startable ServerState (the engine starts with the app)."""
    created = _model_created(state)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            # uvicorn has stopped accepting and waited for in-flight requests (graceful
            # shutdown); anything the engine still holds gets the rest of the grace period.
            await asyncio.to_thread(state.engine.shutdown, state.cfg.shutdown_grace_s)

    app = FastAPI(title="Bastion", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(Guard, state=state)
    app.state.bastion = state
    if state.cfg.chat_page:
        add_chat_page(app)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        request.state.info["error"] = exc.code or exc.kind
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        kind = first.get("type", "")
        if kind in ("invalid_unicode", "unsupported_value", "logprobs_needed"):  # whole body; the field is in ctx
            where = first["ctx"]["field"]
            message = f"{where}: {first.get('msg')}"
        elif kind == "json_invalid":
            message = "the body is not valid JSON"
        elif kind == "extra_forbidden":
            message = f"unknown field '{where}'"
        else:
            message = f"{where or 'body'}: {first.get('msg', 'invalid').removeprefix('Value error, ')}"
        request.state.info["error"] = "invalid_request"
        return ApiError(400, message, "invalid_request_error", param=where, code=kind or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail), "invalid_request_error").response()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok = state.ready
        return JSONResponse({"ready": ok, **state.engine.stats}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        # Adapters as vLLM lists LoRA modules: `parent` (and `root`) name the base they run on.
        # No file paths: a client needs the ids only.
        base = {"id": state.model_name, "object": "model", "created": created, "owned_by": "bastion",
                "root": state.model_name, "parent": None}
        adapters = [{**base, "id": name, "parent": state.model_name} for name in state.adapters]
        return {"object": "list", "data": [base, *adapters]}

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request) -> Response:
        prompts = body.prompts()
        if len(prompts) > state.cfg.max_prompts:
            raise ApiError(400, f"{len(prompts)} prompts, over this server's limit of {state.cfg.max_prompts}",
                           "invalid_request_error", param="prompt")
        ids = [state.loaded.tokenizer.encode_prompt(p) if isinstance(p, str) else _checked_ids(state, p, i, len(prompts))
               for i, p in enumerate(prompts)]
        text = prompts[0] if len(prompts) == 1 and isinstance(prompts[0], str) else json.dumps(prompts)
        tokenizer = state.loaded.tokenizer
        echoed = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts] if body.echo else None
        scoring = Scoring(body.logprobs, echoed, "logprobs")
        structure = await _structure(state, body, [tokenizer.eos_id])
        return await _generate(state, request, body, ids, chat=False, text=text, scoring=scoring, structure=structure)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatRequest, request: Request) -> Response:
        chat = state.loaded.chat
        structure = await _structure(state, body, chat.stop_ids)
        try:
            # Tool calls and the tools become text, then the same conversation rules as
            # fine-tuning data: roles in order, ends with the user or a tool result.
            messages = check_conversation(C.prompt_messages([m.plain() for m in body.messages], structure),
                                          ends_with=("user", "tool"))
            prompt_ids = chat.encode_prompt(messages)
        except DataError as exc:
            raise ApiError(400, f"messages: {exc}", "invalid_request_error", param="messages") from None
        scoring = Scoring((body.top_logprobs or 0) if body.logprobs else None, None, "top_logprobs")
        return await _generate(state, request, body, [prompt_ids], chat=True,
                               text=json.dumps([m.plain() for m in body.messages]), scoring=scoring,
                               structure=structure)

    return app


@dataclass(frozen=True)
class Scoring:
    """What a request asks beyond text: `logprobs` (None: none; k: each token's logprob and
    k alternatives, `field` names the request field), `echo` (completions: the prompts' texts
    to put before each completion, and with logprobs the prompt tokens' logprobs)."""

    logprobs: int | None = None
    echo: list[str] | None = None
    field: str = "logprobs"

    def check(self, state: ServerState, stream: bool) -> None:
        if stream and self.echo is not None:
            raise ApiError(400, "echo: not available with stream: true on this server", "invalid_request_error",
                           param="echo")
        if self.logprobs is None:
            return
        if self.logprobs > state.cfg.max_logprobs:
            raise ApiError(400, f"{self.field} is {self.logprobs}, over this server's limit of {state.cfg.max_logprobs}",
                           "invalid_request_error", param=self.field)
        if state.cfg.output_filter:
            raise ApiError(400, f"{self.field}: not available while serve.output_filter is on (the tokens would show "
                                "what the filter redacts)", "invalid_request_error", param=self.field)


async def _structure(state: ServerState, body: P._Sampling, end_ids: list[int]) -> C.Structure:
    """The request's structured-output grammar (C.request_structure), or a 400 naming the field."""
    try:
        return await C.request_structure(state.cfg, body, tokenizer=state.loaded.tokenizer,
                                         vocab_size=state.loaded.config.model.vocab_size or 0, end_ids=end_ids)
    except C.StructureError as exc:
        raise ApiError(400, str(exc), "invalid_request_error", param=exc.param, code="invalid_schema") from None


def _model_created(state: ServerState) -> int:
    """/v1/models' `created`: when the served checkpoint was written (its manifest's mtime)."""
    try:
        return int((state.loaded.directory / "MANIFEST.json").stat().st_mtime)
    except OSError:
        return int(time.time())


def _checked_ids(state: ServerState, ids: list[int], index: int, count: int) -> list[int]:
    """A prompt given as token ids, checked as the engine will (`check_prompt_ids`) but before
    any prompt of the request is submitted or charged: 400 naming the prompt otherwise."""
    try:
        return check_prompt_ids(ids, state.loaded.config.model.vocab_size or 0)
    except GenerationLimitError as exc:
        where = "prompt" if count == 1 else f"prompt {index}"
        raise ApiError(400, f"{where}: {exc}", "invalid_request_error", param="prompt") from None


KNOWN_ROUTES = {"/health", "/ready", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}


# ---- generation ------------------------------------------------------------------------------


def _cache_namespace(state: ServerState, info: dict[str, Any]) -> str:
    """Prefix-cache isolation: per_key gives each API key its own blocks (without keys, on
    loopback, every request has the same key id None and they all share)."""
    return "" if state.cfg.prefix_cache_scope == "shared" else f"key:{info['key_id'] or ''}"


async def _generate(state: ServerState, request: Request, body: P._Sampling, prompts: list[list[int]], *, chat: bool,
                    text: str, scoring: Scoring, structure: C.Structure = C.Structure()) -> Response:
    """Submit body.n completions of each prompt (in that order: choice index = prompt index
    x n + j), after the model name, n, stop and length limits and the rate limit pass."""
    info = request.state.info
    info["request_id"] = rid = P.new_id("chatcmpl" if chat else "cmpl")
    adapter = _adapter_of(state, body.model)
    info["model"] = body.model
    if body.n > state.cfg.max_n:
        raise ApiError(400, f"n is {body.n}, over this server's limit of {state.cfg.max_n}", "invalid_request_error",
                       param="n")
    limits = state.limits
    if body.stop and len(body.stop) > limits.max_stop_strings:
        raise ApiError(400, f"{len(body.stop)} stop strings, over the limit of {limits.max_stop_strings}",
                       "invalid_request_error", param="stop")
    scoring.check(state, body.stream)
    if body.logit_bias and len(body.logit_bias) > state.cfg.max_logit_bias:
        raise ApiError(400, f"logit_bias names {len(body.logit_bias)} tokens, over this server's limit of "
                            f"{state.cfg.max_logit_bias}", "invalid_request_error", param="logit_bias")
    try:
        adjust = body.adjustments()
    except ValueError as exc:
        raise ApiError(400, str(exc), "invalid_request_error", param="logit_bias") from None
    budget = body.budget() if isinstance(body, P.ChatRequest) else body.max_tokens
    stop_ids = state.loaded.chat.stop_ids if chat else None
    try:
        jobs = [(ids, state.engine.params(len(ids), max_new_tokens=budget, temperature=body.temperature,
                                          top_p=body.top_p, seed=None if body.seed is None else body.seed + j,
                                          stop=body.stop, stop_ids=stop_ids, logprobs=scoring.logprobs,
                                          prompt_logprobs=scoring.echo is not None and scoring.logprobs is not None,
                                          grammar=structure.grammar, **adjust))
                for ids in prompts for j in range(body.n)]
    except GenerationLimitError as exc:
        raise ApiError(400, str(exc), "invalid_request_error", code="limit_exceeded") from None
    prompt_tokens = sum(len(ids) for ids in prompts)
    info["prompt_tokens"] = prompt_tokens
    if state.cfg.log_prompts:
        info["prompt"] = text
    requested = prompt_tokens + sum(p.max_new_tokens for _, p in jobs)
    try:
        wait = state.limiter.check(info["key_id"], requested)
    except RequestTooLarge as exc:
        raise ApiError(400, str(exc), "invalid_request_error", code="rate_limit_too_large") from None
    if wait is not None:
        raise ApiError(429, "rate limit reached for this API key", "rate_limit_error", code="rate_limited",
                       headers=_retry_after(wait))
    loop = asyncio.get_running_loop()
    handles = []
    try:
        for ids, p in jobs:
            handles.append(state.engine.submit(ids, p, loop=loop, cache_namespace=_cache_namespace(state, info),
                                               adapter=adapter))
    except (QueueFullError, EngineClosedError) as exc:
        for h in handles:
            h.cancel()
        state.limiter.refund(info["key_id"], requested)
        full = isinstance(exc, QueueFullError)
        raise ApiError(503, "server busy: the queue is full, retry later" if full else "server is shutting down",
                       "server_error", code="overloaded" if full else "shutting_down", headers=_retry_after(1)) \
            from None
    state.metrics.tokens.labels("prompt").inc(prompt_tokens)
    state.metrics.model_requests.labels(body.model).inc()
    if body.stream:
        return StreamingResponse(_stream(state, request, body, handles, rid, chat, requested, structure, scoring),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-store"})
    return await _complete(state, request, body, handles, rid, chat, requested, scoring, prompts, structure)


def _adapter_of(state: ServerState, model: str) -> str | None:
    """The adapter a request's `model` names: None for the base; 404 for a name not served."""
    if model == state.model_name:
        return None
    if model in state.adapters:
        return model
    served = ", ".join(f"'{name}'" for name in (state.model_name, *state.adapters))
    raise ApiError(404, f"model '{model}' does not exist; this server serves {served}", "invalid_request_error",
                   param="model", code="model_not_found")


async def _collect(handle: Any) -> Any:
    result = None
    async for item in handle:
        result = item
    return result


async def _watch_disconnect(request: Request, handles: list[Any]) -> None:
    while True:
        if await request.is_disconnected():
            for h in handles:
                h.cancel()
            return
        await asyncio.sleep(0.25)


async def _complete(state: ServerState, request: Request, body: P._Sampling, handles: list[Any], rid: str,
                    chat: bool, requested: int, scoring: Scoring, prompts: list[list[int]],
                    structure: C.Structure) -> JSONResponse:
    info = request.state.info
    watcher = asyncio.create_task(_watch_disconnect(request, handles))
    try:
        results = await asyncio.wait_for(asyncio.gather(*(_collect(h) for h in handles)), state.cfg.request_timeout_s)
    except GrammarError as exc:  # the schema's grammar hit one of its limits mid-reply
        for h in handles:
            h.cancel()
        raise ApiError(400, f"response_format / tools: {exc}", "invalid_request_error", code="invalid_schema") \
            from None
    except asyncio.TimeoutError:
        for h in handles:
            h.cancel()
        state.limiter.refund(info["key_id"], requested - info["prompt_tokens"])
        raise ApiError(504, f"generation took longer than {state.cfg.request_timeout_s:g} s", "server_error",
                       code="timeout") from None
    finally:
        watcher.cancel()
    out_filter = OutputFilter(state.cfg.output_filter)
    choices: list[tuple[Any, str]] = []
    for r in results:
        calls = C.tool_calls(r.text, out_filter) if structure.calls and r.finish_reason != "length" else None
        if calls is not None:  # a message with tool calls instead of content
            choices.append(({"content": None, "tool_calls": calls}, "tool_calls"))
        else:
            choices.append((out_filter.apply(r.text)[0], P.finish_reason(r.finish_reason)))
    completion_tokens = sum(len(r.token_ids) for r in results)
    _account(state, info, requested, completion_tokens, choices[0][1],
             "".join(t if isinstance(t, str) else json.dumps(t["tool_calls"]) for t, _ in choices))
    prompt_of = [i for i in range(len(prompts)) for _ in range(body.n)]  # choice -> its prompt
    if scoring.echo is not None:
        choices = [(scoring.echo[prompt_of[k]] + text, reason) for k, (text, reason) in enumerate(choices)]
    logprobs = None
    if scoring.logprobs is not None:
        piece = _token_text(state)
        if chat:
            logprobs = [P.chat_logprobs(r.logprobs, piece) for r in results]
        else:
            # Every token the model chose, the end token too (its text is not in the completion):
            # lm-eval's loglikelihood sends max_tokens 1 and drops the last entry as the generated one.
            logprobs = [P.completion_logprobs((r.prompt_logprobs or []) + r.logprobs
                                              + ([r.end_logprob] if r.end_logprob is not None else []),
                                              piece(prompts[prompt_of[k]][0]) if scoring.echo is not None else None,
                                              piece) for k, r in enumerate(results)]
    build = P.chat_response if chat else P.completion_response
    return JSONResponse(build(rid, body.model, choices, info["prompt_tokens"], completion_tokens, logprobs))


def _token_text(state: ServerState) -> Callable[[int], str]:
    """Token id -> its text, as logprobs show it (a token holding part of a multi-byte
    character shows U+FFFD), cached per request."""
    decode = state.loaded.tokenizer.decode
    return functools.lru_cache(maxsize=4096)(lambda token: decode([token]))


def _account(state: ServerState, info: dict, requested: int, completion_tokens: int, reason: str, text: str) -> None:
    info["completion_tokens"] = completion_tokens
    info["finish_reason"] = reason
    if state.cfg.log_prompts:
        info["completion"] = text
    state.metrics.tokens.labels("completion").inc(completion_tokens)
    # The bucket was charged for the whole budget up front; give back what was not generated.
    state.limiter.refund(info["key_id"], max(0, requested - info["prompt_tokens"] - completion_tokens))


def _sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _stream(state: ServerState, request: Request, body: P._Sampling, handles: list[Any], rid: str,
                  chat: bool, requested: int, structure: C.Structure, scoring: Scoring) -> AsyncIterator[bytes]:
    """SSE in OpenAI's format: one chunk per text delta per choice, a last chunk with the
    finish reason, an optional usage chunk, then [DONE]. A client that disconnects makes
    Starlette cancel this generator: the handles are cancelled and their slots freed.
    With logprobs, each chunk carries those of the tokens whose text it sends (held-back
    text's tokens go with the chunk that sends it, the rest with the finish chunk): the
    chunks' logprobs concatenate to the non-streamed response's."""
    info = request.state.info
    model = body.model  # the base or an adapter: checked by _generate
    kind = "chat.completion.chunk" if chat else "text_completion"
    started = time.perf_counter()
    first = True
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle: Any) -> None:
        try:
            async for item in handle:
                await queue.put((index, item))
        except Exception as exc:  # noqa: BLE001 - the engine failed this request: told below
            await queue.put((index, exc))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    filters = [StreamFilter(state.cfg.output_filter) for _ in handles]
    out_filter = OutputFilter(state.cfg.output_filter)
    calls = [C.CallStream() for _ in handles] if structure.calls else None
    scored = scoring.logprobs is not None
    piece = _token_text(state) if scored else None
    pending: list[list[Any]] = [[] for _ in handles]  # per choice: logprobs not sent yet
    taken, offsets = [0] * len(handles), [0] * len(handles)  # logprobs seen in deltas; text_offset so far

    def chunk(index: int, delta: dict[str, Any] | str, reason: str | None = None) -> bytes:
        logprobs = None
        if pending[index]:
            entries, pending[index] = pending[index], []
            if chat:
                logprobs = P.chat_logprobs(entries, piece)
            else:
                logprobs = P.completion_logprobs(entries, None, piece, offset=offsets[index])
                offsets[index] += sum(len(t) for t in logprobs["tokens"])
        if chat:
            return _sse(P.chat_chunk(rid, model, index, delta, reason, logprobs))
        return _sse(P.completion_chunk(rid, model, index, delta, reason, logprobs))

    completion_tokens, texts, open_count = 0, [""] * len(handles), len(handles)
    reason = "stop"
    deadline = started + state.cfg.request_timeout_s
    try:
        if chat:
            for i in range(len(handles)):
                yield _sse(P.chat_chunk(rid, model, i, {"role": "assistant", "content": ""}, None))
        while open_count:
            try:
                index, item = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.perf_counter()))
            except asyncio.TimeoutError:
                info["error"] = "timeout"
                yield _sse(P.error_body(f"generation took longer than {state.cfg.request_timeout_s:g} s",
                                        "server_error", code="timeout"))
                return
            if item is None:
                open_count -= 1
                continue
            if isinstance(item, GrammarError):  # the schema's grammar hit one of its limits mid-reply
                info["error"] = "invalid_schema"
                yield _sse(P.error_body(f"response_format / tools: {item}", "invalid_request_error",
                                        code="invalid_schema"))
                return
            if isinstance(item, Exception):  # the 200 is sent: the failure goes in the stream
                info["error"] = type(item).__name__
                _log_internal_error(request.url.path, item)
                yield _sse(P.error_body("internal error", "server_error"))
                return
            called = None
            if isinstance(item, str):
                if scored:
                    pending[index] += getattr(item, "logprobs", [])
                    taken[index] += len(getattr(item, "logprobs", []))
                delta = filters[index].feed(calls[index].feed(item) if calls else item)
                if first:
                    state.metrics.ttft.observe(time.perf_counter() - started)
                    first = False
            else:  # the GenerationResult: flush what the filters held back, then finish
                held, called = calls[index].finish(out_filter, cut=item.finish_reason == "length") if calls \
                    else ("", None)
                delta = filters[index].feed(held) + filters[index].flush()
                completion_tokens += len(item.token_ids)
                reason = "tool_calls" if called else P.finish_reason(item.finish_reason)
                if scored:  # the rest: held-back text's tokens and, in completions, the end token
                    pending[index] += item.logprobs[taken[index]:]
                    if not chat and item.end_logprob is not None:
                        pending[index].append(item.end_logprob)
            if called:
                texts[index] += json.dumps(called)
                yield chunk(index, {"tool_calls": [{"index": k, **c} for k, c in enumerate(called)]})
            if delta:
                texts[index] += delta
                yield chunk(index, {"content": delta} if chat else delta)
            if not isinstance(item, str):
                yield chunk(index, {} if chat else "", reason)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield _sse(P.usage_chunk(rid, model, kind, info["prompt_tokens"], completion_tokens))
        yield _sse("[DONE]")
    finally:
        for h in handles:
            h.cancel()  # no-op for finished requests; frees the slot of an abandoned one
        for t in tasks:
            t.cancel()
        _account(state, info, requested, completion_tokens, reason, "".join(texts))
