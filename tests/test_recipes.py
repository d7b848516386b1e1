"""Recipes: every shipped recipe validates and runs end to end on a tiny model; bad recipes fail early."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lora_unlearn.cli import app
from lora_unlearn.core.adapter_io import load_adapter
from lora_unlearn.errors import UserError
from lora_unlearn.training.importance import load_importance
from lora_unlearn.training.recipes import load_recipe, split_ref
from lora_unlearn.training.runner import run_recipe
from tests.tiny import assert_close, dw

RECIPES = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml"))
NAMES = [p.stem for p in RECIPES]


def test_every_method_has_a_recipe():
    wanted = {"tv", "f_learning", "perta_grad", "perta_fisher", "perta_dense", "uipe_grad_ascent", "uipe_npo",
              "surgery", "grad_ascent", "grad_diff", "kl", "npo", "simnpo", "rmu", "idk", "knowledge", "retain_only"}
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
    # the result's dW is the recipe's formula applied to what was trained (and each op step on the way)
    want = expected_deltas(recipe, tmp_path / "run")
    for step in recipe.steps:
        if step.op:
            got = _dense(load_adapter(tmp_path / "run" / "steps" / step.name))
            assert got.keys() == want[step.name].keys(), step.name
            for name, delta in want[step.name].items():
                assert_close(got[name], delta, rtol=1e-4)
    final = _dense(result)
    assert final.keys() == want[recipe.output].keys()
    for name, delta in want[recipe.output].items():
        assert_close(final[name], delta, rtol=1e-4)
    # and the formula is not vacuous: every trained adapter moved away from zero
    assert all(max(float(d.abs().max()) for d in want[s.name].values()) > 0 for s in recipe.steps if s.train)


def _dense(adapter) -> dict:
    return {name: dw(m) for name, m in adapter.modules.items()}


def _sum(terms: list[tuple[float, dict]]) -> dict:
    out: dict = {}
    for c, d in terms:
        for name, delta in d.items():
            out[name] = out.get(name, 0) + c * delta
    return out


def _best_rank(delta, k):
    """Eckart-Young: the rank-k truncated SVD, computed here."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def expected_deltas(recipe, run: Path) -> dict[str, dict]:
    """Each step's dW by the recipe's formula (DESIGN section 2 and 3), written out here.

    Leaves are the input adapters and the trained steps (their saved folders); every op step is
    computed from its inputs' *expected* dW, never from the library's intermediate results, so the
    final adapter is checked against the whole chain (e.g. tv: dW_K - lam dW_F).
    """
    factors = {name: load_adapter(path) for name, path in recipe.adapters.items()}
    want: dict[str, dict] = {name: _dense(a) for name, a in factors.items()}
    for step in recipe.steps:
        folder = run / "steps" / step.name
        if step.train:
            factors[step.name] = load_adapter(folder)
            want[step.name] = _dense(factors[step.name])
            continue
        if step.importance:
            want[step.name] = load_importance(folder / "importance.safetensors")[0]
            continue
        op, p = step.op, step.op.params
        refs = [split_ref(r) for r in op.inputs]
        if op.name in ("negate", "scale", "extrapolate"):
            c = {"negate": -p.get("lam", 1.0), "scale": p.get("c", 1.0), "extrapolate": 1 + p.get("alpha", 0.0)}[op.name]
            want[step.name] = _sum([(c, want[refs[0][0]])])
        elif op.name == "add":
            want[step.name] = _sum([(scale, want[name]) for name, scale in refs])
        elif op.name in ("perta_b", "perta_dense"):
            tau, I_f, I_r = (want[name] for name, _ in refs)
            beta, eps, q = p.get("beta", 1.0), p.get("eps", 1e-8), p.get("p", 1.0)

            def w(n):  # w = I_f^p / (I_f^p + beta I_r^p + eps)
                return I_f[n].double() ** q / (I_f[n].double() ** q + beta * I_r[n].double() ** q + eps)

            adapter = factors[refs[0][0]]
            if op.name == "perta_b":  # (w (.) U S) V^T in the SVD gauge of dW = U S V^T (signs cancel out)
                svd = {n: torch.linalg.svd(tau[n], full_matrices=False) for n in tau}
                want[step.name] = {n: (w(n) * (u[:, :k] * s[:k])) @ vh[:k]
                                   for n, (u, s, vh) in svd.items() for k in [adapter.modules[n].rank]}
            else:  # w (.) dW, then the best rank-r' approximation
                want[step.name] = {n: _best_rank(w(n) * tau[n], p["rank"]) for n in tau}
            factors[step.name] = load_adapter(folder)
        else:
            raise AssertionError(f"no formula written for op {op.name}: add one here")
    return want


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


