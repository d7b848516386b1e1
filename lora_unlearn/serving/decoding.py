"""Decoding a batch of rows, each with its own sampling, stop strings and token budget, streamed as it grows.

One ``model.generate`` runs greedily over the whole batch (left padding, one forget setting per row).
:class:`_Sampler`, a logits processor, replaces the logits of each sampling row by a one-hot of a
token drawn from softmax(logits / T) restricted to the top-p nucleus with the row's own
``torch.Generator`` (seeded: same seed, same answer), so greedy rows are untouched (exactly the
answers of ``runtime.generate``) and rows with different settings share the forward pass. It also
catches a row whose logits turn non-finite. :class:`_Stopper`, a stopping criterion, reads each
row's new token after every step: it ends the row on the end-of-sequence token, at its own
``max_tokens``, on a stop string, on an error, or when its client has gone, and hands the new text
to the row's sink at once, so a stream sees each token as it is generated.

Token counts are exact: ``prompt_tokens`` is the length of the ids the model reads (chat template
and special tokens included), ``completion_tokens`` the number of tokens generated (the
end-of-sequence token included, nothing after a row ended).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class Sampling:
    """How one row decodes: temperature 0 is greedy; top_p in (0, 1]; stops cut the text (not included)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stops: tuple[str, ...] = ()


class RowText:
    """One row's text as its tokens arrive: what may be sent now, and the final answer.

    The answer is the decoded tokens (special tokens skipped), stripped, cut before the first stop
    string. While the row runs, trailing whitespace, an incomplete UTF-8 character and a tail that
    could begin a stop string are held back, so the sent pieces always add up to the final answer.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False
        self.waiting = 0  # tokens for which the text has ended in an incomplete character

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()

    def add(self, token: int) -> str:
        """Append ``token``; the text that may be sent now."""
        self.ids.append(token)
        text = self._text()
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._delta(text[:cut])
        ready = text.rstrip()
        # a character still being generated (UTF-8 takes at most 4 byte tokens); after that it is invalid bytes
        self.waiting = self.waiting + 1 if ready.endswith("\ufffd") else 0
        if 0 < self.waiting < 4:
            ready = ready.rstrip("\ufffd")
        for s in self.stops:
            for k in range(min(len(s) - 1, len(ready)), 0, -1):
                if ready.endswith(s[:k]):
                    ready = ready[:-k]
                    break
        return self._delta(ready)

    def final(self) -> str:
        """The rest of the answer, once the row has ended."""
        if self.stopped:
            return ""
        return self._delta(self._text().strip())

    def _delta(self, ready: str) -> str:
        if len(ready) <= len(self.sent) or not ready.startswith(self.sent):
            return ""
        delta, self.sent = ready[len(self.sent):], ready
        return delta


Sink = Callable[[tuple], None]  # ("delta", text)..., then ("finish", reason, tokens), ("error", msg) or ("cancelled",)


@dataclass
class Row:
    """One sequence to generate: prompt ids, forget strengths, sampling, where its events go."""

    ids: list[int]
    forget: dict[str, float]
    sampling: Sampling
    sink: Sink
    cancelled: Callable[[], bool] = lambda: False
    text: RowText | None = None
    tokens: int = 0
    done: bool = False
    bad_logits: bool = False
    generator: torch.Generator | None = None
    index: int = field(default=0, repr=False)

    def finish(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        if reason == "error":
            strengths = ", ".join(f"{k}={v:g}" for k, v in self.forget.items()) or "the adapters' defaults"
            self.sink(("error", f"the model's logits became non-finite at generated token {self.tokens + 1} "
                                f"(forget: {strengths}): lower the forget strengths"))
            return
        if reason == "cancelled":
            self.sink(("cancelled",))
            return
        rest = self.text.final()
        if rest:
            self.sink(("delta", rest))
        self.sink(("finish", reason, self.tokens))


class _Sampler:
    """Logits processor: flags non-finite rows; draws the token of each sampling row with its own generator."""

    def __init__(self, rows: list[Row]):
        self.rows = rows
        self.sampling = [r for r in rows if r.sampling.temperature > 0]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(scores).all(-1).tolist()
        for i, ok in enumerate(finite):
            if not ok and not self.rows[i].done:
                self.rows[i].bad_logits = True
        if not all(finite):
            scores = torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
        for row in self.sampling:
            if row.done or row.bad_logits:
                continue
            token = _draw(scores[row.index], row.sampling, row.generator)
            scores[row.index].fill_(-math.inf)
            scores[row.index, token] = 0.0
        return scores


def _draw(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> int:
    """A token from softmax(logits / T), keeping the smallest top set whose probability reaches top_p."""
    probs = torch.softmax(logits.double() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = (sorted_probs.cumsum(-1) - sorted_probs) < s.top_p  # the first token is always kept
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs.float().cpu(), 1, generator=generator))


class _Stopper:
    """Stopping criterion: reads every row's new token, sends its text, ends the rows that are done."""

    def __init__(self, rows: list[Row], eos: set[int]):
        self.rows, self.eos = rows, eos

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        new = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, new):
            if row.done:
                continue
            if row.cancelled():
                row.finish("cancelled")
                continue
            if row.bad_logits:
                row.finish("error")
                continue
            row.tokens += 1
            if token in self.eos:
                row.finish("stop")
                continue
            delta = row.text.add(token)
            if delta:
                row.sink(("delta", delta))
            if row.text.stopped:
                row.finish("stop")
            elif row.tokens >= row.sampling.max_tokens:
                row.finish("length")
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)


def _eos_ids(model) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


@torch.no_grad()
def generate_rows(runtime, rows: list[Row]) -> None:
    """Generate every row in one batch (caller holds ``runtime.lock``); results go to each row's sink."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    tok = runtime.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(r.ids) for r in rows)
    input_ids = torch.tensor([[pad] * (width - len(r.ids)) + r.ids for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rows], dtype=torch.long)
    for i, row in enumerate(rows):
        row.index, row.text = i, RowText(tok, row.sampling.stops)
        if row.sampling.temperature > 0:
            seed = row.sampling.seed if row.sampling.seed is not None else secrets.randbits(63)
            row.generator = torch.Generator().manual_seed(seed)
    device = runtime._device()
    with runtime.coefficients([r.forget for r in rows]):
        runtime.model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=False,
                               max_new_tokens=max(r.sampling.max_tokens for r in rows), pad_token_id=pad,
                               logits_processor=LogitsProcessorList([_Sampler(rows)]),
                               stopping_criteria=StoppingCriteriaList([_Stopper(rows, _eos_ids(runtime.model))]))
    for row in rows:  # generation can end before a row saw its last step (every row done, or max length)
        row.finish("error" if row.bad_logits else "length")
