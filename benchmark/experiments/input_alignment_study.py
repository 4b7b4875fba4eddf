"""Issue 10 (accuracy under shifts): align the query with the reference in the network's input, class by
class, before a second prediction (research script).

A platform, protocol or species shift moves a gene's log expression in every cell type of the query by
about the same amount; a novel or missing type, or a different composition, moves it in some classes only.
The ``zscore`` input of each gene ``j`` is ``(log1p(x_j) − mean_j) / std_j`` with the reference's
statistics. Standardising with the query's own statistics (tried 2026-12-01, "Query statistics") also
absorbs the query's composition and made novel cells look known. Here the shift is estimated within
classes instead:

- a first, default prediction calls the query;
- per finest class ``c`` with at least ``MIN_CELLS`` query cells called ``c`` (Unknown excluded) and as many
  reference training cells: ``d_cj`` = mean z of gene ``j`` over the query's cells called ``c`` − the same
  over the reference's cells of ``c``;
- ``offset_j`` = a shrink factor × median over those classes of ``d_cj`` (none when fewer than ``MIN_CLASSES``),
  0 for a gene that no query cell detects (unmeasured there: its zeros are not a shift);
- the second prediction uses ``mean_j + offset_j · std_j`` as the gene's mean, so every query cell's z of
  gene ``j`` falls by ``offset_j``; the rest of the pipeline (calibration, gate, KNN vote in the re-embedded
  query, novelty) is as shipped.

Variants: ``default`` (first pass), ``align`` (second pass, shrink 1), ``align_half`` (shrink 0.5),
``align_coarse`` (the coarsest level's classes), ``align_agree`` (only genes whose ``d_cj`` has the median's sign in at least
80% of at least three classes), ``oracle`` / ``oracle_agree`` (the same with the query's true labels in place
of its calls: what a perfect first pass would give). Post hoc on the default models.

    [VARIANTS=align,oracle] PYTHONPATH=$PWD python benchmark/experiments/input_alignment_study.py <case,case,...> 0,1,2 out.json [--work DIR] [--models DIR]
    python benchmark/experiments/threshold_table.py out.json
"""
import os
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import posthoc_main, print_progress, score_result  # noqa: E402
import atlasmtl  # noqa: E402
from atlasmtl.inputs import get_matrix_source  # noqa: E402
from atlasmtl.prediction import prepare_query  # noqa: E402

MIN_CELLS = 10
MIN_CLASSES = 2
#: name → (level index for the classes, shrink, oracle, sign agreement); ``VARIANTS=a,b`` in the environment
#: runs a subset (the committed rows: ``align,align_half,align_coarse`` at seeds 0–2, and
#: ``align,align_agree,oracle,oracle_agree`` at seed 0)
VARIANTS = {"align": (-1, 1.0, False, 0.0), "align_half": (-1, 0.5, False, 0.0), "align_coarse": (0, 1.0, False, 0.0),
            "align_agree": (-1, 1.0, False, 0.8), "oracle": (-1, 1.0, True, 0.0), "oracle_agree": (-1, 1.0, True, 0.8)}
if os.environ.get("VARIANTS"):
    VARIANTS = {k: VARIANTS[k] for k in os.environ["VARIANTS"].split(",")}


def class_means(model, adata, codes: np.ndarray, n_classes: int, chunk: int = 2048):
    """Per class (rows) the mean z-score input of each model gene over the cells of ``adata`` with that
    code (codes < 0 ignored), and the per-class cell counts; also which model genes any cell detects."""
    aligner, _, _ = prepare_query(model, get_matrix_source(adata), None, 0.0)
    sums = np.zeros((n_classes, aligner.n_model_genes))
    detected = np.zeros(aligner.n_model_genes, dtype=bool)
    for start in range(0, adata.n_obs, chunk):
        block = adata.X[start:start + chunk]
        z = aligner.transform(block).astype(np.float64)
        rows = block if sp.issparse(block) else sp.csr_matrix(block)
        detected |= aligner._sparse_values(rows).getnnz(axis=0) > 0
        c = codes[start:start + chunk]
        ok = c >= 0
        np.add.at(sums, c[ok], z[ok])
    counts = np.bincount(codes[codes >= 0], minlength=n_classes)
    return sums / np.maximum(counts, 1)[:, None], counts, detected


def offsets(model, ref, query, first, level: str, shrink: float, truth=None, agree: float = 0.0) -> np.ndarray | None:
    classes = list(model.classes[level])
    index = {c: i for i, c in enumerate(classes)}
    ref_codes = np.array([index.get(v, -1) if isinstance(v, str) else -1 for v in ref.obs[level].astype(object)])
    ref_mean, ref_n, _ = class_means(model, ref, ref_codes, len(classes))
    q_codes = np.asarray(first.levels[level].pred, dtype=np.int64)
    if truth is not None:  # oracle: the query's true labels (types the reference lacks left out)
        q_codes = np.array([index.get(v, -1) for v in truth[level].astype(str)])
    q_mean, q_n, q_detected = class_means(model, query, q_codes, len(classes))
    usable = (q_n >= MIN_CELLS) & (ref_n >= MIN_CELLS)
    if usable.sum() < MIN_CLASSES:
        return None
    diff = q_mean[usable] - ref_mean[usable]
    off = shrink * np.median(diff, axis=0)
    if agree:  # only genes shifted the same way in at least this share of the classes
        same = (np.sign(diff) == np.sign(off)[None, :]).mean(axis=0)
        off[(same < agree) | (usable.sum() < 3)] = 0.0
    off[~q_detected] = 0.0
    return off


def study(models):
    for case, seed, spec, ref, query, truth, model in models:
        row = {"case": case, "seed": seed, "K": "auto"}
        first = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
        row["default"] = score_result(first, truth, spec)
        stats = model.metadata["gene_stats"]
        mean0, std = np.asarray(stats["mean"], dtype=np.float64), np.asarray(stats["std"], dtype=np.float64)
        cache = {}
        for name, (lv, shrink, oracle, agree) in VARIANTS.items():
            level = spec["levels"][lv]
            key = (level, oracle, agree)
            if key not in cache:  # the unshrunk offsets, scaled below
                cache[key] = offsets(model, ref, query, first, level, 1.0, truth if oracle else None, agree)
            off = cache[key]
            if off is None:
                row[name] = row["default"]
                continue
            stats["mean"] = (mean0 + shrink * off * std).tolist()
            try:
                row[name] = score_result(atlasmtl.predict(model, query, show_progress=False, show_summary=False),
                                         truth, spec)
            finally:
                stats["mean"] = mean0.tolist()
            row[name]["offset_abs_median"] = float(np.median(np.abs(shrink * off)))
        print_progress(case, seed, row, spec["levels"][-1])
        yield row


if __name__ == "__main__":
    posthoc_main(study, lambda *a: "use threshold_table.py", "/work/bench_models")
