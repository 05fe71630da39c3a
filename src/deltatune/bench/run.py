"""Run every (case, tool) of a ``deltatune bench`` in its own process and tabulate the results."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

from ..allocator import without_preloaded_allocator
from ..files import write_atomically, write_text_atomically
from .cases import CASES

# Dense bf16 tensor throughput of the GPUs MFU is reported for (TFLOP/s, without sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores)"


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("deltatune", "torch", "transformers", "peft", "bitsandbytes", "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def worker_env(allocator: str, env: Optional[dict] = None) -> dict:
    """The environment of a worker: this process's (``same``), or without the allocator the
    ``deltatune`` command preloaded into itself (``system``: glibc's malloc)."""
    env = dict(os.environ if env is None else env)
    return without_preloaded_allocator(env) if allocator == "system" else env


def run_one(spec: dict, log: Callable[[str], None]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, out_file = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec_file.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-m", "deltatune.bench.worker", str(spec_file), str(out_file)],
                              capture_output=True, text=True, env=worker_env(spec.get("allocator", "same")))
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
            log(f"{spec['case']['name']} / {spec['tool']}: failed: {lines[-1]}")
            return {"tool": spec["tool"], "case": spec["case"]["name"], "error": lines[-1]}
        return json.loads(out_file.read_text())


def tools_for(case_name: str, tools: list[str]) -> list[str]:
    return ["full"] if CASES[case_name].method == "full" else tools


def summarise(rows: list[dict], device: str) -> list[dict]:
    """One line per case: each tool's figures and the ratio deltatune / PEFT."""
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in device), None)
    lines = []
    for case in dict.fromkeys(r["case"] for r in rows):
        got = {r["tool"]: r for r in rows if r["case"] == case}
        ours = got.get("deltatune") or got.get("full")
        theirs = got.get("peft")
        # "useful work": the FLOPs of the plain implementation, so skipping work does not count as work
        flops = next((r.get("flops_per_step") for r in (theirs, ours) if r and r.get("flops_per_step")), None)
        line = {"case": case}
        for tool, r in (("deltatune" if "deltatune" in got else "full", ours), ("peft", theirs)):
            if r is None:
                continue
            if "error" in r:
                line[tool] = {"error": r["error"]}
                continue
            entry = {"tokens_per_s": r["tokens_per_s"], "peak_memory_mib": r["peak_memory_mib"],
                     "first_loss": r["first_loss"], "memory": r["memory"]}
            if "expert_path" in r:  # how deltatune computed the experts (moe cases)
                entry["expert_path"] = r["expert_path"]
            if flops:
                entry["tflops"] = flops / r["median_step_s"] / 1e12
                if peak:
                    entry["mfu"] = entry["tflops"] / peak
            line[tool] = entry
        if ours and theirs and "error" not in ours and "error" not in theirs:
            line["speedup"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
            line["memory_ratio"] = ours["peak_memory_mib"] / theirs["peak_memory_mib"]
            line["same_first_loss"] = abs(ours["first_loss"] - theirs["first_loss"]) <= 1e-3 * abs(theirs["first_loss"])
        lines.append(line)
    return lines


def markdown(result: dict) -> str:
    """The table ``deltatune bench`` prints and the docs show, with the settings under it."""
    def cell(entry: Optional[dict], key: str, fmt: str) -> str:
        if entry is None:
            return "–"
        if "error" in entry:
            return "failed"
        value = entry.get(key)
        return "–" if value is None else format(value, fmt)

    def work(entry: Optional[dict]) -> str:
        text = cell(entry, "tflops", ".2f")
        return text + f" ({entry['mfu']:.0%} MFU)" if entry and entry.get("mfu") else text

    head = ("| case | deltatune tokens/s | PEFT tokens/s | deltatune / PEFT | deltatune peak MiB | PEFT peak MiB "
            "| deltatune TFLOP/s |\n|---|---|---|---|---|---|---|\n")
    body = []
    for line in result["summary"]:
        ours, theirs = line.get("deltatune") or line.get("full"), line.get("peft")
        name = line["case"] + (" (transformers alone)" if "full" in line else "")
        if ours and ours.get("expert_path"):
            name += f" (deltatune experts: {ours['expert_path']})"
        speed = f"{line['speedup']:.2f}×" if "speedup" in line else "–"
        body.append(f"| {name} | {cell(ours, 'tokens_per_s', ',.0f')} | {cell(theirs, 'tokens_per_s', ',.0f')} "
                    f"| {speed} | {cell(ours, 'peak_memory_mib', ',.0f')} | {cell(theirs, 'peak_memory_mib', ',.0f')} "
                    f"| {work(ours)} |")
    s = result["settings"]
    used = ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v)
    dtype = s["dtype"] + (", bf16 autocast" if s.get("precision") == "bf16" else "")
    foot = (f"\n{result['device']}; {s['shape']} shape, batch {s['batch_size']} x {s['seq_len']}, {dtype}, "
            f"LoRA r={s['r']} alpha={s['alpha']} on {_targets(s)}, {_optimizer_name(s)}, median of {s['steps']} "
            f"steps after {s['warmup']} warm-up; labels: {s['labels']} ({result['labelled_share']:.0%} of positions "
            f"trained).{_allocators(result)} Versions: {used}. Command: `{result['command']}`\n")
    return head + "\n".join(body) + "\n" + foot


