"""`hybrid` commands. Each command is a thin shell over the package that does the work."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="CPU/GPU hybrid MoE runtime.")


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to write (must not exist)."),
    preset: str = typer.Option("tiny", help="tiny (tests, default model) or mini (benchmarks)."),
    seed: int = typer.Option(0),
    quant: str = typer.Option("int4", help="int4 (compressed-tensors routed experts), fp8 or bf16."),
    nested: bool = typer.Option(False, help="K2.5-style text_config nesting and language_model. prefix."),
):
    """Write a random-weight checkpoint in Kimi K2's exact format."""
    from rich.console import Console

    from hybrid.model.synthetic import write_checkpoint

    if out.exists():
        raise typer.BadParameter(f"{out} exists")
    with Console().status(f"writing {preset} to {out}") as status:
        write_checkpoint(out, preset, seed, quant, nested, progress=lambda m: status.update(f"{preset}: {m}"))
    typer.echo(f"wrote {out}")


@app.command()
def bench(
    model: Path = typer.Option(None, help="Checkpoint folder (default: the tiny preset)."),
    profile: Path = typer.Option(None, help="Placement profile; without one, a plan for this machine."),
    prompt: int = typer.Option(512, help="Prompt tokens to prefill."),
    decode: int = typer.Option(32, help="Tokens to decode after it."),
):
    """Measure prefill and decode with a placement, beside the planner's prediction."""
    from rich.console import Console

    from hybrid.default_model import resolve_model
    from hybrid.tuning import compare, parts, profile_for

    console = Console()
    folder = resolve_model(model, console.print)
    p = profile_for(folder, profile)
    with console.status(f"loading {folder.name} and measuring {prompt} + {decode} tokens"):
        table = compare(folder, p, prompt, decode)
    console.print(table)
    with console.status("timing one decode step and one prefill by part, and this machine's floors"):
        tables = parts(folder, p, prompt)
    for t in tables:
        console.print(t)


