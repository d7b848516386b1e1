"""What toggling a forget adapter per request costs, on the embedded model in nf4 (DESIGN section 5).

(1) Switching forgetting on/off: ``ForgetRuntime.set_coefficients`` (a batch of 8 rows) against
    PEFT's ``set_adapter``, ``disable_adapter()`` (enter + exit) and ``merge_adapter`` +
    ``unmerge_adapter`` on the same model with the same adapter; ratios against ``set_adapter``.
(2) A batch of 8 rows with mixed forget settings (4 forgetting, 4 not): forward and a short greedy
    generate, for the base alone, ForgetRuntime's mixed batch (and all 8 rows off, where it skips
    the low-rank path) and PEFT's mixed-batch path (``adapter_names=``); ratios against the base.

The forget adapter is random, not trained: r=8, alpha=16 on all seven linear layers of all 30
blocks (what ``lora-unlearn learn`` makes), A ~ U(+-1/sqrt(in)) as PEFT initialises it and B ~
N(0, b_std), then negated. Costs do not depend on the values; the merge error printed beside
them does (the JSON records ||dW|| / ||W||). The three models are copies of one nf4 load and are
timed in turn inside each repeat, so load on a shared machine hits all of them alike; the
ratios are medians of per-repeat ratios. Everything runs in one process:

    .venv/bin/python benchmarks/toggle.py            # ~5 min on 2 busy cores
    .venv/bin/python benchmarks/toggle.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["Who wrote the novel Pride and Prejudice?", "What is the capital of Australia?",
           "Name three primary colours.", "How many legs does a spider have?",
           "Who painted the Mona Lisa, and in which century did the painter live?", "What is 12 times 12?",
           "Which planet is known as the red planet?", "Tell me one fact about the river Nile."]


def random_adapter(model, hub_id: str, r: int = 8, alpha: float = 16.0, b_std: float = 2e-2, seed: int = 0):
    from lora_unlearn.core.adapter import Adapter, LoraModule

    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in LINEAR:
            bound = 1 / math.sqrt(m.in_features)
            A = (torch.rand(r, m.in_features, generator=g) * 2 - 1) * bound
            modules[name] = LoraModule(A, torch.randn(m.out_features, r, generator=g) * b_std, alpha / r)
    config = {"base_model_name_or_path": hub_id, "r": r, "lora_alpha": alpha, "target_modules": LINEAR}
    return Adapter(modules, config, {"op": "random", "seed": seed, "b_std": b_std})


def relative_delta(model, adapter) -> float:
    import bitsandbytes.functional as F

    num = den = 0.0
    for name, m in adapter.modules.items():
        layer = model.get_submodule(name)
        w = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        num += float(m.delta().pow(2).sum())
        den += float(w.pow(2).sum())
    return math.sqrt(num / den)


def clock(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared machine 2 threads mostly wait on each other)")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens generated per row in (2)")
    ap.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "toggle.json")
    args = ap.parse_args()

    import peft
    import transformers
    from peft import get_peft_model, set_peft_model_state_dict
    from rich.console import Console
    from rich.table import Table

    from lora_unlearn.arithmetic import negate
    from lora_unlearn.core.adapter import peft_state_dict
    from lora_unlearn.core.models import load_base
    from lora_unlearn.core.stack import lora_config
    from lora_unlearn.serving.runtime import ForgetRuntime

    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*rounding errors.*")  # PEFT's nf4 merge notice: measured here
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    console = Console()
    reps = {"switch": 300, "set_adapter": 20, "disable": 10, "merge": 2, "forward": 6, "generate": 3}
    if not args.quick:
        reps = {"switch": 3000, "set_adapter": 60, "disable": 30, "merge": 3, "forward": 15, "generate": 6}
    load_before = os.getloadavg()

    console.print(f"loading {args.base} in nf4 and copying it twice")
    base, tok, info = load_base(args.base, "nf4", device="cpu")
    forget = negate(random_adapter(base, info.hub_id, seed=0))
    other = negate(random_adapter(base, info.hub_id, seed=1))  # a second adapter for set_adapter to switch to
    rel = relative_delta(base, forget)
    rt = ForgetRuntime(copy.deepcopy(base), tok)
    rt.load("forget", forget)
    pm = get_peft_model(copy.deepcopy(base), lora_config(forget), adapter_name="forget")
    pm.add_adapter("other", lora_config(other))
    for name, a in (("forget", forget), ("other", other)):
        set_peft_model_state_dict(pm, peft_state_dict(a), adapter_name=name)
    pm.set_adapter("forget")
    pm.eval()

    # ---- (1) switching ------------------------------------------------------------------------
    on, off = [{"forget": 1.0}] * 8, [{"forget": 0.0}] * 8
    mixed_rows = [{"forget": 1.0}, {}] * 4
    state = {"i": 0}

    def rt_switch():
        state["i"] ^= 1
        rt.set_coefficients(on if state["i"] else off)

    def peft_switch():
        state["i"] ^= 1
        pm.set_adapter("forget" if state["i"] else "other")

    def peft_disable():
        with pm.disable_adapter():
            pass

    console.print("(1) switching")
    switch = {
        "ForgetRuntime.set_coefficients (8 rows)": clock(rt_switch, reps["switch"]),
        "ForgetRuntime.set_coefficients (8 mixed rows)": clock(lambda: rt.set_coefficients(mixed_rows), reps["switch"]),
        "PEFT set_adapter": clock(peft_switch, reps["set_adapter"]),
        "PEFT disable_adapter() enter+exit": clock(peft_disable, reps["disable"]),
    }
    rt.set_coefficients(None)
    pm.set_adapter("forget")

    enc = tok([tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
               for p in PROMPTS], return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    names = ["forget" if r else "__base__" for r in mixed_rows]

    @torch.no_grad()
    def fwd(model, **kw):
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kw).logits

    # ---- (2) mixed batch ----------------------------------------------------------------------
    console.print(f"(2) batch of 8 (prompt {enc['input_ids'].shape[1]} tokens), {reps['forward']} forward repeats")
    fwd(base)  # warm-up; the two below warm up the others
    with rt.coefficients(mixed_rows):
        ours = fwd(rt.model)
    theirs = fwd(pm, adapter_names=names)
    agreement = float((ours - theirs).abs().max())
    forward = {"base": [], "ForgetRuntime mixed": [], "ForgetRuntime all rows off": [], "PEFT adapter_names mixed": []}
    for _ in range(reps["forward"]):
        forward["base"] += clock(lambda: fwd(base), 1)
        with rt.coefficients(mixed_rows):
            forward["ForgetRuntime mixed"] += clock(lambda: fwd(rt.model), 1)
        with rt.coefficients(off):
            forward["ForgetRuntime all rows off"] += clock(lambda: fwd(rt.model), 1)
        forward["PEFT adapter_names mixed"] += clock(lambda: fwd(pm, adapter_names=names), 1)

    gen_kw = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
              "pad_token_id": tok.pad_token_id}

    @torch.no_grad()
    def gen(model, **kw):
        return model.generate(**enc, **gen_kw, **kw)

    console.print(f"(2) generate {args.new_tokens} tokens per row, {reps['generate']} repeats")
    generate = {k: [] for k in forward}
    for _ in range(reps["generate"]):
        generate["base"] += clock(lambda: gen(base), 1)
        with rt.coefficients(mixed_rows):
            generate["ForgetRuntime mixed"] += clock(lambda: gen(rt.model), 1)
        with rt.coefficients(off):
            generate["ForgetRuntime all rows off"] += clock(lambda: gen(rt.model), 1)
        generate["PEFT adapter_names mixed"] += clock(lambda: gen(pm, adapter_names=names), 1)
    with rt.coefficients(mixed_rows):
        same_text = bool(torch.equal(gen(rt.model), gen(pm, adapter_names=names)))

    # ---- (1) merge / unmerge last: in nf4 both requantize, so the weights drift --------------------
    console.print(f"(1) merge_adapter + unmerge_adapter, {reps['merge']} repeats")
    before = fwd(pm)
    unmerged_mask = enc["attention_mask"].bool()
    merge_t, unmerge_t, merge_err, drift = [], [], None, None
    for i in range(reps["merge"]):
        merge_t += clock(pm.merge_adapter, 1)
        if i == 0:
            merge_err = (fwd(pm) - before).abs()[unmerged_mask]
        unmerge_t += clock(pm.unmerge_adapter, 1)
        if i == 0:
            drift = float((fwd(pm) - before).abs()[unmerged_mask].max())
    switch["PEFT merge_adapter + unmerge_adapter"] = [a + b for a, b in zip(merge_t, unmerge_t)]
    load_after = os.getloadavg()

    # ---- report -------------------------------------------------------------------------------
    ref = med(switch["PEFT set_adapter"])
    t1 = Table(title="(1) switching forgetting on/off (median per call)")
    for c in ("method", "median", "vs set_adapter", "calls"):
        t1.add_column(c, justify="left" if c == "method" else "right")
    switch_out = {}
    for k, v in switch.items():
        m = med(v)
        switch_out[k] = {"median_us": round(m * 1e6, 1), "x_set_adapter": round(m / ref, 5), "calls": len(v)}
        t1.add_row(k, f"{m * 1e6:,.1f} us", f"{m / ref:.4g}x" if m < ref else f"{m / ref:.1f}x", str(len(v)))
    cheaper = ref / med(switch["ForgetRuntime.set_coefficients (8 rows)"])

    t2 = Table(title="(2) batch of 8, half the rows forgetting (median; ratio = median of per-repeat ratios)")
    for c in ("path", "forward", "x base", f"generate {args.new_tokens} tok", "x base"):
        t2.add_column(c, justify="left" if c == "path" else "right")
    batch_out = {}
    for k, times in forward.items():
        fr = med([a / b for a, b in zip(times, forward["base"])])
        gr = med([a / b for a, b in zip(generate[k], generate["base"])])
        batch_out[k] = {"forward_ms": round(med(times) * 1e3, 1), "forward_x_base": round(fr, 3),
                        "generate_s": round(med(generate[k]), 3), "generate_x_base": round(gr, 3)}
        t2.add_row(k, f"{med(times) * 1e3:.0f} ms", f"{fr:.2f}x", f"{med(generate[k]):.2f} s", f"{gr:.2f}x")
    console.print(t1, t2)
    console.print(f"set_coefficients is {cheaper:,.0f}x cheaper than set_adapter (goal >= 100x); "
                  f"mixed forward {batch_out['ForgetRuntime mixed']['forward_x_base']:.2f}x, generate "
                  f"{batch_out['ForgetRuntime mixed']['generate_x_base']:.2f}x base (goal <= 1.3x)")
    console.print(f"ForgetRuntime vs PEFT adapter_names logits: max |diff| {agreement:.2e}; same generated tokens: "
                  f"{same_text}. Merge into nf4: max |logit diff| {float(merge_err.max()):.3f}, mean "
                  f"{float(merge_err.mean()):.4f}; after merge+unmerge max drift {drift:.3f} "
                  f"(adapter ||dW||/||W|| = {rel:.4f})")
    console.print(f"load average (1/5/15 min) before {load_before}, after {load_after}; "
                  f"{os.cpu_count()} CPUs, torch threads {args.threads}")

    result = {
        "base": args.base, "quantization": "nf4", "quick": args.quick,
        "adapter": {"kind": "random, negated (not trained)", "r": 8, "lora_alpha": 16, "targets": LINEAR,
                    "modules": len(forget.modules), "relative_delta_norm": round(rel, 5)},
        "batch": 8, "prompt_tokens": int(enc["input_ids"].shape[1]), "new_tokens": args.new_tokens,
        "mixed_rows": "4 rows forget=1, 4 rows forget=0 (PEFT: adapter_names 'forget' / '__base__')",
        "switching": switch_out, "set_coefficients_x_cheaper_than_set_adapter": round(cheaper, 1),
        "batch8": batch_out,
        "exactness": {"runtime_vs_peft_max_abs_logit_diff": agreement, "same_generated_tokens": same_text},
        "merge_nf4": {"max_abs_logit_diff": round(float(merge_err.max()), 4),
                      "mean_abs_logit_diff": round(float(merge_err.mean()), 5),
                      "max_drift_after_merge_unmerge": round(drift, 4)},
        "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads, "load_avg_before": load_before,
                    "load_avg_after": load_after, "platform": platform.platform(), "torch": torch.__version__,
                    "peft": peft.__version__, "transformers": transformers.__version__},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
