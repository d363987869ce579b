"""The Oxford/Paris AP protocol: hand-worked values, and agreement with literal ports of the reference code."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from trainables.retrieval.metrics import (
    average_precisions,
    compute_ap,
    mean_average_precision,
    revisited_gnd,
    revisited_map,
)


def ranking(*columns: list[int]) -> np.ndarray:
    """Build a (n_ranked, n_queries) ranks array from one best-first list per query."""
    return np.array(columns, dtype=np.int64).T


# --- literal ports of the reference implementations (the oracles) -----------------------------------------


def cpp_compute_ap(pos: set[int], amb: set[int], ranked_list: list[int]) -> float:
    """Oxford's compute_ap.cpp, line by line (float there, float64 here)."""
    old_recall = 0.0
    old_precision = 1.0
    ap = 0.0
    intersect_size = 0
    j = 0
    for i in range(len(ranked_list)):
        if ranked_list[i] in amb:
            continue
        if ranked_list[i] in pos:
            intersect_size += 1
        recall = intersect_size / float(len(pos))
        precision = intersect_size / (j + 1.0)
        ap += (recall - old_recall) * ((old_precision + precision) / 2.0)
        old_recall = recall
        old_precision = precision
        j += 1
    return ap


def cirtorch_compute_map(ranks: np.ndarray, gnd: list[dict]) -> tuple[float, np.ndarray]:
    """cnnimageretrieval-pytorch's compute_ap + compute_map (without precision@k), line by line."""

    def compute_ap_ref(pranks, nres):
        ap = 0.0
        recall_step = 1.0 / nres
        for j in np.arange(len(pranks)):
            rank = pranks[j]
            precision_0 = 1.0 if rank == 0 else float(j) / rank
            precision_1 = float(j + 1) / (rank + 1)
            ap += (precision_0 + precision_1) * recall_step / 2.0
        return ap

    total = 0.0
    nq = len(gnd)
    aps = np.zeros(nq)
    nempty = 0
    for i in np.arange(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = float("nan")
            nempty += 1
            continue
        qgndj = np.array(gnd[i]["junk"])
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = 0
        ij = 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = compute_ap_ref(pos, len(qgnd))
        total += ap
        aps[i] = ap
    return total / (nq - nempty), aps


def random_problem(rng: np.random.Generator, n_db: int, n_q: int, top_k: int | None, overlap: bool):
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)
    if top_k is not None:
        ranks = ranks[:top_k]
    gnd = []
    for _ in range(n_q):
        n_ok = int(rng.integers(0, 12))
        chosen = rng.choice(n_db, size=n_ok + 8, replace=False)
        ok, junk = chosen[:n_ok], chosen[n_ok : n_ok + int(rng.integers(0, 8))]
        if overlap and n_ok:
            junk = np.concatenate([junk, ok[:1]])  # an image listed as both positive and junk
        gnd.append({"ok": ok.tolist(), "junk": junk.tolist()})
    return ranks, gnd


# --- hand-worked values ------------------------------------------------------------------------------------


def test_single_positive_at_rank_zero_is_one():
    # j=0, r=0: p0 = 1 (rank 0), p1 = 1/1 = 1 -> AP = (1/1) * (1 + 1)/2 = 1
    assert compute_ap(np.array([0]), 1) == 1.0
    assert mean_average_precision(ranking([4, 0, 1, 2, 3]), [{"ok": [4], "junk": []}]) == 1.0


def test_positives_at_ranks_one_and_three():
    # n = 2.  j=0, r=1: p0 = 0/1 = 0, p1 = 1/2          -> trapezoid (0 + 1/2)/2   = 1/4
    #         j=1, r=3: p0 = 1/3,     p1 = 2/4 = 1/2     -> trapezoid (1/3 + 1/2)/2 = 5/12
    # AP = (1/2) * (1/4 + 5/12) = (1/2) * (2/3) = 1/3
    assert compute_ap(np.array([1, 3]), 2) == pytest.approx(1 / 3, abs=1e-12)
    ranks = ranking([9, 5, 8, 6, 7])  # positives 5 and 6 at ranks 1 and 3
    assert mean_average_precision(ranks, [{"ok": [5, 6], "junk": []}]) == pytest.approx(1 / 3, abs=1e-12)


