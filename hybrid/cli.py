"""`hybrid` commands. Each command is a thin shell over the package that does the work.

Every command runs inside `Commands.invoke`, the one place where the command line meets the
library: an error the user can fix (`hybrid.errors.USER_ERRORS`, a bad option value, a server
that cannot be reached or refuses the key, a file that cannot be read or written) ends as one
line on stderr, `error: what is wrong, where (fix: ...)`, and a non-zero exit: 2 for usage errors,
1 otherwise. `hybrid --debug COMMAND` shows the traceback instead; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer
from typer.core import TyperGroup

from hybrid.errors import USER_ERRORS, UsageError, UserError, exit_code
from placement.hardware import ISA_LEVELS, gpu_from_spec, parse_gib


_PARSE_ERROR = typer.BadParameter.__bases__[0]  # click's UsageError, in whichever click typer uses


class Commands(TyperGroup):
    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except _PARSE_ERROR as e:  # an option value or command the parser refused
            if ctx.params.get("debug"):
                raise
            where = e.ctx.command_path if e.ctx else ctx.command_path
            _fail(f"{e.format_message().replace('Value error, ', '')} (see `{where} --help`)", 2)
        except Exception as e:
            known = _user_error(e)
            if known is None or ctx.params.get("debug"):
                raise
            _fail(str(known), exit_code(known))


def _fail(message: str, code: int):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _user_error(e: Exception) -> Exception | None:
    """`e` as an error the user can fix, or None for a bug."""
    if isinstance(e, USER_ERRORS):
        return e
    if "openai" in sys.modules:
        import openai

        if isinstance(e, (openai.APIConnectionError, openai.APIStatusError)):
            url = e.request.url
            server = f"{url.scheme}://{url.netloc.decode()}"
            if isinstance(e, openai.AuthenticationError):
                return UserError(f"the server at {server} refused the API key (fix: give its key with --api-key "
                                 "or HYBRID_API_KEY)")
            if isinstance(e, openai.NotFoundError):
                return UserError(f"the server at {server} has no {url.path} (fix: give --url the server's base "
                                 "URL, e.g. http://127.0.0.1:8000)")
            if isinstance(e, openai.APIStatusError):
                return UserError(f"the server at {server} answered {e.request.method} {url.path} with "
                                 f"{e.status_code}: {e.message}")
            cause = e.__cause__ or e
            return UserError(f"cannot reach a server at {server} ({cause}) (fix: start one with `hybrid serve`, "
                             "or correct --url)")
    if isinstance(e, OSError) and e.filename:
        return UserError(f"{e.filename}: {e.strerror}")
    return None


def _checked(parse):
    """An option callback that refuses (as a usage error) a value `parse` cannot read."""
    from placement.errors import PlacementError

    def check(value):
        try:
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v is not None:
                    parse(v)
        except PlacementError as e:
            raise typer.BadParameter(str(e)) from None
        return value
    return check


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"hybrid {version('hybrid')}")
        raise typer.Exit()


app = typer.Typer(cls=Commands, no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help="CPU/GPU hybrid MoE runtime.")


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error, not just its line."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    """CPU/GPU hybrid MoE runtime."""


class Preset(str, Enum):  # hybrid.model.synthetic.PRESETS (not imported here: it needs torch)
    tiny = "tiny"
    mini = "mini"


class Quant(str, Enum):
    int4 = "int4"
    fp8 = "fp8"
    bf16 = "bf16"


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to write (must not exist)."),
    preset: Preset = typer.Option("tiny", help="tiny (tests) or mini (benchmarks)."),
    seed: int = typer.Option(0),
    quant: Quant = typer.Option("int4", help="int4 (compressed-tensors routed experts), fp8 or bf16."),
    nested: bool = typer.Option(False, help="K2.5-style text_config nesting and language_model. prefix."),
):
    """Write a random-weight checkpoint in Kimi K2's exact format."""
    from rich.console import Console

    from hybrid.model.synthetic import write_checkpoint

    if out.exists():
        raise UsageError(f"{out} exists (fix: give a new folder)")
    name = preset.value
    with Console().status(f"writing {name} to {out}") as status:
        write_checkpoint(out, name, seed, quant.value, nested, progress=lambda m: status.update(f"{name}: {m}"))
    typer.echo(f"wrote {out}")


