"""Build the project's edit benchmark and preservation pool from the candidates, with the unedited model.

    .venv/bin/python benchmarks/make_edits.py              # ~5 min on 2 CPU cores; rewrites the files below
    .venv/bin/python benchmarks/make_edits.py --pool-only  # only step 3

1. Ask the unedited embedded model (SmolLM2-135M-Instruct, nf4, greedy, 24 tokens) every
   candidate's edit prompt (``edit_candidates.py``). A fact becomes an edit when the answer names
   its true answer and not its new one; the other subjects of the relation become its
   neighbourhood probes (same relation, never edited), topped up from the edits' own subjects
   where a relation has fewer than 3 (those subjects are then not edited).
2. Split the edits into ``dev`` (every third edit of each relation, for tuning) and ``test``
   (the rest, for reporting), write ``lora_unlearn/resources/edits/{dev,test}.jsonl``.
3. Answer the preservation prompts (``resources/preservation/prompts.txt``) and the short factual
   questions of ``pool_facts.py`` that pass the pool check against every evaluation set and every
   edit candidate, with the same model (greedy, 48 tokens), and write
   ``resources/preservation/pool.jsonl`` and ``facts.jsonl`` (source ``preservation+facts`` is
   both): the starting model's own answers, the targets of the preservation stream's KL.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from edit_candidates import RELATIONS  # noqa: E402
from pool_facts import prompts as fact_prompts  # noqa: E402

from lora_unlearn.core.inference import answer, dequantized  # noqa: E402
from lora_unlearn.core.models import load_base  # noqa: E402
from lora_unlearn.evaluate.edits import mentions  # noqa: E402

RES = Path(__file__).parents[1] / "lora_unlearn" / "resources"
MIN_NEIGHBOURS = 3


def question(template: str, subject: str) -> str:
    text = template.format(s=subject)
    return text[0].upper() + text[1:]


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool-only", action="store_true", help="only answer the preservation prompts")
    args = ap.parse_args()
    model, tok, _ = load_base("smollm2-135m", "nf4")
    pool_prompts = [line.strip() for line in (RES / "preservation" / "prompts.txt").read_text().splitlines() if line.strip()]
    fact_qs = fact_prompts(clear_of_evaluations())
    if args.pool_only:
        with dequantized(model):
            pool_answers = answer(model, tok, pool_prompts + fact_qs, max_new_tokens=48, batch_size=32)
        write_pool(pool_prompts, pool_answers[:len(pool_prompts)])
        write_pool(fact_qs, pool_answers[len(pool_prompts):], "facts.jsonl")
        return
    facts = [(rel, s, old, new) for rel, spec in RELATIONS.items() for s, old, new in spec["facts"]]
    prompts = [question(RELATIONS[rel]["templates"][0], s) for rel, s, _, _ in facts]
    with dequantized(model):
        answers = answer(model, tok, prompts, max_new_tokens=24, batch_size=32)
        pool_answers = answer(model, tok, pool_prompts + fact_qs, max_new_tokens=48, batch_size=32)
    known = {(rel, s): mentions(a, old) and not mentions(a, new) for (rel, s, old, new), a in zip(facts, answers)}
    splits: dict[str, list[dict]] = {"dev": [], "test": []}
    for rel, spec in RELATIONS.items():
        t = spec["templates"]
        edits = [f for f in facts if f[0] == rel and known[(rel, f[1])]]
        neighbours = [f for f in facts if f[0] == rel and not known[(rel, f[1])]]
        while len(neighbours) < MIN_NEIGHBOURS and len(edits) > 1:
            neighbours.append(edits.pop())
        for i, (_, s, old, new) in enumerate(edits):
            near = [neighbours[(i + k) % len(neighbours)] for k in range(min(2, len(neighbours)))]
            row = {"prompt": question(t[0], s), "old_answer": old, "new_answer": new,
                   "paraphrases": [question(t[1], s), question(t[2], s)],
                   "neighbourhood": [{"prompt": question(t[0], n[1]), "answer": n[2]} for n in near],
                   "relation": rel, "subject": s,
                   "unedited_answer": answers[facts.index((rel, s, old, new))]}
            splits["dev" if i % 3 == 1 else "test"].append(row)
    for name, rows in splits.items():
        with open(RES / "edits" / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(name, len(rows), "edits")
    write_pool(pool_prompts, pool_answers[:len(pool_prompts)])
    write_pool(fact_qs, pool_answers[len(pool_prompts):], "facts.jsonl")


def clear_of_evaluations():
    """A test that a prompt shares no prompt or term with any evaluation set of the project (the edit
    splits and locality pool, the demos, TOFU-mini) nor with any edit candidate (a future edit)."""
    from lora_unlearn.core.data import load_records
    from lora_unlearn.core.text import normalise
    from lora_unlearn.training.preservation import protected_terms
    from lora_unlearn.training.sources import load_edits, load_locality

    rows = load_edits("edits:dev") + load_edits("edits:test") + load_locality("edits:locality") + load_edits("edits-demo")
    rows += load_records(RES / "demo_facts.jsonl") + load_records(RES / "demo_real.jsonl")
    for name in ("forget01", "retain", "real_authors", "world_facts", "holdout01"):
        rows += load_records(RES / "tofu_mini" / f"{name}.jsonl")
    rows += [{"subject": s, "old_answer": o, "new_answer": n} for spec in RELATIONS.values() for s, o, n in spec["facts"]]
    prompts, terms = protected_terms(rows)

    def allowed(text: str) -> bool:
        padded = f" {normalise(text)} "
        return normalise(text) not in prompts and not any(f" {t} " in padded for t in terms)
    return allowed


def write_pool(prompts: list[str], answers: list[str], name: str = "pool.jsonl") -> None:
    with open(RES / "preservation" / name, "w") as f:
        f.writelines(json.dumps({"question": q, "answer": a}) + "\n" for q, a in zip(prompts, answers))
    print("preservation", len(prompts), "prompts")


if __name__ == "__main__":
    main()
