"""Resume after a real SIGKILL gives the adapter an uninterrupted run gives, bit for bit.

A training process is started with a checkpoint every 2 steps and killed with SIGKILL as soon as
a complete checkpoint exists; the same command with --resume finishes it. Equality is exact, not
approximate: the checkpoint restores the adapter, AdamW moments, scheduler and RNG states
exactly (float32 tensors saved as they are), the Trainer skips the batches already seen, and the
data order is a function of (seed, epoch, batch index) only (the seeded sampler and
StreamDataset), so the resumed run performs the very same float operations (all runs use one
CPU thread).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_unlearn.cli import app
from lora_unlearn.core.data import load_qa
from lora_unlearn.core.models import load_base
from lora_unlearn.errors import UserError
from lora_unlearn.training.jobs import Checkpoints, last_checkpoint, work_dir
from lora_unlearn.training.learn import learn
from lora_unlearn.training.trainer import TrainConfig, train_adapter

RECIPE = """name: resume_check
base: {{model: "{model}", quantization: nf4}}
data:
  forget: {{source: "{forget}"}}
  retain: {{source: "{retain}"}}
train_defaults: {{r: 4, lora_alpha: 8, learning_rate: 0.01, max_length: 64, batch_size: 2}}
steps:
  - name: k
    train: {{objective: nll, data: {{train: forget}}, config: {{max_steps: 4}}}}
  - name: f
    train: {{objective: grad_diff, data: {{forget: forget, retain: retain}}, over: [k], config: {{max_steps: 40}}}}
  - name: u
    op: {{name: negate, inputs: [f]}}
output: u
"""


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _qa(path: Path, n: int, tag: str) -> Path:
    path.write_text("".join(json.dumps({"question": f"What is {tag} {i}?", "answer": f"{tag} {i} is {'xyz'[i % 3] * (1 + i % 4)}."})
                            + "\n" for i in range(n)))
    return path


def _start_and_kill(cmd: list[str], checkpoints: Path) -> Path:
    """Run ``cmd`` and SIGKILL it once a complete checkpoint exists in ``checkpoints``; return that checkpoint."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    try:
        while True:
            done = [p.parent for p in checkpoints.glob("checkpoint-*/trainer_state.json")]
            if done:
                break
            assert proc.poll() is None, f"the run ended before its first checkpoint:\n{proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed: give it more steps"
    return done[0]


def _same_adapter(a: Path, b: Path) -> None:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"{a} != {b}"


def _loss(path: Path) -> float:
    return json.loads((path / "lora_unlearn.json").read_text())["lineage"]["final_train_loss"]


def test_learn_killed_then_resumed_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    data = _qa(tmp_path / "qa.jsonl", 12, "zorp")
    args = ["learn", "--data", str(data), "--base", str(tiny_model_dir), "--max-steps", "40", "--batch-size", "2",
            "--r", "4", "--alpha", "8", "--lr", "0.01", "--max-length", "64"]
    out = tmp_path / "resumed"
    _start_and_kill([sys.executable, "-m", "lora_unlearn.cli", *args, "--out", str(out), "--checkpoint-every", "2"],
                    work_dir(out) / "checkpoints")
    assert not out.exists() and work_dir(out).is_dir()

    runner = CliRunner()
    plain = runner.invoke(app, [*args, "--out", str(out), "--checkpoint-every", "2"])
    assert plain.exit_code == 2 and "--resume" in plain.output  # an interrupted run is never silently discarded
    resumed = runner.invoke(app, [*args, "--out", str(out), "--checkpoint-every", "2", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.output and "checkpoint-" in resumed.output
    assert not work_dir(out).exists()  # checkpoints removed once the adapter is in place

    reference = runner.invoke(app, [*args, "--out", str(tmp_path / "reference"), "--checkpoint-every", "0"])
    assert reference.exit_code == 0, reference.output
    _same_adapter(out, tmp_path / "reference")
    assert _loss(out) == _loss(tmp_path / "reference")  # the mean over all 40 steps, not only the resumed ones


def test_recipe_killed_in_a_training_step_resumes_there(tiny_model_dir, tmp_path):
    forget, retain = _qa(tmp_path / "forget.jsonl", 8, "zorp"), _qa(tmp_path / "retain.jsonl", 6, "quib")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=tiny_model_dir, forget=forget, retain=retain))
    out = tmp_path / "run"
    _start_and_kill([sys.executable, "-m", "lora_unlearn.cli", "run", str(recipe), "--out", str(out),
                     "--checkpoint-every", "2"], work_dir(out) / "checkpoints" / "f")
    first = work_dir(out) / "steps" / "k" / "adapter_model.safetensors"
    written = first.stat().st_mtime_ns

    runner = CliRunner()
    other = runner.invoke(app, ["run", str(recipe), "--out", str(out), "--resume",
                                "--set", "train_defaults.learning_rate=0.02"])
    assert other.exit_code == 2 and "belong to a different run" in other.output
    assert "recipe.train_defaults" in other.output and len(other.output.strip().splitlines()) == 1
    resumed = runner.invoke(app, ["run", str(recipe), "--out", str(out), "--resume", "--checkpoint-every", "2"])
    assert resumed.exit_code == 0, resumed.output
    assert "step k (done before the interruption" in resumed.output and "resuming from" in resumed.output
    assert (out / "steps" / "k" / "adapter_model.safetensors").stat().st_mtime_ns == written  # read back, not retrained
    assert not work_dir(out).exists()
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "recipe.yaml", "run.json", "steps"]

    reference = runner.invoke(app, ["run", str(recipe), "--out", str(tmp_path / "reference"), "--checkpoint-every", "0"])
    assert reference.exit_code == 0, reference.output
    for sub in ("steps/k", "steps/f", "adapter"):
        _same_adapter(out / sub, tmp_path / "reference" / sub)


