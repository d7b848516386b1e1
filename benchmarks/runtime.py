"""Wall time and peak memory of every unlearning recipe on TOFU-mini forget01, as ratios to NPO.

Each method runs as its own process (``lora-unlearn run recipes/METHOD.yaml``) on the embedded
model in nf4 over the same knowledge adapter, so its peak RSS is its own (``os.wait4``). The
arithmetic steps of each recipe (negate, add, extrapolate, PerTA rescaling) are also timed on
their own from the run's ``run.json``: that is what an arithmetic method costs once its forget
adapter and importance maps exist.

    .venv/bin/python benchmarks/runtime.py --knowledge runs/tofu_mini/knowledge/adapter
    .venv/bin/python benchmarks/runtime.py --quick       # trains a small knowledge adapter first

Without ``--knowledge`` a knowledge adapter is trained with recipes/knowledge.yaml shortened by
``--quick`` (1 epoch on 80 rows): costs do not depend on how well K knows the data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["npo", "grad_ascent", "grad_diff", "kl", "idk", "surgery", "tv", "perta_grad", "perta_fisher",
           "perta_dense", "uipe_grad_ascent", "uipe_npo"]
ARITHMETIC = {"negate", "scale", "extrapolate", "add", "compress", "perta_b", "perta_dense"}


def run(recipe: str, out: Path, sets: list[str]) -> dict:
    cmd = [sys.executable, "-m", "lora_unlearn.cli", "run", str(ROOT / "recipes" / f"{recipe}.yaml"),
           "--out", str(out)] + [x for s in sets for x in ("--set", s)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{recipe} failed:\n{proc.stderr.read()[-2000:]}")
    report = json.loads((out / "run.json").read_text())
    steps = {s["name"]: s["seconds"] for s in report["steps"]}
    recipe_yaml = (out / "recipe.yaml").read_text()
    import yaml

    spec = yaml.safe_load(recipe_yaml)
    arith = sum(steps[s["name"]] for s in spec["steps"] if s.get("op") and s["op"]["name"] in ARITHMETIC)
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "arithmetic_seconds": round(arith, 3), "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--knowledge", type=Path, help="knowledge adapter (default: train one, see --quick)")
    ap.add_argument("--quick", action="store_true", help="train the knowledge adapter on 80 rows for 1 epoch")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--retain-limit", type=int, help="limit the retain rows (PerTA importance reads all of them)")
    ap.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "runtime.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="lora_unlearn-runtime-") as tmp:
        tmp = Path(tmp)
        knowledge = args.knowledge
        if knowledge is None:
            sets = ["train_defaults.epochs=1", "data.all.limit=80"] if args.quick else []
            print("training the knowledge adapter", "(quick)" if args.quick else "", flush=True)
            run("knowledge", tmp / "knowledge", sets)
            knowledge = tmp / "knowledge" / "adapter"
        results = {}
        for method in args.methods:
            sets = [f"adapters.knowledge={knowledge}"]
            if args.retain_limit and method not in ("grad_ascent", "uipe_grad_ascent", "tv"):
                sets.append(f"data.retain.limit={args.retain_limit}")
            print(f"running {method}", flush=True)
            results[method] = run(method, tmp / method, sets)

    ref = results.get("npo")
    print(f"\n{'method':<18}{'wall s':>9}{'x NPO':>8}{'peak MiB':>10}{'x NPO':>8}{'arithmetic s':>14}")
    for method, r in results.items():
        t = r["seconds"] / ref["seconds"] if ref else float("nan")
        m = r["peak_rss_mib"] / ref["peak_rss_mib"] if ref else float("nan")
        print(f"{method:<18}{r['seconds']:>9.1f}{t:>8.2f}{r['peak_rss_mib']:>10.0f}{m:>8.2f}{r['arithmetic_seconds']:>14.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"knowledge": str(args.knowledge or "trained in run"), "quick": args.quick,
                                     "retain_limit": args.retain_limit, "cpu_count": os.cpu_count(),
                                     "results": results}, indent=2))


if __name__ == "__main__":
    main()
