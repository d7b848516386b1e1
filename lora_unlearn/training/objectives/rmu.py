"""RMU, Representation Misdirection for Unlearning (Li et al., "The WMDP Benchmark: Measuring and
Reducing Malicious Use With Unlearning", ICML 2024, arXiv 2403.03218).

    L = gamma * MSE(h_theta(x_f), c * u) + alpha * MSE(h_theta(x_r), h_ref(x_r))
    MSE(h, g) = mean_i [ (1/|y_i|) sum_{t in y_i} (1/d) ||h_it - g_it||^2 ]

h(x) (B, T, d) is the output of decoder layer ``layer`` (the residual stream after it); the inner
sum runs over sequence i's labelled tokens t (``labels != -100``, no shift: the hidden state at t
belongs to token t), the outer mean over the sequences of the batch (a mean of per-sequence
means). u is a fixed random direction in R^d, ``torch.rand`` (uniform on [0, 1)^d, as the
original) normalised to |u| = 1, drawn from a generator seeded with ``seed``, so a run can be
repeated and the vector rebuilt; c is ``steering_coeff``. h_ref is the reference model's hidden
state at the same layer (base + frozen stack, without the adapter being trained, see
:func:`lora_unlearn.core.stack.reference`), without gradients. The forget term pushes the forget
tokens' activations towards the arbitrary vector c * u, which scrambles what the layers above
read from them; the retain term holds the retain tokens' activations where they were.

Formula and defaults from locuslab/open-unlearning (read at commit d3d7cf9e), which borrows the
WMDP code (centerforaisafety/wmdp ``rmu/unlearn.py``): ``src/trainer/unlearn/rmu.py`` lines 83-98
(a forward hook caches the module's output), 100-106 (``torch.rand(1, 1, dim)``, normalised, times
``steering_coeff``), 108-117 (the masked MSE above), 119-134 (``EMBED_DIFF`` retain loss against
the reference model), 171 (``gamma * forget_loss + alpha * retain_loss``); ``configs/trainer/RMU.yaml``
lines 7-11: gamma = 1, steering_coeff = 2, retain_loss_type EMBED_DIFF, alpha = 1, module
``model.layers.7``. open-unlearning draws u from the global RNG; here it has its own seed.

Layer. ``model.layers.7`` is WMDP's choice for Zephyr-7B (32 layers; open-unlearning's WMDP
experiment, ``configs/experiment/unlearn/wmdp/default.yaml`` lines 4 and 54); open-unlearning
keeps index 7 for every model (``scripts/tofu_unlearn.sh`` lines 7-17 run it on Llama-3.2-1B's 16
layers as on Llama-3.1-8B's 32). Here ``layer: None`` takes the same fraction of depth,
``floor(7/32 * n_layers + 1/2)`` (7 of 32, 4 of 16, 7 of 30 for SmolLM2-135M, 0 of 2), and an
integer picks a layer (0-based) explicitly.

On adapters: the adapter trains on its target modules (all linear layers by default), but only
those at or below ``layer`` change h, so the modules above keep B = 0. To keep a step cheap, the
forward stops once that layer has run (the hook raises; no layer above and no vocabulary
projection runs). Under ``accelerate launch`` the whole forward runs instead (DDP must see it end
and expects a gradient for every trainable parameter: the layers above get an exact 0).
Open-unlearning's WMDP experiment trains only ``layers.(5|6|7).mlp.down_proj``; the equivalent
here is ``target_modules: [down_proj]``, which reaches every layer's down_proj, and only those up
to ``layer`` move.
"""

from __future__ import annotations

import math

import torch

from ...core.stack import reference
from ...errors import UserError
from ..jobs import world_size
from . import register
from .common import _split_head

DEPTH_FRACTION = 7 / 32  # WMDP's layer 7 of Zephyr-7B's 32


class _LayerDone(Exception):
    """Raised by the hook once the chosen layer's output is cached: nothing above it is needed."""


