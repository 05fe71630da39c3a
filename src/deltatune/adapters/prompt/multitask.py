"""Multitask prompt tuning: a shared soft prompt scaled entry by entry by a low-rank task matrix.

Row ``i`` of task ``t`` gets the prompt ``P ⊙ (cols[t] @ rows[t])``: ``P`` (tokens, dim) is
shared, ``prefix_task_cols`` (tasks, tokens, ranks) and ``prefix_task_rows`` (tasks, ranks, dim)
are per task. It is served as prompt tuning (``soft_prompts.py``: the prompts go in front of
the input embeddings on the call that starts a sequence), with each row's task from
``task_ids`` (``deltatune.adapters.task_ids``). Files hold ``prompt_embeddings`` (``P``),
``prefix_task_cols`` and ``prefix_task_rows``, as PEFT saves them.

The ``*_SOURCE_*`` initialisations read a source adapter's safetensors file (a multitask or a
plain prompt-tuning adapter, PEFT's or deltatune's) as PEFT does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ...config import AdapterConfig
from ...config.prompt import MultitaskPromptTuningConfig
from ..method import register_method
from ..task_ids import release_task_ids, task_ids_of
from .soft_prompts import FILE_KEY, PROMPTS_ATTR, PromptMethod, SoftPrompts, _initialise_prompt

COLS, ROWS = "prefix_task_cols", "prefix_task_rows"


class MultitaskPromptEncoder(nn.Module):
    """The shared prompt and the per-task factors; ``forward(task_ids)`` gives each row's prompt."""

    task_routed = True  # deltatune.adapters.task_ids keeps its hooks while such a module exists

    def __init__(self, config: MultitaskPromptTuningConfig, tokens: int):
        super().__init__()
        self.num_tasks = config.num_tasks
        # drawn in PEFT's order: the prompt (as nn.Embedding draws), then columns, then rows
        self.embedding = nn.Embedding(tokens, config.token_dim)
        self.prefix_task_cols = nn.Parameter(torch.normal(0, 0.02, size=(config.num_tasks, tokens, config.num_ranks)))
        self.prefix_task_rows = nn.Parameter(torch.normal(0, 0.02, size=(config.num_tasks, config.num_ranks,
                                                                         config.token_dim)))

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        task_ids = task_ids.to(self.prefix_task_cols.device)
        scale = self.prefix_task_cols.index_select(0, task_ids) @ self.prefix_task_rows.index_select(0, task_ids)
        return self.embedding.weight.unsqueeze(0) * scale  # (rows, tokens, dim)


def read_source(path: str) -> dict[str, torch.Tensor]:
    """A source adapter's tensors: a ``.safetensors`` file, or a folder holding ``adapter_model.safetensors``."""
    source = Path(path)
    if source.is_dir():
        source = source / "adapter_model.safetensors"
    if source.suffix != ".safetensors":
        raise ValueError(f"MultitaskPromptTuningConfig.prompt_tuning_init_state_dict_path={path!r}: deltatune reads "
                         "safetensors files only (never pickles); save the source adapter as safetensors")
    if not source.is_file():
        raise FileNotFoundError(f"MultitaskPromptTuningConfig.prompt_tuning_init_state_dict_path: no file {source}")
    return load_file(str(source))


def _take(tensors: dict[str, torch.Tensor], key: str, shape: tuple, source: str) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{source} has no {key!r} (found {sorted(tensors)}); a multitask prompt-tuning file is "
                         "needed for this prompt_tuning_init")
    value = tensors[key]
    if tuple(value.shape) != shape:
        raise ValueError(f"{source}: {key!r} has shape {tuple(value.shape)}, this adapter needs {shape}")
    return value


@torch.no_grad()
def initialise_from_source(encoder: MultitaskPromptEncoder, config: MultitaskPromptTuningConfig) -> None:
    """PEFT's source-task initialisations: the shared prompt, and the factors of one source task
    (``EXACT_SOURCE_TASK``) or their mean over the source tasks (``AVERAGE_SOURCE_TASKS``)."""
    path = config.prompt_tuning_init_state_dict_path
    tensors = read_source(path)
    prompt = _take(tensors, FILE_KEY, tuple(encoder.embedding.weight.shape), path)
    encoder.embedding.weight.copy_(prompt)
    if config.prompt_tuning_init == "ONLY_SOURCE_SHARED":
        return
    if config.num_tasks != 1:
        raise ValueError(f"MultitaskPromptTuningConfig: prompt_tuning_init={config.prompt_tuning_init} gives one "
                         f"task's factors, so num_tasks must be 1 (got {config.num_tasks}), as in PEFT")
    cols, rows = tensors.get(COLS), tensors.get(ROWS)
    if cols is None or rows is None:
        raise ValueError(f"{path} holds no {COLS}/{ROWS} (a plain prompt-tuning file?); use "
                         "prompt_tuning_init=ONLY_SOURCE_SHARED to take its prompt only")
    if config.prompt_tuning_init == "AVERAGE_SOURCE_TASKS":
        cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
    else:
        task = config.prompt_tuning_init_task or 0
        if task >= cols.shape[0]:
            raise ValueError(f"MultitaskPromptTuningConfig.prompt_tuning_init_task={task}, but {path} holds "
                             f"{cols.shape[0]} task(s)")
        cols, rows = cols[task:task + 1], rows[task:task + 1]
    encoder.prefix_task_cols.copy_(_take({COLS: cols}, COLS, tuple(encoder.prefix_task_cols.shape), path))
    encoder.prefix_task_rows.copy_(_take({ROWS: rows}, ROWS, tuple(encoder.prefix_task_rows.shape), path))


class MultitaskPromptMethod(PromptMethod):
    """Prompt tuning's serving with per-row task prompts."""

    def inject(self, model: nn.Module, config: AdapterConfig, name: str, from_file: bool) -> None:
        assert isinstance(config, MultitaskPromptTuningConfig)
        encoder = MultitaskPromptEncoder(config, config.num_virtual_tokens * config.num_transformer_submodules)
        if not from_file:
            _initialise_prompt(encoder.embedding, config, model)  # TEXT, SAMPLE_VOCAB
            if config.prompt_tuning_init in ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"):
                initialise_from_source(encoder, config)
        holder = getattr(model, PROMPTS_ATTR, None)
        if holder is None:
            holder = SoftPrompts()
            setattr(model, PROMPTS_ATTR, holder)
            holder.attach(model)
        holder.tasks = task_ids_of(model)
        holder.encoders[name] = encoder.to(model.get_input_embeddings().weight.device)
        holder.configs[name] = config
        holder.train(model.training)

    def remove(self, model: nn.Module, name: str) -> None:
        super().remove(model, name)
        release_task_ids(model)

    def file_tensors(self, model: nn.Module, name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
        encoder = getattr(model, PROMPTS_ATTR).encoders[name]
        return {FILE_KEY: encoder.embedding.weight, COLS: encoder.prefix_task_cols, ROWS: encoder.prefix_task_rows}


register_method("MULTITASK_PROMPT_TUNING", MultitaskPromptMethod())
