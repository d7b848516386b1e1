"""ForgetRuntime: per-row forget coefficients in one batch, exact against dense weights and PEFT."""

from __future__ import annotations

import copy
import json
import math
import time

import pytest
import torch

from lora_unlearn.arithmetic import scale, to_dense
from lora_unlearn.core.models import load_base
from lora_unlearn.core.stack import attached
from lora_unlearn.errors import UserError
from lora_unlearn.serving.runtime import ForgetLinear, ForgetRuntime
from tests.tiny import LINEAR_NAMES, make_adapter, tiny_llama

ATOL = 1e-4
SHAPES = {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "o_proj": (32, 32),
          "gate_proj": (64, 32), "up_proj": (64, 32), "down_proj": (32, 64)}
PATHS = {name: f"model.layers.{{}}.{'self_attn' if name.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{name}"
         for name in LINEAR_NAMES}


def specs(names: list[str], r: int) -> dict[str, tuple[int, int, int]]:
    return {PATHS[n].format(i): (*SHAPES[n], r) for i in range(2) for n in names}


@pytest.fixture(scope="module")
def forget():
    """r=4 on all seven linear layers (like a forget adapter from `lora-unlearn learn`)."""
    return scale(make_adapter(specs(LINEAR_NAMES, 4), alpha=8, seed=1), 0.1)


@pytest.fixture(scope="module")
def other():
    """r=2, rsLoRA, on q/v/down only: layers it does not target get no columns."""
    return scale(make_adapter(specs(["q_proj", "v_proj", "down_proj"], 2), alpha=6, rslora=True, seed=2), 0.1)


@pytest.fixture
def full(tiny_model_dir):
    return load_base(str(tiny_model_dir), "none", device="cpu")


@pytest.fixture
def nf4(tiny_model_dir):
    return load_base(str(tiny_model_dir), "nf4", device="cpu")


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 100, (6, 10), generator=torch.Generator().manual_seed(1))


ROWS = [{}, {"forget": 1.0}, {"forget": 0.5}, {"forget": -1.0}, {"forget": 1.0, "other": 1.0},
        {"forget": 0.5, "other": -2.0}]


