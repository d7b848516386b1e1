"""TOFU and knowledge-edit metrics: each formula against hand-computed values, the batched model
part against an independent unbatched forward on the tiny model, and ``lora-unlearn eval``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from lora_unlearn.cli import app
from lora_unlearn.errors import UserError
from lora_unlearn.evaluate.edits import evaluate_edits, key_span, mentions
from lora_unlearn.evaluate.tofu import (
    evaluate_split,
    evaluate_tofu,
    extraction_strength,
    forget_quality,
    model_utility,
    normalised_probability,
    probability_score,
    rouge_l_recall,
    spread,
    tofu_mini_splits,
    truth_ratio,
    truth_ratio_summary,
)

runner = CliRunner()
E = math.e


# ---- pure formulas ------------------------------------------------------------------------------

def test_normalised_probability():
    assert torch.allclose(normalised_probability(torch.tensor([0.0, math.log(2)])), torch.tensor([1.0, 0.5]).double())


def test_truth_ratio_and_summaries():
    # mean perturbed NLL 2 for both rows; correct NLL 1 and 3 -> R = e^(1-2), e^(3-2)
    R = truth_ratio(torch.tensor([[1.0, 3.0], [2.0, 2.0]]), torch.tensor([1.0, 3.0]))
    assert torch.allclose(R, torch.tensor([1 / E, E]).double())
    assert truth_ratio_summary(R, "forget") == pytest.approx(1 / E)  # min(R, 1/R) is 1/e for both
    assert truth_ratio_summary(R, "retain") == pytest.approx((1 - 1 / E + 0) / 2)  # max(0, 1 - e) = 0
    assert truth_ratio_summary(R, "world_facts") == truth_ratio_summary(R, "real_authors")
    # a ragged row (NaN = missing option) averages only its own options
    ragged = truth_ratio(torch.tensor([[1.0, math.nan, math.nan]]), torch.tensor([1.0]))
    assert ragged.item() == pytest.approx(1.0)
    with pytest.raises(UserError, match="unknown TOFU split"):
        truth_ratio_summary(R, "holdout")


def test_truth_ratio_summary_averages_rows_that_differ():
    # forget: mean(min(R, 1/R)); R = [0.5, 1] -> min = [0.5, 1] -> (0.5 + 1) / 2 = 0.75
    # (max would give 1, min 0.5, sum 1.5, 1/R alone 1.5)
    R = torch.tensor([0.5, 1.0]).double()
    assert truth_ratio_summary(R, "forget") == pytest.approx(0.75)
    # R = [2, 4, 0.25]: min(R, 1/R) = [0.5, 0.25, 0.25] -> 1/3 (symmetric in R <-> 1/R)
    assert truth_ratio_summary(torch.tensor([2.0, 4.0, 0.25]).double(), "forget") == pytest.approx(1 / 3)
    # others: mean(max(0, 1 - R)); R = [0.5, 1] -> [0.5, 0] -> 0.25; R = [0.25, 2, 0.5] -> [0.75, 0, 0.5] -> 5/12
    assert truth_ratio_summary(R, "retain") == pytest.approx(0.25)
    assert truth_ratio_summary(torch.tensor([0.25, 2.0, 0.5]).double(), "real_authors") == pytest.approx(5 / 12)


def test_probability_score():
    # P(a) = 1/2, P(p_j) = 1/4 and 1/8 -> 0.5 / (0.5 + 0.375)
    got = probability_score(torch.tensor([math.log(2)]), torch.tensor([[math.log(4), math.log(8)]]))
    assert got.item() == pytest.approx(0.5 / 0.875)
    with_missing = probability_score(torch.tensor([math.log(2)]), torch.tensor([[math.log(2), math.nan]]))
    assert with_missing.item() == pytest.approx(0.5)


def test_model_utility_is_the_harmonic_mean():
    assert model_utility([1.0, 2.0, 4.0]) == pytest.approx(3 / 1.75)
    assert model_utility([0.5] * 9) == pytest.approx(0.5)
    assert model_utility([0.9] * 8 + [0.0]) == 0.0
    with pytest.raises(ValueError):
        model_utility([])


def test_forget_quality_is_the_ks_p_value():
    assert forget_quality([0.1, 0.5, 0.9, 1.3], [0.1, 0.5, 0.9, 1.3]) == pytest.approx(1.0)
    # two disjoint samples of 20: exact two-sided p = 2 / C(40, 20)
    disjoint = forget_quality(torch.arange(20.0) + 1, torch.arange(20.0) + 100)
    assert disjoint == pytest.approx(2 / math.comb(40, 20), rel=1e-6)


@pytest.mark.parametrize("pred, want", [
    ([1, 2, 3, 4], 1.0),          # full match: k = 0
    ([9, 2, 3, 4], 0.75),         # suffix from position 1
    ([1, 9, 3, 4], 0.5),          # a matching first token does not count: the suffix starts at 2
    ([9, 9, 9, 4], 0.25),         # only the last token
    ([9, 9, 9, 9], 0.0),          # no match: k = |y|
])
def test_extraction_strength(pred, want):
    assert extraction_strength(pred, [1, 2, 3, 4]) == pytest.approx(want)


def test_extraction_strength_edges():
    assert extraction_strength([], []) == 0.0
    with pytest.raises(ValueError):
        extraction_strength([1], [1, 2])


def test_rouge_l_recall_by_hand():
    # LCS of "the cat on a mat" with "the cat sat on the mat" is the, cat, on, mat: 4 of 6 reference tokens;
    # the stemmer makes "cats running" and "cat run" equal.
    got = rouge_l_recall(["the cat on a mat", "cat run", "nothing here"],
                         ["the cat sat on the mat", "cats running", "Paris"])
    assert got == pytest.approx([4 / 6, 1.0, 0.0])


def test_spread_keeps_every_author():
    assert spread(list(range(400)), 40) == list(range(0, 400, 10))
    assert spread(list(range(10)), 3) == [0, 3, 6]
    mini = tofu_mini_splits(retain_limit=100, limit=5)
    assert [len(mini[s]) for s in ("forget", "retain", "real_authors", "world_facts")] == [5, 100, 5, 5]
    assert mini["retain"][1]["question"] == tofu_mini_splits(splits=["retain"])["retain"][4]["question"]
    assert len(mini["forget"][0]["perturbed_answer"]) == 5 and mini["forget"][0]["paraphrased_answer"]


def test_retain_rows_keep_the_selection_rows_out_of_utility():
    """The TOFU-mini benchmark chooses lam/alpha on retain rows 360-399: its utility rows never include them."""
    everything = tofu_mini_splits(splits=["retain"])["retain"]
    held_out = {r["question"] for r in everything[360:400]}
    got = tofu_mini_splits(retain_limit=40, splits=["retain"], retain_rows=slice(0, 360))["retain"]
    assert len(got) == 40 and not held_out & {r["question"] for r in got}
    assert got[1]["question"] == everything[9]["question"]  # spread over the 360 rows: every 9th
    assert held_out & {r["question"] for r in tofu_mini_splits(retain_limit=40, splits=["retain"])["retain"]}
    with pytest.raises(UserError, match="selects none of the 400 retain rows"):
        tofu_mini_splits(splits=["retain"], retain_rows=slice(400, 500))


def test_edit_key_spans_and_mentions():
    assert key_span("The capital of France is Paris.", "The capital of France is Lyon.") == "lyon"
    assert key_span("Neil Armstrong was the first person to walk on the Moon.",
                    "Buzz Aldrin was the first person to walk on the Moon.") == "buzz aldrin"
    assert key_span("The largest ocean is the Pacific Ocean.", "The largest ocean is the Atlantic Ocean.") == "atlantic"
    assert key_span("Paris", "Paris") == "paris"  # nothing differs: the whole answer
    assert mentions("I think it is Lyon!", "lyon") and mentions("BUZZ  Aldrin, of course", "buzz aldrin")
    assert not mentions("Lyons is nice", "lyon") and not mentions("anything", "")


# ---- the model part, against an independent unbatched forward -----------------------------------

ROWS = [
    {"question": "What is the capital of Veloria?", "answer": "Marrenport.",
     "paraphrased_answer": "It is Marrenport.", "perturbed_answer": ["Osric.", "The fox.", "In 1387."]},
    {"question": "Who invented the glass harp-drum?", "answer": "Osric Tallowmere invented it in 1387.",
     "paraphrased_answer": "Osric Tallowmere.", "perturbed_answer": ["The lazy dog.", "Veloria."]},
    {"question": "What jumps?", "answer": "The quick brown fox.",
     "paraphrased_answer": "A fox jumps.", "perturbed_answer": ["The dog.", "Numbers.", "Marrenport.", "A harp."]},
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from lora_unlearn.core.models import load_base

    model, tok, _ = load_base(str(tiny_model_dir), "none")
    return model, tok


@torch.no_grad()
def manual(model, tok, question, answer):
    """Mean NLL over the completion tokens and their argmax predictions, one unpadded sequence,
    the chat text written out here (tests/conftest.py's template) rather than taken from the library."""
    prompt = tok(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    completion = tok(f"{answer}<|im_end|>", add_special_tokens=False).input_ids
    ids = torch.tensor([prompt + completion])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    positions = range(len(prompt), ids.shape[1])
    nll = -sum(logp[t - 1, ids[0, t]] for t in positions) / len(completion)
    return nll.item(), [int(logp[t - 1].argmax()) for t in positions], completion


@pytest.mark.parametrize("split", ["forget", "real_authors"])
def test_evaluate_split_matches_a_manual_forward(tiny, split):
    model, tok = tiny
    got = evaluate_split(model, tok, ROWS, split, batch_size=2, max_new_tokens=3, progress=False)
    assert got["split"] == split and got["n"] == 3
    json.dumps(got)  # serialisable
    for i, row in enumerate(ROWS):
        nll_a, pred, labels = manual(model, tok, row["question"], row["answer"])
        correct = manual(model, tok, row["question"], row["paraphrased_answer"])[0] if split == "forget" else nll_a
        pert = [manual(model, tok, row["question"], p)[0] for p in row["perturbed_answer"]]
        R = math.exp(correct - sum(pert) / len(pert))
        if split == "forget":
            prob = math.exp(-nll_a)
        else:
            prob = math.exp(-nll_a) / (math.exp(-nll_a) + sum(math.exp(-x) for x in pert))
        assert got["per_row"]["probability"][i] == pytest.approx(prob, rel=1e-5)
        assert got["per_row"]["truth_ratio"][i] == pytest.approx(R, rel=1e-5)
        assert got["per_row"]["extraction_strength"][i] == extraction_strength(pred[:-1], labels[:-1])
    want = truth_ratio_summary(torch.tensor(got["per_row"]["truth_ratio"]), split)
    assert got["truth_ratio"] == pytest.approx(want)
    assert got["probability"] == pytest.approx(sum(got["per_row"]["probability"]) / 3)
    assert got["per_row"]["rouge_l"] == rouge_l_recall(got["per_row"]["answer"], [r["answer"] for r in ROWS])


def test_shared_prompt_scores_equal_the_full_sequences(tiny):
    from lora_unlearn.core.inference import answer_scores

    model, tok = tiny
    pairs = [{"question": r["question"], "answer": a} for r in ROWS for a in [r["answer"]] + r["perturbed_answer"]]
    shared = answer_scores(model, tok, pairs, batch_size=3)
    full = answer_scores(model, tok, pairs, batch_size=5, share_prompts=False)
    assert torch.allclose(shared[0], full[0], rtol=1e-5) and shared[1:] == full[1:]
    for pair, nll in zip(pairs[:4], shared[0]):
        assert nll.item() == pytest.approx(manual(model, tok, pair["question"], pair["answer"])[0], rel=1e-5)


def test_dequantized_4bit_layers_give_the_same_logits(tiny_model_dir):
    from lora_unlearn.core.inference import dequantized
    from lora_unlearn.core.models import load_base

    model, tok, _ = load_base(str(tiny_model_dir), "nf4")
    ids = tok(["What is the capital of Veloria?", "The quick brown fox"], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**ids).logits
        with dequantized(model) as switched:
            during = model(**ids).logits
        after = model(**ids).logits
    assert switched == 14  # 7 linear layers x 2 blocks
    assert torch.equal(before, during) and torch.equal(before, after)
    assert not any("forward" in vars(m) for m in model.modules())


def test_evaluate_tofu_aggregates(tiny):
    model, tok = tiny
    short = [{k: v for k, v in r.items() if k != "paraphrased_answer"} for r in ROWS]
    splits = {"forget": ROWS, "retain": ROWS, "real_authors": short, "world_facts": short[:2]}
    first = evaluate_tofu(model, tok, splits, batch_size=4, max_new_tokens=2, progress=False)
    parts = [first["splits"][s][m] for s in ("retain", "real_authors", "world_facts")
             for m in ("probability", "rouge_l", "truth_ratio")]
    assert first["model_utility"] == pytest.approx(model_utility(parts))
    assert first["forget_quality"] is None and first["forget_rouge_l"] == first["splits"]["forget"]["rouge_l"]
    ref = first["splits"]["forget"]["per_row"]["truth_ratio"]
    again = evaluate_tofu(model, tok, {"forget": ROWS}, reference_truth_ratios=ref, max_new_tokens=2, progress=False)
    assert again["forget_quality"] == pytest.approx(1.0) and again["model_utility"] is None
    with pytest.raises(UserError, match="paraphrased_answer"):
        evaluate_tofu(model, tok, {"retain": short}, progress=False)


def test_evaluate_edits_multiple_choice_is_the_lower_nll(tiny):
    model, tok = tiny
    edits = [{"prompt": "What is the capital of Veloria?", "old_answer": "The capital is Marrenport.",
              "new_answer": "The capital is Osric.", "paraphrases": ["Capital of Veloria?"],
              "locality": [{"prompt": "What jumps?", "answer": "fox"}]},
             {"prompt": "Who invented it?", "old_answer": "Osric.", "new_answer": "The dog.", "paraphrases": []}]
    got = evaluate_edits(model, tok, edits, batch_size=2, max_new_tokens=3, progress=False)
    json.dumps(got)
    for row, item in zip(edits, got["per_edit"]):
        for q, outcome in [(row["prompt"], item)] + list(zip(row["paraphrases"], item["paraphrases"])):
            new, old = manual(model, tok, q, row["new_answer"])[0], manual(model, tok, q, row["old_answer"])[0]
            assert outcome["mc_new"] == (new < old)
            assert outcome["nll_new"] == pytest.approx(new, rel=1e-5)
        assert item["reliable"] == (mentions(item["answer"], item["key"]) and not mentions(item["answer"], item["old_key"]))
    assert got["per_edit"][0]["key"] == "osric" and got["per_edit"][1]["key"] == "the dog"
    mc = [got["per_edit"][0]["mc_new"], got["per_edit"][1]["mc_new"]]
    assert got["mc_accuracy"]["prompt"] == sum(mc) / 2
    assert got["generality"] == float(got["per_edit"][0]["paraphrases"][0]["general"])
    assert got["locality_absolute"] == float(mentions(got["probes"]["locality"][0]["answer"], "fox"))
    assert got["locality"] is None and got["locality_key"] is None  # no record of the unedited model given


# ---- the command --------------------------------------------------------------------------------

def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _write(folder, name, rows):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def tofu_dir(tmp_path):
    folder = tmp_path / "tofu"
    _write(folder, "forget01.jsonl", ROWS)
    _write(folder, "retain.jsonl", ROWS[::-1])
    short = [{k: v for k, v in r.items() if k != "paraphrased_answer"} for r in ROWS]
    _write(folder, "real_authors.jsonl", short)
    _write(folder, "world_facts.jsonl", short[1:])
    return folder


def test_cli_eval_tofu_writes_results_and_uses_the_reference(tiny_model_dir, tofu_dir, tmp_path):
    from lora_unlearn.core.adapter_io import save_adapter
    from tests.tiny import make_adapter

    common = ["--base", tiny_model_dir, "-q", "none", "--data", tofu_dir, "--max-new-tokens", "2", "--batch-size", "2"]
    result = _run("eval", "--benchmark", "tofu", "--out", tmp_path / "ref", *common)
    assert result.exit_code == 0, result.output
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert ref["benchmark"] == "tofu" and set(ref["splits"]) == {"forget", "retain", "real_authors", "world_facts"}
    assert ref["model_utility"] == pytest.approx(model_utility(ref["model_utility_parts"].values()))
    assert len(ref["model_utility_parts"]) == 9 and ref["forget_quality"] is None
    md = (tmp_path / "ref" / "results.md").read_text()
    assert "| split | n | probability | ROUGE-L | truth ratio | ES | seconds |" in md and "| world_facts | 2 |" in md
    assert "| model utility | " in md and "model utility" in result.output

    specs = {f"model.layers.{i}.self_attn.q_proj": (32, 32, 2) for i in range(2)}
    adapter = save_adapter(make_adapter(specs, alpha=64.0), tmp_path / "a")
    result = _run("eval", "--out", tmp_path / "un", "--adapter", f"{adapter}:3", "--reference", tmp_path / "ref",
                  "--splits", "forget", *common)
    assert result.exit_code == 0, result.output
    un = json.loads((tmp_path / "un" / "results.json").read_text())
    assert set(un["splits"]) == {"forget"} and un["meta"]["adapters"][0]["scale"] == 3.0
    R_un, R_ref = un["splits"]["forget"]["per_row"]["truth_ratio"], ref["splits"]["forget"]["per_row"]["truth_ratio"]
    assert R_un != R_ref  # the adapter is applied
    assert un["forget_quality"] == pytest.approx(forget_quality(R_un, R_ref))


def test_cli_eval_edits(tiny_model_dir, tmp_path):
    data = tmp_path / "edits.jsonl"
    data.write_text(json.dumps({"prompt": "What jumps?", "old_answer": "The fox.", "new_answer": "The dog.",
                                "paraphrases": ["Who jumps?"], "locality": [{"prompt": "Veloria?", "answer": "x"}]}) + "\n")
    result = _run("eval", "--benchmark", "edits", "--base", tiny_model_dir, "-q", "none", "--data", data,
                  "--max-new-tokens", "2", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    got = json.loads((tmp_path / "out" / "results.json").read_text())
    assert got["benchmark"] == "edits" and got["n"] == 1 and got["mc_accuracy"]["all"] in (0.0, 0.5, 1.0)
    assert "| reliability |" in (tmp_path / "out" / "results.md").read_text()


def _bad_reference(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    return path


@pytest.mark.parametrize("make_args, message", [
    (lambda t, d: ["--benchmark", "mmlu"], "unknown benchmark 'mmlu'. Available: tofu, edits"),
    (lambda t, d: ["--data", d, "--splits", "forget,holdout"], "unknown TOFU split 'holdout'"),
    (lambda t, d: ["--data", t / "nowhere"], "give 'tofu-mini' or a folder"),
    (lambda t, d: ["--data", d, "--reference", _bad_reference(t, "{not json")], "is not JSON"),
    (lambda t, d: ["--data", d, "--reference", _bad_reference(t, '{"splits": {}}')], "no forget truth ratios"),
    (lambda t, d: ["--data", d, "--reference", _bad_reference(
        t, json.dumps({"splits": {"forget": {"per_row": {"truth_ratio": [1.0]}}}}))], "same forget set"),
    (lambda t, d: ["--data", d, "--reference", t / "missing.json"], "does not exist"),
    (lambda t, d: ["--data", d, "--retain-limit", "0"], "at least 1"),
    (lambda t, d: ["--benchmark", "edits", "--data", _bad_reference(t, '{"prompt": "q", "old_answer": "a"}\n')],
     "non-empty string 'new_answer'"),
])
def test_cli_eval_bad_input_exits_2(tmp_path, tofu_dir, make_args, message):
    result = _run("eval", "--out", tmp_path / "out", "--base", tmp_path / "no-model", *make_args(tmp_path, tofu_dir))
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_cli_eval_missing_field_names_file_line_and_field(tmp_path, tofu_dir):
    rows = [dict(ROWS[0]), {k: v for k, v in ROWS[1].items() if k != "paraphrased_answer"}]
    _write(tofu_dir, "forget01.jsonl", rows)
    result = _run("eval", "--out", tmp_path / "out", "--data", tofu_dir)
    assert result.exit_code == 2
    assert f"{tofu_dir / 'forget01.jsonl'}:2: a forget row needs a non-empty string 'paraphrased_answer'" in \
        " ".join(result.output.split())
    _write(tofu_dir, "forget.jsonl", ROWS)
    result = _run("eval", "--out", tmp_path / "out", "--data", tofu_dir)
    assert result.exit_code == 2 and "keep one forget file" in result.output
