"""LoRA adapters as tensors: read and write PEFT adapter folders without loading any model.

A PEFT LoRA folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. For each
target linear layer with weight W (out x in) it stores ``lora_A`` (r x in) and ``lora_B``
(out x r); the layer's delta is

    dW = s * B @ A,   s = alpha / r   (alpha / sqrt(r) with rsLoRA)

where r and alpha may be overridden per module by ``rank_pattern`` / ``alpha_pattern``
(matched as PEFT matches them). An :class:`Adapter` keeps each module's (A, B, s) and the
config; every operation in :mod:`lora_unlearn.arithmetic` works on dW through these.

Beside the PEFT files this library writes ``lora_unlearn.json``: the adapter's lineage, a tree
of the operations that made it (parameters, base model, quantization, sha256 of every input
adapter, a fingerprint of the training data). PEFT ignores the file; it is read back on load.

Only safetensors weights are read: pickle (``adapter_model.bin``) can run code on load.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError
from .fsutil import atomic_dir, sha256_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LINEAGE_NAME = "lora_unlearn.json"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


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
    # PEFT's get_pattern_key: a key matches a module path ending in it after a dot.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def module_scaling(config: dict[str, Any], name: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _refuse_unsupported(config: dict[str, Any], where: Path) -> None:
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise UserError(f"{where} is a {config.get('peft_type')} adapter; only LoRA adapters are supported")
    checks = [
        (config.get("use_dora"), "uses DoRA (its magnitude vector is not a low-rank delta)"),
        (config.get("bias", "none") != "none", f"trains biases (bias={config.get('bias')!r})"),
        (config.get("lora_bias"), "has a LoRA bias"),
        (config.get("modules_to_save"), f"has modules_to_save {config.get('modules_to_save')}"),
    ]
    for bad, what in checks:
        if bad:
            raise UserError(f"{where} {what}: task arithmetic here needs a plain LoRA adapter "
                            "(bias='none', no DoRA, no modules_to_save); retrain it without that option")


def modules_from_tensors(tensors: dict[str, torch.Tensor], config: dict[str, Any],
                         where: str | Path = "adapter") -> dict[str, LoraModule]:
    """Validate PEFT-format LoRA tensors (``...<module>.lora_A.weight``) and pair them per module."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise UserError(f"{where} holds {key!r}, which is not a LoRA A/B weight of a linear layer; "
                            "only plain LoRA on linear layers is supported")
        name = m["module"].removeprefix(PREFIX)
        factors.setdefault(name, {})[m["factor"]] = t
    if not factors:
        raise UserError(f"{where} holds no LoRA weights")

    rank_pattern = config.get("rank_pattern") or {}
    modules = {}
    for name, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            raise UserError(f"{where}: module {name} has lora_{''.join(ab)} but not its partner factor")
        A, B = ab["A"], ab["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise UserError(f"{where}: module {name} has inconsistent shapes A {tuple(A.shape)}, "
                            f"B {tuple(B.shape)} (expected A (r, in), B (out, r))")
        if not A.is_floating_point() or not B.is_floating_point():
            raise UserError(f"{where}: module {name} has non-float weights ({A.dtype}, {B.dtype})")
        rank = _pattern_value(rank_pattern, name, config.get("r"))
        if A.shape[0] < 1:
            raise UserError(f"{where}: module {name} has rank 0")
        if rank != A.shape[0]:
            raise UserError(f"{where}: module {name} has rank {A.shape[0]} but the config says {rank}")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise UserError(f"{where}: module {name} has NaN or infinite weights; the adapter is "
                            "broken (retrain it, e.g. with a lower learning rate)")
        s = module_scaling(config, name, rank)
        if not math.isfinite(s):
            raise UserError(f"{where}: scaling of {name} is not a finite number (lora_alpha={config.get('lora_alpha')})")
        modules[name] = LoraModule(A=A, B=B, scaling=s)

    return modules


def load_adapter(path: str | Path) -> Adapter:
    """Read and validate a PEFT LoRA adapter folder (local) as tensors."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"adapter folder {path} does not exist: give the folder holding {CONFIG_NAME}")
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file():
        raise UserError(f"{path} has no {CONFIG_NAME}: is it a PEFT adapter folder?")
    if not weights_file.is_file():
        if (path / "adapter_model.bin").is_file():
            raise UserError(f"{path} holds pickle weights (adapter_model.bin), which are not loaded "
                            "because pickle can run code: convert them to safetensors with PEFT first")
        raise UserError(f"{path} has no {WEIGHTS_NAME}")
    try:
        config = json.loads(cfg_file.read_text())
        assert isinstance(config, dict)
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError):
        raise UserError(f"{cfg_file} is not a JSON object: the adapter folder is corrupt") from None
    _refuse_unsupported(config, path)
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{weights_file} cannot be read as safetensors ({e}): the file is corrupt or truncated") from None

    modules = modules_from_tensors(tensors, config, weights_file)

    stored = None
    if (path / LINEAGE_NAME).is_file():
        try:
            stored = json.loads((path / LINEAGE_NAME).read_text()).get("lineage")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            stored = None
    lineage = {"op": "load", "path": str(path), "sha256": sha256_file(weights_file), "made_by": stored}
    return Adapter(modules=modules, config=config, lineage=lineage)


def peft_state_dict(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's saved key names."""
    tensors = {}
    for name, m in adapter.modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.A.detach().contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.B.detach().contiguous().cpu()
    return tensors


def peft_config(adapter: Adapter) -> dict[str, Any]:
    """The PEFT config for ``adapter``: most common rank/alpha as defaults, the rest as patterns."""
    cfg = dict(adapter.config)
    rslora = bool(cfg.get("use_rslora"))
    ranks = {n: m.rank for n, m in adapter.modules.items()}
    alphas = {n: m.scaling * (math.sqrt(m.rank) if rslora else m.rank) for n, m in adapter.modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    cfg.update(
        peft_type="LORA", r=r, lora_alpha=alpha, use_rslora=rslora,
        rank_pattern={n: v for n, v in ranks.items() if v != r},
        alpha_pattern={n: v for n, v in alphas.items() if v != alpha},
        target_modules=sorted(set(cfg.get("target_modules") or []) | {n.rsplit(".", 1)[-1] for n in ranks})
        if isinstance(cfg.get("target_modules"), (list, type(None))) else cfg["target_modules"],
        init_lora_weights=True, inference_mode=True, use_dora=False, bias="none", modules_to_save=None,
    )
    cfg.setdefault("task_type", "CAUSAL_LM")
    return cfg


def save_adapter(adapter: Adapter, out: str | Path, overwrite: bool = False,
                 extra_files: dict[str, str] | None = None) -> Path:
    """Write ``adapter`` as a PEFT folder (atomically: all of it or nothing) and return ``out``."""
    tensors = peft_state_dict(adapter)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_config(adapter), indent=2, sort_keys=True))
        from . import __version__

        record = {"lora_unlearn_version": __version__, "lineage": adapter.lineage}
        (tmp / LINEAGE_NAME).write_text(json.dumps(record, indent=2))
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    return Path(out)
