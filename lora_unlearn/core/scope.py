"""Scope detectors: from the forget data, how strongly a request should be forgotten.

Scoped forgetting (O3, ICLR 2025; DESIGN section 5): a detector built from the forget data decides
per request how strongly the forget adapter is applied; unrelated requests run the unchanged
model. **The weights still hold the knowledge: a request the detector misses gets it.**

The score (a kNN margin on the base model's token states, no adapter). The request's text is
rendered as one user turn (the tokenizer's chat template, as training renders a question) and
read by the base model up to decoder layer ``L`` (default 4 of SmolLM2-135M's 30: one partial
pass, about 4/30 of a prompt forward). ``h_t`` is the unit-normalised hidden state after layer L
at each token ``t`` of the text (template tokens left out). Two banks of such vectors are stored:
``F``, the tokens of the forget questions, and ``G``, the tokens of background text that must stay
out of scope (the CLI and recipes put the prompts of the vendored preservation pool and its
factual questions there, ``preservation+facts``, plus any the user adds). Per token

    m_t = max_{f in F} <h_t, f>  -  max_{g in G} <h_t, g>          (cosine margin, in [-2, 2])

is how much closer the token is to something of the forget set than to anything of the
background: the names, titles and places of the forget set score high, "What", "author",
"genre" about 0 (the background has them). The request's score is

    score = clip(mean of the k largest m_t (k = 3; 0 for missing tokens), 0, 1)

so one shared word is not enough and a question hidden in a long chat is still found (a max, not
a mean over the text). k, L and "questions only" were chosen on a development split of the fit
half (benchmarks/scope.py says how).

Calibration: the threshold is the (1 - FPR) quantile (linear interpolation, ``torch.quantile``)
of the scores of held-out in-distribution prompts that must stay out of scope (TOFU-mini: retain
rows 360-399), or given by hand in [0, 1]. Strength: ``hard`` gives lambda_max when
score > threshold, else 0; ``smooth`` gives lambda_max * clip((score - threshold) / ramp, 0, 1).

Files, beside the adapter (no pickle): ``scope.safetensors`` (``forget`` (|F|, d) and
``background`` (|G|, d), float16) and ``scope.json`` (the settings, the sha256 of the adapter's
weights and of the tensors file, the base model and a digest of its input embeddings, data
fingerprints: sha256 and row count, never the data). A scope is refused for another adapter
(weights sha256) or another base (embedding digest). Core imports no wing: the recipe runner
(training) and the runtime (serving) both use this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError

SCOPE_JSON = "scope.json"
SCOPE_TENSORS = "scope.safetensors"
FORMAT = "lora_unlearn.scope"
VERSION = 1
MODES = ("hard", "smooth")
DEFAULTS = {"layer": 4, "top_k": 3, "fpr": 0.02, "lambda_max": 1.0, "mode": "hard", "ramp": 0.1}
MAX_TOKENS = 2048  # text tokens read per request (a prompt of the server's 8,000 characters fits)


@dataclass(eq=False)
class Scope:
    """A fitted detector: the two token banks (unit rows), its settings and what it belongs to (``meta``)."""

    forget: torch.Tensor  # (|F|, d) float32, unit rows
    background: torch.Tensor  # (|G|, d) float32, unit rows (may be empty)
    layer: int
    top_k: int
    threshold: float
    lambda_max: float
    mode: str = "hard"
    ramp: float = 0.1
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_settings(self.layer, self.top_k, self.threshold, self.lambda_max, self.mode, self.ramp)

    def strength(self, score: float) -> float:
        """The forget strength for a request with this score, in [0, lambda_max]."""
        if self.mode == "hard":
            return self.lambda_max if score > self.threshold else 0.0
        return self.lambda_max * min(max((score - self.threshold) / self.ramp, 0.0), 1.0)

    def scores(self, states: list[torch.Tensor]) -> list[float]:
        """Scores of texts given their layer-L token states (each (T, d), any scale)."""
        return [score_tokens(h, self.forget, self.background, self.top_k) for h in states]

    def summary(self) -> dict[str, Any]:
        cal = self.meta.get("calibration") or {}
        return {"threshold": self.threshold, "lambda_max": self.lambda_max, "mode": self.mode, "ramp": self.ramp,
                "layer": self.layer, "top_k": self.top_k, "fpr_target": cal.get("fpr_target"),
                "path": self.meta.get("path")}


def check_settings(layer, top_k, threshold, lambda_max, mode, ramp) -> None:
    """One UserError naming the first bad setting."""
    for name, value in (("layer", layer), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"scope {name} must be a positive integer, got {value!r}")
    if not _finite(threshold) or not 0 <= threshold <= 1:
        raise UserError(f"scope threshold must be a number in [0, 1] (scores are clipped to [0, 1]), got {threshold!r}")
    if not _finite(lambda_max) or lambda_max <= 0:
        raise UserError(f"scope lambda_max must be a positive finite number (the strength in scope), got {lambda_max!r}")
    if mode not in MODES:
        raise UserError(f"scope mode must be hard or smooth, got {mode!r}")
    if not _finite(ramp) or ramp <= 0:
        raise UserError(f"scope ramp must be a positive number (the score width of the smooth ramp), got {ramp!r}")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---- the score --------------------------------------------------------------------------------

def token_margins(h: torch.Tensor, forget: torch.Tensor, background: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """m_t = max_f cos(h_t, f) - max_g cos(h_t, g) for every row of ``h`` (T, d); banks are unit rows."""
    q = F.normalize(h.float(), dim=-1)
    out = []
    for i in range(0, q.shape[0], chunk):
        part = q[i:i + chunk]
        m = (part @ forget.T).amax(1)
        if background.shape[0]:
            m = m - (part @ background.T).amax(1)
        out.append(m)
    return torch.cat(out) if out else q.new_zeros(0)


def score_tokens(h: torch.Tensor, forget: torch.Tensor, background: torch.Tensor, top_k: int) -> float:
    """clip(mean of the top_k largest token margins, missing ones counted as 0, 0, 1)."""
    m = token_margins(h, forget, background).sort(descending=True).values[:top_k]
    return float(min(max(m.sum().item() / top_k, 0.0), 1.0))


# ---- reading text with the base -----------------------------------------------------------------

def _text_ids(tokenizer, text: str) -> tuple[list[int], list[bool]]:
    """The ids of ``text`` rendered as one user turn, and which of them are the text's own tokens."""
    from .data import prompt_text

    rendered = prompt_text(tokenizer, text)
    start = rendered.rfind(text) if text else -1
    end = start + len(text)
    try:
        enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        mask = [start >= 0 and start <= a and b <= end and b > a for a, b in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError):  # a slow tokenizer has no offsets
        pieces = [rendered[:start], text, rendered[end:]] if start >= 0 else [rendered, "", ""]
        parts = [tokenizer(p, add_special_tokens=False)["input_ids"] if p else [] for p in pieces]
        ids = parts[0] + parts[1] + parts[2]
        mask = [False] * len(parts[0]) + [True] * len(parts[1]) + [False] * len(parts[2])
    keep = [i for i, m in enumerate(mask) if m]
    if len(keep) > MAX_TOKENS:  # the text's first MAX_TOKENS tokens (and the template before them)
        cut = keep[MAX_TOKENS - 1] + 1
        ids, mask = ids[:cut], mask[:cut]
    return ids, mask


