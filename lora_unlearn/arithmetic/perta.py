"""PerTA: per-parameter task arithmetic for unlearning (Cai et al., arXiv 2601.22030).

A forget task vector tau is rescaled per parameter by the relative importance of that
parameter for forgetting versus retention, then subtracted:

    w = I_f^p / (I_f^p + beta * I_r^p + eps)          unlearned = theta - lam * (w (.) tau)

I_f and I_r come from :func:`lora_unlearn.training.importance.estimate_importance` (|g| for PerTA-grad,
g^2 for PerTA-fisher) on the forget and retain data. Defaults beta = 1, eps = 1e-8, p = 1 are
DESIGN section 3's; the paper's "general form" exponent p and any normalisation of I before
the ratio could not be confirmed, so they are parameters. eps is absolute: importances far
below eps (squared gradients of a few 1e-5 are 1e-10) drive w towards 0, so look at the
magnitudes (or lower eps) before trusting a Fisher run.

Functions here return w (.) tau; the sign and the strength are applied after, with
``lora_unlearn.arithmetic.negate(result, lam)`` (theta - lam * w (.) tau), exactly as for plain
task-vector negation. Two spaces (DESIGN section 3):

    svd_gauge(d)                 the same dW as B = U S, A = V^T, scaling 1 (the gauge of B space)
    rescale_b(d, I_f, I_r)       (w (.) B, A) in that gauge: still rank r, hot-swappable; I shaped like B
    rescale_dense(d, I_f, I_r)   w (.) dW per module (out, in); I shaped like W
    compress_dense(deltas, r')   a dense result as a rank-r' adapter (truncated SVD) + errors

Entry-wise weights on B depend on how dW is split: (B M, M^-1 A) is the same dW for any
invertible M, but w (.) (B M) is not (w (.) B) M. B space therefore always works in the SVD
gauge of dW, where the gradient with respect to B is G V (G the dense gradient, V dW's right
singular vectors, no s), so the importance maps and the result depend on dW alone.

Pure: torch only, no model, no transformers or peft, no disk.
"""

from __future__ import annotations

import math

import torch

from ..core.adapter import Adapter, LoraModule
from ..errors import UserError
from .ops import canonical


def _number(name: str, value: float, low: float, strict: bool) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise UserError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value}")
    return value


def perta_weights(I_f: dict[str, torch.Tensor], I_r: dict[str, torch.Tensor], beta: float = 1.0,
                  eps: float = 1e-8, p: float = 1.0) -> dict[str, torch.Tensor]:
    """w = I_f^p / (I_f^p + beta * I_r^p + eps) per entry, float32 in [0, 1).

    Where both importances are 0, w = 0 (the parameter matters to neither set: it is left
    alone). Computed in float64, so g^2 raised to p does not underflow before the ratio.
    """
    beta = _number("beta", beta, 0.0, strict=False)
    eps = _number("eps", eps, 0.0, strict=True)
    p = _number("p", p, 0.0, strict=True)
    if set(I_f) != set(I_r):
        raise UserError(f"forget and retain importances cover different modules "
                        f"(only forget: {sorted(set(I_f) - set(I_r))[:3]}, only retain: {sorted(set(I_r) - set(I_f))[:3]}): "
                        "compute both for the same adapter and space")
    weights = {}
    for name, f in I_f.items():
        r = I_r[name]
        if f.shape != r.shape:
            raise UserError(f"module {name}: forget importance {tuple(f.shape)} and retain importance "
                            f"{tuple(r.shape)} differ in shape: compute both in the same space")
        f, r = f.double(), r.double()
        if (f < 0).any() or (r < 0).any() or not (torch.isfinite(f).all() and torch.isfinite(r).all()):
            raise UserError(f"module {name}: importances must be finite and >= 0 (|g| or g^2)")
        fp = f.pow(p)
        weights[name] = (fp / (fp + beta * r.pow(p) + eps)).float()
    return weights


def svd_gauge(adapter: Adapter) -> Adapter:
    """The same dW in its SVD gauge: dW = s B A = U S V^T, B := U S (out, k), A := V^T (k, in), scaling 1.

    Per module, without the dense matrix (as :func:`~lora_unlearn.arithmetic.ops.compress`):
    B = Qb Rb and A^T = Qa Ra (reduced QR, float64), the small core s Rb Ra^T = Uc S Vc^T, so
    U = Qb Uc and V = Qa Vc. Nothing is truncated: k = min(r, out, in) (= r for any usual LoRA),
    zero singular values stay as zero columns of B. Each pair (u_k, v_k) is signed so that the
    largest |entry| of u_k is positive, so the gauge is a function of dW alone (up to ties
    between singular values). Factors keep their dtype.
    """
    modules = {}
    for name, m in adapter.modules.items():
        A, B = canonical(m.A, m.B, m.scaling, drop_zero=False)
        modules[name] = LoraModule(A.to(m.A.dtype), B.to(m.B.dtype), 1.0)
    return adapter.derive(modules, "svd_gauge", {}, config=dict(adapter.config, use_rslora=False))


