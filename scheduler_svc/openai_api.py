"""The OpenAI-compatible HTTP API's routes (FastAPI), served by uvicorn beside the gRPC API.

    POST /v1/completions, POST /v1/chat/completions   (OpenAI's; `stream: true` answers with SSE)
    GET  /v1/models                                   (the served model)
    GET  /health                                      (200 while the engine serves, else 503)
    POST /tokenize, POST /detokenize, GET /version    (vLLM's)

The routes are thin: bodies are read within `max_request_bytes` and parsed by the pydantic models of
`openai_schemas`, the work is `openai_serving`'s, and every error is OpenAI's error object
(`openai_errors`). With `auth_token` set, every route but /health and /version needs
`Authorization: Bearer <token>`. A client that goes away mid-request aborts its engine requests.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from pagedserve.errors import InvalidArgumentError
from scheduler_svc.chat_template import ChatRenderer, load_chat_template
from scheduler_svc.config import ServingConfig
from scheduler_svc.engine import Engine
from scheduler_svc.frontend import TokenizerThread
from scheduler_svc.openai_errors import OpenAIError, bad_request, from_submit_error, not_serving, unauthorized
from scheduler_svc.openai_mapping import template_messages
from scheduler_svc.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from scheduler_svc.openai_serving import EventStream, OpenAIServing
from scheduler_svc.request_log import log_request_refused

log = logging.getLogger("pagedserve.http")
M = TypeVar("M", bound=BaseModel)


class EventStreamResponse(StreamingResponse):
    """A Server-Sent Events answer whose engine requests are aborted however it ends.

    Starlette cancels the body when the client disconnects; closing the EventStream afterwards also
    covers a body that never started and a disconnect seen only as a failed write.
    """

    def __init__(self, events: EventStream) -> None:
        super().__init__(aiter(events), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the events; abort what is left when the client went away."""
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            log.debug("a streaming client went away")
        finally:
            await self._events.aclose()


