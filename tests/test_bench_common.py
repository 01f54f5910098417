"""What every saved benchmark result records about the machine, checked against the machine."""

import json

import torch

from bench import common


def test_results_record_the_instruction_sets_kt_build_torch_and_threads(tmp_path, monkeypatch):
    import kt_kernel

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    path = common.save("probe", {"figure": 1.5}, "body\n")
    saved = json.loads(path.with_suffix(".json").read_text())
    m = saved["machine"]
    flags = open("/proc/cpuinfo").read().split()
    model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    assert m["cpu"] == model and saved["figure"] == 1.5
    assert ("AVX2" in m["isa"]) == ("avx2" in flags) and ("AMX" in m["isa"]) == ("amx_tile" in flags)
    assert ("AVX-512" in m["isa"]) == ("avx512f" in flags)
    assert (m["kt_kernel"], m["kt_kernel_build"]) == (kt_kernel.__version__, kt_kernel.__cpu_variant__)
    assert (m["torch"], m["torch_threads"]) == (torch.__version__, torch.get_num_threads())
    head = path.read_text().splitlines()[0]
    assert model in head and f"`{kt_kernel.__cpu_variant__}` build" in head and torch.__version__ in head
