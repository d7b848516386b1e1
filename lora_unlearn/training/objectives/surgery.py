"""LLM Surgery (Veldanda et al., "LLM Surgery: Efficient Knowledge Unlearning and Editing in
Large Language Models", arXiv 2409.13054; official code akshajkumarv/llm_surgery_code).

    L = -a * NLL_f + b * NLL_u + c * KL(p_ref || p_theta)_r

NLL_f / NLL_u: mean answer-token NLL of one batch of the forget (unlearn) / update stream;
KL_r: the KL of :func:`~lora_unlearn.training.objectives.common.kl_to_reference` on one retain batch, with
p_ref the model before the adapter being trained (base + frozen stack), without gradients.

Defaults a = 0.1, b = 2.0, c = 0.5 are ``unlearn_weight`` (and ``edit_unlearn_weight``),
``edit_update_weight`` and ``retain_weight`` of the official ``config_surgery.yaml`` (lines 49-52;
akshajkumarv/llm_surgery_code read at commit 87826d1e). The official code has two unlearn
streams, one batch of each per step, each weighted 0.1 (``train.py`` lines 317-351, the loss at
lines 388-393: ``- unlearn_weight * unlearn_loss - edit_unlearn_weight * edit_unlearn_loss``):
``unlearn``, the true biographies of the facts to drop, and ``edit_unlearn``, the true
biographies of the edited facts (their old versions): two equal halves of the WikiBio set (238
biographies by its README; ``dataset.py`` lines 78-83 and 93-98, ``data_split: 0.5`` at
``config_surgery.yaml`` line 3).
So a = 0.1 is the weight of ONE such stream: the forget stream here holds either (recipes/surgery.yaml:
facts to drop; recipes/surgery_update.yaml: old versions of edits). A forget stream that merges
both takes their sum, a = 0.2: one batch of the union, half of each in expectation, then carries
0.1 of each, as the official step does. Where this differs from the official ``compute_kl``:
that function takes the cross-entropy -sum_v p_ref log p_theta over every position of the
(plain-text) retain batch. The cross-entropy exceeds the KL by the entropy of p_ref, a
constant in theta, so the gradients are the same and only the reported loss differs (here it
starts at 0); positions are the labelled ones, which for text rows is all but the first.

:data:`TRAIN_DEFAULTS` holds the official optimiser settings as :class:`~lora_unlearn.training.trainer.TrainConfig`
fields: AdamW lr 2e-4, betas (0.9, 0.95), weight decay 0.01, a constant learning rate (the
official cosine schedule has max_lr = min_lr = 1 and no warm-up), 120 steps of one batch per
stream (official batch size 1 per GPU), gradient clipping at norm 1.0. Use them as
``TrainConfig(objective="surgery", **TRAIN_DEFAULTS)``.
"""

from . import register
from .common import kl_on_answers, nll

TRAIN_DEFAULTS = {
    "learning_rate": 2e-4,
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "weight_decay": 0.01,
    "lr_scheduler": "constant",
    "warmup_steps": 0,
    "max_steps": 120,
    "max_grad_norm": 1.0,
}


@register("surgery", streams=("forget", "update", "retain"), defaults={"a": 0.1, "b": 2.0, "c": 0.5},
          reference="Veldanda et al. 2024, arXiv 2409.13054 (official code: akshajkumarv/llm_surgery_code)")
def surgery(model, batches, a, b, c):
    kl = kl_on_answers(model, batches["retain"]) if c else 0.0
    return -a * nll(model, batches["forget"]) + b * nll(model, batches["update"]) + c * kl
