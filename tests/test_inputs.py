"""Inputs you can trust: gene namespaces, matrix semantics, layers/raw, and backed queries."""

from __future__ import annotations

import hashlib

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import atlasmtl
from atlasmtl.exceptions import GeneAlignmentError, InputError, MatrixSemanticsError
from atlasmtl.genes import build_aligner, detect_namespace, read_gene_map
from atlasmtl.inputs import detect_semantics, get_matrix_source

from .conftest import SYMPHONY_LEVELS, data_file


def _predict(model, query, **kw):
    return atlasmtl.predict(model, query, show_progress=False, **kw)


def _accuracy(result, truth, level):
    return float(np.mean(np.asarray(result.labels(level)) == np.asarray(truth)))


# ---------------------------------------------------------------- namespaces
def test_detect_namespace():
    assert detect_namespace(["CD3E", "LYZ", "MS4A1"]) == "symbol"
    assert detect_namespace(["ENSG00000124126", "ENSG00000272150", "CD3E"]) == "ensembl"
    assert detect_namespace(["ENSG00000124126.12", "ENSMUSG00000000001.4"]) == "ensembl_versioned"


CELLBENCH = "cellbench_celseq2_dropseq.h5ad"  # 20 MB: in the shared data folder only


@pytest.fixture(scope="module")
def cellbench():
    adata = ad.read_h5ad(data_file(CELLBENCH))
    adata = adata[adata.obs["demuxlet_cls"] == "SNG"].copy()
    ref = adata[adata.obs["protocol"].str.startswith("CEL-seq2 5cl")].copy()
    query = adata[~adata.obs["protocol"].str.startswith("CEL-seq2 5cl")].copy()
    return ref, query


@pytest.fixture(scope="module")
def cellbench_model(cellbench):
    ref, _ = cellbench
    return atlasmtl.build_model(ref, ["cell_line"], num_epochs=15, show_progress=False)


def _symbol_named_copy(query):
    """Same cells, var_names replaced by symbol-style names; the Ensembl IDs move to var['gene_ids'].

    No Ensembl→symbol table ships offline, so the symbols are stand-ins derived from the IDs;
    what matters here is that atlasmtl sees a symbol namespace and must map through gene_ids.
    """
    renamed = query.copy()
    renamed.var["gene_ids"] = renamed.var_names.to_numpy()
    renamed.var_names = [f"SYM{g[-6:]}-{i % 7}" for i, g in enumerate(query.var_names)]
    return renamed


@pytest.mark.shared_data(CELLBENCH)
def test_model_on_ensembl_maps_symbol_query_through_gene_ids(cellbench, cellbench_model):
    _, query = cellbench
    base = _predict(cellbench_model, query)
    renamed = _symbol_named_copy(query)
    assert detect_namespace(renamed.var_names) == "symbol"
    mapped = _predict(cellbench_model, renamed)
    genes = mapped.metadata["genes"]
    assert genes["query_namespace"] == "symbol" and genes["model_namespace"] == "ensembl"
    assert genes["mapped_by"] == "query var['gene_ids']"
    assert genes["n_matched"] == base.metadata["genes"]["n_matched"] == len(cellbench_model.genes)
    acc_base = _accuracy(base, query.obs["cell_line"], "cell_line")
    acc_mapped = _accuracy(mapped, query.obs["cell_line"], "cell_line")
    assert acc_base > 0.9
    assert acc_mapped == acc_base
    np.testing.assert_array_equal(mapped.levels["cell_line"]["conf"], base.levels["cell_line"]["conf"])


@pytest.mark.shared_data(CELLBENCH)
def test_symbol_query_without_mapping_is_refused_with_the_fix(cellbench, cellbench_model):
    _, query = cellbench
    renamed = _symbol_named_copy(query)
    del renamed.var["gene_ids"]
    before = renamed.copy()
    with pytest.raises(GeneAlignmentError, match=r"symbol names .* ensembl .* gene_map="):
        _predict(cellbench_model, renamed)
    assert renamed.var_names.equals(before.var_names) and list(renamed.obs.columns) == list(before.obs.columns)


