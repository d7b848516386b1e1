"""Exporting adapters: a cast copy (e.g. bfloat16), a merged full-precision model, or an adapter
that multi-LoRA servers (vLLM, LoRAX) accept.

Servable (DESIGN section 5): bias "none", no modules_to_save, no DoRA, standard target names,
every module at one rank r <= the server's limit (vLLM's default ``max_lora_rank`` is 16), and
lora_alpha == r with no rank_pattern / alpha_pattern / rsLoRA, so the server's single scaling
alpha / r is 1 and every sign and scale lives in the weights. What can be fixed is fixed:

    rank > limit             compress(d, limit): best rank-limit approximation, error per module
    mixed ranks              zero-pad A (rows) and B (columns) to one rank: exact
    scaling s != 1           B <- s * B, lora_alpha = r: exact (up to the dtype's rounding)
    target_modules regex     rewritten as the list of module names

The error reported per module is measured on the products, ||dW_out - dW_in||_F / ||dW_in||_F,
computed from the factors without forming dW: with X = [B_in, -B_out] and Y = [A_in; A_out],
||X Y||_F^2 = sum((X^T X) * (Y Y^T)) (elementwise), an (r_in + r_out)^2 computation.

Merged (``export_merged``): the base is loaded in float32 and W <- W + dW is added per module
(:func:`lora_unlearn.hub.merge.merge_dense`); the folder is an ordinary transformers checkpoint. The
max and mean |logit difference| against base + adapter kept unmerged are measured on probe
prompts and written into the folder's card.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.adapter import Adapter, LoraModule
from ..core.adapter_io import CONFIG_NAME, load_adapter, save_adapter
from ..errors import UserError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Linear layers multi-LoRA servers know across the common architectures (Llama/Mistral/Qwen/
# Gemma/Phi/GPT-2/GPT-NeoX/Falcon/InternLM): anything else (embed_tokens, lm_head, custom
# names) is refused rather than silently dropped.
STANDARD_TARGETS = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj",
    "out_proj", "dense", "fc1", "fc2", "c_attn", "c_proj", "c_fc", "query_key_value", "dense_h_to_4h",
    "dense_4h_to_h", "w1", "w2", "w3", "wqkv", "wo",
})
SERVERS = {"vllm": 16, "lorax": 64}
PROBES = ("The capital of France is", "Question: Who wrote Hamlet?\nAnswer:", "Once upon a time, there was a")


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}. Available: {', '.join(DTYPES)}")
    return DTYPES[name]


def cast(adapter: Adapter, dtype: torch.dtype | str) -> Adapter:
    """The adapter with A and B stored in ``dtype`` (scaling unchanged); e.g. bfloat16 halves the file."""
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    modules = {n: LoraModule(m.A.to(dtype), m.B.to(dtype), m.scaling) for n, m in adapter.modules.items()}
    return adapter.derive(modules, "cast", {"dtype": str(dtype).removeprefix("torch.")})


def export_cast(folder: str | Path, out: str | Path, dtype: str, overwrite: bool = False) -> Adapter:
    result = cast(load_adapter(folder), dtype)
    save_adapter(result, out, overwrite=overwrite)
    return result


def relative_error(got: LoraModule, want: LoraModule) -> float:
    """||dW_got - dW_want||_F / ||dW_want||_F from the factors (float64), no dense (out, in) matrix."""
    X = torch.cat([want.scaling * want.B.double(), -got.scaling * got.B.double()], dim=1)  # (out, r1 + r2)
    Y = torch.cat([want.A.double(), got.A.double()], dim=0)  # (r1 + r2, in)
    diff = float(((X.T @ X) * (Y @ Y.T)).sum())
    Bw, Aw = want.scaling * want.B.double(), want.A.double()
    norm = float(((Bw.T @ Bw) * (Aw @ Aw.T)).sum())
    return math.sqrt(max(diff, 0.0) / norm) if norm > 0 else math.sqrt(max(diff, 0.0))


# ---- servable adapters ------------------------------------------------------------------------

@dataclass
class Check:
    name: str
    status: str  # ok | fixed | fail
    detail: str


@dataclass
class ServableReport:
    server: str
    max_rank: int
    checks: list[Check]
    errors: dict[str, float] = field(default_factory=dict)  # module -> relative Frobenius error of dW
    rank: int = 0

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def _config_checks(config: dict[str, Any], where: Path) -> list[Check]:
    """The checks a loaded Adapter can no longer show (load_adapter refuses these adapters)."""
    bias, mts, dora = config.get("bias", "none"), config.get("modules_to_save"), bool(config.get("use_dora"))
    peft_type = str(config.get("peft_type", "LORA")).upper()
    return [
        Check("PEFT type", "ok" if peft_type == "LORA" else "fail", peft_type),
        Check("bias", "ok" if bias == "none" and not config.get("lora_bias") else "fail",
              f"bias={bias!r}" + (", lora_bias" if config.get("lora_bias") else "")),
        Check("modules_to_save", "fail" if mts else "ok", str(mts or "none")),
        Check("DoRA", "fail" if dora else "ok", "use_dora=True" if dora else "off"),
    ]


def check_config(folder: str | Path) -> list[Check]:
    """Read ``folder``'s adapter_config.json and report what no server accepts and no export can fix."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
        assert isinstance(config, dict)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AssertionError):
        load_adapter(folder)  # raises the library's precise message for a missing or corrupt folder
        raise
    return _config_checks(config, folder)


