"""``deltatune serve`` through real HTTP on 127.0.0.1: OpenAI's client and httpx against a server
on an ephemeral port, streaming, every error case, hot loading under load, LRU, shutdown."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx2")  # httpx under its current name (openai and huggingface_hub use it)
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import deltatune as dt  # noqa: E402
from deltatune.serve import Adapters, Engine  # noqa: E402
from deltatune.serve.app import create_app  # noqa: E402
from serving import build_served, offline_greedy  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


class ThreadServer:
    """uvicorn serving ``app`` on 127.0.0.1 and a free port, in a thread of the test process."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=60)


def make_server(model_dir, folders, root=None, **options):
    model, tokenizer = dt.load_model(model_dir)
    adapters = Adapters(model, root, options.pop("max_loaded", 8))
    for name, folder in folders.items():
        adapters.add(name, folder)
    engine = Engine(model, tokenizer, adapters, max_batch=options.pop("max_batch", 16),
                    max_queue=options.pop("max_queue", 64))
    return ThreadServer(create_app(engine, **options)), engine


@pytest.fixture(scope="module")
def served(tmp_path_factory, default_tokenizer):
    return build_served(tmp_path_factory.mktemp("http"), default_tokenizer)


@pytest.fixture(scope="module")
def server(served):
    model_dir, folders = served
    srv, engine = make_server(model_dir, {k: v for k, v in folders.items() if k not in ("loha", "wide")},
                              root=folders["lora"].parent, context=256)
    with srv:
        srv.engine = engine
        yield srv


def client(srv, key="none"):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=120)


def expected_text(model_dir, folder, tokenizer, prompt_ids, max_tokens):
    tokens = offline_greedy(model_dir, folder, prompt_ids, max_tokens)
    return tokenizer.decode(tokens, skip_special_tokens=True), tokens


def chat_ids(tokenizer, content):
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_models_lists_base_and_each_adapter_with_its_method(server):
    models = {m.id: m for m in client(server).models.list().data}
    assert set(models) == {"base", "lora", "dora", "ia3", "prompt"}
    assert models["dora"].model_extra["method"] == "LORA" and models["lora"].model_extra["rank"] == 4
    assert models["prompt"].model_extra["method"] == "PROMPT_TUNING"
    assert models["ia3"].model_extra["digest"].startswith("sha256:")
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_completion_equals_offline_greedy_with_usage(server, served, default_tokenizer):
    model_dir, folders = served
    prompt = "The quick brown fox"
    got = client(server).completions.create(model="lora", prompt=prompt, max_tokens=10, temperature=0)
    ids = default_tokenizer(prompt)["input_ids"]
    text, tokens = expected_text(model_dir, folders["lora"], default_tokenizer, ids, 10)
    assert got.choices[0].text == text
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == len(tokens)
    assert got.choices[0].finish_reason == ("stop" if tokens[-1] == default_tokenizer.eos_token_id else "length")


