"""The training loop: plain PyTorch, resumable, one process or several (DDP).

``train(config)`` loads the base, adds the adapter, prepares the data, runs the optimizer
steps with gradient accumulation, clipping, a schedule and periodic evaluation, writes
checkpoints, metrics and the final adapter, and returns a summary.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from ..adapters.method import Method, method_for
from ..adapters.task_ids import TASKS_ATTR, set_task_ids
from ..allocator import allocator_in_use
from ..data import collate, pack, prepare_data
from ..files import write_text_atomically
from ..hardware import auto_precision, peak_resident_mib, set_cpu_threads
from ..io import gathered_adapter_tensors, save_adapter
from ..adapter_ops import add_adapter, get_state, trainable_parameters
from ..loading import load_model
from ..loss import TrainingLoss
from ..quant.convert import QuantizeConfig
from ..quant.report import memory_report
from .auto_batch import choose_micro_batch
from .batching import make_batches, padding_share
from .checkpoint import latest_valid, rng_state, set_rng_state
from .checks import check_settings, check_sharding
from .compiling import compile_blocks, transformer_blocks
from .config import ConfigError, TrainConfig, to_dict
from .contexts import autocast, saved_activations
from ..distributed import Distributed, device_memory_bytes
from ..distributed.sharded_loading import fill_shards, keep_real_tensors, skeleton_if_sharded, tensor_bytes
from .recompute import MIN_TOKENS as RECOMPUTE_MIN_TOKENS, cheap_recompute
from .resume import read_checkpoint, write_checkpoint
from .methods import adapter_config, epochs_for, learning_rate, recipe_for, schedule_for
from .moe import RouterLoad, apply_expert_presets
from .optimizers import make_optimizer, param_groups
from .outputs import MetricsLog, prepare_output_dir, write_loss_curve
from .preference_step import PreferenceRun
from .schedule import make_scheduler
from .timing import PhaseTimer
from .validation import VALIDATION_BUDGET, eval_batch_size, evaluate, plan_validation, sample_rows

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "datasets" / "velmar"


def _wants_final_eval(cfg: TrainConfig, default_job: bool) -> bool:
    return cfg.final_eval == "on" or (cfg.final_eval == "auto" and default_job)


def _final_eval(model, tokenizer, cfg: TrainConfig, data, output_dir: Path, log) -> dict:
    """``deltatune eval``, base against the adapter just trained, on the test file when the run
    has one (nothing during training looked at it), else on the validation records."""
    from ..evaluate import EvalConfig, run_eval
    if cfg.data.test_path:
        records = Path(cfg.data.test_path)
    else:
        records = output_dir / "validation.jsonl"
        write_text_atomically(records, "".join(json.dumps(r) + "\n" for r in data.validation_records))
    eval_cfg = EvalConfig(data=str(records), output_dir=str(output_dir / "eval"), batch_size=eval_batch_size(cfg),
                          max_new_tokens=cfg.eval_max_new_tokens, chat_template=cfg.data.chat_template)
    return run_eval(eval_cfg, model=model, tokenizer=tokenizer, log=log, loss_curve=output_dir / "loss.png")


def _route_tasks(model, cfg: TrainConfig, train_rows: list, log) -> None:
    """Task ids for task-routed adapters (Poly, multitask prompts): each record's own from the
    data's task id column, else task 0 for every row (training, validation, final evaluation)."""
    given = any(getattr(row, "task_id", None) is not None for row in train_rows)
    routed = getattr(model, TASKS_ATTR, None) is not None
    if routed and not given:
        set_task_ids(model, 0)
    if log is not None and given:
        log(f"task ids: each record's own, from the data's task id column ({len({r.task_id for r in train_rows})} "
            "tasks in training)" if routed else
            f"task ids: the data's task id column is not used; method {cfg.method} does not pick weights by task")


@dataclass
class StepInfo:
    """What a step-end callback sees."""

    step: int
    loss: float
    lr: float


