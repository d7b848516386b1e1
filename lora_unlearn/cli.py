"""The ``lora-unlearn`` command: parsing and dispatch only; the work lives in the library."""

from __future__ import annotations

import contextlib
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
    from .quiet import quiet_known_messages, show_everything

    show_everything() if verbose else quiet_known_messages()
    if allow_pickle:
        from .core.fsutil import pickle_allowed

        ctx.with_resource(pickle_allowed())  # for every load the command makes, recipes included


def _quiet_libraries() -> None:
    import transformers

    from .quiet import verbose

    if verbose():
        return
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _note_fresh_start(out: Path, resume: bool) -> None:
    from .training.jobs import is_main_process, work_dir

    if resume and is_main_process() and not work_dir(out).exists():
        err_console.print(f"nothing to resume in {work_dir(out)}: starting from scratch")


@contextlib.contextmanager
def _resume_hint(out: Path, checkpoint_every: int):
    """Ctrl-C: say where the checkpoints are and the exact command that continues, then exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        import shlex

        from .training.jobs import last_checkpoint, resumable, work_dir

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
    from .core.adapter_io import save_adapter

    save_adapter(adapter, out, overwrite=overwrite)
    ranks = sorted(set(adapter.ranks.values()))
    err_console.print(f"wrote {out} ({len(adapter.modules)} modules, rank {', '.join(map(str, ranks))})")


@app.command()
@user_errors
def negate(src: Path, out: Path, scale: Annotated[float, typer.Option("--scale", "-l", help="lam: the result is -lam * dW.")] = 1.0,
           overwrite: Overwrite = False):
    """Write -lam * dW of SRC to OUT (task-vector negation)."""
    from .arithmetic import negate as op
    from .core.adapter_io import load_adapter

    if scale < 0:
        raise UserError(f"--scale must be >= 0, got {scale:g}: negate writes -lam * dW, so a negative lam adds "
                        "the knowledge back; for c * dW use `lora-unlearn scale --by c`")

    _write(op(load_adapter(src), scale), out, overwrite)


@app.command()
@user_errors
def scale(src: Path, out: Path, by: Annotated[float, typer.Option("--by", help="c: the result is c * dW.")],
          overwrite: Overwrite = False):
    """Write c * dW of SRC to OUT."""
    from .arithmetic import scale as op
    from .core.adapter_io import load_adapter

    _write(op(load_adapter(src), by), out, overwrite)


@app.command()
@user_errors
def extrapolate(src: Path, out: Path, alpha: Annotated[float, typer.Option("--alpha", help="the result is (1 + alpha) * dW (UIPE).")],
                overwrite: Overwrite = False):
    """Write (1 + alpha) * dW of SRC to OUT (UIPE's extrapolation of an unlearning update)."""
    from .arithmetic import extrapolate as op
    from .core.adapter_io import load_adapter

    if alpha <= -1:
        raise UserError(f"--alpha must be > -1, got {alpha:g}: (1 + alpha) * dW would be zero or flip the sign; "
                        "use `lora-unlearn negate` or `scale --by c` for that")

    _write(op(load_adapter(src), alpha), out, overwrite)


@app.command()
@user_errors
def add(paths: Annotated[list[Path], typer.Argument(help="Two or more adapter folders, then the output folder.")],
        allow_different_bases: Annotated[bool, typer.Option(help="Add adapters of different base models anyway.")] = False,
        overwrite: Overwrite = False):
    """Write dW1 + dW2 + ... to the last path, exactly (canonical factors: B = U S, A = V^T of the sum)."""
    from .arithmetic import add as op
    from .core.adapter_io import load_adapter

    if len(paths) < 3:
        raise UserError("add needs at least two adapters and an output folder: lora-unlearn add A B OUT")
    *inputs, out = paths
    _write(op(*map(load_adapter, inputs), allow_different_bases=allow_different_bases), out, overwrite)


@app.command()
@user_errors
def compress(src: Path, out: Path, rank: Annotated[int, typer.Option("--rank", "-r", help="Target rank r'.")],
             overwrite: Overwrite = False):
    """Write the best rank-R approximation of SRC to OUT and print each module's error."""
    from .arithmetic import compress as op
    from .core.adapter_io import load_adapter

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

    from .core.data import load_any
    from .core.stack import parse_stack
    from .training.jobs import is_main_process
    from .training.learn import FORGET_DEFAULTS, LEARN_DEFAULTS, NotLearnedWarning, learned_report, not_learned_advice
    from .training.learn import learn as run

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


def _looks_like_a_path(text: str) -> bool:
    """One word ending in a data-file suffix, or containing a path separator: meant as a file."""
    word = text.strip()
    return bool(word) and not any(c.isspace() for c in word) and (
        word.lower().endswith((".jsonl", ".json", ".csv", ".txt", ".parquet")) or "/" in word or "\\" in word)


@app.command()
@user_errors
def ask(questions: Annotated[str, typer.Option("--questions", help="A question, or a JSONL file of rows with 'question'.")],
        adapter: Stack = None, base: Base = "smollm2-135m", quantization: Quant = "nf4",
        max_new_tokens: int = 64,
        max_strength: Annotated[float, typer.Option("--max-strength", help="Largest |scale| of an adapter in the "
                                                    "stack (as the server's --max-strength).")] = 8.0):
    """Answer questions greedily with the base and a stack of adapters (unmerged)."""
    from .core.data import load_records
    from .core.inference import answer
    from .core.models import load_base
    from .core.stack import attached, parse_stack

    _quiet_libraries()
    if Path(questions).is_file():
        rows = load_records(questions)
        if any(not isinstance(r.get("question"), str) for r in rows):
            raise UserError(f"{questions}: every row needs a string field 'question'")
        items = [r["question"] for r in rows]
    elif _looks_like_a_path(questions):
        raise UserError(f"--questions {questions!r} looks like a file path, but there is no such file: check the "
                        "path (a question to ask directly is plain text with spaces, e.g. 'Who wrote Hamlet?')")
    else:
        items = [questions]
    stack = parse_stack(adapter)
    for spec, (_, c) in zip(adapter or [], stack):
        if not abs(c) <= max_strength:
            raise UserError(f"adapter {spec!r}: scale {c:g} is beyond --max-strength {max_strength:g} (a strength "
                            "that large breaks the model's logits): use a scale in [-max, max] or raise the bound")
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
        overwrite: Overwrite = False, resume: Resume = False, checkpoint_every: CheckpointEvery = 50,
        select_: Annotated[str | None, typer.Option("--select", help="STEP.PARAM=V1,V2,... : after the run, sweep "
                                                    "that coefficient and choose it (see `lora-unlearn select`).")] = None,
        holdout: Holdout = None, holdout_rows: HoldoutRows = None, budget: Budget = 0.05):
    """Run a recipe (recipes/*.yaml): train, estimate importance and do arithmetic, step by step."""
    from .training.jobs import is_main_process
    from .training.recipes import load_recipe
    from .training.runner import run_recipe

    _quiet_libraries()
    if select_ is not None:
        from .training.select import parse_target, parse_values

        target, sep, values = select_.partition("=")
        if not sep:
            raise UserError(f"--select {select_!r}: use STEP.PARAM=V1,V2,..., e.g. unlearned.lam=0.5,1,2")
        parse_target(target)
        parse_values(values)
        if not holdout:
            raise UserError("--select needs held-out retain data the method did not train on: pass --holdout DATA")
    spec = load_recipe(recipe, set_ or [])
    if select_ is not None:
        from .training.select import check_target

        check_target(spec, target)  # before any training: a misspelled key must not cost a run
    out = out or Path("runs") / spec.name
    from .core.fsutil import check_separate

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