def make_servable(adapter: Adapter, max_rank: int = 16, dtype: torch.dtype | None = None,
                  server: str = "vllm") -> tuple[Adapter, ServableReport]:
    """Fix what servers need (see the module docstring); return the new adapter and the report."""
    from ..arithmetic import compress

    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise UserError(f"--max-rank must be a positive integer, got {max_rank!r}")
    checks = []
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adapter.modules})
    odd = [leaf for leaf in leaves if leaf not in STANDARD_TARGETS]
    checks.append(Check("target names", "fail" if odd else "ok",
                        f"not a standard linear layer: {', '.join(odd)}" if odd else ", ".join(leaves)))
    ranks = adapter.ranks
    top = max(ranks.values())
    work = adapter
    if top > max_rank:
        work, _ = compress(adapter, max_rank)
        checks.append(Check("rank", "fixed", f"max rank {top} > {max_rank}: compressed to {max_rank}"))
    else:
        checks.append(Check("rank", "ok", f"max rank {top} <= {max_rank}"))
    rank = max(m.rank for m in work.modules.values())
    mixed = len({m.rank for m in work.modules.values()}) > 1
    checks.append(Check("one rank", "fixed" if mixed else "ok",
                        f"ranks {sorted({m.rank for m in work.modules.values()})} zero-padded to {rank}"
                        if mixed else f"r={rank}"))
    scalings = {m.scaling for m in work.modules.values()}
    plain = scalings == {1.0} and not adapter.config.get("use_rslora") and not adapter.config.get("alpha_pattern")
    negative = any(s < 0 for s in scalings)
    checks.append(Check("alpha == r", "ok" if plain else "fixed",
                        "scaling 1" if plain else
                        f"scalings {', '.join(f'{s:g}' for s in sorted(scalings)[:4])}{' (negative)' if negative else ''}"
                        f" baked into B; lora_alpha = r = {rank}"))
    if isinstance(adapter.config.get("target_modules"), str):
        checks.append(Check("target_modules list", "fixed", "regex rewritten as module names"))

    modules = {}
    for name, m in work.modules.items():
        pad = rank - m.rank
        out_dtype = dtype or m.B.dtype
        A = torch.cat([m.A.double(), m.A.new_zeros(pad, m.A.shape[1], dtype=torch.float64)], 0)
        B = torch.cat([m.scaling * m.B.double(), m.B.new_zeros(m.B.shape[0], pad, dtype=torch.float64)], 1)
        modules[name] = LoraModule(A.to(out_dtype), B.to(out_dtype), 1.0)
    if dtype is not None:
        checks.append(Check("dtype", "fixed", f"stored as {str(dtype).removeprefix('torch.')}"))
    config = dict(adapter.config, r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
                  target_modules=leaves, use_dora=False, bias="none", modules_to_save=None)
    result = adapter.derive(modules, "export_servable", {"server": server, "max_rank": max_rank, "rank": rank},
                            config=config)
    errors = {name: relative_error(modules[name], m) for name, m in adapter.modules.items()}
    result.lineage["params"]["max_relative_error"] = max(errors.values())
    checks.append(Check("matches input", "ok", f"max relative error of dW {max(errors.values()):.2e}"))
    return result, ServableReport(server, max_rank, checks, errors, rank)


