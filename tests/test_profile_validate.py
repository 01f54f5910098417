"""`hybrid profile validate`: every fault named by its field, with a fix, never as a traceback."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from hybrid.cli import app
from placement.model_spec import Arch
from placement.profile import Profile, ProfileError

ROOT = Path(__file__).parent.parent
BASE = ROOT / "profiles" / "kimi-k2.7-code_1xh100_768gb.yaml"
KIMI_CONFIG = ROOT / "tests" / "fixtures" / "kimi_k2_6_config.json"
DEEPSEEK_CONFIG = ROOT / "tests" / "fixtures" / "deepseek_v3_config.json"


def _set(path: str, value):
    def fault(d: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            d = d[int(key) if isinstance(d, list) or key.isdigit() else key]
        d[int(last) if last.isdigit() else last] = value
    return fault


def _drop(path: str):
    def fault(d: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            d = d[key]
        del d[last]
    return fault


def _all(*faults):
    def fault(d: dict) -> None:
        for f in faults:
            f(d)
    return fault


def _rehash(d: dict) -> None:
    """The model section's hash made to match its (edited) dimensions."""
    d["model"]["config_hash"] = Arch(**{k: v for k, v in d["model"].items() if k != "config_hash"}).digest()


def _cpu_only(d: dict) -> None:
    d["hardware"]["gpus"], d["gpu_experts"], d["prefill"]["stream_buffer_mib"] = [], {}, {}
    d["devices"]["lm_head"] = "cpu"
    d["devices"]["layers"][0].update(attention="cpu", router="cpu", shared="cpu", dense="cpu")


FAULTS = {  # name -> (change to the profile, what the message must say)
    "unknown device": (_set("devices.layers.0.attention", "cuda:1"),
                       "devices.layers.0.attention: unknown device 'cuda:1' (fix: use 'cpu' or 'cuda:0'"),
    "memory over budget": (_set("gpu_experts.1", list(range(384))),
                           "gpu_experts (on cuda:0): cuda:0 would hold 87.7 GiB"),
    "too many experts": (_set("gpu_experts.2", list(range(384)) * 2),
                         "gpu_experts.2: lists 768 experts; the layer has 384"),
    "expert id out of range": (_set("gpu_experts.3", [0, 1, 384]),
                               "gpu_experts.3: expert ids [384] are out of range (fix: use ids 0-383)"),
    "threads over cores": (_set("cpu.threads", 128),
                           "cpu.threads: 128 threads but the machine has 64 physical cores"),
    "unknown method": (_set("cpu.method", "amx_int3"),
                       "cpu.method: Input should be 'int4_kgroup', 'amx_int4', 'amx_int8' or 'bf16'"),
    "unsupported version": (_set("version", 2), "version: 2 is not supported"),
    "experts on a dense layer": (_set("gpu_experts.0", [1, 2]), "gpu_experts.0: layer 0 is a dense layer"),
    "layer not covered": (_set("devices.layers.0.last", 50), "devices.layers: layers 51-60 are in no range"),
    "kv smaller than context": (_set("kv_cache.concurrency", 2),
                                "kv_cache.max_tokens: 262144 is less than concurrency x context_length in whole "
                                "pages of 16 = 524288"),
    "kv not in whole pages": (_all(_set("kv_cache.max_tokens", 262150), _set("kv_cache.max_pages", 16385)),
                              "kv_cache.max_tokens: 262150 is not a whole number of pages of 16 (the runtime "
                              "allocates whole pages) (fix: set it to 262160 and max_pages to 16385)"),
    "host tier not in pages": (_set("kv_cache.host_tokens", 131080),
                               "kv_cache.host_tokens: 131080 is not a whole number of pages of 16"),
    "missing field": (_drop("cpu.threads"), "cpu.threads: Field required (fix: add this field)"),
    "too many deferred experts": (_set("decode.defer_experts", 8),
                                  "decode.defer_experts: 8 defers every routed expert"),
    "edited model": (_set("model.vocab_size", 163841), "model.config_hash: does not match the model dimensions"),
    "INT4 method on an FP8 model": (_all(_set("model.quant", "fp8"), _rehash, _set("gpu_experts", {}),
                                         _set("prefill.stream_threshold_tokens", None), _set("cpu.backend", "kt")),
                                    "cpu.method: int4_kgroup reads INT4 checkpoints in place; this one stores fp8"),
    "AMX method without AMX": (_all(_set("hardware.cpu.isa", ["avx512", "avx2"]), _set("cpu.method", "amx_int4"),
                                    _set("cpu.backend", "kt")),
                               "cpu.method: amx_int4 needs AMX, which the profile's CPU lacks"),
    "torch backend with an AMX method": (_all(_set("cpu.backend", "torch"), _set("cpu.method", "amx_int4")),
                                         "cpu.backend: the torch backend runs experts as stored"),
    "kt without AVX2": (_all(_set("hardware.cpu.isa", []), _set("cpu.backend", "kt")),
                        "cpu.backend: kt-kernel's MoE kernels need AVX2 at least"),
    "dot without AVX2": (_set("hardware.cpu.isa", []), "cpu.backend: the INT4 dot kernel needs AVX2 at least"),
    "dot on an FP8 model": (_all(_set("model.quant", "fp8"), _rehash, _set("gpu_experts", {}),
                                 _set("prefill.stream_threshold_tokens", None), _set("cpu.method", "amx_int4")),
                            "cpu.backend: the INT4 dot kernel runs INT4 checkpoints as stored; this one stores fp8"),
    "dot with an AMX method": (_set("cpu.method", "amx_int4"),
                               "cpu.backend: the INT4 dot kernel runs INT4 experts as stored (int4_kgroup), not amx_int4"),
    "dot on sizes it does not take": (_all(_set("model.moe_intermediate_size", 1984), _rehash),
                                      "cpu.backend: the INT4 dot kernel takes hidden and expert sizes divisible by 128"),
    "page size": (_all(_set("kv_cache.page_size", 24), _set("kv_cache.max_pages", 10923),
                       _set("kv_cache.host_tokens", 24 * 5461)),
                  "kv_cache.page_size: 24 is not a power of two"),
    "too few pages": (_set("kv_cache.max_pages", 100),
                      "kv_cache.max_pages: 100 pages do not hold max_tokens 262144 (fix: set it to "
                      "max_tokens / page_size = 16384)"),
    "context over the model's maximum": (_all(_set("model.max_position_embeddings", 65536), _rehash),
                                         "kv_cache.context_length: 262144 exceeds the model's max_position_embeddings"),
    "stream buffer on the CPU": (_set("prefill.stream_buffer_mib.cpu", 64),
                                 "prefill.stream_buffer_mib.cpu: experts stream to GPUs, not to the CPU"),
    "stream threshold without a GPU": (_cpu_only, "prefill.stream_threshold_tokens: is set but the machine has no GPU"),
    "range upside down": (_set("devices.layers.0.first", 61), "devices.layers.0: range 61-60 is not within layers 0-60"),
    "layer in two ranges": (lambda d: d["devices"]["layers"].append({**d["devices"]["layers"][0], "first": 60}),
                            "devices.layers: layers 60 are in more than one range"),
    "duplicate expert ids": (_set("gpu_experts.5", [0, 0, 1]),
                             "gpu_experts.5: expert ids [0] are listed more than once"),
    "no such layer": (_set("gpu_experts.99", [1]), "gpu_experts.99: there is no layer 99"),
    "host RAM short": (_set("hardware.ram_gib", 512), "hardware.ram_gib: the CPU side needs"),
    # fields the runtime could not honour as written
    "pools the runtime would not make": (_set("cpu.threadpools", 1),
                                         "cpu.threadpools: 1 pool(s), but the runtime makes one kt-kernel pool per "
                                         "NUMA node its 64 threads run on (2 node(s) of 32 cores): 2 (fix: set it to 2)"),
    "a layer split over devices": (_set("devices.layers.0.shared", "cpu"),
                                   "devices.layers.0: splits a layer's attention, router, shared and dense over cpu "
                                   "and cuda:0; the runtime runs a layer's modules on one device (fix: give all four"),
    "stream buffer below two experts": (_set("prefill.stream_buffer_mib.cuda:0", 30),
                                        "prefill.stream_buffer_mib.cuda:0: 30 MiB cannot stage two experts (48 MiB)"),
}


