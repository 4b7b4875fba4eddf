"""Smoke test of the benchmark harness: ``python benchmark/run.py --smoke`` end to end on real data.

A 300-cell random subset of Symphony PBMC (train on 3pv1 + 3pv2, predict 5p);
atlasmtl, kNN and logistic regression, each in its own subprocess; evaluation
with ``atlasmtl.evaluate``; tables and the figure written. No peer environment needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import numpy as np
import pandas as pd
import pytest

from .conftest import REPO, data_dir_with

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    # the committed fixture (tests/data) or the shared folder, whichever the suite found it in
    env = dict(os.environ, ATLASMTL_SHARED_DATA=str(data_dir_with("symphony_pbmc_small.h5ad")))
    out = tmp_path_factory.mktemp("bench_smoke")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmark" / "run.py"), "--smoke", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, json.loads((out / "results.json").read_text())


def test_files_written(smoke):
    out, stdout, results = smoke
    for name in ("results.json", "summary.md", "smoke_symphony_5p.md", "f1_vs_train_time.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "f1_vs_train_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Finest-level macro-F1 / accuracy" in stdout
    assert "smoke_symphony_5p" in (out / "summary.md").read_text()


def test_every_method_ran_and_metrics_in_range(smoke):
    _, _, results = smoke
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == {"atlasmtl", "atlasmtl_knn_off", "atlasmtl_knn_all", "knn", "logreg"}
    for name, r in runs.items():
        assert r["status"] == "ok", (name, r.get("reason"))
        assert r["train_seconds"] > 0 and r["predict_seconds"] >= 0
        assert 50 < r["peak_rss_mb"] < 8000  # the subprocess's own peak RSS, in MB
        assert r["cpu_count"] >= 1 and r["versions"]["numpy"]
        for lv in ("cell_type_broad", "cell_type"):
            m = r["metrics"]["levels"][lv]
            for key in ("accuracy", "macro_f1", "balanced_accuracy", "coverage", "ece", "brier", "aurc"):
                assert 0.0 <= m[key] <= 1.0, (name, lv, key, m[key])
        # the two chemistries generalise to 5p: well above chance on 7+ classes
        assert r["metrics"]["levels"]["cell_type_broad"]["accuracy"] > 0.6, name
    # the three atlasmtl outputs come from one training (same process, same cost)
    assert runs["atlasmtl"]["train_seconds"] == runs["atlasmtl_knn_off"]["train_seconds"]
    assert runs["atlasmtl_knn_all"]["settings"]["knn_correction"] == "all"


def test_reported_accuracy_matches_prediction_table(smoke):
    out, _, results = smoke
    work = out / "work"
    truth = pd.read_csv(work / "cases" / "smoke_symphony_5p" / "truth.csv.gz", index_col=0).astype(str)
    for method, runner in (("logreg", "logreg"), ("atlasmtl_knn_off", "atlasmtl")):
        pred = pd.read_csv(work / "runs" / "smoke_symphony_5p" / runner / f"pred_{method}.csv.gz", index_col=0,
                           keep_default_na=False)
        assert len(pred) == len(truth) and set(pred.index) == set(truth.index)
        acc = float(np.mean(pred.loc[truth.index, "pred_cell_type"].astype(str).to_numpy() == truth["cell_type"].to_numpy()))
        reported = next(r for r in results["runs"] if r["method"] == method)["metrics"]["levels"]["cell_type"]["accuracy"]
        assert abs(acc - reported) < 1e-12
        conf = pred["conf_cell_type"].to_numpy()
        assert np.all((conf >= 0) & (conf <= 1))


def test_seed_reaches_every_runner(tmp_path):
    # `--seed N` (peers' seed-to-seed spread, benchmark/experiments/peer_seed_spread.py) is the seed each runner gets
    env = dict(os.environ, ATLASMTL_SHARED_DATA=str(data_dir_with("symphony_pbmc_small.h5ad")))
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmark" / "run.py"), "--smoke", "--methods", "logreg", "--seed", "3",
         "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=240, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(r["method"], r["seed"], r["status"]) for r in runs] == [("logreg", 3, "ok")]
    record = json.loads((tmp_path / "work" / "runs" / "smoke_symphony_5p" / "logreg" / "run.json").read_text())
    assert record["seed"] == 3


def test_shifted_query_case(tmp_path, monkeypatch):
    # benchmark/cases.make_shifted: a prepared case's query thinned, or with genes unmeasured; the reference untouched
    import anndata as ad
    import scipy.sparse as sp

    monkeypatch.syspath_prepend(str(REPO / "benchmark"))
    import cases

    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(rng.poisson(30.0, size=(60, 40)).astype(np.float32))
    obs = pd.DataFrame({"level": np.repeat(["a", "b", "c"], 20), "batch": "x"}, index=[f"c{i}" for i in range(60)])
    adata = ad.AnnData(X=cases.lognorm_cp10k(counts), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(40)]))
    spec = {"levels": ["level"], "batch_key": "batch", "has_counts": True, "x_is_cp10k": True, "coords": {},
            "novel": {}, "semi_synthetic": False, "title": "base", "source": "random"}
    cases._write_split(tmp_path / "base", spec, adata[:30].copy(), adata[30:].copy(), counts[:30], counts[30:])
    query = ad.read_h5ad(tmp_path / "base" / "query.h5ad")

    cases.make_shifted(tmp_path / "thin", "base", "thin")
    thin = ad.read_h5ad(tmp_path / "thin" / "query.h5ad")
    assert (tmp_path / "thin" / "ref.h5ad").read_bytes() == (tmp_path / "base" / "ref.h5ad").read_bytes()
    before = np.asarray(query.layers["counts"].sum(axis=1)).ravel()
    after = np.asarray(thin.layers["counts"].sum(axis=1)).ravel()
    assert list(thin.obs_names) == list(query.obs_names)  # no cell emptied at ~1,200 counts a cell
    assert np.all(after < before) and 0.07 < (after / before).min() and (after / before).max() < 0.33
    assert (thin.layers["counts"] <= query.layers["counts"]).toarray().all()
    np.testing.assert_allclose(thin.X.toarray(), cases.lognorm_cp10k(thin.layers["counts"]).toarray(), rtol=1e-6)
    truth = pd.read_csv(tmp_path / "thin" / "truth.csv.gz", index_col=0)
    assert list(truth.index) == list(thin.obs_names) and list(truth["level"]) == list(obs["level"][30:])
    thin_spec = cases.read_json(tmp_path / "thin" / "case.json")
    assert thin_spec["simulated_shift"] and thin_spec["n_query"] == 30 and thin_spec["title"].startswith("SIMULATED SHIFT")

    cases.make_shifted(tmp_path / "genes", "base", "missing_genes")
    genes = ad.read_h5ad(tmp_path / "genes" / "query.h5ad").layers["counts"].toarray()
    gone = (genes == 0).all(axis=0)
    assert 0.3 <= gone.mean() <= 0.5  # U(0.3, 0.5) of the 40 genes
    np.testing.assert_array_equal(genes[:, ~gone], query.layers["counts"].toarray()[:, ~gone])

    # ambient RNA: every cell keeps its counts and gains counts of the query's pooled profile, 10-30% of its new depth
    cases.make_shifted(tmp_path / "ambient", "base", "ambient")
    soupy = ad.read_h5ad(tmp_path / "ambient" / "query.h5ad").layers["counts"].toarray()
    own = query.layers["counts"].toarray()
    added = soupy - own
    assert (added >= 0).all() and added.sum() > 0
    share = added.sum(axis=1) / soupy.sum(axis=1)
    assert 0.07 < share.min() and share.max() < 0.33 and share.std() > 0.03  # U(0.1, 0.3) per cell, Poisson noise
    # ... in the pool's proportions: a marker of one type (gene 0, 200 counts in a fifth of the cells) reaches the others
    skewed = rng.poisson(np.r_[5.0, np.full(39, 20.0)], size=(100, 40)).astype(np.float32)
    skewed[:20, 0] += 200
    gained, _ = cases._add_ambient(sp.csr_matrix(skewed), np.random.default_rng(1))
    extra = gained.toarray() - skewed
    pooled = skewed.sum(axis=0) / skewed.sum()
    np.testing.assert_allclose(extra.sum(axis=0) / extra.sum(), pooled, atol=0.01)
    assert (extra[20:, 0] > 0).mean() > 0.9  # the marker is in nearly every other cell

    spec_no_counts = dict(spec, has_counts=False, x_is_cp10k=False)
    cases._write_split(tmp_path / "nocounts", spec_no_counts, adata[:30].copy(), adata[30:].copy(), None, None)
    with pytest.raises(ValueError, match="needs counts"):
        cases.make_shifted(tmp_path / "bad", "nocounts", "thin")
    with pytest.raises(ValueError, match="unknown shift"):
        cases.make_shifted(tmp_path / "bad", "base", "rotate")


@pytest.mark.shared_data("kang_ctrl_stim_counts.h5ad")
def test_interferon_shift(monkeypatch):
    # benchmark/cases._stimulate: real control cells given the in-silico interferon-beta response reach the real
    # stimulated cells' detection of an interferon-stimulated gene; genes the programme leaves alone keep their counts
    import anndata as ad
    import scipy.sparse as sp

    monkeypatch.syspath_prepend(str(REPO / "benchmark"))
    import cases

    kang = ad.read_h5ad(cases.shared_data_dir() / "kang_ctrl_stim_counts.h5ad")
    stim = (kang.obs["condition"] == "stim").to_numpy()
    counts = sp.csr_matrix(kang.X[np.flatnonzero(~stim)[:300]], dtype=np.float32)
    shifted, what = cases._shift_query_counts(counts, "interferon", np.random.default_rng(0), genes=kang.var_names)
    isg15 = kang.var_names.get_loc("ISG15")

    def detected(m, rows=slice(None)):
        return float((sp.csr_matrix(m)[rows, isg15].toarray() > 0).mean())

    assert detected(counts) < 0.5 < 0.9 < detected(shifted)
    assert abs(detected(shifted) - detected(kang.X, stim)) < 0.1
    prog = cases.interferon_programme(kang.var_names)
    still = ((prog["delta"] == 0) & (prog["ratio"] == 1)).all(axis=0)
    assert 0.8 < still.mean() < 0.95  # the programme moves about a tenth of the genes
    assert (shifted[:, still] != counts[:, still]).nnz == 0
    again, _ = cases._shift_query_counts(counts, "interferon", np.random.default_rng(0), genes=kang.var_names)
    assert (again != shifted).nnz == 0 and what.startswith("interferon-beta response added")


def test_delta_bootstrap_on_smoke_run(smoke):
    # benchmark/experiments/delta_bootstrap.py: the run's own Δ to the best peer (it exits non-zero when its
    # macro-F1 differs from results.json's) with a paired interval over the query's cells
    out, _, results = smoke
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmark" / "experiments" / "delta_bootstrap.py"), str(out / "work"),
         str(out / "results.json"), "--draws", "200"], cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| smoke_symphony_5p |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    f1 = {r["method"]: r["metrics"]["levels"]["cell_type"]["macro_f1"] for r in results["runs"]}
    peer = max(("knn", "logreg"), key=lambda m: f1[m])
    assert cells[3].endswith(f"({peer})")
    assert cells[4] == f"{f1['atlasmtl'] - f1[peer]:+.3f}"
    low, high = (float(v) for v in cells[5].split(" to "))
    assert -1.0 <= low <= high <= 1.0


def test_bootstrap_macro_f1_is_sklearns_on_the_drawn_cells(monkeypatch):
    from sklearn.metrics import f1_score

    monkeypatch.syspath_prepend(str(REPO / "benchmark" / "experiments"))
    monkeypatch.syspath_prepend(str(REPO / "benchmark"))
    from delta_bootstrap import macro_f1_draws

    rng = np.random.default_rng(0)
    truth = rng.choice(["a", "b", "c", "rare"], p=[0.45, 0.3, 0.22, 0.03], size=120).astype(object)
    pred = np.where(rng.random(120) < 0.7, truth, rng.choice(["a", "b", "c", "Unknown"], size=120)).astype(object)
    draws = [rng.integers(0, 120, size=120) for _ in range(20)]
    weights = np.stack([np.bincount(d, minlength=120) for d in draws]).astype(np.float64)
    got = macro_f1_draws(truth, pred, weights)
    for d, value in zip(draws, got):
        want = f1_score(truth[d], pred[d], labels=np.unique(truth[d]), average="macro", zero_division=0)
        assert abs(value - want) < 1e-12
