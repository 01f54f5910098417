"""kt-kernel's MoE kernel classes: which one runs each method on which build, the shapes each
takes, and the choice of one for a layer's experts."""

from __future__ import annotations

import logging

from hybrid.experts import cpu

log = logging.getLogger(__name__)

# kt classes per method, best first; the AVX2 build has only the AVX2 ones
CLASSES = {
    "int4_kgroup": ("AMXInt4_KGroup_MOE", "AVX2RawInt4_MOE"),
    "amx_int8": ("AMXInt8_MOE",),
    "amx_int4": ("AMXInt4_MOE",),
    "bf16": ("AMXBF16_MOE", "AVX2BF16_MOE"),
}
QUANTIZED = ("amx_int8", "amx_int4")  # quantized from float weights at load, cached on disk
IN_PLACE = ("AVX2RawInt4_MOE",)  # reads the weight tensors at every forward
ALIGN = {"AMXInt4_MOE": 128}  # hidden and intermediate sizes must divide by this, else by 64 (else a crash)
MIN_EXPERTS = {"AMXInt4_KGroup_MOE": 8}  # fewer experts in a layer crash it (seen with 4 to 7)


class Unsupported(RuntimeError):
    """kt-kernel cannot run these experts on this machine (the torch backend can)."""


def resolve(method: str, fmt: str) -> tuple[str, str]:
    """(method, kt class) to use: the one asked for if this build has it, else the best one that
    runs. INT4 weights run as stored; float ones are quantized (or not) at load."""
    from kt_kernel import kt_kernel_ext

    if fmt == "int4":
        if method not in ("auto", "int4_kgroup"):
            raise ValueError(f"method {method!r} quantizes float weights; these experts are INT4 (use int4_kgroup)")
        order = ["int4_kgroup"]
    else:
        if method == "int4_kgroup":
            raise ValueError("method int4_kgroup runs INT4 checkpoints; these experts are float")
        order = [m for m in dict.fromkeys([method, "amx_int8", "bf16", "amx_int4"]) if m != "auto"]
    for m in order:
        for name in CLASSES[m]:
            if hasattr(kt_kernel_ext.moe, name):
                if m != method and method != "auto":
                    log.warning("kt-kernel's %s build has no kernel for %s; using %s", cpu.kt().variant, method, m)
                return m, name
    raise Unsupported(f"kt-kernel's {cpu.kt().variant} build has no kernel for {fmt} experts")
