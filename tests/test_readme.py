"""The README's examples, run as written: a README edit that breaks one fails CI.

Every fenced bash/sh/python block of README.md is read. A command is either run here or listed in
``SKIPPED`` with the reason (and the test asserts that every listed command still exists, so the
list cannot drift): a new README command is run or listed, never silently untested.

- The quick start (six invented facts, two forgotten) runs as one bash script on the embedded
  model, exactly as a new user runs it: learn's defaults must learn >= 5 of the 6 facts and keep
  the base's real-world answers, and after K - F the two forgotten facts are not named while the
  kept ones are (the first-hour and knowledge-update issues' goals).
- The command-line reference and the Python API block run on the tiny model (``--base`` added,
  small data): every command exits as the README says (``push`` is refused offline), and a
  misspelled ``--select`` key stops with exit 2 and writes nothing.
- The serving lines run on the embedded model with the shipped adapters: ``serve`` is started
  and called over loopback, and the ForgetRuntime block forgets a fact the README says it does.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lora_unlearn.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BIN = str(Path(sys.executable).parent)

# Commands (by prefix) not run by this test, and why.
SKIPPED = {
    "lora-unlearn scope": "fits a scope on a TOFU-mini run (needs K and a method's run); tests/test_scope.py fits "
                          "scopes on the tiny and the embedded model",
    "lora-unlearn serve --adapter knowledge=runs/": "serves TOFU-mini adapters that a benchmark run makes; "
                                                    "tests/test_server.py serves scoped adapters",
    "lora-unlearn eval --scoped": "a full scoped TOFU evaluation (minutes); tests/test_scope.py runs eval --scoped",
    ".venv/bin/python benchmarks/scope.py": "the detector benchmark (7 minutes), not a test",
    "make demo": "the demo itself: tests/test_embedded.py runs run_demo and checks its goals",
    "make test": "the suite that contains this test",
    "lora-unlearn eval --benchmark tofu": "a full TOFU evaluation of a run (minutes per model); tests/test_evaluate.py "
                                          "runs eval on the tiny model",
    "lora-unlearn run recipes/knowledge.yaml": "TOFU-mini's K: 400 rows x 5 epochs on the embedded model (an hour); "
                                               "tests/test_recipes.py runs every recipe on the tiny model",
    "lora-unlearn run recipes/perta_grad.yaml": "needs TOFU-mini's K (above); tests/test_recipes.py runs it on the tiny model",
    "lora-unlearn run recipes/npo.yaml": "DIR is a placeholder for a K; tests/test_recipes.py runs npo on the tiny model",
    ".venv/bin/python benchmarks/tofu_mini.py": "the TOFU-mini benchmark: hours on 2 cores, a script, not a test",
}


def fenced(heading: str, lang: str) -> str:
    """The first ``lang`` block under ``## heading``."""
    section = README.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert match, f"README section {heading!r} has no {lang} block"
    return match.group(1)


def commands(block: str) -> list[str]:
    """Shell lines of a block, continuation lines joined, comments and heredoc bodies dropped."""
    lines, heredoc = [], None
    for line in block.replace("\\\n", " ").splitlines():
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        text = line.split("  #", 1)[0].strip()
        if not text or text.startswith("#"):
            continue
        if "<<'" in text:
            heredoc = text.split("<<'", 1)[1].split("'", 1)[0]
        lines.append(text)
    return lines


def all_commands() -> list[str]:
    return [c for m in re.finditer(r"```(?:bash|sh)\n(.*?)```", README, re.S) for c in commands(m.group(1))]


RUN_ELSEWHERE = ("cat > ", "head -n ", "curl ")  # quick-start plumbing, and the curl of the serving section


