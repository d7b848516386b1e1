"""Training a LoRA adapter on a (4-bit) base, optionally on top of frozen adapters.

The one ``transformers.Trainer`` subclass of the library lives here: it only replaces
``compute_loss`` with a registered objective, so accelerate, logging, gradient accumulation and
mixed precision come from transformers. ``learn`` is the entry point behind
``lora-unlearn learn``: it trains, and returns (and writes) an :class:`Adapter` whose lineage says
how it was made.

Scale: every command runs unchanged under ``accelerate launch`` (DDP on CPU or GPU; FSDP and
DeepSpeed configs in ``recipes/accelerate/``): the Trainer shards the batches by rank, process 0
writes the outputs and shows the progress bar. Resume: with :class:`~lora_unlearn.training.jobs.Checkpoints`
the Trainer saves the trainable adapter, optimizer, scheduler and RNG states every N steps, and a
rerun with ``resume`` continues from the newest complete checkpoint; the data order does not
depend on where a run stopped (see :class:`StreamDataset`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

from ..core.adapter import Adapter
from ..core.adapter_io import modules_from_tensors
from ..core.data import encode_qa, fingerprint, fitting, to_dataset
from ..core.stack import TRAINABLE, attached
from ..errors import UserError
from ..progress import RichTrainProgress
from ..progress import console as progress_console
from . import objectives
from .jobs import (
    CHECKPOINT_WEIGHTS,
    Checkpoints,
    adapter_digest,
    is_main_process,
    open_job,
    world_size,
)


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
    # At least this many optimizer steps (epochs are extended): a handful of facts is one batch per epoch.
    min_steps: int = 0
    # Every N optimizer steps, stop once the rows being learned (train or update stream) are learned (teacher-forced argmax
    # equals the answer at every answer token); 0: off.
    stop_when_learned: int = 0

    def validate(self) -> None:
        checks = [
            (self.r >= 1, f"r must be >= 1, got {self.r}"),
            (math.isfinite(self.lora_alpha) and self.lora_alpha > 0,
             f"lora_alpha must be a finite number > 0, got {self.lora_alpha}"),
            (math.isfinite(self.learning_rate) and self.learning_rate > 0,
             f"learning rate must be a finite number > 0, got {self.learning_rate}"),
            (self.epochs > 0, f"epochs must be > 0, got {self.epochs}"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch size and gradient accumulation must be >= 1"),
            (self.max_length >= 8, f"max length must be >= 8 tokens, got {self.max_length}"),
            (self.min_steps >= 0, f"min steps must be >= 0, got {self.min_steps}"),
            (self.stop_when_learned >= 0, f"the learned-check interval must be >= 0 steps (0: off), got {self.stop_when_learned}"),
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
        # Batches are {stream: batch}, so the Trainer finds no top-level "labels" and passes
        # num_items_in_batch=None: the loss is divided by the accumulation steps, and DDP averages
        # over processes. P processes x batch b == 1 process x batch b x P accumulation steps.
        loss = self.objective.loss(model, inputs, **self.params)
        return (loss, None) if return_outputs else loss

    def _sharded(self) -> bool:
        return bool(self.is_fsdp_enabled or self.is_deepspeed_enabled)

    def _save(self, output_dir=None, state_dict=None):
        """A checkpoint holds the adapter being trained only: the frozen stack and the base are inputs.

        (PEFT's save_pretrained would write every adapter into sub-folders, and the Trainer's loader
        would then re-activate only the first one, dropping the frozen stack.) FSDP and DeepSpeed
        keep the Trainer's own format.
        """
        if self._sharded():
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        state = get_peft_model_state_dict(model, adapter_name=TRAINABLE)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                  os.path.join(output_dir, CHECKPOINT_WEIGHTS), metadata={"format": "pt"})

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self._sharded():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self.accelerator.unwrap_model(model or self.model)
        state = load_file(os.path.join(resume_from_checkpoint, CHECKPOINT_WEIGHTS))
        result = set_peft_model_state_dict(model, state, adapter_name=TRAINABLE)
        if result.unexpected_keys:
            raise UserError(f"checkpoint {resume_from_checkpoint} does not fit this adapter "
                            f"(e.g. {result.unexpected_keys[0]}): delete it to start over")


class StreamDataset(torch.utils.data.Dataset):
    """One item = one row of each stream: the first stream sets the epoch, the others cycle.

    The other streams are visited in a seeded random order, so each step sees one batch of every
    stream (the forget/retain/update pattern of GradDiff, NPO and LLM Surgery). Item i is a pure
    function of (i, seed): the Trainer's sampler (seeded per epoch) and its rank sharding decide
    which items a step sees, so the same rows make up a global batch on 1 or P processes and a
    resumed run sees the rows the uninterrupted one would have seen.
    """

    def __init__(self, streams: dict[str, Any], seed: int):
        self.streams = streams
        self.primary = next(iter(streams))
        self.epoch = 0
        g = torch.Generator().manual_seed(seed)
        self.order = {name: torch.randperm(len(ds), generator=g).tolist() for name, ds in streams.items()}

    def __len__(self) -> int:
        return len(self.streams[self.primary])

    def set_epoch(self, epoch: int) -> None:
        """Epoch e pairs primary row i with the others' row (i + e * len(primary)) in their order,
        so a 40-row forget set walks through all 400 retain rows over the epochs."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict[str, Any]:
        shift = i + self.epoch * len(self)
        return {name: ds[i if name == self.primary else self.order[name][shift % len(ds)]]
                for name, ds in self.streams.items()}