def test_junk_interleaved_before_positives_shifts_ranks():
    # ranking: 5(junk) 3(pos) 7(junk) 1(neg) 2(pos); junk removed -> 3 1 2: positives at ranks 0 and 2.
    # j=0, r=0: p0 = 1, p1 = 1                 -> 1
    # j=1, r=2: p0 = 1/2, p1 = 2/3             -> (1/2 + 2/3)/2 = 7/12
    # AP = (1/2) * (1 + 7/12) = 19/24
    ranks = ranking([5, 3, 7, 1, 2])
    ap = mean_average_precision(ranks, [{"ok": [3, 2], "junk": [5, 7]}])
    assert ap == pytest.approx(19 / 24, abs=1e-12)
    # Without the junk list the same ranking has positives at ranks 1 and 4:
    # j=0, r=1: (0 + 1/2)/2 = 1/4;  j=1, r=4: (1/4 + 2/5)/2 = 13/40;  AP = (1/2)(1/4 + 13/40) = 23/80
    assert mean_average_precision(ranks, [{"ok": [3, 2], "junk": []}]) == pytest.approx(23 / 80, abs=1e-12)


def test_truncated_ranking_counts_missing_positives_as_not_retrieved():
    # top-2 list 4 0 for positives {4, 3}: only 4 retrieved, at rank 0 -> (1/2) * (1 + 1)/2 = 1/2
    ranks = ranking([4, 0])
    assert mean_average_precision(ranks, [{"ok": [4, 3], "junk": []}]) == pytest.approx(0.5, abs=1e-12)
    assert compute_ap(np.array([0]), 2) == pytest.approx(0.5, abs=1e-12)
    assert compute_ap(np.array([], dtype=int), 3) == 0.0


def test_queries_without_positives_are_skipped():
    ranks = ranking([0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 2, 3])
    gnd = [{"ok": [0], "junk": []}, {"ok": [], "junk": [3]}, {"ok": [2, 3], "junk": [1]}]
    # q0: 0 at rank 0 -> 1.   q1: skipped.
    # q2: 1 0 2 3 minus junk 1 -> 0 2 3: positives at ranks 1, 2:
    #     j=0, r=1: (0 + 1/2)/2 = 1/4;  j=1, r=2: (1/2 + 2/3)/2 = 7/12;  AP = (1/2)(1/4 + 7/12) = 5/12
    aps = average_precisions(ranks, gnd)
    assert aps[0] == 1.0 and np.isnan(aps[1]) and aps[2] == pytest.approx(5 / 12, abs=1e-12)
    # mean over the two queries with positives: (1 + 5/12)/2 = 17/24
    assert mean_average_precision(ranks, gnd) == pytest.approx(17 / 24, abs=1e-12)


def test_no_query_with_positives_raises():
    with pytest.raises(ValueError, match="none of the 2 queries has a positive"):
        mean_average_precision(ranking([0, 1], [1, 0]), [{"ok": [], "junk": [0]}, {"ok": []}])


def test_sklearn_step_sum_differs_from_the_trapezoid():
    # positives at ranks 1 and 3 of 5: sklearn's AP = mean precision at each positive = (1/2 + 2/4)/2 = 1/2,
    # the Oxford trapezoid gives 1/3 (worked above).
    y_true = np.array([0, 1, 0, 1, 0])
    y_score = -np.arange(5.0)  # best first
    assert average_precision_score(y_true, y_score) == pytest.approx(0.5)
    ours = mean_average_precision(ranking([0, 1, 2, 3, 4]), [{"ok": [1, 3], "junk": []}])
    assert ours == pytest.approx(1 / 3) and abs(ours - 0.5) > 0.1


def test_revisited_protocols_hand_worked():
    # ranking 0..5;  easy = {0, 3}, hard = {1}, junk = {2}
    ranks = ranking([0, 1, 2, 3, 4, 5])
    gnd = [{"easy": [0, 3], "hard": [1], "junk": [2]}]
    # Easy: ok {0,3}, ignore {1,2} -> 0 3 4 5: ranks 0, 1 -> AP 1
    # Medium: ok {0,1,3}, ignore {2} -> 0 1 3 4 5: ranks 0, 1, 2 -> AP 1
    # Hard: ok {1}, ignore {0,2,3} -> 1 4 5: rank 0 -> AP 1
    assert revisited_map(ranks, gnd) == {"easy": 1.0, "medium": 1.0, "hard": 1.0}
    # ranking 4 1 0 2 3 5:
    # Easy: ignore 1, 2 -> 4 0 3 5: ranks 1, 2: (1/4 + 7/12)/2 = 5/12
    # Medium: ignore 2 -> 4 1 0 3 5: ranks 1, 2, 3: j=0 r=1: 1/4; j=1 r=2: 7/12; j=2 r=3: (2/3 + 3/4)/2 = 17/24
    #         AP = (1/3)(1/4 + 7/12 + 17/24) = (1/3)(37/24) = 37/72
    # Hard: ignore 0, 2, 3 -> 4 1 5: rank 1 -> (0 + 1/2)/2 = 1/4
    out = revisited_map(ranking([4, 1, 0, 2, 3, 5]), gnd)
    assert out["easy"] == pytest.approx(5 / 12)
    assert out["medium"] == pytest.approx(37 / 72)
    assert out["hard"] == pytest.approx(1 / 4)


