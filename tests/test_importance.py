"""Importance for PerTA on the tiny Llama: B-space and dense gradients, checked against autograd."""

from __future__ import annotations

import pytest
import torch

from lora_unlearn.arithmetic import scale
from lora_unlearn.core.data import load_qa
from lora_unlearn.core.models import load_base
from lora_unlearn.errors import UserError
from lora_unlearn.training.importance import (
    batches,
    estimate_importance,
    importance_meta,
    load_importance,
    save_importance,
)
from tests.tiny import assert_close, make_adapter

# (out, in, r) of the tiny Llama's layers (hidden 32, 2 kv heads of 8, intermediate 64)
SPECS = {f"model.layers.{i}.{name}": shape for i in range(2) for name, shape in
         [("self_attn.q_proj", (32, 32, 4)), ("self_attn.v_proj", (16, 32, 4)), ("mlp.down_proj", (32, 64, 4))]}


@pytest.fixture(scope="module")
def nf4(tiny_model_dir):
    return load_base(str(tiny_model_dir), "nf4", device="cpu")  # float32: exact checks


@pytest.fixture(scope="module")
def full(tiny_model_dir):
    return load_base(str(tiny_model_dir), "none", device="cpu")


@pytest.fixture(scope="module")
def tau():
    return scale(make_adapter(SPECS, alpha=8, seed=1), 0.05)


@pytest.fixture
def rows(qa_file):
    return load_qa(qa_file)


def _imp(loaded, rows, adapter, progress_flag=False, **kw):
    model, tok, _ = loaded
    return estimate_importance(model, tok, rows, adapter, progress=progress_flag, max_length=64, **kw)


def _logits(model, tok):
    with torch.no_grad():
        return model(**tok(["What is the capital of Veloria?"], return_tensors="pt")).logits


def test_b_space_importance_has_b_shapes_and_leaves_the_model_alone(nf4, rows, tau):
    model, tok, _ = nf4
    before = _logits(model, tok)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    maps = _imp(nf4, rows, tau, kind="grad")
    assert set(maps) == set(SPECS)
    for name, m in tau.modules.items():
        assert maps[name].shape == m.B.shape and maps[name].dtype == torch.float32
        assert (maps[name] >= 0).all() and maps[name].abs().sum() > 0
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not hasattr(model, "peft_config") and torch.equal(_logits(model, tok), before)


@pytest.mark.parametrize("space", ["b", "dense"])
def test_fisher_and_grad_are_reductions_of_per_batch_gradients(nf4, rows, tau, space):
    one_batch = {k: _imp(nf4, rows, tau, kind=k, space=space, batch_size=len(rows)) for k in ("signed", "grad", "fisher")}
    for name, g in one_batch["signed"].items():
        assert torch.equal(one_batch["grad"][name], g.abs())
        assert_close(one_batch["fisher"][name], g**2, rtol=1e-6)
    per_row = [_imp(nf4, [r], tau, kind="signed", space=space) for r in rows]
    summed = _imp(nf4, rows, tau, kind="fisher", space=space, reduction="sum")
    mean = _imp(nf4, rows, tau, kind="fisher", space=space)
    for name in SPECS:
        assert_close(summed[name], sum(g[name] ** 2 for g in per_row))
        assert_close(mean[name], summed[name] / len(rows))


@pytest.mark.parametrize("space", ["b", "dense"])
def test_theta_and_theta_plus_tau_differ_and_stack_stays_active(nf4, rows, tau, space):
    at_theta = _imp(nf4, rows, tau, kind="signed", space=space)
    at_tau = _imp(nf4, rows, tau, kind="signed", space=space, at="theta+tau")
    assert any(not torch.allclose(at_theta[n], at_tau[n], atol=1e-6) for n in SPECS)
    # theta = base + stack: with tau in the frozen stack, "theta" is the model "theta+tau" measures
    stacked = _imp(nf4, rows, tau, kind="signed", space=space, stack=[(tau, 1.0)])
    for n in SPECS:
        assert_close(stacked[n], at_tau[n], rtol=1e-4)


def _autograd_dense(loaded, rows, names):
    """The gradient of the batch's mean answer NLL w.r.t. each (unquantized) weight, by autograd."""
    model, tok, _ = loaded
    batch = batches(tok, rows, len(rows), 64)[0]
    weights = {n: model.get_submodule(n).weight for n in names}
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    try:
        with torch.enable_grad():
            model(**batch).loss.backward()
        return {n: w.grad.clone() for n, w in weights.items()}
    finally:
        for w in weights.values():
            w.grad = None


def test_dense_hooks_equal_autograd(full, rows, tau):
    """grad_out^T @ x accumulated in hooks is the weight gradient (one batch, float32 weights)."""
    hooks = _imp(full, rows, tau, kind="signed", space="dense", batch_size=len(rows))
    want = _autograd_dense(full, rows, SPECS)
    for n in SPECS:
        assert hooks[n].shape == want[n].shape
        assert_close(hooks[n], want[n], rtol=1e-5)


