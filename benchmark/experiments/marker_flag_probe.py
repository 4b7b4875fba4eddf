"""Issue 9: the neighbourhood novelty confirmed by the called class's missing markers (research probe, post hoc
on the default models).

A finest call is made ``Unknown`` (and novel) where the cell's neighbourhood novelty is at least ``a`` *and* its
neighbourhood's marker score is below ``b``: the cell sits in a far group of query cells, and that group does
not detect the markers of the class it is called as. The marker score is ``marker_recall_probe.py``'s, on the
network's raw finest call: per finest reference class, the ≤ 20 genes it detects in ≥ 40% of its cells and
≥ 20 points more often than every other class (a class with fewer than 5 is not scored), against the other
genes it detects in ≥ 40% of its cells; log((share of markers detected + 0.05) / (share of background detected
+ 0.05)), located and scaled by the class's reference cells (median, 1.4826 MAD) and averaged over the cell's 30
nearest query cells (30 principal components of the query's log values on the genes it shares with the
reference). The flag is applied to a copy of the default prediction, as ``neighbourhood_doubt_relative_probe.py``
does. Rows in ``threshold_table.py``'s format:

    PYTHONPATH=$PWD python benchmark/experiments/marker_flag_probe.py <case,case,...> 0,1,2 out.json MODELS [WORK]
    python benchmark/experiments/threshold_table.py --tradeoff out.json
"""
import json
import os
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import probe_arguments  # noqa: E402
from neighbourhood_doubt_relative_probe import flagged_copy  # noqa: E402
from study_scores import default_models, score_result  # noqa: E402
import atlasmtl  # noqa: E402

#: label -> (a, b): neighbourhood novelty at least a, neighbourhood marker score below b; None = the defaults.
VARIANTS: dict = {"default": None}
for _a in (0.75, 1.0, 1.25):
    for _b in (-1.5, -2.0, -3.0):
        VARIANTS[f"nz{_a}_m{_b}"] = (_a, _b)
N_MARKERS, MIN_DETECTED, MIN_LEAD, NEIGHBOURS, MIN_MARKERS, MIN_BACKGROUND = 20, 0.4, 0.2, 30, 5, 20
#: Markers and background from the genes some query cell detects only (``MARKER_MEASURED_ONLY=1``), and the
#: marker z-scores located at the query: less the median over called classes (>= 10 cells) of their cells'
#: ``MARKER_QUERY_LOCATION`` quantile (unset: not located).
MEASURED_ONLY = os.environ.get("MARKER_MEASURED_ONLY", "0") == "1"
QUERY_LOCATION = float(os.environ["MARKER_QUERY_LOCATION"]) if os.environ.get("MARKER_QUERY_LOCATION") else None
#: ``MARKER_SCORE=poisson``: the depth-aware score of :func:`poisson_tables` instead of the background ratio.
SCORE = os.environ.get("MARKER_SCORE", "ratio")