def build_app(engine: Engine, tokenizer_thread: TokenizerThread, config: ServingConfig) -> FastAPI:
    """The HTTP API over `engine`; raises InvalidArgumentError when the chat template file is unreadable."""
    renderer = ChatRenderer(tokenizer_thread.tokenizer, load_chat_template(config.chat_template))
    serving = OpenAIServing(engine, tokenizer_thread, renderer)
    app = FastAPI(title="PagedServe OpenAI-compatible API", version=_version())
    _add_error_handlers(app, engine)
    auth = [Depends(_bearer_token(config.auth_token))] if config.auth_token else []
    limit = config.max_request_bytes
    started = int(time.time())

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        """OpenAI's completions."""
        body = await parse_body(request, CompletionRequest, limit)
        return await _answer(request, serving.completion(body))

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        """OpenAI's chat completions."""
        body = await parse_body(request, ChatCompletionRequest, limit)
        return await _answer(request, serving.chat(body))

    @app.get("/v1/models", dependencies=auth)
    async def models() -> ModelList:
        """The served model."""
        info = engine.info
        if info is None:
            raise not_serving()
        return ModelList(data=[ModelCard(id=info.model_name, created=started, root=config.model,
                                         max_model_len=info.max_model_len)])

    @app.get("/health")
    async def health() -> Response:
        """200 while the engine serves; 503 before the executors answer, while they are lost, and
        while the server drains."""
        if engine.serving and not engine.draining:
            return JSONResponse({"status": "serving"})
        raise not_serving("not serving: no executor serves, or the server is shutting down")

    @app.get("/version")
    async def version() -> dict[str, str]:
        """This server's version."""
        return {"version": _version()}

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(request: Request) -> TokenizeResponse:
        """Token ids of a prompt, or of messages rendered with the chat template."""
        body = await parse_body(request, TokenizeRequest, limit)
        info = engine.info
        if info is None:
            raise not_serving()
        tokens = await _tokenize(tokenizer_thread, renderer, body)
        return TokenizeResponse(count=len(tokens), max_model_len=info.max_model_len, tokens=tokens)

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(request: Request) -> DetokenizeResponse:
        """The text of token ids."""
        body = await parse_body(request, DetokenizeRequest, limit)
        vocab_size = engine.info.vocab_size if engine.info is not None else len(tokenizer_thread.tokenizer)
        bad = next((t for t in body.tokens if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise bad_request("tokens", f"token id {bad} is outside the vocabulary [0, {vocab_size})")
        text = await tokenizer_thread.run(tokenizer_thread.tokenizer.decode, body.tokens)
        return DetokenizeResponse(prompt=text)

    return app


async def parse_body(request: Request, model: type[M], limit: int) -> M:
    """The request's JSON body as `model`; 400 naming the field for a body that does not fit it, and
    for one longer than `limit` bytes."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise bad_request(None, f"request: is more than the server's limit of {limit} bytes "
                              "(max_request_bytes)")
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = f"{where}: {first['msg']}" if where else first["msg"]
        raise OpenAIError(400, message, param=str(first["loc"][0]) if first["loc"] else None,
                          grpc_code="INVALID_ARGUMENT") from None


async def _answer(request: Request, work: Awaitable[BaseModel | EventStream]) -> Response:
    """The work's answer as JSON or as an event stream; a client that goes away first cancels it."""
    task = asyncio.ensure_future(work)
    if not await _finished_before_disconnect(request, task):
        return Response(status_code=499)        # nobody reads it; 499 is what proxies log for it
    answer = task.result()
    if isinstance(answer, EventStream):
        return EventStreamResponse(answer)
    return Response(answer.model_dump_json(), media_type="application/json")


async def _finished_before_disconnect(request: Request, task: asyncio.Future[Any]) -> bool:
    """Wait for `task`; if the client disconnects first, cancel it (which aborts its engine requests)."""
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task.done():
        return True
    task.cancel()
    log.debug("a client went away before its answer")
    return False


async def _disconnected(request: Request) -> None:
    """Return once the client has disconnected (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _tokenize(tokenizer_thread: TokenizerThread, renderer: ChatRenderer,
                    body: TokenizeRequest) -> list[int]:
    try:
        if body.messages is not None:
            return await tokenizer_thread.run(renderer.encode, template_messages(body.messages),
                                              body.add_generation_prompt)
        if body.prompt is None:
            raise InvalidArgumentError("prompt", "give a prompt or messages")
        tokenizer = tokenizer_thread.tokenizer
        ids = await tokenizer_thread.run(lambda: tokenizer(body.prompt,
                                                           add_special_tokens=body.add_special_tokens).input_ids)
        return list(ids)
    except InvalidArgumentError as err:
        raise from_submit_error(err) from err


def _bearer_token(token: str) -> Callable[[Request], None]:
    expected = f"Bearer {token}".encode()

    def require_token(request: Request) -> None:
        """Refuse a call without the server's bearer token (401)."""
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise unauthorized()

    return require_token


def _add_error_handlers(app: FastAPI, engine: Engine) -> None:
    """Every error as OpenAI's error object; refusals are counted and logged as the gRPC frontend's."""

    async def openai_error(request: Request, err: Exception) -> Response:
        assert isinstance(err, OpenAIError)
        if err.grpc_code is not None:
            engine.metrics.record_request_rejected(err.grpc_code)
            log_request_refused("", err.grpc_code, f"{request.url.path} HTTP {err.status}: {err.message}")
        return JSONResponse(err.body(), status_code=err.status)

    async def http_error(request: Request, err: Exception) -> Response:
        assert isinstance(err, StarletteHTTPException)
        body = OpenAIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}").body()
        return JSONResponse(body, status_code=err.status_code, headers=getattr(err, "headers", None))

    async def unexpected(request: Request, err: Exception) -> Response:
        log.exception("HTTP %s %s failed", request.method, request.url.path, exc_info=err)
        body = OpenAIError(500, f"internal error: {err!r}", "internal_error").body()
        return JSONResponse(body, status_code=500)

    app.add_exception_handler(OpenAIError, openai_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _version() -> str:
    try:
        return importlib.metadata.version("pagedserve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
