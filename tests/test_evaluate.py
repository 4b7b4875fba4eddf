"""Tests of ``atlasmtl.evaluate``: every metric against hand-computed values, then real data."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.manifold import trustworthiness
from sklearn.metrics import roc_auc_score

import atlasmtl
from atlasmtl.metrics import (
    _pair_mappings,
    aurc,
    brier_score,
    ece_if_calibrated,
    evaluate,
    evaluation_table,
    expected_calibration_error,
    neighbour_overlap,
    network_error,
    rmse,
    trustworthiness_score,
    unknown_withheld_error,
)
from atlasmtl.exceptions import CoordinateError, InputError, LabelError, ParameterError
from atlasmtl.result import PredictionResult

CELLS = [f"c{i}" for i in range(1, 7)]

# Six hand-made cells, two levels (lin: X/Y coarse; fine: A, B -> X, C -> Y).
#
#   cell  true lin  true fine  pred lin  pred fine  raw fine  conf fine
#   c1    X         A          X         A          A         0.95
#   c2    X         A          Y         A          A         0.94
#   c3    X         A          X         B          B         0.65
#   c4    X         B          Unknown   B          B         0.62
#   c5    X         B          X         Unknown    B         0.30   (abstained, raw call right)
#   c6    Y         C          Y         B          B         0.55
TRUE_LIN, TRUE_FINE = ["X", "X", "X", "X", "X", "Y"], ["A", "A", "A", "B", "B", "C"]
PRED_LIN = ["X", "Y", "X", "Unknown", "X", "Y"]
PRED_FINE = ["A", "A", "B", "B", "Unknown", "B"]
RAW_FINE = ["A", "A", "B", "B", "B", "B"]
CONF_FINE = [0.95, 0.94, 0.65, 0.62, 0.30, 0.55]
RAW_CORRECT = np.array([1, 1, 0, 1, 1, 0], dtype=bool)
FINAL_CORRECT = np.array([1, 1, 0, 1, 0, 0], dtype=bool)


def _table(raw: bool = True) -> pd.DataFrame:
    columns = {"pred_lin": PRED_LIN, "pred_fine": PRED_FINE, "conf_fine": CONF_FINE}
    if raw:
        columns["pred_fine_raw"] = RAW_FINE
    return pd.DataFrame(columns, index=CELLS)


def _truth() -> pd.DataFrame:
    return pd.DataFrame({"lin": TRUE_LIN, "fine": TRUE_FINE}, index=CELLS)


# ---------------------------------------------------------------------------- per-level metrics
def test_label_metrics_by_hand():
    ev = evaluate(_table(), _truth())
    fine, lin = ev["levels"]["fine"], ev["levels"]["lin"]
    # fine: correct (Unknown = wrong) 1,1,0,1,0,0 -> 3/6
    assert fine["accuracy"] == pytest.approx(0.5)
    # F1 over true classes A, B, C:
    #   A: TP 2 (c1, c2), FP 0, FN 1 (c3) -> P 1, R 2/3, F1 0.8
    #   B: TP 1 (c4), FP 2 (c3, c6), FN 1 (c5 Unknown) -> P 1/3, R 1/2, F1 0.4
    #   C: TP 0 -> F1 0;  macro = (0.8 + 0.4 + 0) / 3 = 0.4
    assert fine["macro_f1"] == pytest.approx(0.4)
    # recall A 2/3, B 1/2, C 0 -> (2/3 + 1/2) / 3 = 7/18
    assert fine["balanced_accuracy"] == pytest.approx(7 / 18)
    # one Unknown in six -> 5/6; correct among covered c1 c2 c3 c4 c6: 3/5
    assert fine["coverage"] == pytest.approx(5 / 6)
    assert fine["accuracy_covered"] == pytest.approx(0.6)
    assert (fine["n"], fine["n_classes_true"], fine["n_excluded"]) == (6, 3, 0)
    # lin: correct 1,0,1,0,1,1 -> 4/6; recall X 3/5, Y 1/1 -> 0.8;
    #   F1 X: P 3/3, R 3/5 -> 0.75; Y: P 1/2, R 1 -> 2/3; macro 0.708333
    assert lin["accuracy"] == pytest.approx(4 / 6)
    assert lin["balanced_accuracy"] == pytest.approx(0.8)
    assert lin["macro_f1"] == pytest.approx((0.75 + 2 / 3) / 2)
    # no conf_lin column: confidence metrics are undefined
    assert lin["ece"] is None and lin["brier"] is None and lin["aurc"] is None and lin["confidence_target"] is None


def test_confidence_metrics_by_hand_use_raw_call():
    fine = evaluate(_table(), _truth())["levels"]["fine"]
    assert fine["confidence_target"] == "raw"
    # raw correctness 1,1,0,1,1,0. Bins of width 1/15, (lo, hi]:
    #   bin 14 (0.933, 1]: 0.95, 0.94 -> acc 1, mean conf 0.945, gap 0.055
    #   bin 9 (0.6, 0.667]: 0.65 (wrong), 0.62 (right) -> acc 0.5, conf 0.635, gap 0.135
    #   bin 8 (0.533, 0.6]: 0.55 (wrong) -> gap 0.55;  bin 4 (0.267, 0.333]: 0.30 (right) -> gap 0.70
    #   ECE = (2*0.055 + 2*0.135 + 0.55 + 0.70) / 6 = 1.63 / 6
    assert fine["ece"] == pytest.approx(1.63 / 6)
    # Brier = (0.05² + 0.06² + 0.65² + 0.38² + 0.70² + 0.55²) / 6 = 1.3655 / 6
    assert fine["brier"] == pytest.approx(1.3655 / 6)
    # by confidence: 0.95 ok, 0.94 ok, 0.65 err, 0.62 ok, 0.55 err, 0.30 ok
    # risk at n = 1..6: 0, 0, 1/3, 1/4, 2/5, 2/6 -> AURC = 1.316667 / 6
    assert fine["aurc"] == pytest.approx((1 / 3 + 1 / 4 + 2 / 5 + 2 / 6) / 6)
    # ECE if calibrated: per bin E|S - sum(conf)|, S = right calls when each is right with probability conf
    #   bin 14 (0.95, 0.94): P(S=0,1,2) = .003, .104, .893 about 1.89; bin 9 (0.65, 0.62): .133, .464, .403 about 1.27
    #   bin 8 (0.55): 2 * .55 * .45;  bin 4 (0.30): 2 * .3 * .7
    b14 = 0.003 * 1.89 + 0.104 * 0.89 + 0.893 * 0.11
    b9 = 0.133 * 1.27 + 0.464 * 0.27 + 0.403 * 0.73
    assert fine["ece_if_calibrated"] == pytest.approx((b14 + b9 + 2 * 0.55 * 0.45 + 2 * 0.3 * 0.7) / 6)


def test_withheld_calls_are_scored_against_the_networks_error_rate():
    """unknown_withheld_error: of the Unknown cells, how many withheld a wrong call; network_error the base rate."""
    ev = evaluate(_table(), _truth())["levels"]
    # fine: one Unknown (c5), whose raw call B was right -> 0 of 1 withheld an error; raw wrong on c3, c6 -> 2/6
    assert ev["fine"]["unknown_withheld_error"] == 0.0
    assert ev["fine"]["network_error"] == pytest.approx(2 / 6)
    # lin has no raw column (c4's Unknown withheld nothing the table records): both undefined
    assert ev["lin"]["unknown_withheld_error"] is None and ev["lin"]["network_error"] is None
    assert evaluate(_table(raw=False), _truth())["levels"]["fine"]["unknown_withheld_error"] is None
    # the functions: a raw Unknown (no signal, no call) is left out of both
    y_true, pred = ["A", "A", "B", "B"], ["Unknown", "Unknown", "Unknown", "B"]
    raw = ["B", "A", "Unknown", "B"]
    assert unknown_withheld_error(y_true, pred, raw) == pytest.approx(1 / 2)   # c1 wrong, c2 right
    assert network_error(y_true, raw) == pytest.approx(1 / 3)
    assert unknown_withheld_error(["A"], ["A"], ["A"]) is None                  # nothing withheld
    assert network_error(["A"], ["Unknown"]) is None                            # no call at all


def test_confidence_metrics_fall_back_to_final_label():
    fine = evaluate(_table(raw=False), _truth())["levels"]["fine"]
    assert fine["confidence_target"] == "final"
    # final correctness 1,1,0,1,0,0: only c5 changes (0.30 now wrong: (0.30 - 0)² = 0.09)
    assert fine["brier"] == pytest.approx((0.0025 + 0.0036 + 0.4225 + 0.1444 + 0.09 + 0.3025) / 6)
    assert fine["brier"] == pytest.approx(brier_score(CONF_FINE, FINAL_CORRECT))


def test_metric_functions_edge_cases():
    # perfectly calibrated bins: 0.75 four times with 3 right -> ECE 0; Brier (3*0.0625 + 0.5625)/4
    conf, correct = [0.75] * 4, [True, True, True, False]
    assert expected_calibration_error(conf, correct) == pytest.approx(0.0)
    assert brier_score(conf, correct) == pytest.approx(0.1875)
    # confidence 0 falls into the first bin; a wrong call at confidence 0 is calibrated
    assert expected_calibration_error([0.0], [False]) == pytest.approx(0.0)
    # AURC of a perfect ranking (right ones first): risks 0, 0, 1/3 -> 1/9
    assert aurc([0.9, 0.8, 0.1], [True, True, False]) == pytest.approx(1 / 9)
    # the reverse ranking: risks 1, 1/2, 1/3 -> 11/18
    assert aurc([0.1, 0.8, 0.9], [True, True, False]) == pytest.approx(11 / 18)


def test_ece_if_calibrated_is_the_mean_ece_of_a_calibrated_confidence(monkeypatch):
    import atlasmtl.calibration as calibration

    rng = np.random.default_rng(0)
    conf = np.clip(rng.beta(4, 1.5, size=300), 0.0, 1.0)
    # Monte Carlo: cells right with probability = confidence; the mean ECE of 4,000 draws (SE ~0.0003)
    draws = [expected_calibration_error(conf, rng.random(conf.size) < conf) for _ in range(4000)]
    exact = ece_if_calibrated(conf)
    assert exact == pytest.approx(np.mean(draws), abs=0.0015)
    # more cells, less bias; the normal approximation for large bins agrees with the exact sum
    big = np.clip(rng.beta(4, 1.5, size=6000), 0.0, 1.0)
    assert ece_if_calibrated(big) < exact / 3
    monkeypatch.setattr(calibration, "EXACT_BIN_CELLS", 100)
    approx = ece_if_calibrated(big)
    monkeypatch.setattr(calibration, "EXACT_BIN_CELLS", 10**9)
    assert approx == pytest.approx(ece_if_calibrated(big), rel=0.02)
    # by hand: one cell at 0.5 -> |1 - .5| or |0 - .5| = 0.5; certain calls (0 or 1) have no noise
    assert ece_if_calibrated([0.5]) == pytest.approx(0.5)
    assert ece_if_calibrated([1.0, 1.0, 0.0]) == pytest.approx(0.0)
    assert np.isnan(ece_if_calibrated([]))


def test_missing_truth_is_excluded_and_counted():
    truth = _truth()
    truth.loc["c6", "fine"] = np.nan  # drop the C cell from the fine level
    fine = evaluate(_table(), truth)["levels"]["fine"]
    assert (fine["n"], fine["n_excluded"], fine["n_classes_true"]) == (5, 1, 2)
    # correct 1,1,0,1,0 over 5; recall A 2/3, B 1/2
    assert fine["accuracy"] == pytest.approx(3 / 5)
    assert fine["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)


# ---------------------------------------------------------------------------- hierarchy
def test_path_consistency_and_full_path_by_hand():
    h = evaluate(_table(), _truth())["hierarchy"]
    # inferred from the truth: A -> X, B -> X, C -> Y
    assert h["source"] == "truth"
    # c1 A under X ok; c2 A under Y no; c3 B under X ok; c4 B under Unknown no;
    # c5 fine Unknown -> ok; c6 B under Y no  -> 3/6
    assert h["path_consistency"] == pytest.approx(0.5)
    assert h["pairs"]["lin -> fine"] == {"consistency": 0.5, "n": 6, "n_unmapped": 0}
    # lin correct 1,0,1,0,1,1 and fine correct 1,1,0,1,0,0 -> only c1 right at both: 1/6
    assert h["full_path_accuracy"] == pytest.approx(1 / 6)
    assert h["n_full_path"] == 6


def test_hierarchy_argument_with_unmapped_labels():
    h = evaluate(_table(), _truth(), hierarchy={"fine": {"A": "X"}})["hierarchy"]
    assert h["source"] == "argument"
    # B is unknown to the mapping: c3, c4, c6 cannot be checked; c1 ok, c2 no, c5 (Unknown) ok -> 2/3
    assert h["path_consistency"] == pytest.approx(2 / 3)
    assert (h["n_checked"], h["pairs"]["lin -> fine"]["n_unmapped"]) == (3, 3)


def test_hierarchy_not_nested_gives_none():
    truth = _truth()
    truth.loc["c6", "lin"] = "X"
    truth.loc["c1", "lin"] = "Y"  # A now has two parents -> no mapping can be inferred
    h = evaluate(_table(), truth)["hierarchy"]
    assert h["path_consistency"] is None and h["pairs"]["lin -> fine"]["consistency"] is None


def test_result_hierarchy_is_composed_across_skipped_levels():
    source_levels = ["l1", "l2", "l3"]
    hierarchy = {"l2": {"a": "X", "b": "Y"}, "l3": {"a1": "a", "a2": "a", "b1": "b"}}
    mappings = _pair_mappings(["l1", "l3"], source_levels, hierarchy)
    assert mappings == [None, {"a1": "X", "a2": "X", "b1": "Y"}]
    # a reversed pair has no mapping
    assert _pair_mappings(["l3", "l1"], source_levels, hierarchy) == [None, None]


# ---------------------------------------------------------------------------- novel types
@pytest.mark.parametrize("mask", [[np.nan] * 6, ["False"] * 6, [0, 2, 0, 0, 0, 1], [True, None, False, False, False, True]])
def test_a_novel_mask_that_is_not_booleans_is_refused(mask):
    """NaN, text and other numbers all read as True under astype(bool): every cell was counted novel."""
    with pytest.raises(InputError, match="novel_mask must hold booleans"):
        evaluate(_table(), _truth(), novel_mask=mask)
    with pytest.raises(InputError, match="novel_mask must hold booleans"):
        evaluate(_table(), _truth(), novel_mask=pd.Series(mask, index=CELLS))


def test_novel_mask_by_hand():
    novel = evaluate(_table(), _truth(), novel_mask=[0, 0, 1, 0, 0, 1])["novel"]
    assert (novel["source"], novel["n_novel"], novel["n_known"]) == ("mask", 2, 4)
    fine = novel["levels"]["fine"]
    # scores 1 - conf: novel c3 0.35, c6 0.45; known c1 0.05, c2 0.06, c4 0.38, c5 0.70
    # pairs where novel > known: 0.35 beats 2, 0.45 beats 3 -> 5 / 8
    assert fine["auroc"] == pytest.approx(5 / 8)
    # no novel cell is Unknown; c5 is the one Unknown among four known cells
    assert fine["novel_unknown_rate"] == 0.0 and fine["known_unknown_rate"] == pytest.approx(0.25)
    # lin has no confidence: AUROC undefined; c4 is Unknown at lin -> 1/4 known
    assert novel["levels"]["lin"]["auroc"] is None
    assert novel["levels"]["lin"]["known_unknown_rate"] == pytest.approx(0.25)


def test_novel_labels_by_hand():
    novel = evaluate(_table(), _truth(), novel_labels={"fine": ["C"]})["novel"]
    # c6 is novel: score 0.45 beats 0.05, 0.06, 0.35, 0.38 but not 0.70 -> 4/5
    assert (novel["n_novel"], novel["n_known"]) == (1, 5)
    assert novel["levels"]["fine"]["auroc"] == pytest.approx(0.8)
    # known Unknown at fine: c5 of c1..c5 -> 1/5
    assert novel["levels"]["fine"]["known_unknown_rate"] == pytest.approx(0.2)
    with pytest.warns(UserWarning, match="Z"):
        evaluate(_table(), _truth(), novel_labels={"fine": ["C", "Z"]})


# ---------------------------------------------------------------------------- coordinates
# Reference on a line: R0 (0,0) R1 (1,0) R2 (2,0) R3 (3,0) R4 (10,0); k = 2.
REF = np.array([[0, 0], [1, 0], [2, 0], [3, 0], [10, 0]], dtype=float)
TRUE_XY = np.array([[0.1, 0], [2.1, 0], [9, 0], [3.1, 0], [0.9, 0], [10, 1]])
PRED_XY = np.array([[0.9, 0], [1.4, 0], [0.4, 0], [3.2, 0], [0.9, 0], [7, 0]])


def test_neighbour_overlap_and_rmse_by_hand():
    # 2-NN in true vs predicted position:
    #   c1 {R0,R1} vs {R1,R0} -> 1;  c2 {R2,R3} vs {R1,R2} -> 1/2;  c3 {R4,R3} vs {R0,R1} -> 0
    #   c4 {R3,R2} vs {R3,R2} -> 1;  c5 same point -> 1;  c6 {R4,R3} vs {R4 (3), R3 (4)} -> 1
    #   mean = 4.5 / 6 = 0.75
    assert neighbour_overlap(PRED_XY, TRUE_XY, REF, k=2) == (pytest.approx(0.75), 2)
    # squared errors: 0.64, 0.49, 73.96, 0.01, 0, 9 + 1 -> 85.1 over 12 values
    assert rmse(PRED_XY, TRUE_XY) == pytest.approx(np.sqrt(85.1 / 12))
    # k is capped at the reference size
    assert neighbour_overlap(PRED_XY, TRUE_XY, REF, k=50)[1] == 5


def test_trustworthiness_by_hand():
    # 1-D points 0, 1, 3, 7, 12, 20; the embedding swaps p0 and p5. n = 6 -> k = min(15, 6//2 - 1) = 2.
    # Intruders among each point's embedded 2-NN, with their rank in the original space:
    #   p0 {p4: 4, p3: 3} -> 3;  p1 {p5: 5} -> 3;  p2 {p5: 5} -> 3;  p3 none -> 0;
    #   p4 {p0: 5} -> 3;  p5 {p1: 4, p2: 3} -> 3.   Sum of (rank - k) = 15.
    #   T = 1 - 2 / (n k (2n - 3k - 1)) * 15 = 1 - 2 / 60 * 15 = 0.5
    true = np.array([[0], [1], [3], [7], [12], [20]], dtype=float)
    emb = true[[5, 1, 2, 3, 4, 0]]
    assert trustworthiness_score(true, emb) == (pytest.approx(0.5), 6, 2)
    assert trustworthiness_score(true, true)[0] == pytest.approx(1.0)
    assert trustworthiness_score(true[:3], emb[:3])[0] is None  # too few cells
    # subsampling keeps at most max_cells cells
    assert trustworthiness_score(true, emb, max_cells=4)[1:] == (4, 1)


def test_coords_section_through_evaluate():
    adata = ad.AnnData(obs=_truth(), obsm={"X_umap": TRUE_XY})
    ev = evaluate(
        _table(), adata, coord_truth={"umap": "X_umap"}, coord_pred={"umap": PRED_XY},
        reference_coords={"umap": REF}, n_neighbors=2,
    )
    umap = ev["coords"]["umap"]
    assert umap["rmse"] == pytest.approx(np.sqrt(85.1 / 12))
    assert (umap["neighbour_overlap"], umap["neighbour_k"]) == (pytest.approx(0.75), 2)
    assert umap["trustworthiness"] == pytest.approx(trustworthiness(TRUE_XY, PRED_XY, n_neighbors=2))
    assert (umap["n"], umap["dims"], umap["trustworthiness_neighbors"]) == (6, 2, 2)
    # predicted coordinates written back into obsm can be named by key
    adata.obsm["X_pred_umap"] = PRED_XY
    by_key = evaluate(_table(), adata, coord_truth={"umap": "X_umap"}, coord_pred={"umap": "X_pred_umap"})
    assert by_key["coords"]["umap"]["rmse"] == pytest.approx(umap["rmse"])
    # the truth given as a DataFrame indexed by cell, in another order, gives the same numbers
    frame = pd.DataFrame(TRUE_XY, index=CELLS).iloc[::-1]
    same = evaluate(_table(), _truth(), coord_truth={"umap": frame}, coord_pred={"umap": PRED_XY})
    assert same["coords"]["umap"]["rmse"] == pytest.approx(umap["rmse"])


# ---------------------------------------------------------------------------- inputs and errors
def _hand_result() -> PredictionResult:
    classes = {"lin": ["X", "Y"], "fine": ["A", "B", "C"]}

    def codes(labels, names):
        return np.array([names.index(x) if x in names else -1 for x in labels], dtype=np.int32)

    def level(pred, raw, conf, names):
        n = len(pred)
        code = codes(pred, names)
        return {"code": code, "raw_code": codes(raw, names), "conf": np.asarray(conf, dtype=np.float32),
                "margin": np.asarray(conf, dtype=np.float32), "knn_code": np.full(n, -1, dtype=np.int32),
                "knn_vote_frac": np.full(n, np.nan, dtype=np.float32), "is_unknown": code < 0,
                "is_low_conf": np.zeros(n, dtype=bool), "used_knn": np.zeros(n, dtype=bool)}

    lin_raw = ["X", "Y", "X", "X", "X", "Y"]
    levels = {"lin": level(PRED_LIN, lin_raw, [0.9, 0.8, 0.9, 0.2, 0.9, 0.8], classes["lin"]),
              "fine": level(PRED_FINE, RAW_FINE, CONF_FINE, classes["fine"])}
    return PredictionResult(np.array(CELLS), classes, levels, {"umap": PRED_XY.astype(np.float32)}, {},
                            hierarchy={"fine": {"A": "X", "B": "X", "C": "Y"}})


def test_prediction_result_matches_its_table_and_aligns_by_name(tmp_path):
    result = _hand_result()
    truth = _truth().iloc[[5, 3, 1, 0, 2, 4]]  # another order
    truth = pd.concat([truth, pd.DataFrame({"lin": ["X"], "fine": ["A"]}, index=["extra"])])  # and an extra cell
    ev = evaluate(result, truth)
    assert ev["hierarchy"]["source"] == "result"
    assert ev["levels"]["fine"]["ece"] == pytest.approx(1.63 / 6)
    assert ev["levels"]["fine"]["accuracy"] == pytest.approx(0.5)
    assert ev["hierarchy"]["path_consistency"] == pytest.approx(0.5)
    from_table = evaluate(result.to_dataframe("full"), truth)
    assert from_table["levels"] == ev["levels"]
    # so does the table written to CSV and read back
    result.to_csv(tmp_path / "pred.csv", mode="full")
    from_csv = evaluate(pd.read_csv(tmp_path / "pred.csv", index_col=0), truth)
    assert from_csv["levels"]["fine"] == pytest.approx(ev["levels"]["fine"])
    # a dict of Series works too
    as_dict = evaluate(result, {"lin": truth["lin"], "fine": truth["fine"]})
    assert as_dict["levels"] == ev["levels"]
    # coordinates come from the result
    coords = evaluate(result, truth, coord_truth={"umap": pd.DataFrame(TRUE_XY, index=CELLS)})["coords"]
    assert coords["umap"]["rmse"] == pytest.approx(np.sqrt(85.1 / 12), rel=1e-6)


def test_a_file_is_read_and_an_annotated_anndata_is_refused_with_how_to_read_it(tmp_path):
    """A prediction file (CSV or .h5ad, as predict and to_csv / write_h5ad write them) is read, as the command line's
    evaluate reads it (it was refused: "read the file first"); the AnnData that to_adata annotated is refused with
    the fix."""
    result = _hand_result()
    own = evaluate(result, _truth())["levels"]
    result.to_csv(tmp_path / "pred.csv", mode="full")
    for path in (tmp_path / "pred.csv", str(tmp_path / "pred.csv")):
        levels = evaluate(path, _truth())["levels"]
        for lv in own:
            assert levels[lv] == pytest.approx(own[lv])
    table = pd.read_csv(tmp_path / "pred.csv", index_col="cell", dtype=str)
    assert evaluate(table, _truth())["levels"]["fine"] == pytest.approx(own["fine"])
    with pytest.raises(InputError, match="No such"):
        evaluate(tmp_path / "missing.csv", _truth())
    annotated = result.to_adata(ad.AnnData(obs=_truth()), mode="full")
    with pytest.raises(ParameterError, match=r"not AnnData; .*pass its obs \(evaluate\(annotated.obs, truth\)"):
        evaluate(annotated, _truth())
    assert evaluate(annotated.obs, _truth())["levels"]["fine"] == pytest.approx(evaluate(result, _truth())["levels"]["fine"])
    annotated.write_h5ad(tmp_path / "annotated.h5ad")
    levels = evaluate(tmp_path / "annotated.h5ad", _truth())["levels"]
    for lv in own:
        assert levels[lv] == pytest.approx(own[lv])


def test_output_is_json_and_tables():
    ev = evaluate(_hand_result(), _truth(), novel_labels={"fine": ["C"]},
                  coord_truth={"umap": TRUE_XY}, reference_coords={"umap": REF})
    assert json.loads(json.dumps(ev)) == ev
    levels = evaluation_table(ev)
    assert list(levels.index) == ["lin", "fine"]
    assert levels.loc["fine", "macro_f1"] == pytest.approx(0.4)
    assert levels["accuracy"].dtype == np.float64
    assert evaluation_table(ev, "novel").loc["fine", "auroc"] == pytest.approx(0.8)
    assert evaluation_table(ev, "coords").loc["umap", "neighbour_k"] == 5
    with pytest.raises(ParameterError):
        evaluation_table(ev, "nope")


def test_errors_name_the_problem():
    with pytest.raises(InputError, match="not in the truth"):
        evaluate(_table(), _truth().iloc[:5])
    with pytest.raises(LabelError, match=r"'fine' is not a column of the truth; available: \['lin'\]\. Pass labels "
                                         r"kept under another name by level, e.g. truth=\{'fine': adata.obs\['cell_type'\]"):
        evaluate(_table(), _truth()[["lin"]])
    renamed = _truth().rename(columns={"fine": "cell_type"})  # the fixes the message gives both work
    by_level = evaluate(_table(), {"lin": renamed["lin"], "fine": renamed["cell_type"]})["levels"]
    assert by_level["fine"]["accuracy"] == evaluate(_table(), _truth())["levels"]["fine"]["accuracy"]
    assert list(evaluate(_table(), renamed, label_columns=["lin"])["levels"]) == ["lin"]
    with pytest.raises(LabelError, match="no predictions"):
        evaluate(_table(), _truth(), label_columns=["lin", "other"])
    with pytest.raises(InputError, match="Series indexed by cell name"):
        evaluate(_table(), {"lin": np.array(TRUE_LIN), "fine": np.array(TRUE_FINE)})
    with pytest.raises(CoordinateError, match="not an AnnData"):
        evaluate(_table(), _truth(), coord_truth={"umap": "X_umap"}, coord_pred={"umap": PRED_XY})
    with pytest.raises(CoordinateError, match="No predicted coordinates"):
        evaluate(_table(), _truth(), coord_truth={"umap": TRUE_XY})
    with pytest.raises(ParameterError, match="not both"):
        evaluate(_table(), _truth(), novel_labels={"fine": ["C"]}, novel_mask=[0] * 6)
    bad = _table()
    bad.loc["c1", "conf_fine"] = 1.5
    with pytest.raises(InputError, match="conf_fine"):
        evaluate(bad, _truth())
    with pytest.raises(ParameterError):
        evaluate(["not", "a", "table"], _truth())


def test_a_confidence_column_of_text_is_named_as_text(tmp_path):
    """A predictions CSV whose conf_<level> column holds words ("high") was reported as holding "NaN or
    out-of-range" confidences; it is text, and the error says so and how to mend it."""
    _hand_result().to_csv(tmp_path / "pred.csv", mode="full")
    table = pd.read_csv(tmp_path / "pred.csv", index_col=0)
    expected = evaluate(table, _truth())["levels"]["fine"]
    table["conf_fine"] = ["high", "high", "low", "0.62", "low", "0.55"]
    table.to_csv(tmp_path / "edited.csv")
    with pytest.raises(InputError, match=r"Column 'conf_fine' holds text, not numbers \(e.g. \['high', 'low'\]\); "
                                         r".*a number in \[0, 1\].*drop it to evaluate without"):
        evaluate(pd.read_csv(tmp_path / "edited.csv", index_col=0), _truth())
    # read as text, numbers still count as numbers and an empty value as a missing confidence (not as text)
    as_text = pd.read_csv(tmp_path / "pred.csv", index_col=0, dtype=str, keep_default_na=False)
    assert evaluate(as_text, _truth())["levels"]["fine"] == pytest.approx(expected)
    as_text.loc["c1", "conf_fine"] = ""
    with pytest.raises(InputError, match="found 1 empty, NaN or infinite and 0 out-of-range values"):
        evaluate(as_text, _truth())


