"""Time an Oxford-sized evaluation: faiss ranking of 5063 database x 55 query descriptors (4096-D) plus mAP.

Descriptors are random unit vectors and the ground truth has Oxford5k-like list sizes (11 landmarks x 5 queries;
positives per landmark roughly as in Oxford's good+ok lists, junk about a third of that), so the work done is the
real one even if the mAP value is meaningless. The target is <= 1 s for ranking + mAP on a 2-core CPU.

    python benchmarks/bench_map.py [--n-db 5063 --n-q 55 --dim 4096 --repeats 5]

Prints a markdown table (median and best of the repeats) to paste into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import faiss  # noqa: F401  (faiss before anything that might bring another OpenMP)
import numpy as np

from trainables.retrieval.metrics import mean_average_precision, revisited_map
from trainables.retrieval.rank import rank_database

# Approximate good+ok counts of the 11 Oxford5k landmarks (all_souls, ashmolean, balliol, bodleian, christ_church,
# cornmarket, hertford, keble, magdalen, pitt_rivers, radcliffe_camera).
OXFORD_LIKE_POSITIVES = [78, 25, 12, 24, 78, 9, 54, 7, 54, 6, 221]


def make_problem(n_db: int, n_q: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    db = rng.standard_normal((n_db, dim), dtype=np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = rng.standard_normal((n_q, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    gnd = []
    for i in range(n_q):
        n_pos = OXFORD_LIKE_POSITIVES[(i // 5) % len(OXFORD_LIKE_POSITIVES)]
        chosen = rng.choice(n_db, size=n_pos + n_pos // 3 + 1, replace=False)
        easy, hard = chosen[: n_pos // 2], chosen[n_pos // 2 : n_pos]
        gnd.append({"ok": chosen[:n_pos], "junk": chosen[n_pos:], "easy": easy, "hard": hard})
    return db, q, gnd


def reference_loop_map(ranks: np.ndarray, gnd: list[dict]) -> float:
    """Straightforward per-query loop (compute_ap.cpp's algorithm), for comparison of speed and value."""
    aps = []
    for qi, g in enumerate(gnd):
        pos, junk = set(g["ok"].tolist()), set(g["junk"].tolist())
        old_recall, old_precision, ap, hits, j = 0.0, 1.0, 0.0, 0, 0
        for x in ranks[:, qi].tolist():
            if x in junk:
                continue
            hits += x in pos
            recall, precision = hits / len(pos), hits / (j + 1.0)
            ap += (recall - old_recall) * (old_precision + precision) / 2.0
            old_recall, old_precision, j = recall, precision, j + 1
        aps.append(ap)
    return float(np.mean(aps))


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, float(np.median(times)), float(np.min(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-db", type=int, default=5063)
    ap.add_argument("--n-q", type=int, default=55)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=None, help="faiss OpenMP threads (default: faiss's choice)"
    )
    args = ap.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    db, q, gnd = make_problem(args.n_db, args.n_q, args.dim, args.seed)
    ranks, t_rank, b_rank = timed(lambda: rank_database(db, q), args.repeats)
    top100, t_top, b_top = timed(lambda: rank_database(db, q, top_k=100), args.repeats)
    m, t_map, b_map = timed(lambda: mean_average_precision(ranks, gnd), args.repeats)
    _, t_rev, b_rev = timed(lambda: revisited_map(ranks, gnd), args.repeats)
    _, t_all, b_all = timed(lambda: mean_average_precision(rank_database(db, q), gnd), args.repeats)
    ref, t_ref, b_ref = timed(lambda: reference_loop_map(ranks, gnd), 1)
    assert abs(ref - m) < 1e-9, (ref, m)
    assert np.array_equal(top100, ranks[:100])

    n_pos = sum(len(g["ok"]) for g in gnd)
    print(
        f"Oxford-sized problem: {args.n_db} db x {args.n_q} queries, {args.dim}-D float32, {n_pos} positives; "
        f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads, {platform.machine()}, "
        f"repeats={args.repeats}"
    )
    print()
    print("| step | median s | best s |")
    print("|---|---:|---:|")
    rows = [
        ("rank_database, full ranking (faiss IndexFlatIP)", t_rank, b_rank),
        ("rank_database, top_k=100", t_top, b_top),
        ("mean_average_precision (vectorized)", t_map, b_map),
        ("revisited_map (easy/medium/hard)", t_rev, b_rev),
        ("**full ranking + mAP (target <= 1 s)**", t_all, b_all),
        ("reference per-query Python loop mAP (1 run)", t_ref, b_ref),
    ]
    for name, med, best in rows:
        print(f"| {name} | {med:.3f} | {best:.3f} |")
    print()
    print(f"mAP of the random problem: {m:.4f} (loop reference {ref:.4f})")


if __name__ == "__main__":
    main()
