"""The scheduler's gRPC frontend: GenerationService, health, reflection, auth, TLS and draining.

The servicer is thin: it maps requests with `api_codec`, hands them to the Engine and streams the
engine's updates back. Health reports SERVING only while every executor rank serves. On SIGTERM the
server stops taking requests (UNAVAILABLE, health NOT_SERVING), lets live requests finish for up to
`shutdown_grace_seconds`, aborts what is left, and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pagedserve.default_model import default_model_dir
from pagedserve.errors import InvalidArgumentError, RequestErrorKind
from pagedserve.gc_policy import settle_heap
from pagedserve.grpc_decoding import DecodeErrorInterceptor
from pagedserve.metrics_http import start_metrics_server
from pagedserve.model_label import model_label
from pagedserve.model_source import TOKENIZER_FILES, resolve_model
from pagedserve.v1 import generation_pb2 as pb
from pagedserve.v1 import generation_pb2_grpc
from scheduler_svc import request_log
from scheduler_svc.api_codec import ParsedRequest, parse_request, response_to_proto
from scheduler_svc.config import SchedulerServiceConfig, ServingConfig
from scheduler_svc.engine import Engine, QueueFullError, ShuttingDownError, UnavailableError
from scheduler_svc.frontend import TokenizerThread, follow
from scheduler_svc.http_server import HttpServer
from scheduler_svc.metrics import SchedulerMetrics
from scheduler_svc.openai_api import build_app
from scheduler_svc.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("pagedserve.scheduler")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
PENDING_CALLS_FLOOR = 65536
_ERROR_CODES = {
    RequestErrorKind.TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
    RequestErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    RequestErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}
_SUBMIT_ERRORS: dict[type[Exception], grpc.StatusCode] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    ShuttingDownError: grpc.StatusCode.UNAVAILABLE,
}


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    """Generate, Abort and GetModelInfo over the engine."""

    def __init__(self, engine: Engine, config: ServingConfig, tokenizer_thread: TokenizerThread) -> None:
        self._engine = engine
        self._config = config
        self._tokenizer_thread = tokenizer_thread

    def _parse(self, request: pb.GenerateRequest) -> Awaitable[ParsedRequest]:
        return self._tokenizer_thread.run(parse_request, request, self._tokenizer_thread.encode_function())

    async def _reject(self, context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str,
                      request_id: str) -> None:
        log_request_refused(request_id, code, message)
        self._engine.metrics.record_request_rejected(code.name)
        await context.abort(code, message)

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext[pb.GenerateRequest, pb.GenerateResponse],
                       ) -> AsyncIterator[pb.GenerateResponse]:
        """Queue the request and stream its updates; a cancelled call aborts the request."""
        size = request.ByteSize()
        if size > self._config.max_request_bytes:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT,
                               f"request: is {size} bytes, more than the server's limit of "
                               f"{self._config.max_request_bytes} (max_request_bytes)", request.request_id)
        try:
            parsed = await self._parse(request)
            stream = self._engine.submit(parsed.request_id, parsed.prompt_token_ids, parsed.params,
                                         parsed.skip_special_tokens)
        except tuple(_SUBMIT_ERRORS) as err:
            await self._reject(context, _SUBMIT_ERRORS[type(err)], str(err), request.request_id)
            return
        # Closing `follow` aborts the request when the client went away or the call was cancelled.
        async with contextlib.aclosing(follow(self._engine, stream)) as updates:
            async for update in updates:
                if update.error is not None:
                    kind, message = update.error
                    log.warning("request %s failed: %s: %s", stream.request_id, _ERROR_CODES[kind].name,
                                message)
                    await context.abort(_ERROR_CODES[kind], message)
                yield response_to_proto(stream.request_id, update)

    async def Abort(self, request: pb.AbortRequest,
                    context: grpc.aio.ServicerContext[pb.AbortRequest, pb.AbortResponse]) -> pb.AbortResponse:
        """Abort a live request by id."""
        return pb.AbortResponse(found=self._engine.abort(request.request_id))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext[pb.GetModelInfoRequest, pb.ModelInfo],
                           ) -> pb.ModelInfo:
        """The served model and its KV capacity (UNAVAILABLE until the executors answered)."""
        info = self._engine.info
        if info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no executor is serving yet")
        assert info is not None
        return pb.ModelInfo(model_name=info.model_name, max_model_len=info.max_model_len,
                            block_size=info.block_size, kv_capacity_tokens=info.kv_capacity_tokens,
                            num_gpu_blocks=info.num_gpu_blocks, num_cpu_blocks=info.num_cpu_blocks,
                            vocab_size=info.vocab_size, eos_token_ids=info.eos_token_ids,
                            world_size=info.world_size)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on GenerationService calls.

    Health and reflection stay open so that load balancers and `grpcurl list` work without it.
    """

    def __init__(self, token: str, on_reject: Callable[[], None]) -> None:
        self._expected = f"Bearer {token}".encode()
        self._on_reject = on_reject

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: Any) -> Any:
        """Pass authorized calls on; answer the others with UNAUTHENTICATED."""
        handler = await continuation(handler_call_details)
        if not handler_call_details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = str(metadata.get("authorization", "")).encode()
        if hmac.compare_digest(given, self._expected):
            return handler
        self._on_reject()
        return _denying_handler(handler)


