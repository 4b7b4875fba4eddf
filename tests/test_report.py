"""The HTML mapping report: self-contained, complete, and rendered by a real browser (headless chromium)."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import os
import re
import shutil
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib import image as mpimg  # noqa: E402

import atlasmtl  # noqa: E402
from atlasmtl.exceptions import InputError, OutputError, ParameterError  # noqa: E402
from atlasmtl.report import result_from_predictions  # noqa: E402

from .conftest import LEVELS  # noqa: E402

IMG = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


@pytest.fixture(scope="module")
def mapped(pbmc_result, pbmc_split):
    return pbmc_result, *pbmc_split


@pytest.fixture(scope="module")
def full_report(mapped, pbmc_model, tmp_path_factory):
    result, ref, query = mapped
    path = tmp_path_factory.mktemp("report") / "sub" / "report.html"
    written = result.report(path, model=pbmc_model, adata=query, truth=LEVELS, reference=ref)
    assert written == path
    return path, path.read_text(encoding="utf-8")


def test_report_is_self_contained_and_complete(full_report, mapped, pbmc_model):
    path, text = full_report
    result, _, query = mapped
    images = IMG.findall(text)
    text = html.unescape(text)
    # composition, rates, confidence, umap, novelty umap, confusion, F1, reliability, training history
    assert len(images) == 9 == text.count("<img ")
    for alt, data in images:
        pixels = mpimg.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100, alt
        assert pixels[..., :3].std() > 0.05, f"{alt} is blank"
    # the coordinates' caption says how the cells were placed
    assert f"placed from the mean of each cell's {result.metadata['settings']['knn_k']} nearest reference cells" in text
    # nothing is fetched from anywhere: no external scripts, styles, images or fonts
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", text)
    assert "@import" not in text and "url(" not in text
    for anchor in ("overview", "labels", "confidence", "novelty", "coordinates", "accuracy", "inputs", "settings",
                   "resources", "versions"):
        assert f'id="{anchor}"' in text
    genes = result.metadata["genes"]
    assert f"{genes['n_matched']} of the model's {genes['n_model_genes']} genes" in text
    assert f"{1 - result.levels['bulk_labels']['is_unknown'].mean():.1%}" in text
    evaluation = atlasmtl.evaluate(result, query, LEVELS)
    macro = evaluation["levels"]["bulk_labels"]["macro_f1"]
    assert f"{macro:.3f}" in text  # the summary card
    for level in LEVELS:  # the overview cards give accuracy beside macro-F1
        accuracy = evaluation["levels"][level]["accuracy"]
        assert re.search(rf'<div class="v">{re.escape(f"{accuracy:.1%}")}</div><div class="k">{level}: accuracy</div>',
                         text), level
    assert f"{macro:.4f}".rstrip("0") in text  # the metrics table
    assert result.metadata["versions"]["torch"] in text
    assert str(pbmc_model.train_config["num_epochs"]) in text
    assert "confidence_high = 0.7" in text


def test_report_in_headless_chromium(full_report, tmp_path):
    """Render the report in a real browser: the screenshot is not blank and every image decoded."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:  # the README's test command needs nothing beside the clone; CI (.ci/run) installs it
        assert not os.environ.get("CI"), "chromium is needed for this test in CI: .ci/run installs it"
        pytest.skip("no chromium on this machine (apt-get install chromium runs this test)")
    path, text = full_report
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "report.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1280,2000", path.as_uri()],
                   check=True, capture_output=True, timeout=90)
    pixels = mpimg.imread(shot)
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels[..., :3].std() > 0.1, "the screenshot is blank"
    # the page's header band is drawn (dark blue), i.e. the styles applied
    assert pixels[20:60, 20:400, 2].mean() < 0.5
    dom = subprocess.run(flags + ["--virtual-time-budget=10000", "--dump-dom", path.as_uri()],
                         check=True, capture_output=True, timeout=90, text=True).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    n = text.count("<img ")
    assert f'data-images="{n}/{n}"' in body, body
    assert 'data-images-loaded="yes"' in body, body


