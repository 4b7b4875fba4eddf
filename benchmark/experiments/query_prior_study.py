"""Issue 10: re-estimating the query's class proportions (label shift) after training: does it pay?

Research script. The network learns p(class | cell) under the reference's class proportions (tilted by
``class_weight_power``); a query with other proportions (a tumour with more neutrophils, a human brain
sample with more neurons) could be decoded with its own. Per case and seed, one default model is trained
(or loaded from ``--models``), its calibrated probabilities are recorded on the reference (``pi_s`` = their
mean, so that re-estimating on the reference itself changes nothing) and on the query, and the query is
predicted again with every level's probabilities re-weighted by ``w = pi_q / pi_s`` (then renormalised)
before joint decoding, gating and KNN, for these estimates of ``pi_q``:

* ``em``: Saerens, Latinne & Decaestecker (2002) EM to convergence; ``em_freq``: the same with ``pi_s`` =
  the reference's label frequencies; ``em_sqrt``: ``sqrt(pi_q_em * pi_s)`` (half the shift);
* ``em3``: three EM steps; ``map``: EM with a Dirichlet prior worth as many cells as the query, centred on
  ``pi_s``;
* ``mean1``: the query's mean probability (one EM step); ``mean1_sqrt``: half of that shift.

Each also with ``knn_correction="off"`` (suffix ``_off``); ``default`` / ``default_off`` are the model as it
is. Scores: ``atlasmtl.evaluate`` per level (Unknown counts as wrong), novelty metrics where the case has
novel labels.

    PYTHONPATH=$PWD python benchmark/experiments/query_prior_study.py <case,case,...> 0,1,2 out.json \
        [--work /work/bench_work] [--models /tmp/models]
    python benchmark/experiments/query_prior_study.py --summarise out.json[.gz] [results.json]

The probabilities are re-weighted by wrapping ``atlasmtl.prediction.softmax`` (called once per level and
batch, levels in order): research only, not an API.
"""
import statistics as st, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import best_peer, peer_levels, posthoc_main, read_rows, score_result
import atlasmtl
import atlasmtl.prediction as prediction

VARIANTS = ("em", "em_freq", "em_sqrt", "em3", "map", "mean1", "mean1_sqrt")
_softmax = prediction.softmax
_state = {"mode": None, "i": 0, "rec": None, "w": None, "levels": 1}


def _softmax_hook(logits, temperature=1.0):
    p = _softmax(logits, temperature)
    j = _state["i"] % _state["levels"]
    _state["i"] += 1
    if _state["mode"] == "record":
        _state["rec"][j].append(p.copy())
    elif _state["mode"] == "adjust":
        p = p * _state["w"][j]
        p /= p.sum(1, keepdims=True)
    return p


prediction.softmax = _softmax_hook


def run(model, adata, mode=None, w=None, **kw):
    """Predict; ``mode="record"`` returns each level's probabilities too, ``"adjust"`` re-weights them by ``w``."""
    n = len(model.label_columns)
    _state.update(mode=mode, i=0, rec=[[] for _ in range(n)], w=w, levels=n)
    try:
        res = atlasmtl.predict(model, adata, show_progress=False, show_summary=False, **kw)
    finally:
        _state["mode"] = None
    return res, [np.concatenate(r) if r else None for r in _state["rec"]]


def em(p, pi_s, iters=100, tol=1e-6):
    """Saerens et al. (2002): the query prior maximising the likelihood of its cells' probabilities."""
    pi = pi_s.copy()
    for _ in range(iters):
        q = p * (pi / pi_s)
        q /= q.sum(1, keepdims=True)
        new = q.mean(0)
        done = np.abs(new - pi).max() < tol
        pi = new
        if done:
            break
    return pi


def em_map(p, pi_s, iters=200, tol=1e-7):
    """EM with a Dirichlet(1 + n * pi_s) prior: the reference proportions weigh as much as the query's n cells."""
    pi, n = pi_s.copy(), len(p)
    for _ in range(iters):
        q = p * (pi / pi_s)
        q /= q.sum(1, keepdims=True)
        new = (q.sum(0) + n * pi_s) / (2 * n)
        done = np.abs(new - pi).max() < tol
        pi = new
        if done:
            break
    return pi


def query_prior(name, p_query, pi_s, freq):
    if name == "em":
        return em(p_query, pi_s)
    if name == "em_freq":
        return em(p_query, freq)
    if name == "em_sqrt":
        return np.sqrt(em(p_query, pi_s) * pi_s)
    if name == "em3":
        return em(p_query, pi_s, iters=3)
    if name == "map":
        return em_map(p_query, pi_s)
    if name == "mean1":
        return p_query.mean(0)
    if name == "mean1_sqrt":
        return np.sqrt(p_query.mean(0) * pi_s)
    raise ValueError(name)


def study(models):
    """One row per (case, seed) of :func:`study_scores.default_models`: the default and re-weighted predictions, scored."""
    for case, seed, spec, ref, query, truth, model in models:
        levels = spec["levels"]
        _, p_ref = run(model, ref, "record", knn_correction="off")
        base, p_query = run(model, query, "record")
        row = {"case": case, "seed": seed, "results": {"default": score_result(base, truth, spec)}}
        row["results"]["default_off"] = score_result(run(model, query, knn_correction="off")[0], truth, spec)
        for name in VARIANTS:
            w = []
            for j, lv in enumerate(levels):
                codes = model.reference["labels"][lv]
                freq = np.bincount(codes[codes >= 0], minlength=len(model.classes[lv])) / (codes >= 0).sum()
                pi_s = p_ref[j].mean(0)
                w.append(query_prior(name, p_query[j], pi_s, freq) / (freq if name == "em_freq" else pi_s))
            for suffix, kw in (("", {}), ("_off", {"knn_correction": "off"})):
                row["results"][name + suffix] = score_result(run(model, query, "adjust", w=w, **kw)[0], truth, spec)
        print(case, seed, {k: round(v["levels"][levels[-1]]["macro_f1"], 3) for k, v in row["results"].items()}, flush=True)
        yield row


def summarise(path, results="benchmark/results/results.json"):
    rows, peers = read_rows(path), peer_levels(results)
    variants = list(rows[0]["results"])
    lines = ["| case | best peer fine | " + " | ".join(variants) + " |", "|" + "---|" * (2 + len(variants))]
    fine_d, coarse_d = {v: [] for v in variants}, {v: [] for v in variants}
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = [r for r in rows if r["case"] == case]
        levels = list(rs[0]["results"]["default"]["levels"])
        best = best_peer(peers, case, levels)
        line = f"| {case} | {best[levels[-1]]:.3f} |"
        for v in variants:
            f1 = st.mean(r["results"][v]["levels"][levels[-1]]["macro_f1"] for r in rs)
            fine_d[v].append(f1 - best[levels[-1]])
            if len(levels) > 1:
                coarse_d[v].append(st.mean(r["results"][v]["levels"][levels[0]]["macro_f1"] for r in rs) - best[levels[0]])
            line += f" {f1:.3f} |"
        lines.append(line)
    lines.append("| finest mean Δ to best peer (worst) | |" + "".join(f" {st.mean(fine_d[v]):+.4f} ({min(fine_d[v]):+.3f}) |" for v in variants))
    lines.append("| coarse mean Δ (worst) | |" + "".join(f" {st.mean(coarse_d[v]):+.4f} ({min(coarse_d[v]):+.3f}) |" for v in variants))
    return "\n".join(lines)


if __name__ == "__main__":
    posthoc_main(study, summarise, "/tmp/atlasmtl_prior_models")