@app.command()
@user_errors
def demo(out: Annotated[Path, typer.Option("--out", help="Where to keep the demo's adapters and results.")] = Path("runs/demo"),
         lam: Annotated[float, typer.Option("--lam", help="Negation strength: base + K - lam * F.")] = 1.0,
         quantization: Quant = "nf4", overwrite: Overwrite = True):
    """Learn 12 fictitious facts as adapter K, forget 2 of them by negating adapter F, show the answers."""
    from .demo import run_demo

    _quiet_libraries()
    run_demo(out, lam=lam, quantization=quantization, overwrite=overwrite, console=out_console)


Holdout = Annotated[str | None, typer.Option("--holdout", help="Held-out retain data for --select (not used by the "
                                             "method): JSONL, dataset folder or a source such as tofu-mini:retain.")]
HoldoutRows = Annotated[str | None, typer.Option("--holdout-rows", help="START:END slice of --holdout, e.g. 360:400.")]
ForgetData = Annotated[str | None, typer.Option("--forget", help="Forget data for --select (default: the recipe's 'forget').")]
Budget = Annotated[float, typer.Option("--budget", help="Largest allowed relative drop of held-out answer probability.")]


def _select(run_dir: Path, param: str, values: str, holdout: str | None, holdout_rows: str | None,
            forget: str | None, budget: float, overwrite: bool = False) -> None:
    from .training.select import check_selection, parse_target, parse_values, select_run
    from .training.sources import load_source

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
    held = load_source(holdout)
    if holdout_rows:
        try:
            start, end = (int(x) if x else None for x in holdout_rows.split(":"))
        except ValueError:
            raise UserError(f"--holdout-rows {holdout_rows!r}: use START:END, e.g. 360:400") from None
        held = held[start:end]

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


