"""Pinned command-line clients from the npm registry, installed once into a cache folder (written
aside, then renamed), so that the tests drive the real programs users run."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CACHE = Path.home() / ".cache" / "hybrid" / "npm"

needs_npm = pytest.mark.skipif(not (shutil.which("node") and shutil.which("npm")),
                               reason="needs Node.js and npm, to install and run the client")


def installed(package: str, version: str, binary: str) -> Path:
    """The program `binary` of `package@version`, installed if it is not yet, and checked to report
    that version."""
    folder = CACHE / f"{package.rsplit('/', 1)[-1]}-{version}"
    path = folder / "node_modules" / ".bin" / binary
    if not path.exists():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        run = subprocess.run(["npm", "install", "--prefix", str(tmp), "--no-audit", "--no-fund", "--loglevel=error",
                              f"{package}@{version}"], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"npm could not install {package}@{version}:\n{run.stderr[-3000:]}"
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    run = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60)
    assert version in run.stdout, run.stdout + run.stderr
    return path
