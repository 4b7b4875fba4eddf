"""Small synthetic AnnData for fast unit tests (as anndata's ``gen_adata`` / scvi-tools' ``synthetic_iid``).

Real-data tests (``pbmc68k_reduced``, the Symphony PBMC fixture) check behaviour on real
cells; these objects check mechanics — shapes, dtypes, determinism, error paths — in a
fraction of the time. Each cell type has its own block of marker genes, so a network can
learn the labels in a few epochs.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

#: Two-level hierarchy of the synthetic cells: fine type → coarse lineage.
SYNTHETIC_HIERARCHY = {"T_a": "T", "T_b": "T", "B_a": "B", "B_b": "B", "M_a": "M", "M_b": "M"}
SYNTHETIC_LEVELS = ["coarse", "fine"]


def synthetic_adata(
    n_obs: int = 300,
    n_vars: int = 120,
    *,
    sparse: bool = True,
    counts: bool = True,
    markers_per_type: int = 8,
    random_state: int = 0,
) -> ad.AnnData:
    """Cells × genes with two label levels, a 2-D ``X_umap`` and a 10-D ``X_ref_latent``.

    Parameters
    ----------
    n_obs, n_vars
        Shape. ``n_vars`` must leave room for the marker blocks (6 types × ``markers_per_type``).
    sparse
        CSR ``X`` (default) or a dense ``ndarray``.
    counts
        Integer Poisson counts (default) or their log1p.
    markers_per_type
        Genes per type whose rate is raised tenfold in that type.
    random_state
        Seed; the same seed gives the same object.
    """
    fine_types = list(SYNTHETIC_HIERARCHY)
    if n_vars < len(fine_types) * markers_per_type:
        raise ValueError(f"n_vars={n_vars} leaves no room for {markers_per_type} markers per type")
    rng = np.random.default_rng(random_state)
    fine = np.asarray(fine_types)[np.arange(n_obs) % len(fine_types)]
    rng.shuffle(fine)
    rate = np.full((n_obs, n_vars), 0.3)
    for t, name in enumerate(fine_types):
        rate[np.ix_(fine == name, np.arange(t * markers_per_type, (t + 1) * markers_per_type))] = 3.0
    X = rng.poisson(rate).astype(np.float32)
    if not counts:
        X = np.log1p(X)
    centres = rng.normal(scale=5.0, size=(len(fine_types), 2))
    type_index = np.array([fine_types.index(f) for f in fine])
    umap = centres[type_index] + rng.normal(scale=0.5, size=(n_obs, 2))
    obs = pd.DataFrame(
        {"coarse": [SYNTHETIC_HIERARCHY[f] for f in fine], "fine": fine,
         "batch": np.where(np.arange(n_obs) % 3 == 0, "b1", "b0")},
        index=[f"cell{i}" for i in range(n_obs)],
    )
    return ad.AnnData(
        X=sp.csr_matrix(X) if sparse else X,
        obs=obs,
        var=pd.DataFrame(index=[f"gene{j}" for j in range(n_vars)]),
        obsm={"X_umap": umap.astype(np.float32), "X_ref_latent": rng.normal(size=(n_obs, 10)).astype(np.float32)},
    )
