"""The library agrees with Hugging Face PEFT on a tiny Llama built from a config.

Two real PEFT adapters are made with random non-zero B (``init_lora_weights=False``): ``a`` with
r=4, alpha=8 on all seven linear layers, ``b`` with r=2, alpha=6, rsLoRA, on q/v/down only.
For each operation the result is written with ``save_adapter`` and loaded by
``PeftModel.from_pretrained``; its logits must equal those of the base with
``W += to_dense(result)[name]`` applied in place. The check is on the model's output, so it
covers the products and the config (r, lora_alpha, rank_pattern, alpha_pattern, use_rslora).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from lora_unlearn.arithmetic import add, compress, extrapolate, negate, scale, to_dense
from lora_unlearn.core.adapter_io import load_adapter, save_adapter
from tests.tiny import LINEAR_NAMES, tiny_llama

PREFIX = "base_model.model."
ATOL = 1e-4


@pytest.fixture(scope="module")
def base():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def peft_models(base, tmp_path_factory):
    """Two PEFT adapters on copies of ``base``, saved by PEFT: {name: (peft_model, folder)}."""
    configs = {
        "a": LoraConfig(r=4, lora_alpha=8, target_modules=LINEAR_NAMES, init_lora_weights=False),
        "b": LoraConfig(r=2, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False),
    }
    out = {}
    for i, (name, config) in enumerate(configs.items()):
        torch.manual_seed(100 + i)
        model = get_peft_model(copy.deepcopy(base), config).eval()
        folder = tmp_path_factory.mktemp("peft") / name
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def merged_by_hand(base, dense: dict[str, torch.Tensor]):
    """A copy of ``base`` with W += dW for each module: the reference the adapters must match."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, delta in dense.items():
            model.get_submodule(name).weight += delta
    return model


def lora_layers(peft_model):
    return {n.removeprefix(PREFIX): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("which", ["a", "b"])
def test_load_adapter_reads_peft_deltas(peft_models, base, which):
    """load_adapter of a PEFT folder gives to_dense equal to PEFT's own delta per layer
    (get_delta_weight) and to PEFT's merged weights minus the base weights."""
    model, folder = peft_models[which]
    ours = load_adapter(folder)
    dense = to_dense(ours)
    layers = lora_layers(model)
    assert dense.keys() == layers.keys()
    for name, layer in layers.items():
        assert ours.modules[name].scaling == pytest.approx(layer.scaling["default"], rel=1e-12)
        torch.testing.assert_close(dense[name], layer.get_delta_weight("default"), rtol=0, atol=1e-6)
    merged = copy.deepcopy(model).merge_and_unload()
    for name in layers:
        diff = merged.get_submodule(name).weight - base.get_submodule(name).weight
        torch.testing.assert_close(dense[name], diff, rtol=0, atol=1e-6)


OPS = {
    "scale": lambda a, b: scale(a, -0.7),
    "negate": lambda a, b: negate(a, 1.5),
    "negate_rslora": lambda a, b: negate(b),
    "extrapolate": lambda a, b: extrapolate(a, 0.8),
    "add": lambda a, b: add(a, b),
    "add_negated": lambda a, b: add(a, negate(b, 2.0)),
    "compress": lambda a, b: compress(a, 2)[0],
    "compress_rslora": lambda a, b: compress(b, 1)[0],
    "compress_sum": lambda a, b: compress(add(a, b), 3)[0],
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_peft_loads_results_exactly(op, peft_models, base, input_ids, tmp_path):
    """For each operation, PEFT running the saved result unmerged gives the logits of the base
    with to_dense(result) added to its weights (max |diff| <= 1e-4)."""
    a, b = (load_adapter(folder) for _, folder in peft_models.values())
    result = OPS[op](a, b)
    folder = save_adapter(result, tmp_path / op)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    assert lora_layers(peft_model).keys() == result.modules.keys()
    reference = logits(merged_by_hand(base, to_dense(result)), input_ids)
    assert (reference - logits(base, input_ids)).abs().max() > 1e-2, "the adapter should change the logits"
    diff = (logits(peft_model, input_ids) - reference).abs().max()
    assert diff <= ATOL, f"{op}: PEFT logits differ from the hand-merged reference by {diff:.3g}"


def test_attach_an_adapter_covering_only_some_layers_of_a_type(base, input_ids):
    """target_modules names a type (q_proj); layers the adapter lacks must add exactly nothing."""
    from lora_unlearn.core.stack import attached
    from tests.tiny import make_adapter

    one = make_adapter({"model.layers.1.self_attn.q_proj": (32, 32, 2)}, seed=3)
    want = copy.deepcopy(base)
    with torch.no_grad():
        want.model.layers[1].self_attn.q_proj.weight += to_dense(one)["model.layers.1.self_attn.q_proj"]
        expected = want(input_ids).logits
    with attached(base, [(one, 1.0)]) as m, torch.no_grad():
        got = m(input_ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