def test_a_novelty_column_of_text_is_named_as_text(tmp_path):
    """A novelty_<level> column of words was coerced to NaN, and the novelty AUROC silently fell back to
    1 - confidence; it is text, and the error names the column. Empty values stay missing scores."""
    table = _table()
    table["novelty_fine"] = [0.1, 0.2, 2.5, 0.3, 0.4, 3.0]
    novel = {"novel_labels": {"fine": ["C"]}}
    expected = evaluate(table, _truth(), **novel)["novel"]["levels"]["fine"]
    assert expected["auroc_score"] == "novelty"
    table.to_csv(tmp_path / "pred.csv")
    as_text = pd.read_csv(tmp_path / "pred.csv", index_col=0, dtype=str, keep_default_na=False)
    as_text.loc["c2", "novelty_fine"] = ""  # an empty score is a missing one, not text
    assert evaluate(as_text, _truth(), **novel)["novel"]["levels"]["fine"]["auroc_score"] == "novelty"
    as_text.loc["c1", "novelty_fine"] = "far"
    with pytest.raises(InputError, match=r"Column 'novelty_fine' holds text, not numbers \(e.g. \['far'\]\)"):
        evaluate(as_text, _truth(), **novel)


# ---------------------------------------------------------------------------- real data
def test_pbmc68k_integration():
    from atlasmtl.datasets import pbmc68k_reference_query

    ref, query = pbmc68k_reference_query()
    ref = ref[ref.obs["bulk_labels"] != "Dendritic"].copy()  # a type the model never sees: novel in the query
    levels = ["lineage", "bulk_labels"]
    model = atlasmtl.build_model(ref, label_columns=levels, coord_targets={"umap": "X_umap"},
                                 num_epochs=15, show_progress=False, show_summary=False, num_threads=1)
    result = atlasmtl.predict(model, query, show_progress=False, show_summary=False, num_threads=1)
    ev = atlasmtl.evaluate(result, query, coord_truth={"umap": "X_umap"},
                           reference_coords={"umap": ref.obsm["X_umap"]},
                           novel_labels={"bulk_labels": ["Dendritic"]})
    assert json.loads(json.dumps(ev)) == ev
    for lv in levels:
        m = ev["levels"][lv]
        direct = np.mean(result.labels(lv).astype(str) == query.obs[lv].astype(str).to_numpy())
        assert m["accuracy"] == pytest.approx(direct)
        assert m["n"] == query.n_obs and m["confidence_target"] == "raw"
        for key in ("accuracy", "macro_f1", "balanced_accuracy", "coverage", "accuracy_covered", "ece", "brier", "aurc"):
            assert 0.0 <= m[key] <= 1.0, (lv, key, m[key])
        assert m["accuracy"] <= m["accuracy_covered"]
        # informative confidence puts errors last: AURC below the raw error rate (what a random ranking scores)
        raw_err = 1 - np.mean(result.to_dataframe("full")[f"pred_{lv}_raw"].astype(str) == query.obs[lv].astype(str))
        assert m["aurc"] <= raw_err + 1e-9
        assert m["network_error"] == pytest.approx(raw_err)  # every cell has signal here: every raw label is a call
    # the abstentions withhold errors far more often than a call picked at random is one (the novel cells' calls
    # are all wrong)
    fine = ev["levels"]["bulk_labels"]
    assert fine["unknown_withheld_error"] > fine["network_error"] + 0.2, fine
    assert ev["levels"]["lineage"]["accuracy"] > 0.7
    assert ev["levels"]["bulk_labels"]["accuracy"] > 0.4
    h = ev["hierarchy"]
    assert h["source"] == "result" and 0.5 <= h["path_consistency"] <= 1.0
    assert h["full_path_accuracy"] <= min(ev["levels"][lv]["accuracy"] for lv in levels)
    novel = ev["novel"]
    assert novel["n_novel"] == int((query.obs["bulk_labels"] == "Dendritic").sum()) > 0
    is_novel = (query.obs["bulk_labels"] == "Dendritic").to_numpy()
    score = result.levels["bulk_labels"]["novelty"]  # atlasmtl's own novelty score, not 1 - confidence
    assert novel["levels"]["bulk_labels"]["auroc_score"] == "novelty"
    assert novel["levels"]["bulk_labels"]["auroc"] == pytest.approx(
        roc_auc_score(is_novel, np.where(np.isnan(score), np.inf, score.astype(np.float64)).clip(-1e300, 1e300)))
    unknown = result.levels["bulk_labels"]["is_unknown"]
    assert novel["levels"]["bulk_labels"]["novel_unknown_rate"] == pytest.approx(unknown[is_novel].mean())
    assert novel["levels"]["bulk_labels"]["known_unknown_rate"] == pytest.approx(unknown[~is_novel].mean())
    umap = ev["coords"]["umap"]
    spread = float(np.sqrt(np.mean((query.obsm["X_umap"] - query.obsm["X_umap"].mean(0)) ** 2)))
    assert 0.0 < umap["rmse"] < spread  # better than predicting the centroid
    assert 0.7 < umap["trustworthiness"] <= 1.0
    assert 0.0 < umap["neighbour_overlap"] <= 1.0 and umap["neighbour_k"] == 15
    print(evaluation_table(ev).round(3).to_string())
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in umap.items()}, h["path_consistency"],
          h["full_path_accuracy"], novel["n_novel"], novel["levels"]["bulk_labels"])


