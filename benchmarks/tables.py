"""Markdown tables of the benchmark results, rendered from the JSON files the benchmarks write.

A generated table in README.md or docs/*.md sits between two marker lines, the first naming
its JSON file (relative to the repository root):

    <!-- table: benchmarks/merge-error-cpu.json -->
    | base | re-quantized | ... |
    <!-- end table -->

    python benchmarks/tables.py            # rewrite every marked table from its JSON
    python benchmarks/tables.py --check    # change nothing; exit 1 listing the tables that differ
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

# `deltatune compare` writes its compare.md with this function; the docs show the same table.
from deltatune.cli.compare import markdown_table as compare_table
# `deltatune bench` writes its bench.md table with this function.
from deltatune.bench.run import markdown as bench_table
from deltatune.bench.run import memory_markdown as bench_memory_table
# `deltatune eval` writes its report.md table with this function.
from deltatune.evaluate.report import table

ROOT = Path(__file__).resolve().parents[1]
START = re.compile(r"^<!-- table: (\S+) -->$", re.M)
END = re.compile(r"^<!-- end table -->$", re.M)

# The docs' names for what the scripts call the cases, load modes and bases; a name not
# listed is shown as the script wrote it.
CASE_LABELS = {"LoRA r=16 train step": "LoRA train step (fwd + bwd + AdamW)", "DoRA r=16 train step": "DoRA train step"}
MODE_LABELS = {"fp32": "float32", "nf4": "NF4 + double quant", "nf4-nodq": "NF4, no double quant",
               "fp4": "FP4 + double quant", "int8": "int8"}
BASE_LABELS = {"fp32": "float32", "nf4": "NF4", "fp4": "FP4", "int8": "int8"}
# Cited, not measured: the QLoRA paper (Dettmers et al., 2023, "Double Quantization") gives
# 0.5 bits of block scales per parameter for NF4, 0.127 with double quantization.
PAPER_BITS = {"nf4": "4.127", "nf4-nodq": "4.5"}


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cells) + " |" for cells in [header, *rows]]
    lines.insert(1, "|" + "---|" * len(header))
    return "\n".join(lines) + "\n"


def side_by_side_table(results: dict) -> str:
    """``peft_side_by_side.py --json``: tokens/s of PEFT and deltatune, their ratio, peak memory."""
    rows = []
    for case, r in results["cases"].items():
        rows.append([CASE_LABELS.get(case, case), f"{r['peft_tokens_per_s']:,.0f}",
                     f"{r['deltatune_tokens_per_s']:,.0f}", f"{r['speedup']:.2f}×",
                     f"{_gib(r['peft_peak_gib'])} / {_gib(r['deltatune_peak_gib'])}"])
    return _table(["case", "PEFT tokens/s", "deltatune tokens/s", "deltatune / PEFT", "peak GiB (PEFT / deltatune)"],
                  rows)


def _gib(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.2f}"  # a CPU run has no peak memory figure (NaN)


def load_memory_table(rows: list[dict]) -> str:
    """``load_memory.py --json``: MiB above the pre-load baseline, bits per parameter, load time."""
    out = []
    for r in rows:
        mode = r["mode"]
        # A base that quantizes nothing keeps every weight in float32.
        bits = "32" if r["quantized_parameters"] == 0 else f"{r['bits_per_quantized_parameter']:.3f}"
        if mode in PAPER_BITS:
            bits += f" ({PAPER_BITS[mode]})"
        out.append([MODE_LABELS.get(mode, mode), f"{r['weights_mib']:.1f}", f"{r['load_peak_increase_mib']:.0f}",
                    f"{r['resident_increase_mib']:.0f}", f"{r['forward_peak_increase_mib']:.0f}", bits,
                    f"{r['seconds']:.1f}"])
    return _table(["base", "weights MiB", "peak while loading", "resident", "peak with forward",
                   "bits per quantized parameter (paper)", "load s"], out)


def merge_error_table(rows: list[dict]) -> str:
    """``merge_error.py --json``: merge error per base, with and without re-quantizing."""
    out = []
    for r in rows:
        # Three significant figures (:.3g drops trailing zeros: 13.95 shows as 14): the errors
        # span 1e-6 to 14, so no number of fixed decimals suits them all.
        out.append([BASE_LABELS.get(r["base"], r["base"]), "yes" if r["requantize"] else "no",
                    f"{r['max_logit_diff']:.3g}", f"{r['mean_logit_diff']:.3g}",
                    f"{r['perplexity_before']:.2f} → {r['perplexity_after']:.2f}",
                    f"{r['base_quantization_error']:.3g}"])
    return _table(["base", "re-quantized", "max abs Δlogit", "mean abs Δlogit", "perplexity before → after",
                   "base error (max abs Δlogit)"], out)


# Which function renders a JSON file, by its file name.
def default_job_table(result: dict) -> str:
    """``default_job.py``: the run (losses, time, memory), then its test scores, base against tuned."""
    run = [["trainable parameters", f"{result['trainable_parameters']:,d} of {result['total_parameters']:,d}"],
           ["steps", str(result["steps"])],
           ["validation loss before → after", f"{result['initial_validation_loss']:.3f} → "
                                               f"{result['final_validation_loss']:.3f}"],
           ["loading and training (s)", f"{result['seconds']:.0f}"
                                        + (f" ({result['precision']})" if result.get("precision") else "")],
           ["peak memory (MiB)", f"{result['peak_memory_mib']:.0f}"],
           ["machine", f"{result['machine']['cpus']} CPUs, {result['machine']['processor']}"],
           ["scores below measured on", f"the {result['evaluation_split']} split"]]
    return _table(["figure", "value"], run) + "\n" + table(result["evaluation"]) + "\n"


def default_job_speed_table(result: dict) -> str:
    """``default_job_speed.py``: the default job at an earlier revision and now, one after the other."""
    rows = []
    for key in ("before", "after"):
        r = result[key]
        code = f"{key} ({r['revision']}" + (f", {r['precision']})" if r.get("precision") else ")")
        rows.append([code, f"{r['train_seconds']:.0f}", f"{r['wall_seconds']:.0f}",
                     f"{r['validation_loss_before']:.3f} → {r['validation_loss_after']:.3f}",
                     f"{r['exact_match']:.3f}", f"{r['rougeL']:.3f}"])
    return _table(["code", "loading + training (s)", "whole command (s)", "validation loss before → after",
                   f"{result['after']['evaluation_split']} exact match", "ROUGE-L"], rows) + (
        f"\nLoading and training {result['speedup']:.2f}× faster; {result['machine']['cpus']} CPUs, "
        f"{result['machine']['processor']}"
        + (f"; both runs with `{result['train_args']}`" if result.get("train_args") else "") + ".\n")


def lr_choice_table(rows: list) -> str:
    """``choose_lr.py``: validation loss at each learning rate, and the rate chosen."""
    rates = sorted({lr for r in rows for lr in r["validation_loss_after"]}, key=float)
    header = ["method", *(f"val loss at lr {lr}" for lr in rates), "chosen lr"]
    return _table(header, [[r["method"], *(f"{r['validation_loss_after'][lr]:.3f}" for lr in rates),
                            f"{r['chosen_lr']:g}"] for r in rows])


def compile_step_table(result: dict) -> str:
    """``compile_step.py``: a LoRA step eager and with compiled blocks, the compile time, break-even."""
    eager, compiled = result["eager"], result["compiled"]
    even = result["steps_to_break_even"]
    table = _table(["mode", "median step (s)", "first step (s)"],
                   [["eager", f"{eager['median_step_s']:.2f}", f"{eager['first_step_s']:.1f}"],
                    ["compiled blocks", f"{compiled['median_step_s']:.2f}", f"{compiled['first_step_s']:.1f}"]])
    return table + (f"\nCompiling took {result['compile_seconds']:.0f} s; steps {result['speedup']:.2f}× faster; "
                    f"{'pays after about ' + format(even, '.0f') + ' steps' if even else 'never pays'}; losses "
                    f"{'agree' if result['losses_agree'] else 'differ'}. {result['machine']['cpus']} CPUs, "
                    f"torch {result['torch']}. Command: `{result['command']}`\n")


def cpu_precision_table(result: dict) -> str:
    """``cpu_precision.py``: the default job's steps at fp32 and bf16 on one CPU, each run."""
    rows = []
    for precision in ("fp32", "bf16"):
        runs = result["runs"][precision]
        rows.append([precision, ", ".join(f"{r['steps_seconds']:.1f}" for r in runs),
                     ", ".join(f"{r['validation_seconds']:.1f}" for r in runs),
                     f"{max(r['peak_memory_mib'] for r in runs):,.0f}"])
    passes = result["runs"]["fp32"][0]["validation_passes"]
    table = _table(["precision", f"{result['steps']} steps (s), each run",
                    f"validation, {passes} passes (s), each run", "peak MiB"], rows)
    probe = ""
    if "bf16_matmul_speedup" in result:  # recorded since precision auto times a matmul on such CPUs
        probe = (f" The timed matmul `precision: auto` decides by: bf16 {result['bf16_matmul_speedup']:.2f}x as fast "
                 f"as float32, so auto takes {result['auto']}.")
    return table + (f"\nbf16 / fp32 step time: {result['bf16_over_fp32']:.2f}.{probe} {result['machine']}, bf16 flags: "
                    f"{', '.join(result['bf16_flags']) or 'none'}; {result['threads']} threads, torch "
                    f"{result['torch']}. Command: `{result['command'].strip()}`\n")


