"""Bad input, swept: every file deltatune reads, damaged in seeded random ways, either loads or
ends in ONE clear error of deltatune's own types whose message names the file; a failed
``load_adapter`` leaves the model exactly as it was.

Files: training data (JSONL, JSON, CSV, Parquet, a ``save_to_disk`` folder) through
``prepare_data`` -> ``DataError``; YAML configs through ``load_config`` -> ``ConfigError``;
``adapter_config.json`` and ``adapter_model.safetensors`` through ``load_adapter`` ->
``ValueError``/``FileNotFoundError`` (``NotImplementedError`` for PEFT features deltatune lacks).
Damage: empty, truncated, flipped bytes, non-UTF-8 bytes, NUL bytes, very long lines, garbage,
wrong types, unknown and mistyped keys, tensors of the wrong shape or dtype, a pickle in place of
safetensors, symbolic links out of the adapter folder. The counts are printed at the end.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import random
import shutil
import signal
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.data import DataConfig, DataError, prepare_data
from deltatune.train import ConfigError, load_config
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model

SEED = 1234
TIME_LIMIT_S = 20  # per input: a bad file must fail promptly, not hang
ADAPTER_ERRORS = (ValueError, FileNotFoundError, NotImplementedError)
COUNTS: Counter = Counter()  # (target, outcome) -> n; outcome: tried, loaded, clear, crash
CRASHES: dict[str, list[str]] = {}
LOADED: dict[str, list[str]] = {}  # inputs that loaded, listed with -v to judge whether they should


class _CountsReport:
    """Prints the counts in pytest's terminal summary (output during tests is captured)."""

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not COUNTS:
            return
        terminalreporter.write_sep("-", "bad input swept: inputs tried, loaded, clear errors, crashes")
        terminalreporter.write_line(f"{'target':<26}{'tried':>7}{'loaded':>8}{'clear errors':>14}{'crashes':>9}")
        targets = sorted({t for t, _ in COUNTS})
        for target in [*targets, "all"]:
            row = [sum(v for (t, o), v in COUNTS.items() if o == outcome and target in (t, "all"))
                   for outcome in ("tried", "loaded", "clear", "crash")]
            terminalreporter.write_line(f"{target:<26}{row[0]:>7}{row[1]:>8}{row[2]:>14}{row[3]:>9}")
        if terminalreporter.verbosity > 0:  # -v: which inputs loaded (should they?) and every crash
            for target, cases in sorted(LOADED.items()):
                terminalreporter.write_line(f"loaded, {target}: " + "; ".join(cases))
            for target, crashes in sorted(CRASHES.items()):
                for crash in crashes:
                    terminalreporter.write_line(f"crash, {target}: {crash[:400]}")


@pytest.fixture(scope="module", autouse=True)
def _setup(request, tmp_path_factory):
    """Keep ``datasets``' cache out of the user's home; print the counts at the end of the run."""
    import datasets

    if not request.config.pluginmanager.has_plugin("bad-input-counts"):
        request.config.pluginmanager.register(_CountsReport(), "bad-input-counts")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets-cache"))
        datasets.disable_progress_bars()
        yield
        datasets.enable_progress_bars()


