"""Tests written to kill the mutants of the pure metric code (evaluate/tofu.py, evaluate/edits.py,
core/text.py) that survived the 2026-12-02 run of `make mutation`; docs/testing.md lists the ones
left as equivalent.

Each test names the mutants it kills (mutmut's ``x_FUNCTION__mutmut_N``); every expected value is
worked out by hand in the comments. Error messages are matched whole where a mutant changes only them.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from lora_unlearn.core.text import repeats_ngram
from lora_unlearn.errors import UserError
from lora_unlearn.evaluate import tofu
from lora_unlearn.evaluate.edits import key_span, probes
from lora_unlearn.evaluate.tofu import (
    _pad,
    check_rows,
    extraction_strength,
    forget_quality,
    load_reference,
    model_utility,
    rouge_l_recall,
    spread,
    tofu_mini_splits,
    tofu_splits,
    truth_ratio,
    truth_ratio_summary,
)


def _exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


# ---- core/text.py and evaluate/edits.py ---------------------------------------------------------

def test_repeats_ngram_on_seven_distinct_words_and_a_repeat_at_the_end():
    # x_repeats_ngram 6 (words[i:i - n]): from i = n on the slices are empty, and with 7 words there are
    # two of them (i = 3, 4), so the mutant sees a "repeat"; 7 distinct words have none.
    assert not repeats_ngram("one two three four five six seven")
    assert repeats_ngram("a b c a b c")  # grams abc, bca, cab, abc: the last one repeats the first


def test_key_span_when_new_repeats_old_and_when_nothing_differs():
    # x_key_span 19 (end <= ...): old = [lyon], new = [lyon, lyon]; the common prefix is 1 word, so at most
    # min(1, 2) - 1 = 0 words are left for the suffix, and the key is new[1:2] = "lyon" (the mutant strips
    # the suffix too and falls back to the whole answer "lyon lyon").
    assert key_span("Lyon", "Lyon Lyon") == "lyon"
    # x_key_span 42: nothing differs -> the whole normalised new answer, words joined by one space
    assert key_span("It is Paris.", "It is Paris.") == "it is paris"


def test_probes_are_deduplicated_and_exclude_edited_prompts():
    # x_probes 5/6/8/9/10 (the paraphrases left out of the edited prompts, or *None for a row without
    # paraphrases), 16 (`or`: duplicates kept), 19 (seen.add(None): duplicates kept)
    edits = [
        {"prompt": "Q one?", "paraphrases": ["Para one?"],
         "locality": [{"prompt": "L1", "answer": "x"}, {"prompt": "l1!", "answer": "y"},  # same after normalise
                      {"prompt": "para ONE", "answer": "z"}],  # the edit's own paraphrase: not a probe
         "neighbourhood": [{"prompt": "N1", "answer": "n"}, {"prompt": "n1", "answer": "m"}]},
        {"prompt": "Q two", "locality": [{"prompt": "L2", "answer": "w"}]},  # no paraphrases key
    ]
    pool = [{"prompt": "L2.", "answer": "dup"}, {"prompt": "q one", "answer": "edited"}]
    assert probes(edits, pool) == {"locality": [{"prompt": "L1", "answer": "x"}, {"prompt": "L2", "answer": "w"}],
                                   "neighbourhood": [{"prompt": "N1", "answer": "n"}]}


# ---- evaluate/tofu.py: formulas ------------------------------------------------------------------

def test_truth_ratio_and_summary_work_in_float64():
    # x_truth_ratio 3/5/8/10, x_truth_ratio_summary 4/6: lists converted without dtype become float32,
    # where 1 + 1e-10 rounds to 1. R = exp(NLL(c) - mean NLL(p)): exp(-1e-10) and exp(1e-10).
    low = truth_ratio([[1.0 + 1e-10]], [1.0])
    high = truth_ratio([[1.0]], [1.0 + 1e-10])
    assert low.dtype == high.dtype == torch.float64
    assert 1 - low.item() == pytest.approx(1e-10, rel=1e-4) and high.item() - 1 == pytest.approx(1e-10, rel=1e-4)
    # retain summary max(0, 1 - R) with R = 1 - 1e-10: 1e-10 (float32 gives 0)
    assert truth_ratio_summary([1.0 - 1e-10], "retain") == pytest.approx(1e-10, rel=1e-4)
    # x__check_split 4: the list of splits in the message
    with pytest.raises(UserError, match=_exact(
            "unknown TOFU split 'holdout'. Available: forget, retain, real_authors, world_facts")):
        truth_ratio_summary([1.0], "holdout")


def test_forget_quality_works_in_float64_and_needs_both_samples():
    # x_forget_quality 3/5 (a in float32), 8/10 (b in float32): 1 + 1e-10 and 1 collide in float32 (D = 0,
    # p = 1). In float64 the five values of one model all lie above the five of the other: D = 1, and the
    # exact two-sided p-value is 2 / C(10, 5) = 2 / 252.
    assert forget_quality([1.0 + 1e-10] * 5, [1.0] * 5) == pytest.approx(2 / 252, rel=1e-6)
    assert forget_quality([1.0] * 5, [1.0 + 1e-10] * 5) == pytest.approx(2 / 252, rel=1e-6)
    # x_forget_quality 11 (`and`: scipy's own error instead), 14/15/16 (the message)
    with pytest.raises(ValueError, match=_exact("forget quality needs truth ratios of both models")):
        forget_quality([], [1.0])


def test_rouge_l_recall_builds_its_scorer_with_the_stemmer(monkeypatch):
    # x_rouge_l_recall 3-12: the scorer is built once per process, so a test run after another never
    # builds it; resetting the cache (not a mock: the real rouge-score scorer is built) makes this call
    # build it. With the stemmer "cats running" and "cat run" are the same two tokens: recall 1; without
    # (mutants 6, 8, 12) 0.
    monkeypatch.setattr(tofu, "_SCORER", None)
    assert rouge_l_recall(["cat run"], ["cats running"]) == [1.0]
    # x_rouge_l_recall 2: the message
    with pytest.raises(ValueError, match=_exact("2 predictions but 1 references")):
        rouge_l_recall(["a", "b"], ["a"])


def test_metric_messages_and_model_utility_refuses_negatives_and_nan():
    # x_extraction_strength 5
    with pytest.raises(ValueError, match=_exact("1 predictions but 2 labels")):
        extraction_strength([1], [1, 2])
    # x_model_utility 4/5/6
    with pytest.raises(ValueError, match=_exact("model utility needs at least one number")):
        model_utility([])
    # x_model_utility 8 (`and`): -0.5 is refused (the mutant returns 2 / (-2 + 1) = -2), and so is NaN;
    # 12: the message
    with pytest.raises(ValueError, match=_exact("model utility is a harmonic mean of non-negative numbers, got [-0.5, 1.0]")):
        model_utility([-0.5, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        model_utility([math.nan])


def test_pad_is_float64_with_nan_for_missing_options():
    # x__pad 4/6: float32 would round 1 + 1e-10 to 1
    got = _pad([[1.0 + 1e-10, 2.0], [3.0]])
    assert got.dtype == torch.float64 and got[0, 0].item() - 1 == pytest.approx(1e-10, rel=1e-4)
    assert got[1, 0].item() == 3.0 and math.isnan(got[1, 1].item())


# ---- evaluate/tofu.py: rows, limits, files ---------------------------------------------------------

def _row(**kw):
    return {"question": "q", "answer": "a", "paraphrased_answer": "p", "perturbed_answer": ["w"], **kw}


def test_check_rows_messages_and_perturbed_answers():
    # x_check_rows 5
    with pytest.raises(UserError, match=_exact("split forget: no rows to evaluate")):
        check_rows([], "forget")
    # x_check_rows 30/31/32/33/34: the format named after the split
    with pytest.raises(UserError, match=_exact(
            "split forget row 0: a forget row needs a non-empty string 'answer' (TOFU's "
            "retain_perturbed/forget_perturbed format)")):
        check_rows([_row(answer="")], "forget")
    with pytest.raises(UserError, match=_exact(
            "split world_facts row 0: a world_facts row needs a non-empty string 'answer' (TOFU's world_facts format)")):
        check_rows([_row(answer=" ")], "world_facts")
    # x_check_rows 39/45: a non-empty list holding a blank answer; 40: a string instead of a list; 46: message
    for bad in (["wrong", " "], "wrong"):
        with pytest.raises(UserError, match=_exact(
                "split retain row 0: 'perturbed_answer' must be a non-empty list of strings (the wrong answers)")):
            check_rows([_row(perturbed_answer=bad)], "retain")


def test_spread_limits():
    # x_spread 1 (the limit not checked), x__check_limits 3/4 (1 refused): 1 row of 3 is rows[0]
    assert spread([10, 11, 12], 1) == [10]
    with pytest.raises(UserError, match=_exact("a row limit must be at least 1, got 0")):
        spread([10, 11], 0)


def test_tofu_mini_splits_and_tofu_splits_pass_their_limits_on():
    # x_tofu_mini_splits 1-4: both limits checked; 0 is refused (the limit=0 mutant keeps every row)
    for kw in ({"retain_limit": 0}, {"limit": 0}):
        with pytest.raises(UserError, match="at least 1"):
            tofu_mini_splits(splits=["forget"], **kw)
    # x_tofu_splits 12/13 ("tofu-mini" misspelt), 14/15/17/18 (limits dropped or shifted), 16/19/20 (splits):
    # the 40 forget rows cut to 2, the 400 retain rows spread to 3, and only the two splits asked for
    got = tofu_splits("tofu-mini", retain_limit=3, limit=2, splits=["forget", "retain"])
    assert sorted(got) == ["forget", "retain"] and len(got["forget"]) == 2 and len(got["retain"]) == 3


def _write(folder, name, rows):
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_tofu_splits_reads_a_folder(tmp_path):
    forget = [_row(question=f"f{i}") for i in range(3)]
    retain = [_row(question=f"r{i}") for i in range(4)]
    # x_tofu_splits 34/35 (forget10), 40/41 (retain_perturbed): the alternative file names
    _write(tmp_path, "forget10.jsonl", forget)
    _write(tmp_path, "retain_perturbed.jsonl", retain)
    # 69/70/72/75/76/77 (retain spread, the others cut), 78 (limit ignored): retain_limit 2 of 4 rows ->
    # rows 0 and 2; limit 1 -> the first forget row (a spread would give f0 and f1)
    got = tofu_splits(str(tmp_path), retain_limit=2, limit=1)
    assert [r["question"] for r in got["forget"]] == ["f0"] and [r["question"] for r in got["retain"]] == ["r0", "r2"]
    # x_tofu_splits 1-4: limits checked even for a folder that has no retain file
    only_forget = tmp_path / "only_forget"
    only_forget.mkdir()
    _write(only_forget, "forget.jsonl", forget)
    for kw in ({"retain_limit": 0}, {"limit": 0}):
        with pytest.raises(UserError, match="at least 1"):
            tofu_splits(str(only_forget), **kw)
    # x_tofu_splits 62/63: the missing split names its first file name
    with pytest.raises(UserError, match=_exact(f"{only_forget} has no retain.jsonl for the retain split")):
        tofu_splits(str(only_forget), splits=["retain"])
    # x_tofu_splits 64 (`break` for a missing split): no forget file, but a retain file further on
    only_retain = tmp_path / "only_retain"
    only_retain.mkdir()
    _write(only_retain, "retain.jsonl", retain)
    assert list(tofu_splits(str(only_retain))) == ["retain"]
    # x_tofu_splits 59/60: two forget files
    _write(only_forget, "forget01.jsonl", forget)
    with pytest.raises(UserError, match=_exact(f"{only_forget} holds forget.jsonl and forget01.jsonl: keep one forget file")):
        tofu_splits(str(only_forget))
    # x_tofu_splits 89: an empty folder
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=_exact(
            f"{empty} holds none of forget.jsonl, retain.jsonl, real_authors.jsonl, world_facts.jsonl")):
        tofu_splits(str(empty))


def test_load_reference_refuses_ratios_that_are_not_positive_finite_numbers(tmp_path):
    path = tmp_path / "results.json"

    def write(ratios):
        path.write_text(json.dumps({"splits": {"forget": {"per_row": {"truth_ratio": ratios}}}}), encoding="utf-8")

    write([0.5, 2])
    assert load_reference(tmp_path) == [0.5, 2.0]
    # x_load_reference 27/36 (0 accepted), 28 ([] accepted, 5 iterated), 33 (inf accepted), 34 ("x"), 38: message
    for bad in ([1.0, 0.0], [], 5, [math.inf], ["x"]):
        write(bad)
        with pytest.raises(UserError, match=_exact(
                f"reference {path}: splits.forget.per_row.truth_ratio must be a list of positive numbers")):
            load_reference(path)
    # x_load_reference 25/26: the advice, whole
    path.write_text(json.dumps({"splits": {}}), encoding="utf-8")
    with pytest.raises(UserError, match=_exact(
            f"reference {path} has no forget truth ratios: evaluate the retain-only model on the forget split with "
            "`lora-unlearn eval --benchmark tofu` and pass its results.json")):
        load_reference(path)


# ---- evaluate/tofu.py: evaluate_tofu's output (tiny model, about a second) ---------------------------

ROWS = [{"question": "What is the capital of Veloria?", "answer": "Marrenport.", "paraphrased_answer": "It is Marrenport.",
         "perturbed_answer": ["Osric.", "The fox."]},
        {"question": "What jumps?", "answer": "The quick brown fox.", "paraphrased_answer": "A fox jumps.",
         "perturbed_answer": ["The dog."]}]


def test_evaluate_tofu_output_fields(tiny_model_dir):
    from lora_unlearn.core.models import load_base
    from lora_unlearn.evaluate.tofu import evaluate_split, evaluate_tofu

    model, tok, _ = load_base(str(tiny_model_dir), "none")
    # x_evaluate_tofu 1/6/7/8/9: an unknown split is refused, by name
    with pytest.raises(UserError, match=_exact(
            "unknown TOFU split 'holdout'. Available: forget, retain, real_authors, world_facts")):
        evaluate_tofu(model, tok, {"holdout": ROWS}, progress=False)
    # x_evaluate_tofu 34/35 (a key renamed), 81-84 (a forget field left out), 85-92 (wall_s): without a forget
    # split every forget field is None, and wall_s is a float number of seconds of this call (well under 60)
    got = evaluate_tofu(model, tok, {"retain": ROWS[:1]}, max_new_tokens=1, progress=False)
    assert set(got) == {"splits", "model_utility", "model_utility_parts", "forget_quality", "forget_probability",
                        "forget_rouge_l", "forget_truth_ratio", "extraction_strength", "wall_s"}
    assert all(got[k] is None for k in set(got) - {"splits", "wall_s"})
    assert isinstance(got["wall_s"], float) and 0 <= got["wall_s"] < 60
    # x_evaluate_tofu 27 (the keyword arguments not passed on): the split equals evaluate_split run with the
    # same arguments (greedy, deterministic), here max_new_tokens=1 instead of the default 64
    alone = evaluate_split(model, tok, ROWS[:1], "retain", max_new_tokens=1, progress=False)
    assert got["splits"]["retain"]["per_row"] == alone["per_row"]
    # x_evaluate_tofu 65-72: each forget field is the forget split's own number
    got = evaluate_tofu(model, tok, {"forget": ROWS[:1]}, max_new_tokens=1, progress=False)
    forget = got["splits"]["forget"]
    assert (got["forget_probability"], got["forget_rouge_l"], got["forget_truth_ratio"], got["extraction_strength"]) == (
        forget["probability"], forget["rouge_l"], forget["truth_ratio"], forget["extraction_strength"])
