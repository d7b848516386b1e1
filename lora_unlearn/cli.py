"""The ``lora-unlearn`` command: parsing and dispatch only; the work lives in the library."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Unlearning and knowledge updates as task arithmetic on LoRA adapters over a 4-bit base.")
out_console = Console()
err_console = Console(stderr=True)

Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists (only once the new one is complete).")]
Base = Annotated[str, typer.Option("--base", help="'smollm2-135m' (embedded), a local model folder or a Hub id.")]
Quant = Annotated[str, typer.Option("--quantization", "-q", help="nf4, int8 or none.")]
Stack = Annotated[list[str] | None, typer.Option("--adapter", help="DIR or DIR:SCALE, repeatable; kept unmerged.")]


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


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _write(adapter, out: Path, overwrite: bool) -> None:
    from .adapter import save_adapter

    save_adapter(adapter, out, overwrite=overwrite)
    ranks = sorted(set(adapter.ranks.values()))
    err_console.print(f"wrote {out} ({len(adapter.modules)} modules, rank {', '.join(map(str, ranks))})")


@app.command()
@user_errors
def negate(src: Path, out: Path, scale: Annotated[float, typer.Option("--scale", "-l", help="lam: the result is -lam * dW.")] = 1.0,
           overwrite: Overwrite = False):
    """Write -lam * dW of SRC to OUT (task-vector negation)."""
    from .adapter import load_adapter
    from .arithmetic import negate as op

    _write(op(load_adapter(src), scale), out, overwrite)


@app.command()
@user_errors
def scale(src: Path, out: Path, by: Annotated[float, typer.Option("--by", help="c: the result is c * dW.")],
          overwrite: Overwrite = False):
    """Write c * dW of SRC to OUT."""
    from .adapter import load_adapter
    from .arithmetic import scale as op

    _write(op(load_adapter(src), by), out, overwrite)


@app.command()
@user_errors
def extrapolate(src: Path, out: Path, alpha: Annotated[float, typer.Option("--alpha", help="the result is (1 + alpha) * dW (UIPE).")],
                overwrite: Overwrite = False):
    """Write (1 + alpha) * dW of SRC to OUT (UIPE's extrapolation of an unlearning update)."""
    from .adapter import load_adapter
    from .arithmetic import extrapolate as op

    _write(op(load_adapter(src), alpha), out, overwrite)


@app.command()
@user_errors
def add(paths: Annotated[list[Path], typer.Argument(help="Two or more adapter folders, then the output folder.")],
        allow_different_bases: Annotated[bool, typer.Option(help="Add adapters of different base models anyway.")] = False,
        overwrite: Overwrite = False):
    """Write dW1 + dW2 + ... to the last path, exactly (the ranks are concatenated)."""
    from .adapter import load_adapter
    from .arithmetic import add as op

    if len(paths) < 3:
        raise UserError("add needs at least two adapters and an output folder: lora-unlearn add A B OUT")
    *inputs, out = paths
    _write(op(*map(load_adapter, inputs), allow_different_bases=allow_different_bases), out, overwrite)


@app.command()
@user_errors
def compress(src: Path, out: Path, rank: Annotated[int, typer.Option("--rank", "-r", help="Target rank r'.")],
             overwrite: Overwrite = False):
    """Write the best rank-R approximation of SRC to OUT and print each module's error."""
    from .adapter import load_adapter
    from .arithmetic import compress as op

    with err_console.status("compressing"):
        result, errors = op(load_adapter(src), rank)
    table = Table("module", "relative Frobenius error", title=f"compress to rank {rank}")
    for name, e in errors.items():
        table.add_row(name, f"{e:.3e}")
    out_console.print(table)
    out_console.print(f"max {max(errors.values()):.3e}, mean {sum(errors.values()) / len(errors):.3e}")
    _write(result, out, overwrite)


@app.command()
@user_errors
def learn(data: Annotated[str, typer.Option("--data", help="JSONL (question/answer or text), a saved dataset folder or a Hub id.")],
          out: Annotated[Path, typer.Option("--out", help="Folder to write the adapter to.")],
          on: Annotated[list[str] | None, typer.Option("--on", help="Train on top of ADAPTER[:SCALE] (frozen, unmerged); repeatable.")] = None,
          base: Base = "smollm2-135m", quantization: Quant = "nf4",
          r: int = 8, alpha: float = 16.0,
          target_modules: Annotated[str, typer.Option(help="'all-linear' or comma-separated module names.")] = "all-linear",
          lr: float = 1e-3, epochs: float = 3.0, batch_size: int = 8, grad_accum: int = 1, seed: int = 0,
          max_length: int = 256, overwrite: Overwrite = False):
    """Train a LoRA adapter with NLL on DATA over a quantized base (and frozen adapters)."""
    from .data import load_any
    from .stack import parse_stack
    from .train import TrainConfig, learn as run

    _quiet_libraries()
    targets = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",") if t.strip()]
    config = TrainConfig(r=r, lora_alpha=alpha, target_modules=targets, learning_rate=lr, epochs=epochs,
                         batch_size=batch_size, grad_accum=grad_accum, seed=seed, max_length=max_length)
    config.validate()
    rows = load_any(data)
    adapter = run(rows, out, base=base, quantization=quantization, on=parse_stack(on), config=config, overwrite=overwrite)
    err_console.print(f"wrote {out} (final train loss {adapter.lineage['final_train_loss']:.4f})")


