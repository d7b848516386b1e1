"""The scope detector on the embedded model: recall, false positives and cost (issue 17).

Protocol (fit and test apart):
- fit: the forget01 questions of the even rows (20 of 40: both authors, every kind of question);
- calibrate: TOFU retain rows 360-399 only (the rows held out for choosing lambda/alpha; never the
  false-positive or model-utility rows), threshold = their (1 - 0.02) score quantile;
- recall on: the 20 held-out forget questions (odd rows), every row's ``paraphrased_question`` (TOFU's),
  the project's own rephrasings of all 40 questions, indirect questions about the two authors (their
  books, their parents, their prizes; the author not named) and forget questions hidden in a longer
  chat (``resources/tofu_mini/forget01_rephrased.jsonl``), each split by whether the row was fitted;
- false positives on: retain rows 0-359 (18 other fictitious authors), real_authors (100),
  world_facts (117);
- design choices (layer L, top-k, questions or questions + answers in the bank) by a development
  rule that reads none of the sets above: fit on rows 0 mod 4, recall on the questions and answers
  of rows 2 mod 4, false positives on holdout01 (two other fictitious authors), background the
  preservation pool; highest recall, then fewest holdout01 false positives, then the cheapest layer;
- the background bank of the reported detector is the prompts of the vendored preservation pool and
  its factual questions (``preservation+facts``, checked against every evaluation set) plus
  holdout01's questions and answers (rows with "pool only" are given beside it);
- latency: the real server (uvicorn on loopback, the embedded model in nf4, adapters/forget_negated
  standing in for a forget adapter: the detector does not read the adapter, only its sha256 binds
  it), sequential greedy requests, each prompt sent with "auto" and with the strength "auto" gave
  it (so both generate the same tokens), in alternating order; the ratio is within one run, with a
  bootstrap interval over the request pairs, and beside it the time spent inside the scope pass
  (``runtime.resolve``, timed in the server) as a share of the requests without scope.

    .venv/bin/python benchmarks/scope.py --json benchmarks/results/scope.json    # ~15 min on 2 busy cores

Intervals are Wilson 95% intervals of each proportion.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOFU = ROOT / "lora_unlearn" / "resources" / "tofu_mini"
LAYERS = [2, 4, 8, 12]
FPR = 0.02


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def chat_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)  # what the server's scope reads of a chat


def load_sets() -> dict[str, list[dict]]:
    forget, retain = read(TOFU / "forget01.jsonl"), read(TOFU / "retain.jsonl")
    extra = read(TOFU / "forget01_rephrased.jsonl")
    from lora_unlearn.training.sources import load_source

    pool = load_source("preservation+facts")  # the scope's default background: the pool's prompts
    hold = read(TOFU / "holdout01.jsonl")
    sets = {
        "forget_q": [{"text": r["question"], "row": i} for i, r in enumerate(forget)],
        "forget_a": [{"text": r["answer"], "row": i} for i, r in enumerate(forget)],
        "paraphrased": [{"text": r["paraphrased_question"], "row": i} for i, r in enumerate(forget)],
        "rephrased": [{"text": r["question"], "row": r["row"]} for r in extra if r["kind"] == "rephrased"],
        "indirect": [{"text": r["question"], "about": r["about"], "author": r["author"]}
                     for r in extra if r["kind"] == "indirect"],
        "chat": [{"text": chat_text(r["messages"]), "row": r["row"]} for r in extra if r["kind"] == "chat"],
        "calibration": [{"text": r["question"], "row": i} for i, r in enumerate(retain) if 360 <= i < 400],
        "retain": [{"text": r["question"], "row": i} for i, r in enumerate(retain) if i < 360],
        "real_authors": [{"text": r["question"]} for r in read(TOFU / "real_authors.jsonl")],
        "world_facts": [{"text": r["question"]} for r in read(TOFU / "world_facts.jsonl")],
        "pool": [{"text": r["question"]} for r in pool],
        "holdout_q": [{"text": r["question"]} for r in hold],
        "holdout_a": [{"text": r["answer"]} for r in hold],
    }
    return sets


def wilson(k: int, n: int) -> list[float]:
    if n == 0:
        return [0.0, 1.0]
    z, p = 1.96, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def rate(flags: list[bool]) -> dict:
    k, n = sum(flags), len(flags)
    return {"rate": round(k / n, 4) if n else None, "k": k, "n": n, "ci95": wilson(k, n)}


def states(model, tok, sets) -> dict[str, dict[int, list[torch.Tensor]]]:
    from lora_unlearn.core.inference import dequantized
    from lora_unlearn.core.scope import text_states

    out = {}
    with dequantized(model):  # the same numbers as the 4-bit forward, dequantized once
        for name, items in sets.items():
            t = time.perf_counter()
            out[name] = text_states(model, tok, [x["text"] for x in items], LAYERS)
            print(f"  states {name}: {len(items)} texts, {time.perf_counter() - t:.1f} s", flush=True)
    return out


def make_scope(S, layer: int, top_k: int, fit_rows: list[int], answers: bool, background: list[str]):
    from lora_unlearn.core.scope import Scope
    from lora_unlearn.core.scope import bank as token_bank

    d = S["forget_q"][layer][0].shape[1]
    bank = [S["forget_q"][layer][i] for i in fit_rows] + ([S["forget_a"][layer][i] for i in fit_rows] if answers else [])
    bg = [h for name in background for h in S[name][layer]]
    scope = Scope(token_bank(bank, d), token_bank(bg, d), layer, top_k, 0.0, 1.0)
    cal = torch.tensor(scope.scores(S["calibration"][layer]))
    scope.threshold = float(torch.quantile(cal, 1 - FPR).clamp(0, 1))
    return scope


def flags(scope, S, name) -> list[bool]:
    return [s > scope.threshold for s in scope.scores(S[name][scope.layer])]


def dev_grid(S) -> tuple[list[dict], dict]:
    fit, pos = list(range(0, 40, 4)), list(range(2, 40, 4))
    grid = []
    for layer in LAYERS:
        for top_k in (1, 2, 3):
            for answers in (False, True):
                scope = make_scope(S, layer, top_k, fit, answers, ["pool"])
                q = flags(scope, S, "forget_q")
                a = flags(scope, S, "forget_a")
                recall = rate([q[i] for i in pos] + [a[i] for i in pos])
                false = rate(flags(scope, S, "holdout_q") + flags(scope, S, "holdout_a"))
                grid.append({"layer": layer, "top_k": top_k, "answers_in_bank": answers, "dev_recall": recall,
                             "holdout01_fpr": false, "threshold": round(scope.threshold, 4)})
    # highest recall, fewest false positives, the cheapest layer, the larger k, questions only
    best = max(grid, key=lambda g: (g["dev_recall"]["rate"], -g["holdout01_fpr"]["rate"], -g["layer"], g["top_k"],
                                    not g["answers_in_bank"]))
    return grid, {k: best[k] for k in ("layer", "top_k", "answers_in_bank")}


def test(S, sets, layer: int, top_k: int, answers: bool, background: list[str]) -> dict:
    fit, held = list(range(0, 40, 2)), set(range(1, 40, 2))
    scope = make_scope(S, layer, top_k, fit, answers, background)
    out: dict = {"layer": layer, "top_k": top_k, "answers_in_bank": answers, "background": background,
                 "threshold": round(scope.threshold, 4), "bank": {"forget": scope.forget.shape[0],
                                                                  "background": scope.background.shape[0]}}
    recall, misses = {}, []
    for name in ("forget_q", "paraphrased", "rephrased", "chat"):
        f = flags(scope, S, name)
        rows = [x["row"] for x in sets[name]]
        if name == "forget_q":
            recall["held_out_questions"] = rate([f[i] for i, r in enumerate(rows) if r in held])
        else:
            recall[name] = rate(f)
            recall[f"{name}_held_out_rows"] = rate([f[i] for i, r in enumerate(rows) if r in held])
            recall[f"{name}_fitted_rows"] = rate([f[i] for i, r in enumerate(rows) if r not in held])
        misses += [sets[name][i]["text"] for i, r in enumerate(rows) if not f[i] and (name != "forget_q" or r in held)]
    f = flags(scope, S, "indirect")
    recall["indirect"] = rate(f)
    for about in ("books", "parents", "other"):
        recall[f"indirect_{about}"] = rate([f[i] for i, x in enumerate(sets["indirect"]) if x["about"] == about])
    misses += [x["text"] for i, x in enumerate(sets["indirect"]) if not f[i]]
    fpr, hits = {}, []
    for name in ("retain", "real_authors", "world_facts") + (() if "holdout_q" in background else ("holdout_q",)):
        f = flags(scope, S, name)
        fpr[name] = rate(f)
        hits += [sets[name][i]["text"] for i in range(len(f)) if f[i]]
    cal = flags(scope, S, "calibration")
    # precision: of the requests flagged, the share about the forgotten authors (all test positives
    # against each negative set, and against the three pooled: it depends on that mix)
    tp = sum(recall[k]["k"] for k in ("held_out_questions", "paraphrased", "rephrased", "indirect", "chat"))
    precision = {name: round(tp / (tp + fpr[name]["k"]), 4) for name in ("retain", "real_authors", "world_facts")}
    precision["pooled"] = round(tp / (tp + sum(fpr[n]["k"] for n in ("retain", "real_authors", "world_facts"))), 4)
    out.update(recall=recall, false_positive_rate=fpr, precision=precision, true_positives=tp,
               calibration_above_threshold=rate(cal), missed=misses, false_positives=hits)
    return out


def latency(model, tok, sets, scope_settings, answers: bool, background, max_tokens: int, reps: int, n_prompts: int,
            work: Path) -> dict:
    import httpx

    from lora_unlearn.core.adapter_io import load_adapter
    from lora_unlearn.core.inference import dequantized
    from lora_unlearn.core.scope import fit_scope, save_scope
    from lora_unlearn.serving.app import background as serve_in_thread
    from lora_unlearn.serving.app import create_app
    from lora_unlearn.serving.registry import load_named
    from lora_unlearn.serving.runtime import ForgetRuntime
    from lora_unlearn.serving.schemas import Limits

    folder = work / "forget_negated"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(ROOT / "adapters" / "forget_negated", folder)
    adapter = load_adapter(folder)
    fit = [sets[name][i]["text"] for name in ("forget_q", "forget_a")[: 1 + answers] for i in range(0, 40, 2)]
    t = time.perf_counter()
    with dequantized(model):
        scope = fit_scope(model, tok, fit, adapter=adapter, background_texts=background,
                          calibration_texts=[x["text"] for x in sets["calibration"]], fpr=FPR, **scope_settings)
    fit_s = time.perf_counter() - t
    save_scope(scope, folder, overwrite=True)
    runtime = ForgetRuntime(model, tok, max_strength=8.0)
    kinds: dict = {}
    load_named(runtime, kinds, "forget", folder, "auto", scope=True)
    prompts = [sets["forget_q"][i]["text"] for i in range(1, 40, 2)][: n_prompts // 2] + \
              [sets["retain"][i]["text"] for i in range(0, 360, 30)][: n_prompts - n_prompts // 2]
    app = create_app(runtime, limits=Limits(max_tokens=max_tokens, batch_window_ms=0.0), kinds=kinds)
    timings = {"auto": [], "explicit": []}
    inside: list[float] = []  # seconds spent in runtime.resolve (the scope pass) during the current request
    resolve = runtime.resolve

    def timed_resolve(rows, texts):
        t0 = time.perf_counter()
        try:
            return resolve(rows, texts)
        finally:
            inside.append(time.perf_counter() - t0)

    runtime.resolve = timed_resolve
    scope_s = []
    strengths = []
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=600) as client:
        def send(prompt, forget):
            t0 = time.perf_counter()
            r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}],
                                                          "max_tokens": max_tokens, "forget": forget})
            r.raise_for_status()
            return time.perf_counter() - t0, r.json()

        for prompt in prompts[:2]:  # warm-up
            send(prompt, {"forget": "auto"})
        for rep in range(reps):
            for i, prompt in enumerate(prompts):
                order = ["auto", "explicit"] if (i + rep) % 2 == 0 else ["explicit", "auto"]
                strength = None
                pair = {}
                for kind in order:
                    inside.clear()
                    if kind == "auto" or strength is not None:
                        dt, body = send(prompt, {"forget": "auto" if kind == "auto" else strength})
                    else:  # explicit first: the strength "auto" gives, from the scope directly
                        with runtime.lock:
                            strength = runtime.resolve([{}], [prompt])[0][0]["forget"]
                        dt, body = send(prompt, {"forget": strength})
                    if kind == "auto":
                        strength = body["scope"][0]["forget"]["strength"]
                        scope_s.append(sum(inside))
                    pair[kind] = (dt, body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"])
                assert pair["auto"][1] == pair["explicit"][1], "auto and its explicit strength must answer alike"
                timings["auto"].append(pair["auto"][0])
                timings["explicit"].append(pair["explicit"][0])
                strengths.append(strength)
    runtime.resolve = resolve
    ratios = [a / e for a, e in zip(timings["auto"], timings["explicit"])]
    g = torch.Generator().manual_seed(0)
    n = len(ratios)
    boot = []
    for _ in range(2000):  # bootstrap over request pairs: the ratio of totals
        idx = torch.randint(0, n, (n,), generator=g).tolist()
        boot.append(sum(timings["auto"][i] for i in idx) / sum(timings["explicit"][i] for i in idx))
    boot.sort()
    explicit = sum(timings["explicit"])
    return {"max_tokens": max_tokens, "requests_per_kind": n, "prompts": len(prompts),
            "median_s": {k: round(statistics.median(v), 4) for k, v in timings.items()},
            "total_s": {k: round(sum(v), 3) for k, v in timings.items()},
            "ratio_of_totals": round(sum(timings["auto"]) / explicit, 4),
            "ratio_of_totals_ci95": [round(boot[49], 4), round(boot[1949], 4)],
            "median_of_paired_ratios": round(statistics.median(ratios), 4),
            "scope_pass_ms_median": round(statistics.median(scope_s) * 1000, 2),
            "scope_pass_share_of_request": round(sum(scope_s) / explicit, 4),
            "in_scope_requests": sum(s > 0 for s in strengths), "fit_s": round(fit_s, 1),
            "scope_files_bytes": {p.name: p.stat().st_size for p in folder.glob("scope.*")},
            "fitted_threshold": round(scope.threshold, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "bench_scope" / "scope.json")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()

    from lora_unlearn.core.models import load_base

    torch.set_num_threads(1)
    start = time.perf_counter()
    model, tok, info = load_base("smollm2-135m", "nf4")
    sets = load_sets()
    S = states(model, tok, sets)
    grid, chosen = dev_grid(S)
    print("development rule chose", chosen, flush=True)
    full_bg = ["pool", "holdout_q", "holdout_a"]
    results = {"chosen": test(S, sets, chosen["layer"], chosen["top_k"], chosen["answers_in_bank"], full_bg),
               "chosen_pool_only": test(S, sets, chosen["layer"], chosen["top_k"], chosen["answers_in_bank"], ["pool"]),
               "chosen_with_answers": test(S, sets, chosen["layer"], chosen["top_k"], True, full_bg)}
    for name, r in results.items():
        print(name, {k: v["rate"] for k, v in r["recall"].items()}, {k: v["rate"] for k, v in r["false_positive_rate"].items()},
              flush=True)
    out = {"benchmark": "scope", "model": f"{info.hub_id} (embedded, {info.quantization})", "fpr_target": FPR,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
           "date": time.strftime("%Y-%m-%d"), "fit": "forget01 even rows (20 questions)",
           "calibration": "retain rows 360-399", "dev_grid": grid, "dev_choice": chosen, "results": results}
    if not args.skip_latency:
        background = [x["text"] for name in full_bg for x in sets[name]]
        settings = {"layer": chosen["layer"], "top_k": chosen["top_k"]}
        out["latency"] = latency(model, tok, sets, settings, chosen["answers_in_bank"], background, args.max_tokens,
                                 args.reps, args.prompts, ROOT / "runs" / "bench_scope")
        out["latency"]["threshold_matches_benchmark"] = abs(out["latency"]["fitted_threshold"]
                                                            - results["chosen"]["threshold"]) < 1e-3
        print("latency", out["latency"], flush=True)
    out["wall_s"] = round(time.perf_counter() - start, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