def dequant_speed_table(result: dict) -> str:
    """``dequant_speed.py``: 4-bit dequantization, bitsandbytes against deltatune, per case."""
    rows = []
    for r in result["cases"]:
        kind = r["quant_type"] + (" + double quant" if r["double_quant"] else "")
        rows.append([f"{r['shape'][0]} x {r['shape'][1]}", kind, str(r["blocksize"]), r["dtype"],
                     f"{r['bitsandbytes_ms']:.2f}", f"{r['deltatune_layer_ms']:.2f}", f"{r['layer_speedup']:.2f}×",
                     f"{r['deltatune_fresh_ms']:.2f}", f"{r['fresh_speedup']:.2f}×"])
    table = _table(["weight (out x in)", "type", "block", "dtype", "bitsandbytes (ms)", "deltatune, layer (ms)",
                    "ratio", "deltatune, new tensor (ms)", "ratio"], rows)
    return table + (f"\n{result['device']}; torch {result['torch']}, bitsandbytes {result['bitsandbytes']}; median "
                    f"of {result['repeats']} calls; every case gave identical values. Command: `{result['command']}`\n")


QUALITY_RUNS = {"loop": "plain transformers + PEFT loop", "deltatune_loop_settings": "deltatune, the loop's settings",
                "deltatune_defaults": "deltatune, its defaults"}