def test_minimal_report_and_bad_arguments(mapped, tmp_path):
    result, _, query = mapped
    path = atlasmtl.report.write_report(tmp_path / "plain.html", result)
    text = path.read_text()
    assert 'id="accuracy"' not in text  # no truth given
    assert "no reference given" in text and "No model given" in text
    assert len(IMG.findall(text)) == 5  # composition, rates, confidence, umap, novelty umap
    with pytest.raises(ParameterError, match="adata="):
        result.report(tmp_path / "x.html", truth=LEVELS)
    with pytest.raises(InputError, match="not the query"):
        result.report(tmp_path / "x.html", adata=query[:10].copy())
    with pytest.raises(ParameterError, match="one per level"):
        result.report(tmp_path / "x.html", adata=query, truth=["cell_type"])
    with pytest.raises(OutputError, match="Cannot write the report"):  # as the error table says (was InputError)
        result.report(tmp_path / "plain.html" / "x.html")


def test_result_rebuilt_from_full_predictions(mapped, pbmc_model, tmp_path):
    result, _, _ = mapped
    result.to_csv(tmp_path / "full.csv", mode="full")
    rebuilt = result_from_predictions(tmp_path / "full.csv", pbmc_model, settings={"confidence_high": 0.7})
    assert list(rebuilt.obs_names) == list(result.obs_names)
    for level in LEVELS:
        for field in ("code", "raw_code", "knn_code", "is_unknown", "is_low_conf", "used_knn"):
            np.testing.assert_array_equal(rebuilt.levels[level][field], result.levels[level][field], err_msg=field)
        np.testing.assert_allclose(rebuilt.levels[level]["conf"], result.levels[level]["conf"], rtol=1e-6)
    result.to_csv(tmp_path / "minimal.csv", mode="minimal")
    with pytest.raises(InputError, match="mode='full'"):
        result_from_predictions(tmp_path / "minimal.csv", pbmc_model)


@pytest.mark.parametrize("name, sep, magic", [("full.tsv", "\t", b"cell\t"), ("full.csv.gz", ",", b"\x1f\x8b"),
                                             ("full.tsv.bz2", "\t", b"BZh")])
def test_tables_are_written_in_the_format_their_name_says(mapped, pbmc_model, tmp_path, name, sep, magic):
    import pandas as pd

    result, _, _ = mapped
    result.to_csv(tmp_path / name, mode="full", include_coords=True)
    assert (tmp_path / name).read_bytes().startswith(magic)
    table = pd.read_csv(tmp_path / name, sep=sep, index_col=0)
    assert list(table.index) == list(result.obs_names)
    np.testing.assert_allclose(table["umap_1"], result.coords["umap"][:, 0], rtol=1e-6)
    rebuilt = result_from_predictions(tmp_path / name, pbmc_model)
    for level in LEVELS:
        np.testing.assert_array_equal(rebuilt.levels[level]["code"], result.levels[level]["code"])


def test_a_table_with_coordinates_gives_them_back(mapped, pbmc_model, tmp_path):
    """The <name>_1 ... <name>_d columns to_csv(include_coords=True) writes were ignored when a result was rebuilt
    from the table, so a report of CSV predictions said they held no coordinates (an .h5ad kept them)."""
    import pandas as pd

    result, _, _ = mapped
    assert set(result.coords) == {"latent", "umap"}
    result.to_csv(tmp_path / "p.csv", mode="full", include_coords=True)
    rebuilt = result_from_predictions(tmp_path / "p.csv", pbmc_model)
    assert set(rebuilt.coords) == {"latent", "umap"}
    for name, values in result.coords.items():
        assert rebuilt.coords[name].shape == values.shape and rebuilt.coords[name].dtype == np.float32
        np.testing.assert_allclose(rebuilt.coords[name], values, rtol=1e-6)
    page = html.unescape(rebuilt.report(tmp_path / "r.html", model=pbmc_model).read_text())
    assert "hold no coordinates" not in page and 'alt="query cells on the reference umap"' in page
    # only a head's full run of columns is read: not another name ending in _1, not a part of a run, not text
    table = result.to_dataframe("full")
    table["batch_1"] = 1.0
    table["umap_1"] = result.coords["umap"][:, 0]
    with pytest.warns(UserWarning, match=r"\['umap_1'\] are not read as the 'umap' coordinates: .* 2 dimension"):
        assert result_from_predictions(table, pbmc_model).coords == {}
    table["umap_2"] = result.coords["umap"][:, 1].astype(str)
    table.loc[table.index[4], "umap_2"] = "left"
    with pytest.raises(InputError, match=r"column 'umap_2' holds .*not numbers: \['left'\]"):
        result_from_predictions(table, pbmc_model)
    table["umap_2"] = pd.Series(result.coords["umap"][:, 1], index=table.index).where(lambda v: v > 0)  # NaN: unplaced
    np.testing.assert_array_equal(np.isnan(result_from_predictions(table, pbmc_model).coords["umap"]).any(axis=1),
                                  ~(result.coords["umap"][:, 1] > 0))


