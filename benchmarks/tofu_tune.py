"""TOFU-mini, every method tuned alike: learning rate x training length (x lam/alpha), chosen without the answer key.

    .venv/bin/python benchmarks/tofu_tune.py --methods tv npo      # after `benchmarks/tofu_mini.py prepare`
    .venv/bin/python benchmarks/tofu_tune.py --report              # the table from the cache

The budget is the same kind for every method (issue: TOFU-mini that can tell methods apart):

- **learning rate**: ``LRS`` (three values, the same for every method), one training run each;
- **length**: each run trains ``EPOCHS`` epochs over forget01 and keeps its adapter at ``LENGTHS``
  (fractions of the run: snapshots, so the lengths cost one run, not one run each); LLM Surgery
  keeps its official 120 constant-rate steps as the longest length;
- **coefficient**: TV and UIPE also sweep lam / alpha at every (rate, length); PerTA sweeps lam at
  every rate, at the recipe's length (its importance maps are computed from the trained forget
  adapter, so a length would need its own importance pass: that is PerTA's budget, said in the table).

Every point is read by the cheap proxy only (mean answer probability on the forget set and on the
held-out retain rows 360-399, lora_unlearn.training.select); the points of all runs of a method
are pooled and one is chosen by the no-answer-key rule (lowest forget probability whose held-out
probability drops by at most 5% against base + K). The full TOFU evaluation runs once per method,
at the chosen point (cached beside tofu_mini.py's as ``tuned_METHOD``). Trained runs, sweeps and
evaluations are cached under ``--dir``: an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tofu_mini import BUDGET, HOLDOUT, LABELS, ROOT, Evaluator, run_recipe, say, summary  # noqa: E402

LRS = [1e-4, 3e-4, 1e-3]
EPOCHS = 20  # forget01 is 40 rows: 5 steps per epoch at batch 8, 100 steps in all
LENGTHS = [0.05, 0.1, 0.25, 0.5, 1.0]  # of the run: steps 5, 10, 25, 50, 100
LAMS = [0.25, 0.5, 1.0, 2.0, 3.0]
ALPHAS = [0.0, 0.5, 1.0, 2.0]
# method -> the swept coefficient (STEP.PARAM, values) or None; whether its length is swept
TUNING = {
    "tv": (("unlearned.lam", LAMS), True),
    "perta_grad": (("unlearned.lam", LAMS), False),
    "perta_fisher": (("unlearned.lam", LAMS), False),
    "uipe_npo": (("unlearned.alpha", ALPHAS), True),
    "uipe_grad_ascent": (("unlearned.alpha", ALPHAS), True),
    **{m: (None, True) for m in ("npo", "grad_ascent", "grad_diff", "kl", "idk", "simnpo", "rmu", "surgery")},
}


def recipe_of(method: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / "recipes" / f"{method}.yaml").read_text())


def lengths(method: str) -> list[int]:
    """The optimizer steps kept as snapshots (the last is the run's length)."""
    if method == "surgery":
        total = recipe_of(method)["train_defaults"]["max_steps"]
    else:
        total = EPOCHS * 5
    return sorted({max(1, round(f * total)) for f in LENGTHS})


def sets_for(method: str, lr: float, knowledge: Path) -> list[str]:
    recipe = recipe_of(method)
    sets = [f"adapters.knowledge={knowledge}", f"steps.0.train.config.learning_rate={lr:g}"]
    if "retain" in recipe.get("data", {}):
        sets.append(f"data.retain.limit={HOLDOUT.start}")
    _coef, length = TUNING[method]
    if length:
        steps = lengths(method)
        sets.append(f"steps.0.train.snapshots=[{','.join(map(str, steps))}]")
        if method != "surgery":
            sets += [f"steps.0.train.config.epochs={EPOCHS}"]
    return sets


def tune(method: str, args, ev: Evaluator) -> dict:
    """Train one run per learning rate, read every point by the proxy, choose, evaluate the choice."""
    from lora_unlearn.core.adapter_io import save_adapter
    from lora_unlearn.training.select import RunArtifacts, choose, sweep

    folder = args.dir / "tuned" / method
    done = folder / "tuning.json"
    if done.is_file():
        result = json.loads(done.read_text())
    else:
        knowledge = args.dir / "knowledge" / "adapter"
        coef, length = TUNING[method]
        train_step = recipe_of(method)["steps"][0]["name"]
        points, runs = [], []
        for lr in LRS:
            run_dir = folder / f"lr{lr:g}"
            bench = run_recipe(method, run_dir, sets_for(method, lr, knowledge))
            runs.append({"lr": lr, **bench})
            run = RunArtifacts(run_dir)
            rows = dict(forget_rows=ev.splits["forget"], holdout_rows=ev.holdout, budget=BUDGET,
                        batch_size=args.batch_size)
            sweeps = ([sweep(ev.model, ev.tok, run, coef[0], coef[1], fixed={f"{train_step}.steps": n}, **rows)
                       for n in lengths(method)] if coef and length else
                      [sweep(ev.model, ev.tok, run, coef[0], coef[1], **rows)] if coef else
                      [sweep(ev.model, ev.tok, run, f"{train_step}.steps", lengths(method), **rows)])
            for got in sweeps:
                points += [{**p, "target": got["target"], "lr": lr} for p in got["points"]]
                say(method, f"lr {lr:g}", got["points"][0].get("fixed", ""),
                    " ".join(f"{p['value']:g}: P_f {p['forget_probability']:.3f} drop {p['utility_drop']:+.3f}"
                             for p in got["points"]))
        chosen, within = choose(points, BUDGET)
        settings = {**chosen.get("fixed", {}), chosen["target"]: chosen["value"]}
        adapter = RunArtifacts(folder / f"lr{chosen['lr']:g}").adapter_with(settings)
        save_adapter(adapter, folder / "selected", overwrite=True)
        result = {"method": method, "lrs": LRS, "lengths": lengths(method) if length else None,
                  "coefficient": coef, "runs": runs, "points": points, "trained_runs": len(LRS),
                  "proxy_points": len(points), "selected": {"lr": chosen["lr"], **settings},
                  "within_budget": within}
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(done)
    result["evaluation"] = summary(ev.evaluate(f"tuned_{method}", folder / "selected"))
    return result


# Scoped rows (issue: scoped forgetting): the method's unlearning delta at its selected length, applied at
# lambda_max only where its scope fires, against the same delta applied to every question.
SCOPED = {"tv": 3.0, "perta_grad": 3.0, "npo": 2.0}  # lambda_max: the strongest lam of the grid; NPO doubled


def scoped(method: str, args, ev: Evaluator, result: dict) -> dict:
    """Fit a scope on the forget questions (background: the preservation pool and holdout01; calibrated on
    the held-out retain rows at 2% false positives), evaluate K + scoped delta and K + lambda_max * delta."""
    from lora_unlearn.arithmetic import add, scale
    from lora_unlearn.core.adapter_io import load_adapter, save_adapter
    from lora_unlearn.core.scope import fit_scope
    from lora_unlearn.evaluate.scoped import evaluate_tofu_scoped
    from lora_unlearn.evaluate.tofu import forget_quality
    from lora_unlearn.training.select import RunArtifacts
    from lora_unlearn.training.sources import load_source

    folder = args.dir / "tuned" / method
    done = folder / "scoped.json"
    if done.is_file():
        return json.loads(done.read_text())
    selected = dict(result["selected"])
    run = RunArtifacts(folder / f"lr{selected.pop('lr'):g}")
    settings = {k: v for k, v in selected.items() if k.endswith(".steps")}
    if TUNING[method][0]:
        settings[TUNING[method][0][0]] = 1.0  # the delta at unit strength: the scope (or lambda_max) scales it
    delta = run.adapter_with(settings, output="unlearned")
    lam = SCOPED[method]
    hold = load_source("tofu-mini:holdout01")
    background = [r["question"] for r in load_source("preservation+facts")] + \
        [t for r in hold for t in (r["question"], r["answer"])]
    scope = fit_scope(ev.model, ev.tok, [r["question"] for r in ev.splits["forget"]], adapter=delta,
                      background_texts=background, calibration_texts=[r["question"] for r in ev.holdout],
                      fpr=0.02, lambda_max=lam)
    knowledge = load_adapter(args.dir / "knowledge" / "adapter")
    say(method, f"scoped at lambda_max {lam:g}: threshold {scope.threshold:.3f}")
    res = evaluate_tofu_scoped(ev.model, ev.tok, ev.splits, [(knowledge, 1.0), (delta, lam)], {1: scope},
                               reference_truth_ratios=ev.reference(), batch_size=args.batch_size)
    res["forget_quality"] = forget_quality(res["splits"]["forget"]["per_row"]["truth_ratio"], ev.reference())
    whole = folder / f"global{lam:g}"
    save_adapter(add(knowledge, scale(delta, lam)), whole, overwrite=True)
    out = {"lambda_max": lam, "threshold": scope.threshold, "scoped": summary(res),
           "global": summary(ev.evaluate(f"tuned_{method}_global{lam:g}", whole))}
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(done)
    return out


def table(results: dict) -> str:
    lines = ["| method | budget (runs x proxy points) | selected | forget quality | model utility "
             "| forget truth ratio |",
             "|---|---|---|---|---|---|"]
    for method, r in results.items():
        e = r["evaluation"]
        sel = ", ".join(f"{k}={v:g}" for k, v in r["selected"].items())
        flag = "" if r["within_budget"] else " (none within budget)"
        lines.append(f"| {LABELS[method]} | {r['trained_runs']} x {r['proxy_points']} | {sel}{flag} | "
                     f"{e['forget_quality']:.2e} | {e['model_utility']:.3f} | {e['forget_truth_ratio']:.3f} |")
        for kind in ("scoped", "global"):
            if r.get("scope"):
                e = r["scope"][kind]
                lines.append(f"| {LABELS[method]}, {'scope' if kind == 'scoped' else 'everywhere'} at "
                             f"{r['scope']['lambda_max']:g} | | | {e['forget_quality']:.2e} | "
                             f"{e['model_utility']:.3f} | {e['forget_truth_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(TUNING), choices=list(TUNING))
    ap.add_argument("--dir", type=Path, default=ROOT / "runs" / "tofu_mini")
    ap.add_argument("--retain-limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--results", type=Path, default=None, help="where tofu_tuned.{json,md} go (default --dir)")
    ap.add_argument("--report", action="store_true", help="only the methods already tuned (computes nothing new)")
    ap.add_argument("--scoped", action="store_true", help="also the scoped rows of tv, perta_grad, npo")
    args = ap.parse_args()
    args.dir = args.dir.resolve()
    if not (args.dir / "knowledge" / "adapter").is_dir() or not (args.dir / "retain_only" / "adapter").is_dir():
        raise SystemExit("run `benchmarks/tofu_mini.py prepare` first (trains K and R)")
    ev = Evaluator(args.dir / "eval", args.retain_limit, args.batch_size)
    results = {}
    for method in args.methods:
        if args.report and not (args.dir / "tuned" / method / "tuning.json").is_file():
            continue
        start = time.perf_counter()
        results[method] = tune(method, args, ev)
        if args.scoped and method in SCOPED:
            results[method]["scope"] = scoped(method, args, ev, results[method])
        say(method, f"done in {time.perf_counter() - start:.0f} s")
    out = args.results or args.dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "tofu_tuned.json").write_text(json.dumps(results, indent=1))
    (out / "tofu_tuned.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
