"""Scoped forgetting at serving time: the strength "auto", set per row by each adapter's scope.

The detector itself (its score, fitting, files, the checks that a scope belongs to an adapter and a
base) is :mod:`lora_unlearn.core.scope`: the recipe runner (training) fits scopes and serving reads
them, and the two wings may not import each other. Here: attaching a scope to a loaded adapter
(:func:`attach_scope`, called by ``ForgetRuntime.load``) and resolving a batch of rows
(:func:`resolve_rows`, ``ForgetRuntime.resolve``): every row whose strength for a scoped adapter is
"auto" (given, or the adapter's default) has its text read once by the base with every adapter
off, in one partial pass for all such rows and all scopes (up to the deepest layer any of them
reads), and gets ``scope.strength(score)``, a number in [0, lambda_max]. A row's explicit number
always wins. A request can fall in several adapters' scopes: each decides for its own adapter.
"""

from __future__ import annotations

from ..core.scope import Scope, check_scope, load_scope, text_states
from ..errors import UserError

AUTO = "auto"


def attach_scope(runtime, name: str, adapter, scope, default) -> Scope | None:
    """The checked Scope for adapter ``name`` (None without one); UserError when it does not belong."""
    if scope is None or scope is False:
        if default == AUTO:
            raise UserError(f"adapter {name!r}: the strength \"auto\" needs a scope, and none was given: fit one "
                            "with `lora-unlearn scope ADAPTER_DIR ...` and load it with the adapter, or give a number")
        return None
    if scope is True:
        path = adapter.lineage.get("path") if adapter.lineage.get("op") == "load" else None
        if not path:
            raise UserError(f"adapter {name!r}: scope=True reads the scope saved beside the adapter's folder, but "
                            "this adapter was not read from a folder: pass the scope itself (file, folder or Scope)")
        scope = path
    if not isinstance(scope, Scope):
        scope = load_scope(scope)
    info = getattr(runtime, "info", None)
    check_scope(scope, adapter, runtime.model, base=getattr(info, "hub_id", None))
    bound = runtime.max_strength
    if bound is not None and scope.lambda_max > bound:
        raise UserError(f"adapter {name!r}: its scope's lambda_max {scope.lambda_max:g} is beyond this runtime's "
                        f"bound of {bound:g} (max_strength, the server's --max-strength): refit the scope with a "
                        "smaller --lambda-max or raise the bound")
    return scope


def _auto_names(row: dict, defaults: dict, i: int) -> list[str]:
    names = [n for n, v in row.items() if isinstance(v, str) and v == AUTO]
    for n in names:
        if n not in defaults:
            raise UserError(f"row {i} names adapter {n!r}, which is not loaded. Loaded: {', '.join(defaults) or '(none)'}")
    return names + [n for n, d in defaults.items() if d == AUTO and n not in row]


def resolve_rows(runtime, rows, texts) -> tuple[list[dict[str, float]], list[dict[str, dict]]]:
    """``(rows, scopes)``: ``rows`` with "auto" replaced by numbers; ``scopes[i]`` = {name: {"score", "strength"}}."""
    if isinstance(rows, dict) or not isinstance(rows, (list, tuple)) or not all(isinstance(r, dict) for r in rows):
        raise UserError("rows must be a list with one dict of adapter name -> strength per row")
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise UserError("texts must be a list of strings, one per row")
    if len(texts) != len(rows):
        raise UserError(f"{len(rows)} rows but {len(texts)} texts: give the text of every row")
    defaults, scopes = runtime.defaults(), runtime.scoped()
    need = [_auto_names(row, defaults, i) for i, row in enumerate(rows)]
    for i, names in enumerate(need):
        for n in names:
            if n not in scopes:
                raise UserError(f"row {i}: adapter {n!r} has no scope, so its strength cannot be \"auto\": load it "
                                "with a scope (`lora-unlearn scope` fits one) or give a number")
    out = [dict(row) for row in rows]
    info: list[dict[str, dict]] = [{} for _ in rows]
    todo = [i for i, names in enumerate(need) if names]
    if not todo:
        return out, info
    layers = sorted({scopes[n].layer for i in todo for n in need[i]})
    with runtime.coefficients([{n: 0.0 for n in defaults}]):  # the base alone reads the texts
        states = text_states(runtime.model, runtime.tokenizer, [texts[i] for i in todo], layers)
    for j, i in enumerate(todo):
        for n in need[i]:
            scope = scopes[n]
            score = scope.scores([states[scope.layer][j]])[0]
            strength = scope.strength(score)
            out[i][n] = strength
            info[i][n] = {"score": round(score, 4), "strength": strength}
    return out, info