@app.command()
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


@app.command("eval")
@user_errors
def eval_(out: Annotated[Path, typer.Option("--out", help="Folder for results.json and results.md.")],
          benchmark: Annotated[str, typer.Option("--benchmark", help="tofu or edits.")] = "tofu",
          adapter: Stack = None, base: Base = "smollm2-135m", quantization: Quant = "nf4",
          data: Annotated[str | None, typer.Option("--data", help="tofu: 'tofu-mini' or a folder of TOFU JSONL files "
                                                   "(forget.jsonl, retain.jsonl, ...); edits: 'edits-demo' or a JSONL file.")] = None,
          splits: Annotated[str | None, typer.Option("--splits", help="tofu: comma-separated subset of "
                                                     "forget,retain,real_authors,world_facts.")] = None,
          retain_limit: Annotated[int | None, typer.Option("--retain-limit", help="Retain rows, spread over all authors.")] = None,
          limit: Annotated[int | None, typer.Option("--limit", help="First N rows of every other split.")] = None,
          reference: Annotated[Path | None, typer.Option("--reference", help="results.json of the retain-only model: "
                                                         "forget quality compares with its forget truth ratios.")] = None,
          locality: Annotated[str | None, typer.Option("--locality", help="edits: a shared locality pool (JSONL of "
                                                      "prompt/answer; default for edits:dev/test: edits:locality).")] = None,
          batch_size: int = 16,
          max_new_tokens: Annotated[int | None, typer.Option(help="Greedy tokens per answer (tofu 200, edits 32).")] = None,
          scoped: Annotated[bool, typer.Option("--scoped", help="tofu: each --adapter with a scope saved beside it "
                                               "runs, per question, at the strength its scope gives (as a request "
                                               "with \"forget\": {NAME: \"auto\"}); see `lora-unlearn scope`.")] = False,
          overwrite: Overwrite = False):
    """Evaluate the base with a stack of adapters (unmerged) on TOFU or knowledge edits; write OUT/results.{json,md}."""
    from .evaluate.report import tables, write_results

    if benchmark not in ("tofu", "edits"):
        raise UserError(f"unknown benchmark {benchmark!r}. Available: tofu, edits")
    if scoped and benchmark != "tofu":
        raise UserError("--scoped evaluates TOFU (--benchmark tofu): scopes decide per question")
    if batch_size < 1 or (max_new_tokens is not None and max_new_tokens < 1):
        raise UserError("--batch-size and --max-new-tokens must be at least 1")
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists: choose another path or pass --overwrite")
    if benchmark == "tofu":
        from .evaluate.tofu import MAX_NEW_TOKENS as TOFU_MAX_NEW_TOKENS
        from .evaluate.tofu import evaluate_tofu, load_reference, tofu_splits

        names = [s.strip() for s in splits.split(",") if s.strip()] if splits else None
        rows = tofu_splits(data or "tofu-mini", retain_limit=retain_limit, limit=limit, splits=names)
        ref = load_reference(reference) if reference else None
        if ref is not None and "forget" not in rows:
            raise UserError("--reference needs the forget split: include forget in --splits")
        if ref is not None and len(ref) != len(rows["forget"]):
            raise UserError(f"--reference has {len(ref)} forget truth ratios but this forget split has "
                            f"{len(rows['forget'])} rows: evaluate both models on the same forget set")
        evaluate = functools.partial(evaluate_tofu, splits=rows, reference_truth_ratios=ref, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens or TOFU_MAX_NEW_TOKENS)
    else:
        from .evaluate.edits import evaluate_edits, probes, record_unedited
        from .training.sources import load_edits, load_locality

        edits = load_edits(data or "edits-demo")
        if locality is None and str(data).startswith("edits:"):
            locality = "edits:locality"
        pool = load_locality(locality) if locality else None
        evaluate = functools.partial(evaluate_edits, edits=edits, pool=pool, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens or 32)
    from .core.models import load_base
    from .core.stack import attached, parse_stack

    _quiet_libraries()
    stack = parse_stack(adapter)
    scopes = _stack_scopes(adapter or [], stack) if scoped else {}
    model, tokenizer, info = load_base(base, quantization)
    if scoped:
        from .core.scope import check_scope
        from .evaluate.scoped import evaluate_tofu_scoped

        for k, scope in scopes.items():
            check_scope(scope, stack[k][0], model, base=info.hub_id)
        evaluate = functools.partial(evaluate_tofu_scoped, stack=stack, scopes=scopes, splits=rows,
                                     reference_truth_ratios=ref, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens or TOFU_MAX_NEW_TOKENS)
        result = evaluate(model, tokenizer)
    if benchmark == "edits" and any(probes(edits, pool).values()):
        # Locality is judged against the unedited model: its answers, recorded once, before the stack.
        evaluate = functools.partial(evaluate, unedited=record_unedited(
            model, tokenizer, edits, pool, batch_size=batch_size, max_new_tokens=max_new_tokens or 32))
    if not scoped:
        with attached(model, stack) as m:
            result = evaluate(m, tokenizer)
    layers = [f"{a.lineage.get('path', '?')}:{'scoped' if k in scopes else f'{c:g}'}" for k, (a, c) in enumerate(stack)]
    meta = {"model": " + ".join([f"{base} ({quantization})"] + layers), "base": info.hub_id, "quantization": quantization,
            "adapters": [{"path": a.lineage.get("path"), "sha256": a.lineage.get("sha256"), "scale": c,
                          **({"scope": scopes[k].summary()} if k in scopes else {})} for k, (a, c) in enumerate(stack)],
            "data": data or ("tofu-mini" if benchmark == "tofu" else "edits-demo"),
            "locality_pool": locality if benchmark == "edits" else None,
            "retain_limit": retain_limit, "limit": limit, "reference": str(reference) if reference else None}
    result = {"benchmark": benchmark, "meta": meta, **result}
    write_results(out, result, overwrite=overwrite)
    for title, headers, body in tables(result):
        table = Table(*headers, title=title)
        for row in body:
            table.add_row(*row)
        out_console.print(table)
    err_console.print(f"wrote {out}/results.json and {out}/results.md", soft_wrap=True)


