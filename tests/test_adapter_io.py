"""Reading and writing PEFT adapter folders: roundtrips keep products and lineage; bad folders
are refused with a UserError that names the problem; a failed save leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_unlearn.arithmetic import add, compress, negate, scale
from lora_unlearn.core.adapter_io import CONFIG_NAME, LINEAGE_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from lora_unlearn.errors import UserError
from tests.tiny import assert_close, dw, make_adapter

Q, V, DOWN = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_products(got, want) -> None:
    assert got.modules.keys() == want.modules.keys()
    for n, m in want.modules.items():
        assert got.modules[n].rank == m.rank
        assert_close(dw(got.modules[n]), dw(m), rtol=1e-12)


@pytest.fixture
def folder(tmp_path) -> Path:
    """A valid adapter folder: three modules, r=3, alpha=8."""
    d = make_adapter({Q: (8, 6, 3), V: (4, 6, 3), DOWN: (6, 10, 3)}, alpha=8, seed=1)
    return save_adapter(d, tmp_path / "a")


def config_of(path: Path) -> dict:
    return json.loads((path / CONFIG_NAME).read_text())


# Roundtrips

@pytest.mark.parametrize("rslora", [False, True])
def test_roundtrip_keeps_products(tmp_path, rslora):
    """load(save(d)) has the same modules, ranks and dW = s * B @ A, for plain and rsLoRA scaling."""
    d = make_adapter({Q: (8, 6, 3), V: (4, 6, 3), DOWN: (6, 10, 5)}, alpha=12, rslora=rslora, seed=2)
    back = load_adapter(save_adapter(d, tmp_path / "a"))
    assert_same_products(back, d)
    tensors = load_file(tmp_path / "a" / WEIGHTS_NAME)
    assert sorted(tensors) == sorted(f"base_model.model.{n}.lora_{f}.weight" for n in d.modules for f in "AB")
    cfg = config_of(tmp_path / "a")
    assert (cfg["peft_type"], cfg["use_dora"], cfg["bias"], cfg["use_rslora"]) == ("LORA", False, "none", rslora)


def test_add_with_a_lone_module_writes_rank_and_alpha_patterns(tmp_path):
    """add of adapters where one module is in one input only gives modules of different ranks
    (q, v: 3 + 2; down: 3); the config records them as rank_pattern / alpha_pattern, and
    loading the folder gives back the same products."""
    d1 = make_adapter({Q: (8, 6, 3), V: (7, 6, 3), DOWN: (6, 10, 3)}, alpha=8, seed=1)
    d2 = make_adapter({Q: (8, 6, 2), V: (7, 6, 2)}, alpha=4, rslora=True, seed=2)
    both = add(d1, d2)
    save_adapter(both, tmp_path / "sum")
    cfg = config_of(tmp_path / "sum")
    assert (cfg["r"], cfg["lora_alpha"]) == (5, 5.0)  # scaling 1 after add: alpha = r
    assert cfg["rank_pattern"] == {DOWN: 3}
    assert cfg["alpha_pattern"] == {DOWN: 3.0}
    back = load_adapter(tmp_path / "sum")
    assert_same_products(back, both)
    assert_close(dw(back.modules[Q]), dw(d1.modules[Q]) + dw(d2.modules[Q]))
    assert_close(dw(back.modules[DOWN]), dw(d1.modules[DOWN]))


def test_different_scalings_at_one_rank_write_alpha_pattern(tmp_path):
    """Modules of equal rank but different scaling (a compressed module beside a kept one)
    round-trip through alpha_pattern."""
    d = make_adapter({Q: (8, 6, 4), V: (4, 6, 2), DOWN: (6, 10, 2)}, alpha=8, seed=3)
    small, _ = compress(d, 2)  # q: rank 4 -> 2 with scaling 1; v, down kept with scaling 4
    save_adapter(small, tmp_path / "c")
    cfg = config_of(tmp_path / "c")
    assert cfg["r"] == 2 and cfg["rank_pattern"] == {}
    assert cfg["lora_alpha"] == 8.0 and cfg["alpha_pattern"] == {Q: 2.0}
    assert_same_products(load_adapter(tmp_path / "c"), small)


def test_lineage_tree_and_sha256_are_kept(tmp_path):
    """A saved result carries the tree of operations that made it, with the sha256 of every
    input adapter; loading it records the sha256 of its own weights."""
    a = save_adapter(make_adapter({Q: (8, 6, 3)}, seed=1), tmp_path / "a")
    b = save_adapter(make_adapter({Q: (8, 6, 2)}, seed=2), tmp_path / "b")
    result = negate(add(load_adapter(a), load_adapter(b)), 0.5)
    out = save_adapter(result, tmp_path / "out")
    back = load_adapter(out)
    assert back.lineage["op"] == "load" and back.lineage["path"] == str(out)
    assert back.lineage["sha256"] == sha256(out / WEIGHTS_NAME)
    tree = back.lineage["made_by"]
    assert tree == result.lineage
    assert tree["op"] == "negate" and tree["params"] == {"lam": 0.5}
    added = tree["inputs"][0]
    assert added["op"] == "add"
    assert [i["sha256"] for i in added["inputs"]] == [sha256(a / WEIGHTS_NAME), sha256(b / WEIGHTS_NAME)]
    assert json.loads((out / LINEAGE_NAME).read_text())["lora_unlearn_version"]


# Saving: atomic, no silent overwrite

def test_failed_save_leaves_no_folder(tmp_path):
    """An exception in the middle of a save (weights already written) leaves no output folder
    and no temporary folder behind."""
    d = make_adapter({Q: (8, 6, 3)})
    with pytest.raises(FileNotFoundError):
        save_adapter(d, tmp_path / "out", extra_files={"no_such_dir/card.md": "x"})
    bad = d.derive(d.modules, "scale", {"c": torch.tensor(2.0)})  # lineage not JSON-serialisable
    with pytest.raises(TypeError):
        save_adapter(bad, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_save_does_not_overwrite_unless_asked(tmp_path):
    """Saving over an existing folder raises UserError and leaves it intact; overwrite=True
    replaces it; a failed overwrite keeps the old folder."""
    first, second = make_adapter({Q: (8, 6, 3)}, seed=1), make_adapter({Q: (8, 6, 3)}, seed=2)
    out = save_adapter(first, tmp_path / "out")
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        save_adapter(second, out)
    assert_same_products(load_adapter(out), first)
    with pytest.raises(FileNotFoundError):
        save_adapter(second, out, overwrite=True, extra_files={"no_such_dir/card.md": "x"})
    assert_same_products(load_adapter(out), first)
    save_adapter(scale(second, 2.0), out, overwrite=True)
    assert_same_products(load_adapter(out), scale(second, 2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# Loading: bad folders are refused with a message that says what is wrong

def rewrite_config(folder: Path, **changes) -> None:
    (folder / CONFIG_NAME).write_text(json.dumps(config_of(folder) | changes))


def rewrite_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS_NAME)


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_adapter(tmp_path / "nope")


def test_missing_config(folder):
    (folder / CONFIG_NAME).unlink()
    with pytest.raises(UserError, match=f"has no {CONFIG_NAME}"):
        load_adapter(folder)


def test_config_not_json(folder):
    (folder / CONFIG_NAME).write_text("{r: 3")
    with pytest.raises(UserError, match="not a JSON object"):
        load_adapter(folder)


def test_missing_weights(folder):
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(UserError, match=f"has no {WEIGHTS_NAME}"):
        load_adapter(folder)


def test_pickle_weights_are_refused(folder):
    """adapter_model.bin alone is not loaded: unpickling can run code."""
    (folder / WEIGHTS_NAME).rename(folder / "adapter_model.bin")
    with pytest.raises(UserError, match="pickle"):
        load_adapter(folder)


@pytest.mark.parametrize("damage", ["half", "tail", "empty", "garbage"])
def test_corrupt_weights(folder, damage):
    """A truncated or garbled safetensors file is a UserError, not a crash."""
    f = folder / WEIGHTS_NAME
    data = f.read_bytes()
    f.write_bytes({"half": data[: len(data) // 2], "tail": data[:-4], "empty": b"",
                   "garbage": b"\xff" * 64}[damage])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_adapter(folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(folder, bad):
    def poison(t):
        t[f"base_model.model.{V}.lora_B.weight"][1, 0] = bad

    rewrite_tensors(folder, poison)
    with pytest.raises(UserError, match=f"module {V} has NaN or infinite weights"):
        load_adapter(folder)


def test_rank_not_matching_config(folder):
    rewrite_config(folder, r=4)
    with pytest.raises(UserError, match="has rank 3 but the config says 4"):
        load_adapter(folder)


@pytest.mark.parametrize("changes, message", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "trains biases"),
    ({"bias": "lora_only"}, "trains biases"),
    ({"lora_bias": True}, "LoRA bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "only LoRA adapters are supported"),
])
def test_unsupported_configs(folder, changes, message):
    """Adapters whose delta is not just s * B @ A on linear layers are refused."""
    rewrite_config(folder, **changes)
    with pytest.raises(UserError, match=message):
        load_adapter(folder)


def test_lone_lora_A(folder):
    rewrite_tensors(folder, lambda t: t.pop(f"base_model.model.{Q}.lora_B.weight"))
    with pytest.raises(UserError, match=f"module {Q} has lora_A but not its partner"):
        load_adapter(folder)


def test_non_lora_key(folder):
    def extra(t):
        t["base_model.model.lm_head.weight"] = torch.zeros(4, 4)

    rewrite_tensors(folder, extra)
    with pytest.raises(UserError, match="'base_model.model.lm_head.weight', which is not a LoRA A/B weight"):
        load_adapter(folder)


def test_inconsistent_factor_shapes(folder):
    def cut(t):
        key = f"base_model.model.{Q}.lora_B.weight"
        t[key] = t[key][:, :2].contiguous()

    rewrite_tensors(folder, cut)
    with pytest.raises(UserError, match=f"module {Q} has inconsistent shapes"):
        load_adapter(folder)
