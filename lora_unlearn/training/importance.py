"""Gradient and Fisher importance for PerTA (Cai et al., arXiv 2601.22030; DESIGN section 3).

PerTA rescales a forget task vector tau per parameter by

    w = I_f^p / (I_f^p + beta * I_r^p + eps)

where I is an importance accumulated over a data set from the gradients g_t of terms t: a term
is the mean answer-token NLL of one example (``batch_size=1``, the default) or of a mini-batch
of ``batch_size`` rows. The two readings of "accumulated" (DESIGN section 3), named by
``accumulate``:

    accumulate="per_example"  (default)  I = sum_t |g_t|     or  sum_t g_t^2      (per term)
    accumulate="set"                     I = |sum_t g_t|     or  (sum_t g_t)^2    (over the set)

with ``kind="grad"`` (|.|, PerTA-grad) or ``kind="fisher"`` ((.)^2, PerTA-fisher: the diagonal
empirical Fisher in the per-example reading). "set" is |.| of the gradient of the set's loss,
sum_t NLL_t. With ``reduction="mean"`` (the default) the sums become means over the n terms:
(1/n) sum_t |g_t| per example, |(1/n) sum_t g_t| over the set (the gradient of the mean loss).
The paper's exact normalisation and reading could not be confirmed: the mean keeps I_f and I_r
comparable when the forget and retain sets differ in size (TOFU forget01 has 40 rows, retain
hundreds), which matters because beta and eps compare them in absolute terms;
``reduction="sum"`` is the literal "accumulated".

Per-example terms do not need one forward/backward per row: ``rows_per_pass`` rows (default 8)
go through the model at once, right-padded, with the loss the sum of each row's own mean NLL,
and hooks split the weight gradient by row (g_W,i = grad_out_i^T x_i, row i's tokens only),
which is row i's batch-of-one gradient; ``rows_per_pass=1`` is the per-row pass. The map does
not depend on it beyond float rounding (a test checks).

The model being measured (``at``) is theta = base + ``stack`` (frozen adapters, e.g. the
knowledge adapter K; default), theta + tau (the forget adapter active too, ``"theta+tau"``;
the paper reports a negligible difference) or theta_0 = the base alone, the model before it
learned the data (``"theta_0"``: the stack is not attached).

Two spaces (DESIGN section 3). Hooks on each target layer (for a 4-bit one: its frozen base
layer) capture the input x (T, in) and the gradient of the output grad_out (T, out):

- ``space="b"`` (low rank): g is the gradient with respect to B of the adapter brought to the
  SVD gauge of dW (:func:`lora_unlearn.arithmetic.perta.svd_gauge`: dW = U S V^T, B = U S,
  A = V^T, scaling 1), g_B = grad_out^T (x V) = g_W V: the dense gradient projected on dW's
  right singular vectors. It depends on dW alone, and is the gauge :func:`rescale_b` works in.
- ``space="dense"``: g is the gradient with respect to the layer weight W (out, in),
  g_W = grad_out^T @ x (a 4-bit weight cannot require grad, hence the hooks).

Memory of dense importance: one float32 (out, in) accumulator per target module per call,
i.e. 4 bytes x sum(out * in); PerTA needs two (forget and retain): 8 bytes x sum(out * in).
For SmolLM2-135M with all-linear targets (30 layers, sum(out * in) = 106,168,320) that is
425 MB per data set, 849 MB for both; for a 7B Llama (~6.5e9 linear weights) it is ~26 GB per
data set, ~52 GB for both. Hence one data set per call: estimate I_f, save it
(:func:`save_importance`), estimate I_r, then rescale module by module. Accumulators live on
the layer's device; B-space needs 4 bytes x sum(out * r), about 1/100 of that at r = 8.
Per-example terms add a temporary of up to 64 MB (at least one (out, in) float32) in the layer
being processed.
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

from ..arithmetic.perta import check_maps, svd_gauge
from ..core.adapter import Adapter
from ..core.data import IGNORE, fingerprint, to_dataset
from ..errors import UserError

# In place on a gradient nobody else holds: a dense map is one (out, in) float32 each.
KINDS = {"grad": torch.abs_, "fisher": torch.square_, "signed": lambda g: g}  # "signed": for checks only
SPACES = ("b", "dense")
ATS = ("theta", "theta+tau", "theta_0")
ACCUMULATE = ("per_example", "set")
REDUCTIONS = ("mean", "sum")
CHUNK_ELEMENTS = 1 << 24  # per-example gradients held at once by a hook: 64 MB of float32
GAUGE = "svd"  # the gauge of B-space maps (recorded in their metadata)
META_KEY = "lora_unlearn_importance"


def _choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise UserError(f"unknown {name} {value!r}. Available: {', '.join(allowed)}")


def _count(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{name} must be an integer >= 1, got {value!r}")


def batches(tokenizer, rows: list[dict[str, str]], batch_size: int, max_length: int,
            by_length: bool = False) -> list[dict[str, torch.Tensor]]:
    """Batches {input_ids, attention_mask, labels} of ``rows`` (labels on answers), padded on the
    right whatever the tokenizer's side: positions, hence rotary embeddings, stay a row's own.

    In order, or with ``by_length`` sorted by token count first (less padding, for passes whose
    rows are separate terms: their sum does not depend on the order).
    """
    dataset = to_dataset(tokenizer, rows, max_length)
    encoded = [dataset[i] for i in range(len(dataset))]
    if by_length:
        encoded.sort(key=lambda x: len(x["input_ids"]))
    fill = {"input_ids": tokenizer.pad_token_id or 0, "attention_mask": 0, "labels": IGNORE}
    out = []
    for start in range(0, len(encoded), batch_size):
        items = encoded[start:start + batch_size]
        width = max(len(x["input_ids"]) for x in items)
        out.append({key: torch.tensor([x[key] + [value] * (width - len(x[key])) for x in items])
                    for key, value in fill.items()})
    return out


def estimate_importance(model, tokenizer, rows: list[dict[str, str]], adapter: Adapter, *, kind: str = "grad",
                        space: str = "b", at: str = "theta", stack: list[tuple[Adapter, float]] = (),
                        batch_size: int = 1, max_length: int = 256, reduction: str = "mean",
                        progress: bool = True, accumulate: str = "per_example",
                        rows_per_pass: int = 8) -> dict[str, torch.Tensor]:
    """Importance of ``adapter``'s parameters on ``rows``: {module: float32 tensor on CPU}.

    ``model`` is the base (as from :func:`lora_unlearn.core.models.load_base`, 4-bit or not);
    ``stack`` are the frozen adapters that make theta (active unless ``at="theta_0"``). Shapes:
    the SVD gauge's B (out, r) with ``space="b"``, the layer's (out, in) with ``space="dense"``.
    ``kind`` is "grad" (|g|), "fisher" (g^2) or "signed" (g itself: not an importance, for
    checking the math); ``accumulate`` "per_example" or "set" (module docstring). A term is one
    row (``batch_size=1``), computed ``rows_per_pass`` rows per forward/backward, or a
    mini-batch of ``batch_size`` rows, one per pass. The model comes back as it was (no adapter
    attached, requires_grad flags and train/eval mode restored).
    """
    _choice("importance kind", kind, tuple(KINDS))
    _choice("importance space", space, SPACES)
    _choice("gradient point 'at'", at, ATS)
    _choice("accumulate", accumulate, ACCUMULATE)
    _choice("reduction", reduction, REDUCTIONS)
    if not rows:
        raise UserError("the data set is empty: importance needs at least one row")
    _count("batch size", batch_size)
    _count("rows per pass", rows_per_pass)
    per_row = batch_size == 1
    data = batches(tokenizer, rows, rows_per_pass if per_row else batch_size, max_length, by_length=per_row)
    terms = len(rows) if per_row else len(data)
    transform = KINDS[kind]
    model_stack = {"theta": list(stack), "theta+tau": [*stack, (adapter, 1.0)], "theta_0": []}[at]
    projections = None if space == "dense" else {name: m.A for name, m in svd_gauge(adapter).modules.items()}
    with _restored(model), torch.enable_grad():
        acc = _accumulate(model, data, adapter, model_stack, projections, per_row,
                          None if accumulate == "set" else transform, _progress(progress, space, kind, len(data)))
    divisor = terms if reduction == "mean" else 1
    out = {name: t.div_(divisor) for name, t in acc.items()}
    if accumulate == "set":  # |.| or (.)^2 of the set's gradient, after the sum
        out = {name: transform(t) for name, t in out.items()}
    return {name: t.cpu() for name, t in out.items()}


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


def _loss(model, batch: dict[str, torch.Tensor], per_row: bool) -> torch.Tensor:
    """The mean answer NLL of the batch (one term), or the sum of each row's own mean NLL (a term per row)."""
    from torch.nn.functional import cross_entropy

    batch = {k: v.to(model.device) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]  # (B, T-1, V)
    labels = batch["labels"][:, 1:]  # token t predicts t + 1
    nll = cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                        reduction="none").view(labels.shape)  # (B, T-1)
    counts = (labels != IGNORE).sum(dim=1)
    loss = (nll.sum(dim=1) / counts).sum() if per_row else nll.sum() / counts.sum()
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