def _save_adapter(model, path: Path, dist: Distributed) -> Optional[Path]:
    """The adapter written by rank 0; under FSDP2 every rank calls this, to gather the shards."""
    if dist.sharded:
        tensors = gathered_adapter_tensors(model, "default")  # collective: every rank
        return save_adapter(model, path, tensors=tensors) if dist.is_main else None
    return save_adapter(model, path) if dist.is_main else None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def planned_steps(lengths: list[int], cfg: TrainConfig, world: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, optimizer steps in the run) for rows of these ``lengths``."""
    batches = make_batches(lengths, cfg.batch_size, cfg.batch_tokens, cfg.group_by_length, cfg.seed, 0, 0, world)
    per_epoch = max(1, len(batches) // cfg.grad_accum)
    return per_epoch, cfg.max_steps or max(1, math.ceil(epochs_for(cfg, sum(lengths)) * per_epoch))


def _rows(data, cfg: TrainConfig):
    return pack(data, cfg.data.max_seq_len) if cfg.data.packing else data


def _length(row) -> int:
    if hasattr(row, "width"):  # a preference pair: its chosen and rejected rows
        return row.width
    return len(row["input_ids"] if isinstance(row, dict) else row.input_ids)


def _peak_memory_mib(device: torch.device) -> float:
    """The peak so far: of the GPU's allocated memory, or of this process's resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_resident_mib()


def _strategy(cfg: TrainConfig) -> str:
    """The strategy asked for: ``fsdp_offload`` is an FSDP2 setting, so it asks for FSDP2."""
    return "fsdp" if cfg.fsdp_offload else cfg.distributed


def _load_base(cfg: TrainConfig, dist: Distributed):
    """``(model, tokenizer, ShardSource or None)``. Where FSDP2 will shard the model, it is built on
    meta and each rank reads only its rows once sharded (``fill_shards``); else it loads whole."""
    if dist.world > 1:
        device_bytes = device_memory_bytes(dist.device)
        quant = QuantizeConfig(cfg.quantize) if cfg.quantize else None  # load_model's settings for it
        skeleton = skeleton_if_sharded(cfg.model or None,
                                       lambda size: dist.choose(_strategy(cfg), size, device_bytes), quant)
        if skeleton is not None:
            return skeleton
    model, tokenizer = load_model(cfg.model or None, quantize=cfg.quantize or None, device=dist.device)
    return model, tokenizer, None