def _stack_scopes(specs: list[str], stack) -> dict:
    """Stack index -> Scope for the --adapter folders with a scope beside them (their strength comes from it)."""
    from .core.scope import load_scope, read_scope_json

    scopes = {}
    for k, (spec, (a, c)) in enumerate(zip(specs, stack)):
        folder = a.lineage.get("path")
        if folder and read_scope_json(folder) is not None:
            if c != 1.0:
                raise UserError(f"--adapter {spec!r} has a scope, which sets its strength per question (up to its "
                                "lambda_max): drop the :SCALE, or refit the scope with another --lambda-max")
            scopes[k] = load_scope(folder)
    if not scopes:
        raise UserError("--scoped: none of the --adapter folders has a scope (scope.json): fit one with "
                        "`lora-unlearn scope ADAPTER_DIR --forget DATA --calibrate DATA`")
    return scopes


def _slice(rows: list, spec: str | None, flag: str) -> list:
    if not spec:
        return rows
    try:
        start, end = (int(x) if x else None for x in spec.split(":"))
    except ValueError:
        raise UserError(f"{flag} {spec!r}: use START:END, e.g. 360:400") from None
    if not rows[start:end]:
        raise UserError(f"{flag} {spec!r} selects no rows (the data has {len(rows)})")
    return rows[start:end]


