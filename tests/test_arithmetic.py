"""Properties of the exact task arithmetic, checked on products dW = s * B @ A, never on factors.

Adapters are random (shapes 1..12, ranks 1..8, any lora_alpha, plain or rsLoRA scaling); every
expected value is computed here in float64 from the input factors, and compress is checked
against a dense ``torch.linalg.svd`` of dW.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lora_unlearn.arithmetic import add, compress, extrapolate, negate, scale, to_dense
from lora_unlearn.core.adapter import Adapter
from lora_unlearn.errors import UserError
from tests.tiny import assert_close, dw, make_adapter

NAMES = [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.down_proj", "mlp.up_proj")]
SETTINGS = settings(max_examples=40, deadline=None)


shape = st.tuples(st.integers(1, 12), st.integers(1, 12))
seeds = st.integers(0, 2**32 - 1)
alphas = st.floats(0.5, 64.0)


@st.composite
def adapters(draw, shapes: dict[str, tuple[int, int]] | None = None, dtype=torch.float32) -> Adapter:
    """A random adapter on a non-empty subset of ``shapes`` (drawn when not given)."""
    if shapes is None:
        shapes = {n: draw(shape) for n in NAMES}
    names = draw(st.lists(st.sampled_from(sorted(shapes)), min_size=1, max_size=len(shapes), unique=True))
    specs = {n: (*shapes[n], draw(st.integers(1, 8))) for n in names}
    return make_adapter(specs, draw(alphas), draw(st.booleans()), draw(seeds), dtype)


@st.composite
def compatible_adapters(draw, min_size: int = 2, max_size: int = 3) -> list[Adapter]:
    """Adapters of one architecture: a module has the same (out, in) in each input holding it."""
    shapes = {n: draw(shape) for n in NAMES}
    return draw(st.lists(adapters(shapes), min_size=min_size, max_size=max_size))


@SETTINGS
@given(adapters(), st.floats(-100.0, 100.0))
def test_scale_multiplies_the_product(d, c):
    """scale(d, c) has dW' = c * dW per module, and leaves its input untouched."""
    before = {n: dw(m) for n, m in d.modules.items()}
    out = scale(d, c)
    dense = to_dense(out)
    assert dense.keys() == before.keys()
    for n, want in before.items():
        assert_close(dense[n], c * want)
        assert torch.equal(dw(d.modules[n]), want)
    assert out.lineage == {"op": "scale", "params": {"c": c}, "inputs": [d.lineage]}


@SETTINGS
@given(adapters(), st.floats(-10.0, 10.0))
def test_negate_gives_minus_lam_times_the_product(d, lam):
    """negate(d, lam) has dW' = -lam * dW (negating both factors would leave dW unchanged)."""
    out = negate(d, lam)
    for n, m in d.modules.items():
        assert_close(dw(out.modules[n]), -lam * dw(m))
    assert out.lineage["op"] == "negate" and out.lineage["params"] == {"lam": lam}


@SETTINGS
@given(adapters())
def test_negate_default_is_minus_the_product(d):
    """negate(d) has dW' = -dW exactly."""
    out = negate(d)
    for n, m in d.modules.items():
        assert torch.equal(dw(out.modules[n]), -dw(m))


@SETTINGS
@given(adapters(), st.floats(-3.0, 10.0))
def test_extrapolate_gives_one_plus_alpha_times_the_product(d, alpha):
    """extrapolate(d, alpha) has dW' = (1 + alpha) * dW."""
    out = extrapolate(d, alpha)
    for n, m in d.modules.items():
        assert_close(dw(out.modules[n]), (1 + alpha) * dw(m))
    assert out.lineage["op"] == "extrapolate" and out.lineage["params"] == {"alpha": alpha}


@SETTINGS
@given(compatible_adapters())
def test_add_sums_the_products(ds):
    """add(d1, d2, ...) has dW = sum of the inputs' dW per module; a module held by only some
    inputs is canonicalised too; every result module has scaling 1 and the rank of the sum (at most
    the inputs' ranks summed: canonical factors drop what cancels or overlaps)."""
    out = add(*ds)
    assert set(out.modules) == set().union(*(d.modules for d in ds))
    for n, m in out.modules.items():
        holders = [d.modules[n] for d in ds if n in d.modules]
        assert_close(dw(m), sum(dw(p) for p in holders))
        assert m.scaling == 1.0
        expected = sum(dw(p).double() for p in holders)
        assert m.rank == max(1, int(torch.linalg.matrix_rank(expected, rtol=1e-9))) <= sum(p.rank for p in holders)
    assert out.lineage["op"] == "add" and out.lineage["inputs"] == [d.lineage for d in ds]
    assert out.config["use_rslora"] is False


