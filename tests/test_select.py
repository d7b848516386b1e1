"""Coefficient selection: the rule, re-applying a run's arithmetic, and the sweep on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_unlearn.arithmetic import to_dense as dw
from lora_unlearn.core.adapter_io import load_adapter
from lora_unlearn.errors import UserError
from lora_unlearn.training.recipes import load_recipe
from lora_unlearn.training.runner import run_recipe
from lora_unlearn.training.select import RunArtifacts, choose, parse_target, parse_values, select_run
from lora_unlearn.training.sources import load_source

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def assert_close(got, want, atol):
    torch.testing.assert_close(got, want, atol=atol, rtol=0)


def _points(*triples):
    return [{"value": v, "forget_probability": f, "utility_drop": d} for v, f, d in triples]


def test_rule_picks_strongest_forgetting_within_budget():
    pts = _points((0.5, 0.6, 0.01), (1.0, 0.3, 0.04), (2.0, 0.1, 0.20))
    chosen, ok = choose(pts, 0.05)
    assert ok and chosen["value"] == 1.0
    chosen, ok = choose(pts, 0.25)
    assert ok and chosen["value"] == 2.0


def test_rule_ties_go_to_the_smaller_coefficient_and_no_budget_is_flagged():
    chosen, _ = choose(_points((2.0, 0.1, 0.0), (1.0, 0.1, 0.0)), 0.05)
    assert chosen["value"] == 1.0
    chosen, ok = choose(_points((1.0, 0.2, 0.3), (2.0, 0.1, 0.5)), 0.05)
    assert not ok and chosen["value"] == 1.0


def test_parsing_errors_are_clear():
    assert parse_target("unlearned.lam") == ("unlearned", "lam")
    assert parse_values("2, 0.5,1") == [0.5, 1.0, 2.0]
    with pytest.raises(UserError, match="STEP.PARAM"):
        parse_target("lam")
    with pytest.raises(UserError, match="comma-separated"):
        parse_values("1,x")
    with pytest.raises(UserError, match="finite"):
        parse_values("nan")


@pytest.fixture(scope="module")
def tv_run(tiny_model_dir, tmp_path_factory):
    from lora_unlearn.core.models import load_base

    loaded = load_base(str(tiny_model_dir), "nf4")
    base = tmp_path_factory.mktemp("select")
    small = [f"base.model={tiny_model_dir}", "train_defaults.max_steps=2", "train_defaults.batch_size=2"]
    run_recipe(load_recipe(RECIPES / "knowledge.yaml", small + ["data.all.limit=4"]), base / "k", loaded=loaded)
    knowledge = base / "k" / "adapter"
    run_recipe(load_recipe(RECIPES / "tv.yaml", small + ["data.forget.limit=4", f"adapters.knowledge={knowledge}"]),
               base / "tv", loaded=loaded)
    return loaded, base / "tv", knowledge


def test_adapter_at_recomputes_the_arithmetic(tv_run):
    _, run_dir, knowledge = tv_run
    run = RunArtifacts(run_dir)
    forget = load_adapter(run_dir / "steps" / "forget_adapter")
    k = load_adapter(knowledge)
    for lam in (0.0, 0.5, 2.0):
        got = dw(run.adapter_at("unlearned", "lam", lam))
        want_k, want_f = dw(k), dw(forget)
        for name in got:
            want = want_k.get(name, 0) - lam * want_f.get(name, torch.zeros_like(got[name]))
            assert_close(got[name], want, atol=1e-5)
    # lam=1 reproduces the run's own output
    out = dw(load_adapter(run_dir / "adapter"))
    again = dw(run.adapter_at("unlearned", "lam", 1.0))
    for name in out:
        assert_close(again[name], out[name], atol=1e-6)
    with pytest.raises(UserError, match="not an arithmetic op"):
        run.adapter_at("forget_adapter", "lam", 1.0)
    with pytest.raises(UserError, match="no step"):
        run.adapter_at("nope", "lam", 1.0)


def test_select_run_writes_the_sweep_and_the_chosen_adapter(tv_run):
    loaded, run_dir, _ = tv_run
    forget = load_source("tofu-mini:forget01")[:4]
    holdout = load_source("tofu-mini:retain")[-4:]
    result = select_run(run_dir, "unlearned.lam", [0.0, 1.0, 4.0], forget_rows=forget, holdout_rows=holdout,
                        budget=0.05, loaded=loaded, batch_size=4)
    assert [p["value"] for p in result["points"]] == [0.0, 1.0, 4.0]
    zero = result["points"][0]  # lam = 0 is the knowledge model itself: no drop, same forget probability
    assert abs(zero["utility_drop"]) < 1e-5
    assert abs(zero["forget_probability"] - result["reference"]["forget_probability"]) < 1e-5
    chosen, _ = choose(result["points"], 0.05)
    assert result["selected"] == chosen["value"]
    saved = json.loads((run_dir / "selection.json").read_text())
    assert saved["selected"] == result["selected"]
    want = dw(RunArtifacts(run_dir).adapter_at("unlearned", "lam", result["selected"]))
    got = dw(load_adapter(run_dir / "selected"))
    for name in want:
        assert_close(got[name], want[name], atol=1e-6)


def test_select_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="not a finished recipe run"):
        RunArtifacts(tmp_path)


def test_run_select_on_the_command_line(tv_run, tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from lora_unlearn.cli import app

    _, _, knowledge = tv_run
    out = tmp_path / "tv"
    args = ["run", str(RECIPES / "tv.yaml"), "--out", str(out), "--set", f"base.model={tiny_model_dir}",
            "--set", "train_defaults.max_steps=2", "--set", "train_defaults.batch_size=2",
            "--set", "data.forget.limit=4", "--set", f"adapters.knowledge={knowledge}",
            "--select", "unlearned.lam=0.5,1", "--holdout", "tofu-mini:retain", "--holdout-rows", "396:400"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    sweep = json.loads((out / "selection.json").read_text())
    assert [p["value"] for p in sweep["points"]] == [0.5, 1.0] and sweep["n_holdout"] == 4
    assert load_adapter(out / "selected").modules
    bad = CliRunner().invoke(app, args[:-4] + ["--select", "unlearned.lam"])
    assert bad.exit_code == 2 and "STEP.PARAM=V1,V2" in bad.output
    # A misspelled key stops before any training, names the fix, and writes nothing.
    typo = args[:-6] + ["--select", "unlearned.lamm=0.5,1"] + args[-4:]
    typo[typo.index("--out") + 1] = str(tmp_path / "typo")
    bad = CliRunner().invoke(app, typo)
    assert bad.exit_code == 2, bad.output
    assert "no parameter 'lamm'; did you mean 'lam'?" in " ".join(bad.output.split())
    assert not (tmp_path / "typo").exists() and not (tmp_path / "typo.partial").exists()
    bad = CliRunner().invoke(app, [a.replace("unlearned.lamm", "unlearnd.lam") for a in typo])
    assert bad.exit_code == 2 and "did you mean 'unlearned'?" in " ".join(bad.output.split())
    # A second selection does not replace the first without --overwrite.
    again = ["select", str(out), "--param", "unlearned.lam", "--values", "1,2", "--holdout", "tofu-mini:retain",
             "--holdout-rows", "396:400"]
    before = (out / "selected" / "adapter_model.safetensors").read_bytes()
    refused = CliRunner().invoke(app, again)
    assert refused.exit_code == 2 and "already exists" in refused.output and "--overwrite" in refused.output
    assert (out / "selected" / "adapter_model.safetensors").read_bytes() == before
    replaced = CliRunner().invoke(app, again + ["--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "selection.json").read_text())["points"][0]["value"] == 1.0


@pytest.fixture(scope="module")
def tv_snapshots(tv_run, tiny_model_dir, tmp_path_factory):
    """tv.yaml with its forget adapter kept after 1 and 2 of its 3 steps."""
    import yaml

    loaded, _, knowledge = tv_run
    base = tmp_path_factory.mktemp("snapshots")
    recipe = yaml.safe_load((RECIPES / "tv.yaml").read_text())
    recipe["steps"][0]["train"]["snapshots"] = [2, 1, 9]  # 9: past the end, kept by none
    (base / "tv.yaml").write_text(yaml.safe_dump(recipe))
    sets = [f"base.model={tiny_model_dir}", "train_defaults.max_steps=3", "train_defaults.batch_size=2",
            "data.forget.limit=4", f"adapters.knowledge={knowledge}"]
    report = run_recipe(load_recipe(base / "tv.yaml", sets), base / "tv", loaded=loaded)
    assert report["steps"][0]["snapshots"] == [1, 2]
    return loaded, base / "tv", knowledge


def test_a_length_sweep_reads_the_snapshots_and_redoes_the_arithmetic(tv_snapshots):
    """STEP.steps picks a snapshot of the trained adapter; every op after it is recomputed (here with lam
    held fixed beside it), and the full length is the run's own output."""
    _, run_dir, knowledge = tv_snapshots
    run = RunArtifacts(run_dir)
    k = dw(load_adapter(knowledge))
    for steps in (1, 2):
        forget = dw(load_adapter(run_dir / "snapshots" / "forget_adapter" / f"step-{steps}"))
        got = dw(run.adapter_with({"forget_adapter.steps": steps, "unlearned.lam": 0.5}))
        for name in got:
            assert_close(got[name], k.get(name, 0) - 0.5 * forget.get(name, torch.zeros_like(got[name])), atol=1e-5)
    forget = dw(load_adapter(run_dir / "snapshots" / "forget_adapter" / "step-1"))
    delta = dw(run.adapter_with({"forget_adapter.steps": 1, "unlearned.lam": 2.0}, output="unlearned"))
    for name in delta:  # an intermediate step's result: the negated snapshot alone, without K
        assert_close(delta[name], -2.0 * forget[name], atol=1e-5)
    one, two = (dw(run.adapter_at("forget_adapter", "steps", n)) for n in (1, 2))
    assert max((one[n] - two[n]).abs().max().item() for n in one) > 1e-5  # the lengths differ
    final = dw(load_adapter(run_dir / "adapter"))
    assert set(final) == set(two)
    with pytest.raises(UserError, match=r"no snapshot after 9 steps \(kept: 1, 2\)"):
        run.adapter_at("forget_adapter", "steps", 9)
    with pytest.raises(UserError, match=r"not an arithmetic op .* or forget_adapter.steps"):
        run.adapter_at("forget_adapter", "lam", 1.0)


