"""What the objectives share: answer-token log-probabilities, mean NLL, KL to the reference.

Shapes: ``logits`` (B, T, V), ``labels`` (B, T) holding -100 outside the answer tokens. The
logits at position t predict token t+1, so every function compares ``logits[:, :-1]`` with
``labels[:, 1:]``; the answer mask is ``labels[:, 1:] != -100`` (B, T-1). Logits are upcast to
float32 before any softmax, as transformers' own causal-LM loss does.

The pure functions (``token_nll``, ``sequence_logprob``, ``mean_nll``, ``kl_to_reference``) take
tensors only; ``logits_of``, ``nll`` and ``reference_logits`` run the model on one batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...core.data import IGNORE
from ...core.stack import reference


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-log p(label) per next-token position, 0 off the answer, and the answer mask; both (B, T-1)."""
    target = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
    return nll, target != IGNORE


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(y) per sequence: the SUM of the answer tokens' log-probabilities, shape (B,).

    The negative of open-unlearning's ``compute_batch_nll`` (NPO's log-likelihood).
    """
    return -token_nll(logits, labels)[0].sum(dim=1)


def mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over all answer tokens of the batch (not a mean of per-sequence means), a scalar.

    Equals transformers' ``model(**batch).loss``. A batch without answer tokens gives 0.
    """
    nll, mask = token_nll(logits, labels)
    return nll.sum() / mask.sum().clamp(min=1)


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p_theta) per next-token position, averaged over the answer tokens; a scalar.

        KL_t = sum_v p_ref(v) * (log p_ref(v) - log p_theta(v))

    Only answer positions enter (prompt and padding do not); a batch without any gives 0.
    """
    mask = labels[:, 1:] != IGNORE  # (B, T-1)
    log_q = torch.log_softmax(logits[:, :-1][mask].float(), dim=-1)  # (N, V), N answer tokens
    log_p = torch.log_softmax(ref_logits[:, :-1][mask].float(), dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="sum", log_target=True)
    return kl / mask.sum().clamp(min=1)


def logits_of(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits (B, T, V) on a batch; labels are not passed, so no loss is computed twice."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _split_head(model):
    """(decoder, lm_head) of a causal LM (PEFT-wrapped or not), or None when the model is wrapped
    by a distributed engine (DDP, FSDP, DeepSpeed), whose gradient hooks sit on the whole model."""
    if not hasattr(model, "get_base_model") and not hasattr(model, "get_output_embeddings"):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None or getattr(base.config, "final_logit_softcapping", None):
        return None
    return decoder, head


def answer_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, V) at the N next-token positions that predict an answer token, and those tokens (N,).

    The same numbers as ``logits_of(model, batch)[:, :-1][mask]``, but the vocabulary projection
    runs on the answer positions only: an edit row is ~35 prompt tokens and ~4 answer tokens, and
    for a 49k vocabulary the projection is most of a small model's forward. Models this cannot
    split (distributed wrappers, logit soft-capping) take the full path.
    """
    target = batch["labels"][:, 1:]
    mask = target != IGNORE
    parts = _split_head(model)
    if parts is None:
        return logits_of(model, batch)[:, :-1][mask], target[mask]
    decoder, head = parts
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return head(hidden[:, :-1][mask]), target[mask]


def nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean answer-token NLL of the model (with the trainable adapter) on a batch (0 without answer tokens)."""
    logits, target = answer_logits(model, batch)
    if target.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target)


def kl_on_answers(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`kl_to_reference` on a batch, the vocabulary projection on answer positions only."""
    logits, target = answer_logits(model, batch)
    with torch.no_grad(), reference(model):
        ref, _ = answer_logits(model, batch)
    if target.numel() == 0:
        return logits.sum() * 0.0
    log_q, log_p = torch.log_softmax(logits.float(), dim=-1), torch.log_softmax(ref.float(), dim=-1)
    return F.kl_div(log_q, log_p, reduction="sum", log_target=True) / target.numel()


def reference_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the reference model, base + frozen stack without the trainable adapter; no graph."""
    with torch.no_grad(), reference(model):
        return logits_of(model, batch)
