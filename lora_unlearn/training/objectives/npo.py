"""Negative Preference Optimization (NPO; Zhang et al., "Negative Preference Optimization:
From Catastrophic Collapse to Effective Unlearning", COLM 2024, arXiv 2404.05868).

    L = -(2/beta) * mean_i log sigmoid(-beta * (log p_theta(y_i|x_i) - log p_ref(y_i|x_i))) + alpha * NLL_r

log p(y|x) is the SUM of the answer tokens' log-probabilities of forget sequence i (as
open-unlearning's ``compute_batch_nll``), the mean runs over the forget batch, NLL_r is the mean
answer-token NLL of the retain batch. p_ref is the model before the adapter being trained
(base + frozen stack), evaluated without gradients. At the start (adapter B = 0, p_theta = p_ref)
the forget term is exactly (2/beta) log 2, and its gradient is that of gradient ascent on the
summed log-likelihood; as p_theta(y_f) falls the weight sigmoid(beta * log-ratio) fades, so NPO
slows down instead of diverging.

Formula and defaults (beta = 0.1, alpha = 1, retain loss NLL) from locuslab/open-unlearning:
``src/trainer/unlearn/npo.py`` with ``compute_dpo_loss`` (``src/trainer/utils.py``, lose side only)
and ``configs/trainer/NPO.yaml``. Its gamma (weight of the forget term) is fixed at 1 here.
"""

import torch
import torch.nn.functional as F

from ...errors import UserError
from . import register
from .common import logits_of, nll, reference_logits, sequence_logprob


def npo_forget_loss(logp: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """-(2/beta) * mean log sigmoid(-beta * (logp - logp_ref)); logp, logp_ref (B,) sequence log-probs."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - logp_ref)).mean()


@register("npo", streams=("forget", "retain"), defaults={"beta": 0.1, "alpha": 1.0},
          reference="Zhang et al. 2024, arXiv 2404.05868; formula of open-unlearning NPO")
def npo(model, batches, beta, alpha):
    if not beta > 0:
        raise UserError(f"objective 'npo': beta must be > 0, got {beta}")
    forget = batches["forget"]
    logp_ref = sequence_logprob(reference_logits(model, forget), forget["labels"])
    logp = sequence_logprob(logits_of(model, forget), forget["labels"])
    return npo_forget_loss(logp, logp_ref, beta) + alpha * nll(model, batches["retain"])
