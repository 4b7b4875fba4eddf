"""Rows of ``build_setting_study.py`` against the shipped defaults' rows, case by case, on the same seeds.

Research script (2026-12-06, forty-second session). The shipped rows are the stored default models' predictions
(``results/null_from_crossfit_28cases_seeds012.json.gz``, label ``held``: the defaults since the fortieth
session); per case of ``rows``: the seeds it holds, the finest macro-F1 / coverage / ECE of both (means over
those seeds), and the difference in finest macro-F1; then the mean difference over the cases.

    python benchmark/experiments/setting_vs_shipped.py rows.json[.gz] [SHIPPED_ROWS LABEL]
"""
import statistics as st
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import read_rows  # noqa: E402

SHIPPED = Path(__file__).resolve().parent / "results" / "null_from_crossfit_28cases_seeds012.json.gz"


def table(path: str, shipped: str | Path = SHIPPED, label: str = "held") -> str:
    base = {(r["case"], r["seed"]): r[label] for r in read_rows(shipped)}
    rows = read_rows(path)
    lines = ["| case | seeds | shipped finest / coverage / ECE | setting finest / coverage / ECE | Δ finest |",
             "|---|---|---|---|---|"]
    deltas = []
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = [r for r in rows if r["case"] == case and (case, r["seed"]) in base]
        if not rs:
            continue
        fine = list(rs[0]["results"]["default"]["levels"])[-1]
        new = [r["results"]["default"]["levels"][fine] for r in rs]
        old = [base[(case, r["seed"])]["levels"][fine] for r in rs]

        def mean(scores, key):
            return st.mean(s[key] for s in scores)

        delta = mean(new, "macro_f1") - mean(old, "macro_f1")
        deltas.append(delta)
        lines.append(f"| {case} | {','.join(str(r['seed']) for r in rs)} | {mean(old, 'macro_f1'):.3f} / "
                     f"{mean(old, 'coverage'):.3f} / {mean(old, 'ece'):.3f} | {mean(new, 'macro_f1'):.3f} / "
                     f"{mean(new, 'coverage'):.3f} / {mean(new, 'ece'):.3f} | {delta:+.3f} |")
    lines.append(f"\nmean Δ finest over {len(deltas)} cases {st.mean(deltas):+.4f}; higher on {sum(d > 0 for d in deltas)}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(*sys.argv[1:]))
