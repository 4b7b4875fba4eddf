"""Issue 10: which genes the network reads: the reference's most variable, or those that tell its labels apart
(research; not part of atlasmtl).

Why: ``n_top_genes=5000`` keeps the 5,000 genes scanpy's ``flavor="seurat"`` ranks most variable. Variable is not
the same as informative: a gene can vary with depth, cell cycle or a donor, and a marker of a small type can vary
little over the whole reference. A supervised ranking keeps the genes whose log1p CP10k differs most between the
finest level's classes (one-way ANOVA F statistic, as ``sklearn.feature_selection.f_classif``), computed on the
same labelled cells. ``GENE_RANKING`` picks the rule:

- ``f``: the ``n_top_genes`` genes of largest F;
- ``mix``: the ``n_top_genes // 2`` most variable genes (seurat), then the genes of largest F not among them until
  ``n_top_genes`` are kept (what ``build_model(gene_selection="variable+labels")`` does; the same genes on the nine
  whole-transcriptome references, checked);
- ``mix:S``: the same with a share ``S`` of label genes: the ``n_top_genes - int(S * n_top_genes)`` most variable,
  then F.
- ``levels:S``: as ``mix:S``, but the label genes are taken in turn from each annotation level's F order (coarse,
  ..., finest), so the coarse levels' markers are read too (twenty-ninth session).

The patch replaces ``reference.reference_gene_statistics`` (the kept genes and their ``zscore`` statistics) in the
study process; everything else is the shipped path (each cell normalised over its whole library before the kept
genes are taken). It reads the labelled cells' rows at once, so it is for the benchmark's small references only.
Then ``build_setting_study.py`` runs with the remaining arguments:

    GENE_RANKING=f PYTHONPATH=$PWD:$PWD/benchmark:$PWD/benchmark/experiments python benchmark/experiments/gene_ranking_probe.py <case,case,...> 0,1,2 '{"reference.gene_ranking": "f"}' out.json
"""
import os
import runpy
from pathlib import Path

import numpy as np
import scipy.sparse as sp

import atlasmtl
import atlasmtl.genes as genes
import atlasmtl.reference as rf

RULE = os.environ["GENE_RANKING"]
_state: dict = {}
_statistics = rf.reference_gene_statistics
_build_model = atlasmtl.build_model


def f_statistic(log_values: sp.csr_matrix, labels: np.ndarray) -> np.ndarray:
    """One-way ANOVA F of every column across the label groups (0 where a gene does not vary within groups)."""
    _, group = np.unique(labels, return_inverse=True)
    n, n_groups = len(group), group.max() + 1
    onehot = sp.csr_matrix((np.ones(n), (group, np.arange(n))), shape=(n_groups, n))
    size = np.asarray(onehot.sum(axis=1)).ravel()
    sums = np.asarray((onehot @ log_values).todense())
    squares = np.asarray((onehot @ log_values.multiply(log_values)).todense())
    mean = sums.sum(axis=0) / n
    group_mean = sums / size[:, None]
    between = (size[:, None] * (group_mean - mean) ** 2).sum(axis=0)
    within = np.maximum(squares.sum(axis=0) - (size[:, None] * group_mean**2).sum(axis=0), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = (between / (n_groups - 1)) / (within / (n - n_groups))
    return np.nan_to_num(f, nan=0.0, posinf=0.0)


def reference_gene_statistics(source, semantics, cells, n_top_genes, input_transform, chunk_size=4096, reduce=None,
                              labels=None, n_labels=0):  # the shipped labels are replaced by the rule's own
    n = source.n_vars
    if n_top_genes is None or n_top_genes >= n:
        return _statistics(source, semantics, cells, n_top_genes, input_transform, chunk_size, reduce)
    _, mean, std = _statistics(source, semantics, cells, None, input_transform, chunk_size, reduce)
    linear = sp.csr_matrix(genes.to_linear_values(source.rows(np.sort(cells)), semantics, "float"), dtype=np.float64)
    log_values = linear.copy()
    np.log1p(log_values.data, out=log_values.data)
    orders = [np.argsort(-f_statistic(log_values, lab[np.sort(cells)]), kind="stable") for lab in _state["levels"]]
    by_f = orders[-1]
    if RULE == "f":
        keep = by_f[:n_top_genes]
    elif RULE.startswith("mix"):
        share = float(RULE.split(":")[1]) if ":" in RULE else 0.5
        sq = linear.multiply(linear)
        variable = genes._most_variable(np.asarray(linear.sum(axis=0)).ravel(), np.asarray(sq.sum(axis=0)).ravel(),
                                        linear.shape[0], n_top_genes - int(share * n_top_genes))
        chosen = set(variable.tolist())
        extra = [g for g in by_f if g not in chosen][: n_top_genes - len(chosen)]
        keep = np.concatenate([variable, np.asarray(extra, dtype=int)])
    elif RULE.startswith("levels"):
        share = float(RULE.split(":")[1]) if ":" in RULE else 0.25
        sq = linear.multiply(linear)
        variable = genes._most_variable(np.asarray(linear.sum(axis=0)).ravel(), np.asarray(sq.sum(axis=0)).ravel(),
                                        linear.shape[0], n_top_genes - int(share * n_top_genes))
        chosen, keep = set(variable.tolist()), list(variable)
        pos = [0] * len(orders)
        while len(keep) < n_top_genes:
            for i, order in enumerate(orders):
                while pos[i] < len(order) and order[pos[i]] in chosen:
                    pos[i] += 1
                if pos[i] < len(order) and len(keep) < n_top_genes:
                    chosen.add(order[pos[i]])
                    keep.append(order[pos[i]])
        keep = np.asarray(keep, dtype=int)
    else:
        raise ValueError(f"GENE_RANKING={RULE!r}")
    keep = np.sort(keep)
    return keep, (None if mean is None else mean[keep]), (None if std is None else std[keep])


def build_model(adata, label_columns, *args, **kwargs):
    finest = label_columns if isinstance(label_columns, str) else list(label_columns)[-1]
    _state["labels"] = adata.obs[finest].astype(str).to_numpy()
    columns = [label_columns] if isinstance(label_columns, str) else list(label_columns)
    _state["levels"] = [adata.obs[c].astype(str).to_numpy() for c in columns]
    return _build_model(adata, label_columns, *args, **kwargs)


rf.reference_gene_statistics, atlasmtl.build_model = reference_gene_statistics, build_model
runpy.run_path(str(Path(__file__).with_name("build_setting_study.py")), run_name="__main__")
