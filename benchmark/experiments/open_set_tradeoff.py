"""The open-set trade-off of each label of a rows file, in one line (research script).

Per label, over the cases and seeds of ``threshold_table.py``-format rows: on the removed-type cases the
mean share of novel cells called ``Unknown`` (and how many cases reach issue 9's 50%) and the mean share of
known cells called ``Unknown`` (how many stay within 5%); on the known-type cases the mean and the largest
share of finest ``Unknown`` calls; the finest and coarse macro-F1 mean Δ to the best peer of ``--results``.
Two labels whose points fall on one curve of these shares trade novel cells for known ones alike.

    PYTHONPATH=$PWD:$PWD/benchmark python benchmark/experiments/open_set_tradeoff.py rows.json[.gz] ...
"""
import statistics as st
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import PEERS, peer_levels, read_rows  # noqa: E402


def finest_novel(row: dict) -> dict:
    return list(row["novel"].values())[-1]


def table(paths, results="benchmark/results/results.json") -> str:
    peers = peer_levels(results)
    lines = ["| rows | label | removed-type cases: novel → Unknown mean (cases ≥ 0.5) | known → Unknown mean "
             "(cases ≤ 0.05) | known-type cases: Unknown mean / largest | finest mean Δ (worst) | coarse mean Δ |",
             "|---|---|---|---|---|---|---|"]
    for path in paths:
        rows = read_rows(path)
        labels = [k for k in rows[0] if isinstance(rows[0][k], dict)]
        cases = list(dict.fromkeys(r["case"] for r in rows))
        for label in labels:
            novel, known, unknown, fine_d, coarse_d = [], [], [], [], []
            for case in cases:
                rs = [r[label] for r in rows if r["case"] == case]
                levels = list(rs[0]["levels"])
                best = {lv: max(peers[case][m][lv]["macro_f1"] for m in PEERS if m in peers[case]) for lv in levels}
                fine_d.append(st.mean(r["levels"][levels[-1]]["macro_f1"] for r in rs) - best[levels[-1]])
                if len(levels) > 1:
                    coarse_d.append(st.mean(r["levels"][levels[0]]["macro_f1"] for r in rs) - best[levels[0]])
                if rs[0].get("novel"):
                    novel.append(st.mean(finest_novel(r)["novel_unknown_rate"] for r in rs))
                    known.append(st.mean(finest_novel(r)["known_unknown_rate"] for r in rs))
                else:
                    unknown.append((st.mean(1 - r["levels"][levels[-1]]["coverage"] for r in rs), case))
            worst_unknown = max(unknown)
            lines.append(
                f"| {Path(path).name} | {label} | {st.mean(novel):.3f} ({sum(v >= 0.5 for v in novel)} of {len(novel)}) "
                f"| {st.mean(known):.4f} ({sum(v <= 0.05 for v in known)} of {len(known)}) "
                f"| {st.mean(u for u, _ in unknown):.4f} / {worst_unknown[0]:.3f} ({worst_unknown[1]}) "
                f"| {st.mean(fine_d):+.4f} ({min(fine_d):+.3f}) | {st.mean(coarse_d):+.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    results = "benchmark/results/results.json"
    if args[:1] == ["--results"]:
        results, args = args[1], args[2:]
    print(table(args, results))
