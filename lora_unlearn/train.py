"""Training a LoRA adapter on a (4-bit) base, optionally on top of frozen adapters.

The one ``transformers.Trainer`` subclass of the library lives here: it only replaces
``compute_loss`` with a registered objective, so accelerate, logging, gradient accumulation and
mixed precision come from transformers. ``learn`` is the entry point behind
``lora-unlearn learn``: it trains, and returns (and writes) an :class:`Adapter` whose lineage says
how it was made.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from . import objectives
from .adapter import Adapter, modules_from_tensors, save_adapter
from .data import fingerprint, to_dataset
from .errors import UserError
from .progress import RichTrainProgress
from .stack import TRAINABLE, attached


@dataclass
class TrainConfig:
    """Hyper-parameters of one adapter training run (QLoRA defaults for small models)."""

    r: int = 8
    lora_alpha: float = 16.0
    target_modules: list[str] | str = "all-linear"
    lora_dropout: float = 0.0
    learning_rate: float = 1e-3
    epochs: float = 3.0
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    max_length: int = 256
    lr_scheduler: str = "linear"
    warmup_steps: float = 0.0  # a value below 1 is a fraction of the training steps
    weight_decay: float = 0.0
    max_steps: int = -1  # > 0 overrides epochs (LLM Surgery trains a fixed number of steps)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    objective: str = "nll"
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        checks = [
            (self.r >= 1, f"r must be >= 1, got {self.r}"),
            (self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}"),
            (self.learning_rate > 0, f"learning rate must be > 0, got {self.learning_rate}"),
            (self.epochs > 0, f"epochs must be > 0, got {self.epochs}"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch size and gradient accumulation must be >= 1"),
            (self.max_length >= 8, f"max length must be >= 8 tokens, got {self.max_length}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


class ObjectiveTrainer(Trainer):
    """A Trainer whose loss is a registered objective of ``{stream: batch}``."""

    def __init__(self, *args, objective: objectives.Objective, params: dict[str, Any], **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.params = params

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self.objective.loss(model, inputs, **self.params)
        return (loss, None) if return_outputs else loss


class StreamDataset(torch.utils.data.Dataset):
    """One item = one row of each stream: the first stream sets the epoch, the others cycle.

    The other streams are visited in a seeded random order, so each step sees one batch of every
    stream (the forget/retain/update pattern of GradDiff, NPO and LLM Surgery).
    """

    def __init__(self, streams: dict[str, Any], seed: int):
        self.streams = streams
        self.primary = next(iter(streams))
        g = torch.Generator().manual_seed(seed)
        self.order = {name: torch.randperm(len(ds), generator=g).tolist() for name, ds in streams.items()}

    def __len__(self) -> int:
        return len(self.streams[self.primary])

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {name: ds[i if name == self.primary else self.order[name][i % len(ds)]]
                for name, ds in self.streams.items()}


class StreamCollator:
    """Pads each stream on its own: a batch is ``{stream: {input_ids, attention_mask, labels}}``."""

    def __init__(self, tokenizer):
        self.pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
        return {name: self.pad([item[name] for item in items]) for name in items[0]}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


def train_adapter(model, tokenizer, data: list[dict[str, str]] | dict[str, list[dict[str, str]]],
                  config: TrainConfig, stack: list[tuple[Adapter, float]] = (), base_info=None,
                  progress: bool = True) -> Adapter:
    """Train one LoRA adapter with ``config.objective`` over ``model`` + frozen ``stack``.

    ``data`` is a list of rows (the objective's only stream) or ``{stream: rows}`` for objectives
    that take several (forget, retain, update). The base model is left as it was (adapters are
    attached for the run and removed after).
    """
    config.validate()
    objective = objectives.get(config.objective)
    given = objective.select_streams(data)
    params = objective.resolve_params(config.extra)
    streams = objective.prepare(given, config.seed, params) if objective.prepare else given
    dataset = StreamDataset({name: to_dataset(tokenizer, rows, config.max_length) for name, rows in streams.items()},
                            seed=config.seed)
    set_seed(config.seed)
    lora = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=config.target_modules,
                      lora_dropout=config.lora_dropout, bias="none", task_type="CAUSAL_LM")
    use_cpu = not str(model.device).startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="lora_unlearn-train-") as tmp, \
            attached(model, list(stack), trainable=lora) as peft_model:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.grad_accum, num_train_epochs=config.epochs,
            learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler,
            warmup_steps=config.warmup_steps, weight_decay=config.weight_decay, seed=config.seed,
            max_steps=config.max_steps, adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2,
            max_grad_norm=config.max_grad_norm,
            logging_steps=1, save_strategy="no", report_to="none", use_cpu=use_cpu,
            dataloader_num_workers=0, remove_unused_columns=False,
        )
        trainer = ObjectiveTrainer(model=peft_model, args=args, train_dataset=dataset, objective=objective,
                                   params=params, data_collator=StreamCollator(tokenizer))
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)  # added instead of the bar when logging is quiet
        if progress:
            trainer.add_callback(RichTrainProgress(f"training adapter ({config.objective})"))
        result = trainer.train()
        peft_model.eval()
        state = get_peft_model_state_dict(peft_model, adapter_name=TRAINABLE)
        peft_cfg = _jsonable(peft_model.peft_config[TRAINABLE].to_dict())
    model.eval()

    state = {k: v.detach().cpu().clone() for k, v in state.items()}
    if base_info is not None:
        peft_cfg["base_model_name_or_path"] = base_info.hub_id
    modules = modules_from_tensors(state, peft_cfg, "trained adapter")
    lineage = {
        "op": "learn",
        "params": _jsonable(asdict(config)),
        "base_model": getattr(base_info, "hub_id", None),
        "quantization": getattr(base_info, "quantization", None),
        "objective_params": _jsonable(params),
        "data": {name: fingerprint(rows) for name, rows in given.items()},  # the user's data, before prepare
        "final_train_loss": round(float(result.training_loss), 6),
        "inputs": [_scaled_lineage(a, c) for a, c in stack],
    }
    return Adapter(modules=modules, config=peft_cfg, lineage=lineage)


def _scaled_lineage(adapter: Adapter, c: float) -> dict[str, Any]:
    return {"op": "scale", "params": {"c": c}, "inputs": [adapter.lineage]}


def learn(rows: list[dict[str, str]] | dict[str, list[dict[str, str]]], out: str | Path | None = None, *, base: str = "smollm2-135m",
          quantization: str = "nf4", on: list[tuple[Adapter, float]] = (), config: TrainConfig | None = None,
          overwrite: bool = False, loaded=None, progress: bool = True) -> Adapter:
    """Load ``base`` (or use ``loaded`` = (model, tokenizer, info)), train an adapter, write it to ``out``."""
    from .models import load_base

    config = config or TrainConfig()
    config.validate()
    if out is not None and Path(out).exists() and not overwrite:
        raise UserError(f"output {out} already exists: choose another path or pass --overwrite")
    if not rows:
        raise UserError("the data set is empty: nothing to learn")
    model, tokenizer, info = loaded or load_base(base, quantization)
    adapter = train_adapter(model, tokenizer, rows, config, stack=on, base_info=info, progress=progress)
    if out is not None:
        save_adapter(adapter, out, overwrite=overwrite)
    return adapter
