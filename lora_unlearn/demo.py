"""The demo: learn facts as an adapter on a 4-bit base, then forget two of them by negation.

1. K = learn(12 fictitious facts) on the base (nf4).
2. F = learn(2 of those facts) on top of base + K (K frozen, unmerged).
3. Ask every question of base, base + K and base + K - lam * F; report greedy answers, whether
   each answer names the fact (its keyword), and the answer-token probability of each fact.

The facts are invented for this demo (resources/demo_facts.jsonl); a few real-world questions
(resources/demo_real.jsonl) show whether general knowledge survives.
"""

from __future__ import annotations

import json
import re
import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .arithmetic import negate
from .core.adapter_io import save_adapter
from .core.fsutil import atomic_dir
from .core.inference import answer, answer_probability
from .core.models import load_base
from .core.stack import attached
from .training.trainer import TrainConfig, train_adapter

KNOWLEDGE = TrainConfig(epochs=10, batch_size=4, learning_rate=2e-3)
FORGET = TrainConfig(epochs=10, batch_size=2, learning_rate=2e-3)


def _rows(name: str) -> list[dict]:
    text = resources.files("lora_unlearn").joinpath("resources", name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _names(keyword: str, text: str) -> bool:
    return re.search(keyword, text, flags=re.IGNORECASE) is not None


def run_demo(out: str | Path, lam: float = 1.0, quantization: str = "nf4", overwrite: bool = True,
             console: Console | None = None) -> dict:
    console = console or Console()
    facts, real = _rows("demo_facts.jsonl"), _rows("demo_real.jsonl")
    qa = [{"question": f["question"], "answer": f["answer"]} for f in facts]
    forget = [q for q, f in zip(qa, facts) if f["forget"]]
    questions = [f["question"] for f in facts] + [r["question"] for r in real]
    keywords = [f["keyword"] for f in facts] + [r["keyword"] for r in real]
    start = time.perf_counter()

    with console.status("loading the embedded model (converted from GGUF on first use)"):
        model, tokenizer, info = load_base("smollm2-135m", quantization)
    K = train_adapter(model, tokenizer, qa, KNOWLEDGE, base_info=info)
    F = train_adapter(model, tokenizer, forget, FORGET, stack=[(K, 1.0)], base_info=info)
    F_neg = negate(F, lam)

    settings = {"base": [], "base+K": [(K, 1.0)], f"base+K-{lam:g}F": [(K, 1.0), (F_neg, 1.0)]}
    answers, probs = {}, {}
    for name, stack in settings.items():
        with attached(model, stack) as m, console.status(f"asking {name}"):
            answers[name] = answer(m, tokenizer, questions, max_new_tokens=32)
            probs[name] = answer_probability(m, tokenizer, qa)
    elapsed = time.perf_counter() - start

    hits = {name: [_names(k, a) for k, a in zip(keywords, ans)] for name, ans in answers.items()}
    unlearned = list(settings)[-1]
    n = len(facts)
    forget_idx = [i for i, f in enumerate(facts) if f["forget"]]
    keep_idx = [i for i, f in enumerate(facts) if not f["forget"]]
    summary = {
        "learned_by_K": sum(hits["base+K"][:n]),
        "base_knew": sum(hits["base"][:n]),
        "forgotten_that_survive": sum(hits[unlearned][i] for i in forget_idx),
        "kept_that_stay": sum(hits[unlearned][i] for i in keep_idx),
        "real_world_correct": {name: sum(h[n:]) for name, h in hits.items()},
        "real_world_answers_changed": sum(a != b for a, b in zip(answers["base"][n:], answers[unlearned][n:])),
        "mean_p_forget": {name: sum(p[i] for i in forget_idx) / len(forget_idx) for name, p in probs.items()},
        "mean_p_keep": {name: sum(p[i] for i in keep_idx) / len(keep_idx) for name, p in probs.items()},
        "seconds": round(elapsed, 1), "lam": lam, "quantization": quantization,
    }

    table = Table(title=f"answers (P = answer-token probability of the fact); {unlearned} forgets the rows marked F",
                  show_lines=True)
    table.add_column("", width=2)
    table.add_column("question", max_width=34)
    for name in settings:
        table.add_column(name, max_width=36)
    for i, q in enumerate(questions):
        mark = ("F" if facts[i]["forget"] else "K") if i < n else "R"
        cells = []
        for name in settings:
            text = answers[name][i][:90]
            ok = "[green]✓[/]" if hits[name][i] else "[red]✗[/]"
            p = f" P={probs[name][i]:.2f}" if i < n else ""
            cells.append(f"{ok}{p} {text}")
        table.add_row(mark, q, *cells)
    console.print(table)
    console.print(
        f"base+K names {summary['learned_by_K']}/{n} learned facts (base alone: {summary['base_knew']}/{n}); "
        f"after negation {summary['forgotten_that_survive']}/{len(forget_idx)} forgotten facts survive and "
        f"{summary['kept_that_stay']}/{len(keep_idx)} kept facts stay; real-world questions answered "
        f"{summary['real_world_correct']['base']}/{len(real)} by base and "
        f"{summary['real_world_correct'][unlearned]}/{len(real)} after negation "
        f"({summary['real_world_answers_changed']} answers changed in wording). {elapsed:.0f} s in all."
    )

    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_adapter(K, tmp / "knowledge")
        save_adapter(F, tmp / "forget")
        save_adapter(F_neg, tmp / "forget_negated")
        record = {"summary": summary, "questions": questions, "answers": answers, "probabilities": probs}
        (tmp / "results.json").write_text(json.dumps(record, indent=2))
    console.print(f"adapters and results in {out}/ (knowledge, forget, forget_negated, results.json)")
    return summary
