"""Batching requests: a queue and one worker thread that decodes the waiting requests together, streaming each row.

Continuous batching: the worker keeps up to ``max_batch`` rows decoding one token per step
(:class:`.decoding.Decoder`); between steps, rows that have ended leave and waiting requests join,
first come first served (a request's rows join together; the first request that does not fit
waits for slots, so a large one is never overtaken for good). A request that finds the worker idle
waits ``window_s`` for others to start with it. Each step and each admission run under
``runtime.lock``; adapter loading takes the same lock between two steps (it waits for a step,
not for the batch to drain). The tokenizer is used from this thread only. Rows are independent (left padding,
attention mask, positions from the mask), so an answer equals the answer to the same request sent
alone. Before a request joins, strengths "auto" are set by the adapters' scopes
(``runtime.resolve``: one partial pass of the base over every prompt that needs it). Each row's
text goes to its :class:`Job`'s listener as it is generated; a request whose rows fail alone gets
its own 400, the others still run. A job whose client has gone is cancelled: its rows leave the
batch at the next step and free their slots.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError
from .decoding import Decoder, Row, Sampling
from .schemas import ApiError


@dataclass
class Job:
    """One request: its prompts (each run as ``n`` rows), a forget dict per prompt, its sampling, its outcome.

    ``future`` gets {"outputs": [(text, completion tokens)] per choice, "reasons": finish_reason per
    choice, "prompt_tokens": the ids the model read, summed over the prompts} once every row has
    ended, or the :class:`ApiError` that failed the job. ``listener``, when set, is called from the
    worker with each event as it happens: ("delta", choice, text), ("finish", choice, reason, tokens),
    ("error", choice, message) or ("fail", ApiError). Choice ``p * n + k`` is prompt p's k-th.
    ``texts``: what each prompt says, for the scopes (default: the prompts); ``scope``, once the worker
    has resolved "auto" strengths: per prompt, {adapter: {"score", "strength"}}.
    """

    prompts: list[str]
    forgets: list[dict[str, float]]
    max_new_tokens: int
    chat: bool  # True: each prompt is one user turn, wrapped with the tokenizer's chat template
    sampling: Sampling | None = None  # None: greedy, no stop strings
    n: int = 1
    listener: Callable[[tuple], None] | None = None
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    prompt_tokens: list[int] = field(default_factory=list)
    texts: list[str] | None = None
    scope: list[dict[str, dict]] | None = None

    def __post_init__(self) -> None:
        self._texts = [""] * self.rows
        self._ends: list[tuple[str, int] | None] = [None] * self.rows

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    def fail(self, error: ApiError) -> None:
        self.cancelled.set()  # the job's other rows stop: nobody will read them
        if not self.future.done():
            self.future.set_exception(error)
            if self.listener:
                self.listener(("fail", error))

    def event(self, event: tuple) -> None:
        """Record one row's event (from the worker); the future completes with the last row."""
        if self.future.done():
            return
        kind, choice = event[0], event[1]
        if kind == "error":  # ("error", choice, message, code)
            self.fail(ApiError(400, event[2], "forget", event[3] if len(event) > 3 else "non_finite_logits"))
            return
        if self.listener:
            self.listener(event)
        if kind == "delta":
            self._texts[choice] += event[2]
        elif kind == "finish":
            self._ends[choice] = (event[2], event[3])
            if all(self._ends):
                self.future.set_result({"outputs": [(t, e[1]) for t, e in zip(self._texts, self._ends)],
                                        "reasons": [e[0] for e in self._ends],
                                        "prompt_tokens": sum(self.prompt_tokens)})

    def sampling_of(self, choice: int) -> Sampling:
        """Choice ``choice``'s sampling: the choices of one prompt draw from seeds seed, seed + 1, ..."""
        s = self.sampling or Sampling(self.max_new_tokens)
        if s.seed is None or choice % self.n == 0:
            return s
        return Sampling(s.max_tokens, s.temperature, s.top_p, s.seed + choice % self.n, s.stops)


