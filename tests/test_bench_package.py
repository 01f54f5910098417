"""bench/ as a package: every script imports as `bench.NAME` without touching sys.path, records
the command that runs it, and builds Kimi's expert shapes as the planner sizes them."""

import importlib
import json
import pkgutil
import sys
import types
from pathlib import Path

import bench
from bench import common
from placement.model_spec import ModelSpec

ROOT = Path(__file__).parent.parent


def test_every_script_imports_as_part_of_the_package():
    names = [m.name for m in pkgutil.iter_modules(bench.__path__)]
    assert {"common", "cpu", "experts", "endurance", "gpu_check", "kv_fp8", "kv_tiers", "load", "quality", "serve",
            "train_default"} <= set(names)
    before = list(sys.path)
    for name in names:
        importlib.import_module(f"bench.{name}")
    assert sys.path == before


def test_a_saved_result_records_the_module_command(monkeypatch, tmp_path):
    main = types.ModuleType("__main__")
    main.__spec__ = importlib.util.find_spec("bench.cpu")  # as `python -m bench.cpu` runs it
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "bench/cpu.py"), "--preset", "mini"])
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    path = common.save("probe", {"figure": 1}, "body\n")
    saved = json.loads(path.with_suffix(".json").read_text())
    assert saved["command"] == "python -m bench.cpu --preset mini" and saved["figure"] == 1
    assert "Command: `python -m bench.cpu --preset mini`" in path.read_text()


def test_kimi_experts_have_the_bytes_the_planner_counts():
    spec = ModelSpec.from_config(ROOT / "tests/fixtures/kimi_k2_6_config.json")
    a = spec.arch
    assert (common.KIMI_HIDDEN, common.KIMI_INTER, common.KIMI_EXPERTS, common.KIMI_TOP_K) == (
        a.hidden_size, a.moe_intermediate_size, a.n_routed_experts, a.num_experts_per_tok)
    w = common.kimi_experts(2)
    per_expert = w.nbytes() // 2
    assert per_expert == spec.bytes["expert"] - 3 * 2 * 4  # the checkpoint also stores each weight's int32 shape
    assert w.gate[0].data_ptr() != w.gate[1].data_ptr()  # each expert in its own memory, not a view of one
    assert common.kimi_experts(1, "float").nbytes() == 3 * a.hidden_size * a.moe_intermediate_size * 2