@pytest.mark.shared_data(CELLBENCH)
def test_gene_map_file_and_versioned_ids(cellbench, cellbench_model, tmp_path):
    _, query = cellbench
    base = _predict(cellbench_model, query)
    renamed = _symbol_named_copy(query)
    mapping = pd.DataFrame({"query": renamed.var_names, "model": renamed.var["gene_ids"]})
    del renamed.var["gene_ids"]
    mapping.to_csv(tmp_path / "map.tsv", sep="\t", index=False)
    via_file = _predict(cellbench_model, renamed, gene_map=tmp_path / "map.tsv")
    assert via_file.metadata["genes"]["mapped_by"] == "gene_map"
    np.testing.assert_array_equal(via_file.levels["cell_line"]["code"], base.levels["cell_line"]["code"])
    versioned = query.copy()
    versioned.var_names = [f"{g}.{i % 5 + 1}" for i, g in enumerate(query.var_names)]
    assert detect_namespace(versioned.var_names) == "ensembl_versioned"
    res = _predict(cellbench_model, versioned)
    assert res.metadata["genes"]["n_matched"] == len(cellbench_model.genes)
    np.testing.assert_array_equal(res.levels["cell_line"]["code"], base.levels["cell_line"]["code"])
    # a gene_map keyed by unversioned IDs serves the versioned query (it matched no gene until 2026-12-07)
    unversioned_map = {g: g for g in query.var_names}
    res = _predict(cellbench_model, versioned, gene_map=unversioned_map)
    assert res.metadata["genes"]["n_matched"] == len(cellbench_model.genes)
    np.testing.assert_array_equal(res.levels["cell_line"]["code"], base.levels["cell_line"]["code"])


@pytest.mark.shared_data(CELLBENCH)
def test_duplicated_genes_after_mapping_are_summed_and_reported(cellbench, cellbench_model):
    _, query = cellbench
    # the model's first gene leads (the model keeps the reference's most variable genes)
    first = list(query.var_names).index(cellbench_model.genes[0])
    sub = query[:, [first] + [i for i in range(2000) if i != first]].copy()
    # split one gene's counts over two columns that map to the same ID
    dup = sub[:, :1].copy()
    half = sp.csr_matrix(np.floor(dup.X.toarray() / 2))
    dup.X = half
    sub.X = sp.csr_matrix(sub.X.toarray() - np.hstack([half.toarray(), np.zeros((sub.n_obs, sub.n_vars - 1))]))
    dup.var_names = ["dup_col"]
    both = ad.concat([sub, dup], axis=1)
    both.var["gene_ids"] = list(sub.var_names) + [sub.var_names[0]]
    both.var_names = [f"SYM{i}" for i in range(both.n_vars)]
    with pytest.warns(UserWarning, match="summed"):
        res = _predict(cellbench_model, both, min_gene_overlap=0.1)
    assert res.metadata["genes"]["n_duplicated"] == 1
    assert res.metadata["genes"]["duplicates_handling"] == "summed"


@pytest.mark.shared_data(CELLBENCH)
def test_poor_overlap_warns_and_override_allows_mapping(cellbench, cellbench_model):
    _, query = cellbench
    part = query[:, : int(query.n_vars * 0.3)].copy()
    with pytest.raises(GeneAlignmentError, match="30.0%|lower min_gene_overlap"):
        _predict(cellbench_model, part)
    with pytest.warns(UserWarning, match="model genes"):
        res = _predict(cellbench_model, part, min_gene_overlap=0.0)
    assert res.metadata["genes"]["overlap_fraction"] < 0.5


def test_partial_overlap_warning_names_missing_genes_and_the_fix():
    """Between min_gene_overlap and 80% the warning only said predictions may be less accurate; it now says how
    the genes were matched, names some that are missing and how to match them (API and CLI spelling)."""
    model_genes = [f"G{i}" for i in range(10)]
    with pytest.warns(UserWarning) as caught:
        _align(model_genes, _counts_query(model_genes[:7] + ["X1", "X2"]))
    message = next(str(w.message) for w in caught if "model genes" in str(w.message))
    assert "Only 7 of 10 model genes (70.0%) were found in the query (mapped by var_names" in message
    assert "Missing, e.g.: G7, G8, G9." in message and "gene_map= (--gene-map on the command line)" in message


# ---------------------------------------------------------------- gene_map tables
HUMAN = ["CD3E", "CD3G", "MS4A1", "LYZ", "GFAP", "NKG7"]
MOUSE = ["Cd3e", "Cd3g", "Ms4a1", "Lyz2", "Gfap", "Nkg7"]


