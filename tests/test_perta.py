"""PerTA's pure half: the weight formula, rescaling in B and dense space, SVD compression."""

from __future__ import annotations

import math

import pytest
import torch

from lora_unlearn.arithmetic import negate, to_dense
from lora_unlearn.arithmetic.perta import compress_dense, perta_weights, rescale_b, rescale_dense, svd_gauge
from lora_unlearn.core.adapter import Adapter, LoraModule
from lora_unlearn.errors import UserError
from tests.tiny import assert_close, dw, make_adapter

SPECS = {"l0.q_proj": (6, 5, 3), "l0.down_proj": (4, 7, 2)}


@pytest.fixture
def tau():
    return make_adapter(SPECS, alpha=8, seed=3)


def _importance(adapter, space, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (lambda m: m.B.shape) if space == "b" else (lambda m: (m.B.shape[0], m.A.shape[1]))
    return {n: torch.rand(shape(m), generator=g) for n, m in adapter.modules.items()}


def _formula(I_f, I_r, beta, p, eps=1e-8):
    """DESIGN section 3's w = I_f^p / (I_f^p + beta * I_r^p + eps), in float64, written out independently."""
    return {n: I_f[n].double() ** p / (I_f[n].double() ** p + beta * I_r[n].double() ** p + eps) for n in I_f}


def test_weights_match_hand_values():
    f = {"m": torch.tensor([1.0, 3.0, 0.0, 2.0, 0.0])}
    r = {"m": torch.tensor([1.0, 1.0, 2.0, 0.0, 0.0])}
    w = perta_weights(f, r, beta=1.0, eps=0.0 + 1e-8)["m"]
    want = torch.tensor([0.5, 0.75, 0.0, 1.0, 0.0])
    assert torch.allclose(w, want, atol=1e-7)
    assert w[4] == 0  # neither set cares: 0 / (0 + eps) = 0, no NaN
    # beta = 2, p = 2: 1/(1+2*1) = 1/3, 9/(9+2) = 9/11, 0, 4/4 = 1, 0
    w = perta_weights(f, r, beta=2.0, eps=1e-8, p=2.0)["m"]
    assert torch.allclose(w, torch.tensor([1 / 3, 9 / 11, 0.0, 1.0, 0.0]), atol=1e-7)
    # eps is absolute: with importances of its size, w is pulled well below the ratio
    w = perta_weights({"m": torch.tensor([1e-8])}, {"m": torch.tensor([0.0])}, eps=1e-8)["m"]
    assert math.isclose(float(w), 0.5, rel_tol=1e-6)
    assert perta_weights(f, r)["m"].dtype == torch.float32


def test_weights_exercise_every_exponent_and_beta():
    # Every term of w = f^p / (f^p + beta * r^p + eps) matters at once (eps = 1e-8 is negligible):
    #   f=1, r=2, p=2, beta=1: 1 / (1 + 1*4)   = 0.2      (r^p, not r: 1/(1+2) = 1/3 would be wrong)
    #   f=2, r=1, p=2, beta=1: 4 / (4 + 1*1)   = 0.8      (f^p in the numerator and the denominator)
    #   f=3, r=2, p=2, beta=1: 9 / (9 + 4)     = 9/13
    #   f=4, r=2, p=0.5, beta=3: 2 / (2 + 3*sqrt(2)) = 1 / (1 + 1.5*sqrt(2))
    f = {"m": torch.tensor([1.0, 2.0, 3.0])}
    r = {"m": torch.tensor([2.0, 1.0, 2.0])}
    w = perta_weights(f, r, beta=1.0, p=2.0)["m"]
    assert torch.allclose(w, torch.tensor([0.2, 0.8, 9 / 13]), atol=1e-7)
    w = perta_weights({"m": torch.tensor([4.0])}, {"m": torch.tensor([2.0])}, beta=3.0, p=0.5)["m"]
    assert math.isclose(float(w), 1 / (1 + 1.5 * math.sqrt(2)), rel_tol=1e-6)
    # beta = 0: retain is ignored, w = f^p / (f^p + eps) ~ 1 wherever f > 0
    w = perta_weights(f, r, beta=0.0, p=2.0)["m"]
    assert torch.allclose(w, torch.ones(3), atol=1e-7)
    # eps is added once, not raised to p: f = r = 1e-4, p = 2 -> 1e-8 / (1e-8 + 1e-8 + 1e-8) = 1/3
    w = perta_weights({"m": torch.tensor([1e-4])}, {"m": torch.tensor([1e-4])}, p=2.0, eps=1e-8)["m"]
    assert math.isclose(float(w), 1 / 3, rel_tol=1e-5)


def _svd(m):
    """dW = U S V^T by a dense SVD of s B A, computed here (not by the library): (U S, V^T), top r."""
    u, sv, vh = torch.linalg.svd(dw(m), full_matrices=False)
    return u[:, : m.rank] * sv[: m.rank], vh[: m.rank]


def test_rescale_b_is_w_times_b_in_the_svd_gauge(tau):
    I_f, I_r = _importance(tau, "b", 1), _importance(tau, "b", 2)
    w = _formula(I_f, I_r, beta=0.5, p=1.5)  # written out here, not perta_weights
    out = rescale_b(tau, I_f, I_r, beta=0.5, p=1.5)
    for n, m in tau.modules.items():
        o = out.modules[n]
        assert o.rank == m.rank and o.scaling == 1.0
        US, Vh = _svd(m)  # w acts on U S column by column, so the sign of each (u_k, v_k) cancels out
        assert_close(dw(o), (w[n].double() * US) @ Vh)
    assert out.lineage["op"] == "perta_b"
    assert out.lineage["params"] == {"beta": 0.5, "eps": 1e-8, "p": 1.5, "gauge": "svd"}
    # the user negates afterwards: theta - lam * (w (.) tau)
    un = negate(out, 2.0)
    for n in SPECS:
        assert_close(to_dense(un)[n], -2.0 * dw(out.modules[n]))


def test_svd_gauge_is_the_svd_of_dw_whatever_the_factors():
    d = make_adapter({"m": (6, 5, 3), "wide": (3, 7, 4)}, rslora=True, seed=4, dtype=torch.float64)
    g = svd_gauge(d)
    assert g.config["use_rslora"] is False
    for n, m in d.modules.items():
        o = g.modules[n]
        k = min(m.rank, *dw(m).shape)  # "wide": rank 4 > out 3, so 3 triplets
        assert o.scaling == 1.0 and o.A.shape == (k, m.A.shape[1]) and o.B.shape == (m.B.shape[0], k)
        assert_close(dw(o), dw(m), rtol=1e-12)
        assert_close(o.A @ o.A.T, torch.eye(k, dtype=torch.float64), rtol=1e-12)  # A = V^T: orthonormal rows
        assert_close(o.B.T @ o.B, torch.diag(torch.linalg.svdvals(dw(m))[:k] ** 2), rtol=1e-10)  # B = U S
    # (B M, M^-1 A) is the same dW, hence the same gauge: signs are fixed by the largest |entry| of u_k
    m = d.modules["m"]
    M = torch.tensor([[2.0, 1.0, 0.0], [0.0, -1.0, 0.0], [1.0, 0.0, 3.0]], dtype=torch.float64)
    e = svd_gauge(Adapter({"m": LoraModule(torch.linalg.solve(M, m.A), m.B @ M, m.scaling)}, d.config)).modules["m"]
    assert torch.allclose(e.B, g.modules["m"].B, atol=1e-10) and torch.allclose(e.A, g.modules["m"].A, atol=1e-10)
    assert (g.modules["m"].B.gather(0, g.modules["m"].B.abs().argmax(0, keepdim=True)) > 0).all()


def test_rescale_b_with_unit_weights_reproduces_the_adapter(tau):
    I_f = {n: torch.ones_like(m.B) for n, m in tau.modules.items()}
    I_r = {n: torch.zeros_like(m.B) for n, m in tau.modules.items()}
    out = rescale_b(tau, I_f, I_r, eps=1e-30)
    for n, m in tau.modules.items():
        assert_close(dw(out.modules[n]), dw(m), rtol=1e-7)


def test_rescale_dense_is_w_times_dw(tau):
    I_f, I_r = _importance(tau, "dense", 1), _importance(tau, "dense", 2)
    w = _formula(I_f, I_r, beta=1.0, p=1.0)
    out = rescale_dense(tau, I_f, I_r)
    for n, m in tau.modules.items():
        assert out[n].shape == (m.B.shape[0], m.A.shape[1])
        assert_close(out[n], w[n].double() * dw(m))


def test_compress_dense_error_is_the_discarded_share_and_full_rank_is_exact(tau):
    g = torch.Generator().manual_seed(0)
    deltas = {"l0.q_proj": torch.randn(6, 5, generator=g), "l0.down_proj": torch.randn(4, 7, generator=g)}
    for k in (1, 2, 3):
        out, errors = compress_dense(deltas, k, tau)
        for n, d in deltas.items():
            m = out.modules[n]
            assert m.rank == k and m.scaling == 1.0
            s = torch.linalg.svdvals(d.double())
            want = math.sqrt(float((s[k:] ** 2).sum() / (s**2).sum()))
            approx = dw(m)
            got = float(torch.linalg.norm(d.double() - approx) / torch.linalg.norm(d.double()))
            assert math.isclose(errors[n], want, rel_tol=1e-9)
            assert math.isclose(got, want, rel_tol=1e-5)
        assert out.lineage["op"] == "compress_dense" and out.lineage["params"]["rank"] == k
    full, errors = compress_dense(deltas, 4, tau)  # min(out, in) of the smallest module
    assert errors["l0.down_proj"] < 1e-12
    assert_close(dw(full.modules["l0.down_proj"]), deltas["l0.down_proj"])
    zero, errors = compress_dense({"l0.q_proj": torch.zeros(6, 5)}, 2, tau)
    assert errors == {"l0.q_proj": 0.0} and not dw(zero.modules["l0.q_proj"]).any()


@pytest.mark.parametrize("rank", [0, 5, 2.0, True])
def test_compress_dense_rank_out_of_range(tau, rank):
    deltas = {"l0.q_proj": torch.randn(6, 5), "l0.down_proj": torch.randn(4, 7)}
    with pytest.raises(UserError, match="between 1 and min"):
        compress_dense(deltas, rank, tau)


def test_mismatched_importances_raise(tau):
    I_f, I_r = _importance(tau, "b", 1), _importance(tau, "b", 2)
    with pytest.raises(UserError, match="shape"):
        rescale_b(tau, I_f, {**I_r, "l0.q_proj": torch.rand(6, 4)})
    with pytest.raises(UserError, match="does not belong"):
        rescale_b(tau, {"l0.q_proj": I_f["l0.q_proj"]}, {"l0.q_proj": I_r["l0.q_proj"]})
    with pytest.raises(UserError, match="W \\(out, in\\)"):
        rescale_dense(tau, I_f, I_r)  # B-space maps given to the dense op
    with pytest.raises(UserError, match="differ in shape"):
        perta_weights({"m": torch.rand(2, 3)}, {"m": torch.rand(3, 2)})
    with pytest.raises(UserError, match="different modules"):
        perta_weights({"m": torch.rand(2)}, {"n": torch.rand(2)})
    with pytest.raises(UserError, match=">= 0"):
        perta_weights({"m": -torch.ones(2)}, {"m": torch.ones(2)})
    for bad in ({"eps": 0.0}, {"p": -1.0}, {"beta": math.nan}, {"beta": -1.0}):
        with pytest.raises(UserError):
            perta_weights({"m": torch.ones(2)}, {"m": torch.ones(2)}, **bad)



def test_rescale_b_depends_on_dw_alone_not_on_its_factorisation():
    # (B M, M^-1 A) has the same dW. With the B-space importance I = |G V| of a dense gradient G in the
    # SVD gauge (what estimate_importance measures), PerTA must give the same dW' for both factorisations.
    # The model-side half (maps estimated on a tiny model) is tests/test_importance.py's.
    d = make_adapter({"m": (6, 5, 3)}, seed=1, dtype=torch.float64)
    m = d.modules["m"]
    M = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 3.0]], dtype=torch.float64)
    e = Adapter({"m": LoraModule(torch.linalg.solve(M, m.A), m.B @ M, m.scaling)}, d.config)
    assert_close(dw(e.modules["m"]), dw(m), rtol=1e-10)
    g = torch.Generator().manual_seed(0)
    G_f, G_r = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)

    def importance(x, G):
        return {"m": (G @ svd_gauge(x).modules["m"].A.T).abs()}

    one = rescale_b(d, importance(d, G_f), importance(d, G_r))
    two = rescale_b(e, importance(e, G_f), importance(e, G_r))
    assert_close(dw(two.modules["m"]), dw(one.modules["m"]), rtol=1e-6)
