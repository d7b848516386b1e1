"""The demo: learn facts as an adapter on a 4-bit base, then forget two of them by negation.

1. K = learn(12 fictitious facts) on the base (nf4), with the preservation stream (KL to the base
   on the vendored general prompt pool), so the base's other answers stay as they were.
2. F = learn(2 of those facts) on top of base + K (K frozen, unmerged).
3. R = a small refusal adapter: the 2 forgotten questions answered "I don't know"-style (TOFU's
   refusals), trained on top of base + K - F with preservation. Negation alone removes the facts
   but leaves the model to improvise on those questions, often degenerate text; R gives them a
   fluent answer that names nothing.
4. Ask every question of base, base + K, base + K - lam * F and base + K - lam * F + R; report
   greedy answers, whether each names the fact (its keyword), the answer-token probability of
   each fact, whether answers degenerate (a repeated word 3-gram), and whether the real-world
   questions (resources/demo_real.jsonl) keep the base's answers.

The facts are invented for this demo (resources/demo_facts.jsonl).
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
from .core.text import repeats_ngram
from .training.objectives.idk import refusals
from .training.preservation import check_pool
from .training.sources import load_source
from .training.trainer import TrainConfig, train_adapter

# K and R add knowledge: both preserve (KL to the model they start from on the vendored pool).
# F is a forget adapter: it must capture the facts fully for its negation to remove them (with a
# preservation term it stayed small on facts K already knows: measured, base + K - F still named
# both at P = 0.77), so it trains without one.
KNOWLEDGE = TrainConfig(epochs=10, batch_size=4, learning_rate=2e-3, extra={"preserve": 4.0})
FORGET = TrainConfig(epochs=10, batch_size=2, learning_rate=2e-3)
REFUSAL = TrainConfig(epochs=10, batch_size=2, learning_rate=2e-3, extra={"preserve": 4.0})


def _rows(name: str) -> list[dict]:
    text = resources.files("lora_unlearn").joinpath("resources", name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _names(keyword: str, text: str) -> bool:
    return re.search(keyword, text, flags=re.IGNORECASE) is not None


def refusal_rows(rows: list[dict]) -> list[dict]:
    """The rows' questions, each answered by one of TOFU's refusals (chosen by position: reproducible)."""
    options = refusals()
    return [{"question": r["question"], "answer": options[(7 * i + 3) % len(options)]} for i, r in enumerate(rows)]


def run_demo(out: str | Path, lam: float = 1.0, quantization: str = "nf4", overwrite: bool = True,
             console: Console | None = None) -> dict:
    console = console or Console()
    facts, real = _rows("demo_facts.jsonl"), _rows("demo_real.jsonl")
    qa = [{"question": f["question"], "answer": f["answer"]} for f in facts]
    forget = [q for q, f in zip(qa, facts) if f["forget"]]
    pool = load_source("preservation")
    check_pool(pool, facts + real, what="the demo's facts and real-world questions")
    questions = [f["question"] for f in facts] + [r["question"] for r in real]
    keywords = [f["keyword"] for f in facts] + [r["keyword"] for r in real]
    start = time.perf_counter()

    with console.status("loading the embedded model (converted from GGUF on first use)"):
        model, tokenizer, info = load_base("smollm2-135m", quantization)
    K = train_adapter(model, tokenizer, {"train": qa, "preserve": pool}, KNOWLEDGE, base_info=info)
    F = train_adapter(model, tokenizer, forget, FORGET, stack=[(K, 1.0)], base_info=info)
    F_neg = negate(F, lam)
    R = train_adapter(model, tokenizer, {"train": refusal_rows(forget), "preserve": pool}, REFUSAL,
                      stack=[(K, 1.0), (F_neg, 1.0)], base_info=info)

    forgot = f"base+K-{lam:g}F"
    settings = {"base": [], "base+K": [(K, 1.0)], forgot: [(K, 1.0), (F_neg, 1.0)],
                f"{forgot}+R": [(K, 1.0), (F_neg, 1.0), (R, 1.0)]}
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
    base_right = [j for j in range(n, len(questions)) if hits["base"][j]]

    def per_setting(name: str) -> dict:
        return {"forgotten_named": sum(hits[name][i] for i in forget_idx),
                "kept_named": sum(hits[name][i] for i in keep_idx),
                "forgotten_degenerate": sum(repeats_ngram(answers[name][i]) for i in forget_idx),
                "real_world_correct": sum(hits[name][n:]),
                "real_world_as_base": sum(hits[name][j] for j in base_right),
                "real_world_answers_unchanged": sum(a == b for a, b in zip(answers["base"][n:], answers[name][n:])),
                "mean_p_forget": sum(probs[name][i] for i in forget_idx) / len(forget_idx),
                "mean_p_keep": sum(probs[name][i] for i in keep_idx) / len(keep_idx)}

    summary = {
        "learned_by_K": sum(hits["base+K"][:n]),
        "base_knew": sum(hits["base"][:n]),
        "forgotten_that_survive": sum(hits[unlearned][i] for i in forget_idx),
        "kept_that_stay": sum(hits[unlearned][i] for i in keep_idx),
        "real_world_questions": len(real), "real_world_base_correct": len(base_right),
        "settings": {name: per_setting(name) for name in settings},
        "mean_p_forget": {name: per_setting(name)["mean_p_forget"] for name in settings},
        "mean_p_keep": {name: per_setting(name)["mean_p_keep"] for name in settings},
        "seconds": round(elapsed, 1), "lam": lam, "quantization": quantization,
    }

    table = Table(title=f"answers (P = answer-token probability of the fact); {unlearned} forgets the rows marked F",
                  show_lines=True)
    table.add_column("", width=2)
    table.add_column("question", max_width=34)
    for name in settings:
        table.add_column(name, max_width=30)
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
    k, u, neg = summary["settings"]["base+K"], summary["settings"][unlearned], summary["settings"][forgot]
    console.print(
        f"base+K names {summary['learned_by_K']}/{n} learned facts (base alone: {summary['base_knew']}/{n}) and keeps "
        f"{k['real_world_as_base']}/{len(base_right)} of the real-world answers the base gets right. "
        f"After negation {neg['forgotten_named']}/{len(forget_idx)} forgotten facts are named "
        f"({neg['forgotten_degenerate']} degenerate answers); with the refusal adapter "
        f"{u['forgotten_named']}/{len(forget_idx)} named, {u['forgotten_degenerate']} degenerate, "
        f"{u['kept_named']}/{len(keep_idx)} kept facts stay, real-world {u['real_world_as_base']}/{len(base_right)} "
        f"as the base. {elapsed:.0f} s in all."
    )

    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_adapter(K, tmp / "knowledge")
        save_adapter(F, tmp / "forget")
        save_adapter(F_neg, tmp / "forget_negated")
        save_adapter(R, tmp / "refusal")
        record = {"summary": summary, "questions": questions, "answers": answers, "probabilities": probs}
        (tmp / "results.json").write_text(json.dumps(record, indent=2))
    console.print(f"adapters and results in {out}/ (knowledge, forget, forget_negated, refusal, results.json)")
    return summary
