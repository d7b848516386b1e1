"""A base model with a stack of adapters, each frozen at its own scale, kept unmerged.

``attach`` puts :class:`~lora_unlearn.core.adapter.Adapter` tensors into a PEFT model as separate
LoRA adapters, all active at once, so the forward pass computes exactly
``W x + sum_i c_i * dW_i x`` without touching the (possibly 4-bit) base weights. A trainable
adapter may sit on top: that is how a forget or update adapter is trained on a model that
already holds other adapters (F-Learning, unlearning from a knowledge adapter).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import fields

from ..errors import UserError
from .adapter import Adapter, peft_config, peft_state_dict, scale
from .adapter_io import load_adapter

TRAINABLE = "trainable"


def lora_config(adapter: Adapter, inference_mode: bool = True):
    from peft import LoraConfig

    known = {f.name for f in fields(LoraConfig)}
    cfg = {k: v for k, v in peft_config(adapter).items() if k in known and k not in ("peft_type", "auto_mapping")}
    cfg["inference_mode"] = inference_mode
    return LoraConfig(**cfg)


def parse_stack(specs: list[str] | None) -> list[tuple[Adapter, float]]:
    """``["DIR", "DIR:0.5"]`` -> [(adapter, 1.0), (adapter, 0.5)]."""
    stack = []
    for spec in specs or []:
        path, _, factor = spec.rpartition(":") if ":" in spec else (spec, "", "1")
        try:
            c = float(factor)
        except ValueError:
            raise UserError(f"adapter spec {spec!r}: the part after ':' must be a number (DIR:SCALE)") from None
        stack.append((load_adapter(path), c))
    return stack


def attach(model, stack: list[tuple[Adapter, float]], trainable=None):
    """Return a PEFT model holding ``stack`` (frozen, scaled) and, if given, a trainable LoraConfig.

    With an empty stack and no trainable config the model is returned as it is.
    """
    if not stack and trainable is None:
        return model
    with warnings.catch_warnings():
        # PEFT renames base_model_name_or_path to the local cache path; the Hub id is kept on save.
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
        return _attach(model, stack, trainable)


def _attach(model, stack, trainable):
    from peft import get_peft_model, set_peft_model_state_dict

    peft_model, names = None, []
    for i, (adapter, c) in enumerate(stack):
        name = f"frozen_{i}"
        cfg = lora_config(adapter)
        where = adapter.lineage.get("path", name)
        try:
            if peft_model is None:
                peft_model = get_peft_model(model, cfg, adapter_name=name)
            else:
                peft_model.add_adapter(name, cfg)
            result = set_peft_model_state_dict(peft_model, peft_state_dict(scale(adapter, c)), adapter_name=name)
        except (ValueError, RuntimeError) as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            detail = next((line for line in lines if line.startswith("size mismatch")), lines[0])
            raise UserError(f"adapter {where} does not fit this base model ({detail[:300]}): "
                            "was it trained on another model?") from None
        if result.unexpected_keys:
            raise UserError(f"adapter {where} does not fit this base model "
                            f"(e.g. {result.unexpected_keys[0]}): was it trained on another model?")
        # target_modules names layer types (q_proj, ...); an adapter covering only some layers of a
        # type leaves PEFT's extra LoRA layers without weights: make them exactly zero (B = 0).
        missing = {k for k in result.missing_keys if f".lora_B.{name}." in k}
        if missing:
            import torch

            with torch.no_grad():
                for pname, p in peft_model.named_parameters():
                    if pname in missing or pname.replace(f".{name}.", ".") in missing:
                        p.zero_()
        names.append(name)
    if trainable is not None:
        try:
            if peft_model is None:
                peft_model = get_peft_model(model, trainable, adapter_name=TRAINABLE)
            else:
                peft_model.add_adapter(TRAINABLE, trainable)
        except ValueError as e:  # e.g. target modules that match no layer of this model
            raise UserError(f"cannot put a LoRA on this base model ({str(e).splitlines()[0][:200]}): "
                            "check --target-modules (e.g. q_proj,v_proj or all-linear)") from None
        names.append(TRAINABLE)
    peft_model.base_model.set_adapter(names)
    for pname, p in peft_model.named_parameters():
        p.requires_grad = trainable is not None and f".{TRAINABLE}." in pname
    return peft_model


@contextlib.contextmanager
def attached(model, stack: list[tuple[Adapter, float]], trainable=None):
    """``attach`` for the duration of a block; the base model comes back clean afterwards."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    peft_model = attach(model, stack, trainable)
    try:
        yield peft_model
    finally:
        if peft_model is not model:
            peft_model.unload()
        for name, p in model.named_parameters():
            p.requires_grad = flags.get(name, p.requires_grad)


@contextlib.contextmanager
def reference(peft_model):
    """The model before the adapter being trained: the base plus the frozen stack.

    DESIGN section 3 takes p_ref as the model under PEFT's ``disable_adapter()``; when frozen
    adapters sit underneath (the model that holds the knowledge is base + K), disabling every
    adapter would also drop K, so only the trainable adapter is switched off here. With no
    frozen adapters the two are the same. No second copy of the base is held; requires_grad
    flags are left alone.
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    saved = [m._active_adapter for m in layers]
    try:
        for m, active in zip(layers, saved):
            names = [active] if isinstance(active, str) else list(active)
            m._active_adapter = [n for n in names if n != TRAINABLE]
        yield peft_model
    finally:
        for m, active in zip(layers, saved):
            m._active_adapter = active
