"""Issue 9, second round: novelty and KNN acceptance re-validated at the current defaults.

Trains atlasmtl once per benchmark case at its defaults (``input_transform="zscore"``,
``augment=True``, seed 0, one thread), caches the model, then compares post-hoc
choices on the same network:

* novelty scores: the embedding score (robust z of the log distance to the k
  nearest training cells of the called class), an input-space score (the same in
  a PCA of the reference's network input, normalised per class against the
  class's own leave-one-out distances) and their maximum;
* KNN acceptance rules, with the cells each rule relabels.

    cd /work/wt/trust
    PYTHONPATH=$PWD nice -n 10 python benchmark/experiments/trust_defaults_study.py --work /work/bench_trust

The cases are the benchmark's prepared cases (``benchmark/run.py`` writes them).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import load_case, read_cells, read_truth  # noqa: E402

import atlasmtl  # noqa: E402
from atlasmtl.metrics import macro_f1, novel_auroc  # noqa: E402

CASES = ["symphony_3pv1", "symphony_3pv2", "symphony_5p", "symphony_5p_novel_NK", "symphony_5p_novel_B",
         "cellbench_celseq2_3line", "cellbench_dropseq_3line", "cellbench_novel_H1975", "pbmc68k_70_30",
         "ding2020_dropseq_indrops", "zilionis_healthy_tumour", "zilionis_novel_tumour_subsets", "brain_mouse_human",
         "symphony_5p_thin_query", "symphony_5p_missing_genes"]
CACHE = Path(os.environ.get("TRUST2_CACHE", "/tmp/trust2_models"))
#: Training seed of the cached models (``TRUST2_SEED``; 0 unless set).
SEED = int(os.environ.get("TRUST2_SEED", "0"))


def model_for(name: str, case_dir: Path, spec: dict, ref) -> atlasmtl.TrainedModel:
    path = CACHE / name
    if (path / "model.pth").exists():
        return atlasmtl.TrainedModel.load(path)
    model = atlasmtl.build_model(ref, label_columns=spec["levels"], random_state=SEED, num_threads=1,
                                 show_progress=False, show_summary=False)
    path.mkdir(parents=True, exist_ok=True)
    model.save(str(path) + "/")
    return model


def network_input(model, adata) -> np.ndarray:
    from atlasmtl.inputs import get_matrix_source
    from atlasmtl.prediction import prepare_query

    source = get_matrix_source(adata)
    aligner, _, _ = prepare_query(model, source, None, 0.0)
    return np.vstack([aligner.transform(block) for _, _, block in source.iter_chunks(4096)]).astype(np.float32)


def table(result, levels) -> dict[str, dict[str, np.ndarray]]:
    import dataclasses

    return {lv: {f.name: np.asarray(getattr(result.levels[lv], f.name)) for f in dataclasses.fields(result.levels[lv])}
            for lv in levels}


def novel_mask(truth: pd.DataFrame, spec: dict) -> np.ndarray:
    novel = np.zeros(len(truth), dtype=bool)
    for lv, labs in (spec.get("novel") or {}).items():
        novel |= truth[lv].isin(labs).to_numpy()
    return novel


def case_rows(name: str, work: Path, thresholds: list[float], modes: list[str]) -> list[dict]:
    """Finest-level figures of one case for every (KNN mode, novelty threshold)."""
    from atlasmtl.calibration import expected_calibration_error

    case_dir = work / "cases" / name
    spec = load_case(case_dir)
    levels = spec["levels"]
    ref = read_cells(case_dir / "ref.h5ad")
    query = read_cells(case_dir / "query.h5ad", obsm=False)
    truth = read_truth(case_dir).loc[query.obs_names.astype(str)]
    model = model_for(name, case_dir, spec, ref)
    novel = novel_mask(truth, spec)
    lv = levels[-1]
    y = truth[lv].to_numpy()
    rows = []
    for th in thresholds:
        for mode in modes:
            res = atlasmtl.predict(model, query, knn_correction=mode, novelty_threshold=th, num_threads=1,
                                   show_progress=False, show_summary=False)
            calls = res.levels[lv]
            pred = np.asarray(res.labels(lv)).astype(str)
            raw = np.asarray(res.classes[lv])[calls.raw]
            row = {"case": name, "knn": mode, "threshold": th, "macro_f1": macro_f1(y, pred),
                   "ece": expected_calibration_error(calls.conf[~novel], raw[~novel] == y[~novel]),
                   "known_unknown": float(calls.is_unknown[~novel].mean()),
                   "routed_knn": float(np.isfinite(calls.knn_vote_frac).mean()),
                   "used_knn": float(calls.used_knn.mean()),
                   "net_error": float((raw[~novel] != y[~novel]).mean())}
            if novel.any():
                row["auroc"] = novel_auroc(calls.conf, novel, calls.novelty)
                row["novel_unknown"] = float(calls.is_unknown[novel].mean())
                if len(levels) > 1:  # a novel fine type under a known parent keeps its parent label
                    parent = np.asarray(res.labels(levels[0])).astype(str)
                    known_parent = novel & ~truth[levels[0]].isin((spec.get("novel") or {}).get(levels[0], [])).to_numpy()
                    if known_parent.any():
                        row["novel_parent_acc"] = float((parent[known_parent] == truth[levels[0]].to_numpy()[known_parent]).mean())
            rows.append(row)
    return rows


def input_space_rows(name: str, work: Path, k: int = 10, n_comps: int = 50, min_cells: int = 5) -> dict:
    """A class-conditional input-space novelty score, measured but not adopted.

    PCA of the training cells' network input; per called class, the log mean distance of a query
    cell to its ``k`` nearest training cells of that class, as a robust z against the class's own
    leave-one-out distances, then re-standardised over the query (median / 1.4826 MAD) so a
    shifted query is not flagged wholesale. Returns AUROC and flagged shares at 3.5 and 4.5.
    """
    from sklearn.decomposition import PCA

    case_dir = work / "cases" / name
    spec = load_case(case_dir)
    lv = spec["levels"][-1]
    ref = read_cells(case_dir / "ref.h5ad")
    query = read_cells(case_dir / "query.h5ad", obsm=False)
    truth = read_truth(case_dir).loc[query.obs_names.astype(str)]
    model = model_for(name, case_dir, spec, ref)
    novel = novel_mask(truth, spec)
    train = np.asarray(model.reference["training_cell"], dtype=bool)
    x_ref, x_q = network_input(model, ref)[train], network_input(model, query)
    pca = PCA(min(n_comps, len(x_ref) - 1, x_ref.shape[1]), random_state=0).fit(x_ref)
    pr, pq = pca.transform(x_ref), pca.transform(x_q)
    labels = model.reference["labels"][lv][train]
    called = atlasmtl.predict(model, query, knn_correction="off", num_threads=1, show_progress=False,
                              show_summary=False).levels[lv].raw
    z = np.full(len(pq), np.nan)
    for c in np.unique(called):
        members, rows = pr[labels == c], called == c
        if len(members) < min_cells:
            continue
        kc = min(k, len(members) - 1)
        d = np.sqrt(((members[:, None, :] - members[None, :, :]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        loo = np.log(np.sort(d, axis=1)[:, :kc].mean(axis=1))
        med, scale = np.median(loo), max(1.4826 * np.median(np.abs(loo - np.median(loo))), 1e-3)
        dq = np.sqrt(((pq[rows][:, None, :] - members[None, :, :]) ** 2).sum(-1))
        z[rows] = (np.log(np.maximum(np.sort(dq, axis=1)[:, :kc].mean(axis=1), 1e-6)) - med) / scale
    med = np.nanmedian(z)
    z = np.nan_to_num((z - med) / (1.4826 * np.nanmedian(np.abs(z - med))), nan=-np.inf)
    row = {"case": name, "pca_auroc": novel_auroc(np.zeros(len(z)), novel, z) if novel.any() else None}
    for th in (3.5, 4.5):
        row[f"known_flagged@{th}"] = float((z[~novel] > th).mean())
        row[f"novel_flagged@{th}"] = float((z[novel] > th).mean()) if novel.any() else None
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/work/bench_trust")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--thresholds", default="4.0")
    ap.add_argument("--modes", default="off,low_conf_only,all")
    ap.add_argument("--out", default="/tmp/trust2_table.csv")
    ap.add_argument("--input-space", action="store_true", help="measure the input-space (PCA) novelty score instead")
    args = ap.parse_args()
    if args.input_space:
        df = pd.DataFrame([input_space_rows(n, Path(args.work)) for n in args.cases.split(",")])
        print(df.round(3).to_string(index=False))
        return
    rows = []
    for name in args.cases.split(","):
        rows += case_rows(name, Path(args.work), [float(t) for t in args.thresholds.split(",")], args.modes.split(","))
        print(name, "done", file=sys.stderr, flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(args.out, index=False)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 30)
    print(df.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
