"""Learning: mean negative log-likelihood of the labelled (answer) tokens.

    L = NLL(train) = -mean_t log p_theta(y_t | y_<t, x)
"""

from . import register


@register("nll", streams=("train",), reference="standard causal-LM fine-tuning")
def nll(model, batches):
    return model(**batches["train"]).loss