def _load_serving(model: Path | None, profile: Path | None, name: str | None, console):
    """Load a model (the default one if none is given) with a progress bar; start its engine."""
    import time

    from rich.progress import Progress

    from hybrid.default_model import resolve_model
    from hybrid.server.serving import Serving

    folder = resolve_model(model, console.print)
    start = time.monotonic()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"loading {folder}", total=None)
        serving = Serving.load(folder, profile, name,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
    console.print(f"loaded {folder} in {time.monotonic() - start:.1f} s")
    return serving


MODEL_HELP = "Checkpoint folder (default: the tiny preset, generated into ~/.cache/hybrid/models on first use)."


@app.command()
def serve(
    model: Path = typer.Option(None, help=MODEL_HELP),
    profile: Path = typer.Option(None, help="Placement profile (YAML) from `hybrid plan`."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 to serve other machines)."),
    port: int = typer.Option(8000),
    api_key: str = typer.Option(None, envvar="HYBRID_API_KEY",
                                help="Require this key (Bearer or x-api-key) on every endpoint but /health."),
    served_model_name: str = typer.Option(None, help="The model id clients send (default: the folder's name)."),
):
    """Serve a model over OpenAI's and Anthropic's HTTP APIs (/v1/chat/completions, /v1/messages, ...)."""
    from rich.console import Console

    from hybrid.server.app import create_app
    from hybrid.server.http_server import Server

    console = Console(stderr=True)
    serving = _load_serving(model, profile, served_model_name, console)
    console.print(f"serving [bold]{serving.model_name}[/] at http://{host}:{port}/v1  (also /health, /metrics)")
    Server(create_app(serving, api_key), host, port, log_level="info").run()


@app.command()
def chat(
    model: Path = typer.Option(None, help=MODEL_HELP + " Runs in this process."),
    url: str = typer.Option(None, help="Talk to a running server instead, e.g. http://127.0.0.1:8000."),
    api_key: str = typer.Option(None, envvar="HYBRID_API_KEY", help="The server's API key (with --url)."),
    profile: Path = typer.Option(None, help="Placement profile (YAML), without --url."),
    max_tokens: int = typer.Option(1024, help="Longest reply, in tokens."),
    thinking: bool = typer.Option(True, help="Let the model think before answering."),
):
    """Chat in the terminal: replies stream, thinking dimmed; /reset, /system TEXT, /exit."""
    import secrets

    import openai
    from rich.console import Console

    from hybrid.chat import Chat
    from hybrid.server.app import create_app
    from hybrid.server.http_server import ServerThread

    console = Console()
    if url:
        if model or profile:
            raise typer.BadParameter("give either --url or --model/--profile")
        base = url.rstrip("/").removesuffix("/v1") + "/v1"
        client = openai.OpenAI(base_url=base, api_key=api_key or "none")
        Chat(client, client.models.list().data[0].id, console, max_tokens, thinking).run()
        return
    serving = _load_serving(model, profile, None, console)
    key = secrets.token_urlsafe(16)
    with ServerThread(create_app(serving, key)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key)
        Chat(client, serving.model_name, console, max_tokens, thinking).run()


@app.command()
def plan(
    model: Path = typer.Option(None, help="Checkpoint folder (only its config.json is read)."),
    config: Path = typer.Option(None, help="A config.json, instead of --model."),
    name: str = typer.Option(None, help="Model name in the profile (default: the folder's name)."),
    hardware: Path = typer.Option(None, help="Machine description (YAML) to plan for instead of this one."),
    gpu: list[str] = typer.Option(None, help="A GPU to plan for: 24GB, a model (4090, h100) or NAME=SIZE. "
                                             "Repeat per GPU."),
    no_gpu: bool = typer.Option(False, "--no-gpu", help="Plan for the CPU alone."),
    ram: str = typer.Option(None, help="Host RAM to plan for, e.g. 1TB."),
    cores: int = typer.Option(None, help="Physical CPU cores to plan for."),
    numa: int = typer.Option(None, help="NUMA nodes to plan for."),
    isa: str = typer.Option(None, help="Strongest CPU ISA: amx, avx512_bf16, avx512 or avx2."),
    host_gbps: float = typer.Option(None, help="Measured host memory bandwidth, GB/s."),
    pcie_gbps: float = typer.Option(None, help="Measured pinned host-to-GPU bandwidth, GB/s."),
    context: int = typer.Option(None, help="Context per sequence (default: 131072 or the most that fits)."),
    concurrency: int = typer.Option(1, min=1, help="Sequences decoded together."),
    stats: Path = typer.Option(None, help='Expert activation counts, JSON {"layers": {"3": [counts]}}.'),
    out: Path = typer.Option(None, help="Write the profile here (YAML)."),
    emit: str = typer.Option(None, help="Print launch flags for another engine instead: sglang or llamacpp."),
):
    """Plan what runs where for a model on a machine, predict its speed, and write the profile."""
    from rich.console import Console

    from placement import emit as emitters
    from placement.hardware import resolve
    from placement.model_spec import ModelSpec, ModelSpecError
    from placement.planner import Request, Stats, plan as make_plan
    from placement.report import header, render

    if (model is None) == (config is None):
        raise typer.BadParameter("give exactly one of --model DIR or --config config.json")
    if emit not in (None, "sglang", "llamacpp"):
        raise typer.BadParameter(f"--emit {emit!r}: use sglang or llamacpp")
    try:
        spec = ModelSpec.from_config(model or config, name)
        hw = resolve(hardware, gpu or [], no_gpu, ram, cores, numa, isa, host_gbps=host_gbps, pcie_gbps=pcie_gbps)
        req = Request(context, concurrency, Stats.load(stats, spec) if stats else None)
        profile = make_plan(spec, hw, req)
    except (ModelSpecError, ValueError) as e:
        Console(stderr=True).print(f"[red]cannot plan:[/] {e}", highlight=False)
        raise typer.Exit(2) from None
    if out:
        profile.save(out, header(profile, spec, f"{spec.arch.name} on {hw.summary()}"))
    if emit == "sglang":
        typer.echo(emitters.sglang(profile, str(model or "MODEL_DIR")))
    elif emit == "llamacpp":
        typer.echo(emitters.llamacpp(profile, spec))
    else:
        render(profile, spec, Console())
    if out:
        typer.echo(f"wrote {out}")


@app.command()
def doctor():
    """What this machine offers the CPU experts: instruction sets, kt-kernel, cores, NUMA, memory."""
    from rich.console import Console
    from rich.table import Table

    from hybrid.experts import default_kernel
    from hybrid.experts.cpu import report

    table = Table(title="CPU experts on this machine", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for item, value in report():
        table.add_row(item, value)
    backend, verdicts = default_kernel()
    table.add_row("INT4 expert kernel", f"{backend.name}: {backend.kernel}")
    for v in verdicts:
        verdict = "[green]passed[/]" if v.ok else f"[red]refused[/] {v.kernel}"
        table.add_row("self-check", f"{verdict}: relative error {v.error:.2g} against float32 (tolerance "
                                    f"{v.tolerance:g}), {v.seconds * 1e3:.0f} ms")
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
    except ProfileError as e:
        typer.echo(str(e))
        raise typer.Exit(1) from None
    experts = sum(len(ids) for ids in profile.gpu_experts.values())
    typer.echo(f"{file}: valid ({profile.model.name}; {experts:,} GPU experts; "
               f"KV {profile.kv_cache.max_tokens:,} tokens; {profile.hardware.summary()})")


@profile_app.command("record")
def profile_record(
    prompts: Path = typer.Argument(..., help="Text file, one prompt per line (real traffic: the more the better)."),
    out: Path = typer.Option(..., help="Stats file to write; counts are added to it if it exists."),
    model: Path = typer.Option(None, help="Checkpoint folder (default: the tiny preset)."),
    profile: Path = typer.Option(None, help="Placement profile to run with."),
    max_tokens: int = typer.Option(32, help="Tokens to generate per prompt."),
):
    """Record per-layer routed-expert activation counts for `hybrid plan --stats`."""
    from rich.console import Console
    from rich.progress import Progress

    from hybrid.default_model import resolve_model
    from hybrid.tuning import record

    console = Console()
    folder = resolve_model(model, console.print)
    lines = [line for line in prompts.read_text().splitlines() if line.strip()]
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("recording", total=len(lines))
        data = record(folder, profile, lines, out, max_tokens, lambda done, total: bar.update(task, completed=done))
    total = sum(sum(c) for c in data["layers"].values())
    console.print(f"wrote {out}: {total:,} expert activations over {len(data['layers'])} MoE layers")


if __name__ == "__main__":
    app()
