"""What one forward pass computes: the new tokens of one or more sequences, and where their
latents live in the KV cache."""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def num_slots(self) -> int:
        return self.layers[0].shape[0]

    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        data = self.layers[layer]
        data[slots.to(data.device)] = torch.cat([latent, k_rope], dim=-1).to(data)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.layers[layer]
        kv = data[slots.to(data.device)]
        return kv[:, : self.kv_lora_rank], kv[:, self.kv_lora_rank:]
