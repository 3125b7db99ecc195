"""`fastadapters serve`: a real uvicorn server on a free port, driven by the official `openai` client and
httpx. Every response equals its request run alone (the adapter applied with fastadapters, HF generate,
float64)."""

import json
import os
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import fastadapters  # noqa: E402
from fastadapters.demo import build_model  # noqa: E402
from fastadapters.serving.server import build_app, demo_server  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """(base url, Server, adapter root): the demo server (float64) with an API key, serving in a thread."""
    root = tmp_path_factory.mktemp("adapters")
    server = demo_server(3, dtype=torch.float64, api_key=KEY, adapter_root=str(root), request_timeout=30)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    http = uvicorn.Server(uvicorn.Config(build_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not http.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", server, root
    http.should_exit = True
    thread.join(timeout=30)


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def alone(server, adapter, prompt_ids, max_tokens) -> str:
    """The text of the request run alone: the adapter applied to a copy of the base, HF generate, greedy."""
    model = build_model(len(server.tokenizer), hidden=64, layers=2, seed=0).to(torch.float64)  # the demo base
    if adapter is not None:
        entry = server.pool._entries[adapter]
        model = fastadapters.apply(model, entry.config)
        fastadapters.io.load_adapter_state(model, entry.state, adapter)
    out = model.eval().generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                                eos_token_id=None, pad_token_id=0)  # fmt: skip
    return server.tokenizer.decode(out[0, len(prompt_ids) :].tolist(), skip_special_tokens=True)


def test_completions_and_chat_equal_each_request_alone(live):
    url, server, _ = live
    c = client(url)
    models = {m.id: m for m in c.models.list().data}
    assert {getattr(m, "type", None) for m in models.values()} == {"base", "lora", "bottleneck", "prefix"}
    for model in models:
        adapter = None if model == server.base_name else model
        r = c.completions.create(model=model, prompt="the quick", max_tokens=6)
        ids = server.tokenizer("the quick")["input_ids"]
        assert r.choices[0].text == alone(server, adapter, ids, 6), model
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 6
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model=model, prompt="the quick", max_tokens=6, stream=True))  # fmt: skip
        assert streamed == r.choices[0].text
    messages = [{"role": "user", "content": "lazy dog"}]
    chat = c.chat.completions.create(model="demo-prefix-2", messages=messages, max_tokens=5)
    pieces = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="demo-prefix-2", messages=messages, max_tokens=5, stream=True)]  # fmt: skip
    assert chat.choices[0].message.content == "".join(pieces) and chat.choices[0].message.role == "assistant"
    ids = server.chat_ids(messages)
    assert chat.choices[0].message.content == alone(server, "demo-prefix-2", ids, 5)


def test_concurrent_clients_on_different_adapters(live):
    url, server, _ = live
    c = client(url)
    work = [(m, p) for m in ("demo-lora-0", "demo-bottleneck-1", "demo-prefix-2", server.base_name)
            for p in ("fox", "over the")]  # fmt: skip
    results = {}

    def ask(model, prompt):
        results[(model, prompt)] = (
            c.completions.create(model=model, prompt=prompt, max_tokens=8).choices[0].text
        )

    threads = [threading.Thread(target=ask, args=w) for w in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for model, prompt in work:
        adapter = None if model == server.base_name else model
        assert results[(model, prompt)] == alone(server, adapter, server.tokenizer(prompt)["input_ids"], 8)


def test_load_and_unload_while_a_client_streams(live):
    url, server, root = live
    c = client(url)
    entry = server.pool._entries["demo-lora-0"]
    model = fastadapters.apply(build_model(len(server.tokenizer), hidden=64, layers=2, seed=0), entry.config)
    model = model.to(torch.float64)
    fastadapters.io.load_adapter_state(model, entry.state, "copy")
    fastadapters.save(model, str(root / "copy"))
    stream = c.completions.create(model="demo-bottleneck-1", prompt="jumps", max_tokens=20, stream=True)
    first = next(iter(stream)).choices[0].text
    r = httpx.post(
        f"{url}/v1/load_lora_adapter", json={"lora_name": "copy", "lora_path": "copy"}, headers=AUTH
    )
    assert r.status_code == 200, r.text
    copied = c.completions.create(model="copy", prompt="the quick", max_tokens=6).choices[0].text
    assert (
        copied == c.completions.create(model="demo-lora-0", prompt="the quick", max_tokens=6).choices[0].text
    )
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "copy"}, headers=AUTH)
    assert r.status_code == 200 and "copy" not in [m.id for m in c.models.list().data]
    rest = "".join(ch.choices[0].text for ch in stream)
    ids = server.tokenizer("jumps")["input_ids"]
    assert first + rest == alone(server, "demo-bottleneck-1", ids, 20)


