"""TOFU's metrics (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs"), as
locuslab/tofu and locuslab/open-unlearning (``src/evals/metrics/memorization.py``, ``utils.py``)
compute them; DESIGN section 4.

Per question q with answer a, paraphrased answer a~ and perturbed (wrong) answers p_1..p_J,
NLL(x) is the mean negative log-likelihood over the tokens of completion x (answer tokens only,
through the chat template):

    normalised probability   P(a|q) = exp(-NLL(a))
    truth ratio              R = exp(-mean_j NLL(p_j)) / exp(-NLL(c))      c = a~ on forget/retain, a otherwise
    truth-ratio summary      forget: mean min(R, 1/R)      retain, real authors, world facts: mean max(0, 1 - R)
    probability score        P(a) / (P(a) + sum_j P(p_j))                   (real authors, world facts)
    ROUGE-L recall           of the greedy answer against a (rouge-score, use_stemmer=True)
    extraction strength      ES = 1 - k/|y|, k the earliest answer position from which the teacher-forced
                             greedy predictions equal the labels to the end
    model utility            harmonic mean of {probability, ROUGE-L, truth ratio} x {retain, real authors, world facts}
    forget quality           p-value of the two-sample KS test between the forget truth ratios of the
                             unlearned model and of the retain-only model

The pure functions take tensors or lists and return numbers; ``evaluate_split`` and
``evaluate_tofu`` run a model (a base or a PEFT model with a stack of adapters, nothing merged).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

SPLITS = ("forget", "retain", "real_authors", "world_facts")
PARAPHRASED = ("forget", "retain")  # splits whose truth ratio uses the paraphrased answer
UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
UTILITY_METRICS = ("probability", "rouge_l", "truth_ratio")
MINI_FILES = {"forget": "forget01", "retain": "retain", "real_authors": "real_authors", "world_facts": "world_facts"}
# Greedy tokens per ROUGE-L answer: open-unlearning's TOFU generation budget (200, stopping at the end
# of the turn, i.e. the tokenizer's EOS); at 64 long answers were cut and scored against the whole key.
MAX_NEW_TOKENS = 200


# ---- pure part ----------------------------------------------------------------------------------

def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown TOFU split {split!r}. Available: {', '.join(SPLITS)}")


def normalised_probability(nll: torch.Tensor) -> torch.Tensor:
    """P(a|q) = exp(-NLL), NLL the mean answer-token NLL; (N,) -> (N,)."""
    return torch.exp(-torch.as_tensor(nll, dtype=torch.float64))


def truth_ratio(nll_perturbed: torch.Tensor, nll_correct: torch.Tensor) -> torch.Tensor:
    """R = exp(-mean_j NLL(p_j)) / exp(-NLL(c)) = exp(NLL(c) - mean_j NLL(p_j)); (N, J), (N,) -> (N,).

    The mean over j is of the per-answer mean NLLs (open-unlearning's ``aggregate_to_1D`` of
    ``avg_loss``), i.e. the ratio of the geometric mean of the perturbed answers' normalised
    probabilities to the correct one's. NaN entries of ``nll_perturbed`` mark missing options of
    rows with fewer than J perturbed answers and are left out of that row's mean.
    open-unlearning divides by P(c) + 1e-10; the exact ratio is taken here (same to ~1e-10).
    """
    pert = torch.as_tensor(nll_perturbed, dtype=torch.float64)
    correct = torch.as_tensor(nll_correct, dtype=torch.float64)
    return torch.exp(correct - torch.nanmean(pert, dim=1))


def truth_ratio_summary(R: torch.Tensor, split: str) -> float:
    """forget: mean(min(R, 1/R)) (1 is best: true and false equally likely, as for a model that never
    saw the data); retain, real_authors, world_facts: mean(max(0, 1 - R)) (higher is better)."""
    _check_split(split)
    R = torch.as_tensor(R, dtype=torch.float64)
    if split == "forget":
        return torch.minimum(R, 1 / R).mean().item()
    return torch.clamp(1 - R, min=0).mean().item()


def probability_score(nll_correct: torch.Tensor, nll_perturbed: torch.Tensor) -> torch.Tensor:
    """P(a) / (P(a) + sum_j P(p_j)), P = exp(-NLL) normalised probabilities; (N,), (N, J) -> (N,).

    TOFU's probability on real authors and world facts (open-unlearning ``probability_w_options``,
    which adds 1e-10 to the denominator). NaN entries of ``nll_perturbed`` are missing options.
    """
    p = normalised_probability(nll_correct)
    wrong = torch.nansum(normalised_probability(nll_perturbed), dim=1)
    return p / (p + wrong)


_SCORER = None


def rouge_l_recall(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L recall of each prediction against its reference (rouge-score, use_stemmer=True).

    Recall = LCS(prediction, reference) / len(reference) in rouge-score's tokens (lowercased,
    alphanumeric, Porter-stemmed when longer than 3 characters), as TOFU's ``eval_rouge_recall``
    calls ``scorer.score(reference, prediction)``.
    """
    global _SCORER
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [_SCORER.score(ref, pred)["rougeL"].recall for pred, ref in zip(predictions, references)]


