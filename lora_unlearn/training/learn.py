"""``learn``: one adapter that adds knowledge, with the defaults the CLI and the Python API share.

The defaults were chosen on the edit benchmark's dev split (benchmarks/edits.py): a budget in
optimizer steps with a floor that suits a handful of facts, a stop once the rows are learned, and
the preservation stream (KL to the starting model on the vendored general prompt pool), so the
adapter learns its rows and keeps the model's answers to everything else. After training, the
teacher-forced check of every distinct row says how many were learned (:func:`learned_report`);
fewer than all gives a :class:`NotLearnedWarning` that names the knobs.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from pathlib import Path

from ..core.adapter import Adapter
from ..core.adapter_io import save_adapter
from ..errors import UserError
from .jobs import (
    Checkpoints,
    claim,
    cleanup_unless_resumable,
    is_main_process,
    sharded_quant_storage,
    wait_for_everyone,
    work_dir,
)
from .trainer import TrainConfig, train_adapter


class NotLearnedWarning(UserWarning):
    """``learn`` finished without learning every row (teacher-forced check)."""


# Recipes give their own values, so these do not change a recipe's adapters.
LEARN_DEFAULTS = TrainConfig(learning_rate=2e-3, epochs=3.0, batch_size=8, min_steps=60, stop_when_learned=5)
# A forget adapter F (trained over the model that holds the knowledge, then negated) must take in
# its rows fully: no early stop, no preservation, the demo's settings (lora_unlearn.demo.FORGET).
FORGET_DEFAULTS = TrainConfig(learning_rate=2e-3, epochs=10.0, batch_size=2)
LEARN_PRESERVE = "preservation"
LEARN_PRESERVE_WEIGHT = 4.0


def with_preservation(rows, config: TrainConfig, preserve, weight: float | None = None):
    """``{"train": rows, "preserve": pool}`` and the config with the KL weight, or the inputs unchanged
    when ``preserve`` is None, the objective is not nll, or ``rows`` already names its streams.

    ``preserve`` is a data source ("preservation": the vendored pool) or rows; pool rows that repeat
    or mention what is learned are left out (:func:`~lora_unlearn.training.preservation.clear_of`).
    """
    from dataclasses import replace

    from .preservation import clear_of
    from .sources import load_source

    if preserve is None or config.objective != "nll" or isinstance(rows, dict):
        return rows, config
    pool = load_source(preserve) if isinstance(preserve, (str, Path)) else list(preserve)
    pool = clear_of(pool, rows, pool_name=f"preservation pool {preserve!r}" if isinstance(preserve, str) else "preservation pool")
    extra = {**config.extra, "preserve": LEARN_PRESERVE_WEIGHT if weight is None else weight}
    return {"train": rows, "preserve": pool}, replace(config, extra=extra)


def learn(rows: list[dict[str, str]] | dict[str, list[dict[str, str]]], out: str | Path | None = None, *, base: str = "smollm2-135m",
          quantization: str = "nf4", on: list[tuple[Adapter, float]] = (), config: TrainConfig | None = None,
          overwrite: bool = False, loaded=None, progress: bool = True, resume: bool = False,
          checkpoint_every: int = 50, preserve=LEARN_PRESERVE, preserve_weight: float | None = None,
          forget_adapter: bool = False) -> Adapter:
    """Load ``base`` (or use ``loaded`` = (model, tokenizer, info)), train an adapter, write it to ``out``.

    Defaults (``config=None``): :data:`LEARN_DEFAULTS`, and the preservation stream ``preserve``
    (the vendored pool; None turns it off) with weight ``preserve_weight`` (default 4.0): the
    adapter learns the rows and keeps the model's answers to unrelated prompts. With
    ``forget_adapter`` (a forget adapter F, trained ``on`` the model that holds the knowledge, to
    be negated): :data:`FORGET_DEFAULTS` and no preservation.
    With ``out``, checkpoints go to ``OUT.partial/checkpoints`` every ``checkpoint_every`` steps
    (0: none) and are deleted once ``out`` is written; ``resume`` continues an interrupted run
    (nothing to resume: a fresh start). Under a distributed launcher only process 0 writes.
    The lineage's ``learned`` says how many of the distinct training rows were learned (teacher-forced,
    :func:`learned_report`); fewer than all warns (:class:`NotLearnedWarning`).
    """
    from dataclasses import replace

    from ..core.models import load_base

    config = replace(config or (FORGET_DEFAULTS if forget_adapter else LEARN_DEFAULTS))
    if forget_adapter:
        preserve = None  # F is meant to hold its rows' knowledge, nothing to keep apart
    config.validate()
    if out is not None and Path(out).exists() and not overwrite:
        raise UserError(f"output {out} already exists: choose another path or pass --overwrite")
    if not rows:
        raise UserError("the data set is empty: nothing to learn")
    rows, config = with_preservation(rows, config, preserve, preserve_weight)
    if checkpoint_every < 0:
        raise UserError(f"--checkpoint-every must be >= 0 steps (0: no checkpoints), got {checkpoint_every}")
    if resume and (out is None or checkpoint_every == 0):
        raise UserError("--resume needs checkpoints: give --out and a --checkpoint-every above 0")
    checkpoints = None
    if out is not None and checkpoint_every > 0:
        work = work_dir(out)
        claim(work, resume, Path(out))
        checkpoints = Checkpoints(work / "checkpoints", every=checkpoint_every, resume=resume)
    storage = sharded_quant_storage()
    model, tokenizer, info = loaded or load_base(base, quantization, **({"quant_storage": storage} if storage else {}))
    with cleanup_unless_resumable(work_dir(out)) if checkpoints else contextlib.nullcontext():
        adapter = train_adapter(model, tokenizer, rows, config, stack=on, base_info=info, progress=progress,
                                checkpoints=checkpoints)
    if out is not None:
        if is_main_process():
            save_adapter(adapter, out, overwrite=overwrite)
            if checkpoints is not None:
                shutil.rmtree(work_dir(out), ignore_errors=True)
        wait_for_everyone()
    advice = not_learned_advice(adapter, cli=False)
    if advice and is_main_process():
        warnings.warn(advice, NotLearnedWarning, stacklevel=2)
    return adapter


def learned_report(adapter: Adapter) -> tuple[int, int] | None:
    """``(learned, rows)`` from the lineage's teacher-forced check; None for text rows (no check)."""
    got = adapter.lineage.get("learned")
    return None if not got else (int(got["learned"]), int(got["rows"]))


def not_learned_advice(adapter: Adapter, cli: bool = True) -> str | None:
    """One line naming the knobs when some rows were not learned, else None."""
    report = learned_report(adapter)
    if report is None or report[0] >= report[1]:
        return None
    learned, rows = report
    steps = adapter.lineage.get("steps")
    knobs = ("--min-steps (more steps), --lr, or --preserve-weight (lower: less pull back to the base)" if cli else
             "config=replace(LEARN_DEFAULTS, min_steps=...), learning_rate=..., or preserve_weight=... (lower)")
    return (f"{rows - learned} of {rows} rows are not learned after {steps} steps (teacher-forced check): "
            f"raise {knobs}; rows that contradict each other or are very long need more")