def _rows_of(source: str) -> list[dict]:
    """QA or text rows of a named source (preservation, tofu-mini:NAME, ...) or a file."""
    from .core.data import load_any
    from .training.sources import load_source

    named = source in ("preservation", "preservation+facts") or source.startswith(("tofu-mini:", "tofu:", "edits"))
    return load_source(source) if named else load_any(source)


def _texts(rows: list[dict], answers: bool = True) -> list[str]:
    """What a scope reads of data rows: questions (and answers) of QA rows, the text of text rows."""
    return [t for r in rows for t in ([r["question"], *([r["answer"]] if answers else [])] if "question" in r
                                      else [r.get("text", "")])]


@app.command("scope")
@user_errors
def scope_(folder: Annotated[Path, typer.Argument(help="The adapter folder; the scope is saved in it.")],
           forget: Annotated[str, typer.Option("--forget", help="The forget data (its questions are the bank): JSONL, "
                                               "a dataset folder or a source such as tofu-mini:forget01.")],
           forget_rows: Annotated[str | None, typer.Option("--forget-rows", help="START:END slice of --forget.")] = None,
           calibrate: Annotated[str | None, typer.Option("--calibrate", help="Held-out prompts that must stay out of "
                                                         "scope, for the threshold (e.g. tofu-mini:retain).")] = None,
           calibrate_rows: Annotated[str | None, typer.Option("--calibrate-rows", help="START:END slice of --calibrate "
                                                              "(TOFU-mini: 360:400).")] = None,
           background: Annotated[list[str] | None, typer.Option("--background", help="Text that must stay out of scope "
                                                                "(repeatable; default: preservation+facts, the vendored "
                                                                "pool's prompts; 'none' for no background; the benchmark "
                                                                "adds tofu-mini:holdout01).")] = None,
           answers: Annotated[bool, typer.Option("--answers", help="Put the forget answers in the bank too (more "
                                                 "indirect questions found, more false positives).")] = False,
           fpr: Annotated[float, typer.Option("--fpr", help="Target false-positive rate on --calibrate.")] = 0.02,
           threshold: Annotated[float | None, typer.Option("--threshold", help="A threshold in [0, 1] instead of "
                                                           "calibrating.")] = None,
           lambda_max: Annotated[float, typer.Option("--lambda-max", help="The adapter's strength in scope.")] = 1.0,
           mode: Annotated[str, typer.Option("--mode", help="hard (lambda_max or 0) or smooth (a ramp above the "
                                             "threshold).")] = "hard",
           ramp: Annotated[float, typer.Option("--ramp", help="smooth: the score width of the ramp.")] = 0.1,
           layer: Annotated[int, typer.Option("--layer", help="Decoder layer whose token states are read.")] = 4,
           top_k: Annotated[int, typer.Option("--top-k", help="Tokens whose margins are averaged.")] = 3,
           max_strength: Annotated[float, typer.Option("--max-strength", help="The server's bound lambda_max must "
                                                       "stay within.")] = 8.0,
           base: Base = "smollm2-135m", quantization: Quant = "nf4", overwrite: Overwrite = False):
    """Fit a scope detector for an adapter: per request, how strongly to apply it (scoped forgetting).

    Writes FOLDER/scope.safetensors and FOLDER/scope.json and rewrites the card. The weights still
    hold the knowledge: a request the detector misses gets it.
    """
    from .core.adapter_io import load_adapter
    from .core.card import check_ours, save_card
    from .core.scope import check_settings, fit_scope, read_scope_json, save_scope
    from .training.sources import load_source

    adapter = load_adapter(folder)
    check_settings(layer, top_k, 0.0 if threshold is None else threshold, lambda_max, mode, ramp)
    if lambda_max > max_strength:
        raise UserError(f"--lambda-max {lambda_max:g} is beyond --max-strength {max_strength:g} (the server "
                        "refuses strengths past its bound): use a smaller --lambda-max or raise the bound")
    if threshold is None and not calibrate:
        raise UserError("calibrating needs held-out prompts that must stay out of scope: pass --calibrate DATA "
                        "(TOFU-mini: --calibrate tofu-mini:retain --calibrate-rows 360:400) or --threshold T")
    if threshold is None and not 0 < fpr < 1:
        raise UserError(f"--fpr must be in (0, 1), e.g. 0.02, got {fpr:g}")
    if read_scope_json(folder) is not None and not overwrite:
        raise UserError(f"{folder}/scope.json already exists: pass --overwrite to replace the scope")
    check_ours(folder)  # the card is rewritten: refuse before any work if it is not ours
    rows = _slice(load_source(forget), forget_rows, "--forget-rows")
    fit = [r["question"] for r in rows] + ([r["answer"] for r in rows] if answers else [])
    names = [b for b in (background or ["preservation+facts"]) if b.lower() != "none"]
    # the vendored pool gives its prompts (its answers are the embedded model's own generations)
    bg = [t for b in names for t in _texts(_rows_of(b), answers=not b.startswith("preservation"))]
    cal = _texts(_slice(load_source(calibrate), calibrate_rows, "--calibrate-rows"), answers=False) if calibrate else None
    from .core.models import load_base

    _quiet_libraries()
    model, tokenizer, info = load_base(base, quantization)
    if adapter.base_model and adapter.base_model != info.hub_id:
        raise UserError(f"{folder} was made for {adapter.base_model}, but --base {base} is {info.hub_id}: a scope "
                        "reads the base the adapter runs on; pass its --base")
    from .core.inference import dequantized

    with err_console.status("reading the forget, background and calibration texts"), dequantized(model):
        scope = fit_scope(model, tokenizer, fit, adapter=adapter, background_texts=bg, calibration_texts=cal,
                          threshold=threshold, fpr=fpr, lambda_max=lambda_max, mode=mode, ramp=ramp, layer=layer,
                          top_k=top_k, base=info.hub_id, quantization=quantization)
    save_scope(scope, folder, overwrite=overwrite)
    save_card(folder, adapter)
    cal_info = scope.meta["calibration"]
    above = (f"; {cal_info['above_threshold']:.1%} of the {cal_info['rows']} calibration prompts score above it"
             if cal_info.get("rows") else "")
    err_console.print(f"wrote {folder}/scope.json and scope.safetensors: threshold {scope.threshold:.4f}{above}; "
                      f"{scope.forget.shape[0]} forget and {scope.background.shape[0]} background token states "
                      f"(layer {layer}); in scope the strength is {lambda_max:g} ({mode})", soft_wrap=True)


