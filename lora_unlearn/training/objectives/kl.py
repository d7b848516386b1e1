"""KL minimisation: ascend on the forget answers, stay close to the reference on retain data.

    L = -NLL_f + alpha * KL(p_ref || p_theta)_r
    KL_r = mean over the retain batch's answer tokens t of sum_v p_ref(v|t) log(p_ref(v|t) / p_theta(v|t))

p_ref is the model before the adapter being trained (base + frozen stack, see
:func:`lora_unlearn.core.stack.reference`), evaluated without gradients. Formula as open-unlearning's
GradDiff with ``retain_loss_type: KL`` (``compute_kl_divergence`` in ``src/trainer/utils.py``;
alpha = 1 from ``configs/trainer/GradDiff.yaml``), with one deliberate difference: open-unlearning
averages the KL over every position of the batch (prompt and padding included, ``batchmean`` over
B*T rows); here only answer tokens count, as for the NLL terms, so padding never dilutes it.
"""

from . import register
from .common import kl_to_reference, logits_of, nll, reference_logits


@register("kl", streams=("forget", "retain"), defaults={"alpha": 1.0},
          reference="open-unlearning GradDiff with KL retain loss (TOFU 'KL' baseline, Maini et al. 2024)")
def kl(model, batches, alpha):
    retain = batches["retain"]
    ref = reference_logits(model, retain)
    return -nll(model, batches["forget"]) + alpha * kl_to_reference(logits_of(model, retain), ref, retain["labels"])
