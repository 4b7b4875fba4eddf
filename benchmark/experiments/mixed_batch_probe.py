"""Issue 9: a query of several batches. Is a batch's cell called the same way mapped with the others as alone?

Research script (the fifty-third session). Users often map several samples at once. The novelty scores are
located at the query as a whole (``atlasmtl.novelty.query_location_z``), so a batch that sits further from the
reference than the rest could be judged against the others' location. Per pair of benchmark queries that share
one reference (the same case folder's ``ref.h5ad``, so one default model predicts both: a base case and its
thinned, ambient or other-protocol query), and seed, the base case's default model (``--models``) predicts each
query alone and the two concatenated (genes: the base query's; cells of the other query keep their values).
Where the other query holds the base's own cells changed (a thinned or ambient copy), a random half of the cells
(``numpy`` seed 0) is taken from the base and the other half from the copy, so that no cell meets its own twin.
A row per pair, seed and batch: every level's accuracy and ``Unknown`` share alone, mixed, and mixed with
``predict(..., batch_key="batch")`` (each batch located on its own), and the calls that changed.

    PYTHONPATH=$PWD python benchmark/experiments/mixed_batch_probe.py base:other[,base:other...] 0,1,2 out.csv.gz --cases-dir W/cases --models DIR
"""
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import probe_parser, read_study_case  # noqa: E402


def main() -> None:
    import anndata as ad
    import torch
    import atlasmtl

    args = probe_parser(__doc__, "pairs").parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = []
    for pair in args.pairs.split(","):
        base, other = pair.split(":")
        queries, truths = {}, {}
        for name in (base, other):
            spec, _, q, t = read_study_case(args.cases_dir / name, reference=False)
            q.obs_names = [f"{name}:{c}" for c in q.obs_names]
            t.index = [f"{name}:{c}" for c in t.index]
            queries[name], truths[name] = q, t.reindex(q.obs_names)
            if name == base:
                levels = spec["levels"]
        shared = queries[base].obs_names.str.split(":", n=1).str[1].intersection(
            queries[other].obs_names.str.split(":", n=1).str[1])
        if len(shared) >= 0.5 * queries[base].n_obs:  # the other query holds the base's cells, changed: halve them
            half = np.random.default_rng(0).random(len(shared)) < 0.5
            for name, take in ((base, shared[half]), (other, shared[~half])):
                cells = pd.Index([f"{name}:{c}" for c in take])
                queries[name], truths[name] = queries[name][cells].copy(), truths[name].loc[cells]
        genes = queries[base].var_names
        other_q = queries[other]
        keep = other_q.var_names.intersection(genes)
        mixed = ad.concat([queries[base], other_q[:, keep]], join="outer", merge="first")[:, genes].copy()
        mixed.obs["batch"] = [c.split(":", 1)[0] for c in mixed.obs_names]
        for seed in (int(s) for s in args.seeds.split(",")):
            model = atlasmtl.TrainedModel.load(args.models / f"{base}_{seed}.pth")
            together = atlasmtl.predict(model, mixed, show_progress=False, show_summary=False).to_dataframe()
            keyed = atlasmtl.predict(model, mixed, batch_key="batch", show_progress=False,
                                     show_summary=False).to_dataframe()
            for name in (base, other):
                alone = atlasmtl.predict(model, queries[name], show_progress=False, show_summary=False).to_dataframe()
                cells = queries[name].obs_names
                row = {"pair": pair, "seed": seed, "batch": name, "n": len(cells)}
                for lv in levels:
                    t = truths[name][lv].astype(str).to_numpy()
                    a = alone.loc[cells, f"pred_{lv}"].astype(str).to_numpy()
                    b = together.loc[cells, f"pred_{lv}"].astype(str).to_numpy()
                    k = keyed.loc[cells, f"pred_{lv}"].astype(str).to_numpy()
                    labelled = t != "nan"
                    row.update({f"{lv}|acc_alone": float((a == t)[labelled].mean()),
                                f"{lv}|acc_mixed": float((b == t)[labelled].mean()),
                                f"{lv}|unknown_alone": float((a == "Unknown").mean()),
                                f"{lv}|unknown_mixed": float((b == "Unknown").mean()),
                                f"{lv}|acc_batch_key": float((k == t)[labelled].mean()),
                                f"{lv}|unknown_batch_key": float((k == "Unknown").mean()),
                                f"{lv}|changed_batch_key_vs_alone": int((a != k).sum()),
                                f"{lv}|changed": int((a != b).sum())})
                rows.append(row)
                print(json.dumps(row), flush=True)
    pd.DataFrame(rows).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
