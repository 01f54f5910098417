"""The latent KV cache, in two tiers, stored as bf16 or FP8.

Per layer and slot MLA needs only the normalised latent and the rotated rope key (kv_lora_rank +
qk_rope_head_dim values). Slots below `device_slots` live on the device of the layer's attention;
the others (the host tier) in host RAM, pinned where CUDA is, so a long sequence's older pages cost
no GPU memory: decode attends to each tier where it lives and merges the parts (attention.py).
Without a GPU both tiers are host memory, and the same split runs.

FP8 stores each value as float8 e4m3 with one fp32 scale per slot for the latent and one for the
rope key (their ranges differ). `decode_fp8` turns the codes into bf16 with integer ops (torch's own
conversion runs ~0.2-0.5 G values/s on the CPU); decode attention reads a tier on the CPU in blocks
(`Tier.blocks`) and applies the scales to its scores, so no dequantized copy of a context is made.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
DTYPES = ("bf16", "fp8")  # what `kv_cache.dtype` may name


def decode_fp8(data: torch.Tensor) -> torch.Tensor:
    """float8 e4m3 codes -> the same values in bf16, by moving the sign, exponent and mantissa bits
    into place and rebiasing the exponent (four integer ops: 10-15 G values/s alone on Zen 4, 2 threads,
    against torch's 0.2-0.5). Exact for e4m3's normal codes; the zero and subnormal codes (|v| < 2^-6, under 1/2000
    of a quantization step at the top of the range) read as 2^-7 (1 + m/8), an error below 2^-7."""
    bits = data.view(torch.int8).to(torch.int16)  # sign-extended: the sign lands in the top bits
    return bits.bitwise_left_shift_(4).bitwise_and_(-0x7801).add_(120 << 7).view(torch.bfloat16)


class Tier:
    """One layer's slots [start, start + size) in one memory."""

    def __init__(self, start: int, size: int, width: int, split: int, device: torch.device,
                 dtype: torch.dtype, fp8: bool):
        pin = device.type == "cpu" and torch.cuda.is_available()
        self.start, self.split, self.dtype = start, split, dtype
        self.data = torch.zeros(size, width, dtype=FP8 if fp8 else dtype, device=device, pin_memory=pin)
        self.scale = torch.ones(size, 2, dtype=torch.float32, device=device, pin_memory=pin) if fp8 else None

    @property
    def device(self) -> torch.device:
        return self.data.device

    def write(self, rows: torch.Tensor, kv: torch.Tensor) -> None:
        rows, kv = rows.to(self.device), kv.to(self.device)
        if self.scale is None:
            self.data[rows] = kv.to(self.dtype)
            return
        parts = kv.float().split([self.split, kv.shape[-1] - self.split], dim=-1)
        scale = torch.stack([p.abs().amax(-1) for p in parts], -1).clamp(min=1e-12) / FP8_MAX
        self.scale[rows] = scale
        self.data[rows] = torch.cat([p / s[:, None] for p, s in zip(parts, scale.unbind(-1))], -1).to(FP8)

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        """[..., width] in the compute dtype, on this tier's device."""
        rows = rows.to(self.device)
        kv = self.data.index_select(0, rows.reshape(-1)).view(*rows.shape, self.data.shape[1])  # whole rows copied
        if self.scale is None:
            return kv
        scale = self.scale[rows]
        kv = decode_fp8(kv).float()
        parts = kv[..., : self.split] * scale[..., :1], kv[..., self.split:] * scale[..., 1:]
        return torch.cat(parts, -1).to(self.dtype)

    def blocks(self, rows: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """The rows [C] in blocks of up to `size`, as stored but in the compute dtype: [n, width] (a
        view of the cache where a block's rows are consecutive, as a sequence's pages mostly are, else
        a gathered copy; FP8 decoded block by block, unscaled) and its scales [n, 2] (None for bf16)."""
        rows = rows.to(self.device)
        starts = torch.arange(0, rows.shape[0], size, device=self.device)
        lasts = (starts + size).clamp(max=rows.shape[0]) - 1
        breaks = torch.cat([rows.new_zeros(1), (rows.diff() != 1).cumsum(0)])
        consecutive = (breaks[lasts] == breaks[starts]).tolist()
        for s, e, first, view in zip(starts.tolist(), (lasts + 1).tolist(), rows[starts].tolist(), consecutive):
            at = slice(first, first + e - s) if view else rows[s:e]
            if self.scale is None:
                yield self.data[at], None
            else:
                yield decode_fp8(self.data[at]).to(self.dtype), self.scale[at]


class KVCache:
    """Slots [0, device_slots) on each layer's attention device, [device_slots, num_slots) in host RAM."""

    def __init__(self, num_layers: int, num_slots: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.bfloat16, devices: list[torch.device] | None = None,
                 device_slots: int | None = None, kv_dtype: str = "bf16"):
        if kv_dtype not in DTYPES:
            raise ValueError(f"KV cache dtype {kv_dtype!r}: use one of {', '.join(DTYPES)}")
        self.kv_lora_rank, self.num_slots = kv_lora_rank, num_slots
        self.device_slots = num_slots if device_slots is None else min(device_slots, num_slots)
        devices = devices or [torch.device("cpu")] * num_layers
        width, fp8, host = kv_lora_rank + rope_dim, kv_dtype == "fp8", num_slots - self.device_slots
        self.tiers = [[Tier(0, self.device_slots, width, kv_lora_rank, torch.device(d), dtype, fp8),
                       Tier(self.device_slots, host, width, kv_lora_rank, torch.device("cpu"), dtype, fp8)]
                      for d in devices]

    def nbytes(self, device: torch.device | str) -> int:
        """Memory the cache holds on `device` (values and scales, both tiers)."""
        return sum(t.data.nbytes + (0 if t.scale is None else t.scale.nbytes)
                   for layers in self.tiers for t in layers if t.device == torch.device(device))

    @property
    def host_from(self) -> int | None:
        """The first host-tier slot; None when every slot is on the attention devices."""
        return self.device_slots if self.device_slots < self.num_slots else None

    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        kv = torch.cat([latent, k_rope], dim=-1)
        if self.host_from is None:  # one tier holds every slot
            self.tiers[layer][0].write(slots, kv)
            return
        for tier in self.tiers[layer]:
            inside = (slots >= tier.start) & (slots < tier.start + tier.data.shape[0])
            if bool(inside.any()):
                tier.write(slots[inside] - tier.start, kv[inside.to(kv.device)])

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents and rope keys of `slots` [C], from whichever tier holds each, on the attention device."""
        device, host = self.tiers[layer]
        if self.host_from is None or bool((slots < self.device_slots).all()):
            return self._split(device.read(slots))
        on_host = slots >= self.device_slots
        kv = torch.empty(slots.shape[0], device.data.shape[1], dtype=device.dtype, device=device.device)
        kv[~on_host.to(device.device)] = device.read(slots[~on_host])
        kv[on_host.to(device.device)] = host.read(slots[on_host] - self.device_slots).to(device.device)
        return self._split(kv)

    def tier_device(self, layer: int, tier: int) -> torch.device:
        return self.tiers[layer][tier].device

    def read_tier(self, layer: int, tier: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents and rope keys of `slots` (any shape), all in tier `tier` (0 device, 1 host), where they live."""
        t = self.tiers[layer][tier]
        return self._split(t.read(slots - t.start if t.start else slots))

    def blocks(self, layer: int, tier: int, slots: torch.Tensor, size: int):
        """`Tier.blocks` of `slots` [C], all in tier `tier` (0 device, 1 host)."""
        t = self.tiers[layer][tier]
        return t.blocks(slots - t.start, size)

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy slots src to slots dst in every layer, as stored (a page moving between tiers: each
        of src and dst lies in one tier)."""
        for layers in self.tiers:
            (a, rows_a), (b, rows_b) = self._locate(layers, src), self._locate(layers, dst)
            b.data[rows_b.to(b.device)] = a.data[rows_a.to(a.device)].to(b.device)
            if a.scale is not None:
                b.scale[rows_b.to(b.device)] = a.scale[rows_a.to(a.device)].to(b.device)

    def _locate(self, layers: list[Tier], slots: torch.Tensor) -> tuple[Tier, torch.Tensor]:
        t = layers[int(slots[0]) >= self.device_slots]
        return t, slots - t.start

    def _split(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return kv[..., : self.kv_lora_rank], kv[..., self.kv_lora_rank:]
