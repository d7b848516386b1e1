"""Serving under load, over the real server on loopback and the official ``openai`` client (issue: serving).

On the embedded model in nf4 with the shipped adapters (``adapters/``: the negated forget adapter
and the refusal adapter, both off by default):

(1) **Exactness under continuous batching.** ``--streams`` requests (default 50) with mixed forget
    settings (none, negated, refusal, both, half strength) are first sent one at a time (greedy,
    not streamed), then all at once as streams (``stream_options.include_usage``); every stream
    must carry exactly the text and completion tokens of its serial run. Requests join and leave
    the running batch (``--max-batch`` rows) between decoding steps.
(2) **First chunk.** 8 concurrent 64-token streams against the same 8 requests not streamed: the
    median time to the first chunk over the median time to the whole answer (goal <= 0.2).

    .venv/bin/python benchmarks/serving.py --json benchmarks/results/serving.json   # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import torch

from lora_unlearn.serving.app import background, create_app
from lora_unlearn.serving.registry import load_named
from lora_unlearn.serving.runtime import ForgetRuntime
from lora_unlearn.serving.schemas import Limits

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = [{}, {"forget_negated": 1.0}, {"refusal": 1.0}, {"forget_negated": 1.0, "refusal": 1.0},
            {"forget_negated": 0.5}]

def prompts(n: int) -> list[str]:
    """``n`` questions: the demo's real-world and forgotten facts, then their rephrasings."""
    qs = [json.loads(line)["question"] for name in ("demo_real", "demo_facts")
          for line in (ROOT / f"lora_unlearn/resources/{name}.jsonl").read_text().splitlines() if line.strip()]
    forms = ["{}", "Answer briefly: {}", "Please tell me: {}"]
    return [forms[i // len(qs) % len(forms)].format(qs[i % len(qs)]) for i in range(n)]

def ask(client, question: str, forget: dict, max_tokens: int, stream: bool) -> dict:
    start = time.perf_counter()
    messages = [{"role": "user", "content": question}]
    if not stream:
        r = client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens,
                                           extra_body={"forget": forget})
        return {"text": r.choices[0].message.content, "tokens": r.usage.completion_tokens,
                "total_s": time.perf_counter() - start}
    first, text, tokens = None, "", None
    for chunk in client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={"forget": forget}):
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter() - start
                text += choice.delta.content
    return {"text": text, "tokens": tokens, "first_s": first, "total_s": time.perf_counter() - start}

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=32, help="per request in (1)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    runtime = ForgetRuntime.from_base("smollm2-135m", "nf4")
    kinds: dict[str, str] = {}
    for name in ("forget_negated", "refusal"):
        load_named(runtime, kinds, name, ROOT / "adapters" / name, 0.0)
    limits = Limits(max_tokens=256, max_batch=args.max_batch, batch_window_ms=5.0)
    app = create_app(runtime, limits=limits, kinds=kinds)
    questions = prompts(args.streams)
    forgets = [SETTINGS[i % len(SETTINGS)] for i in range(args.streams)]
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                 "model": "smollm2-135m nf4", "streams": args.streams, "max_tokens": args.max_tokens,
                 "max_batch": args.max_batch, "settings": SETTINGS, "date": time.strftime("%Y-%m-%d")}
    with background(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        ask(client, "Hello", {}, 4, False)  # warm-up
        start = time.perf_counter()
        serial = [ask(client, q, f, args.max_tokens, False) for q, f in zip(questions, forgets)]
        serial_s = time.perf_counter() - start
        print(f"(1) serial: {args.streams} requests in {serial_s:.1f} s", flush=True)
        start = time.perf_counter()
        with ThreadPoolExecutor(args.streams) as pool:
            streamed = list(pool.map(lambda qf: ask(client, *qf, args.max_tokens, True), zip(questions, forgets)))
        concurrent_s = time.perf_counter() - start

        health = httpx.get(f"{url}/health").json()
        same = [s["text"] == c["text"] and s["tokens"] == c["tokens"] for s, c in zip(serial, streamed)]
        diffs = [{"question": q, "forget": f, "serial": s["text"], "streamed": c["text"]}
                 for q, f, s, c, ok in zip(questions, forgets, serial, streamed, same) if not ok]
        out["exact"] = {"same": sum(same), "of": len(same), "differences": diffs, "serial_s": round(serial_s, 2),
                        "concurrent_s": round(concurrent_s, 2), "speedup": round(serial_s / concurrent_s, 2),
                        "max_batch_rows": health["max_batch_rows"], "admissions": health["batches"],
                        "tokens": sum(s["tokens"] for s in serial)}
        print(f"(1) {args.streams} concurrent streams in {concurrent_s:.1f} s ({serial_s / concurrent_s:.2f}x the "
              f"serial throughput); {sum(same)}/{len(same)} equal their serial run; "
              f"{health['batches']} admissions, up to {health['max_batch_rows']} rows", flush=True)
        eight = list(zip(questions[:8], forgets[:8]))
        rounds = []
        for _ in range(3):
            with ThreadPoolExecutor(8) as pool:
                whole = list(pool.map(lambda qf: ask(client, *qf, 64, False), eight))
            with ThreadPoolExecutor(8) as pool:
                chunks = list(pool.map(lambda qf: ask(client, *qf, 64, True), eight))
            firsts = [c["first_s"] for c in chunks if c["first_s"] is not None]
            rounds.append({"first_chunk_s": round(statistics.median(firsts), 3),
                           "whole_s": round(statistics.median(w["total_s"] for w in whole), 3)})
            rounds[-1]["ratio"] = round(rounds[-1]["first_chunk_s"] / rounds[-1]["whole_s"], 3)
            print(f"(2) first chunk {rounds[-1]['first_chunk_s']:.3f} s, whole answer {rounds[-1]['whole_s']:.3f} s: "
                  f"ratio {rounds[-1]['ratio']:.3f}", flush=True)
        out["first_chunk"] = {"rounds": rounds, "median_ratio": statistics.median(r["ratio"] for r in rounds)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")

if __name__ == "__main__":
    main()