class Batcher:
    """A queue and one worker thread that decodes waiting requests together (continuous batching)."""

    def __init__(self, runtime, max_batch: int = 8, window_s: float = 0.005):
        self.runtime = runtime
        self.max_batch = max_batch
        self.window_s = window_s
        self.queue: queue.Queue[Job | None] = queue.Queue()
        # batches: admissions (one prefill each); rows: rows admitted; max_batch_rows: most rows decoding
        # together; batched_requests: requests that decoded beside another request
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "max_batch_rows": 0, "batched_requests": 0,
                      "errors": 0, "active_rows": 0, "cancelled_rows": 0}
        self._stats_lock = threading.Lock()
        self._decoder = Decoder(runtime)
        self._running: list[Job] = []
        self._thread = threading.Thread(target=self._loop, name="lora-unlearn-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        with self._stats_lock:
            self.stats["requests"] += 1
        self.queue.put(job)
        return job.future

    def close(self, timeout: float = 10.0) -> None:
        self.queue.put(None)
        self._thread.join(timeout)

    def _collect(self, pending: deque, deadline: float | None) -> bool:
        """Move queued jobs to ``pending``: until ``deadline`` or a full batch, or (None) what is there now.

        True when the queue said stop."""
        while True:
            if deadline is not None and sum(j.rows for j in pending) >= self.max_batch:
                return False
            remaining = (deadline - time.monotonic()) if deadline is not None else 0
            try:
                job = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                return False
            if job is None:
                return True
            pending.append(job)

    def _loop(self) -> None:
        pending: deque[Job] = deque()
        stopping = False
        while True:
            if not pending and not self._decoder.rows:
                if stopping:
                    return
                job = self.queue.get()
                if job is None:
                    return
                pending.append(job)
                stopping = self._collect(pending, time.monotonic() + self.window_s)
            else:
                stopping = self._collect(pending, None) or stopping
            if stopping:
                for job in [*pending, *self._running]:
                    job.fail(ApiError(503, "the server is shutting down"))
                pending.clear()
            joining, free = [], self.max_batch - len(self._decoder.rows)
            while pending and self._decoder.joinable:
                if pending[0].cancelled.is_set():
                    pending.popleft()
                elif pending[0].rows <= free:
                    free -= pending[0].rows
                    joining.append(pending.popleft())
                else:
                    break  # first come, first served: the head waits for slots, nobody overtakes it
            self._run(joining)

    def _run(self, joining: list[Job]) -> None:
        """Admit ``joining`` and run one decoding step, under the lock; the worker survives anything."""
        try:
            with self.runtime.lock:
                if joining:
                    self._admit(joining)
                self._decoder.step()
        except Exception as e:  # noqa: BLE001 - the worker must survive anything; the requests get a 500
            for job in [*self._running, *joining]:
                job.fail(ApiError(500, f"generation failed: {type(e).__name__}: {e}"))
            self._decoder = Decoder(self.runtime)
        self._running = [j for j in self._running if not j.future.done()]
        with self._stats_lock:
            self.stats["active_rows"] = len(self._decoder.rows)

    def _admit(self, jobs: list[Job]) -> None:
        loaded = set(self.runtime.adapters())
        ready = []
        for job in jobs:
            missing = sorted({name for f in job.forgets for name in f} - loaded)
            if missing:
                job.fail(ApiError(400, f"adapter {missing[0]!r} was unloaded while the request waited. "
                                  f"Loaded: {', '.join(sorted(loaded)) or '(none)'}", "forget",
                                  "unknown_adapter"))
            else:
                ready.append(job)
        self._generate(ready)

    def _rows(self, job: Job) -> list[Row]:
        from ..core.data import prompt_text

        tok = self.runtime.tokenizer
        rows, job.prompt_tokens = [], []
        for p, prompt in enumerate(job.prompts):
            text = prompt_text(tok, prompt) if job.chat else prompt
            ids = tok(text, add_special_tokens=not job.chat)["input_ids"]
            job.prompt_tokens.append(len(ids))
            for k in range(job.n):
                choice = p * job.n + k
                rows.append(Row(ids, dict(job.forgets[p]), job.sampling_of(choice), self._sink(job, choice),
                                job.cancelled.is_set))
        return rows

    def _sink(self, job: Job, choice: int):
        def sink(event: tuple) -> None:
            if event[0] in ("finish", "error", "cancelled"):
                with self._stats_lock:
                    self.stats["active_rows"] -= 1
                    self.stats["errors"] += event[0] == "error"
                    self.stats["cancelled_rows"] += event[0] == "cancelled"
            if event[0] != "cancelled":
                job.event((event[0], choice, *event[1:]))
        return sink

    def _resolve(self, jobs: list[Job]) -> list[Job]:
        """Set every "auto" strength from the scopes, in one pass for the jobs; a job that fails alone gets a 400."""
        try:
            rows, info = self.runtime.resolve([f for j in jobs for f in j.forgets],
                                              [t for j in jobs for t in (j.texts or j.prompts)])
        except UserError as e:
            if len(jobs) > 1:
                return [job for one in jobs for job in self._resolve([one])]
            jobs[0].fail(ApiError(400, str(e), "forget"))
            return []
        at = 0
        for job in jobs:
            k = len(job.prompts)
            job.forgets, job.scope = rows[at:at + k], info[at:at + k] if any(info[at:at + k]) else None
            at += k
        return jobs

    def _generate(self, jobs: list[Job]) -> None:
        """Add ``jobs`` to the decoding batch (caller holds the runtime lock); isolate a failing request."""
        jobs = self._resolve(jobs)
        if not jobs:
            return
        rows = [r for job in jobs for r in self._rows(job)]
        try:
            with self.runtime.coefficients([r.forget for r in rows]):
                pass  # refuses a bad forget setting before any row has sent anything
        except UserError as e:
            if len(jobs) > 1:  # one request's bad row must not fail the others: admit each alone
                for job in jobs:
                    self._generate([job])
                return
            jobs[0].fail(ApiError(400, str(e), "forget"))
            return
        beside = bool(self._decoder.rows) or len(jobs) > 1
        with self._stats_lock:
            self.stats["batches"] += 1
            self.stats["rows"] += len(rows)
            self.stats["active_rows"] += len(rows)
            self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(self._decoder.rows) + len(rows))
            if beside:
                self.stats["batched_requests"] += len(jobs)
        self._running += jobs
        self._decoder.admit(rows)