def decoder_layers(model) -> torch.nn.ModuleList:
    """The stack of decoder layers: the first ``ModuleList`` named ``layers`` (Llama, Mistral, Qwen,
    Gemma, ...) or ``h`` (GPT-2 style), found through PEFT and distributed wrappers."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h") and len(module):
            return module
    raise UserError("objective 'rmu' needs the model's decoder layers (a ModuleList named 'layers' or 'h'); "
                    "this model has none")


def layer_index(n_layers: int, layer) -> int:
    """The decoder layer RMU reads: ``layer`` itself, or for None the WMDP fraction of depth."""
    if layer is None:
        return min(n_layers - 1, math.floor(DEPTH_FRACTION * n_layers + 0.5))
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise UserError(f"objective 'rmu': layer must be an integer in 0..{n_layers - 1} (this model has {n_layers} "
                        f"decoder layers) or null for {DEPTH_FRACTION:g} of the depth, got {layer!r}")
    return layer


def control_vector(dim: int, seed: int) -> torch.Tensor:
    """u (dim,): ``torch.rand`` from a generator seeded with ``seed``, scaled to unit norm; float32 on the CPU."""
    u = torch.rand(dim, generator=torch.Generator().manual_seed(seed))
    return u / u.norm()


def activation_mse(hidden: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of the mean over their labelled tokens of (1/d) ||hidden - target||^2.

    hidden (B, T, d), target broadcastable to it, labels (B, T). Computed in float32; a sequence
    without labelled tokens adds 0.
    """
    mask = (labels != -100).to(torch.float32)  # (B, T)
    per_token = (hidden.float() - target.float()).pow(2).mean(dim=-1)  # (B, T)
    return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()


def hidden_at(model, batch: dict[str, torch.Tensor], index: int) -> torch.Tensor:
    """Output (B, T, d) of decoder layer ``index`` on a batch; with gradients if they are enabled.

    One process, plain or PEFT model: the forward stops after that layer. Otherwise (DDP, FSDP,
    DeepSpeed, DataParallel) the whole forward runs, and the result carries 0 * sum(logits): every
    trainable parameter then gets a gradient (0 above the layer), as DDP expects of each step.
    """
    cache: list[torch.Tensor] = []
    stop = world_size() == 1 and _split_head(model) is not None

    def keep(module, args, output):
        cache.append(output[0] if isinstance(output, tuple) else output)
        if stop:
            raise _LayerDone

    handle = decoder_layers(model)[index].register_forward_hook(keep)
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    except _LayerDone:
        return cache[0]
    finally:
        handle.remove()
    return cache[0] + out.logits.sum() * 0.0 if torch.is_grad_enabled() else cache[0]


@register("rmu", streams=("forget", "retain"),
          defaults={"steering_coeff": 2.0, "alpha": 1.0, "gamma": 1.0, "layer": None, "seed": 0},
          reference="Li et al. 2024 (WMDP), arXiv 2403.03218; formula and defaults of open-unlearning RMU")
def rmu(model, batches, steering_coeff, alpha, gamma, layer, seed):
    if not steering_coeff > 0:
        raise UserError(f"objective 'rmu': steering_coeff must be > 0 (the length of the target c * u), "
                        f"got {steering_coeff}")
    for key, value in (("alpha", alpha), ("gamma", gamma)):
        if not value >= 0:
            raise UserError(f"objective 'rmu': {key} must be >= 0 (a weight; a negative one flips its term), "
                            f"got {value}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"objective 'rmu': seed must be an integer (it draws the direction u), got {seed!r}")
    index = layer_index(len(decoder_layers(model)), layer)
    forget, retain = batches["forget"], batches["retain"]
    h_f = hidden_at(model, forget, index)  # (B, T, d)
    target = steering_coeff * control_vector(h_f.shape[-1], seed).to(h_f.device)  # (d,)
    loss = gamma * activation_mse(h_f, target, forget["labels"])
    if alpha:
        with torch.no_grad(), reference(model):
            h_ref = hidden_at(model, retain, index)
        loss = loss + alpha * activation_mse(hidden_at(model, retain, index), h_ref, retain["labels"])
    return loss
