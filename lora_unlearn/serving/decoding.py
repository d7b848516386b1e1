"""Decoding rows one token at a time, each with its own forget setting, sampling, stop strings and budget.

:class:`Decoder` holds the rows being generated together and their KV cache. Rows join between
steps (continuous batching): the new rows are prefilled together (left padding, each with its own
forget setting), their cache is left-padded to the running batch's length and appended to it;
rows that have ended leave the batch at once (finished, cancelled by their client, or failed), so
their slot is free for the next request. Positions come from the attention mask, so a row's
padding never moves it: a row's answer equals the answer to the same request sent alone (greedy
rows are the exact argmax, as ``runtime.generate``). Each step's logits go through
:func:`_choose`: a sampling row draws from softmax(logits / T) restricted to the top-p nucleus with
its own ``torch.Generator`` (seeded: same seed, same answer), and a row whose logits turn
non-finite is flagged. :meth:`Row.take` reads each row's new token: it ends the row on the
end-of-sequence token, at its own ``max_tokens``, on a stop string, on an error, or when its
client has gone, and hands the new text to the row's sink at once, so a stream sees each token
as it is generated.

Token counts are exact: ``prompt_tokens`` is the length of the ids the model reads (chat template
and special tokens included), ``completion_tokens`` the number of tokens generated (the
end-of-sequence token included, nothing after a row ended).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache


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
    string. While the row runs, trailing whitespace, a trailing replacement character (an incomplete
    UTF-8 character decodes to one U+FFFD until its last byte arrives) and a tail that could begin a
    stop string are held back, so the sent pieces always add up to the final answer.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

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
        # Only the last U+FFFD can still change: bytes of a character still being generated decode to one
        # U+FFFD (one per maximal invalid run, as UTF-8 decoders do); every earlier one is final.
        ready = text.rstrip()
        if ready.endswith("\ufffd"):
            ready = ready[:-1].rstrip()
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

    def finish(self, reason: str, message: str | None = None, code: str = "non_finite_logits") -> None:
        if self.done:
            return
        self.done = True
        if reason == "error":
            strengths = ", ".join(f"{k}={v:g}" for k, v in self.forget.items() if v) or "none"
            self.sink(("error", message or f"the model's logits became non-finite at generated token "
                                           f"{self.tokens + 1} (forget: {strengths}): lower the forget strengths",
                       code))
            return
        if reason == "cancelled":
            self.sink(("cancelled",))
            return
        rest = self.text.final()
        if rest:
            self.sink(("delta", rest))
        self.sink(("finish", reason, self.tokens))


    def take(self, token: int, eos: set[int]) -> None:
        """Read the row's new token: send its text, end the row if it is done."""
        if self.done:
            return
        if self.cancelled():
            self.finish("cancelled")
            return
        if self.bad_logits:
            self.finish("error")
            return
        self.tokens += 1
        if token in eos:
            self.finish("stop")
            return
        delta = self.text.add(token)
        if delta:
            self.sink(("delta", delta))
        if self.text.stopped:
            self.finish("stop")
        elif self.tokens >= self.sampling.max_tokens:
            self.finish("length")


def _choose(rows: list[Row], logits: torch.Tensor) -> list[int]:
    """Each row's next token from its last logits (rows, vocab): argmax, or a draw for a sampling row."""
    finite = torch.isfinite(logits).all(-1).tolist()
    tokens = torch.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0).argmax(-1).tolist()
    for i, (row, ok) in enumerate(zip(rows, finite)):
        if not ok:
            row.bad_logits = True
        elif row.sampling.temperature > 0:
            tokens[i] = _draw(logits[i], row.sampling, row.generator)
    return tokens


def _draw(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> int:
    """A token from softmax(logits / T), keeping the smallest top set whose probability reaches top_p."""
    probs = torch.softmax(logits.double() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = (sorted_probs.cumsum(-1) - sorted_probs) < s.top_p  # the first token is always kept
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs.float().cpu(), 1, generator=generator))


def _eos_ids(model) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


