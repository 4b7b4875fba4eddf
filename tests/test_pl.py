"""atlasmtl.pl: every plot draws what the result holds, on real data (pbmc68k_reduced split)."""

from __future__ import annotations

import copy

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import f1_score  # noqa: E402

import atlasmtl  # noqa: E402
from atlasmtl import pl  # noqa: E402
from atlasmtl.exceptions import CoordinateError, LabelError, ParameterError  # noqa: E402

from .conftest import LEVELS  # noqa: E402

GATE = {"confidence_high": 0.8, "confidence_low": 0.3, "margin_threshold": 0.25}


@pytest.fixture(scope="module")
def gated(pbmc_model, pbmc_split):
    """A stricter gate than the default, so that every plot has Unknown and KNN-confirmed cells to draw."""
    ref, query = pbmc_split
    result = atlasmtl.predict(pbmc_model, query, show_progress=False, **GATE)
    return result, ref, query


def _visible_axes(fig: Figure):
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def test_composition_bars_are_label_fractions(gated):
    result, _, _ = gated
    fig = pl.composition(result)
    assert isinstance(fig, Figure)
    axes = _visible_axes(fig)
    assert len(axes) == len(LEVELS)
    for ax, level in zip(axes, LEVELS):
        names = [t.get_text() for t in ax.get_yticklabels()]
        widths = [p.get_width() for p in ax.patches]
        assert names[-1] == "Unknown" or names[0] == "Unknown"
        expected = pd.Series(np.asarray(result.labels(level))).value_counts(normalize=True)
        # bars are drawn bottom-up from the reversed y positions
        drawn = dict(zip(reversed(names), widths)) if ax.get_yticks()[0] < ax.get_yticks()[-1] else dict(zip(names, widths))
        for name, frac in expected.items():
            assert drawn[name] == pytest.approx(frac)
        assert sum(widths) == pytest.approx(1.0)


def test_confidence_draws_the_result_thresholds(gated):
    result, _, _ = gated
    fig = pl.confidence(result)
    axes = _visible_axes(fig)
    assert len(axes) == 2 * len(LEVELS)
    conf_axes, margin_axes = axes[0::2], axes[1::2]
    for ax, level in zip(conf_axes, LEVELS):
        xs = sorted(line.get_xdata()[0] for line in ax.lines)
        assert xs == pytest.approx(sorted([GATE["confidence_low"], GATE["confidence_high"]]))
        assert sum(p.get_height() for p in ax.patches) == result.n_obs
        assert f"{np.median(result.levels[level]['conf']):.2f}" in ax.get_title()
    for ax in margin_axes:
        assert [line.get_xdata()[0] for line in ax.lines] == pytest.approx([GATE["margin_threshold"]])


def test_confidence_counts_the_negative_margins_of_jointly_decoded_calls(gated):
    """A jointly decoded call need not be its level's top class, so its margin is negative (4 of 513 coarse calls on
    Zilionis healthy -> tumour); the margin histogram spanned [0, 1] and left them out, until 2026-12-07."""
    result = copy.deepcopy(gated[0])
    level = LEVELS[0]
    result.levels[level]["margin"][:5] = -0.3
    fig = pl.confidence(result, level)
    conf_ax, margin_ax = _visible_axes(fig)
    assert sum(p.get_height() for p in margin_ax.patches) == result.n_obs
    assert margin_ax.get_xlim()[0] == pytest.approx(-0.3) and conf_ax.get_xlim() == (0, 1)
    assert "call" in margin_ax.get_xlabel() and "top" not in conf_ax.get_xlabel()


def test_rates_are_the_flag_means(gated):
    result, _, _ = gated
    ax = _visible_axes(pl.rates(result))[0]
    heights = [p.get_height() for p in ax.patches]
    expected = [np.mean(result.levels[lv][f]) for f in ("is_low_conf", "used_knn", "is_unknown") for lv in LEVELS]
    assert heights == pytest.approx(expected)
    assert max(expected) > 0  # the gate did something on this split, so the plot is not trivially empty


def test_umap_draws_query_over_reference(gated):
    result, ref, _ = gated
    fig = pl.umap(result, ref, color=["label", "confidence", "unknown"])
    axes = _visible_axes(fig)
    assert len(axes) == 3
    for ax in axes:
        counts = [len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection)]
        assert counts[0] == ref.n_obs  # the grey reference first, underneath
        assert sum(counts[1:]) == result.n_obs
    background = axes[0].collections[0]
    np.testing.assert_allclose(background.get_offsets(), ref.obsm["X_umap"][:, :2])
    label_points = np.concatenate([c.get_offsets() for c in axes[0].collections[1:]])
    np.testing.assert_allclose(np.sort(label_points[:, 0]), np.sort(result.coords["umap"][:, 0]), rtol=1e-5)
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    n_unknown = int(result.levels["bulk_labels"]["is_unknown"].sum())
    if n_unknown:
        assert f"Unknown ({n_unknown})" in legend
    assert f"{result.levels['bulk_labels']['is_unknown'].mean():.1%}" in axes[2].get_title()


