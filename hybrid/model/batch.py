"""What one forward pass computes: the new tokens of one or more sequences, and where their
latents live in the KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass
class ForwardBatch:
    """The new tokens of several sequences, flattened in sequence order.

    `slots[i]` lists the KV-cache slot of every token of sequence i's context, cached prefix first
    and its `q_lens[i]` new tokens last; the new tokens' latents are written to the last slots.
    Without a cache (`slots is None`) each sequence attends to its new tokens only. Slots from
    `host_from` on live in the cache's host tier (None: it has none).
    """

    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64, position of each token in its sequence
    q_lens: list[int]
    slots: list[torch.Tensor] | None = None
    host_from: int | None = None
    _cos_sin: dict = field(default_factory=dict, repr=False, compare=False)

    def cos_sin(self, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """`rope.cos_sin` of the batch's positions, computed once for all layers."""
        if rope not in self._cos_sin:
            self._cos_sin[rope] = rope.cos_sin(self.positions)
        return self._cos_sin[rope]

    @classmethod
    def single(cls, input_ids: torch.Tensor, start: int = 0, slots: torch.Tensor | None = None) -> "ForwardBatch":
        """One sequence whose new tokens sit at positions start.. (slots: its whole context)."""
        n = input_ids.numel()
        positions = torch.arange(start, start + n, dtype=torch.long)
        return cls(input_ids.reshape(-1).long(), positions, [n], None if slots is None else [slots])

    @cached_property
    def single_queries(self) -> tuple[list[int], torch.Tensor, list["TierSlots"]]:
        """The sequences with one new token (decode steps), so that every layer attends for all of
        them at once: their indices, their rows, and per cache tier that holds any of their contexts
        (0 device, 1 host) each sequence's slots there."""
        seqs = [i for i, q_len in enumerate(self.q_lens) if q_len == 1] if self.slots is not None else []
        rows = torch.tensor(self.q_lens, dtype=torch.long).cumsum(0)[seqs] - 1
        if self.host_from is None:
            parts = [TierSlots(0, [self.slots[i] for i in seqs], 0)]
        else:
            parts = [TierSlots(0, [self.slots[i][self.slots[i] < self.host_from] for i in seqs], 0),
                     TierSlots(1, [self.slots[i][self.slots[i] >= self.host_from] for i in seqs], self.host_from)]
        return seqs, rows, [p for p in parts if any(len(s) for s in p.slots)]

    @property
    def last_index(self) -> torch.Tensor:
        """Row of each sequence's last new token."""
        return torch.tensor(self.q_lens, dtype=torch.long).cumsum(0) - 1


@dataclass
class TierSlots:
    """One cache tier's part of the decode sequences' contexts: each sequence's slots there (maybe
    none), in context order."""

    tier: int
    slots: list[torch.Tensor]
    fill: int  # a slot of this tier, for padding

    @cached_property
    def longest(self) -> int:
        """The most slots any sequence has here: every layer of a step asks it."""
        return max(len(s) for s in self.slots)

    @cached_property
    def lengths(self) -> torch.Tensor:
        """Each sequence's number of slots here [S] (int64)."""
        return torch.tensor([len(s) for s in self.slots], dtype=torch.long)

    @cached_property
    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots padded to the longest [S, C] and a mask [S, C] that is False on the padding:
        the shape batched attention on a GPU takes."""
        index = torch.full((len(self.slots), self.longest), self.fill, dtype=torch.long)
        mask = torch.zeros(len(self.slots), self.longest, dtype=torch.bool)
        for row, s in enumerate(self.slots):
            index[row, : len(s)] = s
            mask[row, : len(s)] = True
        return index, mask