class Hang(BaseException):
    """An input took longer than TIME_LIMIT_S (a BaseException, so that no library's
    ``except Exception`` turns it into an ordinary error)."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise Hang in the main thread after ``seconds`` (a no-op where SIGALRM is missing)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expire(*_):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _try(target: str, case: str, call: Callable[[], object], errors: tuple, named: str,
         unchanged: Callable[[], bool] = lambda: True) -> str:
    """Run ``call`` on one bad input and count the outcome: 'loaded', 'clear' (one error of
    ``errors`` whose message names ``named``, and nothing changed) or 'crash' (anything else,
    a hang included)."""
    COUNTS[target, "tried"] += 1
    problem = None
    start = time.monotonic()
    try:
        with warnings.catch_warnings(), _time_limit(TIME_LIMIT_S):
            warnings.simplefilter("ignore")  # unknown-field warnings are expected here
            call()
    except errors as err:
        if named not in str(err):
            problem = f"{type(err).__name__} whose message does not name {named}: {err}"
        elif err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
            problem = f"a chain of exceptions, not one: {err!r} from {err.__cause__ or err.__context__!r}"
        elif not unchanged():
            problem = f"failed but left a partial change: {err}"
        outcome = "clear"
    except (Exception, Hang) as err:  # noqa: BLE001 (the property: nothing else escapes)
        problem = f"{type(err).__name__}: {str(err)[:300]}"
    else:
        outcome = "loaded"
    if time.monotonic() - start >= TIME_LIMIT_S:  # a library may have turned the alarm into its own error
        problem = f"a hang, stopped after {TIME_LIMIT_S} s"
    if problem:
        outcome = "crash"
        CRASHES.setdefault(target, []).append(f"{case}: {problem}")
    elif outcome == "loaded":
        LOADED.setdefault(target, []).append(case[:80])
    COUNTS[target, outcome] += 1
    return outcome


def _assert_no_crash(target: str) -> None:
    crashes = CRASHES.get(target, [])
    assert not crashes, f"{len(crashes)} crash(es) of {COUNTS[target, 'tried']} inputs:\n" + "\n".join(crashes[:15])


# ---------------------------------------------------------------- mutations

def _mistype(key: str, rng: random.Random) -> str:
    """A near miss of ``key``: a letter dropped, doubled or swapped, a case or separator change."""
    i = rng.randrange(len(key))
    edits = [key[:i] + key[i + 1:], key[:i] + key[i] + key[i:], key.upper(), key.replace("_", "-") + "_",
             key[:i] + key[i + 1:i + 2] + key[i:i + 1] + key[i + 2:]]
    return next((e for e in rng.sample(edits, len(edits)) if e and e != key), key + "x")


DAMAGE = ["empty", "truncate", "flip", "non-utf8", "delete", "duplicate", "long-line", "nul", "garbage",
          "truncate-tail", "blank"]


def damage(data: bytes, rng: random.Random, n: int) -> tuple[str, bytes]:
    """``data`` with the ``n``-th kind of damage (in turn, so every kind comes up), placed at random."""
    kind, at = DAMAGE[n % len(DAMAGE)], rng.randrange(max(len(data), 1))
    if kind == "empty":
        out = b""
    elif kind == "blank":
        out = b"\n \n\t\n"
    elif kind == "truncate":
        out = data[:at]
    elif kind == "truncate-tail":
        out = data[: max(len(data) - rng.randint(1, 16), 0)]
    elif kind == "flip":
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        out = bytes(flipped)
    elif kind == "non-utf8":
        out = data[:at] + rng.choice([b"\xff", b"\xfe\xff", b"\xc3\x28", b"\x80abc", b"\xed\xa0\x80"]) + data[at:]
    elif kind == "delete":
        out = data[:at] + data[at + rng.randint(1, 40):]
    elif kind == "duplicate":
        out = data[:at] + data[at:at + rng.randint(1, 60)] * 2 + data[at + 60:]
    elif kind == "long-line":
        out = data[:at] + rng.choice([b"x", b"{", b"[", b'"', b"9", b"a,"]) * 100_000 + data[at:]
    elif kind == "nul":
        out = data[:at] + b"\x00" * rng.randint(1, 4) + data[at:]
    else:
        out = bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
    return f"{kind}@{at}", out


def byte_mutations(data: bytes, rng: random.Random, count: int, start: int = 0) -> Iterator[tuple[str, bytes]]:
    """``count`` damaged copies of ``data``, every kind of damage in turn (from the ``start``-th)."""
    return (damage(data, rng, start + n) for n in range(count))


BAD_VALUES = [None, True, 0, -1, 7, 2.5, float("nan"), float("inf"), 10 ** 30, "", "x" * 10_000, "(",
              "all-linear", [], [1, 2], ["q_proj", 3], {}, {"a": {"b": [1]}}, [[[]]]]


# ---------------------------------------------------------------- training data

RECORDS = {
    "prompt_completion": [{"prompt": f"Capital of land {i}?", "completion": f" City {i}."} for i in range(6)],
    "chat": [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}."}]}
             for i in range(4)],
    "instruction": [{"instruction": "Add", "input": f"{i} and 2", "output": str(i + 2)} for i in range(4)],
    "text": [{"text": f"plain words number {i}"} for i in range(4)],
}


def record_mutations(records: list[dict], rng: random.Random) -> tuple[str, list]:
    """One structural change: a wrong type, a missing, unknown or mistyped key, a non-object."""
    records = copy.deepcopy(records)
    row = rng.randrange(len(records))
    key = rng.choice(sorted(records[row]))
    kind = rng.choice(["type", "type", "delete", "rename", "unknown", "not-object", "message", "column-type"])
    if kind == "type":
        records[row][key] = rng.choice(BAD_VALUES)
    elif kind == "column-type":  # the whole column of another type, so Arrow accepts it
        value = rng.choice([5, 2.5, True, [1, 2], {"a": "b"}, None])
        for record in records:
            record[key] = value
    elif kind == "delete":
        del records[row][key]
    elif kind == "rename":
        records[row][_mistype(key, rng)] = records[row].pop(key)
    elif kind == "unknown":
        records[row]["surprise"] = rng.choice(BAD_VALUES)
    elif kind == "not-object":
        records[row] = rng.choice([5, "text", [], None])
    elif "messages" in records[row]:
        message = rng.choice(records[row]["messages"])
        change = rng.choice(["role", "content", "drop-content", "extra", "empty", "not-list", "all-user"])
        if change == "role":
            message["role"] = rng.choice([5, None, "robot", ""])
        elif change == "content":
            message["content"] = rng.choice([5, None, ["a"], {"text": "a"}])
        elif change == "drop-content":
            del message["content"]
        elif change == "extra":
            message["name"] = "x"
        elif change == "empty":
            records[row]["messages"] = []
        elif change == "not-list":
            records[row]["messages"] = "hello"
        else:
            for m in records[row]["messages"]:
                m["role"] = "user"
    else:  # "message" on a record without messages: odd but valid text
        kind, records[row][key] = "odd-text", rng.choice(["", " ", "\u2028", "\x00"])
    return f"{kind} {key!r} of record {row}", records


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _csv(records) -> bytes:
    rows = [r if isinstance(r, dict) else {"value": r} for r in records]
    names = list(dict.fromkeys(k for r in rows for k in r))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=names)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


TEXT_WRITERS = {"jsonl": _jsonl, "csv": _csv, "json": lambda records: json.dumps(records, indent=1).encode()}


def _write(records, path: Path, fmt: str) -> bool:
    """``records`` as a file (or save_to_disk folder) of type ``fmt``; False when Arrow cannot
    hold them (a mix of types in one column: no such Parquet file or folder can exist)."""
    import datasets

    if fmt in TEXT_WRITERS:
        path.write_bytes(TEXT_WRITERS[fmt](records))
        return True
    try:
        table = datasets.Dataset.from_list([r for r in records if isinstance(r, dict)])
    except Exception:  # noqa: BLE001 (Arrow refuses the mixture itself)
        return False
    if fmt == "parquet":
        table.to_parquet(str(path))
    else:
        table.save_to_disk(str(path))
    return True


def _data_cases(tmp: Path, rng: random.Random, fmt: str, count: int) -> Iterator[tuple[str, Path]]:
    """Damaged data files of one type: even cases changed in their records, odd ones in bytes."""
    for n in range(count):
        kind = rng.choice(sorted(RECORDS))
        path = tmp / (f"case-{n}" if fmt == "folder" else f"case-{n}.{fmt}")
        if n % 2 == 0:
            case, records = record_mutations(RECORDS[kind], rng)
            if not _write(records, path, fmt):
                continue
        else:
            _write(RECORDS[kind], path, fmt)
            victim = rng.choice(sorted(path.iterdir())) if fmt == "folder" else path
            if fmt == "folder" and n % 10 == 1:
                victim.unlink()
                case = f"{victim.name} deleted"
            else:
                case, damaged = damage(victim.read_bytes(), rng, n // 2)
                victim.write_bytes(damaged)
                case = f"{victim.name} {case}"
        yield f"{kind}: {case}", path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "folder"])
def test_damaged_data_files_fail_clearly(fmt, tmp_path, default_tokenizer):
    rng = random.Random(f"{SEED}-{fmt}")
    target = f"data .{fmt}" if fmt != "folder" else "data save_to_disk"
    for case, path in _data_cases(tmp_path, rng, fmt, 40):
        config = DataConfig(path=str(path), validation_fraction=0.25, max_seq_len=64)
        _try(target, case, lambda: prepare_data(config, default_tokenizer), (DataError,), str(path))
    assert COUNTS[target, "tried"] >= 30
    _assert_no_crash(target)


def test_bad_data_settings_fail_clearly(tmp_path, default_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_bytes(_jsonl(RECORDS["prompt_completion"]))
    bad = [  # (settings, what the message must name: the setting, or the file it concerns)
        ({"columns": {"prompt": ["q"]}}, "columns"), ({"columns": {"prompt": 5}}, "columns"),
        ({"columns": ["prompt"]}, "columns"), ({"max_seq_len": 0}, "max_seq_len"), ({"max_seq_len": -3}, "max_seq_len"),
        ({"validation_fraction": 1.5}, "validation_fraction"), ({"validation_fraction": -0.1}, "validation_fraction"),
        ({"format": "chat"}, str(path)), ({"format": "nonsense"}, str(path)),
        ({"validation_path": str(tmp_path / "missing.jsonl")}, "missing.jsonl"),
    ]
    for settings, named in bad:
        config = DataConfig(**{"path": str(path), **settings})
        _try("data settings", str(settings), lambda: prepare_data(config, default_tokenizer), (DataError,), named)
    _assert_no_crash("data settings")


# ---------------------------------------------------------------- YAML configs

GOOD_YAML = """\
# a training run
method: lora
lr: 2e-4
epochs: 1
batch_size: 4
max_steps: 0
precision: fp32
resume: false
lora:
  r: 8
  lora_alpha: 16
  target_modules: [q_proj, v_proj]