@SETTINGS
@given(adapters(dtype=torch.float64), st.data())
def test_compress_is_the_truncated_svd(d, data):
    """compress(d, k) gives, per module, the rank-k truncated SVD of dW (Eckart-Young) and reports
    the error sqrt(sum of discarded sigma^2 / sum of sigma^2), both from a dense SVD of dW."""
    k = data.draw(st.integers(1, max(d.ranks.values())))
    out, errors = compress(d, k)
    assert errors.keys() == d.modules.keys()
    for n, m in d.modules.items():
        full = dw(m)
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        # The truncation is unique only if sigma_k > sigma_{k+1} (or sigma_k is already ~0).
        if k < len(s):
            assume(s[k - 1] - s[k] > 1e-4 * s[0] or s[k - 1] < 1e-12 * s[0])
        want = u[:, :k] * s[:k] @ vh[:k]
        assert_close(dw(out.modules[n]), want, rtol=1e-8)
        assert errors[n] == pytest.approx(math.sqrt(float((s[k:] ** 2).sum() / (s**2).sum())), abs=1e-9)
        measured = torch.linalg.norm(full - dw(out.modules[n])) / torch.linalg.norm(full)
        assert errors[n] == pytest.approx(float(measured), abs=1e-9)
        # A module of rank <= k is kept; otherwise it gets rank k, or min(out, in) if smaller.
        assert out.modules[n].rank == (m.rank if m.rank <= k else min(k, *full.shape))
    assert out.lineage["params"] == {"rank": k, "max_relative_error": max(errors.values())}


@SETTINGS
@given(compatible_adapters(max_size=2), st.data())
def test_compress_at_the_rank_of_the_product_is_exact(ds, data):
    """Compressing to a rank >= rank(dW) loses nothing, also when the factors' rank is larger
    (an add result whose dW has rank below r1 + r2 still goes through the QR/SVD path)."""
    d = add(*ds)
    full = {n: dw(m) for n, m in d.modules.items()}
    k = max(min(m.rank, *full[n].shape) for n, m in d.modules.items())
    out, errors = compress(d, k)
    for n, want in full.items():
        assert_close(dw(out.modules[n]), want, rtol=1e-4)
        assert errors[n] < 1e-4
    same, errors = compress(d, max(d.ranks.values()))
    assert all(e == 0.0 for e in errors.values())
    for n, want in full.items():
        assert torch.equal(dw(same.modules[n]), want)


def test_compress_keeps_dtype_and_float32_accuracy():
    """A float32 / bfloat16 adapter stays in its dtype; float32 rounding stays ~1e-6 relative."""
    specs = {"a.q_proj": (40, 24, 8), "a.down_proj": (16, 48, 6)}
    for dtype, rtol in [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]:
        d = make_adapter(specs, alpha=16, rslora=True, seed=0, dtype=dtype)
        ref = make_adapter(specs, alpha=16, rslora=True, seed=0, dtype=torch.float64)
        out, _ = compress(d, 4)
        want, _ = compress(ref, 4)
        for n in specs:
            assert out.modules[n].A.dtype == out.modules[n].B.dtype == dtype
            assert_close(to_dense(out)[n], dw(want.modules[n]), rtol=rtol)


@pytest.mark.parametrize("module", ["lora_unlearn.arithmetic", "lora_unlearn.arithmetic.perta",
                                    "lora_unlearn.core.adapter", "lora_unlearn.core.adapter_io"])
def test_pure_modules_stay_light(module):
    """Importing the pure arithmetic (and PerTA's rescaling) pulls in neither transformers nor peft."""
    code = (f"import sys, {module}\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft'))\n"
            "assert not heavy, heavy\n")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# Errors: each is the user's to fix and says so.

@pytest.fixture
def d1():
    return make_adapter({"a.q_proj": (6, 5, 3), "a.v_proj": (6, 5, 2)}, alpha=8, rslora=False, seed=1)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "two"])
@pytest.mark.parametrize("op", [scale, negate, extrapolate])
def test_non_finite_factors_are_refused(d1, op, bad):
    """scale / negate / extrapolate refuse NaN, +-inf and non-numbers."""
    with pytest.raises(UserError, match="must be a (finite )?number"):
        op(d1, bad)


@pytest.mark.parametrize("rank", [0, -1, 4, 2.0, True])
def test_compress_rank_out_of_range_is_refused(d1, rank):
    """compress needs an integer rank in 1..largest module rank (3 here)."""
    with pytest.raises(UserError, match="between 1 and the adapter's largest rank 3"):
        compress(d1, rank)


