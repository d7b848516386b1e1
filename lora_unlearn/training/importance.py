"""Gradient and Fisher importance for PerTA (Cai et al., arXiv 2601.22030; DESIGN section 3).

PerTA rescales a forget task vector tau per parameter by

    w = I_f^p / (I_f^p + beta * I_r^p + eps)

where I is an importance accumulated over a data set from g, the gradient of the mean
answer-token NLL of one batch:

    kind="grad"    I = sum_batches |g|     (PerTA-grad)
    kind="fisher"  I = sum_batches g^2     (PerTA-fisher: diagonal empirical Fisher)

divided by the number of batches with ``reduction="mean"`` (the default). The paper's exact
normalisation could not be confirmed: the mean keeps I_f and I_r comparable when the forget
and retain sets differ in size (TOFU forget01 has 40 rows, retain hundreds), which matters
because beta and eps compare them in absolute terms; ``reduction="sum"`` is the literal
"accumulated". Batches are the unit of |.| and (.)^2: ``batch_size=1`` (default) gives
per-example terms, as the empirical Fisher is usually defined; larger batches give the
magnitude of mini-batch gradients (unconfirmed which the paper uses).

The model being measured is theta = base + ``stack`` (frozen adapters, e.g. the knowledge
adapter K) with ``at="theta"`` (default; the paper reports that theta and theta + tau make a
negligible difference), or theta + tau (the forget adapter active) with ``at="theta+tau"``.

Two spaces (DESIGN section 3):

- ``space="b"`` (low rank): g is the gradient with respect to each module's B (out, r), with
  A fixed. At theta the adapter is attached with B = 0, so the forward is theta's, and
  g_B = s * g_W @ A^T: the dense gradient projected on A's rows.
- ``space="dense"``: g is the gradient with respect to the layer weight W (out, in). A 4-bit
  weight cannot require grad, so hooks capture the layer input x (T, in) and the gradient of
  the layer output grad_out (T, out), and g_W = grad_out^T @ x summed over the batch's tokens.

Memory of dense importance: one float32 (out, in) accumulator per target module per call,
i.e. 4 bytes x sum(out * in); PerTA needs two (forget and retain): 8 bytes x sum(out * in).
For SmolLM2-135M with all-linear targets (30 layers, sum(out * in) = 106,168,320) that is
425 MB per data set, 849 MB for both; for a 7B Llama (~6.5e9 linear weights) it is ~26 GB per
data set, ~52 GB for both. Hence one data set per call: estimate I_f, save it
(:func:`save_importance`), estimate I_r, then rescale module by module. Accumulators live on
the layer's device; B-space needs 4 bytes x sum(out * r), about 1/100 of that at r = 8.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..arithmetic.perta import check_maps
from ..core.adapter import Adapter
from ..core.data import IGNORE, fingerprint, to_dataset
from ..errors import UserError

# In place on a per-batch gradient nobody else holds: a dense map is one (out, in) float32 each.
KINDS = {"grad": torch.abs_, "fisher": torch.square_, "signed": lambda g: g}  # "signed": for checks only
SPACES = ("b", "dense")
ATS = ("theta", "theta+tau")
REDUCTIONS = ("mean", "sum")
META_KEY = "lora_unlearn_importance"


def _choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise UserError(f"unknown {name} {value!r}. Available: {', '.join(allowed)}")


def batches(tokenizer, rows: list[dict[str, str]], batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    """Padded batches {input_ids, attention_mask, labels} of ``rows`` in order (labels on answers)."""
    from transformers import DataCollatorForSeq2Seq

    dataset = to_dataset(tokenizer, rows, max_length)
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
    return [collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            for start in range(0, len(dataset), batch_size)]


def estimate_importance(model, tokenizer, rows: list[dict[str, str]], adapter: Adapter, *, kind: str = "grad",
                        space: str = "b", at: str = "theta", stack: list[tuple[Adapter, float]] = (),
                        batch_size: int = 1, max_length: int = 256, reduction: str = "mean",
                        progress: bool = True) -> dict[str, torch.Tensor]:
    """Importance of ``adapter``'s parameters on ``rows``: {module: float32 tensor on CPU}.

    ``model`` is the base (as from :func:`lora_unlearn.core.models.load_base`, 4-bit or not);
    ``stack`` are the frozen adapters that make theta (they stay active). Shapes: B's (out, r)
    with ``space="b"``, the layer's (out, in) with ``space="dense"``. ``kind`` is "grad"
    (|g|), "fisher" (g^2) or "signed" (g itself: not an importance, for checking the math).
    The model comes back as it was (no adapter attached, requires_grad flags and train/eval
    mode restored).
    """
    _choice("importance kind", kind, tuple(KINDS))
    _choice("importance space", space, SPACES)
    _choice("gradient point 'at'", at, ATS)
    _choice("reduction", reduction, REDUCTIONS)
    if not rows:
        raise UserError("the data set is empty: importance needs at least one row")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be an integer >= 1, got {batch_size!r}")
    data = batches(tokenizer, rows, batch_size, max_length)
    run = _b_space if space == "b" else _dense_space
    with _restored(model), torch.enable_grad():
        acc = run(model, data, adapter, KINDS[kind], at, list(stack), _progress(progress, space, kind, len(data)))
    divisor = len(data) if reduction == "mean" else 1
    return {name: t.div_(divisor).cpu() for name, t in acc.items()}


@contextlib.contextmanager
def _restored(model) -> Iterator[None]:
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    training = model.training
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, False))
        model.train(training)


def _progress(enabled: bool, space: str, kind: str, total: int):
    if not enabled:
        return lambda data: data

    def wrap(data):
        from ..progress import bar

        with bar() as progress:
            task = progress.add_task(f"importance ({kind}, {space} space)", total=total, info="")
            for batch in data:
                yield batch
                progress.advance(task)
    return wrap


def _loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    batch = {k: v.to(model.device) for k, v in batch.items()}
    loss = model(**batch).loss
    if not torch.isfinite(loss):
        raise UserError(f"the answer NLL of a batch is {loss.item()} (no labelled tokens, or a broken model): "
                        "check that every row has an answer within max_length")
    return loss


def _layer(root, name: str, adapter: Adapter):
    """The linear layer at ``name`` (the base layer under a PEFT LoRA wrapper), shape-checked."""
    try:
        module = root.get_submodule(name)
    except AttributeError:
        raise UserError(f"the model has no module {name} (from the adapter): "
                        "was the adapter trained on another base model?") from None
    layer = getattr(module, "base_layer", module)
    m = adapter.modules[name]
    want = (m.B.shape[0], m.A.shape[1])
    got = (getattr(layer, "out_features", None), getattr(layer, "in_features", None))
    if got != want:
        raise UserError(f"module {name} is {got} (out, in) in the model but {want} in the adapter: "
                        "was the adapter trained on another base model?")
    return module, layer


def _b_space(model, data, adapter, transform, at, stack, progress) -> dict[str, torch.Tensor]:
    from ..core.stack import TRAINABLE, attached, lora_config

    with attached(model, stack, trainable=lora_config(adapter, inference_mode=False)) as peft_model:
        peft_model.eval()  # LoRA dropout off: the gradient of the deterministic forward
        root = peft_model.get_base_model()
        params = {}
        for name, m in adapter.modules.items():
            module, _ = _layer(root, name, adapter)
            if TRAINABLE not in getattr(module, "lora_A", {}):
                raise UserError(f"module {name} is not targeted by the adapter's config "
                                f"(target_modules={adapter.config.get('target_modules')}): the adapter is inconsistent")
            lora_A, lora_B = module.lora_A[TRAINABLE].weight, module.lora_B[TRAINABLE].weight
            with torch.no_grad():
                lora_A.copy_(m.A)
                lora_B.copy_(m.B if at == "theta+tau" else torch.zeros_like(m.B))
            lora_A.requires_grad_(False)
            params[name] = lora_B
        for p in peft_model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        acc = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params.items()}
        for batch in progress(data):
            _loss(peft_model, batch).backward()
            for name, p in params.items():
                if p.grad is not None:
                    acc[name] += transform(p.grad.float().clone())
                    p.grad = None
    return acc


def _dense_space(model, data, adapter, transform, at, stack, progress) -> dict[str, torch.Tensor]:
    from ..core.stack import attached

    stack = stack + [(adapter, 1.0)] if at == "theta+tau" else stack
    with attached(model, stack) as m:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        root = m.get_base_model() if m is not model else m
        layers = {name: _layer(root, name, adapter)[1] for name in adapter.modules}
        acc = {name: torch.zeros(layer.out_features, layer.in_features, dtype=torch.float32,
                                 device=_device(layer)) for name, layer in layers.items()}
        calls = dict.fromkeys(layers, 0)

        def capture(name):
            def forward_hook(module, args, out):
                calls[name] += 1
                if calls[name] > 1:
                    raise UserError(f"module {name} ran twice in one forward pass (gradient checkpointing or a "
                                    "shared layer): dense importance needs one call per layer per batch")
                x = args[0].detach()

                def backward_hook(grad_out):
                    g = grad_out.reshape(-1, grad_out.shape[-1]).float()  # (T, out)
                    acc[name] += transform(g.T @ x.reshape(-1, x.shape[-1]).float())  # (out, in)
                out.register_hook(backward_hook)
            return forward_hook

        # The weights are frozen (4-bit ones cannot require grad): make the embeddings' output a
        # grad-requiring tensor so that every layer output carries a gradient back to the hooks.
        handles = [root.get_input_embeddings().register_forward_hook(lambda mod, args, out: out.requires_grad_(True))]
        handles += [layer.register_forward_hook(capture(name)) for name, layer in layers.items()]
        try:
            for batch in progress(data):
                calls.update(dict.fromkeys(calls, 0))
                _loss(m, batch).backward()
        finally:
            for h in handles:
                h.remove()
    return acc


def _device(layer) -> torch.device:
    return next(iter(layer.parameters())).device


# Saving: importance is the expensive half of PerTA; a sweep over lam, beta or p reuses it.

def importance_meta(rows: list[dict[str, str]], adapter: Adapter, *, kind: str, space: str, at: str,
                    reduction: str = "mean", batch_size: int = 1, max_length: int = 256,
                    stack: list[tuple[Adapter, float]] = (), base: str | None = None) -> dict[str, Any]:
    """What :func:`save_importance` records: how the maps were made (never the data itself)."""
    return {
        "kind": kind, "space": space, "at": at, "reduction": reduction, "batch_size": batch_size,
        "max_length": max_length, "rows": len(rows), "data": fingerprint(rows), "base": base or adapter.base_model,
        "adapter_sha256": adapter.lineage.get("sha256"),
        "stack": [{"sha256": a.lineage.get("sha256"), "scale": c} for a, c in stack],
    }


def save_importance(maps: dict[str, torch.Tensor], path: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``maps`` to one safetensors file (atomically) with ``meta`` (JSON) in its header."""
    from safetensors.torch import save_file

    missing = [k for k in ("kind", "space", "at") if k not in meta]
    if missing:
        raise UserError(f"importance metadata lacks {', '.join(missing)}: build it with importance_meta()")
    if not maps:
        raise UserError("no importance maps to save")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in maps.items()}, tmp,
                  metadata={"format": "pt", META_KEY: json.dumps(meta, sort_keys=True)})
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_importance(path: str | Path, adapter: Adapter | None = None, *,
                    strict: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read (maps, meta); with ``adapter``, check the maps belong to it.

    Module names and shapes must match the adapter (B's shape in B space, (out, in) in dense
    space). With ``strict``, the adapter's sha256 must also match the recorded one when both
    are known and the maps depend on the adapter's weights (B space, or ``at="theta+tau"``);
    dense maps at theta depend only on which modules are targeted.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"importance file {path} does not exist: compute it with estimate_importance() "
                        "and save_importance()")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            maps = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read as safetensors ({e}): the file is corrupt or truncated") from None
    try:
        meta = json.loads(header[META_KEY])
    except (KeyError, json.JSONDecodeError):
        raise UserError(f"{path} is not an importance file written by save_importance (no {META_KEY} metadata)") from None
    if adapter is not None:
        check_maps(maps, adapter, meta.get("space", "b"), where=str(path))
        recorded, actual = meta.get("adapter_sha256"), adapter.lineage.get("sha256")
        depends = meta.get("space") == "b" or meta.get("at") == "theta+tau"
        if strict and depends and recorded and actual and recorded != actual:
            raise UserError(f"{path} was computed for adapter sha256 {recorded[:12]}..., not for this one "
                            f"({actual[:12]}...): recompute the importance (or pass strict=False)")
    return maps, meta
