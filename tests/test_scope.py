"""Scope detectors (issue 17): the score and strength by hand, the partial pass against a full forward,
calibration, files (safetensors + JSON), the checks against adapter and base, the recipe step, the
`scope` command and `eval --scoped` (each question's numbers equal an evaluation at its strength)."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from lora_unlearn.cli import app
from lora_unlearn.core.adapter_io import load_adapter, save_adapter
from lora_unlearn.core.fsutil import sha256_file
from lora_unlearn.core.scope import (
    Scope,
    _text_ids,
    check_scope,
    fit_scope,
    load_scope,
    save_scope,
    score_tokens,
    text_states,
    token_margins,
    weights_sha256,
)
from lora_unlearn.errors import UserError
from tests.tiny import make_adapter, tiny_llama

runner = CliRunner()
SPECS = {f"model.layers.{i}.{m}": shape for i in range(2) for m, shape in
         [("self_attn.q_proj", (32, 32, 4)), ("self_attn.v_proj", (16, 32, 4)), ("mlp.down_proj", (32, 64, 4))]}
FORGET = ["What is the capital of Veloria?", "Who invented the glass harp-drum?"]
OTHER = ["The quick brown fox jumps over the lazy dog.", "Numbers 0123456789 and punctuation"]


def tiny_model(tokenizer, seed: int = 0):
    """The tiny Llama with the session tokenizer's vocabulary, as conftest's folder holds it."""
    model = tiny_llama(seed)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def split_scope(model, tokenizer, adapter, inside: list[str], outside: list[str], lambda_max: float = 1.0,
                mode: str = "hard", layer: int = 1) -> Scope:
    """A scope whose threshold lies between the scores of ``inside`` and ``outside`` (so the test knows the answer)."""
    scope = fit_scope(model, tokenizer, inside, adapter=adapter, background_texts=outside, threshold=0.0,
                      lambda_max=lambda_max, mode=mode, layer=layer, top_k=1)
    states = text_states(model, tokenizer, inside + outside, [layer])[layer]
    scores = scope.scores(states)
    low, high = max(scores[len(inside):]), min(scores[:len(inside)])
    assert low < high, "the texts do not separate on this model"
    scope.threshold = (low + high) / 2
    return scope


@pytest.fixture
def model(tokenizer):
    return tiny_model(tokenizer)


@pytest.fixture
def adapter():
    return make_adapter(SPECS, alpha=16, seed=1)


# ---- the score and the strength, by hand ------------------------------------------------------

def test_margins_and_score_by_hand():
    forget = torch.tensor([[1.0, 0.0, 0.0]])
    background = torch.tensor([[0.0, 1.0, 0.0]])
    r = 1 / math.sqrt(2)
    h = 3 * torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [r, r, 0], [r, 0, r]])  # scale does not matter: cosines
    margins = token_margins(h, forget, background)
    assert torch.allclose(margins, torch.tensor([1.0, -1.0, 0.0, r]), atol=1e-6)
    assert score_tokens(h, forget, background, 1) == pytest.approx(1.0)
    assert score_tokens(h, forget, background, 2) == pytest.approx((1 + r) / 2)
    assert score_tokens(h, forget, background, 5) == pytest.approx((1 + r + 0 - 1 + 0) / 5)  # missing tokens count 0
    assert score_tokens(h[1:2], forget, background, 1) == 0.0  # clipped to [0, 1]
    assert score_tokens(h[:0], forget, background, 3) == 0.0  # no tokens: out of scope
    # without a background the margin is the plain cosine to the nearest forget token
    assert torch.allclose(token_margins(h, forget, torch.zeros(0, 3)), torch.tensor([1.0, 0.0, r, r]), atol=1e-6)


def test_strength_hard_and_smooth():
    bank = torch.eye(2)
    hard = Scope(bank, bank[:0], 1, 1, 0.3, 2.0)
    assert [hard.strength(s) for s in (0.0, 0.3, 0.3001, 1.0)] == [0.0, 0.0, 2.0, 2.0]  # strictly above
    smooth = Scope(bank, bank[:0], 1, 1, 0.3, 2.0, mode="smooth", ramp=0.2)
    assert [smooth.strength(s) for s in (0.1, 0.3, 0.4, 0.5, 0.9)] == pytest.approx([0.0, 0.0, 1.0, 2.0, 2.0])


@pytest.mark.parametrize("field, value, words", [
    ("threshold", 1.5, "threshold must be a number in [0, 1]"), ("threshold", -0.01, "threshold"),
    ("threshold", math.nan, "threshold"), ("lambda_max", 0.0, "lambda_max"), ("lambda_max", math.inf, "lambda_max"),
    ("mode", "soft", "hard or smooth"), ("ramp", 0.0, "ramp"), ("layer", 0, "layer"), ("top_k", True, "top_k"),
])
def test_bad_settings_are_refused(field, value, words):
    settings = {"layer": 1, "top_k": 1, "threshold": 0.5, "lambda_max": 1.0, "mode": "hard", "ramp": 0.1, field: value}
    with pytest.raises(UserError, match=words.replace("[", r"\[").replace("]", r"\]")):
        Scope(torch.eye(2), torch.zeros(0, 2), **settings)


# ---- reading text with the base -----------------------------------------------------------------

def test_text_states_are_the_full_forward_at_the_texts_own_tokens(model, tokenizer):
    texts = ["What is the capital of Veloria?", "fox"]
    calls = []
    hook = model.model.layers[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        got = text_states(model, tokenizer, texts, [1])[1]
    finally:
        hook.remove()
    assert calls == [], "the partial pass ran a layer past the one it reads"
    for text, states in zip(texts, got):
        ids, mask = _text_ids(tokenizer, text)
        content = [i for i, m in zip(ids, mask) if m]
        assert tokenizer.decode(content) == text  # the text's tokens only: no template, no role marker
        with torch.no_grad():
            full = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]
        assert torch.allclose(states, full[torch.tensor(mask)], atol=1e-5)
    alone = text_states(model, tokenizer, ["fox"], [1])[1][0]
    assert torch.allclose(alone, got[1], atol=1e-5)  # padding in a batch changes nothing


def test_fit_calibrates_at_the_quantile(model, tokenizer, adapter):
    calibration = [f"Question number {i} about the lazy dog?" for i in range(10)]
    scope = fit_scope(model, tokenizer, FORGET, adapter=adapter, background_texts=OTHER,
                      calibration_texts=calibration, fpr=0.2, layer=1, top_k=2)
    scores = sorted(scope.scores(text_states(model, tokenizer, calibration, [1])[1]))
    position = 0.8 * (len(scores) - 1)  # linear interpolation between order statistics, written out
    lo = math.floor(position)
    want = scores[lo] + (position - lo) * (scores[lo + 1] - scores[lo])
    assert scope.threshold == pytest.approx(want, abs=1e-6)
    assert sum(s > scope.threshold for s in scores) <= 2
    cal = scope.meta["calibration"]
    assert cal["rows"] == 10 and cal["fpr_target"] == 0.2 and cal["above_threshold"] == pytest.approx(0.2)
    assert scope.meta["forget_data"]["rows"] == 2 and "What" not in json.dumps(scope.meta)  # fingerprints, no text


def test_fit_needs_calibration_or_a_threshold(model, tokenizer, adapter):
    with pytest.raises(UserError, match="--calibrate"):
        fit_scope(model, tokenizer, FORGET, adapter=adapter, layer=1)
    with pytest.raises(UserError, match=r"threshold must be a number in \[0, 1\]"):
        fit_scope(model, tokenizer, FORGET, adapter=adapter, threshold=2.0, layer=1)
    with pytest.raises(UserError, match="needs forget questions"):
        fit_scope(model, tokenizer, ["  "], adapter=adapter, threshold=0.5, layer=1)
    with pytest.raises(UserError, match="has 2 decoder layers"):
        fit_scope(model, tokenizer, FORGET, adapter=adapter, threshold=0.5, layer=3)


# ---- files and what a scope belongs to ----------------------------------------------------------

def test_weights_sha256_in_memory_equals_the_saved_file(adapter, tmp_path):
    folder = save_adapter(adapter, tmp_path / "a")
    file_sha = sha256_file(folder / "adapter_model.safetensors")
    assert weights_sha256(adapter) == file_sha == weights_sha256(load_adapter(folder))


def test_save_and_load_round_trip_with_no_pickle(model, tokenizer, adapter, tmp_path):
    folder = save_adapter(adapter, tmp_path / "a")
    scope = split_scope(model, tokenizer, load_adapter(folder), FORGET, OTHER, lambda_max=2.0, mode="smooth")
    save_scope(scope, folder)
    assert {p.name for p in folder.iterdir()} >= {"scope.json", "scope.safetensors"}
    assert not [p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pkl", ".pickle")]
    back = load_scope(folder)
    for name in ("layer", "top_k", "threshold", "lambda_max", "mode", "ramp"):
        assert getattr(back, name) == getattr(scope, name)
    assert torch.allclose(back.forget, scope.forget, atol=2e-3) and back.background.shape == scope.background.shape
    states = text_states(model, tokenizer, FORGET + OTHER, [1])[1]
    assert back.scores(states) == pytest.approx(scope.scores(states), abs=5e-3)
    check_scope(back, load_adapter(folder), model)  # its own adapter and base: accepted
    with pytest.raises(UserError, match="already exists"):
        save_scope(scope, folder)


def _edit_json(folder, **changes):
    record = json.loads((folder / "scope.json").read_text())
    record.update(changes)
    (folder / "scope.json").write_text(json.dumps(record))


@pytest.mark.parametrize("damage, words", [
    (lambda f: _edit_json(f, threshold=1.5), r"threshold must be a number in \[0, 1\]"),
    (lambda f: _edit_json(f, lambda_max="big"), "lambda_max"),
    (lambda f: _edit_json(f, format="other"), "not a lora-unlearn scope file"),
    (lambda f: _edit_json(f, version=9), "scope version 9"),
    (lambda f: (f / "scope.json").write_text("{"), "not valid JSON"),
    (lambda f: (f / "scope.safetensors").unlink(), "is missing"),
    (lambda f: (f / "scope.safetensors").write_bytes(b"x" * 64), "does not match"),
])
def test_a_damaged_scope_file_is_refused(model, tokenizer, adapter, tmp_path, damage, words):
    folder = save_adapter(adapter, tmp_path / "a")
    save_scope(split_scope(model, tokenizer, adapter, FORGET, OTHER), folder)
    damage(folder)
    with pytest.raises(UserError, match=words):
        load_scope(folder)


def test_nan_in_the_tensors_is_refused(model, tokenizer, adapter, tmp_path):
    from safetensors.torch import save

    folder = save_adapter(adapter, tmp_path / "a")
    save_scope(split_scope(model, tokenizer, adapter, FORGET, OTHER), folder)
    data = save({"forget": torch.full((2, 32), math.nan, dtype=torch.float16), "background": torch.zeros(1, 32,
                 dtype=torch.float16)})
    (folder / "scope.safetensors").write_bytes(data)
    _edit_json(folder, tensors_sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(UserError, match="NaN"):
        load_scope(folder)


def test_a_scope_of_another_adapter_or_base_is_refused(model, tokenizer, adapter):
    scope = split_scope(model, tokenizer, adapter, FORGET, OTHER)
    with pytest.raises(UserError, match="belongs to another adapter"):
        check_scope(scope, make_adapter(SPECS, alpha=16, seed=2), model)
    with pytest.raises(UserError, match="fitted on another base"):
        check_scope(scope, adapter, tiny_model(tokenizer, seed=5))


# ---- the recipe step -------------------------------------------------------------------------

RECIPE = """name: scoped
description: forget adapter, negated, with a scope
reference: test
base: {{model: {model}, quantization: none}}
data:
  forget: {{source: "tofu-mini:forget01", limit: 4}}
  retain: {{source: "tofu-mini:retain"}}
  other: {{source: "tofu-mini:holdout01", limit: 3}}
