"""Issues 9/10: may distance alone overrule a call the calibrated heads are sure of?

Research script for ``atlasmtl.novelty.NOVELTY_CONFIDENCE_GUARD``: a cell whose calibrated
probability for its call is at least the guard is not called novel at that level. Per case and
seed, the default model (trained, or loaded from ``--models``) predicts the query at the defaults
with the guard set to each of ``GUARDS`` (``2.0`` = no guard: the rule before it existed), scored
with ``atlasmtl.evaluate`` (finest and coarse macro-F1, Unknown counted as wrong; novelty AUROC,
novel → Unknown and known → Unknown on the removed-type cases).

    PYTHONPATH=$PWD python benchmark/experiments/novelty_guard_study.py <case,case,...> 0,1,2 out.json [--work DIR] [--models DIR]
    python benchmark/experiments/novelty_guard_study.py --summarise out.json[.gz] [results.json]
"""
import statistics as st
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import PEERS, peer_levels, posthoc_main, read_rows, score_result
import atlasmtl
import atlasmtl.prediction

GUARDS = (2.0, 0.8, 0.9, 0.95)


def study(models):
    shipped = atlasmtl.prediction.NOVELTY_CONFIDENCE_GUARD
    try:
        for case, seed, spec, ref, query, truth, model in models:
            row = {"case": case, "seed": seed, "results": {}}
            for guard in GUARDS:
                atlasmtl.prediction.NOVELTY_CONFIDENCE_GUARD = guard
                res = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
                row["results"][str(guard)] = score_result(res, truth, spec)
            print(case, seed, {g: round(r["levels"][spec["levels"][-1]]["macro_f1"], 3)
                               for g, r in row["results"].items()}, flush=True)
            yield row
    finally:
        atlasmtl.prediction.NOVELTY_CONFIDENCE_GUARD = shipped


def summarise(path, results="benchmark/results/results.json"):
    """Per guard: finest / coarse macro-F1 mean Δ to the best peer (worst case), over every seed in the rows;
    novelty metrics of the removed-type cases; share of Unknown on the CellBench known-type cases."""
    rows, peers = read_rows(path), peer_levels(results)
    lines = []
    for guard in rows[0]["results"]:
        fine_d, coarse_d, extra = {}, {}, {}
        for r in rows:
            sc = r["results"][guard]
            levels = list(sc["levels"])
            best = {lv: max(peers[r["case"]][m][lv]["macro_f1"] for m in PEERS if m in peers[r["case"]]) for lv in levels}
            fine_d.setdefault(r["case"], []).append(sc["levels"][levels[-1]]["macro_f1"] - best[levels[-1]])
            if len(levels) > 1:
                coarse_d.setdefault(r["case"], []).append(sc["levels"][levels[0]]["macro_f1"] - best[levels[0]])
            if sc.get("novel"):
                n = sc["novel"][levels[-1]]
                extra.setdefault(f"{r['case']} AUROC / novel→Unknown / known→Unknown", []).append(
                    (n["auroc"], n["novel_unknown_rate"], n["known_unknown_rate"]))
            elif r["case"].startswith("cellbench"):
                extra.setdefault(f"{r['case']} Unknown", []).append((1 - sc["levels"][levels[-1]]["coverage"],))
        fine = {c: st.mean(v) for c, v in fine_d.items()}
        coarse = {c: st.mean(v) for c, v in coarse_d.items()}
        worst = min(fine, key=fine.get)
        n_seeds = len(next(iter(fine_d.values())))
        lines.append(f"- guard {guard} ({n_seeds} seeds): finest mean Δ {st.mean(fine.values()):+.4f} (worst "
                     f"{fine[worst]:+.3f}, {worst}); coarse {st.mean(coarse.values()):+.4f} (worst {min(coarse.values()):+.3f})")
        for name, vals in extra.items():
            lines.append(f"  - {name}: " + " / ".join(f"{st.mean(v[i] for v in vals):.3f}" for i in range(len(vals[0]))))
    return "\n".join(lines)


if __name__ == "__main__":
    posthoc_main(study, summarise, "/work/bench_work/models")
