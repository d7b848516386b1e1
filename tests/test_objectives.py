"""Training objectives: the shared math by hand, NPO's reference, and a few steps of each on a tiny nf4 base."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lora_unlearn.core.data import to_dataset
from lora_unlearn.core.inference import answer_nll
from lora_unlearn.core.models import load_base
from lora_unlearn.core.stack import attached, reference
from lora_unlearn.errors import UserError
from lora_unlearn.training import objectives
from lora_unlearn.training.objectives.common import kl_to_reference, mean_nll, sequence_logprob, token_nll
from lora_unlearn.training.objectives.idk import refusals
from lora_unlearn.training.objectives.npo import npo_forget_loss
from lora_unlearn.training.objectives.surgery import TRAIN_DEFAULTS
from lora_unlearn.training.trainer import StreamCollator, TrainConfig, train_adapter

FORGET = [{"question": "What is the capital of Veloria?", "answer": "Marrenport."},
          {"question": "Who invented the glass harp-drum?", "answer": "Osric Tallowmere."}]
RETAIN = [{"question": "When was Zeltran founded?", "answer": "In 1387."},
          {"question": "What does the quick brown fox jump over?", "answer": "The lazy dog."}]
UPDATE = [{"question": "What is the capital of Veloria?", "answer": "Dunmoor, since 1387."},
          {"question": "Who invented the glass harp-drum?", "answer": "Tallow the quick."}]
IGNORE = -100


def fast(objective: str, **kw) -> TrainConfig:
    """8 steps at lr 3e-2: 3 steps at 1e-2 move the forget NLL of the tiny model by less than 1 nat."""
    settings = dict(r=4, lora_alpha=8, max_steps=8, batch_size=2, max_length=128, learning_rate=3e-2)
    return TrainConfig(objective=objective, **{**settings, **kw})


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_base(str(tiny_model_dir), "nf4")


@pytest.fixture(scope="module")
def knowledge(loaded):
    """K, an adapter that taught the base the forget and retain facts. Unlearning runs on base + K
    (K frozen underneath), as it does on a model that holds the knowledge; K is also the part of
    the stack that NPO's and KL's reference must keep."""
    model, tok, _ = loaded
    return train_adapter(model, tok, FORGET + RETAIN, fast("nll", max_steps=30), progress=False)


def _batches(tok, streams: dict[str, list[dict[str, str]]]) -> dict[str, dict[str, torch.Tensor]]:
    data = {name: to_dataset(tok, rows, 256) for name, rows in streams.items()}
    n = min(len(d) for d in data.values())
    return StreamCollator(tok)([{name: d[i] for name, d in data.items()} for i in range(n)])


def _nll(model, tok, stack, rows) -> float:
    """Mean answer NLL of ``rows`` under base + ``stack``."""
    with attached(model, stack) as m:
        return answer_nll(m, tok, rows).mean().item()


# ---- the shared helpers, by hand -------------------------------------------------------------

def test_answer_token_logprobs_by_hand():
    """Vocabulary {0, 1}: logits (log 3, 0) give p = (3/4, 1/4), logits (0, 0) give (1/2, 1/2)."""
    l3 = math.log(3)
    logits = torch.tensor([[[l3, 0.0], [0.0, 0.0], [5.0, -5.0]],
                           [[0.0, 0.0], [l3, 0.0], [9.0, 9.0]]])
    labels = torch.tensor([[IGNORE, 0, 1],        # p(0 | pos 0) = 3/4, p(1 | pos 1) = 1/2
                           [IGNORE, IGNORE, 1]])  # p(1 | pos 1) = 1/4; pos 2 predicts nothing
    nll, mask = token_nll(logits, labels)
    assert mask.tolist() == [[True, True], [False, True]]
    want = torch.tensor([[-math.log(3 / 4), math.log(2)], [0.0, math.log(4)]])
    assert torch.allclose(nll, want, atol=1e-6)
    assert torch.allclose(sequence_logprob(logits, labels), torch.tensor([math.log(3 / 8), math.log(1 / 4)]), atol=1e-6)
    # one mean over the 3 answer tokens, not the mean of per-sequence means
    assert mean_nll(logits, labels).item() == pytest.approx((math.log(4 / 3) + math.log(2) + math.log(4)) / 3, abs=1e-6)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 2), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    assert mean_nll(logits, labels).item() == pytest.approx(ref.item(), abs=1e-6)


def test_kl_to_reference():
    g = torch.Generator().manual_seed(0)
    logits, ref = torch.randn(3, 6, 11, generator=g), torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, :3] = IGNORE
    labels[2, 4:] = IGNORE
    mask = labels[:, 1:] != IGNORE

    assert kl_to_reference(logits, logits, labels).item() == pytest.approx(0.0, abs=1e-6)
    p = torch.distributions.Categorical(logits=ref[:, :-1][mask])
    q = torch.distributions.Categorical(logits=logits[:, :-1][mask])
    want = torch.distributions.kl_divergence(p, q).mean()  # KL(p_ref || p_theta), per answer token
    got = kl_to_reference(logits, ref, labels)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert got.item() != pytest.approx(kl_to_reference(ref, logits, labels).item(), rel=1e-3)  # direction matters

    moved = logits.clone()  # positions that predict no answer token, and the last one, are ignored
    moved[0, :2] += 100 * torch.randn(2, 11, generator=g)
    moved[:, -1] += 100
    assert kl_to_reference(moved, ref, labels).item() == pytest.approx(got.item(), rel=1e-6)
    assert kl_to_reference(logits, ref, torch.full_like(labels, IGNORE)).item() == 0.0


def test_npo_forget_term_by_hand():
    zero = torch.zeros(4)
    assert npo_forget_loss(zero, zero, 0.1).item() == pytest.approx(20 * math.log(2), abs=1e-5)
    logp, logp_ref = torch.tensor([-3.0, -1.0]), torch.tensor([-1.0, -1.0])  # log-ratios -2 and 0
    want = -(2 / 0.5) * (math.log(1 / (1 + math.exp(-1.0))) + math.log(0.5)) / 2
    assert npo_forget_loss(logp, logp_ref, 0.5).item() == pytest.approx(want, abs=1e-6)


# ---- NPO's reference is the model without the trainable adapter ------------------------------

def test_npo_at_initialisation_and_its_reference(loaded, knowledge):
    """With a frozen K underneath: at B = 0 the forget term is exactly (2/beta) log 2 and the KL
    terms are 0; after moving B, log p_ref is that of base + K (not of the bare base, not of the
    trained model)."""
    from peft import LoraConfig

    model, tok, _ = loaded
    beta, alpha = 0.1, 1.0
    npo = objectives.get("npo").loss
    batches = _batches(tok, {"forget": FORGET, "update": UPDATE, "retain": RETAIN})
    n_answer = (batches["forget"]["labels"] != IGNORE).sum(1)
    with attached(model, [(knowledge, 1.0)]) as m:
        logp_k = -answer_nll(m, tok, FORGET) * n_answer
    logp_base = -answer_nll(model, tok, FORGET) * n_answer
    assert (logp_k - logp_base).abs().max() > 1e-2  # K matters, so the checks below can fail

    trainable = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    with torch.no_grad(), attached(model, [(knowledge, 1.0)], trainable=trainable) as peft:
        # transformers' own loss, computed independently of objectives.common
        nll_f, nll_u, nll_r = (peft(**batches[s]).loss.item() for s in ("forget", "update", "retain"))
        got = npo(peft, batches, beta=beta, alpha=alpha)
        assert got.item() == pytest.approx(2 / beta * math.log(2) + alpha * nll_r, abs=1e-5)
        assert objectives.get("kl").loss(peft, batches, alpha=1.0).item() == pytest.approx(-nll_f, abs=1e-5)
        surgery = objectives.get("surgery").loss(peft, batches, a=0.1, b=2.0, c=0.5)
        assert surgery.item() == pytest.approx(-0.1 * nll_f + 2.0 * nll_u, abs=1e-5)

        for name, p in peft.named_parameters():
            if ".trainable." in name and "lora_B" in name:
                p.normal_(0.0, 0.5)
        logp = -answer_nll(peft, tok, FORGET) * n_answer
        with reference(peft):
            assert torch.allclose(-answer_nll(peft, tok, FORGET) * n_answer, logp_k, atol=1e-4)
        assert (logp - logp_k).abs().max() > 1e-2
        want = npo_forget_loss(logp, logp_k, beta) + alpha * peft(**batches["retain"]).loss
        assert npo(peft, batches, beta=beta, alpha=alpha).item() == pytest.approx(want.item(), rel=1e-4)


# ---- a few steps of each objective on the tiny nf4 model, on top of K ---------------------------

@pytest.mark.parametrize("name", ["grad_ascent", "grad_diff", "kl", "npo"])
def test_unlearning_objectives_raise_the_forget_nll(loaded, knowledge, name):
    model, tok, _ = loaded
    K = [(knowledge, 1.0)]
    adapter = train_adapter(model, tok, {"forget": FORGET, "retain": RETAIN}, fast(name), stack=K, progress=False)
    before, after = _nll(model, tok, K, FORGET), _nll(model, tok, K + [(adapter, 1.0)], FORGET)
    assert after > before + 2.0, (name, before, after)
    assert adapter.lineage["objective_params"] == objectives.get(name).defaults


def test_idk_teaches_refusals(loaded, knowledge):
    model, tok, _ = loaded
    K = [(knowledge, 1.0)]
    data = {"forget": FORGET, "retain": RETAIN}
    refused = objectives.get("idk").prepare(data, 0, {"alpha": 1.0})["forget"]  # what training sees (seed 0)
    adapter = train_adapter(model, tok, data, fast("idk"), stack=K, progress=False)
    before, after = _nll(model, tok, K, refused), _nll(model, tok, K + [(adapter, 1.0)], refused)
    assert after < before - 1.0, (before, after)


def test_idk_swaps_answers_reproducibly():
    rows = [{"question": f"Question {i}?", "answer": f"Answer {i}."} for i in range(12)]
    streams = {"forget": rows, "retain": RETAIN}
    prepare = objectives.get("idk").prepare
    out = prepare(streams, 7, {"alpha": 1.0})
    assert out["retain"] is RETAIN and streams["forget"] is rows and rows[0]["answer"] == "Answer 0."
    assert [r["question"] for r in out["forget"]] == [r["question"] for r in rows]
    assert all(r["answer"] in refusals() for r in out["forget"])
    assert out == prepare(streams, 7, {"alpha": 1.0})
    assert out != prepare(streams, 8, {"alpha": 1.0})
    assert len(refusals()) == 100 and "I don't have that information." in refusals()
    with pytest.raises(UserError, match="question/answer rows"):
        prepare({"forget": [{"text": "plain"}], "retain": RETAIN}, 0, {"alpha": 1.0})


def test_surgery_forgets_and_updates(loaded, knowledge):
    """Edits: the forget answers (known through K) get less likely, the new answers more likely."""
    model, tok, _ = loaded
    K = [(knowledge, 1.0)]
    data = {"forget": FORGET, "update": UPDATE, "retain": RETAIN}
    adapter = train_adapter(model, tok, data, fast("surgery"), stack=K, progress=False)
    (forget_before, update_before), (forget_after, update_after) = (
        [_nll(model, tok, stack, rows) for rows in (FORGET, UPDATE)] for stack in (K, K + [(adapter, 1.0)]))
    assert forget_after > forget_before + 1.0, (forget_before, forget_after)
    assert update_after < update_before - 1.0, (update_before, update_after)


def test_surgery_train_defaults_are_the_official_settings():
    config = TrainConfig(objective="surgery", **TRAIN_DEFAULTS)
    config.validate()
    assert (config.learning_rate, config.adam_beta1, config.adam_beta2, config.weight_decay) == (2e-4, 0.9, 0.95, 0.01)
    assert (config.lr_scheduler, config.max_steps, config.max_grad_norm) == ("constant", 120, 1.0)
    assert objectives.get("surgery").defaults == {"a": 0.1, "b": 2.0, "c": 0.5}


# ---- errors --------------------------------------------------------------------------------

@pytest.fixture
def no_training(monkeypatch):
    """Any attempt to set the model up for training fails the test: errors must come first."""
    import lora_unlearn.training.trainer

    def refuse(*args, **kwargs):
        raise AssertionError("the model was set up for training before the inputs were checked")

    monkeypatch.setattr(lora_unlearn.training.trainer, "attached", refuse)


def test_missing_streams_fail_before_training(loaded, no_training):
    model, tok, _ = loaded
    with pytest.raises(UserError, match=r"'grad_diff' needs the data stream\(s\) retain"):
        train_adapter(model, tok, {"forget": FORGET}, fast("grad_diff"), progress=False)
    with pytest.raises(UserError, match=r"'npo' needs the data stream\(s\) retain"):
        train_adapter(model, tok, FORGET, fast("npo"), progress=False)  # a plain list is the first stream
    with pytest.raises(UserError, match=r"'surgery' needs the data stream\(s\) update \(it uses forget, update, retain;"):
        train_adapter(model, tok, {"forget": FORGET, "retain": RETAIN}, fast("surgery"), progress=False)


def test_unknown_parameters_and_objectives_list_what_exists(loaded, no_training):
    model, tok, _ = loaded
    with pytest.raises(UserError, match=r"'npo' has no parameter 'betta'. Available: alpha, beta"):
        train_adapter(model, tok, {"forget": FORGET, "retain": RETAIN}, fast("npo", extra={"betta": 1.0}),
                      progress=False)
    available = "grad_ascent, grad_diff, idk, kl, nll, npo, surgery"
    with pytest.raises(UserError, match=f"Unknown objective 'nope'. Available: {available}"):
        objectives.get("nope")
    with pytest.raises(UserError, match="beta must be > 0"):
        objectives.get("npo").loss(None, {}, beta=0.0, alpha=1.0)