def test_revisited_gnd_matches_cirtorch_composition():
    g = [{"easy": [1, 2], "hard": [3], "junk": [4]}]
    assert sorted(revisited_gnd(g, "easy")[0]["junk"].tolist()) == [3, 4]
    assert sorted(revisited_gnd(g, "medium")[0]["ok"].tolist()) == [1, 2, 3]
    assert sorted(revisited_gnd(g, "hard")[0]["junk"].tolist()) == [1, 2, 4]
    with pytest.raises(ValueError, match="unknown revisited protocol 'extreme'"):
        revisited_gnd(g, "extreme")
    with pytest.raises(KeyError, match="lacks \\['easy'"):
        revisited_gnd([{"ok": [1], "junk": []}], "easy")


# --- agreement with the reference implementations on random problems -----------------------------------


@pytest.mark.parametrize("top_k", [None, 40])
def test_equals_literal_cpp_port_on_random_rankings(top_k):
    rng = np.random.default_rng(7)
    ranks, gnd = random_problem(rng, n_db=120, n_q=30, top_k=top_k, overlap=True)
    ours = average_precisions(ranks, gnd)
    for q, g in enumerate(gnd):
        if not g["ok"]:
            assert np.isnan(ours[q])
            continue
        ref = cpp_compute_ap(set(g["ok"]), set(g["junk"]), ranks[:, q].tolist())
        assert ours[q] == pytest.approx(ref, abs=1e-12), f"query {q}"


@pytest.mark.parametrize("top_k", [None, 40])
def test_equals_cirtorch_compute_map_on_random_rankings(top_k):
    rng = np.random.default_rng(11)
    ranks, gnd = random_problem(rng, n_db=120, n_q=30, top_k=top_k, overlap=False)
    ref_map, ref_aps = cirtorch_compute_map(ranks, gnd)
    np.testing.assert_allclose(average_precisions(ranks, gnd), ref_aps, atol=1e-12)
    assert mean_average_precision(ranks, gnd) == pytest.approx(ref_map, abs=1e-12)


def test_compute_ap_equals_mean_average_precision_path():
    rng = np.random.default_rng(3)
    ranks, gnd = random_problem(rng, n_db=60, n_q=10, top_k=None, overlap=False)
    for q, g in enumerate(gnd):
        if not g["ok"]:
            continue
        kept = [x for x in ranks[:, q] if x not in set(g["junk"])]
        pos = np.array([i for i, x in enumerate(kept) if x in set(g["ok"])])
        assert compute_ap(pos, len(g["ok"])) == pytest.approx(average_precisions(ranks, gnd)[q], abs=1e-12)


# --- input checks ---------------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors():
    gnd = [{"ok": [0], "junk": []}, {"ok": [1], "junk": []}]
    good = ranking([0, 1, 2], [1, 0, 2])
    with pytest.raises(ValueError, match="pass it transposed"):
        mean_average_precision(good.T.copy(), gnd)
    with pytest.raises(ValueError, match="negative index"):
        mean_average_precision(ranking([0, -1, 2], [1, 0, 2]), gnd)
    with pytest.raises(ValueError, match="twice for query 1"):
        mean_average_precision(ranking([0, 1, 2], [1, 1, 2]), gnd)
    with pytest.raises(ValueError, match="integer database indices"):
        mean_average_precision(good.astype(float), gnd)
    with pytest.raises(KeyError, match="no 'ok' list"):
        mean_average_precision(good, [{"good": [0]}, {"ok": [1]}])
    with pytest.raises(ValueError, match="sorted ascending"):
        compute_ap(np.array([3, 1]), 2)
    with pytest.raises(ValueError, match="n_pos counts every positive"):
        compute_ap(np.array([0, 1, 2]), 2)
