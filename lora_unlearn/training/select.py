"""Choosing lam (negation) or alpha (UIPE extrapolation) without the answer key.

The papers pick these coefficients by hand, looking at the benchmark's own metrics (UIPE names it
a limitation). A user has neither a retain-only model nor the evaluation's answer key; what they
have is the forget set, the retain data, and the model that holds the knowledge. The rule here
uses only those:

    forgetting(v) = mean_i P(a_i | q_i) over the forget set          (lower is stronger)
    utility(v)    = mean_i P(a_i | q_i) over a held-out part of the retain data
    drop(v)       = 1 - utility(v) / utility(reference)               (reference: the input stack, e.g. base + K)
    choose v* = argmin forgetting(v)  subject to  drop(v) <= budget   (default budget 0.05)

P is TOFU's normalised answer probability exp(-mean answer-token NLL). Ties go to the smaller
|v|. When no value keeps the budget, the value with the smallest drop is chosen and the result
says so. The held-out retain rows must not be used by the method itself (the TOFU-mini benchmark
trains on the first 18 retain authors and holds out the last 2).

A sweep re-applies only the arithmetic: the run's saved trained adapters and importance maps
(``RUN/steps/NAME``) are read back and every op step from the swept one onwards is recomputed
with the new value, so each point costs milliseconds plus its evaluation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import UserError


def parse_target(target: str) -> tuple[str, str]:
    """``"unlearned.lam"`` -> (step name, op parameter)."""
    step, _, param = target.rpartition(".")
    if not step or not param:
        raise UserError(f"--select {target!r}: use STEP.PARAM, e.g. unlearned.lam or unlearned.alpha")
    return step, param


def did_you_mean(word: str, choices) -> str:
    """``"; did you mean 'lam'?"`` for a close match among ``choices``, else ``""``."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_target(recipe, target: str, where: str = "--select") -> tuple[str, str]:
    """``(step, param)`` of ``target`` checked against ``recipe`` before any work: the step exists, is an
    arithmetic op with that parameter, and only arithmetic follows it (a sweep cannot retrain)."""
    from .recipes import OP_PARAMS

    step_name, param = parse_target(target)
    names = [s.name for s in recipe.steps]
    if step_name not in names:
        raise UserError(f"{where} {target!r}: the recipe {recipe.name!r} has no step {step_name!r}"
                        f"{did_you_mean(step_name, names)} (steps: {', '.join(names)})")
    start = names.index(step_name)
    step = recipe.steps[start]
    if step.train is not None and param == "steps":
        if not step.train.snapshots:
            raise UserError(f"{where} {target!r}: step {step_name!r} kept no snapshots: add e.g. "
                            f"snapshots: [10, 20, 40] (optimizer steps) to its train spec and run it again")
        start += 1  # the swept training is read back from its snapshots; what follows must be arithmetic
    elif step.op is None:
        hint = (f", or {step_name}.steps (a length kept by snapshots)" if step.train is not None else "")
        raise UserError(f"{where} {target!r}: step {step_name!r} is not an arithmetic op (it trains or estimates); "
                        f"sweep an op's parameter (negate's lam, extrapolate's alpha, scale's c){hint}")
    else:
        allowed = sorted(OP_PARAMS[step.op.name])
        if param not in allowed:
            raise UserError(f"{where} {target!r}: step {step_name!r} ({step.op.name}) has no parameter {param!r}"
                            f"{did_you_mean(param, allowed)} (its parameters: {', '.join(allowed) or 'none'})")
    later = [s.name for s in recipe.steps[start:] if s.op is None]
    if later:
        raise UserError(f"{where} {target!r}: steps after {step_name!r} train or estimate ({', '.join(later)}); "
                        "a sweep can only redo arithmetic")
    return step_name, param


def parse_values(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"sweep values {text!r}: use comma-separated numbers, e.g. 0.5,1,2") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise UserError(f"sweep values {text!r}: give at least one finite number")
    return sorted(set(values))