def _validate(tmp_path: Path, text: str, *extra: str):
    f = tmp_path / "broken.yaml"
    f.write_text(text)
    return CliRunner().invoke(app, ["profile", "validate", str(f), *extra], env={"COLUMNS": "200"})


def _problem_lines(output: str) -> list[str]:
    return [line.strip()[2:] for line in output.splitlines() if line.startswith("  - ")]


def test_the_base_profile_is_valid(tmp_path):
    result = _validate(tmp_path, BASE.read_text(), "--model", str(KIMI_CONFIG))
    assert result.exit_code == 0 and "valid" in result.output


def test_each_fault_gets_its_own_accurate_message(tmp_path):
    messages = []
    for name, (fault, expected) in FAULTS.items():
        data = yaml.safe_load(BASE.read_text())
        fault(data)
        result = _validate(tmp_path, yaml.safe_dump(data, sort_keys=False))
        assert result.exit_code == 1, name
        assert "Traceback" not in result.output, name
        assert result.exception is None or isinstance(result.exception, SystemExit), name
        lines = _problem_lines(result.output)
        assert len(lines) == 1, (name, lines)
        assert expected in lines[0], (name, lines[0])
        assert "(fix: " in lines[0], name
        messages.append(lines[0])
    assert len(set(messages)) == len(FAULTS) >= 30


def test_yaml_syntax_errors_name_the_line(tmp_path):
    result = _validate(tmp_path, "version: 1\nmodel: [unclosed\n")
    assert result.exit_code == 1 and "not valid YAML" in result.output and "line" in result.output


def test_a_profile_for_another_model_is_refused_field_by_field(tmp_path):
    result = _validate(tmp_path, BASE.read_text(), "--model", str(DEEPSEEK_CONFIG))
    lines = _problem_lines(result.output)
    assert result.exit_code == 1
    assert any(line.startswith("model.n_routed_experts: profile says 384, the checkpoint's config.json says 256")
               for line in lines)


def test_load_lists_every_problem_at_once(tmp_path):
    data = yaml.safe_load(BASE.read_text())
    data["cpu"]["threads"] = 999
    data["gpu_experts"][4] = [999]
    data["decode"]["defer_experts"] = 8
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError) as e:
        Profile.load(f)
    assert len(e.value.problems) == 3
    assert all(str(p) in str(e.value) for p in e.value.problems)
