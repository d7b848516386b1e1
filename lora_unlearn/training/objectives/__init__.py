"""Training objectives, one short file each, registered by name.

An objective is a function ``loss(model, batches, **params) -> scalar tensor``. ``batches`` maps
each stream the objective declares ("train", "forget", "retain", "update", and optional ones such
as nll's "preserve" when the data has them) to a tokenized batch
``{input_ids, attention_mask, labels}``; the trainer draws one batch of every stream per step,
the first stream setting the epoch. ``params`` are the objective's named knobs (defaults
registered with it, overridable per run). The reference model of KL and NPO is the model
without the adapter being trained (:func:`lora_unlearn.core.stack.reference`), never a second copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

from ...errors import UserError


@dataclass(frozen=True)
class Objective:
    name: str
    loss: Callable
    streams: tuple[str, ...]
    reference: str
    defaults: dict[str, Any] = field(default_factory=dict)
    prepare: Callable | None = None  # (streams, seed, params) -> streams, e.g. idk's answer swap
    optional: tuple[str, ...] = ()  # streams used when given (nll's "preserve")

    def select_streams(self, data) -> dict[str, list]:
        """``data`` as ``{stream: rows}`` holding exactly the streams this objective needs."""
        if not isinstance(data, dict):
            data = {self.streams[0]: data}
        missing = [s for s in self.streams if not data.get(s)]
        if missing:
            raise UserError(f"objective {self.name!r} needs the data stream(s) {', '.join(missing)} "
                            f"(it uses {', '.join(self.streams)}; given: {', '.join(k for k, v in data.items() if v) or 'none'})")
        return {s: data[s] for s in self.streams + tuple(o for o in self.optional if data.get(o))}

    def resolve_params(self, given: dict[str, Any] | None) -> dict[str, Any]:
        unknown = sorted(set(given or {}) - set(self.defaults))
        if unknown:
            raise UserError(f"objective {self.name!r} has no parameter {', '.join(map(repr, unknown))}. "
                            f"Available: {', '.join(sorted(self.defaults)) or 'none'}")
        params = {**self.defaults, **(given or {})}
        for key, value in params.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value != value:
                raise UserError(f"objective {self.name!r}: {key} must be a finite number, got {value}")
        return params


REGISTRY: dict[str, Objective] = {}
_MODULES = ("nll", "grad_ascent", "grad_diff", "kl", "npo", "simnpo", "rmu", "idk", "surgery")


def register(name: str, streams: tuple[str, ...], reference: str, defaults: dict[str, Any] | None = None,
             prepare: Callable | None = None, optional: tuple[str, ...] = ()):
    def wrap(fn: Callable) -> Callable:
        REGISTRY[name] = Objective(name, fn, streams, reference, dict(defaults or {}), prepare, optional)
        return fn
    return wrap


def get(name: str) -> Objective:
    for module in _MODULES:
        try:
            import_module(f".{module}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{module}":
                raise
    if name not in REGISTRY:
        raise UserError(f"Unknown objective {name!r}. Available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