class StreamEpoch(TrainerCallback):
    """Tells the StreamDataset which epoch starts (after a resume too: state.epoch is restored)."""

    def __init__(self, dataset: StreamDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(math.floor(state.epoch + 1e-6) if state.epoch else 0)


class Snapshots(TrainerCallback):
    """Hands the adapter as it is after chosen optimizer steps to ``keep(step, adapter)`` (a length sweep)."""

    def __init__(self, steps, build, keep):
        self.steps, self.build, self.keep = set(steps), build, keep
        self.kept: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps and state.global_step not in self.kept:
            self.keep(state.global_step, self.build())
            self.kept.append(state.global_step)


LEARNED_CHECK_ROWS = 32  # rows per forward pass of the learned check
LEARNED_CHECK_MAX = 256  # rows checked at most (an evenly spaced sample past that)
PRESERVE_ANSWER_TOKENS = 32  # answer tokens of a preservation row that the KL is taken on


@torch.no_grad()
def learned_rows(model, batch: dict[str, torch.Tensor]) -> list[bool]:
    """Per row: whether the argmax next token equals the label at every answer token (teacher-forced)."""
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        model.train(was_training)
    target = batch["labels"][:, 1:]
    mask = target != -100
    hit = (logits[:, :-1].argmax(-1) == target) | ~mask
    return hit.all(dim=1).tolist()


class StopWhenLearned(TrainerCallback):
    """Every ``every`` optimizer steps, check the rows being learned; stop training once all are learned.

    Every distinct row is checked (teacher-forced argmax, in chunks of ``LEARNED_CHECK_ROWS``) up to
    ``LEARNED_CHECK_MAX`` rows; past that, an evenly spaced sample of that many, so a check never
    looks at only the first rows of a file sorted by topic.
    """

    def __init__(self, tokenizer, rows: list[dict[str, str]], every: int, max_length: int):
        distinct = list({(r["question"], r["answer"]): r for r in rows}.values())
        if len(distinct) > LEARNED_CHECK_MAX:
            step = len(distinct) / LEARNED_CHECK_MAX
            distinct = [distinct[int(i * step)] for i in range(LEARNED_CHECK_MAX)]
        pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        items = [encode_qa(tokenizer, r["question"], r["answer"], max_length) for r in distinct]
        self.batches = [pad(items[i:i + LEARNED_CHECK_ROWS]) for i in range(0, len(items), LEARNED_CHECK_ROWS)]
        self.total = len(items)
        self.every = every
        self.learned: int | None = None
        self.stopped_at: int | None = None

    def check(self, model) -> int:
        self.learned = sum(sum(learned_rows(model, {k: v.to(model.device) for k, v in b.items()}))
                           for b in self.batches)
        return self.learned

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and state.global_step % self.every == 0:
            if self.check(model) == self.total:
                self.stopped_at = state.global_step
                control.should_training_stop = True


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
                  progress: bool = True, checkpoints: Checkpoints | None = None, snapshots=None) -> Adapter:
    """Train one LoRA adapter with ``config.objective`` over ``model`` + frozen ``stack``.

    ``data`` is a list of rows (the objective's only stream) or ``{stream: rows}`` for objectives
    that take several (forget, retain, update). The base model is left as it was (adapters are
    attached for the run and removed after). With ``checkpoints`` the Trainer saves a checkpoint
    every ``checkpoints.every`` optimizer steps into ``checkpoints.dir`` and, with
    ``checkpoints.resume``, continues from the newest complete one if it was made by this same
    run (same settings, data, stack, base and number of processes); otherwise it refuses.
    ``snapshots``: ``(steps, keep)``: after each of those optimizer steps, ``keep(step, adapter)``
    gets the adapter as it is then (its lineage says ``snapshot_of_steps``); steps past the end
    of training (or an early stop) give none. The lineage of the result lists the steps kept.
    """
    config.validate()
    objective = objectives.get(config.objective)
    given = objective.select_streams(data)
    params = objective.resolve_params(config.extra)
    streams = objective.prepare(given, config.seed, params) if objective.prepare else given
    cut = {name: None for name in streams}
    if "preserve" in streams:
        # The preservation KL is taken on the first PRESERVE_ANSWER_TOKENS tokens of the starting
        # model's answers, where an edit leaks into unrelated answers; prompts that do not fit are dropped.
        cut["preserve"] = PRESERVE_ANSWER_TOKENS
        streams = {**streams, "preserve": fitting(tokenizer, streams["preserve"], config.max_length)}
        if not streams["preserve"]:
            raise UserError(f"no preservation prompt is shorter than max_length {config.max_length} tokens: "
                            "raise max_length or give shorter prompts")
    dataset = StreamDataset({name: to_dataset(tokenizer, rows, config.max_length, cut[name]) for name, rows in streams.items()},
                            seed=config.seed)
    resume_from = None
    if checkpoints is not None:
        if checkpoints.every < 1:
            raise UserError(f"checkpoint interval must be >= 1 step, got {checkpoints.every}")
        job = {"config": asdict(config), "objective_params": params,
               "data": {name: fingerprint(rows) for name, rows in given.items()},
               "stack": [[adapter_digest(a), c] for a, c in stack],
               "base": getattr(base_info, "hub_id", None), "quantization": getattr(base_info, "quantization", None),
               "processes": world_size()}
        resume_from = open_job(Path(checkpoints.dir), job, checkpoints.resume)
    max_steps = config.max_steps
    if config.min_steps and max_steps <= 0:
        per_epoch = math.ceil(len(dataset) / (config.batch_size * config.grad_accum * world_size()))
        max_steps = max(config.min_steps, math.ceil(config.epochs * per_epoch))
    set_seed(config.seed)
    lora = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=config.target_modules,
                      lora_dropout=config.lora_dropout, bias="none", task_type="CAUSAL_LM")
    use_cpu = not str(model.device).startswith("cuda")
    saving = {"save_strategy": "no"} if checkpoints is None else {
        "save_strategy": "steps", "save_steps": checkpoints.every, "save_total_limit": 1}
    with contextlib.ExitStack() as scope:
        output_dir = (scope.enter_context(tempfile.TemporaryDirectory(prefix="lora_unlearn-train-"))
                      if checkpoints is None else str(checkpoints.dir))
        peft_model = scope.enter_context(attached(model, list(stack), trainable=lora))
        args = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.grad_accum, num_train_epochs=config.epochs,
            learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler,
            warmup_steps=config.warmup_steps, weight_decay=config.weight_decay, seed=config.seed,
            max_steps=max_steps, adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2,
            max_grad_norm=config.max_grad_norm,
            logging_steps=1, report_to="none", use_cpu=use_cpu,
            dataloader_num_workers=0, remove_unused_columns=False,
            # Every trainable (LoRA) parameter is used in every step: no graph search per step.
            ddp_find_unused_parameters=False, **saving,
        )
        trainer = ObjectiveTrainer(model=peft_model, args=args, train_dataset=dataset, objective=objective,
                                   params=params, data_collator=StreamCollator(tokenizer))
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(StreamEpoch(dataset))
        stopper = None
        # What "learned" means: the rows being learned (train, or Surgery's update stream); unlearning has none.
        learning = streams.get("train") or streams.get("update")
        if learning and all("question" in r for r in learning):
            # Checked at the end in any case (the report), during training only with stop_when_learned.
            stopper = StopWhenLearned(tokenizer, learning, config.stop_when_learned, config.max_length)
            if config.stop_when_learned:
                trainer.add_callback(stopper)
        trainer.remove_callback(PrinterCallback)  # added instead of the bar when logging is quiet
        if progress and is_main_process():
            trainer.add_callback(RichTrainProgress(f"training adapter ({config.objective})"))
        if resume_from is not None and progress and is_main_process():
            progress_console.print(f"resuming from {resume_from}")

        def build(final_loss: float | None = None) -> Adapter:
            """The adapter as trained so far (the same on every process)."""
            state = {k: v.detach().cpu().clone() for k, v in _trained_state(trainer, peft_model).items()}
            peft_cfg = _jsonable(peft_model.peft_config[TRAINABLE].to_dict())
            if base_info is not None:
                peft_cfg["base_model_name_or_path"] = base_info.hub_id
            losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
            lineage = {
                "op": "learn",
                "params": _jsonable(asdict(config)),
                "base_model": getattr(base_info, "hub_id", None),
                "quantization": getattr(base_info, "quantization", None),
                "objective_params": _jsonable(params),
                "data": {name: fingerprint(rows) for name, rows in given.items()},  # the user's data, before prepare
                # the mean over every step's logged loss, so a resumed run reports the whole run's mean
                "final_train_loss": round(final_loss if final_loss is not None else
                                          sum(losses) / len(losses) if losses else float("nan"), 6),
                "steps": int(trainer.state.global_step),
                "inputs": [_scaled_lineage(a, c) for a, c in stack],
            }
            if final_loss is None:
                lineage["snapshot_of_steps"] = max_steps if max_steps > 0 else None
            return Adapter(modules=modules_from_tensors(state, peft_cfg, "trained adapter"), config=peft_cfg,
                           lineage=lineage)

        snapshot = None
        if snapshots is not None:
            snapshot = Snapshots(snapshots[0], build, snapshots[1])
            trainer.add_callback(snapshot)
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        if stopper is not None and stopper.stopped_at is None:
            stopper.check(peft_model)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        final_loss = sum(losses) / len(losses) if losses else float(result.training_loss)
        peft_model.eval()
        adapter = build(final_loss)
    model.eval()
    if stopper is not None:
        # Teacher-forced check of the distinct training rows at the end (issue: learn says what it learned).
        adapter.lineage["learned"] = {"rows": stopper.total, "learned": stopper.learned,
                                      "stopped_early_at_step": stopper.stopped_at}
    if snapshot is not None:
        adapter.lineage["snapshots"] = list(snapshot.kept)
    return adapter


def _trained_state(trainer: ObjectiveTrainer, peft_model) -> dict[str, torch.Tensor]:
    """The trained adapter's tensors, the same on every process.

    DDP and ZeRO-2 keep full parameters on every process. FSDP and ZeRO-3 shard them: the full
    state dict is gathered on process 0 (a collective) and sent to the others, because later
    recipe steps need the adapter on every process. (Written from the libraries' documented
    APIs; not run here: no GPU.)
    """
    if not trainer._sharded():
        return get_peft_model_state_dict(peft_model, adapter_name=TRAINABLE)
    import torch.distributed as dist

    full = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    box = [get_peft_model_state_dict(peft_model, state_dict=full, adapter_name=TRAINABLE) if is_main_process() else None]
    box[0] = {k: v.cpu() for k, v in box[0].items()} if box[0] is not None else None
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _scaled_lineage(adapter: Adapter, c: float) -> dict[str, Any]:
    return {"op": "scale", "params": {"c": c}, "inputs": [adapter.lineage]}
