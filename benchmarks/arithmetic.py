"""Time exact LoRA task arithmetic on adapters shaped like Llama-2-7B, against a dense SVD.

Adapters are random, r=16 on every linear layer of Llama-2-7B (32 layers; q, k, v, o: 4096 x 4096;
gate, up: 4096 -> 11008; down: 11008 -> 4096), A ~ N(0, 1/in), B ~ N(0, 0.1^2). The script times
negate, add (of two such adapters), extrapolate and compress (the add result, rank 32 -> 16),
then, on the first ``--dense-layers`` layers, the dense baseline: form dW (out x in) and take its
truncated ``torch.linalg.svd`` to the same rank. Both give the optimal rank-16 approximation
(Eckart-Young), so their relative Frobenius errors ||dW - dW_16|| / ||dW|| should agree to
rounding; the table shows the dense / ours time ratio and that error difference per module.

    .venv/bin/python benchmarks/arithmetic.py                         # full size, minutes
    nice -n 10 .venv/bin/python benchmarks/arithmetic.py --layers 4 --dense-modules q_proj down_proj  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from lora_unlearn.arithmetic import add, compress, extrapolate, negate, to_dense
from lora_unlearn.core.adapter import Adapter, LoraModule

HIDDEN, INTERMEDIATE = 4096, 11008
SHAPES = {  # module -> (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}


def random_adapter(layers: int, rank: int, alpha: float, dtype: torch.dtype, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i in range(layers):
        for suffix, (out, inp) in SHAPES.items():
            A = torch.randn(rank, inp, generator=g) / math.sqrt(inp)
            B = torch.randn(out, rank, generator=g) * 0.1
            modules[f"model.layers.{i}.{suffix}"] = LoraModule(A.to(dtype), B.to(dtype), alpha / rank)
    config = {"base_model_name_or_path": "meta-llama/Llama-2-7b-hf", "peft_type": "LORA", "r": rank,
              "lora_alpha": alpha, "target_modules": sorted(s.rsplit(".", 1)[-1] for s in SHAPES)}
    return Adapter(modules=modules, config=config, lineage={"op": "random", "seed": seed})


def best_of(repeats: int, fn):
    """(result, fastest wall time in seconds) over ``repeats`` calls."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, min(times)


def dense_truncated(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense baseline: factors (B, A) of dW's truncated SVD, from a full (thin) SVD of dW."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def rel_error(delta: torch.Tensor, approx: torch.Tensor) -> float:
    return float(torch.linalg.norm(delta - approx) / torch.linalg.norm(delta))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32, help="decoder layers (32 for Llama-2-7B)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of each input adapter")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--dense-layers", type=int, default=1,
                   help="layers for the dense SVD baseline (a 4096 x 11008 SVD takes tens of seconds)")
    p.add_argument("--dense-modules", nargs="+", choices=[s.split(".")[1] for s in SHAPES],
                   default=[s.split(".")[1] for s in SHAPES], help="module types for the dense baseline (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="time our operations this many times, keep the best")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("runs/bench/arithmetic.json"),
                   help="write the results here (the committed ones: benchmarks/results/arithmetic.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    r, k = args.rank, args.rank  # compress the add result (rank 2r) back to r

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads; python {platform.python_version()}")
    print(f"adapters: Llama-2-7B shapes, {args.layers} layers x {len(SHAPES)} modules, r={r}, {args.dtype}")
    t0 = time.perf_counter()
    a = random_adapter(args.layers, r, 2.0 * r, dtype, args.seed)
    b = random_adapter(args.layers, r, float(r), dtype, args.seed + 1)
    params = sum(m.A.numel() + m.B.numel() for m in a.modules.values())
    print(f"built two adapters of {params / 1e6:.1f} M parameters each in {time.perf_counter() - t0:.1f} s; "
          f"peak RSS {peak_rss_mib():.0f} MiB\n")

    ops = {}
    _, ops["negate"] = best_of(args.repeats, lambda: negate(a))
    summed, ops["add"] = best_of(args.repeats, lambda: add(a, b))
    _, ops["extrapolate"] = best_of(args.repeats, lambda: extrapolate(a, 0.5))
    (small, errors), ops[f"compress {2 * r}->{k}"] = best_of(args.repeats, lambda: compress(summed, k))
    n = len(a.modules)
    print(table([[op, f"{t * 1e3:.1f}", f"{t / n * 1e3:.3f}"] for op, t in ops.items()],
                ["operation (whole adapter)", "ms", "ms/module"]))
    print(f"compress relative error: mean {statistics.mean(errors.values()):.4f}, "
          f"max {max(errors.values()):.4f}; peak RSS {peak_rss_mib():.0f} MiB\n")

    rows, dense_rows = [], []
    for i in range(min(args.dense_layers, args.layers)):
        for suffix in [s for s in SHAPES if s.split(".")[1] in args.dense_modules]:
            name = f"model.layers.{i}.{suffix}"
            one = Adapter({name: summed.modules[name]}, summed.config)
            (ours, _), t_ours = best_of(args.repeats, lambda: compress(one, k))
            delta = to_dense(one)[name]  # float32 (out, in)

            def dense():
                B, A = dense_truncated(to_dense(one)[name], k)  # forming dW is part of the dense path
                return B @ A

            approx, t_dense = best_of(1, dense)
            print(f"  dense SVD of {name} {tuple(delta.shape)}: {t_dense:.1f} s", file=sys.stderr, flush=True)
            e_ours, e_dense = rel_error(delta, to_dense(ours)[name]), rel_error(delta, approx)
            rows.append([name, "x".join(map(str, delta.shape)), f"{t_ours * 1e3:.1f}", f"{t_dense:.2f}",
                         f"{t_dense / t_ours:.0f}x", f"{e_ours:.6f}", f"{e_dense:.6f}", f"{e_ours - e_dense:+.1e}"])
            dense_rows.append({"module": name, "ours_s": t_ours, "dense_s": t_dense,
                               "ours_error": e_ours, "dense_error": e_dense})
            del delta, approx
    if rows:
        print(f"\ndense SVD baseline (float32 dW, torch.linalg.svd, truncated to rank {k}) "
              f"on {min(args.dense_layers, args.layers)} layer(s):")
        print(table(rows, ["module", "out x in", "ours ms", "dense s", "dense/ours",
                           "ours rel err", "dense rel err", "difference"]))
        total_ours = sum(d["ours_s"] for d in dense_rows)
        total_dense = sum(d["dense_s"] for d in dense_rows)
        print(f"total over these modules: ours {total_ours * 1e3:.1f} ms, dense {total_dense:.1f} s "
              f"({total_dense / total_ours:.0f}x); max |error difference| "
              f"{max(abs(d['ours_error'] - d['dense_error']) for d in dense_rows):.1e}")
    print(f"peak RSS {peak_rss_mib():.0f} MiB")

    result = {"layers": args.layers, "rank": r, "dtype": args.dtype, "threads": torch.get_num_threads(),
              "ops_s": ops, "dense": dense_rows, "peak_rss_mib": peak_rss_mib()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
