"""Per-request forget toggling: one base, K adapters, a coefficient per adapter per batch row.

Row ``i`` of a batch runs the model

    W_i = W + sum_k c_ik * dW_k,        dW_k = s_k B_k A_k   (DESIGN section 2)

so a negated forget adapter at c = 1 forgets, c = 0 is off, other values set the strength
(negatives allowed), and rows with different settings share one forward pass. Nothing is merged:
the (possibly 4-bit) base weights are never touched, so every row is exact.

How. Each linear layer targeted by any loaded adapter is wrapped once (:class:`ForgetLinear`).
The wrapper holds the factors of all adapters stacked along the rank, with the scaling folded
into B::

    A_cat = [A_1; A_2; ...]            (R, in)      R = sum of the adapters' ranks at this layer
    B_cat = [s_1 B_1, s_2 B_2, ...]    (out, R)
    y = base(x) + ((x @ A_cat^T) * cols[:, None, :]) @ B_cat^T          x: (batch, seq, in)

``cols`` (batch, R) repeats each row's coefficient c_ik over adapter k's R_k columns. Layers that
hold the same adapters at the same ranks (the usual case: every layer of an all-linear adapter)
share one ``cols`` tensor, kept in one :class:`_Coefficients` object that every wrapper points
to. Switching is :meth:`ForgetRuntime.set_coefficients`: build the (batch, K) coefficient tensor
and one ``index_select`` per distinct layout (a handful), then rebind them; no module is
visited. Loading and unloading rebuild the stacked factors (that walks the wrapped layers).
An adapter that does not target a layer has no columns there. When every coefficient of a
layout is zero the layer skips the low-rank path and costs what the base costs.

The low-rank path runs in float32 (the factors are kept in float32), as PEFT's does on CPU.

Scoped forgetting (:mod:`lora_unlearn.core.scope`): an adapter loaded with a ``scope`` may get the
strength ``"auto"`` in a row (or as its default): :meth:`ForgetRuntime.resolve` reads
each row's text with the base (every adapter off, one partial pass up to the scopes' deepest layer,
all rows together) and replaces "auto" by the scope's strength in [0, lambda_max]. A number a
row gives explicitly always wins. :meth:`generate` resolves by itself; rows given to
:meth:`set_coefficients` or :meth:`forward` must be numbers (resolve them first).
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.adapter import Adapter
from ..core.adapter_io import load_adapter
from ..errors import UserError
from .scope import AUTO, attach_scope, resolve_rows


class _Coefficients:
    """The one piece of state switching writes: per layout, the (batch, R) column coefficients."""

    __slots__ = ("columns",)

    def __init__(self) -> None:
        self.columns: dict[tuple, torch.Tensor | None] = {}


class ForgetLinear(nn.Module):
    """A linear layer (``nn.Linear`` or bitsandbytes ``Linear4bit``/``Linear8bitLt``) plus K stacked LoRA deltas.

    ``A_t`` is A_cat^T (in, R) and ``B_t`` is B_cat^T (R, out), contiguous for the two matmuls;
    ``layout`` names the (adapter, rank) segments of the R columns and picks this layer's
    coefficient columns from the shared state.
    """

    def __init__(self, base: nn.Module, state: _Coefficients) -> None:
        super().__init__()
        self.base = base
        self.state = state
        self.layout: tuple = ()
        device = _device_of(base)
        self.register_buffer("A_t", torch.zeros(base.in_features, 0, device=device), persistent=False)
        self.register_buffer("B_t", torch.zeros(0, base.out_features, device=device), persistent=False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def set_factors(self, layout: tuple, A_t: torch.Tensor, B_t: torch.Tensor) -> None:
        self.layout, self.A_t, self.B_t = layout, A_t, B_t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        cols = self.state.columns.get(self.layout)
        if cols is None:  # no adapter here, or all coefficients zero
            return y
        h = x.to(self.A_t.dtype) @ self.A_t  # (batch, seq, R)
        if h.dim() == 3:
            if cols.shape[0] not in (1, h.shape[0]):
                raise UserError(f"the batch has {h.shape[0]} rows but coefficients were set for {cols.shape[0]}: "
                                "call set_coefficients with one dict per row")
            h = h * cols[:, None, :]
        else:  # (tokens, in): one row, or rows already flattened by the caller
            if cols.shape[0] != 1:
                raise UserError("a 2-D input carries no batch rows: set a single coefficient row")
            h = h * cols
        out = y.shape[-1]
        if y.dtype == self.B_t.dtype and y.is_contiguous():
            y2 = y.view(-1, out)
            y2.addmm_(h.reshape(-1, h.shape[-1]), self.B_t)
            return y
        return y + (h @ self.B_t).to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.A_t.shape[1]}"


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features")
                                            and "Linear" in type(module).__name__)


@dataclass
class _Loaded:
    adapter: Adapter
    default: float | str  # a number, or "auto" (the scope decides) when there is a scope
    scope: object | None = None  # a lora_unlearn.core.scope.Scope

    def info(self) -> dict:
        ranks = self.adapter.ranks.values()
        out = {"rank": max(ranks), "default": self.default, "path": self.adapter.lineage.get("path"),
               "modules": len(self.adapter.modules)}
        if self.scope is not None:
            out["scope"] = self.scope.summary()
        if self.adapter.lineage.get("sha256"):
            out["sha256"] = self.adapter.lineage["sha256"]
        return out

    @property
    def idle(self) -> float:
        """The coefficient when no row sets one: the default, or 0 (the unchanged model) for "auto"."""
        return 0.0 if self.default == AUTO else self.default


FLOAT32_MAX = 3.4028234663852886e38


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"coefficient of {name!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:  # coefficients are stored in float32
        raise UserError(f"coefficient of {name!r} must be a finite number (within float32, |c| <= 3.4e38), got {value}")
    return value


class ForgetRuntime:
    """A base loaded once with K adapters; every row of a batch carries its own coefficient per adapter.

    ``model`` is the plain (unwrapped) base, e.g. from :func:`lora_unlearn.core.models.load_base`; the
    runtime wraps its targeted linear layers in place and unwraps them when the last adapter
    is unloaded. ``lock`` is for callers (the server) to hold around :meth:`generate` and around
    load/unload: the runtime itself takes no lock, so a caller holding it never deadlocks.
    ``max_strength``: the largest |coefficient| a row or default may have (the server's ``--max-strength``).
    """

    def __init__(self, model, tokenizer, *, lock: threading.Lock | None = None,
                 max_strength: float | None = None) -> None:
        if hasattr(model, "peft_config"):
            raise UserError("ForgetRuntime needs the plain base model, not a PEFT model: pass the model "
                            "from load_base() and load adapters with runtime.load()")
        self.model = model
        self.tokenizer = tokenizer
        self.lock = lock or threading.Lock()  # the server's batcher takes it once per decoding step
        self.max_strength = max_strength  # None: any coefficient within float32
        self.info = None  # BaseInfo when built by from_base
        self._state = _Coefficients()
        self._adapters: dict[str, _Loaded] = {}
        self._wrapped: dict[str, ForgetLinear] = {}
        self._rows: list[dict[str, float]] | None = None  # None: every row uses the defaults
        self._coef = torch.zeros(1, 0)
        self._layouts: dict[tuple, tuple[torch.Tensor, torch.device]] = {}  # layout -> (column -> adapter, device)

    @classmethod
    def from_base(cls, name: str = "smollm2-135m", quantization: str = "nf4", device: str | None = None,
                  lock: threading.Lock | None = None, max_strength: float | None = None) -> ForgetRuntime:
        """Load ``name`` (embedded default, local folder or Hub id) and wrap it."""
        from ..core.models import load_base

        model, tokenizer, info = load_base(name, quantization, device=device)
        runtime = cls(model, tokenizer, lock=lock, max_strength=max_strength)
        runtime.info = info
        return runtime

    # ---- adapters -------------------------------------------------------------------------------

    def load(self, name: str, adapter: Adapter | str | Path, default: float | str = 0.0, scope=None) -> None:
        """Add ``adapter`` under ``name``; rows that do not mention it use ``default``.

        ``scope``: a :class:`~lora_unlearn.core.scope.Scope`, a scope file or folder, or ``True`` for
        the scope saved beside the adapter's folder; it must belong to this adapter and this base, and
        lets rows give the strength ``"auto"``. ``default``: a number, or ``"auto"`` (needs a scope:
        rows that do not mention the adapter get the scope's strength). Nothing changes when anything
        is refused.
        """
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self._adapters:
            raise UserError(f"an adapter named {name!r} is already loaded: unload it first or pick another name")
        if not (isinstance(default, str) and default == AUTO):
            default = self._bounded(name, default)
        if not isinstance(adapter, Adapter):
            adapter = load_adapter(adapter)
        self._check_fits(name, adapter)
        scope = attach_scope(self, name, adapter, scope, default)
        self._adapters[name] = _Loaded(adapter, default, scope)
        self._rebuild()

    def unload(self, name: str) -> None:
        """Remove the adapter ``name``; layers no adapter targets any more get their original module back."""
        if name not in self._adapters:
            raise UserError(f"no adapter named {name!r} is loaded. Loaded: {self._names()}")
        del self._adapters[name]
        if self._rows is not None:
            self._rows = [{k: v for k, v in row.items() if k != name} for row in self._rows]
        self._rebuild()

    def adapters(self) -> dict[str, dict]:
        """name -> {"rank", "default", "path", "modules", "scope" (its settings, when it has one), "sha256" (when
        read from a folder)}."""
        return {name: loaded.info() for name, loaded in self._adapters.items()}

    def _bounded(self, name: str, value) -> float:
        if self.max_strength is not None and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and abs(value) > self.max_strength:
            raise UserError(f"coefficient of {name!r} is {value:g}, beyond this runtime's bound of "
                            f"{self.max_strength:g} (max_strength, the server's --max-strength)")
        return _number(name, value)

    def _names(self) -> str:
        return ", ".join(self._adapters) or "(none)"

    def _check_fits(self, name: str, adapter: Adapter) -> None:
        where = adapter.lineage.get("path", name)
        for module_name, m in adapter.modules.items():
            try:
                module = self._wrapped.get(module_name) or self.model.get_submodule(module_name)
            except AttributeError:
                raise UserError(f"adapter {where} targets {module_name}, which this base model does not have: "
                                "was it trained on another model?") from None
            if not _is_linear(module):
                raise UserError(f"adapter {where} targets {module_name}, a {type(module).__name__}, not a linear "
                                "layer: only LoRA on linear layers is supported")
            if (m.B.shape[0], m.A.shape[1]) != (module.out_features, module.in_features):
                raise UserError(f"adapter {where}: module {module_name} is (out {m.B.shape[0]}, in {m.A.shape[1]}) "
                                f"but the base layer is (out {module.out_features}, in {module.in_features}): "
                                "was it trained on another model?")

    def _rebuild(self) -> None:
        """Restack every targeted layer's factors; wrap new layers, unwrap the ones left with no adapter."""
        names = list(self._adapters)
        targeted = set().union(*(a.adapter.modules for a in self._adapters.values())) if names else set()
        for module_name in list(self._wrapped):
            if module_name not in targeted:
                self._replace(module_name, self._wrapped.pop(module_name).base)
        for module_name in sorted(targeted):
            layer = self._wrapped.get(module_name)
            if layer is None:
                layer = ForgetLinear(self.model.get_submodule(module_name), self._state)
                self._replace(module_name, layer)
                self._wrapped[module_name] = layer
            layout, As, Bs = [], [], []
            device = layer.A_t.device
            for k, name in enumerate(names):
                m = self._adapters[name].adapter.modules.get(module_name)
                if m is None:
                    continue
                layout.append((k, m.rank))
                As.append(m.A.to(device=device, dtype=torch.float32))
                Bs.append(m.B.to(device=device, dtype=torch.float32) * m.scaling)
            layer.set_factors(tuple(layout), torch.cat(As, 0).T.contiguous(), torch.cat(Bs, 1).T.contiguous())
        self._layouts = {layer.layout: (torch.tensor([k for k, r in layer.layout for _ in range(r)], dtype=torch.long),
                                        layer.A_t.device) for layer in self._wrapped.values()}
        self._apply()

    def _replace(self, module_name: str, module: nn.Module) -> None:
        parent_name, _, child = module_name.rpartition(".")
        setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, module)

    # ---- coefficients ---------------------------------------------------------------------------

    def set_coefficients(self, rows: list[dict[str, float]] | None) -> None:
        """One dict per batch row (adapter name -> coefficient); missing adapters use their default.

        ``None`` (or ``[]``) resets to the defaults for any batch size. Costs microseconds: it writes
        the shared coefficient state and touches no module.
        """
        if rows is not None:
            if isinstance(rows, dict) or not isinstance(rows, (list, tuple)):
                raise UserError(f"coefficients must be a list with one dict per batch row, got {type(rows).__name__}")
            for i, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise UserError(f"row {i} of the coefficients must be a dict of adapter name -> number, "
                                    f"got {type(row).__name__}")
                for key, value in row.items():
                    if key not in self._adapters:
                        raise UserError(f"row {i} names adapter {key!r}, which is not loaded. Loaded: {self._names()}")
                    if value == AUTO:
                        raise UserError(f"row {i} sets {key!r} to \"auto\", which needs the row's text: call "
                                        "resolve(rows, texts) first (generate does it)")
                    self._bounded(key, value)
                for key, loaded in self._adapters.items():
                    if loaded.default == AUTO and key not in row:
                        raise UserError(f"row {i} leaves {key!r} at its default \"auto\", which needs the row's "
                                        "text: call resolve(rows, texts) first (generate does it), or give a number")
            rows = [dict(row) for row in rows] or None
        self._rows = rows
        self._apply()

    @contextlib.contextmanager
    def coefficients(self, rows: list[dict[str, float]] | None):
        """``set_coefficients(rows)`` for the block; the previous rows come back afterwards."""
        previous = self._rows
        self.set_coefficients(rows)
        try:
            yield self
        finally:
            self._rows = previous
            self._apply()

    def coefficient_tensor(self) -> torch.Tensor:
        """The current (batch, K) coefficients, K in load order (batch 1 when the defaults apply)."""
        return self._coef

    def _apply(self) -> None:
        names = list(self._adapters)
        defaults = [self._adapters[n].idle for n in names]
        rows = self._rows or [{}]
        coef = torch.tensor([[float(row.get(n, d)) for n, d in zip(names, defaults)] for row in rows],
                            dtype=torch.float32)
        columns: dict[tuple, torch.Tensor | None] = {}
        for layout, (index, device) in self._layouts.items():
            cols = coef.index_select(1, index)
            columns[layout] = cols.to(device) if bool(cols.any()) else None
        self._coef = coef
        self._state.columns = columns  # one rebinding: every wrapped layer reads it on its next call

    # ---- scopes ---------------------------------------------------------------------------------

    def scoped(self) -> dict[str, object]:
        """name -> Scope, for the loaded adapters that have one."""
        return {name: loaded.scope for name, loaded in self._adapters.items() if loaded.scope is not None}

    def resolve(self, rows: list[dict], texts: list[str]) -> tuple[list[dict[str, float]], list[dict[str, dict]]]:
        """Rows with every "auto" (explicit, or an adapter's default) replaced by its scope's strength.

        ``texts[i]`` is what row i's request says (a prompt, or a chat's messages); returns
        ``(rows, scopes)``, ``scopes[i]`` = {name: {"score", "strength"}} for row i's "auto" adapters.
        One partial pass of the base reads every text that needs it. The caller holds ``lock``.
        """
        return resolve_rows(self, rows, texts)

    def defaults(self) -> dict[str, float | str]:
        """name -> default strength (a number, or "auto"), for the loaded adapters in load order."""
        return {name: loaded.default for name, loaded in self._adapters.items()}

    # ---- running --------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return getattr(self.model, "device", None) or _device_of(self.model)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                forgets: list[dict[str, float]]) -> torch.Tensor:
        """Logits (batch, seq, vocab); row i runs with ``forgets[i]``."""
        if len(forgets) != input_ids.shape[0]:
            raise UserError(f"{input_ids.shape[0]} rows of input but {len(forgets)} coefficient dicts: give one per row")
        with self.coefficients(forgets):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    @torch.no_grad()
    def generate(self, prompts: list[str], forgets: list[dict[str, float]], *, max_new_tokens: int = 64,
                 chat: bool = True) -> list[str]:
        """Greedy continuations of ``prompts`` in one batch (left padding); row i runs with ``forgets[i]``.

        ``chat=True`` wraps each prompt as a user turn with the tokenizer's chat template. A strength
        "auto" (or an adapter's default "auto") is set by the adapter's scope from the prompt.
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise UserError("prompts must be a list of strings")
        if len(forgets) != len(prompts):
            raise UserError(f"{len(prompts)} prompts but {len(forgets)} coefficient dicts: give one per prompt")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not prompts:
            return []
        from ..core.data import prompt_text

        forgets, _ = self.resolve(forgets, prompts)
        tok = self.tokenizer
        texts = [prompt_text(tok, p) for p in prompts] if chat else list(prompts)
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(self._device())
        finally:
            tok.padding_side = side
        with self.coefficients(forgets):
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
