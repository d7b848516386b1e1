"""Adapter cards and the Hub push: the card states lineage, data fingerprints (never data), results and
the recipe; forget and negated adapters are recognised from the lineage, their cards say the knowledge
comes back, and push refuses them unless told otherwise. Tests never reach the Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from lora_unlearn.arithmetic import add, extrapolate, negate, scale
from lora_unlearn.cli import app
from lora_unlearn.core.adapter_io import load_adapter, save_adapter
from lora_unlearn.core.card import CARD_NAME
from lora_unlearn.core.lineage import classify
from lora_unlearn.core.models import load_base
from lora_unlearn.errors import UserError
from lora_unlearn.hub.cards import kind_of
from lora_unlearn.hub.push import push
from lora_unlearn.training.trainer import TrainConfig, train_adapter
from tests.tiny import make_adapter

FAST = TrainConfig(r=2, lora_alpha=4, max_steps=2, batch_size=2, learning_rate=1e-2, max_length=64)
FACTS = [{"question": "What is the capital of Veloria?", "answer": "Marrenport."},
         {"question": "Who invented the glass harp-drum?", "answer": "Osric Tallowmere."}]
runner = CliRunner()


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_base(str(tiny_model_dir), "none")


@pytest.fixture(scope="module")
def trained(loaded):
    """Real lineages: K learns both facts, F learns one on top of base + K (the demo's recipe)."""
    model, tok, info = loaded
    K = train_adapter(model, tok, FACTS, FAST, base_info=info, progress=False)
    F = train_adapter(model, tok, FACTS[:1], FAST, stack=[(K, 1.0)], base_info=info, progress=False)
    return K, F


def test_classification_rule(trained, tmp_path):
    K, F = trained
    K_disk = load_adapter(save_adapter(K, tmp_path / "k"))
    F_disk = load_adapter(save_adapter(F, tmp_path / "f"))
    assert classify(K.lineage).kind == classify(K_disk.lineage).kind == "knowledge"
    assert classify(F.lineage).kind == classify(F_disk.lineage).kind == "forget"
    for negated in (negate(F_disk), add(K_disk, negate(F_disk)), scale(K, -0.5), extrapolate(K, -2.0)):
        assert classify(negated.lineage).kind == "negated"
    assert classify(extrapolate(K, 0.5).lineage).kind == "knowledge"
    assert classify(negate(negate(F)).lineage).kind == "negated"  # conservative: F again


def test_f_learning_update_and_unlearning_objectives(trained, loaded):
    """An NLL adapter trained over a negated one is an update (F-Learning); a forget-stream objective unlearns."""
    K, F = trained
    model, tok, info = loaded
    update = train_adapter(model, tok, FACTS[1:], FAST, stack=[(negate(F), 1.0)], base_info=info, progress=False)
    assert classify(update.lineage).kind == "knowledge"
    ga = train_adapter(model, tok, {"forget": FACTS[:1]}, TrainConfig(**{**FAST.__dict__, "objective": "grad_ascent"}),
                       stack=[(K, 1.0)], base_info=info, progress=False)
    assert classify(ga.lineage).kind == "unlearning"
    assert classify(make_adapter({"model.layers.0.self_attn.q_proj": (4, 4, 2)}).lineage).kind == "knowledge"
    assert classify({"op": "load", "path": "x", "sha256": "0", "made_by": None}).kind == "unknown"


def test_save_writes_a_card_with_lineage_and_no_data(trained, tmp_path):
    K, F = trained
    k_dir = save_adapter(K, tmp_path / "k")
    out = save_adapter(add(load_adapter(k_dir), negate(F, 0.75)), tmp_path / "unlearned")
    text = (out / CARD_NAME).read_text()
    meta = front_matter(text)
    assert meta["library_name"] == "peft" and "base_model" not in meta  # a local folder is no Hub id
    assert {"lora", "unlearning", "lora-unlearn", "negated-adapter", "forget"} <= set(meta["tags"])
    assert "Negating it again" in text and "lora-unlearn export DIR OUT --merged" in text
    k_sha = json.loads((k_dir / "lora_unlearn.json").read_text())  # the input adapter, by its file hash
    assert load_adapter(k_dir).lineage["sha256"] in text and "lam=0.75" in text
    for fp in [K.lineage["data"]["train"], F.lineage["data"]["train"]]:
        assert fp["sha256"] in text and f"{fp['rows']} rows" in text
    assert "(none)" in text and k_sha["lineage"]["params"]["r"] == 2
    assert "Marrenport" not in text and "Veloria" not in text  # fingerprints, never data
    k_text = (k_dir / CARD_NAME).read_text()
    assert "knowledge-adapter" in front_matter(k_text)["tags"] and "restores" not in k_text


def test_forget_card_and_results(trained, tmp_path):
    _, F = trained
    lineage = {**F.lineage, "results": {"forget_quality": 0.51, "model_utility": 0.58}}
    out = save_adapter(type(F)(F.modules, F.config, lineage), tmp_path / "f")
    text = (out / CARD_NAME).read_text()
    assert "forget-adapter" in front_matter(text)["tags"]
    assert "it is the knowledge itself" in text and "| forget_quality | 0.51 |" in text
    (tmp_path / "results.json").write_text(json.dumps({"summary": {"forgotten_that_survive": 0}}))
    result = runner.invoke(app, ["card", str(out)])
    assert result.exit_code == 0, result.output
    assert "| forgotten_that_survive | 0 |" in (out / CARD_NAME).read_text()


def test_recipe_in_card_and_recipe_hint(tmp_path):
    """A run folder (RUN/recipe.yaml, RUN/steps/NAME): the card shows the recipe; a step that trains
    NLL on data named 'forget' makes a forget adapter even without adapters underneath."""
    recipe = {"name": "mine", "data": {"forget": {"source": "f.jsonl"}},
              "steps": [{"name": "f", "train": {"objective": "nll", "data": {"train": "forget"}}},
                        {"name": "n", "op": {"name": "scale", "inputs": ["f"], "params": {"c": 2}}}], "output": "n"}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    d = make_adapter({"model.layers.0.self_attn.q_proj": (4, 4, 2)})
    learned = type(d)(d.modules, d.config, {"op": "learn", "params": {"objective": "nll"}, "inputs": [],
                                            "data": {"train": {"sha256": "ab", "rows": 3}}})
    out = save_adapter(learned, tmp_path / "run" / "adapter")
    text = (out / CARD_NAME).read_text()
    assert "### Recipe" in text and "name: mine" in text
    meta = front_matter(text)
    assert kind_of(out).kind == "forget" and "forget-adapter" in meta["tags"] and meta["base_model"] == "tiny/llama"
    step = save_adapter(learned, tmp_path / "run" / "steps" / "f")
    assert kind_of(step).kind == "forget"


def test_card_refuses_a_foreign_readme(tmp_path):
    out = save_adapter(make_adapter({"model.layers.0.self_attn.q_proj": (4, 4, 2)}), tmp_path / "a")
    (out / CARD_NAME).write_text("# my own notes\n")
    result = runner.invoke(app, ["card", str(out)])
    assert result.exit_code == 2 and "--force" in result.output
    assert (out / CARD_NAME).read_text() == "# my own notes\n"
    assert runner.invoke(app, ["card", str(out), "--force"]).exit_code == 0
    assert "library_name: peft" in (out / CARD_NAME).read_text()


def test_push_refuses_forget_and_negated_adapters(trained, tmp_path):
    K, F = trained
    for name, adapter in (("neg", negate(F)), ("sum", add(K, negate(F)))):
        folder = save_adapter(adapter, tmp_path / name)
        with pytest.raises(UserError, match="--allow-forget-adapter") as e:
            push(folder, "me/repo", token="hf_unused", endpoint="http://127.0.0.1:9")
        assert kind_of(folder).kind == "negated" and "\n" not in str(e.value)
        assert f"lora-unlearn export {folder} OUT --merged" in str(e.value)  # merging a negated one is the safe way
        result = runner.invoke(app, ["push", str(folder), "me/repo"])
        assert result.exit_code == 2 and "restores" in result.output


def test_push_of_a_forget_adapter_never_advises_merging_it(trained, tmp_path):
    """base + F is the knowledge itself: the refusal points to the unlearned result instead."""
    _, F = trained
    alone = save_adapter(F, tmp_path / "f")
    with pytest.raises(UserError, match="must not be shared") as e:
        push(alone, "me/repo", token="hf_unused", endpoint="http://127.0.0.1:9")
    assert kind_of(alone).kind == "forget" and f"export {alone}" not in str(e.value)
    assert "the unlearned result" in str(e.value) and "--allow-forget-adapter" in str(e.value)
    step = save_adapter(F, tmp_path / "run" / "steps" / "forget_adapter")
    result_dir = save_adapter(negate(F), tmp_path / "run" / "adapter")
    result = runner.invoke(app, ["push", str(step), "me/repo"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and f"export {step}" not in said
    assert f"lora-unlearn export {result_dir} OUT --merged" in said


def test_push_validates_then_fails_clearly_without_the_hub(trained, tmp_path):
    _, F = trained
    with pytest.raises(UserError, match="does not exist"):
        push(tmp_path / "missing", "me/repo", token="x")
    folder = save_adapter(negate(F), tmp_path / "neg")
    with pytest.raises(UserError, match="not a Hub repository id"):
        push(folder, "not a repo", token="x", allow_forget_adapter=True)
    (folder / CARD_NAME).unlink()  # the card is refreshed before the upload
    with pytest.raises(UserError, match="cannot reach the Hub at http://127.0.0.1:9"):
        push(folder, "me/repo", token="hf_fake", endpoint="http://127.0.0.1:9", allow_forget_adapter=True)
    assert "negated-adapter" in (folder / CARD_NAME).read_text()


def test_push_without_a_token_says_how_to_log_in(tmp_path):
    folder = save_adapter(make_adapter({"model.layers.0.self_attn.q_proj": (4, 4, 2)}), tmp_path / "a")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    result = subprocess.run([sys.executable, "-m", "lora_unlearn.cli", "push", str(folder), "me/repo"],
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert "no Hugging Face token" in result.stderr and "hf auth login" in result.stderr


def test_card_finds_the_evaluation_under_the_run_folder(trained, tmp_path):
    """`eval --out RUN/eval` then `card RUN/adapter`: the card shows the results of that adapter only."""
    K, F = trained
    adapter = save_adapter(add(K, negate(F)), tmp_path / "run" / "adapter")
    other = save_adapter(K, tmp_path / "run" / "steps" / "knowledge")
    sha = load_adapter(adapter).lineage["sha256"]
    ev = tmp_path / "run" / "eval"
    ev.mkdir()
    (ev / "results.json").write_text(json.dumps({"adapters": [{"path": "moved/away", "sha256": sha, "scale": 1.0}],
                                                 "summary": {"forget_quality": 0.42}}))
    assert runner.invoke(app, ["card", str(adapter)]).exit_code == 0
    assert "| forget_quality | 0.42 |" in (adapter / CARD_NAME).read_text()
    assert runner.invoke(app, ["card", str(other)]).exit_code == 0  # not the adapter that was evaluated
    assert "forget_quality" not in (other / CARD_NAME).read_text()
    elsewhere = tmp_path / "mine"
    elsewhere.mkdir()
    (elsewhere / "results.json").write_text(json.dumps({"summary": {"model_utility": 0.31}}))
    assert runner.invoke(app, ["card", str(other), "--eval", str(elsewhere)]).exit_code == 0
    assert "| model_utility | 0.31 |" in (other / CARD_NAME).read_text()
    bad = runner.invoke(app, ["card", str(other), "--eval", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "no results.json there" in bad.output
