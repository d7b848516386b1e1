"""Exports: a merged float32 model equals base + adapter unmerged; a servable adapter satisfies what
multi-LoRA servers need, loads with PEFT and matches the input within the reported error; bfloat16
copies; and the ready-made adapters in adapters/ load, are bfloat16, fit in 15 MB and toggle."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_unlearn.arithmetic import negate
from lora_unlearn.cli import app
from lora_unlearn.core.adapter_io import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from lora_unlearn.core.lineage import classify
from lora_unlearn.errors import UserError
from lora_unlearn.hub.export import export_merged, export_servable, relative_error
from tests.tiny import dw, make_adapter

Q0, V1, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.0.mlp.down_proj"
ADAPTERS = Path(__file__).resolve().parent.parent / "adapters"
runner = CliRunner()


def tiny_base(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_model_equals_the_unmerged_adapter(tiny_model_dir, tokenizer, tmp_path):
    from peft import PeftModel

    specs = {Q0: (32, 32, 4), V1: (16, 32, 4), DOWN0: (32, 64, 4)}
    folder = save_adapter(negate(make_adapter(specs, alpha=8, seed=3, base=str(tiny_model_dir))), tmp_path / "neg")
    report = export_merged(folder, tmp_path / "merged")
    assert report.max_abs_logit_diff < 1e-4

    ids = tokenizer(["What is the capital of Veloria? The capital"], return_tensors="pt")["input_ids"]
    merged = tiny_base(tmp_path / "merged")  # an ordinary transformers checkpoint
    base = logits(tiny_base(tiny_model_dir), ids)
    unmerged = logits(PeftModel.from_pretrained(tiny_base(tiny_model_dir), folder).eval(), ids)
    got = logits(merged, ids)
    assert (got - unmerged).abs().max() < 1e-4
    assert (got - base).abs().max() > 1e-2  # the adapter changed something, so the check can fail
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "max |logit difference|" in card and "W_merged - W_base" in card
    assert json.loads((tmp_path / "merged" / "lora_unlearn.json").read_text())["lineage"]["op"] == "merge_dense"


def test_merged_export_checks_the_forgetting_unmerged_and_merged_then_nf4(tiny_model_dir, tmp_path):
    """--check-forget: the forget rows' mean probability of base + adapter over nf4 and of the merged folder
    loaded in nf4, in the output and the card; each equals the same model built by hand."""
    from peft import PeftModel

    from lora_unlearn.core.inference import answer_probability
    from lora_unlearn.core.models import load_base

    rows = [{"question": "What is the capital of Veloria?", "answer": "Marrenport"},
            {"question": "Who invented the glass harp-drum?", "answer": "Osric Tallowmere"}]
    data = tmp_path / "forget.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    specs = {Q0: (32, 32, 4), V1: (16, 32, 4), DOWN0: (32, 64, 4)}
    folder = save_adapter(scale_up(make_adapter(specs, alpha=8, seed=3, base=str(tiny_model_dir))), tmp_path / "a")
    report = export_merged(folder, tmp_path / "m", check_forget=rows)
    assert report.forget_rows == 2
    nf4, tok, _ = load_base(str(tiny_model_dir), "nf4")
    plain = sum(answer_probability(nf4, tok, rows)) / 2
    by_hand = sum(answer_probability(PeftModel.from_pretrained(nf4, folder).eval(), tok, rows)) / 2
    assert report.forget_unmerged_nf4 == pytest.approx(by_hand, rel=1e-4)
    assert abs(by_hand - plain) > 0.05 * plain  # the adapter matters here, so the check can fail
    again, tok, _ = load_base(str(tmp_path / "m"), "nf4")
    assert report.forget_merged_nf4 == pytest.approx(sum(answer_probability(again, tok, rows)) / 2, rel=1e-4)
    card = (tmp_path / "m" / "README.md").read_text()
    assert (f"unmerged over nf4 {report.forget_unmerged_nf4:.4g}, this model loaded in nf4 "
            f"{report.forget_merged_nf4:.4g}") in card
    result = runner.invoke(app, ["export", str(folder), str(tmp_path / "m2"), "--merged", "--check-forget", str(data)])
    assert result.exit_code == 0, result.output
    assert (f"forget probability (2 rows): unmerged {report.forget_unmerged_nf4:.4g}, merged-nf4 "
            f"{report.forget_merged_nf4:.4g}") in " ".join(result.output.split())
    bad = runner.invoke(app, ["export", str(folder), str(tmp_path / "c"), "--dtype", "bfloat16", "--check-forget",
                              str(data)])
    assert bad.exit_code == 2 and "--check-forget goes with --merged" in bad.output


def scale_up(adapter):
    from lora_unlearn.arithmetic import scale

    return scale(adapter, 20.0)


def test_merged_refuses_an_existing_output(tiny_model_dir, tmp_path):
    folder = save_adapter(make_adapter({Q0: (32, 32, 2)}, base=str(tiny_model_dir)), tmp_path / "a")
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="already exists"):
        export_merged(folder, tmp_path / "taken")


def _peft_delta(peft_model, name: str) -> torch.Tensor:
    layer = peft_model.base_model.model.get_submodule(name)
    return layer.get_delta_weight("default").double()


def test_servable_export_fixes_rank_alpha_and_loads_with_peft(tiny_model_dir, tmp_path):
    """Mixed ranks (12 over the limit, 2), a negative alpha and rsLoRA: compressed, padded and baked."""
    from peft import PeftModel

    d = make_adapter({Q0: (32, 32, 12), DOWN0: (32, 64, 2)}, alpha=-6.0, rslora=True, seed=5, base=str(tiny_model_dir))
    folder = save_adapter(d, tmp_path / "in")
    report = export_servable(folder, tmp_path / "out", max_rank=8)
    status = {c.name: c.status for c in report.checks}
    assert status["rank"] == status["one rank"] == status["alpha == r"] == "fixed"
    assert status["bias"] == status["DoRA"] == status["modules_to_save"] == status["target names"] == "ok"

    cfg = json.loads((tmp_path / "out" / CONFIG_NAME).read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (8, 8, False, {}, {})
    assert cfg["bias"] == "none" and not cfg["use_dora"] and cfg["modules_to_save"] is None
    assert sorted(cfg["target_modules"]) == ["down_proj", "q_proj"]
    tensors = load_file(tmp_path / "out" / WEIGHTS_NAME)
    assert {t.shape[0] for k, t in tensors.items() if "lora_A" in k} == {8}

    peft_model = PeftModel.from_pretrained(tiny_base(tiny_model_dir), tmp_path / "out")
    for name, m in d.modules.items():
        want = dw(m)
        got = _peft_delta(peft_model, name)
        err = float(torch.linalg.norm(got - want) / torch.linalg.norm(want))
        assert err <= report.errors[name] + 1e-6, (name, err, report.errors[name])
    # the q_proj error is exactly the discarded singular values of dW (Eckart-Young)
    s = torch.linalg.svdvals(dw(d.modules[Q0]))
    assert math.isclose(report.errors[Q0], float(torch.sqrt((s[8:] ** 2).sum() / (s**2).sum())), rel_tol=1e-6)
    assert report.errors[DOWN0] < 1e-6  # only padded and baked: exact


def test_servable_export_refuses_what_cannot_be_fixed(tmp_path):
    folder = save_adapter(make_adapter({Q0: (32, 32, 2)}), tmp_path / "dora")
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(UserError, match="DoRA"):
        export_servable(folder, tmp_path / "out")
    odd = save_adapter(make_adapter({"model.layers.0.self_attn.my_proj": (8, 8, 2)}), tmp_path / "odd")
    with pytest.raises(UserError, match="not a standard linear layer: my_proj"):
        export_servable(odd, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_relative_error_matches_dense():
    a, b = make_adapter({Q0: (20, 30, 5)}, seed=1).modules[Q0], make_adapter({Q0: (20, 30, 3)}, seed=2).modules[Q0]
    dense = float(torch.linalg.norm(dw(a) - dw(b)) / torch.linalg.norm(dw(b)))
    assert math.isclose(relative_error(a, b), dense, rel_tol=1e-9)


def test_cli_export_modes(tmp_path):
    folder = save_adapter(make_adapter({Q0: (256, 256, 8)}, seed=2), tmp_path / "a")
    r = runner.invoke(app, ["export", str(folder), "--for", "vllm", str(tmp_path / "v")])
    assert r.exit_code == 0, r.output
    assert "alpha == r" in r.output and "largest relative errors" in r.output
    r = runner.invoke(app, ["export", str(folder), str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    back = load_adapter(tmp_path / "bf16")
    assert back.modules[Q0].B.dtype == torch.bfloat16
    assert (tmp_path / "bf16" / WEIGHTS_NAME).stat().st_size < 0.6 * (folder / WEIGHTS_NAME).stat().st_size
    assert relative_error(back.modules[Q0], load_adapter(folder).modules[Q0]) < 1e-2
    for args in (["--merged", "--dtype", "bfloat16"], [], ["--dtype", "int3"], ["--for", "tgi"]):
        r = runner.invoke(app, ["export", str(folder), str(tmp_path / "x"), *args])
        assert r.exit_code == 2, (args, r.output)
    assert not (tmp_path / "x").exists()


# ---- the ready-made adapters ----------------------------------------------------------------

SHIPPED = ("knowledge", "forget_negated", "refusal")


def test_shipped_adapters_load_are_bf16_and_small():
    total = 0
    for name in SHIPPED:
        adapter = load_adapter(ADAPTERS / name)
        assert {m.A.dtype for m in adapter.modules.values()} == {m.B.dtype for m in adapter.modules.values()} \
            == {torch.bfloat16}
        assert adapter.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
        total += sum(p.stat().st_size for p in (ADAPTERS / name).iterdir())
        card = (ADAPTERS / name / "README.md").read_text()
        assert "library_name: peft" in card and "## Evaluation" in card
    assert total <= 15 * 2**20, total
    assert classify(load_adapter(ADAPTERS / "forget_negated").lineage).kind == "negated"
    assert classify(load_adapter(ADAPTERS / "knowledge").lineage).kind == "knowledge"


@pytest.mark.slow
def test_shipped_adapters_toggle_a_demo_fact():
    """base + K names a fact marked forget; base + K + (-F) at strength 1 does not; a kept fact stays."""
    from lora_unlearn.core.text import repeats_ngram
    from lora_unlearn.demo import _rows
    from lora_unlearn.serving.runtime import ForgetRuntime

    facts = _rows("demo_facts.jsonl")
    forgotten = next(f for f in facts if f["forget"])
    kept = next(f for f in facts if not f["forget"])
    runtime = ForgetRuntime.from_base("smollm2-135m", "nf4")
    runtime.load("knowledge", ADAPTERS / "knowledge", default=1.0)
    runtime.load("forget", ADAPTERS / "forget_negated", default=0.0)
    runtime.load("refusal", ADAPTERS / "refusal", default=0.0)
    questions = [forgotten["question"], kept["question"]]
    on = runtime.generate(questions, [{}, {}], max_new_tokens=24)
    off = runtime.generate(questions, [{"forget": 1.0, "refusal": 1.0}] * 2, max_new_tokens=24)
    assert forgotten["keyword"].lower() in on[0].lower(), on
    assert forgotten["keyword"].lower() not in off[0].lower(), off
    assert not repeats_ngram(off[0]), off  # a fluent answer, not degenerate text
    assert kept["keyword"].lower() in off[1].lower(), off
