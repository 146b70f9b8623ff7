"""Quality metrics: classification (accuracy, macro-F1, confusion) and generation (EM, token F1, ROUGE-L, BLEU, chrF)."""

from __future__ import annotations

import numpy as np

from ..prompts import normalize


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_labels: int) -> np.ndarray:
    """Rows are true labels, columns predicted labels."""
    cm = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def classification_metrics(y_true, y_pred, labels: list[str]) -> dict:
    """Accuracy, macro-F1 (over classes present in truth or predictions), per-class P/R/F1 and the confusion matrix.

    A prediction of -1 (a generated answer that names no label) counts as wrong for its true class and is
    reported as ``format_failure_rate``; it has no column in the confusion matrix.

    Example:
        >>> m = classification_metrics([0, 1, 1], [0, 1, 0], ["neg", "pos"])
        >>> round(m["accuracy"], 3), round(m["macro_f1"], 3)
        (0.667, 0.667)
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    valid = y_pred >= 0
    cm = confusion_matrix(y_true[valid], y_pred[valid], len(labels))
    tp = np.diag(cm).astype(float)
    pred_n = cm.sum(0).astype(float)
    true_n = np.bincount(y_true, minlength=len(labels)).astype(float)
    precision = np.divide(tp, pred_n, out=np.zeros_like(tp), where=pred_n > 0)
    recall = np.divide(tp, true_n, out=np.zeros_like(tp), where=true_n > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    active = (true_n > 0) | (pred_n > 0)
    return {
        "accuracy": float(tp.sum() / max(1, len(y_true))),
        "macro_f1": float(f1[active].mean()) if active.any() else 0.0,
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(true_n[i])}
            for i, name in enumerate(labels)
        },
        "confusion_matrix": cm.tolist(),
        "format_failure_rate": float((~valid).sum() / max(1, len(y_pred))),
    }


def label_audit(gold, teacher, labels: list[str], kept=None) -> dict:
    """A teacher's labels against gold, on the items that have a gold label (gold id >= 0): how many, the share
    it got right (``agreement``), per class (gold count, teacher count, precision and recall of the teacher) and
    the confusion matrix (rows gold, columns teacher; an answer naming no label, -1, is counted in ``unparsed``).
    ``kept`` (optional, a mask): the labels training used; their agreement is ``agreement_kept``.

    Example:
        >>> a = label_audit([0, 0, 1, -1], [0, 1, 1, 0], ["neg", "pos"])
        >>> a["n"], round(a["agreement"], 3), a["confusion_matrix"]
        (3, 0.667, [[1, 1], [0, 1]])
    """
    gold = np.asarray(gold, dtype=np.int64)
    teacher = np.asarray(teacher, dtype=np.int64)
    has = gold >= 0
    m = classification_metrics(gold[has], teacher[has], labels)
    out = {"n": int(has.sum()), "n_labelled": len(gold), "agreement": m["accuracy"] if has.any() else None,
           "unparsed": int((teacher[has] < 0).sum()), "confusion_matrix": m["confusion_matrix"],
           "per_class": {name: {"gold": c["support"], "teacher": int(np.asarray(m["confusion_matrix"])[:, i].sum()),
                                "precision": c["precision"], "recall": c["recall"]}
                         for i, (name, c) in enumerate(m["per_class"].items())}}
    if kept is not None:
        k = np.asarray(kept, dtype=bool) & has
        out["n_kept"] = int(k.sum())
        out["agreement_kept"] = float((teacher[k] == gold[k]).mean()) if k.any() else None
    return out


def _norm_tokens(text: str) -> list[str]:
    return normalize(text).split()


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the bag of normalised tokens (SQuAD-style); 1.0 when both are empty."""
    from collections import Counter

    p, r = _norm_tokens(prediction), _norm_tokens(reference)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def generation_item_scores(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per-item exact match, token F1 and ROUGE-L F: the item-level scores that metrics and bootstraps average."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return {"exact_match": [float(normalize(p) == normalize(r)) for p, r in zip(predictions, references)],
            "token_f1": [token_f1(p, r) for p, r in zip(predictions, references)],
            "rouge_l": [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]}


def corpus_bleu_chrf(predictions: list[str], references: list[str]) -> tuple[float, float]:
    """Corpus BLEU and chrF (``sacrebleu``) as fractions in [0, 1]."""
    import sacrebleu

    return (sacrebleu.corpus_bleu(predictions, [references]).score / 100,
            sacrebleu.corpus_chrf(predictions, [references]).score / 100)


def generation_metrics(predictions: list[str], references: list[str]) -> dict:
    """Exact match and token F1 (normalised), ROUGE-L F (``rouge-score``), corpus BLEU and chrF (``sacrebleu``).

    Scores are fractions in [0, 1] (BLEU and chrF too, divided by 100).

    Example:
        >>> m = generation_metrics(["the cat sat"], ["The cat sat."])
        >>> m["exact_match"], round(m["token_f1"], 2)
        (1.0, 1.0)
    """
    items = generation_item_scores(predictions, references)
    out = {k: float(np.mean(v)) if v else 0.0 for k, v in items.items()}
    out["bleu"], out["chrf"] = corpus_bleu_chrf(predictions, references)
    return out
