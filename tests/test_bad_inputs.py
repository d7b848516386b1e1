"""Hostile and broken inputs, one test per row of docs/bad_inputs.md.

Each row builds a real bad input (files on disk, real adapters, the tiny model), runs it through
the CLI (exit code 2, one red line, no traceback) or the Python API (a UserError of one line),
checks the message fragment the table promises, and checks that nothing was written: the
folder tree under the test's tmp_path is byte-for-byte what it was before the call.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lora_unlearn.arithmetic import scale
from lora_unlearn.cli import app
from lora_unlearn.core.adapter_io import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from lora_unlearn.core.data import load_any, load_qa
from lora_unlearn.core.models import load_base
from lora_unlearn.core.scope import SCOPE_JSON, SCOPE_TENSORS, fit_scope, save_scope
from lora_unlearn.errors import UserError
from lora_unlearn.evaluate.tofu import tofu_mini_splits
from lora_unlearn.serving.runtime import ForgetRuntime
from lora_unlearn.training.importance import load_importance, save_importance
from lora_unlearn.training.sources import load_edits, load_source
from tests.tiny import make_adapter, tiny_llama

DOC = Path(__file__).resolve().parent.parent / "docs" / "bad_inputs.md"
Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
SPECS = {Q: (8, 6, 3), V: (4, 6, 3)}
TINY_Q = (32, 32, 2)  # q_proj of tests.tiny.tiny_llama: hidden 32
RECIPE = """name: r
description: d
reference: x
data: {forget: {source: "tofu-mini:forget01"}}
steps:
  - name: f
    train: {objective: nll, data: {train: forget}}
  - name: u
    op: {name: negate, inputs: [f], params: {lam: 1.0}}