def decoder_layers(model):
    """The model's list of decoder blocks (Llama, Mistral, Qwen, GPT-2, GPT-NeoX, OPT layouts)."""
    for path in ("model.layers", "model.model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return layers
    raise UserError(f"cannot find the decoder layers of {type(model).__name__}: scopes support Llama-style models "
                    "(model.layers) and GPT-2/NeoX/OPT layouts")


class _Reached(Exception):
    """Raised by the deepest hook: the pass has what it needs, the remaining layers are not run."""


def _device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def text_states(model, tokenizer, texts: list[str], layers: list[int], batch_size: int = 16) -> dict[int, list[torch.Tensor]]:
    """Per layer in ``layers``, each text's (T, d) float32 hidden states after that decoder layer.

    One partial forward per batch: a hook on the deepest needed layer stops the pass there, so the
    cost is about max(layers)/n_layers of a forward. Whatever adapters are active run too: callers
    that need the base alone (every scope) switch them off first (the runtime sets them to 0).
    """
    blocks = decoder_layers(model)
    if max(layers) > len(blocks):
        raise UserError(f"the scope reads layer {max(layers)} but this model has {len(blocks)} decoder layers: "
                        "it was fitted on another base")
    encoded = [_text_ids(tokenizer, t) for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: dict[int, list[torch.Tensor | None]] = {L: [None] * len(texts) for L in layers}
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i][0]))
    device = _device(model)
    deepest = max(layers)
    for k in range(0, len(order), batch_size):
        batch = order[k:k + batch_size]
        width = max(1, max(len(encoded[i][0]) for i in batch))
        ids = torch.tensor([encoded[i][0] + [pad] * (width - len(encoded[i][0])) for i in batch], device=device)
        mask = torch.tensor([[1] * len(encoded[i][0]) + [0] * (width - len(encoded[i][0])) for i in batch],
                            device=device)
        captured: dict[int, torch.Tensor] = {}

        def grab(L):
            def hook(module, args, output):
                captured[L] = output[0] if isinstance(output, tuple) else output
                if L == deepest:
                    raise _Reached
            return hook

        hooks = [blocks[L - 1].register_forward_hook(grab(L)) for L in set(layers)]
        try:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Reached:
            pass
        finally:
            for h in hooks:
                h.remove()
        for j, i in enumerate(batch):
            keep = torch.tensor(encoded[i][1] + [False] * (width - len(encoded[i][1])), device=device)
            for L in layers:
                out[L][i] = captured[L][j][keep].float().cpu()
    return out


