"""Build the ready-made adapters in this folder from the demo's invented facts (adapters/README.md).

    python adapters/make.py      # writes adapters/knowledge, adapters/forget_negated, adapters/refusal

1. ``lora_unlearn.demo.run_demo``: K learns 12 invented facts on the embedded model (nf4); F
   learns 2 of them on top of base + K; R learns to decline the 2 on top of base + K - F (all
   with the preservation stream); the demo measures base, base + K, base + K - F, base + K - F + R.
2. K, -F and R are cast to bfloat16 (half the size) and measured again as shipped: how many
   invented facts each setting names, degenerate answers, real-world answers, on the same
   greedy answers the demo uses.
3. All are written with their cards; the measurements go into the lineage as ``results``.
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


def measure(knowledge: Adapter, forget_negated: Adapter, refusal: Adapter) -> dict:
    """Keyword hits of greedy answers with the bfloat16 adapters: base + K, base + K - F, base + K - F + R."""
    from lora_unlearn.core.text import repeats_ngram

    facts, real = _rows("demo_facts.jsonl"), _rows("demo_real.jsonl")
    model, tokenizer, _ = load_base("smollm2-135m", "nf4")
    questions = [f["question"] for f in facts + real]
    keywords = [f["keyword"] for f in facts + real]
    out = {}
    settings = {"base": [], "base+K": [(knowledge, 1.0)], "base+K-F": [(knowledge, 1.0), (forget_negated, 1.0)],
                "base+K-F+R": [(knowledge, 1.0), (forget_negated, 1.0), (refusal, 1.0)]}
    n = len(facts)
    for name, stack in settings.items():
        with attached(model, stack) as m:
            answers = answer(m, tokenizer, questions, max_new_tokens=32)
        hits = [_names(k, a) for k, a in zip(keywords, answers)]
        out[name] = {"forget_facts_named": sum(h for h, f in zip(hits, facts) if f["forget"]),
                     "kept_facts_named": sum(h for h, f in zip(hits, facts) if not f["forget"]),
                     "forget_answers_degenerate": sum(repeats_ngram(a) for a, f in zip(answers, facts) if f["forget"]),
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
        refusal = cast(load_adapter(Path(tmp) / "demo" / "refusal"), "bfloat16")
    shipped = measure(knowledge, forget_negated, refusal)
    console.print(f"bfloat16 adapters: {shipped}")
    results = {"summary": {
        "facts": 12, "forget_facts": 2, "real_world_questions": len(_rows("demo_real.jsonl")),
        "bfloat16": shipped,
        "float32 (demo, before the cast)": {k: summary[k] for k in (
            "learned_by_K", "base_knew", "forgotten_that_survive", "kept_that_stay", "settings")},
    }}
    save_adapter(with_results(knowledge, results), args.out / "knowledge", overwrite=True)
    save_adapter(with_results(forget_negated, results), args.out / "forget_negated", overwrite=True)
    save_adapter(with_results(refusal, results), args.out / "refusal", overwrite=True)
    console.print(f"wrote {args.out / 'knowledge'}, {args.out / 'forget_negated'} and {args.out / 'refusal'}")


if __name__ == "__main__":
    main()
