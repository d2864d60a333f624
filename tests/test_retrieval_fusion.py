"""Fusion of a dense and a BM25 ranking."""

from __future__ import annotations

import pytest

from ripelm.runtime.retrieval.fusion import FusionParams, fuse

DENSE = {1: 0.80, 2: 0.70, 3: 0.40, 4: 0.35}
BM25 = {3: 12.0, 4: 6.0, 5: 3.0}


def test_score_fusion_weights_the_two_sides():
    only_bm25 = [i for i, _ in fuse(DENSE, BM25, FusionParams("score", 0.0))]
    only_dense = [i for i, _ in fuse(DENSE, BM25, FusionParams("score", 1.0))]
    assert only_bm25[:3] == [3, 4, 5] and only_dense[:2] == [1, 2]
    mixed = dict(fuse(DENSE, BM25, FusionParams("score", 0.3)))
    assert mixed[3] == pytest.approx(0.3 * 0.40 / 0.80 + 0.7 * 1.0)
    assert mixed[5] == pytest.approx(0.7 * 3.0 / 12.0)  # no dense score among the candidates: 0
    assert set(mixed) == {1, 2, 3, 4, 5}


def test_rrf_and_weighted_rrf():
    rrf = fuse(DENSE, BM25, FusionParams("rrf"))
    assert rrf[0][0] == 3  # 3rd by dense, 1st by BM25: the best combined rank
    heavy_dense = fuse(DENSE, BM25, FusionParams("wrrf", 0.9))
    assert heavy_dense[0][0] == 1
    assert fuse({}, {}, FusionParams()) == []
    with pytest.raises(ValueError):
        fuse(DENSE, BM25, FusionParams("nope"))
