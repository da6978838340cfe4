"""Commands for models and fine-tuning: serve, finetune, jobs, ask, export-model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

import click

from ..pipeline.spec.options import FINETUNE, GENERATION
from .common import Failed, Problem, emit_json, handle_errors, open_store, setting_option

EXIT_INTERRUPTED = 130
# A job's status as the progress line says it while following the job.
JOB_PHASES = {"validating_files": "validating the file", "queued": "queued", "running": "training",
              "succeeded": "succeeded", "failed": "failed", "cancelled": "cancelled"}


def _read_key_file(path: Path) -> str:
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise Problem(f"--api-key-file {path}: {exc.strerror or exc}") from None
    if st.st_mode & 0o077:
        raise Problem(f"--api-key-file {path} can be read by other users; chmod 600 it")
    key = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not key:
        raise Problem(f"--api-key-file {path} is empty")
    return key


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", default=0, type=click.IntRange(0, 65535), help="port  [default: a free port]")
@click.option("--model", "model", default=None, metavar="NAME|PATH|HUB_ID",
              help="model to serve: SmolLM2-135M-Instruct (default), a local Hugging Face directory or GGUF "
                   "file, or a Hugging Face Hub id such as Qwen/Qwen2.5-0.5B-Instruct (fetched into the "
                   "Hugging Face cache, HF_HOME; HF_TOKEN for gated models)")
@click.option("--api-key", default=None, metavar="KEY",
              help="also accept 'Authorization: Bearer KEY' (needed off loopback); prefer the environment "
                   "variable GRIDTUNE_LOCAL_API_KEY or --api-key-file: a key on the command line shows in ps")
@click.option("--api-key-file", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="read the API key from this file (readable by you only)")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="files, jobs and models (default: GRIDTUNE_HOME/server)")
@click.option("--idle-timeout", default=15.0, show_default=True, type=float, metavar="MIN",
              help="exit after MIN idle minutes with no job queued or running (0: never)")
@click.option("--max-upload-mb", default=512, show_default=True, type=click.IntRange(1), help="largest file upload")
@click.option("--max-files-mb", default=2048, show_default=True, type=click.IntRange(1),
              help="all uploaded files together (the oldest files no job needs make room)")
@click.option("--max-body-mb", default=4.0, show_default=True, type=click.FloatRange(0.01),
              help="largest JSON request body")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1), help="rows decoded together")
@click.option("--max-queue", default=None, type=click.IntRange(1),
              help="completions queued or decoding, past which requests get 429  [default: 4 x max-batch]")
@click.option("--export-dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="where export_model may write for API clients (default: DATA/exports)")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="also accept this name in the Host header (repeatable)")
@click.option("--allow-origin", "allow_origins", multiple=True, metavar="ORIGIN",
              help="let web pages from ORIGIN (e.g. http://localhost:3000) call the server (repeatable)")
@click.option("--exact", is_flag=True,
              help="decode with fp32 weights and no low-bit kernel (as GRIDTUNE_DTYPE=float32): the answers "
                   "transformers gives, token for token, at a third of the speed on CPUs without bf16")
@handle_errors
def serve_cmd(host: str, port: int, model: str | None, api_key: str | None, api_key_file: Path | None,
              data_dir: Path | None, idle_timeout: float, max_upload_mb: int, max_files_mb: int,
              max_body_mb: float, max_batch: int, max_queue: int | None, export_dir: Path | None,
              allow_hosts: tuple[str, ...], allow_origins: tuple[str, ...], exact: bool) -> None:
    """Run the OpenAI-compatible local server in the foreground.

    It requires a token it generates at start and keeps in its state file (DATA/server.json,
    readable by you only), where gridtune finds it; with an API key it accepts that key too.
    """
    import os

    from ..server.main import ServeError, serve

    if sum(x is not None for x in (api_key, api_key_file)) > 1:
        raise Problem("give the API key once: --api-key or --api-key-file")
    if api_key is not None:
        click.echo("gridtune: warning: --api-key on the command line is visible to every user in `ps`; "
                   "use GRIDTUNE_LOCAL_API_KEY or --api-key-file instead", err=True)
    elif api_key_file is not None:
        api_key = _read_key_file(api_key_file)
    else:
        api_key = (os.environ.get("GRIDTUNE_LOCAL_API_KEY", "").strip()
                   or os.environ.get("GRIDTUNE_SERVER_API_KEY", "").strip() or None)
    if api_key is not None and not api_key.strip():
        raise Problem("the API key is empty")
    if exact:
        os.environ["GRIDTUNE_DTYPE"] = "float32"  # read by the decoder when it picks its kernels
    try:
        serve(host=host, port=port, model=model, api_key=api_key, data_dir=data_dir, idle_timeout=idle_timeout,
              max_upload_mb=max_upload_mb, max_files_mb=max_files_mb, max_body_mb=max_body_mb,
              max_batch=max_batch, max_queue=max_queue, export_dir=export_dir, allow_hosts=allow_hosts,
              allow_origins=allow_origins)
    except ServeError as exc:
        raise Problem(str(exc)) from None
    except ImportError as exc:
        raise Problem(f"the local server needs the local extra ({exc.name} is missing): "
                      "pip install 'gridtune[local]'") from None


def _backend(model: str | None = None):
    """The backend; a local server started now serves ``model`` when it is a Hub id or a path."""
    from ..pipeline.client.resolve import resolve_backend

    return resolve_backend(model=model)


@click.command("finetune")
@click.argument("source", type=click.Path(dir_okay=False, path_type=Path), metavar="PROJECT|FILE.jsonl")
@click.option("--model", "model", default=None, help="base model to fine-tune (default: the backend's model)")
@setting_option(FINETUNE["epochs"])
@click.option("--suffix", default=None, help="a name put into the fine-tuned model id")
@click.option("--seed", type=int, default=None)
@click.option("--validation-file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None)
@click.option("--wait", is_flag=True, help="follow the job to its end and print the fine-tuned model id")
@click.option("--scaling", is_flag=True,
              help="train on half and on all of the latest export's training file (same base, seed and settings), "
                   "evaluate both on its held-out prompts and print the gain per doubling; a rerun continues")
@click.option("--samples", type=click.IntRange(1, 100), default=None,
              help="with --scaling: answers per held-out prompt and model  [default: 3]")
@click.option("--json", "as_json", is_flag=True, help="print the job as one JSON object")
@handle_errors
def finetune_cmd(source: Path, model: str | None, epochs: int | None, suffix: str | None, seed: int | None,
                 validation_file: Path | None, wait: bool, scaling: bool, samples: int | None, as_json: bool) -> None:
    """Upload a training file (or export PROJECT first) and start a fine-tuning job.

    With --scaling: how much would more data buy? Two jobs (half and all of the latest
    export, which must hold values out with --hold-out), both evaluated against the base.
    """
    from ..pipeline.training import finetune as ft

    if not source.exists():
        raise Problem(f"{source}: no such file")
    if samples is not None and not scaling:
        raise Problem("--samples goes with --scaling")
    if scaling:
        _scaling(source, model, epochs, suffix, seed, validation_file, samples, as_json)
        return
    backend = _backend(model)
    base = model or backend.default_model
    if not base:
        raise Problem("give the base model with --model")
    store = None
    export_id = None
    if source.suffix.lower() in (".jsonl", ".json"):
        train_path = source
    else:
        store = open_store(source)
        train_path, validation_file, export_id = ft.export_for_finetune(store, validation_file)
    err = sys.stderr
    try:
        job = ft.start_finetune(backend, train_path, base, validation_path=validation_file, epochs=epochs,
                                suffix=suffix, seed=seed, store=store, export_id=export_id,
                                on_message=(None if as_json else lambda m: click.echo(m, err=True)))
        if not as_json:
            click.echo(f"job {job.id} {job.status} on {backend.label} (model {job.model})", err=True)
        if wait:
            try:
                job = _follow_with_progress(backend, job.id, store=store, quiet=as_json, file=err)
            except KeyboardInterrupt:  # only the following stops: the job is the server's
                click.echo(f"stopped following job {job.id}; the job goes on on {backend.label} "
                           f"(`gridtune jobs` lists it, `gridtune jobs cancel {job.id}` cancels it)", err=True)
                sys.exit(EXIT_INTERRUPTED)
    except ft.FinetuneRefused as exc:
        raise Failed(str(exc)) from None
    except ft.FinetuneError as exc:
        raise Problem(str(exc)) from None
    finally:
        if store is not None:
            store.close()
    if as_json:
        emit_json(job.model_dump(mode="json"))
    elif wait and job.status == "succeeded":
        click.echo(job.fine_tuned_model)
    elif not wait:
        click.echo(job.id)
    if wait and job.status != "succeeded":
        reason = job.error.message if job.error and job.error.message else job.status
        raise Failed(f"job {job.id} {job.status}: {reason}")


@click.group("jobs", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="print the jobs as one JSON object")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@click.pass_context
@handle_errors
def jobs_cmd(ctx: click.Context, as_json: bool, limit: int) -> None:
    """List fine-tuning jobs on the current backend (`jobs cancel ID` cancels one)."""
    from ..pipeline.training import finetune as ft

    if ctx.invoked_subcommand is not None:
        return
    backend = _backend()
    jobs = ft.list_jobs(backend, limit=limit)  # a failed call: its one line, exit 1
    if as_json:
        emit_json({"backend": backend.public_url, "jobs": [j.model_dump(mode="json") for j in jobs]})
        return
    if not jobs:
        click.echo(f"no fine-tuning jobs on {backend.label}")
        return
    for j in jobs:
        click.echo(f"{j.id}  {j.status:<16} {j.model}  {j.fine_tuned_model or ''}".rstrip())


@jobs_cmd.command("cancel")
@click.argument("job_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="print the job as one JSON object")
@handle_errors
def jobs_cancel_cmd(job_id: str, as_json: bool) -> None:
    """Cancel fine-tuning job ID on the current backend (as c does in the app's F5)."""
    from ..pipeline.training import finetune as ft

    backend = _backend()
    job = ft.cancel_job(backend, job_id)  # a failed call: its one line, exit 1
    if as_json:
        emit_json(job.model_dump(mode="json"))
        return
    click.echo(f"job {job.id} {job.status}" + ("" if job.status == "cancelled" else " (cancel requested)"))


@click.command("ask")
@click.argument("model")
@click.argument("prompt")
@click.option("--stop", "stops", multiple=True, help="stop sequence (repeatable, up to 4)")
@setting_option(GENERATION["temperature"], default=None, show_default=False)
@setting_option(GENERATION["max_tokens"], default=None, show_default=False, help="the longest the reply may be")
@click.option("--system", default=None, help="a system message (chat only)")
@click.option("--legacy", is_flag=True, help="use the legacy completions endpoint (prompt/completion models)")
@handle_errors
def ask_cmd(model: str, prompt: str, stops: tuple[str, ...], temperature: float | None, max_tokens: int | None,
            system: str | None, legacy: bool) -> None:
    """Prompt MODEL ('-': the backend's default model) and print the reply as it streams."""
    from ..pipeline.client.ask import ask
    from ..pipeline.training import finetune as ft

    backend = _backend(None if model == "-" else model)
    if model == "-":
        model = backend.default_model or model
    try:
        for piece in ask(backend, model, prompt, stop=list(stops) or None, temperature=temperature,
                            max_tokens=max_tokens, system=system, legacy=legacy, stream=True):
            click.echo(piece, nl=False)
    except ft.FinetuneError as exc:
        pending = ft.pending_job_for(backend, model) if ": 404 " in str(exc) else None
        if pending is not None:  # not "does not exist": it does not exist *yet*
            raise Failed(f"{model} is not ready: its job {pending.id} is {pending.status} "
                         f"(`gridtune jobs` shows it; ask once it has succeeded)") from None
        raise Failed(str(exc)) from None
    click.echo()


@click.command("export-model")
@click.argument("model_id")
@click.option("--to", "to", type=click.Choice(["hf", "gguf", "ollama", "vllm"]), default="hf", show_default=True,
              help="hf: merged Hugging Face directory (transformers, vLLM); gguf: one GGUF for llama.cpp; "
                   "ollama: the GGUF and a Modelfile; vllm: a LoRA adapter for --lora-modules")
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="the new directory to write")
@click.option("--quant", default=None, metavar="TYPE",
              help="gguf/ollama weights: f16 (default), f32, bf16, q8_0; q4_0, q4_k_m, q5_k_m, q6_k with llama.cpp")
