"""LoRA adapters as tensors, and the one operation the rest of the package stands on: scaling.

A PEFT LoRA folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. For each
target linear layer with weight W (out x in) it stores ``lora_A`` (r x in) and ``lora_B``
(out x r); the layer's delta is

    dW = s * B @ A,   s = alpha / r   (alpha / sqrt(r) with rsLoRA)

where r and alpha may be overridden per module by ``rank_pattern`` / ``alpha_pattern``
(matched as PEFT matches them). An :class:`Adapter` keeps each module's (A, B, s) and the
config; every operation in :mod:`lora_unlearn.arithmetic` works on dW through these.
:func:`scale` (c * dW) lives here rather than in ``arithmetic``: the stack of frozen adapters
(:mod:`lora_unlearn.core.stack`) scales every adapter it attaches, and core imports no wing.

Reading and writing folders: :mod:`lora_unlearn.core.adapter_io`. Pure: torch only.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UserError

# The files of an adapter folder (PEFT's two, and the lineage; the card is core.card's README.md)
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
LINEAGE_NAME = "lora_unlearn.json"
PREFIX = "base_model.model."  # before every module path in PEFT's saved keys


@dataclass(frozen=True)
class LoraModule:
    """One layer's factors: ``A`` (r, in), ``B`` (out, r); its delta is ``scaling * B @ A``."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """dW (out, in) in float32."""
        return self.scaling * (self.B.float() @ self.A.float())


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter as tensors.

    ``modules`` maps the module's path in the base model (``model.layers.0.self_attn.q_proj``)
    to its factors; ``config`` is the PEFT config (r / lora_alpha / patterns are derived from
    the modules when saved); ``lineage`` is the tree of operations that made it.
    """

    modules: dict[str, LoraModule]
    config: dict[str, Any]
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def ranks(self) -> dict[str, int]:
        return {name: m.rank for name, m in self.modules.items()}

    def derive(self, modules: dict[str, LoraModule], op: str, params: dict[str, Any],
               inputs: list[Adapter] | None = None, config: dict[str, Any] | None = None) -> Adapter:
        """A new adapter made from this one by ``op``: lineage gains one node."""
        node = {"op": op, "params": params, "inputs": [a.lineage for a in (inputs or [self])]}
        return Adapter(modules=modules, config=dict(config or self.config), lineage=node)


def _pattern_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    # PEFT's get_pattern_key: the first key matching a module path ending in it after a dot.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def module_scaling(config: dict[str, Any], name: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank



def peft_state_dict(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's saved key names."""
    tensors = {}
    for name, m in adapter.modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.A.detach().contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.B.detach().contiguous().cpu()
    return tensors


def _pattern_key(name: str, names: list[str]) -> str:
    """``name`` as a rank_pattern / alpha_pattern key that PEFT's matching applies to this module only.

    PEFT reads a key as a regular expression matching the end of a module path after a dot, so
    ``layers.0.q`` would also catch ``x.layers.0.q``; such a name is written anchored and escaped.
    """
    if all(n == name or not re.match(rf"(.*\.)?({name})$", n) for n in names):
        return name
    return f"^{re.escape(name)}$"


def peft_config(adapter: Adapter) -> dict[str, Any]:
    """The PEFT config for ``adapter``: most common rank/alpha as defaults, the rest as patterns."""
    cfg = dict(adapter.config)
    rslora = bool(cfg.get("use_rslora"))
    ranks = {n: m.rank for n, m in adapter.modules.items()}
    alphas = {n: m.scaling * (math.sqrt(m.rank) if rslora else m.rank) for n, m in adapter.modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    names = sorted(ranks)
    cfg.update(
        peft_type="LORA", r=r, lora_alpha=alpha, use_rslora=rslora,
        rank_pattern={_pattern_key(n, names): v for n, v in ranks.items() if v != r},
        alpha_pattern={_pattern_key(n, names): v for n, v in alphas.items() if v != alpha},
        target_modules=sorted(set(cfg.get("target_modules") or []) | {n.rsplit(".", 1)[-1] for n in ranks})
        if isinstance(cfg.get("target_modules"), (list, type(None))) else cfg["target_modules"],
        init_lora_weights=True, inference_mode=True, use_dora=False, bias="none", modules_to_save=None,
    )
    cfg.setdefault("task_type", "CAUSAL_LM")
    return cfg


def input_paths(lineage: dict[str, Any]) -> list[str]:
    """The folders the adapter's inputs were loaded from in this process (``load`` nodes of its tree)."""
    paths, todo = [], [lineage]
    while todo:
        node = todo.pop()
        if not isinstance(node, dict):
            continue
        if node.get("op") == "load" and isinstance(node.get("path"), str):
            paths.append(node["path"])  # not its "made_by": those paths belong to when it was made
        else:
            todo.extend(node.get("inputs") or [])
    return paths


def finite_number(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value}")
    return value


def scale(adapter: Adapter, c: float) -> Adapter:
    """c * dW: B is multiplied by c, A and the scaling stay."""
    c = finite_number("scale factor", c)
    modules = {n: LoraModule(m.A, (m.B.float() * c).to(m.B.dtype), m.scaling) for n, m in adapter.modules.items()}
    bad = next((n for n, m in modules.items() if not torch.isfinite(m.B).all()), None)
    if bad is not None:
        raise UserError(f"scaling by {c:g} overflows {bad}'s weights ({modules[bad].B.dtype}): use a smaller factor")
    return adapter.derive(modules, "scale", {"c": c})
