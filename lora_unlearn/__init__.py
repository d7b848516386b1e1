"""lora_unlearn: unlearning and knowledge updates as LoRA adapters on a 4-bit base.

The package is laid out in wings (docs/architecture.md): ``core`` (adapters, bases, data,
answer probabilities), ``arithmetic`` (pure task arithmetic), ``training``, ``serving``,
``evaluate`` and ``hub``. The public API below is imported on first use, so
``import lora_unlearn.arithmetic`` stays light (torch and safetensors only).
"""

from importlib import import_module

from .quiet import quiet_known_messages

__version__ = "0.1.0"
quiet_known_messages()  # known-harmless library messages only (lora_unlearn.quiet; LORA_UNLEARN_VERBOSE=1 shows them)

_LAZY = {
    "Adapter": "core.adapter", "LoraModule": "core.adapter",
    "load_adapter": "core.adapter_io", "save_adapter": "core.adapter_io",
    "scale": "arithmetic", "negate": "arithmetic", "add": "arithmetic", "extrapolate": "arithmetic",
    "compress": "arithmetic", "to_dense": "arithmetic",
    "UserError": "errors",
    "load_base": "core.models", "load_qa": "core.data", "load_texts": "core.data",
    "answer": "core.inference", "answer_probability": "core.inference", "attached": "core.stack",
    "TrainConfig": "training.trainer", "learn": "training.learn", "select_run": "training.select",
    "ForgetRuntime": "serving.runtime", "load_model": "serving.loading", "hotswap": "serving.loading",
    "LoadReport": "serving.loading", "create_app": "serving.app",
    "evaluate_tofu": "evaluate.tofu", "evaluate_edits": "evaluate.edits",
    "write_card": "hub.cards", "push": "hub.push", "export_merged": "hub.export", "export_servable": "hub.export",
}
__all__ = [*sorted(_LAZY), "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lora_unlearn' has no attribute {name!r}")
