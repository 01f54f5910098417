"""What one forward pass computes: the new tokens of one or more sequences, and where their
latents live in the KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class ForwardBatch:
    """The new tokens of several sequences, flattened in sequence order.

    `slots[i]` lists the KV-cache slot of every token of sequence i's context, cached prefix first
    and its `q_lens[i]` new tokens last; the new tokens' latents are written to the last slots.
    Without a cache (`slots is None`) each sequence attends to its new tokens only.
    """

    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64, position of each token in its sequence
    q_lens: list[int]
    slots: list[torch.Tensor] | None = None

    @classmethod
    def single(cls, input_ids: torch.Tensor, start: int = 0, slots: torch.Tensor | None = None) -> "ForwardBatch":
        """One sequence whose new tokens sit at positions start.. (slots: its whole context)."""
        n = input_ids.numel()
        positions = torch.arange(start, start + n, dtype=torch.long)
        return cls(input_ids.reshape(-1).long(), positions, [n], None if slots is None else [slots])

    @cached_property
    def single_queries(self) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sequences with one new token (decode steps), so that every layer attends for all of
        them at once: their indices, their rows, and their contexts' slots padded to the longest
        [S, C] with a mask [S, C] that is False on the padding."""
        seqs = [i for i, q_len in enumerate(self.q_lens) if q_len == 1] if self.slots is not None else []
        rows = torch.tensor(self.q_lens, dtype=torch.long).cumsum(0)[seqs] - 1
        longest = max((len(self.slots[i]) for i in seqs), default=0)
        index = torch.zeros(len(seqs), longest, dtype=torch.long)
        mask = torch.zeros(len(seqs), longest, dtype=torch.bool)
        for row, i in enumerate(seqs):
            index[row, : len(self.slots[i])] = self.slots[i]
            mask[row, : len(self.slots[i])] = True
        return seqs, rows, index, mask

    @property
    def last_index(self) -> torch.Tensor:
        """Row of each sequence's last new token."""
        return torch.tensor(self.q_lens, dtype=torch.long).cumsum(0) - 1


class KVCache:
    """The latent KV cache: per layer and slot, the normalised latent and the rotated rope key
    (kv_lora_rank + qk_rope_head_dim values), which is all MLA needs to attend. Each layer's
    part lives on the device of that layer's attention."""

    def __init__(self, num_layers: int, num_slots: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.bfloat16, devices: list[torch.device] | None = None):
        self.kv_lora_rank = kv_lora_rank
        devices = devices or [torch.device("cpu")] * num_layers
        self.layers = [torch.zeros(num_slots, kv_lora_rank + rope_dim, dtype=dtype, device=d) for d in devices]

    def nbytes(self, device: torch.device | str) -> int:
        """Memory the cache holds on `device`."""
        return sum(t.nbytes for t in self.layers if t.device == torch.device(device))

    @property
    def num_slots(self) -> int:
        return self.layers[0].shape[0]

    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        data = self.layers[layer]
        data[slots.to(data.device)] = torch.cat([latent, k_rope], dim=-1).to(data)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents and rope keys of `slots` (any shape: [C], or [S, C] for several contexts)."""
        data = self.layers[layer]
        kv = data[slots.to(data.device)]
        return kv[..., : self.kv_lora_rank], kv[..., self.kv_lora_rank:]
