"""The server as the official ``openai`` client sees it: uvicorn on loopback, a tiny Llama, two tiny adapters.

Streaming (chunks, finish_reason, usage chunk, [DONE]) adds up to the non-streamed answer, and the
first chunk arrives long before a batch of 8 finishes; usage is exact against the tokenizer and the
model's own generate; sampling is per row (same seed, same answer; temperature 0 is the greedy
answer of ``runtime.generate``); forget toggles ride in ``extra_body``; errors arrive as the client's
own exception types, and the server keeps serving. One server for the whole file.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from lora_unlearn.core.adapter_io import save_adapter
from lora_unlearn.core.data import prompt_text
from lora_unlearn.serving.app import background, create_app
from lora_unlearn.serving.registry import load_named
from lora_unlearn.serving.schemas import Limits
from tests.test_server import SPECS, tiny_runtime
from tests.tiny import make_adapter

LIMITS = {"max_tokens": 96, "max_prompt_chars": 200, "max_batch": 8, "batch_window_ms": 100}
Q = "What is the capital of Veloria?"


@pytest.fixture(scope="module")
def server(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai-adapters")
    runtime = tiny_runtime(tokenizer)
    kinds = {}
    for name, seed in (("a", 1), ("b", 2)):
        load_named(runtime, kinds, name, save_adapter(make_adapter(SPECS, alpha=16, seed=seed), root / name), 0.0)
    app = create_app(runtime, limits=Limits(**LIMITS), kinds=kinds)
    with background(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        yield runtime, client, url


def _chat(client, content=Q, forget=None, **kw):
    extra = {"forget": forget} if forget is not None else None
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                          extra_body=extra, **kw)


def _stream_chat(client, content=Q, forget=None, **kw):
    """(text, finish_reason, usage, chunks) of a streamed chat answer."""
    extra = {"forget": forget} if forget is not None else None
    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                                 extra_body=extra, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, reasons, chunks[-1].usage, chunks


def _generated(runtime, ids: list[int], forget: dict, max_new_tokens: int) -> int:
    """Tokens the model's own greedy generate produces for ``ids``, up to and including its end token."""
    eos = runtime.model.generation_config.eos_token_id
    with runtime.lock, runtime.coefficients([forget]):
        out = runtime.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=int),
                                     max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=eos)
    new = out[0, len(ids):].tolist()
    return new.index(eos) + 1 if eos in new else len(new)


def test_stream_adds_up_to_the_answer_with_usage_and_done(server):
    runtime, client, url = server
    whole = _chat(client, forget={"a": 1.0}, max_tokens=10)
    text, reasons, usage, chunks = _stream_chat(client, forget={"a": 1.0}, max_tokens=10)
    assert text == whole.choices[0].message.content and text
    assert reasons == [whole.choices[0].finish_reason]
    assert usage.model_dump() == whole.usage.model_dump()
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2, "the answer came as one piece, not as it was generated"
    # the raw wire: SSE events ending in [DONE]
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "The quick", "max_tokens": 6,
                                                             "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"
    streamed = client.completions.create(model="m", prompt="The quick", max_tokens=6, stream=True)
    pieces = list(streamed)
    once = client.completions.create(model="m", prompt="The quick", max_tokens=6)
    assert "".join(p.choices[0].text for p in pieces) == once.choices[0].text
    assert pieces[-1].choices[0].finish_reason == once.choices[0].finish_reason