data:
  path: data.jsonl
  max_seq_len: 128
  columns: {prompt: question, completion: answer}
adapter: {}
"""

YAML_SPECIALS = [
    "- a\n- b\n", "just text\n", "42\n", "lora: 5\n", "data: [1, 2]\n", "lr: [\n", "lr: 1\nlr: 2\n",
    "lr: 1e-4\n---\nlr: 2e-4\n", "1: 2\nlr: 1\n", "null: x\n", "? [a, b]\n: c\n", "true: 1\n",
    "lr: !!python/object/apply:os.system ['true']\n", "x: &a [1]\ny: *a\n", "lr: *missing\n",
    "lr: " + "[" * 3000 + "]" * 3000 + "\n", "lr: " + "9" * 5000 + "\n", "max_steps: " + "9" * 400 + "\n",
    "lr: " + "9" * 400 + "\n", "\tlr: 1\n", "lr: 1\n  r: 2\n", "lora:\n  r: 8\n r: 9\n", "lr: .nan\n",
    "max_steps: 1e3\nbatch_size: 2.5\n", "model: 2001-12-14\n", "lora: {r: {a: 1}}\n", "\ufefflr: 1\n",
    "lr: \"\\xff\"\n", "data:\n  columns: [prompt]\n",
]


def yaml_cases(rng: random.Random, count: int) -> Iterator[tuple[str, bytes]]:
    """Damaged config files: bytes, structure (types, unknown and mistyped keys), oddities."""
    for n, text in enumerate(YAML_SPECIALS):
        yield f"special {n}", text.encode()
    tree = yaml.safe_load(GOOD_YAML)
    yield from byte_mutations(GOOD_YAML.encode(), rng, count // 2)
    for _ in range(count // 2):
        changed = copy.deepcopy(tree)
        section = rng.choice([changed, changed["lora"], changed["data"]])
        key = rng.choice(sorted(section))
        kind = rng.choice(["type", "type", "unknown", "rename", "delete-all"])
        if kind == "type":
            section[key] = rng.choice(BAD_VALUES)
        elif kind == "unknown":
            section["learning_rate"] = 0.1
        elif kind == "rename":
            section[_mistype(key, rng)] = section.pop(key)
        else:
            section.clear()
        yield f"{kind} {key}", yaml.safe_dump(changed, allow_unicode=True).encode()


def test_damaged_yaml_configs_fail_clearly(tmp_path):
    rng = random.Random(f"{SEED}-yaml")
    for n, (case, data) in enumerate(yaml_cases(rng, 80)):
        path = tmp_path / f"run-{n}.yaml"
        path.write_bytes(data)
        _try("yaml config", case, lambda: load_config(str(path)), (ConfigError,), str(path))
    for path in (tmp_path / "missing.yaml", tmp_path):  # no file, a folder
        _try("yaml config", f"path {path}", lambda: load_config(str(path)), (ConfigError,), str(path))
    _assert_no_crash("yaml config")


# ---------------------------------------------------------------- adapter files

METHODS = {  # name -> (architecture, config)
    "lora": ("llama", lambda: dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])),
    "dora": ("llama", lambda: dt.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)),
    "loha": ("llama", lambda: dt.LoHaConfig(r=2, alpha=4, target_modules=["q_proj"])),
    "lokr": ("llama", lambda: dt.LoKrConfig(r=2, alpha=4, target_modules=["q_proj"])),
    "adalora": ("llama", lambda: dt.AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj"], total_step=10)),
    "ia3": ("llama", lambda: dt.IA3Config()),
    "vera": ("llama", lambda: dt.VeraConfig(r=4, target_modules=["q_proj", "v_proj"])),
    "nola": ("llama", lambda: dt.NolaConfig(r=2, num_basis_A=4, num_basis_B=4, target_modules=["q_proj"])),
    "bottleneck": ("llama", lambda: dt.BottleneckConfig(reduction_factor=4)),
    "prompt": ("llama", lambda: dt.PromptTuningConfig(num_virtual_tokens=3)),
    "prefix": ("llama", lambda: dt.PrefixTuningConfig(num_virtual_tokens=3)),
    "bitfit": ("qwen2", lambda: dt.SelectiveConfig(bitfit=True)),
    "oft": ("llama", lambda: dt.OFTConfig(r=4, oft_block_size=0, target_modules=["q_proj"])),
    "boft": ("llama", lambda: dt.BOFTConfig(boft_block_size=4, target_modules=["q_proj"])),
    "hra": ("llama", lambda: dt.HRAConfig(r=2, target_modules=["q_proj"])),
    "psoft": ("llama", lambda: dt.PsoftConfig(r=2, target_modules=["q_proj"])),
    "adamss": ("qwen2", lambda: dt.AdamssConfig(r=4, num_subspaces=2, target_modules=["q_proj"])),
    "frod": ("llama", lambda: dt.FrodConfig(target_modules=["q_proj", "v_proj"])),
    "osf": ("llama", lambda: dt.OSFConfig(effective_rank=28, target_modules=["q_proj"])),
    "road": ("llama", lambda: dt.RoadConfig(group_size=8, target_modules=["q_proj"])),
    "delora": ("llama", lambda: dt.DeloraConfig(r=2, target_modules=["q_proj"])),
    "randlora": ("llama", lambda: dt.RandLoraConfig(r=4, target_modules=["q_proj", "v_proj"])),
    "vblora": ("llama", lambda: dt.VBLoRAConfig(r=2, num_vectors=8, vector_length=8, target_modules=["q_proj"])),
    "gralora": ("llama", lambda: dt.GraloraConfig(r=4, gralora_k=2, target_modules=["q_proj"])),
    "unilora": ("llama", lambda: dt.UniLoraConfig(r=2, theta_d_length=64, target_modules=["q_proj"])),
    "tinylora": ("llama", lambda: dt.TinyLoraConfig(r=2, u=4, target_modules=["q_proj", "v_proj"])),
    "hira": ("llama", lambda: dt.HiraConfig(r=2, target_modules=["q_proj"])),
    "pvera": ("llama", lambda: dt.PveraConfig(r=4, target_modules=["q_proj", "v_proj"])),
    "lily": ("llama", lambda: dt.LilyConfig(r=2, stride_A=2, target_modules=["q_proj", "v_proj"])),
    "fourierft": ("llama", lambda: dt.FourierFTConfig(n_frequency=16, target_modules=["q_proj"])),
    "shira": ("llama", lambda: dt.ShiraConfig(r=2, target_modules=["q_proj"])),
    "supertuning": ("llama", lambda: dt.SupertuningConfig(sparsity=0.9, r=2, target_modules=["q_proj"])),
    "glora": ("qwen2", lambda: dt.GloraConfig(r=2, target_modules=["q_proj"])),
    "miss": ("llama", lambda: dt.MissConfig(r=4, target_modules=["q_proj"])),
    "c3a": ("llama", lambda: dt.C3AConfig(block_size=8, target_modules=["q_proj"])),
    "waveft": ("llama", lambda: dt.WaveFTConfig(n_frequency=16, target_modules=["q_proj"])),
    "deft": ("llama", lambda: dt.DeftConfig(r=2, target_modules=["q_proj"])),
    "peanut": ("llama", lambda: dt.PeanutConfig(r=2, target_modules=["q_proj"])),
    "beft": ("llama", lambda: dt.BeftConfig(target_modules=["q_proj"])),
    "ln_tuning": ("llama", lambda: dt.LNTuningConfig()),
    "trainable_tokens": ("llama", lambda: dt.TrainableTokensConfig(token_indices=[3, 5])),
    "adaption_prompt": ("llama", lambda: dt.AdaptionPromptConfig(adapter_len=2, adapter_layers=1)),
    "cartridge": ("llama", lambda: dt.CartridgeConfig(num_virtual_tokens=3)),
    "poly": ("llama", lambda: dt.PolyConfig(r=2, n_tasks=2, n_skills=2, target_modules=["q_proj"])),
    "multitask_prompt_tuning": ("llama", lambda: dt.MultitaskPromptTuningConfig(num_virtual_tokens=3, num_tasks=2)),
    "cpt": ("llama", lambda: dt.CPTConfig(cpt_token_ids=[5, 9, 17], cpt_tokens_type_mask=[1, 2, 4])),
    "shadow": ("llama", lambda: dt.ShadowConfig(r=2, task_type="CAUSAL_LM")),
}


class Base:
    """A tiny model and a snapshot of it, to tell whether a failed load changed anything."""

    def __init__(self, arch: str) -> None:
        self.arch = arch
        self.fresh()

    def fresh(self) -> None:
        self.model = tiny_model(self.arch)
        self.state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.grads = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self.modules = [n for n, _ in self.model.named_modules()]

    def unchanged(self) -> bool:
        state = self.model.state_dict()
        return (not hasattr(self.model, "deltatune_state") and state.keys() == self.state.keys()
                and all(torch.equal(state[k], v) for k, v in self.state.items())
                and {n: p.requires_grad for n, p in self.model.named_parameters()} == self.grads
                and [n for n, _ in self.model.named_modules()] == self.modules)

    def load(self, target: str, case: str, folder: Path) -> str:
        outcome = _try(target, case, lambda: dt.load_adapter(self.model, folder), ADAPTER_ERRORS, str(folder),
                       self.unchanged)
        if outcome != "clear":  # loaded (or broken): start the next case from a clean model
            self.fresh()
        return outcome


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """One saved adapter per method, with non-trivial values."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, (arch, make) in METHODS.items():
        model = tiny_model(arch)
        dt.add_adapter(model, make())
        randomize_adapter(model)
        out[name] = dt.save_adapter(model, root / name)
    return out


