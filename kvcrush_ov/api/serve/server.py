"""The OpenAI-compatible HTTP app: a thin translation of HTTP requests into engine-loop handles.

    /v1/completions, /v1/chat/completions (JSON or SSE streaming), /v1/models, /health, /metrics

No scheduling happens here: a request becomes one `ContinuousBatchingPipeline.add_request`, its
handle's outputs become the response (or SSE events), and a client that goes away cancels its handle,
which frees its KV blocks before the next engine step. Bad input is a 400 with an OpenAI error object
and one log line; so is a request the KV pool can never hold (without eviction: with it, such a
prompt runs memory-bounded).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from ..continuous_batching import ContinuousBatchingPipeline
from ..generation_handle import GenerationFinishReason, GenerationHandle, GenerationStatus
from ...core.errors import KVCrushError
from .metrics import metrics_registry, render_metrics
from .protocol import ChatRequest, CompletionRequest, _Sampling, chat_prompt, completion_prompt

log = logging.getLogger("kvcrush_ov.api.serve")
DISCONNECT_POLL_S = 0.1


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
    return (f"{loc}: {e.get('msg')}" if loc else str(e.get("msg"))), loc or None


class ReplicaHeader:
    """Pure ASGI middleware naming the replica in each response (BaseHTTPMiddleware would hide client
    disconnects from the endpoint)."""

    def __init__(self, app, replica: str) -> None:
        self.app, self.header = app, (b"x-kvcrush-replica", replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)


def create_app(pipe: ContinuousBatchingPipeline, model_name: str, replica: str | None = None) -> FastAPI:
    """The app for one pipeline. `replica` names this process in an `x-kvcrush-replica` header."""
    replica = replica or f"{socket.gethostname()}:{os.getpid()}"
    registry = metrics_registry(pipe)
    max_position = pipe.engine.runner.max_position

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(pipe.close)  # cancel what is in flight on shutdown

    app = FastAPI(title="kvcrush-ov", version="0.1.0", lifespan=lifespan)

    app.add_middleware(ReplicaHeader, replica=replica)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc.errors())
        log.warning("400 %s: %s", request.url.path, message)
        return error_response(400, message, param=param)

    @app.exception_handler(HTTPError)
    async def on_http_error(request: Request, exc: HTTPError):
        log.warning("%d %s: %s", exc.status, request.url.path, exc.message)
        return error_response(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.error("500 %s: %s", request.url.path, message)
        return error_response(500, message, "server_error")

    @app.get("/health")
    async def health() -> dict:
        m = pipe.get_metrics().engine
        return {"status": "ok", "running": m.running, "waiting": m.waiting, "kv_blocks_used": m.kv_blocks_used}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = render_metrics(registry)
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "kvcrush-ov", "max_model_len": max_position}]}

    async def parse(request: Request, kind: type[_Sampling]) -> _Sampling:
        raw = await request.body()
        try:
            return kind.model_validate_json(raw or b"{}")
        except ValidationError as e:
            message, param = _validation_message(e.errors())
            raise HTTPError(400, message, param=param) from None

    async def submit(body: _Sampling, ids_of) -> GenerationHandle:
        """Validate and queue one request; engine errors become 400."""
        if body.model not in (None, "", model_name):
            raise HTTPError(400, f"unknown model {body.model!r}; this server serves {model_name!r}",
                            param="model")
        try:
            body.unsupported()
            ids = ids_of(body)
            default_max = body.max_tokens or getattr(body, "max_completion_tokens", None)
            if default_max is None:  # OpenAI's defaults: 16 for completions, "until done" for chat
                default_max = 16 if isinstance(body, CompletionRequest) else pipe.get_config().max_new_tokens
                if max_position:
                    default_max = max(1, min(default_max, max_position - len(ids)))
            config = body.generation_config(pipe.get_config(), default_max)
            eviction = body.eviction()
            return await asyncio.to_thread(
                lambda: pipe.loop.add([(uuid.uuid4().hex, ids, config, eviction)], text=body.stream)[0])
        except KVCrushError as e:  # a request the pool can never hold (CacheCapacityError) included: not worth retrying
            raise HTTPError(400, str(e)) from None

    async def wait_or_cancel(handle: GenerationHandle, request: Request) -> None:
        """Wait for the end; cancel the request if the client disconnects first."""
        done = asyncio.ensure_future(_drain(handle))
        try:
            while not done.done():
                await asyncio.wait({done}, timeout=DISCONNECT_POLL_S)
                if not done.done() and await request.is_disconnected():
                    handle.cancel(wait=False)
                    break
        finally:
            if not handle.finished:
                handle.cancel(wait=False)
            await done

    def usage(handle: GenerationHandle) -> dict:
        seq = handle.sequence
        n = len(seq.output_ids)
        return {"prompt_tokens": seq.num_prompt_tokens, "completion_tokens": n, "total_tokens": seq.num_prompt_tokens + n}

    def kv_cache(handle: GenerationHandle) -> dict:
        """What the request's KV cost and which eviction path it took (an extension field)."""
        seq, bpt = handle.sequence, pipe.engine.kv_bytes_per_token
        return {"eviction_mode": seq.eviction_mode, "peak_kv_bytes": seq.metrics.peak_kv_slots * bpt,
                "evictions": seq.metrics.evictions}

    def check_failed(handle: GenerationHandle) -> None:
        if handle.get_status() is GenerationStatus.FAILED:
            raise HTTPError(500, handle.error or "the request failed", "server_error")

    async def respond(body: _Sampling, request: Request, chat: bool, ids_of):
        handle = await submit(body, ids_of)
        rid = ("chatcmpl-" if chat else "cmpl-") + handle.request_id
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(handle, rid, created, model_name, chat, include_usage, usage),
                                     media_type="text/event-stream")
        await wait_or_cancel(handle, request)
        check_failed(handle)
        [out] = handle.read_all()
        reason = openai_finish_reason(out.finish_reason)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out.text}, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": out.text, "finish_reason": reason, "logprobs": None}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name, "choices": [choice], "usage": usage(handle), "kv_cache": kv_cache(handle)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        return await respond(body, request, False, lambda b: completion_prompt(b, pipe.tokenizer))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(request, ChatRequest)
        if body.max_tokens is None and body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await respond(body, request, True, lambda b: chat_prompt(b, pipe.tokenizer))

    return app


