"""Running a recipe: each step in order, in ``OUT.partial/``, published to ``OUT`` when all are done.

A step trains an adapter (:mod:`.trainer`), estimates PerTA importance (:mod:`.importance`),
applies an arithmetic operation (:mod:`lora_unlearn.arithmetic`) or fits a scope detector
(:mod:`lora_unlearn.core.scope`: saved in ``steps/NAME/`` and beside the adapter it scopes, and in
``adapter/`` when that adapter is the output); finished steps survive a kill and are read back
with ``--resume``. The schema and its checks: :mod:`.recipes`.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from .recipes import DataEntry, OpSpec, Recipe, Step, split_ref


def apply_op(op: OpSpec, artifacts: dict[str, Any], record: dict[str, Any]):
    from .. import arithmetic
    from ..arithmetic import perta

    args = [artifacts[split_ref(r)[0]] for r in op.inputs]
    scales = [split_ref(r)[1] for r in op.inputs]
    p = op.params
    if op.name == "negate":
        return arithmetic.negate(args[0], p.get("lam", 1.0))
    if op.name == "scale":
        return arithmetic.scale(args[0], p.get("c", 1.0))
    if op.name == "extrapolate":
        return arithmetic.extrapolate(args[0], p.get("alpha", 0.0))
    if op.name == "add":
        return arithmetic.add(*[a if s == 1.0 else arithmetic.scale(a, s) for a, s in zip(args, scales)])
    if op.name == "compress":
        adapter, errors = arithmetic.compress(args[0], int(p["rank"]))
        record["relative_errors"] = errors
        return adapter
    knobs = {k: p[k] for k in ("beta", "eps", "p") if k in p}
    if op.name == "perta_b":
        return perta.rescale_b(args[0], args[1], args[2], **knobs)
    dense = perta.rescale_dense(args[0], args[1], args[2], **knobs)
    adapter, errors = perta.compress_dense(dense, int(p.get("rank", max(args[0].ranks.values()))), args[0])
    record["relative_errors"] = errors
    return adapter


def fit_step_scope(step: Step, artifacts: dict[str, Any], rows: dict[str, list[dict]], loaded, quantization: str):
    """A ``scope`` step: the detector of :mod:`lora_unlearn.core.scope` for the step's adapter, on the base alone."""
    from ..core.inference import dequantized
    from ..core.scope import fit_scope
    from .sources import load_source

    spec = step.scope
    model, tok, info = loaded
    forget = [r["question"] for r in rows[spec.data]] + ([r["answer"] for r in rows[spec.data]] if spec.answers else [])

    def texts(data: list[dict]) -> list[str]:
        return [t for r in data for t in ([r["question"], r["answer"]] if "question" in r else [r["text"]])]

    # the vendored pool gives its prompts (its answers are the embedded model's own generations)
    background = [r["question"] for r in load_source("preservation+facts")] + [t for name in spec.background
                                                                        for t in texts(rows[name])]
    calibration = None
    if spec.calibrate:
        data = rows[spec.calibrate]
        start, end = ((int(x) if x else None for x in spec.calibrate_rows.split(":")) if spec.calibrate_rows
                      else (None, None))
        calibration = [r.get("question", r.get("text", "")) for r in data[start:end]]
        if not calibration:
            raise UserError(f"step {step.name!r}: calibrate_rows {spec.calibrate_rows!r} selects no rows of "
                            f"{spec.calibrate!r} ({len(data)} rows)")
    with dequantized(model):
        return fit_scope(model, tok, forget, adapter=artifacts[split_ref(spec.adapter)[0]], background_texts=background,
                         calibration_texts=calibration, threshold=spec.threshold, fpr=spec.fpr,
                         lambda_max=spec.lambda_max, mode=spec.mode, ramp=spec.ramp, layer=spec.layer,
                         top_k=spec.top_k, base=info.hub_id, quantization=quantization)


def write_scope(scope, folder: Path | None, adapter_folder: Path, artifacts: dict[str, Any], step: Step) -> None:
    """Save a scope step's detector in its own step folder and beside its adapter (whose card then describes it)."""
    from ..core.card import save_card
    from ..core.scope import save_scope

    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        save_scope(scope, folder, overwrite=True)
    if adapter_folder.is_dir():  # an adapter made by this run (an input adapter's folder is not written to)
        save_scope(scope, adapter_folder, overwrite=True)
        save_card(adapter_folder, artifacts[split_ref(step.scope.adapter)[0]])


def _rows(entry: DataEntry, tofu_dir: str | None) -> list[dict[str, str]]:
    from .sources import load_source

    sources = [entry.source] if isinstance(entry.source, str) else entry.source
    rows = [row for source in sources for row in load_source(source, entry.view, tofu_dir)]
    if entry.clear_of:
        from .preservation import clear_of

        away = [row for source in entry.clear_of for row in load_source(source, tofu_dir=tofu_dir)]
        rows = clear_of(rows, away, pool_name=f"data {', '.join(sources)}", what=", ".join(entry.clear_of))
    return rows[: entry.limit] if entry.limit else rows


