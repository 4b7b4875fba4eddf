"""Issue 10: atlasmtl over seeds against each peer over seeds, not against the peers' seed-0 draw.

Research script. The benchmark runs every peer once (seed 0), while atlasmtl's standing in the API contract is
its mean over seeds 0-8. The best peer of one draw is the largest of four noisy figures, so it is biased upward
wherever a peer moves between seeds (CellTypist's mini-batch SGD, symphonypy's Harmony); kNN and the logistic
regression on PCA barely move. This script reads the peers' runs at several seeds (``benchmark/run.py --seed N``,
one ``results.json`` per seed) and atlasmtl's study rows (``posthoc_constants_study.py`` format, label
``default``), and prints per case and level: atlasmtl's mean, each peer's mean and range over its seeds, the
best peer by mean, and atlasmtl's Δ to it and to the best peer of seed 0 alone.

    python benchmark/experiments/peer_seed_spread.py ATLASMTL_ROWS.json[.gz] RESULTS_SEED0.json RESULTS_SEED1.json ... \
        [--save peers.json.gz]

``--save`` writes the peers' per-seed macro-F1 (case, method, seed, level, macro_f1) as gzipped JSON; such a
file can stand in for the ``results.json`` files (pass it instead of them).
"""
import argparse
import gzip
import json
import statistics as st
from pathlib import Path

PEERS = ["celltypist", "logreg", "knn", "symphonypy"]


def read_json(path: Path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as fh:
        return json.load(fh)


def peer_rows(paths: list[Path]) -> list[dict]:
    """(case, method, seed, level, macro_f1) of every peer run in the given results.json files (or saved rows)."""
    rows = []
    for path in paths:
        data = read_json(path)
        if isinstance(data, list):  # rows saved by --save
            rows += data
            continue
        for run in data["runs"]:
            if run["method"] in PEERS and run["status"] == "ok":
                for level, m in run["metrics"]["levels"].items():
                    rows.append({"case": run["case"], "method": run["method"], "seed": run["seed"], "level": level,
                                 "macro_f1": m["macro_f1"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("atlasmtl_rows", type=Path)
    ap.add_argument("peer_results", type=Path, nargs="+")
    ap.add_argument("--save", type=Path)
    args = ap.parse_args()
    peers = peer_rows(args.peer_results)
    if args.save:
        with gzip.open(args.save, "wt") as fh:
            json.dump(peers, fh)
    atl: dict = {}
    for r in read_json(args.atlasmtl_rows):
        for level, m in r["default"]["levels"].items():
            atl.setdefault((r["case"], level), {})[r["seed"]] = m["macro_f1"]
    by: dict = {}
    for r in peers:
        by.setdefault((r["case"], r["level"]), {}).setdefault(r["method"], {})[r["seed"]] = r["macro_f1"]
    levels_of: dict = {}
    for case, level in atl:
        levels_of.setdefault(case, []).append(level)
    summary = {"fine": ([], []), "coarse": ([], [])}
    print("| case | level | atlasmtl mean (seeds) | peers: mean [min–max] over seeds | best peer by mean | Δ | best peer, seed 0 | Δ |")
    print("|---|---|---|---|---|---|---|---|")
    for case in sorted(levels_of):
        levels = levels_of[case]
        for kind, level in (("fine", levels[-1]), ("coarse", levels[0])) if len(levels) > 1 else (("fine", levels[0]),):
            a = atl[(case, level)]
            p = by.get((case, level), {})
            if not p:
                continue
            means = {m: st.mean(v.values()) for m, v in p.items()}
            best = max(means, key=means.get)
            seed0 = {m: v[0] for m, v in p.items() if 0 in v}
            best0 = max(seed0, key=seed0.get)
            am = st.mean(a.values())
            cells = "; ".join(f"{m} {means[m]:.3f} [{min(p[m].values()):.3f}–{max(p[m].values()):.3f}] ({len(p[m])})"
                              for m in PEERS if m in p)
            print(f"| {case} | {level} | {am:.3f} ({len(a)}) | {cells} | {means[best]:.3f} ({best}) | {am - means[best]:+.3f} "
                  f"| {seed0[best0]:.3f} ({best0}) | {am - seed0[best0]:+.3f} |")
            summary[kind][0].append(am - means[best])
            summary[kind][1].append(am - seed0[best0])
    for kind, (d, d0) in summary.items():
        if d:
            print(f"{kind} ({len(d)} cases): mean Δ to the best peer by mean {st.mean(d):+.4f} (worst {min(d):+.4f}, "
                  f"{sum(x < 0 for x in d)} below); to the best peer of seed 0 {st.mean(d0):+.4f} (worst {min(d0):+.4f}, "
                  f"{sum(x < 0 for x in d0)} below)")


if __name__ == "__main__":
    main()