def test_umap_leaves_unplaced_cells_out(gated):
    """Cells predict could not place (NaN coordinates: no signal) are not drawn and not counted in the legend."""
    import copy

    result, ref, _ = gated
    unplaced = copy.copy(result)
    unplaced.coords = {name: values.copy() for name, values in result.coords.items()}
    unplaced.coords["umap"][:3] = np.nan
    fig = pl.umap(unplaced, ref, color=["label"])
    ax = _visible_axes(fig)[0]
    points = np.concatenate([c.get_offsets() for c in ax.collections[1:]])
    assert len(points) == result.n_obs - 3 and np.isfinite(points).all()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sum(int(t.rsplit("(", 1)[1].rstrip(")")) for t in legend if t != "reference") == result.n_obs - 3


def test_umap_colours_cells_by_their_novelty_scores(gated):
    result, ref, _ = gated
    fig = pl.umap(result, ref, color=["novelty", "neighbourhood_novelty"])
    axes = _visible_axes(fig)
    assert [ax.get_title() for ax in axes] == ["bulk_labels: novelty", "bulk_labels: neighbourhood novelty"]
    for ax, field in zip(axes, ("novelty", "neighbourhood_novelty")):
        values = np.asarray(result.levels["bulk_labels"][field], dtype=float)
        drawn = ax.collections[-1].get_array()
        assert len(drawn) == np.isfinite(values).sum() > 0
        np.testing.assert_allclose(np.sort(drawn), np.sort(values[np.isfinite(values)]), rtol=1e-6)
        assert ax.collections[-1].get_clim() == (0, result.metadata["settings"]["novelty_threshold"])


def test_umap_without_reference_and_bad_arguments(gated):
    result, _, _ = gated
    ax = _visible_axes(pl.umap(result, color="confidence"))[0]
    assert "no reference" in ax.get_title()
    with pytest.raises(ParameterError, match="color"):
        pl.umap(result, color="sparkle")
    with pytest.raises(CoordinateError, match="no 'tsne' coordinates"):
        pl.embedding(result, basis="tsne")
    with pytest.raises(ParameterError, match="not in the result"):
        pl.composition(result, levels=["nope"])
    with pytest.raises(ParameterError, match="PredictionResult"):
        pl.rates(object())


def test_confusion_rows_sum_to_one_and_match_the_counts(gated):
    result, _, query = gated
    fig = pl.confusion(result, query)
    axes = _visible_axes(fig)
    assert len(axes) == len(LEVELS)
    for ax, level in zip(axes, LEVELS):
        matrix = ax.get_images()[0].get_array()
        np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
        rows = [t.get_text().rsplit(" (", 1)[0] for t in ax.get_yticklabels()]
        cols = [t.get_text() for t in ax.get_xticklabels()]
        truth = query.obs[level].astype(str).to_numpy()
        pred = np.asarray(result.labels(level)).astype(str)
        i, j = rows.index(truth[0]), cols.index(pred[0])
        expected = np.mean(pred[truth == truth[0]] == pred[0])
        assert matrix[i, j] == pytest.approx(expected)
        assert f"{np.mean(pred == truth):.1%}" in ax.get_title()


def test_f1_bars_are_sklearn_per_class_f1(gated):
    result, _, query = gated
    axes = _visible_axes(pl.f1_scores(result, query))
    for ax, level in zip(axes, LEVELS):
        names = [t.get_text().rsplit(" (", 1)[0] for t in ax.get_yticklabels()]
        scores = dict(zip(names[::-1] if ax.get_yticks()[0] < ax.get_yticks()[-1] else names,
                          [p.get_width() for p in ax.patches]))
        y = query.obs[level].astype(str).to_numpy()
        p = np.asarray(result.labels(level)).astype(str)
        for name in names:
            assert scores[name] == pytest.approx(f1_score(y, p, labels=[name], average=None, zero_division=0)[0])


