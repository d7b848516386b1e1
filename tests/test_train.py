"""Adapter training on a quantized tiny base, alone and on top of frozen adapters."""

from __future__ import annotations

import json

import pytest
import torch

from lora_unlearn.arithmetic import add, negate
from lora_unlearn.core.adapter_io import load_adapter
from lora_unlearn.core.data import load_qa
from lora_unlearn.core.inference import answer, answer_nll
from lora_unlearn.core.models import load_base
from lora_unlearn.core.stack import attached
from lora_unlearn.errors import UserError
from lora_unlearn.training.learn import learn
from lora_unlearn.training.trainer import TrainConfig

FAST = TrainConfig(r=4, lora_alpha=8, epochs=30, batch_size=3, learning_rate=3e-2, max_length=64)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_base(str(tiny_model_dir), "nf4")


def _logits(model, tokenizer):
    x = tokenizer(["What is the capital of Veloria?"], return_tensors="pt")
    with torch.no_grad():
        return model(**x).logits


def test_base_loads_in_nf4(loaded):
    import bitsandbytes as bnb

    model, _, info = loaded
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert info.quantization == "nf4"


def test_learning_lowers_the_answer_nll_and_records_lineage(loaded, qa_file, tmp_path):
    model, tok, _ = loaded
    rows = load_qa(qa_file)
    before = answer_nll(model, tok, rows).mean()
    # Plain fine-tuning (preserve=None): the default preservation stream restrains the tiny model;
    # learn's defaults on the real model are tests/test_embedded.py's.
    adapter = learn(rows, tmp_path / "k", loaded=loaded, config=FAST, progress=False, preserve=None)
    with attached(model, [(adapter, 1.0)]) as m:
        after = answer_nll(m, tok, rows).mean()
    assert after < 0.5 * before, (before, after)

    record = json.loads((tmp_path / "k" / "lora_unlearn.json").read_text())["lineage"]
    assert record["op"] == "learn" and record["data"]["train"]["rows"] == 3 and record["quantization"] == "nf4"
    assert record["params"]["r"] == 4 and "Marrenport" not in json.dumps(record)
    reloaded = load_adapter(tmp_path / "k")
    assert reloaded.lineage["made_by"]["final_train_loss"] == record["final_train_loss"]


def test_attaching_leaves_the_base_untouched(loaded, qa_file):
    model, tok, _ = loaded
    before = _logits(model, tok)
    adapter = learn(load_qa(qa_file), loaded=loaded, config=FAST, progress=False)
    with attached(model, [(adapter, 1.0)]) as m:
        assert not torch.allclose(_logits(m, tok), before)
    assert torch.equal(_logits(model, tok), before)


def test_training_on_top_keeps_the_stack_frozen_and_exact(loaded, qa_file):
    """F trained over frozen K: K unchanged, and stack (K, F) == add(K, F) == stack (K+F)."""
    model, tok, _ = loaded
    rows = load_qa(qa_file)
    K = learn(rows, loaded=loaded, config=FAST, progress=False)
    K_before = {n: (m.A.clone(), m.B.clone()) for n, m in K.modules.items()}
    F = learn(rows[:1], loaded=loaded, on=[(K, 1.0)], config=FAST, progress=False)
    assert all(torch.equal(K.modules[n].A, a) and torch.equal(K.modules[n].B, b) for n, (a, b) in K_before.items())
    assert F.lineage["inputs"][0]["params"] == {"c": 1.0}
    with attached(model, [(K, 1.0), (F, -0.5)]) as m:
        stacked = _logits(m, tok)
    with attached(model, [(add(K, negate(F, 0.5)), 1.0)]) as m:
        summed = _logits(m, tok)
    assert (stacked - summed).abs().max() < 1e-4


def test_answers_are_greedy_and_deterministic(loaded):
    model, tok, _ = loaded
    first = answer(model, tok, ["What is the capital of Veloria?", "Who?"], max_new_tokens=5)
    assert first == answer(model, tok, ["What is the capital of Veloria?", "Who?"], max_new_tokens=5)
    assert len(first) == 2


def test_bad_configs_and_inputs(loaded, tmp_path, qa_file):
    with pytest.raises(UserError, match="r must be"):
        learn(load_qa(qa_file), loaded=loaded, config=TrainConfig(r=0))
    with pytest.raises(UserError, match="empty"):
        learn([], loaded=loaded, config=FAST)
    (tmp_path / "exists").mkdir()
    with pytest.raises(UserError, match="already exists"):
        learn(load_qa(qa_file), tmp_path / "exists", loaded=loaded, config=FAST)
    with pytest.raises(UserError, match="Unknown objective 'nope'. Available: .*nll"):
        learn(load_qa(qa_file), loaded=loaded, config=TrainConfig(objective="nope"))
    with pytest.raises(UserError, match="unknown quantization"):
        load_base("whatever", "fp3")
    with pytest.raises(UserError, match="not a model folder"):
        load_base(str(tmp_path), "none")


def test_a_snapshot_is_the_adapter_a_shorter_run_ends_with(loaded, qa_file):
    """Constant learning rate: the snapshot after 2 steps of a 5-step run equals the whole of a 2-step run
    (same seed, same data order), later snapshots differ, and steps past the end give none."""
    from dataclasses import replace

    from lora_unlearn.arithmetic import to_dense
    from lora_unlearn.training.trainer import train_adapter

    model, tok, info = loaded
    rows = load_qa(qa_file)
    config = replace(FAST, lr_scheduler="constant", batch_size=1, epochs=1, max_steps=5, learning_rate=1e-2)
    kept = {}
    long = train_adapter(model, tok, rows, config, base_info=info, progress=False,
                         snapshots=([2, 4, 50], lambda n, a: kept.setdefault(n, a)))
    short = train_adapter(model, tok, rows, replace(config, max_steps=2), base_info=info, progress=False)
    assert sorted(kept) == [2, 4] and long.lineage["snapshots"] == [2, 4] and long.lineage["steps"] == 5
    assert kept[2].lineage["steps"] == 2 and kept[2].lineage["snapshot_of_steps"] == 5
    got, want, later = to_dense(kept[2]), to_dense(short), to_dense(kept[4])
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)
    assert max((later[n] - got[n]).abs().max().item() for n in got) > 1e-4
