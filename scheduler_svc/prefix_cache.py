"""Automatic prefix caching: full prompt blocks found again by their contents.

The paper's shared prefix (§4.4), without the user naming it, as vLLM's automatic prefix caching and
SGLang's radix cache provide it: once a full block of some prompt has been scheduled for computation,
a later prompt that starts with the same tokens maps its first blocks onto the same physical blocks
(reference counted like any shared block) and computes only the rest.

A block's key is (content id of the prefix before it, its own tokens). Content ids are fresh integers,
one per cached prefix, so a key names one exact token prefix: no hash collision can make two prompts
share a block by mistake. A block whose predecessor was evicted can no longer be reached (lookups walk
from the first block) and simply ages out.

Blocks no table references stay cached, least recently released first in line for eviction; the GPU
allocator takes plain free blocks first and evicts only when none is left, so the cache costs no
capacity: an evictable block counts as free.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

BlockKey = tuple[int, tuple[int, ...]]
ROOT = 0                        # the content id of the empty prefix


class PrefixCache:
    """Key -> GPU block for full prompt blocks, and the LRU of cached blocks nobody references."""

    __slots__ = ("_block_of", "_content_id", "_key_of", "_next_id", "block_size", "evictable", "hit_tokens",
                 "queried_tokens")

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._block_of: dict[BlockKey, int] = {}
        self._key_of: dict[int, BlockKey] = {}
        self._content_id: dict[int, int] = {}       # block -> content id of the prefix it ends
        self._next_id = ROOT + 1
        self.evictable: OrderedDict[int, None] = OrderedDict()   # unreferenced cached blocks, LRU first
        self.queried_tokens = 0                     # prompt tokens looked up at admission
        self.hit_tokens = 0                         # of which found cached

    def __len__(self) -> int:
        """Cached blocks (referenced or not)."""
        return len(self._key_of)

    def holds(self, block: int) -> bool:
        """Whether `block` holds a cached prefix block."""
        return block in self._content_id

    def content_id(self, block: int) -> int:
        """The content id of the prefix that cached `block` ends."""
        return self._content_id[block]

    def match(self, token_ids: Sequence[int], max_blocks: int) -> list[int]:
        """The cached blocks of the longest cached prefix of `token_ids`, at most `max_blocks` of them."""
        bs = self.block_size
        blocks: list[int] = []
        parent = ROOT
        for i in range(min(max_blocks, len(token_ids) // bs)):
            block = self._block_of.get((parent, tuple(token_ids[i * bs:(i + 1) * bs])))
            if block is None:
                break
            blocks.append(block)
            parent = self._content_id[block]
        return blocks

    def register(self, parent: int, tokens: Sequence[int], block: int) -> int:
        """Cache `block` as holding `tokens` after the prefix `parent`; returns the extended prefix's
        content id. When that prefix is already cached in another block, `block` stays uncached and
        the existing content id is returned, so the caller's chain goes on."""
        key = (parent, tuple(tokens))
        existing = self._block_of.get(key)
        if existing is not None:
            return self._content_id[existing]
        assert block not in self._content_id, f"block {block} is already cached"
        content_id = self._next_id
        self._next_id += 1
        self._block_of[key] = block
        self._key_of[block] = key
        self._content_id[block] = content_id
        return content_id

    def park(self, block: int) -> None:
        """A cached block lost its last reference: keep its contents, first in line for eviction last."""
        self.evictable[block] = None

    def unpark(self, block: int) -> None:
        """A parked block is referenced again (a prefix hit)."""
        del self.evictable[block]

    def evict(self) -> int:
        """Forget the least recently parked block and return it, free for any use."""
        block, _ = self.evictable.popitem(last=False)
        self._forget(block)
        return block

    def clear(self) -> list[int]:
        """Forget every cached block (the executors lost the contents); returns the parked ones."""
        parked = list(self.evictable)
        self.evictable.clear()
        self._block_of.clear()
        self._key_of.clear()
        self._content_id.clear()
        return parked

    def record_lookup(self, queried: int, hit: int) -> None:
        """Count one admission's prompt tokens and how many of them were found cached."""
        self.queried_tokens += queried
        self.hit_tokens += hit

    def _forget(self, block: int) -> None:
        key = self._key_of.pop(block)
        del self._block_of[key]
        del self._content_id[block]

    def check_integrity(self, ref_counts: list[int]) -> None:
        """Assert that the maps agree and that exactly the unreferenced cached blocks are parked."""
        assert len(self._block_of) == len(self._key_of) == len(self._content_id), "prefix cache maps drifted"
        for key, block in self._block_of.items():
            assert self._key_of[block] == key, f"prefix cache: block {block} under two keys"
        for block in self._content_id:
            assert (ref_counts[block] == 0) == (block in self.evictable), (
                f"prefix cache: block {block} with {ref_counts[block]} refs parked={block in self.evictable}")
        assert all(b in self._content_id for b in self.evictable), "prefix cache: parked unknown block"