def test_a_length_sweep_pools_with_a_lam_sweep_and_refuses_a_missing_snapshot_first(tv_snapshots):
    from lora_unlearn.training.select import sweep

    loaded, run_dir, _ = tv_snapshots
    model, tok, _ = loaded
    run = RunArtifacts(run_dir)
    forget, holdout = load_source("tofu-mini:forget01")[:4], load_source("tofu-mini:retain")[-4:]
    points = []
    for steps in (1, 2):
        result = sweep(model, tok, run, "unlearned.lam", [0.5, 1.0], forget_rows=forget, holdout_rows=holdout,
                       batch_size=4, fixed={"forget_adapter.steps": steps})
        points += result["points"]
    assert [p["fixed"] for p in points] == [{"forget_adapter.steps": s} for s in (1, 1, 2, 2)]
    assert len({round(p["forget_probability"], 6) for p in points}) == 4  # four different models
    progress = []
    with pytest.raises(UserError, match="no snapshot after 3 steps"):
        sweep(model, tok, run, "forget_adapter.steps", [1, 3], forget_rows=forget, holdout_rows=holdout,
              batch_size=4, progress=progress.append)
    assert progress == []  # refused before the first point was evaluated


def test_a_length_sweep_needs_snapshots(tv_run):
    _, run_dir, _ = tv_run
    with pytest.raises(UserError, match="kept no snapshots: add e.g. snapshots: \\[10, 20, 40\\]"):
        RunArtifacts(run_dir).adapter_at("forget_adapter", "steps", 1)


