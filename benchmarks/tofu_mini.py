"""TOFU-mini: every unlearning method on the same model and data, measured as TOFU defines it.

    .venv/bin/python benchmarks/tofu_mini.py prepare     # K (knowledge) and R (retain-only) models, ~35 min
    .venv/bin/python benchmarks/tofu_mini.py run         # every method, selection sweeps, table + plots
    .venv/bin/python benchmarks/tofu_mini.py report      # table + plots again from the cache

The model that holds the knowledge is the embedded SmolLM2-135M-Instruct (nf4) plus adapter K
trained on TOFU full[0:400] (20 authors) + forget01 (2 authors); the retain-only model is the same
recipe on full[0:400] alone (recipes/knowledge.yaml, recipes/retain_only.yaml). Every method of
recipes/ runs on base + K (each in its own process: wall time and peak RSS are its own) with
forget01 as the forget set. Methods that use retain data see the first 18 retain authors
(rows 0-359); the last 2 (rows 360-399) are held out for choosing lam/alpha (lora_unlearn.training.select),
so the choice never sees the evaluation's answer key. Evaluation (lora_unlearn.evaluate.tofu):
forget01, 100 retain rows spread over rows 0-359 (the held-out rows never count in utility;
--retain-limit), real_authors,
world_facts; forget quality is the KS-test p-value against R's forget truth ratios.

Everything is cached under --dir (default runs/tofu_mini): a step whose output exists is
skipped, so an interrupted benchmark picks up where it stopped. Results go to
--results (default runs/tofu_mini/results; the committed ones: --results benchmarks/results):
tofu_mini.{json,md,png} and tofu_mini_sweeps.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "runs" / "tofu_mini" / "results"  # --results
BUDGET = 0.05
HOLDOUT = slice(360, 400)  # retain rows held out for selection (authors 19-20 of full[0:400])
METHODS = ["tv", "perta_grad", "perta_fisher", "perta_dense", "npo", "uipe_npo", "grad_ascent",
           "uipe_grad_ascent", "grad_diff", "kl", "idk", "surgery", "simnpo", "rmu"]
SWEEPS = {  # method -> (op step.param, values); everything else has no coefficient to choose
    "tv": ("unlearned.lam", [0.25, 0.5, 1.0, 1.5, 2.0, 3.0]),
    "perta_grad": ("unlearned.lam", [0.25, 0.5, 1.0, 1.5, 2.0, 3.0]),
    "perta_fisher": ("unlearned.lam", [0.25, 0.5, 1.0, 1.5, 2.0, 3.0]),
    "perta_dense": ("unlearned.lam", [0.25, 0.5, 1.0, 1.5, 2.0, 3.0]),
    "uipe_npo": ("unlearned.alpha", [0.0, 0.25, 0.5, 1.0, 2.0]),
    "uipe_grad_ascent": ("unlearned.alpha", [0.0, 0.25, 0.5, 1.0, 2.0]),
}
LABELS = {"knowledge": "no unlearning (base + K)", "retain_only": "retain-only (target)", "tv": "TV",
          "perta_grad": "PerTA-grad (B space)", "perta_fisher": "PerTA-fisher (B space)",
          "perta_dense": "PerTA-grad (dense)", "npo": "NPO", "uipe_npo": "UIPE on NPO", "grad_ascent": "GradAscent",
          "uipe_grad_ascent": "UIPE on GradAscent", "grad_diff": "GradDiff", "kl": "KL", "idk": "IdkNLL",
          "surgery": "LLM Surgery", "simnpo": "SimNPO", "rmu": "RMU"}


def say(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def run_recipe(recipe: str, out: Path, sets: list[str]) -> dict:
    """``lora-unlearn run`` in its own process; wall time and peak RSS of that process."""
    if (out / "run.json").is_file():
        if (out / "bench.json").is_file():
            return json.loads((out / "bench.json").read_text())
        run = json.loads((out / "run.json").read_text())  # made outside this script: its own figures
        return {"seconds": round(sum(s["seconds"] for s in run["steps"]), 1), "peak_rss_mib": run["peak_rss_mib"]}
    cmd = [sys.executable, "-m", "lora_unlearn.cli", "run", str(ROOT / "recipes" / f"{recipe}.yaml"),
           "--out", str(out), "--overwrite"] + [x for s in sets for x in ("--set", s)]
    say("running", recipe, " ".join(sets))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{recipe} failed:\n{proc.stderr.read()[-3000:]}")
    bench = {"seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}
    (out / "bench.json").write_text(json.dumps(bench))
    return bench


class Evaluator:
    """One base model in memory; each variant attached (unmerged, exact), evaluated, cached."""

    def __init__(self, cache: Path, retain_limit: int, batch_size: int, limit: int | None = None):
        from lora_unlearn.core.models import load_base
        from lora_unlearn.evaluate.tofu import MAX_NEW_TOKENS, tofu_mini_splits
        from lora_unlearn.training.sources import load_source

        self.cache = cache
        self.cache.mkdir(parents=True, exist_ok=True)
        self.batch_size = batch_size
        self.model, self.tok, _ = load_base()
        self.splits = tofu_mini_splits(retain_limit=retain_limit, retain_rows=slice(0, HOLDOUT.start))
        for name in ("real_authors", "world_facts"):  # first rows: these splits are not ordered by anything
            self.splits[name] = self.splits[name][:limit] if limit else self.splits[name]
        self.holdout = load_source("tofu-mini:retain")[HOLDOUT]
        settings = {"retain_limit": retain_limit, "limit": limit, "retain_rows": [0, HOLDOUT.start],
                    "max_new_tokens": MAX_NEW_TOKENS, "rows": {name: len(rows) for name, rows in self.splits.items()}}
        saved = cache / "settings.json"
        if saved.is_file() and json.loads(saved.read_text()) != settings:
            raise SystemExit(f"{cache} holds evaluations made with {saved.read_text()}, not {settings}: "
                             "pass the same --retain-limit/--limit, or another --dir (older caches: 64 tokens, "
                             "held-out rows in utility)")
        saved.write_text(json.dumps(settings))

    def reference(self) -> list[float] | None:
        path = self.cache / "retain_only.json"
        if path.is_file():
            return json.loads(path.read_text())["splits"]["forget"]["per_row"]["truth_ratio"]
        return None

    def evaluate(self, key: str, adapter_dir: Path | None) -> dict:
        from lora_unlearn.core.adapter_io import load_adapter
        from lora_unlearn.core.stack import attached
        from lora_unlearn.evaluate.tofu import evaluate_tofu, forget_quality

        path = self.cache / f"{key}.json"
        if path.is_file():
            result = json.loads(path.read_text())
        else:
            say("evaluating", key)
            stack = [(load_adapter(adapter_dir), 1.0)] if adapter_dir else []
            with attached(self.model, stack) as m:
                result = evaluate_tofu(m, self.tok, self.splits, batch_size=self.batch_size)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(result))
            tmp.replace(path)
        ref = self.reference()
        if ref is not None:  # recomputed on every read: R's cache may be newer than this one
            result["forget_quality"] = forget_quality(result["splits"]["forget"]["per_row"]["truth_ratio"], ref)
        return result


def summary(result: dict) -> dict:
    s = result["splits"]
    return {"forget_quality": result.get("forget_quality"), "model_utility": result["model_utility"],
            "forget_rouge_l": s["forget"]["rouge_l"], "forget_truth_ratio": s["forget"]["truth_ratio"],
            "forget_probability": s["forget"]["probability"],
            "extraction_strength": s["forget"]["extraction_strength"], "retain_rouge_l": s["retain"]["rouge_l"]}


# ---- prepare ----------------------------------------------------------------------------------

def prepare(args) -> dict:
    out = {}
    for name in ("knowledge", "retain_only"):
        out[name] = run_recipe(name, args.dir / name, args.prepare_set)
    ev = Evaluator(args.dir / "eval", args.retain_limit, args.batch_size, args.limit)
    for name in ("retain_only", "knowledge"):
        out[name].update(summary(ev.evaluate(name, args.dir / name / "adapter")))
    base = summary(ev.evaluate("base", None))
    print(f"\n{'model':<28}{'forget ROUGE-L':>16}{'retain ROUGE-L':>16}{'forget TR':>11}")
    for name, r in (("base (no fine-tuning)", base), ("knowledge (K)", out["knowledge"]),
                    ("retain-only (R)", out["retain_only"])):
        print(f"{name:<28}{r['forget_rouge_l']:>16.3f}{r['retain_rouge_l']:>16.3f}{r['forget_truth_ratio']:>11.3f}")
    out["base"] = base
    return out


# ---- run --------------------------------------------------------------------------------------

def run_methods(args) -> None:
    from lora_unlearn.training.select import select_run

    knowledge = args.dir / "knowledge" / "adapter"
    if not (args.dir / "retain_only" / "adapter").is_dir() or not knowledge.is_dir():
        raise SystemExit("run `benchmarks/tofu_mini.py prepare` first (trains K and R)")
    ev = Evaluator(args.dir / "eval", args.retain_limit, args.batch_size, args.limit)
    loaded = (ev.model, ev.tok, None)
    for method in args.methods:
        folder = args.dir / "methods" / method
        sets = [f"adapters.knowledge={knowledge}"] + list(args.method_set)
        if "retain:" in (ROOT / "recipes" / f"{method}.yaml").read_text():
            sets.append(f"data.retain.limit={HOLDOUT.start}")
        if method == "surgery" and args.surgery_steps:
            sets.append(f"train_defaults.max_steps={args.surgery_steps}")
        bench = run_recipe(method, folder, sets)
        if method in SWEEPS:
            target, values = SWEEPS[method]
            if not (folder / "selection.json").is_file():
                say("selecting", method, target, values)
                select_run(folder, target, values, forget_rows=ev.splits["forget"], holdout_rows=ev.holdout,
                           budget=BUDGET, batch_size=args.batch_size, loaded=loaded, overwrite=True)
            selection = json.loads((folder / "selection.json").read_text())
            if args.sweep_eval:
                from lora_unlearn.training.select import RunArtifacts

                artifacts = RunArtifacts(folder)
                step, param = target.rsplit(".", 1)
                for value in values:
                    key = f"{method}@{value:g}"
                    if not (ev.cache / f"{key}.json").is_file():
                        tmp = args.dir / "sweep_adapters" / key
                        from lora_unlearn.core.adapter_io import save_adapter

                        save_adapter(artifacts.adapter_at(step, param, value), tmp, overwrite=True)
                        ev.evaluate(key, tmp)
            ev.evaluate(method, folder / "selected")
            bench["selected"] = selection["selected"]
        else:
            ev.evaluate(method, folder / "adapter")
        (folder / "bench.json").write_text(json.dumps(bench))
    report(args)


# ---- report -----------------------------------------------------------------------------------

def collect(args) -> dict:
    ev_dir = args.dir / "eval"
    ref = json.loads((ev_dir / "retain_only.json").read_text())["splits"]["forget"]["per_row"]["truth_ratio"]
    from lora_unlearn.evaluate.tofu import forget_quality

    def load(key):
        r = json.loads((ev_dir / f"{key}.json").read_text())
        r["forget_quality"] = forget_quality(r["splits"]["forget"]["per_row"]["truth_ratio"], ref)
        return summary(r)

    rows = {}
    for name in ["knowledge", "retain_only"] + METHODS:
        if not (ev_dir / f"{name}.json").is_file():
            continue
        folder = args.dir / (name if name in ("knowledge", "retain_only") else f"methods/{name}")
        bench = {}
        if (folder / "bench.json").is_file():
            bench = json.loads((folder / "bench.json").read_text())
        elif (folder / "run.json").is_file():  # K and R trained outside this script: their own figures
            run = json.loads((folder / "run.json").read_text())
            bench = {"seconds": round(sum(s["seconds"] for s in run["steps"]), 1), "peak_rss_mib": run["peak_rss_mib"]}
        rows[name] = {"label": LABELS[name], **load(name), **bench}
        if name in SWEEPS and (folder / "selection.json").is_file():
            sel = json.loads((folder / "selection.json").read_text())
            rows[name]["selection"] = sel
            _target, values = SWEEPS[name]
            curve = [{"value": v, **load(f"{name}@{v:g}")} for v in values if (ev_dir / f"{name}@{v:g}.json").is_file()]
            if curve:
                rows[name]["curve"] = curve
                floor = (1 - BUDGET) * rows["knowledge"]["model_utility"]
                ok = [c for c in curve if c["model_utility"] >= floor]
                best = max(ok, key=lambda c: c["forget_quality"]) if ok else None
                rows[name]["hindsight"] = best and {"value": best["value"], "forget_quality": best["forget_quality"],
                                                     "model_utility": best["model_utility"]}
    return rows


def table(rows: dict) -> str:
    head = ("| model | sel. | forget quality | model utility | forget ROUGE-L | forget truth ratio | "
            "extraction strength | wall s | peak RSS GiB |")
    lines = [head, "|" + "---|" * 9]
    for name, r in rows.items():
        sel = r.get("selected")
        sel = f"{SWEEPS[name][0].split('.')[1]}={sel:g}" if sel is not None else ""
        lines.append(f"| {r['label']} | {sel} | {r['forget_quality']:.2e} | {r['model_utility']:.3f} | "
                     f"{r['forget_rouge_l']:.3f} | {r['forget_truth_ratio']:.3f} | {r['extraction_strength']:.3f} | "
                     f"{r.get('seconds', float('nan')):.0f} | {r.get('peak_rss_mib', float('nan')) / 1024:.1f} |")
    return "\n".join(lines)


def selection_table(rows: dict) -> str:
    lines = ["| method | swept | selected (no answer key) | FQ / MU at selected | best in hindsight | FQ / MU there |",
             "|---|---|---|---|---|---|"]
    for r in rows.values():
        if "selection" not in r:
            continue
        sel, best = r["selection"], r.get("hindsight")
        at = next((c for c in r.get("curve", []) if c["value"] == sel["selected"]), None)
        fq_mu = f"{at['forget_quality']:.2e} / {at['model_utility']:.3f}" if at else ""
        flag = "" if sel["within_budget"] else " (none within budget)"
        lines.append(f"| {r['label']} | {sel['target']} {[p['value'] for p in sel['points']]} | "
                     f"{sel['selected']:g}{flag} | {fq_mu} | {best['value']:g} | "
                     f"{best['forget_quality']:.2e} / {best['model_utility']:.3f} |" if best else
                     f"| {r['label']} | {sel['target']} {[p['value'] for p in sel['points']]} | {sel['selected']:g}{flag} "
                     f"| {fq_mu} | {'none within 5%' if r.get('curve') else 'not evaluated (--sweep-eval)'} | |")
    return "\n".join(lines)


def plots(rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    labels: dict[tuple[float, float], list[str]] = {}  # methods that land on the same point share one label
    for name, r in rows.items():
        marker = {"knowledge": "s", "retain_only": "*"}.get(name, "o")
        point = (r["model_utility"], max(r["forget_quality"], 1e-30))
        ax.scatter(*point, marker=marker, s=70 if marker == "*" else 40)
        key = (round(point[0], 3), float(f"{point[1]:.2e}"))
        labels.setdefault(key, [point, []])[1].append(r["label"])
    for point, names in labels.values():
        ax.annotate("\n".join(names), point, fontsize=7, xytext=(4, 3), textcoords="offset points",
                    ha="right" if point[0] > 0.98 * ax.get_xlim()[1] else "left")
    if "knowledge" in rows:
        ax.axvline((1 - BUDGET) * rows["knowledge"]["model_utility"], ls=":", c="grey", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("model utility")
    ax.set_ylabel("forget quality (KS p-value, log)")
    ax.set_title("TOFU-mini (SmolLM2-135M nf4, forget01)")
    fig.tight_layout()
    fig.savefig(RESULTS / "tofu_mini.png", dpi=130)

    curves = {n: r for n, r in rows.items() if r.get("curve")}
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for name, r in curves.items():
            xs = [c["value"] for c in r["curve"]]
            line, = axes[0].plot(xs, [max(c["forget_quality"], 1e-30) for c in r["curve"]], marker="o", label=r["label"])
            axes[1].plot(xs, [c["model_utility"] for c in r["curve"]], marker="o", color=line.get_color())
            axes[0].axvline(r["selection"]["selected"], color=line.get_color(), ls=":", lw=1)
        axes[0].set_yscale("log")
        axes[0].set_ylabel("forget quality")
        axes[1].set_ylabel("model utility")
        if "knowledge" in rows:
            axes[1].axhline((1 - BUDGET) * rows["knowledge"]["model_utility"], ls=":", c="grey", lw=1)
        for ax in axes:
            ax.set_xlabel("lam (TV, PerTA) / alpha (UIPE)")
        axes[0].legend(fontsize=7)
        fig.suptitle("coefficient sweeps; dotted: selected value (held-out retain rule)")
        fig.tight_layout()
        fig.savefig(RESULTS / "tofu_mini_sweeps.png", dpi=130)


def report(args) -> None:
    rows = collect(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tofu_mini.json").write_text(json.dumps(rows, indent=2, default=lambda x: None))
    md = table(rows) + "\n\n" + selection_table(rows) + "\n"
    (RESULTS / "tofu_mini.md").write_text(md)
    plots(rows)
    print(md)
    if "knowledge" in rows:
        floor = (1 - BUDGET) * rows["knowledge"]["model_utility"]
        ok = {n: r for n, r in rows.items() if n not in ("knowledge", "retain_only") and r["model_utility"] >= floor}
        if ok:
            best = max(ok, key=lambda n: ok[n]["forget_quality"])
            print(f"best forget quality with model utility >= {floor:.3f}: {rows[best]['label']} "
                  f"({rows[best]['forget_quality']:.2e})")
        order = sorted((n for n in ("tv", "perta_grad", "perta_fisher", "npo") if n in rows),
                       key=lambda n: -rows[n]["forget_quality"])
        print("forget-quality order:", " > ".join(rows[n]["label"] for n in order))


def main() -> None:
    global RESULTS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["prepare", "run", "report"])
    ap.add_argument("--dir", type=Path, default=ROOT / "runs" / "tofu_mini")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--retain-limit", type=int, default=100,
                    help="evaluate this many retain rows, spread evenly over rows 0-359 (the held-out 360-399 never count)")
    ap.add_argument("--limit", type=int, help="evaluate the first N rows of real_authors and world_facts (default all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--sweep-eval", action="store_true", help="full TOFU metrics at every sweep value (hindsight)")
    ap.add_argument("--surgery-steps", type=int, help="LLM Surgery steps (official: 120)")
    ap.add_argument("--prepare-set", action="append", default=[], help="--set for the K and R recipes")
    ap.add_argument("--method-set", action="append", default=[], help="--set for every method recipe")
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="where the tables and plots go (the committed ones: benchmarks/results)")
    args = ap.parse_args()
    args.dir = args.dir.resolve()
    RESULTS = args.results.resolve()
    if args.command == "prepare":
        prepare(args)
    elif args.command == "run":
        run_methods(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