@pytest.mark.parametrize("name", ["pred.parquet", "pred.h5ad", "pred", "pred.gz"])
def test_a_table_is_never_written_under_another_formats_name(mapped, tmp_path, name):
    from atlasmtl.exceptions import OutputError

    result, _, _ = mapped
    with pytest.raises(OutputError, match="must end in .csv or .tsv.*to_parquet"):
        result.to_csv(tmp_path / name)
    assert not (tmp_path / name).exists()


def test_a_truth_column_without_labels_is_left_out_or_refused(mapped, tmp_path):
    """A query labelled at the coarse level only (the fine column all missing) crashed the report with a
    scikit-learn error ('Found empty input array'); that level is now left out with a warning."""
    import pandas as pd

    from atlasmtl.exceptions import LabelError

    result, _, query = mapped
    query = query.copy()
    query.obs["fine"] = pd.Categorical([np.nan] * query.n_obs)
    with pytest.warns(UserWarning, match=r"\['fine'\] hold no label.*left out"):
        result.report(tmp_path / "r.html", adata=query, truth={LEVELS[0]: LEVELS[0], LEVELS[1]: "fine"})
    assert "macro" in (tmp_path / "r.html").read_text().lower()
    with pytest.raises(LabelError, match="hold no label at all"):
        result.report(tmp_path / "r2.html", adata=query, truth={LEVELS[1]: "fine"})
    assert not (tmp_path / "r2.html").exists()
    with pytest.raises(LabelError, match="hold no label at all"):
        atlasmtl.pl.f1_scores(result, {LEVELS[1]: np.full(query.n_obs, np.nan, dtype=object)}, levels=[LEVELS[1]])


def test_miscalibration_is_a_finding_with_its_direction(mapped, pbmc_model, tmp_path):
    from atlasmtl.report_html import CALIBRATION_EXCESS, calibration_findings

    result, _, query = mapped
    fine = LEVELS[-1]
    # the true labels permuted among the cells: the network's calls keep their confidence but are mostly wrong
    wrong = query.copy()
    wrong.obs[fine] = np.random.default_rng(0).permutation(wrong.obs[fine].to_numpy())
    evaluation = atlasmtl.evaluate(result, wrong, LEVELS)
    m = evaluation["levels"][fine]
    assert m["ece"] - m["ece_if_calibrated"] >= CALIBRATION_EXCESS
    frame = wrong.obs[LEVELS]
    found = dict((msg.split(":")[0], (sev, msg)) for sev, msg in calibration_findings(result, frame, evaluation))
    assert found[fine][0] == "warn" and "over-confident" in found[fine][1]
    assert f"ECE {m['ece']:.3f}" in found[fine][1] and f"{m['ece_if_calibrated']:.3f}" in found[fine][1]
    # a level is reported only when its excess reaches the bound
    for level, mm in evaluation["levels"].items():
        assert (level in found) == (mm["ece"] - mm["ece_if_calibrated"] >= CALIBRATION_EXCESS)
    # and it reaches the report's findings
    text = html.unescape(result.report(tmp_path / "r.html", model=pbmc_model, adata=wrong, truth=LEVELS).read_text())
    assert found[fine][1] in text


