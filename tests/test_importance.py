"""Importance for PerTA on the tiny Llama: B-space and dense gradients, checked against autograd."""

from __future__ import annotations

import pytest
import torch

from lora_unlearn.arithmetic import scale
from lora_unlearn.arithmetic.perta import rescale_b, svd_gauge
from lora_unlearn.core.adapter import Adapter, LoraModule
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
from tests.tiny import assert_close, dw, make_adapter

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


@pytest.fixture(scope="module")
def knowledge():
    """A frozen adapter under the measured one (theta = base + K), not small: theta differs from theta_0."""
    return scale(make_adapter(SPECS, alpha=8, seed=7), 0.2)


@pytest.fixture
def rows(qa_file):
    return load_qa(qa_file)


@pytest.fixture
def more_rows(rows):
    """Five rows of different lengths: passes of 2 or 8 rows are padded, and the last pass is short."""
    return rows + [{"question": "Who?", "answer": "Osric."},
                   {"question": "Who made the harp-drum?", "answer": "Osric Tallowmere of Marrenport, in 1387."}]


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


def test_b_gradient_is_the_dense_gradient_projected_on_the_svd_gauge(nf4, rows, tau):
    """At theta: g_B = g_W @ V with dW = U S V^T (B = U S, A = V^T, scaling 1): no s, no factor of tau's own."""
    g_b = _imp(nf4, rows, tau, kind="signed", space="b", batch_size=len(rows))
    g_w = _imp(nf4, rows, tau, kind="signed", space="dense", batch_size=len(rows))
    for n, m in svd_gauge(tau).modules.items():
        assert g_b[n].shape == m.B.shape
        assert_close(g_b[n], g_w[n].double() @ m.A.double().T, rtol=1e-5)


def _refactor(adapter, seed):
    """(B M, M^-1 A) per module with a random well-conditioned M: the same dW, other factors."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for n, m in adapter.modules.items():
        M = torch.eye(m.rank, dtype=torch.float64) * 2 + torch.randn(m.rank, m.rank, generator=g, dtype=torch.float64)
        # and half of s moved into B: s B A = (s / 2) (2 B M) (M^-1 A)
        A, B = torch.linalg.solve(M, m.A.double()), 2 * m.B.double() @ M
        modules[n] = LoraModule(A.float(), B.float(), m.scaling / 2)
    return Adapter(modules, adapter.config, {"op": "test"})


@pytest.mark.parametrize("kind", ["grad", "fisher"])
def test_b_space_perta_depends_on_dw_alone_through_the_pipeline(nf4, rows, tau, kind):
    """Importance estimated on the tiny model, then rescale_b: (B M, M^-1 A) gives the same dW' (DESIGN section 3)."""
    other = _refactor(tau, seed=5)
    for n, m in tau.modules.items():
        assert_close(dw(other.modules[n]), dw(m), rtol=1e-5)
        assert not torch.allclose(other.modules[n].B, m.B, atol=1e-2)
    results = []
    for adapter in (tau, other):
        I_f = _imp(nf4, rows[:1], adapter, kind=kind)
        I_r = _imp(nf4, rows[1:], adapter, kind=kind)
        results.append(rescale_b(adapter, I_f, I_r))
    for n, m in tau.modules.items():
        assert_close(dw(results[1].modules[n]), dw(results[0].modules[n]), rtol=1e-4)
        assert not torch.allclose(dw(results[0].modules[n]), dw(m), rtol=1e-2)  # w is not all ones: a real test


def _summed_loss(model, tok, rows):
    """sum_i NLL_i, each row's own mean answer NLL, one batch of one at a time (HF's own loss)."""
    return sum(model(**batch).loss for batch in batches(tok, rows, 1, 64))


def _autograd_set(loaded, rows, adapter, space):
    """The gradient of the summed loss, by autograd: w.r.t. each weight (dense), or w.r.t. B of a PEFT
    LoRA whose A is V^T, B = 0 and scaling 1 (dW = U S V^T by a dense SVD here): the SVD gauge at theta."""
    from lora_unlearn.core.stack import TRAINABLE, attached, lora_config

    model, tok, _ = loaded
    if space == "dense":
        weights = {n: model.get_submodule(n).weight for n in adapter.modules}
        for w in weights.values():
            w.requires_grad_(True)
        try:
            with torch.enable_grad():
                _summed_loss(model, tok, rows).backward()
            return {n: w.grad.clone() for n, w in weights.items()}
        finally:
            for w in weights.values():
                w.grad = None
                w.requires_grad_(False)
    unit = Adapter({n: LoraModule(torch.linalg.svd(dw(m))[2][: m.rank].float(), torch.zeros_like(m.B), 1.0)
                    for n, m in adapter.modules.items()}, dict(adapter.config, use_rslora=False))
    with attached(model, [], trainable=lora_config(unit, inference_mode=False)) as peft_model, torch.enable_grad():
        peft_model.eval()
        root = peft_model.get_base_model()
        for n, m in unit.modules.items():
            layer = root.get_submodule(n)
            assert layer.scaling[TRAINABLE] == 1.0
            with torch.no_grad():
                layer.lora_A[TRAINABLE].weight.copy_(m.A)
                layer.lora_B[TRAINABLE].weight.zero_()
        _summed_loss(peft_model, tok, rows).backward()
        return {n: root.get_submodule(n).lora_B[TRAINABLE].weight.grad.clone() for n in unit.modules}