@app.command()
@user_errors
def ask(questions: Annotated[str, typer.Option("--questions", help="A question, or a JSONL file of rows with 'question'.")],
        adapter: Stack = None, base: Base = "smollm2-135m", quantization: Quant = "nf4",
        max_new_tokens: int = 64):
    """Answer questions greedily with the base and a stack of adapters (unmerged)."""
    from .data import load_records
    from .inference import answer
    from .models import load_base
    from .stack import attached, parse_stack

    _quiet_libraries()
    if Path(questions).is_file():
        rows = load_records(questions)
        if any(not isinstance(r.get("question"), str) for r in rows):
            raise UserError(f"{questions}: every row needs a string field 'question'")
        items = [r["question"] for r in rows]
    else:
        items = [questions]
    stack = parse_stack(adapter)
    model, tokenizer, _ = load_base(base, quantization)
    with attached(model, stack) as m, err_console.status("generating"):
        answers = answer(m, tokenizer, items, max_new_tokens=max_new_tokens)
    table = Table("question", "answer", show_lines=True)
    for q, a in zip(items, answers):
        table.add_row(q, a)
    out_console.print(table)


@app.command()
@user_errors
def run(recipe: Path,
        out: Annotated[Path | None, typer.Option("--out", help="Output folder (default runs/RECIPE_NAME).")] = None,
        set_: Annotated[list[str] | None, typer.Option("--set", help="Override KEY.SUB=VALUE (YAML value); repeatable.")] = None,
        overwrite: Overwrite = False):
    """Run a recipe (recipes/*.yaml): train, estimate importance and do arithmetic, step by step."""
    from .recipes import load_recipe, run_recipe

    _quiet_libraries()
    spec = load_recipe(recipe, set_ or [])
    out = out or Path("runs") / spec.name
    report = run_recipe(spec, out, overwrite=overwrite, console=err_console)
    table = Table("step", "seconds", title=f"{spec.name}: result in {out}/adapter")
    for step in report["steps"]:
        table.add_row(step["name"], f"{step['seconds']:.1f}")
    out_console.print(table)


@app.command()
@user_errors
def demo(out: Annotated[Path, typer.Option("--out", help="Where to keep the demo's adapters and results.")] = Path("runs/demo"),
         lam: Annotated[float, typer.Option("--lam", help="Negation strength: base + K - lam * F.")] = 1.0,
         quantization: Quant = "nf4", overwrite: Overwrite = True):
    """Learn 12 fictitious facts as adapter K, forget 2 of them by negating adapter F, show the answers."""
    from .demo import run_demo

    _quiet_libraries()
    run_demo(out, lam=lam, quantization=quantization, overwrite=overwrite, console=out_console)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
