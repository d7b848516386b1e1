"""Tests written to kill the mutants of arithmetic/ops.py and arithmetic/perta.py that survived the
2026-12-02 run of `make mutation` (docs/testing.md lists them and the equivalent ones).

Each test names the mutants it kills (mutmut's names, ``x_FUNCTION__mutmut_N``); expected values are
worked out by hand in the comments. Error messages are matched whole (``^...$``) where a mutant only
changes their text: the message is what a user reads, and a fragment match lets "XX...XX" through.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from lora_unlearn.arithmetic import add, compress, extrapolate, negate
from lora_unlearn.arithmetic.perta import check_maps, compress_dense, perta_weights, rescale_b, rescale_dense
from lora_unlearn.core.adapter import Adapter, LoraModule
from lora_unlearn.errors import UserError


def _module(out: int, inp: int, r: int, seed: int = 0, scaling: float = 1.0) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g), scaling)


def _exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


def test_negate_and_extrapolate_name_their_parameter():
    # kills x_negate 3/7/8 and x_extrapolate 2/6/7 (None, "XXlamXX", "LAM" as the parameter's name)
    d = Adapter({"m": _module(2, 2, 1)}, {})
    with pytest.raises(UserError, match=_exact("lam must be a finite number, got nan")):
        negate(d, math.nan)
    with pytest.raises(UserError, match=_exact("alpha must be a number, got 'x'")):
        extrapolate(d, "x")


def test_add_messages_whole():
    # kills x_add 5 (too few inputs), 18/19 (different bases), 32/33 (different shapes)
    one = Adapter({"m": _module(2, 2, 1)}, {"base_model_name_or_path": "a"})
    with pytest.raises(UserError, match=_exact("add needs at least two adapters")):
        add(one)
    other_base = Adapter({"m": _module(2, 2, 1)}, {"base_model_name_or_path": "b"})
    with pytest.raises(UserError, match=_exact(
            "adapters were trained on different base models ['a', 'b']: their deltas do not add up to anything "
            "meaningful (pass --allow-different-bases to force)")):
        add(one, other_base)
    wider = Adapter({"m": _module(3, 2, 1)}, {"base_model_name_or_path": "a"})
    with pytest.raises(UserError, match=_exact(
            "module m has different shapes across adapters [(2, 2), (3, 2)]: the adapters belong to different "
            "model architectures")):
        add(one, wider)


def test_add_target_modules_of_top_level_names_and_a_shared_layer_restriction():
    # x_add 81: rsplit(".", 1)[+1] is the same as [-1] for "l.0.q_proj", but a module name without a dot
    # ("m") splits into one part, so [1] raises IndexError; the union of the last parts is ["m", "n"].
    m = Adapter({"m": _module(2, 2, 1)}, {"target_modules": ["m"]})
    n = Adapter({"n": _module(2, 2, 1, seed=1)}, {"target_modules": ["n"]})
    assert add(m, n).config["target_modules"] == ["m", "n"]
    # x_add 88/89/90: config.get(None / "XX..XX" / upper case) is None, so equal restrictions ([0] in
    # both inputs) would read as different and be dropped; both inputs hold layer 0 only: it stays.
    cfg = {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "layers"}
    a = Adapter({"layers.0.q_proj": _module(2, 2, 1)}, dict(cfg))
    b = Adapter({"layers.0.q_proj": _module(2, 2, 1, seed=1)}, dict(cfg))
    out = add(a, b)
    assert out.config["layers_to_transform"] == [0] and out.config["layers_pattern"] == "layers"
    # x_add 102: the lineage node records add's form (canonical factors), not None
    assert out.lineage == {"op": "add", "params": {"form": "canonical"}, "inputs": [a.lineage, b.lineage]}


def test_compress_of_a_zero_module_reports_zero_error():
    # kills x_compress 38/44 (`total > 0` -> always true / `>= 0`: 0.0 / 0.0 raises ZeroDivisionError)
    # and 46 (the zero module's error 0.0 -> 1.0). B = 0 (rank 3 > 1): dW = 0, its best rank-1
    # approximation is 0, error 0 by the docstring's convention; the other module keeps the run honest:
    # B = diag-like [[2, 0], [0, 1]] @ A = I (rank 2, s = 1): singular values 2 and 1, rank 1 keeps 2:
    # error sqrt(1 / (4 + 1)).
    zero = LoraModule(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(5, 3), 2.0)
    two = LoraModule(torch.eye(2), torch.tensor([[2.0, 0.0], [0.0, 1.0]]), 1.0)
    out, errors = compress(Adapter({"zero": zero, "two": two}, {}), 1)
    assert errors["zero"] == 0.0 and errors["two"] == pytest.approx(math.sqrt(1 / 5))
    assert torch.equal(out.modules["zero"].B @ out.modules["zero"].A, torch.zeros(5, 4))
    assert out.lineage["params"]["max_relative_error"] == pytest.approx(math.sqrt(1 / 5))


def test_compress_dense_error_of_a_small_delta():
    # kills x_compress_dense 41 (`total > 1`): delta = diag(0.3, 0.2) has sum S^2 = 0.13 < 1; rank 1 keeps
    # 0.3, so the error is sqrt(0.04 / 0.13) (the mutant reports 0.0). x_compress_dense 3: the message.
    template = Adapter({"m": _module(2, 2, 1)}, {})
    out, errors = compress_dense({"m": torch.diag(torch.tensor([0.3, 0.2]))}, 1, template)
    assert errors["m"] == pytest.approx(math.sqrt(0.04 / 0.13))
    assert torch.allclose(out.modules["m"].B @ out.modules["m"].A, torch.tensor([[0.3, 0.0], [0.0, 0.0]]))
    with pytest.raises(UserError, match=_exact("no dense deltas to compress")):
        compress_dense({}, 1, template)


def test_perta_weights_module_mismatch_lists_the_first_three_names():
    # kills x_perta_weights 51/56 ([:3] -> [:4] in either list) and 57/58 (the advice's text)
    four = {name: torch.ones(1) for name in "abcd"}
    z = {"z": torch.ones(1)}
    with pytest.raises(UserError, match=_exact(
            "forget and retain importances cover different modules (only forget: ['a', 'b', 'c'], only retain: "
            "['z']): compute both for the same adapter and space")):
        perta_weights(four, z)
    with pytest.raises(UserError, match=re.escape("(only forget: ['z'], only retain: ['a', 'b', 'c'])")):
        perta_weights(z, four)


def test_check_maps_messages_name_the_maps_the_space_and_the_shape():
    d = Adapter({name: _module(2, 2, 1) for name in ("m1", "m2", "m3", "m4")}, {})
    # x_check_maps 1/2 (the default where= "importance"), 16/17 ([:3] -> [:4] in either list)
    with pytest.raises(UserError, match=_exact(
            "importance does not belong to this adapter: modules only in the maps ['w', 'x', 'y'], only in the "
            "adapter ['m1', 'm2', 'm3']; recompute the importance for this adapter")):
        check_maps({name: torch.ones(2, 1) for name in "wxyz"}, d, "b")
    one = Adapter({"m": LoraModule(torch.ones(1, 2), torch.ones(2, 1), 1.0)}, {})  # B (2, 1), W (2, 2)
    ok_b, bad_b = {"m": torch.ones(2, 1)}, {"m": torch.ones(2, 2)}
    # B space: x_check_maps 30/32/33/34/36/37 (the "B (out, r)" text and its condition),
    # x_rescale_b 4/5 ("forget" text), 11 (where=None), 15 (where= left out: "importance")
    with pytest.raises(UserError, match=_exact(
            "forget importance: module m has shape (2, 2) but this adapter's B (out, r) is (2, 1); recompute the "
            "importance for this adapter in b space")):
        rescale_b(one, bad_b, ok_b)
    # x_rescale_b 6/7 ("retain" text)
    with pytest.raises(UserError, match=r"^retain importance: module m has shape \(2, 2\)"):
        rescale_b(one, ok_b, bad_b)
    # dense space: x_check_maps 38 ("W (out, in)" text), x_rescale_dense 4/5 ("forget"), 10 (space None),
    # 11 (where=None), 15 (where= left out), 16/17 ("XXdenseXX" / "DENSE" as the space)
    with pytest.raises(UserError, match=_exact(
            "forget importance: module m has shape (2, 1) but this adapter's W (out, in) is (2, 2); recompute the "
            "importance for this adapter in dense space")):
        rescale_dense(one, ok_b, {"m": torch.ones(2, 2)})
    # x_rescale_dense 6/7 ("retain" text)
    with pytest.raises(UserError, match=r"^retain importance: module m has shape \(2, 1\)"):
        rescale_dense(one, {"m": torch.ones(2, 2)}, ok_b)