def log_request_refused(request_id: str, code: grpc.StatusCode, message: str) -> None:
    """The one log line of a request the frontend refused before it reached the scheduler."""
    request_log.log_request_refused(request_id, code.name, message)


def _denying_handler(handler: Any) -> Any:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""
    async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        message = ("authorization: send metadata 'authorization: Bearer <token>' with the server's "
                   "access token")
        log_request_refused(getattr(request, "request_id", ""), grpc.StatusCode.UNAUTHENTICATED, message)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def _server_options(config: SchedulerServiceConfig) -> list[tuple[str, int]]:
    # gRPC's own limit sits above max_request_bytes so that an oversized request reaches Generate and
    # gets INVALID_ARGUMENT naming the limit rather than a bare RESOURCE_EXHAUSTED from the transport.
    limit = max(4 * config.serving.max_request_bytes, 64 * 2**20)
    # gRPC core holds calls that arrived before the server asked for the next one, and past 1,000 of
    # them (its default) it resets a growing share of new ones, all past 3,000: a burst of requests
    # sent at once then lost some as a bare CANCELLED that no handler saw. The queue limit is ours to
    # enforce (max_waiting_requests, RESOURCE_EXHAUSTED), so core's backlog is sized well above it.
    running = config.scheduling.max_num_seqs
    backlog = max(PENDING_CALLS_FLOOR, 4 * (config.serving.max_waiting_requests + running))
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", 256 * 2**20),
            ("grpc.server.max_pending_requests", backlog),
            ("grpc.server.max_pending_requests_hard_limit", backlog)]


def _bind(server: grpc.aio.Server, config: ServingConfig) -> int:
    if config.tls_cert_file:
        credentials = grpc.ssl_server_credentials(
            [(Path(config.tls_key_file).read_bytes(), Path(config.tls_cert_file).read_bytes())])
        port = server.add_secure_port(config.address, credentials)
    else:
        port = server.add_insecure_port(config.address)
    if port == 0:
        raise OSError(f"cannot listen on {config.address}")
    return port


