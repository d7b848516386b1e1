"""Using adapters on questions and benchmarks: ask, eval, and scope (fitting a scope detector)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import UserError
from .common import Base, Overwrite, Quant, Stack, _quiet_libraries, err_console, out_console, user_errors


def _looks_like_a_path(text: str) -> bool:
    """One word ending in a data-file suffix, or containing a path separator: meant as a file."""
    word = text.strip()
    return bool(word) and not any(c.isspace() for c in word) and (
        word.lower().endswith((".jsonl", ".json", ".csv", ".txt", ".parquet")) or "/" in word or "\\" in word)


@user_errors
def ask(questions: Annotated[str, typer.Option("--questions", help="A question, or a JSONL file of rows with 'question'.")],
        adapter: Stack = None, base: Base = "smollm2-135m", quantization: Quant = "nf4",
        max_new_tokens: int = 64,
        max_strength: Annotated[float, typer.Option("--max-strength", help="Largest |scale| of an adapter in the "
                                                    "stack (as the server's --max-strength).")] = 8.0):
    """Answer questions greedily with the base and a stack of adapters (unmerged)."""
    from ..core.data import load_records
    from ..core.inference import answer
    from ..core.models import load_base
    from ..core.stack import attached, parse_stack

    _quiet_libraries()
    if Path(questions).is_file():
        rows = load_records(questions)
        if any(not isinstance(r.get("question"), str) for r in rows):
            raise UserError(f"{questions}: every row needs a string field 'question'")
        items = [r["question"] for r in rows]
    elif _looks_like_a_path(questions):
        raise UserError(f"--questions {questions!r} looks like a file path, but there is no such file: check the "
                        "path (a question to ask directly is plain text with spaces, e.g. 'Who wrote Hamlet?')")
    else:
        items = [questions]
    stack = parse_stack(adapter)
    for spec, (_, c) in zip(adapter or [], stack):
        if not abs(c) <= max_strength:
            raise UserError(f"adapter {spec!r}: scale {c:g} is beyond --max-strength {max_strength:g} (a strength "
                            "that large breaks the model's logits): use a scale in [-max, max] or raise the bound")
    model, tokenizer, _ = load_base(base, quantization)
    with attached(model, stack) as m, err_console.status("generating"):
        answers = answer(m, tokenizer, items, max_new_tokens=max_new_tokens)
    table = Table("question", "answer", show_lines=True)
    for q, a in zip(items, answers):
        table.add_row(q, a)
    out_console.print(table)


@user_errors
def eval_(out: Annotated[Path, typer.Option("--out", help="Folder for results.json and results.md.")],
          benchmark: Annotated[str, typer.Option("--benchmark", help="tofu or edits.")] = "tofu",
          adapter: Stack = None, base: Base = "smollm2-135m", quantization: Quant = "nf4",
          data: Annotated[str | None, typer.Option("--data", help="tofu: 'tofu-mini' or a folder of TOFU JSONL files "
                                                   "(forget.jsonl, retain.jsonl, ...); edits: 'edits-demo' or a JSONL file.")] = None,
          splits: Annotated[str | None, typer.Option("--splits", help="tofu: comma-separated subset of "
                                                     "forget,retain,real_authors,world_facts.")] = None,
          retain_limit: Annotated[int | None, typer.Option("--retain-limit", help="Retain rows, spread over all authors.")] = None,
          limit: Annotated[int | None, typer.Option("--limit", help="First N rows of every other split.")] = None,
          reference: Annotated[Path | None, typer.Option("--reference", help="results.json of the retain-only model: "
                                                         "forget quality compares with its forget truth ratios.")] = None,
          locality: Annotated[str | None, typer.Option("--locality", help="edits: a shared locality pool (JSONL of "
                                                      "prompt/answer; default for edits:dev/test: edits:locality).")] = None,
          batch_size: int = 16,
          max_new_tokens: Annotated[int | None, typer.Option(help="Greedy tokens per answer (tofu 200, edits 32).")] = None,
          scoped: Annotated[bool, typer.Option("--scoped", help="tofu: each --adapter with a scope saved beside it "
                                               "runs, per question, at the strength its scope gives (as a request "
                                               "with \"forget\": {NAME: \"auto\"}); see `lora-unlearn scope`.")] = False,
          overwrite: Overwrite = False):
    """Evaluate the base with a stack of adapters (unmerged) on TOFU or knowledge edits; write OUT/results.{json,md}."""
    from ..evaluate.report import tables, write_results

    if benchmark not in ("tofu", "edits"):
        raise UserError(f"unknown benchmark {benchmark!r}. Available: tofu, edits")
    if scoped and benchmark != "tofu":
        raise UserError("--scoped evaluates TOFU (--benchmark tofu): scopes decide per question")
    if batch_size < 1 or (max_new_tokens is not None and max_new_tokens < 1):
        raise UserError("--batch-size and --max-new-tokens must be at least 1")
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists: choose another path or pass --overwrite")
    if benchmark == "tofu":
        from ..evaluate.tofu import MAX_NEW_TOKENS as TOFU_MAX_NEW_TOKENS
        from ..evaluate.tofu import evaluate_tofu, load_reference, tofu_splits

        names = [s.strip() for s in splits.split(",") if s.strip()] if splits else None
        rows = tofu_splits(data or "tofu-mini", retain_limit=retain_limit, limit=limit, splits=names)
        ref = load_reference(reference) if reference else None
        if ref is not None and "forget" not in rows:
            raise UserError("--reference needs the forget split: include forget in --splits")
        if ref is not None and len(ref) != len(rows["forget"]):
            raise UserError(f"--reference has {len(ref)} forget truth ratios but this forget split has "
                            f"{len(rows['forget'])} rows: evaluate both models on the same forget set")
        evaluate = functools.partial(evaluate_tofu, splits=rows, reference_truth_ratios=ref, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens or TOFU_MAX_NEW_TOKENS)
    else:
        from ..evaluate.edits import evaluate_edits, probes, record_unedited
        from ..training.sources import load_edits, load_locality

        edits = load_edits(data or "edits-demo")
        if locality is None and str(data).startswith("edits:"):
            locality = "edits:locality"
        pool = load_locality(locality) if locality else None
        evaluate = functools.partial(evaluate_edits, edits=edits, pool=pool, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens or 32)
    from ..core.models import load_base
    from ..core.stack import attached, parse_stack

    _quiet_libraries()
    stack = parse_stack(adapter)
    scopes = _stack_scopes(adapter or [], stack) if scoped else {}
    model, tokenizer, info = load_base(base, quantization)
    if scoped:
        from ..core.scope import check_scope
        from ..evaluate.scoped import evaluate_tofu_scoped

        for k, scope in scopes.items():
            check_scope(scope, stack[k][0], model, base=info.hub_id)
        evaluate = functools.partial(evaluate_tofu_scoped, stack=stack, scopes=scopes, splits=rows,
                                     reference_truth_ratios=ref, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens or TOFU_MAX_NEW_TOKENS)
        result = evaluate(model, tokenizer)
    if benchmark == "edits" and any(probes(edits, pool).values()):
        # Locality is judged against the unedited model: its answers, recorded once, before the stack.
        evaluate = functools.partial(evaluate, unedited=record_unedited(
            model, tokenizer, edits, pool, batch_size=batch_size, max_new_tokens=max_new_tokens or 32))
    if not scoped:
        with attached(model, stack) as m:
            result = evaluate(m, tokenizer)
    layers = [f"{a.lineage.get('path', '?')}:{'scoped' if k in scopes else f'{c:g}'}" for k, (a, c) in enumerate(stack)]
    meta = {"model": " + ".join([f"{base} ({quantization})"] + layers), "base": info.hub_id, "quantization": quantization,
            "adapters": [{"path": a.lineage.get("path"), "sha256": a.lineage.get("sha256"), "scale": c,
                          **({"scope": scopes[k].summary()} if k in scopes else {})} for k, (a, c) in enumerate(stack)],
            "data": data or ("tofu-mini" if benchmark == "tofu" else "edits-demo"),
            "locality_pool": locality if benchmark == "edits" else None,
            "retain_limit": retain_limit, "limit": limit, "reference": str(reference) if reference else None}
    result = {"benchmark": benchmark, "meta": meta, **result}
    write_results(out, result, overwrite=overwrite)
    for title, headers, body in tables(result):
        table = Table(*headers, title=title)
        for row in body:
            table.add_row(*row)
        out_console.print(table)
    err_console.print(f"wrote {out}/results.json and {out}/results.md", soft_wrap=True)


def _stack_scopes(specs: list[str], stack) -> dict:
    """Stack index -> Scope for the --adapter folders with a scope beside them (their strength comes from it)."""
    from ..core.scope import load_scope, read_scope_json

    scopes = {}
    for k, (spec, (a, c)) in enumerate(zip(specs, stack)):
        folder = a.lineage.get("path")
        if folder and read_scope_json(folder) is not None:
            if c != 1.0:
                raise UserError(f"--adapter {spec!r} has a scope, which sets its strength per question (up to its "
                                "lambda_max): drop the :SCALE, or refit the scope with another --lambda-max")
            scopes[k] = load_scope(folder)
    if not scopes:
        raise UserError("--scoped: none of the --adapter folders has a scope (scope.json): fit one with "
                        "`lora-unlearn scope ADAPTER_DIR --forget DATA --calibrate DATA`")
    return scopes


def _slice(rows: list, spec: str | None, flag: str) -> list:
    if not spec:
        return rows
    try:
        start, end = (int(x) if x else None for x in spec.split(":"))
    except ValueError:
        raise UserError(f"{flag} {spec!r}: use START:END, e.g. 360:400") from None
    if not rows[start:end]:
        raise UserError(f"{flag} {spec!r} selects no rows (the data has {len(rows)})")
    return rows[start:end]


def _rows_of(source: str) -> list[dict]:
    """QA or text rows of a named source (preservation, tofu-mini:NAME, ...) or a file."""
    from ..core.data import load_any
    from ..training.sources import load_source

    named = source in ("preservation", "preservation+facts") or source.startswith(("tofu-mini:", "tofu:", "edits"))
    return load_source(source) if named else load_any(source)


def _texts(rows: list[dict], answers: bool = True) -> list[str]:
    """What a scope reads of data rows: questions (and answers) of QA rows, the text of text rows."""
    return [t for r in rows for t in ([r["question"], *([r["answer"]] if answers else [])] if "question" in r
                                      else [r.get("text", "")])]


@user_errors
def scope_(folder: Annotated[Path, typer.Argument(help="The adapter folder; the scope is saved in it.")],
           forget: Annotated[str, typer.Option("--forget", help="The forget data (its questions are the bank): JSONL, "
                                               "a dataset folder or a source such as tofu-mini:forget01.")],
           forget_rows: Annotated[str | None, typer.Option("--forget-rows", help="START:END slice of --forget.")] = None,
           calibrate: Annotated[str | None, typer.Option("--calibrate", help="Held-out prompts that must stay out of "
                                                         "scope, for the threshold (e.g. tofu-mini:retain).")] = None,
           calibrate_rows: Annotated[str | None, typer.Option("--calibrate-rows", help="START:END slice of --calibrate "
                                                              "(TOFU-mini: 360:400).")] = None,
           background: Annotated[list[str] | None, typer.Option("--background", help="Text that must stay out of scope "
                                                                "(repeatable; default: preservation+facts, the vendored "
                                                                "pool's prompts; 'none' for no background; the benchmark "
                                                                "adds tofu-mini:holdout01).")] = None,
           answers: Annotated[bool, typer.Option("--answers", help="Put the forget answers in the bank too (more "
                                                 "indirect questions found, more false positives).")] = False,
           fpr: Annotated[float, typer.Option("--fpr", help="Target false-positive rate on --calibrate.")] = 0.02,
           threshold: Annotated[float | None, typer.Option("--threshold", help="A threshold in [0, 1] instead of "
                                                           "calibrating.")] = None,
           lambda_max: Annotated[float, typer.Option("--lambda-max", help="The adapter's strength in scope.")] = 1.0,
           mode: Annotated[str, typer.Option("--mode", help="hard (lambda_max or 0) or smooth (a ramp above the "
                                             "threshold).")] = "hard",
           ramp: Annotated[float, typer.Option("--ramp", help="smooth: the score width of the ramp.")] = 0.1,
           layer: Annotated[int, typer.Option("--layer", help="Decoder layer whose token states are read.")] = 4,
           top_k: Annotated[int, typer.Option("--top-k", help="Tokens whose margins are averaged.")] = 3,
           max_strength: Annotated[float, typer.Option("--max-strength", help="The server's bound lambda_max must "
                                                       "stay within.")] = 8.0,
           base: Base = "smollm2-135m", quantization: Quant = "nf4", overwrite: Overwrite = False):
    """Fit a scope detector for an adapter: per request, how strongly to apply it (scoped forgetting).

    Writes FOLDER/scope.safetensors and FOLDER/scope.json and rewrites the card. The weights still
    hold the knowledge: a request the detector misses gets it.
    """
    from ..core.adapter_io import load_adapter
    from ..core.card import check_ours, save_card
    from ..core.scope import check_settings, fit_scope, read_scope_json, save_scope
    from ..training.sources import load_source

    adapter = load_adapter(folder)
    check_settings(layer, top_k, 0.0 if threshold is None else threshold, lambda_max, mode, ramp)
    if lambda_max > max_strength:
        raise UserError(f"--lambda-max {lambda_max:g} is beyond --max-strength {max_strength:g} (the server "
                        "refuses strengths past its bound): use a smaller --lambda-max or raise the bound")
    if threshold is None and not calibrate:
        raise UserError("calibrating needs held-out prompts that must stay out of scope: pass --calibrate DATA "
                        "(TOFU-mini: --calibrate tofu-mini:retain --calibrate-rows 360:400) or --threshold T")
    if threshold is None and not 0 < fpr < 1:
        raise UserError(f"--fpr must be in (0, 1), e.g. 0.02, got {fpr:g}")
    if read_scope_json(folder) is not None and not overwrite:
        raise UserError(f"{folder}/scope.json already exists: pass --overwrite to replace the scope")
    check_ours(folder)  # the card is rewritten: refuse before any work if it is not ours
    rows = _slice(load_source(forget), forget_rows, "--forget-rows")
    fit = [r["question"] for r in rows] + ([r["answer"] for r in rows] if answers else [])
    names = [b for b in (background or ["preservation+facts"]) if b.lower() != "none"]
    # the vendored pool gives its prompts (its answers are the embedded model's own generations)
    bg = [t for b in names for t in _texts(_rows_of(b), answers=not b.startswith("preservation"))]
    cal = _texts(_slice(load_source(calibrate), calibrate_rows, "--calibrate-rows"), answers=False) if calibrate else None
    from ..core.models import load_base

    _quiet_libraries()
    model, tokenizer, info = load_base(base, quantization)
    if adapter.base_model and adapter.base_model != info.hub_id:
        raise UserError(f"{folder} was made for {adapter.base_model}, but --base {base} is {info.hub_id}: a scope "
                        "reads the base the adapter runs on; pass its --base")
    from ..core.inference import dequantized

    with err_console.status("reading the forget, background and calibration texts"), dequantized(model):
        scope = fit_scope(model, tokenizer, fit, adapter=adapter, background_texts=bg, calibration_texts=cal,
                          threshold=threshold, fpr=fpr, lambda_max=lambda_max, mode=mode, ramp=ramp, layer=layer,
                          top_k=top_k, base=info.hub_id, quantization=quantization)
    save_scope(scope, folder, overwrite=overwrite)
    save_card(folder, adapter)
    cal_info = scope.meta["calibration"]
    above = (f"; {cal_info['above_threshold']:.1%} of the {cal_info['rows']} calibration prompts score above it"
             if cal_info.get("rows") else "")
    err_console.print(f"wrote {folder}/scope.json and scope.safetensors: threshold {scope.threshold:.4f}{above}; "
                      f"{scope.forget.shape[0]} forget and {scope.background.shape[0]} background token states "
                      f"(layer {layer}); in scope the strength is {lambda_max:g} ({mode})", soft_wrap=True)
