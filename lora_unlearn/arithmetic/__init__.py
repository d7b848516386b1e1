"""Task arithmetic on LoRA adapters, pure: adapters in, adapters out (DESIGN sections 2 and 3).

    ops      scale, negate, extrapolate (UIPE), add (exact, canonical factors), compress, to_dense
    perta    PerTA's per-parameter rescaling, in B space or dense, and the dense result's compression

Importing this package loads torch and safetensors only, never transformers or peft (a test
checks). Importance maps run the model, so they live in :mod:`lora_unlearn.training.importance`;
merging a dense delta into a base is :mod:`lora_unlearn.hub.merge`.
"""

from .ops import add, compress, extrapolate, negate, scale, to_dense

__all__ = ["add", "compress", "extrapolate", "negate", "scale", "to_dense"]