def test_usage_is_exact(server):
    runtime, client, _ = server
    tok = runtime.tokenizer
    for forget, max_tokens in (({}, 12), ({"b": 1.0}, 4)):
        r = _chat(client, forget=forget, max_tokens=max_tokens)
        ids = tok(prompt_text(tok, Q), add_special_tokens=False)["input_ids"]
        assert r.usage.prompt_tokens == len(ids) > len(tok(Q)["input_ids"])  # the template is counted
        assert r.usage.completion_tokens == _generated(runtime, ids, forget, max_tokens)
        assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == max_tokens else "stop")
    prompts = ["The quick brown", "Numbers 0123"]
    r = client.completions.create(model="m", prompt=prompts, max_tokens=7)
    want = [tok(p)["input_ids"] for p in prompts]
    assert r.usage.prompt_tokens == sum(len(ids) for ids in want)
    assert r.usage.completion_tokens == sum(_generated(runtime, ids, {}, 7) for ids in want)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_sampling_per_row(server):
    runtime, client, _ = server
    greedy = _chat(client, max_tokens=12).choices[0].message.content
    with runtime.lock:
        assert greedy == runtime.generate([Q], [{}], max_new_tokens=12)[0]
    assert _chat(client, max_tokens=12, temperature=0).choices[0].message.content == greedy
    seeded = [_chat(client, max_tokens=12, temperature=1.5, seed=s).choices[0].message.content for s in (1, 1, 2, 3)]
    assert seeded[0] == seeded[1], "same seed, different answer"
    assert len(set(seeded)) > 1 and set(seeded) != {greedy}, "temperature 1.5 sampled nothing"
    # top_p this small keeps only the most likely token: sampling gives the greedy answer
    assert _chat(client, max_tokens=12, temperature=1.5, top_p=1e-9, seed=5).choices[0].message.content == greedy
    # n choices: choice k draws with seed + k
    many = _chat(client, max_tokens=12, temperature=1.5, seed=1, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2] and many.choices[0].message.content == seeded[0]
    assert many.choices[1].message.content == seeded[2]
    texts = ["", "", ""]
    for c in _chat(client, max_tokens=12, temperature=1.5, seed=1, n=3, stream=True):
        texts[c.choices[0].index] += c.choices[0].delta.content or ""
    assert texts == [c.message.content for c in many.choices]
    # a stop string ends the row where it first appears
    cut = greedy[len(greedy) // 2:][:2]
    if cut.strip():
        stopped = _chat(client, max_tokens=12, stop=[cut]).choices[0]
        assert stopped.message.content == greedy[:greedy.find(cut)] and stopped.finish_reason == "stop"


def test_eight_mixed_streams_equal_their_serial_answers_and_start_early(server):
    """8 concurrent requests share batches, rows with different forget settings and sampling mixed."""
    runtime, client, url = server
    settings = [({}, {}), ({"a": 1.0}, {}), ({"a": -1.0, "b": 0.5}, {}), ({"b": 2.0}, {}),
                ({}, {"temperature": 1.0, "seed": 3}), ({"a": 1.0}, {"temperature": 0.7, "top_p": 0.9, "seed": 4}),
                ({"b": -1.0}, {}), ({"a": 0.5}, {"temperature": 1.0, "seed": 9})]
    serial = [_chat(client, forget=f, max_tokens=64, **kw).choices[0].message.content for f, kw in settings]
    assert len(set(serial)) >= 6
    before = httpx.get(f"{url}/health").json()
    barrier = threading.Barrier(len(settings))

    def streamed(setting):
        forget, kw = setting
        barrier.wait()
        start, first, text = time.perf_counter(), None, ""
        for c in _chat(client, forget=forget, max_tokens=64, stream=True, **kw):
            piece = c.choices[0].delta.content if c.choices else None
            if piece and first is None:
                first = time.perf_counter() - start
            text += piece or ""
        return text, first, time.perf_counter() - start

    def whole(setting):
        forget, kw = setting
        barrier.wait()
        start = time.perf_counter()
        _chat(client, forget=forget, max_tokens=64, **kw)
        return time.perf_counter() - start

    with ThreadPoolExecutor(len(settings)) as pool:
        streams = list(pool.map(streamed, settings))
        totals = list(pool.map(whole, settings))
    after = httpx.get(f"{url}/health").json()
    assert [t for t, _, _ in streams] == serial
    assert after["max_batch_rows"] >= 4 and after["batches"] - before["batches"] < 2 * len(settings)
    firsts = sorted(f for _, f, _ in streams if f is not None)
    median_first, median_total = firsts[len(firsts) // 2], sorted(totals)[len(totals) // 2]
    print(f"\n8 concurrent: first chunk median {median_first * 1000:.0f} ms, non-streamed total median "
          f"{median_total * 1000:.0f} ms")
    assert median_first < 0.5 * median_total, (firsts, totals)


def test_client_that_leaves_mid_stream_frees_its_row(server):
    runtime, client, url = server
    before = httpx.get(f"{url}/health").json()
    body = {"prompt": "The quick", "max_tokens": 96, "stream": True, "temperature": 1.0, "seed": 0}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
    deadline = time.monotonic() + 10
    while (health := httpx.get(f"{url}/health").json())["active_rows"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert health["active_rows"] == 0 and health["queued"] == 0
    assert health["cancelled_rows"] == before["cancelled_rows"] + 1, "the row ran to the end for nobody"
    assert _chat(client, max_tokens=3).choices[0].message.content is not None


@pytest.mark.parametrize("kwargs, words", [
    ({"temperature": -0.5}, "temperature must be a number in [0, 2]"),
    ({"top_p": 1.5}, "top_p must be a number in (0, 1]"),
    ({"top_p": 0.0}, "top_p must be a number in (0, 1]"),
    ({"n": 9}, "n must be an integer in 1..8"),
    ({"max_tokens": 97}, "limit of 96"),
    ({"extra_body": {"forget": {"a": 1e308}}}, "bound of 8 (--max-strength)"),
    ({"extra_body": {"forget": {"a": -9}}}, "bound of 8"),
    ({"extra_body": {"forget": {"nope": 1.0}}}, "unknown adapter 'nope'"),
    ({"extra_body": {"forgett": {"a": 1.0}}}, "unknown field 'forgett'"),
    ({"stream": True, "temperature": -1}, "temperature must be"),
    ({"stream": True, "stream_options": {"include_usage": True, "x": 1}}, "stream_options must be"),
])
def test_errors_are_the_clients_own_exceptions(server, kwargs, words):
    _, client, _ = server
    with pytest.raises(openai.BadRequestError) as info:
        result = client.chat.completions.create(model="m", messages=[{"role": "user", "content": Q}], **kwargs)
        list(result) if kwargs.get("stream") else None
    assert words in info.value.message and info.value.status_code == 400
    assert info.value.body["type"] == "invalid_request_error"
    assert _chat(client, max_tokens=2).choices[0].message.content is not None


def test_non_finite_logits_end_the_row_with_an_error(tokenizer, tmp_path):
    """Past float32's range the logits overflow: that row gets an error, its batch-mates their exact answers."""
    runtime = tiny_runtime(tokenizer)
    runtime.load("a", make_adapter(SPECS, alpha=16, seed=1))
    app = create_app(runtime, limits=Limits(**{**LIMITS, "max_strength": 3e38}))
    with background(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        alone = _chat(client, forget={"a": 1.0}, max_tokens=8).choices[0].message.content
        barrier = threading.Barrier(2)

        def send(forget, stream=False):
            barrier.wait()
            try:
                r = _chat(client, forget=forget, max_tokens=8, stream=stream)
                return "".join(c.choices[0].delta.content or "" for c in r) if stream else r.choices[0].message.content
            except openai.APIError as e:
                return e

        for stream in (False, True):
            with ThreadPoolExecutor(2) as pool:
                broken, fine = pool.map(send, [{"a": 3e38}, {"a": 1.0}], [stream, stream])
            assert isinstance(broken, openai.BadRequestError) and "non-finite" in broken.message, broken
            assert fine == alone
        assert httpx.get(f"{url}/health").json()["errors"] >= 2
