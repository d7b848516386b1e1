"""Knowledge-edit metrics (F-Learning, Ni et al. 2024; LLM Surgery, Veldanda et al. 2024); DESIGN section 4.

An edit row is ``{"prompt", "old_answer", "new_answer", "paraphrases": [...], "locality":
[{"prompt", "answer"}, ...], "neighbourhood": [...]}`` (``lora_unlearn.training.sources.load_edits``;
locality and neighbourhood are optional). Answers are greedy, through the chat template; *mentions*
is :func:`lora_unlearn.core.text.mentions` (whole normalised words; ``a|b`` lists alternatives).

    key span      the words of new_answer that differ from old_answer: both are normalised and
                  split into words, the common leading and trailing words are removed, what is
                  left of new_answer is the key ("The capital of France is Lyon." vs "... Paris." ->
                  "lyon"); the whole normalised new_answer when nothing is left. The old key is
                  the same with the roles swapped.
    reliability   share of edits whose answer to the edit prompt mentions the new key *and not
                  the old key* (an answer that lists several entities, the new one among them,
                  is not an edit)
    generality    the same on the paraphrases: per edit the share of its paraphrases, then the
                  mean over edits that have paraphrases (every edit weighs the same)
    old_rate      share of edit prompts whose answer still mentions the old key

Locality probes are the union of every edit's ``locality`` rows and a shared ``pool`` (prompts
deduplicated: each is scored once per model, not once per edit); neighbourhood probes (same
relation, other subject) likewise from the edits' ``neighbourhood`` rows, minus any prompt that is
itself edited in this set. Three forms each:

    locality      EasyEdit's: teacher-forced on the *unedited* model's greedy answer to the probe,
                  the share of answer-token positions where the edited model's argmax token equals
                  the unedited model's (mean over probes); 1.0 for the unedited model itself
    locality_key  of the probes the unedited model answers with their expected answer, the share
                  the edited model still does
    locality_absolute  share of probes whose greedy answer mentions their expected answer

and the same ``neighbourhood``, ``neighbourhood_key``, ``neighbourhood_absolute``. The first two
forms need the unedited model's record (:func:`record_unedited`), made once per base and reused
for every edited model; without it they are None.

    multiple choice (LLM Surgery) for the edit prompt and each paraphrase, the option with the lower
                  per-token NLL between new_answer and old_answer is the model's choice (ties go to
                  old_answer); reported as the share choosing new_answer on the prompts, on the
                  paraphrases, and on both together
    degenerate    share of the edit-prompt and paraphrase answers holding a repeated word 3-gram
"""

from __future__ import annotations

import time
from typing import Any

from ..core.text import mentions, mentions_any, normalise, repeats_ngram

__all__ = ["evaluate_edits", "is_edited", "key_span", "mentions", "normalise", "probes", "record_unedited"]


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


def is_edited(text: str, key: str, old_key: str) -> bool:
    """The answer gives the new key and not the old one (reliability's and generality's rule)."""
    return mentions(text, key) and not mentions(text, old_key)


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def probes(edits: list[dict], pool: list[dict] | None = None) -> dict[str, list[dict[str, str]]]:
    """The deduplicated locality and neighbourhood probes ``{"prompt", "answer"}`` of an edit set."""
    edited = {normalise(q) for row in edits for q in [row["prompt"], *row.get("paraphrases", [])]}

    def unique(rows):
        seen, out = set(), []
        for r in rows:
            key = normalise(r["prompt"])
            if key not in seen and key not in edited:
                seen.add(key)
                out.append({"prompt": r["prompt"], "answer": r["answer"]})
        return out
    return {"locality": unique([r for row in edits for r in row.get("locality", [])] + list(pool or [])),
            "neighbourhood": unique([r for row in edits for r in row.get("neighbourhood", [])])}


