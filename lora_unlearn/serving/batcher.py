"""Batching requests: a queue and one worker thread that runs waiting requests together.

The worker takes the first waiting request, collects those that arrive within ``window_s`` (up
to ``max_batch`` rows) with the same ``max_tokens`` and mode, and runs one ``runtime.generate``
with a forget setting per row, under ``runtime.lock`` (adapter loading takes the same lock).
Rows are independent (left padding, attention mask), so an answer equals the answer to the same
request sent alone. A request whose rows fail alone gets its own 400; the others still run.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..errors import UserError
from .schemas import ApiError


@dataclass
class Job:
    """One request: its rows, one forget dict per row, and the generation key it can share a batch on."""

    prompts: list[str]
    forgets: list[dict[str, float]]
    max_new_tokens: int
    chat: bool  # True: the runtime wraps each prompt as one user turn
    future: Future = field(default_factory=Future)

    @property
    def key(self) -> tuple[int, bool]:
        return self.max_new_tokens, self.chat


class Batcher:
    """A queue and one worker thread that runs waiting requests together."""

    def __init__(self, runtime, max_batch: int = 8, window_s: float = 0.005):
        self.runtime = runtime
        self.max_batch = max_batch
        self.window_s = window_s
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "max_batch_rows": 0, "batched_requests": 0,
                      "errors": 0}
        self._stats_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="lora-unlearn-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        self.queue.put(job)
        return job.future

    def close(self, timeout: float = 10.0) -> None:
        self.queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        pending: deque[Job] = deque()
        while True:
            if not pending:
                job = self.queue.get()
                if job is None:
                    return
                pending.append(job)
            deadline = time.monotonic() + self.window_s
            stop = False
            while sum(len(j.prompts) for j in pending) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    job = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                pending.append(job)
            key, rows, batch = pending[0].key, 0, []
            for job in list(pending):
                if job.key == key and rows + len(job.prompts) <= self.max_batch:
                    batch.append(job)
                    rows += len(job.prompts)
            for job in batch:
                pending.remove(job)
            self._run(batch)
            if stop:
                for job in pending:
                    job.future.set_exception(ApiError(503, "the server is shutting down"))
                return

    def _run(self, batch: list[Job]) -> None:
        try:
            with self.runtime.lock:
                loaded = set(self.runtime.adapters())
                ready = []
                for job in batch:
                    missing = sorted({n for f in job.forgets for n in f} - loaded)
                    if missing:
                        job.future.set_exception(ApiError(
                            400, f"adapter {missing[0]!r} was unloaded while the request waited. "
                            f"Loaded: {', '.join(sorted(loaded)) or '(none)'}", "forget", "unknown_adapter"))
                    else:
                        ready.append(job)
                self._generate(ready)
        except Exception as e:  # noqa: BLE001 - the worker must survive anything; the request gets a 500
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(ApiError(500, f"generation failed: {type(e).__name__}: {e}"))

    def _generate(self, jobs: list[Job]) -> None:
        """Run ``jobs`` as one batch (caller holds the runtime lock); isolate a failing request."""
        if not jobs:
            return
        prompts = [p for j in jobs for p in j.prompts]
        forgets = [f for j in jobs for f in j.forgets]
        try:
            texts = self.runtime.generate(prompts, forgets, max_new_tokens=jobs[0].max_new_tokens, chat=jobs[0].chat)
        except UserError as e:
            if len(jobs) > 1:  # one request's bad row must not fail the others: run each alone
                for job in jobs:
                    self._generate([job])
                return
            jobs[0].future.set_exception(ApiError(400, str(e)))
            return
        with self._stats_lock:
            self.stats["batches"] += 1
            self.stats["rows"] += len(prompts)
            self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(prompts))
            if len(jobs) > 1:
                self.stats["batched_requests"] += len(jobs)
        at = 0
        for job in jobs:
            n = len(job.prompts)
            job.future.set_result({"outputs": [(t, self._count(t)) for t in texts[at:at + n]],
                                   "prompt_tokens": self._prompt_tokens(job)})
            at += n

    def _count(self, text: str) -> int:
        return len(self.runtime.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prompt_tokens(self, job: Job) -> int:
        # Tokenizers are not safe to call from several threads: counting happens here, in the worker.
        return sum(self._count(p) for p in job.prompts)