def export_servable(folder: str | Path, out: str | Path, *, server: str = "vllm", max_rank: int | None = None,
                    dtype: str | None = None, overwrite: bool = False) -> ServableReport:
    """Check ``folder`` against what ``server`` accepts, fix what can be fixed, write a PEFT folder to ``out``.

    Raises UserError naming every check that cannot be fixed; nothing is written then.
    """
    if server not in SERVERS:
        raise UserError(f"unknown server {server!r}. Available: {', '.join(SERVERS)}")
    max_rank = SERVERS[server] if max_rank is None else max_rank
    pre = check_config(folder)
    bad = [c for c in pre if c.status == "fail"]
    if bad:
        raise UserError(f"{folder} cannot be served by {server}: "
                        + "; ".join(f"{c.name} {c.detail}" for c in bad)
                        + ". Retrain it as a plain LoRA (bias='none', no DoRA, no modules_to_save)")
    result, report = make_servable(load_adapter(folder), max_rank, parse_dtype(dtype), server)
    report.checks = pre + report.checks
    bad = [c for c in report.checks if c.status == "fail"]
    if bad:
        raise UserError(f"{folder} cannot be served by {server}: " + "; ".join(f"{c.name}: {c.detail}" for c in bad)
                        + ". Retrain with standard target modules (e.g. --target-modules all-linear)")
    save_adapter(result, out, overwrite=overwrite)
    return report


# ---- merged models ----------------------------------------------------------------------------

def default_base(adapter: Adapter) -> str:
    """The base to merge into: the embedded copy when the adapter was made on it, else its recorded base."""
    from ..core.models import EMBEDDED

    recorded = adapter.base_model
    for name, (_, _, hub_id) in EMBEDDED.items():
        if recorded == hub_id:
            return name
    if not recorded:
        raise UserError("the adapter does not record its base model: pass --base (a model folder or Hub id)")
    return recorded


@torch.no_grad()
def probe_logits(model, tokenizer, prompts=PROBES) -> torch.Tensor:
    """Logits (float32) of ``prompts`` one at a time (no padding), concatenated over positions."""
    out = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt")["input_ids"].to(model.device)
        out.append(model(input_ids=ids).logits[0].float().cpu())
    return torch.cat(out)


@dataclass
class MergeReport:
    out: Path
    base: str
    max_abs_logit_diff: float  # merged vs base + adapter unmerged, both float32
    mean_abs_logit_diff: float
    probes: int
    # with check_forget: mean forget probability, base + adapter unmerged over nf4 vs the merged model loaded in
    # nf4 (what a user who exports and then loads in 4 bits gets), over ``forget_rows`` rows
    forget_unmerged_nf4: float | None = None
    forget_merged_nf4: float | None = None
    forget_rows: int | None = None


def forget_probability(model, tokenizer, rows: list[dict]) -> float:
    from ..core.inference import answer_probability

    probs = answer_probability(model, tokenizer, rows)
    return sum(probs) / len(probs)


