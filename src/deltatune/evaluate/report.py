"""What an evaluation writes: predictions.jsonl, metrics.json, report.md, a bar chart, a table."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..files import write_atomically, write_text_atomically

_LOWER_IS_BETTER = ("perplexity",)


def write_outputs(out: Path, metrics: dict[str, dict[str, float]], rows: list[dict], loss_curves: list[str],
                  ranked: bool = False) -> None:
    """Write the files; ``ranked``: rows ``NAME@rB`` are one adapter at several ranks, so the
    report gets a table and a plot (ranks.png) of score against rank as well."""
    out.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    write_text_atomically(out / "predictions.jsonl", text)
    blob = json.dumps(metrics, indent=2)
    write_text_atomically(out / "metrics.json", blob)
    _bar_chart(metrics, out / "metrics.png")
    if ranked:
        _rank_plot(metrics, out / "ranks.png")
    write_text_atomically(out / "report.md", _markdown(metrics, rows, loss_curves, ranked))


def by_rank(metrics: dict[str, dict[str, float]]) -> dict[str, dict[int, dict[str, float]]]:
    """``{adapter: {rank: scores}}`` from rows named ``NAME@rB``."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for row, scores in metrics.items():
        found = re.fullmatch(r"(.+)@r(\d+)", row)
        if found:
            out.setdefault(found[1], {})[int(found[2])] = scores
    return out


def rank_table(metrics: dict[str, dict[str, float]]) -> str:
    """One row per adapter and rank: every metric, and the base's scores for comparison."""
    names = list(next(iter(metrics.values())))
    lines = ["| adapter | rank | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    if "base" in metrics:
        lines.append("| base | - | " + " | ".join(f"{metrics['base'][n]:.4f}" for n in names) + " |")
    for adapter, ranks in by_rank(metrics).items():
        for rank in sorted(ranks):
            lines.append(f"| {adapter} | {rank} | " + " | ".join(f"{ranks[rank][n]:.4f}" for n in names) + " |")
    return "\n".join(lines)


def table(metrics: dict[str, dict[str, float]]) -> str:
    """Metric rows, one column per model, and the change of each adapter against the base."""
    models = list(metrics)
    names = list(next(iter(metrics.values())))
    header = ["metric", *models] + [f"change ({m})" for m in models[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        cells = [name] + [f"{metrics[m][name]:.4f}" for m in models]
        cells += [f"{metrics[m][name] - metrics[models[0]][name]:+.4f}" for m in models[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(metrics, rows, loss_curves, ranked: bool = False) -> str:
    models = list(metrics)
    parts = ["# Evaluation: base against tuned", "",
             "ROUGE values are means of per-example F-measures (0-1); BLEU and chrF are sacrebleu's corpus "
             "scores (0-100); perplexity is of the references given their prompts (lower is better).", "",
             table(metrics), "", "![metrics](metrics.png)", ""]
    for curve in loss_curves:
        parts += [f"![training loss]({curve})", ""]
    if ranked:
        parts += ["## Score against rank", "", rank_table(metrics), "", "![score against rank](ranks.png)", ""]
    parts += ["## Examples", ""]
    by_id: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_id.setdefault(r["id"], {})[r["model"]] = r
    for example_id in list(by_id)[:5]:
        entries = by_id[example_id]
        first = next(iter(entries.values()))
        parts += [f"### Example {example_id}", "", "Prompt:", "", "```", first["prompt"].strip(), "```", "",
                  f"Reference: {first['reference']}", ""]
        parts += [f"- **{m}**: {entries[m]['prediction']}" for m in models if m in entries]
        parts.append("")
    return "\n".join(parts)


def _bar_chart(metrics: dict[str, dict[str, float]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(metrics)
    names = [n for n in next(iter(metrics.values())) if n not in _LOWER_IS_BETTER]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        values = [metrics[model][n] / (100.0 if n in ("bleu", "chrf") else 1.0) for n in names]
        ax.bar([x + i * width for x in range(len(names))], values, width, label=model)
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(names))])
    ax.set_xticklabels([n + (" /100" if n in ("bleu", "chrf") else "") for n in names], rotation=30, ha="right")
    ax.set_ylabel("score")
    ax.legend()
    fig.tight_layout()
    write_atomically(png, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def _rank_plot(metrics: dict[str, dict[str, float]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in next(iter(metrics.values())) if n not in _LOWER_IS_BETTER]
    fig, ax = plt.subplots(figsize=(6, 4))
    for adapter, ranks in by_rank(metrics).items():
        xs = sorted(ranks)
        for n in names:
            scale = 100.0 if n in ("bleu", "chrf") else 1.0
            ax.plot(xs, [ranks[x][n] / scale for x in xs], marker="o", label=f"{adapter}: {n}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank")
    ax.set_ylabel("score (BLEU, chrF /100)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    write_atomically(png, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
