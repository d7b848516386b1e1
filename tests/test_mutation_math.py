"""Tests written to kill mutants of the pure math (make mutation; docs/testing.md lists the survivors).

Each test pins one behaviour of lora_unlearn/arithmetic (ops.py, perta.py) that the property tests in
test_arithmetic.py / test_perta.py left open; expected values are worked out here by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from lora_unlearn.arithmetic import add, compress
from lora_unlearn.arithmetic.perta import compress_dense, perta_weights, rescale_b, rescale_dense
from lora_unlearn.core.adapter import Adapter, LoraModule
from lora_unlearn.errors import UserError
from tests.tiny import assert_close, dw, make_adapter


def test_add_config_follows_the_modules_when_inputs_differ():
    q = make_adapter({"l.0.q_proj": (4, 3, 2)}, seed=1)
    v = make_adapter({"l.0.v_proj": (4, 3, 1)}, seed=2)
    v.config["layers_to_transform"], v.config["layers_pattern"] = [0], "l"
    out = add(q, v)
    # target_modules: union of the module names' last parts; layer restrictions of one input cannot hold for both
    assert out.config["target_modules"] == ["q_proj", "v_proj"]
    assert out.config["layers_to_transform"] is None and out.config["layers_pattern"] is None
    same = add(q, make_adapter({"l.0.q_proj": (4, 3, 1)}, seed=3))
    assert same.config["target_modules"] == ["q_proj"] and "layers_to_transform" not in same.config


def test_add_casts_to_the_first_inputs_dtype_and_bakes_the_scaling():
    # B1 = [[1], [2]], A1 = [[1, 0]], s1 = 3; B2 = [[1], [1]], A2 = [[0, 1]], s2 = 0.5 (bf16)
    one = Adapter({"m": LoraModule(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [2.0]]), 3.0)}, {})
    two = Adapter({"m": LoraModule(torch.tensor([[0.0, 1.0]], dtype=torch.bfloat16),
                                   torch.tensor([[1.0], [1.0]], dtype=torch.bfloat16), 0.5)}, {})
    out = add(one, two).modules["m"]
    assert out.A.dtype == out.B.dtype == torch.float32 and out.scaling == 1.0
    # dW = 3 * [[1, 0], [2, 0]] + 0.5 * [[0, 1], [0, 1]] = [[3, 0.5], [6, 0.5]]
    assert torch.allclose(out.B @ out.A, torch.tensor([[3.0, 0.5], [6.0, 0.5]]), atol=1e-6)


def test_compress_keeps_low_rank_modules_as_they_are():
    d = make_adapter({"big": (6, 5, 3), "small": (6, 5, 1)}, alpha=4, seed=4)
    out, errors = compress(d, 2)
    assert out.modules["small"] is d.modules["small"] and errors["small"] == 0.0
    assert out.modules["big"].rank == 2 and out.modules["big"].scaling == 1.0 and errors["big"] > 0


def test_perta_parameter_bounds_and_messages():
    ones = {"m": torch.ones(2)}
    # beta = 0 is allowed (>= 0): w = 1 / (1 + 0 + eps)
    assert torch.allclose(perta_weights(ones, ones, beta=0.0)["m"], torch.full((2,), 1 / (1 + 1e-8)))
    with pytest.raises(UserError, match=r"eps must be a finite number > 0.0, got 0.0"):
        perta_weights(ones, ones, eps=0.0)
    with pytest.raises(UserError, match=r"p must be a finite number > 0.0, got 0.0"):
        perta_weights(ones, ones, p=0.0)
    with pytest.raises(UserError, match=r"beta must be a finite number >= 0.0, got -0.5"):
        perta_weights(ones, ones, beta=-0.5)
    with pytest.raises(UserError, match=r"beta must be a number, got 'x'"):
        perta_weights(ones, ones, beta="x")
    with pytest.raises(UserError, match=r"eps must be a finite number > 0.0, got inf"):
        perta_weights(ones, ones, eps=math.inf)
    with pytest.raises(UserError, match=">= 0"):
        perta_weights(ones, {"m": torch.tensor([1.0, math.inf])})


def test_rescale_b_keeps_the_factor_dtype_and_records_its_parameters():
    A = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    B = torch.tensor([[2.0], [4.0]], dtype=torch.bfloat16)
    d = Adapter({"m": LoraModule(A, B, 0.5)}, {"lora_alpha": 1})
    # I_f = [1, 3], I_r = [1, 1] (B's shape (2, 1)): w = [1/2, 3/4]. In the SVD gauge dW = [[1, 2], [2, 4]]
    # = 5 u v^T with u = v = [1, 2] / sqrt(5): B = 5 u = [[sqrt 5], [2 sqrt 5]], A = v^T, scaling 1, so
    # dW' = (w (.) B) A = [[1/2, 1], [3/2, 3]] (rank 1: the same as (w (.) B) A with the original factors)
    out = rescale_b(d, {"m": torch.tensor([[1.0], [3.0]])}, {"m": torch.ones(2, 1)}, eps=1e-30)
    m = out.modules["m"]
    assert m.B.dtype == m.A.dtype == torch.bfloat16 and m.scaling == 1.0
    assert torch.allclose(m.B.float(), torch.tensor([[0.5], [1.5]]) * 5**0.5, rtol=1e-2)
    assert torch.allclose(m.delta(), torch.tensor([[0.5, 1.0], [1.5, 3.0]]), rtol=1e-2)
    assert out.lineage["params"] == {"beta": 1.0, "eps": 1e-30, "p": 1.0, "gauge": "svd"}
    # dense: w (.) dW with dW = 0.5 * [[2, 4], [4, 8]] = [[1, 2], [2, 4]]; I = 1 where f = r: w = 1/2
    dense = rescale_dense(d, {"m": torch.ones(2, 2)}, {"m": torch.ones(2, 2)}, eps=1e-30)
    assert torch.allclose(dense["m"], torch.tensor([[0.5, 1.0], [1.0, 2.0]]))


def test_compress_dense_records_its_source_and_turns_rslora_off():
    template = make_adapter({"m": (3, 3, 1)}, rslora=True, seed=5)
    # diag(3, 2, 0) at rank 2 is exact: B A = diag(3, 2, 0); error 0
    out, errors = compress_dense({"m": torch.diag(torch.tensor([3.0, 2.0, 0.0]))}, 2, template, source={"p": 2})
    assert out.config["use_rslora"] is False and template.config["use_rslora"] is True
    assert out.lineage["params"] == {"rank": 2, "max_relative_error": 0.0, "source": {"p": 2}}
    assert_close(dw(out.modules["m"]), torch.diag(torch.tensor([3.0, 2.0, 0.0])).double())
    assert errors == {"m": 0.0}
    # at rank 1 the discarded share is sqrt(4 / 13)
    _, errors = compress_dense({"m": torch.diag(torch.tensor([3.0, 2.0, 0.0]))}, 1, template)
    assert errors["m"] == pytest.approx(math.sqrt(4 / 13))
    with pytest.raises(UserError, match="no dense deltas"):
        compress_dense({}, 1, template)
    with pytest.raises(UserError, match=r"expected \(out, in\)"):
        compress_dense({"m": torch.ones(3, 3, 1)}, 1, template)


def test_add_takes_the_first_inputs_config_and_dtype():
    one = Adapter({"m": LoraModule(torch.ones(1, 2, dtype=torch.bfloat16), torch.ones(2, 1, dtype=torch.bfloat16), 1.0)},
                  {"lora_alpha": 1, "target_modules": "all-linear", "note": "first"})
    two = Adapter({"m": LoraModule(torch.ones(1, 2), torch.ones(2, 1), 2.0)},
                  {"lora_alpha": 2, "target_modules": "all-linear", "note": "second", "use_rslora": True})
    out = add(one, two)
    assert out.modules["m"].A.dtype == out.modules["m"].B.dtype == torch.bfloat16  # the first input's dtype
    # same target_modules in both: kept as written (not recomputed from names); rsLoRA off (scaling baked, 1)
    assert out.config == {"lora_alpha": 1, "target_modules": "all-linear", "note": "first", "use_rslora": False}


def test_compress_keeps_the_config_but_turns_rslora_off():
    d = make_adapter({"big": (6, 5, 3)}, alpha=4, rslora=True, seed=6)
    out, _ = compress(d, 1)
    assert out.config == {**d.config, "use_rslora": False} and out.lineage["op"] == "compress"
    dense, _ = compress_dense({"big": dw(d.modules["big"]).float()}, 1, d)
    assert dense.config == {**d.config, "use_rslora": False}


def test_rescale_dense_uses_the_exponent():
    # f = 1, r = 2, p = 2: w = 1 / (1 + 4) = 0.2 on every entry; dW = 1 * [[1]] @ [[1, 1]] = [[1, 1]]
    d = Adapter({"m": LoraModule(torch.ones(1, 2), torch.ones(1, 1), 1.0)}, {})
    out = rescale_dense(d, {"m": torch.ones(1, 2)}, {"m": torch.full((1, 2), 2.0)}, p=2.0)
    assert torch.allclose(out["m"], torch.full((1, 2), 0.2))