def openai_finish_reason(reason: GenerationFinishReason) -> str:
    """OpenAI's finish_reason: "length" when max_tokens ended the request, else "stop"."""
    return "length" if reason is GenerationFinishReason.LENGTH else "stop"


async def _drain(handle: GenerationHandle) -> None:
    async for _ in handle.astream():
        pass


async def _sse(handle: GenerationHandle, rid: str, created: int, model: str, chat: bool, include_usage: bool,
               usage) -> AsyncIterator[str]:
    """SSE events of one request; leaving early (client gone) cancels it."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(delta: Any, reason: str | None) -> str:
        choice = ({"index": 0, "delta": delta, "finish_reason": reason} if chat else
                  {"index": 0, "text": delta, "finish_reason": reason, "logprobs": None})
        return f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': model, 'choices': [choice]})}\n\n"

    try:
        if chat:
            yield event({"role": "assistant", "content": ""}, None)
        async for out in handle.astream():
            reason = None
            if handle.finished and out.finish_reason is not GenerationFinishReason.NONE:
                reason = openai_finish_reason(out.finish_reason)
            if handle.get_status() is GenerationStatus.FAILED:
                message = handle.error or "the request failed"
                log.error("request %s failed: %s", rid, message)
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error', 'param': None, 'code': 500}})}\n\n"
                break
            if out.text or reason:
                yield event({"content": out.text} if chat else out.text, reason)
        if include_usage and handle.get_status() is not GenerationStatus.FAILED:
            yield (f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': model, 'choices': [], 'usage': usage(handle)})}\n\n")
        yield "data: [DONE]\n\n"
    finally:
        if not handle.finished:
            handle.cancel(wait=False)
