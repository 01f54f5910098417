"""The paged latent KV cache's bookkeeping, with a prefix cache.

The cache's slots are cut into pages of `page_size` slots; a sequence holds a list of pages. A full
page whose latents are computed is keyed by a hash of its tokens chained with the previous page's
hash, so the key names the whole prefix up to it. Another request whose prompt starts with the same
tokens takes those pages read-only (ref-counted) and prefills only the rest. A page nobody holds
keeps its latents and key until its slot is needed: such pages are evicted least recently used.

Pages below `device_pages` are the device tier (on the attention devices), the others the host tier
(host RAM; see hybrid/model/kv_cache.py). A sequence's newest pages go to the device and its older
ones to the host: a long prompt's first pages are written to host pages, and when a decoding
sequence needs a page while the device tier is full, its oldest device page that no other sequence
holds moves to a host page (`moves` lists the copies the cache makes before the next step). A tier
is a preference, never a limit: either takes the other's free pages. The prefix cache spans both.
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


DEVICE, HOST = 0, 1


class PageManager:
    def __init__(self, num_pages: int, page_size: int, device_pages: int | None = None):
        self.num_pages, self.page_size = num_pages, page_size
        self.device_pages = num_pages if device_pages is None else min(device_pages, num_pages)
        self.ref_count = [0] * num_pages
        self.key: list[bytes | None] = [None] * num_pages
        # per tier, pop() takes its lowest page first
        self.free = [list(range(self.device_pages - 1, -1, -1)), list(range(num_pages - 1, self.device_pages - 1, -1))]
        self.cached: dict[bytes, int] = {}  # prefix hash -> page
        # per tier, unheld cached pages, least recent first
        self.evictable: list[OrderedDict[int, None]] = [OrderedDict(), OrderedDict()]
        self.moves: list[tuple[int, int]] = []  # (from, to) page copies due before the next step

    def tier(self, page: int) -> int:
        return DEVICE if page < self.device_pages else HOST

    def num_free_in(self, tier: int) -> int:
        return len(self.free[tier]) + len(self.evictable[tier])

    @property
    def num_free(self) -> int:
        """Pages a sequence could take now (empty ones and unheld cached ones)."""
        return self.num_free_in(DEVICE) + self.num_free_in(HOST)

    @property
    def num_cached(self) -> int:
        """Pages kept only for the prefix cache."""
        return len(self.evictable[DEVICE]) + len(self.evictable[HOST])

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
        need = self.pages_for(len(seq)) - len(seq.pages)
        on_device = min(need, self.num_free_in(DEVICE))  # the last ones
        for i in range(need):
            seq.pages.append(self._take(DEVICE if i >= need - on_device else HOST))

    def can_append(self, seq: Sequence) -> bool:
        return len(seq.pages) >= self.pages_for(len(seq)) or self.num_free > 0

    def append(self, seq: Sequence) -> None:
        """Make room for the seq's newest token: on the device, its oldest page moving to the host
        when the device tier is full."""
        if len(seq.pages) < self.pages_for(len(seq)):
            if not self.num_free_in(DEVICE):
                self._demote(seq)
            seq.pages.append(self._take(DEVICE))

    def take_moves(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(from slots, to slots) of the page copies due, which are then forgotten."""
        moves, self.moves = self.moves, []
        return [(self.page_slots(a), self.page_slots(b)) for a, b in moves]

    def page_slots(self, page: int) -> torch.Tensor:
        return page * self.page_size + torch.arange(self.page_size)

    def _demote(self, seq: Sequence) -> None:
        """Move the seq's oldest device page that only it holds to a host page, if one is free."""
        i = next((i for i, page in enumerate(seq.pages)
                  if self.tier(page) == DEVICE and self.ref_count[page] == 1), None)
        if i is None or not self.num_free_in(HOST):
            return
        src, dst = seq.pages[i], self._take(HOST)
        self.moves.append((src, dst))
        seq.pages[i] = dst
        if self.key[src] is not None:
            self.cached[self.key[src]], self.key[dst], self.key[src] = dst, self.key[src], None
        self.ref_count[src] = 0
        self.free[DEVICE].append(src)

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
                    self.free[self.tier(page)].append(page)
                else:
                    self.evictable[self.tier(page)][page] = None
        seq.pages, seq.page_hashes, seq.num_computed = [], [], 0

    def slots(self, seq: Sequence, num_tokens: int) -> torch.Tensor:
        """Cache slots of the seq's first num_tokens tokens."""
        pages = torch.tensor(seq.pages, dtype=torch.long)
        return (pages[:, None] * self.page_size + torch.arange(self.page_size)).reshape(-1)[:num_tokens]

    def _hold(self, page: int) -> None:
        if self.ref_count[page] == 0:
            self.evictable[self.tier(page)].pop(page, None)
        self.ref_count[page] += 1

    def _take(self, tier: int) -> int:
        """A page of `tier` if it has one (empty first, then the least recently used cached one),
        else of the other tier."""
        if not self.num_free_in(tier):
            tier = 1 - tier
        if self.free[tier]:
            page = self.free[tier].pop()
        else:
            page, _ = self.evictable[tier].popitem(last=False)
            del self.cached[self.key[page]]
            self.key[page] = None
        self.ref_count[page] = 1
        return page
