"""What every command shares: the Typer app and its global options, the option types, the consoles,
the one-line user error, and the helpers of the writing and training commands."""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Unlearning and knowledge updates as task arithmetic on LoRA adapters over a 4-bit base.")
out_console = Console()
err_console = Console(stderr=True)

Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists (only once the new one is complete).")]
Base = Annotated[str, typer.Option("--base", help="'smollm2-135m' (embedded), a local model folder or a Hub id.")]
Quant = Annotated[str, typer.Option("--quantization", "-q", help="nf4, int8 or none.")]
Stack = Annotated[list[str] | None, typer.Option("--adapter", help="DIR or DIR:SCALE, repeatable; kept unmerged.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from OUT.partial (nothing there: start fresh).")]
CheckpointEvery = Annotated[int, typer.Option("--checkpoint-every", help="Save a resumable checkpoint every N optimizer steps (0: never).")]


def user_errors(fn):
    """Print a UserError on one line and exit 2; anything else is a bug and keeps its traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
    return wrapper


@app.callback()
def _options(ctx: typer.Context,
             allow_pickle: Annotated[bool, typer.Option(
                 "--allow-pickle", help="Also read pickle weights (adapter_model.bin, pytorch_model.bin) with "
                 "torch.load(weights_only=True). Off: pickle can run code when loaded.")] = False,
             verbose: Annotated[bool, typer.Option(
                 "--verbose", help="Show the libraries' known-harmless messages too (missing optional CPU "
                 "kernels, deprecation notices, loading bars).")] = False):
    """Unlearning and knowledge updates as task arithmetic on LoRA adapters over a 4-bit base."""
    from ..quiet import quiet_known_messages, show_everything

    show_everything() if verbose else quiet_known_messages()
    if allow_pickle:
        from ..core.fsutil import pickle_allowed

        ctx.with_resource(pickle_allowed())  # for every load the command makes, recipes included


def _quiet_libraries() -> None:
    import transformers

    from ..quiet import verbose

    if verbose():
        return
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _note_fresh_start(out: Path, resume: bool) -> None:
    from ..training.jobs import is_main_process, work_dir

    if resume and is_main_process() and not work_dir(out).exists():
        err_console.print(f"nothing to resume in {work_dir(out)}: starting from scratch")


@contextlib.contextmanager
def _resume_hint(out: Path, checkpoint_every: int):
    """Ctrl-C: say where the checkpoints are and the exact command that continues, then exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        import shlex

        from ..training.jobs import last_checkpoint, resumable, work_dir

        kept = work_dir(out)
        # Complete checkpoints only (one cut short by the interrupt is skipped on resume too).
        folders = {p.parent for p in kept.rglob("checkpoint-*")} if kept.is_dir() else set()
        saved = [c for c in map(last_checkpoint, folders) if c is not None]
        argv = ["lora-unlearn", *sys.argv[1:]]
        command = " ".join(shlex.quote(a) for a in argv + ([] if "--resume" in argv else ["--resume"]))
        if kept.is_dir() and (saved or resumable(kept)):
            err_console.print(f"interrupted: progress is kept in {kept}"
                              + (f" (latest checkpoint {max(saved, key=lambda p: p.stat().st_mtime).name})" if saved else "")
                              + f"; continue with:\n  {command}", highlight=False, soft_wrap=True)
        else:
            every = f"every {checkpoint_every} steps" if checkpoint_every else "never (--checkpoint-every 0)"
            err_console.print(f"interrupted before the first checkpoint (saved {every}): nothing to resume; "
                              f"{command} starts again from scratch", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None


def _write(adapter, out: Path, overwrite: bool) -> None:
    from ..core.adapter_io import save_adapter

    save_adapter(adapter, out, overwrite=overwrite)
    ranks = sorted(set(adapter.ranks.values()))
    err_console.print(f"wrote {out} ({len(adapter.modules)} modules, rank {', '.join(map(str, ranks))})")
