"""Loading a base with adapters, kept separate (exact) or merged (measured), and hot-swapping one.

    unmerged:  y = W x + sum_i c_i * dW_i x     (W may be 4-bit; nothing is requantized: exact)
    merged:    y = Q(deQ(W) + sum_i c_i dW_i) x (Q = requantization when the base is nf4/int8: lossy)

DESIGN section 2: merging into a 4-bit base dequantizes, adds and requantizes, and a small delta
can be rounded away. :func:`load_model` with ``merge=True`` therefore always measures what the merge
changed, as max and mean |logit difference| against the unmerged model on a probe batch, puts the
numbers in its :class:`LoadReport` and warns when they are large. :func:`hotswap` replaces a loaded
adapter's weights in place (PEFT's hot-swap utilities), so a new version of a forget adapter is
served without reloading the base.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.adapter import PREFIX, Adapter
from ..core.adapter_io import load_adapter
from ..errors import UserError

PROBE = [
    "The capital of France is Paris, and the capital of Italy is",
    "Question: Who wrote the novel Pride and Prejudice?\nAnswer:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In 1969 the first humans landed on the Moon. The mission was called",
]
DEFAULT_WARN_ABOVE = 1.0  # max |logit difference| that earns a warning (logits of a 50k vocab span ~30)


@dataclass
class LoadReport:
    """What :func:`load_model` did; JSON-serialisable with :meth:`to_dict`.

    ``adapters``: per adapter {"name", "path", "sha256", "coefficient", "modules", "rank"}, in stack
    order (``name`` is the PEFT adapter name, the one :func:`hotswap` takes). The logit differences
    are merged minus unmerged over the non-padding probe positions (None when nothing was merged).
    """

    base: str
    hub_id: str
    quantization: str
    merged: bool
    adapters: list[dict[str, Any]] = field(default_factory=list)
    load_seconds: float = 0.0
    merge_seconds: float | None = None
    max_abs_logit_diff: float | None = None
    mean_abs_logit_diff: float | None = None
    probe_tokens: int | None = None
    warning: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _coefficient(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"coefficient of {where} must be a finite number, got {value!r}")
    return float(value)


def _as_adapter(adapter: Adapter | str | Path) -> Adapter:
    if isinstance(adapter, Adapter):
        return adapter
    if isinstance(adapter, (str, Path)):
        return load_adapter(adapter)
    raise UserError(f"an adapter must be a folder path or an Adapter, got {type(adapter).__name__}")


def _stack(adapters) -> list[tuple[Adapter, float]]:
    stack = []
    for i, entry in enumerate(adapters):
        if not isinstance(entry, (tuple, list)) or len(entry) != 2:
            raise UserError(f"adapters[{i}] must be a pair (adapter folder or Adapter, coefficient), got {entry!r}")
        adapter = _as_adapter(entry[0])
        stack.append((adapter, _coefficient(entry[1], adapter.lineage.get("path", f"adapters[{i}]"))))
    return stack


@torch.no_grad()
def _probe_logits(model, enc) -> torch.Tensor:
    return model(**enc).logits.float()


def load_model(base: str = "smollm2-135m", adapters: list[tuple[str | Path | Adapter, float]] = (), *,
               quantization: str = "nf4", merge: bool = False, probe: list[str] | None = None,
               warn_above: float = DEFAULT_WARN_ABOVE, device: str | None = None):
    """Return (model, tokenizer, report) for ``base`` with ``adapters`` = [(folder or Adapter, c), ...].

    ``merge=False``: the adapters stay separate LoRA modules of a PEFT model (see
    :func:`lora_unlearn.core.stack.attach`), all active, adapter i scaled by c_i: exact. Their PEFT names
    are ``frozen_0``, ``frozen_1``, ... (in ``report.adapters``). ``merge=True``: they are merged into
    the weights with PEFT's ``merge_and_unload`` and a plain model comes back; the report holds the
    max/mean |logit difference| against the unmerged model on ``probe`` (a few fixed sentences by
    default), and a warning is issued when the max exceeds ``warn_above``.
    """
    from ..core.models import load_base
    from ..core.stack import attach

    if not isinstance(warn_above, (int, float)) or isinstance(warn_above, bool) or not warn_above >= 0:
        raise UserError(f"warn_above must be a non-negative number, got {warn_above!r}")
    if probe is not None and (isinstance(probe, str) or not probe
                              or not all(isinstance(p, str) and p.strip() for p in probe)):
        raise UserError("probe must be a non-empty list of non-empty strings")
    stack = _stack(adapters)
    start = time.perf_counter()
    model, tokenizer, info = load_base(base, quantization, device=device)
    model = attach(model, stack)
    report = LoadReport(base=info.name, hub_id=info.hub_id, quantization=quantization, merged=merge and bool(stack),
                        adapters=[{"name": f"frozen_{i}", "path": a.lineage.get("path"), "sha256": a.lineage.get("sha256"),
                                   "coefficient": c, "modules": len(a.modules), "rank": max(a.ranks.values())}
                                  for i, (a, c) in enumerate(stack)])
    report.load_seconds = round(time.perf_counter() - start, 3)
    if not report.merged:
        return model, tokenizer, report

    enc = tokenizer(list(probe or PROBE), return_tensors="pt", padding=True).to(model.device)
    unmerged = _probe_logits(model, enc)
    start = time.perf_counter()
    with warnings.catch_warnings():  # PEFT's "may get different generations due to rounding": measured below
        warnings.filterwarnings("ignore", message=".*rounding errors.*")
        model = model.merge_and_unload()
    report.merge_seconds = round(time.perf_counter() - start, 3)
    diff = (_probe_logits(model, enc) - unmerged).abs()[enc["attention_mask"].bool()]  # (tokens, vocab)
    report.max_abs_logit_diff = float(diff.max())
    report.mean_abs_logit_diff = float(diff.mean())
    report.probe_tokens = int(enc["attention_mask"].sum())
    if report.max_abs_logit_diff > warn_above:
        report.warning = (f"merging into the {quantization} base changed the logits by up to "
                          f"{report.max_abs_logit_diff:.3g} (mean {report.mean_abs_logit_diff:.3g}) on the probe batch: "
                          "keep the adapters unmerged (merge=False) for exact outputs, or merge into a "
                          "full-precision base (quantization='none')")
        warnings.warn(report.warning, UserWarning, stacklevel=2)
    return model, tokenizer, report


def _lora_layers(peft_model, adapter_name: str) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix(PREFIX): m for name, m in peft_model.named_modules()
            if isinstance(m, LoraLayer) and adapter_name in m.lora_A}


def hotswap(peft_model, adapter_name: str, adapter: Adapter | str | Path, *, scale: float = 1.0) -> None:
    """Replace the weights of the loaded adapter ``adapter_name`` by ``scale * adapter`` in place.

    The new adapter must target exactly the same modules at the same ranks (hence the same tensor
    shapes); its scaling (alpha, rsLoRA, patterns) may differ. The base is not reloaded and no
    module is added: PEFT's ``hotswap_adapter_from_state_dict`` copies the tensors into the
    existing parameters. Anything else is a UserError that says to load it as a new adapter.
    """
    from peft.utils.hotswap import _update_scaling, hotswap_adapter_from_state_dict

    from ..arithmetic import scale as scale_op
    from ..core.stack import lora_config

    if not hasattr(peft_model, "peft_config"):
        raise UserError("hotswap needs a PEFT model holding the adapter (e.g. from load_model(..., merge=False))")
    if adapter_name not in peft_model.peft_config:
        raise UserError(f"no adapter named {adapter_name!r} in the model. Loaded: {', '.join(peft_model.peft_config)}")
    new = _as_adapter(adapter)
    if scale != 1.0:
        new = scale_op(new, _coefficient(scale, "the hot-swapped adapter"))
    where = new.lineage.get("path", "the new adapter")
    layers = _lora_layers(peft_model, adapter_name)
    if not layers:
        raise UserError(f"adapter {adapter_name!r} is merged or has no LoRA layers: unmerge it before hot-swapping")
    extra, missing = sorted(set(new.modules) - set(layers)), sorted(set(layers) - set(new.modules))
    if extra or missing:
        what = f"targets {extra[0]}, which {adapter_name!r} does not" if extra else f"does not target {missing[0]}"
        raise UserError(f"{where} {what} ({len(extra)} extra, {len(missing)} missing modules): hot-swapping "
                        "needs the same target modules; load it as a new adapter instead")
    for name, m in new.modules.items():
        layer = layers[name]
        A_old, B_old = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if m.A.shape != A_old.shape or m.B.shape != B_old.shape:
            raise UserError(f"{where}: module {name} has A {tuple(m.A.shape)}, B {tuple(m.B.shape)} but the loaded "
                            f"{adapter_name!r} has A {tuple(A_old.shape)}, B {tuple(B_old.shape)}: hot-swapping needs "
                            "the same ranks and shapes; load it as a new adapter instead")
    if any(adapter_name in getattr(m, "merged_adapters", []) for m in layers.values()):
        raise UserError(f"adapter {adapter_name!r} is merged into the base weights: unmerge it before hot-swapping")
    state = {}
    for name, m in new.modules.items():
        layer = layers[name]
        state[f"{PREFIX}{name}.lora_A.{adapter_name}.weight"] = m.A.to(layer.lora_A[adapter_name].weight.dtype)
        state[f"{PREFIX}{name}.lora_B.{adapter_name}.weight"] = m.B.to(layer.lora_B[adapter_name].weight.dtype)
    config = lora_config(new)
    try:
        hotswap_adapter_from_state_dict(peft_model, state, adapter_name, config)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"PEFT refused to hot-swap {where} into {adapter_name!r}: {str(e).splitlines()[0][:200]}") from None
    # PEFT matches rank/alpha patterns against the full parameter key, where module-path patterns
    # never match; each module's own scaling is set here so patterns and rsLoRA come out exact.
    for name, m in new.modules.items():
        _update_scaling(layers[name], adapter_name, m.scaling)
    old = peft_model.peft_config[adapter_name]
    config.base_model_name_or_path = old.base_model_name_or_path
    config.inference_mode = old.inference_mode
    peft_model.peft_config[adapter_name] = config