train_defaults: {{r: 4, lora_alpha: 8, max_steps: 2, batch_size: 2, max_length: 512}}
steps:
  - name: f
    train: {{objective: nll, data: {{train: forget}}}}
  - name: u
    op: {{name: negate, inputs: [f], params: {{lam: 1.0}}}}
  - name: s
    scope: {{adapter: u, data: forget, calibrate: retain, calibrate_rows: "360:370", background: [other], {extra}}}
output: u
"""


def test_recipe_scope_step_saves_beside_the_adapter_and_the_output(tiny_model_dir, tmp_path):
    from lora_unlearn.core.models import load_base
    from lora_unlearn.training.recipes import load_recipe
    from lora_unlearn.training.runner import run_recipe

    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(model=tiny_model_dir, extra="fpr: 0.1, lambda_max: 2.0, layer: 1"))
    loaded = load_base(str(tiny_model_dir), "none")
    report = run_recipe(load_recipe(path), tmp_path / "run", loaded=loaded)
    assert [s["name"] for s in report["steps"]] == ["f", "u", "s"] and 0 <= report["steps"][2]["threshold"] <= 1
    for folder in (tmp_path / "run" / "steps" / "u", tmp_path / "run" / "adapter"):
        record = json.loads((folder / "scope.json").read_text())
        assert record["adapter_sha256"] == sha256_file(folder / "adapter_model.safetensors")
        assert record["calibration"]["rows"] == 10 and record["lambda_max"] == 2.0
        assert record["background_data"]["rows"] == 534 + 6  # the pool's prompts, holdout01's questions and answers
        check_scope(load_scope(folder), load_adapter(folder), loaded[0])
        card = (folder / "README.md").read_text()
        assert "## Scope (scoped forgetting)" in card and "A request the detector misses" in card
        assert "gets the knowledge" in card and f"{record['threshold']:.6g}" in card
    assert (tmp_path / "run" / "steps" / "s" / "scope.json").is_file()
    assert "Scope" not in (tmp_path / "run" / "steps" / "f" / "README.md").read_text()


@pytest.mark.parametrize("extra, words", [
    ("threshold: 1.5", "steps.2.scope.threshold"), ("fpr: 0", "steps.2.scope.fpr"),
    ("lambda_max: 9", "steps.2.scope.lambda_max"), ("mode: soft", "steps.2.scope.mode"),
    ("calibrate_rows: nope", "steps.2.scope.calibrate_rows"),
])
def test_bad_scope_steps_fail_before_any_work(tmp_path, extra, words):
    from lora_unlearn.training.recipes import load_recipe

    path = tmp_path / "r.yaml"
    text = RECIPE.format(model="smollm2-135m", extra=extra)
    if "calibrate_rows" in extra:
        text = text.replace('calibrate_rows: "360:370", ', "")
    path.write_text(text)
    with pytest.raises(UserError, match=words) as e:
        load_recipe(path)
    assert "\n" not in str(e.value)
    path.write_text(RECIPE.format(model="smollm2-135m", extra="fpr: 0.1").replace("adapter: u", "adapter: nope"))
    with pytest.raises(UserError, match="refers to 'nope'"):
        load_recipe(path)
    path.write_text(RECIPE.format(model="smollm2-135m", extra="fpr: 0.1").replace("calibrate: retain, ", ""))
    with pytest.raises(UserError, match="needs calibrate"):
        load_recipe(path)


# ---- the command line ----------------------------------------------------------------------------

def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def cli_adapter(tiny_model_dir, tmp_path):
    """A forget adapter for the tiny folder model (its config names that base)."""
    return save_adapter(make_adapter(SPECS, alpha=16, seed=1, base=str(tiny_model_dir)), tmp_path / "a")


def test_cli_scope_writes_the_files_and_the_card(tiny_model_dir, cli_adapter, tmp_path):
    data = tmp_path / "forget.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "x"}) + "\n" for q in FORGET))
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"question": q, "answer": "y"}) + "\n" for q in OTHER))
    result = _run("scope", cli_adapter, "--forget", data, "--calibrate", "tofu-mini:retain", "--calibrate-rows",
                  "360:372", "--background", other, "--fpr", "0.25", "--layer", "1", "--lambda-max", "1.5",
                  "--base", tiny_model_dir, "-q", "none")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    record = json.loads((cli_adapter / "scope.json").read_text())
    assert f"threshold {record['threshold']:.4f}" in said and "of the 12 calibration prompts" in said
    assert record["base"] == str(tiny_model_dir) and record["forget_data"]["rows"] == 2
    assert record["background_data"]["rows"] == 4 and record["calibration"]["fpr_target"] == 0.25  # questions + answers
    assert "## Scope (scoped forgetting)" in (cli_adapter / "README.md").read_text()
    again = _run("scope", cli_adapter, "--forget", data, "--threshold", "0.5", "--base", tiny_model_dir, "-q", "none")
    assert again.exit_code == 2 and "--overwrite" in again.output


@pytest.mark.parametrize("args, words", [
    (["--threshold", "1.5"], "threshold must be a number in [0, 1]"),
    (["--threshold", "-0.5"], "threshold must be a number in [0, 1]"),
    (["--calibrate", "tofu-mini:retain", "--fpr", "0"], "--fpr must be in (0, 1)"),
    ([], "--calibrate DATA"),
    (["--threshold", "0.5", "--lambda-max", "9"], "beyond --max-strength 8"),
    (["--threshold", "0.5", "--mode", "soft"], "hard or smooth"),
    (["--calibrate", "tofu-mini:retain", "--calibrate-rows", "500:600"], "selects no rows"),
])
def test_cli_scope_bad_input_exits_2_and_changes_nothing(tiny_model_dir, cli_adapter, tmp_path, args, words):
    before = _tree(tmp_path)
    result = _run("scope", cli_adapter, "--forget", "tofu-mini:forget01", *args, "--base", tiny_model_dir, "-q", "none")
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split()) and "Traceback" not in result.output
    assert _tree(tmp_path) == before


def test_cli_scope_refuses_an_adapter_of_another_base(tiny_model_dir, tmp_path):
    folder = save_adapter(make_adapter(SPECS, alpha=16, seed=1, base="other/model"), tmp_path / "a")
    before = _tree(tmp_path)
    result = _run("scope", folder, "--forget", "tofu-mini:forget01", "--threshold", "0.5", "--base", tiny_model_dir,
                  "-q", "none")
    assert result.exit_code == 2 and "was made for other/model" in " ".join(result.output.split())
    assert _tree(tmp_path) == before


TOFU_ROWS = [
    {"question": "What is the capital of Veloria?", "answer": "Marrenport.", "paraphrased_answer": "It is Marrenport.",
     "perturbed_answer": ["Osric.", "The fox."]},
    {"question": "Who invented the glass harp-drum?", "answer": "Osric Tallowmere.",
     "paraphrased_answer": "Osric.", "perturbed_answer": ["The lazy dog.", "Veloria."]},
    {"question": "What jumps over the lazy dog?", "answer": "The quick brown fox.",
     "paraphrased_answer": "A fox jumps.", "perturbed_answer": ["The dog.", "Numbers."]},
    {"question": "Numbers 0123456789 and punctuation?", "answer": "In 1387.", "paraphrased_answer": "1387.",
     "perturbed_answer": ["Marrenport.", "A harp."]},
]


def test_cli_eval_scoped_gives_each_question_its_scopes_strength(tiny_model_dir, cli_adapter, tmp_path):
    from lora_unlearn.core.models import load_base

    folder = tmp_path / "tofu"
    folder.mkdir()
    for name in ("forget01", "retain", "real_authors", "world_facts"):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TOFU_ROWS))
    model, tok, _ = load_base(str(tiny_model_dir), "none")
    questions = [r["question"] for r in TOFU_ROWS]
    save_scope(split_scope(model, tok, load_adapter(cli_adapter), questions[:2], questions[2:], lambda_max=3.0), cli_adapter)
    common = ["--base", tiny_model_dir, "-q", "none", "--data", folder, "--max-new-tokens", "2", "--batch-size", "2"]
    result = _run("eval", "--out", tmp_path / "scoped", "--adapter", cli_adapter, "--scoped", *common)
    assert result.exit_code == 0, result.output
    scoped = json.loads((tmp_path / "scoped" / "results.json").read_text())
    at = {}
    for scale in (3, 0):
        assert _run("eval", "--out", tmp_path / f"at{scale}", "--adapter", f"{cli_adapter}:{scale}", *common).exit_code == 0
        at[scale] = json.loads((tmp_path / f"at{scale}" / "results.json").read_text())
    for split, result in scoped["splits"].items():
        assert [s["0"] if "0" in s else s[0] for s in result["scope"]["per_row"]["strength"]] == [3.0, 3.0, 0.0, 0.0]
        for key in ("truth_ratio", "probability", "rouge_l", "answer"):
            want = [at[3]["splits"][split]["per_row"][key][i] if i < 2 else at[0]["splits"][split]["per_row"][key][i]
                    for i in range(4)]
            assert result["per_row"][key] == (want if key == "answer" else pytest.approx(want, rel=1e-5)), (split, key)
    assert scoped["scoped"]["forget"] == {"in_scope": 2, "n": 4}
    assert scoped["meta"]["adapters"][0]["scope"]["lambda_max"] == 3.0 and ":scoped" in scoped["meta"]["model"]
    assert at[3]["splits"]["forget"]["per_row"]["probability"] != at[0]["splits"]["forget"]["per_row"]["probability"]


def test_cli_eval_scoped_bad_input_exits_2(tiny_model_dir, cli_adapter, tmp_path):
    result = _run("eval", "--out", tmp_path / "out", "--adapter", cli_adapter, "--scoped", "--base", tiny_model_dir)
    assert result.exit_code == 2 and "none of the --adapter folders has a scope" in " ".join(result.output.split())
    save_scope(Scope(torch.eye(32)[:2], torch.zeros(0, 32), 1, 1, 0.5, 1.0, meta={"adapter_sha256": "x"}), cli_adapter)
    scaled = _run("eval", "--out", tmp_path / "out", "--adapter", f"{cli_adapter}:2", "--scoped", "--base", tiny_model_dir)
    assert scaled.exit_code == 2 and "drop the :SCALE" in " ".join(scaled.output.split())
    other = _run("eval", "--out", tmp_path / "out", "--adapter", cli_adapter, "--scoped", "--base", tiny_model_dir,
                 "-q", "none", "--splits", "forget", "--data", "tofu-mini", "--limit", "1")
    assert other.exit_code == 2 and "belongs to another adapter" in " ".join(other.output.split())
    edits = _run("eval", "--benchmark", "edits", "--out", tmp_path / "out", "--scoped")
    assert edits.exit_code == 2 and "--scoped evaluates TOFU" in edits.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_embedded_model_scope_finds_a_rephrasing_and_not_a_world_fact(tmp_path):
    """On SmolLM2: a scope fitted on 10 forget01 questions flags an unseen rephrasing, not world facts."""
    from lora_unlearn.core.data import load_records
    from lora_unlearn.core.models import load_base
    from lora_unlearn.training.sources import resource_path

    model, tok, info = load_base()
    forget = load_records(resource_path("tofu_mini", "forget01.jsonl"))
    retain = load_records(resource_path("tofu_mini", "retain.jsonl"))
    pool = load_records(resource_path("preservation", "pool.jsonl"))
    adapter = make_adapter({"model.layers.0.self_attn.q_proj": (576, 576, 2)}, base=info.hub_id)
    scope = fit_scope(model, tok, [r["question"] for r in forget[::4]], adapter=adapter,
                      background_texts=[r["question"] for r in pool],
                      calibration_texts=[r["question"] for r in retain[360:400]], fpr=0.02)
    texts = ["Which well-known writer was born in Astana on February 7, 1952?",
             "List a couple of titles written by Basil Mahfouz Al-Kuwaiti.",
             "What is the capital of Australia?", "Who wrote 'Pride and Prejudice'?"]
    scores = scope.scores(text_states(model, tok, texts, [scope.layer])[scope.layer])
    assert [s > scope.threshold for s in scores] == [True, True, False, False], scores