def quality_table(result: dict) -> str:
    """``quality.py``: per task, each run's held-out score, wall time and its split, memory, padding."""
    rows = []
    for task in result["tasks"]:
        base = task["base_score"]["rougeL"]
        for name, run in task["runs"].items():
            t = run["time_seconds"]
            around = sum(t.get(k, 0.0) for k in ("data", "checkpoints", "other"))
            loss = run["score"].get("validation_loss")
            rows.append([task["task"], QUALITY_RUNS.get(name, name), f"{run['score']['rougeL']:.3f} ({base:.3f})",
                         f"{run['score']['exact_match']:.3f}", "not measured" if loss is None else f"{loss:.4f}",
                         f"{run['wall_seconds']:.0f}",
                         f"{t.get('load', 0):.0f} / {t['steps']:.0f} / {t.get('validation', 0):.0f} / "
                         f"{t.get('final_evaluation', 0):.0f} / {around:.1f}",
                         f"{run['steps']}", f"{run['peak_memory_mib'] / 1024:.2f}", f"{run['padding_share']:.0%}"])
    return _table(["task", "run", "ROUGE-L (base)", "exact match", "validation loss", "wall s",
                   "load / steps / validation / final eval / data+checkpoints+other s", "steps", "peak GiB",
                   "padding"], rows)


