"""Peak memory and speed of training a forget adapter over an nf4 base vs a float32 base, and what fits 24 GB.

Part 1, measured: each configuration runs in its own child process (10 optimizer steps of NLL,
LoRA r=8 on all linear layers, batch 8, TOFU-mini forget01, the embedded SmolLM2-135M); peak
RSS is the child's ``ru_maxrss`` (``os.wait4``), on CUDA also ``torch.cuda.max_memory_allocated``.
Tokens/s counts the answer-and-prompt tokens trained on (padding excluded).

Part 2, a worked estimate for Llama-shaped 1B / 7B / 70B models, built from measured costs:
bytes per base parameter in nf4 (packed weights + quantization state, read off the loaded
model), bytes per trainable adapter parameter (weight + gradient + AdamW moments, read off a
real optimizer step), and activation bytes per token per layer and per token for the LM head
(every tensor autograd saves for backward, counted with ``saved_tensors_hooks`` on small random
Llama blocks in bfloat16, the GPU compute dtype, then fitted linearly in hidden size,
intermediate size, KV width and heads; the fit's residual is reported).

CPU caveat: RSS includes the Python/torch runtime (reported separately as "runtime"), and on
CPU bitsandbytes dequantizes each nf4 weight per layer during the matmul, so nf4 is slower there
than float32; the nf4 saving in RSS is the base weights only. On a GPU the same code reports
``max_memory_allocated``, which excludes the runtime.

    .venv/bin/python benchmarks/memory.py            # about 2 minutes on 2 CPU cores
    .venv/bin/python benchmarks/memory.py --quick    # 3 steps, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9
# Llama-shaped models (public configs): hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings.
SHAPES = {
    "1B (Llama-3.2-1B)": (2048, 8192, 16, 32, 8, 128256, True),
    "7B (Llama-2-7B)": (4096, 11008, 32, 32, 32, 32000, False),
    "70B (Llama-3-70B)": (8192, 28672, 80, 64, 8, 128256, False),
}
BUDGET_GB = 24.0
CUDA_CONTEXT_GB = 1.0  # CUDA context + allocator slack, kept free when sizing the batch
BATCH, LENGTH, RANK = 8, 512, 8  # the batch x length the estimate states (no gradient checkpointing)


# ---- part 1: one training run per child process ------------------------------------------------

def _reset_peak() -> bool:
    """Reset this process's peak RSS (Linux: VmHWM via clear_refs), so a later peak covers training only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mib() -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def child(quantization: str, steps: int, threads: int, out: Path) -> None:
    import psutil
    import torch

    torch.set_num_threads(threads)

    from lora_unlearn.core.data import to_dataset
    from lora_unlearn.core.models import load_base
    from lora_unlearn.training.sources import load_source
    from lora_unlearn.training.trainer import TrainConfig, train_adapter

    proc = psutil.Process()
    runtime = proc.memory_info().rss
    model, tok, info = load_base("smollm2-135m", quantization)
    loaded = proc.memory_info().rss
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) + _quant_state_bytes(model)
    rows = load_source("tofu-mini:forget01")
    config = TrainConfig(r=RANK, lora_alpha=2.0 * RANK, batch_size=8, max_steps=steps, max_length=256)
    lengths = [len(x) for x in to_dataset(tok, rows, config.max_length)["input_ids"]]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset = _reset_peak()
    start = time.perf_counter()
    train_adapter(model, tok, rows, config, base_info=info, progress=False)
    seconds = time.perf_counter() - start
    train_peak = _peak_mib() if reset else None
    tokens = steps * config.batch_size * sum(lengths) / len(lengths)
    result = {"quantization": quantization, "steps": steps, "batch_size": config.batch_size, "rows": len(rows),
              "runtime_rss_mib": runtime / 2**20, "after_load_rss_mib": loaded / 2**20, "train_peak_rss_mib": train_peak,
              "base_weight_mib": weights / 2**20, "train_seconds": seconds, "tokens": tokens,
              "tokens_per_second": tokens / seconds, "threads": torch.get_num_threads()}
    if cuda:
        result["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    out.write_text(json.dumps(result))


def _quant_state_bytes(model) -> int:
    """Bytes of bitsandbytes quantization state (absmax, code, nested state) not held as parameters."""
    total = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        for t in (state.absmax, state.code, getattr(state, "offset", None)):
            total += t.numel() * t.element_size() if hasattr(t, "numel") else 0
        nested = getattr(state, "state2", None)
        if nested is not None:
            total += sum(t.numel() * t.element_size() for t in (nested.absmax, nested.code))
    return total


def run_child(quantization: str, steps: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="lora_unlearn-memory-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", quantization, "--steps", str(steps), "--threads", str(threads),
               "--child-out", str(out)]
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            raise SystemExit(f"{quantization} run failed:\n{proc.stderr.read()[-2000:]}")
        result = json.loads(out.read_text())
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    return result


# ---- part 2: measured per-parameter and per-token costs ----------------------------------------

def nf4_bytes_per_parameter() -> dict:
    """Packed 4-bit weights + quantization state per quantized parameter, read off the loaded embedded model."""
    import bitsandbytes as bnb

    from lora_unlearn.core.models import load_base

    model, _, _ = load_base("smollm2-135m", "nf4")
    params = stored = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            params += module.weight.quant_state.shape.numel()
            stored += module.weight.numel() * module.weight.element_size()
    state = _quant_state_bytes(model)
    return {"quantized_parameters": params, "packed_bytes": stored, "quant_state_bytes": state,
            "bytes_per_parameter": (stored + state) / params, "blocksize": 64, "double_quant": False}


def _tiny(h: int, i: int, heads: int, kv: int, vocab: int, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=2, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=512,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def saved_bytes(h: int, i: int, heads: int, kv: int, vocab: int, tokens: int = 256) -> tuple[float, float, float]:
    """(activation bytes per token per layer, per token outside the layers, adapter bytes per trainable param).

    One training step (NLL objective, LoRA r=8 on all linear layers, AdamW) on a 2-layer random
    Llama in bfloat16: every tensor saved for backward is counted once (by storage), parameters
    excluded, and attributed to a decoder layer or to the rest (embedding, final norm, LM head, loss).
    """
    import torch
    from peft import LoraConfig

    from lora_unlearn.core.stack import attached
    from lora_unlearn.training import objectives

    model = _tiny(h, i, heads, kv, vocab, torch.bfloat16)
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", task_type="CAUSAL_LM")
    batch, length = 2, tokens // 2
    ids = torch.randint(0, vocab, (batch, length))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    counts = {"layer": 0, "rest": 0}
    seen: set[int] = set()
    where = ["rest"]
    with attached(model, [], trainable=lora) as peft_model:
        params = {p.untyped_storage().data_ptr() for p in peft_model.parameters()}
        layers = peft_model.base_model.model.model.layers
        for layer in layers:
            layer.register_forward_pre_hook(lambda *_: where.__setitem__(0, "layer"))
            layer.register_forward_hook(lambda *_: where.__setitem__(0, "rest"))

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and ptr not in seen:
                seen.add(ptr)
                counts[where[0]] += t.untyped_storage().nbytes()
            return t

        peft_model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = objectives.get("nll").loss(peft_model, {"train": inputs})
        loss.backward()
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        optimizer.step()
        n = sum(p.numel() for p in trainable)
        adapter = sum(p.numel() * p.element_size() + p.grad.numel() * p.grad.element_size() for p in trainable)
        adapter += sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                       if torch.is_tensor(v) and v.dim() > 0)
    return counts["layer"] / (batch * length * len(layers)), counts["rest"] / (batch * length), adapter / n


def activation_fit(quick: bool) -> dict:
    """Least-squares fit of saved bytes per token: per layer ~ a*h + b*i + c*kv_dim + d*heads; head ~ e*vocab + f*h."""
    import numpy as np

    configs = [(128, 256, 4, 2, 256), (128, 512, 4, 4, 512), (256, 512, 8, 2, 384), (256, 1024, 8, 8, 256),
               (384, 768, 6, 3, 768), (192, 640, 6, 6, 640)]
    configs = configs[:5] if quick else configs
    rows, layer, rest, adapter = [], [], [], []
    for h, i, heads, kv, vocab in configs:
        per_layer, per_token, per_param = saved_bytes(h, i, heads, kv, vocab)
        rows.append((h, i, kv * h // heads, heads, vocab))
        layer.append(per_layer), rest.append(per_token), adapter.append(per_param)
    X = np.array([[h, i, kvd, heads] for h, i, kvd, heads, _ in rows], float)
    coef, *_ = np.linalg.lstsq(X, np.array(layer), rcond=None)
    Xh = np.array([[vocab, h] for h, _, _, _, vocab in rows], float)
    coef_h, *_ = np.linalg.lstsq(Xh, np.array(rest), rcond=None)
    residual = max(abs(X @ coef - layer) / np.array(layer))
    residual_h = max(abs(Xh @ coef_h - rest) / np.array(rest))
    return {"per_layer_coefficients": dict(zip(["hidden", "intermediate", "kv_dim", "heads"], coef.round(4).tolist())),
            "per_layer_max_relative_residual": float(residual),
            "head_coefficients": dict(zip(["vocab", "hidden"], coef_h.round(4).tolist())),
            "head_max_relative_residual": float(residual_h),
            "adapter_bytes_per_trainable_parameter": float(np.mean(adapter)),
            "configs": [dict(zip(["hidden", "intermediate", "kv_dim", "heads", "vocab"], r)) for r in rows],
            "dtype": "bfloat16 (LoRA weights float32, as PEFT keeps them)", "tokens_per_probe": 256}


def estimate(nf4: dict, fit: dict) -> dict:
    """Base + adapter + optimizer + activations (BATCH x LENGTH tokens) for each Llama shape, in GB."""
    out = {}
    a = fit["per_layer_coefficients"]
    hc = fit["head_coefficients"]
    for name, (h, i, layers, heads, kv, vocab, tied) in SHAPES.items():
        kvd = kv * h // heads
        linear = layers * (2 * h * h + 2 * h * kvd + 3 * h * i)  # q, o, k, v, gate, up, down
        other = vocab * h * (1 if tied else 2) + layers * 2 * h + h  # embeddings (+ LM head), norms: kept bf16
        adapter_params = layers * RANK * ((h + h) * 2 + (h + kvd) * 2 + (h + i) * 3)
        tokens = BATCH * LENGTH
        per_token_layer = a["hidden"] * h + a["intermediate"] * i + a["kv_dim"] * kvd + a["heads"] * heads
        activations = tokens * (layers * per_token_layer + hc["vocab"] * vocab + hc["hidden"] * h)
        base_nf4 = linear * nf4["bytes_per_parameter"] + other * 2
        base_bf16 = (linear + other) * 2
        adapter = adapter_params * fit["adapter_bytes_per_trainable_parameter"]
        total_nf4 = base_nf4 + adapter + activations
        room = (BUDGET_GB - CUDA_CONTEXT_GB) * GB - base_nf4 - adapter  # what is left for activations
        out[name] = {"parameters_b": (linear + other) / 1e9, "adapter_parameters_m": adapter_params / 1e6,
                     "base_nf4_gb": base_nf4 / GB, "base_bf16_gb": base_bf16 / GB, "adapter_and_adamw_gb": adapter / GB,
                     "activations_gb": activations / GB, "total_nf4_gb": total_nf4 / GB,
                     "total_bf16_gb": (base_bf16 + adapter + activations) / GB,
                     "fits_24gb_nf4": total_nf4 / GB < BUDGET_GB,
                     "fits_24gb_nf4_without_activations": (base_nf4 + adapter) / GB < BUDGET_GB,
                     "tokens_per_step_fitting_24gb_nf4": max(0, int(room / (activations / tokens)))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 training steps and 5 probe shapes instead of 10 and 6")
    ap.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "memory.json")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per training run (default 1: stable on a shared machine)")
    ap.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["nf4", "none"], help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    steps = args.steps or (3 if args.quick else 10)
    if args.child:
        return child(args.child, steps, args.threads, args.child_out)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    runs = {}
    for quantization in ("nf4", "none"):
        with console.status(f"training {steps} steps over a {quantization} base (child process)"):
            runs[quantization] = run_child(quantization, steps, args.threads)
    with console.status("measuring per-parameter and per-token costs"):
        nf4 = nf4_bytes_per_parameter()
        fit = activation_fit(args.quick)
    llama = estimate(nf4, fit)

    table = Table("base", "peak RSS MiB", "peak while training", "runtime MiB", "after load", "base weights MiB",
                  "tokens/s", title=f"training a forget adapter, {steps} steps, batch 8, r={RANK}, embedded SmolLM2-135M, "
                                    f"CPU, {args.threads} thread(s)")
    for q, r in runs.items():
        table.add_row(q, f"{r['peak_rss_mib']:.0f}", f"{r['train_peak_rss_mib'] or float('nan'):.0f}",
                      f"{r['runtime_rss_mib']:.0f}", f"{r['after_load_rss_mib']:.0f}", f"{r['base_weight_mib']:.0f}",
                      f"{r['tokens_per_second']:.1f}")
    console.print(table)
    nf, fp = runs["nf4"], runs["none"]
    ratio = {"peak_rss": nf["peak_rss_mib"] / fp["peak_rss_mib"],
             "peak_minus_runtime": (nf["peak_rss_mib"] - nf["runtime_rss_mib"]) / (fp["peak_rss_mib"] - fp["runtime_rss_mib"]),
             "base_weights": nf["base_weight_mib"] / fp["base_weight_mib"],
             "tokens_per_second": nf["tokens_per_second"] / fp["tokens_per_second"]}
    if nf["train_peak_rss_mib"] and fp["train_peak_rss_mib"]:
        ratio["train_peak_rss"] = nf["train_peak_rss_mib"] / fp["train_peak_rss_mib"]
    if "cuda_max_allocated_mib" in nf:
        ratio["cuda_max_allocated"] = nf["cuda_max_allocated_mib"] / fp["cuda_max_allocated_mib"]
    console.print("nf4 / float32: " + ", ".join(f"{k} {v:.2f}" for k, v in ratio.items()))
    console.print(f"measured: nf4 {nf4['bytes_per_parameter']:.4f} B per quantized parameter "
                  f"(blocksize 64, no double quant); adapter {fit['adapter_bytes_per_trainable_parameter']:.1f} B per "
                  f"trainable parameter; activation fit residual {fit['per_layer_max_relative_residual']:.1e} (layers), "
                  f"{fit['head_max_relative_residual']:.1e} (head)")

    table = Table("model", "params B", "adapter M", "base nf4", "base bf16", "adapter+AdamW", f"act. {BATCH}x{LENGTH}",
                  "total nf4", "total bf16", "fits 24 GB (nf4)", "tokens/step on 24 GB",
                  title="estimate in GB (1e9 bytes), no gradient checkpointing")
    for name, e in llama.items():
        fits = "yes" if e["fits_24gb_nf4"] else ("weights only" if e["fits_24gb_nf4_without_activations"] else "no")
        table.add_row(name, f"{e['parameters_b']:.2f}", f"{e['adapter_parameters_m']:.1f}", f"{e['base_nf4_gb']:.2f}",
                      f"{e['base_bf16_gb']:.2f}", f"{e['adapter_and_adamw_gb']:.2f}", f"{e['activations_gb']:.2f}",
                      f"{e['total_nf4_gb']:.2f}", f"{e['total_bf16_gb']:.2f}", fits,
                      str(e["tokens_per_step_fitting_24gb_nf4"]))
    console.print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "quick": args.quick, "steps": steps, "threads": args.threads, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
        "device": "cuda" if "cuda_max_allocated_mib" in runs["nf4"] else "cpu", "runs": runs, "ratio_nf4_over_float32": ratio,
        "nf4": nf4, "activation_fit": fit, "estimate": {"batch": BATCH, "length": LENGTH, "rank": RANK, "budget_gb": BUDGET_GB,
                                                        "cuda_context_gb": CUDA_CONTEXT_GB, "models": llama},
        "caveat": "CPU: RSS includes the Python/torch runtime; bitsandbytes dequantizes each nf4 weight per layer on CPU. "
                  "Estimates exclude the CUDA context (~0.5-1 GB) and allocator fragmentation."}, indent=2))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
