"""Gradient ascent (GradAscent): raise the NLL of the forget answers.

    L = -NLL_f = mean_t log p_theta(y_t | y_<t, x)      over the forget batch's answer tokens

Formula as in locuslab/open-unlearning (``src/trainer/unlearn/grad_ascent.py``: ``loss =
-outputs.loss``); no parameters. Unbounded below: the run length (steps, epochs) is the only
brake, which is why GradDiff, KL and NPO add a retain term.
"""

from . import register
from .common import nll


@register("grad_ascent", streams=("forget",), reference="open-unlearning GradAscent (Jang et al. 2023; TOFU baseline)")
def grad_ascent(model, batches):
    return -nll(model, batches["forget"])