def _accumulate(model, data, adapter, stack, projections, per_row, transform, progress) -> dict[str, torch.Tensor]:
    """Sum over terms of each target layer's weight gradient g_W (out, in), or of g_W V (out, k)
    with ``projections[name] = V^T`` (k, in): B space in the SVD gauge.

    ``transform`` (|.| or (.)^2) is applied to each term's gradient before the sum; None sums the
    signed gradients (the set reading). With ``per_row`` every row of a batch is a term: its
    gradient is grad_out_i^T x_i over its own tokens (padding, on the right, is masked out),
    which is what a batch of one would give, because the loss is the sum of the rows' own mean
    NLLs. Per-row products are made in chunks of at most CHUNK_ELEMENTS numbers (one (out, k) at least).
    """
    from ..core.stack import attached

    with attached(model, stack) as m:
        m.eval()  # dropout off: the gradient of the deterministic forward
        for p in m.parameters():
            p.requires_grad_(False)
        root = m.get_base_model() if m is not model else m
        layers = {name: _layer(root, name, adapter)[1] for name in adapter.modules}
        V = {name: a.to(device=_device(layers[name]), dtype=torch.float32) for name, a in (projections or {}).items()}
        acc = {name: torch.zeros(layer.out_features, V[name].shape[0] if V else layer.in_features,
                                 dtype=torch.float32, device=_device(layer)) for name, layer in layers.items()}
        calls = dict.fromkeys(layers, 0)
        mask = torch.ones(0)  # (B, T, 1): the real tokens of the batch being run

        def capture(name):
            def forward_hook(module, args, out):
                calls[name] += 1
                if calls[name] > 1:
                    raise UserError(f"module {name} ran twice in one forward pass (gradient checkpointing or a "
                                    "shared layer): importance needs one call per layer per batch")
                x = args[0].detach()

                def backward_hook(grad_out):
                    g = grad_out.reshape(mask.shape[0], -1, grad_out.shape[-1]).float()  # (B, T, out)
                    # (B, T, in), padding zeroed
                    h = x.reshape(mask.shape[0], -1, x.shape[-1]).float() * mask.to(x.device)
                    if name in V:
                        h = h @ V[name].T  # (B, T, k): x V, so that g_B = grad_out^T x V
                    if per_row and transform is not None:  # (rows, out, k) per chunk of rows: bounded memory
                        chunk = max(1, CHUNK_ELEMENTS // (g.shape[-1] * h.shape[-1]))
                        for i in range(0, g.shape[0], chunk):
                            terms = torch.bmm(g[i:i + chunk].transpose(1, 2), h[i:i + chunk])
                            acc[name] += transform(terms).sum(dim=0)
                    else:  # one term (a mini-batch), or the set reading's signed sum
                        g = g.reshape(-1, g.shape[-1]).T @ h.reshape(-1, h.shape[-1])
                        acc[name] += g if transform is None else transform(g)
                out.register_hook(backward_hook)
            return forward_hook

        # The weights are frozen (4-bit ones cannot require grad): make the embeddings' output a
        # grad-requiring tensor so that every layer output carries a gradient back to the hooks.
        handles = [root.get_input_embeddings().register_forward_hook(lambda mod, args, out: out.requires_grad_(True))]
        handles += [layer.register_forward_hook(capture(name)) for name, layer in layers.items()]
        try:
            for batch in progress(data):
                calls.update(dict.fromkeys(calls, 0))
                mask = batch["attention_mask"][..., None].float()
                _loss(m, batch, per_row).backward()
        finally:
            for h in handles:
                h.remove()
    return acc


def _device(layer) -> torch.device:
    return next(iter(layer.parameters())).device


# Saving: importance is the expensive half of PerTA; a sweep over lam, beta or p reuses it.

def _singular_values(adapter: Adapter) -> dict[str, list[float]]:
    """dW's singular values per module (the column norms of B in the SVD gauge): which dW B-space maps belong to."""
    gauge = svd_gauge(adapter)
    return {name: torch.linalg.vector_norm(m.B.double(), dim=0).tolist() for name, m in gauge.modules.items()}


def importance_meta(rows: list[dict[str, str]], adapter: Adapter, *, kind: str, space: str, at: str,
                    reduction: str = "mean", batch_size: int = 1, max_length: int = 256,
                    stack: list[tuple[Adapter, float]] = (), base: str | None = None,
                    accumulate: str = "per_example", rows_per_pass: int = 8) -> dict[str, Any]:
    """What :func:`save_importance` records: how the maps were made (never the data itself).

    B-space maps also record their gauge ("svd") and dW's singular values per module, which
    :func:`load_importance` checks against the adapter they are used with. ``stack`` is what was
    attached: nothing at theta_0.
    """
    meta = {
        "kind": kind, "space": space, "at": at, "accumulate": accumulate, "reduction": reduction,
        "batch_size": batch_size, "rows_per_pass": rows_per_pass, "max_length": max_length, "rows": len(rows),
        "data": fingerprint(rows), "base": base or adapter.base_model, "adapter_sha256": adapter.lineage.get("sha256"),
        "stack": [] if at == "theta_0" else [{"sha256": a.lineage.get("sha256"), "scale": c} for a, c in stack],
        "gauge": GAUGE if space == "b" else None,
    }
    if space == "b":
        meta["singular_values"] = _singular_values(adapter)
    return meta


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

    B-space maps must be in the SVD gauge (maps without it, as older versions wrote, measured
    the adapter's own factors: always refused). Module names and shapes must match the adapter
    (the gauge's B in B space, (out, in) in dense space). With ``strict``, B-space maps must
    record the adapter's dW singular values (relative 1e-4), and the adapter's sha256 must match
    the recorded one when both are known and the maps depend on the adapter's weights (B space,
    or ``at="theta+tau"``); dense maps at theta or theta_0 depend only on which modules are targeted.
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
    space = meta.get("space", "b")
    if adapter is not None:
        check_maps(maps, adapter, space, where=str(path))
    if space == "b" and meta.get("gauge") != GAUGE:
        raise UserError(f"{path} holds B-space importance measured in gauge {meta.get('gauge')!r} (the adapter's own "
                        f"factors, as older versions did), but B-space PerTA works in the {GAUGE!r} gauge of dW: "
                        "recompute the importance (estimate_importance, or re-run the recipe's importance steps)")
    if adapter is not None and strict:
        if space == "b" and "singular_values" in meta:
            _check_singular_values(path, meta["singular_values"], _singular_values(adapter))
        recorded, actual = meta.get("adapter_sha256"), adapter.lineage.get("sha256")
        depends = space == "b" or meta.get("at") == "theta+tau"
        if depends and recorded and actual and recorded != actual:
            raise UserError(f"{path} was computed for adapter sha256 {recorded[:12]}..., not for this one "
                            f"({actual[:12]}...): recompute the importance (or pass strict=False)")
    return maps, meta


def _check_singular_values(path, recorded: dict[str, list[float]], actual: dict[str, list[float]]) -> None:
    for name, s in actual.items():
        want = torch.tensor(recorded.get(name, []), dtype=torch.float64)
        got = torch.tensor(s, dtype=torch.float64)
        if want.shape != got.shape or (want - got).abs().max() > 1e-4 * float(got.max()) + 1e-12:
            raise UserError(f"{path} was estimated for another dW: module {name}'s singular values are "
                            f"{[round(x, 4) for x in want.tolist()[:3]]}... in the maps but "
                            f"{[round(x, 4) for x in got.tolist()[:3]]}... in this adapter: recompute the importance "
                            "for this adapter (or pass strict=False)")
