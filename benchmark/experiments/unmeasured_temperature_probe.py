"""Issues 9/10: unmeasured genes read at the reference's mean, with a temperature for that reading.

Research probe (2026-12-06, forty-second session; not built: API contract, "Measured 2026-12-06, forty-second
session"). Reading a query's unmeasured genes (zero-padded: expected in >= 20 of its cells at their depth,
detected in none; ``unmeasured_genes_probe.unexpected_zero_genes``) at the reference's mean instead of as zero
counts lifted some genes-missing queries but broke their calibration (forty-first session). The temperatures
were fitted on copies of held-out cells whose missing genes read as zeros; this probe refits the ratio for the
query's own unmeasured genes. With the default model (``MODELS/<case>_<seed>.pth``): its held-out reference
cells (``model.reference["training_cell"]`` false) are shifted five times (``augment.simulate_shift`` with the
training augmentation's defaults, from ``default_rng(1000 + seed)``), and a temperature per level is fitted on
the network's logits of those copies as they are (``T0``) and with the query's unmeasured genes removed, so
that they read at the mean (``TG``). The query is then scored three ways: ``default``; ``mean`` (its unmeasured
genes read at the mean, the stored temperatures); ``mean_T`` (the same with each stored temperature times
``TG / T0``). Needs ``patches/impute_missing_genes.diff`` applied (``genes.IMPUTE_MISSING_GENES``):

    git apply benchmark/experiments/patches/impute_missing_genes.diff
    PYTHONPATH=$PWD python benchmark/experiments/unmeasured_temperature_probe.py <case,case,...> 0,1,2 out.json [MODELS]
    (cases under /work/bench_work/cases; rows in threshold_table.py's format, labels default / mean / mean_T)
"""
import json
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from study_scores import default_models, score_result  # noqa: E402
from unmeasured_genes_probe import unexpected_zero_genes  # noqa: E402
import atlasmtl  # noqa: E402
from atlasmtl import calibration, genes, prediction  # noqa: E402
from atlasmtl.augment import ShiftAugmentation, simulate_shift  # noqa: E402

COPIES = 5
_logits: dict[int, list] = {}
_infer = prediction._infer


def _recording_infer(model, output, detected, gate, decoder, buffers, rows):
    for j, lg in enumerate(output.logits):
        _logits.setdefault(j, []).append((rows.start, lg.detach().cpu().numpy().astype(np.float64)))
    return _infer(model, output, detected, gate, decoder, buffers, rows)


def network_logits(model, adata: ad.AnnData, n_levels: int, **options) -> list[np.ndarray]:
    """The network's (uncalibrated) logits per level for every cell of ``adata``, in order."""
    _logits.clear()
    atlasmtl.predict(model, adata, show_progress=False, show_summary=False, knn_correction="off",
                     novelty_threshold=None, **options)
    return [np.concatenate([x for _, x in sorted(_logits[j], key=lambda t: t[0])]) for j in range(n_levels)]


def held_out_copies(case_dir: Path, model, seed: int) -> ad.AnnData:
    """``COPIES`` shifted copies of the model's held-out reference cells, as counts."""
    full = ad.read_h5ad(case_dir / "ref.h5ad")
    held = full[~np.asarray(model.reference["training_cell"], bool)]
    rng = np.random.default_rng(1000 + seed)
    counts = sp.csr_matrix(held.layers["counts"])
    blocks = [sp.csr_matrix(simulate_shift(counts, "counts", rng, ShiftAugmentation())) for _ in range(COPIES)]
    copies = ad.AnnData(X=sp.vstack(blocks).tocsr().astype(np.float32), obs=held.obs.iloc[np.tile(np.arange(held.n_obs), COPIES)].copy(),
                        var=held.var[[]].copy())
    copies.obs_names = [f"copy{i}" for i in range(copies.n_obs)]
    return copies


def main() -> None:
    if not hasattr(genes, "IMPUTE_MISSING_GENES"):
        raise SystemExit("apply benchmark/experiments/patches/impute_missing_genes.diff first")
    cases, seeds, out = sys.argv[1].split(","), [int(s) for s in sys.argv[2].split(",")], Path(sys.argv[3])
    models = Path(sys.argv[4]) if len(sys.argv) > 4 else Path("/work/bench_models")
    work = Path("/work/bench_work")
    prediction._infer = _recording_infer
    rows = json.loads(out.read_text()) if out.exists() else []
    for case, seed, spec, ref, query, truth, model in default_models(cases, seeds, rows, work=work, models=models, train=False):
        levels = spec["levels"]
        unmeasured = unexpected_zero_genes(ref, query, 20.0)
        copies = held_out_copies(work / "cases" / case, model, seed)
        genes.IMPUTE_MISSING_GENES = False
        as_zeros = network_logits(model, copies, len(levels))
        genes.IMPUTE_MISSING_GENES = True
        at_mean = network_logits(model, copies[:, ~unmeasured].copy(), len(levels), min_gene_overlap=0.0)
        ratio = {}
        for j, lv in enumerate(levels):
            labels = copies.obs[lv].astype(str).to_numpy()
            known = np.isin(labels, model.classes[lv])
            codes = np.searchsorted(np.asarray(model.classes[lv]), labels[known])
            ratio[lv] = (calibration.fit_temperature(at_mean[j][known], codes, copies=COPIES)
                         / calibration.fit_temperature(as_zeros[j][known], codes, copies=COPIES))
        stored = dict(model.metadata["calibration"]["temperatures"])
        row = {"case": case, "seed": seed, "K": "auto", "unmeasured_genes": int(unmeasured.sum()), "ratio": ratio,
               "stored_temperatures": stored}
        genes.IMPUTE_MISSING_GENES = False
        row["default"] = score_result(atlasmtl.predict(model, query, show_progress=False, show_summary=False), truth, spec)
        genes.IMPUTE_MISSING_GENES = True
        reduced = query[:, ~unmeasured].copy()
        row["mean"] = score_result(atlasmtl.predict(model, reduced, show_progress=False, show_summary=False,
                                                    min_gene_overlap=0.0), truth, spec)
        model.metadata["calibration"]["temperatures"] = {lv: stored[lv] * ratio[lv] for lv in levels}
        row["mean_T"] = score_result(atlasmtl.predict(model, reduced, show_progress=False, show_summary=False,
                                                      min_gene_overlap=0.0), truth, spec)
        model.metadata["calibration"]["temperatures"] = stored
        genes.IMPUTE_MISSING_GENES = False
        fine = levels[-1]
        print(case, seed, int(unmeasured.sum()), {k: round(v, 3) for k, v in ratio.items()},
              " ".join(f"{label}: {row[label]['levels'][fine]['macro_f1']:.3f} / ECE {row[label]['levels'][fine]['ece']:.3f}"
                       for label in ("default", "mean", "mean_T")), flush=True)
        rows.append(row)
        out.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