def test_add_needs_two_adapters(d1):
    """add of a single adapter is refused."""
    with pytest.raises(UserError, match="at least two"):
        add(d1)


def test_add_refuses_different_bases(d1):
    """Deltas of different base models do not add up (unless explicitly allowed)."""
    other = make_adapter({"a.q_proj": (6, 5, 3)}, alpha=8, rslora=False, seed=2, base="other/model")
    with pytest.raises(UserError, match="different base models"):
        add(d1, other)
    forced = add(d1, other, allow_different_bases=True)
    assert_close(dw(forced.modules["a.q_proj"]), dw(d1.modules["a.q_proj"]) + dw(other.modules["a.q_proj"]))


def test_add_refuses_mismatched_shapes(d1):
    """A module of another shape means another architecture."""
    other = make_adapter({"a.q_proj": (7, 5, 3)}, alpha=8, rslora=False, seed=2)
    with pytest.raises(UserError, match="module a.q_proj has different shapes"):
        add(d1, other)


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() @ y.double()).abs() / (x.double().norm() * y.double().norm()))


def _gauge_pairs(m) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(u_k, v_k) of dW's own SVD: what an input looks like in the SVD gauge."""
    u, s, vh = torch.linalg.svd(dw(m), full_matrices=False)
    return [(u[:, k], vh[k]) for k in range(int((s > 1e-9 * s[0]).sum()))]


def test_add_keeps_no_input_factor_verbatim():
    """K - F stored by rank concatenation would hold F's A rows as they are, so anyone could cut F out
    of the "unlearned" adapter; the canonical sum holds neither F's stored rows nor F's own SVD pairs."""
    K = make_adapter({"a.q_proj": (12, 10, 4), "a.v_proj": (6, 5, 2)}, seed=1)
    F = make_adapter({"a.q_proj": (12, 10, 2)}, seed=2)  # v_proj only in K: canonicalised too
    result = add(K, negate(F))
    for name, out in result.modules.items():
        expected = dw(K.modules[name]) - (dw(F.modules[name]) if name in F.modules else 0)
        assert_close(dw(out), expected)
        for source in [K.modules[name]] + ([F.modules[name]] if name in F.modules else []):
            for row in source.A:
                assert max(_cos(row, r) for r in out.A) <= 0.999, f"{name}: an input's A row survived"
            if source is K.modules[name] and name not in F.modules:
                continue  # a module held by one input *is* its own SVD: nothing else to store
            for u, v in _gauge_pairs(source):
                assert not any(_cos(u, ou) > 0.999 and _cos(v, ov) > 0.999
                               for ou, ov in zip(out.B.T, out.A)), f"{name}: an input's SVD pair survived"
    assert result.lineage["params"] == {"form": "canonical"}


def test_add_is_a_function_of_the_sum_alone():
    """Two factorisations of the same dW (B M, M^-1 A) add to the same stored factors; the stored
    form is dW's SVD (B = U S, A = V^T, orthonormal rows of A, scaling 1) with the rank of the sum."""
    K = make_adapter({"a.q_proj": (9, 7, 3)}, seed=4)
    F = make_adapter({"a.q_proj": (9, 7, 2)}, seed=5)
    k = K.modules["a.q_proj"]
    M = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 0.5], [1.0, 0.0, 3.0]])
    other = Adapter({"a.q_proj": type(k)(torch.linalg.solve(M, k.A), k.B @ M, k.scaling)}, K.config)
    assert_close(dw(other.modules["a.q_proj"]), dw(k))
    one, two = add(K, negate(F)).modules["a.q_proj"], add(other, negate(F)).modules["a.q_proj"]
    assert torch.allclose(one.A, two.A, atol=1e-5) and torch.allclose(one.B, two.B, atol=1e-5)
    assert one.scaling == 1.0 and one.rank == 5
    assert torch.allclose(one.A.double() @ one.A.double().T, torch.eye(5, dtype=torch.float64), atol=1e-5)
    _, s, _ = torch.linalg.svd(dw(one).double())
    assert torch.allclose(one.B.double().norm(dim=0), s[:5], rtol=1e-4)
    # Overlapping deltas: K + K has K's rank, not twice it; F - F is the zero delta (one zero triplet kept).
    assert add(K, K).modules["a.q_proj"].rank == 3
    zero = add(F, negate(F)).modules["a.q_proj"]
    assert zero.rank == 1 and float(dw(zero).abs().max()) < 1e-6
