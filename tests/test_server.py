"""The HTTP server, for real: uvicorn on a loopback port, a tiny Llama, two tiny adapters, httpx.

Concurrent requests with mixed forget settings are batched (the /health counters say so) and each
answer equals the answer to the same request sent alone; every bad request gets a 4xx JSON error
with a message and the next good request still works; the API key is enforced when set.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from lora_unlearn.core.adapter_io import save_adapter
from lora_unlearn.errors import UserError
from lora_unlearn.serving.app import background, create_app
from lora_unlearn.serving.registry import load_named, parse_adapter_spec
from lora_unlearn.serving.runtime import ForgetRuntime
from lora_unlearn.serving.schemas import Limits
from tests.tiny import make_adapter, tiny_llama

SPECS = {f"model.layers.{i}.{m}": shape for i in range(2) for m, shape in
         [("self_attn.q_proj", (32, 32, 4)), ("self_attn.v_proj", (16, 32, 4)), ("mlp.down_proj", (32, 64, 4))]}
LIMITS = {"max_tokens": 12, "max_prompt_chars": 200, "max_batch": 8, "batch_window_ms": 150}


def tiny_runtime(tokenizer) -> ForgetRuntime:
    model = tiny_llama()
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():  # as in conftest: spread-out logits make greedy answers depend on the adapters
        model.lm_head.weight.normal_(0.0, 0.5)
    model.config.pad_token_id = tokenizer.pad_token_id
    return ForgetRuntime(model, tokenizer)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("server-adapters")
    return {name: save_adapter(make_adapter(SPECS, alpha=16, seed=seed), root / name)
            for name, seed in (("a", 1), ("b", 2), ("c", 3))}


@pytest.fixture(scope="module")
def served(tokenizer, adapter_dirs):
    runtime = tiny_runtime(tokenizer)
    kinds = {}
    load_named(runtime, kinds, "a", adapter_dirs["a"], 0.0)
    load_named(runtime, kinds, "b", adapter_dirs["b"], 0.0)
    app = create_app(runtime, limits=Limits(**LIMITS), kinds=kinds)
    with background(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield runtime, client


def _completion(client, prompt, forget=None, max_tokens=8, **extra):
    body = {"prompt": prompt, "max_tokens": max_tokens, **extra}
    if forget is not None:
        body["forget"] = forget
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _chat(client, content, forget=None, max_tokens=8):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    if forget is not None:
        body["forget"] = forget
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


REQUESTS = [  # (kind, prompt, forget, max_tokens): mixed settings, two max_tokens groups
    ("completion", "The capital of Veloria is", None, 8),
    ("completion", "The capital of Veloria is", {"a": 1.0}, 8),
    ("completion", "The capital of Veloria is", {"a": -1.0, "b": 0.5}, 8),
    ("completion", "Who invented the glass harp-drum?", {"b": 2.0}, 8),
    ("chat", "What is the capital of Veloria?", {"a": 1.0}, 8),
    ("chat", "What is the capital of Veloria?", {}, 8),
    ("completion", "Numbers 0123", {"a": 0.5}, 5),
    ("chat", "Who invented it?", {"b": -1.0}, 5),
]


def _send(client, request):
    kind, prompt, forget, max_tokens = request
    return (_completion if kind == "completion" else _chat)(client, prompt, forget, max_tokens)


def test_concurrent_requests_are_batched_and_equal_alone(served):
    runtime, client = served
    alone = [_send(client, r) for r in REQUESTS]
    before = client.get("/health").json()
    start = threading.Barrier(len(REQUESTS))

    def together(request):
        start.wait()
        return _send(client, request)

    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        batched = list(pool.map(together, REQUESTS))
    after = client.get("/health").json()

    assert batched == alone
    assert after["requests"] - before["requests"] == len(REQUESTS)
    assert after["batches"] - before["batches"] < len(REQUESTS), "no two requests shared a generate call"
    assert after["max_batch_rows"] >= 2 and after["batched_requests"] > before["batched_requests"]
    # the forget settings matter (or this test could not fail) and are the runtime's own answers
    assert len({alone[0], alone[1], alone[2]}) == 3
    with runtime.lock:
        direct = runtime.generate(["The capital of Veloria is"], [{"a": 1.0}], max_new_tokens=8, chat=False)
    assert alone[1] == direct[0]


def test_response_shape_and_defaults(served):
    _, client = served
    r = client.post("/v1/completions", json={"prompt": ["Numbers 0123", "The quick"], "max_tokens": 4,
                                             "temperature": 0, "forget": {"b": 1}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and [c["index"] for c in body["choices"]] == [0, 1]
    assert body["forget"] == {"a": 0.0, "b": 1.0}
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    listed = client.get("/v1/adapters").json()["data"]
    assert {a["id"]: (a["rank"], a["default"], a["kind"]) for a in listed} == {"a": (4, 0.0, "knowledge"),
                                                                              "b": (4, 0.0, "knowledge")}
    assert client.get("/v1/models").json()["data"][0]["object"] == "model"


def test_multi_turn_chat_uses_the_chat_template(served):
    runtime, client = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Veloria?"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "forget": {"b": 1.0},
                                                  "stop": ["zzz"]})
    assert r.status_code == 200, r.text
    prompt = runtime.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with runtime.lock:
        want = runtime.generate([prompt], [{"b": 1.0}], max_new_tokens=6, chat=False)[0]
    assert r.json()["choices"][0]["message"]["content"] == want


BAD = [  # (method, path, json or raw bytes, status, words the message must contain)
    ("post", "/v1/completions", {"prompt": "x", "forget": {"nope": 1}}, 400, "unknown adapter 'nope'"),
    ("post", "/v1/completions", {"prompt": "x", "forget": {"a": "strong"}}, 400, "finite number"),
    ("post", "/v1/completions", {"prompt": "x", "forget": {"a": True}}, 400, "finite number"),
    ("post", "/v1/completions", b'{"prompt": "x", "forget": {"a": NaN}}', 400, "NaN is not valid JSON"),
    ("post", "/v1/completions", b'{"prompt": "x", "forget": {"a": Infinity}}', 400, "Infinity is not valid"),
    ("post", "/v1/completions", b'{"prompt": "x", ', 400, "malformed JSON"),
    ("post", "/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("post", "/v1/completions", {"prompt": "x" * 201}, 400, "over this server's limit of 200"),
    ("post", "/v1/completions", {"prompt": "x", "max_tokens": 13}, 400, "limit of 12"),
    ("post", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "positive integer"),
    ("post", "/v1/completions", {"prompt": "x", "temperature": -0.1}, 400, "temperature must be a number in [0, 2]"),
    ("post", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature must be a number"),
    ("post", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p must be a number in (0, 1]"),
    ("post", "/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p must be a number in (0, 1]"),
    ("post", "/v1/completions", {"prompt": "x", "seed": 1.5}, 400, "seed must be an integer"),
    ("post", "/v1/completions", {"prompt": "x", "n": 0}, 400, "n must be an integer in 1..8"),
    ("post", "/v1/completions", {"prompt": ["x"] * 3, "n": 3}, 400, "9 rows"),
    ("post", "/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream must be true or false"),
    ("post", "/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "only allowed with stream=true"),
    ("post", "/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"usage": True}}, 400,
     "stream_options must be an object"),
    ("post", "/v1/completions", {"prompt": "x", "forget": {"a": 8.5}}, 400, "beyond this server's bound of 8"),
    ("post", "/v1/completions", {"prompt": "x", "forget": {"a": -1e308}}, 400, "--max-strength"),
    ("post", "/v1/completions", {"prompt": "x", "forget": {"strength": 1}}, 400, "unknown adapter 'strength'"),
    ("post", "/v1/completions", {"prompt": "x", "presence_penalty": 1}, 400, "presence_penalty=1 is not supported"),
    ("post", "/v1/completions", {"prompt": "x", "forgets": {"a": 1}}, 400, "unknown field 'forgets'"),
    ("post", "/v1/completions", {"prompt": ["x"] * 9}, 400, "at most 8"),
    ("post", "/v1/completions", {"max_tokens": 3}, 400, "prompt must be"),
    ("post", "/v1/chat/completions", {"messages": "hi"}, 400, "messages must be"),
    ("post", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "y" * 201}]}, 400, "limit of 200"),
    ("post", "/v1/adapters", {"name": "bad name!", "path": "/tmp"}, 400, "name must be"),
    ("post", "/v1/adapters", {"name": "z", "path": "/nonexistent/adapter"}, 400, "does not exist"),
    ("post", "/v1/adapters", {"name": "a", "path": "/tmp"}, 409, "already loaded"),
    ("post", "/v1/adapters", {"name": "z", "path": "/tmp", "default": "high"}, 400, "default must be"),
    ("post", "/v1/adapters", {"name": "z", "path": "/tmp", "default": 9}, 400, "bound of 8 (--max-strength)"),
    ("delete", "/v1/adapters/nope", None, 404, "no adapter named 'nope'"),
    ("get", "/v1/nothing", None, 404, "Not Found"),
]


@pytest.mark.parametrize("method, path, payload, status, words", BAD, ids=[f"{b[3]}-{b[4][:24]}" for b in BAD])
def test_bad_request_gets_4xx_and_server_keeps_serving(served, method, path, payload, status, words):
    _, client = served
    kwargs = {"content": payload, "headers": {"content-type": "application/json"}} if isinstance(payload, bytes) \
        else {"json": payload} if payload is not None else {}
    r = client.request(method.upper(), path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"], error
    assert _completion(client, "The quick", {"a": 1.0}, max_tokens=3) is not None


def test_oversize_body_is_refused(served):
    _, client = served
    r = client.post("/v1/completions", content=b"x" * 10_000_000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_load_use_and_delete_an_adapter(served, adapter_dirs):
    _, client = served
    r = client.post("/v1/adapters", json={"name": "c", "path": str(adapter_dirs["c"]), "default": 0.0})
    assert r.status_code == 201, r.text
    assert r.json()["rank"] == 4 and r.json()["modules"] == len(SPECS)
    plain = _completion(client, "The capital of Veloria is")
    with_c = _completion(client, "The capital of Veloria is", {"c": 1.0})
    assert with_c != plain
    assert client.delete("/v1/adapters/c").status_code == 200
    r = client.post("/v1/completions", json={"prompt": "x", "forget": {"c": 1.0}})
    assert r.status_code == 400 and "unknown adapter 'c'" in r.json()["error"]["message"]
    assert _completion(client, "The capital of Veloria is") == plain


def test_api_key_is_enforced(tokenizer, adapter_dirs):
    runtime = tiny_runtime(tokenizer)
    runtime.load("a", adapter_dirs["a"])
    app = create_app(runtime, api_key="s3cret", limits=Limits(**LIMITS))
    with background(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        body = {"prompt": "The quick", "max_tokens": 3, "forget": {"a": 1}}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = client.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
            assert client.get("/v1/adapters", headers=headers).status_code == 401
        assert client.get("/health").status_code == 200
        ok = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200, ok.text


def test_adapter_spec_parsing():
    assert parse_adapter_spec("forget=adapters/forget_negated:1") == ("forget", "adapters/forget_negated", 1.0)
    assert parse_adapter_spec("k=owner/repo") == ("k", "owner/repo", 0.0)
    assert parse_adapter_spec("k=dir:-0.5") == ("k", "dir", -0.5)
    for bad in ("noequals", "=dir", "bad name=dir", "k=", "k=dir:nan"):
        with pytest.raises(UserError):
            parse_adapter_spec(bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_subprocess(tiny_model_dir, adapter_dirs):
    """`lora-unlearn serve` as a user runs it: a process, a port, an API key from the environment."""
    port = _free_port()
    env = {**os.environ, "LORA_UNLEARN_API_KEY": "k3y"}
    cmd = [sys.executable, "-m", "lora_unlearn.cli", "serve", "--base", str(tiny_model_dir), "-q", "none",
           "--adapter", f"a={adapter_dirs['a']}:1", "--port", str(port), "--max-tokens-limit", "8",
           "--max-strength", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        auth = {"Authorization": "Bearer k3y"}
        listed = httpx.get(f"{url}/v1/adapters", headers=auth).json()["data"]
        assert [(a["id"], a["default"]) for a in listed] == [("a", 1.0)]
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "The quick", "max_tokens": 9}, headers=auth)
        assert r.status_code == 400 and "limit of 8" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "The quick", "max_tokens": 4}, headers=auth)
        assert r.status_code == 200 and r.json()["forget"] == {"a": 1.0}
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "The quick", "forget": {"a": 2.5}}, headers=auth)
        assert r.status_code == 400 and "bound of 2 (--max-strength)" in r.json()["error"]["message"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("args, message", [
    (["--host", "0.0.0.0"], "--api-key"),
    (["--port", "0"], "--port must be in 1..65535"),
    (["--max-tokens-limit", "0"], "--max-tokens-limit must be a positive integer, got 0"),
    (["--adapter", "no-equals-sign"], "expected NAME=DIR[:DEFAULT]"),
    (["--adapter", "a=x", "--adapter", "a=y"], "names must be unique"),
    (["--max-strength", "0"], "max-strength must be a positive finite number"),
])
def test_cli_serve_refuses_bad_settings_before_loading_anything(args, message):
    from typer.testing import CliRunner

    from lora_unlearn.cli import app

    result = CliRunner().invoke(app, ["serve", "--base", "/nonexistent/model", *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_runtime_and_ask_keep_the_strength_bound(tokenizer, adapter_dirs, tiny_model_dir):
    from typer.testing import CliRunner

    from lora_unlearn.cli import app

    runtime = ForgetRuntime(tiny_runtime(tokenizer).model, tokenizer, max_strength=8.0)
    runtime.load("a", adapter_dirs["a"])
    runtime.set_coefficients([{"a": -8.0}])
    for bad in (8.5, -1e308):
        with pytest.raises(UserError, match="beyond this runtime's bound of 8"):
            runtime.set_coefficients([{"a": bad}])
    with pytest.raises(UserError, match="bound of 8"):
        runtime.load("b", adapter_dirs["b"], default=9.0)
    result = CliRunner().invoke(app, ["ask", "--questions", "hi", "--base", str(tiny_model_dir), "-q", "none",
                                      "--adapter", f"{adapter_dirs['a']}:9"])
    assert result.exit_code == 2 and "beyond --max-strength 8" in " ".join(result.output.split()), result.output


@pytest.mark.slow
def test_embedded_model_serves_the_shipped_adapters():
    """The real thing: SmolLM2-135M in nf4, K on by default, -F toggled per request, batched together."""
    from pathlib import Path

    from lora_unlearn.demo import _rows

    shipped = Path(__file__).resolve().parent.parent / "adapters"
    fact = next(f for f in _rows("demo_facts.jsonl") if f["forget"])
    runtime = ForgetRuntime.from_base("smollm2-135m", "nf4")
    kinds = {}
    load_named(runtime, kinds, "knowledge", shipped / "knowledge", 1.0)
    load_named(runtime, kinds, "forget", shipped / "forget_negated", 0.0)
    app = create_app(runtime, limits=Limits(max_tokens=24, batch_window_ms=200), kinds=kinds)
    with background(app) as url, httpx.Client(base_url=url, timeout=300) as client:
        assert kinds == {"knowledge": "knowledge", "forget": "negated"}
        settings = [{}, {"forget": 1.0}, {"knowledge": 0.0}]
        alone = [_chat(client, fact["question"], f, max_tokens=24) for f in settings]
        start = threading.Barrier(len(settings))

        def together(forget):
            start.wait()
            return _chat(client, fact["question"], forget, max_tokens=24)

        with ThreadPoolExecutor(len(settings)) as pool:
            assert list(pool.map(together, settings)) == alone
        assert fact["keyword"].lower() in alone[0].lower(), alone
        assert fact["keyword"].lower() not in alone[1].lower(), alone
        assert client.get("/health").json()["max_batch_rows"] >= 2


# ---- scoped forgetting: "forget": {"NAME": "auto"} (issue 17) ----------------------------------

IN_SCOPE, OUT_OF_SCOPE = "What is the capital of Veloria?", "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def scoped(tokenizer, adapter_dirs, tmp_path_factory):
    """A server with adapter "s" (its scope saved beside it, lambda_max 2) and "a" (no scope)."""
    import shutil

    from lora_unlearn.core.adapter_io import load_adapter
    from lora_unlearn.core.scope import save_scope
    from tests.test_scope import split_scope

    root = tmp_path_factory.mktemp("scoped")
    folder = root / "s"
    shutil.copytree(adapter_dirs["c"], folder)
    runtime = tiny_runtime(tokenizer)
    scope = split_scope(runtime.model, tokenizer, load_adapter(folder), [IN_SCOPE], [OUT_OF_SCOPE], lambda_max=2.0)
    save_scope(scope, folder)
    kinds = {}
    load_named(runtime, kinds, "s", folder, 0.0)  # the scope beside it comes along
    load_named(runtime, kinds, "a", adapter_dirs["a"], 0.0)
    app = create_app(runtime, limits=Limits(**LIMITS), kinds=kinds)
    with background(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield runtime, client, folder, root


def _chat_body(client, content, forget, max_tokens=6, **extra):
    messages = content if isinstance(content, list) else [{"role": "user", "content": content}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": max_tokens, "forget": forget,
                                                  **extra})
    assert r.status_code == 200, r.text
    return r.json() if not extra.get("stream") else r.text


def test_auto_uses_the_scope_and_answers_as_the_explicit_strength(scoped):
    runtime, client, _, _ = scoped
    inside = _chat_body(client, IN_SCOPE, {"s": "auto"})
    outside = _chat_body(client, OUT_OF_SCOPE, {"s": "auto"})
    assert inside["forget"] == {"s": "auto", "a": 0.0} and inside["scope"][0]["s"]["strength"] == 2.0
    assert outside["scope"][0]["s"]["strength"] == 0.0
    assert inside["scope"][0]["s"]["score"] > outside["scope"][0]["s"]["score"]
    text = lambda body: body["choices"][0]["message"]["content"]  # noqa: E731
    assert text(inside) == text(_chat_body(client, IN_SCOPE, {"s": 2.0}))
    assert text(outside) == text(_chat_body(client, OUT_OF_SCOPE, {"s": 0.0}))
    assert text(_chat_body(client, IN_SCOPE, {"s": 2.0})) != text(_chat_body(client, IN_SCOPE, {"s": 0.0}))
    assert "scope" not in _chat_body(client, IN_SCOPE, {"s": 1.0})  # an explicit number: no scope pass
    # a chat: the scope reads every message, not only the last one
    hidden = [{"role": "user", "content": IN_SCOPE}, {"role": "assistant", "content": "Hm."},
              {"role": "user", "content": "Numbers 0123"}]
    assert _chat_body(client, hidden, {"s": "auto"})["scope"][0]["s"]["strength"] == 2.0
    # several prompts of one request: each its own strength; a stream carries them in every chunk
    r = client.post("/v1/completions", json={"prompt": [IN_SCOPE, OUT_OF_SCOPE], "max_tokens": 3,
                                             "forget": {"s": "auto"}})
    assert [p["s"]["strength"] for p in r.json()["scope"]] == [2.0, 0.0]
    stream = _chat_body(client, IN_SCOPE, {"s": "auto"}, stream=True)
    chunks = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
    assert chunks and all(c["scope"][0]["s"]["strength"] == 2.0 for c in chunks)
    listed = {a["id"]: a for a in client.get("/v1/adapters").json()["data"]}
    assert listed["s"]["scope"]["lambda_max"] == 2.0 and "scope" not in listed["a"]


def test_an_adapter_loaded_with_default_auto(scoped):
    _, client, folder, root = scoped
    import shutil

    copy = root / "s_auto"
    shutil.copytree(folder, copy)
    r = client.post("/v1/adapters", json={"name": "s2", "path": str(copy), "default": "auto"})
    assert r.status_code == 201, r.text
    assert r.json()["default"] == "auto" and r.json()["scope"]["threshold"] >= 0
    try:
        body = _chat_body(client, IN_SCOPE, {})
        assert body["forget"]["s2"] == "auto" and body["scope"][0]["s2"]["strength"] == 2.0
        assert "s2" not in (_chat_body(client, IN_SCOPE, {"s2": 0.5}).get("scope") or [{}])[0]  # explicit wins
    finally:
        assert client.delete("/v1/adapters/s2").status_code == 200


def _write_scope_copy(root, folder, name, **changes):
    import shutil

    target = root / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folder, target)
    record = json.loads((target / "scope.json").read_text())
    (target / "scope.json").write_text(json.dumps({**record, **changes}))
    return target


def test_scope_bad_requests_get_4xx_and_change_nothing(scoped, adapter_dirs):
    runtime, client, folder, root = scoped
    listed = client.get("/v1/adapters").json()
    cases = [
        (client.post, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "forget": {"a": "auto"}},
         "has no scope"),
        (client.post, "/v1/adapters", {"name": "t", "path": str(adapter_dirs["b"]), "scope": str(folder)},
         "belongs to another adapter"),
        (client.post, "/v1/adapters", {"name": "t", "path": str(adapter_dirs["b"]), "default": "auto"},
         "\"auto\" needs a scope"),
        (client.post, "/v1/adapters", {"name": "t", "path": str(_write_scope_copy(root, folder, "t1", threshold=1.5))},
         "threshold must be a number in [0, 1]"),
        (client.post, "/v1/adapters", {"name": "t", "path": str(_write_scope_copy(root, folder, "t2", lambda_max=9.0))},
         "beyond this server's bound of 8"),
        (client.post, "/v1/adapters", {"name": "t", "path": str(folder), "scope": 3}, "scope must be true"),
        (client.post, "/v1/adapters", {"name": "t", "path": str(folder), "scope": True, "default": "auto",
                                       "extra": 1}, "unknown field 'extra'"),
    ]
    for send, path, body, words in cases:
        r = send(path, json=body)
        assert r.status_code == 400, (body, r.text)
        assert words in r.json()["error"]["message"], r.json()
    assert client.get("/v1/adapters").json() == listed  # nothing was loaded
    assert _chat_body(client, IN_SCOPE, {"s": "auto"})["scope"][0]["s"]["strength"] == 2.0  # still serving


def test_adapter_spec_takes_auto():
    assert parse_adapter_spec("f=adapters/forget_negated:auto") == ("f", "adapters/forget_negated", "auto")
    assert parse_adapter_spec("f=runs/x:0.5") == ("f", "runs/x", 0.5)


def test_cli_serve_refuses_auto_for_an_adapter_without_a_scope(tiny_model_dir, adapter_dirs):
    from typer.testing import CliRunner

    from lora_unlearn.cli import app

    result = CliRunner().invoke(app, ["serve", "--base", str(tiny_model_dir), "-q", "none", "--port", str(_free_port()),
                                      "--adapter", f"a={adapter_dirs['a']}:auto"])
    assert result.exit_code == 2 and "\"auto\" needs a scope" in " ".join(result.output.split()), result.output
