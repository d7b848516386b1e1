"""Small things built in memory for the tests: random LoRA adapters and a tiny Llama (no downloads)."""

from __future__ import annotations

import math

import torch

from lora_unlearn.core.adapter import Adapter, LoraModule

BASE = "tiny/llama"
LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(specs: dict[str, tuple[int, int, int]], alpha: float = 8.0, rslora: bool = False,
                 seed: int = 0, dtype: torch.dtype = torch.float32, base: str = BASE) -> Adapter:
    """An adapter with ``specs[name] = (out, in, r)``; A ~ N(0, 1/in), B ~ N(0, 1).

    Scaling s = alpha / r (alpha / sqrt(r) with rsLoRA), computed here, not by the library.
    """
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, (out, inp, r) in specs.items():
        A = torch.randn(r, inp, generator=g, dtype=torch.float64) / math.sqrt(inp)
        B = torch.randn(out, r, generator=g, dtype=torch.float64)
        s = alpha / math.sqrt(r) if rslora else alpha / r
        modules[name] = LoraModule(A.to(dtype), B.to(dtype), s)
    config = {"base_model_name_or_path": base, "lora_alpha": alpha, "use_rslora": rslora,
              "target_modules": sorted({n.rsplit(".", 1)[-1] for n in specs})}
    return Adapter(modules=modules, config=config, lineage={"op": "test", "seed": seed})


def dw(m: LoraModule) -> torch.Tensor:
    """A module's product s * B @ A in float64, computed here (not by the library)."""
    return m.scaling * (m.B.double() @ m.A.double())


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    """Relative Frobenius closeness (float32 factors give ~1e-7 relative error)."""
    err = torch.linalg.norm(got.double() - want.double())
    assert err <= rtol * torch.linalg.norm(want.double()) + 1e-12, f"|got - want| = {err:.3g}"


def tiny_llama(seed: int = 0):
    """A float32 LlamaForCausalLM: hidden 32, intermediate 64, 2 layers, 4 heads (2 kv), vocab 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(torch.float32).eval()
