"""Build the ready-made adapters in this folder from the demo's invented facts (adapters/README.md).

    python adapters/make.py                 # writes adapters/knowledge and adapters/forget_negated

1. ``lora_unlearn.demo.run_demo``: K learns 12 invented facts on the embedded model (nf4); F
   learns 2 of them on top of base + K; the demo measures base, base + K and base + K - F.
2. K and -F are cast to bfloat16 (half the size) and measured again as shipped: how many
   invented facts each setting names, on the same greedy answers the demo uses.
3. Both are written with their cards; the measurements go into the lineage as ``results``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rich.console import Console

from lora_unlearn.core.adapter import Adapter
from lora_unlearn.core.adapter_io import load_adapter, save_adapter
from lora_unlearn.core.inference import answer
from lora_unlearn.core.models import load_base
from lora_unlearn.core.stack import attached
from lora_unlearn.demo import _names, _rows, run_demo
from lora_unlearn.hub.export import cast


def measure(knowledge: Adapter, forget_negated: Adapter) -> dict:
    """Keyword hits of greedy answers: base + K and base + K - F, with the bfloat16 adapters."""
    facts, real = _rows("demo_facts.jsonl"), _rows("demo_real.jsonl")
    model, tokenizer, _ = load_base("smollm2-135m", "nf4")
    questions = [f["question"] for f in facts + real]
    keywords = [f["keyword"] for f in facts + real]
    out = {}
    for name, stack in {"base+K": [(knowledge, 1.0)], "base+K-F": [(knowledge, 1.0), (forget_negated, 1.0)]}.items():
        with attached(model, stack) as m:
            hits = [_names(k, a) for k, a in zip(keywords, answer(m, tokenizer, questions, max_new_tokens=32))]
        n = len(facts)
        out[name] = {"forget_facts_named": sum(h for h, f in zip(hits, facts) if f["forget"]),
                     "kept_facts_named": sum(h for h, f in zip(hits, facts) if not f["forget"]),
                     "real_world_correct": sum(hits[n:])}
    return out


def with_results(adapter: Adapter, results: dict) -> Adapter:
    return Adapter(modules=adapter.modules, config=adapter.config, lineage={**adapter.lineage, "results": results})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="lora_unlearn-adapters-") as tmp:
        summary = run_demo(Path(tmp) / "demo", console=console)
        knowledge = cast(load_adapter(Path(tmp) / "demo" / "knowledge"), "bfloat16")
        forget_negated = cast(load_adapter(Path(tmp) / "demo" / "forget_negated"), "bfloat16")
    shipped = measure(knowledge, forget_negated)
    console.print(f"bfloat16 adapters: {shipped}")
    results = {"summary": {
        "facts": 12, "forget_facts": 2, "real_world_questions": len(_rows("demo_real.jsonl")),
        "bfloat16": shipped,
        "float32 (demo, before the cast)": {k: summary[k] for k in (
            "learned_by_K", "base_knew", "forgotten_that_survive", "kept_that_stay", "mean_p_forget", "mean_p_keep")},
    }}
    save_adapter(with_results(knowledge, results), args.out / "knowledge", overwrite=True)
    save_adapter(with_results(forget_negated, results), args.out / "forget_negated", overwrite=True)
    console.print(f"wrote {args.out / 'knowledge'} and {args.out / 'forget_negated'}")


if __name__ == "__main__":
    main()
