"""Forgetting that lasts: is it still there after merging and quantizing, and how fast does it come back?

    .venv/bin/python benchmarks/durability.py --methods tv npo        # TOFU-mini adapters (tofu_mini.py / tofu_tune.py)
    .venv/bin/python benchmarks/durability.py --demo                  # the shipped demo adapters (a smoke run)

For each unlearned model U (one adapter over the embedded base), against K (the model that holds the
knowledge) and R (the retain-only model, which never saw the forget set):

(a) unmerged over nf4: forget probability (TOFU's normalised answer probability, mean over the
    forget rows) and the forget truth ratio summary (TOFU rows with perturbed answers);
(b) merged: ``export_merged`` (W + dW in float32, the folder a user uploads), then loaded as a user
    would, in float32, nf4 and int8 (bitsandbytes); each with the same two numbers. "kept" is the
    share of the unmerged drop in forget probability (K's minus U's) that the quantized model keeps;
(c) a relearning attack: fine-tune U on half of the forget set (every other row within each author)
    and read the other half: the optimizer steps until its forget probability regains half of the
    gap between U and K, capped at ``--attack-steps`` (reported as "> cap"), over ``--seeds``. The same
    attack on R, to the same absolute level, is the reference: ``ratio`` = U's steps / R's steps
    (1.0: as hard to relearn as if never learned). One attack run keeps its adapter every
    ``--every`` steps (train-step snapshots), so a curve costs one run;
(d) a benign fine-tune of U on retain rows only (``--benign`` rows, the same steps): the forget
    probability after it.

Written after each model (``--out``/durability.json); rerun resumes (each model's entry is cached).
DurableUn's Q-INT4 (arXiv 2605.02196) compares the forget accuracy before and after INT4 weight
quantization; (b) reports the forget probability, not accuracy, at nf4 (4-bit NormalFloat, what
bitsandbytes gives), so it is the same experiment with another read-out, said beside the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def say(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def halves(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(attack, measured): every other row of each author (TOFU-mini keeps an author's rows together)."""
    authors: dict[int, list[dict]] = {}
    for i, row in enumerate(rows):
        authors.setdefault(row.get("author", i // 20), []).append(row)
    attack = [r for group in authors.values() for r in group[0::2]]
    measured = [r for group in authors.values() for r in group[1::2]]
    return attack, measured


def read(model, tok, rows: list[dict], batch_size: int) -> dict:
    """Forget probability and, where rows have perturbed answers, the forget truth ratio summary."""
    from lora_unlearn.core.inference import answer_nll
    from lora_unlearn.evaluate.tofu import truth_ratio, truth_ratio_summary

    out = {"forget_probability": statistics.fmean(torch.exp(-answer_nll(model, tok, rows, batch_size)).tolist())}
    if all(r.get("perturbed_answer") for r in rows):
        correct = answer_nll(model, tok, [{"question": r["question"],
                                           "answer": r.get("paraphrased_answer") or r["answer"]} for r in rows],
                             batch_size)
        width = max(len(r["perturbed_answer"]) for r in rows)
        pert = torch.full((len(rows), width), float("nan"), dtype=torch.float64)
        for j in range(width):
            idx = [i for i, r in enumerate(rows) if len(r["perturbed_answer"]) > j]
            nll = answer_nll(model, tok, [{"question": rows[i]["question"], "answer": rows[i]["perturbed_answer"][j]}
                                          for i in idx], batch_size)
            pert[idx, j] = nll.double()
        out["forget_truth_ratio"] = truth_ratio_summary(truth_ratio(pert, correct), "forget")
    return out


def steps_to(curve: list[tuple[int, float]], level: float) -> int | None:
    """The first step whose forget probability reaches ``level`` (None: not within the curve)."""
    return next((step for step, p in curve if p >= level), None)


def attack_curve(model, tok, info, stack, attack_rows, measured, args, seed: int) -> list[tuple[int, float]]:
    """Fine-tune over ``stack`` on ``attack_rows``; forget probability of ``measured`` at every snapshot."""
    from lora_unlearn.core.stack import attached
    from lora_unlearn.training.trainer import TrainConfig, train_adapter

    config = TrainConfig(r=8, lora_alpha=16, learning_rate=args.attack_lr, batch_size=4, epochs=1,
                         max_steps=args.attack_steps, lr_scheduler="constant", seed=seed, max_length=256)
    kept: dict[int, object] = {}
    train_adapter(model, tok, attack_rows, config, stack=stack, base_info=info, progress=False,
                  snapshots=(list(range(args.every, args.attack_steps + 1, args.every)), kept.__setitem__))
    curve = []
    for step in sorted(kept):
        with attached(model, [*stack, (kept[step], 1.0)]) as m:
            curve.append((step, read(m, tok, measured, args.batch_size)["forget_probability"]))
    return curve


def merged_reads(folder: Path, rows: list[dict], args) -> dict:
    """``export_merged`` of one adapter, loaded in float32, nf4 and int8."""
    from lora_unlearn.core.models import load_base
    from lora_unlearn.hub.export import export_merged

    out = {}
    with tempfile.TemporaryDirectory(prefix="durability-") as tmp:
        report = export_merged(folder, Path(tmp) / "merged")
        out["merge_max_abs_logit_diff"] = report.max_abs_logit_diff
        for quant in ("none", "nf4", "int8"):
            try:
                model, tok, _ = load_base(str(Path(tmp) / "merged"), quant, device="cpu")
            except Exception as e:  # noqa: BLE001 - a quantization this machine cannot load is reported
                out[quant] = {"error": f"{type(e).__name__}: {e}"}
                continue
            out[quant] = read(model, tok, rows, args.batch_size)
            del model
    return out


def measure(name: str, unlearned_dir: Path, ctx: dict, args) -> dict:
    from lora_unlearn.core.adapter_io import load_adapter
    from lora_unlearn.core.stack import attached

    model, tok, info = ctx["loaded"]
    unlearned = load_adapter(unlearned_dir)
    forget, attack_rows, measured = ctx["forget"], ctx["attack"], ctx["measured"]
    entry: dict = {"adapter": str(unlearned_dir)}
    with attached(model, [(unlearned, 1.0)]) as m:
        entry["unmerged"] = read(m, tok, forget, args.batch_size)
        u_measured = read(m, tok, measured, args.batch_size)["forget_probability"]
    say(name, "unmerged", entry["unmerged"])
    entry["merged"] = merged_reads(unlearned_dir, forget, args)
    k_p, u_p = ctx["K"]["forget_probability"], entry["unmerged"]["forget_probability"]
    for quant, r in entry["merged"].items():
        if isinstance(r, dict) and "forget_probability" in r and k_p > u_p:
            r["kept"] = (k_p - r["forget_probability"]) / (k_p - u_p)
    say(name, "merged", {q: r.get("forget_probability", r) if isinstance(r, dict) else r
                         for q, r in entry["merged"].items()})
    level = u_measured + 0.5 * (ctx["K_measured"] - u_measured)
    attacks = []
    for seed in args.seeds:
        curve = attack_curve(model, tok, info, [(unlearned, 1.0)], attack_rows, measured, args, seed)
        ref = ctx["R_curves"][seed]
        attacks.append({"seed": seed, "curve": curve, "steps": steps_to(curve, level),
                        "reference_steps": steps_to(ref, level)})
    entry["attack"] = {"level": level, "measured_unlearned": u_measured, "measured_knowledge": ctx["K_measured"],
                       "cap": args.attack_steps, "runs": attacks}
    ratios = [(a["steps"] or args.attack_steps + args.every) / (a["reference_steps"] or args.attack_steps + args.every)
              for a in attacks]
    entry["attack"]["ratio_mean"] = statistics.fmean(ratios)
    say(name, "attack steps", [a["steps"] for a in attacks], "reference", [a["reference_steps"] for a in attacks])
    benign = attack_curve(model, tok, info, [(unlearned, 1.0)], ctx["benign"], forget, args, args.seeds[0])
    entry["benign"] = {"rows": len(ctx["benign"]), "curve": benign}
    return entry


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["tv", "perta_grad", "npo", "grad_ascent", "simnpo", "rmu"])
    ap.add_argument("--dir", type=Path, default=ROOT / "runs" / "tofu_mini")
    ap.add_argument("--demo", action="store_true", help="the shipped adapters/ (K, K - F) on the demo's facts")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--attack-steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=5, help="read the attack's curve every N steps")
    ap.add_argument("--attack-lr", type=float, default=1e-3)
    ap.add_argument("--benign", type=int, default=40, help="retain rows of the benign fine-tune")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="where durability.json goes (default --dir)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.attack_steps < args.every or args.every < 1:
        sys.exit("--every must be >= 1 and at most --attack-steps")

    from lora_unlearn.arithmetic import add
    from lora_unlearn.core.adapter_io import load_adapter, save_adapter
    from lora_unlearn.core.models import load_base
    from lora_unlearn.core.stack import attached
    from lora_unlearn.training.sources import load_source

    loaded = load_base("smollm2-135m", "nf4")
    model, tok, _ = loaded
    work = Path(tempfile.mkdtemp(prefix="durability-adapters-"))
    if args.demo:
        raw = [json.loads(line) for line in (ROOT / "lora_unlearn/resources/demo_facts.jsonl").read_text().splitlines()
               if line.strip()]
        facts = [{"question": r["question"], "answer": r["answer"]} for r in raw]
        forget = [f for f, r in zip(facts, raw) if r.get("forget")]
        knowledge = load_adapter(ROOT / "adapters" / "knowledge")
        save_adapter(add(knowledge, load_adapter(ROOT / "adapters" / "forget_negated")), work / "K-F")
        targets = {"K - F (demo)": work / "K-F"}
        reference_stack: list = []  # the base never saw the invented facts: it is the demo's retain-only model
        k_stack = [(knowledge, 1.0)]
        retain = [r for r in facts if r not in forget]
        out_dir = args.out or ROOT / "runs" / "durability_demo"
    else:
        if not (args.dir / "knowledge" / "adapter").is_dir() or not (args.dir / "retain_only" / "adapter").is_dir():
            sys.exit(f"no K and R under {args.dir}: run `benchmarks/tofu_mini.py prepare` first")
        forget = load_source("tofu-mini:forget01")
        k_stack = [(load_adapter(args.dir / "knowledge" / "adapter"), 1.0)]
        reference_stack = [(load_adapter(args.dir / "retain_only" / "adapter"), 1.0)]
        retain = load_source("tofu-mini:retain")[:360]
        targets = {}
        for m in args.methods:
            for sub in ("tuned/{m}/selected", "methods/{m}/selected", "methods/{m}/adapter"):
                if (args.dir / sub.format(m=m)).is_dir():
                    targets[m] = args.dir / sub.format(m=m)
                    break
            else:
                say(m, "has no adapter under", args.dir, "(skipped)")
        out_dir = args.out or args.dir
    attack_rows, measured = halves(forget)
    if not attack_rows or not measured or set(map(id, attack_rows)) & set(map(id, measured)):
        sys.exit("the forget set must split into two non-empty, disjoint halves")
    benign = retain[:: max(1, len(retain) // args.benign)][: args.benign]
    with attached(model, k_stack) as m:
        k_read = read(m, tok, forget, args.batch_size)
        k_measured = read(m, tok, measured, args.batch_size)["forget_probability"]
    say("K", k_read)
    say("attacking the retain-only reference")
    ctx = {"loaded": loaded, "forget": forget, "attack": attack_rows, "measured": measured, "benign": benign,
           "K": k_read, "K_measured": k_measured,
           "R_curves": {s: attack_curve(model, tok, loaded[2], reference_stack, attack_rows, measured, args, s)
                        for s in args.seeds}}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "durability.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.update({"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "knowledge": k_read, "reference_curves": ctx["R_curves"]})
    for name, folder in targets.items():
        if name in results.get("models", {}):
            continue
        results.setdefault("models", {})[name] = measure(name, folder, ctx, args)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(path)
    print(json.dumps({n: {"unmerged": e["unmerged"], "nf4_kept": e["merged"].get("nf4", {}).get("kept"),
                          "attack_ratio": e["attack"]["ratio_mean"]} for n, e in results.get("models", {}).items()},
                     indent=1))


if __name__ == "__main__":
    main()