HALFWAY = """name: halfway
description: a step that fails after a finished one
reference: test
data: {forget: {source: "tofu-mini:forget01", limit: 3}}
train_defaults: {r: 4, lora_alpha: 8, max_steps: 2, batch_size: 2, max_length: 512}
steps:
  - name: f
    train: {objective: nll, data: {train: forget}}
  - name: c
    op: {name: compress, inputs: [f], params: {rank: 99}}
output: c
"""


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_a_step_failing_halfway_writes_nothing_half_done(tiny, tiny_model_dir, tmp_path):
    """Step 2 of 2 fails at run time (rank 99 > the layers' rank): OUT is not replaced (its old content
    stays byte for byte), OUT.partial holds only the finished step, complete. A resume with other
    settings is refused without touching it; a resume of the same recipe reads the step back
    (not retrained) and fails the same way; after deleting OUT.partial the fixed recipe runs."""
    loaded, _ = tiny
    path = _write(tmp_path, HALFWAY)
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("the previous result")
    sets = [f"base.model={tiny_model_dir}"]
    failing, fixed = load_recipe(path, sets), load_recipe(path, sets + ["steps.1.op.params.rank=2"])
    with pytest.raises(UserError, match="between 1 and"):
        run_recipe(failing, out, overwrite=True, loaded=loaded, checkpoint_every=0)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"] and (out / "old.txt").read_text() == "the previous result"
    partial = tmp_path / "run.partial"
    assert sorted(p.name for p in (partial / "steps").iterdir()) == ["f"]
    assert not (partial / "adapter").exists() and not (partial / "run.json").exists()
    assert [s["name"] for s in json.loads((partial / "progress.json").read_text())] == ["f"]
    trained = load_adapter(partial / "steps" / "f")  # complete: it loads
    assert trained.modules and all(m.rank == 4 for m in trained.modules.values())

    before = _tree(partial)
    with pytest.raises(UserError, match="belong to a different run"):
        run_recipe(fixed, out, overwrite=True, loaded=loaded, resume=True, checkpoint_every=0)
    assert _tree(partial) == before
    with pytest.raises(UserError, match="between 1 and"):
        run_recipe(failing, out, overwrite=True, loaded=loaded, resume=True, checkpoint_every=0)
    after = _tree(partial)
    assert {k: v for k, v in after.items() if k.startswith("steps")} == \
        {k: v for k, v in before.items() if k.startswith("steps")}  # read back, not retrained
    assert (out / "old.txt").read_text() == "the previous result"

    shutil.rmtree(partial)
    run_recipe(fixed, out, overwrite=True, loaded=loaded, checkpoint_every=0)
    assert not partial.exists() and not (out / "old.txt").exists()
    result, trained = load_adapter(out / "adapter"), load_adapter(out / "steps" / "f")
    for name, m in trained.modules.items():  # Eckart-Young, by SVD here
        u, sv, vh = torch.linalg.svd(dw(m), full_matrices=False)
        assert_close(dw(result.modules[name]), (u[:, :2] * sv[:2]) @ vh[:2], rtol=1e-4)


def test_a_data_entry_kept_clear_of_an_evaluation_set():
    """clear_of drops the rows that repeat or mention what the named sources ask about, and only those."""
    from lora_unlearn.training.preservation import check_pool
    from lora_unlearn.training.recipes import DataEntry
    from lora_unlearn.training.runner import _rows
    from lora_unlearn.training.sources import load_source

    pool = load_source("preservation")
    world = load_source("tofu-mini:world_facts")
    with pytest.raises(UserError, match="overlaps"):
        check_pool(pool, world, what="world facts")
    kept = _rows(DataEntry(source="preservation", clear_of=["tofu-mini:world_facts"]), None)
    check_pool(kept, world, what="world facts")  # nothing left that mentions them
    assert 0 < len(pool) - len(kept) < 0.2 * len(pool) and all(row in pool for row in kept)
    with pytest.raises(UserError):
        _rows(DataEntry(source="preservation", clear_of=["no-such-file.jsonl"]), None)
