"""Exact-match accuracy of Depo answers, broken down by the number of hops k.

A multi-token answer counts as correct only if every one of its tokens is predicted, which is
what "the model can follow k edges" means; per-token accuracy would reward half-right names.
"""

from __future__ import annotations

import numpy as np

Counts = dict[int, tuple[int, int]]  # k -> (correct answers, answers)


def exact_match_by_hops(predictions: np.ndarray, batch: dict[str, np.ndarray]) -> Counts:
    """predictions [B, L]: the predicted token for each target position of `batch`.

    An answer span is one (row, segment, answer id) with answer id > 0: answer ids restart in
    every document, and a packed row holds several documents, so the segment id keeps them apart.
    Batches without `segment_ids` treat each row as one document.
    """
    predictions = np.asarray(predictions)
    answer_ids = np.asarray(batch["answer_ids"])
    rows, cols = np.nonzero(answer_ids > 0)
    if rows.size == 0:
        return {}
    segments = np.asarray(batch.get("segment_ids", np.zeros_like(answer_ids)))[rows, cols]
    span_key = np.stack([rows, segments, answer_ids[rows, cols]], axis=1)
    spans, span_of_token = np.unique(span_key, axis=0, return_inverse=True)
    span_of_token = span_of_token.ravel()
    token_wrong = predictions[rows, cols] != np.asarray(batch["targets"])[rows, cols]
    span_wrong = np.bincount(span_of_token, weights=token_wrong, minlength=len(spans)) > 0
    span_hops = np.zeros(len(spans), np.int64)
    span_hops[span_of_token] = np.asarray(batch["hops"])[rows, cols]
    return {int(k): (int(np.sum(~span_wrong[span_hops == k])), int(np.sum(span_hops == k)))
            for k in np.unique(span_hops)}


def merge_counts(*counts: Counts) -> Counts:
    """Adds up per-k (correct, total) counts, e.g. over eval batches or processes."""
    merged: dict[int, list[int]] = {}
    for c in counts:
        for k, (correct, total) in c.items():
            entry = merged.setdefault(int(k), [0, 0])
            entry[0] += int(correct)
            entry[1] += int(total)
    return {k: (v[0], v[1]) for k, v in sorted(merged.items())}