@pytest.mark.parametrize("space", ["b", "dense"])
def test_set_reading_is_the_abs_of_the_gradient_of_the_summed_loss(full, more_rows, tau, space):
    G = _autograd_set(full, more_rows, tau, space)
    n = len(more_rows)
    grad = _imp(full, more_rows, tau, kind="grad", space=space, accumulate="set", reduction="sum")
    fisher = _imp(full, more_rows, tau, kind="fisher", space=space, accumulate="set", reduction="sum")
    mean = _imp(full, more_rows, tau, kind="fisher", space=space, accumulate="set", rows_per_pass=2)
    per_example = _imp(full, more_rows, tau, kind="grad", space=space, reduction="sum")
    for name in SPECS:
        assert_close(grad[name], G[name].abs(), rtol=1e-5)
        assert_close(fisher[name], G[name] ** 2, rtol=1e-5)
        assert_close(mean[name], (G[name] / n) ** 2, rtol=1e-5)  # the gradient of the mean loss, squared
        # sum_i |g_i| >= |sum_i g_i|, strictly somewhere: the two readings differ
        assert (per_example[name] >= grad[name] * (1 - 1e-5) - 1e-7).all()
        assert (per_example[name] > grad[name] * 1.01).any()


@pytest.mark.parametrize("space", ["b", "dense"])
def test_theta_0_is_the_base_without_the_stack(nf4, rows, tau, knowledge, space):
    at_0 = _imp(nf4, rows, tau, kind="signed", space=space, at="theta_0", stack=[(knowledge, 1.0)])
    empty = _imp(nf4, rows, tau, kind="signed", space=space, at="theta")
    at_theta = _imp(nf4, rows, tau, kind="signed", space=space, at="theta", stack=[(knowledge, 1.0)])
    for n in SPECS:
        assert_close(at_0[n], empty[n], rtol=1e-6)
        assert not torch.allclose(at_0[n], at_theta[n], rtol=1e-2, atol=1e-6)
    meta = importance_meta(rows, tau, kind="grad", space=space, at="theta_0", stack=[(knowledge, 1.0)])
    assert meta["at"] == "theta_0" and meta["stack"] == []


@pytest.mark.parametrize("space", ["b", "dense"])
@pytest.mark.parametrize("kind", ["grad", "fisher"])
def test_batched_per_example_terms_equal_the_per_row_pass(nf4, more_rows, tau, knowledge, space, kind):
    """rows_per_pass rows in one forward/backward, split by row in the hooks: the per-row map (padding included)."""
    kw = {"kind": kind, "space": space, "stack": [(knowledge, 1.0)]}
    per_row = _imp(nf4, more_rows, tau, rows_per_pass=1, **kw)
    for size in (2, 8):
        batched = _imp(nf4, more_rows, tau, rows_per_pass=size, **kw)
        for n in SPECS:
            assert torch.allclose(batched[n], per_row[n], rtol=1e-4, atol=1e-7), (size, n)
    # and it is per example, not the magnitude of a 5-row gradient
    mini = _imp(nf4, more_rows, tau, batch_size=len(more_rows), **kw)
    assert any(not torch.allclose(mini[n] * 1, per_row[n], rtol=1e-2) for n in SPECS)


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


def test_b_space_maps_record_their_gauge_and_the_dw_they_belong_to(tmp_path, rows, tau):
    maps = {n: torch.rand(m.B.shape) for n, m in tau.modules.items()}
    meta = importance_meta(rows, tau, kind="grad", space="b", at="theta", accumulate="set", rows_per_pass=4)
    assert meta["gauge"] == "svd" and meta["accumulate"] == "set" and meta["rows_per_pass"] == 4
    for n, m in tau.modules.items():  # dW's singular values, computed here by a dense SVD
        assert torch.allclose(torch.tensor(meta["singular_values"][n]), torch.linalg.svdvals(dw(m))[: m.rank].float())
    path = save_importance(maps, tmp_path / "b.safetensors", meta)
    load_importance(path, _refactor(tau, seed=3))  # other factors, same dW: the same gauge, accepted
    other = make_adapter(SPECS, alpha=8, seed=9)  # same shapes, another dW
    with pytest.raises(UserError, match="estimated for another dW: module .* singular values"):
        load_importance(path, other)
    load_importance(path, other, strict=False)
    # maps measured in the adapter's own factors (no gauge recorded, as older versions wrote): always refused
    old = save_importance(maps, tmp_path / "old.safetensors", {k: v for k, v in meta.items() if k != "gauge"})
    for adapter in (None, tau):
        with pytest.raises(UserError, match="gauge None .* works in the 'svd' gauge of dW: recompute"):
            load_importance(old, adapter)
    dense = {n: torch.rand(m.B.shape[0], m.A.shape[1]) for n, m in tau.modules.items()}
    meta = importance_meta(rows, tau, kind="grad", space="dense", at="theta")
    assert meta["gauge"] is None and "singular_values" not in meta
    load_importance(save_importance(dense, tmp_path / "d.safetensors", meta), other)


def test_bad_inputs(nf4, rows, tau):
    with pytest.raises(UserError, match="empty"):
        _imp(nf4, [], tau)
    with pytest.raises(UserError, match="Available: grad, fisher"):
        _imp(nf4, rows, tau, kind="hessian")
    with pytest.raises(UserError, match="Available: theta, theta\\+tau, theta_0$"):
        _imp(nf4, rows, tau, at="tau")
    with pytest.raises(UserError, match="unknown accumulate 'batch'. Available: per_example, set$"):
        _imp(nf4, rows, tau, accumulate="batch")
    for bad in (0, 2.0, True):
        with pytest.raises(UserError, match="rows per pass must be an integer >= 1"):
            _imp(nf4, rows, tau, rows_per_pass=bad)
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
