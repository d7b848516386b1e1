"""Recipes: every shipped recipe validates and runs end to end on a tiny model; bad recipes fail early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lora_unlearn.cli import app
from lora_unlearn.core.adapter_io import load_adapter
from lora_unlearn.errors import UserError
from lora_unlearn.training.recipes import load_recipe
from lora_unlearn.training.runner import run_recipe

RECIPES = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml"))
NAMES = [p.stem for p in RECIPES]


def test_every_method_has_a_recipe():
    wanted = {"tv", "f_learning", "perta_grad", "perta_fisher", "perta_dense", "uipe_grad_ascent", "uipe_npo",
              "surgery", "grad_ascent", "grad_diff", "kl", "npo", "idk", "knowledge", "retain_only"}
    assert wanted <= set(NAMES)


@pytest.mark.parametrize("path", RECIPES, ids=NAMES)
def test_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem and recipe.description and recipe.reference


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    """The tiny nf4 model and a knowledge adapter trained on a few TOFU-mini rows with the knowledge recipe."""
    from lora_unlearn.core.models import load_base

    loaded = load_base(str(tiny_model_dir), "nf4")
    out = tmp_path_factory.mktemp("knowledge") / "run"
    recipe = load_recipe(RECIPES[NAMES.index("knowledge")], _shrink(RECIPES[NAMES.index("knowledge")], tiny_model_dir))
    run_recipe(recipe, out, loaded=loaded)
    return loaded, out / "adapter"


def _shrink(path: Path, model_dir, knowledge=None) -> list[str]:
    raw = yaml.safe_load(path.read_text())
    sets = [f"base.model={model_dir}", "train_defaults.max_steps=2", "train_defaults.batch_size=2",
            "train_defaults.max_length=512"]
    sets += [f"data.{name}.limit=3" for name in raw.get("data", {})]
    if knowledge and "knowledge" in raw.get("adapters", {}):
        sets.append(f"adapters.knowledge={knowledge}")
    return sets


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem != "knowledge"], ids=[n for n in NAMES if n != "knowledge"])
def test_recipe_runs_end_to_end_on_a_tiny_model(path, tiny, tiny_model_dir, tmp_path):
    loaded, knowledge = tiny
    recipe = load_recipe(path, _shrink(path, tiny_model_dir, knowledge))
    report = run_recipe(recipe, tmp_path / "run", loaded=loaded)
    result = load_adapter(tmp_path / "run" / "adapter")
    assert result.modules and [s["name"] for s in report["steps"]] == [s.name for s in recipe.steps]
    lineage = json.loads((tmp_path / "run" / "adapter" / "lora_unlearn.json").read_text())["lineage"]
    assert lineage["op"] in {"add", "negate", "extrapolate", "learn"}
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["name"] == recipe.name


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


BASE = """name: r
data: {forget: {source: "tofu-mini:forget01"}}
steps:
  - name: f
    train: {objective: nll, data: {train: forget}}
  - name: u
    op: {name: negate, inputs: [f], params: {lam: 1.0}}
output: u
"""


@pytest.mark.parametrize("edit, message", [
    (("steps:", "stepz: []\nsteps:"), "unknown key 'stepz'. Valid keys there: adapters, base, data, description"),
    (("train: {objective: nll,", "train: {objective: nll, epochz: 3,"), "unknown key 'steps.0.train.epochz'. Valid keys there: config, data, objective, over, params"),
    (("objective: nll", "objective: forgetful"), "Unknown objective 'forgetful'. Available:"),
    (("name: negate", "name: negative"), "steps.1.op.name"),
    (("data: {train: forget}", "data: {forget: forget}"), "needs the data stream(s) train"),
    (("inputs: [f]", "inputs: [g]"), "refers to 'g', which is not an input adapter or an earlier step. Available: f"),
    (("lam: 1.0", "lam: .nan"), "lam must be a finite number"),
    (("lam: 1.0", "lamda: 1.0"), "negate has no parameter lamda. Available: lam"),
    (("output: u", "output: nothing"), "output 'nothing' must name a step"),
    (("data: {train: forget}}", "data: {train: forgot}}"), "uses data 'forgot', not defined under data. Available: forget"),
])
def test_bad_recipes_fail_with_one_clear_line(tmp_path, edit, message):
    with pytest.raises(UserError) as e:
        load_recipe(_write(tmp_path, BASE.replace(*edit)))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_overrides_and_their_errors(tmp_path):
    path = _write(tmp_path, BASE)
    assert load_recipe(path, ["steps.1.op.params.lam=2.5"]).steps[1].op.params["lam"] == 2.5
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_recipe(path, ["lam"])
    with pytest.raises(UserError, match="lam must be a finite number"):
        load_recipe(path, ["steps.1.op.params.lam=inf"])
    with pytest.raises(UserError, match="is not a path into this recipe"):
        load_recipe(path, ["steps.9.op=1"])


def test_cli_run_bad_recipe_exits_2_and_writes_nothing(tmp_path):
    path = _write(tmp_path, BASE.replace("objective: nll", "objective: nope"))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Unknown objective 'nope'" in result.output
    assert not (tmp_path / "out").exists()
    missing = CliRunner().invoke(app, ["run", "recipes/tv.yaml", "--out", str(tmp_path / "out"),
                                       "--set", f"adapters.knowledge={tmp_path / 'nowhere'}"])
    assert missing.exit_code == 2 and "does not exist" in missing.output and not (tmp_path / "out").exists()