def test_cells_of_types_the_model_lacks_do_not_make_a_calibration_finding(mapped):
    """A query holding a type the reference lacks (true labels no model class has) read as 'over-confident':
    its cells cannot be called right. The finding judges the cells of the model's own types."""
    from atlasmtl.report_html import CALIBRATION_EXCESS, calibration_findings

    result, _, query = mapped
    fine = LEVELS[-1]
    lacking = query.copy()
    labels = lacking.obs[fine].astype(str).to_numpy().copy()
    labels[np.random.default_rng(0).random(len(labels)) < 0.3] = "a type the model lacks"
    lacking.obs[fine] = labels
    evaluation = atlasmtl.evaluate(result, lacking, LEVELS)
    m = evaluation["levels"][fine]
    assert m["ece"] - m["ece_if_calibrated"] >= CALIBRATION_EXCESS  # all cells counted: it would be a finding
    found = [msg for _, msg in calibration_findings(result, lacking.obs[LEVELS], evaluation) if msg.startswith(fine)]
    known = [msg for _, msg in calibration_findings(result, query.obs[LEVELS], atlasmtl.evaluate(result, query, LEVELS))
             if msg.startswith(fine)]
    assert bool(found) == bool(known)  # the same verdict as on the known types' cells alone
    assert all("cells of types the model lacks are left out" in msg for msg in found)


def test_abstentions_that_withhold_mostly_right_calls_are_a_finding(mapped, pbmc_model, tmp_path):
    """With the novelty threshold far too low, known cells are flagged novel although the network called them
    right: the finding counts them as evaluate does and names the setting; at the defaults, no finding."""
    from atlasmtl.report_html import ABSTENTION_MIN_CELLS, abstention_findings

    result, _, query = mapped
    assert abstention_findings(result, query.obs[LEVELS]) == []
    strict = atlasmtl.predict(pbmc_model, query, novelty_threshold=1.0, show_progress=False, show_summary=False)
    found = dict((msg.split(":")[0], msg) for _, msg in abstention_findings(strict, query.obs[LEVELS]))
    fine = LEVELS[-1]
    m = atlasmtl.evaluate(strict, query, LEVELS)["levels"][fine]
    assert m["unknown_withheld_error"] < 0.5
    withheld = int(round((1 - m["coverage"]) * m["n"]))
    right = int(round((1 - m["unknown_withheld_error"]) * withheld))
    assert withheld >= ABSTENTION_MIN_CELLS
    assert f"{right:,} of the {withheld:,} labelled cells called Unknown had a right network call" in found[fine]
    assert f"{m['network_error']:.1%} of all its calls are wrong" in found[fine]
    assert "novelty_threshold" in found[fine]
    text = html.unescape(strict.report(tmp_path / "r.html", model=pbmc_model, adata=query, truth=LEVELS).read_text())
    assert found[fine] in text


def test_novelty_table_ranks_called_classes(mapped, full_report):
    """The report's novelty table: per network call, the cells' median scores, most novel neighbourhoods first."""
    from atlasmtl.report_html import novelty_table

    result = mapped[0]
    level = result.label_columns[-1]
    table = novelty_table(result)
    calls = result.levels[level]
    raw = np.asarray(calls.raw)
    assert table["cells"].sum() == (raw >= 0).sum()
    assert list(table["median neighbourhood novelty"]) == sorted(table["median neighbourhood novelty"], reverse=True)
    name = table.index[0]
    at = raw == result.classes[level].index(name)
    assert table.loc[name, "median novelty z"] == pytest.approx(np.nanmedian(np.asarray(calls.novelty, float)[at]))
    assert table.loc[name, "median neighbourhood novelty"] == pytest.approx(
        np.nanmedian(np.asarray(calls.neighbourhood_novelty, float)[at]))
    assert table.loc[name, "called novel"] == pytest.approx(np.asarray(calls.is_novel)[at].mean())
    text = html.unescape(full_report[1])
    assert "median neighbourhood novelty" in text and f"<th>{name}</th>" in text
    assert "their 30 nearest query cells" in text  # the result's neighbourhood_k
    share = f"{table.loc[name, 'called novel']:.1%}"
    assert re.search(rf"<th>{re.escape(name)}</th>(<td[^>]*>[^<]*</td>)*<td[^>]*>{re.escape(share)}</td>", text)
    silent = dataclasses.replace(result.levels[level], novelty=np.full(result.n_obs, np.nan, dtype=np.float32))
    result.levels[level], kept = silent, result.levels[level]
    try:
        assert novelty_table(result) is None  # a model without a novelty score: no table, no section
    finally:
        result.levels[level] = kept


