"""Runs one scheduled step through the model: builds the ForwardBatch from the sequences' pages,
owns the latent KV cache, and keeps the time spent in forward passes."""

from __future__ import annotations

import time

import torch

from hybrid.api import HybridModel
from hybrid.engine.page_manager import PageManager
from hybrid.engine.sequence import Sequence
from hybrid.model.batch import ForwardBatch


class ModelRunner:
    def __init__(self, model: HybridModel, pages: PageManager, kv_dtype: str = "bf16"):
        self.model = model
        self.pages = pages
        self.cache = model.new_cache(pages.num_pages * pages.page_size, pages.device_pages * pages.page_size, kv_dtype)
        self.forward_seconds = 0.0

    def run(self, scheduled: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Compute the scheduled tokens; float32 logits [S, vocab] of the S sequences whose every
        token is now computed (those that sample next), in batch order."""
        for src, dst in self.pages.take_moves():  # pages leaving the device tier
            self.cache.copy(src, dst)
        ids, positions, slots, rows = [], [], [], []
        row = 0
        for seq, n in scheduled:
            start = seq.num_computed
            ids.append(torch.tensor(seq.token_ids[start:start + n]))
            positions.append(torch.arange(start, start + n))
            slots.append(self.pages.slots(seq, start + n))
            row += n
            if start + n == len(seq):
                rows.append(row - 1)
        batch = ForwardBatch(torch.cat(ids), torch.cat(positions), [n for _, n in scheduled], slots,
                             self.cache.host_from)
        start = time.perf_counter()
        logits = self.model.forward(batch, self.cache, logits_index=torch.tensor(rows, dtype=torch.long))
        self.forward_seconds += time.perf_counter() - start
        return logits
