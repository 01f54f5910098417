"""The checkpoint's quantized weight formats, packed and unpacked.

INT4 is compressed-tensors `pack-quantized`, symmetric, per-group scales (Kimi: group 32):
eight 4-bit values per int32, low nibble first, stored with an offset of 8, so
`w[o, i] = (((packed[o, i // 8] >> 4 * (i % 8)) & 0xF) - 8) * scale[o, i // group]`.

FP8 is DeepSeek-V3's block format: `float8_e4m3fn` weights and one fp32 `weight_scale_inv`
per 128 x 128 block, multiplied in to dequantize.
"""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit values in [-8, 7], shape [..., n] (n % 8 == 0) -> int32 [..., n / 8]."""
    assert q.shape[-1] % 8 == 0, "the packed dimension must be a multiple of 8"
    u = (q.to(torch.int32) + 8) & 0xF
    u = u.reshape(*q.shape[:-1], q.shape[-1] // 8, 8) << _SHIFTS
    out = u[..., 0].clone()
    for j in range(1, 8):  # bitwise OR of the eight shifted nibbles
        out |= u[..., j]
    return out


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., n / 8] -> signed int8 values in [-8, 7], shape [..., n]. Read as bytes: in a
    little-endian int32, byte j holds values 2j (low nibble) and 2j + 1 (high)."""
    b = packed.to(torch.int32).contiguous().view(torch.uint8)
    return (torch.stack((b & 0xF, b >> 4), -1).flatten(-2).view(torch.int8) - 8)


def quantize_int4(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [out, in] -> (int32 packed [out, in / 8], bf16 scale [out, in / group]), symmetric."""
    out_f, in_f = w.shape[-2:]
    g = w.float().reshape(*w.shape[:-1], in_f // group_size, group_size)
    scale = (g.abs().amax(dim=-1, keepdim=True) / 7.0).clamp(min=1e-8).to(torch.bfloat16)
    q = torch.round(g / scale.float()).clamp(-8, 7).reshape(w.shape)
    return pack_int4(q), scale.squeeze(-1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, group_size: int = 32,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = unpack_int4(packed).to(torch.float32)
    q = q.reshape(*q.shape[:-1], q.shape[-1] // group_size, group_size) * scale.float().unsqueeze(-1)
    return q.reshape(*packed.shape[:-1], packed.shape[-1] * 8).to(dtype)


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [out, in] -> (float8_e4m3fn [out, in], fp32 scale_inv [ceil(out/b0), ceil(in/b1)])."""
    rows, cols = w.shape
    b0, b1 = block
    nr, nc = -(-rows // b0), -(-cols // b1)
    padded = torch.zeros(nr * b0, nc * b1, dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    blocks = padded.reshape(nr, b0, nc, b1)
    scale_inv = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
    q = (blocks / scale_inv[:, None, :, None]).reshape(nr * b0, nc * b1)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale_inv


def dequantize_fp8_block(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, cols = w.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (w.float() * s).to(dtype)
