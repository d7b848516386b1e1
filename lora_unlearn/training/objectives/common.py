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


def nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean answer-token NLL of the model (with the trainable adapter) on a batch."""
    return mean_nll(logits_of(model, batch), batch["labels"])


def reference_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the reference model, base + frozen stack without the trainable adapter; no graph."""
    with torch.no_grad(), reference(model):
        return logits_of(model, batch)