def train(cfg: TrainConfig, on_step_end: Optional[Callable[[StepInfo], None]] = None, log=print) -> dict:
    """Run training as ``cfg`` says; returns the summary (also written to ``summary.json``)."""
    dist = Distributed.setup()
    started = time.perf_counter()
    timer = PhaseTimer(started)
    check_settings(cfg)  # bad settings fail before the model loads or anything is moved
    recipe_for(cfg)
    pref = PreferenceRun(cfg, dist.world, log) if cfg.objective != "sft" else None  # dpo, orpo
    output_dir = prepare_output_dir(cfg, dist.is_main, name_from_main=dist.broadcast, log=log)
    dist.barrier()
    resume_from = None
    if cfg.resume:
        resume_from = latest_valid(output_dir, log=log if dist.is_main else (lambda *_: None))
        if resume_from is None:
            raise ConfigError(f"--resume: no valid checkpoint to resume in {output_dir}")

    if dist.device.type == "cpu":
        set_cpu_threads(processes_on_this_machine=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if cfg.precision == "auto":  # config.yaml records what ran
        cfg.precision = auto_precision(dist.device)
    _seed_everything(cfg.seed)
    with timer.phase("load"):
        model, tokenizer, shards = _load_base(cfg, dist)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    default_job = not cfg.data.path
    if default_job:  # the shipped default: Velmar taxonomy (or pairs), validation on unseen animals
        folder = pref.default_data() if pref else DEFAULT_DATA
        cfg.data.path = str(folder / "train.jsonl")
        cfg.data.validation_path = cfg.data.validation_path or str(folder / "validation.jsonl")
        cfg.data.test_path = cfg.data.test_path or str(folder / "test.jsonl")
    with timer.phase("data"):
        data = pref.prepare(tokenizer, seq2seq) if pref else prepare_data(cfg.data, tokenizer, seed=cfg.seed,
                                                                          seq2seq=seq2seq)
        train_rows, val_rows = _rows(data.train, cfg), _rows(data.validation, cfg)
    if dist.is_main:
        log(f"data ({data.format}): train {data.train_stats}; validation {data.validation_stats}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    lengths = [_length(row) for row in train_rows]
    steps_per_epoch, total_steps = planned_steps(lengths, cfg, dist.world)
    val_rows = sample_rows(val_rows, cfg.eval_max_rows, cfg.seed)
    epoch_tokens = sum(lengths)
    validation = plan_validation(total_steps, epoch_tokens / steps_per_epoch / dist.world,
                                 sum(_length(row) for row in val_rows), cfg.eval_steps)
    if dist.is_main:
        epochs = epochs_for(cfg, epoch_tokens)
        log(f"{total_steps} steps of {steps_per_epoch} an epoch" + ("" if cfg.max_steps else
            f" ({epochs:g} epoch{'' if epochs == 1 else 's'} over {epoch_tokens:,d} tokens)"))
    if val_rows and dist.is_main:
        passes = validation.passes(total_steps)
        log(f"validation: {len(val_rows)} rows, {passes} pass{'' if passes == 1 else 'es'}"
            + ("" if validation.at_start else f" (none at step 0: with the last it would cost more than "
               f"{VALIDATION_BUDGET:.0%} of the training time; eval_steps asks for it)"))
    task_type = "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM"  # recorded in adapter_config.json
    adapter_cfg = adapter_config(cfg, task_type, total_steps, examples=train_rows)  # CPT's context: the first rows
    adapter_cfg = apply_expert_presets(adapter_cfg, cfg.lora, model, log if dist.is_main else None)  # MoE models
    if pref:  # a new adapter, or the supervised one given with init_adapter and its frozen copy
        adapter_cfg = pref.attach(model, adapter_cfg)
    elif getattr(adapter_cfg, "init_lora_weights", None) in ("eva", "corda", "lora_ga"):  # read a few batches
        from ..lora_from_data import add_lora_from_data, training_init_batches
        if dist.world > 1:
            raise ConfigError(f"lora.init_lora_weights={adapter_cfg.init_lora_weights}: initialising from data "
                              "runs in one process; start this run without torchrun")
        add_lora_from_data(model, adapter_cfg, training_init_batches(
            train_rows, pad_id, cfg.batch_size, cfg.data.packing, seq2seq, dist.device,
            adapter_cfg.init_lora_weights), "default")
    else:
        add_adapter(model, adapter_cfg, "default")
    if shards is not None:  # the adapter's values, made as in one process, copied back rank by rank
        keep_real_tensors(model, shards)
    adapter_cfg = get_state(model).configs["default"]  # the live copy (AdaLoRA records its ranks in it)
    if cfg.compile:  # after the adapter is in, so its layers are compiled with the blocks
        compiled = compile_blocks(model)
        if dist.is_main:
            log(f"compile: {compiled} transformer blocks; the first step's time includes compiling")
    method = method_for(adapter_cfg)
    if pref and type(method).auxiliary_loss is not Method.auxiliary_loss:  # DPO/ORPO take no such term
        raise ConfigError(f"objective {cfg.objective}: --method {cfg.method} adds a supervised term of its own "
                          "(its auxiliary loss), which preference tuning has no place for; train it with sft")
    _route_tasks(model, cfg, train_rows, log if dist.is_main else None)
    training_loss = pref.loss_module(model) if pref else TrainingLoss(model)
    model_bytes = tensor_bytes(model)
    if dist.choose(_strategy(cfg), model_bytes, device_memory_bytes(dist.device)) == "fsdp":
        check_sharding(cfg)  # auto may pick FSDP2: refuse what it does not run yet, by name
    # FSDP2 swaps a block's weights between shards and whole tensors: recipes would rerun norms on shards
    recompute = (cheap_recompute(model) if cfg.cheap_recompute and not (cfg.gradient_checkpointing
                 or cfg.activation_offload or cfg.compile or dist.sharded) else None)
    if cfg.auto_batch:  # the same steps: batch_size x grad_accum examples each, in smaller micro-batches
        with autocast(cfg.precision, dist.device):
            micro, how = choose_micro_batch(training_loss, model, train_rows, lengths, cfg.batch_size, pad_id,
                                            cfg.data.packing, seq2seq, dist.device)
        micro = dist.smallest(micro)  # every rank must take as many micro-batches a step
        cfg.grad_accum, cfg.batch_size = cfg.grad_accum * (cfg.batch_size // micro), micro
        steps_per_epoch = planned_steps(lengths, cfg, dist.world)[0]
        if dist.is_main:
            log(f"auto batch: micro-batch {micro} x {cfg.grad_accum} accumulated ({how})")
    if dist.is_main:
        trainable, total = trainable_parameters(model)
        log(f"method {cfg.method}: {trainable:,d} trainable of {total:,d} parameters; lr {learning_rate(cfg):g}; "
            f"precision {cfg.precision} on {dist.device}"
            + (f" ({torch.get_num_threads()} threads, {allocator_in_use()} allocator)" if dist.device.type == "cpu"
               else ""))
        if cfg.quantize and shards is None:
            log(f"base: {memory_report(model)}")  # what is stored quantized (4-bit experts included)
    # before the optimizer: FSDP2 replaces each parameter with its shard
    ddp_loss = dist.wrap(training_loss, transformer_blocks(model), bf16=cfg.precision == "bf16",
                         offload=cfg.fsdp_offload)
    if shards is not None:  # offloaded shards live in CPU memory
        with timer.phase("load"):
            fill_shards(model, ddp_loss, shards, dist.rank, dist.world,
                        torch.device("cpu") if cfg.fsdp_offload else dist.device, dist.device)
        if dist.is_main:
            quantized_here = cfg.quantize and not shards.saved_4bit  # a checkpoint saved in 4 bits is read as is
            log("load: built on meta, each rank read only its own rows of every weight"
                + (f" and quantized them to {cfg.quantize}" if quantized_here else ""))
    if dist.is_main and dist.world > 1:
        log(f"distributed: {dist.strategy} over {dist.world} processes")
    scored = ddp_loss if dist.sharded else model  # a sharded model runs only through its root
    optimizer = make_optimizer(param_groups(model, cfg.weight_decay, learning_rate(cfg), cfg.lora_plus_ratio),
                               cfg.optimizer, lr=learning_rate(cfg), weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps or round(cfg.warmup_ratio * total_steps)
    scheduler = make_scheduler(optimizer, schedule_for(cfg), warmup, total_steps)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.precision == "fp16")
    if dist.is_main:
        log(training_loss.describe())
    config_text = yaml.safe_dump(to_dict(cfg), sort_keys=False)

    step, micro, best, bad_evals, initial_eval = 0, 0, math.inf, 0, None
    global_batch = (cfg.batch_tokens or cfg.batch_size) * dist.world * cfg.grad_accum  # what one step takes
    if resume_from is not None:
        state = read_checkpoint(resume_from, ddp_loss, model, optimizer, dist, global_batch)
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step, best, bad_evals = state["step"], state["best"], state["bad_evals"]
        micro = step * cfg.grad_accum  # micro-batches taken so far, on any number of ranks
        initial_eval = state.get("initial_eval")
        method.load_training_state(model, "default", adapter_cfg, state.get("method", {}))
        if dist.is_main:
            log(f"resumed from {resume_from} at step {step}")
    if pref:  # the reference's log-probabilities of every pair: from the checkpoint, or computed now
        with timer.phase("reference"):
            saved = (state.get("preference") or {}) if resume_from else None
            pref.start(model, train_rows, val_rows, pad_id, dist.device, saved)
    metrics = MetricsLog(output_dir / "metrics.jsonl", dist.is_main, truncate_after=step)
    if resume_from is None and validation.at_start:  # the untrained adapter's loss, what training is measured by
        with timer.phase("validation"):
            initial_eval = pref.validate(model) if pref else evaluate(scored, val_rows, cfg, pad_id, dist, seq2seq)
        if initial_eval is not None:
            metrics.write({"step": 0, "eval_loss": initial_eval, **(pref.eval_metrics if pref else {})})
    router_load = RouterLoad.attach(model)  # MoE models: tokens per expert in each later validation pass
    if dist.is_main:
        write_text_atomically(output_dir / "config.yaml", config_text)

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not dist.is_main, desc="train", unit="step")
    model.train()
    device = dist.device
    last_loss, eval_loss, tokens_seen, window_start = float("nan"), None, 0, time.perf_counter()
    batches_epoch, batches = -1, []
    while step < total_steps:
        step_loss = 0.0
        method.before_step(model, "default", adapter_cfg, step)  # DyLoRA draws the step's rank
        with timer.phase("steps"):  # forward, backward and the optimizer step
            for accumulated in range(cfg.grad_accum):
                epoch, index = divmod(micro, max(1, steps_per_epoch * cfg.grad_accum))
                if epoch != batches_epoch:  # once per epoch: a shuffle (and a sort) of every row
                    batches_epoch = epoch
                    batches = make_batches(lengths, cfg.batch_size, cfg.batch_tokens, cfg.group_by_length,
                                           cfg.seed, epoch, dist.rank, dist.world)
                picked = batches[index % len(batches)]
                batch = pref.batch(picked) if pref else collate([train_rows[i] for i in picked], pad_id,
                                                                 cfg.data.packing, seq2seq)
                batch = {k: v.to(device) for k, v in batch.items()}
                with dist.micro_batch(ddp_loss, last=accumulated == cfg.grad_accum - 1):
                    lean = recompute if batch["input_ids"].numel() >= RECOMPUTE_MIN_TOKENS else None
                    with autocast(cfg.precision, device), saved_activations(cfg.activation_offload, device, lean):
                        loss = ddp_loss(batch)
                        penalty = method.loss_penalty(model, "default", adapter_cfg)
                        loss = (loss if penalty is None else loss + penalty) / cfg.grad_accum
                        # a supervised term from this forward (ShadowPEFT's shadow loss on the labels)
                        extra = None if pref else method.auxiliary_loss(model, "default", adapter_cfg, batch)
                        loss = loss if extra is None else loss + extra / cfg.grad_accum
                    scaler.scale(loss).backward()
                step_loss += loss.item()
                tokens_seen += int(batch["input_ids"].numel())
                micro += 1
            scaler.unscale_(optimizer)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            # AdaLoRA re-allocates ranks here (it needs the gradients)
            method.after_step(model, "default", adapter_cfg, step + 1)
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            last_loss = dist.mean(step_loss)
        record = {"step": step, "epoch": round(micro / max(1, steps_per_epoch * cfg.grad_accum), 4),
                  "loss": last_loss, "lr": lr, **(pref.loss.take_metrics() if pref else {})}
        if step % validation.every == 0 or step == total_steps:
            with timer.phase("validation"):
                eval_loss = pref.validate(model) if pref else evaluate(scored, val_rows, cfg, pad_id, dist, seq2seq)
            if eval_loss is not None:
                record.update({"eval_loss": eval_loss, **(pref.eval_metrics if pref else {})})
                record.update(router_load.take() if router_load else {})
                if eval_loss < best:
                    best, bad_evals = eval_loss, 0
                    with timer.phase("checkpoints"):
                        _save_adapter(model, output_dir / "best_adapter", dist)
                else:
                    bad_evals += 1
        elapsed = time.perf_counter() - window_start
        if cfg.compile and step == 1 and dist.is_main:
            log(f"compile: the first step took {elapsed:.1f} s")
        record["tokens_per_s"] = tokens_seen * dist.world / elapsed if elapsed > 0 else 0.0
        if step % cfg.logging_steps == 0 or "eval_loss" in record or step == total_steps:
            metrics.write(record)
        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        stop = cfg.early_stopping_patience and bad_evals >= cfg.early_stopping_patience
        if cfg.save_steps and (step % cfg.save_steps == 0 or step == total_steps or stop):
            state = {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                     "step": step, "micro": micro, "best": best, "bad_evals": bad_evals,
                     "initial_eval": initial_eval, "global_batch": global_batch,
                     "method": method.training_state(model, "default", adapter_cfg),
                     "preference": pref.state() if pref else None}
            with timer.phase("checkpoints"):
                write_checkpoint(output_dir, step, ddp_loss, model, optimizer, state, config_text, dist)
        dist.barrier()
        if on_step_end is not None:
            on_step_end(StepInfo(step, last_loss, lr))
        if stop:
            if dist.is_main:
                log(f"early stopping at step {step}: no better validation loss in {bad_evals} evaluations")
            break
    bar.close()
    metrics.close()
    if recompute:
        recompute.remove()  # the final evaluation's generation runs without the hooks

    summary = {}
    with timer.phase("checkpoints"):
        adapter_dir = _save_adapter(model, output_dir / "adapter", dist)
    if dist.is_main:
        write_loss_curve(output_dir / "metrics.jsonl", output_dir / "loss.png")
        trainable, total = trainable_parameters(model)
        peak = _peak_memory_mib(device)
        summary = {"trainable_parameters": trainable, "total_parameters": total, "steps": step,
                   "seconds": time.perf_counter() - started, "peak_memory_mib": peak,
                   "allocator": allocator_in_use(),
                   "final_train_loss": last_loss, "initial_validation_loss": initial_eval,
                   "final_validation_loss": eval_loss,
                   "best_validation_loss": None if best == math.inf else best,
                   "adapter": str(adapter_dir), "output_dir": str(output_dir),
                   "train_examples": data.train_stats.examples, "validation_examples": data.validation_stats.examples,
                   "precision": cfg.precision, "objective": cfg.objective,
                   # of the first epoch's batches, each padded to its longest row
                   "padding_share": padding_share(make_batches(lengths, cfg.batch_size, cfg.batch_tokens,
                                                               cfg.group_by_length, cfg.seed, 0), lengths),
                   "micro_batch": cfg.batch_size, "grad_accum": cfg.grad_accum,
                   "validation_passes": validation.passes(step) if val_rows else 0}
        if router_load is not None and router_load.last:  # the last validation pass's routing
            summary["router_load"] = router_load.last
            log(RouterLoad.describe(router_load.last))
        if router_load is not None:  # the final evaluation and the caller's later calls count nothing
            router_load.remove()
        if _wants_final_eval(cfg, default_job) and dist.sharded:
            log("final evaluation: not run on a sharded model; score the adapter with deltatune eval")
        elif _wants_final_eval(cfg, default_job) and (cfg.data.test_path or data.validation_records):
            with timer.phase("final_evaluation"):
                summary["evaluation"] = (pref.final_eval(model, tokenizer, output_dir, log) if pref else
                                         _final_eval(model, tokenizer, cfg, data, output_dir, log))
            summary["evaluation_split"] = "test" if cfg.data.test_path else "validation"
        summary["time_seconds"] = timer.split()  # the whole call: loading to the final evaluation
        write_text_atomically(output_dir / "summary.json", json.dumps(summary, indent=2))
        log("\n".join(["", "summary:"] + [f"  {k}: {v}" for k, v in summary.items() if k != "evaluation"]))
    dist.barrier()
    dist.shutdown()
    return summary
