"""Exact match and token F1 of a generated answer against one or more references (SQuAD's definitions).

Normalisation (the official SQuAD v1.1 / v2.0 evaluation script's ``normalize_answer``, in its order):

    1. lowercase
    2. remove every ASCII punctuation character (``string.punctuation``)
    3. remove the articles ``a``, ``an``, ``the`` as whole words
    4. collapse whitespace: split on any whitespace, join with one space (leading/trailing removed)

    exact_match(pred, ref) = 1 if normalize(pred) == normalize(ref) else 0
    f1(pred, ref): P, R = tokens of normalize(pred).split(), of normalize(ref).split()
                   common = |P ∩ R| counted as multisets (each token at most min(count in P, count in R))
                   if P or R is empty: 1 if both are empty else 0          (SQuAD v2.0's rule)
                   elif common == 0: 0
                   else precision = common / |P|, recall = common / |R|, F1 = 2 pr / (p + r)

With several references a prediction scores the maximum over them (per metric). The corpus scores are the
means over samples, reported as percentages (0-100), as SQuAD reports them.
"""

from __future__ import annotations

import collections
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over_references(metric, prediction: str, references: list[str]) -> float:
    return max(metric(prediction, r) for r in references)


def corpus_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """{'exact_match': %, 'f1': %} means over samples (each the best over its references)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    n = max(1, len(predictions))
    em = sum(best_over_references(exact_match, p, r) for p, r in zip(predictions, references))
    f1 = sum(best_over_references(token_f1, p, r) for p, r in zip(predictions, references))
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}
