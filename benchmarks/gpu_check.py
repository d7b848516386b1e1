"""A prepared GPU check: a 7B-shaped Llama in nf4, forget-adapter training, toggling, mixed batches, merging.

Made for a machine lent for minutes, with a CUDA GPU and no network (issue 18, item 5). The model is
Llama-2-7B's shape (hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000) with random
weights: memory and time do not depend on the values. It is built on the meta device and then, one
linear layer at a time, given random bf16 weights on the GPU that are quantized there to nf4
(``bitsandbytes.nn.Linear4bit``, compute dtype bf16) and freed, so the build never holds the 13.5 GB
bf16 model; lm_head, the embeddings and the norms stay bf16. Data are random token ids. Stages:

    preflight  versions, CUDA device, bitsandbytes and the one native library it loads, a 4-bit
               round trip; what the project modules imported pull in. Exit 2 naming what is missing.
    model      build time, GPU memory of the nf4 model, peak during the build
    train      PEFT LoRA r=16 (alpha 32) on all linear layers, torch AdamW, plain NLL (a TV forget
               adapter's loss): batch 4 x 512 with gradient checkpointing, batch 8 x 512 without;
               1 warm-up step then timed steps; peak memory per setting (reset between settings)
    toggle     two adapters loaded (random r=16, as benchmarks/toggle.py makes them): switching per
               request with ForgetRuntime.set_coefficients against PEFT set_adapter, same run
    mixed      batch of 8 rows with different adapters / strengths: forward and greedy generate,
               base alone, ForgetRuntime, PEFT adapter_names; ratios against the base
    merge      hot loading (ForgetRuntime.load, PEFT add_adapter) and hot-swapping (project's hotswap)
               an adapter while others are loaded; PEFT merge into nf4 (dequantize, add, requantize):
               time, max |logit diff| against unmerged, drift after unmerge

Every stage appends its result (time stamp, seconds, elapsed) to the JSON file as soon as it ends,
by writing a temporary file and renaming it; a failing stage records its error and the next one
runs; ``--budget-s`` skips a stage whose estimate no longer fits (recorded), and ``--resume`` reruns
only what is not done yet. Needs torch, transformers, peft, bitsandbytes and lora_unlearn's core and
serving runtime (none of which imports fastapi, pydantic, datasets or gguf).

    python benchmarks/gpu_check.py --out $OUT/gpu_check.json --budget-s 220           # on the GPU
    python benchmarks/gpu_check.py --out $OUT/gpu_check.json --budget-s 200 --resume  # finish a cut run
    .venv/bin/python benchmarks/gpu_check.py --shape tiny --device cpu --out runs/bench/gpu_check.json
    .venv/bin/python benchmarks/gpu_check.py --pack build/gpu_site --bnb-cuda 128    # bitsandbytes + peft, trimmed
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # lora_unlearn and benchmarks.toggle from this checkout, installed or not

STAGES = ("preflight", "model", "train", "toggle", "mixed", "merge")
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {  # LlamaConfig fields; 7b is Llama-2-7B (no GQA, untied embeddings)
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256, max_position_embeddings=512),
}
SIZES = {  # sequence, timed train steps, batch rows / prompt / new tokens, repeats
    "7b": dict(seq=512, steps=3, rows=8, prompt=64, new_tokens=16, switch=2000, set_adapter=40, forward=5, generate=3),
    "tiny": dict(seq=64, steps=2, rows=8, prompt=16, new_tokens=4, switch=200, set_adapter=10, forward=3, generate=2),
}
ESTIMATE_S = {"7b": {"model": 25, "train": 50, "toggle": 15, "mixed": 35, "merge": 25},  # guesses: not yet measured
              "tiny": {"model": 1, "train": 2, "toggle": 1, "mixed": 2, "merge": 1}}
TRAIN = [("batch4_gc", 4, True), ("batch8_no_gc", 8, False)]  # name, batch, gradient checkpointing
RANK, ALPHA, LR = 16, 32.0, 1e-4
HEAVY = ("fastapi", "pydantic", "datasets", "gguf", "uvicorn", "rich", "yaml", "typer")
GOALS = {"train_batch4_gc_peak_gb_max": 16.0, "toggle_x_cheaper_min": 100.0, "mixed_x_base_max": 1.3}
GB = 1e9


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def plain(x):
    """JSON-safe: non-finite floats become strings (json's NaN is not JSON), tuples lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


class Report:
    """The results file, rewritten whole (temporary file + rename) after every stage: never half-written."""

    def __init__(self, path: Path, doc: dict) -> None:
        self.path, self.doc = path, doc

    def write(self) -> None:
        self.doc["summary"] = summary(self.doc)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(plain(self.doc), indent=2, allow_nan=False) + "\n")
        os.replace(tmp, self.path)