def _counts_query(names):
    rng = np.random.default_rng(0)
    query = ad.AnnData(sp.csr_matrix(rng.poisson(2.0, (40, len(names))).astype(np.float32)))
    query.var_names = list(names)
    return query


def _align(model_genes, query, **kw):
    return build_aligner(list(model_genes), "symbol", {}, get_matrix_source(query), "float", "counts", **kw)


def test_gene_map_files_that_cannot_be_read_are_input_errors(tmp_path):
    """A folder, an empty file or one that is not text is an InputError naming the file (they were a raw
    IsADirectoryError, pandas' EmptyDataError or a UnicodeDecodeError), and a tab-separated file named .csv is
    read (it was refused as having one column)."""
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "binary.csv").write_bytes(b"\x00\xff\xfe\x01")
    for path, match in [(tmp_path, "is a folder"), (tmp_path / "empty.csv", "is empty"),
                        (tmp_path / "binary.csv", "Could not read the gene_map file"),
                        (tmp_path / "none.csv", "No such gene_map file")]:
        with pytest.raises(InputError, match=match):
            read_gene_map(path)
    (tmp_path / "tabs.csv").write_text("mouse\thuman\nCd3e\tCD3E\nGfap\tGFAP\n")
    assert read_gene_map(tmp_path / "tabs.csv") == {"Cd3e": "CD3E", "Gfap": "GFAP"}
    with pytest.raises(InputError, match=r"it has 1 \(mouse\)"):
        read_gene_map(pd.DataFrame({"mouse": MOUSE}))

def test_gene_map_file_without_a_header_keeps_its_first_pair(tmp_path):
    """A map file without a header row: its first row names genes, so it is a pair too (it was read as the
    header, and that gene went missing without a word); a file with a header reads as before."""
    rows = "\n".join(f"{m}\t{h}" for m, h in zip(MOUSE, HUMAN)) + "\n"
    (tmp_path / "bare.tsv").write_text(rows)
    (tmp_path / "named.tsv").write_text("mouse\thuman\n" + rows)
    for name in ("bare.tsv", "named.tsv"):
        report = _align(HUMAN, _counts_query(MOUSE), gene_map=tmp_path / name).report
        assert report["n_matched"] == len(HUMAN) and report["n_missing"] == 0


def test_gene_map_separated_by_spaces_is_read(tmp_path):
    """A ``.txt`` map written with spaces (as ``awk`` or ``paste -d ' '`` write it), with or without a header, or
    with runs of spaces aligning its columns: each row is a pair (it was refused as a one-column table)."""
    rows = "\n".join(f"{m}  {h}" for m, h in zip(MOUSE, HUMAN)) + "\n"
    (tmp_path / "bare.txt").write_text(rows)
    (tmp_path / "named.txt").write_text("mouse human\n" + rows)
    (tmp_path / "named.csv").write_text("mouse human\n" + rows)
    for name in ("bare.txt", "named.txt", "named.csv"):
        report = _align(HUMAN, _counts_query(MOUSE), gene_map=tmp_path / name).report
        assert report["n_matched"] == len(HUMAN) and report["n_missing"] == 0, name
    assert read_gene_map(tmp_path / "named.txt") == dict(zip(MOUSE, HUMAN))


def test_one_query_gene_with_several_model_genes_maps_to_the_first_with_a_warning():
    """A one-to-many map (Cd3e → CD3E and Cd3e → CD3G): Cd3e maps to CD3E, the first listed, and a warning
    names it (the last row won without a word, CD3E went missing and Cd3e was summed into CD3G); repeated
    identical rows, or several names for a gene the query lacks, do not warn."""
    table = pd.DataFrame({"mouse": ["Cd3e", "Cd3e"] + MOUSE[1:] + ["Lyz2", "Xist", "Xist"],
                          "human": ["CD3E", "CD3G"] + HUMAN[1:] + ["LYZ", "XIST", "TSIX"]})
    with pytest.warns(UserWarning, match=r"1 query gene\(s\) more than one model gene \(e\.g\. Cd3e → CD3E, "
                                         r"CD3G\); each was mapped to the first") as caught:
        report = _align(HUMAN, _counts_query(MOUSE), gene_map=table).report
    assert not any("Xist" in str(w.message) for w in caught)
    assert report["n_matched"] == len(HUMAN) and report["n_duplicated"] == 0
    with pytest.warns(UserWarning, match="Cd3e → CD3E, CD3G"):
        assert read_gene_map(pd.Series(["CD3E", "CD3G"], index=["Cd3e", "Cd3e"])) == {"Cd3e": "CD3E"}