class RunArtifacts:
    """A finished recipe run read back from disk: its recipe, inputs and saved step outputs."""

    def __init__(self, run_dir: str | Path):
        from ..core.adapter_io import load_adapter
        from .importance import load_importance
        from .recipes import load_recipe

        self.dir = Path(run_dir)
        if not (self.dir / "recipe.yaml").is_file():
            raise UserError(f"{self.dir} is not a finished recipe run (no recipe.yaml): "
                            "run it first with lora-unlearn run RECIPE --out DIR")
        self.recipe = load_recipe(self.dir / "recipe.yaml")
        self.artifacts: dict[str, Any] = {name: load_adapter(path) for name, path in self.recipe.adapters.items()}
        for step in self.recipe.steps:
            folder = self.dir / "steps" / step.name
            if step.importance is not None:
                self.artifacts[step.name] = load_importance(folder / "importance.safetensors")[0]
            elif (folder / "adapter_config.json").is_file():
                self.artifacts[step.name] = load_adapter(folder)

    def adapter_at(self, step_name: str, param: str, value: float):
        """The run's output adapter with ``step_name``'s ``param`` set to ``value``."""
        return self.adapter_with({f"{step_name}.{param}": value})

    def snapshot(self, step_name: str, steps: float):
        """Train step ``step_name``'s adapter after ``steps`` optimizer steps (kept by its ``snapshots``)."""
        from ..core.adapter_io import load_adapter

        folder = self.dir / "snapshots" / step_name / f"step-{int(steps)}"
        if steps != int(steps) or not folder.is_dir():
            kept = sorted(int(p.name[5:]) for p in (self.dir / "snapshots" / step_name).glob("step-*"))
            raise UserError(f"{self.dir}: step {step_name!r} has no snapshot after {steps:g} steps "
                            f"(kept: {', '.join(map(str, kept)) or 'none'})")
        return load_adapter(folder)

    def adapter_with(self, settings: dict[str, float], output: str | None = None):
        """The run's output (or step ``output``'s result) with every ``STEP.PARAM`` of ``settings`` set: op
        parameters re-applied, a train step's ``steps`` read from its snapshots, and every op from the first
        of them onwards recomputed."""
        from .runner import apply_op

        if not settings:
            return self.artifacts[output or self.recipe.output]
        parsed = {check_target(self.recipe, t, where=str(self.dir)): v for t, v in settings.items()}
        names = [s.name for s in self.recipe.steps]
        start = min(names.index(step) for step, _ in parsed)
        artifacts = dict(self.artifacts)
        for s in self.recipe.steps[start:]:
            if s.op is None:  # a swept train step (check_target allows nothing else here)
                artifacts[s.name] = self.snapshot(s.name, parsed[(s.name, "steps")])
                continue
            params = {param: v for (step, param), v in parsed.items() if step == s.name}
            op = s.op.model_copy(update={"params": {**s.op.params, **params}}) if params else s.op
            artifacts[s.name] = apply_op(op, artifacts, {})
        return artifacts[output or self.recipe.output]

    def reference_stack(self) -> list:
        """What the model was before unlearning: the run's input adapters at scale 1 (empty: the base)."""
        return [(a, 1.0) for name, a in self.artifacts.items() if name in self.recipe.adapters]


def check_holdout(recipe, holdout_rows: list[dict], forget_rows: list[dict] = ()) -> None:
    """Refuse held-out rows that the selection's forget rows, or any data a step of ``recipe`` trains or
    estimates on, also hold (same question): the rule's utility must be measured on unseen rows."""
    from .runner import _rows

    if not holdout_rows:
        raise UserError("the held-out rows are empty: give held-out retain data (e.g. --holdout tofu-mini:retain "
                        "--holdout-rows 360:400)")
    used = {name for step in recipe.steps for name in
            (step.train.data.values() if step.train else [step.importance.data] if step.importance else [])}
    seen = {r["question"].strip(): "the forget rows" for r in forget_rows if r.get("question")}
    for name in sorted(used):
        for row in _rows(recipe.data[name], recipe.tofu_dir):
            if row.get("question"):
                seen.setdefault(row["question"].strip(), f"the recipe's data {name!r}")
    for i, row in enumerate(holdout_rows):
        where = seen.get(str(row.get("question", "")).strip())
        if where:
            raise UserError(f"held-out row {i + 1} ({row['question'][:60]!r}) is also in {where}: the held-out "
                            "rows must be data the method never saw (e.g. --holdout-rows 360:400 with the "
                            "method's retain data limited to rows 0-359)")


def _mean_probability(model, tokenizer, rows, batch_size: int) -> float:
    from ..core.inference import answer_probability

    probs = answer_probability(model, tokenizer, rows, batch_size=batch_size)
    return sum(probs) / len(probs)


