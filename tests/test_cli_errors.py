"""Every user error of every command ends as one line naming what is wrong, where and the fix, with
a non-zero exit (2 for usage errors, 1 otherwise) and no traceback; `--debug` shows the traceback."""

import json
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from hybrid import cli
from hybrid.cli import app
from hybrid.model.checkpoint import CheckpointError

ROOT = Path(__file__).parent.parent
KIMI_CONFIG = ROOT / "tests" / "fixtures" / "kimi_k2_6_config.json"
DEEPSEEK_CONFIG = ROOT / "tests" / "fixtures" / "deepseek_v3_config.json"
H100_PROFILE = ROOT / "profiles" / "kimi-k2.7-code_1xh100_768gb.yaml"


def run(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def one_line_error(result, code: int = 1) -> str:
    """The error line of a failed command, checked to be the whole of its report."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def broken(tiny_dir, tmp_path_factory):
    """Copies of the tiny checkpoint, each broken one way."""
    root = tmp_path_factory.mktemp("broken")

    def copy(name: str) -> Path:
        return Path(shutil.copytree(tiny_dir, root / name))

    truncated = copy("truncated")
    shard = next(truncated.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100_000])
    not_json = copy("not_json")
    (not_json / "config.json").write_text("{not json")
    big = copy("big")
    config = json.loads((big / "config.json").read_text())
    (big / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}))
    no_tokenizer = copy("no_tokenizer")
    (no_tokenizer / "tiktoken.model").unlink()
    return {"truncated": truncated, "not_json": not_json, "big": big, "no_tokenizer": no_tokenizer}


@pytest.mark.parametrize("command", ["serve", "chat", "bench"])
def test_a_missing_model_folder_is_named_not_its_tokenizer(command):
    line = one_line_error(run(command, "--model", "/nonexistent/model"))
    assert "/nonexistent/model: no such model folder" in line and "fix:" in line
    assert "tiktoken" not in line


@pytest.mark.parametrize("name, expected", [
    ("truncated", r"model-00001-of-00001.safetensors: truncated \(100,000 bytes.*fix: download it again"),
    ("not_json", r"config.json: not valid JSON"),
    ("big", r"config.json: hidden_size = 'big' is not an integer \(fix: correct it in config.json\)"),
    ("no_tokenizer", r"no tiktoken.model \(the tokenizer\) in this folder \(fix:"),
])
def test_a_broken_checkpoint_is_one_line_naming_file_and_field(broken, name, expected):
    line = one_line_error(run("serve", "--model", str(broken[name]), "--port", "0"))
    assert str(broken[name]) in line
    assert re.search(expected, line), line


def test_plan_on_a_config_with_a_wrong_type_names_file_and_field_without_pydantic(broken):
    line = one_line_error(run("plan", "--model", str(broken["big"])))
    assert f"{broken['big']}/config.json: hidden_size = 'big'" in line
    assert "pydantic" not in line and "validation error" not in line


def test_a_profile_for_another_model_lists_its_problems_without_a_traceback(tiny_dir):
    result = run("serve", "--model", str(tiny_dir), "--profile", str(H100_PROFILE), "--port", "0")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output and "loaded" not in result.output
    assert result.stderr.startswith(f"error: {H100_PROFILE}: ")
    assert "model.n_routed_experts: profile says 384, the checkpoint's config.json says 16" in result.stderr


@pytest.mark.parametrize("args, expected", [
    (["--preset", "huge"], "Invalid value for '--preset': 'huge' is not one of 'tiny', 'mini'"),
    (["--quant", "int3"], "Invalid value for '--quant': 'int3' is not one of 'int4', 'fp8', 'bf16'"),
])
def test_synth_refuses_unknown_presets_and_quants_as_usage_errors(tmp_path, args, expected):
    line = one_line_error(run("synth", str(tmp_path / "out"), *args), code=2)
    assert expected in line and "--help" in line
    assert not (tmp_path / "out").exists()


def test_synth_presets_are_the_library_presets():
    from hybrid.model.synthetic import PRESETS

    assert [p.value for p in cli.Preset] == list(PRESETS)


def test_chat_without_a_server_fails_at_once_in_one_line():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    line = one_line_error(run("chat", "--url", f"http://127.0.0.1:{port}"))
    assert time.monotonic() - start < 5  # no retries
    assert f"cannot reach a server at http://127.0.0.1:{port}" in line and "hybrid serve" in line


def test_chat_with_a_wrong_key_says_so(tiny_dir):
    import torch

    from hybrid.server.app import create_app
    from hybrid.server.http_server import ServerThread
    from hybrid.server.serving import Serving

    serving = Serving.load(tiny_dir, dtype=torch.float32)
    with ServerThread(create_app(serving, api_key="right")) as server:
        line = one_line_error(run("chat", "--url", server.url, "--api-key", "wrong"))
        assert f"the server at {server.url} refused the API key" in line and "--api-key" in line
        line = one_line_error(run("chat", "--url", server.url + "/elsewhere", "--api-key", "right"))
        assert "has no /elsewhere/v1/models" in line


def test_serve_refuses_a_taken_port_before_loading(tiny_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        result = run("serve", "--model", str(tiny_dir), "--port", str(port))
        took = time.monotonic() - start
    line = one_line_error(result)
    assert f"cannot bind 127.0.0.1:{port}: Address already in use" in line and "--port" in line
    assert "loaded" not in result.output and took < 10


def test_a_bound_port_refuses_connections_until_the_server_starts():
    """`hybrid serve` holds its port while the model loads; clients are refused meanwhile, not
    left waiting on a server that is not there yet."""
    from hybrid.server.http_server import bind, url_of

    with bind("127.0.0.1", 0) as sock:
        assert url_of(sock) == f"http://127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", sock.getsockname()[1]), timeout=2)


@pytest.mark.parametrize("args, option", [
    (["--cores", "-4"], "--cores"), (["--cores", "0"], "--cores"), (["--numa", "0"], "--numa"),
    (["--ram", "lots"], "--ram"), (["--ram", "0GB"], "--ram"), (["--gpu", "huge"], "--gpu"),
    (["--isa", "sse"], "--isa"), (["--context", "0"], "--context"), (["--emit", "vllm"], "--emit"),
])
def test_plan_refuses_bad_numbers_instead_of_guessing(args, option):
    line = one_line_error(run("plan", "--config", str(KIMI_CONFIG), *args), code=2)
    assert f"'{option}'" in line


def test_plan_says_which_facts_it_took_from_this_machine():
    result = run("plan", "--config", str(KIMI_CONFIG), "--gpu", "4090", "--ram", "1TB")
    assert result.exit_code == 0, result.output
    assert "taken from this machine:" in result.stderr
    for said in ("cores (--cores)", "NUMA node(s) (--numa)", "instruction set", "(--isa)"):
        assert said in result.stderr
    assert "--gpu" not in result.stderr.split("taken from this machine:")[1]  # given, not taken
    described = run("plan", "--config", str(KIMI_CONFIG), "--gpu", "4090", "--ram", "1TB", "--cores", "32",
                    "--numa", "2", "--isa", "amx")
    assert described.exit_code == 0 and "taken from this machine" not in described.stderr


def test_plan_names_the_instruction_set_when_that_is_the_fix():
    args = ["plan", "--config", str(DEEPSEEK_CONFIG), "--gpu", "h100", "--ram", "768GB", "--cores", "32", "--numa", "1"]
    line = one_line_error(run(*args, "--isa", "avx512_bf16"))
    assert "The CPU planned for has no AMX" in line and "--isa amx" in line
    assert run(*args, "--isa", "amx").exit_code == 0


def test_doctor_and_plan_name_the_same_backend(monkeypatch):
    doctor = run("doctor")
    assert doctor.exit_code == 0, doctor.output
    named = doctor.output.split("expert backend")[1].split()[1]
    planned = run("plan", "--config", str(KIMI_CONFIG), "--gpu", "4090", "--ram", "1TB")
    assert f"CPU experts: {named} / " in planned.stdout

    class Refused:  # a machine where kt-kernel's kernel was refused: the default path runs torch
        name, kernel = "torch", "torch int4pack_mm"

    from hybrid.experts import choice

    monkeypatch.setattr(choice, "default_kernel", lambda: (Refused(), []))
    planned = run("plan", "--config", str(KIMI_CONFIG), "--gpu", "4090", "--ram", "1TB")
    assert "CPU experts: torch / int4_kgroup" in planned.stdout
    assert "expert backend torch" in planned.stderr


def test_profile_validate_reports_every_problem_in_one_pass(tmp_path):
    data = yaml.safe_load(H100_PROFILE.read_text())
    data["cpu"]["threads"] = "many"
    data["cpu"]["method"] = "amx_int3"
    data["kv_cache"]["page_size"] = 0
    data["decode"]["defer_experts"] = -1
    data["prefill"]["chunk_tokens"] = "big"
    data["hardware"]["ram_gib"] = -5
    data["devices"]["layers"][0]["attention"] = "cuda:7"  # found only once the schema errors were fixed, before
    data["gpu_experts"][3] = [0, 1, 999]
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    result = run("profile", "validate", str(f))
    problems = [line[4:] for line in result.stdout.splitlines() if line.startswith("  - ")]
    assert result.exit_code == 1
    fields = [p.split(":")[0] for p in problems]
    assert sorted(fields) == sorted(["cpu.threads", "cpu.method", "kv_cache.page_size", "decode.defer_experts",
                                     "prefill.chunk_tokens", "hardware.ram_gib", "devices.layers.0.attention",
                                     "gpu_experts.3"])
    assert any("unknown device 'cuda:7'" in p for p in problems)


def test_emitted_commands_run_as_planned():
    llama = run("plan", "--config", str(KIMI_CONFIG), "--gpu", "4090", "--ram", "1TB", "--emit", "llamacpp").stdout
    flags = dict(line.strip().rstrip(" \\").split(" ", 1) for line in llama.splitlines() if line.startswith("  -"))
    assert flags["-ub"] == flags["-b"]  # llama.cpp caps the micro-batch at the batch
    sglang = run("plan", "--config", str(KIMI_CONFIG), "--gpu", "4090", "--ram", "1TB", "--emit", "sglang").stdout
    assert "pip install sglang-kt" in sglang and "--kt-method" in sglang


def test_version():
    from importlib.metadata import version

    result = run("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"hybrid {version('hybrid')}"


def test_debug_shows_the_error_itself():
    result = run("--debug", "serve", "--model", "/nonexistent/model")
    assert result.exit_code == 1 and isinstance(result.exception, CheckpointError)


def test_the_installed_command_prints_the_line_and_exit_status():
    """The real entry point, as a shell runs it."""
    import subprocess

    hybrid = str(Path(sys.executable).with_name("hybrid"))
    done = subprocess.run([hybrid, "serve", "--model", "/nonexistent/model"], capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: /nonexistent/model: no such model folder") and done.stderr.count("\n") == 1
    debug = subprocess.run([hybrid, "--debug", "serve", "--model", "/nonexistent/model"], capture_output=True,
                           text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr
