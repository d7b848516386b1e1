"""TOFU with scoped forgetting (``lora-unlearn eval --scoped``): each question at the strength its scope gives.

A scoped adapter of the stack runs, for question i, at ``scope.strength(score(question i))``
(:mod:`lora_unlearn.core.scope`), as the server runs a request with ``"forget": {"NAME": "auto"}``;
the other adapters keep their scales. Rows are grouped by their strengths (hard scopes give two
groups: in scope at lambda_max, out of scope at 0), each group is evaluated by
:func:`~lora_unlearn.evaluate.tofu.evaluate_split` with the stack at those strengths, and the rows
are put back in order, so every per-row number is the one that question gets when served. The
split summaries, model utility and forget quality are then computed from the per-row numbers
exactly as :func:`~lora_unlearn.evaluate.tofu.evaluate_tofu` does. The scores are read from the
plain base before the stack is attached, as the runtime reads them with every adapter off.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import UserError
from .tofu import SPLITS, aggregate, evaluate_split, truth_ratio_summary

PER_ROW = ("truth_ratio", "probability", "rouge_l", "extraction_strength", "answer")


def scope_strengths(model, tokenizer, questions: list[str], scopes: dict[int, Any]) -> tuple[list[dict], list[dict]]:
    """Per question: {stack index: strength} and {stack index: score}, from the plain ``model``."""
    from ..core.inference import dequantized
    from ..core.scope import text_states

    strengths: list[dict] = [{} for _ in questions]
    scores: list[dict] = [{} for _ in questions]
    if not questions:
        return strengths, scores
    layers = sorted({s.layer for s in scopes.values()})
    with dequantized(model):
        states = text_states(model, tokenizer, questions, layers)
    for k, scope in scopes.items():
        for i, score in enumerate(scope.scores(states[scope.layer])):
            scores[i][k], strengths[i][k] = round(score, 4), scope.strength(score)
    return strengths, scores


def merge_split(parts: list[tuple[list[int], dict]], n: int, split: str) -> dict:
    """One split's result from the results of its row groups (``(row indices, evaluate_split result)``)."""
    per_row: dict[str, list] = {key: [None] * n for key in PER_ROW}
    for rows, result in parts:
        for key in PER_ROW:
            for i, value in zip(rows, result["per_row"][key]):
                per_row[key][i] = value
    mean = lambda key: sum(per_row[key]) / n  # noqa: E731
    return {"split": split, "n": n, "probability": mean("probability"), "rouge_l": mean("rouge_l"),
            "truth_ratio": truth_ratio_summary(torch.tensor(per_row["truth_ratio"], dtype=torch.float64), split),
            "extraction_strength": mean("extraction_strength"),
            "wall_s": round(sum(r["wall_s"] for _, r in parts), 2),
            "generate_s": round(sum(r["generate_s"] for _, r in parts), 2), "per_row": per_row}


def evaluate_tofu_scoped(model, tokenizer, splits: dict[str, list[dict]], stack: list[tuple[Any, float]],
                         scopes: dict[int, Any], *, reference_truth_ratios: Sequence[float] | None = None,
                         **kw) -> dict:
    """``evaluate_tofu`` with the adapters ``stack[k]`` for k in ``scopes`` at their scope's strength per question.

    ``model`` is the plain base (no adapter attached); ``stack`` the (adapter, scale) list; each
    scope must already be checked against its adapter and this base. ``kw`` goes to ``evaluate_split``.
    """
    from ..core.stack import attached

    if not scopes:
        raise UserError("--scoped needs an adapter with a scope: fit one with `lora-unlearn scope ADAPTER_DIR ...`")
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise UserError(f"unknown TOFU split {unknown[0]!r}. Available: {', '.join(SPLITS)}")
    start = time.perf_counter()
    results, scoping = {}, {}
    for name in [s for s in SPLITS if s in splits]:
        rows = splits[name]
        strengths, scores = scope_strengths(model, tokenizer, [r["question"] for r in rows], scopes)
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(strengths):
            groups.setdefault(tuple(sorted(s.items())), []).append(i)
        parts = []
        for key, idx in groups.items():
            chosen = dict(key)
            layers = [(a, chosen.get(k, c)) for k, (a, c) in enumerate(stack)]
            with attached(model, layers) as m:
                parts.append((idx, evaluate_split(m, tokenizer, [rows[i] for i in idx], name, **kw)))
        results[name] = merge_split(parts, len(rows), name)
        in_scope = [any(v > 0 for v in s.values()) for s in strengths]
        results[name]["scope"] = {"in_scope": sum(in_scope), "n": len(rows), "groups": len(groups),
                                  "per_row": {"score": scores, "strength": strengths}}
        scoping[name] = {"in_scope": sum(in_scope), "n": len(rows)}
    out = {**aggregate(results, reference_truth_ratios), "scoped": scoping}
    out["wall_s"] = round(time.perf_counter() - start, 2)
    return out