def _copy(folder: Path, tmp: Path, name: object) -> Path:
    out = tmp / f"case-{name}"
    shutil.copytree(folder, out)
    return out


def config_cases(config: dict, rng: random.Random, count: int) -> Iterator[tuple[str, object]]:
    """Changed adapter_config.json contents (the JSON value, or raw bytes for damage)."""
    for case, data in byte_mutations(json.dumps(config, indent=2).encode(), rng, count // 3):
        yield case, data
    yield "not an object", [config]
    yield "null", None
    yield "deep", json.loads("[" * 50 + "]" * 50)
    yield "nested too deeply", b'{"r": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    yield "huge integer", b'{"peft_type": "LORA", "r": ' + b"9" * 5000 + b"}"
    yield "NaN alpha", {**config, "lora_alpha": float("nan")}
    yield "peft_type missing", {k: v for k, v in config.items() if k != "peft_type"}
    for peft_type in (5, None, ["LORA"], "LORAX", "lora", ""):
        yield f"peft_type {peft_type!r}", {**config, "peft_type": peft_type}
    for n in range(count - count // 3):
        changed = dict(config)
        key = rng.choice(sorted(changed))
        kind = rng.choice(["type", "type", "type", "delete", "rename", "unknown"])
        if kind == "type":
            changed[key] = rng.choice(BAD_VALUES)
        elif kind == "delete":
            del changed[key]
        elif kind == "rename":
            changed[_mistype(key, rng)] = changed.pop(key)
        else:
            changed["surprise_field"] = rng.choice(BAD_VALUES)
        yield f"{kind} {key}", changed


def test_damaged_adapter_configs_fail_clearly(adapters, tmp_path):
    rng = random.Random(f"{SEED}-config")
    for method in ("lora", "vera", "prompt", "loha", "adalora", "bottleneck"):
        base = Base(METHODS[method][0])
        config = json.loads((adapters[method] / "adapter_config.json").read_text())
        for n, (case, content) in enumerate(config_cases(config, rng, 30)):
            folder = _copy(adapters[method], tmp_path, f"{method}-{n}")
            data = content if isinstance(content, bytes) else json.dumps(content).encode()
            (folder / "adapter_config.json").write_bytes(data)
            base.load("adapter_config.json", f"{method} {case}", folder)
    _assert_no_crash("adapter_config.json")


def tensor_cases(tensors: dict[str, torch.Tensor], rng: random.Random, count: int):
    """Changed weight files: shapes, dtypes, values, keys."""
    keys = sorted(tensors)
    for n in range(count):
        changed = dict(tensors)
        key = rng.choice(keys)
        value = changed[key]
        kind = rng.choice(["shape", "dtype", "values", "extra", "missing", "rename", "empty", "scalar"])
        if kind == "shape":
            shape = list(value.shape) or [1]
            shape[rng.randrange(len(shape))] += rng.choice([-1, 1, 5])
            changed[key] = torch.zeros([max(s, 0) for s in shape])
            if rng.random() < 0.3:
                changed[key] = value.reshape(-1) if value.dim() > 1 else value.reshape(1, -1)
        elif kind == "dtype":
            dtype = rng.choice([torch.int64, torch.int8, torch.uint8, torch.bool, torch.float64, torch.float16,
                                torch.bfloat16, torch.complex64, torch.int32, torch.float8_e4m3fn])
            changed[key] = (value * 10).to(dtype) if dtype != torch.bool else value > 0
        elif kind == "values":
            bad = value.clone().float()
            bad.view(-1)[rng.randrange(max(bad.numel(), 1))] = rng.choice([float("nan"), float("inf"), -float("inf")])
            changed[key] = bad
        elif kind == "extra":
            changed[key.replace(".0.", ".7.") if ".0." in key else key + "_extra"] = value.clone()
        elif kind == "missing":
            del changed[key]
        elif kind == "rename":
            changed[_mistype(key, rng)] = changed.pop(key)
        elif kind == "empty":
            changed = {}
        else:
            changed[key] = torch.tensor(1.0)
        yield f"{kind} {key}", changed


def test_damaged_adapter_weights_fail_clearly(adapters, tmp_path):
    rng = random.Random(f"{SEED}-weights")
    n = 0
    for index, (method, folder) in enumerate(adapters.items()):
        base = Base(METHODS[method][0])
        weights = folder / "adapter_model.safetensors"
        tensors = load_file(weights)
        cases: list[tuple[str, Callable[[Path], None]]] = []
        for case, data in byte_mutations(weights.read_bytes(), rng, 30 if method == "lora" else 6, start=index):
            cases.append((case, lambda p, data=data: p.write_bytes(data)))
        for case, changed in tensor_cases(tensors, rng, 10):
            contiguous = {k: v.contiguous() for k, v in changed.items()}
            cases.append((case, lambda p, tensors=contiguous: save_file(tensors, p)))
        cases.append(("pickle (torch.save) named .safetensors", lambda p: torch.save(tensors, p)))
        cases.append(("pickle of a plain object", lambda p: torch.save({"a": 1}, p)))
        cases.append(("a folder named like the file", lambda p: (p.unlink(), p.mkdir())))
        cases.append(("only a .bin pickle", lambda p: (torch.save(tensors, p.with_name("adapter_model.bin")),
                                                         p.unlink())))
        for case, damage in cases:
            copy_ = _copy(folder, tmp_path, n)
            n += 1
            damage(copy_ / "adapter_model.safetensors")
            base.load("adapter_model.safetensors", f"{method} {case}", copy_)
    _assert_no_crash("adapter_model.safetensors")


# ---------------------------------------------------------------- symbolic links

def test_symlinks_out_of_the_adapter_folder_are_refused(adapters, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(adapters["lora"], outside)
    base = Base("llama")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        folder = _copy(adapters["lora"], tmp_path, f"link-{name}")
        (folder / name).unlink()
        (folder / name).symlink_to(outside / name)  # a valid file, but outside the folder
        assert base.load("symlinks", f"{name} -> outside", folder) == "clear"
        with pytest.raises(ValueError, match=rf"{name} is a symbolic link to .*outside the adapter folder"):
            dt.load_adapter(base.model, folder)
    # a hub-cache look-alike whose link leads into another repo's blobs
    repo = tmp_path / "models--a--b"
    snapshot = repo / "snapshots" / "rev"
    shutil.copytree(adapters["lora"], snapshot)
    (tmp_path / "models--c--d" / "blobs").mkdir(parents=True)
    stolen = tmp_path / "models--c--d" / "blobs" / "abc"
    shutil.copy(adapters["lora"] / "adapter_config.json", stolen)
    (snapshot / "adapter_config.json").unlink()
    (snapshot / "adapter_config.json").symlink_to(Path("../../../models--c--d/blobs/abc"))
    assert base.load("symlinks", "snapshot -> another repo's blobs", snapshot) == "clear"
    dangling = _copy(adapters["lora"], tmp_path, "dangling")
    (dangling / "adapter_model.safetensors").unlink()
    (dangling / "adapter_model.safetensors").symlink_to(tmp_path / "nothing-here")
    assert base.load("symlinks", "dangling link", dangling) == "clear"
    _assert_no_crash("symlinks")


def _hub_cache(adapter: Path, root: Path, sub: str = "") -> Path:
    """``adapter`` laid out as the Hugging Face hub cache keeps it: snapshot files are links
    to ``../../blobs/<hash>``."""
    repo = root / "models--someone--adapter"
    snapshot = repo / "snapshots" / "0123abcd" / sub
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in adapter.iterdir():
        blob = repo / "blobs" / f"hash-{file.name}"
        shutil.copy(file, blob)
        depth = len(snapshot.relative_to(repo).parts)
        (snapshot / file.name).symlink_to(Path(*[".."] * depth, "blobs", blob.name))
    return snapshot


@pytest.mark.parametrize("sub", ["", "adapters/first"])
def test_hub_cache_links_into_blobs_load(adapters, tmp_path, sub):
    snapshot = _hub_cache(adapters["lora"], tmp_path, sub)
    assert (snapshot / "adapter_config.json").is_symlink()
    ids = sample_ids()
    direct = eval_logits(dt.load_adapter(tiny_model(), adapters["lora"]), ids)
    assert torch.equal(eval_logits(dt.load_adapter(tiny_model(), snapshot), ids), direct)


def test_links_inside_the_folder_and_a_linked_folder_load(adapters, tmp_path):
    folder = _copy(adapters["lora"], tmp_path, "inside")
    (folder / "adapter_model.safetensors").rename(folder / "weights-v1.safetensors")
    (folder / "adapter_model.safetensors").symlink_to("weights-v1.safetensors")
    dt.load_adapter(tiny_model(), folder)
    (tmp_path / "alias").symlink_to(adapters["lora"], target_is_directory=True)
    dt.load_adapter(tiny_model(), tmp_path / "alias")


def test_weights_are_never_unpickled(adapters, tmp_path, monkeypatch):
    """A pickle where safetensors belong is refused without being run: torch.load is never called."""
    folder = _copy(adapters["lora"], tmp_path, "pickle")
    tensors = {k: v.clone() for k, v in load_file(folder / "adapter_model.safetensors").items()}  # not mapped
    torch.save(tensors, folder / "adapter_model.safetensors")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(ValueError, match="adapter_model.safetensors: not a readable safetensors file"):
        dt.load_adapter(tiny_model(), folder)
