"""`accelerate launch` with 2 processes trains the same adapters as 1 process with the same global batch.

The 2-process run is real: accelerate starts torchrun with recipes/accelerate/ddp.yaml, the two
processes find no GPU and train on CPU over gloo (DDP). The reference is one process with the
per-device batch of the 2-process run and 2 gradient-accumulation steps: the Trainer then
averages the same two micro-batch losses that DDP averages across the two processes (the sampler
is seeded per epoch and shards batches by rank; StreamDataset's items depend only on the index).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_unlearn.core.adapter_io import load_adapter
from lora_unlearn.training.jobs import sharded_quant_storage
from lora_unlearn.training.recipes import load_recipe
from lora_unlearn.training.runner import run_recipe

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
RECIPE = """name: ddp_check
base: {{model: "{model}", quantization: nf4}}
data:
  forget: {{source: "{forget}"}}
  retain: {{source: "{retain}"}}
train_defaults: {{r: 4, lora_alpha: 8, learning_rate: 0.01, max_length: 64, max_steps: 4, batch_size: 2, grad_accum: {accum}}}
steps:
  - name: k
    train: {{objective: nll, data: {{train: forget}}}}
  - name: f
    train: {{objective: kl, data: {{forget: forget, retain: retain}}, over: [k]}}
  - name: u
    op: {{name: negate, inputs: [f]}}
output: u
"""


def relative_error(a, b) -> float:
    """||dW_a - dW_b|| / ||dW_b|| over all modules (Frobenius, float64), products not factors."""
    num = sum(((a.modules[n].delta().double() - b.modules[n].delta().double()) ** 2).sum() for n in b.modules)
    den = sum((b.modules[n].delta().double() ** 2).sum() for n in b.modules)
    return float((num / den).sqrt())


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_accelerate_configs_load_and_set_the_quant_storage(path, monkeypatch):
    """Each shipped config loads with accelerate's loader and passes `accelerate launch`'s checks.

    The environment the launcher would give the processes decides the 4-bit storage dtype:
    bfloat16 for FSDP and ZeRO-3 (they shard float tensors only), uint8 (None) otherwise.
    """
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    config = load_config_from_file(str(path))
    assert config.num_processes == 2 and not config.use_cpu
    args, defaults, _ = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(path), "-m", "lora_unlearn.cli", "learn"]))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        if key.startswith(("ACCELERATE_USE", "ACCELERATE_DEEPSPEED")):
            monkeypatch.setenv(key, value)
    sharded = path.stem.startswith("fsdp") or "zero3" in path.stem
    assert sharded_quant_storage() == ("bfloat16" if sharded else None)
    if path.stem.startswith("fsdp"):
        assert env["FSDP_USE_ORIG_PARAMS"] == "false" and env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    assert "NOT run" in path.read_text() or path.stem == "ddp"


def _qa(path: Path, n: int, tag: str) -> Path:
    path.write_text("".join(f'{{"question": "What is {tag} {i}?", "answer": "{tag} {i} is {"xyz"[i % 3] * (1 + i % 4)}."}}\n'
                            for i in range(n)))
    return path


def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_model_dir, tmp_path):
    """2 x batch 2 (DDP over gloo) == 1 x batch 2 x 2 accumulation steps, for NLL and for KL over a stack.

    Tolerance: DDP all-reduces the two processes' gradients, (g0 + g1) / 2; accumulation adds
    g0 / 2 + g1 / 2 in one process. With two terms both are one float32 addition and an exact
    halving, so the results can be bitwise equal (they are here); any other reduction order
    would differ by float32 rounding, ~1e-7 relative per step, which AdamW can amplify in
    near-zero gradient entries: 1e-5 relative on dW bounds that and still fails on any real
    difference in the data (the batch-4 control below is off by ~5%).
    """
    forget, retain = _qa(tmp_path / "forget.jsonl", 8, "zorp"), _qa(tmp_path / "retain.jsonl", 6, "quib")

    def recipe(accum: int) -> Path:
        path = tmp_path / f"r{accum}.yaml"
        path.write_text(RECIPE.format(model=tiny_model_dir, forget=forget, retain=retain, accum=accum))
        return path

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS[0].parent / "ddp.yaml"),
              "--main_process_port", env["MASTER_PORT"], "-m", "lora_unlearn.cli", "run", str(recipe(1)),
              "--out", str(tmp_path / "two"), "--checkpoint-every", "2"]
    proc = subprocess.run(launch, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only process 0 writes and prints: one line per step, one result folder, no work folder left.
    assert proc.stderr.count("step f") == 1 and proc.stdout.count("seconds") == 1, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("two", ".two"))) == ["two"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["adapter", "recipe.yaml", "run.json", "steps"]

    from lora_unlearn.core.models import load_base

    loaded = load_base(str(tiny_model_dir), "nf4")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_recipe(load_recipe(recipe(2)), tmp_path / "one", loaded=loaded)
        run_recipe(load_recipe(recipe(1), ["train_defaults.batch_size=4"]), tmp_path / "batch4", loaded=loaded)
    finally:
        torch.set_num_threads(threads)
    for step in ("k", "f"):
        two, one = load_adapter(tmp_path / "two" / "steps" / step), load_adapter(tmp_path / "one" / "steps" / step)
        assert relative_error(two, one) < 1e-5, (step, relative_error(two, one))
    assert relative_error(load_adapter(tmp_path / "two" / "adapter"), load_adapter(tmp_path / "one" / "adapter")) < 1e-5
    # Control: one batch of 4 averages over its tokens, not over two micro-batch means: not the same run.
    assert relative_error(load_adapter(tmp_path / "batch4" / "steps" / "k"),
                          load_adapter(tmp_path / "one" / "steps" / "k")) > 1e-3


def test_float_quant_storage_changes_the_packing_not_the_model(tiny_model_dir):
    """FSDP/ZeRO-3 need the 4-bit weights packed in a float dtype; the model must compute the same."""
    from lora_unlearn.core.models import load_base

    plain, tok, _ = load_base(str(tiny_model_dir), "nf4")
    packed, _, _ = load_base(str(tiny_model_dir), "nf4", quant_storage="float32")  # the CPU compute dtype
    assert plain.model.layers[0].mlp.up_proj.weight.dtype == torch.uint8
    assert packed.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    x = tok(["What is the capital of Veloria?"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(plain(**x).logits, packed(**x).logits)
