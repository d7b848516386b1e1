"""Long runs: which process writes, where work in progress lives, and how an interrupted run resumes.

Under ``accelerate launch`` (or torchrun) every process runs the same command; process 0 (the
``RANK`` the launcher sets) writes the outputs and the others wait for it. Work in progress lives
in ``OUT.partial/`` beside the output: the Trainer's checkpoints (trainable adapter, optimizer,
scheduler, RNG states, trainer state) every N steps, and for recipes the steps already done.
A ``job.json`` there records what the run is (settings, data fingerprints, input adapters,
number of processes), so ``--resume`` continues only the same run and refuses any other. When
the run ends the checkpoints are deleted and the result is renamed into place in one step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

JOB_NAME = "job.json"
CHECKPOINT_WEIGHTS = "trainable_adapter.safetensors"
STATE_NAME = "trainer_state.json"  # the Trainer writes it last: its presence marks a complete checkpoint


# ---- processes ----------------------------------------------------------------------------------

def rank() -> int:
    """This process's global rank under a distributed launcher (0 when run plainly)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on the one process that writes outputs and prints results."""
    return rank() == 0


def wait_for_everyone() -> None:
    """A barrier across processes once the process group exists (a no-op in a plain run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def sharded_quant_storage() -> str | None:
    """The storage dtype FSDP and DeepSpeed ZeRO-3 need for 4-bit weights, from ``accelerate launch``'s env.

    Both shard parameters as flat float tensors, so bitsandbytes must pack the 4-bit values into
    the compute dtype (bfloat16 on GPU) instead of uint8 (PEFT's FSDP-QLoRA and ZeRO-3-QLoRA
    guides). DDP and a single process keep the default uint8 storage.
    """
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    zero3 = (os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
             and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3")
    return "bfloat16" if fsdp or zero3 else None


# ---- work folders and checkpoints ---------------------------------------------------------------

def work_dir(out: str | Path) -> Path:
    """``OUT.partial``: where an unfinished run keeps its checkpoints (a sibling of OUT)."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


@dataclass(frozen=True)
class Checkpoints:
    """Trainer checkpoints of one training run: folder, interval in optimizer steps, resume or not."""

    dir: Path
    every: int = 50
    resume: bool = False


def claim(work: Path, resume: bool, out: Path) -> None:
    """Refuse to start over a partial run unless asked to resume it (main process only checks)."""
    if not is_main_process() or resume or not work.exists():
        return
    raise UserError(f"{work} holds an interrupted run for {out}: add --resume to continue it, "
                    f"or delete {work} to start over")


def resumable(work: Path) -> bool:
    """Whether ``work`` holds anything a rerun could continue from (a finished step or a checkpoint)."""
    return (work / "progress.json").is_file() or any(work.rglob(f"checkpoint-*/{STATE_NAME}"))


@contextlib.contextmanager
def cleanup_unless_resumable(work: Path):
    """On an error before anything resumable exists, remove ``work`` so that a plain rerun may start."""
    try:
        yield
    except BaseException:
        if is_main_process() and work.exists() and not resumable(work):
            shutil.rmtree(work, ignore_errors=True)
        raise


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``folder``; one cut short by a kill is skipped."""
    done = []
    for path in folder.glob("checkpoint-*"):
        step = path.name.rpartition("-")[2]
        try:
            json.loads((path / STATE_NAME).read_text())
        except (OSError, json.JSONDecodeError):
            continue  # missing or cut short: the save was interrupted
        if step.isdigit():
            done.append((int(step), path))
    return max(done)[1] if done else None


def normalized(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists, sets sorted lists), for comparisons."""
    return json.loads(json.dumps(value, sort_keys=True,
                                 default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


def _differences(old: Any, new: Any, prefix: str = "", depth: int = 2) -> list[str]:
    if old == new:
        return []
    if depth == 0 or not isinstance(old, dict) or not isinstance(new, dict):
        return [prefix or "everything"]
    keys = sorted(set(old) | set(new))
    return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k, depth - 1)]


def open_job(folder: Path, job: dict[str, Any], resume: bool) -> Path | None:
    """Prepare ``folder`` for a run described by ``job``; return the checkpoint to resume from.

    Without ``resume`` the folder is emptied (a fresh start). With ``resume`` a folder written by
    a different job is refused, naming what differs; no folder or no complete checkpoint yet
    means a fresh start. Only the main process writes; the others only read.
    """
    job = normalized(job)
    record = folder / JOB_NAME
    if resume and record.is_file():
        try:
            old = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old != job:
            what = ", ".join(_differences(old, job)[:6]) if isinstance(old, dict) else "an unreadable job.json"
            raise UserError(f"the checkpoints in {folder} belong to a different run (differs in: {what}): "
                            f"rerun with the same settings, or delete {folder} to start over")
        return last_checkpoint(folder)
    if is_main_process():
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        write_json(record, job)
    return None


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (temporary file, then rename): a kill leaves the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


def adapter_digest(adapter) -> str:
    """sha256 of an in-memory adapter's factors and scalings (identifies a frozen stack entry)."""
    h = hashlib.sha256()
    for name in sorted(adapter.modules):
        m = adapter.modules[name]
        h.update(name.encode())
        h.update(m.A.detach().cpu().contiguous().float().numpy().tobytes())
        h.update(m.B.detach().cpu().contiguous().float().numpy().tobytes())
        h.update(repr(float(m.scaling)).encode())
    return h.hexdigest()