def base_digest(model) -> str:
    """sha256 of a strided sample of the input embeddings (in bfloat16, so the CPU and GPU loads agree).

    Embeddings are never quantized, so the digest names the base whatever its quantization.
    """
    w = model.get_input_embeddings().weight.detach()
    rows = w[:: max(1, w.shape[0] // 1024)].to("cpu", torch.bfloat16).contiguous()
    h = hashlib.sha256(f"{tuple(w.shape)}".encode())
    h.update(rows.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def weights_sha256(adapter) -> str:
    """The sha256 of the adapter's ``adapter_model.safetensors``: read from a folder's lineage, or of the
    bytes :func:`~lora_unlearn.core.adapter_io.save_adapter` would write."""
    if adapter.lineage.get("op") == "load" and adapter.lineage.get("sha256"):
        return adapter.lineage["sha256"]
    from safetensors.torch import save

    from .adapter import peft_state_dict

    return hashlib.sha256(save(peft_state_dict(adapter), metadata={"format": "pt"})).hexdigest()


# ---- fitting ----------------------------------------------------------------------------------

def bank(states: list[torch.Tensor], d: int) -> torch.Tensor:
    rows = [F.normalize(h.float(), dim=-1) for h in states if h.shape[0]]
    return torch.cat(rows) if rows else torch.zeros(0, d)


def _fingerprint(texts: list[str]) -> dict[str, Any]:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\n")
    return {"sha256": h.hexdigest(), "rows": len(texts)}


def _texts(name: str, texts) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise UserError(f"{name} must be a list of strings")
    return [t for t in texts if t.strip()]


def fit_scope(model, tokenizer, forget_texts: list[str], *, adapter, background_texts: list[str] = (),
              calibration_texts: list[str] | None = None, threshold: float | None = None, fpr: float = DEFAULTS["fpr"],
              lambda_max: float = DEFAULTS["lambda_max"], mode: str = DEFAULTS["mode"], ramp: float = DEFAULTS["ramp"],
              layer: int = DEFAULTS["layer"], top_k: int = DEFAULTS["top_k"], base: str | None = None,
              quantization: str | None = None, batch_size: int = 16) -> Scope:
    """Fit a detector for ``adapter`` on ``model`` (the plain base, no adapter active).

    ``forget_texts``: the forget questions (the bank F); ``background_texts``: text that must stay
    out of scope (the bank G); ``calibration_texts``: held-out in-distribution prompts that must stay
    out of scope, whose (1 - ``fpr``) score quantile becomes the threshold, unless ``threshold`` is
    given. Keep the calibration rows out of every set that measures false positives or utility.
    """
    forget_texts, background_texts = _texts("forget texts", forget_texts), _texts("background texts", background_texts)
    if not forget_texts:
        raise UserError("a scope needs forget questions: the forget data gave none")
    if threshold is None:
        if calibration_texts is None or not _texts("calibration texts", calibration_texts):
            raise UserError("calibrating a scope needs held-out prompts that must stay out of scope (e.g. "
                            "--calibrate tofu-mini:retain --calibrate-rows 360:400), or a --threshold in [0, 1]")
        if not _finite(fpr) or not 0 < fpr < 1:
            raise UserError(f"the false-positive-rate target must be in (0, 1), e.g. 0.02, got {fpr!r}")
    check_settings(layer, top_k, 0.0 if threshold is None else threshold, lambda_max, mode, ramp)
    d = model.get_input_embeddings().weight.shape[1]
    states = text_states(model, tokenizer, forget_texts + background_texts, [layer], batch_size)[layer]
    forget, background = bank(states[:len(forget_texts)], d), bank(states[len(forget_texts):], d)
    meta: dict[str, Any] = {"adapter_sha256": weights_sha256(adapter), "base": base or adapter.base_model,
                            "base_digest": base_digest(model), "quantization": quantization,
                            "forget_data": _fingerprint(forget_texts), "background_data": _fingerprint(background_texts)}
    scope = Scope(forget, background, layer, top_k, 0.0 if threshold is None else float(threshold), float(lambda_max),
                  mode, float(ramp), meta)
    if calibration_texts:
        cal = _texts("calibration texts", calibration_texts)
        scores = torch.tensor(scope.scores(text_states(model, tokenizer, cal, [layer], batch_size)[layer]))
        if threshold is None:
            scope.threshold = float(torch.quantile(scores, 1 - fpr).clamp(0, 1))
        meta["calibration"] = {**_fingerprint(cal), "fpr_target": fpr if threshold is None else None,
                               "above_threshold": float((scores > scope.threshold).float().mean()),
                               "max_score": float(scores.max()), "median_score": float(scores.median())}
    else:
        meta["calibration"] = {"rows": 0, "fpr_target": None, "threshold_given": True}
    return scope


# ---- files ------------------------------------------------------------------------------------

def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_scope(scope: Scope, folder: str | Path, overwrite: bool = False) -> Path:
    """Write ``folder/scope.safetensors`` then ``folder/scope.json`` (each atomically; the JSON names the
    tensors' sha256, so a crash between the two leaves a scope that refuses to load, never a wrong one)."""
    from safetensors.torch import save

    from .. import __version__

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"scope folder {folder} does not exist: save the adapter first")
    if (folder / SCOPE_JSON).exists() and not overwrite:
        raise UserError(f"{folder / SCOPE_JSON} already exists: pass --overwrite to replace the scope")
    data = save({"forget": scope.forget.to(torch.float16).contiguous(),
                 "background": scope.background.to(torch.float16).contiguous()}, metadata={"format": FORMAT})
    record = {"format": FORMAT, "version": VERSION, "lora_unlearn_version": __version__,
              "layer": scope.layer, "top_k": scope.top_k, "threshold": scope.threshold,
              "lambda_max": scope.lambda_max, "mode": scope.mode, "ramp": scope.ramp,
              "tensors_sha256": hashlib.sha256(data).hexdigest(),
              **{k: v for k, v in scope.meta.items() if k != "path"}}
    _write_atomic(folder / SCOPE_TENSORS, data)
    _write_atomic(folder / SCOPE_JSON, (json.dumps(record, indent=2) + "\n").encode())
    return folder / SCOPE_JSON


def read_scope_json(path: str | Path) -> dict[str, Any] | None:
    """The JSON of a scope file or of the scope beside an adapter folder; None when there is none."""
    path = Path(path)
    path = path / SCOPE_JSON if path.is_dir() else path
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise UserError(f"{path} is not valid JSON: the scope is corrupt; refit it with `lora-unlearn scope`") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"{path} is not a lora-unlearn scope file (no \"format\": \"{FORMAT}\")")
    return record


def load_scope(path: str | Path) -> Scope:
    """Read and validate a scope: a folder holding ``scope.json`` (an adapter's) or the JSON file itself."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    given = Path(path)
    record = read_scope_json(given)
    if record is None:
        raise UserError(f"no scope at {given}: fit one with `lora-unlearn scope ADAPTER_DIR --forget DATA "
                        "--calibrate DATA`")
    json_path = given / SCOPE_JSON if given.is_dir() else given
    if record.get("version") != VERSION:
        raise UserError(f"{json_path}: scope version {record.get('version')!r}, this lora-unlearn reads {VERSION}")
    tensors_path = json_path.parent / SCOPE_TENSORS
    if not tensors_path.is_file():
        raise UserError(f"{tensors_path} is missing: the scope is incomplete; refit it with `lora-unlearn scope`")
    data = tensors_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != record.get("tensors_sha256"):
        raise UserError(f"{tensors_path} does not match {json_path} (sha256 differs): the scope was replaced "
                        "half-way or edited; refit it")
    try:
        tensors = load(data)
    except SafetensorError as e:
        raise UserError(f"{tensors_path} cannot be read as safetensors ({e})") from None
    forget, background = tensors.get("forget"), tensors.get("background")
    if forget is None or background is None or forget.dim() != 2 or background.dim() != 2 \
            or not forget.shape[0] or background.shape[1] != forget.shape[1]:
        raise UserError(f"{tensors_path}: expected tensors forget (n, d) and background (m, d)")
    if not (torch.isfinite(forget).all() and torch.isfinite(background).all()):
        raise UserError(f"{tensors_path} holds NaN or infinite values: the scope is broken; refit it")
    known = {"format", "version", "lora_unlearn_version", "layer", "top_k", "threshold", "lambda_max", "mode",
             "ramp", "tensors_sha256"}
    meta = {k: v for k, v in record.items() if k not in known}
    meta["path"] = str(json_path.parent)
    try:
        return Scope(F.normalize(forget.float(), dim=-1), F.normalize(background.float(), dim=-1),
                     record.get("layer"), record.get("top_k"), record.get("threshold"), record.get("lambda_max"),
                     record.get("mode"), record.get("ramp"), meta)
    except UserError as e:
        raise UserError(f"{json_path}: {e}") from None


def check_scope(scope: Scope, adapter, model, base: str | None = None) -> None:
    """UserError unless ``scope`` was fitted for ``adapter`` (weights sha256) on ``model``'s base."""
    where = scope.meta.get("path") or "the scope"
    want, got = scope.meta.get("adapter_sha256"), weights_sha256(adapter)
    if want != got:
        what = adapter.lineage.get("path") or "this adapter"
        raise UserError(f"{where} belongs to another adapter (weights sha256 {str(want)[:12]}..., {what} has "
                        f"{got[:12]}...): fit a scope for this adapter with `lora-unlearn scope`")
    if scope.meta.get("base_digest") != base_digest(model):
        raise UserError(f"{where} was fitted on another base ({scope.meta.get('base')}"
                        + (f", this one is {base}" if base else "") + "): its token states mean nothing here; "
                        "refit it on this base")
    d = model.get_input_embeddings().weight.shape[1]
    if scope.forget.shape[1] != d:
        raise UserError(f"{where} holds {scope.forget.shape[1]}-dimensional states but this base has {d}: "
                        "it was fitted on another base")
