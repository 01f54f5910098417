"""Which tokens of which sequences the next forward pass computes.

Continuous batching: every running sequence that is decoding contributes its one new token to
each step, and what is left of the step's token budget goes to prompts, cut into chunks, so a
long prompt never stalls the streams already running. A sequence is admitted only when pages for
all its tokens are free; when decoding runs out of pages, the most recently admitted sequence is
preempted (its pages released; its computed pages usually come back from the prefix cache).
"""

from __future__ import annotations

from collections import deque

from hybrid.engine.page_manager import PageManager
from hybrid.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, pages: PageManager, max_batch_tokens: int, max_running: int):
        self.pages = pages
        self.max_batch_tokens, self.max_running = max_batch_tokens, max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def __bool__(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of its next tokens to compute) for the next step."""
        budget = self.max_batch_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in [s for s in self.running if s.num_uncomputed == 1]:
            if seq.status is not Status.RUNNING:  # preempted by an earlier one in this loop
                continue
            while not self.pages.can_append(seq):
                self._preempt(self.running[-1])
            if seq.status is Status.RUNNING:
                self.pages.append(seq)
                batch.append((seq, 1))
                budget -= 1
        for seq in self.running:
            if budget > 0 and seq.num_uncomputed > 1:
                n = min(seq.num_uncomputed, budget)
                batch.append((seq, n))
                budget -= n
        while budget > 0 and self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if not self.pages.can_allocate(seq):
                break
            self.waiting.popleft()
            self.pages.allocate(seq)
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = seq.num_computed
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            batch.append((seq, n))
            budget -= n
        return batch

    def finish(self, seq: Sequence, reason: str) -> None:
        """Stop the sequence and give its pages back at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.pages.release(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pages.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
