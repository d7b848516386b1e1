"""Training objectives: the shared math by hand, NPO's and RMU's reference, SimNPO's closed form, RMU's
hidden states, one step of each in the right direction, and a few steps of each on a tiny nf4 base."""

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
from lora_unlearn.training.objectives.rmu import layer_index
from lora_unlearn.training.objectives.simnpo import simnpo_forget_loss
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


# ---- SimNPO: no reference, the length-normalised NLL ------------------------------------------

def test_simnpo_forget_term_by_hand():
    # per-sequence NLL sums 6 and 2 over 3 and 4 tokens: mean token NLLs 2 and 0.5
    nll_sum, n = torch.tensor([6.0, 2.0]), torch.tensor([3.0, 4.0])
    beta, delta = 2.0, 0.25  # margins inside beta: beta * (2 - 0.25) = 3.5, beta * (0.5 - 0.25) = 0.5
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    want = -(2 / beta) * (math.log(sig(3.5)) + math.log(sig(0.5))) / 2
    assert simnpo_forget_loss(nll_sum, n, beta, delta).item() == pytest.approx(want, abs=1e-6)
    # beta -> 0: (2/beta) log 2 - mean(l), gradient ascent on the mean token NLL
    small = simnpo_forget_loss(nll_sum, n, 1e-4, 0.0).item()
    assert small == pytest.approx(2 / 1e-4 * math.log(2) - (2 + 0.5) / 2, abs=1e-3)


def _peft(model, knowledge):
    from peft import LoraConfig

    trainable = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    return attached(model, [(knowledge, 1.0)], trainable=trainable)