def quality_ratio_table(result: dict) -> str:
    """``quality.py``: the ratios the targets are stated in, per task."""
    rows = []
    for task in result["tasks"]:
        r = task["ratios"]
        diff = f"{r['defaults_score_minus_loop']:+.3f}"
        if "defaults_score_minus_loop_ci95" in r:  # paired bootstrap over the test examples
            low, high = r["defaults_score_minus_loop_ci95"]
            diff += f" (95%: {low:+.3f} to {high:+.3f})"
        rows.append([task["task"], f"{r['defaults_time_over_loop']:.2f}×", diff,
                     f"{r['loop_settings_step_speedup']:.2f}×", f"{r['loop_settings_wall_speedup']:.2f}×",
                     f"{r['loop_settings_memory_over_loop']:.2f}×"])
    return _table(["task", "defaults: training time / loop's", "defaults: ROUGE-L − loop's",
                   "loop's settings: step speed-up", "loop's settings: wall speed-up",
                   "loop's settings: peak memory / loop's"], rows)


def sweep_table(rows: list) -> str:
    """``sweep_defaults.py``: validation loss and training time of each setting, per task."""
    return _table(["task", "setting", "steps", "validation loss", "training s", "padding"],
                  [[r["task"], r["name"], str(r["steps"]), f"{r['validation_loss']:.4f}", f"{r['train_seconds']:.0f}",
                    f"{r['padding_share']:.0%}"] for r in rows])


def peak_memory_table(result: dict) -> str:
    """``peak_memory.py``: peak resident memory at a batch size: the PEFT loop, deltatune before
    this work (where measured), deltatune without cheap recompute, under glibc's malloc (where
    measured), as it runs by default, and with gradient checkpointing; with the steps' seconds."""
    before = all("before_peak_mib" in r for r in result["rows"])
    glibc = all("deltatune_glibc_peak_mib" in r for r in result["rows"])
    names = [("peft_loop", "PEFT loop")] + ([("before", "deltatune before")] if before else []) + [
        ("deltatune_no_recompute", "deltatune, no recompute")] + (
        [("deltatune_glibc", "deltatune, glibc malloc")] if glibc else []) + [
        ("deltatune", "deltatune (default)"), ("deltatune_checkpointing", "deltatune, checkpointing")]

    def cell(row: dict, name: str) -> str:
        if f"{name}_peak_mib" not in row:
            return "not measured"
        allocator = row.get(f"{name}_allocator", "system")
        mark = "" if allocator == "system" else f", {allocator}"
        return f"{row[f'{name}_peak_mib'] / 1024:.2f} GiB ({row[f'{name}_steps_seconds']:.0f} s{mark})"

    return _table(["batch (rows of 400-512 tokens)", *[f"{label}: peak (steps s)" for _, label in names]],
                  [[str(r["batch_size"]), *[cell(r, name) for name, _ in names]] for r in result["rows"]])


