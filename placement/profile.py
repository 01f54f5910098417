"""The Profile: the single written record of what runs where, for one model on one machine.

A versioned YAML file an operator can read, edit and check. The planner writes it; the runtime
asks it (`device_of`, `gpu_experts_of`) and refuses one with problems, with the same messages
`hybrid profile validate` prints: each names the field's path and what would fix it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from placement.atomic import atomic_write
from placement.checks import PROFILE_VERSION, Problem, ProfileError, check
from placement.hardware import Hardware
from placement.memory import LAYER_GROUPS
from placement.model_config import ConfigError
from placement.model_spec import Arch, ModelSpec

METHODS = ("int4_kgroup", "amx_int4", "amx_int8", "bf16")
_DEVICE = re.compile(r"cpu|cuda:(\d+)")

SECTION_NOTES = {
    "model": "the checkpoint this placement is for (`hybrid profile validate FILE --model DIR` checks it)",
    "hardware": "the machine it was planned for; sizes in GiB, free_gib is what was free when detected",
    "devices": "where each module group runs (cpu or cuda:N); layer ranges are inclusive",
    "gpu_experts": "routed experts kept on the GPU of each layer's router, by layer; all others run on the CPU",
    "cpu": "CPU experts: backend kt (kt-kernel) or torch; method int4_kgroup (the checkpoint's INT4 in place),\n"
           "amx_int4 / amx_int8 (re-quantized for AMX) or bf16; threads: kernel threads; threadpools: per NUMA node",
    "kv_cache": "paged MLA latent cache in whole pages; max_tokens = concurrency x context_length rounded up to pages,\n"
                "of which host_tokens live in host RAM (a sequence's older pages) and the rest on each layer's\n"
                "attention device; dtype bf16 or fp8",
    "prefill": "prompts of stream_threshold_tokens or more stream CPU experts to the GPU layer by layer\n"
               "(null: never); stream_buffer_mib is the staging memory per GPU",
    "decode": "defer_experts: of each token's routed experts, how many lowest-weight ones may finish\n"
              "during the next layer (0: exact)",
    "prediction": "what the cost model expects, for information (formulas in docs/placement.md)",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Arch):
    config_hash: str


class LayerDevices(_Section):
    first: int = Field(ge=0)
    last: int = Field(ge=0)
    attention: str
    router: str
    shared: str
    dense: str


class Devices(_Section):
    embed: str
    lm_head: str
    layers: list[LayerDevices]


class CpuSection(_Section):
    backend: Literal["dot", "kt", "torch"]
    method: Literal[METHODS]
    threads: int = Field(ge=1)
    threadpools: int = Field(ge=1)


class KVCache(_Section):
    dtype: Literal["bf16", "fp8"] = "bf16"
    page_size: int = Field(ge=1)
    max_tokens: int = Field(ge=1)
    max_pages: int = Field(ge=1)
    context_length: int = Field(ge=1)
    concurrency: int = Field(ge=1)
    host_tokens: int = Field(default=0, ge=0)

    @property
    def slots(self) -> int:
        """Tokens the runtime allocates: the cache is made of whole pages."""
        return self.max_pages * self.page_size

    @property
    def device_tokens(self) -> int:
        """Tokens of the cache on the attention devices."""
        return max(0, self.slots - self.host_tokens)


class Prefill(_Section):
    chunk_tokens: int = Field(ge=1)
    stream_threshold_tokens: int | None = Field(default=None, ge=1)
    stream_buffer_mib: dict[str, int] = Field(default_factory=dict)


class Decode(_Section):
    defer_experts: int = Field(default=0, ge=0)


class Prediction(_Section):
    decode_tok_s: float
    prefill_tok_s: float
    decode_context: int
    prompt_tokens: int
    concurrency: int
    decode_ms: dict[str, float]
    prefill_ms: dict[str, float]
    decode_curve: dict[int, float] = Field(default_factory=dict)  # context -> decode tok/s


class Profile(_Section):
    version: int
    model: ModelSection
    hardware: Hardware
    devices: Devices
    gpu_experts: dict[int, list[int]] = Field(default_factory=dict)
    cpu: CpuSection
    kv_cache: KVCache
    prefill: Prefill
    decode: Decode = Field(default_factory=Decode)
    prediction: Prediction | None = None

    # ---- what the runtime asks ----
    def device_of(self, module: str, layer: int | None = None) -> str:
        """'cpu' or 'cuda:N' for embed, lm_head (and the final norm), or a layer's attention,
        router, shared or dense module."""
        if module == "embed":
            return self.devices.embed
        if module in ("lm_head", "norm"):
            return self.devices.lm_head
        if module not in LAYER_GROUPS or layer is None:
            raise ValueError(f"device_of({module!r}, {layer!r}): use embed, lm_head, or one of "
                             f"{', '.join(LAYER_GROUPS)} with a layer index")
        for r in self.devices.layers:
            if r.first <= layer <= r.last:
                return getattr(r, module)
        raise ValueError(f"layer {layer} is in no devices.layers range")

    def gpu_experts_of(self, layer: int) -> list[int]:
        """Routed experts of `layer` resident on its router's GPU (the rest run on the CPU)."""
        return list(self.gpu_experts.get(layer, []))

    # ---- reading and writing ----
    @classmethod
    def load(cls, path: str | Path, model: str | Path | None = None) -> Profile:
        """Read and check a profile (against a checkpoint folder or config.json when given)."""
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ProfileError([Problem(str(path), f"cannot read ({e.strerror})", "give an existing file")],
                               str(path)) from None
        return cls.parse(text, model, source=str(path))

    @classmethod
    def parse(cls, text: str, model: str | Path | None = None, source: str = "profile") -> Profile:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f"line {line + 1}" if line is not None else "the file"
            raise ProfileError([Problem("(file)", f"not valid YAML: {getattr(e, 'problem', e)}",
                                        f"correct the syntax at {where}")], source) from None
        if not isinstance(data, dict):
            raise ProfileError([Problem("(file)", "is not a YAML mapping", "start from a profile that "
                                        "`hybrid plan --out` wrote")], source)
        problems: list[Problem] = []
        try:
            checkpoint = Arch.from_config(model) if model else None
        except ConfigError as e:
            checkpoint = None
            problems.append(Problem("--model", str(e), "give a checkpoint folder or its config.json"))
        try:
            profile, broken = cls.model_validate(data), set()
        except ValidationError as e:
            problems += [_schema_problem(err) for err in e.errors()]
            broken = {".".join(map(str, err["loc"][:2])) for err in e.errors()}
            profile = _parts(cls, data, broken)
        problems += check(profile, checkpoint, broken)  # what the parts that did parse say, in the same pass
        if problems:
            raise ProfileError(problems, source)
        return profile

    def to_yaml(self, header: str = "") -> str:
        data = self.model_dump(mode="json")
        data["hardware"] = self.hardware.model_dump(mode="json", exclude_none=True)
        data["gpu_experts"] = {int(k): v for k, v in data["gpu_experts"].items()}
        out = [f"# {line}".rstrip() for line in header.splitlines()]
        for key, value in data.items():
            note = SECTION_NOTES.get(key)
            if note:
                out += ["", *(f"# {line}" for line in note.splitlines())]
            out.append(yaml.dump({key: value}, Dumper=_Dumper, sort_keys=False, width=110).rstrip())
        return "\n".join(out) + "\n"

    def save(self, path: str | Path, header: str = "") -> None:
        """Write atomically: a reader sees the old file or the new one, never half of one."""
        atomic_write(path, self.to_yaml(header))

    # ---- checks ----
    def problems(self, checkpoint: Arch | None = None) -> list[Problem]:
        """Everything that would stop this profile from running as written."""
        return check(self, checkpoint)

    def gpu_index(self, device: str) -> int | None:
        """N for a 'cuda:N' this machine has, None for 'cpu'; ValueError for anything else."""
        m = _DEVICE.fullmatch(device)
        if not m or (m.group(1) is not None and int(m.group(1)) >= len(self.hardware.gpus)):
            raise ValueError(device)
        return None if m.group(1) is None else int(m.group(1))

    def spec(self) -> ModelSpec:
        return ModelSpec.from_arch(Arch(**self.model.model_dump(exclude={"config_hash"})))