def test_streamed_chat_equals_whole_answer_and_ends_with_done(server, served, default_tokenizer):
    model_dir, folders = served
    c = client(server)
    messages = [{"role": "user", "content": "Say something about rivers."}]
    whole = c.chat.completions.create(model="prompt", messages=messages, max_tokens=12, temperature=0)
    chunks = list(c.chat.completions.create(model="prompt", messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    text, _ = expected_text(model_dir, folders["prompt"], default_tokenizer,
                            chat_ids(default_tokenizer, messages[0]["content"]), 12)
    assert streamed == text
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": "base", "prompt": "Hi", "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"


def test_concurrent_requests_over_adapters_each_equal_offline(server, served, default_tokenizer):
    model_dir, folders = served
    names = ["base", "lora", "dora", "ia3", "prompt", "lora", "base", "dora"]
    prompts = [f"Question {i}: what comes after {i}?" for i in range(len(names))]
    c = client(server)
    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(lambda job: c.completions.create(model=job[0], prompt=job[1], max_tokens=8,
                                                                 temperature=0).choices[0].text,
                                zip(names, prompts)))
    for name, prompt, answer in zip(names, prompts, answers):
        folder = None if name == "base" else folders[name]
        assert answer == expected_text(model_dir, folder, default_tokenizer, default_tokenizer(prompt)["input_ids"],
                                       8)[0]


def test_n_logprobs_stop_and_seed(server):
    c = client(server)
    got = c.chat.completions.create(model="lora", messages=[{"role": "user", "content": "Count: one two"}],
                                    max_completion_tokens=6, temperature=0, n=2, logprobs=True, top_logprobs=3)
    assert len(got.choices) == 2 and got.choices[0].message.content == got.choices[1].message.content
    entries = got.choices[0].logprobs.content
    assert len(entries) >= 1 and all(len(e.top_logprobs) == 3 for e in entries)
    assert all(e.logprob <= 0 and abs(e.logprob - e.top_logprobs[0].logprob) < 1e-5 for e in entries)  # greedy
    legacy = c.completions.create(model="base", prompt="abc", max_tokens=4, temperature=0, logprobs=2)
    assert len(legacy.choices[0].logprobs.token_logprobs) == len(legacy.choices[0].logprobs.tokens)
    sampled = [c.completions.create(model="dora", prompt="Once", max_tokens=8, temperature=1.0, seed=3).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    full = c.completions.create(model="base", prompt="abc", max_tokens=8, temperature=0).choices[0].text
    if len(full) > 4:
        cut = c.completions.create(model="base", prompt="abc", max_tokens=8, temperature=0, stop=[full[2:4]])
        assert cut.choices[0].text == full[:full.index(full[2:4])] and cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "base"}, 400, "prompt"),
    ({"model": "base", "prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"model": "base", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "base", "prompt": "x", "max_tokens": 300}, 400, "max_tokens"),  # beyond the 256 context
    ({"model": "base", "prompt": "x", "n": "two"}, 400, "n"),
    ({"model": "base", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
])
def test_bad_requests_get_openai_errors_naming_the_field(server, body, status, param):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_malformed_json_and_long_prompts(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "base", "messages": [{"role": "robot"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
    r = httpx.post(server.url + "/v1/completions", json={"model": "base", "prompt": "word " * 400})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


def test_hot_loading_under_concurrent_requests(server, served, default_tokenizer):
    model_dir, folders = served
    c = client(server)
    prompt = "Tell me about hot loading"
    ids = default_tokenizer(prompt)["input_ids"]
    want_lora = expected_text(model_dir, folders["lora"], default_tokenizer, ids, 150)[0]
    want_loha = expected_text(model_dir, folders["loha"], default_tokenizer, ids, 8)[0]
    engine = server.engine
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(lambda: c.completions.create(model="lora", prompt=prompt, max_tokens=150,
                                                            temperature=0).choices[0].text) for _ in range(3)]
        deadline = time.monotonic() + 60
        while engine.busy() < 3:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        # unloading "lora" while its requests run: they finish on it, new ones get 404
        r = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "lora"}, timeout=60)
        assert r.status_code == 200 and "removed" in r.text
        retired = [i for i in engine.adapters.instances.values() if i.retired]
        assert engine.busy() >= 1 and retired, "the unload should happen while requests on it run"
        r = httpx.post(server.url + "/v1/adapters", json={"name": "hot", "path": "loha"}, timeout=60)
        assert r.status_code == 200 and r.json()["method"] == "LOHA" and r.json()["changed"]
        hot = c.completions.create(model="hot", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
        assert [f.result() for f in running] == [want_lora] * 3
        assert not [i for i in engine.adapters.instances.values() if i.retired]  # deleted after its last request
    assert hot == want_loha
    assert httpx.post(server.url + "/v1/completions", json={"model": "lora", "prompt": "x"}).status_code == 404
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "lora", "lora_path": "lora"}, timeout=60)
    assert r.status_code == 200 and "added" in r.text
    assert "hot" in {m.id for m in c.models.list().data}
    assert httpx.delete(server.url + "/v1/adapters/hot", timeout=60).status_code == 200
    assert "hot" not in {m.id for m in c.models.list().data}
    assert httpx.delete(server.url + "/v1/adapters/hot", timeout=60).status_code == 404


def test_hot_loading_refuses_folders_outside_links_and_pickles(server, served, tmp_path):
    _, folders = served
    root = folders["lora"].parent
    outside = tmp_path / "outside"
    shutil.copytree(folders["lora"], outside)
    (root / "link").symlink_to(outside)
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(folders["lora"] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    try:
        for path, words in ((str(outside), "outside"), ("../../outside", "outside"), ("link", "outside"),
                            ("pickled", "safetensors"), ("missing", "does not exist")):
            r = httpx.post(server.url + "/v1/adapters", json={"name": "x", "path": path}, timeout=30)
            assert r.status_code == 400 and words in r.json()["error"]["message"], (path, r.text)
            assert r.json()["error"]["param"] == "path"
    finally:
        (root / "link").unlink()
        shutil.rmtree(pickled)


def test_lru_eviction_and_reload_over_http(served, default_tokenizer):
    model_dir, folders = served
    srv, engine = make_server(model_dir, {k: folders[k] for k in ("lora", "dora", "loha")}, max_loaded=2)
    prompt = "Evict me"
    ids = default_tokenizer(prompt)["input_ids"]
    with srv:
        c = client(srv)
        assert httpx.post(srv.url + "/v1/adapters", json={"name": "x", "path": "y"}).status_code == 404  # off
        for name in ("loha", "lora", "dora", "loha"):
            text = c.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0).choices[0].text
            assert text == expected_text(model_dir, folders[name], default_tokenizer, ids, 6)[0]
        loaded = {m.id: m.model_extra["loaded"] for m in c.models.list().data if m.id != "base"}
    assert loaded == {"lora": False, "dora": True, "loha": True}


def test_api_key_and_full_queue(served):
    model_dir, folders = served
    srv, engine = make_server(model_dir, {}, api_key="sekrit", max_batch=1, max_queue=1, context=256)
    with srv:
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        r = httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        c = client(srv, key="sekrit")
        gate = threading.Event()
        engine.call(gate.wait)  # the engine waits between steps, so requests stay queued
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(lambda: c.completions.create(model="base", prompt="go", max_tokens=5, temperature=0))
            deadline = time.monotonic() + 60
            while engine.busy() < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r = httpx.post(srv.url + "/v1/completions", json={"model": "base", "prompt": "x"},
                           headers={"Authorization": "Bearer sekrit"})
            gate.set()
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            assert queued.result().choices[0].finish_reason in ("stop", "length")


def test_client_leaving_mid_stream_frees_its_slot(server):
    engine = server.engine
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": "base", "prompt": "Keep going", "max_tokens": 200, "temperature": 0,
                            "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    steps, deadline = engine.steps, time.monotonic() + 20
    while engine.busy():
        assert time.monotonic() < deadline, "the abandoned request kept its row"
        time.sleep(0.05)
    assert engine.steps - steps < 150  # freed long before its 200 tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_requests_in_flight_then_exits(served, tmp_path):
    model_dir, _ = served
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "deltatune", "serve", "--model", str(model_dir), "--port", str(port),
                             "--drain-timeout", "60"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
                time.sleep(0.2)
        lines = []
        with httpx.stream("POST", url + "/v1/completions", timeout=120,
                          json={"model": "base", "prompt": "Drain", "max_tokens": 200, "temperature": 0,
                                "stream": True}) as r:
            for line in r.iter_lines():
                if line and not lines:
                    proc.send_signal(signal.SIGTERM)
                if line:
                    lines.append(line)
        assert lines[-1] == "data: [DONE]"
        finishes = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines
                    if x.startswith("data: {")]
        assert finishes[-1] in ("stop", "length")
        # uvicorn ends by raising the signal again once drained, as a process manager expects
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert len(finishes) > 10  # the signal came at the first event; the rest were still streamed
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_load_benchmark_smoke(served, tmp_path):
    """benchmarks/serve_load.py end to end on the tiny model (not timed): both modes answer every
    request once, equal to offline generation."""
    model_dir, _ = served
    out = tmp_path / "load.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--small", "--model", str(model_dir),
                    "--work", str(tmp_path / "work"), "--out", str(out)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    report = json.loads(out.read_text())
    for mode in ("mixed", "swap"):
        m = report["modes"][mode]
        assert m["answered"] == m["requests"] == 6 and not (m["dropped"] or m["duplicated"] or m["incomplete"])
        assert m["mismatched_offline"] == 0 and m["tokens_per_second"] > 0
    assert report["ratios"]["throughput_mixed_over_swap"] > 0
