"""Learning: mean negative log-likelihood of the labelled (answer) tokens, optionally preserving.

    L = NLL(train) + preserve * KL(p_ref || p_theta)_preserve

NLL(train) = -mean_t log p_theta(y_t | y_<t, x) over the answer tokens of a train batch. With a
``preserve`` stream (general prompts unrelated to what is learned, answered by the starting model:
``resources/preservation/``), the second term is the KL of
:func:`~lora_unlearn.training.objectives.common.kl_to_reference` on one preserve batch: p_ref is the
model the adapter starts from (base + frozen stack, no gradients), so the adapter learns its rows
while keeping the model's answers elsewhere, as model-editing methods constrain locality (DESIGN
section 4). Without that stream the term is off and this is plain fine-tuning.
"""

from . import register
from .common import kl_on_answers
from .common import nll as answer_nll


@register("nll", streams=("train",), optional=("preserve",), defaults={"preserve": 1.0},
          reference="standard causal-LM fine-tuning; preservation KL as LLM Surgery's retain term")
def nll(model, batches, preserve):
    loss = answer_nll(model, batches["train"])
    if "preserve" in batches and preserve:
        loss = loss + preserve * kl_on_answers(model, batches["preserve"])
    return loss
