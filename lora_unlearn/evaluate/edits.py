"""Knowledge-edit metrics (F-Learning, Ni et al. 2024; LLM Surgery, Veldanda et al. 2024); DESIGN section 4.

An edit row is ``{"prompt", "old_answer", "new_answer", "paraphrases": [...], "locality":
[{"prompt", "answer"}, ...]}`` (``lora_unlearn.training.sources.load_edits``). Answers are greedy, through
the chat template. A generation *mentions* a span when the span's normalised words appear as
consecutive whole words of the normalised generation (lowercase, every non-alphanumeric
character a space): "Lyon" is in "It is Lyon." but not in "Lyons".

    key span      the words of new_answer that differ from old_answer: both are normalised and
                  split into words, the common leading and trailing words are removed, what is
                  left of new_answer is the key ("The capital of France is Lyon." vs "... Paris." ->
                  "lyon"); the whole normalised new_answer when nothing is left
    reliability   share of edits whose answer to the edit prompt mentions the new key span
    generality    the same on the paraphrases: per edit the share of its paraphrases, then the
                  mean over edits that have paraphrases (every edit weighs the same)
    locality      share of all locality prompts whose answer mentions their expected ``answer``
                  (an absolute check against the given answer, not against the unedited model)
    old_rate      share of edit prompts whose answer still mentions the old key span
    multiple choice (LLM Surgery) for the edit prompt and each paraphrase, the option with the lower
                  per-token NLL between new_answer and old_answer is the model's choice (ties go to
                  old_answer); reported as the share choosing new_answer on the prompts, on the
                  paraphrases, and on both together
"""

from __future__ import annotations

import re
import time
from typing import Any

_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalise(text: str) -> str:
    """Lowercase, non-alphanumeric characters to spaces, single spaces, stripped."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def key_span(old_answer: str, new_answer: str) -> str:
    """The normalised words of ``new_answer`` left after removing those shared with ``old_answer``
    at the start and at the end (see the module docstring)."""
    old, new = normalise(old_answer).split(), normalise(new_answer).split()
    start = 0
    while start < min(len(old), len(new)) and old[start] == new[start]:
        start += 1
    end = 0
    while end < min(len(old), len(new)) - start and old[-1 - end] == new[-1 - end]:
        end += 1
    key = new[start:len(new) - end]
    return " ".join(key) if key else " ".join(new)


def mentions(text: str, span: str) -> bool:
    """Whether the normalised ``span`` appears as whole consecutive words of the normalised ``text``."""
    span = normalise(span)
    return bool(span) and f" {span} " in f" {normalise(text)} "


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def evaluate_edits(model, tokenizer, edits: list[dict], *, batch_size: int = 16, max_new_tokens: int = 32,
                   progress: bool = True, max_length: int = 512, dequantize: bool | None = None) -> dict:
    """Reliability, generality, locality and LLM Surgery's multiple-choice accuracy of a model on ``edits``.

    One batched greedy pass answers every edit prompt, paraphrase and locality prompt; one batched
    teacher-forced pass scores new_answer and old_answer after every edit prompt and paraphrase.
    Returns a JSON-serialisable dict: n, reliability, generality, locality, old_rate,
    mc_accuracy {prompt, paraphrases, all}, wall_s, per_edit (answers and per-question outcomes).
    Shares over empty sets (no paraphrases, no locality prompts) are None. ``dequantize``: see
    ``inference.dequantized`` (default: when 4-bit weights are on the CPU; same numbers, faster).
    """
    from ..core.inference import answer, answer_scores, dequantized
    from ..errors import UserError

    if not edits:
        raise UserError("no edits to evaluate: the edit file is empty")
    start = time.perf_counter()
    questions, owners = [], []  # owners[i] = (edit index, kind, position)
    for e, row in enumerate(edits):
        questions.append(row["prompt"])
        owners.append((e, "prompt", 0))
        for j, p in enumerate(row.get("paraphrases", [])):
            questions.append(p)
            owners.append((e, "paraphrase", j))
        for j, loc in enumerate(row.get("locality", [])):
            questions.append(loc["prompt"])
            owners.append((e, "locality", j))
    mc_questions = [(q, owner) for q, owner in zip(questions, owners) if owner[1] != "locality"]
    pairs = [{"question": q, "answer": edits[owner[0]][field]} for q, owner in mc_questions
             for field in ("new_answer", "old_answer")]

    bar = None
    if progress:
        from ..progress import bar as make_bar

        bar = make_bar()
        bar.start()
        task = bar.add_task("edits", total=-(-len(questions) // batch_size) + -(-len(pairs) // batch_size), info="")
    step = (lambda: bar.advance(task)) if bar else None
    try:
        with dequantized(model, dequantize):
            answers = answer(model, tokenizer, questions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             on_batch=step)
            nll = answer_scores(model, tokenizer, pairs, batch_size=batch_size, max_length=max_length, on_batch=step)[0]
    finally:
        if bar:
            bar.stop()

    per_edit: list[dict[str, Any]] = []
    for row in edits:
        key, old_key = key_span(row["old_answer"], row["new_answer"]), key_span(row["new_answer"], row["old_answer"])
        per_edit.append({"prompt": row["prompt"], "key": key, "old_key": old_key, "paraphrases": [], "locality": []})
    mc = {}
    for i, (_, owner) in enumerate(mc_questions):
        mc[owner] = {"nll_new": nll[2 * i].item(), "nll_old": nll[2 * i + 1].item(),
                     "mc_new": bool(nll[2 * i] < nll[2 * i + 1])}
    for question, text, owner in zip(questions, answers, owners):
        e, kind, j = owner
        item = per_edit[e]
        if kind == "prompt":
            item.update(answer=text, reliable=mentions(text, item["key"]), old=mentions(text, item["old_key"]), **mc[owner])
        elif kind == "paraphrase":
            item["paraphrases"].append({"prompt": question, "answer": text,
                                        "general": mentions(text, item["key"]), **mc[owner]})
        else:
            expected = edits[e]["locality"][j]["answer"]
            item["locality"].append({"prompt": question, "answer": text,
                                     "expected": expected, "kept": mentions(text, expected)})

    general = [_share([p["general"] for p in item["paraphrases"]]) for item in per_edit if item["paraphrases"]]
    mc_prompt = [item["mc_new"] for item in per_edit]
    mc_para = [p["mc_new"] for item in per_edit for p in item["paraphrases"]]
    return {
        "n": len(edits),
        "reliability": _share([item["reliable"] for item in per_edit]),
        "generality": sum(general) / len(general) if general else None,
        "locality": _share([loc["kept"] for item in per_edit for loc in item["locality"]]),
        "old_rate": _share([item["old"] for item in per_edit]),
        "mc_accuracy": {"prompt": _share(mc_prompt), "paraphrases": _share(mc_para), "all": _share(mc_prompt + mc_para)},
        "wall_s": round(time.perf_counter() - start, 2),
        "per_edit": per_edit,
    }
