"""benchmarks/gpu_check.py's plumbing, on a tiny Llama on CPU (bitsandbytes runs nf4 there too).

The GPU numbers need a GPU; what can be checked here is that the script a lent machine runs
writes a valid results file after every stage, keeps going past a failed stage, survives being cut
off and finishes the rest on ``--resume``, skips what the time budget no longer allows, and says
what is missing instead of failing deep inside a stage.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
TINY = ["--shape", "tiny", "--device", "cpu", "--threads", "1", "--budget-s", "0"]


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *TINY, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def numbers(x) -> list[float]:
    if isinstance(x, bool):
        return []
    if isinstance(x, (int, float)):
        return [x]
    if isinstance(x, dict):
        return [n for v in x.values() for n in numbers(v)]
    if isinstance(x, list):
        return [n for v in x for n in numbers(v)]
    return []


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_tiny_run_writes_each_stage_keeps_going_past_a_failure_and_resumes_after_a_cut(tmp_path):
    out = tmp_path / "gpu_check.json"
    # Run 1: the model stage fails (planted), train still runs (it builds the model itself), then the
    # process dies abruptly right after train's write, as when a lent machine is taken back.
    first = run("--out", str(out), "--stages", "preflight,model,train,toggle", "--fail-stage", "model",
                "--exit-after", "train")
    assert first.returncode == 3, first.stderr[-3000:]
    doc = json.loads(out.read_text())  # valid JSON although the process never returned
    stages = doc["stages"]
    assert list(stages) == ["preflight", "model", "train"], list(stages)
    assert stages["model"]["status"] == "error" and "planted failure" in stages["model"]["error"]
    assert stages["preflight"]["status"] == stages["train"]["status"] == "ok"
    assert not list(tmp_path.glob(".*.tmp")), "a temporary file was left beside the results"
    for rec in stages.values():
        assert rec["started"] and rec["ended"] and rec["seconds"] >= 0
    assert doc["summary"]["incomplete"] == ["model", "toggle"]

    # Run 2: --resume runs what is not ok yet (model, toggle, mixed, merge), keeps train from run 1.
    second = run("--out", str(out), "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    doc = json.loads(out.read_text())
    stages = doc["stages"]
    assert set(stages) == {"preflight", "model", "train", "toggle", "mixed", "merge"}
    assert all(rec["status"] == "ok" for rec in stages.values()), {k: v.get("error") for k, v in stages.items()}
    assert stages["train"]["run"] == 1 and stages["merge"]["run"] == stages["model"]["run"] == 2
    assert len(doc["runs"]) == 2 and doc["summary"]["incomplete"] == []
    for name in ("model", "train", "toggle", "mixed", "merge"):
        assert stages[name]["elapsed_s"] >= stages[name]["seconds"] >= 0
        assert all(math.isfinite(n) for n in numbers(stages[name]["result"])), name

    pre = stages["preflight"]["result"]
    assert pre["missing"] == [] and pre["torch"] and pre["transformers"] and pre["peft"] and pre["bitsandbytes"]
    assert all(pulled == [] for pulled in pre["project_modules_pull"].values()), pre["project_modules_pull"]
    model = stages["model"]["result"]
    assert model["linear4bit_layers"] == 2 * 7 and positive(model["build_s"])
    train = stages["train"]["result"]["settings"]
    assert set(train) == {"batch4_gc", "batch8_no_gc"}
    for name, batch, checkpointing in (("batch4_gc", 4, True), ("batch8_no_gc", 8, False)):
        s = train[name]
        assert (s["batch"], s["gradient_checkpointing"]) == (batch, checkpointing)
        assert positive(s["median_step_s"]) and positive(s["tokens_per_s"]) and positive(s["process_peak_rss_gb"])
        assert len(s["step_s"]) == doc["sizes"]["steps"] and all(positive(t) for t in s["step_s"])
        assert s["losses"][-1] < s["losses"][0]  # the optimizer steps reach the LoRA weights
    toggle = stages["toggle"]["result"]
    assert positive(toggle["set_coefficients_x_cheaper_than_set_adapter"])
    assert all(positive(v["median_us"]) for v in toggle["switching"].values())
    mixed = stages["mixed"]["result"]
    for path in ("base", "ForgetRuntime mixed (4 forget, 4 off)", "PEFT adapter_names mixed (4 forget, 4 base)"):
        assert positive(mixed[path]["forward_x_base"]) and positive(mixed[path]["generate_x_base"])
    assert mixed["runtime_vs_peft_max_abs_logit_diff"] < 1e-3 and mixed["same_generated_tokens"]
    merge = stages["merge"]["result"]
    assert positive(merge["merge_s"]) and positive(merge["max_abs_logit_diff"]) and positive(merge["relative_delta_norm"])
    assert merge["hot_swap"]["vs ForgetRuntime with third: max_abs_logit_diff"] < 1e-3
    assert merge["hot_swap"]["after swap back: max_abs_logit_diff"] < 1e-3
    s = doc["summary"]
    assert s["goals_apply"] is False  # a tiny CPU run says nothing about the GPU goals
    assert positive(s["toggle_x_cheaper"]) and positive(s["mixed_generate_x_base"])


def test_the_budget_skips_stages_and_says_so(tmp_path):
    out = tmp_path / "gpu_check.json"
    assert gpu_check().main([*TINY[:4], "--budget-s", "0.001", "--stages", "preflight,merge", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["stages"]["preflight"]["status"] == "ok"
    assert doc["stages"]["merge"]["status"] == "skipped" and "budget" in doc["stages"]["merge"]["reason"]
    assert doc["summary"]["incomplete"] == ["merge"]


def test_missing_pieces_are_named_with_how_to_get_them(tmp_path, monkeypatch, capsys):
    check = gpu_check()
    out = tmp_path / "gpu_check.json"
    if not __import__("torch").cuda.is_available():  # here: no GPU, so --device cuda must stop at the preflight
        assert check.main(["--out", str(out), "--stages", "preflight,train"]) == 2
        missing = json.loads(out.read_text())["stages"]["preflight"]["result"]["missing"]
        assert any(m.startswith("a CUDA device") for m in missing), missing
        assert "a CUDA device" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    _, missing = check.preflight("cpu")
    assert any(m.startswith("bitsandbytes") and "pip install bitsandbytes" in m for m in missing), missing


def test_pack_copies_bitsandbytes_python_files_and_one_cuda_library(tmp_path):
    dest = tmp_path / "site"
    assert gpu_check().main(["--pack", str(dest), "--bnb-cuda", "128"]) == 0
    libs = sorted(p.name for p in (dest / "bitsandbytes").glob("libbitsandbytes_*"))
    assert libs == ["libbitsandbytes_cuda128.so"]
    assert (dest / "bitsandbytes" / "__init__.py").exists() and (dest / "peft" / "__init__.py").exists()
    assert sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) < 64 * 2**20  # fits what a run carries
