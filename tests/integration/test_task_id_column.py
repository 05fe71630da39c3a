"""A ``task_id`` column reaches task-routed adapters (Poly) in training and in evaluation, is
checked record by record, and is left out for methods that do not route by task."""

import json

import pytest
import torch
from safetensors.torch import load_file

from deltatune.data import DataConfig, DataError, collate, prepare_data
from deltatune.evaluate import EvalConfig, run_eval
from deltatune.train import ConfigError, load_config, train
from tiny_models import tiny_chat_model_dir, word_meaning_data


def _tasked(path, count: int, task_of=lambda i: i % 2, name="task_id"):
    path.write_text("".join(json.dumps({"prompt": f"Word {i}:", "completion": f" meaning {i % 5}", name: task_of(i)})
                            + "\n" for i in range(count)))
    return path


@pytest.fixture
def model_dir(tmp_path, default_tokenizer):
    return tiny_chat_model_dir(tmp_path / "model", default_tokenizer)


def test_examples_and_batches_carry_each_records_task(tmp_path, default_tokenizer):
    data = prepare_data(DataConfig(path=str(_tasked(tmp_path / "d.jsonl", 10)), validation_fraction=0.2),
                        default_tokenizer)
    assert {e.task_id for e in data.train + data.validation} == {0, 1}
    batch = collate(data.train[:4], 0, packed=False)
    assert batch["task_ids"].tolist() == [e.task_id for e in data.train[:4]]
    # a mapped column name, and data without the column: no ids anywhere
    mapped = prepare_data(DataConfig(path=str(_tasked(tmp_path / "m.jsonl", 6, name="task")),
                                     columns={"task_id": "task"}), default_tokenizer)
    assert [e.task_id for e in mapped.train] and None not in [e.task_id for e in mapped.train]
    plain = prepare_data(DataConfig(path=str(word_meaning_data(tmp_path / "p.jsonl", 6))), default_tokenizer)
    assert "task_ids" not in collate(plain.train, 0, packed=False)


@pytest.mark.parametrize("value, words", [("two", "record 3: field 'task_id' must be a task index"),
                                          (-1, "got -1"), (True, "got True"), (None, "got None")])
def test_a_bad_task_id_names_the_record(tmp_path, default_tokenizer, value, words):
    path = _tasked(tmp_path / "d.jsonl", 6, task_of=lambda i: value if i == 3 else 0)
    with pytest.raises(DataError, match=words):
        prepare_data(DataConfig(path=str(path), validation_fraction=0), default_tokenizer)


def test_task_ids_and_packing_or_a_missing_column_are_refused(tmp_path, default_tokenizer):
    path = _tasked(tmp_path / "d.jsonl", 6)
    with pytest.raises(DataError, match="packing"):
        prepare_data(DataConfig(path=str(path), packing=True), default_tokenizer)
    with pytest.raises(DataError, match="maps task_id to 'task'"):
        prepare_data(DataConfig(path=str(path), columns={"task_id": "task"}), default_tokenizer)
    plain = word_meaning_data(tmp_path / "v.jsonl", 4)
    with pytest.raises(DataError, match="v.jsonl: the training data has a task id column and the validation"):
        prepare_data(DataConfig(path=str(path), validation_path=str(plain)), default_tokenizer)
    with pytest.raises(DataError, match="v.jsonl: the training data has a task id column and the test"):
        prepare_data(DataConfig(path=str(path), test_path=str(plain)), default_tokenizer)


def test_the_task_count_comes_from_the_data_unless_given(tmp_path, model_dir):
    data = _tasked(tmp_path / "d.jsonl", 24, task_of=lambda i: i % 3)
    setup = {"model": str(model_dir), "data.path": str(data), "batch_size": 4, "max_steps": 1, "seed": 3}
    for method, field in (("poly", "n_tasks"), ("multitask_prompt_tuning", "num_tasks")):
        train(load_config(None, {**setup, "method": method, "output_dir": str(tmp_path / method)}), log=lambda *_: None)
        assert json.loads((tmp_path / method / "adapter" / "adapter_config.json").read_text())[field] == 3
    with pytest.raises(ConfigError, match=r"n_tasks=2, but the task_id column of .*d.jsonl holds task 2"):
        train(load_config(None, {**setup, "method": "poly", "adapter": {"n_tasks": 2},
                                 "output_dir": str(tmp_path / "few")}), log=lambda *_: None)


def _router_logits(folder):
    tensors = load_file(folder / "adapter_model.safetensors")
    return torch.stack([v for k, v in sorted(tensors.items()) if k.endswith("module_logits")])


def test_poly_trains_the_router_rows_of_the_tasks_in_the_data(tmp_path, model_dir):
    poly = {"r": 4, "n_skills": 2, "n_splits": 2, "n_tasks": 3}
    runs = {}
    for name, task_of in (("two", lambda i: i % 2), ("one", lambda i: 0)):
        data = _tasked(tmp_path / f"{name}.jsonl", 32, task_of)
        out = tmp_path / name
        summary = train(load_config(None, {"model": str(model_dir), "data.path": str(data), "batch_size": 4,
                                           "max_steps": 4, "eval_steps": 4, "seed": 3, "method": "poly", "lr": 5e-3,
                                           "adapter": poly, "output_dir": str(out)}), log=lambda *_: None)
        assert summary["final_validation_loss"] < summary["initial_validation_loss"]
        runs[name] = _router_logits(out / "adapter")  # (layers, tasks, splits * skills)
    two, one = runs["two"], runs["one"]
    assert torch.equal(two[:, 2], one[:, 2])  # task 2 is in neither file: the same seeded start, untouched
    assert not torch.allclose(two[:, 1], one[:, 1])  # task 1's records moved its router row

    # evaluation reads the column too: the same records scored as task 1 and as task 2 differ
    scores = {}
    for task in (1, 2):
        records = _tasked(tmp_path / f"test-{task}.jsonl", 6, task_of=lambda i, t=task: t)
        results = run_eval(EvalConfig(data=str(records), model=str(model_dir), adapters=[str(tmp_path / "two" / "adapter")],
                                      output_dir=str(tmp_path / f"eval-{task}"), max_new_tokens=4), log=lambda *_: None)
        scores[task] = next(v for k, v in results.items() if k != "base")["perplexity"]
    assert scores[1] != scores[2]


def test_a_method_without_tasks_leaves_the_column_alone(tmp_path, model_dir):
    lines = []
    train(load_config(None, {"model": str(model_dir), "data.path": str(_tasked(tmp_path / "d.jsonl", 24)),
                             "batch_size": 4, "max_steps": 2, "seed": 3, "method": "lora",
                             "output_dir": str(tmp_path / "lora")}), log=lines.append)
    assert any("task id column is not used; method lora" in line for line in lines)
