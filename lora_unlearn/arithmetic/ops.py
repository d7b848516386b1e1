"""Exact task arithmetic on LoRA adapters (DESIGN section 2), defined on dW = s * B @ A.

Every function is pure: adapters in, adapters out; no model, no transformers, no disk.
Operations never act on A and B independently (negating both factors leaves dW unchanged;
summing A's and B's separately adds cross terms, the bug behind huggingface/peft issues 1907,
2796 and 3004):

    scale(d, c)          c * dW          B <- c * B
    negate(d, lam)       -lam * dW       scale(d, -lam)
    extrapolate(d, a)    (1 + a) * dW    scale(d, 1 + a)     (UIPE, arXiv 2503.04693)
    add(d1, d2, ...)     dW1 + dW2 + ... canonical: B = U S, A = V^T of the sum's SVD, s = 1
    compress(d, r')      best rank-r' approximation of dW, without forming dW
    to_dense(d)          dW per module

``scale`` itself is defined in :mod:`lora_unlearn.core.adapter` (the stack of frozen adapters in
core scales what it attaches, and core imports no wing) and re-exported here.
"""

from __future__ import annotations

import math

import torch

from ..core.adapter import Adapter, LoraModule, finite_number, scale
from ..errors import UserError


def negate(adapter: Adapter, lam: float = 1.0) -> Adapter:
    """-lam * dW (task-vector negation). The sign is baked into B, never into alpha."""
    lam = finite_number("lam", lam)
    out = scale(adapter, -lam)
    return adapter.derive(out.modules, "negate", {"lam": lam})


def extrapolate(adapter: Adapter, alpha: float) -> Adapter:
    """(1 + alpha) * dW: UIPE's amplification of an unlearning update (Wang et al., 2025)."""
    alpha = finite_number("alpha", alpha)
    out = scale(adapter, 1.0 + alpha)
    return adapter.derive(out.modules, "extrapolate", {"alpha": alpha})


