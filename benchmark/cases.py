"""Benchmark cases: reference/query splits of real data, novel-type variants, and semi-synthetic scale sets.

Every case is written once to ``benchmark/work/cases/<name>/`` (see
:mod:`common` for the layout) and then read by every method's subprocess.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any, Callable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from common import H5adWriter, WORK_DIR, chunks, lognorm_cp10k, read_json, shared_data_dir, write_json

CASE_FORMAT = 5  # bump when the generated files change, so stale work files are rebuilt

SYMPHONY_LEVELS = ["cell_type_broad", "cell_type"]
PBMC68K_LEVELS = ["lineage", "bulk_labels"]
SYNTH_LEVELS = ["cluster_coarse", "cluster_fine"]
CELLBENCH_TRAIN = ["CEL-seq2 5cl plate1", "CEL-seq2 5cl plate2", "CEL-seq2 5cl plate3"]
SYNTH_SIZES = {"10k": 10_000, "20k": 20_000, "100k": 100_000, "1m": 1_000_000, "5m": 5_000_000}  # 5m: training memory only (scale.py)


# --------------------------------------------------------------------------- writing
def _write_split(
    out: Path,
    spec: dict[str, Any],
    ref: ad.AnnData,
    query: ad.AnnData,
    counts_ref: sp.csr_matrix | None,
    counts_query: sp.csr_matrix | None,
) -> None:
    """Write ref.h5ad / query.h5ad / truth.csv.gz / case.json for an in-memory split."""
    out.mkdir(parents=True, exist_ok=True)
    levels, batch = spec["levels"], spec["batch_key"]
    coords = spec.get("coords") or {}
    for which, a, counts in (("ref", ref, counts_ref), ("query", query, counts_query)):
        obs_cols = (levels if which == "ref" else []) + ([batch] if batch else [])
        obs = pd.DataFrame({c: a.obs[c].astype(str).to_numpy() for c in obs_cols}, index=a.obs_names.astype(str))
        obsm = {key: np.asarray(a.obsm[key], dtype=np.float32) for key in coords.values()} if which == "ref" else {}
        layers = {"counts": sp.csr_matrix(counts, dtype=np.float32)} if counts is not None else {}
        ad.AnnData(X=sp.csr_matrix(a.X, dtype=np.float32), obs=obs, var=pd.DataFrame(index=a.var_names.astype(str)),
                   obsm=obsm, layers=layers).write_h5ad(out / f"{which}.h5ad")
    truth = pd.DataFrame({lv: query.obs[lv].astype(str).to_numpy() for lv in levels}, index=query.obs_names.astype(str))
    truth.index.name = "cell"
    truth.to_csv(out / "truth.csv.gz", compression="gzip")
    if coords:
        np.savez(out / "truth_coords.npz", **{name: np.asarray(query.obsm[key], dtype=np.float32) for name, key in coords.items()})
    spec = dict(spec, n_ref=int(ref.n_obs), n_query=int(query.n_obs), n_genes=int(ref.n_vars),
                ref_label_counts={lv: ref.obs[lv].astype(str).value_counts().to_dict() for lv in levels},
                query_label_counts={lv: query.obs[lv].astype(str).value_counts().to_dict() for lv in levels},
                format=CASE_FORMAT)
    write_json(out / "case.json", spec)


def _remove_type(ref: ad.AnnData, counts: sp.csr_matrix | None, level: str, label: str):
    keep = (ref.obs[level].astype(str) != label).to_numpy()
    return ref[keep].copy(), (counts[keep] if counts is not None else None)


def _novel_spec(ref: ad.AnnData, levels: list[str], fine_label: str) -> dict[str, list[str]]:
    """Labels absent from the reduced reference at each level (the parent too when its only child goes)."""
    fine = levels[-1]
    novel = {fine: [fine_label]}
    for lv in levels[:-1]:
        gone = ref.obs.loc[ref.obs[fine].astype(str) == fine_label, lv].astype(str).unique()
        left = set(ref.obs.loc[ref.obs[fine].astype(str) != fine_label, lv].astype(str))
        absent = sorted(set(gone) - left)
        if absent:
            novel[lv] = absent
    return novel


# --------------------------------------------------------------------------- real cases
def _symphony() -> tuple[ad.AnnData, sp.csr_matrix]:
    adata = ad.read_h5ad(shared_data_dir() / "symphony_pbmc_small.h5ad")
    adata.obs_names = adata.obs_names.astype(str)
    X = sp.csr_matrix(adata.X, dtype=np.float64)
    counts = sp.diags(adata.obs["nUMI"].to_numpy(dtype=np.float64) / 1e4) @ X.expm1()
    counts = sp.csr_matrix(counts)
    counts.data = np.round(counts.data)
    counts.eliminate_zeros()
    keep = np.asarray(counts.sum(axis=1)).ravel() > 0
    adata, counts = adata[keep].copy(), counts[keep]
    adata.X = lognorm_cp10k(counts)
    return adata, sp.csr_matrix(counts, dtype=np.float32)


def make_symphony(out: Path, query_chem: str, novel: str | None = None, n_cells: int | None = None) -> None:
    adata, counts = _symphony()
    if n_cells is not None:  # smoke subset: stratified by chemistry, fixed seed
        rng = np.random.default_rng(0)
        pick = np.sort(rng.choice(adata.n_obs, size=n_cells, replace=False))
        adata, counts = adata[pick].copy(), counts[pick]
    q = (adata.obs["dataset"] == query_chem).to_numpy()
    ref, query = adata[~q].copy(), adata[q].copy()
    c_ref, c_query = counts[~q], counts[q]
    title = f"Symphony PBMC, train on the other two chemistries, predict {query_chem}"
    spec = {"levels": SYMPHONY_LEVELS, "batch_key": "dataset", "has_counts": True, "coords": {},
            "novel": {}, "semi_synthetic": False, "x_is_cp10k": True,
            "source": "symphony_pbmc_small.h5ad (counts = round(expm1(X) * nUMI / 1e4); X recomputed as log1p CP10k)"}
    if novel:
        spec["novel"] = _novel_spec(ref, SYMPHONY_LEVELS, novel)
        ref, c_ref = _remove_type(ref, c_ref, "cell_type", novel)
        title += f"; {novel} removed from the reference (novel type)"
    if n_cells is not None:
        title += f" (smoke: {n_cells}-cell random subset)"
    spec["title"] = title
    _write_split(out, spec, ref, query, c_ref, c_query)


def make_cellbench(out: Path, query_protocols: list[str], novel: str | None = None,
                   n_top_genes: int | None = 3000) -> None:
    """CellBench singlets, reference = the CEL-seq2 5-line plates; ``n_top_genes=None`` keeps every detected
    gene (the ``_allgenes`` variants, for gene-selection studies)."""
    adata = ad.read_h5ad(shared_data_dir() / "cellbench_celseq2_dropseq.h5ad")
    adata = adata[(adata.obs["demuxlet_cls"] == "SNG").to_numpy()].copy()
    adata.obs_names = adata.obs_names.astype(str)
    counts = sp.csr_matrix(adata.X, dtype=np.float32)
    # the reference decides the genes: detected in >= 3 training singlets, then the 3,000 most variable
    # (scanpy "seurat" flavour on the training cells' log1p CP10k, H1975 included), as for the semi-synthetic cases
    import scanpy as sc

    train = adata.obs["protocol"].isin(CELLBENCH_TRAIN).to_numpy()
    detected = np.asarray((counts[train] > 0).sum(axis=0)).ravel() >= 3
    adata, counts = adata[:, detected].copy(), counts[:, detected]
    if n_top_genes is not None:
        hv = ad.AnnData(X=lognorm_cp10k(counts[train]), var=pd.DataFrame(index=adata.var_names))
        sc.pp.highly_variable_genes(hv, n_top_genes=n_top_genes, flavor="seurat")
        keep = hv.var["highly_variable"].to_numpy()
        adata, counts = adata[:, keep].copy(), counts[:, keep]
    adata.X = lognorm_cp10k(counts)
    q = adata.obs["protocol"].isin(query_protocols).to_numpy()
    ref, query = adata[train].copy(), adata[q].copy()
    c_ref, c_query = counts[train], counts[q]
    levels = ["cell_line"]
    title = f"CellBench singlets, train on the CEL-seq2 5-line plates, predict {' + '.join(query_protocols)}"
    genes = ("every one of them" if n_top_genes is None else
             f"then {n_top_genes:,} HVGs of the training cells (scanpy 'seurat' flavour)")
    spec = {"levels": levels, "batch_key": "protocol", "has_counts": True, "coords": {}, "novel": {},
            "semi_synthetic": False, "x_is_cp10k": True,
            "source": f"cellbench_celseq2_dropseq.h5ad, demuxlet_cls == 'SNG'; genes seen in >= 3 training cells, "
                      f"{genes}; X = log1p CP10k over those genes"}
    if novel:
        spec["novel"] = {"cell_line": [novel]}
        ref, c_ref = _remove_type(ref, c_ref, "cell_line", novel)
        title += f"; {novel} removed from the reference (novel type)"
    spec["title"] = title
    _write_split(out, spec, ref, query, c_ref, c_query)


def make_pbmc68k(out: Path) -> None:
    from atlasmtl.datasets import pbmc68k_reference_query

    ref, query = pbmc68k_reference_query(test_size=0.3, random_state=0)
    for a in (ref, query):
        a.obs["batch"] = "pbmc68k"
    spec = {"levels": PBMC68K_LEVELS, "batch_key": None, "has_counts": False, "coords": {"umap": "X_umap"},
            "novel": {}, "semi_synthetic": False, "x_is_cp10k": False,
            "title": "pbmc68k_reduced (scanpy), stratified 70/30 split, UMAP as coordinate target",
            "source": "atlasmtl.datasets.pbmc68k_reference_query(test_size=0.3, random_state=0); X = scanpy's "
                      "log-normalised .raw (not CP10k); no raw counts exist"}
    _write_split(out, spec, ref, query, None, None)


def _from_counts(adata: ad.AnnData, counts: sp.csr_matrix) -> tuple[ad.AnnData, sp.csr_matrix]:
    """``adata`` with ``X`` = log1p CP10k of ``counts`` (float32 CSR), cells with no counts dropped."""
    counts = sp.csr_matrix(counts, dtype=np.float32)
    keep = np.asarray(counts.sum(axis=1)).ravel() > 0
    adata, counts = adata[keep].copy(), counts[keep]
    adata.X = lognorm_cp10k(counts)
    return adata, counts


def _detected_in_reference(counts: sp.csr_matrix, ref_mask: np.ndarray, min_cells: int = 3) -> np.ndarray:
    """Genes with a count in at least ``min_cells`` reference cells (the reference decides the genes)."""
    return np.asarray((counts[ref_mask] > 0).sum(axis=0)).ravel() >= min_cells


def make_ding(out: Path, reverse: bool = False, novel: str | None = None) -> None:
    """Ding 2020 PBMC (one donor pair), Drop-seq reference → inDrops query: cross-platform, low depth
    (``reverse=True``: inDrops reference → Drop-seq query; ``novel``: that type removed from the reference)."""
    adata = ad.read_h5ad(shared_data_dir() / "ding2020_pbmc_dropseq_vs_indrops.h5ad")
    adata.obs_names = adata.obs_names.astype(str)
    adata, counts = _from_counts(adata, adata.X)
    ref_platform, query_platform = ("inDrops", "Drop-seq") if reverse else ("Drop-seq", "inDrops")
    q = (adata.obs["platform"] == query_platform).to_numpy()
    spec = {"levels": ["cell_type"], "batch_key": "platform", "has_counts": True, "coords": {}, "novel": {},
            "semi_synthetic": False, "x_is_cp10k": True,
            "title": f"Ding 2020 PBMC, train on {ref_platform}, predict {query_platform} (cross-platform)",
            "source": "ding2020_pbmc_dropseq_vs_indrops.h5ad (integer UMI counts over its 2,000 HVGs); X = log1p CP10k"}
    ref, c_ref = adata[~q].copy(), counts[~q]
    if novel:
        ref, c_ref = _remove_type(ref, c_ref, "cell_type", novel)
        spec["novel"] = {"cell_type": [novel]}
        spec["title"] += f"; {novel} removed from the reference (novel type)"
    _write_split(out, spec, ref, adata[q].copy(), c_ref, counts[q])


ZILIONIS_LEVELS = ["cell_type_coarse", "cell_type_fine"]


def make_zilionis(out: Path, novel: bool = False, reverse: bool = False, remove: str | None = None) -> None:
    """Zilionis 2019 mouse lung: healthy reference → tumour-bearing query (condition shift).

    ``novel=False``: the query keeps the tumour cells whose fine type the reference has (known types).
    ``novel=True``: the query is every tumour cell; the tumour-only fine types are novel (their coarse
    type, Neutrophils, is known). ``reverse=True`` (with ``novel=False``): tumour-bearing reference →
    healthy query, the healthy cells whose fine type the tumour cells have (all but 2 N2 cells).
    ``remove``: that fine type is also removed from the reference (novel, with its parent where it is the
    parent's only child).
    """
    adata = ad.read_h5ad(shared_data_dir() / "zilionis2019_mouse_lung_healthy_vs_tumor.h5ad")
    adata.obs_names = adata.obs_names.astype(str)
    ref_condition, query_condition = ("tumor", "healthy") if reverse else ("healthy", "tumor")
    ref_mask = (adata.obs["condition"] == ref_condition).to_numpy()
    genes = _detected_in_reference(sp.csr_matrix(adata.X), ref_mask)
    adata = adata[:, genes].copy()
    adata, counts = _from_counts(adata, adata.X)
    ref_mask = (adata.obs["condition"] == ref_condition).to_numpy()
    fine = adata.obs["cell_type_fine"].astype(str).to_numpy()
    ref_types = set(fine[ref_mask])
    q = ~ref_mask if novel else (~ref_mask & np.isin(fine, sorted(ref_types)))
    names = {"healthy": "healthy", "tumor": "tumour-bearing"}
    spec = {"levels": ZILIONIS_LEVELS, "batch_key": "animal", "has_counts": True, "coords": {}, "novel": {},
            "semi_synthetic": False, "x_is_cp10k": True,
            "title": f"Zilionis 2019 mouse lung, train on {names[ref_condition]}, predict {names[query_condition]} "
                     + ("(all cells; tumour-only neutrophil subsets are novel)" if novel else "(cell types the reference has)"),
            "source": "zilionis2019_mouse_lung_healthy_vs_tumor.h5ad (inDrop UMI counts); genes with counts in >= 3 "
                      f"{names[ref_condition]} cells; X = log1p CP10k"}
    if novel:
        spec["novel"] = {"cell_type_fine": sorted(set(fine[q]) - ref_types)}
    ref, c_ref = adata[ref_mask].copy(), counts[ref_mask]
    if remove:
        spec["novel"] = _novel_spec(ref, ZILIONIS_LEVELS, remove)
        ref, c_ref = _remove_type(ref, c_ref, "cell_type_fine", remove)
        spec["title"] += f"; {remove} removed from the reference (novel type)"
    _write_split(out, spec, ref, adata[q].copy(), c_ref, counts[q])


BRAIN_LEVELS = ["compartment", "cell_type"]


def make_brain(out: Path, reverse: bool = False) -> None:
    """Brain across species: mouse (Tabula Muris, Smart-seq2) ↔ adult human (Darmanis, Fluidigm C1).

    ``reverse=False``: mouse reference → human query. ``reverse=True``: human reference → mouse
    query; the mouse-only macrophages and pericytes are then novel fine types under known parents
    (``immune``, ``vascular``). The ``fetal`` and ``excluded`` (hybrid) compartments are left out.
    Genes are the file's 1:1 orthologues detected in the reference, named by their human symbol in
    both files (``ref.var["mouse_symbol"]`` keeps the mouse names, for gene-matching tests), so every
    method sees the same genes.
    """
    adata = ad.read_h5ad(shared_data_dir() / "brain_human_Darmanis_vs_mouse_TabulaMuris_1to1orthologs.h5ad")
    adata.obs_names = adata.obs_names.astype(str)
    adata = adata[~adata.obs["compartment"].isin(["fetal", "excluded"]).to_numpy()].copy()
    ref_species, query_species = ("human", "mouse") if reverse else ("mouse", "human")
    ref_mask = (adata.obs["species"] == ref_species).to_numpy()
    genes = _detected_in_reference(sp.csr_matrix(adata.X), ref_mask)
    adata = adata[:, genes].copy()
    adata, counts = _from_counts(adata, adata.X)
    ref_mask = (adata.obs["species"] == ref_species).to_numpy()
    ref_names = {"mouse": "mouse (Tabula Muris, Smart-seq2)", "human": "adult human (Darmanis, C1)"}
    spec = {"levels": BRAIN_LEVELS, "batch_key": "species", "has_counts": True, "coords": {}, "novel": {},
            "semi_synthetic": False, "x_is_cp10k": True,
            "title": f"Brain, train on {ref_names[ref_species]}, predict {ref_names[query_species]}: "
                     "cross-species and cross-platform",
            "source": "brain_human_Darmanis_vs_mouse_TabulaMuris_1to1orthologs.h5ad (read counts), fetal and "
                      f"excluded compartments left out; 1:1 orthologues with counts in >= 3 {ref_species} cells, "
                      "named by human symbol; X = log1p CP10k"}
    if reverse:
        fine = adata.obs["cell_type"].astype(str).to_numpy()
        spec["novel"] = {"cell_type": sorted(set(fine[~ref_mask]) - set(fine[ref_mask]))}
        spec["title"] += " (mouse-only macrophages and pericytes are novel)"
    _write_split(out, spec, adata[ref_mask].copy(), adata[~ref_mask].copy(), counts[ref_mask], counts[~ref_mask])


IMMUNE_NAMES = {"T cells": "T", "B cells": "B", "NK cells": "NK", "Neutrophils": "Neutrophil"}


def make_immune_species(out: Path, reverse: bool = False) -> None:
    """Immune cells across species and tissues: mouse lung (Zilionis 2019, inDrop, 800 cells of 4 types) ↔
    human blood (the Symphony PBMC file, 10x, 1,200 cells), one level of harmonised names.

    ``reverse=False``: mouse lung reference (T, B, NK, Neutrophil) → human PBMC query, whose Mono, DC, MK and
    HSC cells are novel. ``reverse=True``: human PBMC reference (T, Mono, B, NK, DC, MK, HSC) → mouse lung query,
    whose neutrophils are novel. Genes: the Symphony file's 1,767 (its highly variable genes) that have a 1:1
    mouse orthologue in the shared table and are measured in the Zilionis file, detected in at least 3
    reference cells, named by their human symbol in both. Counts: the Zilionis UMI counts and the Symphony
    counts recovered as in :func:`make_symphony`, each restricted to those genes; X = log1p CP10k.
    """
    human, human_counts = _symphony()
    mouse = ad.read_h5ad(shared_data_dir() / "zilionis2019_mouse_lung_healthy_vs_tumor.h5ad")
    mouse.obs_names = mouse.obs_names.astype(str)
    table = pd.read_csv(shared_data_dir() / "orthologs_human_mouse_1to1_CAME_Ensembl.csv")
    table = table[table["human.homology.type"] == "ortholog_one2one"]
    to_human = dict(zip(table["gene.name"].astype(str), table["human.gene.name"].astype(str)))
    mouse_col = {to_human[g]: i for i, g in enumerate(mouse.var_names.astype(str)) if g in to_human}
    shared = [g for g in human.var_names.astype(str) if g in mouse_col]
    human_cols = [int(i) for i in human.var_names.get_indexer(shared)]
    counts = {"human": sp.csr_matrix(human_counts[:, human_cols], dtype=np.float32),
              "mouse": sp.csr_matrix(sp.csr_matrix(mouse.X)[:, [mouse_col[g] for g in shared]], dtype=np.float32)}
    labels = {"human": human.obs["cell_type_broad"].astype(str).to_numpy(),
              "mouse": mouse.obs["cell_type_coarse"].astype(str).map(IMMUNE_NAMES).to_numpy()}
    names = {"human": human.obs_names.astype(str), "mouse": mouse.obs_names.astype(str)}
    ref_species, query_species = ("human", "mouse") if reverse else ("mouse", "human")
    genes = _detected_in_reference(counts[ref_species], np.ones(counts[ref_species].shape[0], dtype=bool))
    var = pd.DataFrame(index=pd.Index(np.asarray(shared)[genes]))
    parts = {}
    for species in ("human", "mouse"):
        kept = counts[species][:, genes]
        obs = pd.DataFrame({"cell_type": labels[species], "species": species}, index=names[species])
        parts[species] = _from_counts(ad.AnnData(X=kept, obs=obs, var=var), kept)
    titles = {"mouse": "mouse lung immune cells (Zilionis 2019, inDrop)", "human": "human PBMC (Symphony, 10x)"}
    ref, query = parts[ref_species][0], parts[query_species][0]
    spec = {"levels": ["cell_type"], "batch_key": "species", "has_counts": True, "coords": {},
            "novel": {"cell_type": sorted(set(query.obs["cell_type"]) - set(ref.obs["cell_type"]))},
            "semi_synthetic": False, "x_is_cp10k": True,
            "title": f"Immune cells, train on {titles[ref_species]}, predict {titles[query_species]}: cross-species, "
                     "cross-tissue and cross-platform (query types the reference lacks are novel)",
            "source": "zilionis2019_mouse_lung_healthy_vs_tumor.h5ad (UMI counts) and symphony_pbmc_small.h5ad (counts "
                      "recovered as round(expm1(X) * nUMI / 1e4)); the Symphony genes with a 1:1 orthologue "
                      "(orthologs_human_mouse_1to1_CAME_Ensembl.csv) measured in both, detected in >= 3 "
                      f"{ref_species} cells, named by human symbol; labels: Zilionis cell_type_coarse renamed "
                      "(T cells → T, B cells → B, NK cells → NK, Neutrophils → Neutrophil), Symphony "
                      "cell_type_broad; X = log1p CP10k"}
    _write_split(out, spec, ref, query, parts[ref_species][1], parts[query_species][1])


def interferon_programme(genes: pd.Index, species: str = "human", n_clusters: int = 6, min_fold: float = 2.0,
                         min_detected: float = 0.1, seed: int = 0) -> dict[str, Any]:
    """The interferon-β response of real PBMC, per cell population, on the genes ``genes`` (research input).

    From the shared Kang 2018 counts (1,000 control and 1,000 interferon-β stimulated PBMC of the same
    donors, no cell-type labels). The cells are clustered (k-means, ``n_clusters``, on 30 principal
    components) on the genes the stimulation does not move (|log2 fold change| < 0.5 over all cells,
    detected in ≥ 5% of them), so that the clusters are populations (T, monocytes, B, ...) found in both
    conditions, not the conditions. Per cluster and gene, the programme is the stimulated cells' mean
    share of a cell's counts against the control cells': ``delta`` (stimulated − control share) for genes
    it raises and ``ratio`` (stimulated / control) for genes it lowers, kept where the change is at least
    ``min_fold``-fold and the share of the cluster's cells that detect the gene moves the same way by at
    least ``min_detected`` (so that a few cells' counts do not make a change); every other entry is no
    change. ``profiles`` are the clusters' mean log1p CP10k on the unmoved genes, to assign a query cell to
    its nearest population by correlation (as scmap-cluster does). ``species="mouse"``: ``genes`` are mouse
    symbols, matched through the shared 1:1 orthologue table.
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    kang = ad.read_h5ad(shared_data_dir() / "kang_ctrl_stim_counts.h5ad")
    names = kang.var_names.astype(str)
    if species == "mouse":
        table = pd.read_csv(shared_data_dir() / "orthologs_human_mouse_1to1_CAME_Ensembl.csv")
        table = table[table["human.homology.type"] == "ortholog_one2one"]
        names = pd.Index(names).map(dict(zip(table["human.gene.name"].astype(str), table["gene.name"].astype(str))))
    col = pd.Index(genes.astype(str)).get_indexer(pd.Index(names).astype(object))
    counts = sp.csr_matrix(kang.X, dtype=np.float64)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    share = sp.csr_matrix(sp.diags(1.0 / np.maximum(totals, 1.0)) @ counts)
    stim = (kang.obs["condition"].astype(str) == "stim").to_numpy()
    detected = np.asarray((counts > 0).mean(axis=0)).ravel()
    mean_stim = np.asarray(share[stim].mean(axis=0)).ravel()
    mean_ctrl = np.asarray(share[~stim].mean(axis=0)).ravel()
    fold = np.log2((mean_stim + 1e-6) / (mean_ctrl + 1e-6))
    unmoved = (np.abs(fold) < 0.5) & (detected >= 0.05) & (col >= 0)
    x = lognorm_cp10k(sp.csr_matrix(counts[:, unmoved], dtype=np.float32)).toarray()  # 2,000 cells: small
    pcs = PCA(n_components=30, random_state=seed).fit_transform(x - x.mean(0))
    assign = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(pcs)
    delta = np.zeros((n_clusters, len(genes)))
    ratio = np.ones((n_clusters, len(genes)))
    profiles = np.zeros((n_clusters, int(unmoved.sum())))
    sizes = []
    inside = col >= 0
    for k in range(n_clusters):
        s_k, c_k = (assign == k) & stim, (assign == k) & ~stim
        sizes.append((int(c_k.sum()), int(s_k.sum())))
        profiles[k] = x[assign == k].mean(0)
        if min(c_k.sum(), s_k.sum()) < 20:
            continue  # a population of one condition only: no response to estimate
        ps = np.asarray(share[s_k].mean(axis=0)).ravel()
        pc = np.asarray(share[c_k].mean(axis=0)).ravel()
        ds = np.asarray((counts[s_k] > 0).mean(axis=0)).ravel()
        dc = np.asarray((counts[c_k] > 0).mean(axis=0)).ravel()
        up = inside & (ps >= min_fold * pc) & (ps > 0) & (ds - dc >= min_detected)
        down = inside & (pc >= min_fold * ps) & (pc > 0) & (dc - ds >= min_detected)
        delta[k, col[up]] = ps[up] - pc[up]
        ratio[k, col[down]] = ps[down] / pc[down]
    return {"delta": delta, "ratio": ratio, "profiles": profiles, "profile_cols": col[unmoved],
            "sizes": sizes, "n_matched": int(inside.sum())}


def _stimulate(counts: sp.csr_matrix, genes: pd.Index, species: str, rng: np.random.Generator) -> tuple[sp.csr_matrix, str]:
    """The query's counts with the interferon-β response of its nearest Kang population added
    (:func:`interferon_programme`): each cell is assigned to the population whose mean profile its log1p
    CP10k correlates with best (on the unmoved genes), its counts of the genes the population lowers are
    binomially thinned by the stimulated / control ratio, and it gains Poisson(depth × delta) counts of
    the genes the population raises."""
    prog = interferon_programme(genes, species)
    counts = sp.csr_matrix(counts, dtype=np.float32)
    depth = np.asarray(counts.sum(axis=1)).ravel()
    x = lognorm_cp10k(counts)[:, prog["profile_cols"]].toarray()  # the benchmark's queries: <= 1,200 cells
    xc = x - x.mean(1, keepdims=True)
    pc = prog["profiles"] - prog["profiles"].mean(1, keepdims=True)
    corr = (xc @ pc.T) / (np.linalg.norm(xc, axis=1, keepdims=True) * np.linalg.norm(pc, axis=1) + 1e-12)
    pop = corr.argmax(1)
    out = counts.tocoo()
    keep = prog["ratio"][pop[out.row], out.col]
    data = rng.binomial(np.round(out.data).astype(np.int64), np.minimum(keep, 1.0)).astype(np.float32)
    thinned = sp.csr_matrix((data, (out.row, out.col)), shape=counts.shape)
    up_cols = np.flatnonzero((prog["delta"] > 0).any(0))
    lam = depth[:, None] * prog["delta"][pop][:, up_cols]
    added = sp.csr_matrix(rng.poisson(lam).astype(np.float32))  # cells × raised genes, then placed in all genes
    added = sp.csr_matrix((added.data, up_cols[added.indices], added.indptr), shape=counts.shape)
    shifted = sp.csr_matrix(thinned + added, dtype=np.float32)
    shifted.eliminate_zeros()
    gained = float(np.asarray(added.sum(axis=1)).ravel().sum() / max(depth.sum(), 1.0))
    what = (f"interferon-beta response added (Kang 2018 stimulated vs control, {len(up_cols)} genes raised and "
            f"{int((prog['ratio'] < 1).any(0).sum())} lowered >= 2-fold in one of {len(prog['sizes'])} populations; "
            f"{prog['n_matched']} Kang genes matched; query cells per population "
            f"{np.bincount(pop, minlength=len(prog['sizes'])).tolist()}; +{gained:.1%} counts)")
    return shifted, what


#: ``shift="ambient"``: each query cell's share of ambient counts, drawn per cell from U(low, high).
AMBIENT_SHARE = (0.1, 0.3)


def _add_ambient(counts: sp.csr_matrix, rng: np.random.Generator,
                 share: tuple[float, float] = AMBIENT_SHARE) -> tuple[sp.csr_matrix, str]:
    """The query's counts with ambient RNA added, as a droplet protocol's free-floating transcripts add it
    (the model of SoupX and CellBender): the "soup" is the query's pooled expression profile (each gene's share of
    all its counts), and each cell keeps its own counts and gains Poisson(``a_c`` × soup) counts, where ``a_c`` =
    depth × ρ / (1 − ρ) so that a share ρ ~ U(``share``) of the cell's new depth is ambient. A cell type's
    markers thus appear in every other type's cells, at the rate that type contributes to the pool."""
    counts = sp.csr_matrix(counts, dtype=np.float32)
    depth = np.asarray(counts.sum(axis=1)).ravel().astype(np.float64)
    soup = np.asarray(counts.sum(axis=0)).ravel().astype(np.float64)
    soup /= max(soup.sum(), 1.0)
    rho = rng.uniform(share[0], share[1], size=counts.shape[0])
    extra = depth * rho / (1.0 - rho)
    rows = []
    for start in range(0, counts.shape[0], 256):  # cells × genes Poisson draws, a block of cells at a time
        block = rng.poisson(extra[start:start + 256, None] * soup[None, :]).astype(np.float32)
        rows.append(sp.csr_matrix(block))
    added = sp.vstack(rows, format="csr") if rows else sp.csr_matrix(counts.shape, dtype=np.float32)
    shifted = sp.csr_matrix(counts + added, dtype=np.float32)
    shifted.eliminate_zeros()
    gained = float(added.sum() / max(depth.sum(), 1.0))
    what = (f"ambient RNA added: each cell gains Poisson counts of the query's pooled profile, a per-cell share "
            f"U({share[0]:g}, {share[1]:g}) of its new depth (+{gained:.1%} counts)")
    return shifted, what


def _shift_query_counts(counts: sp.csr_matrix, shift: str, rng: np.random.Generator, genes: pd.Index | None = None,
                        species: str = "human") -> tuple[sp.csr_matrix, str]:
    """``(counts, what)``: the query's counts under a simulated shift, and a sentence that says what was done.

    ``shift="thin"``: each cell keeps a random U(0.1, 0.3) fraction of its counts (binomial thinning: 10–30 %
    of the original depth). ``shift="missing_genes"``: a random U(0.3, 0.5) fraction of the genes is not
    measured (their counts are zero). ``shift="interferon"``: the cells are stimulated with interferon-β
    in silico (:func:`_stimulate`; needs the query's ``genes`` and their ``species``). ``shift="ambient"``:
    ambient RNA from the query's own pool is added to each cell (:func:`_add_ambient`).
    """
    if shift == "interferon":
        return _stimulate(counts, genes, species, rng)
    if shift == "ambient":
        return _add_ambient(counts, rng)
    if shift == "thin":
        counts = thin_rows(counts, np.arange(counts.shape[0]), rng, low=0.1, high=0.3)
        return counts, "query thinned to 10-30% of its depth (binomial thinning, per-cell fraction U(0.1, 0.3))"
    if shift == "missing_genes":
        frac = float(rng.uniform(0.3, 0.5))
        gone = rng.choice(counts.shape[1], size=int(round(frac * counts.shape[1])), replace=False)
        keep = np.ones(counts.shape[1], dtype=np.float32)
        keep[gone] = 0.0
        counts = sp.csr_matrix(counts @ sp.diags(keep), dtype=np.float32)
        counts.eliminate_zeros()
        return counts, f"{len(gone)} of {counts.shape[1]} genes ({frac:.0%}) not measured in the query (counts zero)"
    raise ValueError(f"unknown shift {shift!r}; expected 'thin', 'missing_genes', 'interferon' or 'ambient'")


def make_shifted(out: Path, base: str, shift: str, seed: int = 0, species: str = "human") -> None:
    """Case ``base`` (a registered case with UMI counts) with a simulated shift of its query (see
    :func:`_shift_query_counts`); the reference is ``base``'s own, unchanged.

    ``base`` is prepared beside ``out`` first. Query cells left with no counts are dropped (the spec reports
    how many), and the query's ``X`` is recomputed from the shifted counts as log1p CP10k.
    """
    base_dir = prepare(base, root=out.parent)
    spec = read_json(base_dir / "case.json")
    if not (spec.get("has_counts") and spec.get("x_is_cp10k")) or spec.get("coords"):
        raise ValueError(f"case {base!r} has no counts behind a log1p CP10k X, or has query coordinates; "
                         "a simulated query shift needs counts and no coordinates to subset")
    query = ad.read_h5ad(base_dir / "query.h5ad")
    truth = pd.read_csv(base_dir / "truth.csv.gz", index_col=0)
    counts, what = _shift_query_counts(sp.csr_matrix(query.layers["counts"]), shift, np.random.default_rng(seed),
                                       genes=query.var_names, species=species)
    alive = np.asarray(counts.sum(axis=1)).ravel() > 0
    counts = sp.csr_matrix(counts[alive], dtype=np.float32)
    query = ad.AnnData(X=lognorm_cp10k(counts), obs=query.obs.iloc[alive].copy(), var=query.var.copy(),
                       layers={"counts": counts})
    truth = truth.iloc[alive]
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(base_dir / "ref.h5ad", out / "ref.h5ad")
    query.write_h5ad(out / "query.h5ad")
    truth.to_csv(out / "truth.csv.gz", compression="gzip")
    levels = spec["levels"]
    spec = dict(spec, simulated_shift=True, n_query_dropped_empty=int((~alive).sum()), n_query=int(query.n_obs),
                query_label_counts={lv: truth[lv].astype(str).value_counts().to_dict() for lv in levels},
                title=f"SIMULATED SHIFT: {spec['title']}; {what}",
                source=f"{spec['source']}; then {what} (case {base}, seed {seed})")
    write_json(out / "case.json", spec)


# --------------------------------------------------------------------------- semi-synthetic
def kang_source(n_hvg: int = 3000, n_fine: int = 16, n_coarse: int = 5, min_cluster: int = 10, seed: int = 0) -> dict[str, Any]:
    """Real Kang PBMC count profiles, their genes, and two nested cluster levels.

    Fine labels: k-means (k = ``n_fine``) on 50 PCs of the real cells' log1p CP10k
    highly variable genes (centred, not scaled); clusters under ``min_cluster``
    cells are folded into the nearest cluster. Coarse labels: Ward clustering of the fine clusters'
    centroids into ``n_coarse`` groups, so the levels nest by construction.
    Cells are split 70/30 (stratified by fine cluster) into the reference and
    query source pools, so no query profile derives from a reference cell.
    """
    import scanpy as sc
    from sklearn.cluster import AgglomerativeClustering, KMeans
    from sklearn.decomposition import PCA
    from sklearn.model_selection import train_test_split

    adata = ad.read_h5ad(shared_data_dir() / "kang_ctrl_stim_counts.h5ad")
    counts = sp.csr_matrix(adata.X, dtype=np.float32)
    logn = ad.AnnData(X=lognorm_cp10k(counts), var=adata.var.copy())
    sc.pp.highly_variable_genes(logn, n_top_genes=n_hvg, flavor="seurat")
    hvg = logn.var["highly_variable"].to_numpy()
    counts, genes = counts[:, hvg], adata.var_names[hvg].astype(str)
    x = lognorm_cp10k(counts).toarray()  # 2,000 real cells × 3,000 genes: small
    pcs = PCA(n_components=50, random_state=seed).fit_transform(x - x.mean(0))
    assign = KMeans(n_clusters=n_fine, n_init=10, random_state=seed).fit_predict(pcs)
    while True:  # fold clusters too small to split 70/30 into their nearest neighbour cluster
        sizes = np.bincount(assign)
        small = [k for k in np.flatnonzero(sizes) if sizes[k] < min_cluster]
        if not small:
            break
        k = small[0]
        centres = {j: pcs[assign == j].mean(0) for j in np.flatnonzero(sizes) if j != k}
        nearest = min(centres, key=lambda j: np.linalg.norm(centres[j] - pcs[assign == k].mean(0)))
        assign[assign == k] = nearest
    _, assign = np.unique(assign, return_inverse=True)
    centres = np.stack([pcs[assign == k].mean(0) for k in range(assign.max() + 1)])
    coarse_of_fine = AgglomerativeClustering(n_clusters=n_coarse, linkage="ward").fit_predict(centres)
    fine_names = np.array([f"C{coarse_of_fine[k]}.{k}" for k in range(len(centres))])
    coarse_names = np.array([f"C{c}" for c in coarse_of_fine])
    lab_fine, lab_coarse = fine_names[assign], coarse_names[assign]
    ref_pool, query_pool = train_test_split(np.arange(adata.n_obs), test_size=0.3, random_state=seed, stratify=lab_fine)
    return {
        "counts": counts, "genes": genes, "fine": lab_fine, "coarse": lab_coarse,
        "condition": adata.obs["condition"].astype(str).to_numpy(),
        "ref_pool": np.sort(ref_pool), "query_pool": np.sort(query_pool),
    }


def thin_rows(counts: sp.csr_matrix, src: np.ndarray, rng: np.random.Generator, low: float = 0.5, high: float = 0.9) -> sp.csr_matrix:
    """Binomially thin the count profiles of ``src`` rows (each row keeps a random fraction in [low, high]).

    Any thinned row whose total equals its source total (an exact copy) is redrawn.
    """
    block = sp.csr_matrix(counts[src], dtype=np.float32)
    p_row = rng.uniform(low, high, size=len(src))
    data = block.data.astype(np.int64)
    row_of = np.repeat(np.arange(len(src)), np.diff(block.indptr))
    thinned = rng.binomial(data, p_row[row_of])
    src_tot = np.bincount(row_of, weights=data, minlength=len(src))
    for _ in range(100):
        same = np.bincount(row_of, weights=thinned, minlength=len(src)) == src_tot
        if not same.any():
            break
        redo = same[row_of]
        thinned[redo] = rng.binomial(data[redo], p_row[row_of[redo]])
    out = sp.csr_matrix((thinned.astype(np.float32), block.indices, block.indptr), shape=block.shape)
    out.eliminate_zeros()
    return out


def _write_synth(path: Path, source: dict[str, Any], pool: np.ndarray, n: int, seed: int, prefix: str,
                 with_labels: bool, chunk: int = 50_000) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    writer = H5adWriter(path, pd.DataFrame(index=pd.Index(source["genes"])), layers=("counts",))
    truth = []
    for start, stop in chunks(n, chunk):
        src = rng.choice(pool, size=stop - start, replace=True)
        c = thin_rows(source["counts"], src, rng)
        names = [f"{prefix}{i:07d}" for i in range(start, stop)]
        obs = pd.DataFrame({"condition": source["condition"][src]}, index=names)
        lab = pd.DataFrame({SYNTH_LEVELS[0]: source["coarse"][src], SYNTH_LEVELS[1]: source["fine"][src]}, index=names)
        if with_labels:
            obs = pd.concat([lab, obs], axis=1)
        else:
            truth.append(lab)
        writer.add(obs, {"X": lognorm_cp10k(c), "counts": c})
    writer.close()
    return pd.concat(truth) if truth else pd.DataFrame()


def make_synthetic(out: Path, n_ref: int, n_query: int | None = None, seed: int = 0) -> None:
    """Semi-synthetic scale case: ``n_ref`` reference and ``n_query`` query cells.

    The default query is n_ref / 10 clipped to [2,000, 10,000]: 2k, 10k and 10k
    cells for the 20k, 100k and 1M references, so prediction times at 100k and
    1M compare like with like.
    """
    n_query = n_query or int(min(max(2000, n_ref // 10), 10_000))
    source = kang_source(seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    _write_synth(out / "ref.h5ad", source, source["ref_pool"], n_ref, seed + 1, "r", with_labels=True)
    truth = _write_synth(out / "query.h5ad", source, source["query_pool"], n_query, seed + 2, "q", with_labels=False)
    truth.index.name = "cell"
    truth.to_csv(out / "truth.csv.gz", compression="gzip")
    src_obs = pd.DataFrame({"coarse": source["coarse"], "fine": source["fine"]})
    spec = {
        "levels": SYNTH_LEVELS, "batch_key": None, "has_counts": True, "coords": {}, "novel": {},
        "semi_synthetic": True, "x_is_cp10k": True, "n_ref": n_ref, "n_query": n_query,
        "n_genes": int(len(source["genes"])), "format": CASE_FORMAT, "seed": seed,
        "title": f"SEMI-SYNTHETIC: {n_ref:,} reference / {n_query:,} query cells resampled from Kang PBMC counts",
        "source": ("kang_ctrl_stim_counts.h5ad (2,000 real cells): 3,000 HVGs; labels = k-means (16) on 50 PCs of centred log1p CP10k, "
                   "coarse = Ward (5) on the fine centroids; 70/30 source split so query profiles never derive "
                   "from reference cells; each synthetic cell = binomial thinning (keep fraction U(0.5, 0.9)) of a "
                   "real profile, exact copies redrawn; written in 50k-cell chunks. No batch key: reference and "
                   "query are draws from the same cells' distribution, and the clusters partly follow the "
                   "ctrl/stim condition, so correcting for it would remove label signal"),
        "source_label_counts": {lv: src_obs[k].value_counts().to_dict() for lv, k in zip(SYNTH_LEVELS, ["coarse", "fine"])},
    }
    write_json(out / "case.json", spec)


# --------------------------------------------------------------------------- registry
def registry(smoke: bool = False) -> dict[str, Callable[[Path], None]]:
    """Case name → function that writes the case into a directory."""
    if smoke:
        return {"smoke_symphony_5p": lambda o: make_symphony(o, "5p", n_cells=300)}
    reg: dict[str, Callable[[Path], None]] = {}
    for chem in ("3pv1", "3pv2", "5p"):
        reg[f"symphony_{chem}"] = lambda o, c=chem: make_symphony(o, c)
    reg["symphony_5p_novel_NK"] = lambda o: make_symphony(o, "5p", novel="NK")
    reg["symphony_5p_novel_B"] = lambda o: make_symphony(o, "5p", novel="B")
    reg["cellbench_celseq2_3line"] = lambda o, **kw: make_cellbench(o, ["CEL-seq2 (3 lines)"], **kw)
    reg["cellbench_dropseq_3line"] = lambda o, **kw: make_cellbench(o, ["Drop-seq (3 lines)"], **kw)
    reg["cellbench_novel_H1975"] = lambda o, **kw: make_cellbench(o, ["CEL-seq2 (3 lines)", "Drop-seq (3 lines)"],
                                                                   novel="H1975", **kw)
    for name in ("cellbench_celseq2_3line", "cellbench_dropseq_3line", "cellbench_novel_H1975"):
        # not in the benchmark's case list: every detected gene, for gene-selection studies
        reg[f"{name}_allgenes"] = lambda o, f=reg[name]: f(o, n_top_genes=None)
    reg["pbmc68k_70_30"] = make_pbmc68k
    reg["ding2020_dropseq_indrops"] = make_ding
    reg["zilionis_healthy_tumour"] = lambda o: make_zilionis(o)
    reg["zilionis_novel_tumour_subsets"] = lambda o: make_zilionis(o, novel=True)
    reg["brain_mouse_human"] = make_brain
    # added after the defaults were chosen (2026-12-01): an out-of-sample check
    reg["brain_human_mouse"] = lambda o: make_brain(o, reverse=True)
    # added after the defaults were chosen (2026-12-02): out-of-sample checks, the natural splits reversed
    reg["ding2020_indrops_dropseq"] = lambda o: make_ding(o, reverse=True)
    reg["zilionis_tumour_healthy"] = lambda o: make_zilionis(o, reverse=True)
    # ... and two more removed-type cases (2026-12-02), out of sample for the novelty score
    reg["ding2020_novel_B"] = lambda o: make_ding(o, novel="B cell")
    reg["zilionis_tumour_healthy_novel_NK"] = lambda o: make_zilionis(o, reverse=True, remove="NK cells")
    # ... and immune cells across species and tissues, both ways (2026-12-02)
    reg["immune_mouse_lung_human_pbmc"] = make_immune_species
    reg["immune_human_pbmc_mouse_lung"] = lambda o: make_immune_species(o, reverse=True)
    # simulated query shifts; symphony_5p's were among the cases the defaults were chosen on, the other three
    # bases' were added 2026-12-06, after the defaults were chosen (an out-of-sample check)
    for base in ("symphony_5p", "cellbench_celseq2_3line", "ding2020_dropseq_indrops", "zilionis_healthy_tumour"):
        reg[f"{base}_thin_query"] = lambda o, b=base: make_shifted(o, b, "thin")
        reg[f"{base}_missing_genes"] = lambda o, b=base: make_shifted(o, b, "missing_genes")
    # added 2026-12-06 (fortieth session), after the defaults were chosen: an interferon-beta stimulation of
    # the query in silico (the hidden cases of issue 10 hold a real one; the shared data has no labelled one)
    for base, species in (("symphony_5p", "human"), ("ding2020_dropseq_indrops", "human"),
                          ("zilionis_healthy_tumour", "mouse"), ("symphony_5p_novel_NK", "human"),
                          ("ding2020_novel_B", "human"), ("zilionis_tumour_healthy_novel_NK", "mouse")):
        reg[f"{base}_interferon"] = lambda o, b=base, s=species: make_shifted(o, b, "interferon", species=s)
    # added 2026-12-07 (fifty-second session), after the defaults were chosen: ambient RNA added to the same six
    # queries (a droplet protocol's contamination; none of the shared datasets' queries is known to carry much)
    for base in ("symphony_5p", "ding2020_dropseq_indrops", "zilionis_healthy_tumour", "symphony_5p_novel_NK",
                 "ding2020_novel_B", "zilionis_tumour_healthy_novel_NK"):
        reg[f"{base}_ambient"] = lambda o, b=base: make_shifted(o, b, "ambient")
    # added 2026-12-06 (forty-second session), not in the benchmark's case list: five more removed-type cases,
    # for novelty research only (no peers run on them; API contract, "Measured 2026-12-06, forty-second session")
    reg["symphony_3pv1_novel_B"] = lambda o: make_symphony(o, "3pv1", novel="B")
    reg["symphony_3pv2_novel_B"] = lambda o: make_symphony(o, "3pv2", novel="B")
    reg["symphony_5p_novel_Mono_CD14"] = lambda o: make_symphony(o, "5p", novel="Mono_CD14")
    reg["zilionis_healthy_tumour_novel_B"] = lambda o: make_zilionis(o, remove="B cells")
    reg["zilionis_tumour_healthy_novel_B"] = lambda o: make_zilionis(o, reverse=True, remove="B cells")
    for tag, n in SYNTH_SIZES.items():
        reg[f"synthetic_{tag}"] = lambda o, n=n: make_synthetic(o, n)
    return reg


def prepare(name: str, smoke: bool = False, root: Path | None = None, force: bool = False) -> Path:
    """Write case ``name`` unless an up-to-date copy exists; return its directory."""
    out = Path(root or WORK_DIR / "cases") / name
    spec_path = out / "case.json"
    if not force and spec_path.exists():
        try:
            if read_json(spec_path).get("format") == CASE_FORMAT:
                return out
        except ValueError:
            pass
    registry(smoke)[name](out)
    return out


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