def test_every_readme_command_is_run_or_listed():
    blocks_run = {c for heading in ("Quick start", "Command line") for c in commands(fenced(heading, "bash"))}
    for command in all_commands():
        if command in blocks_run or command.startswith(RUN_ELSEWHERE):
            continue
        if command.startswith("lora-unlearn ask --adapter adapters/") or command.startswith("lora-unlearn serve --adapter knowledge=adapters"):
            continue  # adapters/README's serving lines quoted in the README: the serving test runs the same
        assert any(command.startswith(prefix) for prefix in SKIPPED), (
            f"README command not run by tests/test_readme.py and not in its SKIPPED list: {command}")
    for prefix in SKIPPED:  # the list names commands that exist
        assert any(c.startswith(prefix) for c in all_commands()), f"SKIPPED lists {prefix!r}, which the README no longer has"


# ---------------------------------------------------------------------------------------------
# The quick start, on the embedded model.

FACTS_KEYS = ["Valdane", "kelp", "heron", "1842", "Saltwind", "lyre"]


def _named(answers: list[str], keys: list[str]) -> list[bool]:
    return [re.search(k, a, flags=re.IGNORECASE) is not None for k, a in zip(keys, answers)]


@pytest.mark.slow
def test_the_quick_start_learns_the_facts_and_forgets_two(tmp_path):
    from lora_unlearn.core.adapter_io import load_adapter
    from lora_unlearn.core.inference import answer
    from lora_unlearn.core.models import load_base
    from lora_unlearn.core.stack import attached
    from lora_unlearn.demo import _rows

    script = fenced("Quick start", "bash")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=1500, env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    said = " ".join(done.stderr.split())
    assert done.returncode == 0, done.stderr[-3000:]
    learned = re.search(r"learned (\d) of 6 rows", said)
    assert learned and int(learned.group(1)) >= 5, said[-2000:]
    assert "Lantern" in done.stdout  # ask printed its table

    model, tok, _ = load_base()
    facts = [json.loads(line) for line in (tmp_path / "facts.jsonl").read_text().splitlines()]
    real = _rows("demo_real.jsonl")
    questions = [r["question"] for r in facts] + [r["question"] for r in real]
    keys = FACTS_KEYS + [r["keyword"] for r in real]
    before = _named(answer(model, tok, questions, max_new_tokens=32, batch_size=16), keys)
    with attached(model, [(load_adapter(tmp_path / "runs" / "K"), 1.0)]) as m:
        with_k = _named(answer(m, tok, questions, max_new_tokens=32, batch_size=16), keys)
    with attached(model, [(load_adapter(tmp_path / "runs" / "K_minus_F"), 1.0)]) as m:
        after = _named(answer(m, tok, questions[:6], max_new_tokens=32, batch_size=16), keys[:6])
    assert sum(before[:6]) == 0 and sum(with_k[:6]) >= 5, (before[:6], with_k[:6])
    kept_real = [k for k, b in zip(with_k[6:], before[6:]) if b]
    assert sum(kept_real) >= len(kept_real) - 2, (before[6:], with_k[6:])  # measured: README "Knowledge updates"
    assert after[:2] == [False, False], after  # forgotten
    assert sum(after[2:]) >= sum(with_k[2:6]) - 1, (with_k, after)  # kept


# ---------------------------------------------------------------------------------------------
# The command-line reference and the Python API, on the tiny model.

def _tiny_argv(command: str, tiny: Path) -> list[str]:
    argv = shlex.split(command)[1:]
    if argv[0] in ("learn", "ask"):
        argv += ["--base", str(tiny)]
    if argv[0] == "learn":
        argv += ["--max-length", "128", "--min-steps", "4", "--r", "4"]
    if argv[0] == "run":
        argv += ["--set", f"base.model={tiny}", "--set", "adapters.knowledge=runs/K", "--set", "train_defaults.max_steps=2",
                 "--set", "train_defaults.batch_size=2", "--set", "data.forget.limit=4"]
    return argv


def _facts(folder: Path) -> None:
    script = fenced("Quick start", "bash")
    heredoc = script.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    (folder / "facts.jsonl").write_text(heredoc + "\n")
    (folder / "two.jsonl").write_text("\n".join(heredoc.splitlines()[:2]) + "\n")