def check_maps(maps: dict[str, torch.Tensor], adapter: Adapter, space: str, where: str = "importance") -> None:
    """UserError unless ``maps`` has exactly ``adapter``'s modules, shaped like W ("dense") or like
    B of the adapter's SVD gauge ("b": (out, min(r, out, in)), i.e. B's own shape for any usual LoRA)."""
    if set(maps) != set(adapter.modules):
        extra, missing = sorted(set(maps) - set(adapter.modules)), sorted(set(adapter.modules) - set(maps))
        raise UserError(f"{where} does not belong to this adapter: modules only in the maps {extra[:3]}, "
                        f"only in the adapter {missing[:3]}; recompute the importance for this adapter")
    for name, m in adapter.modules.items():
        out, inp = m.B.shape[0], m.A.shape[1]
        want = (out, min(m.rank, out, inp)) if space == "b" else (out, inp)
        if tuple(maps[name].shape) != want:
            what = "B (out, r)" if space == "b" else "W (out, in)"
            raise UserError(f"{where}: module {name} has shape {tuple(maps[name].shape)} but this adapter's "
                            f"{what} is {want}; recompute the importance for this adapter in {space} space")


def _params(beta: float, eps: float, p: float) -> dict[str, float]:
    return {"beta": float(beta), "eps": float(eps), "p": float(p)}


def rescale_b(adapter: Adapter, I_f: dict[str, torch.Tensor], I_r: dict[str, torch.Tensor], beta: float = 1.0,
              eps: float = 1e-8, p: float = 1.0) -> Adapter:
    """PerTA in B space, in the SVD gauge of dW: (w (.) U S, V^T) per module, scaling 1.

    dW' = (w (.) (U S)) @ V^T with dW = U S V^T (:func:`svd_gauge`), so the result depends on dW
    alone, not on how the adapter splits it into A and B; same rank. I_f, I_r must be measured
    in that gauge (as :func:`lora_unlearn.training.importance.estimate_importance` does with
    ``space="b"``): shaped like the gauge's B, (out, r). Unlearn with ``negate(result, lam)``.
    """
    for which, maps in (("forget", I_f), ("retain", I_r)):
        check_maps(maps, adapter, "b", where=f"{which} importance")
    w = perta_weights(I_f, I_r, beta, eps, p)
    gauge = svd_gauge(adapter)
    modules = {name: LoraModule(m.A, (w[name] * m.B.float()).to(m.B.dtype), 1.0) for name, m in gauge.modules.items()}
    return adapter.derive(modules, "perta_b", {**_params(beta, eps, p), "gauge": "svd"}, config=gauge.config)


def rescale_dense(adapter: Adapter, I_f: dict[str, torch.Tensor], I_r: dict[str, torch.Tensor], beta: float = 1.0,
                  eps: float = 1e-8, p: float = 1.0) -> dict[str, torch.Tensor]:
    """PerTA in dense space (the paper's form): w (.) dW per module, float32 (out, in).

    I_f, I_r are shaped like each layer's weight. The result is not low rank: merge it
    (:func:`lora_unlearn.hub.merge.merge_dense` with ``scale=-lam``) or :func:`compress_dense` it
    and ``negate(result, lam)``. Modules are processed one at a time.
    """
    for which, maps in (("forget", I_f), ("retain", I_r)):
        check_maps(maps, adapter, "dense", where=f"{which} importance")
    out = {}
    for name, m in adapter.modules.items():
        out[name] = perta_weights({name: I_f[name]}, {name: I_r[name]}, beta, eps, p)[name] * m.delta()
    return out


def compress_dense(deltas: dict[str, torch.Tensor], rank: int, template: Adapter,
                   source: dict | None = None) -> tuple[Adapter, dict[str, float]]:
    """Best rank-``rank`` adapter for dense deltas (Eckart-Young), and each module's error.

    Per module, delta (out, in) = U S V^T (torch.linalg.svd, full_matrices=False, float64);
    B = U_k S_k^(1/2) (out, k), A = S_k^(1/2) V_k^T (k, in), scaling 1. The error is the
    relative Frobenius error ||delta - B A|| / ||delta|| = sqrt(sum discarded S^2 / sum S^2)
    (0 for a zero delta). ``template`` (the adapter the deltas came from) gives the config and
    the lineage's input; ``source`` (e.g. the PerTA parameters) is recorded in the lineage.
    """
    if not deltas:
        raise UserError("no dense deltas to compress")
    limit = min(min(d.shape) for d in deltas.values())
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= limit:
        raise UserError(f"compress rank must be an integer between 1 and min(out, in) = {limit} of the "
                        f"smallest module, got {rank!r}")
    modules, errors = {}, {}
    for name, delta in deltas.items():
        if delta.ndim != 2:
            raise UserError(f"dense delta {name} has shape {tuple(delta.shape)}: expected (out, in)")
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        root = s[:rank].sqrt()
        total = float((s**2).sum())
        errors[name] = math.sqrt(float((s[rank:] ** 2).sum()) / total) if total > 0 else 0.0
        modules[name] = LoraModule((root[:, None] * vh[:rank]).float(), (u[:, :rank] * root).float(), 1.0)
    config = dict(template.config, use_rslora=False)
    params = {"rank": rank, "max_relative_error": max(errors.values()), "source": source}
    return template.derive(modules, "compress_dense", params, config=config), errors
