"""load_model (unmerged exact, merged measured) and hotswap, on the tiny Llama in full precision and nf4."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from lora_unlearn.arithmetic import scale, to_dense
from lora_unlearn.core.adapter_io import save_adapter
from lora_unlearn.core.models import load_base
from lora_unlearn.errors import UserError
from lora_unlearn.serving.loading import PROBE, hotswap, load_model
from tests.tiny import LINEAR_NAMES, make_adapter

ATOL = 1e-4
SHAPES = {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "o_proj": (32, 32),
          "gate_proj": (64, 32), "up_proj": (64, 32), "down_proj": (32, 64)}


def specs(names, r):
    return {f"model.layers.{i}.{'mlp' if n in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{n}":
            (*SHAPES[n], r) for i in range(2) for n in names}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    made = {
        "a": scale(make_adapter(specs(LINEAR_NAMES, 4), alpha=8, seed=1), 0.1),
        "a2": scale(make_adapter(specs(LINEAR_NAMES, 4), alpha=16, rslora=True, seed=3), 0.1),  # same shapes
        "b": scale(make_adapter(specs(["q_proj", "v_proj", "down_proj"], 2), alpha=6, seed=2), 0.1),
        "a_r2": scale(make_adapter(specs(LINEAR_NAMES, 2), alpha=8, seed=4), 0.1),
        # |dW| below |W| as in trained adapters (the ones above are 10x |W|, so that effects are plain)
        "small": scale(make_adapter(specs(LINEAR_NAMES, 4), alpha=8, seed=5), 0.01),
    }
    return {name: save_adapter(a, root / name) for name, a in made.items()}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_unmerged_is_exact_against_dense_weights_and_peft(tiny_model_dir, folders, ids):
    from lora_unlearn.core.adapter_io import load_adapter

    model, _, report = load_model(str(tiny_model_dir), [(folders["a"], 1.0), (folders["b"], -0.5)], quantization="none")
    dense, _, _ = load_base(str(tiny_model_dir), "none")
    with torch.no_grad():
        for folder, c in ((folders["a"], 1.0), (folders["b"], -0.5)):
            for name, delta in to_dense(load_adapter(folder)).items():
                dense.get_submodule(name).weight += c * delta
    torch.testing.assert_close(logits(model, ids), logits(dense, ids), atol=ATOL, rtol=0)
    assert not report.merged and report.max_abs_logit_diff is None
    assert [a["name"] for a in report.adapters] == ["frozen_0", "frozen_1"]
    assert report.adapters[1]["coefficient"] == -0.5 and len(report.adapters[0]["sha256"]) == 64

    nf4, _, _ = load_model(str(tiny_model_dir), [(folders["a"], 1.0)], quantization="nf4")
    base, _, _ = load_base(str(tiny_model_dir), "nf4")
    plain = logits(base, ids)
    peft = PeftModel.from_pretrained(base, folders["a"])
    torch.testing.assert_close(logits(nf4, ids), logits(peft, ids), atol=1e-5, rtol=0)
    assert (logits(nf4, ids) - plain).abs().max() > 0.05


def test_merged_nf4_reports_a_small_nonzero_error_that_is_honest(tiny_model_dir, folders):
    model, tok, report = load_model(str(tiny_model_dir), [(folders["small"], 1.0)], quantization="nf4", merge=True,
                                    warn_above=1e9)
    assert report.merged and not hasattr(model, "peft_config")
    assert report.warning is None and report.merge_seconds >= 0
    assert json.loads(json.dumps(report.to_dict()))["max_abs_logit_diff"] == report.max_abs_logit_diff
    # recompute against a fresh unmerged model: the report is what the merge did
    unmerged, _, _ = load_model(str(tiny_model_dir), [(folders["small"], 1.0)], quantization="nf4")
    enc = tok(PROBE, return_tensors="pt", padding=True)
    mask = enc["attention_mask"].bool()
    with torch.no_grad():
        diff = (model(**enc).logits - unmerged(**enc).logits).abs()[mask]
    assert report.probe_tokens == int(mask.sum())
    assert diff.max().item() == pytest.approx(report.max_abs_logit_diff, rel=1e-5)
    assert diff.mean().item() == pytest.approx(report.mean_abs_logit_diff, rel=1e-4)
    # small: requantizing costs about what quantizing the base cost in the first place; nonzero: it is lossy
    full, _, _ = load_base(str(tiny_model_dir), "none")
    nf4, _, _ = load_base(str(tiny_model_dir), "nf4")
    with torch.no_grad():
        quantization_error = (full(**enc).logits - nf4(**enc).logits).abs()[mask].mean().item()
    assert 0.01 * quantization_error < report.mean_abs_logit_diff < 2 * quantization_error
    assert report.mean_abs_logit_diff <= report.max_abs_logit_diff


def test_merged_full_precision_is_near_exact_and_warning_fires(tiny_model_dir, folders):
    _, _, report = load_model(str(tiny_model_dir), [(folders["a"], -1.0)], quantization="none", merge=True)
    assert report.max_abs_logit_diff < ATOL
    with pytest.warns(UserWarning, match="merging into the nf4 base changed the logits"):
        _, _, report = load_model(str(tiny_model_dir), [(folders["a"], 1.0)], quantization="nf4", merge=True,
                                  warn_above=0.0, probe=["What is the capital of Veloria?"])
    assert report.warning and report.probe_tokens > 0


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_hotswap_matches_a_freshly_loaded_adapter(tiny_model_dir, folders, ids, quantization):
    model, _, _ = load_model(str(tiny_model_dir), [(folders["a"], 1.0)], quantization=quantization)
    weight = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").base_layer.weight
    before = logits(model, ids)
    hotswap(model, "frozen_0", folders["a2"], scale=-1.0)
    fresh, _, _ = load_model(str(tiny_model_dir), [(folders["a2"], -1.0)], quantization=quantization)
    after = logits(model, ids)
    torch.testing.assert_close(after, logits(fresh, ids), atol=ATOL, rtol=0)
    assert (after - before).abs().max() > 0.05
    assert model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").base_layer.weight is weight
    assert model.peft_config["frozen_0"].use_rslora  # the config now describes the swapped-in adapter


def test_hotswap_refuses_other_shapes_and_targets(tiny_model_dir, folders, ids):
    model, _, _ = load_model(str(tiny_model_dir), [(folders["a"], 1.0)], quantization="none")
    before = logits(model, ids)
    with pytest.raises(UserError, match=r"has A \(2, \d+\).*same ranks and shapes; load it as a new adapter"):
        hotswap(model, "frozen_0", folders["a_r2"])
    with pytest.raises(UserError, match="does not target .*same target modules"):
        hotswap(model, "frozen_0", folders["b"])
    with pytest.raises(UserError, match="no adapter named 'x' in the model. Loaded: frozen_0"):
        hotswap(model, "x", folders["a2"])
    base, _, _ = load_base(str(tiny_model_dir), "none")
    with pytest.raises(UserError, match="needs a PEFT model"):
        hotswap(base, "frozen_0", folders["a2"])
    assert torch.equal(logits(model, ids), before)  # refused swaps changed nothing


def test_load_model_bad_input(tiny_model_dir, folders, tmp_path):
    with pytest.raises(UserError, match="pair"):
        load_model(str(tiny_model_dir), [folders["a"]], quantization="none")
    with pytest.raises(UserError, match="finite"):
        load_model(str(tiny_model_dir), [(folders["a"], float("inf"))], quantization="none")
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tiny_model_dir), [(tmp_path / "nope", 1.0)], quantization="none")
    with pytest.raises(UserError, match="probe"):
        load_model(str(tiny_model_dir), [(folders["a"], 1.0)], quantization="none", merge=True, probe=[])
    model, _, report = load_model(str(tiny_model_dir), [], quantization="none", merge=True)
    assert not report.merged and not hasattr(model, "peft_config")
