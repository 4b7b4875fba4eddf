"""Issue 10: does self-training on the query's confident calls (as scNym does) pay?

Research script. Per case and seed, the default model (trained, or loaded from ``--models``) predicts
the query at the defaults; the query cells called with finest-level confidence ≥ ``CONFIDENCE`` and
labelled at every level (not Unknown, not novel) join the reference with those calls as labels, and a
model is trained on the union with the same defaults and seed. Both models' predictions of the whole
query are scored (``study_scores.score_result``: finest / coarse macro-F1, novelty metrics), as
``default`` / ``off`` (before) and ``self_trained`` / ``self_trained_off`` (after).

    PYTHONPATH=$PWD python benchmark/experiments/self_training_study.py <case,case,...> 0,1,2 out.json [--work DIR] [--models DIR]
    python benchmark/experiments/self_training_study.py --summarise out.json[.gz] [results.json]
"""
import statistics as st, sys
from pathlib import Path
import anndata as ad
import pandas as pd
import scipy.sparse as sp
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import best_peer, peer_levels, posthoc_main, read_rows, score_result
import atlasmtl

CONFIDENCE = 0.9


def pseudo_labelled_union(ref, query, result, levels):
    """The reference plus the query cells confidently labelled at every level, with those labels."""
    df = result.to_dataframe(mode="full")
    keep = df[f"conf_{levels[-1]}"].to_numpy() >= CONFIDENCE
    for lv in levels:
        keep &= ~df[f"is_unknown_{lv}"].to_numpy(dtype=bool)
    q = query[keep]
    x = sp.vstack([sp.csr_matrix(ref.X), sp.csr_matrix(q[:, ref.var_names].X)]).tocsr()
    obs = pd.concat([ref.obs[levels].astype(str), df.loc[keep, [f"pred_{lv}" for lv in levels]].set_axis(levels, axis=1).astype(str)])
    obs.index = [f"r{i}" for i in range(ref.n_obs)] + [f"q{i}" for i in range(int(keep.sum()))]
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=ref.var_names)), int(keep.sum())


def study(models):
    for case, seed, spec, ref, query, truth, model in models:
        levels = spec["levels"]
        predict = lambda m, **kw: atlasmtl.predict(m, query, show_progress=False, show_summary=False, **kw)
        base = predict(model)
        union, n_added = pseudo_labelled_union(ref, query, base, levels)
        adapted = atlasmtl.build_model(union, levels, random_state=seed, num_threads=1, show_progress=False, show_summary=False)
        rows = {"default": score_result(base, truth, spec), "off": score_result(predict(model, knn_correction="off"), truth, spec),
                "self_trained": score_result(predict(adapted), truth, spec),
                "self_trained_off": score_result(predict(adapted, knn_correction="off"), truth, spec)}
        print(case, seed, n_added, {k: round(v["levels"][levels[-1]]["macro_f1"], 3) for k, v in rows.items()}, flush=True)
        yield {"case": case, "seed": seed, "n_added": n_added, "n_query": query.n_obs, "results": rows}


def summarise(path, results="benchmark/results/results.json"):
    """Per case, means over seeds: finest / coarse macro-F1 before and after, cells added, and on removed-type
    cases the novelty AUROC and novel → Unknown before and after; then the mean / worst Δ to the best peer."""
    rows, peers = read_rows(path), peer_levels(results)
    names = ("default", "off", "self_trained", "self_trained_off")
    lines = ["| case | query cells added | best peer fine / coarse | " + " | ".join(names) + " | novel AUROC / → Unknown, before → after |",
             "|" + "---|" * (4 + len(names))]
    delta = {n: {"fine": [], "coarse": []} for n in names}
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = [r for r in rows if r["case"] == case]
        levels = list(rs[0]["results"]["default"]["levels"])
        best = best_peer(peers, case, levels)
        cells = []
        for n in names:
            f = st.mean(r["results"][n]["levels"][levels[-1]]["macro_f1"] for r in rs)
            delta[n]["fine"].append(f - best[levels[-1]])
            cell = f"{f:.3f}"
            if len(levels) > 1:
                c = st.mean(r["results"][n]["levels"][levels[0]]["macro_f1"] for r in rs)
                delta[n]["coarse"].append(c - best[levels[0]])
                cell += f" / {c:.3f}"
            cells.append(cell)
        novel = ""
        if rs[0]["results"]["default"]["novel"]:
            nv = lambda n, k: st.mean(r["results"][n]["novel"][levels[-1]][k] or 0.0 for r in rs)
            novel = (f"{nv('default', 'auroc'):.3f} / {nv('default', 'novel_unknown_rate'):.2f} → "
                     f"{nv('self_trained', 'auroc'):.3f} / {nv('self_trained', 'novel_unknown_rate'):.2f}")
        added = st.mean(r["n_added"] / r["n_query"] for r in rs)
        coarse_best = f" / {best[levels[0]]:.3f}" if len(levels) > 1 else ""
        lines.append(f"| {case} | {added:.0%} | {best[levels[-1]]:.3f}{coarse_best} | " + " | ".join(cells) + f" | {novel} |")
    lines.append("| finest mean Δ to best peer (worst) | | | " + " | ".join(
        f"{st.mean(d['fine']):+.4f} ({min(d['fine']):+.3f})" for d in delta.values()) + " | |")
    if delta["default"]["coarse"]:
        lines.append("| coarse mean Δ (worst) | | | " + " | ".join(
            f"{st.mean(d['coarse']):+.4f} ({min(d['coarse']):+.3f})" for d in delta.values()) + " | |")
    return "\n".join(lines)


if __name__ == "__main__":
    posthoc_main(study, summarise, "/tmp/atlasmtl_self_training_models")