def saved_activations_table(result: dict) -> str:
    """``saved_activations.py``: bytes autograd keeps for backward, with and without cheap recompute."""
    labels = {"kept": "everything kept (`--no-cheap-recompute`)", "cheap_recompute": "`cheap_recompute` (default)"}
    shape = f"{result['rows']} rows x {result['tokens']} tokens"
    return _table([f"setting ({shape})", "saved for backward", "forward + backward (median)"],
                  [[labels[name], f"{run['saved_bytes'] / 2**30:.2f} GiB", f"{run['median_seconds']:.2f} s"]
                   for name, run in result["runs"].items()])


def allocators_table(result: dict) -> str:
    """``allocators.py``: peak resident memory and step seconds of one run per memory allocator."""
    return _table(["allocator", "peak", "steps (median s)", "peak / glibc", "steps / glibc"],
                  [[r["allocator"], f"{r['peak_mib'] / 1024:.2f} GiB", f"{r['median_steps_seconds']:.1f}",
                    f"{r['peak_over_glibc']:.2f}", f"{r['time_over_glibc']:.2f}"] for r in result["rows"]])


def plan_check_table(report: dict) -> str:
    """``plan_check.py``: ``deltatune plan``'s peak and tokens/s against measured runs."""
    rows = []
    for c in report["cases"]:
        speed = f"{c['speed_error']:+.0%}" if c["speed_compared"] else "not compared"
        rows.append([c["case"], f"{c['measured_peak_mib']:,.0f}", f"{c['predicted_peak_mib']:,.0f}",
                     f"{c['memory_error']:+.1%}", f"{c['measured_tokens_per_s']:,.0f}",
                     f"{c['predicted_tokens_per_s']:,.0f}", speed])
    return _table(["case", "measured peak MiB", "predicted MiB", "error", "measured tokens/s", "predicted tokens/s",
                   "error"], rows)


def parity_table(results: dict) -> str:
    """``parity.py``: the worst |logit difference| against PEFT per case, worst first."""
    rows = sorted(results.items(), key=lambda item: (-item[1], item[0]))
    return _table(["case (adapter, model: direction)", "worst |logit difference|"],
                  [[case, f"{diff:.1e}" if diff else "0"] for case, diff in rows])


def lr_search_table(rows: list[dict]) -> str:
    """``deltatune compare --lr-search``: each method's validation loss at every rate its walk tried,
    and the rate kept (the test split plays no part)."""
    table = []
    for r in rows:
        tried = r.get("validation_loss_by_lr", {})
        losses = ", ".join(f"{lr}: {'failed' if loss is None else f'{loss:.3f}'}" for lr, loss in tried.items())
        table.append([r["method"], losses, f"{r['lr']:g}" if "lr" in r else "none (every rate failed)"])
    return _table(["method", "validation loss after training, by learning rate", "chosen lr"], table)


# the comparisons the method table takes its scores from: the first fourteen methods at their recipes'
# rates, the catalogue's methods at rates chosen on validation (``deltatune compare --lr-search``)
COMPARE_FILES = ("compare-cpu.json", "compare-cpu-catalogue.json")


def method_properties_table(report: dict) -> str:
    """``method_properties.py``: per method, trainable parameters on the default model, PEFT parity,
    merging, per-row routing, an NF4 base, and the method's test score in ``COMPARE_FILES``."""
    compared = {}
    for name in COMPARE_FILES:
        path = Path(__file__).parent / name
        if path.exists():
            compared.update({row["method"]: row for row in json.loads(path.read_text())})
    total = report["total_parameters_default_model"]
    rows = []
    for m in report["methods"]:
        trainable = m["trainable_default_model"]
        share = f"{trainable:,} ({100 * trainable / total:.2g}%)" if isinstance(trainable, int) else trainable
        parity = f"{m['parity_worst']:.0e}" if m["parity_worst"] else ("0" if m["parity_worst"] == 0 else "no PEFT case")
        c = compared.get(m["method"])
        if c is None:
            score = "not yet compared"
        elif "error" in c:  # e.g. BitFit: the default model has no biases
            score = f"cannot run on the default job: {c['reason']}"
        else:
            score = f"{c['rougeL']:.3f} / {c['exact_match']:.3f}"
        rows.append([f"`{m['method']}`", f"`{m['config']}`", share, parity, m["merge"], m["routing"], m["nf4"], score])
    return _table(["method", "config", "trainable on the default model", "PEFT parity (worst abs logit diff)",
                   "merge (merged vs unmerged)", "per-row routing", "NF4 base", "compare: ROUGE-L / exact (test)"], rows)


