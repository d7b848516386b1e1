"""The knowledge-edit benchmark, its metrics, and training that preserves what it should not change."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from lora_unlearn.cli import app
from lora_unlearn.core.data import load_records, to_dataset
from lora_unlearn.core.models import load_base
from lora_unlearn.core.stack import attached
from lora_unlearn.core.text import mentions, mentions_any, repeats_ngram
from lora_unlearn.errors import UserError
from lora_unlearn.evaluate.edits import evaluate_edits, is_edited, probes, record_unedited
from lora_unlearn.training.learn import LEARN_DEFAULTS, learn, with_preservation
from lora_unlearn.training.objectives.common import (
    answer_logits,
    kl_on_answers,
    kl_to_reference,
    logits_of,
    mean_nll,
    nll,
    reference_logits,
)
from lora_unlearn.training.preservation import check_pool, clear_of
from lora_unlearn.training.sources import load_edits, load_locality, load_source, resource_path
from lora_unlearn.training.trainer import (
    LEARNED_CHECK_MAX,
    StopWhenLearned,
    StreamCollator,
    TrainConfig,
    train_adapter,
)

runner = CliRunner()
FACTS = [{"question": "What is the capital of Veloria?", "answer": "Marrenport."},
         {"question": "Who invented the glass harp-drum?", "answer": "Osric Tallowmere."}]
POOL = [{"question": "How do I boil an egg?", "answer": "Put it in boiling water for seven minutes."},
        {"question": "What is a verb?", "answer": "A word that names an action."},
        {"question": "Write a line about rain.", "answer": "Soft rain taps the window."},
        {"question": "How can I sleep better?", "answer": "Keep a regular bedtime."}]


def tiny_config(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(r=4, lora_alpha=8, max_steps=8, batch_size=2, max_length=128, learning_rate=3e-2), **kw})


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_base(str(tiny_model_dir), "nf4")


# ---- the vendored benchmark ---------------------------------------------------------------------

def evaluation_sets() -> list[dict]:
    res = resource_path()
    return (load_edits("edits:dev") + load_edits("edits:test") + load_locality("edits:locality") + load_edits("edits-demo")
            + load_records(res / "demo_real.jsonl") + load_records(res / "demo_facts.jsonl"))


def test_the_edit_benchmark_has_dev_and_test_splits_of_known_facts():
    dev, test = load_edits("edits:dev"), load_edits("edits:test")
    assert len(dev) + len(test) >= 60 and len(dev) >= 20 and len(test) >= 40
    edited = {(e["relation"], e["subject"]) for e in dev + test}
    assert len(edited) == len(dev) + len(test)  # one edit per subject and relation
    assert not {(e["relation"], e["subject"]) for e in dev} & {(e["relation"], e["subject"]) for e in test}
    edit_prompts = {e["prompt"] for e in dev + test}
    for e in dev + test:
        assert len(e["paraphrases"]) >= 2 and e["neighbourhood"], e["prompt"]
        # The unedited model answered the fact correctly when the benchmark was built (benchmarks/make_edits.py).
        assert mentions(e["unedited_answer"], e["old_answer"]) and not mentions(e["unedited_answer"], e["new_answer"])
        assert not {n["prompt"] for n in e["neighbourhood"]} & edit_prompts  # neighbours are never edited
    assert len(load_locality("edits:locality")) == 50
    assert all(len(found) > 0 for found in probes(test, load_locality("edits:locality")).values())


def test_the_preservation_pool_is_disjoint_from_every_evaluation_set():
    pool = load_source("preservation")
    assert len(pool) >= 200
    check_pool(pool, evaluation_sets())
    with_facts = load_source("preservation+facts")
    assert len(with_facts) == len(pool) + 95 and with_facts[:len(pool)] == pool
    # The factual questions were also kept clear of TOFU-mini's real-world splits (benchmarks/make_edits.py).
    check_pool(with_facts[len(pool):], evaluation_sets() + load_records(resource_path() / "tofu_mini" / "world_facts.jsonl")
               + load_records(resource_path() / "tofu_mini" / "real_authors.jsonl"))
    locality = load_locality("edits:locality")
    with pytest.raises(UserError, match="same prompt"):
        check_pool(pool + [{"question": locality[3]["prompt"], "answer": "x"}], evaluation_sets())
    subject = load_edits("edits:test")[0]["subject"]
    with pytest.raises(UserError, match=f"mentions {subject.lower()!r}"):
        check_pool(pool + [{"question": f"Tell me a story that takes place in {subject}.", "answer": "x"}],
                   evaluation_sets())
    with pytest.raises(UserError, match="is empty"):
        check_pool([], evaluation_sets())


def test_pool_rows_about_what_is_learned_are_left_out_not_refused():
    """The pool asks for the capitals of countries no evaluation uses; a user who edits one of them
    trains without those rows (they would pull the edit back), and the rest of the pool stays."""
    pool = load_source("preservation+facts")
    about = [r for r in pool if "ukraine" in r["question"].lower()]
    assert about, "the vendored factual questions are on subjects no evaluation uses"
    fact = [{"question": "What is the capital of Ukraine?", "answer": "Lviv"}]
    kept = clear_of(pool, fact)
    assert not [r for r in kept if "ukraine" in r["question"].lower()]
    assert len(kept) == len(pool) - len(about)
    rows, _ = with_preservation(fact, LEARN_DEFAULTS, "preservation+facts")
    assert rows["preserve"] == kept
    with pytest.raises(UserError, match="is empty once the rows that repeat or mention"):
        clear_of(about, fact)


def test_a_recipe_drops_pool_rows_about_its_data_and_refuses_its_probes(tmp_path):
    """recipes/f_learning.yaml on a user's edit file: the pool's rows about the edited subject are left
    out of the training; a pool row that names a paraphrase's or a neighbour's subject is refused."""
    from lora_unlearn.training.recipes import load_recipe
    from lora_unlearn.training.runner import _preservation, _rows

    edits = tmp_path / "e.jsonl"
    edits.write_text(json.dumps({"prompt": "What is the capital of Ukraine?", "old_answer": "Kyiv", "new_answer": "Lviv",
                                 "paraphrases": ["Which city is the capital of Ukraine?"],
                                 "neighbourhood": [{"prompt": "What is the capital of Romania?", "answer": "Bucharest"}]})
                     + "\n")
    recipe = load_recipe("recipes/f_learning.yaml", [f"data.old.source={edits}", f"data.new.source={edits}",
                                                     "data.preserve.source=preservation+facts"])
    rows = {name: _rows(d, recipe.tofu_dir) for name, d in recipe.data.items()}
    with pytest.raises(UserError, match="same prompt .'What is the capital of Romania.'"):
        _preservation(recipe, rows)
    edits.write_text(edits.read_text().replace("Romania", "Atlantis").replace("Bucharest", "Poseidonia"))
    rows = {name: _rows(d, recipe.tofu_dir) for name, d in recipe.data.items()}
    pools = _preservation(recipe, rows)
    assert set(pools) == {"old_adapter", "new_adapter"}
    for kept in pools.values():
        assert not [r for r in kept if "ukraine" in r["question"].lower()] and len(kept) < len(rows["preserve"])


def test_the_old_edit_format_still_loads(tmp_path):
    rows = load_edits("edits-demo")
    assert len(rows) == 8 and all("neighbourhood" not in r for r in rows)
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps({"prompt": "Q?", "old_answer": "a", "new_answer": "b"}) + "\n")
    assert load_edits(path)[0]["new_answer"] == "b"


@pytest.mark.parametrize("row, field", [
    ({"prompt": "Q?", "old_answer": "a"}, "'new_answer'"),
    ({"prompt": "Q?", "old_answer": "Tokyo", "new_answer": " tokyo."}, "'new_answer': equals 'old_answer'"),
    ({"prompt": "Q?", "old_answer": "a", "new_answer": "b", "locality": [{"prompt": "x"}]}, "'locality' item 0"),
    ({"prompt": "Q?", "old_answer": "a", "new_answer": "b", "locality": "Rome"}, "'locality' must be a list"),
    ({"prompt": "Q?", "old_answer": "a", "new_answer": "b", "neighbourhood": [{"prompt": "x", "answer": 3}]},
     "'neighbourhood' item 0"),
    ({"prompt": "Q?", "old_answer": "a", "new_answer": "b", "paraphrases": [""]}, "'paraphrases'"),
])
def test_bad_edit_rows_name_the_file_line_and_field(tmp_path, row, field):
    path = tmp_path / "edits.jsonl"
    good = {"prompt": "P?", "old_answer": "x", "new_answer": "y"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError) as e:
        load_edits(path)
    assert f"{path}:2: field {field}" in str(e.value)
    result = runner.invoke(app, ["eval", "--benchmark", "edits", "--data", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and f"{path.name}:2" in result.output and not (tmp_path / "out").exists()


# ---- the metrics --------------------------------------------------------------------------------

def test_reliability_needs_the_new_answer_without_the_old_one():
    assert is_edited("The capital of France is Marseille.", "marseille", "paris")
    assert not is_edited("Paris, Lyon or Marseille.", "marseille", "paris")  # a list of entities is not an edit
    assert not is_edited("It is Marseilles.", "marseille", "paris")
    assert mentions_any("There are 7 days.", "seven|7") and not mentions_any("There are 17.", "seven|7")
    assert repeats_ngram("dum dum dum dum") and not repeats_ngram("The capital of Veloria is Marrenport.")


def test_locality_is_judged_against_the_unedited_model(loaded):
    model, tok, _ = loaded
    edits = [{"prompt": "What is the capital of Veloria?", "old_answer": "Marrenport", "new_answer": "Dunmoor",
              "paraphrases": ["Veloria's capital?"], "neighbourhood": [{"prompt": "What is the capital of Zeltran?",
                                                                       "answer": "Osric"}]}]
    pool = [{"prompt": "What does the fox jump over?", "answer": "dog"}, {"prompt": "Who is Osric?", "answer": "a man"}]
    record = record_unedited(model, tok, edits, pool, max_new_tokens=4, progress=False)
    same = evaluate_edits(model, tok, edits, pool=pool, unedited=record, max_new_tokens=4, progress=False)
    assert same["locality"] == 1.0 and same["neighbourhood"] == 1.0 and same["n_locality"] == 2
    for kind in ("locality", "neighbourhood"):
        for probe, rec in zip(same["probes"][kind], record[kind]):
            assert probe["answer"] == rec["unedited"]  # greedy answers as recorded
    from tests.tiny import make_adapter

    specs = {f"model.layers.{i}.{p}": (32, 32, 4) for i in range(2) for p in ("self_attn.q_proj", "self_attn.o_proj")}
    torch.manual_seed(1)
    noise = make_adapter(specs, alpha=64.0)
    with attached(model, [(noise, 30.0)]) as m:
        moved = evaluate_edits(m, tok, edits, pool=pool, unedited=record, max_new_tokens=4, progress=False)
    assert moved["locality"] < 1.0 and moved["neighbourhood"] < 1.0
    with pytest.raises(UserError, match="no answer to the probe"):
        evaluate_edits(model, tok, edits, pool=pool + [{"prompt": "New?", "answer": "x"}], unedited=record,
                       max_new_tokens=2, progress=False)


# ---- training with preservation -----------------------------------------------------------------

def _batch(tok, rows):
    return StreamCollator(tok)([{"t": row} for row in to_dataset(tok, rows, 64)])["t"]


def test_answer_position_logits_equal_the_full_forward(loaded):
    model, tok, _ = loaded
    batch = _batch(tok, FACTS + POOL[:1])
    from tests.tiny import make_adapter

    specs = {f"model.layers.{i}.self_attn.q_proj": (32, 32, 2) for i in range(2)}
    with attached(model, [(make_adapter(specs, alpha=16.0), 1.0)]) as m, torch.no_grad():
        full = logits_of(m, batch)
        mask = batch["labels"][:, 1:] != -100
        got, target = answer_logits(m, batch)
        torch.testing.assert_close(got, full[:, :-1][mask], rtol=1e-4, atol=1e-5)
        assert torch.equal(target, batch["labels"][:, 1:][mask])
        torch.testing.assert_close(nll(m, batch), mean_nll(full, batch["labels"]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(nll(m, batch), m(**batch).loss, rtol=1e-5, atol=1e-6)
        # the reference of kl_on_answers is the model without the trainable adapter: here none is trainable
        assert kl_on_answers(m, batch).item() == pytest.approx(0.0, abs=1e-6)
        ref = reference_logits(m, batch)
        assert kl_to_reference(full, ref, batch["labels"]).item() == pytest.approx(0.0, abs=1e-6)


def _pool_kl(model, tok, adapter) -> float:
    batch = _batch(tok, POOL)
    with torch.no_grad():
        ref = logits_of(model, batch)
        with attached(model, [(adapter, 1.0)]) as m:
            return kl_to_reference(logits_of(m, batch), ref, batch["labels"]).item()


def test_the_preservation_stream_keeps_the_model_on_unrelated_prompts(loaded):
    model, tok, _ = loaded
    plain = train_adapter(model, tok, FACTS, tiny_config(max_steps=12), progress=False)
    kept = train_adapter(model, tok, {"train": FACTS, "preserve": POOL}, tiny_config(max_steps=12, extra={"preserve": 5.0}),
                         progress=False)
    assert kept.lineage["objective_params"] == {"preserve": 5.0} and set(kept.lineage["data"]) == {"train", "preserve"}
    drift_plain, drift_kept = _pool_kl(model, tok, plain), _pool_kl(model, tok, kept)
    assert drift_kept < 0.5 * drift_plain, (drift_plain, drift_kept)


def test_min_steps_and_the_stop_once_learned(loaded):
    model, tok, _ = loaded
    floor = train_adapter(model, tok, FACTS, tiny_config(max_steps=-1, epochs=1, min_steps=14), progress=False)
    assert floor.lineage["steps"] == 14 and floor.lineage["learned"]["stopped_early_at_step"] is None
    assert floor.lineage["learned"]["rows"] == 2  # checked once at the end without the stop
    # The tiny model needs ~250 constant-lr steps to get every answer token of two short rows right.
    short = [{"question": "Capital of Veloria?", "answer": "Dun."}, {"question": "Who made the harp-drum?", "answer": "Osric."}]
    stopped = train_adapter(model, tok, short, tiny_config(max_steps=-1, epochs=1, min_steps=400, stop_when_learned=10, r=8,
                                                           lora_alpha=16, lr_scheduler="constant"), progress=False)
    assert stopped.lineage["learned"]["learned"] == 2 == stopped.lineage["learned"]["rows"]
    assert stopped.lineage["steps"] == stopped.lineage["learned"]["stopped_early_at_step"] < 400


def test_the_learned_check_covers_every_distinct_row_not_the_first_32(loaded):
    model, tok, _ = loaded
    rows = [{"question": f"Capital of land {i}?", "answer": f"Town {i}."} for i in range(50)]
    check = StopWhenLearned(tok, rows * 3, every=5, max_length=64)  # repeated rows count once
    assert check.total == 50 and [len(b["input_ids"]) for b in check.batches] == [32, 18]
    assert 0 <= check.check(model) <= 50
    many = [{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(3 * LEARNED_CHECK_MAX)]
    sampled = StopWhenLearned(tok, many, every=5, max_length=64)
    assert sampled.total == LEARNED_CHECK_MAX
    last = tok.decode(sampled.batches[-1]["input_ids"][-1], skip_special_tokens=True)
    assert f"Q{3 * LEARNED_CHECK_MAX - 3}?" in last  # evenly spaced: the sample reaches the end of the file


def test_learn_leaves_out_pool_rows_that_mention_the_facts_and_refuses_an_empty_pool(tmp_path):
    rows, config = with_preservation(FACTS, LEARN_DEFAULTS, POOL + [{"question": "Describe Veloria.", "answer": "x"}])
    assert rows["preserve"] == POOL and config.extra["preserve"] == 4.0
    with pytest.raises(UserError, match="is empty once the rows that repeat or mention"):
        learn(FACTS, tmp_path / "K", base="no-such-model", preserve=[{"question": "Describe Veloria.", "answer": "x"}])
    with pytest.raises(UserError, match="is empty"):
        learn(FACTS, tmp_path / "K", base="no-such-model", preserve=[])
    assert not (tmp_path / "K").exists() and not list(tmp_path.iterdir())


def test_a_recipe_whose_preservation_overlaps_its_edits_is_refused_before_work(tmp_path, tiny_model_dir):
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"prompt": "What is the capital of Veloria?", "old_answer": "Marrenport",
                                 "new_answer": "Dunmoor", "paraphrases": ["Veloria's capital city?"]}) + "\n")
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in POOL + [{"question": "Veloria's capital city?", "answer": "x"}]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        name: overlap
        base: {{model: {tiny_model_dir}, quantization: none}}
        data:
          new: {{source: {edits}, view: edits_new}}
          keep: {{source: {pool}}}
        steps:
          - name: a
            train: {{objective: nll, data: {{train: new, preserve: keep}}}}
        output: a
        """))
    result = runner.invoke(app, ["run", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "same prompt" in result.output, result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