class Decoder:
    """The rows being generated together, their KV cache and attention mask; rows join and leave between steps.

    The caller holds ``runtime.lock`` around :meth:`admit` and :meth:`step` (adapters may be loaded
    or unloaded between steps: a row keeps the strengths it was admitted with, an adapter loaded
    later is off for it, and a row whose adapter is unloaded while it runs ends with an error).
    Models whose cache has sliding-window layers run batch by batch (:attr:`joinable` is False
    while rows run): their cache cannot be padded on the left.
    """

    def __init__(self, runtime):
        self.runtime = runtime
        self.rows: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # (rows, length): 1 for the tokens each row has read
        self.last: list[int] = []  # each row's newest token, the next step's input
        self.sliding = False
        self.eos = _eos_ids(runtime.model)
        tok = runtime.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @property
    def joinable(self) -> bool:
        return not (self.rows and self.sliding)

    def _forgets(self, rows: list[Row]) -> list[dict[str, float]]:
        """Each row's strengths over the adapters loaded now; a row whose adapter was unloaded ends."""
        loaded = self.runtime.defaults()
        out = []
        for row in rows:
            gone = sorted(n for n, v in row.forget.items() if v and n not in loaded)
            if gone:
                row.finish("error", f"adapter {gone[0]!r} was unloaded while the request was being generated",
                           "unknown_adapter")
            out.append({n: row.forget.get(n, 0.0) for n in loaded})
        return out

    @torch.no_grad()
    def admit(self, rows: list[Row]) -> None:
        """Prefill ``rows`` together and add them to the batch (their first token is taken at once)."""
        if not rows:
            return
        defaults = self.runtime.defaults()
        tok = self.runtime.tokenizer
        for row in rows:
            # the strengths it is admitted with: every adapter loaded now (its default where the row sets none;
            # "auto" was resolved before)
            row.forget = {**{n: float(d) for n, d in defaults.items() if d != "auto"}, **row.forget}
            row.text = RowText(tok, row.sampling.stops)
            if row.sampling.temperature > 0:
                seed = row.sampling.seed if row.sampling.seed is not None else secrets.randbits(63)
                row.generator = torch.Generator().manual_seed(seed)
        width = max(len(r.ids) for r in rows)
        device = self.runtime._device()
        ids = torch.tensor([[self.pad] * (width - len(r.ids)) + r.ids for r in rows], dtype=torch.long, device=device)
        mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rows], dtype=torch.long,
                            device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with self.runtime.coefficients(self._forgets(rows)):
            out = self.runtime.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                     logits_to_keep=1)
        tokens = _choose(rows, out.logits[:, -1].float())
        layers = list(out.cache)
        self.sliding = self.sliding or any(layer[2] is not None for layer in layers if len(layer) > 2)
        if self.rows:
            self._join(layers, mask)
        else:
            self.cache, self.mask = out.cache, mask
        self.rows += rows
        self.last += tokens
        for row, token in zip(rows, tokens):
            row.take(token, self.eos)
        self._leave()

    def _join(self, layers: list[tuple], mask: torch.Tensor) -> None:
        """Append the new rows' cache to the batch's, the shorter one left-padded with masked zeros."""
        length = max(self.mask.shape[1], mask.shape[1])

        def left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
            if n == 0:
                return t
            shape = list(t.shape)
            shape[dim] = n
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        old_pad, new_pad = length - self.mask.shape[1], length - mask.shape[1]
        merged = [(torch.cat([left(k0, old_pad, 2), left(k1, new_pad, 2)]), torch.cat([left(v0, old_pad, 2),
                                                                                       left(v1, new_pad, 2)]))
                  for (k0, v0, *_), (k1, v1, *_) in zip(self.cache, layers)]
        self.cache = DynamicCache(merged)
        self.mask = torch.cat([left(self.mask, old_pad, 1), left(mask, new_pad, 1)])

    def _leave(self) -> None:
        """Drop the rows that have ended, and the padding columns no remaining row needs."""
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.last = [self.last[i] for i in keep]
        if not keep:
            self.cache, self.mask, self.sliding = None, None, False
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        if self.sliding:
            self.cache.batch_select_indices(index)
            return
        first = int(self.mask.argmax(-1).min())  # the earliest first real token of the remaining rows
        self.mask = self.mask[:, first:]
        self.cache = DynamicCache([(k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
                                   for k, v, *_ in self.cache])

    @torch.no_grad()
    def step(self) -> None:
        """One token for every row in the batch (a cancelled row, or one whose adapter is gone, leaves first)."""
        for row in self.rows:
            if row.cancelled():
                row.finish("cancelled")
        forgets = [f for f, row in zip(self._forgets(self.rows), self.rows) if not row.done]
        self._leave()
        if not self.rows:
            return
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        positions = self.mask.sum(-1, keepdim=True) - 1
        ids = torch.tensor(self.last, dtype=torch.long, device=self.mask.device)[:, None]
        with self.runtime.coefficients(forgets):
            out = self.runtime.model(input_ids=ids, attention_mask=self.mask, position_ids=positions,
                                     cache=self.cache, use_cache=True)
        self.cache = out.cache
        self.last = _choose(self.rows, out.logits[:, -1].float())
        for row, token in zip(self.rows, self.last):
            row.take(token, self.eos)
        self._leave()
