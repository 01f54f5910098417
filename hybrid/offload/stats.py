"""Per-layer routed-expert activation counts over real traffic, in the stats format the
planner's frequency strategy reads: JSON {"layers": {"3": [count_expert_0, ...], ...}}."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch

from placement.atomic import atomic_write


class ActivationStats:
    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.counts: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        ids = topk_ids.reshape(-1)
        counts = torch.bincount(ids[ids >= 0].cpu(), minlength=self.num_experts)
        with self._lock:
            self.counts[layer] = self.counts.get(layer, 0) + counts

    def to_json(self) -> dict:
        with self._lock:
            return {"layers": {str(layer): c.tolist() for layer, c in sorted(self.counts.items())}}

    def save(self, path: str | Path) -> None:
        atomic_write(path, json.dumps(self.to_json()))

    def merge_file(self, path: str | Path) -> None:
        """Add the counts of an existing stats file, so recordings accumulate."""
        for layer, counts in json.loads(Path(path).read_text())["layers"].items():
            self.counts[int(layer)] = self.counts.get(int(layer), 0) + torch.tensor(counts)
