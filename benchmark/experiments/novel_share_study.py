"""Issue 9: does abstention hold when the type the reference lacks is most of the query?

Research script. The novelty scores are located at the query (``atlasmtl.novelty.query_location_z``; until
2026-12-01 the query's median z), so that a whole query that sits further from the reference (another
platform) is not called novel. A query made mostly of one novel type (a tumour biopsy mapped onto a healthy
atlas, a sorted population) can move that location too. Per removed-type case and seed,
the default model (trained, or loaded from ``--models``) predicts sub-queries that keep every novel cell
and a seeded random sample of the known cells, so that the novel cells are ``share`` of the query:

- ``all``: the whole query (its own share);
- ``share<s>`` for ``s`` in :data:`SHARES`.

An optional JSON ``{label: {"module.NAME": value}}`` (as ``posthoc_constants_study.py`` takes) predicts each
query once per label, keys ``<label>@all`` and ``<label>@share<s>``.

On a case without novel labels the largest finest-level type of the query plays the novel type's part (a
sorted or composition-shifted query of known cells): read its Unknown share, ``1 − coverage``.

Scored with ``atlasmtl.evaluate`` against the sub-query's truth (macro-F1 of a sub-query is not comparable
with the peers'; read the novelty columns). Rows in ``threshold_table.py``'s format.

    PYTHONPATH=$PWD python benchmark/experiments/novel_share_study.py <removed-type cases> 0,1,2 out.json ['{"q25": {...}}'] [--work DIR] [--models DIR]
    python benchmark/experiments/threshold_table.py out.json
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import constant_patcher, posthoc_main, score_result  # noqa: E402
import atlasmtl  # noqa: E402

SHARES = (0.1, 0.3, 0.5, 0.7, 0.9)
PATCHES = json.loads(sys.argv.pop(4)) if len(sys.argv) > 4 and not sys.argv[4].startswith("--") else {"": {}}
apply = constant_patcher(PATCHES)


def predict_all(model, query, truth, spec, prefix, row):
    """Score ``query`` under every patch of :data:`PATCHES` into ``row[<label>@<prefix>]``."""
    for label, patch in PATCHES.items():
        apply(patch)
        res = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
        row[f"{label}@{prefix}" if label else prefix] = score_result(res, truth.loc[query.obs_names], spec)
    apply({})


def study(models):
    for case, seed, spec, ref, query, truth, model in models:
        fine = spec["levels"][-1]
        labels = truth.loc[query.obs_names, fine].to_numpy()
        if spec.get("novel"):
            novel = np.isin(labels, spec["novel"][fine])
        else:  # a known-type case: the largest type is the one whose share grows
            names, counts = np.unique(labels, return_counts=True)
            novel = labels == names[np.argmax(counts)]
        row = {"case": case, "seed": seed, "K": "auto"}
        predict_all(model, query, truth, spec, "all", row)
        rng = np.random.default_rng(seed)
        known = np.flatnonzero(~novel)
        for share in SHARES:
            n_known = int(round(novel.sum() * (1 - share) / share))
            keep = np.sort(np.concatenate([np.flatnonzero(novel), rng.choice(known, min(n_known, len(known)), replace=False)]))
            predict_all(model, query[keep].copy(), truth, spec, f"share{share}", row)
        print(json.dumps({"case": case, "seed": seed, "share": round(float(novel.mean()), 3),
                          **{n: v["novel"][fine]["novel_unknown_rate"] if v["novel"] else 1 - v["levels"][fine]["coverage"]
                             for n, v in row.items() if isinstance(v, dict)}}), flush=True)
        yield row


if __name__ == "__main__":
    posthoc_main(study, lambda *a: "use threshold_table.py", "/work/bench_models")