def test_too_few_genes_through_gene_map_says_what_the_map_holds():
    """A map given the wrong way round (model names first) or naming other genes: the error says so, with the fix
    (it said to check the gene annotation, or to pass the gene_map= that had been passed)."""
    query = _counts_query(MOUSE)
    for reversed_map in (pd.DataFrame({"human": HUMAN, "mouse": MOUSE}), dict(zip(HUMAN, MOUSE))):
        with pytest.raises(GeneAlignmentError, match=r"seems to map the other way .* 6 of its keys \(first column\) "
                                                     r"are model genes .* swap the table's two columns"):
            _align(HUMAN, query, gene_map=reversed_map)
    ensembl = [f"ENSG{i:011d}" for i in range(1, 7)]
    with pytest.raises(GeneAlignmentError, match=r"names 0 of the query's genes among its keys .* 6 of the model's"):
        build_aligner(ensembl, "ensembl", {}, get_matrix_source(query), "float", "counts",
                      gene_map=dict(zip(HUMAN, ensembl)))


def test_too_few_genes_through_a_var_column_or_ensembl_ids_of_two_species_names_the_cause():
    """Mouse Ensembl IDs (ENSMUSG…) against a human Ensembl model (ENSG…), in var_names or in the var['gene_ids']
    column atlasmtl mapped through: the error names the two species' prefixes and an orthologue gene_map (it said
    to check the annotation, or, for the column, to add the gene_ids column the query has)."""
    human = [f"ENSG{i:011d}" for i in range(1, 7)]
    mouse = [f"ENSMUSG{i:011d}" for i in range(1, 7)]
    by_column = _counts_query(MOUSE)
    by_column.var["gene_ids"] = mouse
    for query in (_counts_query(mouse), by_column):
        with pytest.raises(GeneAlignmentError, match=r"Ensembl IDs are ENSMUSG… and the model's ENSG…: genes of two "
                                                     r"species.* gene_map= a table of orthologues") as caught:
            build_aligner(human, "ensembl", {}, get_matrix_source(query), "float", "counts")
        assert "add a var column" not in str(caught.value)
    by_column.var["gene_ids"] = [f"ENSG{i:011d}" for i in range(100, 106)]  # another annotation
    with pytest.raises(GeneAlignmentError, match=r"mapped by query var\['gene_ids'\]\).* same gene annotation") as caught:
        build_aligner(human, "ensembl", {}, get_matrix_source(by_column), "float", "counts")
    assert "add a var column" not in str(caught.value)



def test_ensembl_query_against_a_symbol_model_is_told_which_column_and_the_cli_option():
    """Ensembl var_names, no column mapping them, against a symbol model: the error suggests a column of symbols
    ('gene_symbols'; it said 'gene_ids', the column that holds Ensembl IDs in 10x files) and names --gene-map."""
    query = _counts_query([f"ENSG{i:011d}" for i in range(1, 7)])
    with pytest.raises(GeneAlignmentError, match=r"a var column holding the model's symbol names \(e.g. "
                                                 r"'gene_symbols'\), or pass gene_map= \(--gene-map on the command"):
        _align(HUMAN, query)
    query.var["gene_symbols"] = HUMAN  # the fix the message gives
    assert _align(HUMAN, query).report["n_matched"] == len(HUMAN)

# ---------------------------------------------------------------- matrix semantics
@pytest.mark.shared_data(CELLBENCH)
def test_detect_semantics_on_real_files(symphony, cellbench):
    assert detect_semantics(get_matrix_source(cellbench[0]))["semantics"] == "counts"
    assert detect_semantics(get_matrix_source(symphony))["semantics"] == "lognorm"
    pbmc = sc.datasets.pbmc68k_reduced()
    assert detect_semantics(get_matrix_source(pbmc))["semantics"] == "scaled"
    assert detect_semantics(get_matrix_source(pbmc, use_raw=True))["semantics"] == "lognorm"