def error_of(response) -> dict:
    body = response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    return body["error"]


def test_bad_input_gets_its_status_and_the_server_keeps_serving(live, tmp_path):
    url, server, root = live
    post = lambda path, **kw: httpx.post(f"{url}{path}", headers={**AUTH, **kw.pop("headers", {})}, **kw)  # noqa: E731
    assert post("/v1/completions", content=b"{not json").status_code == 400
    r = post("/v1/completions", json={"model": "nope", "prompt": "a"})
    assert r.status_code == 404 and error_of(r)["param"] == "model"
    for bad in (0, -1, 10**6, "8", True):
        r = post("/v1/completions", json={"model": "demo-base", "prompt": "a", "max_tokens": bad})
        assert r.status_code == 400 and error_of(r)["param"] == "max_tokens", bad
    r = post("/v1/completions", json={"model": "demo-base", "prompt": "a", "temperature": 5})
    assert r.status_code == 400 and error_of(r)["param"] == "temperature"
    r = post("/v1/completions", json={"model": "demo-base", "prompt": "the " * 400, "max_tokens": 2})
    assert r.status_code in (400, 413)
    r = post("/v1/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413
    # Loads: outside the root (.., absolute, a symlink out), a corrupt folder, an adapter of another model.
    (root / "escape").symlink_to(tmp_path)
    for path in ("../x", str(tmp_path), "escape"):
        r = post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
        assert r.status_code == 403, path
    (root / "corrupt").mkdir()
    (root / "corrupt" / "adapter_config.json").write_text("{not json")
    r = post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "corrupt"})
    assert r.status_code == 400 and "x" not in server.pool.names()
    other = fastadapters.apply(build_model(50, hidden=32), fastadapters.LoraConfig(r=2))
    fastadapters.save(other, str(root / "other"))
    r = post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "other"})
    assert r.status_code == 400 and "x" not in server.pool.names()
    # Authentication: every endpoint but /health.
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200
    # A full queue: 429 at once, with Retry-After.
    server.max_queue = 0
    try:
        r = post("/v1/completions", json={"model": "demo-base", "prompt": "a"})
        assert r.status_code == 429 and r.headers["retry-after"]
    finally:
        server.max_queue = 256
    r = post("/v1/completions", json={"model": "demo-base", "prompt": "a", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    metrics = httpx.get(f"{url}/metrics", headers=AUTH).text
    assert "fastadapters_requests_total" in metrics and "fastadapters_time_to_first_token_seconds" in metrics


def test_a_disconnect_frees_the_slot(live):
    url, server, _ = live
    body = {"model": "demo-lora-0", "prompt": "fox", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                assert json.loads(line[6:])["choices"]
                break
    deadline = time.time() + 30
    while server.engine.has_work() and time.time() < deadline:
        time.sleep(0.05)
    assert not server.engine.has_work()
    assert server.engine.cache.free_blocks == server.engine.cache.num_blocks
    assert all(slot[3] == 0 for slot in server.pool._resident.values())  # no hold on any adapter


def test_cli_serve_refuses_bad_options(capsys):
    from fastadapters import cli

    assert cli.main(["serve"]) == 2
    assert "give --base-model" in capsys.readouterr().err
    assert cli.main(["serve", "--base-model", os.devnull, "--adapter", "noequals"]) == 2


def test_load_generator_against_the_live_server(live):
    import asyncio

    from bench import load

    url, _, _ = live
    report = asyncio.run(load.run(url, rate=20.0, requests=6, api_key=KEY, seed=1))
    assert report["completed"] == 6 and not report["errors"]
    assert report["output_tokens_per_s"] > 0 and report["ttft_p50_ms"] > 0


def test_sigterm_drains_running_requests_then_exits_0(tmp_path):
    import signal
    import subprocess
    import sys

    port_sock = socket.socket()
    port_sock.bind(("127.0.0.1", 0))
    port = port_sock.getsockname()[1]
    port_sock.close()
    cmd = [sys.executable, "-m", "fastadapters.cli", "serve", "--demo", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"model": "demo-lora-0", "prompt": "fox", "max_tokens": 40, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        usage = None
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            next(lines)  # the request is running
            proc.send_signal(signal.SIGTERM)
            for line in lines:
                if line.startswith("data: {") and json.loads(line[6:]).get("usage"):
                    usage = json.loads(line[6:])["usage"]
        assert usage is not None and usage["completion_tokens"] >= 1  # it finished, it was not cut
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