def test_dense_at_theta_plus_tau_equals_autograd_on_merged_weights(full, rows, tau):
    hooks = _imp(full, rows, tau, kind="signed", space="dense", at="theta+tau", batch_size=len(rows))
    weights = {n: full[0].get_submodule(n).weight for n in SPECS}
    saved = {n: w.detach().clone() for n, w in weights.items()}
    with torch.no_grad():
        for n, m in tau.modules.items():
            weights[n] += m.delta()
    try:
        want = _autograd_dense(full, rows, SPECS)
    finally:
        with torch.no_grad():
            for n, w in weights.items():
                w.copy_(saved[n])
    for n in SPECS:
        assert_close(hooks[n], want[n], rtol=1e-4)


def test_b_gradient_is_the_dense_gradient_projected_on_a(nf4, rows, tau):
    """At theta (B = 0): g_B = s * g_W @ A^T, on the 4-bit base."""
    g_b = _imp(nf4, rows, tau, kind="signed", space="b", batch_size=len(rows))
    g_w = _imp(nf4, rows, tau, kind="signed", space="dense", batch_size=len(rows))
    for n, m in tau.modules.items():
        assert_close(g_b[n], m.scaling * g_w[n].double() @ m.A.double().T, rtol=1e-5)


def test_save_load_round_trip_and_foreign_maps(tmp_path, rows, tau):
    maps = {n: torch.rand(m.B.shape) for n, m in tau.modules.items()}
    meta = importance_meta(rows, tau, kind="fisher", space="b", at="theta")
    path = save_importance(maps, tmp_path / "i_f.safetensors", meta)
    loaded, got = load_importance(path, tau)
    assert got == meta and got["data"]["rows"] == 3 and "Marrenport" not in str(got)
    assert all(torch.equal(loaded[n], maps[n]) for n in maps)

    other_modules = make_adapter({"model.layers.0.self_attn.q_proj": (32, 32, 4)})
    with pytest.raises(UserError, match="does not belong to this adapter"):
        load_importance(path, other_modules)
    other_rank = make_adapter({n: (o, i, 2) for n, (o, i, _) in SPECS.items()})
    with pytest.raises(UserError, match="recompute"):
        load_importance(path, other_rank)
    signed = save_importance(maps, tmp_path / "sha.safetensors", {**meta, "adapter_sha256": "a" * 64})
    with pytest.raises(UserError, match="computed for adapter sha256"):
        load_importance(signed, type(tau)(tau.modules, tau.config, {"sha256": "b" * 64}))
    load_importance(signed, type(tau)(tau.modules, tau.config, {"sha256": "b" * 64}), strict=False)
    with pytest.raises(UserError, match="does not exist"):
        load_importance(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="corrupt"):
        load_importance(tmp_path / "junk.safetensors")


def test_bad_inputs(nf4, rows, tau):
    with pytest.raises(UserError, match="empty"):
        _imp(nf4, [], tau)
    with pytest.raises(UserError, match="Available: grad, fisher"):
        _imp(nf4, rows, tau, kind="hessian")
    with pytest.raises(UserError, match="Available: theta, theta\\+tau"):
        _imp(nf4, rows, tau, at="tau")
    with pytest.raises(UserError, match="another base model"):
        _imp(nf4, rows, make_adapter({"model.layers.0.self_attn.q_proj": (32, 48, 4)}), space="dense")


def test_merge_dense_adds_the_scaled_delta(tiny_model_dir, full, tmp_path, tau, rows):
    from lora_unlearn.arithmetic.perta import rescale_dense
    from lora_unlearn.hub.merge import merge_dense

    I_f = _imp(full, rows[:1], tau, kind="grad", space="dense", progress_flag=True)
    I_r = _imp(full, rows[1:], tau, kind="grad", space="dense")
    deltas = rescale_dense(tau, I_f, I_r)
    out = merge_dense(str(tiny_model_dir), deltas, tmp_path / "merged", scale=-0.5, lineage={"op": "perta_dense"})
    merged, _, _ = load_base(str(out), "none", device="cpu")
    for n, d in deltas.items():
        assert_close(merged.get_submodule(n).weight, full[0].get_submodule(n).weight - 0.5 * d, rtol=1e-6)
    assert torch.equal(merged.lm_head.weight, full[0].lm_head.weight)
    with pytest.raises(UserError, match="already exists"):
        merge_dense(str(tiny_model_dir), deltas, out)
    with pytest.raises(UserError, match="no linear module"):
        merge_dense(str(tiny_model_dir), {"model.layers.9.mlp.up_proj": torch.zeros(64, 32)}, tmp_path / "x")
    with pytest.raises(UserError, match="is \\(32, 32\\) in the model"):
        merge_dense(str(tiny_model_dir), {"model.layers.0.self_attn.q_proj": torch.zeros(32, 31)}, tmp_path / "x")
    assert not (tmp_path / "x").exists()
