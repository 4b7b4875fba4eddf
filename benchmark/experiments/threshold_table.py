"""Summarise ``novelty_threshold_study.py`` rows: one line per (rows file, threshold).

Research script. Per threshold, over the cases and seeds of each file: finest / coarse macro-F1 mean Δ to the
best peer of ``results.json`` (mean over seeds per case, then over cases; worst case), the finest-level ECE
median over the known-type cases, the removed-type cases' AUROC / novel → Unknown / known → Unknown, and the
largest share of Unknown calls on a known-type case (1 − coverage).

    python benchmark/experiments/threshold_table.py [--results benchmark/results/results.json] rows.json[.gz] ...
    python benchmark/experiments/threshold_table.py --per-case rows.json[.gz]:4.5 other.json[.gz]:3.5 ...
    python benchmark/experiments/threshold_table.py --seeds 0,1,2 ...   (only those seeds' rows of every file)

(``--per-case``: finest / coarse macro-F1 per case, mean over the seeds, for each file at its threshold.)

    python benchmark/experiments/threshold_table.py --tradeoff rows.json[.gz] ...

(``--tradeoff``: the open-set trade-off of each label in one line, :func:`tradeoff`.)
"""
import statistics as st
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import best_peer, peer_levels, read_rows  # noqa: E402


def labels(rows: list) -> list:
    """The labels (settings) of a rows file: the keys holding a scored prediction."""
    return [k for k in rows[0] if k not in ("case", "seed", "K") and isinstance(rows[0][k], dict)]


def label_cases(rows: list, label: str, peers: dict):
    """Per case of a rows file, in order: ``(case, the label's scores of its rows, levels, best peer per level)``."""
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = [r[label] for r in rows if r["case"] == case]
        levels = list(rs[0]["levels"])
        yield case, rs, levels, best_peer(peers, case, levels)


def table(paths, results="benchmark/results/results.json"):
    peers = peer_levels(results)
    lines = ["| rows | threshold | seeds | finest mean Δ (worst) | coarse mean Δ (worst) | finest ECE median (known-type cases) "
             "| AUROC / novel → Unknown / known → Unknown per removed-type case | largest Unknown share, known-type case |",
             "|---|---|---|---|---|---|---|---|"]
    for path in paths:
        rows = read_rows(path)
        seeds = sorted({r["seed"] for r in rows})
        for t in labels(rows):
            fine_d, coarse_d, ece, novel, unknown = [], [], [], [], []
            for case, rs, levels, best in label_cases(rows, t, peers):
                fine, coarse = levels[-1], (levels[0] if len(levels) > 1 else None)
                fine_d.append((st.mean(r["levels"][fine]["macro_f1"] for r in rs) - best[fine], case))
                if coarse:
                    coarse_d.append(st.mean(r["levels"][coarse]["macro_f1"] for r in rs) - best[coarse])
                if rs[0]["novel"]:
                    n = [r["novel"][fine] for r in rs]
                    novel.append(f"{case.replace('symphony_5p_novel_', '').replace('cellbench_novel_', '').replace('zilionis_novel_', '')} "
                                 f"{st.mean(x['auroc'] for x in n):.2f} / {st.mean(x['novel_unknown_rate'] for x in n):.2f} / "
                                 f"{st.mean(x['known_unknown_rate'] for x in n):.3f}")
                else:
                    ece.append(st.mean(r["levels"][fine]["ece"] for r in rs))
                    unknown.append((1 - st.mean(r["levels"][fine]["coverage"] for r in rs), case))
            worst = min(fine_d)
            top = f"{max(unknown)[0]:.1%} ({max(unknown)[1]})" if unknown else "–"  # – : only removed-type cases
            lines.append(f"| {Path(path).name} | {t} | {','.join(map(str, seeds))} | {st.mean(d for d, _ in fine_d):+.4f} "
                         f"({worst[0]:+.3f}, {worst[1]}) | {st.mean(coarse_d):+.4f} ({min(coarse_d):+.3f}) | "
                         f"{f'{st.median(ece):.3f}' if ece else '–'} | {'; '.join(novel)} | {top} |")
    return "\n".join(lines)


def per_case(specs, results="benchmark/results/results.json"):
    peers = peer_levels(results)
    data = [(read_rows(spec.rsplit(":", 1)[0]), spec.rsplit(":", 1)[1], spec) for spec in specs]
    lines = ["| case | best peer fine / coarse | " + " | ".join(f"{Path(s.rsplit(':', 1)[0]).name} at {t}" for _, t, s in data) + " |",
             "|" + "---|" * (2 + len(data))]
    for case in dict.fromkeys(r["case"] for r in data[0][0]):
        levels = list(next(r for r in data[0][0] if r["case"] == case)[data[0][1]]["levels"])
        fine, coarse = levels[-1], (levels[0] if len(levels) > 1 else None)
        best = best_peer(peers, case, levels)
        line = f"| {case} | {best[fine]:.3f} / " + (f"{best[coarse]:.3f}" if coarse else "–") + " |"
        for rows, t, _ in data:
            rs = [r[t]["levels"] for r in rows if r["case"] == case]
            line += f" {st.mean(r[fine]['macro_f1'] for r in rs):.3f}"
            line += (f" / {st.mean(r[coarse]['macro_f1'] for r in rs):.3f}" if coarse else "") + " |"
        lines.append(line)
    return "\n".join(lines)


def tradeoff(paths, results="benchmark/results/results.json") -> str:
    """One line per label of each rows file: the removed-type cases' mean novel → Unknown (how many reach
    issue 9's 50%) and known → Unknown (how many stay within 5%); the known-type cases' mean and largest
    share of finest ``Unknown`` calls; the finest and coarse macro-F1 mean Δ to the best peer. Two labels
    whose points fall on one curve of these shares trade novel cells for known ones alike."""
    peers = peer_levels(results)
    lines = ["| rows | label | removed-type cases: novel → Unknown mean (cases ≥ 0.5) | known → Unknown mean "
             "(cases ≤ 0.05) | known-type cases: Unknown mean / largest | finest mean Δ (worst) | coarse mean Δ |",
             "|---|---|---|---|---|---|---|"]
    for path in paths:
        rows = read_rows(path)
        for label in labels(rows):
            novel, known, unknown, fine_d, coarse_d = [], [], [], [], []
            for case, rs, levels, best in label_cases(rows, label, peers):
                fine_d.append(st.mean(r["levels"][levels[-1]]["macro_f1"] for r in rs) - best[levels[-1]])
                if len(levels) > 1:
                    coarse_d.append(st.mean(r["levels"][levels[0]]["macro_f1"] for r in rs) - best[levels[0]])
                if rs[0].get("novel"):
                    novel.append(st.mean(r["novel"][levels[-1]]["novel_unknown_rate"] for r in rs))
                    known.append(st.mean(r["novel"][levels[-1]]["known_unknown_rate"] for r in rs))
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
    if args[:1] == ["--seeds"]:
        keep, args = {int(x) for x in args[1].split(",")}, args[2:]
        _read = read_rows
        read_rows = lambda path: [r for r in _read(path) if r["seed"] in keep]  # noqa: E731
    if args[:1] == ["--per-case"]:
        print(per_case(args[1:], results))
    elif args[:1] == ["--tradeoff"]:
        print(tradeoff(args[1:], results))
    else:
        print(table(args, results))
