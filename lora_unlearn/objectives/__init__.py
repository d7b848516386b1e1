"""Training objectives, one short file each, registered by name.

An objective is a function ``loss(model, batches) -> scalar tensor`` where ``batches`` maps a
stream name ("forget", "retain", "update", "train") to a tokenized batch. The trainer draws one
batch of each stream the objective declares per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

from ..errors import UserError


@dataclass(frozen=True)
class Objective:
    name: str
    loss: Callable
    streams: tuple[str, ...]
    reference: str


REGISTRY: dict[str, Objective] = {}
_MODULES = ("nll",)


def register(name: str, streams: tuple[str, ...], reference: str):
    def wrap(fn: Callable) -> Callable:
        REGISTRY[name] = Objective(name, fn, streams, reference)
        return fn
    return wrap


def get(name: str) -> Objective:
    for module in _MODULES:
        import_module(f".{module}", __name__)
    if name not in REGISTRY:
        raise UserError(f"Unknown objective {name!r}. Available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