def _tokenizer(serving: ServingConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of --tokenizer (default: --model), a directory or a repo id resolved from the hub
    cache at --revision as the executors resolve the weights; InvalidArgumentError names the flag."""
    field = "tokenizer" if serving.tokenizer else "model"
    source = serving.tokenizer or serving.model or default_model_dir()
    try:
        return load_tokenizer(resolve_model(source, serving.revision, TOKENIZER_FILES))
    except (OSError, ValueError) as err:
        raise InvalidArgumentError(field, f"cannot load a tokenizer from {source}: {err}") from err


class SchedulerServer:
    """The frontend, the engine and the metrics endpoint of one scheduler process."""

    def __init__(self, config: SchedulerServiceConfig) -> None:
        self.config = config
        self.metrics = SchedulerMetrics(model_name=model_label(config.serving.served_model_name,
                                                               config.serving.model))
        tokenizer = _tokenizer(config.serving)
        self.health = health.aio.HealthServicer()
        self.engine = Engine(config, tokenizer, self.metrics, self._serving_changed)
        self.tokenizer_thread = TokenizerThread(tokenizer)
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if config.serving.auth_token:
            interceptors.append(BearerTokenInterceptor(
                config.serving.auth_token, lambda: self.metrics.record_request_rejected("UNAUTHENTICATED")))
        # After auth: an unauthenticated call is refused as such, whatever its bytes.
        interceptors.append(DecodeErrorInterceptor(self._count_undecodable))
        self.server = grpc.aio.server(options=_server_options(config), interceptors=interceptors)
        servicer = GenerationServicer(self.engine, config.serving, self.tokenizer_thread)
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME],
                                            self.server)
        self.port = 0
        self.metrics_port: int | None = None
        # The OpenAI-compatible HTTP API, on the same loop and over the same engine (http_port 0: none).
        self.http: HttpServer | None = None
        if config.serving.http_port:
            serving = config.serving
            app = build_app(self.engine, self.tokenizer_thread, serving)
            self.http = HttpServer(app, serving.host, serving.http_port, serving.tls_cert_file,
                                   serving.tls_key_file)
        self._health_tasks: set[asyncio.Task[None]] = set()

    def _count_undecodable(self, method: str) -> None:
        if method.startswith(f"/{SERVICE_NAME}/"):      # health and reflection calls are not requests
            self.metrics.record_request_rejected("INVALID_ARGUMENT")

    def _serving_changed(self, serving: bool) -> None:
        states = health_pb2.HealthCheckResponse
        status = states.SERVING if serving else states.NOT_SERVING
        task = asyncio.get_running_loop().create_task(self._set_health(status))
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
        """Listen (health NOT_SERVING), then connect the executors in the background."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.http is not None:
            # First: its port is fixed, and the ports picked by the OS below could land on it.
            await self.http.start()
        self.port = _bind(self.server, self.config.serving)
        await self.server.start()
        if self.config.serving.metrics_port >= 0:
            self.metrics_port = start_metrics_server(self.metrics.registry, self.config.serving.host,
                                                     self.config.serving.metrics_port)
        scheme = "tls" if self.config.serving.tls_cert_file else "insecure"
        log.info("pagedserve-scheduler listening on %s:%d (%s)", self.config.serving.host, self.port, scheme)
        if self.metrics_port is not None:
            log.info("metrics on http://%s:%d/metrics", self.config.serving.host, self.metrics_port)
        if self.http is not None:
            log.info("http on %s://%s:%d (OpenAI-compatible API)", self.http.scheme, self.config.serving.host,
                     self.http.port)

    async def drain_and_stop(self) -> None:
        """Refuse new requests, let live ones finish within the grace period, then stop."""
        engine = self.engine
        engine.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = asyncio.get_running_loop().time() + self.config.serving.shutdown_grace_seconds
        if engine.streams:
            log.info("draining %d live request(s) for up to %.0f s", len(engine.streams),
                     self.config.serving.shutdown_grace_seconds)
        while engine.streams and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await engine.stop()
        await self.stop_servers(grace=1.0)

    async def stop_servers(self, grace: float) -> None:
        """Stop listening on gRPC and HTTP; calls still open get `grace` seconds."""
        if self.http is not None:
            await self.http.stop(grace)
        await self.server.stop(grace=grace)
        self.tokenizer_thread.close()


async def serve(config: SchedulerServiceConfig) -> int:
    """Serve until SIGTERM or SIGINT; returns the process exit code."""
    server = SchedulerServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    startup = asyncio.create_task(server.engine.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({startup, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if startup.done() and startup.exception() is not None:
        log.error("cannot start: %s", startup.exception())
        await server.stop_servers(grace=0)
        return 1
    if startup.done():
        settle_heap()                   # the tokenizer and every module are loaded: freeze them
    await stopping
    log.info("shutting down")
    startup.cancel()
    await server.drain_and_stop()
    return 0
