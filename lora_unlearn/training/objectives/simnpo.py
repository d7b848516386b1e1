"""SimNPO (Fan et al., "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
Unlearning", arXiv 2410.07163): NPO without a reference model, on the length-normalised likelihood.

    l_i = NLL_i / |y_i| - delta                 NLL_i = -log p_theta(y_i|x_i), SUM over the answer tokens
    L   = gamma * ( -(2/beta) * mean_i log sigmoid(beta * l_i) ) + alpha * NLL_r

|y_i| is the number of answer tokens of forget sequence i, so NLL_i / |y_i| is its mean token
NLL; the mean over i runs over the forget batch; NLL_r is the mean answer-token NLL of the retain
batch. The margin delta sits inside beta, as in both codes below; a margin written outside
beta, sigma(-(beta/|y|) log p - gamma'), is gamma' = beta * delta. There is no reference model: the term
needs one forward pass. Sequence i's gradient is weighted by 2 * sigmoid(-beta * l_i), which
fades as its mean token NLL grows (NPO's weight depends on the summed log-ratio, so on the
answer's length too). With beta -> 0 the forget term tends to (2/beta) log 2 - mean_i l_i:
gradient ascent on the mean token NLL.

Formula and defaults from locuslab/open-unlearning (read at commit d3d7cf9e):
``src/trainer/unlearn/simnpo.py`` lines 16-20 (``forget_loss / loss_mask.sum(-1) - self.delta``,
then ``-F.logsigmoid(self.beta * forget_loss).mean() * 2 / self.beta``) and line 30
(``gamma * forget_loss + alpha * retain_loss``); ``configs/trainer/SimNPO.yaml`` lines 6-10:
delta = 0 (the official code's ``gamma``), beta = 4.5, alpha = 1, gamma = 0.125 (the official
``npo_coeff``), retain loss NLL. The same expression is the authors' own code,
OPTML-Group/Unlearn-Simple ``TOFU/dataloader.py`` lines 283-289 (there beta = 2.5, npo_coeff =
0.1375 for Llama-2-7B on forget05, ``TOFU/config/forget.yaml`` lines 18-23).
One deliberate difference: both count |y_i| as ``labels != -100`` before the one-token shift, so
a fully labelled text row counts its first token, whose NLL is not in the sum; here |y_i| is the
number of tokens in the sum (the same for question/answer rows, whose first token is prompt).
"""

import torch
import torch.nn.functional as F

from ...errors import UserError
from . import register
from .common import answer_logits, nll


def simnpo_forget_loss(nll_sum: torch.Tensor, n_tokens: torch.Tensor, beta: float, delta: float) -> torch.Tensor:
    """-(2/beta) * mean log sigmoid(beta * (nll_sum / n_tokens - delta)); nll_sum, n_tokens (B,)."""
    return -(2.0 / beta) * F.logsigmoid(beta * (nll_sum / n_tokens - delta)).mean()


def sequence_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer-token NLL per sequence (B,) and the number of answer tokens (B,), at least 1.

    The vocabulary projection runs on the answer positions only (:func:`.common.answer_logits`);
    ``index_add`` puts each token's NLL back on its sequence.
    """
    logits, target = answer_logits(model, batch)  # (N, V), (N,)
    mask = batch["labels"][:, 1:] != -100  # (B, T-1), in the order answer_logits flattens
    rows = mask.nonzero()[:, 0]  # (N,) sequence of each answer token
    per_token = F.cross_entropy(logits.float(), target, reduction="none")
    total = torch.zeros(mask.shape[0], device=per_token.device, dtype=per_token.dtype).index_add(0, rows, per_token)
    return total, mask.sum(1).clamp(min=1).to(total.dtype)


@register("simnpo", streams=("forget", "retain"), defaults={"beta": 4.5, "delta": 0.0, "gamma": 0.125, "alpha": 1.0},
          reference="Fan et al. 2024, arXiv 2410.07163; formula and defaults of open-unlearning SimNPO")
def simnpo(model, batches, beta, delta, gamma, alpha):
    if not beta > 0:
        raise UserError(f"objective 'simnpo': beta must be > 0, got {beta}")
    for key, value in (("gamma", gamma), ("alpha", alpha)):
        if not value >= 0:
            raise UserError(f"objective 'simnpo': {key} must be >= 0 (a weight; a negative one flips its term), "
                            f"got {value}")
    total, n_tokens = sequence_nll(model, batches["forget"])
    return gamma * simnpo_forget_loss(total, n_tokens, beta, delta) + alpha * nll(model, batches["retain"])
