"""The serving engine without HTTP: mixed batches equal offline generation token for token,
requests join a running batch, LRU eviction and reloading, a changed folder is never served stale."""

from __future__ import annotations

import threading

import pytest

import deltatune as dt
from deltatune.serve import Adapters, Engine, Sequence
from deltatune.serve.adapters import AdapterError, inside
from deltatune.serve.sampling import Sampling
from serving import build_served, offline_greedy
from tiny_models import randomize_adapter

MAX_NEW = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory, default_tokenizer):
    return build_served(tmp_path_factory.mktemp("served"), default_tokenizer)


def _engine(model_dir, folders, names=None, max_loaded=8, max_batch=16, mixed=True):
    model, tokenizer = dt.load_model(model_dir)
    adapters = Adapters(model, None, max_loaded)
    for name in names or folders:
        adapters.add(name, folders[name])
    engine = Engine(model, tokenizer, adapters, max_batch=max_batch, mixed=mixed)
    engine.start()
    return engine


def _run(engine, jobs: list[tuple], max_new: int = MAX_NEW) -> list[list[int]]:
    """Submit (adapter, prompt ids) jobs, greedy; the generated tokens of each."""
    results = [None] * len(jobs)
    done = threading.Semaphore(0)

    def sink_for(i, seq_ref):
        def sink(event):
            if "finish" in event:
                results[i] = (list(seq_ref[0].tokens), event["finish"], event.get("error"))
                done.release()
        return sink

    for i, (adapter, ids) in enumerate(jobs):
        ref = [None]
        ref[0] = Sequence(adapter, ids, Sampling(max_tokens=max_new, temperature=0.0), sink_for(i, ref))
        engine.submit([ref[0]])
    for _ in jobs:
        assert done.acquire(timeout=120), "a request never finished"
    for tokens, finish, error in results:
        assert error is None, error
        assert finish in ("stop", "length")
    return [r[0] for r in results]


def _record_passes(engine) -> list[set]:
    """The adapters of the rows of every forward pass ``engine`` runs from now on."""
    passes: list[set] = []
    original = engine._forward

    def recording(rows, soft_prompt, **inputs):
        passes.append({s.adapter for s in rows})
        return original(rows, soft_prompt, **inputs)

    engine._forward = recording
    return passes


def _prompts(tokenizer, count):
    texts = ["Name a colour.", "Tell me a story about a fox that", "2 + 2 =", "Why is the sky blue? Explain",
             "Write a haiku", "The capital of France", "List three fruits:", "Hello"]
    return [tokenizer(texts[i % len(texts)] * (1 + i % 3))["input_ids"] for i in range(count)]


def test_mixed_batch_equals_offline_generate_for_every_method(served, default_tokenizer):
    model_dir, folders = served
    names = [None, *folders]  # the base and every method, soft prompts included
    prompts = _prompts(default_tokenizer, 2 * len(names))
    jobs = [(names[i % len(names)], ids) for i, ids in enumerate(prompts)]
    engine = _engine(model_dir, folders)
    passes = _record_passes(engine)
    try:
        got = _run(engine, jobs)
    finally:
        engine.stop()
    for (adapter, ids), tokens in zip(jobs, got):
        want = offline_greedy(model_dir, None if adapter is None else folders[adapter], ids, MAX_NEW)
        assert tokens == want, f"adapter {adapter}: {tokens} != offline {want}"
    assert len(set(map(tuple, got))) > len(names), "the adapters should change the outputs"
    # LoRA, DoRA, LoHa, IA3 and the base shared forward passes; soft prompts ran apart
    assert any({None, "lora", "dora", "loha", "ia3"} <= p for p in passes)
    assert all(p == {"prompt"} for p in passes if "prompt" in p)


def test_requests_join_a_running_batch(served, default_tokenizer):
    """A second wave submitted while the first decodes joins it between steps (rows of different
    lengths and adapters in one cache) and still matches offline generation."""
    model_dir, folders = served
    engine = _engine(model_dir, folders, names=["lora", "dora", "ia3"])
    prompts = _prompts(default_tokenizer, 6)
    first = [("lora", prompts[0]), (None, prompts[1]), ("dora", prompts[2])]
    later = [("ia3", prompts[3]), ("lora", prompts[4]), (None, prompts[5])]
    results: dict = {}

    def wave(name, jobs, max_new):
        results[name] = _run(engine, jobs, max_new)

    try:
        t = threading.Thread(target=wave, args=("first", first, 24))
        t.start()
        while engine.steps < 3:  # the first wave is decoding
            threading.Event().wait(0.01)
        wave("later", later, MAX_NEW)
        t.join(timeout=120)
        assert engine.steps > 3
    finally:
        engine.stop()
    for jobs, got, max_new in ((first, results["first"], 24), (later, results["later"], MAX_NEW)):
        for (adapter, ids), tokens in zip(jobs, got):
            assert tokens == offline_greedy(model_dir, None if adapter is None else folders[adapter], ids, max_new)