@click.option("--json", "as_json", is_flag=True, help="print what was written as one JSON object")
@handle_errors
def export_model_cmd(model_id: str, to: str, output: Path, quant: str | None, as_json: bool) -> None:
    """Write a local fine-tuned model for another engine, and print the command that runs it there."""
    from ..pipeline.training import finetune as ft

    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise Problem(f"{output}: exists and is not empty; not overwriting it")
    if quant and to not in ("gguf", "ollama"):
        raise Problem(f"--quant applies to --to gguf or ollama, not {to}")
    try:  # this process is the user: it makes the parents the server will not make outside its export root
        output.expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Problem(f"{output}: {exc.strerror or exc}") from None
    backend = _backend()
    done = ft.export_model(backend, model_id, output, to=to, quant=quant)  # a failed call: its one line, exit 1
    if as_json:
        emit_json({"target": done.target, "output_dir": str(done.output_dir), "files": done.files,
                   "commands": done.commands, "notes": done.notes})
        return
    click.echo(f"wrote {done.output_dir}: {', '.join(done.files)}")
    for note in done.notes:
        click.echo(f"note: {note}")
    click.echo("run it:")
    for command in done.commands:
        click.echo(f"  {command}")


def _scaling(project: Path, model: str | None, epochs: int | None, suffix: str | None, seed: int | None,
             validation_file: Path | None, samples: int | None, as_json: bool) -> None:
    """`finetune PROJECT --scaling`: the work is pipeline.scaling's; this prints it."""
    from ..pipeline.evaluation import scaling as sc
    from ..pipeline.training import finetune as ft

    if project.suffix.lower() in (".jsonl", ".json"):
        raise Problem(f"--scaling works on a project (its latest export and held-out prompts), not {project.name}")
    open_store(project).close()  # a clear line for a file that is not a project
    options = sc.ScalingOptions(base=model, epochs=epochs, seed=sc.DEFAULT_SEED if seed is None else seed,
                                suffix=suffix, validation_path=str(validation_file) if validation_file else None,
                                samples=samples or sc.DEFAULT_SAMPLES)
    say = None if as_json else (lambda m: click.echo(m, err=True))
    try:
        report = sc.run_scaling(project, options, on_message=say)  # the backend once the input is checked
    except ft.FinetuneRefused as exc:
        raise Failed(str(exc)) from None
    except ft.FinetuneError as exc:
        raise Problem(str(exc)) from None
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(report.summary())
    if report.exit_code:
        raise Failed(report.result.get("failed") or "some evaluation answers are missing; run it again")