def test_metric_functions_called_directly_check_their_inputs():
    """The public metric functions, called without evaluate: labels of two lengths, a missing true label, no
    levels, and no cells give a ParameterError or NaN (they broadcast a length-1 array, scored None == None
    as right, raised IndexError / ZeroDivisionError, or scikit-learn's ValueError)."""
    from atlasmtl import metrics

    for f in (metrics.accuracy, metrics.macro_f1, metrics.balanced_accuracy, metrics.accuracy_covered):
        with pytest.raises(ParameterError, match="same length"):
            f(np.array(["B", "T", "T"]), np.array(["B"]))
        with pytest.raises(ParameterError, match="1 missing label"):
            f(np.array(["B", None], dtype=object), np.array(["B", "T"]))
        with pytest.raises(ParameterError, match="1 missing label"):
            f(np.array(["B", np.nan], dtype=object), np.array(["B", "T"]))
    empty = np.array([], dtype=object)
    for f in (metrics.accuracy, metrics.macro_f1, metrics.balanced_accuracy):
        assert np.isnan(f(empty, empty))
    assert np.isnan(metrics.coverage(empty)) and metrics.accuracy_covered(empty, empty) is None
    assert metrics.macro_f1(np.array(["B", "T", "T"]), np.array(["B", "T", "Unknown"])) == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(ParameterError, match="at least one"):
        metrics.full_path_accuracy([], [])
    with pytest.raises(ParameterError, match="same cells"):
        metrics.full_path_accuracy([np.array(["B", "T"]), np.array(["B", "T"])], [np.array(["B", "T"]), np.array(["B"])])
    assert metrics.full_path_accuracy([np.array(["B", "T"])], [np.array(["B", "B"])]) == 0.5
    # a NaN confidence ranks as most novel, as a NaN score does (scikit-learn refused it)
    assert metrics.novel_auroc(np.array([0.9, np.nan, 0.8, 0.2]), np.array([False, True, False, True])) == 1.0
    with pytest.raises(ParameterError, match="one value per cell"):
        metrics.novel_auroc(np.array([0.9, 0.1]), np.array([False, True, True]))
    overlap, k = metrics.neighbour_overlap(np.zeros((0, 2)), np.zeros((0, 2)), np.random.default_rng(0).normal(size=(30, 2)))
    assert np.isnan(overlap) and k == 15
