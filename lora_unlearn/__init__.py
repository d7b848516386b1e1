"""lora_unlearn: unlearning and knowledge updates as LoRA adapters on a 4-bit base.

The arithmetic and adapter I/O import only torch and safetensors; the rest (models, training,
generation) is imported on first use, so ``import lora_unlearn.arithmetic`` stays light.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "Adapter": "adapter", "LoraModule": "adapter", "load_adapter": "adapter", "save_adapter": "adapter",
    "scale": "arithmetic", "negate": "arithmetic", "add": "arithmetic", "extrapolate": "arithmetic",
    "compress": "arithmetic", "to_dense": "arithmetic",
    "UserError": "errors",
    "load_base": "models",
    "ForgetRuntime": "runtime", "load_model": "loading", "hotswap": "loading", "LoadReport": "loading",
    "load_qa": "data", "load_texts": "data",
    "TrainConfig": "train", "learn": "train",
    "answer": "inference", "answer_probability": "inference", "attached": "stack",
    "evaluate_tofu": "evaluate.tofu", "evaluate_edits": "evaluate.edits", "select_run": "select",
    "write_card": "cards", "push": "cards", "export_merged": "export", "export_servable": "export",
    "create_app": "server",
}
__all__ = [*sorted(_LAZY), "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lora_unlearn' has no attribute {name!r}")