@app.command()
def bench(
    model: Path = typer.Option(None, help="Checkpoint folder (default: the embedded k2-stdlib model)."),
    profile: Path = typer.Option(None, help="Placement profile; without one, a plan for this machine."),
    prompt: int = typer.Option(512, min=1, help="Prompt tokens to prefill."),
    decode: int = typer.Option(32, min=1, help="Tokens to decode after it."),
):
    """Measure prefill and decode with a placement, beside the planner's prediction."""
    from rich.console import Console

    from hybrid.default_model import resolve_model
    from hybrid.api import load_model
    from hybrid.settings import settings
    from hybrid.tuning import compare, parts, plan_here

    console = Console()
    folder = resolve_model(model)
    s = settings(folder, profile or plan_here(folder))
    with console.status(f"loading {folder.name} and measuring {prompt} + {decode} tokens"):
        loaded = load_model(folder, s)
        loaded.warm_up()  # as `hybrid serve` does before it serves
        table = compare(loaded, s.profile, prompt, decode, host_now=profile is None)
    console.print(table)
    with console.status("timing one decode step and one prefill by part, and this machine's floors"):
        tables = parts(loaded, prompt)
    for t in tables:
        console.print(t)


def _load_serving(folder: Path, profile, name: str | None, console):
    """Load a checked model folder with a progress bar; start its engine."""
    import time

    from rich.progress import Progress

    from hybrid.server.serving import Serving

    start = time.monotonic()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"loading {folder}", total=None)
        serving = Serving.load(folder, profile, name,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
    console.print(f"loaded {folder} in {time.monotonic() - start:.1f} s")
    return serving


def _model_and_settings(model: Path | None, profile: Path | None, console):
    """The model folder (the default one if none is given) and the settings its profile (or none)
    gives, both checked: what can be refused is refused before anything slow starts."""
    from hybrid.default_model import resolve_model
    from hybrid.settings import settings

    folder = resolve_model(model)
    return folder, settings(folder, profile)


MODEL_HELP = "Checkpoint folder (default: the embedded k2-stdlib model)."


@app.command()
def serve(
    model: Path = typer.Option(None, help=MODEL_HELP),
    profile: Path = typer.Option(None, help="Placement profile (YAML) from `hybrid plan`."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 to serve other machines)."),
    port: int = typer.Option(8000, min=0, max=65535),
    api_key: str = typer.Option(None, envvar="HYBRID_API_KEY",
                                help="Require this key (Bearer or x-api-key) on every endpoint but /health."),
    served_model_name: str = typer.Option(None, help="The model id clients send (default: the folder's name)."),
):
    """Serve a model over OpenAI's and Anthropic's HTTP APIs (/v1/chat/completions, /v1/messages, ...).

    The model folder, the profile and the port are checked before the model loads; the address is
    printed once the server accepts connections."""
    from rich.console import Console

    from hybrid.server.app import create_app
    from hybrid.server.http_server import Server, bind, url_of

    console = Console(stderr=True)
    folder, runtime = _model_and_settings(model, profile, console)
    sock = bind(host, port)
    serving = _load_serving(folder, runtime, served_model_name, console)
    url = url_of(sock)

    def started() -> None:
        for line in serving.summary:
            console.print(line, highlight=False, markup=False, soft_wrap=True)
        console.print(f"serving [bold]{serving.model_name}[/] at {url} (OpenAI: {url}/v1; Anthropic: {url} or "
                      f"{url}/anthropic; also /health, /metrics)", highlight=False, soft_wrap=True)

    Server(create_app(serving, api_key), host, port, log_level="info", on_started=started).run(sockets=[sock])


@app.command()
def chat(
    model: Path = typer.Option(None, help=MODEL_HELP + " Runs in this process."),
    url: str = typer.Option(None, help="Talk to a running server instead, e.g. http://127.0.0.1:8000."),
    api_key: str = typer.Option(None, envvar="HYBRID_API_KEY", help="The server's API key (with --url)."),
    profile: Path = typer.Option(None, help="Placement profile (YAML), without --url."),
    max_tokens: int = typer.Option(1024, min=1, help="Longest reply, in tokens."),
    thinking: bool = typer.Option(True, help="Let the model think before answering."),
    temperature: float = typer.Option(None, min=0, max=2, help="Sampling temperature (default: the server's)."),
    seed: int = typer.Option(None, help="Sample reproducibly: the session's n-th reply with seed + n."),
):
    """Chat in the terminal: replies stream, thinking dimmed; /reset, /system TEXT, /exit."""
    import openai
    from rich.console import Console

    from hybrid.chat import Chat

    console = Console()
    if url:
        if model or profile:
            raise UsageError("give either --url or --model/--profile, not both")
        base = url.rstrip("/").removesuffix("/v1") + "/v1"
        client = openai.OpenAI(base_url=base, api_key=api_key or "none", max_retries=0)
        Chat(client, client.models.list().data[0].id, console, max_tokens, thinking, temperature=temperature,
             seed=seed).run()
        return
    import secrets

    from hybrid.server.app import create_app
    from hybrid.server.http_server import ServerThread

    folder, runtime = _model_and_settings(model, profile, console)
    serving = _load_serving(folder, runtime, None, console)
    key = secrets.token_urlsafe(16)
    with ServerThread(create_app(serving, key)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        Chat(client, serving.model_name, console, max_tokens, thinking, temperature=temperature, seed=seed).run()


class Emit(str, Enum):
    sglang = "sglang"
    llamacpp = "llamacpp"


Isa = Enum("Isa", {name: name for name in ISA_LEVELS}, type=str)


@app.command()
def plan(
    model: Path = typer.Option(None, help="Checkpoint folder (only its config.json is read)."),
    config: Path = typer.Option(None, help="A config.json, instead of --model."),
    name: str = typer.Option(None, help="Model name in the profile (default: the folder's name)."),
    hardware: Path = typer.Option(None, help="Machine description (YAML) to plan for instead of this one."),
    gpu: list[str] = typer.Option(None, callback=_checked(gpu_from_spec),
                                  help="A GPU to plan for: 24GB, a model (4090, h100) or NAME=SIZE. Repeat per GPU."),
    no_gpu: bool = typer.Option(False, "--no-gpu", help="Plan for the CPU alone."),
    ram: str = typer.Option(None, callback=_checked(parse_gib), help="Host RAM to plan for, e.g. 1TB."),
    cores: int = typer.Option(None, min=1, help="Physical CPU cores to plan for."),
    numa: int = typer.Option(None, min=1, help="NUMA nodes to plan for."),
    isa: Isa = typer.Option(None, help="Strongest CPU ISA: amx, avx512_bf16, avx512 or avx2."),
    host_gbps: float = typer.Option(None, min=0.001, help="Measured host memory bandwidth, GB/s."),
    pcie_gbps: float = typer.Option(None, min=0.001, help="Measured pinned host-to-GPU bandwidth, GB/s."),
    context: int = typer.Option(None, min=1, help="Context per sequence (default: 131072 or the most that fits)."),
    concurrency: int = typer.Option(1, min=1, help="Sequences decoded together."),
    stats: Path = typer.Option(None, help='Expert activation counts, JSON {"layers": {"3": [counts]}}.'),
    out: Path = typer.Option(None, help="Write the profile here (YAML)."),
    emit: Emit = typer.Option(None, help="Print launch flags for another engine instead: sglang or llamacpp."),
):
    """Plan what runs where for a model on a machine, predict its speed, and write the profile.

    Whatever the options do not describe is read from this machine, and said so."""
    from rich.console import Console

    from placement import emit as emitters
    from placement.hardware import from_this_machine, resolve
    from placement.model_spec import ModelSpec
    from placement.planner import Request, Stats, plan as make_plan
    from placement.report import header, render

    if (model is None) == (config is None):
        raise UsageError("give exactly one of --model DIR or --config config.json")
    if gpu and no_gpu:
        raise UsageError("give either --gpu or --no-gpu, not both")
    spec = ModelSpec.from_config(model or config, name)
    isa = isa and isa.value
    hw = resolve(hardware, gpu or [], no_gpu, ram, cores, numa, isa, host_gbps=host_gbps, pcie_gbps=pcie_gbps)
    if hardware is None and isa is None:  # this machine's CPU: its experts run on what proves itself here
        from hybrid.tuning import with_proven_backend

        with_proven_backend(hw)
    facts = from_this_machine(hw, hardware, gpu or [], no_gpu, ram, cores, numa, isa)
    if facts:
        typer.echo("taken from this machine: " + "; ".join(facts) + ". Give the option named to plan for another.",
                   err=True)
    profile = make_plan(spec, hw, Request(context, concurrency, Stats.load(stats, spec) if stats else None))
    if out:
        profile.save(out, header(profile, spec, f"{spec.arch.name} on {hw.summary()}"))
    if emit is Emit.sglang:
        typer.echo(emitters.sglang(profile, str(model or "MODEL_DIR")))
    elif emit is Emit.llamacpp:
        typer.echo(emitters.llamacpp(profile, spec))
    else:
        render(profile, spec, Console())
    if out:
        typer.echo(f"wrote {out}")


@app.command()
def doctor():
    """What this machine offers the CPU experts and decode: instruction sets, kt-kernel, cores, NUMA,
    memory, and the kernels chosen."""
    from rich.console import Console
    from rich.table import Table

    from hybrid.experts.choice import default_kernel
    from hybrid.experts.cpu import report, threads_of
    from hybrid.native import build, decode

    table = Table(title="CPU experts on this machine", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for item, value in report():
        table.add_row(item, value)
    backend, verdicts = default_kernel()
    table.add_row("INT4 expert kernel", f"{backend.name}: {backend.kernel}, {threads_of(backend)}")
    for v in verdicts:
        verdict = "[green]passed[/]" if v.ok else f"[red]refused[/] {v.kernel}"
        table.add_row("self-check", f"{verdict}: relative error {v.error:.2g} against float32 (tolerance "
                                    f"{v.tolerance:g}), {v.seconds * 1e3:.0f} ms")
    table.add_row("expert backend", f"{backend.name} (what `hybrid plan` plans for this machine)")
    isa = decode.isa()
    table.add_row("decode attention", f"one native call a layer ({isa})" if isa else
                  f"torch's ops ({build.why_not() or 'the native kernel needs AVX2 with FMA'})")
    Console().print(table)


profile_app = typer.Typer(no_args_is_help=True, help="Check placement profiles.")
app.add_typer(profile_app, name="profile")


@profile_app.command("validate")
def profile_validate(
    file: Path = typer.Argument(..., help="Profile (YAML) to check."),
    model: Path = typer.Option(None, help="Checkpoint folder or config.json the profile must match."),
):
    """Report every problem of a profile, with the field's path and what would fix it."""
    from placement.profile import Profile, ProfileError

    try:
        profile = Profile.load(file, model)
    except ProfileError as e:  # the report itself, on stdout
        typer.echo(str(e))
        raise typer.Exit(1) from None
    experts = sum(len(ids) for ids in profile.gpu_experts.values())
    typer.echo(f"{file}: valid ({profile.model.name}; {experts:,} GPU experts; "
               f"KV {profile.kv_cache.max_tokens:,} tokens; {profile.hardware.summary()})")


@profile_app.command("record")
def profile_record(
    prompts: Path = typer.Argument(..., help="Text file, one prompt per line (real traffic: the more the better)."),
    out: Path = typer.Option(..., help="Stats file to write; counts are added to it if it exists."),
    model: Path = typer.Option(None, help="Checkpoint folder (default: the embedded k2-stdlib model)."),
    profile: Path = typer.Option(None, help="Placement profile to run with."),
    max_tokens: int = typer.Option(32, min=1, help="Tokens to generate per prompt."),
):
    """Record per-layer routed-expert activation counts for `hybrid plan --stats`."""
    from rich.console import Console
    from rich.progress import Progress

    from hybrid.default_model import resolve_model
    from hybrid.tuning import record

    console = Console()
    folder = resolve_model(model)
    lines = [line for line in prompts.read_text().splitlines() if line.strip()]
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("recording", total=len(lines))
        data = record(folder, profile, lines, out, max_tokens, lambda done, total: bar.update(task, completed=done))
    total = sum(sum(c) for c in data["layers"].values())
    console.print(f"wrote {out}: {total:,} expert activations over {len(data['layers'])} MoE layers")


if __name__ == "__main__":
    app()