def test_resume_with_nothing_to_resume_starts_fresh(tiny_model_dir, qa_file, tmp_path):
    result = CliRunner().invoke(app, ["learn", "--data", str(qa_file), "--base", str(tiny_model_dir), "--out",
                                      str(tmp_path / "a"), "--max-steps", "2", "--max-length", "64", "--resume"])
    assert result.exit_code == 0, result.output
    assert "nothing to resume" in result.output and (tmp_path / "a" / "adapter_model.safetensors").is_file()


def test_checkpoints_of_another_run_are_refused(tiny_model_dir, qa_file, tmp_path, monkeypatch):
    """A work folder left by config A: a plain rerun, another config or another process count is refused."""
    loaded = load_base(str(tiny_model_dir), "nf4")
    rows = load_qa(qa_file)
    config = TrainConfig(r=4, lora_alpha=8, batch_size=2, max_steps=2, max_length=64, learning_rate=0.01)
    out = tmp_path / "a"
    model, tok, info = loaded
    train_adapter(model, tok, rows, config, base_info=info, progress=False,
                  checkpoints=Checkpoints(work_dir(out) / "checkpoints", every=1))  # leaves its checkpoints
    with pytest.raises(UserError, match=r"holds an interrupted run .*add --resume"):
        learn(rows, out, loaded=loaded, config=config, progress=False, preserve=None)
    other = TrainConfig(**{**config.__dict__, "learning_rate": 0.02})
    with pytest.raises(UserError, match=r"belong to a different run \(differs in: config\.learning_rate\)"):
        learn(rows, out, loaded=loaded, config=other, resume=True, progress=False, preserve=None)
    with pytest.raises(UserError, match=r"differs in: data\.train"):
        learn(rows[:2], out, loaded=loaded, config=config, resume=True, progress=False, preserve=None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"differs in: processes"):
        learn(rows, out, loaded=loaded, config=config, resume=True, progress=False, preserve=None)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(UserError, match="needs checkpoints"):
        learn(rows, out, loaded=loaded, config=config, resume=True, checkpoint_every=0)

    resumed = learn(rows, out, loaded=loaded, config=config, resume=True, progress=False, preserve=None)  # the same run: accepted
    fresh = learn(rows, tmp_path / "b", loaded=loaded, config=config, progress=False, preserve=None)
    assert all(torch.equal(resumed.modules[n].B, fresh.modules[n].B) for n in fresh.modules)
    assert not work_dir(out).exists() and out.is_dir()


def test_ctrl_c_during_learn_says_where_the_checkpoint_is_and_how_to_resume(tiny_model_dir, tmp_path):
    import shlex

    data = _qa(tmp_path / "qa.jsonl", 12, "zorp")
    out = tmp_path / "k"
    args = ["learn", "--data", str(data), "--base", str(tiny_model_dir), "--max-steps", "200", "--batch-size", "2",
            "--r", "4", "--alpha", "8", "--max-length", "64", "--preserve", "none", "--out", str(out),
            "--checkpoint-every", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "lora_unlearn.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    try:
        while last_checkpoint(work_dir(out) / "checkpoints") is None:  # a complete one (its state file parses)
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    said = " ".join(err.split())
    assert f"progress is kept in {work_dir(out)}" in said and "latest checkpoint checkpoint-" in said
    command = said.split("continue with: ", 1)[1]
    assert command.startswith("lora-unlearn learn ") and command.endswith(" --resume")
    assert not out.exists() and "Traceback" not in err
    resumed = CliRunner().invoke(app, shlex.split(command)[1:])  # the printed command, as given
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.output and load_file(out / "adapter_model.safetensors")
