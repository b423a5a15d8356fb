"""What the two frontends (gRPC and the OpenAI-compatible HTTP API) share: the one request path.

Each frontend maps its request onto prompt token ids and SamplingParams (through
`sampling_params_from_fields`), tokenizes on the one `TokenizerThread`, submits with `Engine.submit`
(which refuses a request before anything is queued) and reads the request's detokenized
updates with `follow`, which aborts the request when its reader leaves early. Only the wire formats
differ between them.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from scheduler_svc.engine import Engine
from scheduler_svc.request_stream import RequestStream, StreamUpdate
from scheduler_svc.tokenizer import encode_prompt

T = TypeVar("T")

class TokenizerThread:
    """Runs tokenizer work off the event loop, on one thread for both frontends.

    Tokenizing a long prompt takes milliseconds, too long for the loop; one thread because a fast
    tokenizer must not be used by two threads at once ("Already borrowed").
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`fn(*args)` on the tokenizer thread."""
        return asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    def encode_function(self) -> Callable[[str], list[int]]:
        """A function that tokenizes a text prompt as a completion prompt (special tokens added);
        call it on the tokenizer thread."""
        return functools.partial(encode_prompt, self.tokenizer)

    def close(self) -> None:
        """Let the thread end once its queued work is done."""
        self._pool.shutdown(wait=False)


async def follow(engine: Engine, stream: RequestStream) -> AsyncGenerator[StreamUpdate, None]:
    """The request's updates up to its last one; a reader that leaves early aborts the request.

    Leaving covers every way out: the reader stops iterating and closes this generator, or it is
    cancelled while waiting here (a client that went away). The abort frees the request's blocks at once.
    """
    try:
        while True:
            update = await stream.next_update()
            yield update
            if update.is_last:
                return
    finally:
        if not stream.finished:
            engine.abort(stream.request_id)