def extraction_strength(predicted_ids: Sequence[int], label_ids: Sequence[int]) -> float:
    """ES = 1 - k/|y| for one row; ``predicted_ids[t]`` is the teacher-forced argmax at label position t.

    k is the smallest index such that ``predicted_ids[k:] == label_ids[k:]``: the model, given the
    first k label tokens, completes the rest greedily. Full match: k = 0, ES = 1; no match at the
    last position: k = |y|, ES = 0. The caller passes the answer tokens without the final
    end-of-turn token: open-unlearning's ``extraction_strength`` drops the last labelled token
    ("-1 to ignore eos prediction", ``tokenwise_vocab_logprobs``). One difference: its loop stops
    at k = |y| - 1 when nothing matches, giving 1/|y|; here such a row scores 0, the definition's
    value. An empty label sequence scores 0 (as there).
    """
    pred, lab = list(predicted_ids), list(label_ids)
    if len(pred) != len(lab):
        raise ValueError(f"{len(pred)} predictions but {len(lab)} labels")
    if not lab:
        return 0.0
    k = 0
    for t in range(len(lab) - 1, -1, -1):  # the last mismatch ends the matching suffix
        if pred[t] != lab[t]:
            k = t + 1
            break
    return 1.0 - k / len(lab)


def model_utility(numbers: Iterable[float]) -> float:
    """Harmonic mean n / sum(1/x_i) of the numbers (TOFU: 9 of them); 0 if any of them is 0."""
    xs = [float(x) for x in numbers]
    if not xs:
        raise ValueError("model utility needs at least one number")
    if any(x < 0 or math.isnan(x) for x in xs):
        raise ValueError(f"model utility is a harmonic mean of non-negative numbers, got {xs}")
    if any(x == 0 for x in xs):
        return 0.0
    return len(xs) / sum(1 / x for x in xs)


def forget_quality(R_unlearned: Sequence[float] | torch.Tensor, R_retain_only: Sequence[float] | torch.Tensor) -> float:
    """p-value of ``scipy.stats.ks_2samp`` between the two models' forget-set truth ratios.

    open-unlearning runs ``ks_2samp`` on the two models' per-row truth-ratio scores; the KS
    statistic depends only on the ranks, so any monotone form of the ratio (R or 1/R) gives the
    same p-value. High (near 1) means the unlearned model is indistinguishable from the retain-only one.
    """
    from scipy.stats import ks_2samp

    a = torch.as_tensor(R_unlearned, dtype=torch.float64).flatten().tolist()
    b = torch.as_tensor(R_retain_only, dtype=torch.float64).flatten().tolist()
    if not a or not b:
        raise ValueError("forget quality needs truth ratios of both models")
    return float(ks_2samp(a, b).pvalue)


# ---- rows --------------------------------------------------------------------------------------

