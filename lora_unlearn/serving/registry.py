"""Adapters by name: ``NAME=DIR[:DEFAULT]`` specs, Hub ids, and loading one (with its scope) into a running runtime.

A loaded adapter's card kind (forget, negated, unlearning, knowledge: :mod:`lora_unlearn.core.lineage`)
is recorded beside its name, so ``GET /v1/adapters`` can say what each adapter is.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..core.adapter_io import load_adapter
from ..core.lineage import classify_folder
from ..errors import UserError
from .schemas import NAME


def resolve_adapter_path(path: str) -> Path:
    """A local folder as is; a Hub id (``owner/name``) downloaded (adapter files only, safetensors)."""
    local = Path(path).expanduser()
    if local.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        return local
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        return Path(snapshot_download(path, allow_patterns=["adapter_config.json", "adapter_model.safetensors",
                                                            "scope.json", "scope.safetensors",
                                                            "lora_unlearn.json", "README.md"]))
    except (HfHubHTTPError, HFValidationError, OSError) as e:
        raise UserError(f"cannot download adapter {path!r} from the Hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}): check the id, the network and HF_TOKEN") from None


def read_scope(folder: Path, scope: bool | str | Path, name: str, max_strength: float | None):
    """The Scope to load with adapter ``name``: "beside" (the one in ``folder`` if any), True (the one in
    ``folder``, required), False (none) or a scope file/folder; its lambda_max within ``max_strength``."""
    from ..core.scope import load_scope, read_scope_json

    if scope is False or (scope == "beside" and read_scope_json(folder) is None):
        return None
    found = load_scope(folder if scope in (True, "beside") else Path(str(scope)).expanduser())
    if max_strength is not None and found.lambda_max > max_strength:
        raise UserError(f"adapter {name!r}: its scope's lambda_max {found.lambda_max:g} is beyond this server's "
                        f"bound of {max_strength:g} (--max-strength): refit the scope with a smaller --lambda-max")
    return found


def load_named(runtime, kinds: dict[str, str], name: str, path: str | Path, default: float | str | None,
               scope: bool | str | Path = "beside", max_strength: float | None = None) -> None:
    """Read (outside the lock) and load (under it) one adapter and its scope; record its card kind.

    ``scope``: "beside" loads the scope saved in the adapter's folder when there is one (then
    requests may say "auto"); True requires it; False loads none; or a scope file or folder.
    """
    folder = resolve_adapter_path(str(path))
    adapter = load_adapter(folder)
    kind = classify_folder(folder, adapter).kind
    found = read_scope(folder, scope, name, max_strength)
    with runtime.lock:
        runtime.load(name, adapter, default, scope=found)
    kinds[name] = kind


def parse_adapter_spec(spec: str) -> tuple[str, str, float | str]:
    """``NAME=DIR[:DEFAULT]`` -> (name, dir, default strength, 0.0 when not given; "auto": the scope
    saved beside DIR decides)."""
    name, sep, rest = spec.partition("=")
    if not sep or not NAME.match(name) or not rest:
        raise UserError(f"--adapter {spec!r}: expected NAME=DIR[:DEFAULT], e.g. forget=adapters/forget_negated:0 "
                        "(NAME: letters, digits, '.', '_', '-')")
    path, colon, tail = rest.rpartition(":")
    if colon and tail == "auto" and path:
        return name, path, "auto"
    if colon:
        try:
            default = float(tail)
        except ValueError:
            return name, rest, 0.0
        if not math.isfinite(default):
            raise UserError(f"--adapter {spec!r}: the default strength must be a finite number")
        return name, path, default
    return name, rest, 0.0