def test_scaled_data_is_refused_with_use_raw_hint():
    pbmc = sc.datasets.pbmc68k_reduced()
    pbmc.obs["coarse"] = pbmc.obs["bulk_labels"].astype(str).str[:3]
    before = pbmc.obs.copy()
    with pytest.raises(MatrixSemanticsError, match=r"use_raw=True \(--use-raw on the command line\).*"
                                                   r"layer='counts' \(--layer counts\)"):
        atlasmtl.build_model(pbmc, ["coarse", "bulk_labels"], num_epochs=1, show_progress=False)
    pd.testing.assert_frame_equal(pbmc.obs, before)
    model = atlasmtl.build_model(pbmc, ["coarse", "bulk_labels"], use_raw=True, num_epochs=3, show_progress=False)
    assert model.metadata["train_semantics"]["semantics"] == "lognorm"
    assert model.metadata["train_semantics"]["source"] == "raw.X"
    with pytest.raises(MatrixSemanticsError, match="scaled or centred"):
        _predict(model, pbmc)
    assert _predict(model, pbmc, use_raw=True).n_obs == pbmc.n_obs


def _with_counts_layer(adata):
    counts = adata.X.copy()
    counts.data = np.round(np.expm1(counts.data) * np.repeat(adata.obs["nUMI"].to_numpy() / 1e4, np.diff(counts.indptr)))
    adata.layers["counts"] = counts
    return adata


def test_float_model_normalises_a_counts_query(symphony_split):
    ref, query = symphony_split
    query = _with_counts_layer(query.copy())
    model = atlasmtl.build_model(ref, SYMPHONY_LEVELS, input_transform="float", num_epochs=15, show_progress=False)
    assert model.metadata["train_semantics"]["semantics"] == "lognorm"
    on_log = _predict(model, query)
    on_counts = _predict(model, query, layer="counts")
    assert on_counts.metadata["input"]["semantics"] == "counts"
    assert "normalised" in on_counts.metadata["input"]["normalisation"]
    agree = np.mean(on_log.levels["cell_type"]["raw_code"] == on_counts.levels["cell_type"]["raw_code"])
    assert agree > 0.97
    # zscore models (the default) normalise counts the same way before standardising
    zscore = atlasmtl.build_model(ref, SYMPHONY_LEVELS, num_epochs=15, show_progress=False)
    assert zscore.metadata["input_transform"] == "zscore"
    agree = np.mean(_predict(zscore, query).levels["cell_type"]["raw_code"]
                    == _predict(zscore, query, layer="counts").levels["cell_type"]["raw_code"])
    assert agree > 0.97
    # binary models use counts and log values alike
    binary = atlasmtl.build_model(ref, SYMPHONY_LEVELS, input_transform="binary", num_epochs=15, show_progress=False)
    np.testing.assert_array_equal(
        _predict(binary, query).levels["cell_type"]["conf"],
        _predict(binary, query, layer="counts").levels["cell_type"]["conf"],
    )


def test_training_on_counts_layer_records_it(symphony_split):
    ref, query = symphony_split
    ref = _with_counts_layer(ref.copy())
    model = atlasmtl.build_model(ref, SYMPHONY_LEVELS, layer="counts", input_transform="float", num_epochs=15,
                                 show_progress=False)
    assert model.metadata["train_semantics"]["semantics"] == "counts"
    assert model.train_config["layer"] == "counts"
    res = _predict(model, query)  # log-normalised query against a counts-trained float model
    assert _accuracy(res, query.obs["cell_type_broad"], "cell_type_broad") > 0.85


