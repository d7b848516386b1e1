"""Asking a model: greedy answers and answer-token probabilities, batched.

The model may be a plain base or a PEFT model holding a stack of adapters (see
:mod:`lora_unlearn.core.stack`); nothing here merges weights.

Rows are batched by length (shortest first) so that a batch carries little padding; results
come back in the input order. Padding is on the left with explicit position ids, so every row
sees the positions it would see alone, and the answers of a batch end in the same column: the
teacher-forced pass asks for the logits of those last columns only (``logits_to_keep``), not
for the (B, T, V) logits of the prompt as well.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from .data import IGNORE, encode_qa, prompt_text


@contextlib.contextmanager
def dequantized(model, enabled: bool | None = None) -> Iterator[int]:
    """Run the model's bitsandbytes 4-bit layers from a dequantized copy of their weights, for a block.

    On CPU, bitsandbytes computes a 4-bit layer as ``F.linear(x, dequantize_4bit(W), bias)`` and
    dequantizes every weight again on every forward: for SmolLM2-135M that is about 2 CPU-seconds
    per forward whatever the batch holds, so greedy generation (one forward per new token) spends
    nearly all its time dequantizing. Here each 4-bit weight is dequantized once, with the same
    bitsandbytes function, and the layer computes ``F.linear`` in its compute dtype with it: the
    same numbers as the 4-bit forward (tests compare), not a merge, and LoRA adapters on top stay
    separate. The cost is the float weights' memory (4 bytes per parameter in float32) while the
    block runs. ``enabled=None`` turns it on when the 4-bit weights are on the CPU. Yields the
    number of layers switched; nested use leaves already switched layers alone.
    """
    try:
        from bitsandbytes.functional import dequantize_4bit
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        yield 0
        return
    layers = [m for m in model.modules() if isinstance(m, Linear4bit) and "forward" not in vars(m)]
    if enabled is None:
        enabled = bool(layers) and layers[0].weight.device.type == "cpu"
    if not enabled:
        yield 0
        return
    try:
        for m in layers:
            dtype = m.compute_dtype or torch.float32
            weight = dequantize_4bit(m.weight.data, m.weight.quant_state).to(dtype)
            bias = None if m.bias is None else m.bias.detach().to(dtype)

            def forward(x, weight=weight, bias=bias):
                return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
            m.forward = forward
        yield len(layers)
    finally:
        for m in layers:
            vars(m).pop("forward", None)


def _by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices sorted by length, cut into batches."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _accepts(model, name: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(base.forward).parameters


@torch.no_grad()
def answer(model, tokenizer, questions: list[str], max_new_tokens: int = 48, batch_size: int = 8,
           on_batch: Callable[[], None] | None = None) -> list[str]:
    """Greedy answers to ``questions`` through the chat template, in the order given.

    ``on_batch`` is called after every batch (progress bars).
    """
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    prompts = [prompt_text(tokenizer, q) for q in questions]
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]] if prompts else []
    answers: list[str] = [""] * len(questions)
    try:
        for batch in _by_length(lengths, batch_size):
            enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            for i, text in zip(batch, tokenizer.batch_decode(new, skip_special_tokens=True)):
                answers[i] = text.strip()
            if on_batch is not None:
                on_batch()
    finally:
        tokenizer.padding_side = side
    return answers


Scores = tuple[torch.Tensor, list[list[int]], list[list[int]]]


@torch.no_grad()
def answer_scores(model, tokenizer, rows: list[dict[str, str]], batch_size: int = 8, max_length: int = 512,
                  on_batch: Callable[[], None] | None = None, share_prompts: bool = True) -> Scores:
    """One teacher-forced pass over (question, answer) rows through the chat template.

    Returns ``(nll, predicted, labels)``: ``nll`` (N,) float32 is the mean NLL over each row's
    answer tokens (the completion: answer and end-of-turn marker, exactly what training labels);
    ``predicted[i]`` and ``labels[i]`` are, at each of row i's answer-token positions, the
    argmax next-token prediction and the true token (lists of ids, same length).

    With ``share_prompts`` rows that ask the same question (an answer and its paraphrased and
    perturbed variants) share one forward pass of the prompt: its keys and values are computed
    once and copied for each answer, which then runs on its own tokens only. The numbers are
    those of the full sequences (tests compare); models whose cache is not a plain
    ``DynamicCache`` take the full-sequence path.
    """
    encoded = [encode_qa(tokenizer, r["question"], r["answer"], max_length) for r in rows]
    out = _Scores(len(rows), on_batch)
    if share_prompts and rows and _scores_shared(model, tokenizer, encoded, batch_size, out):
        return out.result()
    out = _Scores(len(rows), on_batch)
    keep_supported = _accepts(model, "logits_to_keep")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for batch in _by_length([len(e["input_ids"]) for e in encoded], batch_size):
        items = [encoded[i] for i in batch]
        T = max(len(e["input_ids"]) for e in items)
        ids = torch.tensor([[pad] * (T - len(e["input_ids"])) + e["input_ids"] for e in items])
        mask = torch.tensor([[0] * (T - len(e["input_ids"])) + e["attention_mask"] for e in items])
        lab = torch.tensor([[IGNORE] * (T - len(e["labels"])) + e["labels"] for e in items])  # (B, T)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        # The first answer token sits at column `first`; its logits come from column first - 1.
        first = int((lab != IGNORE).float().argmax(1).min())
        keep = T - max(first - 1, 0)
        kwargs = {"logits_to_keep": keep} if keep_supported else {}
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                       position_ids=positions.to(model.device), **kwargs).logits[:, -keep:]  # (B, keep, V)
        lab = lab[:, T - keep:].to(logits.device)
        out.add(batch, logits[:, :-1], lab[:, 1:])
    return out.result()


class _Scores:
    """Collects per-row NLL, argmax predictions and labels from (B, L, V) logits aligned with (B, L) targets."""

    def __init__(self, n: int, on_batch):
        self.nll = torch.empty(n)
        self.predicted: list[list[int]] = [[] for _ in range(n)]
        self.labels: list[list[int]] = [[] for _ in range(n)]
        self.on_batch = on_batch

    def add(self, rows: list[int], logits: torch.Tensor, targets: torch.Tensor) -> None:
        """``logits[b, t]`` predicts ``targets[b, t]``; targets are IGNORE off the answer."""
        tok_nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
        mask = targets != IGNORE  # (B, L)
        self.nll[rows] = (tok_nll.sum(1) / mask.sum(1).clamp(min=1)).float().cpu()
        argmax = logits.argmax(-1)
        for j, i in enumerate(rows):
            self.predicted[i] = argmax[j][mask[j]].tolist()
            self.labels[i] = targets[j][mask[j]].tolist()
        if self.on_batch is not None:
            self.on_batch()

    def result(self) -> Scores:
        return self.nll, self.predicted, self.labels


def _scores_shared(model, tokenizer, encoded: list[dict[str, list[int]]], batch_size: int, out: _Scores) -> bool:
    """The shared-prompt pass of ``answer_scores``; False (nothing recorded) when the model's cache does not allow it.

    Per group of ``batch_size`` distinct prompts: one left-padded forward of the prompts with the
    cache on, keeping the last prompt position's logits (they predict the first answer token);
    then the answers, right-padded, in batches of ``batch_size``, each on a copy of its prompt's
    keys and values, with position ids continuing from the prompt's true length. Answer token t
    is predicted by the prompt's last logits for t = 0 and by the answer pass's logits t - 1 after.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model.device
    split = []  # (prompt ids, answer ids, answer labels) per row
    for e in encoded:
        n_prompt = sum(1 for x in e["labels"] if x == IGNORE)
        split.append((tuple(e["input_ids"][:n_prompt]), e["input_ids"][n_prompt:], e["labels"][n_prompt:]))
    prompts = sorted({p for p, _, _ in split}, key=len)
    owner = {p: i for i, p in enumerate(prompts)}
    by_prompt: list[list[int]] = [[] for _ in prompts]
    for row, (p, _, _) in enumerate(split):
        by_prompt[owner[p]].append(row)
    keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    for g in range(0, len(prompts), batch_size):
        group = prompts[g:g + batch_size]
        P = len(group[-1])
        p_ids = torch.tensor([[pad] * (P - len(p)) + list(p) for p in group], device=device)
        p_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in group], device=device)
        cache = DynamicCache(config=model.config)
        res = model(input_ids=p_ids, attention_mask=p_mask, position_ids=(p_mask.cumsum(1) - 1).clamp(min=0),
                    past_key_values=cache, use_cache=True, **keep)
        cache = res.past_key_values
        if (not isinstance(cache, DynamicCache) or cache.get_seq_length() != P
                or any(type(layer) is not DynamicLayer for layer in cache.layers)):
            return False  # e.g. no cache while training with gradient checkpointing, sliding-window layers
        last = res.logits[:, -1]  # (G, V): predicts each prompt's first answer token
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        rows = [r for i in range(len(group)) for r in by_prompt[g + i]]
        rows.sort(key=lambda r: len(split[r][1]))
        for b in range(0, len(rows), batch_size):
            batch = rows[b:b + batch_size]
            src = torch.tensor([owner[split[r][0]] - g for r in batch], device=device)
            L = max(len(split[r][1]) for r in batch)
            a_ids = torch.tensor([split[r][1] + [pad] * (L - len(split[r][1])) for r in batch], device=device)
            a_lab = torch.tensor([split[r][2] + [IGNORE] * (L - len(split[r][2])) for r in batch], device=device)
            a_mask = (torch.arange(L, device=device)[None] < torch.tensor([len(split[r][1]) for r in batch],
                                                                           device=device)[:, None]).long()
            lengths = p_mask.sum(1)[src]  # true prompt lengths
            copy = DynamicCache(ddp_cache_data=[(k[src], v[src]) for k, v in kv], config=model.config)
            logits = model(input_ids=a_ids, attention_mask=torch.cat([p_mask[src], a_mask], 1),
                           position_ids=lengths[:, None] + torch.arange(L, device=device)[None],
                           past_key_values=copy, use_cache=True).logits  # (B, L, V)
            out.add(batch, torch.cat([last[src][:, None], logits[:, :-1]], 1), a_lab)
    return True


def answer_nll(model, tokenizer, rows: list[dict[str, str]], batch_size: int = 8, max_length: int = 512) -> torch.Tensor:
    """Mean negative log-likelihood per row over its answer tokens only, shape (len(rows),)."""
    return answer_scores(model, tokenizer, rows, batch_size, max_length)[0]


def answer_probability(model, tokenizer, rows: list[dict[str, str]], batch_size: int = 8) -> list[float]:
    """TOFU's normalised answer probability exp(-mean answer-token NLL) per row."""
    return torch.exp(-answer_nll(model, tokenizer, rows, batch_size)).tolist()
