"""Asking a model: greedy answers and answer-token probabilities, batched.

The model may be a plain base or a PEFT model holding a stack of adapters (see
:mod:`lora_unlearn.stack`); nothing here merges weights.
"""

from __future__ import annotations

import torch
from transformers import DataCollatorForSeq2Seq

from .data import IGNORE, encode_qa, prompt_text
from .objectives.common import token_nll


@torch.no_grad()
def answer(model, tokenizer, questions: list[str], max_new_tokens: int = 48, batch_size: int = 8) -> list[str]:
    """Greedy answers to ``questions`` through the chat template."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers = []
    try:
        for start in range(0, len(questions), batch_size):
            prompts = [prompt_text(tokenizer, q) for q in questions[start:start + batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return answers


@torch.no_grad()
def answer_nll(model, tokenizer, rows: list[dict[str, str]], batch_size: int = 8, max_length: int = 512) -> torch.Tensor:
    """Mean negative log-likelihood per row over its answer tokens only, shape (len(rows),)."""
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
    out = []
    for start in range(0, len(rows), batch_size):
        batch = collate([encode_qa(tokenizer, r["question"], r["answer"], max_length) for r in rows[start:start + batch_size]])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, mask = token_nll(logits, batch["labels"])
        out.append((nll.sum(1) / mask.sum(1)).cpu())
    return torch.cat(out)


def answer_probability(model, tokenizer, rows: list[dict[str, str]], batch_size: int = 8) -> list[float]:
    """TOFU's normalised answer probability exp(-mean answer-token NLL) per row."""
    return torch.exp(-answer_nll(model, tokenizer, rows, batch_size)).tolist()