def _run(model, tokenizer, questions, pairs, *, batch_size, max_new_tokens, max_length, dequantize, progress, label):
    from ..core.inference import answer, answer_scores, dequantized

    bar = None
    if progress:
        from ..progress import bar as make_bar

        bar = make_bar()
        bar.start()
        task = bar.add_task(label, total=-(-len(questions) // batch_size) + -(-len(pairs) // batch_size), info="")
    step = (lambda: bar.advance(task)) if bar else None
    try:
        with dequantized(model, dequantize):
            answers = answer(model, tokenizer, questions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             on_batch=step) if questions else []
            scores = (answer_scores(model, tokenizer, pairs, batch_size=batch_size, max_length=max_length, on_batch=step)
                      if pairs else None)
    finally:
        if bar:
            bar.stop()
    return answers, scores


def record_unedited(model, tokenizer, edits: list[dict], pool: list[dict] | None = None, *, batch_size: int = 16,
                    max_new_tokens: int = 32, max_length: int = 512, progress: bool = True,
                    dequantize: bool | None = None) -> dict[str, Any]:
    """The unedited model's greedy answers to every probe and its teacher-forced argmax tokens on them.

    Pass the result as ``unedited=`` to :func:`evaluate_edits` for every edited model of the same base
    (on these edits or any subset of them, probes are looked up by prompt).
    """
    found = probes(edits, pool)
    items = found["locality"] + found["neighbourhood"]
    answers, _ = _run(model, tokenizer, [r["prompt"] for r in items], [], batch_size=batch_size,
                      max_new_tokens=max_new_tokens, max_length=max_length, dequantize=dequantize,
                      progress=progress, label="unedited model")
    pairs = [{"question": r["prompt"], "answer": a} for r, a in zip(items, answers)]
    _, scores = _run(model, tokenizer, [], pairs, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     max_length=max_length, dequantize=dequantize, progress=False, label="")
    predicted = scores[1] if scores is not None else []
    out: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    k = 0
    for kind in ("locality", "neighbourhood"):
        out[kind] = []
        for r in found[kind]:
            out[kind].append({"prompt": r["prompt"], "answer": r["answer"], "unedited": answers[k],
                              "tokens": predicted[k]})
            k += 1
    return out


def evaluate_edits(model, tokenizer, edits: list[dict], *, pool: list[dict] | None = None,
                   unedited: dict[str, Any] | None = None, batch_size: int = 16, max_new_tokens: int = 32,
                   progress: bool = True, max_length: int = 512, dequantize: bool | None = None) -> dict:
    """Reliability, generality, locality, neighbourhood and LLM Surgery's multiple-choice accuracy.

    One batched greedy pass answers every edit prompt, paraphrase and probe; one batched
    teacher-forced pass scores new_answer and old_answer after every edit prompt and paraphrase,
    and (with ``unedited``, from :func:`record_unedited` on the unedited model with the same
    ``edits`` and ``pool``) the unedited model's answers to the probes. Returns a
    JSON-serialisable dict (see the module docstring for each figure), ``per_edit`` and
    ``probes`` with every answer. Shares over empty sets are None. ``dequantize``: see
    ``inference.dequantized`` (default: when 4-bit weights are on the CPU; same numbers, faster).
    """
    from ..errors import UserError

    if not edits:
        raise UserError("no edits to evaluate: the edit file is empty")
    start = time.perf_counter()
    found = probes(edits, pool)
    if unedited is not None:
        known = {r["prompt"]: r for kind in ("locality", "neighbourhood") for r in unedited.get(kind, [])}
        missing = [r["prompt"] for kind in ("locality", "neighbourhood") for r in found[kind] if r["prompt"] not in known]
        if missing:
            raise UserError(f"the unedited model's record has no answer to the probe {missing[0]!r}: record it "
                            "with the same edits and locality pool (or a superset)")
    questions, owners = [], []  # owners[i] = (edit index, kind, position)
    for e, row in enumerate(edits):
        questions.append(row["prompt"])
        owners.append((e, "prompt", 0))
        for j, p in enumerate(row.get("paraphrases", [])):
            questions.append(p)
            owners.append((e, "paraphrase", j))
    n_edit = len(questions)
    probe_items = [(kind, r) for kind in ("locality", "neighbourhood") for r in found[kind]]
    questions += [r["prompt"] for _, r in probe_items]
    pairs = [{"question": q, "answer": edits[owner[0]][field]} for q, owner in zip(questions, owners)
             for field in ("new_answer", "old_answer")]
    n_mc = len(pairs)
    recorded = [] if unedited is None else [known[r["prompt"]] for _, r in probe_items]
    pairs += [{"question": r["prompt"], "answer": r["unedited"]} for r in recorded]
    answers, scores = _run(model, tokenizer, questions, pairs, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           max_length=max_length, dequantize=dequantize, progress=progress, label="edits")
    nll, predicted = scores[0], scores[1]

    per_edit: list[dict[str, Any]] = []
    for row in edits:
        key, old_key = key_span(row["old_answer"], row["new_answer"]), key_span(row["new_answer"], row["old_answer"])
        per_edit.append({"prompt": row["prompt"], "key": key, "old_key": old_key, "paraphrases": []})
    for i, (question, text, owner) in enumerate(zip(questions[:n_edit], answers[:n_edit], owners)):
        item = per_edit[owner[0]]
        edited, old = is_edited(text, item["key"], item["old_key"]), mentions(text, item["old_key"])
        mc = {"nll_new": nll[2 * i].item(), "nll_old": nll[2 * i + 1].item(), "mc_new": bool(nll[2 * i] < nll[2 * i + 1]),
              "degenerate": repeats_ngram(text)}
        if owner[1] == "prompt":
            item.update(answer=text, reliable=edited, old=old, **mc)
        else:
            item["paraphrases"].append({"prompt": question, "answer": text, "general": edited, **mc})

    probe_out: dict[str, list[dict[str, Any]]] = {"locality": [], "neighbourhood": []}
    for k, ((kind, r), text) in enumerate(zip(probe_items, answers[n_edit:])):
        entry = {"prompt": r["prompt"], "answer": text, "expected": r["answer"], "kept": mentions_any(text, r["answer"])}
        if unedited is not None:
            ref = recorded[k]
            got = predicted[n_mc + k]
            same = [a == b for a, b in zip(got, ref["tokens"])]
            entry.update(unedited=ref["unedited"], agreement=_share(same) if same else 1.0,
                         unedited_knew=mentions_any(ref["unedited"], r["answer"]))
        probe_out[kind].append(entry)

    general = [_share([p["general"] for p in item["paraphrases"]]) for item in per_edit if item["paraphrases"]]
    mc_prompt = [item["mc_new"] for item in per_edit]
    mc_para = [p["mc_new"] for item in per_edit for p in item["paraphrases"]]
    result: dict[str, Any] = {
        "n": len(edits),
        "reliability": _share([item["reliable"] for item in per_edit]),
        "generality": sum(general) / len(general) if general else None,
    }
    for kind, items in probe_out.items():
        result[kind] = _mean([x["agreement"] for x in items]) if unedited is not None else None
        result[f"{kind}_key"] = (_share([x["kept"] for x in items if x["unedited_knew"]])
                                 if unedited is not None else None)
        result[f"{kind}_absolute"] = _share([x["kept"] for x in items])
        result[f"n_{kind}"] = len(items)
    result.update({
        "old_rate": _share([item["old"] for item in per_edit]),
        "mc_accuracy": {"prompt": _share(mc_prompt), "paraphrases": _share(mc_para), "all": _share(mc_prompt + mc_para)},
        "degenerate": _share([item["degenerate"] for item in per_edit] + [p["degenerate"] for item in per_edit
                                                                          for p in item["paraphrases"]]),
        "wall_s": round(time.perf_counter() - start, 2),
        "per_edit": per_edit,
        "probes": probe_out,
    })
    return result