def test_held_out_rows_the_method_saw_are_refused_before_any_work(tv_run, tiny_model_dir, tmp_path):
    """Held-out rows that repeat the forget rows (select), or data a step trains on (run --select, before
    training): one line naming the row and where it also is; nothing written."""
    from typer.testing import CliRunner

    from lora_unlearn.cli import app

    loaded, run_dir, knowledge = tv_run
    forget = load_source("tofu-mini:forget01")[:4]
    with pytest.raises(UserError, match=r"held-out row 2 .* is also in the forget rows"):
        select_run(run_dir, "unlearned.lam", [1.0], forget_rows=forget,
                   holdout_rows=load_source("tofu-mini:retain")[-1:] + forget[1:2], loaded=loaded, overwrite=True)
    from lora_unlearn.training.select import check_holdout

    with pytest.raises(UserError, match="held-out rows are empty"):
        check_holdout(RunArtifacts(run_dir).recipe, [])
    out = tmp_path / "gd"
    args = ["run", str(RECIPES / "uipe_npo.yaml"), "--out", str(out), "--set", f"base.model={tiny_model_dir}",
            "--set", "train_defaults.max_steps=2", "--set", "data.forget.limit=4", "--set", "data.retain.limit=8",
            "--set", f"adapters.knowledge={knowledge}", "--select", "unlearned.alpha=0,1",
            "--holdout", "tofu-mini:retain", "--holdout-rows", "4:12"]
    bad = CliRunner().invoke(app, args)
    assert bad.exit_code == 2, bad.output
    assert "held-out row 1" in bad.output and "is also in the recipe's data 'retain'" in " ".join(bad.output.split())
    assert not out.exists() and not (tmp_path / "gd.partial").exists()