class Budget:
    def __init__(self, seconds: float | None) -> None:
        self.start, self.seconds = time.perf_counter(), seconds or None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()


# ---- preflight ----------------------------------------------------------------------------------

def preflight(device: str) -> tuple[dict, list[str]]:
    """(versions and checks, what is missing with how to get it). Imports nothing it does not need."""
    info, missing = {"python": platform.python_version(), "platform": platform.platform()}, []
    try:
        import torch
    except ImportError as e:
        return info, [f"torch ({e}): pip install torch (a CUDA build: https://pytorch.org/get-started/locally/)"]
    info.update(torch=torch.__version__, torch_cuda_build=torch.version.cuda, cpus=os.cpu_count())
    if device == "cuda":
        info["cuda_available"] = torch.cuda.is_available()
        if info["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            info.update(device_name=props.name, gpu_memory_gb=round(props.total_memory / GB, 1),
                        capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
        else:
            build = torch.version.cuda or "none: a CPU-only build"
            missing.append(f"a CUDA device: torch {torch.__version__} (built for CUDA {build}) sees none; install a "
                           "CUDA build of torch, or run --shape tiny --device cpu")
    for name in ("transformers", "peft"):
        try:
            info[name] = importlib.import_module(name).__version__
        except Exception as e:  # noqa: BLE001 - any import failure is "missing", with its reason
            missing.append(f"{name} ({type(e).__name__}: {e}): pip install {name}")
    try:
        import bitsandbytes as bnb
        from bitsandbytes import cextension
    except Exception as e:  # noqa: BLE001
        missing.append(f"bitsandbytes ({type(e).__name__}: {e}): pip install bitsandbytes (the wheel is ~125 MB; "
                       "its Python files plus the one native library for this torch's CUDA are enough: "
                       "`--pack DIR --bnb-cuda XYZ` on a machine that has it, then PYTHONPATH=DIR; docs/gpu_check.md)")
        return info, missing
    pkg = Path(bnb.__file__).parent
    info.update(bitsandbytes=bnb.__version__, bnb_dir=str(pkg),
                bnb_native_libraries_present=sorted(p.name for p in pkg.glob("libbitsandbytes_*")))
    if device == "cuda" and info.get("cuda_available"):
        loaded = bool(getattr(cextension.lib, "compiled_with_cuda", False))
        try:  # which file this bitsandbytes looks for (its selection rule, bitsandbytes >= 0.43)
            from bitsandbytes.cuda_specs import get_cuda_specs

            wanted = cextension.get_cuda_bnb_library_path(get_cuda_specs())
        except Exception:  # noqa: BLE001 - another version's internals: name the pattern instead
            wanted = pkg / f"libbitsandbytes_cuda{(torch.version.cuda or '').replace('.', '')}.so"
        info.update(bnb_cuda_library=wanted.name, bnb_cuda_library_exists=wanted.exists(), bnb_cuda_library_loaded=loaded)
        if not loaded:
            state = "present but it did not load: see bitsandbytes' error above" if wanted.exists() else "absent"
            xyz = wanted.name.removeprefix("libbitsandbytes_cuda").split(".")[0]
            missing.append(f"bitsandbytes' CUDA library {wanted.name} in {pkg} ({state}): copy that one file from "
                           f"the bitsandbytes {bnb.__version__} wheel (`--pack DIR --bnb-cuda {xyz}` on a machine "
                           f"that has it), or pip install bitsandbytes=={bnb.__version__}; BNB_CUDA_VERSION=XYZ "
                           "picks another library that is present")
    if not missing:  # a 4-bit round trip on the device: the kernels that everything below needs
        try:
            w = torch.randn(256, 256, device=device)
            q, state = bnb.functional.quantize_4bit(w, quant_type="nf4")
            back = bnb.functional.dequantize_4bit(q, state)
            info["nf4_round_trip_rel_error"] = round(float((back - w).norm() / w.norm()), 4)
        except Exception as e:  # noqa: BLE001
            missing.append(f"a working nf4 quantize/dequantize on {device} ({type(e).__name__}: {str(e)[:300]})")
    if not missing:
        info["project_modules_pull"] = project_imports()
    info["heavy_in_process"] = sorted(m for m in HEAVY if m in sys.modules)
    info["heavy_installed"] = sorted(m for m in HEAVY if importlib.util.find_spec(m) is not None)
    return info, missing


def project_imports() -> dict[str, list[str]]:
    """Per project module this check imports: the heavy packages (HEAVY) its import added to sys.modules."""
    out = {}
    for name in ("lora_unlearn.core.adapter", "lora_unlearn.core.stack", "lora_unlearn.core.models",
                 "lora_unlearn.serving.runtime", "lora_unlearn.serving.loading", "benchmarks.toggle"):
        before = set(sys.modules)
        importlib.import_module(name)
        out[name] = sorted({m.split(".")[0] for m in set(sys.modules) - before} & set(HEAVY))
    return out


# ---- the model and the adapters ----------------------------------------------------------------

class Check:
    """What the stages share, built on first use so any subset of stages can run on its own."""

    def __init__(self, args, budget: Budget) -> None:
        import torch

        self.args, self.torch = args, torch
        self.dev = torch.device(args.device)
        self.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32  # as load_base: bf16 on GPU
        self.size = SIZES[args.shape]
        self.budget = budget  # counted from the start of the process: imports and preflight included
        self.cache: dict = {}

    def sync(self) -> None:
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def once(self, key, build):
        """Build ``key`` once; a failed build is remembered, so later stages fail fast with the same error."""
        if key not in self.cache:
            try:
                self.cache[key] = build()
            except Exception as e:
                self.cache[key] = e
                raise
        if isinstance(self.cache[key], Exception):
            raise RuntimeError(f"building {key} failed earlier: {self.cache[key]}")
        return self.cache[key]

    def model(self):
        return self.once("model", self._build)

    def _build(self):
        """LlamaForCausalLM on meta; each Linear (lm_head kept) becomes Linear4bit, quantized on the device."""
        import bitsandbytes as bnb
        from torch import nn
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        from lora_unlearn.core.models import _disable_cpu_repacking

        torch, dev, dtype = self.torch, self.dev, self.dtype
        cfg = LlamaConfig(**SHAPES[self.args.shape], tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2, use_cache=True)
        torch.manual_seed(self.args.seed)
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg).to(dtype)
        std = cfg.initializer_range
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is nn.Linear and child is not model.lm_head:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=dtype,
                                          compress_statistics=False, quant_type="nf4", device="meta")
                    w = torch.empty(child.out_features, child.in_features, device=dev, dtype=dtype).normal_(0, std)
                    q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=False, quant_type="nf4",
                                                 module=q).to(dev)  # quantizes on dev; the bf16 w is freed next
                    del w
                    setattr(parent, child_name, q)
        for module in model.modules():  # embeddings, lm_head, norms: still on meta
            for name, p in list(module.named_parameters(recurse=False)):
                if p.is_meta:
                    t = torch.empty(p.shape, device=dev, dtype=dtype)
                    t.fill_(1.0) if "Norm" in type(module).__name__ else t.normal_(0, std)
                    setattr(module, name, nn.Parameter(t, requires_grad=False))
        with torch.device(dev):  # inv_freq is a computed buffer: on meta it has no values, so make it again
            model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"still on the meta device after the build: {left[:5]}")
        model.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets; PEFT then wraps Linear4bit as 4-bit
        _disable_cpu_repacking(model)
        return model.eval()

    def drop_model(self) -> None:
        for key in ("model", "runtime", "peft"):
            self.cache.pop(key, None)
        self.reset_peak()

    def adapter(self, name: str):
        from benchmarks.toggle import random_adapter

        seeds = {"forget": 0, "other": 1, "third": 2}
        return self.once(f"adapter:{name}", lambda: random_adapter(self.model(), f"random-{self.args.shape}", r=RANK,
                                                                   alpha=ALPHA, seed=seeds[name]))

    def runtime(self):
        def build():
            from lora_unlearn.serving.runtime import ForgetRuntime

            rt = ForgetRuntime(copy.deepcopy(self.model()), tokenizer=None)
            for name in ("forget", "other"):
                rt.load(name, self.adapter(name))
            return rt
        return self.once("runtime", build)

    def peft(self):
        def build():
            from peft import get_peft_model, set_peft_model_state_dict

            from lora_unlearn.core.adapter import peft_state_dict
            from lora_unlearn.core.stack import lora_config

            with warnings.catch_warnings():  # PEFT renames the (made-up) base_model_name_or_path: harmless here
                warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
                pm = get_peft_model(copy.deepcopy(self.model()), lora_config(self.adapter("forget")),
                                    adapter_name="forget")
                pm.add_adapter("other", lora_config(self.adapter("other")))
            for name in ("forget", "other"):
                set_peft_model_state_dict(pm, peft_state_dict(self.adapter(name)), adapter_name=name)
            pm.set_adapter("forget")
            return pm.eval()
        return self.once("peft", build)

    def ids(self, rows: int, length: int, seed: int):
        g = self.torch.Generator().manual_seed(seed)
        return self.torch.randint(3, SHAPES[self.args.shape]["vocab_size"], (rows, length), generator=g).to(self.dev)

    def memory(self) -> dict:
        torch = self.torch
        if self.dev.type == "cuda":
            return {"allocated_gb": round(torch.cuda.memory_allocated() / GB, 3),
                    "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / GB, 3),
                    "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / GB, 3)}
        import resource  # CPU: the process's peak RSS so far (it cannot be reset per setting)

        return {"process_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 3)}

    def reset_peak(self) -> None:
        gc.collect()
        if self.dev.type == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()


def med(xs: list[float]) -> float:
    from benchmarks.toggle import med as median

    return median(xs)


def timed(ck: Check, fn, n: int, min_left: float = 5.0) -> list[float]:
    """``n`` synchronized timings of ``fn`` (fewer if the budget runs low; at least one)."""
    out = []
    for i in range(n):
        if i and ck.budget.left() < min_left:
            break
        ck.sync()
        t = time.perf_counter()
        fn()
        ck.sync()
        out.append(time.perf_counter() - t)
    return out


# ---- stages ------------------------------------------------------------------------------------

def stage_model(ck: Check) -> dict:
    ck.reset_peak()
    t = time.perf_counter()
    model = ck.model()
    ck.sync()
    import bitsandbytes as bnb

    n4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    return {"build_s": round(time.perf_counter() - t, 2), "config": SHAPES[ck.args.shape], "dtype": str(ck.dtype),
            "linear4bit_layers": len(n4), "quantized_params": sum(m.in_features * m.out_features for m in n4),
            "unquantized_params": sum(p.numel() for p in model.parameters() if p.dtype == ck.dtype), **ck.memory()}


def stage_train(ck: Check) -> dict:
    from peft import LoraConfig, get_peft_model

    model = ck.model()
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=LINEAR, bias="none",
                     task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
            pm = get_peft_model(model, cfg, adapter_name="forget_train")  # "train" would shadow Module.train
    except Exception:
        ck.drop_model()  # it may hold half-injected LoRA layers: later stages build a clean one
        raise
    params = [p for p in pm.parameters() if p.requires_grad]
    out = {"lora": {"r": RANK, "alpha": ALPHA, "targets": "all linear", "trainable_params": sum(p.numel() for p in params),
                    "dtype": str(params[0].dtype)},
           "optimizer": f"torch.optim.AdamW lr {LR}", "loss": "NLL on random token ids", "seq": ck.size["seq"],
           "resident_before_gb": ck.memory(), "settings": {}}
    try:
        for name, batch, checkpointing in TRAIN:
            if ck.budget.left() < ESTIMATE_S[ck.args.shape]["train"] / 3:
                out["settings"][name] = {"skipped": f"budget: {ck.budget.left():.0f} s left"}
                continue
            try:
                out["settings"][name] = train_setting(ck, pm, batch, checkpointing)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory at batch 8: keep the other setting
                out["settings"][name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            ck.reset_peak()
    finally:
        for p in params:
            p.grad = None
        pm.unload()  # the LoRA layers go; ck.model() is the plain nf4 base again
        checkpoint(model, False)
        model.config.use_cache = True
        model.eval()
        model.__dict__.pop("peft_config", None)  # ForgetRuntime refuses a model that looks like a PEFT model
    return out


def checkpoint(model, on: bool) -> None:
    """Activation (gradient) checkpointing of every decoder layer, non-reentrant (transformers 5 names it anew)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def train_setting(ck: Check, pm, batch: int, checkpointing: bool) -> dict:
    torch, base = ck.torch, pm.get_base_model()
    checkpoint(base, checkpointing)
    base.config.use_cache = False
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR)
    ids = ck.ids(batch, ck.size["seq"], seed=batch)
    ck.reset_peak()
    losses = []

    def step():
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    warm = timed(ck, step, 1)
    times = timed(ck, step, ck.size["steps"])
    mem = ck.memory()  # the optimizer's state goes with this frame
    tokens = batch * ck.size["seq"]
    return {"batch": batch, "seq": ck.size["seq"], "gradient_checkpointing": checkpointing,
            "warmup_step_s": round(warm[0], 3), "step_s": [round(t, 3) for t in times],
            "median_step_s": round(med(times), 3), "tokens_per_s": round(tokens / med(times), 1),
            "losses": [round(x, 3) for x in losses], **mem}


def stage_toggle(ck: Check) -> dict:
    rt, pm = ck.runtime(), ck.peft()
    rows = ck.size["rows"]
    to_forget, to_other = [{"forget": 1.0, "other": 0.0}] * rows, [{"forget": 0.0, "other": 1.0}] * rows
    mixed = [{"forget": 1.0}, {"other": 1.0}, {"forget": 0.5, "other": -1.0}, {}] * (rows // 4)
    flip = {"i": 0}

    def rt_switch():
        flip["i"] ^= 1
        rt.set_coefficients(to_forget if flip["i"] else to_other)

    def peft_switch():
        flip["i"] ^= 1
        pm.set_adapter("forget" if flip["i"] else "other")

    switch = {"ForgetRuntime.set_coefficients (all rows forget <-> other)": timed(ck, rt_switch, ck.size["switch"], 1),
              "ForgetRuntime.set_coefficients (mixed rows, strengths)":
                  timed(ck, lambda: rt.set_coefficients(mixed), ck.size["switch"], 1),
              "PEFT set_adapter (forget <-> other)": timed(ck, peft_switch, ck.size["set_adapter"], 1)}
    rt.set_coefficients(None)
    pm.set_adapter("forget")
    ref = med(switch["PEFT set_adapter (forget <-> other)"])
    cheaper = ref / med(switch["ForgetRuntime.set_coefficients (all rows forget <-> other)"])
    print(f"  set_coefficients is {cheaper:,.0f}x cheaper than set_adapter (goal >= {GOALS['toggle_x_cheaper_min']:g}x)")
    return {"rows": rows, "adapters": 2, "synchronized": ck.dev.type == "cuda",
            "switching": {k: {"median_us": round(med(v) * 1e6, 2), "x_set_adapter": round(med(v) / ref, 6),
                              "calls": len(v)} for k, v in switch.items()},
            "set_coefficients_x_cheaper_than_set_adapter": round(cheaper, 1)}


def stage_mixed(ck: Check) -> dict:
    torch = ck.torch
    base, rt, pm = ck.model(), ck.runtime(), ck.peft()
    rows, s = ck.size["rows"], ck.size
    ids = ck.ids(rows, s["prompt"], seed=11)
    mask = torch.ones_like(ids)
    half = [{"forget": 1.0}, {}] * (rows // 2)  # 4 rows forget, 4 off: what PEFT's adapter_names can say too
    names = ["forget", "__base__"] * (rows // 2)
    strengths = [{"forget": 1.0}, {"other": 1.0}, {"forget": 0.5, "other": -1.0}, {}] * (rows // 4)
    gen_kw = {"max_new_tokens": s["new_tokens"], "min_new_tokens": s["new_tokens"], "do_sample": False,
              "pad_token_id": 0}

    def with_rows(model_rows, fn):
        def run():
            with rt.coefficients(model_rows):
                return fn(rt.model)
        return run

    paths = {"base": lambda f: (lambda: f(base)),
             "ForgetRuntime mixed (4 forget, 4 off)": lambda f: with_rows(half, f),
             "ForgetRuntime mixed strengths (forget, other, 0.5/-1, off)": lambda f: with_rows(strengths, f),
             "PEFT adapter_names mixed (4 forget, 4 base)": lambda f: (lambda: f(pm, adapter_names=names))}

    @torch.no_grad()
    def fwd(model, **kw):
        return model(input_ids=ids, attention_mask=mask, **kw).logits

    @torch.no_grad()
    def gen(model, **kw):
        return model.generate(input_ids=ids, attention_mask=mask, **gen_kw, **kw)

    out = {"rows": rows, "prompt_tokens": s["prompt"], "new_tokens": s["new_tokens"]}
    for label, f, n in (("forward", fwd, s["forward"]), ("generate", gen, s["generate"])):
        runs = {k: make(f) for k, make in paths.items()}
        for run in runs.values():
            run()  # warm-up
        times = {k: [] for k in runs}
        for i in range(n):
            if i and ck.budget.left() < 10:
                out[f"{label}_truncated_by_budget"] = True
                break
            for k, run in runs.items():
                times[k] += timed(ck, run, 1)
        for k, v in times.items():
            ratio = med([a / b for a, b in zip(v, times["base"])])
            out.setdefault(k, {}).update({f"{label}_s": round(med(v), 4), f"{label}_x_base": round(ratio, 3),
                                          f"{label}_repeats": len(v)})
    ours, theirs = with_rows(half, fwd)(), fwd(pm, adapter_names=names)
    out["runtime_vs_peft_max_abs_logit_diff"] = float((ours.float() - theirs.float()).abs().max())
    out["same_generated_tokens"] = bool(torch.equal(with_rows(half, gen)(), gen(pm, adapter_names=names)))
    r = out["ForgetRuntime mixed (4 forget, 4 off)"]
    print(f"  ForgetRuntime mixed: forward {r['forward_x_base']:.2f}x, generate {r['generate_x_base']:.2f}x base "
          f"(goal <= {GOALS['mixed_x_base_max']:g}x); PEFT adapter_names generate "
          f"{out['PEFT adapter_names mixed (4 forget, 4 base)']['generate_x_base']:.2f}x")
    return out


def stage_merge(ck: Check) -> dict:
    import bitsandbytes.functional as F
    from peft import set_peft_model_state_dict

    from lora_unlearn.core.adapter import peft_state_dict
    from lora_unlearn.core.stack import lora_config
    from lora_unlearn.serving.loading import hotswap

    torch, base, rt, pm = ck.torch, ck.model(), ck.runtime(), ck.peft()
    forget, other, third = (ck.adapter(n) for n in ("forget", "other", "third"))
    ids = ck.ids(2, ck.size["prompt"], seed=12)

    @torch.no_grad()
    def logits(model):
        return model(input_ids=ids).logits.float()

    def once(fn) -> float:
        return timed(ck, fn, 1)[0]

    out = {"hot_load": {}, "hot_swap": {}}
    out["hot_load"]["ForgetRuntime.load (third, 2 loaded)_s"] = round(once(lambda: rt.load("third", third)), 4)
    with rt.coefficients([{"third": 1.0}]):
        rt_third = logits(rt.model)
    out["hot_load"]["ForgetRuntime.unload_s"] = round(once(lambda: rt.unload("third")), 4)

    def peft_add():
        pm.add_adapter("third", lora_config(third))
        set_peft_model_state_dict(pm, peft_state_dict(third), adapter_name="third")
    out["hot_load"]["PEFT add_adapter + set_peft_model_state_dict_s"] = round(once(peft_add), 4)
    pm.delete_adapter("third")
    pm.set_adapter("other")
    before = logits(pm)
    out["hot_swap"]["hotswap (other <- third, in place)_s"] = round(once(lambda: hotswap(pm, "other", third)), 4)
    out["hot_swap"]["vs ForgetRuntime with third: max_abs_logit_diff"] = float((logits(pm) - rt_third).abs().max())
    out["hot_swap"]["hotswap back_s"] = round(once(lambda: hotswap(pm, "other", other)), 4)
    out["hot_swap"]["after swap back: max_abs_logit_diff"] = float((logits(pm) - before).abs().max())

    num = den = 0.0  # ||dW|| / ||W|| of the merged adapter: the merge error depends on it
    for name, m in forget.modules.items():
        layer = base.get_submodule(name)
        w = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        num += float((m.scaling * (m.B.to(ck.dev) @ m.A.to(ck.dev))).pow(2).sum())
        den += float(w.pow(2).sum())
    pm.set_adapter("forget")
    unmerged = logits(pm)
    with warnings.catch_warnings():  # PEFT's "rounding errors" notice for 4-bit merges: measured here
        warnings.filterwarnings("ignore", message=".*rounding errors.*")
        out["merge_s"] = round(once(lambda: pm.merge_adapter(["forget"])), 3)
        diff = (logits(pm) - unmerged).abs()
        out["unmerge_s"] = round(once(pm.unmerge_adapter), 3)
    out.update(merged_modules=len(forget.modules), relative_delta_norm=round(math.sqrt(num / den), 5),
               max_abs_logit_diff=float(diff.max()), mean_abs_logit_diff=float(diff.mean()),
               max_drift_after_unmerge=float((logits(pm) - unmerged).abs().max()))
    print(f"  merge into nf4 {out['merge_s']} s: max |logit diff| {out['max_abs_logit_diff']:.3f}; "
          f"hotswap {out['hot_swap']['hotswap (other <- third, in place)_s']} s")
    return out


RUNNERS = {"model": stage_model, "train": stage_train, "toggle": stage_toggle, "mixed": stage_mixed,
           "merge": stage_merge}


def summary(doc: dict) -> dict:
    """The goals, read off whatever stages have results; 'applies' is false off a CUDA 7B run."""
    st = {k: v.get("result") or {} for k, v in doc.get("stages", {}).items() if v.get("status") == "ok"}
    applies = doc.get("shape") == "7b" and doc.get("device") == "cuda"
    out = {"goals_apply": applies, "stages_ok": sorted(st), "incomplete": [s for s in doc.get("requested", [])
                                                                            if s not in st]}
    settings = st.get("train", {}).get("settings", {})
    for name, _, _ in TRAIN:
        peak = settings.get(name, {}).get("peak_reserved_gb")
        if peak is not None:
            out[f"train_{name}_peak_reserved_gb"] = peak
    if "train_batch4_gc_peak_reserved_gb" in out:
        out["train_goal_met"] = out["train_batch4_gc_peak_reserved_gb"] <= GOALS["train_batch4_gc_peak_gb_max"]
    if "toggle" in st:
        x = st["toggle"]["set_coefficients_x_cheaper_than_set_adapter"]
        out.update(toggle_x_cheaper=x, toggle_goal_met=x >= GOALS["toggle_x_cheaper_min"])
    if "mixed" in st:
        r = st["mixed"]["ForgetRuntime mixed (4 forget, 4 off)"]
        out.update(mixed_forward_x_base=r["forward_x_base"], mixed_generate_x_base=r["generate_x_base"],
                   mixed_goal_met=max(r["forward_x_base"], r["generate_x_base"]) <= GOALS["mixed_x_base_max"])
    if not applies:  # a tiny or CPU run tests the plumbing; its ratios say nothing about the goals
        out.update({k: None for k in out if k.endswith("_goal_met")})
    return out


# ---- packing bitsandbytes and peft for a machine that lacks them -------------------------------

def pack(dest: Path, cuda: str) -> None:
    """Copy bitsandbytes' Python files plus libbitsandbytes_cuda{cuda}.so, and peft's Python files, to dest."""
    import bitsandbytes
    import peft

    lib = f"libbitsandbytes_cuda{cuda}.so"
    for mod in (bitsandbytes, peft):
        src = Path(mod.__file__).parent
        keep = shutil.ignore_patterns("__pycache__", "libbitsandbytes_*")
        shutil.copytree(src, dest / src.name, ignore=keep, dirs_exist_ok=True)
    so = Path(bitsandbytes.__file__).parent / lib
    if not so.exists():
        present = sorted(p.name for p in so.parent.glob("libbitsandbytes_cuda*"))
        raise SystemExit(f"{so} does not exist; present: {', '.join(present) or 'none'}")
    shutil.copy2(so, dest / "bitsandbytes" / lib)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"packed bitsandbytes {bitsandbytes.__version__} (+ {lib}) and peft {peft.__version__} into {dest} "
          f"({size / 2**20:.1f} MiB): run with PYTHONPATH={dest}")


# ---- main --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "gpu_check.json")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--budget-s", type=float, default=220.0,
                    help="skip a stage whose estimate no longer fits in this many seconds since start (0: no limit)")
    ap.add_argument("--resume", action="store_true", help="keep --out's stages and run only those not ok there")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--pack", type=Path, default=None, help="copy bitsandbytes (Python + one CUDA library) and peft here")
    ap.add_argument("--bnb-cuda", default=None, help="with --pack: the CUDA version of the library, e.g. 128")
    ap.add_argument("--fail-stage", default=None, help="testing: make this stage raise")
    ap.add_argument("--exit-after", default=None, help="testing: end the process abruptly after this stage's write")
    args = ap.parse_args(argv)
    budget = Budget(args.budget_s)
    if args.pack:
        if not args.bnb_cuda:
            ap.error("--pack needs --bnb-cuda XYZ (the GPU machine's torch.version.cuda without the dot, e.g. 128)")
        pack(args.pack, args.bnb_cuda)
        return 0
    requested = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in requested if s not in STAGES]
    if unknown:
        ap.error(f"unknown stage {unknown[0]!r}. Available: {', '.join(STAGES)}")
    if args.shape == "7b" and args.device == "cpu":
        ap.error("the 7B shape on CPU would take hours: use --shape tiny --device cpu for the plumbing")

    doc = {"script": "benchmarks/gpu_check.py", "shape": args.shape, "device": args.device, "seed": args.seed,
           "budget_s": args.budget_s, "goals": GOALS, "sizes": SIZES[args.shape], "runs": [], "stages": {}}
    if args.resume and args.out.exists():
        old = json.loads(args.out.read_text())
        if (old.get("shape"), old.get("device")) != (args.shape, args.device):
            ap.error(f"{args.out} holds a {old.get('shape')}/{old.get('device')} run, not {args.shape}/{args.device}: "
                     "pick another --out or drop --resume")
        doc = old
    done = {k for k, v in doc["stages"].items() if v.get("status") == "ok"} if args.resume else set()
    doc["requested"] = sorted(set(doc.get("requested", [])) | set(requested) | {"preflight"}, key=STAGES.index)
    run = {"started": now(), "argv": sys.argv[1:] if argv is None else argv}
    doc["runs"].append(run)
    report = Report(args.out, doc)

    t0 = time.perf_counter()
    info, missing = preflight(args.device)  # always: it is the gate for everything else
    run["device_name"] = info.get("device_name", platform.processor() or "cpu")
    doc["stages"]["preflight"] = {"status": "error" if missing else "ok", "started": run["started"], "ended": now(),
                                  "seconds": round(time.perf_counter() - t0, 2), "run": len(doc["runs"]),
                                  "result": {**info, "missing": missing}}  # every run: it says what ran where
    report.write()
    if missing:
        print("gpu_check cannot run; missing:\n  - " + "\n  - ".join(missing), file=sys.stderr)
        return 2
    print(f"preflight ok: torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}, "
          f"bitsandbytes {info['bitsandbytes']}, {info.get('device_name', 'cpu')}")
    if args.exit_after == "preflight":
        os._exit(3)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    ck = Check(args, budget)
    failed = False
    for name in [s for s in STAGES if s in requested and s != "preflight" and s not in done]:
        started, t = now(), time.perf_counter()
        rec = {"started": started, "run": len(doc["runs"])}
        if ck.budget.left() < ESTIMATE_S[args.shape][name]:
            rec.update(status="skipped", reason=f"budget: {ck.budget.left():.0f} s left of {args.budget_s:g}, the stage "
                                                 f"needs about {ESTIMATE_S[args.shape][name]} s; rerun with --resume")
        else:
            print(f"{name} ...", flush=True)
            try:
                if name == args.fail_stage:
                    raise RuntimeError(f"planted failure (--fail-stage {name})")
                rec.update(status="ok", result=RUNNERS[name](ck))
            except Exception as e:  # noqa: BLE001 - recorded; the next stage still runs
                failed = True
                rec.update(status="error", error=f"{type(e).__name__}: {str(e)[:1000]}",
                           traceback=traceback.format_exc().strip().splitlines()[-8:])
                print(f"  {name} failed: {rec['error']}", file=sys.stderr)
        rec.update(ended=now(), seconds=round(time.perf_counter() - t, 2), elapsed_s=round(ck.budget.elapsed(), 2))
        doc["stages"][name] = rec
        report.write()
        print(f"  {name}: {rec['status']} in {rec['seconds']} s (elapsed {rec['elapsed_s']} s)", flush=True)
        if args.exit_after == name:
            os._exit(3)
    s = doc["summary"]
    print(f"wrote {args.out}: ok {', '.join(s['stages_ok'])}"
          + (f"; not done: {', '.join(s['incomplete'])} (rerun with --resume)" if s["incomplete"] else ""))
    print("summary: " + json.dumps({k: v for k, v in s.items() if k not in ("stages_ok", "incomplete")}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