def _follow_with_progress(backend: Any, job_id: str, *, store: Any = None, quiet: bool = False,
                          file: TextIO | None = None) -> Any:
    """Follow a job to its end with a rich progress bar (steps, loss) and its messages:
    the command line's view of the JobTracker the TUI follows jobs with too (it records
    the job's status changes in the project, when there is one)."""
    import time

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..pipeline.training import finetune as ft

    console = Console(file=file, stderr=file is None, quiet=quiet)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[steps]}"),
                        TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), console=console, transient=False)
    task = progress.add_task("waiting", total=None, loss="", steps="")
    tracker = ft.JobTracker(job_id, store=store)

    def on_update(state: Any, _recorded: bool) -> None:
        # What the job is doing, in words: a queued job is not "training 0/?".
        progress.update(task, description=JOB_PHASES.get(state.status, state.status or "waiting"))

    def on_event(event: Any) -> None:
        state = tracker.state  # this event already folded in
        if event.type == "metrics" and state.steps:
            loss = f"loss {state.losses[-1]:.4f}"
            if state.valid_losses and state.valid_steps[-1] == state.steps[-1]:
                loss += f"  valid {state.valid_losses[-1]:.4f}"
            steps = f"step {state.steps[-1]:.0f}" + (f"/{state.total_steps}" if state.total_steps else "")
            progress.update(task, completed=state.steps[-1], total=state.total_steps, loss=loss, steps=steps)
        else:
            progress.console.print(f"[dim]{time.strftime('%H:%M:%S', time.localtime(event.created_at))}[/] "
                                   f"{event.message}")

    with progress:
        return tracker.follow(backend, on_event=on_event, on_update=on_update)


def register(group: click.Group) -> None:
    """Add this module's commands to the ``gridtune`` group."""
    for command in (serve_cmd, finetune_cmd, jobs_cmd, ask_cmd, export_model_cmd):
        group.add_command(command)