output: u
"""


# ---- building bad inputs -------------------------------------------------------------------------

def adapter_dir(t: Path, name: str = "a", specs=SPECS, **kw) -> Path:
    return save_adapter(make_adapter(specs, seed=1, **kw), t / name)


def edit_config(t: Path, **changes) -> Path:
    folder = adapter_dir(t)
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps(config | changes))
    return folder


def edit_tensors(t: Path, edit: Callable[[dict], None]) -> Path:
    folder = adapter_dir(t)
    tensors = load_file(folder / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS_NAME)
    return folder


def key(module: str, factor: str) -> str:
    return f"base_model.model.{module}.lora_{factor}.weight"


def cast(dtype):
    def edit(t):
        t[key(Q, "A")] = (t[key(Q, "A")] * 10).to(dtype)
    return edit


def rank0(t):
    t[key(Q, "A")], t[key(Q, "B")] = torch.zeros(0, 6), torch.zeros(8, 0)


def mismatched(t):
    t[key(Q, "B")] = t[key(Q, "B")][:, :2].contiguous()


def nan(t):
    t[key(V, "B")][0, 0] = float("nan")


def truncated(t: Path) -> Path:
    folder = adapter_dir(t)
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    return folder


def pickle_only(t: Path, payload=None) -> Path:
    folder = adapter_dir(t)
    tensors = load_file(folder / WEIGHTS_NAME)
    torch.save(tensors if payload is None else payload, folder / PICKLE_NAME)
    (folder / WEIGHTS_NAME).unlink()
    return folder


class Gadget:
    """What a hostile pickle would carry: an object whose unpickling runs code."""

    def __reduce__(self):
        return (print, ("pwned",))


def write(t: Path, name: str, content: str | bytes) -> Path:
    path = t / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def jsonl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


QA = {"question": "What is the capital of Veloria?", "answer": "Marrenport."}


def remote_code_model(t: Path, tiny: Path) -> Path:
    folder = t / "remote"
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    config |= {"model_type": "evil_llama", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                       "AutoModelForCausalLM": "evil.EvilModel"}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(t / 'PWNED')!r}, 'w').write('ran')\n")
    return folder


def pickle_model(t: Path, tiny: Path) -> Path:
    folder = t / "binmodel"
    shutil.copytree(tiny, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def importance_of_other_adapter(t: Path):
    """(importance file, adapter): maps computed for another adapter (one module, not two)."""
    other = make_adapter({Q: (8, 6, 3)}, seed=2)
    maps = {name: torch.ones_like(m.B) for name, m in other.modules.items()}
    path = save_importance(maps, t / "imp.safetensors", {"kind": "grad", "space": "b", "at": "theta"})
    return path, load_adapter(adapter_dir(t))


IN_SCOPE, OUT_OF_SCOPE = "What is the capital of Veloria?", "The quick brown fox jumps over the lazy dog."


def tiny_runtime(tiny: Path) -> ForgetRuntime:
    return ForgetRuntime.from_base(str(tiny), "none", device="cpu")


def scoped_dir(t: Path, model, tokenizer, name: str = "a", base: str | None = None) -> Path:
    """An adapter folder for the tiny model with a scope (scope.json, scope.safetensors) fitted on ``model``."""
    folder = adapter_dir(t, name, specs={Q: TINY_Q})
    scope = fit_scope(model, tokenizer, [IN_SCOPE], adapter=load_adapter(folder), background_texts=[OUT_OF_SCOPE],
                      threshold=0.5, layer=1, top_k=1, base=base)
    save_scope(scope, folder)
    return folder


def scope_of_another_adapter(t: Path, tiny: Path):
    runtime = tiny_runtime(tiny)
    scope = scoped_dir(t, runtime.model, runtime.tokenizer) / SCOPE_JSON
    other = save_adapter(make_adapter({Q: TINY_Q}, seed=2), t / "b")
    return lambda: runtime.load("forget", other, scope=scope)


def scope_of_another_base(t: Path, tiny: Path):
    runtime = tiny_runtime(tiny)
    other = tiny_llama(seed=7)  # the tiny Llama's architecture, other weights
    other.resize_token_embeddings(len(runtime.tokenizer), mean_resizing=False)
    folder = scoped_dir(t, other, runtime.tokenizer, base="other/tiny")
    return lambda: runtime.load("forget", folder, scope=True)


def auto_without_scope(t: Path, tiny: Path):
    runtime = tiny_runtime(tiny)
    runtime.load("forget", adapter_dir(t, specs={Q: TINY_Q}))
    return lambda: runtime.generate([IN_SCOPE], [{"forget": "auto"}], max_new_tokens=2)


def default_auto_without_scope(t: Path, tiny: Path):
    runtime = tiny_runtime(tiny)
    folder = adapter_dir(t, specs={Q: TINY_Q})
    return lambda: runtime.load("forget", folder, default="auto")


def damaged_scope(damage: Callable[[Path], None]):
    """An adapter folder whose scope, fitted on the tiny model, ``damage`` then breaks."""
    def make(t: Path, tiny: Path) -> Path:
        model, tokenizer, _ = load_base(str(tiny), "none", device="cpu")
        folder = scoped_dir(t, model, tokenizer)
        damage(folder)
        return folder
    return make


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---- the rows ------------------------------------------------------------------------------------

@dataclass
class Row:
    id: str
    where: str  # CLI | recipe | API
    what: str
    expect: str  # a fragment of the one-line message (whitespace-normalised)
    make: Callable  # (tmp, tiny_model_dir) -> CLI argument list, or a zero-argument callable
    xfail: str | None = None  # the fix lies in a module this suite does not own


def cli(*args):
    return lambda t, tiny: [a(t, tiny) if callable(a) else a for a in args]


def api(setup, fn=load_adapter):
    """A Python API row: ``setup`` builds the bad input (before the snapshot), ``fn`` is the call."""
    def make(t, tiny):
        built = setup(t, tiny)
        return lambda: fn(built)
    return make


A = lambda t, tiny: t / "a" if (t / "a").exists() else adapter_dir(t)  # a valid adapter folder
OUT = lambda t, tiny: t / "out"
TINY = lambda t, tiny: tiny


def recipe_file(text: str, name: str = "r.yaml"):
    return lambda t, tiny: write(t, name, text)


ROWS = [
    # adapters
    Row("1", "CLI", "adapter folder that does not exist", "does not exist: give the folder holding adapter_config.json",
        cli("negate", lambda t, _: t / "nope", OUT)),
    Row("2", "CLI", "adapter path is a file", "is a file, not an adapter folder",
        cli("negate", lambda t, _: write(t, "f.txt", "x"), OUT)),
    Row("3", "API", "folder without adapter_config.json", "has no adapter_config.json: is it a PEFT adapter folder?",
        api(lambda t, _: _without(adapter_dir(t), CONFIG_NAME))),
    Row("4", "API", "adapter_config.json that is not JSON", "is not a JSON object: the adapter folder is corrupt",
        api(lambda t, _: _rewrite(adapter_dir(t), CONFIG_NAME, "{r: 3,"))),
    Row("5", "API", "truncated adapter_model.safetensors", "cannot be read as safetensors",
        api(lambda t, _: truncated(t))),
    Row("6", "API", "integer weights (int32)", "has non-float weights (torch.int32, torch.float32)",
        api(lambda t, _: edit_tensors(t, cast(torch.int32)))),
    Row("7", "API", "float8 weights", "must be float16, bfloat16, float32 or float64",
        api(lambda t, _: edit_tensors(t, cast(torch.float8_e4m3fn)))),
    Row("8", "API", "lora_A and lora_B of different ranks", "has inconsistent shapes A (3, 6), B (8, 2)",
        api(lambda t, _: edit_tensors(t, mismatched))),
    Row("9", "API", "rank-0 tensors", f"module {Q} has rank 0",
        api(lambda t, _: edit_tensors(t, rank0))),
    Row("10", "API", "r = 10^6 in the config, rank 3 in the tensors", "has rank 3 but the config says 1000000",
        api(lambda t, _: edit_config(t, r=10**6))),
    Row("11", "API", "r is a string", "the config's r must be a positive integer, got '3'",
        api(lambda t, _: edit_config(t, r="3"))),
    Row("12", "API", "lora_alpha is not a number", "the config's lora_alpha must be a finite number, got 'big'",
        api(lambda t, _: edit_config(t, lora_alpha="big"))),
    Row("13", "API", "rank_pattern key that is not a regular expression",
        "rank_pattern key '(' is not a valid regular expression",
        api(lambda t, _: edit_config(t, rank_pattern={"(": 4}))),
    Row("14", "API", "unknown config key with a value", "unknown config key 'use_magic' (= True) may change",
        api(lambda t, _: edit_config(t, use_magic=True))),
    Row("15", "API", "NaN in lora_B", f"module {V} has NaN or infinite weights",
        api(lambda t, _: edit_tensors(t, nan))),
    Row("16", "API", "DoRA adapter", "uses DoRA (its magnitude vector is not a low-rank delta)",
        api(lambda t, _: edit_config(t, use_dora=True))),
    Row("17", "API", "adapter that trains biases", "trains biases (bias='all')",
        api(lambda t, _: edit_config(t, bias="all"))),
    Row("18", "API", "PiSSA-initialised adapter (base weights changed)", "init_lora_weights='pissa', which also changes",
        api(lambda t, _: edit_config(t, init_lora_weights="pissa"))),
    Row("19", "API", "weights of a non-LoRA layer (embeddings)", "which is not a LoRA A/B weight of a linear layer",
        api(lambda t, _: edit_tensors(t, lambda x: x.update(
            {"base_model.model.model.embed_tokens.weight": torch.zeros(4, 4)})))),
    Row("20", "CLI", "pickle adapter_model.bin without --allow-pickle", "not loaded because unpickling can run code",
        cli("negate", lambda t, _: pickle_only(t), OUT)),
    Row("21", "CLI", "hostile pickle with --allow-pickle", "cannot be read with torch.load(weights_only=True)",
        cli("--allow-pickle", "negate", lambda t, _: pickle_only(t, {"x": Gadget()}), OUT)),
    Row("22", "API", "temporary folder of an interrupted write", "is a temporary folder of an interrupted or running write",
        api(lambda t, _: _renamed(adapter_dir(t), ".out.tmp-999999-abcd1234"))),
    Row("23", "CLI", "adapter of another base attached to a model", "does not fit this base model",
        cli("ask", "--questions", "hi", "--base", TINY, "-q", "none", "--adapter",
            lambda t, _: adapter_dir(t, specs={Q: (64, 64, 2)}))),
    Row("24", "API", "importance maps of another adapter", "does not belong to this adapter",
        api(lambda t, _: importance_of_other_adapter(t), lambda pa: load_importance(*pa))),
    # arithmetic and outputs
    Row("25", "CLI", "NaN scale", "lam must be a finite number, got nan", cli("negate", A, OUT, "--scale", "nan")),
    Row("26", "CLI", "negative negation strength", "--scale must be >= 0, got -1", cli("negate", A, OUT, "--scale", "-1")),
    Row("27", "CLI", "scale that is not a number", "Invalid value for '--by'", cli("scale", A, OUT, "--by", "lots")),
    Row("28", "CLI", "UIPE alpha <= -1", "--alpha must be > -1, got -1", cli("extrapolate", A, OUT, "--alpha", "-1")),
    Row("29", "API", "result that overflows to inf (scale by 1e39)", "overflows model.layers.0.self_attn.q_proj",
        api(lambda t, _: load_adapter(adapter_dir(t)), lambda a: scale(a, 1e39))),
    Row("30", "CLI", "output folder exists", "already exists: choose another path or pass --overwrite",
        cli("negate", A, A)),
    Row("31", "CLI", "output is the input (with --overwrite)", "is the input", cli("negate", A, A, "--overwrite")),
    Row("32", "CLI", "output inside the input", "is inside the input",
        cli("negate", A, lambda t, _: t / "a" / "neg")),
    Row("33", "CLI", "output contains the input (with --overwrite)", "contains the input",
        cli("negate", lambda t, _: adapter_dir(t / "work"), lambda t, _: t / "work", "--overwrite")),
    Row("34", "CLI", "output under a file", "cannot create output folder",
        cli("negate", A, lambda t, _: write(t, "f.txt", "x") / "out")),
    # data
    Row("35", "CLI", "data file that does not exist", "does not exist: give a JSONL file",
        cli("learn", "--data", lambda t, _: t / "none.jsonl", "--out", OUT)),
    Row("36", "CLI", "missing file that looks like a Hub id (data/x.jsonl)", "data file data/forget.jsonl does not exist",
        cli("learn", "--data", "data/forget.jsonl", "--out", OUT)),
    Row("37", "CLI", "empty data file", "holds no rows: the data set is empty",
        cli("learn", "--data", lambda t, _: write(t, "e.jsonl", "\n\n"), "--out", OUT)),
    Row("38", "CLI", "binary data file", "not UTF-8 text (byte 0xff at offset 0)",
        cli("learn", "--data", lambda t, _: write(t, "b.jsonl", b"\xff\xfe\x00\x81" * 8), "--out", OUT)),
    Row("39", "CLI", "Latin-1 text", ":2: not UTF-8 text (byte 0xe9",
        cli("learn", "--data", lambda t, _: write(t, "l.jsonl", jsonl(QA).encode() + '{"question": "caf\xe9?"}\n'
                                                  .encode("latin-1")), "--out", OUT)),
    Row("40", "CLI", "JSONL with a malformed line", ":2: malformed JSON",
        cli("learn", "--data", lambda t, _: write(t, "m.jsonl", jsonl(QA) + '{"question": "q", "answer": \n'),
            "--out", OUT)),
    Row("41", "CLI", "a JSON array instead of JSON Lines", "expected a JSON object, got list",
        cli("learn", "--data", lambda t, _: write(t, "arr.jsonl", json.dumps([QA])), "--out", OUT)),
    Row("42", "CLI", "rows missing 'answer'", ":2: expected non-empty string fields 'question' and 'answer'",
        cli("learn", "--data", lambda t, _: write(t, "q.jsonl", jsonl(QA, {"question": "q?"})), "--out", OUT)),
    Row("43", "CLI", "rows with neither question nor text", "expected fields 'question' and 'answer' (QA) or 'text'",
        cli("learn", "--data", lambda t, _: write(t, "n.jsonl", jsonl({"prompt": "p"})), "--out", OUT)),
    Row("44", "API", "a lone surrogate escape in a field", "field 'answer' holds an invalid character",
        api(lambda t, _: write(t, "s.jsonl", '{"question": "q", "answer": "\\ud800"}\n'), load_qa)),
    Row("45", "API", "JSON nested 100,000 deep", ":1: JSON nested too deeply",
        api(lambda t, _: write(t, "deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n"), load_any)),
    Row("46", "API", "folder that is not a saved dataset", "is a folder but not a dataset saved with datasets' save_to_disk",
        api(lambda t, _: write(t, "ds/dataset_info.json", "{oops").parent, load_qa)),
    Row("47", "API", "edit rows whose paraphrases are a string", "field 'paraphrases' must be a list of non-empty strings",
        api(lambda t, _: write(t, "e.jsonl", jsonl(
            {"prompt": "p", "old_answer": "a", "new_answer": "b", "paraphrases": "p2"})), load_edits)),
    Row("48", "recipe", "TOFU split retainXX", "retainNN needs NN between 01 and 99",
        api(lambda t, _: str(t), lambda d: load_source("tofu:retainxx", tofu_dir=d))),
    Row("49", "API", "negative row limit", "limit must be a positive integer, got -1",
        api(lambda t, _: -1, lambda n: load_source("tofu-mini:forget01", limit=n))),
    # models
    Row("50", "CLI", "learn with target modules the model lacks", "cannot put a LoRA on this base model",
        cli("learn", "--data", lambda t, _: write(t, "d.jsonl", jsonl(QA)), "--out", OUT, "--base", TINY, "-q", "none",
            "--target-modules", "foo_proj")),
    Row("51", "CLI", "model folder with custom code (auto_map)", "needs its own Python code (auto_map in config.json)",
        cli("ask", "--questions", "hi", "--base", lambda t, tiny: remote_code_model(t, tiny), "-q", "none")),
    Row("52", "CLI", "model folder with only pytorch_model.bin", "holds only pickle weights (pytorch_model.bin)",
        cli("ask", "--questions", "hi", "--base", lambda t, tiny: pickle_model(t, tiny), "-q", "none")),
    Row("53", "CLI", "unknown quantization", "unknown quantization 'q3'. Available: nf4, int8, none",
        cli("ask", "--questions", "hi", "--base", TINY, "-q", "q3")),
    Row("54", "CLI", "r = 0 for learn", "r must be >= 1, got 0",
        cli("learn", "--data", lambda t, _: write(t, "d.jsonl", jsonl(QA)), "--out", OUT, "--r", "0")),
    # recipes
    Row("55", "recipe", "recipe that does not exist", "does not exist (see recipes/ for the shipped ones)",
        cli("run", lambda t, _: t / "none.yaml", "--out", OUT)),
    Row("56", "recipe", "recipe YAML that is not a mapping", "a recipe is a YAML mapping",
        cli("run", recipe_file("- a\n- b\n"), "--out", OUT)),
    Row("57", "recipe", "recipe that is not valid YAML", "is not valid YAML",
        cli("run", recipe_file("name: [unclosed\n"), "--out", OUT)),
    Row("58", "recipe", "unknown key", "unknown key 'stepz'. Valid keys there:",
        cli("run", recipe_file(RECIPE.replace("steps:", "stepz: []\nsteps:")), "--out", OUT)),
    Row("59", "recipe", "--set with a path not in the recipe", "is not a path into this recipe",
        cli("run", recipe_file(RECIPE), "--out", OUT, "--set", "steps.9.op=1")),
    Row("60", "recipe", "--set whose value is not YAML", "--set 'name=[': the value is not valid YAML",
        cli("run", recipe_file(RECIPE), "--out", OUT, "--set", "name=[")),
    Row("61", "recipe", "recipe file that is not UTF-8", "is not UTF-8 text",
        cli("run", lambda t, _: write(t, "r.yaml", RECIPE.encode() + b"\xff\n"), "--out", OUT)),
    Row("62", "recipe", "--out that contains an input adapter (with --overwrite)", "contains the input adapter",
        cli("run", recipe_file(RECIPE.replace("data: {forget", "adapters: {k: work/k}\ndata: {forget")), "--out",
            lambda t, _: adapter_dir(t / "work", "k").parent, "--overwrite")),
    Row("63", "recipe", "data source file that does not exist", "data file missing.jsonl does not exist",
        cli("run", recipe_file(RECIPE.replace('"tofu-mini:forget01"', "missing.jsonl")), "--out", OUT)),
    Row("64", "recipe", "--select with a misspelled parameter (before any training)",
        "step 'u' (negate) has no parameter 'lamm'; did you mean 'lam'?",
        cli("run", recipe_file(RECIPE), "--out", OUT, "--select", "u.lamm=0.5,1", "--holdout", "tofu-mini:retain")),
    Row("65", "recipe", "--select on a step that is not in the recipe", "no step 'unlearned'",
        cli("run", recipe_file(RECIPE), "--out", OUT, "--select", "unlearned.lam=0.5,1", "--holdout", "tofu-mini:retain")),
    Row("66", "CLI", "ask --questions naming a file that does not exist",
        "--questions 'qs.jsonl' looks like a file path, but there is no such file",
        cli("ask", "--questions", "qs.jsonl", "--base", TINY, "--quantization", "none")),
    Row("67", "API", "TOFU-mini retain rows outside the split", "selects none of the 400 retain rows",
        lambda t, tiny: lambda: tofu_mini_splits(splits=["retain"], retain_rows=slice(400, 500))),
    # scoped forgetting
    Row("68", "API", "scope file of another adapter (runtime.load(name, b, scope=a/scope.json))",
        "belongs to another adapter (weights sha256", scope_of_another_adapter),
    Row("69", "API", "scope fitted on another base (runtime.load(name, a, scope=True))",
        "was fitted on another base (other/tiny, this one is", scope_of_another_base),
    Row("70", "API", "strength \"auto\" for an adapter loaded without a scope (generate, resolve)",
        "adapter 'forget' has no scope, so its strength cannot be \"auto\"", auto_without_scope),
    Row("71", "API", "default \"auto\" for an adapter loaded without a scope",
        "the strength \"auto\" needs a scope, and none was given", default_auto_without_scope),
    Row("72", "CLI", "scope --threshold outside [0, 1]", "scope threshold must be a number in [0, 1]",
        cli("scope", A, "--forget", "tofu-mini:forget01", "--threshold", "1.5", "--base", TINY, "-q", "none")),
    Row("73", "CLI", "scope --fpr outside (0, 1)", "--fpr must be in (0, 1), e.g. 0.02, got 1.5",
        cli("scope", A, "--forget", "tofu-mini:forget01", "--calibrate", "tofu-mini:retain", "--fpr", "1.5",
            "--base", TINY, "-q", "none")),
    Row("74", "CLI", "eval --scoped with a truncated scope.safetensors",
        "(sha256 differs): the scope was replaced half-way or edited",
        cli("eval", "--out", OUT, "--scoped", "--adapter", damaged_scope(lambda f: _cut(f / SCOPE_TENSORS)),
            "--base", TINY, "-q", "none")),
    Row("75", "CLI", "eval --scoped with a scope.json that is a JSON array",
        'is not a lora-unlearn scope file (no "format": "lora_unlearn.scope")',
        cli("eval", "--out", OUT, "--scoped", "--adapter",
            damaged_scope(lambda f: (f / SCOPE_JSON).write_text("[1, 2]")), "--base", TINY, "-q", "none")),
]


def _without(folder: Path, name: str) -> Path:
    (folder / name).unlink()
    return folder


def _rewrite(folder: Path, name: str, text: str) -> Path:
    (folder / name).write_text(text)
    return folder


def _renamed(folder: Path, name: str) -> Path:
    return folder.rename(folder.with_name(name))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
            for p in sorted(root.rglob("*"))}


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("row", [pytest.param(r, id=f"{r.id}-{r.what}",
                                              marks=[pytest.mark.xfail(strict=True, reason=r.xfail)] if r.xfail else [])
                                 for r in ROWS])
def test_bad_input(row, tmp_path, tiny_model_dir, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # relative paths (data/x.jsonl, runs/...) stay inside the test folder
    (tmp_path / "work").mkdir(exist_ok=True)
    made = row.make(tmp_path, tiny_model_dir)
    before = snapshot(tmp_path)
    if callable(made):
        with pytest.raises(UserError) as e:
            made()
        message = str(e.value)
        assert "\n" not in message, message
    else:
        result = CliRunner().invoke(app, [str(a) for a in made])
        assert result.exit_code == 2, (result.output, result.exception)
        assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, result.output
        message = result.output
    assert row.expect in one_line(message), message
    assert snapshot(tmp_path) == before, "a bad input wrote or changed files"
    assert not (tmp_path / "PWNED").exists(), "code from the input ran"


def test_every_row_is_in_the_table():
    """docs/bad_inputs.md lists every row with the message fragment the test checks."""
    table = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit() and cells[1] != "server":  # the server's rows: its own tests
            table[cells[0]] = cells
    assert sorted(table, key=int) == [r.id for r in ROWS]
    for row in ROWS:
        assert row.where == table[row.id][1], row.id
        assert row.expect.replace("|", "\\|") in table[row.id][3].replace("`", ""), row.id


def test_pickle_is_read_with_the_flag_only(tmp_path):
    """With --allow-pickle a tensor-only adapter_model.bin is read (torch.load(weights_only=True),
    with a warning); the result equals the safetensors original."""
    original = load_adapter(adapter_dir(tmp_path, "orig"))
    folder = pickle_only(tmp_path)
    with pytest.warns(UserWarning, match=r"weights_only=True"):
        back = load_adapter(folder, allow_pickle=True)
    assert back.lineage["format"] == "pickle"
    for name, m in original.modules.items():
        assert torch.equal(back.modules[name].A, m.A) and torch.equal(back.modules[name].B, m.B)
    with pytest.warns(UserWarning, match=r"allow-pickle"):  # the CLI says so too
        result = CliRunner().invoke(app, ["--allow-pickle", "negate", str(folder), str(tmp_path / "neg")])
    assert result.exit_code == 0, result.output
    assert torch.equal(load_adapter(tmp_path / "neg").modules[Q].B, -original.modules[Q].B)


def test_pickle_checkpoint_is_read_with_the_flag_only(tmp_path, tiny_model_dir):
    """A model folder with only pytorch_model.bin loads with allow_pickle=True, to the same weights."""
    from lora_unlearn.core.fsutil import pickle_allowed
    from lora_unlearn.core.models import load_base

    folder = pickle_model(tmp_path, tiny_model_dir)
    with pytest.raises(UserError, match="only pickle weights"):
        load_base(str(folder), "none", device="cpu")
    want = load_file(tiny_model_dir / "model.safetensors")
    with pickle_allowed():
        model, _, _ = load_base(str(folder), "none", device="cpu")
    got = model.state_dict()
    assert set(want) <= set(got) and all(torch.equal(got[k], v) for k, v in want.items())


def test_remote_code_is_not_run(tmp_path, tiny_model_dir):
    """A model folder whose config points at its own code (auto_map) is refused by default and the
    code (here: it would write a file) does not run; trust_remote_code=True is the explicit yes."""
    from lora_unlearn.core.models import load_base

    folder = remote_code_model(tmp_path, tiny_model_dir)
    with pytest.raises(UserError, match="needs its own Python code"):
        load_base(str(folder), "none", device="cpu")
    assert not (tmp_path / "PWNED").exists()


def test_temp_names_are_recognised():
    from lora_unlearn.core.fsutil import is_leftover_name

    assert is_leftover_name(".out.tmp-123-abc_9") and is_leftover_name(".a.b.old-1-x")
    assert not is_leftover_name("out") and not is_leftover_name(".out.tmp-x-abc") and not is_leftover_name("a.tmp-1-b")


@pytest.mark.parametrize("args, message", [
    (["--merged", "--dtype", "bfloat16"], "--merged writes a float32 model: it takes no --for, --dtype or --max-rank"),
    ([], "say what to export: --merged (a full model), --for vllm (a servable adapter) or --dtype bfloat16"),
    (["--dtype", "int3"], "unknown dtype 'int3'. Available: bfloat16, float16, float32"),
    (["--for", "tgi"], "unknown server 'tgi'. Available: vllm, lorax"),
])
def test_export_bad_arguments_say_why(tmp_path, args, message):
    """Each refused export names its reason and the valid choices, not only exit code 2
    (tests/test_export.py's loop checks the code alone)."""
    folder = adapter_dir(tmp_path)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, ["export", str(folder), str(tmp_path / "x"), *args])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert message in one_line(result.output), result.output
    assert snapshot(tmp_path) == before


def test_ask_with_a_missing_question_file_says_it_looks_like_a_path(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["ask", "--questions", "data/q", "--base", str(tiny_model_dir)])
    assert result.exit_code == 2, result.output
    assert "--questions 'data/q' looks like a file path, but there is no such file" in one_line(result.output)