def _preservation(recipe: Recipe, rows: dict[str, list[dict[str, str]]]) -> dict[str, list[dict[str, str]]]:
    """Each training step's preservation rows, checked before any work.

    A step's ``preserve`` stream (nll), or a ``retain`` stream drawn from the vendored pool, loses
    the rows that repeat or mention the step's other data (what it learns;
    :func:`~lora_unlearn.training.preservation.clear_of`), and is refused if it repeats an edit file's
    evaluation probes (paraphrases, locality and neighbourhood prompts), or if a row it keeps
    mentions them.
    """
    from .preservation import check_pool, clear_of
    from .sources import load_edits

    probes = {name: [{"prompt": p} for e in load_edits(src) for p in e.get("paraphrases", [])]
              + [q for e in load_edits(src) for key in ("locality", "neighbourhood") for q in e.get(key) or []]
              for name, d in recipe.data.items() if d.view.startswith("edits_")
              for src in ([d.source] if isinstance(d.source, str) else d.source)}
    pools = {}
    for step in recipe.steps:
        if not step.train:
            continue
        data = step.train.data
        retain = data.get("retain")
        kept = data.get("preserve") or (retain if retain and recipe.data[retain].source == "preservation" else None)
        if kept is None:
            continue
        name = f"preservation stream {kept!r} of step {step.name!r}"
        evaluation = [row for d in data.values() if d != kept for row in probes.get(d, [])]
        check_pool(rows[kept], evaluation, pool_name=name, what="the edit file's evaluation prompts", terms=False)
        pools[step.name] = clear_of(rows[kept], [row for d in data.values() if d != kept for row in rows[d]],
                                    pool_name=name, what="the step's other data")
        check_pool(pools[step.name], evaluation, pool_name=name, what="the edit file's evaluation prompts")
    return pools


def _restore(step: Step, folder: Path):
    """A finished step's result, read back from the work folder of an interrupted run."""
    from dataclasses import replace

    from ..core.adapter_io import load_adapter

    if step.importance is not None:
        from .importance import load_importance

        return load_importance(folder / "importance.safetensors")[0]
    if step.scope is not None:
        from ..core.scope import load_scope

        return load_scope(folder)
    adapter = load_adapter(folder)
    return replace(adapter, lineage=adapter.lineage.get("made_by") or adapter.lineage)