def test_least_recently_used_adapter_is_unloaded_and_reloaded(served, default_tokenizer):
    model_dir, folders = served
    engine = _engine(model_dir, folders, names=["lora", "dora", "loha"], max_loaded=2)
    ids = _prompts(default_tokenizer, 1)[0]
    try:
        # adding a third evicted the least recently used one
        assert len(engine.adapters.instances) == 2 and not engine.adapters.loaded("lora")
        order = ["loha", "lora", "dora", "loha"]
        outputs = [_run(engine, [(name, ids)])[0] for name in order]
        assert len(engine.adapters.instances) <= 2
        assert engine.adapters.loaded("loha") and engine.adapters.loaded("dora") and not engine.adapters.loaded("lora")
        assert len(dt.adapter_ops.get_state(engine.model).configs) <= 2  # really gone from the model
    finally:
        engine.stop()
    for name, tokens in zip(order, outputs):
        assert tokens == offline_greedy(model_dir, folders[name], ids, MAX_NEW)


def test_changed_folder_is_reloaded_while_old_requests_finish(served, default_tokenizer, tmp_path):
    model_dir, folders = served
    model, _ = dt.load_model(model_dir)
    dt.load_adapter(model, folders["lora"], name="default", trainable=True)
    folder = dt.save_adapter(model, tmp_path / "live")
    engine = _engine(model_dir, {"live": folder})
    ids = _prompts(default_tokenizer, 1)[0]
    try:
        before = _run(engine, [("live", ids)])[0]
        old_key = engine.adapters.current["live"]
        randomize_adapter(model, seed=99)
        dt.save_adapter(model, folder)  # new content in the same folder
        entry, changed = engine.call(lambda: engine.adapters.add("live", folder)).result(timeout=60)
        assert changed and engine.adapters.current["live"] != old_key
        assert old_key not in engine.adapters.instances  # nothing ran on it: deleted at once
        after = _run(engine, [("live", ids)])[0]
        _, again = engine.call(lambda: engine.adapters.add("live", folder)).result(timeout=60)
        assert not again  # same content: nothing reloaded
    finally:
        engine.stop()
    assert before == offline_greedy(model_dir, folders["lora"], ids, MAX_NEW)
    assert after == offline_greedy(model_dir, folder, ids, MAX_NEW)
    assert after != before


def test_swapping_mode_serves_one_adapter_at_a_time(served, default_tokenizer):
    model_dir, folders = served
    engine = _engine(model_dir, folders, names=["lora", "dora"], mixed=False)
    seen = _record_passes(engine)
    prompts = _prompts(default_tokenizer, 4)
    jobs = [("lora", prompts[0]), ("dora", prompts[1]), (None, prompts[2]), ("lora", prompts[3])]
    try:
        got = _run(engine, jobs)
    finally:
        engine.stop()
    assert all(len(s) == 1 for s in seen)
    for (adapter, ids), tokens in zip(jobs, got):
        assert tokens == offline_greedy(model_dir, None if adapter is None else folders[adapter], ids, MAX_NEW)


def test_sampling_with_a_seed_repeats_and_stop_strings_cut(served, default_tokenizer):
    model_dir, folders = served
    engine = _engine(model_dir, folders, names=["lora"])
    ids = _prompts(default_tokenizer, 1)[0]
    texts = []

    def collect(sampling):
        out, done = [], threading.Event()

        def sink(event):
            out.append(event.get("text", ""))
            if "finish" in event:
                out.append(event["finish"])
                done.set()
        engine.submit([Sequence("lora", ids, sampling, sink)])
        assert done.wait(60)
        return "".join(out[:-1]), out[-1]

    try:
        for _ in range(2):
            texts.append(collect(Sampling(max_tokens=10, temperature=1.0, top_p=0.9, seed=7)))
        other = collect(Sampling(max_tokens=10, temperature=1.0, top_p=0.9, seed=8))
        greedy, _ = collect(Sampling(max_tokens=10, temperature=0.0))
        cut, finish = collect(Sampling(max_tokens=10, temperature=0.0, stop=[greedy[3:6]]))
    finally:
        engine.stop()
    assert texts[0] == texts[1] and texts[0] != other
    assert finish == "stop" and cut == greedy[:greedy.index(greedy[3:6])]


def test_hot_load_paths_stay_inside_the_folder(tmp_path):
    root = tmp_path / "adapters"
    (root / "a").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "escape").symlink_to(tmp_path / "outside")
    assert inside(root, "a") == (root / "a").resolve()
    for bad in ("../outside", str(tmp_path / "outside"), "escape", "missing"):
        with pytest.raises(AdapterError):
            inside(root, bad)