def _allocators(result: dict) -> str:
    """The host memory allocator each tool's runs used, where the rows record it (CPU runs)."""
    if result["settings"].get("device") != "cpu":
        return ""
    used = {r["tool"]: r["allocator"] for r in result["rows"] if "allocator" in r}
    if not used:
        return ""
    return " Memory allocator: " + ", ".join(f"{tool} {name}" for tool, name in used.items()) + "."


def _targets(settings: dict) -> str:
    kinds = {CASES[c].experts for c in settings.get("cases", []) if c in CASES and CASES[c].method != "full"}
    moe = "the attention projections and the fused expert weights (target_parameters)"
    if kinds == {True}:
        return moe
    return f"all linear layers ({moe} in the moe cases)" if True in kinds else "all linear layers"


def _optimizer_name(settings: dict) -> str:
    names = {"adamw": "AdamW", "adamw_8bit": "8-bit AdamW", "paged_adamw_8bit": "paged 8-bit AdamW",
             "paged_adamw": "paged AdamW"}
    return names[settings.get("optimizer", "adamw")]


def memory_markdown(result: dict) -> str:
    """Where each run's peak memory comes from."""
    out = ["| case | tool | weights | gradients | optimizer | activations and temporaries | peak (MiB) |",
           "|---|---|---|---|---|---|---|"]
    for line in result["summary"]:
        for tool in ("deltatune", "full", "peft"):
            entry = line.get(tool)
            if not entry or "error" in entry:
                continue
            m = entry["memory"]
            out.append(f"| {line['case']} | {tool} | {m['parameters_mib']:,.0f} | {m['gradients_mib']:,.0f} | "
                       f"{m['optimizer_mib']:,.0f} | {m['activations_mib']:,.0f} | {m['peak_mib']:,.0f} |")
    return "\n".join(out) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = result["summary"]
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.5 * len(lines)))
    for offset, tool, colour in ((-0.2, "deltatune", "tab:blue"), (0.2, "peft", "tab:gray")):
        values = [(line.get(tool) or line.get("full" if tool == "deltatune" else "")) or {} for line in lines]
        ax.barh([i + offset for i in range(len(lines))], [v.get("tokens_per_s", 0) for v in values], height=0.4,
                color=colour, label="deltatune" if tool == "deltatune" else "HF PEFT")
    ax.set_yticks(range(len(lines)), [line["case"] for line in lines])
    ax.set_xlabel("tokens/s (training step)")
    ax.legend()
    ax.set_title(result["device"], fontsize=9)
    fig.tight_layout()
    write_atomically(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def write_outputs(result: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(folder / "bench.json", json.dumps(result, indent=2))
    write_text_atomically(folder / "bench.md", markdown(result) + "\n" + memory_markdown(result))
    plot(result, folder / "bench.png")
