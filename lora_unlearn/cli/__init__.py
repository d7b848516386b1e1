"""The ``lora-unlearn`` command: parsing and dispatch only; the work lives in the library.

``common`` holds the Typer app, its global options and what the commands share; the commands live
by concern in ``arith``, ``train``, ``evaluate`` and ``share`` and are registered here, in the order
``lora-unlearn --help`` lists them. Heavy libraries are imported inside the commands, on use.
"""

from __future__ import annotations

from . import arith, evaluate, share, train
from .common import app

COMMANDS = (
    ("negate", arith.negate), ("scale", arith.scale), ("extrapolate", arith.extrapolate), ("add", arith.add),
    ("compress", arith.compress),
    ("learn", train.learn), ("ask", evaluate.ask), ("run", train.run), ("demo", train.demo), ("select", train.select),
    ("eval", evaluate.eval_), ("scope", evaluate.scope_),
    ("card", share.card), ("push", share.push), ("export", share.export), ("serve", share.serve),
)
for _name, _command in COMMANDS:
    app.command(_name)(_command)
del _name, _command


def main() -> None:
    app()


__all__ = ["app", "main"]
