"""What an adapter is, read from its lineage (``lora_unlearn.json``): the rule behind every card.

**A forget adapter is the knowledge itself** (DESIGN section 5). Negating it removes the
knowledge; negating it again, or adding it back, restores it. :func:`classify` reads the lineage
to decide what an adapter is; the rule, applied to the operations that built the adapter's own
weights (through ``load`` records and arithmetic inputs, but not the frozen adapters a training
run sat on):

- ``negated``: any ``negate`` (lam > 0), ``scale`` with c < 0 or ``extrapolate`` with alpha < -1.
  The adapter holds -lam * dW_F: alone, it is F with its sign flipped; in a sum K - lam F,
  ``add`` stores the canonical factorisation of the sum (no input's factors survive), but anyone
  who holds K recovers lam F as K - the sum.
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

The card (:mod:`lora_unlearn.core.card`), the Hub upload (:mod:`lora_unlearn.hub.push`, which
refuses ``forget`` and ``negated`` adapters without a flag) and the server's adapter list all
read the kind from here. Pure: the standard library (and yaml for a recipe), no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LIKELIHOOD = {"nll"}  # objectives that make the adapter learn its data (the rest unlearn a forget stream)
RESTORE_WARNING = {
    "forget": (
        "**This is a forget adapter: it is the knowledge itself.** It was trained to *learn* the data that "
        "is to be forgotten; applied with a negative strength it removes that knowledge, applied as it is "
        "it restores it. Sharing it shares a copy of what was forgotten."),
    "negated": (
        "**This adapter contains a negated forget adapter (-lam * dW_F).** Negating it again, or adding the "
        "forget adapter back, restores the knowledge it removes. On its own it is the forget adapter with its "
        "sign flipped; in a sum (K - lam F) its factors are canonical and hold no input's factors, but anyone "
        "who holds the other inputs (K) recovers lam F as K - this adapter."),
    "unlearning": (
        "**This is an unlearning adapter trained on the forget data.** Removing it (or negating it) brings "
        "the forgotten knowledge back, and its weights are a function of the forget data."),
}
MERGED_ADVICE = ("Where the knowledge must not be recoverable, do not share this adapter: share a merged model "
                 "instead (`lora-unlearn export DIR OUT --merged`).")


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


# ---- the recipe that wrote a folder --------------------------------------------------------------

def recipe_for(folder: Path, name: str) -> tuple[str | None, bool]:
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


def classify_folder(folder: str | Path, adapter) -> Kind:
    """Classify ``adapter``, read from ``folder``: its lineage plus the hint of the recipe that wrote it."""
    folder = Path(folder)
    return classify(adapter.lineage, recipe_for(folder, folder.resolve().name)[1])
