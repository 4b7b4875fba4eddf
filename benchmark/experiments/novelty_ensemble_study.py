"""Issue 9: two more novelty scores against the shipped one, on saved default models.

Research script. Per case and seed, the default model (an ensemble of 5 networks on these cases; trained,
or loaded from ``--models``) predicts the query with ``knn_correction="off"``; per query cell, at the
finest level:

* ``z``: the shipped novelty z-score (``atlasmtl.novelty``);
* ``zq``: ``z`` divided by the query's own robust spread of ``z`` (1.4826 · MAD, floored at 1), so a
  query whose cells scatter more widely than the held-out reference cells (another protocol) is judged on
  its own spread;
* ``mi``: the ensemble's mutual information (entropy of the mean member probability minus the members'
  mean entropy; Lakshminarayanan et al. 2017, deep-ensemble disagreement);
* ``disagree``: share of members whose top class is not the ensemble's;
* ``1-conf``: one minus the calibrated confidence.

Recorded per case and seed: AUROC novel vs known (removed-type cases), the 98th percentile of the known
cells' score, the share of novel cells above it (an oracle threshold: what the score could do if the
threshold were set on the known cells of that very query), and the share of known / novel cells above
fixed thresholds of ``z`` and ``zq``.

    PYTHONPATH=$PWD python benchmark/experiments/novelty_ensemble_study.py <case,case,...> 0,1,2 out.json \
        [--work /work/bench_work] [--models /tmp/models]
    python benchmark/experiments/novelty_ensemble_study.py --summarise out.json[.gz]

The members' probabilities are recorded by wrapping ``EnsembleNetwork.forward``: research only.
"""
import statistics as st, sys
from pathlib import Path
import numpy as np
import torch
from sklearn.metrics import roc_auc_score
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import posthoc_main, read_rows
import atlasmtl
import atlasmtl.network as network

THRESHOLDS = (1.5, 2.0, 2.5, 3.0, 3.5, 4.5)
_members: list = []
_forward = network.EnsembleNetwork.forward


def _forward_hook(self, x, first_weight_t=None):
    out = _forward(self, x, first_weight_t)
    _members.append(np.stack([torch.softmax(m(x).logits[-1], 1).detach().numpy() for m in self.members]))
    return out


network.EnsembleNetwork.forward = _forward_hook


def entropy(p):
    return -(p * np.log(np.clip(p, 1e-12, 1))).sum(-1)


def cell_scores(model, query, level):
    _members.clear()
    res = atlasmtl.predict(model, query, show_progress=False, show_summary=False, knn_correction="off")
    df = res.to_dataframe(mode="full")
    z = df[f"novelty_{level}"].to_numpy(dtype=float)
    fin = np.isfinite(z)
    spread = 1.4826 * np.median(np.abs(z[fin] - np.median(z[fin]))) if fin.any() else 1.0
    out = {"z": z, "zq": z / max(1.0, spread), "1-conf": 1 - df[f"conf_{level}"].to_numpy(dtype=float)}
    if _members:
        p = np.concatenate(_members, axis=1)
        mean = p.mean(0)
        out["mi"] = entropy(mean) - entropy(p).mean(0)
        out["disagree"] = (p.argmax(2) != mean.argmax(1)[None]).mean(0)
    return out


def study(models):
    """One row per (case, seed) of :func:`study_scores.default_models`: each score's AUROC and threshold shares."""
    for case, seed, spec, ref, query, truth, model in models:
        level = spec["levels"][-1]
        novel = np.isin(truth[level].astype(str).to_numpy(), list((spec.get("novel") or {}).get(level, [])))
        row = {"case": case, "seed": seed, "n_novel": int(novel.sum()), "scores": {}}
        for name, s in cell_scores(model, query, level).items():
            s = np.nan_to_num(s, nan=np.inf)  # no prediction: most novel
            r = {"known_q98": float(np.quantile(s[~novel], 0.98))}
            if name in ("z", "zq"):
                r["known_over"] = {str(t): float((s[~novel] > t).mean()) for t in THRESHOLDS}
            if novel.any():
                r["auroc"] = float(roc_auc_score(novel, s))
                r["novel_over_known_q98"] = float((s[novel] > r["known_q98"]).mean())
                if name in ("z", "zq"):
                    r["novel_over"] = {str(t): float((s[novel] > t).mean()) for t in THRESHOLDS}
            row["scores"][name] = r
        print(case, seed, {k: round(v.get("auroc", float("nan")), 3) for k, v in row["scores"].items()}, flush=True)
        yield row


def summarise(path):
    rows = read_rows(path)
    cases = list(dict.fromkeys(r["case"] for r in rows))
    novel_cases = [c for c in cases if any(r["n_novel"] for r in rows if r["case"] == c)]
    mean = lambda c, f: st.mean(f(r) for r in rows if r["case"] == c)
    names = list(rows[0]["scores"])
    lines = ["Removed-type cases, mean over seeds: AUROC / novel cells above the known cells' 98th percentile (oracle threshold)", "",
             "| case | " + " | ".join(names) + " |", "|" + "---|" * (1 + len(names))]
    for c in novel_cases:
        lines.append(f"| {c} | " + " | ".join(f"{mean(c, lambda r: r['scores'][n]['auroc']):.3f} / "
                                              f"{mean(c, lambda r: r['scores'][n]['novel_over_known_q98']):.2f}" for n in names) + " |")
    for score in ("z", "zq"):
        lines += ["", f"`{score}` above a fixed threshold: known cells (mean over cases / worst case) and novel cells per removed-type case", "",
                  "| threshold | known mean | known worst | " + " | ".join(novel_cases) + " |", "|" + "---|" * (3 + len(novel_cases))]
        for t in map(str, THRESHOLDS):
            known = {c: mean(c, lambda r: r["scores"][score]["known_over"][t]) for c in cases}
            worst = max(known, key=known.get)
            lines.append(f"| {t} | {st.mean(known.values()):.3f} | {known[worst]:.3f} ({worst}) | "
                         + " | ".join(f"{mean(c, lambda r: r['scores'][score]['novel_over'][t]):.2f}" for c in novel_cases) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    posthoc_main(study, summarise, "/tmp/atlasmtl_novelty_models")
