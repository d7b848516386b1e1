"""Adapter folders: read and write PEFT LoRA folders as :class:`~lora_unlearn.core.adapter.Adapter` tensors.

Beside the PEFT files this library writes ``lora_unlearn.json``: the adapter's lineage, a tree
of the operations that made it (parameters, base model, quantization, sha256 of every input
adapter, a fingerprint of the training data), and ``README.md``, the model card rendered from
that lineage (:mod:`lora_unlearn.core.card`). PEFT ignores both; the lineage is read back on load.

Only safetensors weights are read by default: unpickling ``adapter_model.bin`` can run code.
``allow_pickle=True`` (or :func:`lora_unlearn.core.fsutil.pickle_allowed`, the CLI's
``--allow-pickle``) reads such a file with ``torch.load(weights_only=True)``, which restores
tensors and plain containers only. Everything else that is wrong with a folder is a
:class:`~lora_unlearn.errors.UserError` naming the problem (docs/bad_inputs.md lists them).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import UserError
from .adapter import (
    CONFIG_NAME,
    LINEAGE_NAME,
    PICKLE_NAME,
    PREFIX,
    WEIGHTS_NAME,
    Adapter,
    LoraModule,
    _pattern_value,
    input_paths,
    module_scaling,
    peft_config,
    peft_state_dict,
)
from .card import save_card
from .fsutil import atomic_dir, is_leftover_name, pickle_is_allowed, recover, sha256_file

_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")
_MODULE_PATH = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")  # what PyTorch module paths look like
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The fields of PEFT 0.21's LoraConfig (PeftConfig's included). A key outside this set whose
# value is set (not null, false or empty) might change what the adapter computes: refused.
KNOWN_CONFIG_KEYS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "trainable_token_indices",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "use_dora", "velora_config",
    "alora_invocation_tokens", "use_qalora", "qalora_group_size", "monteclora_config", "layer_replication",
    "runtime_config", "lora_bias", "target_parameters", "use_bdlora", "arrow_config", "kasa_config",
    "ensure_weight_tying",
})
# Options that, when set, make the adapter something other than dW = s * B @ A on linear layers.
UNSUPPORTED_OPTIONS = {
    "use_dora": "uses DoRA (its magnitude vector is not a low-rank delta)",
    "lora_bias": "has a LoRA bias",
    "modules_to_save": "has modules_to_save (full copies of layers)",
    "trainable_token_indices": "trains token embeddings (trainable_token_indices)",
    "alora_invocation_tokens": "is an activated LoRA (its delta applies only after invocation tokens)",
    "use_qalora": "uses QALoRA (A acts on pooled inputs)",
    "layer_replication": "replicates base layers (layer_replication)",
    "target_parameters": "targets parameters rather than linear layers (target_parameters)",
    "use_bdlora": "uses block-diagonal LoRA (use_bdlora)",
    "arrow_config": "routes between adapters (arrow_config)",
    "kasa_config": "uses KaSA (it truncates the base weights)",
    "monteclora_config": "uses MonteCLoRA (sampled weights)",
    "megatron_config": "uses Megatron parallel layers",
}
# init_lora_weights after which the base weights themselves were changed (PiSSA/OLoRA/CorDA/
# LoRA-GA subtract the initial B @ A from W; LoftQ re-quantizes W).
BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_regex(key: Any) -> bool:
    try:
        re.compile(rf"(.*\.)?({key})$")
    except (re.error, TypeError, RecursionError, OverflowError):
        return False
    return True


def check_numbers(config: dict[str, Any], where: str | Path) -> None:
    """UserError unless r, lora_alpha, use_rslora, the patterns and target_modules are well-typed."""
    r = config.get("r")
    if r is None:
        raise UserError(f"{where}: the config has no 'r' (the LoRA rank): the adapter folder is incomplete")
    if not _is_rank(r):
        raise UserError(f"{where}: the config's r must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha", 8)
    if not _is_number(alpha):
        raise UserError(f"{where}: the config's lora_alpha must be a finite number, got {alpha!r}")
    if config.get("use_rslora") not in (None, True, False):
        raise UserError(f"{where}: the config's use_rslora must be true or false, got {config['use_rslora']!r}")
    for key, valid, what in (("rank_pattern", _is_rank, "a positive integer"),
                             ("alpha_pattern", _is_number, "a finite number")):
        pattern = config.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise UserError(f"{where}: the config's {key} must be an object {{module pattern: value}}, "
                            f"got {pattern!r:.80}")
        for k, v in pattern.items():
            if not _is_regex(k):
                raise UserError(f"{where}: {key} key {k!r:.80} is not a valid regular expression")
            if not valid(v):
                raise UserError(f"{where}: {key}[{k!r:.80}] must be {what}, got {v!r:.80}")
    targets = config.get("target_modules")
    if not (targets is None or (isinstance(targets, str) and _is_regex(targets))
            or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise UserError(f"{where}: the config's target_modules must be a list of module names or a regular "
                        f"expression, got {targets!r:.80}")


def _refuse_unsupported(config: dict[str, Any], where: Path) -> None:
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise UserError(f"{where} is a {config.get('peft_type')} adapter; only LoRA adapters are supported")
    plain = ("task arithmetic here needs a plain LoRA adapter (bias='none', no DoRA, no modules_to_save); "
             "retrain it without that option")
    if config.get("bias", "none") not in ("none", None):
        raise UserError(f"{where} trains biases (bias={config.get('bias')!r}): {plain}")
    for key, what in UNSUPPORTED_OPTIONS.items():
        if config.get(key):
            raise UserError(f"{where} {what}: {plain}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise UserError(f"{where} was initialised with init_lora_weights={init!r}, which also changes the base "
                        "weights, so its delta is only valid on that changed base: convert it to a plain LoRA "
                        "with PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...)) first")
    for key, value in config.items():
        if key not in KNOWN_CONFIG_KEYS and value not in (None, False, "", [], {}):
            raise UserError(f"{where}: unknown config key {key!r} (= {value!r:.60}) may change what the adapter "
                            "computes (known: PEFT 0.21 LoRA options); remove it from adapter_config.json "
                            "if it does not")


def modules_from_tensors(tensors: dict[str, torch.Tensor], config: dict[str, Any],
                         where: str | Path = "adapter") -> dict[str, LoraModule]:
    """Validate PEFT-format LoRA tensors (``...<module>.lora_A.weight``) and pair them per module.

    Checked (each a UserError): key names, module paths, both factors present, 2-D float16/
    bfloat16/float32/float64 tensors (A and B may differ in dtype), no empty dimension,
    A (r, in) and B (out, r) of one rank r equal to the config's (``rank_pattern`` included),
    finite weights and a finite scaling.
    """
    check_numbers(config, where)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise UserError(f"{where} holds {key!r:.120}, which is not a LoRA A/B weight of a linear layer; "
                            "only plain LoRA on linear layers is supported")
        name = m["module"].removeprefix(PREFIX)
        if not _MODULE_PATH.match(name):
            raise UserError(f"{where} holds {key!r:.120}: {name!r:.80} is not a module path "
                            "(names of letters, digits, '_' and '-' joined by dots)")
        if not isinstance(t, torch.Tensor):
            raise UserError(f"{where}: {key!r:.120} is a {type(t).__name__}, not a tensor")
        if m["factor"] in factors.get(name, {}):
            raise UserError(f"{where}: module {name} has two lora_{m['factor']} weights (with and without "
                            f"the {PREFIX!r} prefix): keep one")
        factors.setdefault(name, {})[m["factor"]] = t
    if not factors:
        raise UserError(f"{where} holds no LoRA weights")

    rank_pattern = config.get("rank_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    modules = {}
    for name, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            raise UserError(f"{where}: module {name} has lora_{''.join(ab)} but not its partner factor")
        A, B = ab["A"], ab["B"]
        if A.ndim != 2 or B.ndim != 2:
            raise UserError(f"{where}: module {name} has inconsistent shapes A {tuple(A.shape)}, "
                            f"B {tuple(B.shape)} (expected A (r, in), B (out, r))")
        if A.dtype not in DTYPES or B.dtype not in DTYPES:
            raise UserError(f"{where}: module {name} has non-float weights ({A.dtype}, {B.dtype}); LoRA "
                            "weights must be float16, bfloat16, float32 or float64")
        if A.shape[0] == 0 or B.shape[1] == 0:
            raise UserError(f"{where}: module {name} has rank 0")
        if 0 in A.shape or 0 in B.shape:
            raise UserError(f"{where}: module {name} has an empty dimension "
                            f"(A {tuple(A.shape)}, B {tuple(B.shape)})")
        if A.shape[0] != B.shape[1]:
            raise UserError(f"{where}: module {name} has inconsistent shapes A {tuple(A.shape)}, "
                            f"B {tuple(B.shape)} (expected A (r, in), B (out, r))")
        rank = _pattern_value(rank_pattern, name, config.get("r"))
        if rank != A.shape[0]:
            raise UserError(f"{where}: module {name} has rank {A.shape[0]} but the config says {rank}")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise UserError(f"{where}: module {name} has NaN or infinite weights: the adapter is broken "
                            "(a diverged training run, or a scale factor that overflowed)")
        s = module_scaling(config, name, rank)
        if not (math.isfinite(s) and math.isfinite(s * (math.sqrt(rank) if rslora else rank))):
            raise UserError(f"{where}: scaling of {name} is not a finite number "
                            f"(lora_alpha={config.get('lora_alpha')}): fix lora_alpha in the config")
        modules[name] = LoraModule(A=A, B=B, scaling=s)

    return modules


def _read_weights(path: Path, allow_pickle: bool) -> tuple[dict[str, Any], Path]:
    weights_file, pickle_file = path / WEIGHTS_NAME, path / PICKLE_NAME
    if weights_file.is_file():
        try:
            return load_file(weights_file), weights_file
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as e:
            reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"{weights_file} cannot be read as safetensors ({reason}): "
                            "the file is corrupt or truncated") from None
    if not pickle_file.is_file():
        raise UserError(f"{path} has no {WEIGHTS_NAME}")
    if not pickle_is_allowed(allow_pickle):
        raise UserError(f"{path} holds pickle weights ({PICKLE_NAME}), which are not loaded because unpickling "
                        "can run code: convert them to safetensors with PEFT, or pass --allow-pickle "
                        "(allow_pickle=True) if you trust the file")
    try:
        tensors = torch.load(pickle_file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an untrusted pickle fails in many ways, each a bad file
        raise UserError(f"{pickle_file} cannot be read with torch.load(weights_only=True) ({type(e).__name__}): "
                        "it is corrupt or holds more than tensors") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) for k in tensors):
        raise UserError(f"{pickle_file} holds a {type(tensors).__name__}, not a dict of named tensors")
    warnings.warn(f"read pickle weights {pickle_file} with torch.load(weights_only=True) "
                  "(allowed by --allow-pickle / allow_pickle=True)", UserWarning, stacklevel=3)
    return tensors, pickle_file


def load_adapter(path: str | Path, allow_pickle: bool = False) -> Adapter:
    """Read and validate a PEFT LoRA adapter folder (local) as tensors.

    Weights come from ``adapter_model.safetensors``. A folder with only ``adapter_model.bin``
    is refused unless ``allow_pickle`` (or inside :func:`pickle_allowed`): then the file is read
    with ``torch.load(weights_only=True)``, a UserWarning says so, and the lineage records
    ``"format": "pickle"``. A temporary folder of an interrupted write (``.NAME.tmp-...``) is
    refused; a missing folder whose killed writer left the previous version aside is restored
    first (:func:`lora_unlearn.core.fsutil.recover`). Anything wrong is a UserError naming it.
    """
    path = Path(path)
    if is_leftover_name(path.name):
        raise UserError(f"{path} is a temporary folder of an interrupted or running write, not an adapter: "
                        "load the output folder itself")
    if not path.exists() and not recover(path, clean=False):
        raise UserError(f"adapter folder {path} does not exist: give the folder holding {CONFIG_NAME}")
    if not path.is_dir():
        raise UserError(f"{path} is a file, not an adapter folder: give the folder holding {CONFIG_NAME}")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise UserError(f"{path} has no {CONFIG_NAME}: is it a PEFT adapter folder?")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        config = None
    if not isinstance(config, dict):
        raise UserError(f"{cfg_file} is not a JSON object: the adapter folder is corrupt")
    _refuse_unsupported(config, path)
    check_numbers(config, cfg_file)
    tensors, weights_file = _read_weights(path, allow_pickle)

    modules = modules_from_tensors(tensors, config, weights_file)

    stored = None
    if (path / LINEAGE_NAME).is_file():
        try:
            stored = json.loads((path / LINEAGE_NAME).read_text(encoding="utf-8")).get("lineage")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, RecursionError, OSError):
            stored = None
    lineage = {"op": "load", "path": str(path), "sha256": sha256_file(weights_file), "made_by": stored}
    if weights_file.name == PICKLE_NAME:
        lineage["format"] = "pickle"
    return Adapter(modules=modules, config=config, lineage=lineage)


def save_adapter(adapter: Adapter, out: str | Path, overwrite: bool = False,
                 extra_files: dict[str, str] | None = None) -> Path:
    """Write ``adapter`` as a PEFT folder (atomically: all of it or nothing) and return ``out``.

    The adapter is validated as :func:`load_adapter` would read it back (an adapter whose
    weights overflowed to inf is refused, not written). ``out`` may not be, contain or lie
    inside a folder one of its inputs was loaded from. Crash safety: see
    :func:`lora_unlearn.core.fsutil.atomic_dir`.
    """
    tensors = peft_state_dict(adapter)
    config = peft_config(adapter)
    modules_from_tensors(tensors, config, f"adapter to be written to {out}")
    with atomic_dir(out, overwrite=overwrite, inputs=input_paths(adapter.lineage)) as tmp:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        record = {"lora_unlearn_version": __version__, "lineage": adapter.lineage}
        (tmp / LINEAGE_NAME).write_text(json.dumps(record, indent=2))
        save_card(tmp, adapter, name=Path(out).name)  # the model card (README.md), from the same lineage
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    return Path(out)