# ---------------------------------------------------------------- backed and on-disk queries
def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_backed_query_streams_and_writes_a_new_h5ad(symphony_model, symphony_split, tmp_path):
    _, query = symphony_split
    path = tmp_path / "query.h5ad"
    query.write_h5ad(path)
    digest = _sha(path)
    in_memory = _predict(symphony_model, query, batch_size=100)
    from_path = _predict(symphony_model, path, batch_size=100)
    backed = ad.read_h5ad(path, backed="r")
    from_backed = _predict(symphony_model, backed, batch_size=64)
    for res in (from_path, from_backed):
        for lv in SYMPHONY_LEVELS:
            np.testing.assert_allclose(res.levels[lv]["conf"], in_memory.levels[lv]["conf"], rtol=1e-6)
            np.testing.assert_array_equal(res.levels[lv]["code"], in_memory.levels[lv]["code"])
    out = tmp_path / "annotated.h5ad"
    from_path.write_h5ad(out, path, mode="full")
    backed.file.close()
    assert _sha(path) == digest  # the source file is untouched
    annotated = ad.read_h5ad(out)
    assert annotated.obs["pred_cell_type"].astype(str).tolist() == list(np.asarray(in_memory.labels("cell_type")))
    assert "cell_type" in annotated.obs and "knn_vote_frac_cell_type" in annotated.obs
    assert (annotated.X != query.X).nnz == 0
    assert annotated.uns["atlasmtl"]["genes"]["n_matched"] == query.n_vars
    csv = tmp_path / "pred.csv"
    from_path.to_csv(csv, mode="standard")
    assert pd.read_csv(csv, index_col=0).shape == (query.n_obs, 8)
    with pytest.raises(atlasmtl.exceptions.InputError, match="overwrite its source"):
        from_path.write_h5ad(path, path)


def test_in_memory_write_h5ad_leaves_the_anndata_alone(symphony_model, symphony_split, tmp_path):
    _, query = symphony_split
    query = query.copy()
    cols = list(query.obs.columns)
    res = _predict(symphony_model, query)
    res.write_h5ad(tmp_path / "out.h5ad", query, include_coords=True)
    assert list(query.obs.columns) == cols
    assert "pred_cell_type" in ad.read_h5ad(tmp_path / "out.h5ad").obs


def test_write_h5ad_from_a_view_of_a_backed_query_writes_the_views_cells(symphony_model, symphony_split, tmp_path):
    """A view of a backed query (``backed[:50]``): write_h5ad copied the whole file and wrote the view's 50-row
    obs into it, an .h5ad anndata cannot read, and reported success."""
    _, query = symphony_split
    path = tmp_path / "query.h5ad"
    query.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    view = backed[:50]
    res = _predict(symphony_model, view)
    res.write_h5ad(tmp_path / "subset.h5ad", view)
    back = ad.read_h5ad(tmp_path / "subset.h5ad")
    assert list(back.obs_names) == list(query.obs_names[:50])
    np.testing.assert_array_equal(back.X.toarray() if hasattr(back.X, "toarray") else back.X,
                                  query.X[:50].toarray() if hasattr(query.X, "toarray") else query.X[:50])
    assert (back.obs["pred_cell_type"].astype(str).to_numpy() == res.to_dataframe()["pred_cell_type"].astype(str)
            .to_numpy()).all()
    backed.file.close()


def test_path_query_reads_only_the_chosen_matrix(symphony_model, symphony_split, tmp_path):
    _, query = symphony_split
    query = _with_counts_layer(query.copy())
    path = tmp_path / "query_layers.h5ad"
    query.write_h5ad(path)
    from_layer = _predict(symphony_model, path, layer="counts")
    in_memory = _predict(symphony_model, query, layer="counts")
    assert from_layer.metadata["input"]["semantics"] == "counts"
    np.testing.assert_array_equal(from_layer.levels["cell_type"]["conf"], in_memory.levels["cell_type"]["conf"])
    with pytest.raises(atlasmtl.exceptions.InputError, match="layer='spliced' is not in"):
        _predict(symphony_model, path, layer="spliced")
    with pytest.raises(atlasmtl.exceptions.InputError, match="has no raw"):
        _predict(symphony_model, path, use_raw=True)


def test_a_backed_sparse_query_reports_its_zeros(tmp_path):
    """Read from disk, a sparse matrix was judged on its stored values alone: the report's 'Query input' said
    min 0.832 for log-normalised data that is two-thirds zeros (in memory: min 0)."""
    rng = np.random.default_rng(0)
    x = sp.random(60, 40, density=0.3, format="csr", random_state=0, dtype=np.float32)
    x.data = np.log1p(rng.integers(1, 20, x.nnz)).astype(np.float32)
    adata = ad.AnnData(x)
    adata.write_h5ad(tmp_path / "q.h5ad")
    in_memory = detect_semantics(get_matrix_source(adata))
    backed = detect_semantics(get_matrix_source(ad.read_h5ad(tmp_path / "q.h5ad", backed="r")))
    assert backed == in_memory and backed["min"] == 0.0 and backed["semantics"] == "lognorm"