def _move_b(peft, std=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if ".trainable." in name and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _row(batch, i):
    return {k: v[i:i + 1] for k, v in batch.items()}


def test_simnpo_equals_its_closed_form(loaded, knowledge):
    """At B = 0 and after moving B: the loss is gamma * -(2/beta) mean log sigmoid(beta (m_i - delta))
    + alpha NLL_r, with m_i each forget row's mean answer NLL from transformers' own loss."""
    model, tok, _ = loaded
    beta, delta, gamma, alpha = 4.5, 0.3, 0.125, 1.0
    simnpo = objectives.get("simnpo").loss
    batches = _batches(tok, {"forget": FORGET, "retain": RETAIN})
    n_answer = (batches["forget"]["labels"][:, 1:] != IGNORE).sum(1)
    assert n_answer[0] != n_answer[1]  # rows of different lengths, so the normalisation matters

    def closed_form(peft):
        m = torch.tensor([peft(**_row(batches["forget"], i)).loss.item() for i in range(len(FORGET))])
        forget = -(2 / beta) * torch.log(torch.sigmoid(beta * (m - delta))).mean()
        return gamma * forget.item() + alpha * peft(**batches["retain"]).loss.item()

    with torch.no_grad(), _peft(model, knowledge) as peft:
        start = simnpo(peft, batches, beta=beta, delta=delta, gamma=gamma, alpha=alpha).item()
        assert start == pytest.approx(closed_form(peft), rel=1e-5)
        _move_b(peft)
        moved = simnpo(peft, batches, beta=beta, delta=delta, gamma=gamma, alpha=alpha).item()
        assert moved == pytest.approx(closed_form(peft), rel=1e-5)
        assert abs(moved - start) > 1e-2  # the trainable adapter is in the loss


# ---- RMU: hidden states at one layer -----------------------------------------------------------

def test_rmu_layer_rule():
    assert [layer_index(n, None) for n in (32, 16, 30, 28, 2, 1)] == [7, 4, 7, 6, 0, 0]
    assert layer_index(2, 1) == 1


def _u(dim, seed):
    """The direction by its definition: torch.rand from a generator seeded with ``seed``, unit norm."""
    u = torch.rand(dim, generator=torch.Generator().manual_seed(seed))
    return u / torch.linalg.norm(u)


def _per_sequence_mse(h, target, labels):
    """Mean over sequences of the mean over their labelled tokens of the mean squared difference, by loops."""
    terms = []
    for i in range(h.shape[0]):
        rows = [t for t in range(h.shape[1]) if labels[i, t] != IGNORE]
        terms.append(sum(((h[i, t] - target[i, t]) ** 2).mean().item() for t in rows) / len(rows))
    return sum(terms) / len(terms)


def test_rmu_equals_the_mse_of_output_hidden_states(loaded, knowledge):
    """The loss equals gamma * MSE(h_f, c u) + alpha * MSE(h_r, h_ref) from ``output_hidden_states``
    at layer 0 (the default for 2 layers), with h_ref that of base + K (the stack kept, the trained
    adapter off) and u rebuilt from its seed."""
    model, tok, _ = loaded
    c, alpha, gamma, seed = 2.0, 1.5, 0.7, 3
    rmu = objectives.get("rmu").loss
    batches = _batches(tok, {"forget": FORGET, "retain": RETAIN})
    forget, retain = ({k: batches[s][k] for k in ("input_ids", "attention_mask")} for s in ("forget", "retain"))
    with torch.no_grad():
        with attached(model, [(knowledge, 1.0)]) as m:
            h_ref = m(**retain, output_hidden_states=True).hidden_states[1]  # output of layer 0
        h_base = model(**retain, output_hidden_states=True).hidden_states[1]
    assert (h_ref - h_base).abs().max() > 1e-3  # K moves layer 0, so dropping K from the reference would show

    with torch.no_grad(), _peft(model, knowledge) as peft:
        _move_b(peft, std=0.2)
        h_f = peft(**forget, output_hidden_states=True).hidden_states[1]
        h_r = peft(**retain, output_hidden_states=True).hidden_states[1]
        u = _u(h_f.shape[-1], seed)
        forget_term = _per_sequence_mse(h_f, (c * u).expand_as(h_f), batches["forget"]["labels"])
        retain_term = _per_sequence_mse(h_r, h_ref, batches["retain"]["labels"])
        assert retain_term > 1e-6  # the trained adapter moved layer 0
        got = rmu(peft, batches, steering_coeff=c, alpha=alpha, gamma=gamma, layer=None, seed=seed).item()
        assert got == pytest.approx(gamma * forget_term + alpha * retain_term, rel=1e-4)
        other = rmu(peft, batches, steering_coeff=c, alpha=alpha, gamma=gamma, layer=None, seed=seed + 1).item()
        assert other != pytest.approx(got, rel=1e-4)  # the seed picks u


def test_rmu_stops_the_forward_at_its_layer(loaded, knowledge):
    """Nothing above the chosen layer runs: not the next layer, not the vocabulary projection."""
    model, tok, _ = loaded
    batches = _batches(tok, {"forget": FORGET, "retain": RETAIN})
    calls = []
    with _peft(model, knowledge) as peft:
        base = peft.get_base_model()
        handles = [base.model.layers[1].register_forward_hook(lambda *a: calls.append("layer 1")),
                   base.lm_head.register_forward_hook(lambda *a: calls.append("lm_head"))]
        try:
            objectives.get("rmu").loss(peft, batches, steering_coeff=2.0, alpha=1.0, gamma=1.0, layer=0, seed=0)
            assert calls == []
            objectives.get("rmu").loss(peft, batches, steering_coeff=2.0, alpha=1.0, gamma=1.0, layer=1, seed=0)
            assert "layer 1" in calls and "lm_head" not in calls
        finally:
            for h in handles:
                h.remove()


def test_rmu_under_several_processes_runs_the_whole_forward(loaded, knowledge, monkeypatch):
    """With WORLD_SIZE > 1 (accelerate launch) the forward runs to the end and every trainable
    parameter gets a gradient, exactly 0 above the layer (DDP expects one for each), with the same loss."""
    import lora_unlearn.training.objectives.rmu as rmu_module

    model, tok, _ = loaded
    batches = _batches(tok, {"forget": FORGET, "retain": RETAIN})
    params = {"steering_coeff": 2.0, "alpha": 1.0, "gamma": 1.0, "layer": 0, "seed": 0}
    with _peft(model, knowledge) as peft:
        _move_b(peft, std=0.05)
        one = objectives.get("rmu").loss(peft, batches, **params)
        monkeypatch.setattr(rmu_module, "world_size", lambda: 2)
        several = objectives.get("rmu").loss(peft, batches, **params)
        assert several.item() == pytest.approx(one.item(), rel=1e-6)
        several.backward()
        grads = {n: p.grad for n, p in peft.named_parameters() if p.requires_grad}
        assert all(g is not None for g in grads.values())
        above = [g for n, g in grads.items() if ".layers.1." in n]
        assert above and all(float(g.abs().max()) == 0.0 for g in above)
        assert any(float(g.abs().max()) > 0 for n, g in grads.items() if ".layers.0." in n)

# ---- one optimizer step moves each new objective the right way ----------------------------------

def _forget_nll(peft, batch):
    return peft(**batch).loss.item()


def _forget_mse(peft, batch, c, seed):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    h = peft(**inputs, output_hidden_states=True).hidden_states[1]  # output of layer 0
    return _per_sequence_mse(h, (c * _u(h.shape[-1], seed)).expand_as(h), batch["labels"])


@pytest.mark.parametrize("name, params, measure, direction", [
    ("simnpo", {"beta": 4.5, "delta": 0.0, "gamma": 1.0, "alpha": 0.0}, "nll", +1),
    ("rmu", {"steering_coeff": 2.0, "alpha": 0.0, "gamma": 1.0, "layer": None, "seed": 0}, "mse", -1),
])
def test_one_step_lowers_the_loss_and_moves_the_forget_set(loaded, knowledge, name, params, measure, direction):
    """One SGD step on the trainable adapter lowers the loss, and (retain term off) moves an
    independently computed forget measure the intended way: SimNPO raises the forget NLL,
    RMU brings the forget activations closer to c * u."""
    model, tok, _ = loaded
    loss_fn = objectives.get(name).loss
    batches = _batches(tok, {"forget": FORGET, "retain": RETAIN})
    with _peft(model, knowledge) as peft:
        _move_b(peft, std=0.05)  # off B = 0, where A gets no gradient
        trainable = [p for p in peft.parameters() if p.requires_grad]
        opt = torch.optim.SGD(trainable, lr=0.05)

        def state():
            with torch.no_grad():
                m = (_forget_nll(peft, batches["forget"]) if measure == "nll"
                     else _forget_mse(peft, batches["forget"], params["steering_coeff"], params["seed"]))
                return loss_fn(peft, batches, **params).item(), m

        loss0, m0 = state()
        opt.zero_grad()
        loss_fn(peft, batches, **params).backward()
        opt.step()
        loss1, m1 = state()
    assert loss1 < loss0, (loss0, loss1)
    assert direction * (m1 - m0) > 0, (m0, m1)


# ---- a few steps of each objective on the tiny nf4 model, on top of K ---------------------------

# RMU does not target the NLL: it scrambles layer 0's activations, which raises the NLL less in 8 steps
@pytest.mark.parametrize("name, margin", [("grad_ascent", 2.0), ("grad_diff", 2.0), ("kl", 2.0), ("npo", 2.0),
                                          ("simnpo", 2.0), ("rmu", 1.0)])
def test_unlearning_objectives_raise_the_forget_nll(loaded, knowledge, name, margin):
    model, tok, _ = loaded
    K = [(knowledge, 1.0)]
    adapter = train_adapter(model, tok, {"forget": FORGET, "retain": RETAIN}, fast(name), stack=K, progress=False)
    before, after = _nll(model, tok, K, FORGET), _nll(model, tok, K + [(adapter, 1.0)], FORGET)
    assert after > before + margin, (name, before, after)
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
    available = "grad_ascent, grad_diff, idk, kl, nll, npo, rmu, simnpo, surgery"
    with pytest.raises(UserError, match=f"Unknown objective 'nope'. Available: {available}"):
        objectives.get("nope")
    with pytest.raises(UserError, match="beta must be > 0"):
        objectives.get("npo").loss(None, {}, beta=0.0, alpha=1.0)


def test_bad_simnpo_and_rmu_parameters_are_refused(loaded):
    """Refused before any forward pass, each with the rule it broke."""
    model, tok, _ = loaded
    simnpo, rmu = objectives.get("simnpo").loss, objectives.get("rmu").loss
    good = {"beta": 4.5, "delta": 0.0, "gamma": 0.125, "alpha": 1.0}
    for bad, match in [({"beta": 0.0}, "beta must be > 0"), ({"beta": -1.0}, "beta must be > 0"),
                       ({"gamma": -0.1}, "gamma must be >= 0"), ({"alpha": -1.0}, "alpha must be >= 0")]:
        with pytest.raises(UserError, match=f"'simnpo': {match}"):
            simnpo(None, {}, **{**good, **bad})
    good = {"steering_coeff": 2.0, "alpha": 1.0, "gamma": 1.0, "layer": None, "seed": 0}
    for bad, match in [({"steering_coeff": 0.0}, "steering_coeff must be > 0"), ({"alpha": -1.0}, "alpha must be >= 0"),
                       ({"gamma": -1.0}, "gamma must be >= 0"), ({"seed": 1.5}, "seed must be an integer"),
                       ({"layer": 2}, r"layer must be an integer in 0\.\.1 \(this model has 2 decoder layers\)"),
                       ({"layer": -1}, "layer must be an integer in 0..1"),
                       ({"layer": 0.5}, "layer must be an integer")]:
        with pytest.raises(UserError, match=f"'rmu': {match}"):
            rmu(model, {}, **{**good, **bad})  # no batches: the check comes first
    available = "alpha, gamma, layer, seed, steering_coeff"
    with pytest.raises(UserError, match=f"'rmu' has no parameter 'steering'. Available: {available}"):
        objectives.get("rmu").resolve_params({"steering": 1.0})
