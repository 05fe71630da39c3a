"""Each metric against its reference library (or its definition) on the same predictions."""

import pytest

from deltatune.evaluate import metrics

PREDICTIONS = ["The cat sat on the mat.", "A quick brown fox", "running dogs jumped", ""]
REFERENCES = ["the cat sat on a mat", "The quick brown fox jumps.", "the dog runs and jumps", "nothing"]


def test_rouge_is_the_mean_of_rouge_score_f_measures():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    got = metrics.rouge(PREDICTIONS, REFERENCES)
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        expected = sum(scorer.score(r, p)[key].fmeasure for p, r in zip(PREDICTIONS, REFERENCES)) / 4
        assert got[key] == pytest.approx(expected, abs=1e-12)
    assert 0 < got["rouge1"] < 1


def test_bleu_and_chrf_are_sacrebleu_corpus_scores():
    import sacrebleu

    assert metrics.bleu(PREDICTIONS, REFERENCES) == pytest.approx(
        sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score)
    assert metrics.chrf(PREDICTIONS, REFERENCES) == pytest.approx(
        sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score)


def test_exact_match_and_token_f1_normalise():
    assert metrics.exact_match(["The Cat, sat!"], ["cat sat"]) == 1.0
    assert metrics.exact_match(PREDICTIONS, REFERENCES) == 0.25  # articles and punctuation do not count
    # "a quick brown fox" vs "the quick brown fox jumps": 3 common of 3 predicted and 4 reference tokens.
    assert metrics.token_f1(["A quick brown fox"], ["The quick brown fox jumps."]) == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert metrics.token_f1([""], [""]) == 1.0 and metrics.token_f1([""], ["x"]) == 0.0


def test_compute_names_unknown_metrics():
    assert set(metrics.compute(["rouge", "bleu"], PREDICTIONS, REFERENCES)) == {
        "rouge1", "rouge2", "rougeL", "rougeLsum", "bleu"}
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['meteor'\]"):
        metrics.compute(["meteor"], PREDICTIONS, REFERENCES)