def serve_load_table(report: dict) -> str:
    """``serve_load.py``: mixed batches against one adapter at a time, throughput and latency."""
    rows = []
    for mode, label in (("mixed", "mixed batches (default)"), ("swap", "one adapter at a time")):
        m = report["modes"][mode]
        rows.append([label, f"{m['tokens_per_second']:.1f}", f"{m['ttft_p50']:.2f}", f"{m['ttft_p99']:.2f}",
                     f"{1000 * m['per_token_p50']:.0f}", f"{1000 * m['per_token_p99']:.0f}",
                     f"{m['answered']}/{m['requests']}", str(m["mismatched_offline"])])
    ratios = report["ratios"]
    rows.append(["gain of mixed batches", f"{ratios['throughput_mixed_over_swap']:.2f}×", "",
                 f"{ratios['ttft_p99_swap_over_mixed']:.1f}× sooner", "", "", "", ""])
    return _table(["serving", "tokens/s", "first token p50 (s)", "first token p99 (s)", "per token p50 (ms)",
                   "per token p99 (ms)", "answered", "unlike offline"], rows)


def dylora_ranks_table(report: dict) -> str:
    """``dylora_ranks.py``: per rank, the one DyLoRA adapter cut to it against a LoRA trained at it."""
    rows = [["base (no adapter)", f"{report['base']['rougeL']:.3f}", "", "", f"{report['base']['exact_match']:.3f}",
             "", f"{report['base']['perplexity']:.3f}", ""]]
    for row in report["rows"]:
        dy, lo = row["dylora"], row["lora"]
        rows.append([str(row["rank"]), f"{dy['rougeL']:.3f}", f"{lo['rougeL']:.3f}",
                     f"{dy['rougeL'] - lo['rougeL']:+.3f}", f"{dy['exact_match']:.3f}", f"{lo['exact_match']:.3f}",
                     f"{dy['perplexity']:.3f}", f"{lo['perplexity']:.3f}"])
    return _table(["rank", "ROUGE-L: DyLoRA cut", "LoRA at the rank", "difference", "exact match: DyLoRA cut",
                   "LoRA", "perplexity: DyLoRA cut", "LoRA"], rows)


def preference_job_table(result: dict) -> str:
    """``preference_job.py``: each default preference job's held-out (test) figures and its time."""
    rows = []
    for job in result["jobs"].values():
        report, last = job["evaluation"], job["validation"]["last"]
        rows.append([f"`{job['command']}`", f"{report['preference_accuracy_before']:.3f}",
                     f"{report['preference_accuracy_after']:.3f}", f"{report['reward_accuracy']:.3f}",
                     f"{report['reward_margin']:.2f}", f"{last['eval_preference_accuracy']:.3f}", str(job["steps"]),
                     f"{job['time_seconds']['reference']:.0f}", f"{job['time_seconds']['steps']:.0f}",
                     f"{job['wall_seconds']:.0f}"])
    return _table(["command", "test preference accuracy: base", "tuned", "test reward accuracy", "reward margin",
                   "validation preference accuracy", "steps", "reference s", "steps s", "wall s"], rows)


def preference_sweep_table(result: dict) -> str:
    """``preference_job.py --sweep``: each setting's final validation figures (no test split read)."""
    return _table(["setting", "steps", "validation preference accuracy", "reward accuracy", "validation loss",
                   "wall s"],
                  [[r["name"], str(r["steps"]), f"{r['last']['eval_preference_accuracy']:.3f}",
                    f"{r['last']['eval_reward_accuracy']:.3f}", f"{r['last']['eval_loss']:.4f}",
                    f"{r['wall_seconds']:.0f}"] for r in result["sweep"]])


