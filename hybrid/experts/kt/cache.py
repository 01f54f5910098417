"""kt-kernel's quantized copies of float experts on disk: online quantization writes kt's files
into a folder, ours, under `cache_dir/<key>/layer_N`, written beside and renamed into place, and
reused while its manifest matches the weights, the kernel and the kt build."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hybrid.experts import cpu
from hybrid.experts.weights import ExpertWeights
from placement.atomic import atomic_dir

log = logging.getLogger(__name__)
DEFAULT_CACHE = Path("~/.cache/hybrid/kt")


@dataclass(frozen=True)
class CacheEntry:
    folder: Path
    key: dict

    def valid(self) -> bool:
        """Complete and made from the same weights by the same kernel and kt build."""
        try:
            manifest = json.loads((self.folder / "manifest.json").read_text())
        except (OSError, ValueError):
            return False
        files = manifest.get("files") or {}
        return manifest.get("key") == self.key and bool(files) and all(
            (self.folder / f).is_file() and (self.folder / f).stat().st_size == n for f, n in files.items())

    @contextlib.contextmanager
    def writing(self):
        """A fresh folder for kt to write into; renamed into place with its manifest on success.
        A stale or mismatched entry and temporary folders left by dead runs are removed first."""
        if self.folder.exists():
            log.info("kt cache %s is stale; rebuilding it", self.folder)
            shutil.rmtree(self.folder)
        for old in self.folder.parent.glob(f".{self.folder.name}.*"):
            if time.time() - old.stat().st_mtime > 3600:
                shutil.rmtree(old, ignore_errors=True)
        with atomic_dir(self.folder) as tmp:
            yield tmp
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            (tmp / "manifest.json").write_text(json.dumps({"key": self.key, "files": files}, indent=1))


def cache_entry(root: Path, layer: int, kernel: str, w: ExpertWeights, rows: int, subpools: int) -> CacheEntry:
    """Where kt's quantized copy of the first `rows` rows of these weights lives: keyed by the
    kernel, the kt build and a fingerprint of the weights (a fixed sample of every expert's values)."""
    from kt_kernel import __int8_weight_layout__

    digest = hashlib.sha256()
    for t in (w.gate, w.up, w.down):
        flat = t.reshape(t.shape[0], -1)
        digest.update(flat[:, ::max(1, flat.shape[1] // 4096)].contiguous().view(torch.uint8).numpy().tobytes())
    key = {"kernel": kernel, "kt": cpu.kt().version, "build": cpu.kt().variant, "int8_layout": __int8_weight_layout__,
           "shape": [w.num_experts, w.hidden_size, w.intermediate_size], "rows": rows, "dtype": str(w.gate.dtype),
           "subpools": subpools, "weights": digest.hexdigest()}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return CacheEntry(root.expanduser() / name / f"layer_{layer}", key)