def test_reliability_ece_matches_evaluate(gated):
    result, _, query = gated
    evaluation = atlasmtl.evaluate(result, query, LEVELS)
    axes = _visible_axes(pl.reliability(result, query))
    for ax, level in zip(axes, LEVELS):
        m = evaluation["levels"][level]
        assert ax.get_title() == f"{level}: ECE {m['ece']:.3f} ({m['ece_if_calibrated']:.3f} if calibrated)"
    table = pl.calibration_bins(np.array([0.05, 0.5, 0.55, 1.0]), np.array([False, True, False, True]), n_bins=2)
    assert table["cells"].tolist() == [2, 2]  # bins are (0, 0.5] and (0.5, 1]
    assert table["confidence"].tolist() == pytest.approx([0.275, 0.775])
    assert table["accuracy"].tolist() == pytest.approx([0.5, 0.5])
    assert pl.expected_calibration_error(table) == pytest.approx((2 * 0.225 + 2 * 0.275) / 4)


def test_truth_forms_align_by_cell_name(gated):
    result, _, query = gated
    shuffled = query.obs.sample(frac=1.0, random_state=1)
    by_frame = pl.truth_by_level(result, shuffled)
    assert list(by_frame) == LEVELS
    np.testing.assert_array_equal(by_frame["bulk_labels"], query.obs["bulk_labels"].astype(str).to_numpy())
    renamed = query.obs.rename(columns={"lineage": "coarse", "bulk_labels": "fine"})
    by_list = pl.truth_by_level(result, renamed, ["coarse", "fine"])
    np.testing.assert_array_equal(by_list["lineage"], by_frame["lineage"])
    by_map = pl.truth_by_level(result, {"bulk_labels": query.obs["bulk_labels"].to_numpy()})
    assert list(by_map) == ["bulk_labels"]
    with_nan = query.obs.copy()
    with_nan["bulk_labels"] = with_nan["bulk_labels"].astype(object)
    with_nan.iloc[0, with_nan.columns.get_loc("bulk_labels")] = np.nan
    assert pl.truth_by_level(result, with_nan)["bulk_labels"][0] is None
    with pytest.raises(LabelError, match="not in the table"):
        pl.truth_by_level(result, query.obs, {"bulk_labels": "nope"})
    with pytest.raises(LabelError, match="not in the truth table"):
        pl.truth_by_level(result, query.obs.iloc[5:])
    with pytest.raises(LabelError, match="one per level"):
        pl.truth_by_level(result, query.obs, ["bulk_labels"])