RENDERERS: dict[str, Callable[[Any], str]] = {
    "results-*.json": side_by_side_table,
    "bench-*.json": bench_table,
    "compare-*.json": compare_table,
    "load-memory-*.json": load_memory_table,
    "merge-error-*.json": merge_error_table,
    "default-job-speed-*.json": default_job_speed_table,
    "default-job-cpu*.json": default_job_table,
    "lr-choice-*.json": lr_choice_table,
    "parity-*.json": parity_table,
    "compile-step-*.json": compile_step_table,
    "dequant-speed-*.json": dequant_speed_table,
    "cpu-precision-*.json": cpu_precision_table,
    "quality-*.json": quality_table,
    "sweep-defaults-*.json": sweep_table,
    "preference-job-*.json": preference_job_table,
    "preference-sweep-*.json": preference_sweep_table,
    "peak-memory-*.json": peak_memory_table,
    "saved-activations-*.json": saved_activations_table,
    "allocators-*.json": allocators_table,
    "plan-check-*.json": plan_check_table,
    "serve-load-*.json": serve_load_table,
    "dylora-ranks-*.json": dylora_ranks_table,
    "method-properties-*.json": method_properties_table,
}
# A second table of the same file: "<path>#<view>".
VIEWS: dict[str, Callable[[Any], str]] = {"memory": bench_memory_table, "ratios": quality_ratio_table,
                                          "lr-search": lr_search_table}


def render(source: str) -> str:
    """The table of ``source`` (a JSON path relative to the repository root, ``#view`` for another
    table of the same file)."""
    source, _, view = source.partition("#")
    path = ROOT / source
    if view:
        if view not in VIEWS:
            raise ValueError(f"{source}#{view}: no view {view!r}; views: {', '.join(VIEWS)}")
        return VIEWS[view](json.loads(path.read_text()))
    for pattern, fn in RENDERERS.items():
        if fnmatch.fnmatch(path.name, pattern):
            return fn(json.loads(path.read_text()))
    raise ValueError(f"{source}: no table is rendered from a file of this name")


def marked_tables(text: str) -> list[tuple[str, str, slice]]:
    """(JSON path, table text, where the table text is) for every marked table in ``text``."""
    found = []
    for start in START.finditer(text):
        begin = start.end() + 1
        end = END.search(text, begin)
        if end is None or START.search(text, begin, end.start()):
            raise ValueError(f"the table of {start.group(1)} has no '<!-- end table -->' line after it")
        found.append((start.group(1), text[begin:end.start()], slice(begin, end.start())))
    return found


def stale_tables(text: str) -> list[str]:
    """The JSON paths whose marked table in ``text`` differs from what the JSON renders."""
    return [source for source, table, _ in marked_tables(text) if table != render(source)]


def rewrite(text: str) -> str:
    """``text`` with every marked table rendered again from its JSON."""
    for source, _, where in reversed(marked_tables(text)):  # from the end, so earlier positions stay valid
        text = text[:where.start] + render(source) + text[where.stop:]
    return text


def pages() -> list[Path]:
    """The pages whose marked tables are generated: README.md and docs/*.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs")
    args = parser.parse_args(argv)
    differ = []
    for page in pages():
        text = page.read_text()
        stale = stale_tables(text)
        differ += [f"{os.path.relpath(page, ROOT)}: {source}" for source in stale]
        if stale and not args.check:
            page.write_text(rewrite(text))
    verb = "differs from its JSON" if args.check else "rewritten from its JSON"
    for line in differ:
        print(f"{line}: {verb}")
    return 1 if args.check and differ else 0


if __name__ == "__main__":
    sys.exit(main())