def choose(points: list[dict[str, float]], budget: float) -> tuple[dict[str, float], bool]:
    """Pure selection rule over sweep points {value, forget_probability, utility_drop}."""
    if not points:
        raise UserError("nothing to choose from: the sweep is empty")
    ok = [p for p in points if p["utility_drop"] <= budget]
    if ok:
        return min(ok, key=lambda p: (p["forget_probability"], abs(p["value"]))), True
    return min(points, key=lambda p: (p["utility_drop"], abs(p["value"]))), False


def sweep(model, tokenizer, run: RunArtifacts, target: str, values: list[float], *, forget_rows: list[dict],
          holdout_rows: list[dict], budget: float = 0.05, batch_size: int = 16, progress=None,
          fixed: dict[str, float] | None = None) -> dict[str, Any]:
    """Evaluate the rule at every value; return the sweep, the choice, and the reference figures.

    ``fixed``: other ``STEP.PARAM`` settings held at a value for the whole sweep (e.g. the length
    of the forget adapter, ``forget_adapter.steps``, while ``unlearned.lam`` is swept); each point
    records them, so the points of several sweeps can be pooled and given to :func:`choose`."""
    from ..core.inference import dequantized
    from ..core.stack import attached

    if not forget_rows or not holdout_rows:
        raise UserError("selection needs forget rows and held-out retain rows (both non-empty)")
    if not 0 <= budget < 1:
        raise UserError(f"utility budget {budget} must be in [0, 1), e.g. 0.05 for 5%")
    check_holdout(run.recipe, holdout_rows, forget_rows)
    for value in values:  # every snapshot a length sweep asks for exists, before any work
        for t, v in {**(fixed or {}), target: value}.items():
            step, param = check_target(run.recipe, t, where=str(run.dir))
            if param == "steps":  # check_target allows "steps" on train steps only
                run.snapshot(step, v)
    with dequantized(model):  # same numbers as the 4-bit forward, dequantized once instead of per batch
        with attached(model, run.reference_stack()) as m:
            ref_forget = _mean_probability(m, tokenizer, forget_rows, batch_size)
            ref_utility = _mean_probability(m, tokenizer, holdout_rows, batch_size)
        points = []
        for value in values:
            adapter = run.adapter_with({**(fixed or {}), target: value})
            with attached(model, [(adapter, 1.0)]) as m:
                forget = _mean_probability(m, tokenizer, forget_rows, batch_size)
                utility = _mean_probability(m, tokenizer, holdout_rows, batch_size)
            points.append({"value": value, "forget_probability": forget, "utility": utility,
                           "utility_drop": 1 - utility / ref_utility, **({"fixed": dict(fixed)} if fixed else {})})
            if progress is not None:
                progress(points[-1])
    chosen, within = choose(points, budget)
    return {"target": target, "budget": budget, "rule": "min forget P s.t. held-out retain P drop <= budget",
            "reference": {"forget_probability": ref_forget, "utility": ref_utility},
            "n_forget": len(forget_rows), "n_holdout": len(holdout_rows),
            "points": points, "selected": chosen["value"], "within_budget": within}


def check_selection(run_dir: str | Path, target: str, overwrite: bool = False) -> RunArtifacts:
    """The run, once ``target`` is a parameter of its recipe and ``RUN/selected`` may be written; before any work."""
    run = RunArtifacts(run_dir)
    check_target(run.recipe, target)
    if (run.dir / "selected").exists() and not overwrite:
        raise UserError(f"{run.dir / 'selected'} already exists (an earlier selection): pass --overwrite to replace it")
    return run


def select_run(run_dir: str | Path, target: str, values: list[float], *, forget_rows: list[dict],
               holdout_rows: list[dict], budget: float = 0.05, batch_size: int = 16, loaded=None,
               progress=None, overwrite: bool = False) -> dict[str, Any]:
    """Sweep a finished run and write ``RUN/selection.json`` and ``RUN/selected`` (the chosen adapter).

    An existing ``RUN/selected`` is refused unless ``overwrite`` (then replaced once the new one is complete).
    """
    from ..core.adapter_io import save_adapter
    from ..core.models import load_base

    run = check_selection(run_dir, target, overwrite)
    model, tokenizer, _ = loaded or load_base(run.recipe.base.model, run.recipe.base.quantization)
    result = sweep(model, tokenizer, run, target, values, forget_rows=forget_rows, holdout_rows=holdout_rows,
                   budget=budget, batch_size=batch_size, progress=progress)
    step, param = parse_target(target)
    save_adapter(run.adapter_at(step, param, result["selected"]), run.dir / "selected", overwrite=True)
    tmp = run.dir / "selection.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(run.dir / "selection.json")
    return result
