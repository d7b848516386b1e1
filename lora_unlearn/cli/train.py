"""Making adapters: learn, run (a recipe), demo, and select (choosing lam/alpha after a run)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import UserError
from .common import (
    Base,
    CheckpointEvery,
    Overwrite,
    Quant,
    Resume,
    _note_fresh_start,
    _quiet_libraries,
    _resume_hint,
    err_console,
    out_console,
    user_errors,
)

Holdout = Annotated[str | None, typer.Option("--holdout", help="Held-out retain data for --select (not used by the "
                                             "method): JSONL, dataset folder or a source such as tofu-mini:retain.")]
HoldoutRows = Annotated[str | None, typer.Option("--holdout-rows", help="START:END slice of --holdout, e.g. 360:400.")]
ForgetData = Annotated[str | None, typer.Option("--forget", help="Forget data for --select (default: the recipe's 'forget').")]
Budget = Annotated[float, typer.Option("--budget", help="Largest allowed relative drop of held-out answer probability.")]


@user_errors
def learn(data: Annotated[str, typer.Option("--data", help="JSONL (question/answer or text), a saved dataset folder or a Hub id.")],
          out: Annotated[Path, typer.Option("--out", help="Folder to write the adapter to.")],
          on: Annotated[list[str] | None, typer.Option("--on", help="Train on top of ADAPTER[:SCALE] (frozen, unmerged); repeatable.")] = None,
          base: Base = "smollm2-135m", quantization: Quant = "nf4",
          r: int = 8, alpha: float = 16.0,
          target_modules: Annotated[str, typer.Option(help="'all-linear' or comma-separated module names.")] = "all-linear",
          lr: Annotated[float | None, typer.Option(help="Learning rate [default: 2e-3].")] = None,
          epochs: Annotated[float | None, typer.Option(help="Epochs [default: 3; 10 with --forget-adapter].")] = None,
          batch_size: Annotated[int | None, typer.Option(help="Batch size [default: 8; 2 with --forget-adapter].")] = None,
          grad_accum: int = 1, seed: int = 0,
          max_length: int = 256,
          max_steps: Annotated[int, typer.Option(help="Train this many optimizer steps (overrides --epochs); -1: off.")] = -1,
          min_steps: Annotated[int | None, typer.Option(help="At least this many optimizer steps [default: 60; 0 with --forget-adapter].")] = None,
          stop_when_learned: Annotated[int | None, typer.Option(
              help="Every N steps, stop once the rows are learned (teacher-forced); 0: off [default: 5; 0 with --forget-adapter].")] = None,
          preserve: Annotated[str, typer.Option(
              help="Preservation pool (KL to the starting model on unrelated prompts): 'preservation' "
                   "(vendored), a QA JSONL file, or 'none'.")] = "preservation",
          preserve_weight: Annotated[float, typer.Option(help="Weight of the preservation KL.")] = 4.0,
          forget_adapter: Annotated[bool, typer.Option(
              "--forget-adapter", help="Train a forget adapter F (to negate), usually --on the adapter that holds "
              "the knowledge: 10 epochs, batch 2, no early stop, no preservation.")] = False,
          overwrite: Overwrite = False, resume: Resume = False, checkpoint_every: CheckpointEvery = 50):
    """Train a LoRA adapter with NLL on DATA over a quantized base (and frozen adapters), keeping the
    model's answers to unrelated prompts (the preservation stream); or, with --forget-adapter, a
    forget adapter to negate."""
    import warnings
    from dataclasses import replace

    from ..core.data import load_any
    from ..core.stack import parse_stack
    from ..training.jobs import is_main_process
    from ..training.learn import FORGET_DEFAULTS, LEARN_DEFAULTS, NotLearnedWarning, learned_report, not_learned_advice
    from ..training.learn import learn as run

    _quiet_libraries()
    targets = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",") if t.strip()]
    given = {"learning_rate": lr, "epochs": epochs, "batch_size": batch_size, "min_steps": min_steps,
             "stop_when_learned": stop_when_learned}
    config = replace(FORGET_DEFAULTS if forget_adapter else LEARN_DEFAULTS, r=r, lora_alpha=alpha, target_modules=targets, grad_accum=grad_accum, seed=seed,
                     max_length=max_length, max_steps=max_steps, **{k: v for k, v in given.items() if v is not None})
    config.validate()
    rows = load_any(data)
    _note_fresh_start(out, resume)
    with warnings.catch_warnings(), _resume_hint(out, checkpoint_every):
        warnings.simplefilter("ignore", NotLearnedWarning)  # said below, with the CLI's option names
        adapter = run(rows, out, base=base, quantization=quantization, on=parse_stack(on), config=config,
                      overwrite=overwrite, resume=resume, checkpoint_every=checkpoint_every,
                      preserve=None if preserve.lower() == "none" else preserve, preserve_weight=preserve_weight,
                      forget_adapter=forget_adapter)
    if is_main_process():
        report = learned_report(adapter)
        learned = f"; learned {report[0]} of {report[1]} rows" if report else ""
        err_console.print(f"wrote {out} ({adapter.lineage['steps']} steps, final train loss "
                          f"{adapter.lineage['final_train_loss']:.4f}{learned})", soft_wrap=True)
        advice = not_learned_advice(adapter)
        if advice:
            err_console.print(f"[bold yellow]warning:[/] {advice}", highlight=False, soft_wrap=True)


@user_errors
def run(recipe: Path,
        out: Annotated[Path | None, typer.Option("--out", help="Output folder (default runs/RECIPE_NAME).")] = None,
        set_: Annotated[list[str] | None, typer.Option("--set", help="Override KEY.SUB=VALUE (YAML value); repeatable.")] = None,
        overwrite: Overwrite = False, resume: Resume = False, checkpoint_every: CheckpointEvery = 50,
        select_: Annotated[str | None, typer.Option("--select", help="STEP.PARAM=V1,V2,... : after the run, sweep "
                                                    "that coefficient and choose it (see `lora-unlearn select`).")] = None,
        holdout: Holdout = None, holdout_rows: HoldoutRows = None, budget: Budget = 0.05):
    """Run a recipe (recipes/*.yaml): train, estimate importance and do arithmetic, step by step."""
    from ..training.jobs import is_main_process
    from ..training.recipes import load_recipe
    from ..training.runner import run_recipe

    _quiet_libraries()
    if select_ is not None:
        from ..training.select import parse_target, parse_values

        target, sep, values = select_.partition("=")
        if not sep:
            raise UserError(f"--select {select_!r}: use STEP.PARAM=V1,V2,..., e.g. unlearned.lam=0.5,1,2")
        parse_target(target)
        parse_values(values)
        if not holdout:
            raise UserError("--select needs held-out retain data the method did not train on: pass --holdout DATA")
    spec = load_recipe(recipe, set_ or [])
    if select_ is not None:
        from ..training.select import check_holdout, check_target

        check_target(spec, target)  # before any training: a misspelled key must not cost a run
        check_holdout(spec, _holdout(holdout, holdout_rows))  # nor held-out rows the method trains on
    out = out or Path("runs") / spec.name
    from ..core.fsutil import check_separate

    check_separate(out, spec.adapters.values(), what="input adapter")
    _note_fresh_start(out, resume)
    with _resume_hint(out, checkpoint_every):
        report = run_recipe(spec, out, overwrite=overwrite, console=err_console, resume=resume,
                            checkpoint_every=checkpoint_every)
    if not is_main_process():
        return
    table = Table("step", "seconds", title=f"{spec.name}: result in {out}/adapter")
    for step in report["steps"]:
        table.add_row(step["name"], f"{step['seconds']:.1f}")
    out_console.print(table)
    if select_ is not None:
        _select(out, target, values, holdout, holdout_rows, None, budget, overwrite=True)  # the run is new


@user_errors
def demo(out: Annotated[Path, typer.Option("--out", help="Where to keep the demo's adapters and results.")] = Path("runs/demo"),
         lam: Annotated[float, typer.Option("--lam", help="Negation strength: base + K - lam * F.")] = 1.0,
         quantization: Quant = "nf4", overwrite: Overwrite = True):
    """Learn 12 fictitious facts as adapter K, forget 2 of them by negating adapter F, show the answers."""
    from ..demo import run_demo

    _quiet_libraries()
    run_demo(out, lam=lam, quantization=quantization, overwrite=overwrite, console=out_console)


def _holdout(holdout: str, holdout_rows: str | None) -> list[dict]:
    from ..training.sources import load_source

    held = load_source(holdout)
    if holdout_rows:
        try:
            start, end = (int(x) if x else None for x in holdout_rows.split(":"))
        except ValueError:
            raise UserError(f"--holdout-rows {holdout_rows!r}: use START:END, e.g. 360:400") from None
        held = held[start:end]
    return held


def _select(run_dir: Path, param: str, values: str, holdout: str | None, holdout_rows: str | None,
            forget: str | None, budget: float, overwrite: bool = False) -> None:
    from ..training.select import check_selection, parse_target, parse_values, select_run
    from ..training.sources import load_source

    parse_target(param)
    grid = parse_values(values)
    if not holdout:
        raise UserError("choosing a coefficient needs held-out retain data the method did not train on: "
                        "pass --holdout DATA (and --holdout-rows START:END to take a slice)")
    run = check_selection(run_dir, param, overwrite)  # before the data is loaded
    if forget is None:
        entry = run.recipe.data.get("forget")
        if entry is None:
            raise UserError(f"{run_dir}: the recipe has no data entry 'forget': pass --forget DATA")
        sources = [entry.source] if isinstance(entry.source, str) else entry.source
        forget_rows = [r for s in sources for r in load_source(s, "qa", run.recipe.tofu_dir)]
    else:
        forget_rows = load_source(forget)
    held = _holdout(holdout, holdout_rows)

    def show(point):
        err_console.print(f"{param}={point['value']:g}: forget P {point['forget_probability']:.4f}, "
                          f"held-out drop {point['utility_drop']:+.2%}")

    result = select_run(run_dir, param, grid, forget_rows=forget_rows, holdout_rows=held, budget=budget,
                        progress=show, overwrite=overwrite)
    table = Table("value", "forget P", "held-out P", "drop", title=f"sweep of {param} (budget {budget:.0%})")
    for p in result["points"]:
        mark = " <" if p["value"] == result["selected"] else ""
        table.add_row(f"{p['value']:g}{mark}", f"{p['forget_probability']:.4f}", f"{p['utility']:.4f}",
                      f"{p['utility_drop']:+.2%}")
    out_console.print(table)
    note = "" if result["within_budget"] else " (no value kept the budget: the smallest drop was chosen)"
    out_console.print(f"selected {param}={result['selected']:g}{note}; adapter in {run_dir}/selected, "
                      f"sweep in {run_dir}/selection.json")


@user_errors
def select(run_dir: Annotated[Path, typer.Argument(help="A finished `lora-unlearn run` output folder.")],
           param: Annotated[str, typer.Option("--param", help="STEP.PARAM to sweep, e.g. unlearned.lam or unlearned.alpha.")],
           values: Annotated[str, typer.Option("--values", help="Comma-separated values, e.g. 0.5,1,1.5,2,3.")],
           holdout: Holdout = None, holdout_rows: HoldoutRows = None, forget: ForgetData = None, budget: Budget = 0.05,
           overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier RUN_DIR/selected.")] = False):
    """Choose lam/alpha without the answer key: the strongest forgetting whose held-out utility drop stays in budget.

    Re-applies only the run's arithmetic (its trained adapters and importance maps are read back).
    Writes RUN_DIR/selection.json (the whole sweep) and RUN_DIR/selected (the chosen adapter).
    """
    _quiet_libraries()
    _select(run_dir, param, values, holdout, holdout_rows, forget, budget, overwrite=overwrite)
