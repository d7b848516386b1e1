"""The command line: arithmetic commands, learn and ask on a tiny model, errors exit 2 leaving nothing."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lora_unlearn.arithmetic import to_dense
from lora_unlearn.cli import app
from lora_unlearn.core.adapter_io import load_adapter, save_adapter
from tests.tiny import make_adapter

runner = CliRunner()
SPECS = {"model.layers.0.self_attn.q_proj": (6, 5, 3), "model.layers.0.mlp.down_proj": (5, 7, 3)}


@pytest.fixture
def adapter_dir(tmp_path):
    return save_adapter(make_adapter(SPECS, seed=1), tmp_path / "a")


def _dense(path):
    return to_dense(load_adapter(path))


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("args, factor", [
    (["negate"], -1.0), (["negate", "--scale", "0.5"], -0.5),
    (["scale", "--by", "3"], 3.0), (["extrapolate", "--alpha", "0.25"], 1.25),
])
def test_scaling_commands(adapter_dir, tmp_path, args, factor):
    out = tmp_path / "out"
    result = _run(args[0], adapter_dir, out, *args[1:])
    assert result.exit_code == 0, result.output
    want, got = _dense(adapter_dir), _dense(out)
    assert all(torch.allclose(got[k], factor * want[k], atol=1e-6) for k in want)
    lineage = json.loads((out / "lora_unlearn.json").read_text())["lineage"]
    assert lineage["op"] == args[0] and lineage["inputs"][0]["sha256"]


def test_add_and_compress(adapter_dir, tmp_path):
    other = save_adapter(make_adapter(SPECS, seed=2), tmp_path / "b")
    assert _run("add", adapter_dir, other, tmp_path / "sum").exit_code == 0
    a, b, s = _dense(adapter_dir), _dense(other), _dense(tmp_path / "sum")
    assert all(torch.allclose(s[k], a[k] + b[k], atol=1e-5) for k in a)
    result = _run("compress", tmp_path / "sum", tmp_path / "small", "--rank", "2")
    assert result.exit_code == 0, result.output
    assert "relative Frobenius error" in result.output and "max" in result.output
    assert set(load_adapter(tmp_path / "small").ranks.values()) == {2}


@pytest.mark.parametrize("make_args, message", [
    (lambda a, t: ["negate", t / "missing", t / "out"], "does not exist"),
    (lambda a, t: ["negate", a, t / "out", "--scale", "nan"], "finite"),
    (lambda a, t: ["compress", a, t / "out", "--rank", "0"], "between 1 and"),
    (lambda a, t: ["compress", a, t / "out", "--rank", "99"], "between 1 and"),
    (lambda a, t: ["add", a, t / "out"], "at least two adapters"),
    (lambda a, t: ["add", a, save_adapter(make_adapter(SPECS, base="other/model"), t / "o"), t / "out"],
     "different base models"),
    (lambda a, t: ["negate", a, a], "already exists"),
    (lambda a, t: ["learn", "--data", t / "none.jsonl", "--out", t / "out"], "does not exist"),
])
def test_bad_input_exits_2_and_writes_nothing(adapter_dir, tmp_path, make_args, message):
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _run(*make_args(adapter_dir, tmp_path))
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    created = sorted(p.name for p in tmp_path.iterdir())
    assert not (tmp_path / "out").exists() and not [p for p in created if p.startswith(".out")]
    assert set(created) - set(before) <= {"o"}


def test_nan_adapter_is_refused(adapter_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(weights)
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, weights)
    result = _run("negate", adapter_dir, tmp_path / "out")
    assert result.exit_code == 2 and "NaN" in result.output and not (tmp_path / "out").exists()


def test_learn_then_ask_on_a_local_model(tiny_model_dir, qa_file, tmp_path):
    out = tmp_path / "k"
    result = _run("learn", "--data", qa_file, "--out", out, "--base", tiny_model_dir, "--epochs", "2",
                  "--r", "4", "--batch-size", "3", "--max-length", "64")
    assert result.exit_code == 0, result.output
    assert load_adapter(out).lineage["made_by"]["data"]["train"]["rows"] == 3
    # Two epochs of a tiny model learn none of the 3 rows: the report says so and names the knobs.
    said = " ".join(result.output.split())
    learned = load_adapter(out).lineage["made_by"]["learned"]
    assert learned["rows"] == 3 and learned["learned"] < 3
    assert f"learned {learned['learned']} of 3 rows" in said
    assert f"warning: {3 - learned['learned']} of 3 rows are not learned" in said and "--min-steps" in said
    on = _run("learn", "--data", qa_file, "--out", tmp_path / "f", "--base", tiny_model_dir, "--epochs", "1",
              "--on", f"{out}:-0.5", "--max-length", "64")
    assert on.exit_code == 0, on.output
    assert load_adapter(tmp_path / "f").lineage["made_by"]["inputs"][0]["params"] == {"c": -0.5}
    asked = _run("ask", "--questions", "What is the capital of Veloria?", "--base", tiny_model_dir,
                 "--adapter", f"{out}:1.0", "--max-new-tokens", "4")
    assert asked.exit_code == 0, asked.output
    # The table shows the model's own greedy answer (not only the echoed question).
    from lora_unlearn.core.inference import answer
    from lora_unlearn.core.models import load_base
    from lora_unlearn.core.stack import attached

    model, tok, _ = load_base(str(tiny_model_dir), "nf4")
    with attached(model, [(load_adapter(out), 1.0)]) as m:
        want = answer(m, tok, ["What is the capital of Veloria?"], max_new_tokens=4)[0]
    assert want.strip() and " ".join(want.split()) in " ".join(asked.output.replace("│", " ").split())
    typo = _run("ask", "--questions", "questons.jsonl", "--base", tiny_model_dir)
    assert typo.exit_code == 2 and "looks like a file path" in typo.output and "questons.jsonl" in typo.output
    assert _run("ask", "--questions", "data/q", "--base", tiny_model_dir).exit_code == 2
    bad = _run("ask", "--questions", "hi", "--base", tiny_model_dir, "--adapter", f"{out}:lots")
    assert bad.exit_code == 2 and "DIR:SCALE" in bad.output


QUIET_SCRIPT = """
import sys
from lora_unlearn.core.inference import answer
from lora_unlearn.core.models import load_base
from lora_unlearn.training.trainer import TrainConfig, train_adapter
model, tok, _ = load_base(sys.argv[1], "nf4")
train_adapter(model, tok, [{"question": "Capital of X?", "answer": "Y."}],
              TrainConfig(max_steps=1, batch_size=1, r=4, max_length=64), progress=False)
print(answer(model, tok, ["hi"], max_new_tokens=2))
"""


def test_a_model_load_and_training_print_none_of_the_known_harmless_messages(tiny_model_dir):
    import os
    import subprocess
    import sys

    from lora_unlearn.quiet import KNOWN_LOGS

    def stderr(**env):
        done = subprocess.run([sys.executable, "-c", QUIET_SCRIPT, str(tiny_model_dir)], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
        assert done.returncode == 0, done.stderr
        return done.stderr

    known = ["`is_gradient_checkpointing` is deprecated", "Loading weights", *KNOWN_LOGS.values()]
    quiet = stderr()
    assert not [k for k in known if k in quiet], quiet
    loud = stderr(LORA_UNLEARN_VERBOSE="1")  # the same run, filter off: the messages are there to filter
    assert "`is_gradient_checkpointing` is deprecated" in loud and "Loading weights" in loud