def _parts(model: type[BaseModel], data: dict, broken: set[str], prefix: str = ""):
    """`model` built, without validation, from the fields of `data` that parse on their own (a
    section with a broken field keeps its other fields); `broken` lists the dotted paths that did
    not parse and gains those of missing required fields."""
    fields = {}
    for name, info in model.model_fields.items():
        path, value = prefix + name, data.get(name)
        if path in broken or any(b.startswith(path + ".") for b in broken):
            section = info.annotation
            if not prefix and isinstance(value, dict) and isinstance(section, type) and issubclass(section, BaseModel):
                fields[name] = _parts(section, value, broken, path + ".")
        elif name in data:
            fields[name] = TypeAdapter(info.annotation).validate_python(value)
        elif info.is_required():
            broken.add(path)
    return model.model_construct(**fields)


def _schema_problem(err: dict) -> Problem:
    path = ".".join(str(x) for x in err["loc"]) or "(file)"
    kind, ctx = err["type"], err.get("ctx", {})
    fix = {
        "missing": "add this field",
        "extra_forbidden": "remove it: it is not a profile field",
        "literal_error": f"use one of {ctx.get('expected', '')}",
        "greater_than_equal": f"use a value of at least {ctx.get('ge')}",
        "greater_than": f"use a value above {ctx.get('gt')}",
    }.get(kind, "write a value of the type shown in docs/placement.md")
    shown = repr(err.get("input"))
    value = "" if kind == "missing" or isinstance(err.get("input"), dict) else \
        f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
    return Problem(path, f"{err['msg']}{value}", fix)


class _Dumper(yaml.SafeDumper):
    """Block mappings, but lists of plain values on one line: expert ids stay readable."""


def _represent_list(dumper: yaml.SafeDumper, items: list):
    flow = all(not isinstance(x, (dict, list)) for x in items)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=flow)


_Dumper.add_representer(list, _represent_list)
