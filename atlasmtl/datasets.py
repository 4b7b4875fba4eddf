"""Embedded example data: real datasets that need no download."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

#: Coarse lineage for each ``bulk_labels`` type of ``pbmc68k_reduced``.
PBMC68K_COARSE = {
    "CD14+ Monocyte": "Myeloid",
    "Dendritic": "Myeloid",
    "CD56+ NK": "NK",
    "CD19+ B": "B",
    "CD34+": "Progenitor",
    "CD4+/CD25 T Reg": "T",
    "CD4+/CD45RO+ Memory": "T",
    "CD4+/CD45RA+/CD25- Naive T": "T",
    "CD8+ Cytotoxic T": "T",
    "CD8+/CD45RA+ Naive Cytotoxic": "T",
}


def pbmc68k_reference_query(test_size: float = 0.3, random_state: int = 0) -> tuple[ad.AnnData, ad.AnnData]:
    """Split scanpy's ``pbmc68k_reduced`` (700 real PBMCs) into a reference and a query.

    The expression values are the log-normalised ``.raw`` (765 genes). Labels:
    ``lineage`` (coarse, 5 classes) and ``bulk_labels`` (fine, 10 classes);
    coordinates: ``obsm["X_umap"]`` and ``obsm["X_pca"]`` (as ``X_ref_latent``).
    The split is stratified by ``bulk_labels``.

    Parameters
    ----------
    test_size
        Share of the cells in the query, in (0, 1); the default 0.3 gives 490 reference and 210 query cells.
    random_state
        Seed of the split.

    Returns
    -------
    tuple of AnnData
        ``(reference, query)``, each with ``obs["lineage"]``, ``obs["bulk_labels"]``, ``obsm["X_umap"]`` and
        ``obsm["X_ref_latent"]``.

    Raises
    ------
    ParameterError
        ``test_size`` outside (0, 1), or so small or large that a side lacks some cell type; ``random_state``
        not an integer in [0, 2**32 - 1].
    """
    import scanpy as sc
    from sklearn.model_selection import train_test_split

    from .validation import as_float, as_int

    test_size = as_float("test_size", test_size, 0.0, 1.0, low_open=True, high_open=True)
    random_state = as_int("random_state", random_state, minimum=0, maximum=2**32 - 1)  # scikit-learn's seeds

    full = sc.datasets.pbmc68k_reduced()
    adata = ad.AnnData(
        X=full.raw.X.copy(),
        obs=full.obs[["bulk_labels"]].copy(),
        var=pd.DataFrame(index=full.raw.var_names.copy()),
        obsm={"X_umap": np.asarray(full.obsm["X_umap"]), "X_ref_latent": np.asarray(full.obsm["X_pca"])},
    )
    adata.obs["bulk_labels"] = adata.obs["bulk_labels"].astype(str)
    adata.obs["lineage"] = adata.obs["bulk_labels"].map(PBMC68K_COARSE)
    adata.obs = adata.obs[["lineage", "bulk_labels"]]
    try:
        ref_idx, query_idx = train_test_split(
            np.arange(adata.n_obs), test_size=test_size, random_state=random_state, stratify=adata.obs["bulk_labels"]
        )
    except ValueError as exc:  # a split too small to hold a cell of every type on both sides
        from .exceptions import ParameterError

        raise ParameterError(f"test_size={test_size} leaves a side of the split without some cell types "
                             f"({exc}); use a share between about 0.02 and 0.98.") from exc
    return adata[np.sort(ref_idx)].copy(), adata[np.sort(query_idx)].copy()