def test_training_history_show_and_save(pbmc_model, gated, tmp_path):
    result, _, _ = gated
    ax = _visible_axes(pl.training_history(pbmc_model))[0]
    history = pbmc_model.train_config["history"]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [h["train_loss"] for h in history])
    assert pl.rates(result, show=True) is None  # shown (Agg: a no-op), nothing returned, as in scanpy
    matplotlib.pyplot.close("all")
    out = tmp_path / "composition.png"
    pl.composition(result, save=out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- ax=, legends and axis ranges
def test_plots_draw_into_the_users_axes(gated):
    result, ref, query = gated
    fig = Figure()
    comp_axes = fig.subplots(1, 2)
    assert pl.composition(result, ax=comp_axes) is fig
    assert [len(ax.patches) for ax in comp_axes] == [len(result.classes[lv]) + 1 for lv in LEVELS]
    single = Figure().subplots()
    assert pl.rates(result, ax=single) is single.get_figure() and len(single.patches) == 3 * len(LEVELS)
    grid = Figure().subplots(2, 2)
    pl.confidence(result, ax=grid)
    assert all(ax.patches for ax in grid.ravel())
    one = Figure().subplots()
    pl.reliability(result, query, levels="bulk_labels", ax=one)
    assert one.get_title().startswith("bulk_labels: ECE")
    # the wrong number of Axes names what the plot needs
    with pytest.raises(ParameterError, match=r"draws 2 panel\(s\) \(one per level\); pass 2 matplotlib Axes, got 1"):
        pl.confusion(result, query, ax=Figure().subplots())
    with pytest.raises(ParameterError, match="not all Axes"):
        pl.umap(result, ref, color="label", ax="left")


def test_reliability_legend_covers_no_data(gated):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    result, _, query = gated
    fig = pl.reliability(result, query)
    FigureCanvasAgg(fig).draw()
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends
    boxes = [leg.get_window_extent() for leg in legends]
    for ax in fig.axes:
        points = [c.get_offsets() for c in ax.collections if len(c.get_offsets())]
        lines = [np.column_stack(line.get_data()) for line in ax.lines]
        for xy in points + lines:
            display = ax.transData.transform(np.asarray(xy, dtype=float))
            for box in boxes:
                inside = (display[:, 0] >= box.x0) & (display[:, 0] <= box.x1) & \
                         (display[:, 1] >= box.y0) & (display[:, 1] <= box.y1)
                assert not inside.any(), "the legend covers data"
        for bar in ax.patches:
            assert not any(box.overlaps(bar.get_window_extent()) for box in boxes), "the legend covers a bar"


def test_fraction_and_score_axes_stop_at_one(pbmc_model, pbmc_split):
    _, query = pbmc_split
    everything_low = atlasmtl.predict(pbmc_model, query, show_progress=False, confidence_high=1.0)
    assert all(np.mean(everything_low.levels[lv].is_low_conf) == 1.0 for lv in LEVELS)
    ax = _visible_axes(pl.rates(everything_low))[0]
    assert ax.get_ylim()[1] == pytest.approx(1.0)  # 100% of cells, and not a tick more
    for ax in _visible_axes(pl.f1_scores(everything_low, query)):
        assert ax.get_xlim() == (0.0, 1.0)


def test_truth_the_plots_cannot_use_is_refused_and_unknown_truth_is_a_miss(gated):
    """Found by an audit (2026-12-07): a `levels=` with no truth crashed inside matplotlib or with a
    ZeroDivisionError; a truth table naming a cell twice misaligned the cells (IndexError); and a truth label
    "Unknown" (atlases use it for unannotated cells) made a predicted Unknown count as right in the confusion
    title and the F1 bars, while evaluate counts every Unknown call as wrong."""
    result, _, query = gated
    coarse_only = {"lineage": query.obs["lineage"].to_numpy()}
    for plot in (pl.confusion, pl.f1_scores, pl.reliability):
        with pytest.raises(LabelError, match=r"No true labels for level\(s\) \['bulk_labels'\]; the truth covers "
                                             r"\['lineage'\]"):
            plot(result, coarse_only, levels="bulk_labels")
    twice = pd.concat([query.obs, query.obs.iloc[:1]])
    with pytest.raises(atlasmtl.exceptions.InputError, match="duplicates"):
        pl.confusion(result, twice)
    unknown = np.asarray(result.labels("bulk_labels")).astype(str) == "Unknown"
    assert unknown.any()
    truth = query.obs[["bulk_labels"]].astype(str)
    truth.loc[unknown, "bulk_labels"] = "Unknown"  # the truth reads Unknown exactly where the call is Unknown
    m = atlasmtl.evaluate(result, truth, ["bulk_labels"])["levels"]["bulk_labels"]
    ax = _visible_axes(pl.confusion(result, truth, levels="bulk_labels"))[0]
    assert f"accuracy {m['accuracy']:.1%}" in ax.get_title()
    ax = _visible_axes(pl.f1_scores(result, truth, levels="bulk_labels"))[0]
    assert ax.get_title() == f"bulk_labels: macro-F1 {m['macro_f1']:.3f}"
    names = [t.get_text().rsplit(" (", 1)[0] for t in ax.get_yticklabels()]
    scores = dict(zip(names[::-1] if ax.get_yticks()[0] < ax.get_yticks()[-1] else names,
                      [p.get_width() for p in ax.patches]))
    assert scores["Unknown"] == 0.0  # a class no call can hit


def test_class_names_are_drawn_as_written_not_as_math(pbmc_split):
    """'$' in a class name was read as matplotlib math: 'T$_{reg}$' was drawn as a subscript and 'a $x^$'
    raised matplotlib's ParseSyntaxException."""
    ref, query = pbmc_split
    ref = ref.copy()
    names = {"CD4+/CD25 T Reg": "T$_{reg}$", "CD14+ Monocyte": "a $x^$ cost"}
    ref.obs["bulk_labels"] = ref.obs["bulk_labels"].astype(str).replace(names)
    model = atlasmtl.build_model(ref, LEVELS, num_epochs=2, ensemble_size=1, show_progress=False, show_summary=False)
    result = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
    query = query.copy()
    query.obs["bulk_labels"] = query.obs["bulk_labels"].astype(str).replace(names)
    for fig in (pl.composition(result), pl.confusion(result, query), pl.f1_scores(result, query)):
        fig.canvas.draw()  # the invalid name raised here
        texts = [t for ax in fig.axes for t in ax.texts + ax.get_yticklabels() + ax.get_xticklabels()]
        named = [t for t in texts if "a $x^$ cost" in t.get_text() or "T$_{reg}$" in t.get_text()]
        assert named and not any(t._parse_math for t in named)