def test_novelty_section_without_neighbourhood_scores(mapped, pbmc_model, tmp_path):
    """Predictions made with neighbourhood_k=None: the table still ranks by the per-cell score, says the
    neighbourhood score was not computed, and draws no novelty figure."""
    from atlasmtl.report_html import novelty_table

    _, _, query = mapped
    result = atlasmtl.predict(pbmc_model, query, neighbourhood_k=None, show_progress=False, show_summary=False)
    table = novelty_table(result)
    assert table["median neighbourhood novelty"].isna().all()
    assert list(table["median novelty z"]) == sorted(table["median novelty z"], reverse=True)
    text = html.unescape(atlasmtl.report.write_report(tmp_path / "r.html", result).read_text())
    assert "not computed for these predictions, neighbourhood_k=None" in text
    assert len(IMG.findall(text)) == 4  # composition, rates, confidence, umap: no novelty figure


def test_report_and_writers_check_their_options_first(mapped, pbmc_model, tmp_path):
    """Found by an audit (2026-12-07): a basis the result lacks was a bare KeyError; dpi 1-5 failed inside
    matplotlib's font renderer; gate settings given as text failed in a format string; include_coords='no'
    wrote the coordinates to a CSV or a copied file; a bad mode created the output folder before failing; a
    predictions file named '.H5AD' was read as text; and atlasmtl.report needed its own import."""
    result, _, query = mapped
    with pytest.raises(atlasmtl.exceptions.CoordinateError, match=r"basis='tsne' is not among .*'umap'"):
        result.report(tmp_path / "b.html", basis="tsne")
    with pytest.raises(ParameterError, match="dpi"):
        result.report(tmp_path / "d.html", dpi=5)
    with pytest.raises(ParameterError, match="dpi"):
        atlasmtl.pl.save_figure(atlasmtl.pl.composition(result), tmp_path / "f.png", dpi=2)
    assert not list(tmp_path.iterdir())
    result.to_csv(tmp_path / "full.csv", mode="full")
    with pytest.raises(ParameterError, match="confidence_high"):
        result_from_predictions(tmp_path / "full.csv", pbmc_model, settings={"confidence_high": "0.7"})
    rebuilt = result_from_predictions(tmp_path / "full.csv", pbmc_model, settings={"confidence_high": 0.8})
    assert rebuilt.metadata["settings"]["confidence_high"] == 0.8
    with pytest.raises(ParameterError, match="include_coords"):
        result.to_csv(tmp_path / "c.csv", include_coords="no")
    query.write_h5ad(tmp_path / "q.h5ad")
    with pytest.raises(ParameterError, match="include_coords"):
        result.write_h5ad(tmp_path / "o.h5ad", tmp_path / "q.h5ad", include_coords="no")
    with pytest.raises(ParameterError, match="mode"):
        result.write_h5ad(tmp_path / "new" / "o.h5ad", tmp_path / "q.h5ad", mode="fulll")
    assert not (tmp_path / "new").exists() and not (tmp_path / "c.csv").exists() and not (tmp_path / "o.h5ad").exists()
    result.write_h5ad(tmp_path / "P.H5AD", query, mode="full")
    again = result_from_predictions(tmp_path / "P.H5AD", pbmc_model)
    np.testing.assert_array_equal(again.labels("bulk_labels"), result.labels("bulk_labels"))
    fresh = subprocess.run([sys.executable, "-c", "import atlasmtl; print(atlasmtl.report.write_report.__name__)"],
                           capture_output=True, text=True, timeout=120)  # this process imported atlasmtl.report
    assert fresh.stdout.strip() == "write_report", fresh.stderr[-500:]
