"""The paged latent KV cache's bookkeeping, with a prefix cache.

The cache's slots are cut into pages of `page_size` slots; a sequence holds a list of pages. A full
page whose latents are computed is keyed by a hash of its tokens chained with the previous page's
hash, so the key names the whole prefix up to it. Another request whose prompt starts with the same
tokens takes those pages read-only (ref-counted) and prefills only the rest. A page nobody holds
keeps its latents and key until its slot is needed: such pages are evicted least recently used.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Iterator

import numpy as np
import torch

from hybrid.engine.sequence import Sequence


def page_hash(prev: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(prev + np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


class PageManager:
    def __init__(self, num_pages: int, page_size: int):
        self.num_pages, self.page_size = num_pages, page_size
        self.ref_count = [0] * num_pages
        self.key: list[bytes | None] = [None] * num_pages
        self.free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() takes page 0 first
        self.cached: dict[bytes, int] = {}  # prefix hash -> page
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unheld cached pages, least recent first

    @property
    def num_free(self) -> int:
        """Pages a sequence could take now (empty ones and unheld cached ones)."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        """Pages held by sequences."""
        return self.num_pages - self.num_free

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def prefix_hits(self, seq: Sequence) -> Iterator[tuple[bytes, int]]:
        """(hash, page) of the seq's leading pages found in the cache. At least one token is left
        to compute, since sampling needs its logits."""
        prev, p = b"", self.page_size
        for i in range((len(seq) - 1) // p):
            prev = page_hash(prev, seq.token_ids[i * p:(i + 1) * p])
            page = self.cached.get(prev)
            if page is None:
                return
            yield prev, page

    def can_allocate(self, seq: Sequence) -> bool:
        hits = list(self.prefix_hits(seq))
        unheld_hits = sum(1 for _, page in hits if self.ref_count[page] == 0)
        return self.pages_for(len(seq)) - len(hits) <= self.num_free - unheld_hits

    def allocate(self, seq: Sequence) -> None:
        """Pages for all of the seq's tokens, the cached prefix shared; sets num_computed."""
        assert not seq.pages
        for h, page in self.prefix_hits(seq):
            self._hold(page)
            seq.pages.append(page)
            seq.page_hashes.append(h)
        seq.num_computed = len(seq.pages) * self.page_size
        while len(seq.pages) < self.pages_for(len(seq)):
            seq.pages.append(self._take())

    def can_append(self, seq: Sequence) -> bool:
        return len(seq.pages) >= self.pages_for(len(seq)) or self.num_free > 0

    def append(self, seq: Sequence) -> None:
        """Make room for the seq's newest token."""
        if len(seq.pages) < self.pages_for(len(seq)):
            seq.pages.append(self._take())

    def publish(self, seq: Sequence) -> None:
        """Key the seq's pages that became full and computed, so later requests can share them."""
        p = self.page_size
        for i in range(len(seq.page_hashes), seq.num_computed // p):
            prev = seq.page_hashes[-1] if seq.page_hashes else b""
            h = page_hash(prev, seq.token_ids[i * p:(i + 1) * p])
            seq.page_hashes.append(h)
            page = seq.pages[i]
            if h not in self.cached and self.key[page] is None:
                self.cached[h], self.key[page] = page, h

    def release(self, seq: Sequence) -> None:
        """Give back the seq's pages; keyed ones stay cached until evicted. The prefix's first pages
        go last in the eviction order, since later pages are useless without them."""
        for page in reversed(seq.pages):
            self.ref_count[page] -= 1
            if self.ref_count[page] == 0:
                if self.key[page] is None:
                    self.free.append(page)
                else:
                    self.evictable[page] = None
        seq.pages, seq.page_hashes, seq.num_computed = [], [], 0

    def slots(self, seq: Sequence, num_tokens: int) -> torch.Tensor:
        """Cache slots of the seq's first num_tokens tokens."""
        pages = torch.tensor(seq.pages, dtype=torch.long)
        return (pages[:, None] * self.page_size + torch.arange(self.page_size)).reshape(-1)[:num_tokens]

    def _hold(self, page: int) -> None:
        if self.ref_count[page] == 0:
            self.evictable.pop(page, None)
        self.ref_count[page] += 1

    def _take(self) -> int:
        if self.free:
            page = self.free.pop()
        else:
            page, _ = self.evictable.popitem(last=False)
            del self.cached[self.key[page]]
            self.key[page] = None
        self.ref_count[page] = 1
        return page
