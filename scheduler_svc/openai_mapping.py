"""Mapping between the OpenAI-compatible HTTP API and the scheduler's types.

Requests become the SamplingParams fields the gRPC API would set (SamplingParams then checks them, for
both APIs alike); a RequestStream's updates become OpenAI's choices, logprobs, finish reasons and usage.
Field names the two differ in are renamed back in error messages, so a 400 names the field as sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pagedserve.errors import InvalidArgumentError
from scheduler_svc.openai_schemas import (
    ChatCompletionRequest,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    CompletionLogprobs,
    CompletionRequest,
    PromptTokensDetails,
    SamplingFields,
    TopLogprob,
    UsageInfo,
)
from scheduler_svc.request_stream import ChoiceUpdate, TokenLogprobs, Usage
from scheduler_svc.sequence import FinishReason

# Request fields that are SamplingParams fields of the same name and meaning (None: left out).
_SAME_FIELDS = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "best_of", "top_k",
                "min_p", "min_tokens", "repetition_penalty", "ignore_eos", "length_penalty", "early_stopping",
                "include_stop_str_in_output", "priority")

# OpenAI knows "stop" and "length"; EOS and stop tokens end a choice as a stop string does. vLLM's
# "abort" is kept for a request the server aborted (it was draining, or the client left).
_FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.STOP: "stop",
    FinishReason.EOS: "stop",
    FinishReason.ABORTED: "abort",
}


def _shared_fields(req: SamplingFields) -> tuple[dict[str, object], dict[str, str]]:
    """SamplingParams fields of what both endpoints share, and the renames for error messages."""
    values: dict[str, object] = {name: value for name in _SAME_FIELDS
                                 if (value := getattr(req, name)) is not None}
    names: dict[str, str] = {}
    values["n"] = req.n
    if values.get("top_k") == -1:          # vLLM's and HF's "no top-k"; SamplingParams says 0
        values["top_k"] = 0
    if req.stop is not None:
        values["stop"] = [req.stop] if isinstance(req.stop, str) else req.stop
    if req.stop_token_ids:
        values["stop_token_ids"] = req.stop_token_ids
    if req.use_beam_search:
        # vLLM's convention: the beam width is best_of when given, else n.
        values["beam_width"] = values.pop("best_of", req.n)
        names["beam_width"] = "best_of" if req.best_of is not None else "n"
    if req.logit_bias:
        raise InvalidArgumentError("logit_bias", "is not supported by this server")
    return values, names


def completion_sampling_fields(req: CompletionRequest) -> tuple[dict[str, object], dict[str, str]]:
    """SamplingParams fields of a completion request, and the renames for error messages.

    `logprobs=k` asks for the chosen token's logprob and the k most likely ones (k = 0 included).
    """
    values, names = _shared_fields(req)
    if req.max_tokens is not None:
        values["max_tokens"] = req.max_tokens
    if req.logprobs is not None:
        values["logprobs"] = max(req.logprobs, 1) if req.logprobs >= 0 else req.logprobs
    if req.suffix:
        raise InvalidArgumentError("suffix", "is not supported by this server")
    if req.echo and req.logprobs is not None:
        raise InvalidArgumentError("echo", "cannot be combined with logprobs here (prompt logprobs are not "
                                   "computed)")
    return values, names


def chat_sampling_fields(req: ChatCompletionRequest, prompt_len: int,
                         max_model_len: int) -> tuple[dict[str, object], dict[str, str]]:
    """SamplingParams fields of a chat request, and the renames for error messages.

    Without max_completion_tokens (or the older max_tokens) a chat completion may run to the end of the
    model's context, as OpenAI's and vLLM's do.
    """
    values, names = _shared_fields(req)
    if req.max_completion_tokens is not None:
        values["max_tokens"] = req.max_completion_tokens
        names["max_tokens"] = "max_completion_tokens"
    elif req.max_tokens is not None:
        values["max_tokens"] = req.max_tokens
    else:
        values["max_tokens"] = max(1, max_model_len - prompt_len)
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidArgumentError("top_logprobs", "needs logprobs set to true")
    if req.logprobs:
        top = req.top_logprobs or 0
        values["logprobs"] = max(top, 1) if top >= 0 else top
        names["logprobs"] = "top_logprobs"
    if req.tools:
        raise InvalidArgumentError("tools", "tool calls are not supported by this server")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise InvalidArgumentError("response_format", "only {\"type\": \"text\"} is supported")
    return values, names


def template_messages(messages: Iterable[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template takes them: content as one string (text parts joined)."""
    rendered = []
    for i, message in enumerate(messages):
        entry = message.model_dump(exclude_none=True)
        content = message.content
        if isinstance(content, list):
            kinds = {part.type for part in content} - {"text"}
            if kinds:
                raise InvalidArgumentError(f"messages[{i}].content",
                                           f"only text parts can be rendered, got {', '.join(sorted(kinds))}")
            entry["content"] = "".join(part.text or "" for part in content)
        elif content is None:
            entry["content"] = ""
        rendered.append(entry)
    return rendered


def finish_reason(reason: FinishReason | None) -> str | None:
    """OpenAI's finish reason for the scheduler's (None while the choice runs)."""
    return None if reason is None else _FINISH_REASONS.get(reason, "stop")


def stop_reason(choice: ChoiceUpdate) -> int | str | None:
    """vLLM's stop_reason: the stop token id or stop string that ended the choice, else None."""
    if choice.stop_token_id is not None:
        return choice.stop_token_id
    if choice.finish_reason is FinishReason.STOP and choice.stop_reason:
        return choice.stop_reason
    return None


def usage_info(usages: Iterable[Usage]) -> UsageInfo:
    """The usage of every prompt of a request, summed."""
    usages = list(usages)
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    cached = sum(u.cached_prompt_tokens for u in usages)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


class CompletionLogprobsWriter:
    """Legacy completions logprobs of one choice; `text_offset` counts on across a stream's chunks."""

    def __init__(self, top_n: int, offset: int = 0) -> None:
        self._top_n = top_n
        self._offset = offset

    def write(self, logprobs: Iterable[TokenLogprobs]) -> CompletionLogprobs:
        """The entries of these tokens."""
        out = CompletionLogprobs()
        for entry in logprobs:
            _, text, logprob = entry.chosen
            out.tokens.append(text)
            out.token_logprobs.append(logprob)
            top: dict[str, float] = {}
            for _, candidate, candidate_logprob in entry.top[:self._top_n]:
                top.setdefault(candidate, candidate_logprob)
            out.top_logprobs.append(top)
            out.text_offset.append(self._offset)
            self._offset += len(text)
        return out


def chat_logprobs(logprobs: Iterable[TokenLogprobs], top_n: int) -> ChatLogprobs:
    """Chat logprobs of these tokens: each chosen token with its `top_n` most likely alternatives."""
    content = []
    for entry in logprobs:
        _, text, logprob = entry.chosen
        top = [TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for _, t, lp in entry.top[:top_n]]
        content.append(ChatTokenLogprob(token=text, logprob=logprob, bytes=list(text.encode()),
                                        top_logprobs=top))
    return ChatLogprobs(content=content)