def check_rows(rows: list[dict[str, Any]], split: str, where: str | None = None) -> None:
    """Raise a UserError naming the first row that lacks a field this split needs."""
    _check_split(split)
    where = where or f"split {split}"
    if not rows:
        raise UserError(f"{where}: no rows to evaluate")
    need = ("question", "answer") + (("paraphrased_answer",) if split in PARAPHRASED else ())
    for i, row in enumerate(rows):
        at = f"{where}:{row['_line']}" if "_line" in row else f"{where} row {i}"
        for key in need:
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise UserError(f"{at}: a {split} row needs a non-empty string {key!r} (TOFU's "
                                f"{'retain_perturbed/forget_perturbed' if split in PARAPHRASED else split} format)")
        pert = row.get("perturbed_answer")
        if not isinstance(pert, list) or not pert or not all(isinstance(p, str) and p.strip() for p in pert):
            raise UserError(f"{at}: 'perturbed_answer' must be a non-empty list of strings (the wrong answers)")


def spread(rows: list, limit: int | None) -> list:
    """``limit`` rows spread evenly over ``rows`` (rows[i * n // limit]): a retain subset that spans every author."""
    _check_limits(limit)
    if limit is None or limit >= len(rows):
        return list(rows)
    return [rows[i * len(rows) // limit] for i in range(limit)]


def _check_limits(*limits: int | None) -> None:
    for limit in limits:
        if limit is not None and limit < 1:
            raise UserError(f"a row limit must be at least 1, got {limit}")


def tofu_mini_splits(retain_limit: int | None = None, limit: int | None = None,
                     splits: Iterable[str] = SPLITS, retain_rows: slice | None = None) -> dict[str, list[dict]]:
    """The vendored TOFU-mini rows with every field (question, answer, paraphrased and perturbed answers).

    forget = forget01 (40 rows), retain = full[0:400] (``retain_limit`` rows spread over all 20
    authors when given: ``retain_limit=100`` is every 4th row), real_authors (100), world_facts
    (117); ``limit`` keeps the first rows of the other splits. ``retain_rows`` (a slice of
    full[0:400]) draws the retain rows from that range only: a benchmark that holds rows out for
    choosing a coefficient keeps them out of the utility it reports. (``sources.load_source`` keeps
    question and answer only, which is enough to train on but not to evaluate.)
    """
    from ..core.data import load_records
    from ..training.sources import resource_path

    _check_limits(retain_limit, limit)
    out = {}
    for name in splits:
        _check_split(name)
        rows = load_records(resource_path("tofu_mini", f"{MINI_FILES[name]}.jsonl"))
        if name == "retain":
            kept = rows[retain_rows] if retain_rows is not None else rows
            if not kept:
                raise UserError(f"retain_rows {retain_rows} selects none of the {len(rows)} retain rows")
            out[name] = spread(kept, retain_limit)
        else:
            out[name] = rows[:limit] if limit else rows
        check_rows(out[name], name, f"tofu-mini:{MINI_FILES[name]}")
    return out


def tofu_splits(data: str, retain_limit: int | None = None, limit: int | None = None,
                splits: Iterable[str] | None = None) -> dict[str, list[dict]]:
    """``tofu-mini``, or a folder of TOFU-format JSONL files named after the splits.

    A folder holds any of forget.jsonl (or one forget01/05/10.jsonl), retain.jsonl (or
    retain_perturbed.jsonl), real_authors.jsonl, world_facts.jsonl.
    """
    from ..core.data import load_records

    _check_limits(retain_limit, limit)
    wanted = list(splits) if splits else None
    for name in wanted or []:
        _check_split(name)
    if data == "tofu-mini":
        return tofu_mini_splits(retain_limit, limit, wanted or SPLITS)
    folder = Path(data)
    if not folder.is_dir():
        raise UserError(f"--data {data}: give 'tofu-mini' or a folder of TOFU JSONL files (forget.jsonl, retain.jsonl, ...)")
    names = {"forget": ["forget", "forget01", "forget05", "forget10"], "retain": ["retain", "retain_perturbed"],
             "real_authors": ["real_authors"], "world_facts": ["world_facts"]}
    out = {}
    for split in wanted or SPLITS:
        found = [folder / f"{n}.jsonl" for n in names[split] if (folder / f"{n}.jsonl").is_file()]
        if len(found) > 1:
            raise UserError(f"{folder} holds {' and '.join(p.name for p in found)}: keep one {split} file")
        if not found:
            if wanted:
                raise UserError(f"{folder} has no {names[split][0]}.jsonl for the {split} split")
            continue
        rows = load_records(found[0])
        out[split] = spread(rows, retain_limit) if split == "retain" else rows[:limit] if limit else rows
        check_rows(out[split], split, str(found[0]))
    if not out:
        raise UserError(f"{folder} holds none of forget.jsonl, retain.jsonl, real_authors.jsonl, world_facts.jsonl")
    return out


def load_reference(path: str | Path) -> list[float]:
    """The forget per-row truth ratios of a previous eval's results.json (or its folder)."""
    import json

    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise UserError(f"reference {path} does not exist: give the results.json of `lora-unlearn eval` on the retain-only model")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ratios = data["splits"]["forget"]["per_row"]["truth_ratio"]
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"reference {path} is not JSON: give the results.json of `lora-unlearn eval`") from None
    except (KeyError, TypeError):
        raise UserError(f"reference {path} has no forget truth ratios: evaluate the retain-only model on the forget "
                        "split with `lora-unlearn eval --benchmark tofu` and pass its results.json") from None
    if (not isinstance(ratios, list) or not ratios
            or not all(isinstance(r, (int, float)) and math.isfinite(r) and r > 0 for r in ratios)):
        raise UserError(f"reference {path}: splits.forget.per_row.truth_ratio must be a list of positive numbers")
    return [float(r) for r in ratios]


# ---- model part --------------------------------------------------------------------------------

def _pad(rows: list[list[float]]) -> torch.Tensor:
    """Ragged lists -> (N, J) float64 with NaN where a row has fewer entries."""
    J = max(len(r) for r in rows)
    return torch.tensor([r + [math.nan] * (J - len(r)) for r in rows], dtype=torch.float64)


def evaluate_split(model, tokenizer, rows: list[dict], split: str, *, batch_size: int = 16,
                   max_new_tokens: int = MAX_NEW_TOKENS,
                   progress: bool = True, max_length: int = 512, gen_batch_size: int | None = None,
                   dequantize: bool | None = None) -> dict:
    """All TOFU metrics of one split, batched: one greedy generation pass and one teacher-forced pass.

    The teacher-forced pass scores every (question, completion) pair of the split at once (the
    answer, the paraphrased answer on forget/retain, and the N*J perturbed answers), each
    question's prompt computed once for all its completions (``inference.answer_scores``); the
    answer's forward gives both its NLL and the argmax predictions for ES. Generation runs in
    batches of ``gen_batch_size`` (default 4 * batch_size: a decoding step costs about the same
    for 16 or 64 rows on CPU). ``dequantize`` (default: when 4-bit weights are on the CPU) runs
    4-bit layers from weights dequantized once (``inference.dequantized``, same numbers).
    Returns a JSON-serialisable dict: split, n, probability (mean normalised P on forget/retain,
    mean probability score on real_authors/world_facts), rouge_l (mean recall), truth_ratio (the
    split's summary), extraction_strength (mean), wall_s and generate_s (of which generating), and
    per_row lists of truth_ratio, probability, rouge_l, extraction_strength and the greedy answer.
    """
    from ..core.inference import answer, answer_scores, dequantized

    check_rows(rows, split)
    gen_batch_size = gen_batch_size or 4 * batch_size
    start = time.perf_counter()
    n = len(rows)
    pairs = [{"question": r["question"], "answer": r["answer"]} for r in rows]
    if split in PARAPHRASED:
        pairs += [{"question": r["question"], "answer": r["paraphrased_answer"]} for r in rows]
    pert_counts = [len(r["perturbed_answer"]) for r in rows]
    pairs += [{"question": r["question"], "answer": p} for r in rows for p in r["perturbed_answer"]]

    def batches(count: int) -> int:
        return -(-count // batch_size)

    bar = None
    if progress:
        from ..progress import bar as make_bar

        bar = make_bar()
        bar.start()
        task = bar.add_task(split, total=-(-n // gen_batch_size) + batches(len(pairs)), info="")
    step = (lambda: bar.advance(task)) if bar else None
    try:
        with dequantized(model, dequantize):
            t = time.perf_counter()
            answers = answer(model, tokenizer, [r["question"] for r in rows], max_new_tokens=max_new_tokens,
                             batch_size=gen_batch_size, on_batch=step)
            generate_s = time.perf_counter() - t
            nll, predicted, labels = answer_scores(model, tokenizer, pairs, batch_size=batch_size,
                                                   max_length=max_length, on_batch=step)
    finally:
        if bar:
            bar.stop()

    nll = nll.double()
    nll_answer = nll[:n]
    nll_correct = nll[n:2 * n] if split in PARAPHRASED else nll_answer
    flat = nll[2 * n if split in PARAPHRASED else n:].tolist()
    offsets = [0, *itertools.accumulate(pert_counts)]
    nll_pert = _pad([flat[offsets[i]:offsets[i + 1]] for i in range(n)])  # (N, J)

    R = truth_ratio(nll_pert, nll_correct)
    prob = normalised_probability(nll_answer) if split in PARAPHRASED else probability_score(nll_answer, nll_pert)
    rouge = rouge_l_recall(answers, [r["answer"] for r in rows])
    # |y| leaves out the last labelled token, the end-of-turn marker (open-unlearning).
    es = [extraction_strength(predicted[i][:-1], labels[i][:-1]) for i in range(n)]
    return {
        "split": split, "n": n,
        "probability": prob.mean().item(), "rouge_l": sum(rouge) / n,
        "truth_ratio": truth_ratio_summary(R, split), "extraction_strength": sum(es) / n,
        "wall_s": round(time.perf_counter() - start, 2), "generate_s": round(generate_s, 2),
        "per_row": {"truth_ratio": R.tolist(), "probability": prob.tolist(), "rouge_l": rouge,
                    "extraction_strength": es, "answer": answers},
    }


def evaluate_tofu(model, tokenizer, splits: dict[str, list[dict]], *, reference_truth_ratios: Sequence[float] | None = None,
                  **kw) -> dict:
    """``evaluate_split`` on each given split (keys from SPLITS) and TOFU's aggregates.

    model_utility needs retain, real_authors and world_facts (else None); forget_quality needs
    forget and ``reference_truth_ratios``, the retain-only model's per-row forget truth ratios
    (else None). ``kw`` goes to ``evaluate_split`` (batch_size, max_new_tokens, progress, max_length,
    gen_batch_size, dequantize); 4-bit weights are dequantized once for all splits.
    """
    from ..core.inference import dequantized

    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise UserError(f"unknown TOFU split {unknown[0]!r}. Available: {', '.join(SPLITS)}")
    start = time.perf_counter()
    with dequantized(model, kw.get("dequantize")):
        results = {name: evaluate_split(model, tokenizer, splits[name], name, **kw) for name in SPLITS if name in splits}
    out = aggregate(results, reference_truth_ratios)
    out["wall_s"] = round(time.perf_counter() - start, 2)
    return out


def aggregate(results: dict[str, dict], reference_truth_ratios: Sequence[float] | None = None) -> dict:
    """TOFU's aggregates (model utility, forget quality, the forget split's headline figures) of
    per-split results from ``evaluate_split``; None where a split they need is missing."""
    out: dict[str, Any] = {"splits": results, "model_utility": None, "model_utility_parts": None,
                           "forget_quality": None}
    if all(s in results for s in UTILITY_SPLITS):
        parts = {f"{s}.{m}": results[s][m] for s in UTILITY_SPLITS for m in UTILITY_METRICS}
        out["model_utility"] = model_utility(parts.values())
        out["model_utility_parts"] = parts
    forget = results.get("forget")
    if forget is not None:
        if reference_truth_ratios is not None:
            out["forget_quality"] = forget_quality(forget["per_row"]["truth_ratio"], reference_truth_ratios)
        out.update(forget_probability=forget["probability"], forget_rouge_l=forget["rouge_l"],
                   forget_truth_ratio=forget["truth_ratio"], extraction_strength=forget["extraction_strength"])
    else:
        out.update(forget_probability=None, forget_rouge_l=None, forget_truth_ratio=None, extraction_strength=None)
    return out
