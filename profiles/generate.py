"""Regenerate the shipped profiles: `python profiles/generate.py`.

Each profile is the planner's answer for one model on one machine described here, written with
its header notes; tests re-plan every entry and expect the file's placement back.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from placement.hardware import Hardware, describe  # noqa: E402
from placement.model_spec import Arch, ModelSpec  # noqa: E402
from placement.planner import plan  # noqa: E402
from placement.profile import Profile  # noqa: E402
from placement.report import header  # noqa: E402

FIXTURES = HERE.parent / "tests" / "fixtures"
XEON_6454S = dict(cpu_name="2x Xeon Gold 6454S (Sapphire Rapids)", cores=64, numa=2, isa="amx")
XEON_8468 = dict(cpu_name="2x Xeon Platinum 8468 (Sapphire Rapids)", cores=96, numa=2, isa="amx")
RTX_4090 = "RTX 4090=23.99GB"  # 24564 MiB
H100_PCIE = "H100 PCIe=79.65GB"  # 81559 MiB
H100_SXM = "H100 80GB HBM3=79.65GB"


@dataclass(frozen=True)
class Shipped:
    file: str
    model: str  # key of models()
    hardware: Hardware
    note: str


def models() -> dict[str, ModelSpec]:
    from hybrid.model.synthetic import kimi_config

    return {
        # Kimi K2.7 Code has the K2.6 architecture and native INT4 routed experts.
        "kimi-k2.7-code": ModelSpec.from_config(FIXTURES / "kimi_k2_6_config.json", "kimi-k2.7-code"),
        "deepseek-v3": ModelSpec.from_config(FIXTURES / "deepseek_v3_config.json", "deepseek-v3"),
        "tiny": ModelSpec.from_arch(Arch.from_dict(kimi_config("tiny"), "tiny")),
    }


SHIPPED = [
    Shipped("kimi-k2.7-code_1x4090_1tb.yaml", "kimi-k2.7-code", describe([RTX_4090], "1TB", **XEON_6454S),
            "Kimi K2.7 Code on one RTX 4090 and a 2-socket AMX Xeon with 1 TB DDR5.\n"
            "The bf16 attention, shared experts, dense layer and lm_head take most of the 24 GB, so no routed\n"
            "expert fits on the GPU and the KV cache's GPU tier gets the rest; the older part of the full\n"
            "256K context lives in host RAM, where the CPU attends to it (decode by context in the curve below).\n"
            "Every routed expert runs on the CPU from the checkpoint's own INT4 (kt-kernel RAWINT4)."),
    Shipped("kimi-k2.7-code_1xh100_768gb.yaml", "kimi-k2.7-code", describe([H100_PCIE], "768GB", **XEON_6454S),
            "Kimi K2.7 Code on one H100 80 GB (PCIe) and a 2-socket AMX Xeon with 768 GB.\n"
            "After a 128K-token KV GPU tier (the rest of the 256K context in host RAM) the H100 keeps about\n"
            "a tenth of the routed experts; long prompts stream the rest over PCIe gen5 instead of running\n"
            "them on the CPU."),
    Shipped("kimi-k2.7-code_2x4090_768gb.yaml", "kimi-k2.7-code", describe([RTX_4090] * 2, "768GB", **XEON_6454S),
            "Kimi K2.7 Code on two RTX 4090 and a 2-socket AMX Xeon with 768 GB.\n"
            "Each 4090 holds half of the layers with their KV cache; what is left holds a few hundred experts."),
    Shipped("kimi-k2.7-code_4xh100_512gb.yaml", "kimi-k2.7-code", describe([H100_SXM] * 4, "512GB", **XEON_8468),
            "Kimi K2.7 Code on four H100 80 GB (SXM) and a 2-socket AMX Xeon with 512 GB.\n"
            "About half of the routed experts live on the GPUs, so host RAM need only hold the other half."),
    Shipped("kimi-k2.7-code_cpu_1tb.yaml", "kimi-k2.7-code", describe([], "1TB", **XEON_6454S),
            "Kimi K2.7 Code on a CPU-only 2-socket AMX Xeon with 1 TB DDR5: everything runs on the CPU."),
    Shipped("deepseek-v3_1x4090_1tb.yaml", "deepseek-v3", describe([RTX_4090], "1TB", **XEON_6454S),
            "DeepSeek-V3 (block FP8) on one RTX 4090 and a 2-socket AMX Xeon with 1 TB DDR5.\n"
            "GPU weights stay FP8 (the 4090 has FP8 tensor cores); the CPU re-quantizes the routed experts\n"
            "to AMX INT8 (they fit in RAM that way)."),
    Shipped("tiny_cpu_2core.yaml", "tiny", describe([], "24GB", cores=2, isa="avx512_bf16",
                                                     cpu_name="2-core AVX-512 (development box)"),
            "The `tiny` synthetic preset on a 2-core CPU-only box with 24 GB (tests).\n"
            "One kt worker thread: the other core drives the model (kt-kernel's sync spins)."),
]


def replan(s: Shipped, specs: dict[str, ModelSpec]) -> Profile:
    return plan(specs[s.model], s.hardware)


def main() -> None:
    specs = models()
    for s in SHIPPED:
        p = replan(s, specs)
        p.save(HERE / s.file, header(p, specs[s.model], s.note))
        print(f"wrote profiles/{s.file}")


if __name__ == "__main__":
    main()