def class_rates(detected: sp.csr_matrix, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(labels, classes, rates)``: the reference cells' labels as strings, their classes, and each class's
    share of cells detecting each gene (classes × genes)."""
    labels = np.asarray(labels, dtype=str)
    classes = np.unique(labels)
    return labels, classes, np.stack([np.asarray(detected[labels == c].mean(0)).ravel() for c in classes])


def class_markers(rates: np.ndarray, i: int) -> np.ndarray:
    """Columns of class ``i``'s markers, given every class's detection rates (classes × genes): the genes it
    detects in >= MIN_DETECTED of its cells and >= MIN_LEAD more often than every other class, the largest
    leads first, at most N_MARKERS."""
    others = np.delete(rates, i, 0).max(0) if len(rates) > 1 else np.zeros(rates.shape[1])
    lead = rates[i] - others
    candidates = np.flatnonzero((rates[i] >= MIN_DETECTED) & (lead >= MIN_LEAD))
    return candidates[np.argsort(-lead[candidates])][:N_MARKERS]


def location_scale(scores: np.ndarray) -> tuple[float, float]:
    """The median and 1.4826 MAD (+ 1e-3) of a class's reference scores."""
    loc = float(np.median(scores))
    return loc, 1.4826 * float(np.median(np.abs(scores - loc))) + 1e-3


def _counts(a: ad.AnnData, genes) -> sp.csr_matrix | None:
    return sp.csr_matrix(a[:, genes].layers["counts"], dtype=np.float64) if "counts" in a.layers else None


def poisson_tables(ref: ad.AnnData, query: ad.AnnData, level: str) -> dict:
    """``MARKER_SCORE=poisson``: per reference class, the markers (as :func:`marker_tables`, from the genes some
    query cell detects) and each marker's mean share of a cell's counts in the class; the score of a cell of
    depth ``D`` is (markers detected − Σ p) / sqrt(Σ p(1 − p) + 1), ``p = 1 − exp(−D · share)``, located and
    scaled by the class's reference cells. Cases without counts are not scored."""
    genes = ref.var_names.intersection(query.var_names)
    qc = _counts(query, genes)
    rc = _counts(ref, genes)
    if qc is None or rc is None:
        return {"genes": genes, "tables": {}, "poisson": True}
    measured = np.asarray((qc > 0).sum(0)).ravel() > 0
    genes, rc = genes[measured], rc[:, measured]
    detected = rc > 0
    depth = np.asarray(rc.sum(1)).ravel()
    share = sp.csr_matrix(sp.diags(1.0 / np.maximum(depth, 1.0)) @ rc)
    labels, classes, rates = class_rates(detected, ref.obs[level])
    tables = {}
    for i, c in enumerate(classes):
        markers = class_markers(rates, i)
        if len(markers) < MIN_MARKERS:
            continue
        rows = labels == c
        mu = np.asarray(share[rows][:, markers].mean(0)).ravel()
        tables[c] = (markers, mu, *location_scale(poisson_score(detected[rows][:, markers], depth[rows], mu)))
    return {"genes": genes, "tables": tables, "poisson": True}


def poisson_score(detected: sp.csr_matrix, depth: np.ndarray, mu: np.ndarray) -> np.ndarray:
    p = 1.0 - np.exp(-np.outer(depth, mu))
    observed = np.asarray(detected.sum(1)).ravel()
    return (observed - p.sum(1)) / np.sqrt((p * (1 - p)).sum(1) + 1.0)


def marker_tables(ref: ad.AnnData, query: ad.AnnData, level: str) -> dict:
    """Per reference class at ``level``: marker and background columns (in the shared genes) and the reference
    cells' location and scale of the marker score."""
    genes = ref.var_names.intersection(query.var_names)
    if MEASURED_ONLY:  # a gene no query cell detects was not measured there, or says nothing of any class
        genes = genes[np.asarray((sp.csr_matrix(query[:, genes].X) > 0).sum(0)).ravel() > 0]
    detected = sp.csr_matrix(ref[:, genes].X) > 0
    labels, classes, rates = class_rates(detected, ref.obs[level])
    tables = {}
    for i, c in enumerate(classes):
        markers = class_markers(rates, i)
        background = np.setdiff1d(np.flatnonzero(rates[i] >= MIN_DETECTED), markers)
        if len(markers) < MIN_MARKERS or len(background) < MIN_BACKGROUND:
            continue
        tables[c] = (markers, background, *location_scale(marker_score(detected[labels == c], markers, background)))
    return {"genes": genes, "tables": tables, "classes": classes}


def marker_score(detected: sp.csr_matrix, markers: np.ndarray, background: np.ndarray) -> np.ndarray:
    m = np.asarray(detected[:, markers].mean(1)).ravel()
    b = np.asarray(detected[:, background].mean(1)).ravel()
    return np.log((m + 0.05) / (b + 0.05))


def cell_marker_z(query: ad.AnnData, calls: np.ndarray, tabs: dict) -> np.ndarray:
    """Each query cell's marker z-score for its call (NaN where the call is not scored)."""
    detected = sp.csr_matrix(query[:, tabs["genes"]].X) > 0
    z = np.full(query.n_obs, np.nan)
    if tabs.get("poisson"):
        qc = _counts(query, tabs["genes"])
        depth = np.asarray(qc.sum(1)).ravel() if qc is not None else None
    for c, (markers, second, loc, scale) in tabs["tables"].items():
        rows = np.flatnonzero(calls == c)
        if not len(rows):
            continue
        if tabs.get("poisson"):
            z[rows] = (poisson_score(detected[rows][:, markers], depth[rows], second) - loc) / scale
        else:
            z[rows] = (marker_score(detected[rows], markers, second) - loc) / scale
    return z


def neighbour_mean(query: ad.AnnData, genes, z: np.ndarray) -> np.ndarray:
    """The mean of ``z`` over each query cell's NEIGHBOURS nearest query cells (itself included) in 30 principal
    components of the query's log values on ``genes`` (NaN where none of them has a value)."""
    dense = sp.csr_matrix(query[:, genes].X).toarray()  # the benchmark's queries: at most 1,200 cells
    pcs = PCA(n_components=min(30, dense.shape[0] - 1, dense.shape[1]), random_state=0).fit_transform(dense - dense.mean(0))
    nn = NearestNeighbors(n_neighbors=min(NEIGHBOURS, query.n_obs)).fit(pcs).kneighbors(pcs, return_distance=False)
    with warnings.catch_warnings():  # a cell whose neighbours are all unscored has no mean
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(z[nn], axis=1)


def neighbourhood_marker_z(query: ad.AnnData, calls: np.ndarray, tabs: dict) -> np.ndarray:
    """Each query cell's neighbourhood mean of the marker z-score of its call, located at the query with
    ``MARKER_QUERY_LOCATION``."""
    z = cell_marker_z(query, calls, tabs)
    if QUERY_LOCATION is not None:  # the whole query's move, read per called class (as the novelty score does)
        per_class = [np.quantile(z[calls == c], QUERY_LOCATION) for c in tabs["tables"] if (calls == c).sum() >= 10]
        if len(per_class) >= 2:
            z = z - float(np.median(per_class))
    return neighbour_mean(query, tabs["genes"], z)


def main() -> None:
    cases, seeds, out, models, work = probe_arguments(sys.argv)
    torch.set_num_threads(1)
    rows = json.loads(out.read_text()) if out.exists() else []
    tables: dict = {}
    for case, seed, spec, _, query, truth, model in default_models(cases, seeds, rows, work=work, models=models,
                                                                   train=False, reference=False):
        fine = spec["levels"][-1]
        if case not in tables:
            build = poisson_tables if SCORE == "poisson" else marker_tables
            tables = {case: build(ad.read_h5ad(work / "cases" / case / "ref.h5ad"), query, fine)}
        res = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
        calls = res.levels[fine]
        codes = np.asarray(calls.raw)
        raw = np.where(codes >= 0, np.asarray(res.classes[fine], dtype=str)[np.maximum(codes, 0)], "")  # "": no call
        marker_z = np.nan_to_num(neighbourhood_marker_z(query, raw, tables[case]), nan=np.inf)
        around = np.nan_to_num(np.asarray(calls.neighbourhood_novelty, dtype=float), nan=-np.inf)
        row = {"case": case, "seed": seed, "K": "auto"}
        for name, v in VARIANTS.items():
            if v is None:
                row[name] = score_result(res, truth, spec)
                continue
            flag = (around >= v[0]) & (marker_z < v[1]) & (np.asarray(calls.pred) >= 0)
            row[name] = score_result(flagged_copy(res, fine, flag), truth, spec)
        rows.append(row)
        print(json.dumps({"case": case, "seed": seed, **{n: round(row[n]["levels"][fine]["macro_f1"], 4)
                                                         for n in ("default", "nz1.0_m-2.0")}}), flush=True)
        out.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