def test_the_command_line_reference_runs_as_written(tiny_model_dir, tmp_path, monkeypatch):
    _facts(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    outcome = {}
    for command in commands(fenced("Command line", "bash")):
        if any(command.startswith(p) for p in SKIPPED) or command.startswith("lora-unlearn serve"):
            continue  # serve: test_serving_examples, on the shipped adapters
        if command.startswith("lora-unlearn extrapolate runs/U"):
            shutil.copytree(tmp_path / "runs" / "F_neg", tmp_path / "runs" / "U")  # U: an unlearning adapter
        result = runner.invoke(app, _tiny_argv(command, tiny_model_dir))
        outcome[command.split()[1]] = result
        if command.startswith("lora-unlearn push"):  # refused: runs/tv/adapter is K - lam F
            assert result.exit_code == 2 and "--allow-forget-adapter" in result.output, result.output
        else:
            assert result.exit_code == 0, f"{command}\n{result.output}"
    for out in ("runs/K", "runs/F", "runs/F_neg", "runs/F_half", "runs/U_uipe", "runs/K_minus_F", "runs/K_minus_F_r8",
                "runs/tv/adapter", "runs/tv/selected", "runs/tv_merged", "runs/tv_vllm"):
        assert (tmp_path / out).is_dir(), out
    assert "learned" in outcome["learn"].output
    assert "library_name: peft" in (tmp_path / "runs/tv/adapter/README.md").read_text()
    # A misspelled --select key: exit 2, one line naming the fix, nothing written.
    tv = next(c for c in commands(fenced("Command line", "bash")) if c.startswith("lora-unlearn run recipes/tv.yaml"))
    typo = _tiny_argv(tv.replace("runs/tv", "runs/tv_typo").replace("unlearned.lam=", "unlearned.lamm="), tiny_model_dir)
    bad = runner.invoke(app, typo)
    assert bad.exit_code == 2 and "did you mean 'lam'?" in " ".join(bad.output.split())
    assert not (tmp_path / "runs/tv_typo").exists() and not (tmp_path / "runs/tv_typo.partial").exists()


def test_the_python_api_block_runs_as_written(tiny_model_dir, tmp_path, monkeypatch):
    _facts(tmp_path)
    monkeypatch.chdir(tmp_path)
    code = fenced("Python API", "python")
    assert "load_base()" in code
    code = code.replace("load_base()", f"load_base({str(tiny_model_dir)!r})", 1)  # the tiny model, small data
    scope: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), scope)
    assert (tmp_path / "runs" / "K_minus_F" / "adapter_model.safetensors").is_file()
    assert set(scope["errors"]) == set(scope["small"].modules) and scope["K"].lineage["learned"]["rows"] == 6
    assert scope["F"].lineage["params"]["epochs"] == 10  # the forget adapter's own defaults


# ---------------------------------------------------------------------------------------------
# Serving, on the embedded model with the shipped adapters.

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serving_examples(monkeypatch):
    import httpx

    monkeypatch.chdir(ROOT)  # the README's adapters/ paths
    serve = next(c for c in commands(fenced("Command line", "bash")) if c.startswith("lora-unlearn serve"))
    port = _free_port()
    proc = subprocess.Popen([f"{BIN}/lora-unlearn", *shlex.split(serve)[1:], "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the server did not come up within 240 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8,
            "forget": {"forget": 1}})
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"], reply.text
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    code = fenced("Per-request forgetting and serving", "python")
    scope: dict = {}
    exec(compile(code.replace("rt.generate(", "out = rt.generate(", 1), "README.md (ForgetRuntime)", "exec"), scope)
    plain, forgotten, no_knowledge = scope["out"]
    facts = {r["question"]: r for r in map(json.loads, (ROOT / "lora_unlearn/resources/demo_facts.jsonl").read_text().splitlines())}
    key = facts[scope["q"]]["keyword"]
    assert re.search(key, plain, re.IGNORECASE) and not re.search(key, forgotten, re.IGNORECASE), (plain, forgotten)