# ---- sharing and serving ----------------------------------------------------------------------

@app.command()
@user_errors
def card(folder: Annotated[Path, typer.Argument(help="An adapter folder.")],
         force: Annotated[bool, typer.Option("--force", help="Replace a README.md that lora-unlearn did not write.")] = False,
         eval_: Annotated[Path | None, typer.Option("--eval", help="An `eval --out` folder (or its results.json) to "
                          "show; default: beside the adapter, else the newest under the run folder that evaluated it.")] = None):
    """(Re)write FOLDER/README.md, the model card: lineage, risks, and the adapter's evaluation."""
    from .hub.cards import kind_of, write_card

    path = write_card(folder, force=force, results=eval_)
    err_console.print(f"wrote {path} ({kind_of(folder).kind} adapter)", soft_wrap=True)


@app.command()
@user_errors
def push(folder: Annotated[Path, typer.Argument(help="An adapter folder.")],
         repo_id: Annotated[str, typer.Argument(help="Hub repository, OWNER/NAME.")],
         private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
         allow_forget_adapter: Annotated[bool, typer.Option(
             "--allow-forget-adapter", help="Publish a forget or negated adapter anyway: adding it back restores "
             "the knowledge it removes.")] = False,
         message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message.")] = None):
    """Upload an adapter (its PEFT files, lineage and card) to the Hugging Face Hub."""
    from .hub.push import push as push_adapter

    url = push_adapter(folder, repo_id, private=private, allow_forget_adapter=allow_forget_adapter,
                       commit_message=message)
    out_console.print(url)


@app.command()
@user_errors
def export(folder: Annotated[Path, typer.Argument(help="An adapter folder.")],
           out: Annotated[Path, typer.Argument(help="Output folder.")],
           merged: Annotated[bool, typer.Option("--merged", help="Write base + dW as a full model (float32).")] = False,
           for_server: Annotated[str | None, typer.Option("--for", help="Make a multi-LoRA server accept it: vllm.")] = None,
           max_rank: Annotated[int | None, typer.Option("--max-rank", help="--for: the server's rank limit (vllm: 16).")] = None,
           dtype: Annotated[str | None, typer.Option("--dtype", help="Store A and B as float32, bfloat16 or float16.")] = None,
           base: Annotated[str | None, typer.Option("--base", help="--merged: the base (default: the adapter's own).")] = None,
           overwrite: Overwrite = False):
    """Export an adapter: merged into its base (--merged), servable (--for vllm), or cast (--dtype)."""
    from .hub.export import export_cast, export_merged, export_servable

    if merged and (for_server or dtype or max_rank):
        raise UserError("--merged writes a float32 model: it takes no --for, --dtype or --max-rank")
    if not (merged or for_server or dtype):
        raise UserError("say what to export: --merged (a full model), --for vllm (a servable adapter) "
                        "or --dtype bfloat16 (a cast copy)")
    if max_rank is not None and not for_server:
        raise UserError("--max-rank goes with --for")
    if merged:
        _quiet_libraries()
        report = export_merged(folder, out, base=base, overwrite=overwrite)
        err_console.print(f"wrote {out}: {report.base} + the adapter, merged in float32; logits against the "
                          f"unmerged adapter on {report.probes} probes: max |diff| {report.max_abs_logit_diff:.2e}, "
                          f"mean {report.mean_abs_logit_diff:.2e}", soft_wrap=True)
    elif for_server:
        report = export_servable(folder, out, server=for_server, max_rank=max_rank, dtype=dtype, overwrite=overwrite)
        table = Table("check", "status", "detail", title=f"{folder} for {report.server} (max rank {report.max_rank})")
        for c in report.checks:
            table.add_row(c.name, c.status, c.detail)
        out_console.print(table)
        worst = sorted(report.errors.items(), key=lambda kv: -kv[1])[:5]
        out_console.print("largest relative errors of dW: "
                          + ", ".join(f"{name} {err:.2e}" for name, err in worst), soft_wrap=True)
        err_console.print(f"wrote {out} (rank {report.rank})")
    else:
        result = export_cast(folder, out, dtype, overwrite=overwrite)
        err_console.print(f"wrote {out} ({len(result.modules)} modules as {dtype})")


@app.command()
@user_errors
def serve(adapter: Annotated[list[str] | None, typer.Option(
              "--adapter", help="NAME=DIR[:DEFAULT] (a folder or Hub id), repeatable; DEFAULT is the strength a "
              "request gets when it does not set one (0 = off; auto = the scope saved beside DIR decides). A scope "
              "beside DIR is loaded with it, so requests may send \"auto\".")] = None,
          base: Base = "smollm2-135m", quantization: Quant = "nf4",
          host: Annotated[str, typer.Option("--host", help="Address to bind; anything but loopback needs --api-key.")] = "127.0.0.1",
          port: Annotated[int, typer.Option("--port")] = 8000,
          api_key: Annotated[str | None, typer.Option("--api-key", envvar="LORA_UNLEARN_API_KEY",
                                                      help="Require 'Authorization: Bearer KEY'.")] = None,
          max_tokens_limit: Annotated[int, typer.Option("--max-tokens-limit", help="Largest max_tokens a request may ask.")] = 256,
          max_prompt_chars: Annotated[int, typer.Option("--max-prompt-chars", help="Longest prompt, in characters.")] = 8000,
          max_batch: Annotated[int, typer.Option("--max-batch", help="Rows generated together.")] = 8,
          batch_window_ms: Annotated[float, typer.Option("--batch-window-ms", help="Wait for more requests this long.")] = 5.0,
          max_strength: Annotated[float, typer.Option("--max-strength", help="Largest |forget strength| a request or "
                                                      "default may set (the recipes select <= 3).")] = 8.0):
    """Serve OpenAI-style completions with per-request forget strengths ("forget": {"NAME": 1.0})."""
    from .serving.app import LOOPBACK
    from .serving.app import serve as run_server
    from .serving.registry import parse_adapter_spec
    from .serving.runtime import ForgetRuntime
    from .serving.schemas import Limits

    if not 1 <= port <= 65535:
        raise UserError(f"--port must be in 1..65535, got {port}")
    if host not in LOOPBACK and not api_key:
        raise UserError(f"--host {host} exposes the server beyond this machine: set --api-key "
                        "(or LORA_UNLEARN_API_KEY), or bind 127.0.0.1")
    for flag, value in (("--max-tokens-limit", max_tokens_limit), ("--max-prompt-chars", max_prompt_chars),
                        ("--max-batch", max_batch)):
        if value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    limits = Limits(max_tokens=max_tokens_limit, max_prompt_chars=max_prompt_chars, max_batch=max_batch,
                    batch_window_ms=batch_window_ms, max_strength=max_strength)
    limits.validate()
    specs = [parse_adapter_spec(s) for s in adapter or []]
    names = [name for name, _, _ in specs]
    if len(set(names)) != len(names):
        raise UserError(f"--adapter names must be unique, got {', '.join(names)}")
    _quiet_libraries()
    runtime = ForgetRuntime.from_base(base, quantization, max_strength=max_strength)
    err_console.print(f"serving {base} ({quantization}) with {', '.join(names) or 'no adapters'} on "
                      f"http://{host}:{port}{' (API key required)' if api_key else ''}", soft_wrap=True)
    run_server(runtime, host=host, port=port, api_key=api_key, limits=limits, adapters=specs, log_level="warning")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