def run_recipe(recipe: Recipe, out: str | Path, overwrite: bool = False, loaded=None, console=None,
               resume: bool = False, checkpoint_every: int = 50) -> dict[str, Any]:
    """Run every step; write each adapter under ``out/steps/NAME``, the result under ``out/adapter``.

    A train step with ``snapshots`` also keeps its adapter after those optimizer steps, under
    ``out/snapshots/NAME/step-N`` (what ``select NAME.steps`` sweeps).

    The run works in ``OUT.partial/`` and renames it to ``out`` when every step is done. Training
    steps save Trainer checkpoints every ``checkpoint_every`` optimizer steps (0: none) under
    ``OUT.partial/checkpoints/STEP``. With ``resume``, an interrupted run of the same recipe
    (same settings, data and input adapters) continues: finished steps are read back from
    ``OUT.partial/steps``, the interrupted training step resumes from its newest checkpoint.
    Under a distributed launcher every process runs every step; only process 0 writes.
    """
    from ..core.adapter import Adapter
    from ..core.adapter_io import load_adapter, save_adapter
    from ..core.data import fingerprint
    from ..core.fsutil import publish
    from .jobs import (
        Checkpoints,
        claim,
        cleanup_unless_resumable,
        is_main_process,
        open_job,
        sharded_quant_storage,
        wait_for_everyone,
        work_dir,
        write_json,
    )
    from .trainer import TrainConfig, train_adapter

    out = Path(out)
    from ..core.fsutil import check_separate

    check_separate(out, recipe.adapters.values(), what="input adapter")
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists: choose another path or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder: choose another path")
    if checkpoint_every < 0:
        raise UserError(f"--checkpoint-every must be >= 0 steps (0: no checkpoints), got {checkpoint_every}")
    artifacts: dict[str, Any] = {}
    for name, path in recipe.adapters.items():
        if not Path(path).is_dir():
            raise UserError(f"input adapter {name!r} at {path} does not exist: create it first "
                            f"(for TOFU-mini: lora-unlearn run recipes/knowledge.yaml --out runs/tofu_mini/knowledge) "
                            f"or point --set adapters.{name}=DIR at yours")
        artifacts[name] = load_adapter(path)
    rows = {name: _rows(d, recipe.tofu_dir) for name, d in recipe.data.items()}
    pools = _preservation(recipe, rows)

    def model():
        nonlocal loaded
        if loaded is None:
            from ..core.models import load_base

            storage = sharded_quant_storage()
            loaded = load_base(recipe.base.model, recipe.base.quantization,
                               **({"quant_storage": storage} if storage else {}))
        return loaded

    main = is_main_process()
    work = work_dir(out)
    claim(work, resume, out)
    job = {"recipe": recipe.model_dump(), "data": {name: fingerprint(r) for name, r in rows.items()},
           "inputs": {name: artifacts[name].lineage.get("sha256") for name in recipe.adapters}}
    open_job(work, job, resume)  # refuses another recipe's work folder; a fresh start empties it
    progress_file = work / "progress.json"
    done = {r["name"]: r for r in json.loads(progress_file.read_text())} if resume and progress_file.is_file() else {}
    if main:
        (work / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(), sort_keys=False))

    report: dict[str, Any] = {"recipe": recipe.name, "steps": []}
    if done:
        report["steps_read_back"] = [s.name for s in recipe.steps if s.name in done]
    with cleanup_unless_resumable(work):
        for step in recipe.steps:
            folder = work / "steps" / step.name
            if step.name in done:
                if console is not None and main:
                    console.print(f"[bold]step {step.name}[/] (done before the interruption: read back)")
                artifacts[step.name] = _restore(step, folder)
                report["steps"].append(done[step.name])
                continue
            if console is not None and main:
                console.print(f"[bold]step {step.name}[/]")
            record: dict[str, Any] = {"name": step.name}
            start = time.perf_counter()
            if step.train:
                m, tok, info = model()
                spec = step.train
                config = TrainConfig(**{**recipe.train_defaults, **spec.config, "objective": spec.objective,
                                        "extra": spec.params})
                stack = [(artifacts[split_ref(r)[0]], split_ref(r)[1]) for r in spec.over]
                checkpoints = (Checkpoints(work / "checkpoints" / step.name, every=checkpoint_every, resume=resume)
                               if checkpoint_every else None)
                streams = {s: rows[d] for s, d in spec.data.items()}
                if step.name in pools:
                    streams["preserve" if "preserve" in spec.data else "retain"] = pools[step.name]
                snapshots = None
                if spec.snapshots:
                    def keep(n: int, adapter, where=work / "snapshots" / step.name) -> None:
                        if main:
                            save_adapter(adapter, where / f"step-{n}", overwrite=True)
                    snapshots = (spec.snapshots, keep)
                result = train_adapter(m, tok, streams, config, stack, info,
                                       progress=main, checkpoints=checkpoints, snapshots=snapshots)
                if spec.snapshots:  # every one up to the last step (those before a resume were kept then)
                    record["snapshots"] = [n for n in spec.snapshots if n <= result.lineage["steps"]]
            elif step.importance:
                from .importance import estimate_importance, importance_meta, save_importance

                m, tok, info = model()
                spec = step.importance
                stack = [(artifacts[split_ref(r)[0]], split_ref(r)[1]) for r in spec.over]
                adapter = artifacts[split_ref(spec.adapter)[0]]
                knobs = {"kind": spec.kind, "space": spec.space, "at": spec.at, "accumulate": spec.accumulate,
                         "batch_size": spec.batch_size, "rows_per_pass": spec.rows_per_pass,
                         "max_length": recipe.train_defaults.get("max_length", 256)}
                result = estimate_importance(m, tok, rows[spec.data], adapter, stack=stack, progress=main, **knobs)
                if main:
                    save_importance(result, folder / "importance.safetensors",
                                    importance_meta(rows[spec.data], adapter, stack=stack, base=info.hub_id, **knobs))
            elif step.scope:
                m, tok, info = model()
                result = fit_step_scope(step, artifacts, rows, (m, tok, info), recipe.base.quantization)
                record["threshold"] = result.threshold
                if main:
                    write_scope(result, folder, work / "steps" / split_ref(step.scope.adapter)[0], artifacts, step)
            else:
                result = apply_op(step.op, artifacts, record)
            if isinstance(result, Adapter) and main:
                save_adapter(result, folder, overwrite=True)  # overwrite: a copy left by a kill after saving
            artifacts[step.name] = result
            record["seconds"] = round(time.perf_counter() - start, 3)
            report["steps"].append(record)
            if main:
                write_json(progress_file, report["steps"])  # after the step's files: listed means complete
                if checkpoint_every:
                    shutil.rmtree(work / "checkpoints" / step.name, ignore_errors=True)
    if main:
        save_adapter(artifacts[recipe.output], work / "adapter", overwrite=True)
        for step in recipe.steps:  # a scope of the output adapter goes beside it in OUT/adapter too
            if step.scope and split_ref(step.scope.adapter)[0] == recipe.output:
                write_scope(artifacts[step.name], None, work / "adapter", artifacts, step)
        report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        (work / "run.json").write_text(json.dumps(report, indent=2))
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        for leftover in ("job.json", "progress.json"):
            (work / leftover).unlink(missing_ok=True)
        publish(work, out, overwrite)  # one atomic swap: OUT is the old folder or the new one
    wait_for_everyone()
    return report