def canonical(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0, *, drop_zero: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') with B' A' = scaling * B A exactly, B' = U S and A' = V^T (the SVD of that product).

    Without the dense (out, in) matrix: B = Qb Rb, A^T = Qa Ra (reduced QR, float64), the small
    core scaling * Rb Ra^T = Uc S Vc^T, so U = Qb Uc and V = Qa Vc. Each pair (u_k, v_k) is signed
    so that the largest |entry| of u_k is positive: a function of the product alone (up to ties
    between singular values), whatever factors it came in. ``drop_zero`` leaves out the triplets
    that are zero to float64 precision (s_k <= 1e-12 * ||scaling B|| ||A||; one is always kept), so a sum of
    adapters whose deltas overlap gets the rank of the sum, not the sum of the ranks. float64 out.
    """
    qb, rb = torch.linalg.qr(B.double())  # (out, k1), (k1, r)
    qa, ra = torch.linalg.qr(A.double().T)  # (in, k2), (k2, r)
    u, sv, vh = torch.linalg.svd(scaling * rb @ ra.T, full_matrices=False)  # the small core
    u, vh = qb @ u, vh @ qa.T  # (out, k), (k, in)
    sign = torch.sign(u.gather(0, u.abs().argmax(dim=0, keepdim=True)))
    sign[sign == 0] = 1.0
    u, vh = u * sign, vh * sign.T
    if drop_zero:
        # Zero against the size of what was summed (||B|| ||A|| bounds every term), so a sum that
        # cancels (F - F) is one zero triplet rather than rounding noise blown up to full rank.
        tol = 1e-12 * abs(scaling) * float(B.double().norm() * A.double().norm())
        keep = max(1, int((sv > tol).sum()))
        u, sv, vh = u[:, :keep], sv[:keep], vh[:keep]
    return vh, u * sv


def add(*adapters: Adapter, allow_different_bases: bool = False) -> Adapter:
    """dW1 + dW2 + ... exactly, stored in a canonical factorisation in which no input's factors survive.

    Per module: the sum's factors [s1 B1, s2 B2, ...] (out, sum r) and [A1; A2; ...] (sum r, in)
    are brought to the SVD of the sum (:func:`canonical`): B = U S, A = V^T, scaling 1, every
    non-zero triplet kept (no truncation: the same dW to float error). Rank concatenation alone
    would keep F's rows inside K - F, so anyone holding the "unlearned" adapter could cut F back out;
    the canonical form is a function of the sum alone. (Anyone who holds K can still recover F as
    K - result: the cards say so.) A module present in only some inputs is canonicalised the same way.
    """
    if len(adapters) < 2:
        raise UserError("add needs at least two adapters")
    bases = {a.base_model for a in adapters}
    if len(bases) > 1 and not allow_different_bases:
        raise UserError(f"adapters were trained on different base models {sorted(map(str, bases))}: "
                        "their deltas do not add up to anything meaningful (pass --allow-different-bases to force)")
    names = sorted(set().union(*(a.modules for a in adapters)))
    modules = {}
    for name in names:
        parts = [a.modules[name] for a in adapters if name in a.modules]
        shapes = {(p.B.shape[0], p.A.shape[1]) for p in parts}
        if len(shapes) > 1:
            raise UserError(f"module {name} has different shapes across adapters {sorted(shapes)}: "
                            "the adapters belong to different model architectures")
        dtype = parts[0].B.dtype
        A = torch.cat([p.A.double() for p in parts], dim=0)
        B = torch.cat([p.B.double() * p.scaling for p in parts], dim=1)
        A, B = canonical(A, B)
        modules[name] = LoraModule(A.to(dtype), B.to(dtype), 1.0)
    config = dict(adapters[0].config)
    if any(a.config.get("target_modules") != config.get("target_modules") for a in adapters):
        config["target_modules"] = sorted({n.rsplit(".", 1)[-1] for n in names})
    if any(a.config.get("layers_to_transform") != config.get("layers_to_transform") for a in adapters):
        config["layers_to_transform"] = config["layers_pattern"] = None
    config["use_rslora"] = False
    return adapters[0].derive(modules, "add", {"form": "canonical"}, inputs=list(adapters), config=config)


def compress(adapter: Adapter, rank: int) -> tuple[Adapter, dict[str, float]]:
    """Best rank-``rank`` approximation of each module's dW (Eckart-Young), and its error.

    Per module, without the dense (out, in) matrix: B = Qb Rb and A^T = Qa Ra (reduced QR), so
    dW = Qb (s Rb Ra^T) Qa^T; the SVD of the small (r, r) core U S V^T gives the top singular
    triplets of dW. The result is B' = Qb U_k S_k^(1/2), A' = S_k^(1/2) V_k^T Qa^T, scaling 1.
    The error reported per module is the relative Frobenius error ||dW - dW'|| / ||dW||, which
    equals sqrt(sum of discarded S^2 / sum of S^2). Modules of rank <= ``rank`` are kept as is.
    """
    max_rank = max(m.rank for m in adapter.modules.values())
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= max_rank:
        raise UserError(f"compress rank must be an integer between 1 and the adapter's largest rank "
                        f"{max_rank}, got {rank!r}")
    modules, errors = {}, {}
    for name, m in adapter.modules.items():
        if m.rank <= rank:
            modules[name], errors[name] = m, 0.0
            continue
        qb, rb = torch.linalg.qr(m.B.double())  # (out, r), (r, r)
        qa, ra = torch.linalg.qr(m.A.double().T)  # (in, r), (r, r)
        u, s, vh = torch.linalg.svd(m.scaling * rb @ ra.T, full_matrices=False)  # (r, r) core
        root = s[:rank].sqrt()
        B = (qb @ u[:, :rank]) * root
        A = (root[:, None] * vh[:rank]) @ qa.T
        total = float((s**2).sum())
        errors[name] = math.sqrt(float((s[rank:] ** 2).sum()) / total) if total > 0 else 0.0
        modules[name] = LoraModule(A.to(m.A.dtype), B.to(m.B.dtype), 1.0)
    config = dict(adapter.config, use_rslora=False)
    out = adapter.derive(modules, "compress", {"rank": rank, "max_relative_error": max(errors.values())},
                         config=config)
    return out, errors


def to_dense(adapter: Adapter) -> dict[str, torch.Tensor]:
    """dW (out, in) per module, float32: for merging into a base and for dense PerTA."""
    return {name: m.delta() for name, m in adapter.modules.items()}
