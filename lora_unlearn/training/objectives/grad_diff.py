"""Gradient difference (GradDiff): ascend on the forget answers, descend on the retain answers.

    L = -gamma * NLL_f + alpha * NLL_r

NLL_* is the mean answer-token NLL of one batch of the stream. Formula and defaults (gamma = 1,
alpha = 1, retain loss NLL) from locuslab/open-unlearning: ``src/trainer/unlearn/grad_diff.py``
and ``configs/trainer/GradDiff.yaml``. The KL retain variant is the ``kl`` objective.
"""

from . import register
from .common import nll


@register("grad_diff", streams=("forget", "retain"), defaults={"gamma": 1.0, "alpha": 1.0},
          reference="open-unlearning GradDiff (Liu et al. 2022; TOFU baseline)")
def grad_diff(model, batches, gamma, alpha):
    return -gamma * nll(model, batches["forget"]) + alpha * nll(model, batches["retain"])
