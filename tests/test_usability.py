"""What a user sees: printed summaries, where warnings point, loading a model by its folder."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.sparse as sp

import atlasmtl
import atlasmtl.calibration
from atlasmtl.exceptions import ArtifactError
from atlasmtl.runtime import format_sections

from .synthetic import SYNTHETIC_LEVELS, synthetic_adata


# ---------------------------------------------------------------- summaries
def test_summaries_use_one_key_style_print_no_none_and_count_cell_epochs(synthetic_model, synthetic_split):
    _, query = synthetic_split
    result = atlasmtl.predict(synthetic_model, query, show_progress=False, show_summary=False)
    for title, sections in (("atlasmtl model", synthetic_model.resource_summary()),
                            ("atlasmtl prediction", result.summary())):
        text = format_sections(title, sections)
        assert "None" not in text, text
        keys = [line.split(" : ")[0].strip() for line in text.splitlines() if " : " in line]
        assert keys and not [k for k in keys if "_" in k], keys  # plain words, no snake_case keys
    training = synthetic_model.resource_summary()["training"]
    epochs = synthetic_model.train_config["resource_summary"]["epochs completed"]
    cells = synthetic_model.train_config["resource_summary"]["training cells"]
    members = synthetic_model.train_config["resource_summary"]["ensemble members"]
    # training throughput counts cells × epochs (of every ensemble member, and of the networks that cross-fit
    # the temperatures of this small reference), and says so
    crossfit = synthetic_model.train_config["calibration"]["crossfit"]
    # (the further networks have fewer members than the model's ten: calibration.CROSSFIT_MEMBERS)
    assert crossfit["networks"] == 4 and crossfit["members"] == atlasmtl.calibration.CROSSFIT_MEMBERS < members
    assert crossfit["cell_epochs"] > 3 * cells * epochs * crossfit["members"]
    assert training["cell-epochs"] == f"{cells * epochs * members + crossfit['cell_epochs']:,}"
    assert "cells" not in training.get("throughput", "cells")
    assert training["throughput"].endswith("cell-epochs/s")
    runtime = result.summary()["runtime"]
    assert runtime["cells"] == f"{query.n_obs:,}" and runtime["throughput"].endswith(" cells/s")


# ---------------------------------------------------------------- warnings point at the caller
def _ours(record, pattern):
    hits = [w for w in record if re.search(pattern, str(w.message))]
    assert hits, [str(w.message) for w in record]
    return hits


@pytest.mark.parametrize("case", ["early_stopping", "unlabelled", "gene_overlap", "csc_matrix", "novel_labels"])
def test_warnings_point_at_the_users_line(case, synthetic_split, synthetic_model):
    ref, query = synthetic_split
    kw = dict(num_epochs=1, show_progress=False, show_summary=False)
    with pytest.warns(UserWarning) as record:
        if case == "early_stopping":
            atlasmtl.build_model(ref, SYNTHETIC_LEVELS, early_stopping_patience=2, **kw)
            pattern = "early stopping is disabled"
        elif case == "unlabelled":
            ref = ref.copy()
            ref.obs["fine"] = ref.obs["fine"].astype(object)
            ref.obs.iloc[:5, ref.obs.columns.get_loc("fine")] = np.nan
            atlasmtl.build_model(ref, SYNTHETIC_LEVELS, **kw)
            pattern = "no label in 'fine'"
        elif case == "gene_overlap":
            atlasmtl.predict(synthetic_model, query[:, :90].copy(), show_progress=False, show_summary=False)
            pattern = "model genes .* were found in the query"
        elif case == "csc_matrix":
            q = query.copy()
            q.X = sp.csc_matrix(q.X)
            atlasmtl.predict(synthetic_model, q, show_progress=False, show_summary=False)
            pattern = "converted to CSR"
        else:
            result = atlasmtl.predict(synthetic_model, query, show_progress=False, show_summary=False)
            atlasmtl.evaluate(result, query.obs, novel_labels={"fine": ["not a type"]})
            pattern = "lists labels no evaluated cell has"
    for warning in _ours(record, pattern):
        assert warning.filename == __file__, (warning.filename, warning.lineno, str(warning.message))


# ---------------------------------------------------------------- models by folder
def test_save_to_a_folder_and_load_the_folder(synthetic_model, synthetic_split, tmp_path):
    _, query = synthetic_split
    files = synthetic_model.save(f"{tmp_path}/model/")  # a str: pathlib drops the trailing slash
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "model.pth", "model_embedding.npy", "model_manifest.json", "model_metadata.pkl", "model_reference.pkl"]
    assert files["manifest"] == str(tmp_path / "model" / "model_manifest.json")
    loaded = atlasmtl.TrainedModel.load(tmp_path / "model")
    a = atlasmtl.predict(synthetic_model, query, show_progress=False, show_summary=False)
    b = atlasmtl.predict(loaded, query, show_progress=False, show_summary=False)
    for level in SYNTHETIC_LEVELS:
        np.testing.assert_array_equal(a.levels[level].pred, b.levels[level].pred)
    # a folder with two models is ambiguous, an empty one holds none: both say so
    synthetic_model.save(tmp_path / "model" / "other.pth")
    with pytest.raises(ArtifactError, match="holding 2 model manifests"):
        atlasmtl.TrainedModel.load(tmp_path / "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="holding 0 model manifests"):
        atlasmtl.TrainedModel.load(tmp_path / "empty")


def test_an_ensemble_trains_under_one_progress_bar(synthetic_split, capsys):
    """Ten members drew ten bars one after another (a notebook's output filled with them); one bar now
    counts every network's epochs, naming the network in training."""
    ref, _ = synthetic_split
    atlasmtl.build_model(ref, SYNTHETIC_LEVELS, num_epochs=3, ensemble_size=3, min_steps=0, num_threads=1,
                         show_progress=True, show_summary=False)
    err = capsys.readouterr().err.replace("\r", "\n")
    totals = set(re.findall(r"atlasmtl training[^|\n]*\|[^|]*\| *\d+/(\d+)", err))
    assert totals == {"9"}, totals  # 3 networks × 3 epochs, one bar
    assert "(network 3/3)" in err and " 9/9 " in err


def test_every_public_module_is_reached_from_import_atlasmtl():
    """atlasmtl.datasets and atlasmtl.distributed needed their own import (AttributeError after `import atlasmtl`,
    where scanpy users write sc.datasets...); they load on first use now, as pl and report do, and `import atlasmtl`
    itself still loads none of them."""
    import subprocess
    import sys

    code = ("import sys, atlasmtl\n"
            "assert not {'atlasmtl.datasets', 'atlasmtl.distributed', 'torch'} & set(sys.modules)\n"
            "print(callable(atlasmtl.datasets.pbmc68k_reference_query), atlasmtl.distributed.world_size(),\n"
            "      sorted({'datasets', 'distributed'} & set(dir(atlasmtl))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True 1 ['datasets', 'distributed']"
