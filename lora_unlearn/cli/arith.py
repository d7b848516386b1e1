"""Task arithmetic on adapter folders: negate, scale, extrapolate, add, compress."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import UserError
from .common import Overwrite, _write, err_console, out_console, user_errors


@user_errors
def negate(src: Path, out: Path, scale: Annotated[float, typer.Option("--scale", "-l", help="lam: the result is -lam * dW.")] = 1.0,
           overwrite: Overwrite = False):
    """Write -lam * dW of SRC to OUT (task-vector negation)."""
    from ..arithmetic import negate as op
    from ..core.adapter_io import load_adapter

    if scale < 0:
        raise UserError(f"--scale must be >= 0, got {scale:g}: negate writes -lam * dW, so a negative lam adds "
                        "the knowledge back; for c * dW use `lora-unlearn scale --by c`")

    _write(op(load_adapter(src), scale), out, overwrite)


@user_errors
def scale(src: Path, out: Path, by: Annotated[float, typer.Option("--by", help="c: the result is c * dW.")],
          overwrite: Overwrite = False):
    """Write c * dW of SRC to OUT."""
    from ..arithmetic import scale as op
    from ..core.adapter_io import load_adapter

    _write(op(load_adapter(src), by), out, overwrite)


@user_errors
def extrapolate(src: Path, out: Path, alpha: Annotated[float, typer.Option("--alpha", help="the result is (1 + alpha) * dW (UIPE).")],
                overwrite: Overwrite = False):
    """Write (1 + alpha) * dW of SRC to OUT (UIPE's extrapolation of an unlearning update)."""
    from ..arithmetic import extrapolate as op
    from ..core.adapter_io import load_adapter

    if alpha <= -1:
        raise UserError(f"--alpha must be > -1, got {alpha:g}: (1 + alpha) * dW would be zero or flip the sign; "
                        "use `lora-unlearn negate` or `scale --by c` for that")

    _write(op(load_adapter(src), alpha), out, overwrite)


@user_errors
def add(paths: Annotated[list[Path], typer.Argument(help="Two or more adapter folders, then the output folder.")],
        allow_different_bases: Annotated[bool, typer.Option(help="Add adapters of different base models anyway.")] = False,
        overwrite: Overwrite = False):
    """Write dW1 + dW2 + ... to the last path, exactly (canonical factors: B = U S, A = V^T of the sum)."""
    from ..arithmetic import add as op
    from ..core.adapter_io import load_adapter

    if len(paths) < 3:
        raise UserError("add needs at least two adapters and an output folder: lora-unlearn add A B OUT")
    *inputs, out = paths
    _write(op(*map(load_adapter, inputs), allow_different_bases=allow_different_bases), out, overwrite)


@user_errors
def compress(src: Path, out: Path, rank: Annotated[int, typer.Option("--rank", "-r", help="Target rank r'.")],
             overwrite: Overwrite = False):
    """Write the best rank-R approximation of SRC to OUT and print each module's error."""
    from ..arithmetic import compress as op
    from ..core.adapter_io import load_adapter

    with err_console.status("compressing"):
        result, errors = op(load_adapter(src), rank)
    table = Table("module", "relative Frobenius error", title=f"compress to rank {rank}")
    for name, e in errors.items():
        table.add_row(name, f"{e:.3e}")
    out_console.print(table)
    out_console.print(f"max {max(errors.values()):.3e}, mean {sum(errors.values()) / len(errors):.3e}")
    _write(result, out, overwrite)