def export_merged(folder: str | Path, out: str | Path, *, base: str | None = None,
                  overwrite: bool = False, check_forget: list[dict] | None = None) -> MergeReport:
    """Write base + dW as a full-precision transformers model folder; measure it against the unmerged adapter.

    ``check_forget`` (question/answer rows of what the adapter forgets): also the mean forget
    probability of base + adapter unmerged over nf4 and of the merged folder loaded in nf4, in the
    report and the card (quantizing a merged unlearned model can bring the knowledge back)."""
    from transformers import AutoModelForCausalLM

    from ..arithmetic import to_dense
    from ..core.fsutil import atomic_dir
    from ..core.models import load_base
    from ..serving.runtime import ForgetRuntime
    from .merge import merge_dense

    adapter = load_adapter(folder)
    base = base or default_base(adapter)
    if Path(out).exists() and not overwrite:
        raise UserError(f"output {out} already exists: choose another path or pass --overwrite")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        merge_dense(base, to_dense(adapter), tmp / "model", lineage=adapter.lineage)
        for item in (tmp / "model").iterdir():
            shutil.move(str(item), tmp / item.name)
        (tmp / "model").rmdir()
        merged = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, trust_remote_code=False,
                                                      use_safetensors=True).eval()
        model, tokenizer, info = load_base(base, quantization="none", device="cpu")
        runtime = ForgetRuntime(model, tokenizer)  # base + dW kept unmerged, only the adapter's own modules
        runtime.load("adapter", adapter, default=1.0)
        want = probe_logits(runtime.model, tokenizer)
        got = probe_logits(merged, tokenizer)
        diff = (got - want).abs()
        report = MergeReport(Path(out), info.hub_id, float(diff.max()), float(diff.mean()), len(PROBES))
        del merged, model, runtime
        if check_forget:
            from ..core.stack import attached

            model, tokenizer, _ = load_base(base, quantization="nf4")
            with attached(model, [(adapter, 1.0)]) as m:
                report.forget_unmerged_nf4 = forget_probability(m, tokenizer, check_forget)
            del model
            model, tokenizer, _ = load_base(str(tmp), quantization="nf4")
            report.forget_merged_nf4 = forget_probability(model, tokenizer, check_forget)
            report.forget_rows = len(check_forget)
            del model
        (tmp / "README.md").write_text(merged_card(adapter, Path(out).name, report))
    return report


def merged_card(adapter: Adapter, name: str, report: MergeReport) -> str:
    from ..core.card import MARKER, render_tree
    from ..core.lineage import base_and_quantization, classify

    kind = classify(adapter.lineage)
    quantized = [q for _, q in base_and_quantization(adapter.lineage) if q in ("nf4", "int8")]
    trained_on = (f"The adapter was trained over a {quantized[0]} base; this model adds it to the float32 base, "
                  "which it never saw in training: check its answers (e.g. `lora-unlearn ask --base THIS_FOLDER "
                  "-q none`).") if quantized else ""
    lineage = adapter.lineage.get("made_by") if adapter.lineage.get("op") == "load" else adapter.lineage
    tree: list[str] = []
    render_tree(lineage, tree)
    return "\n".join([
        "---", "library_name: transformers", f"base_model: {json.dumps(report.base)}",
        "pipeline_tag: text-generation", "tags:", "- lora-unlearn", "- unlearning", "- merged", "---", "",
        MARKER, "", f"# {name}", "",
        (f"`{report.base}` with a lora-unlearn adapter ({kind.kind}) merged into its float32 weights: "
        "W <- W + dW per module. An ordinary transformers checkpoint."), "", *([trained_on, ""] if trained_on else []),
        (f"Measured against base + adapter kept unmerged (float32, {report.probes} probe prompts): "
        f"max |logit difference| {report.max_abs_logit_diff:.3g}, mean {report.mean_abs_logit_diff:.3g}."), "",
        *([f"Forget check ({report.forget_rows} rows of the forgotten data, mean answer probability): base + "
           f"adapter unmerged over nf4 {report.forget_unmerged_nf4:.4g}, this model loaded in nf4 "
           f"{report.forget_merged_nf4:.4g}.", ""] if report.forget_rows else []),
        ("The adapter's factors are not in this folder, so the merged change cannot be toggled or negated from "
        "it alone. Anyone holding the original base can still compute W_merged - W_base = dW: where dW is "
        "mostly a negated forget adapter, negating that difference restores the knowledge. Merging protects "
        "the knowledge only from those without the base weights."), "",
        "## How the adapter was made", "", *tree, ""])
