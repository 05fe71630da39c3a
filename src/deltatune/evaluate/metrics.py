"""Text metrics for generated answers against references.

ROUGE-1/2/L/Lsum: mean of per-example F-measures in [0, 1] (``rouge-score``, with stemming).
BLEU and chrF: sacrebleu's corpus scores (0-100). Exact match and token F1 use SQuAD-style
normalisation (lower case, no punctuation, no articles, single spaces).
"""

from __future__ import annotations

import re
import string
from collections import Counter

METRICS = ("rouge", "bleu", "chrf", "exact_match", "token_f1")
_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / max(len(references), 1)


def token_f1(predictions: list[str], references: list[str]) -> float:
    scores = []
    for p, r in zip(predictions, references):
        pred, ref = normalize(p).split(), normalize(r).split()
        common = sum((Counter(pred) & Counter(ref)).values())
        if not pred or not ref:
            scores.append(float(pred == ref))
        elif common == 0:
            scores.append(0.0)
        else:
            precision, recall = common / len(pred), common / len(ref)
            scores.append(2 * precision * recall / (precision + recall))
    return sum(scores) / max(len(scores), 1)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(_ROUGE_TYPES, 0.0)
    for p, r in zip(predictions, references):
        # rougeLsum splits summaries into sentences at newlines.
        scores = scorer.score(r, p)
        for key in _ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    n = max(len(references), 1)
    return {key: value / n for key, value in totals.items()}


def bleu(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(predictions, [references]).score


def chrf(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_chrf(predictions, [references]).score


def compute(names: list[str], predictions: list[str], references: list[str]) -> dict[str, float]:
    """The requested metrics (``METRICS`` names) as a flat ``{metric: value}``."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {list(METRICS)}")
    out: dict[str, float] = {}
    for name in names:
        if name == "rouge":
            out.update(rouge(predictions, references))
        else:
            out[name] = {"bleu": bleu, "chrf": chrf, "exact_match": exact_match, "token_f1": token_f1}[name](
                predictions, references)
    return out