def runtime_with(model, tok, forget, other) -> ForgetRuntime:
    rt = ForgetRuntime(model, tok)
    rt.load("forget", forget)
    rt.load("other", other)
    return rt


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def dense_reference(base, row: dict[str, float], adapters: dict):
    """A copy of the float32 base with W += sum_k c_k dW_k (to_dense), the definition of a row's model."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, c in row.items():
            for module, delta in to_dense(adapters[name]).items():
                model.get_submodule(module).weight += c * delta
    return model


def test_mixed_batch_equals_each_row_alone_and_dense_weights(full, forget, other, input_ids):
    model, tok, _ = full
    base = copy.deepcopy(model)
    rt = runtime_with(model, tok, forget, other)
    mixed = rt.forward(input_ids, None, ROWS)
    base_logits = logits(base, input_ids)
    for i, row in enumerate(ROWS):
        alone = rt.forward(input_ids[i:i + 1], None, [row])
        dense = logits(dense_reference(base, row, {"forget": forget, "other": other}), input_ids[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=ATOL, rtol=0)
        torch.testing.assert_close(mixed[i:i + 1], dense, atol=ATOL, rtol=0)
        if row:  # the adapters matter: a wrong coefficient could not pass
            assert (mixed[i] - base_logits[i]).abs().max() > 0.05
    torch.testing.assert_close(mixed[0], base_logits[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("order", [("other", "forget"), ("forget", "other")])
def test_load_order_does_not_change_any_row(full, forget, other, input_ids, order):
    """The partial adapter (q/v/down) loaded first: layers it does not target hold only the all-linear
    adapter's columns, and those must still read the all-linear adapter's coefficient (its key 1 in
    load order), not the first adapter's (position 0 in that layer's layout)."""
    model, tok, _ = full
    base = copy.deepcopy(model)
    adapters = {"forget": forget, "other": other}
    rt = ForgetRuntime(model, tok)
    for name in order:
        rt.load(name, adapters[name])
    # rows where the two coefficients differ, so a column read from the wrong adapter changes the row
    rows = [{"forget": 1.0}, {"other": 1.0}, {"forget": 0.5, "other": -2.0}, {"forget": -1.0, "other": 3.0}]
    mixed = rt.forward(input_ids[:4], None, rows)
    for i, row in enumerate(rows):
        dense = logits(dense_reference(base, row, adapters), input_ids[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], dense, atol=ATOL, rtol=0)
    rt.set_coefficients(rows)  # the (batch, K) tensor's columns follow load order
    assert rt.coefficient_tensor()[:, list(order).index("forget")].tolist() == [1.0, 0.0, 0.5, -1.0]
    rt.set_coefficients(None)
    # unloading the first one shifts the survivor to key 0: still exact
    rt.unload(order[0])
    kept = order[1]
    alone = rt.forward(input_ids[:2], None, [{kept: 1.0}, {kept: -0.5}])
    for i, c in enumerate((1.0, -0.5)):
        dense = logits(dense_reference(base, {kept: c}, adapters), input_ids[i:i + 1])
        torch.testing.assert_close(alone[i:i + 1], dense, atol=ATOL, rtol=0)


def test_nf4_mixed_batch_equals_each_row_alone_and_peft(nf4, tiny_model_dir, forget, other, input_ids):
    model, tok, _ = nf4
    rt = runtime_with(model, tok, forget, other)
    mixed = rt.forward(input_ids, None, ROWS)
    alone = torch.cat([rt.forward(input_ids[i:i + 1], None, [row]) for i, row in enumerate(ROWS)])
    torch.testing.assert_close(mixed, alone, atol=ATOL, rtol=0)

    peft_base, _, _ = load_base(str(tiny_model_dir), "nf4", device="cpu")
    adapters = {"forget": forget, "other": other}
    for i in (1, 3, 5):
        with attached(peft_base, [(adapters[n], c) for n, c in ROWS[i].items()]) as peft_model:
            want = logits(peft_model, input_ids[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], want, atol=ATOL, rtol=0)
        assert (want - logits(peft_base, input_ids[i:i + 1])).abs().max() > 0.05


def test_generate_mixed_rows_equals_each_row_alone(full, forget, other):
    model, tok, _ = full
    rt = runtime_with(model, tok, forget, other)
    prompts = ["What is the capital of Veloria?", "Who invented it?", "What is the capital of Veloria?",
               "Numbers 0123"]
    forgets = [{}, {"forget": 1.0, "other": 0.5}, {"forget": 8.0, "other": -3.0}, {"forget": -1.0}]
    batched = rt.generate(prompts, forgets, max_new_tokens=8)
    alone = [rt.generate([p], [f], max_new_tokens=8)[0] for p, f in zip(prompts, forgets)]
    assert batched == alone
    assert batched[0] != batched[2]  # same prompt, different forget setting, different answer
    plain = rt.generate(["The quick brown"], [{}], max_new_tokens=4, chat=False)
    assert isinstance(plain[0], str)


def test_defaults_unload_and_restore(full, forget, other, input_ids):
    model, tok, _ = full
    before = logits(model, input_ids)
    types = {n: type(m) for n, m in model.named_modules()}
    rt = ForgetRuntime(model, tok)
    rt.load("forget", forget, default=1.0)
    rt.load("other", other)
    info = rt.adapters()
    assert info["forget"] == {"rank": 4, "default": 1.0, "path": None, "modules": 14}
    assert info["other"]["rank"] == 2 and info["other"]["modules"] == 6
    assert sum(isinstance(m, ForgetLinear) for m in model.modules()) == 14
    with rt.coefficients([{}, {"forget": 0.0}]):
        two = logits(model, input_ids[:2])
    on = rt.forward(input_ids[:1], None, [{"forget": 1.0}])
    torch.testing.assert_close(two[:1], on, atol=ATOL, rtol=0)  # a missing name uses the default
    torch.testing.assert_close(two[1:], before[1:2], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(model, input_ids[:1]), on, atol=ATOL, rtol=0)  # defaults outside the block
    rt.unload("forget")
    assert sum(isinstance(m, ForgetLinear) for m in model.modules()) == 6
    assert torch.equal(logits(model, input_ids), before)  # 'other' defaults to 0: the low-rank path is skipped
    rt.set_coefficients([{"other": 1.0}])
    assert not torch.allclose(logits(model, input_ids[:1]), before[:1], atol=1e-2)
    rt.unload("other")
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert torch.equal(logits(model, input_ids), before)


def test_switching_writes_shared_state_and_touches_no_module(full, forget, other, input_ids):
    model, tok, _ = full
    rt = runtime_with(model, tok, forget, other)

    def snapshot():
        return {name: (id(m), dict(m._modules), {k: (id(t), t._version) for k, t in
                                                 list(m._parameters.items()) + list(m._buffers.items()) if t is not None})
                for name, m in model.named_modules()}

    layers = [m for m in model.modules() if isinstance(m, ForgetLinear)]
    assert len({id(m.state) for m in layers}) == 1
    before, out_before = snapshot(), logits(model, input_ids[:2])
    rt.set_coefficients([{"forget": 1.0}, {"other": -1.0}])
    assert snapshot() == before
    assert torch.equal(rt.coefficient_tensor(), torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    assert len(rt._state.columns) == 2  # all-linear layout and q/v/down layout, shared by all layers
    assert not torch.allclose(logits(model, input_ids[:2]), out_before, atol=1e-2)


def test_errors_name_the_problem(full, forget, other, tmp_path, input_ids):
    model, tok, _ = full
    rt = ForgetRuntime(model, tok)
    rt.load("forget", forget)
    with pytest.raises(UserError, match="already loaded"):
        rt.load("forget", other)
    with pytest.raises(UserError, match=r"'nope'.*Loaded: forget"):
        rt.unload("nope")
    with pytest.raises(UserError, match=r"row 1 names adapter 'nope', which is not loaded. Loaded: forget"):
        rt.set_coefficients([{"forget": 1.0}, {"nope": 1.0}])
    with pytest.raises(UserError, match="finite"):
        rt.set_coefficients([{"forget": math.nan}])
    with pytest.raises(UserError, match="must be a number"):
        rt.set_coefficients([{"forget": "1"}])
    with pytest.raises(UserError, match="one dict per batch row"):
        rt.set_coefficients({"forget": 1.0})
    with pytest.raises(UserError, match="trained on another model"):
        rt.load("wide", make_adapter({"model.layers.0.self_attn.q_proj": (48, 32, 2)}))
    with pytest.raises(UserError, match="does not have"):
        rt.load("deep", make_adapter({"model.layers.7.self_attn.q_proj": (32, 32, 2)}))
    with pytest.raises(UserError, match="not a linear layer"):
        rt.load("norm", make_adapter({"model.layers.0.input_layernorm": (32, 32, 2)}))
    with pytest.raises(UserError, match="does not exist"):
        rt.load("missing", tmp_path / "missing")
    with pytest.raises(UserError, match="one per row"):
        rt.forward(input_ids[:2], None, [{}])
    rt.set_coefficients([{"forget": 1.0}, {}])
    with pytest.raises(UserError, match="batch has 3 rows but coefficients were set for 2"):
        logits(model, input_ids[:3])
    rt.set_coefficients(None)
    with pytest.raises(UserError, match="positive integer"):
        rt.generate(["hi"], [{}], max_new_tokens=0)
    assert list(rt.adapters()) == ["forget"]  # failed loads left nothing behind
    from peft import LoraConfig, get_peft_model

    with pytest.raises(UserError, match="plain base"):
        ForgetRuntime(get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])), tok)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, True, "1", None, [1.0]])
def test_strength_bounds(full, forget, other, input_ids, bad):
    """A strength must be a finite number (negatives and values past 1 are allowed): a refused one
    changes nothing, neither the loaded adapters nor the coefficients in force."""
    model, tok, _ = full
    rt = runtime_with(model, tok, forget, other)
    rt.set_coefficients([{"forget": 1.0}])
    in_force = logits(model, input_ids[:1])
    with pytest.raises(UserError, match=r"coefficient of 'forget' must be a (finite )?number"):
        rt.set_coefficients([{"forget": bad}])
    with pytest.raises(UserError, match=r"coefficient of 'forget' must be a (finite )?number"):
        rt.forward(input_ids[:2], None, [{}, {"forget": bad}])
    with pytest.raises(UserError, match=r"coefficient of 'third' must be a (finite )?number"):
        rt.load("third", forget, default=bad)
    assert list(rt.adapters()) == ["forget", "other"]
    assert torch.equal(rt.coefficient_tensor(), torch.tensor([[1.0, 0.0]]))
    assert torch.equal(logits(model, input_ids[:1]), in_force)


def test_strength_is_linear_and_zero_is_off(full, forget, input_ids):
    """c = 0 runs the base exactly (the low-rank path is skipped); c = -3 and c = 8 (past the usual [0, 1])
    equal the dense model W + c dW."""
    model, tok, _ = full
    base = copy.deepcopy(model)
    rt = ForgetRuntime(model, tok)
    rt.load("forget", forget)
    rows = [{"forget": 0.0}, {"forget": -3.0}, {"forget": 8.0}]
    out = rt.forward(input_ids[:3], None, rows)
    # Same batch shape on both sides: a batch of 1 may take other BLAS kernels (last-bit differences).
    assert torch.equal(out[:1], logits(base, input_ids[:3])[:1])
    for i in (1, 2):
        torch.testing.assert_close(out[i:i + 1], logits(dense_reference(base, rows[i], {"forget": forget}),
                                                        input_ids[i:i + 1]), atol=ATOL, rtol=0)


def test_a_strength_beyond_float32_is_refused(full, forget):
    model, tok, _ = full
    rt = ForgetRuntime(model, tok)
    rt.load("forget", forget)
    with pytest.raises(UserError, match="finite"):
        rt.set_coefficients([{"forget": 1e39}])  # float(torch.tensor(1e39, dtype=torch.float32)) == inf


def test_loads_a_saved_folder_with_its_sha256(full, forget, tmp_path, input_ids):
    from lora_unlearn.core.adapter_io import save_adapter

    model, tok, _ = full
    folder = save_adapter(forget, tmp_path / "forget")
    rt = ForgetRuntime(model, tok)
    rt.load("forget", folder, default=-0.5)
    info = rt.adapters()["forget"]
    assert info["path"] == str(folder) and len(info["sha256"]) == 64 and info["default"] == -0.5
    from_folder = logits(model, input_ids)
    rt.unload("forget")
    rt.load("forget", forget, default=-0.5)
    torch.testing.assert_close(from_folder, logits(model, input_ids), atol=ATOL, rtol=0)


# ---- the batcher over the runtime: more requests than max_batch, adapters changed in flight ------

PROMPT = "What is the capital of Veloria?"


def test_more_requests_than_max_batch_each_get_their_own_answer(full, forget, other):
    """Six requests (eight rows) at max_batch 3: batches never exceed 3 rows, a request's rows stay
    together, and every answer equals that request run alone."""
    from lora_unlearn.serving.batcher import Batcher, Job

    model, tok, _ = full
    rt = runtime_with(model, tok, forget, other)
    requests = [([PROMPT], [{}]), (["Who invented it?", PROMPT], [{"forget": 1.0}, {"forget": 8.0, "other": -3.0}]),
                ([PROMPT], [{"forget": 8.0, "other": -3.0}]), (["Numbers 0123"], [{"forget": -1.0}]),
                ([PROMPT, "Who invented it?"], [{"other": 2.0}, {}]), (["Numbers 0123"], [{}])]
    alone = [[rt.generate([p], [f], max_new_tokens=6)[0] for p, f in zip(*r)] for r in requests]  # before the worker
    assert alone[0] != alone[2]  # the settings matter
    batcher = Batcher(rt, max_batch=3, window_s=0.2)
    try:
        with rt.lock:  # the worker waits for the lock: every request is queued before the first batch runs
            futures = [batcher.submit(Job(list(p), list(f), 6, True)) for p, f in requests]
        got = [[text for text, _ in fut.result(timeout=120)["outputs"]] for fut in futures]
    finally:
        batcher.close()
    assert got == alone
    stats = batcher.stats
    # rows 1+2 | 1+1 | 2+1 by the batcher's rule (fill up to 3 rows, a request never split): 3 batches of <= 3 rows
    assert stats["rows"] == 8 and stats["max_batch_rows"] == 3 and stats["batches"] == 3, stats


def test_adapters_loaded_and_unloaded_while_requests_wait(full, forget, other):
    """Requests queued while the lock is held (a load or unload in progress): one naming an adapter
    unloaded meanwhile gets a 400 that says so; one naming an adapter loaded meanwhile uses it; the
    rest run as if nothing changed (a new adapter's default 0 leaves them alone)."""
    from lora_unlearn.serving.batcher import Batcher, Job
    from lora_unlearn.serving.schemas import ApiError

    model, tok, _ = full
    rt = runtime_with(model, tok, forget, other)
    want = {c: rt.generate([PROMPT], [f], max_new_tokens=6)[0]
            for c, f in (("plain", {}), ("forget", {"forget": 8.0}), ("both", {"forget": 8.0, "other": -3.0}))}
    assert len(set(want.values())) == 3  # three different answers (decoded text: some strengths look alike)
    batcher = Batcher(rt, max_batch=8, window_s=0.05)
    try:
        with rt.lock:
            futures = [batcher.submit(Job([PROMPT], [f], 6, True))
                       for f in ({"forget": 8.0, "other": -3.0}, {"forget": 8.0}, {}, {"forget": 8.0, "late": -3.0})]
            time.sleep(0.1)  # past the batching window: the worker holds the batch and waits for the lock
            rt.unload("other")
            rt.load("late", other)  # the same weights under a new name, default 0
        with pytest.raises(ApiError) as e:
            futures[0].result(timeout=120)
        assert e.value.status == 400 and e.value.code == "unknown_adapter"
        assert "adapter 'other' was unloaded while the request waited. Loaded: forget, late" in e.value.message
        assert [f.result(timeout=120)["outputs"][0][0] for f in futures[1:]] == [want["forget"], want["plain"],
                                                                               want["both"]]
        assert batcher.stats["errors"] == 0 and batcher.stats["rows"] == 3
    finally:
        batcher.close()


LONG_PROMPT = ("Tell me everything about the history, geography, economy, culture and people of Veloria, "
               "the island nation, starting with its founding and ending with today, in great detail. ") * 2


def _decoding(batcher, rows: int = 1, timeout: float = 60) -> bool:
    """Wait until ``rows`` rows are decoding (admitted, first token taken)."""
    deadline = time.monotonic() + timeout
    while batcher.stats["active_rows"] < rows:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


@pytest.mark.parametrize("text", [b"ab \xff\xff\xff\xff\xe2\x82\xac and \xf0\x9f\x98\x80!", b"\xc3", b"x \xff",
                                  b"\xe2\x82A\xe2\xf0\x9f\x98\xe2\x82\xac", "caf\u00e9 \u20ac\u20ac".encode()])
def test_streamed_pieces_add_up_to_the_answer_one_byte_at_a_time(tokenizer, text):
    """Byte by byte (each token one byte): invalid bytes before a character being generated, a
    character never finished, a trailing space: what is sent is always a prefix of the answer, the
    pieces add up to it, and only the character being generated waits (invalid bytes are sent)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from lora_unlearn.serving.decoding import RowText

    byte_token = bytes_to_unicode()
    ids = [tokenizer.convert_tokens_to_ids(byte_token[b]) for b in text]
    row = RowText(tokenizer, ())
    answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
    pieces = []
    for i, token in enumerate(ids):
        pieces.append(row.add(token))
        sent, now = "".join(pieces), tokenizer.decode(ids[:i + 1]).strip()
        assert answer.startswith(sent), (pieces, answer)
        assert now.startswith(sent) and now[len(sent):].strip() in ("", "\ufffd"), (sent, now)  # only that waits
    pieces.append(row.final())
    assert "".join(pieces) == answer


def test_requests_join_and_leave_a_running_batch_and_answer_as_alone(full, forget, other):
    """Continuous batching: a short and a long prompt join a long answer already decoding (the new rows'
    cache left-padded in both directions), the short one finishes and leaves while the long answer runs,
    and every answer equals the same request alone."""
    from lora_unlearn.serving.batcher import Batcher, Job

    model, tok, _ = full
    rt = runtime_with(model, tok, forget, other)
    want = {"a": rt.generate([PROMPT], [{"forget": 1.0}], max_new_tokens=40)[0],
            "short": rt.generate(["Hi"], [{"forget": 8.0, "other": -3.0}], max_new_tokens=4)[0],
            "long": rt.generate([LONG_PROMPT], [{"other": 2.0}], max_new_tokens=12)[0]}
    batcher = Batcher(rt, max_batch=4, window_s=0.0)
    try:
        a = Job([PROMPT], [{"forget": 1.0}], 40, True)
        batcher.submit(a)
        assert _decoding(batcher)
        with rt.lock:  # the worker waits at its next step: both join within a step or two of each other
            short = batcher.submit(Job(["Hi"], [{"forget": 8.0, "other": -3.0}], 4, True))
            long = batcher.submit(Job([LONG_PROMPT], [{"other": 2.0}], 12, True))
        got_short = short.result(timeout=120)
        assert not a.future.done(), "the short request waited for the running answer to end"
        got = a.future.result(timeout=120)
        assert got["outputs"][0][1] == 40, "the long answer ended early: the test needs 40 tokens"
        assert [got["outputs"][0][0], got_short["outputs"][0][0], long.result(timeout=120)["outputs"][0][0]] == \
            [want["a"], want["short"], want["long"]]
        stats = batcher.stats
        assert stats["batches"] >= 2 and stats["max_batch_rows"] >= 2 and stats["batched_requests"] >= 2, stats
    finally:
        batcher.close()


def test_a_cancelled_row_frees_its_slot_at_once(full, forget, other):
    """max_batch 1: a running answer whose client has gone leaves at the next step, and the waiting
    request runs (and equals its answer alone) long before the cancelled one could have ended."""
    from lora_unlearn.serving.batcher import Batcher, Job

    model, tok, _ = full
    rt = runtime_with(model, tok, forget, other)
    want = rt.generate([PROMPT], [{"other": 2.0}], max_new_tokens=6)[0]
    batcher = Batcher(rt, max_batch=1, window_s=0.0)
    try:
        a = Job([PROMPT], [{}], 2000, True)
        batcher.submit(a)
        assert _decoding(batcher)
        b = batcher.submit(Job([PROMPT], [{"other": 2.0}], 6, True))
        a.cancelled.set()
        assert b.result(timeout=60)["outputs"][0][0] == want
        assert not a.future.done() and batcher.stats["cancelled_rows"] == 1
        assert batcher.stats["rows"] == 2 and batcher.stats["max_batch_rows"] == 1
    finally:
        batcher.close()


def test_an_adapter_unloaded_mid_answer_ends_only_the_rows_that_use_it(full, forget, other):
    """Unloading takes the lock between two decoding steps (it does not wait for the batch to drain):
    the row that applies the adapter ends with a 400 that says so; the row that leaves it at 0
    answers as before."""
    from lora_unlearn.serving.batcher import Batcher, Job
    from lora_unlearn.serving.schemas import ApiError

    model, tok, _ = full
    rt = runtime_with(model, tok, forget, other)
    batcher = Batcher(rt, max_batch=4, window_s=0.05)
    try:
        want = batcher.submit(Job([PROMPT], [{"other": 2.0}], 300, True)).result(timeout=120)["outputs"][0][0]
        using, fine = Job([PROMPT], [{"forget": 1.0}], 300, True), Job([PROMPT], [{"other": 2.0}], 300, True)
        batcher.submit(using), batcher.submit(fine)
        assert _decoding(batcher, 2)
        with rt.lock:
            rt.unload("forget")
        with pytest.raises(ApiError) as e:
            using.future.result(timeout=120)
        assert e.value.status == 400 and e.value.code == "unknown_adapter"
        assert "adapter 'forget' was unloaded while the request was being generated" in e.value.message
        got = fine.future.result(timeout=120)["outputs"][0]
        assert got == (want, got[1]) and got[1] > 20
    finally:
        batcher.close()


@pytest.mark.slow
def test_embedded_nf4_mixed_batch_matches_peft():
    """SmolLM2-135M in nf4 with an r=8 all-linear adapter: mixed rows equal PEFT row by row."""
    from lora_unlearn.core.adapter import Adapter, LoraModule

    rt = ForgetRuntime.from_base("smollm2-135m", "nf4")
    g = torch.Generator().manual_seed(0)
    modules = {}
    for name, m in rt.model.named_modules():
        if name.endswith(tuple(LINEAR_NAMES)):
            modules[name] = LoraModule(torch.randn(8, m.in_features, generator=g) / m.in_features ** 0.5,
                                       torch.randn(m.out_features, 8, generator=g) * 0.02, 2.0)
    adapter = Adapter(modules, {"lora_alpha": 16, "target_modules": LINEAR_NAMES})
    ids = rt.tokenizer(["The capital of France is Paris, a city"] * 3, return_tensors="pt")["input_ids"]
    rows = [{"forget": 1.0}, {}, {"forget": -0.5}]
    rt.load("forget", adapter)
    mixed = rt.forward(ids, None, rows)
    rt.unload("forget")
    for i, row in enumerate(rows):
        with attached(rt.model, [(adapter, row.get("forget", 0.0))] if row else []) as peft_model:
            want = logits(peft_model, ids[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], want, atol=1e-3, rtol=0)
    assert (mixed[0] - mixed[1]).abs().max() > 0.05


# ---- scoped forgetting: "auto" strengths from each adapter's scope (issue 17) --------------------

IN_SCOPE, OUT_OF_SCOPE = "What is the capital of Veloria?", "The quick brown fox jumps over the lazy dog."


def _scope_for(model, tok, adapter, inside, outside, **kw):
    from tests.test_scope import split_scope

    return split_scope(model, tok, adapter, inside, outside, **kw)


def test_auto_rows_get_their_scopes_strength_and_an_explicit_number_wins(full, forget, other):
    model, tok, _ = full
    rt = runtime_with(model, tok, forget, other)
    rt.unload("forget")
    rt.load("forget", forget, default="auto", scope=_scope_for(model, tok, forget, [IN_SCOPE], [OUT_OF_SCOPE],
                                                               lambda_max=2.0))
    prompts = [IN_SCOPE, OUT_OF_SCOPE, IN_SCOPE, OUT_OF_SCOPE]
    rows, info = rt.resolve([{}, {"forget": "auto"}, {"forget": 0.25}, {"forget": -1.0, "other": 1.0}], prompts)
    assert rows == [{"forget": 2.0}, {"forget": 0.0}, {"forget": 0.25}, {"forget": -1.0, "other": 1.0}]
    assert set(info[0]["forget"]) == {"score", "strength"} and info[0]["forget"]["strength"] == 2.0
    assert info[2] == {} and info[3] == {}  # explicit numbers: the scope is not asked
    auto = rt.generate(prompts, [{}, {"forget": "auto"}, {"forget": 0.25}, {"forget": -1.0, "other": 1.0}],
                       max_new_tokens=4)
    assert auto == rt.generate(prompts, rows, max_new_tokens=4)
    assert rt.generate([IN_SCOPE], [{"forget": 2.0}], max_new_tokens=4) != rt.generate([IN_SCOPE], [{"forget": 0.0}],
                                                                                         max_new_tokens=4)
    assert rt.adapters()["forget"]["default"] == "auto" and rt.adapters()["forget"]["scope"]["lambda_max"] == 2.0
    with pytest.raises(UserError, match="needs the row's text"):
        rt.set_coefficients([{"forget": "auto"}])
    with pytest.raises(UserError, match="default \"auto\""):
        rt.forward(torch.zeros(1, 3, dtype=torch.long), None, [{}])
    with pytest.raises(UserError, match="'other' has no scope"):
        rt.resolve([{"other": "auto"}], [IN_SCOPE])
    rt.set_coefficients(None)  # no rows: the "auto" adapter is off, the model unchanged
    assert rt.coefficient_tensor().tolist() == [[0.0, 0.0]]


def test_the_scope_reads_the_base_with_every_adapter_off(full, forget, other):
    from lora_unlearn.core.scope import text_states

    model, tok, _ = full
    base = copy.deepcopy(model)
    scope = _scope_for(base, tok, forget, [IN_SCOPE], [OUT_OF_SCOPE])
    want = scope.scores(text_states(base, tok, [IN_SCOPE, OUT_OF_SCOPE], [scope.layer])[scope.layer])
    rt = ForgetRuntime(model, tok)
    rt.load("other", scale(other, 30.0), default=1.0)  # on for every row: it must not reach the scope's pass
    rt.load("forget", forget, default="auto", scope=scope)
    _, info = rt.resolve([{}, {}], [IN_SCOPE, OUT_OF_SCOPE])
    assert [i["forget"]["score"] for i in info] == pytest.approx(want, abs=1e-4)
    with rt.coefficients([{"other": 1.0, "forget": 0.0}]):  # and the adapter does change the states
        moved = scope.scores(text_states(model, tok, [IN_SCOPE, OUT_OF_SCOPE], [scope.layer])[scope.layer])
    assert moved != pytest.approx(want, abs=1e-3)


def test_two_adapters_with_their_own_scopes(full, forget, other):
    model, tok, _ = full
    both = "What is the capital of Veloria? Numbers 0123456789"
    rt = ForgetRuntime(model, tok)
    rt.load("forget", forget, default="auto", scope=_scope_for(model, tok, forget, [IN_SCOPE, both], [OUT_OF_SCOPE]))
    rt.load("other", other, default="auto", scope=_scope_for(model, tok, other, ["Numbers 0123456789", both],
                                                             [OUT_OF_SCOPE, IN_SCOPE], lambda_max=0.5))
    rows, info = rt.resolve([{}, {}, {}], [both, IN_SCOPE, OUT_OF_SCOPE])
    assert rows == [{"forget": 1.0, "other": 0.5}, {"forget": 1.0, "other": 0.0}, {"forget": 0.0, "other": 0.0}]
    assert set(info[0]) == {"forget", "other"}


def test_a_scope_that_does_not_belong_is_refused_and_nothing_changes(full, forget, other, tmp_path, input_ids):
    from lora_unlearn.core.adapter_io import save_adapter
    from lora_unlearn.core.scope import save_scope
    from tests.test_scope import tiny_model

    model, tok, _ = full
    rt = ForgetRuntime(model, tok, max_strength=3.0)
    rt.load("other", other)
    before = logits(model, input_ids)
    kinds = {name: type(m) for name, m in model.named_modules()}
    scope = _scope_for(model, tok, forget, [IN_SCOPE], [OUT_OF_SCOPE])
    with pytest.raises(UserError, match="belongs to another adapter"):
        rt.load("forget", scale(forget, 2.0), scope=scope)
    with pytest.raises(UserError, match="fitted on another base"):
        rt.load("forget", forget, scope=_scope_for(tiny_model(tok, seed=7), tok, forget, [IN_SCOPE], [OUT_OF_SCOPE]))
    with pytest.raises(UserError, match="beyond this runtime's bound of 3"):
        rt.load("forget", forget, scope=_scope_for(model, tok, forget, [IN_SCOPE], [OUT_OF_SCOPE], lambda_max=4.0))
    with pytest.raises(UserError, match="\"auto\" needs a scope"):
        rt.load("forget", forget, default="auto")
    with pytest.raises(UserError, match="not read from a folder"):
        rt.load("forget", forget, scope=True)
    folder = save_adapter(forget, tmp_path / "forget")
    save_scope(_scope_for(model, tok, forget, [IN_SCOPE], [OUT_OF_SCOPE]), folder)
    record = json.loads((folder / "scope.json").read_text())
    (folder / "scope.json").write_text(json.dumps({**record, "threshold": 1.5}))
    with pytest.raises(UserError, match=r"threshold must be a number in \[0, 1\]"):
        rt.load("forget", folder, scope=True)
    assert list(rt.adapters()) == ["other"]
    assert {name: type(m) for name, m in model.named_modules()} == kinds
    torch.testing.assert_close(logits(model, input_ids), before, atol=0, rtol=0)
    (folder / "scope.json").write_text(json.dumps(record))
    rt.load("forget", folder, scope=True, default="auto")  # its own scope, beside its folder: accepted
    assert rt.adapters()["forget"]["scope"]["path"] == str(folder)
