"""Dense deltas into a full-precision model: how a dense PerTA result becomes a model.

    W <- W + scale * delta      per module, e.g. scale = -lam for theta - lam * (w (.) tau)

The base is loaded unquantized on the CPU (float32; ~4 bytes per parameter of RAM), so the
sum is exact up to float32; the folder written is an ordinary safetensors checkpoint. Merging a
dense delta into a 4-bit base would re-quantize and lose most of a small delta: quantize the
merged folder afterwards if needed, and measure what that costs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..core.fsutil import atomic_dir
from ..errors import UserError


def merge_dense(model_name_or_folder: str, deltas: dict[str, torch.Tensor], out: str | Path, scale: float = 1.0,
                overwrite: bool = False, lineage: dict[str, Any] | None = None) -> Path:
    """Load the base in full precision, add ``scale * delta`` to each named linear weight, save to ``out``."""
    from ..core.models import load_base

    if not deltas:
        raise UserError("no dense deltas to merge")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise UserError(f"merge scale must be a finite number, got {scale!r}")
    if Path(out).exists() and not overwrite:
        raise UserError(f"output {out} already exists: choose another path or pass --overwrite")
    model, tokenizer, info = load_base(model_name_or_folder, quantization="none", device="cpu")
    with torch.no_grad():
        for name, delta in deltas.items():
            try:
                weight = model.get_submodule(name).weight
            except AttributeError:
                raise UserError(f"the model {model_name_or_folder} has no linear module {name}: "
                                "were the deltas made for another base model?") from None
            if weight.shape != delta.shape:
                raise UserError(f"module {name} is {tuple(weight.shape)} in the model but the delta is "
                                f"{tuple(delta.shape)}: were the deltas made for another base model?")
            weight += (float(scale) * delta.double()).to(weight.dtype)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"op": "merge_dense", "base_model": info.hub_id, "scale": float(scale),
                  "modules": len(deltas), "inputs": [lineage] if lineage else []}
        (tmp / "lora_unlearn.json").write_text(json.dumps({"lineage": record}, indent=2))
    return Path(out)
