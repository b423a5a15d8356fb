"""The load generator over the OpenAI-compatible HTTP API: the same workload and records as over gRPC.

Each LoadRequest becomes one streamed POST /v1/completions with the same token-id prompt and sampling
fields the gRPC run sends (ignore_eos, max_tokens, seed, n or beam search), plus
`stream_options.include_usage` and vLLM's `return_token_ids`, so that tokens are counted exactly
(a chunk may carry several) and the run ends on the usage chunk as a gRPC stream ends on its usage
message. The two frontends are then compared on identical work (`pagedserve bench --api openai`).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Sequence
from typing import Any

import httpx2
from tqdm import tqdm

from clients.bench_records import RequestRecord
from clients.loadgen import LoadGenerator, LoadRequest, progress_bar, sampling_arguments


def completion_body(request: LoadRequest, seed: int, model: str) -> dict[str, Any]:
    """The /v1/completions body of one load request (streamed, usage and token ids included)."""
    sampling = sampling_arguments(request, seed)
    beam_width = sampling.pop("beam_width", 0)
    if beam_width:
        sampling["use_beam_search"] = True     # width n (= beam_width, every beam returned)
    return {"model": model, "prompt": list(request.prompt_token_ids), **sampling, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True, "skip_special_tokens": True}


class OpenAILoadGenerator(LoadGenerator):
    """Sends a workload as streamed completions through httpx2 clients (one connection pool each)."""

    def __init__(self, clients: Sequence[httpx2.AsyncClient], requests: Sequence[LoadRequest], model: str,
                 seed: int = 0, progress: tqdm | None = None) -> None:
        super().__init__(list(clients), requests, seed, progress)
        self.model = model

    async def _deliver(self, request: LoadRequest, record: RequestRecord, client: Any) -> None:
        body = completion_body(request, self.seed, self.model)
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                record.error_code = f"HTTP_{response.status_code}"
                record.error = _error_message(response.text)
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    return
                self._record_event(record, json.loads(data))

    def _record_event(self, record: RequestRecord, event: dict[str, Any]) -> None:
        if "error" in event:
            record.error = event["error"].get("message", "error")
            return
        for choice in event.get("choices", ()):
            self._record_tokens(record, choice["index"], len(choice.get("token_ids") or ()))
        usage = event.get("usage")
        if usage:
            record.finished = self._now()
            record.output_tokens = usage["completion_tokens"]
            details = usage.get("prompt_tokens_details") or {}
            record.cached_prompt_tokens = details.get("cached_tokens", 0)


def _error_message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:500]


async def run_openai_workload(base_url: str, requests: Sequence[LoadRequest], model: str, *, seed: int = 0,
                              token: str | None = None, root_certificates: bytes | None = None,
                              show_progress: bool = True, label: str = "bench",
                              num_clients: int = 1) -> tuple[list[RequestRecord], float]:
    """Open `num_clients` httpx2 clients to `base_url` (each its own connection pool), run the requests
    spread over them, close them; returns the records and the duration.

    `root_certificates` (PEM) are trusted for an https URL, as the gRPC client trusts them.
    """
    progress = progress_bar(label, len(requests)) if show_progress else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    # No pool limit: every request of an offline run holds its own streaming connection at once.
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
    verify: ssl.SSLContext | bool = True
    if root_certificates:
        verify = ssl.create_default_context(cadata=root_certificates.decode())
    clients = [httpx2.AsyncClient(base_url=base_url, headers=headers, timeout=None, limits=limits,
                                 verify=verify) for _ in range(num_clients)]
    try:
        return await OpenAILoadGenerator(clients, requests, model, seed, progress).run()
    finally:
        for client in clients:
            await client.aclose()
