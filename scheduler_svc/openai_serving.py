"""The OpenAI-compatible endpoints' work: requests onto the engine, updates into OpenAI's objects.

Every prompt becomes one engine request through `Engine.submit`, exactly as a gRPC Generate call does,
and its RequestStream is read with `frontend.follow` (which aborts the request when the reader leaves).
A completion with several prompts runs them side by side; choice `i` of prompt `p` is choice
`p * n + i` of the answer, as in OpenAI's API. Streams are Server-Sent Events: one `data: {json}`
event per update, a usage chunk when asked (`stream_options.include_usage`), then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from pagedserve.errors import InvalidArgumentError
from scheduler_svc.chat_template import ChatRenderer
from scheduler_svc.engine import Engine
from scheduler_svc.frontend import TokenizerThread, follow
from scheduler_svc.openai_errors import (
    SUBMIT_ERRORS,
    OpenAIError,
    bad_request,
    from_request_error,
    from_submit_error,
    not_serving,
)
from scheduler_svc.openai_mapping import (
    CompletionLogprobsWriter,
    chat_logprobs,
    chat_sampling_fields,
    completion_sampling_fields,
    finish_reason,
    stop_reason,
    template_messages,
    usage_info,
)
from scheduler_svc.openai_schemas import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    SamplingFields,
)
from scheduler_svc.request_stream import ChoiceUpdate, RequestStream, StreamUpdate
from scheduler_svc.sampling_params import SamplingParams, sampling_params_from_fields

DONE_EVENT = "data: [DONE]\n\n"


def sse_event(payload: BaseModel | dict[str, Any]) -> str:
    """One Server-Sent Event carrying `payload` as JSON."""
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {json.dumps(payload)}\n\n"


@dataclass(frozen=True, slots=True)
class Prompt:
    """One prompt of a request: its token ids, and its text when echo needs it."""

    token_ids: list[int]
    text: str = ""


@dataclass(slots=True)
class _Job:
    """An accepted request: its id, model, parameters and engine streams (one per prompt)."""

    id: str
    model: str
    created: int
    params: SamplingParams
    prompts: list[Prompt]
    streams: list[RequestStream]


class EventStream:
    """The body of a streamed answer: its events, and the engine requests behind them.

    `aclose` ends the events and aborts what still runs, also when nobody read a single event (an
    async generator that never started runs no `finally`).
    """

    def __init__(self, events: AsyncIterator[str], engine: Engine, job: _Job) -> None:
        self._events = events
        self._engine = engine
        self._job = job

    def __aiter__(self) -> AsyncIterator[str]:
        """The events, in order."""
        return self._events

    async def aclose(self) -> None:
        """Stop the events and abort every request of the answer that has not finished."""
        await self._events.aclose()  # type: ignore[attr-defined]
        for stream in self._job.streams:
            if not stream.finished:
                self._engine.abort(stream.request_id)


class OpenAIServing:
    """Runs completions and chat completions on the engine for the HTTP routes."""

    def __init__(self, engine: Engine, tokenizer_thread: TokenizerThread, renderer: ChatRenderer) -> None:
        self.engine = engine
        self.tokenizer_thread = tokenizer_thread
        self.renderer = renderer

    # ---- model -----------------------------------------------------------------------------------

    def model_name(self) -> str:
        """The served model's name; 503 until the executors answered."""
        info = self.engine.info
        if info is None:
            raise not_serving()
        return info.model_name

    def check_model(self, requested: str | None) -> str:
        """The served model's name; 404 when the request names another model."""
        name = self.model_name()
        if requested and requested != name:
            raise OpenAIError(404, f"model: the model {requested!r} does not exist; this server serves "
                              f"{name!r}", "invalid_request_error", "model", "model_not_found",
                              "INVALID_ARGUMENT")
        return name

    # ---- completions -----------------------------------------------------------------------------

    async def completion(self, req: CompletionRequest) -> CompletionResponse | EventStream:
        """A completion, or its event stream when `req.stream`."""
        model = self.check_model(req.model)
        values, names = _mapped(completion_sampling_fields, req)
        names |= {"prompt.token_ids": "prompt"}
        params = _params(values, names)
        prompts = await self.tokenizer_thread.run(self._completion_prompts, req)
        job = self._submit(f"cmpl-{uuid.uuid4().hex}", model, params, prompts, req, names)
        if req.stream:
            return EventStream(self._completion_events(job, req), self.engine, job)
        return await self._completion_whole(job, req)

    def _completion_prompts(self, req: CompletionRequest) -> list[Prompt]:
        """The prompts of a completion request as token ids, with their text for echo (tokenizer thread)."""
        prompt = req.prompt
        items: Sequence[Any] = [prompt] if isinstance(prompt, str) or _is_token_list(prompt) else prompt
        if not items:
            raise bad_request("prompt", "must not be empty")
        encode = self.tokenizer_thread.encode_function()
        tokenizer = self.tokenizer_thread.tokenizer
        prompts = []
        for item in items:
            if isinstance(item, str):
                if not item:
                    raise bad_request("prompt", "must not be empty")
                prompts.append(Prompt(encode(item), item))
            else:
                text = tokenizer.decode(item, skip_special_tokens=req.skip_special_tokens) if req.echo else ""
                prompts.append(Prompt(list(item), text))
        return prompts

    async def _completion_whole(self, job: _Job, req: CompletionRequest) -> CompletionResponse:
        results = await self._collect(job)
        choices = []
        for p, update in enumerate(results):
            for choice in sorted(update.choices, key=lambda c: c.index):
                text = (job.prompts[p].text if req.echo else "") + choice.text
                logprobs = None
                if req.logprobs is not None:
                    logprobs = CompletionLogprobsWriter(req.logprobs).write(choice.logprobs)
                choices.append(CompletionChoice(
                    index=p * req.n + choice.index, text=text, logprobs=logprobs,
                    finish_reason=finish_reason(choice.finish_reason), stop_reason=stop_reason(choice),
                    token_ids=choice.token_ids if req.return_token_ids else None))
        usage = usage_info(u.usage for u in results if u.usage is not None)
        return CompletionResponse(id=job.id, created=job.created, model=job.model, choices=choices,
                                  usage=usage)

    async def _completion_events(self, job: _Job, req: CompletionRequest) -> AsyncIterator[str]:
        writers: dict[int, CompletionLogprobsWriter] = {}
        echoed: set[int] = set()
        usages = []
        async for p, update in self._updates(job):
            if update.error is not None:
                yield sse_event(from_request_error(*update.error).body())
                return
            choices = []
            for choice in update.choices:
                if not _worth_sending(choice, req):
                    continue
                index = p * req.n + choice.index
                text = choice.text
                if req.echo and index not in echoed:
                    echoed.add(index)
                    text = job.prompts[p].text + text
                logprobs = None
                if req.logprobs is not None:        # (echo and logprobs are refused together)
                    writer = writers.get(index)
                    if writer is None:
                        writer = writers[index] = CompletionLogprobsWriter(req.logprobs)
                    logprobs = writer.write(choice.logprobs)
                choices.append(CompletionChoice(
                    index=index, text=text, logprobs=logprobs,
                    finish_reason=finish_reason(choice.finish_reason), stop_reason=stop_reason(choice),
                    token_ids=choice.token_ids if req.return_token_ids else None))
            if update.usage is not None:
                usages.append(update.usage)
            if choices:
                yield sse_event(CompletionResponse(id=job.id, created=job.created, model=job.model,
                                                   choices=choices))
        if req.include_usage:
            yield sse_event(CompletionResponse(id=job.id, created=job.created, model=job.model, choices=[],
                                               usage=usage_info(usages)))
        yield DONE_EVENT

    # ---- chat ------------------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse | EventStream:
        """A chat completion, or its event stream when `req.stream`."""
        model = self.check_model(req.model)
        messages = _mapped(template_messages, req.messages)
        token_ids = await self._render(messages, req.add_generation_prompt, req.chat_template_kwargs)
        info = self.engine.info
        if info is None:
            raise not_serving()
        values, names = _mapped(chat_sampling_fields, req, len(token_ids), info.max_model_len)
        names |= {"prompt": "messages", "prompt.token_ids": "messages"}
        params = _params(values, names)
        job = self._submit(f"chatcmpl-{uuid.uuid4().hex}", model, params, [Prompt(token_ids)], req, names)
        if req.stream:
            return EventStream(self._chat_events(job, req), self.engine, job)
        return await self._chat_whole(job, req)

    async def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                      template_kwargs: dict[str, Any] | None) -> list[int]:
        try:
            return await self.tokenizer_thread.run(self.renderer.encode, messages, add_generation_prompt,
                                                   template_kwargs)
        except InvalidArgumentError as err:
            raise from_submit_error(err) from err

    async def _chat_whole(self, job: _Job, req: ChatCompletionRequest) -> ChatCompletionResponse:
        (update,) = await self._collect(job)
        choices = [ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                              logprobs=_chat_logprobs(c, req), finish_reason=finish_reason(c.finish_reason),
                              stop_reason=stop_reason(c),
                              token_ids=c.token_ids if req.return_token_ids else None)
                   for c in sorted(update.choices, key=lambda c: c.index)]
        usage = usage_info([update.usage] if update.usage is not None else [])
        return ChatCompletionResponse(id=job.id, created=job.created, model=job.model, choices=choices,
                                      usage=usage)

    async def _chat_events(self, job: _Job, req: ChatCompletionRequest) -> AsyncIterator[str]:
        def chunk(choices: list[ChatStreamChoice]) -> str:
            return sse_event(ChatCompletionChunk(id=job.id, created=job.created, model=job.model,
                                                 choices=choices))

        # OpenAI's first chunk of each choice names the role, with no content yet.
        yield chunk([ChatStreamChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                     for i in range(req.n)])
        usage = None
        async for _, update in self._updates(job):
            if update.error is not None:
                yield sse_event(from_request_error(*update.error).body())
                return
            choices = [ChatStreamChoice(
                index=c.index, delta=ChatDelta(content=c.text), logprobs=_chat_logprobs(c, req),
                finish_reason=finish_reason(c.finish_reason), stop_reason=stop_reason(c),
                token_ids=c.token_ids if req.return_token_ids else None)
                for c in update.choices if _worth_sending(c, req)]
            usage = update.usage or usage
            if choices:
                yield chunk(choices)
        if req.include_usage:
            yield sse_event(ChatCompletionChunk(id=job.id, created=job.created, model=job.model, choices=[],
                                                usage=usage_info([usage] if usage is not None else [])))
        yield DONE_EVENT

    # ---- the engine ------------------------------------------------------------------------------

    def _submit(self, request_id: str, model: str, params: SamplingParams, prompts: list[Prompt],
                req: SamplingFields, names: dict[str, str]) -> _Job:
        """Submit every prompt; when one is refused, abort those already queued and raise its error."""
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(prompts):
                engine_id = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                streams.append(self.engine.submit(engine_id, prompt.token_ids, params,
                                                  req.skip_special_tokens))
        except SUBMIT_ERRORS as err:
            for stream in streams:
                self.engine.abort(stream.request_id)
            raise from_submit_error(err, names) from err
        return _Job(request_id, model, int(time.time()), params, prompts, streams)

    async def _collect(self, job: _Job) -> list[StreamUpdate]:
        """Every prompt's updates merged into one, in prompt order; raises a request's error."""
        results: list[StreamUpdate | None] = [None] * len(job.streams)
        async for p, update in self._updates(job):
            if update.error is not None:
                raise from_request_error(*update.error)
            earlier = results[p]
            if earlier is None:
                results[p] = update
            else:
                earlier.absorb(update)
        return [r if r is not None else StreamUpdate([]) for r in results]

    async def _updates(self, job: _Job) -> AsyncIterator[tuple[int, StreamUpdate]]:
        """(prompt index, update) of every prompt's stream as they come, until each has ended.

        Leaving early (an error, or a client that went away) aborts every request still running.
        """
        if len(job.streams) == 1:
            async with contextlib.aclosing(follow(self.engine, job.streams[0])) as updates:
                async for update in updates:
                    yield 0, update
            return
        queue: asyncio.Queue[tuple[int, StreamUpdate]] = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            async with contextlib.aclosing(follow(self.engine, stream)) as updates:
                async for update in updates:
                    queue.put_nowait((index, update))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(job.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                index, update = await queue.get()
                remaining -= update.is_last
                yield index, update
        finally:
            for task in tasks:
                task.cancel()
            for stream in job.streams:        # at once, rather than when each cancelled task runs
                if not stream.finished:
                    self.engine.abort(stream.request_id)


def _chat_logprobs(choice: ChoiceUpdate, req: ChatCompletionRequest) -> ChatLogprobs | None:
    return chat_logprobs(choice.logprobs, req.top_logprobs or 0) if req.logprobs else None


def _is_token_list(prompt: object) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)


def _worth_sending(choice: ChoiceUpdate, req: SamplingFields) -> bool:
    """Whether a choice's update says anything the client asked for."""
    return bool(choice.text or choice.finish_reason is not None
                or (choice.token_ids and (req.return_token_ids or choice.logprobs)))


def _mapped(fn: Any, *args: Any) -> Any:
    """`fn(*args)`, its InvalidArgumentError as a 400."""
    try:
        return fn(*args)
    except InvalidArgumentError as err:
        raise from_submit_error(err) from err


def _params(values: dict[str, object], names: dict[str, str]) -> SamplingParams:
    try:
        return sampling_params_from_fields(values)
    except InvalidArgumentError as err:
        raise from_submit_error(err, names) from err
