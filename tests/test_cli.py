"""The ``atlasmtl`` command line, run as a real process on real data (pbmc68k_reduced split)."""

from __future__ import annotations

import functools
import inspect
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import atlasmtl
from atlasmtl import cli
from atlasmtl.validation import option_spelling

from .conftest import LEVELS

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    """Run ``python -m atlasmtl.cli ARGS`` in a fresh process."""
    env = dict(os.environ, PYTHONWARNINGS="ignore::FutureWarning")
    return subprocess.run([sys.executable, "-m", "atlasmtl.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, pattern: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("atlasmtl"), lines[0]
    assert pattern in lines[0], lines[0]


@pytest.fixture(scope="module")
def files(pbmc_split, tmp_path_factory):
    ref, query = pbmc_split
    d = tmp_path_factory.mktemp("cli")
    ref.write_h5ad(d / "ref.h5ad")
    query.write_h5ad(d / "query.h5ad")
    return d


@pytest.fixture(scope="module")
def trained(files):
    proc = run("train", "--reference", "ref.h5ad", "--labels", ",".join(LEVELS),
               "--coords", "latent=X_ref_latent,umap=X_umap", "--out", "model", "--num-epochs", "4", "--hidden-sizes", "128,64",
               "--random-state", "3", "--json", cwd=files)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_train_writes_the_model_and_a_json_summary(files, trained):
    assert trained["ok"] is True and trained["command"] == "train"
    assert trained["model"] == str(Path("model") / "model_manifest.json")
    for path in trained["files"].values():
        assert (files / path).is_file()
    model = atlasmtl.TrainedModel.load(files / trained["model"])
    assert model.label_columns == LEVELS
    assert trained["levels"] == {"lineage": 5, "bulk_labels": 10}
    assert model.coord_targets == {"latent": "X_ref_latent", "umap": "X_umap"}
    assert model.train_config["num_epochs"] == 4 and model.train_config["random_state"] == 3
    assert model.metadata["architecture"]["hidden_sizes"] == [128, 64]
    assert trained["n_genes"] == 765 and trained["reference_cells"] == 490


def test_predict_table_and_h5ad_match_the_python_api(files, trained, monkeypatch, capsys):
    monkeypatch.chdir(files)  # the CSV run in-process (same main()), the .h5ad run as a real process below
    assert cli.main(["predict", "--model", trained["model"], "--query", "query.h5ad", "--out", "pred.tsv.gz",
                     "--mode", "standard", "--confidence-high", "0.8", "--knn-k", "10"]) == 0
    assert "wrote 210 predictions to pred.tsv.gz (--mode standard: labels, confidences, margins and Unknown flags; " \
        "--mode full adds" in capsys.readouterr().out
    table = pd.read_csv(files / "pred.tsv.gz", sep="\t", index_col=0)  # a compressed table of tabs, as named
    model = atlasmtl.TrainedModel.load(files / trained["model"])
    expected = atlasmtl.predict(model, str(files / "query.h5ad"), confidence_high=0.8, knn_k=10,
                                show_progress=False).to_dataframe("standard")
    assert list(table.columns) == list(expected.columns)
    assert list(table.index) == list(expected.index)
    for level in LEVELS:
        np.testing.assert_array_equal(table[f"pred_{level}"].to_numpy(), expected[f"pred_{level}"].astype(str).to_numpy())
        np.testing.assert_allclose(table[f"conf_{level}"], expected[f"conf_{level}"], rtol=1e-6)

    proc = run("predict", "--model", "model", "--query", "query.h5ad", "--out", "out/annotated.h5ad",
               "--mode", "full", "--include-coords", "--json", cwd=files)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    annotated = ad.read_h5ad(files / "out" / "annotated.h5ad")
    assert annotated.n_obs == 210 and "pred_bulk_labels_knn" in annotated.obs
    assert annotated.obsm["X_pred_umap"].shape == (210, 2)
    assert list(annotated.obs.columns[:2]) == LEVELS  # the query's own columns are kept
    for level in LEVELS:
        counts = annotated.obs[f"pred_{level}"].astype(str).value_counts().to_dict()
        assert summary["levels"][level]["label_counts"] == counts
        assert summary["levels"][level]["unknown_rate"] == pytest.approx(
            annotated.obs[f"is_unknown_{level}"].mean(), abs=1e-6)
    assert summary["genes"]["n_matched"] == 765 and summary["warnings"] == []


def test_predict_with_a_batch_key_matches_the_python_api(files, trained, monkeypatch, capsys):
    """--batch-key reads the column from the file's obs (the matrix stays on disk) and judges each batch alone,
    as predict(..., batch_key=...) does; a column the query lacks is a one-line error naming the fix."""
    query = ad.read_h5ad(files / "query.h5ad")
    query.obs["sample"] = np.where(np.arange(query.n_obs) % 3 == 0, "b", "a")
    query.write_h5ad(files / "query_batches.h5ad")
    monkeypatch.chdir(files)
    assert cli.main(["predict", "--model", trained["model"], "--query", "query_batches.h5ad", "--out", "keyed.csv",
                     "--batch-key", "sample", "--mode", "full"]) == 0
    table = pd.read_csv(files / "keyed.csv", index_col=0)
    model = atlasmtl.TrainedModel.load(files / trained["model"])
    expected = atlasmtl.predict(model, query, batch_key="sample", show_progress=False)
    assert {name: rec["cells"] for name, rec in expected.metadata["batches"].items()} == {"a": 140, "b": 70}
    frame = expected.to_dataframe("full")
    for level in LEVELS:
        np.testing.assert_array_equal(table[f"pred_{level}"].to_numpy(), frame[f"pred_{level}"].astype(str).to_numpy())
        np.testing.assert_allclose(table[f"novelty_{level}"], frame[f"novelty_{level}"], rtol=1e-5)
    capsys.readouterr()
    assert cli.main(["predict", "--model", trained["model"], "--query", "query_batches.h5ad", "--out", "bad.csv",
                     "--batch-key", "donor"]) != 0
    err = capsys.readouterr().err
    # the option as the command line spells it (the API's message says batch_key='donor')
    assert "--batch-key 'donor' is not a column of the query's obs" in err and "'sample'" in err
    assert "Traceback" not in err
    assert not (files / "bad.csv").exists()


def test_report_from_saved_predictions_with_the_installed_script(files, trained):
    assert (files / "out" / "annotated.h5ad").exists(), "runs after the predict test"
    exe = shutil.which("atlasmtl")
    assert exe, "the atlasmtl console script is not installed; run pip install -e ."
    proc = subprocess.run([exe, "report", "--model", trained["model"], "--query", "query.h5ad", "--predictions",
                           "out/annotated.h5ad", "--truth-columns", "lineage,bulk_labels", "--reference", "ref.h5ad",
                           "--out", "report.html", "--json"], cwd=files, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    text = (files / "report.html").read_text()
    assert summary["bytes"] == (files / "report.html").stat().st_size
    assert text.count("<img ") == 9  # with the novelty figure
    assert summary["truth_columns"] == {"lineage": "lineage", "bulk_labels": "bulk_labels"}
    truth = ad.read_h5ad(files / "query.h5ad").obs
    pred = ad.read_h5ad(files / "out" / "annotated.h5ad").obs
    accuracy = np.mean(pred["pred_bulk_labels"].astype(str) == truth["bulk_labels"].astype(str))
    assert summary["metrics"]["bulk_labels"]["accuracy"] == pytest.approx(accuracy)


def test_filters_split_one_file_into_reference_and_query(files, trained, monkeypatch, capsys):
    """One file with both sides: --reference-filter for training, --query-filter for prediction."""
    ref, query = ad.read_h5ad(files / "ref.h5ad"), ad.read_h5ad(files / "query.h5ad")
    ref.obs["side"], query.obs["side"] = "reference", "query"
    ad.concat([ref, query], merge="same").write_h5ad(files / "both.h5ad")
    monkeypatch.chdir(files)
    # predicting the selected cells of the combined file = predicting the separate query file
    for name, extra in (("separate", ["--query", "query.h5ad"]),
                        ("filtered", ["--query", "both.h5ad", "--query-filter", "side=query"])):
        assert cli.main(["predict", "--model", "model", *extra, "--out", f"{name}.h5ad", "--mode", "full",
                         "--no-show-progress", "--quiet"]) == 0
    separate, filtered = ad.read_h5ad(files / "separate.h5ad"), ad.read_h5ad(files / "filtered.h5ad")
    assert list(filtered.obs_names) == list(query.obs_names)
    pd.testing.assert_frame_equal(filtered.obs.drop(columns="side"), separate.obs, check_categorical=False)
    # training on the cells that are not the query: the same 490 cells as ref.h5ad
    assert cli.main(["train", "--reference", "both.h5ad", "--reference-filter", "side!=query", "--labels", "lineage",
                     "--out", "split_model", "--num-epochs", "1", "--no-show-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["reference_cells"] == ref.n_obs and summary["reference_filter"] == "side!=query"
    assert (files / "split_model" / "model_manifest.json").is_file()
    # the report's --json records its selections too, as train's and predict's do (it did not)
    assert cli.main(["report", "--model", "model", "--query", "both.h5ad", "--query-filter", "side=query",
                     "--reference", "both.h5ad", "--reference-filter", "side!=query", "--out", "filtered.html",
                     "--no-show-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_cells"] == query.n_obs
    assert summary["query_filter"] == "side=query" and summary["reference_filter"] == "side!=query"


def test_repeated_filters_select_the_cells_that_pass_every_one(files, trained, monkeypatch, capsys):
    """Two --query-filter options combine (a cell must pass both); the second one used to replace the first
    silently, so a user splitting one file by two columns predicted or trained on the wrong cells."""
    ref, query = ad.read_h5ad(files / "ref.h5ad"), ad.read_h5ad(files / "query.h5ad")
    ref.obs["side"], query.obs["side"] = "reference", "query"
    ad.concat([ref, query], merge="same").write_h5ad(files / "both2.h5ad")
    lineage = str(query.obs["lineage"].value_counts().index[0])
    want = query.obs_names[(query.obs["lineage"].astype(str) == lineage).to_numpy()]
    monkeypatch.chdir(files)
    assert cli.main(["predict", "--model", "model", "--query", "both2.h5ad", "--query-filter", "side=query",
                     "--query-filter", f"lineage={lineage}", "--out", "two.csv", "--no-show-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_cells"] == len(want) < query.n_obs
    assert summary["query_filter"] == ["side=query", f"lineage={lineage}"]
    assert list(pd.read_csv(files / "two.csv", index_col=0).index) == list(want)
    # selections that no cell passes together: an input error (exit 2) that says so, no file written
    assert cli.main(["predict", "--model", "model", "--query", "both2.h5ad", "--query-filter", "side=reference",
                     "--query-filter", "side=query", "--out", "none.csv", "--no-show-progress"]) == 2
    assert "must pass every selection" in capsys.readouterr().err
    assert not (files / "none.csv").exists()


def test_train_out_folder_or_pth_path(files, trained):
    """--out DIR writes DIR/model.pth ...; --out DIR/name.pth writes name.pth, name_manifest.json ... in DIR."""
    assert Path(trained["model"]) == Path("model") / "model_manifest.json"
    assert cli._weights_path("m") == Path("m") / "model.pth"
    assert cli._weights_path("m/atlas_v2.pth") == Path("m") / "atlas_v2.pth"
    assert cli._weights_path("runs/v1.2/") == Path("runs/v1.2") / "model.pth"  # a trailing slash: a folder
    with pytest.raises(cli.UsageError, match="does not end in .pth"):
        cli._weights_path("m/model.pt")


def test_train_says_where_the_model_is_as_the_user_named_it(files, monkeypatch, capsys):
    """The first line names --out as typed (quoted for the shell) and the --model that loads it."""
    monkeypatch.chdir(files)
    argv = ["train", "--reference", "ref.h5ad", "--labels", "lineage", "--num-epochs", "1", "--ensemble-size", "1",
            "--hidden-sizes", "32", "--no-show-progress", "--out", "my model"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "wrote the model to 'my model' (5 files; use it with --model 'my model')", first
    model_arg = shlex.split(first.split("--model ", 1)[1].rstrip(")"))[0]
    assert atlasmtl.TrainedModel.load(files / model_arg).label_columns == ["lineage"]


def test_bad_model_is_one_line_with_a_stable_exit_code(files, trained):
    broken = files / "broken"
    shutil.copytree(files / "model", broken)
    with open(broken / "model.pth", "ab") as fh:
        fh.write(b"tampered")
    proc = run("predict", "--model", "broken", "--query", "query.h5ad", "--out", "p.csv", "--json", cwd=files)
    assert_one_line_error(proc, 3, "ChecksumMismatchError")
    outcome = json.loads(proc.stdout)
    assert outcome["ok"] is False and outcome["exit_code"] == 3
    assert not (files / "p.csv").exists()


@pytest.mark.parametrize("command,func,skip", [("train", atlasmtl.build_model, cli._TRAIN_SKIP),
                                               ("predict", atlasmtl.predict, cli._PREDICT_SKIP)])
def test_help_lists_every_api_option(command, func, skip, capsys):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    docs = cli.param_docs(func)
    for name in inspect.signature(func).parameters:
        if name not in skip:
            assert "--" + name.replace("_", "-") in out, name
            assert docs.get(name), f"{func.__name__}'s docstring does not describe {name}"
    assert "exit status: 0 ok" in out
    assert ("(default: 0.7)" if command == "predict" else "(default: 40)") in out
    if command == "predict":  # a choice lists its words
        assert "--coordinates {auto,neighbours,heads}" in out


# ---------------------------------------------------------------- in-process: same main(), no process start-up
@pytest.mark.parametrize("command,func,skip", [
    ("train", atlasmtl.build_model, cli._TRAIN_SKIP),
    ("predict", atlasmtl.predict, cli._PREDICT_SKIP),
    ("report", atlasmtl.predict, cli._PREDICT_SKIP),
])
def test_options_have_the_api_names_and_defaults(command, func, skip):
    required = {"train": ["--reference", "r", "--labels", "a", "--out", "o"],
                "predict": ["--model", "m", "--query", "q", "--out", "o.csv"],
                "report": ["--model", "m", "--query", "q", "--out", "o.html"]}[command]
    args = cli.build_parser().parse_args([command, *required])
    params = {n: p for n, p in inspect.signature(func).parameters.items() if n not in skip}
    assert params, "no options generated"
    for name, p in params.items():
        default = p.default
        value = getattr(args, name)
        assert (list(value) if isinstance(value, (list, tuple)) else value) == \
            (list(default) if isinstance(default, (list, tuple)) else default), name


def test_option_values_are_parsed_to_api_types():
    args = cli.build_parser().parse_args(
        ["train", "--reference", "r", "--labels", "a", "--out", "o", "--hidden-sizes", "64,32",
         "--early-stopping-patience", "none", "--num-threads", "max", "--use-raw", "--no-show-progress",
         "--learning-rate", "0.01"])
    assert args.hidden_sizes == [64, 32] and args.early_stopping_patience is None
    assert args.num_threads == "max" and args.use_raw is True and args.show_progress is False
    assert args.learning_rate == 0.01
    assert cli.parse_coords("latent=X_ref_latent,X_umap") == {"latent": "X_ref_latent", "umap": "X_umap"}
    assert cli.parse_truth_columns("a=x,b=y") == {"a": "x", "b": "y"}


def test_parameter_errors_name_the_command_line_options():
    """The API's checks spell a parameter as Python does; the command line's errors spell its option."""
    parser = cli.build_parser(["train", "predict"])
    spell = functools.partial(option_spelling, parser=parser)
    assert spell("num_epochs=0 must be an integer ≥ 1.") == "--num-epochs 0 must be an integer ≥ 1."
    assert spell("hidden_sizes[1]=0 must be an integer ≥ 1.") == "--hidden-sizes (item 2) 0 must be an integer ≥ 1."
    assert spell("Pass either layer= or use_raw=True, not both.") == "Pass either --layer or --use-raw, not both."
    assert spell("use_raw=False") == "--no-use-raw"
    assert (spell("confidence_low=0.9 is above confidence_high=0.7;")
            == "--confidence-low 0.9 is above --confidence-high 0.7;")
    # names the parser does not take, comparisons and attribute paths stay as they are
    for text in ["test_size=0.9 leaves a side empty", "a==b", "adata.obs_names= x", "shard_slice needs n >= 0"]:
        assert spell(text) == text
    assert option_spelling("num_epochs=0", None) == "num_epochs=0"


@pytest.mark.parametrize("argv,code,pattern", [
    (["train", "--reference", "ref.h5ad", "--out", "m"], 2, "required: --labels"),
    (["train", "--reference", "ref.h5ad", "--labels", "nope", "--out", "m"], 2, "LabelError: Label column 'nope'"),
    (["train", "--reference", "ref.h5ad", "--labels", "lineage", "--out", "m", "--num-epochs", "0"], 2,
     "ParameterError: --num-epochs 0"),
    (["train", "--reference", "ref.h5ad", "--labels", "lineage", "--out", "m", "--input-transform", "log"], 2,
     "invalid choice: 'log'"),
    (["predict", "--model", "model", "--query", "missing.h5ad", "--out", "p.csv"], 2, "No such file: 'missing.h5ad'"),
    (["predict", "--model", "model", "--query", "query.h5ad", "--out", "p.txt"], 2, "must end in .csv"),
    (["predict", "--model", "model", "--query", "query.h5ad", "--out", "query.h5ad"], 2, "the query file itself"),
    (["predict", "--model", "model", "--query", "query.h5ad", "--out", "p.csv", "--confidence-low", "0.9"], 2,
     "--confidence-low 0.9 is above --confidence-high 0.7"),
    (["predict", "--model", "nowhere/model_manifest.json", "--query", "query.h5ad", "--out", "p.csv"], 3,
     "No such model file"),
    (["report", "--model", "model", "--query", "query.h5ad", "--out", "r.html", "--truth-columns", "nope"], 2,
     "'nope'"),
    (["report", "--model", "model", "--query", "query.h5ad", "--out", "r.pdf"], 2, "must end in .html"),
    (["report", "--model", "model", "--query", "query.h5ad", "--out", "r.html", "--truth-columns", ""], 2,
     "names no column"),
    (["frobnicate"], 2, "invalid choice"),
    # an empty path (an unset shell variable): refused; train --out "" wrote ./model.pth over any model there
    (["train", "--reference", "ref.h5ad", "--labels", "lineage", "--out", ""], 2,
     "--out is empty; give a file or folder name"),
    (["predict", "--model", " ", "--query", "query.h5ad", "--out", "p.csv"], 2, "--model is empty"),
    # an item left out of a list: refused, not dropped ("16,,8" trained (16, 8))
    (["train", "--reference", "ref.h5ad", "--labels", "lineage,,bulk_labels", "--out", "m"], 2,
     "'lineage,,bulk_labels' has an empty item between commas"),
    (["train", "--reference", "ref.h5ad", "--labels", "lineage", "--out", "m", "--hidden-sizes", "16,,8"], 2,
     "'16,,8' has an empty item between commas"),
    # an output under a regular file: OutputError, as the API says it, before any work
    (["predict", "--model", "model", "--query", "query.h5ad", "--out", "query.h5ad/p.csv"], 2,
     "OutputError: Cannot write the predictions to 'query.h5ad/p.csv': "),
    # --out of train: a folder or a .pth path; another file suffix is refused, not made a folder
    (["train", "--reference", "ref.h5ad", "--labels", "lineage", "--out", "m/model.pt"], 2,
     "--out 'm/model.pt' looks like a file name but does not end in .pth"),
    # cell filters: the syntax, the column and the values are checked before any work
    (["predict", "--model", "model", "--query", "query.h5ad", "--out", "p.csv", "--query-filter", "lineage"], 2,
     "use COLUMN=VALUE[,VALUE...] to keep those cells"),
    (["predict", "--model", "model", "--query", "query.h5ad", "--out", "p.csv", "--query-filter", "batch=1"], 2,
     "'query.h5ad' has no obs column 'batch'; its columns are 'lineage', 'bulk_labels'"),
    (["train", "--reference", "ref.h5ad", "--labels", "lineage", "--out", "m", "--reference-filter", "lineage!=Tcell"],
     2, "obs column 'lineage' of 'ref.h5ad' has no value 'Tcell'; its values are 'B', 'Myeloid', 'NK'"),
    (["report", "--model", "model", "--query", "query.h5ad", "--out", "r.html", "--reference-filter", "lineage=T"], 2,
     "--reference-filter needs --reference"),
])
def test_errors_in_process(files, trained, monkeypatch, capsys, argv, code, pattern):
    monkeypatch.chdir(files)
    assert cli.main([*argv, "--no-show-progress"] if argv[0] in ("predict", "report") else argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]
    assert not (files / "m").exists()  # a failed training leaves no model folder behind


def test_report_names_a_misspelt_truth_column_as_the_option_before_predicting(files, trained, monkeypatch, capsys):
    """report --truth-columns with a column the query lacks: the error names --truth-columns (it said "Name the
    truth columns with truth.", the Python argument) and comes before the query is predicted, not after."""
    monkeypatch.chdir(files)

    def no_prediction(*args, **kwargs):
        raise AssertionError("predicted before the truth columns were checked")

    monkeypatch.setattr(atlasmtl, "predict", no_prediction)
    argv = ["report", "--model", "model", "--query", "query.h5ad", "--out", "typo.html", "--no-show-progress"]
    assert cli.main([*argv, "--truth-columns", "lineage,cell_type"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("atlasmtl report: error: LabelError: 'query.h5ad' has no column 'cell_type'; its columns "
                           "are 'lineage', 'bulk_labels'. Name the truth columns with --truth-columns.")
    assert cli.main([*argv, "--truth-columns", "lineage=lineage,fine=bulk_labels"]) == 2
    assert "--truth-columns maps level(s) 'fine'" in capsys.readouterr().err
    assert not (files / "typo.html").exists()


@pytest.mark.parametrize("argv,command", [
    (["train", "--reference", "ref.h5ad", "--json"], "train"),  # --labels and --out missing
    (["report", "--model", "m", "--query", "q.h5ad", "--out", "r.html", "--knn-k", "ten", "--json"], "report"),
    (["frobnicate", "--json"], None),
    (["--json"], None),
])
def test_json_of_an_argument_error_names_the_command(tmp_path, monkeypatch, capsys, argv, command):
    """An error found while parsing the arguments gave --json output without the `command` key that every other
    outcome carries; it names the command now, or null when the command line names none."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["predict", "--model", "m", "--query", "missing.h5ad", "--out", "p.csv", "--json"]) == 2
    after_parsing = json.loads(capsys.readouterr().out)  # an error found by the command itself
    assert after_parsing["command"] == "predict"
    assert cli.main(argv) == 2
    outcome = json.loads(capsys.readouterr().out)
    assert list(outcome) == list(after_parsing)
    assert outcome["command"] == command
    assert outcome["ok"] is False and outcome["error_type"] == "UsageError" and outcome["exit_code"] == 2


def test_train_never_replaces_a_file_of_the_users_own(files, monkeypatch, capsys):
    """`train --out theirs.pth` overwrote an existing checkpoint that was not an atlasmtl model."""
    monkeypatch.chdir(files)
    (files / "theirs.pth").write_bytes(b"a checkpoint of their own")
    monkeypatch.setattr(atlasmtl, "build_model", lambda *a, **k: pytest.fail("training started"))
    assert cli.main(["train", "--reference", "ref.h5ad", "--labels", "lineage", "--out", "theirs.pth"]) == 2
    err = capsys.readouterr().err.strip()
    assert "OutputError: Cannot write the model to 'theirs.pth': 'theirs.pth' exists and is not part" in err
    assert (files / "theirs.pth").read_bytes() == b"a checkpoint of their own"
    assert not (files / "theirs_manifest.json").exists()


def test_verbose_shows_the_traceback(files, trained, monkeypatch, capsys):
    monkeypatch.chdir(files)
    assert cli.main(["predict", "--model", "model", "--query", "query.h5ad", "--out", "p.csv", "--verbose",
                     "--min-gene-overlap", "2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("atlasmtl predict: error: ParameterError")


def test_demo_options_reach_run_demo_and_json(monkeypatch, capsys):
    """The demo itself runs once, in test_quickstart; here only the command's wiring."""
    import atlasmtl.demo

    calls = []

    def fake_run_demo(out_dir="atlasmtl_demo", num_epochs=40, random_state=0, quiet=False, show_resources=False):
        calls.append(dict(out_dir=out_dir, quiet=quiet, num_epochs=num_epochs, random_state=random_state,
                          show_resources=show_resources))
        return {lv: {"accuracy": 0.5} for lv in LEVELS}

    monkeypatch.setattr(atlasmtl.demo, "run_demo", fake_run_demo)
    assert cli.main(["demo", "--num-epochs", "3", "--out-dir", "d", "--show-resources", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["dataset"] == "pbmc68k_reduced" and out["out_dir"] == "d"
    assert set(out["scores"]) == set(LEVELS)
    assert calls == [{"out_dir": "d", "quiet": True, "num_epochs": 3, "random_state": 0, "show_resources": True}]


def test_python_dash_m_atlasmtl_is_the_command_line():
    """``python -m atlasmtl`` runs the CLI (it said "No module named atlasmtl.__main__"), for a machine whose
    ``atlasmtl`` script belongs to another installation."""
    proc = subprocess.run([sys.executable, "-m", "atlasmtl", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"atlasmtl {atlasmtl.__version__}"


def test_version_and_help_import_neither_torch_nor_anndata():
    """``atlasmtl --version`` / ``--help`` answer at once; a command's --help imports only its API module."""
    heavy = ("torch", "anndata", "scanpy", "pandas", "matplotlib")
    code = ("import sys\nfrom atlasmtl import cli\n"
            "codes = [cli.main([a]) for a in ('--version', '--help')]\n"
            f"print(codes, sorted(m for m in {heavy!r} if m in sys.modules))\n"
            "cli.main(['train', '--help'])\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "atlasmtl " in proc.stdout and "--reference-filter" in proc.stdout
    assert lines[-1] == "['anndata', 'pandas', 'torch']"  # train --help: build_model's signature, nothing more
    assert "[0, 0] []" in lines


def test_prediction_imports_neither_scipy_stats_nor_optimize():
    """``atlasmtl predict`` loads no module that only training needs: scipy.stats (~0.7 s) and scipy.optimize
    (~0.4 s, the temperature fit) are imported by atlasmtl only where used, unless a dependency already did."""
    lazy = ("scipy.stats", "scipy.optimize")
    code = ("import sys, torch, anndata, pandas, scipy.sparse, scipy.special\n"
            f"before = [m for m in {lazy!r} if m in sys.modules]\n"
            "import atlasmtl.prediction, atlasmtl.io, atlasmtl.result\n"
            f"print(sorted(set(m for m in {lazy!r} if m in sys.modules) - set(before)))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_package_attributes_load_on_first_use():
    code = ("import sys, atlasmtl\nassert 'torch' not in sys.modules, 'import atlasmtl pulled in torch'\n"
            "assert {'build_model', 'predict', 'evaluate', 'pl', 'TrainedModel'} <= set(dir(atlasmtl))\n"
            "assert callable(atlasmtl.build_model) and atlasmtl.pl.umap and 'torch' in sys.modules\n"
            "print(atlasmtl.__version__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == atlasmtl.__version__
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        atlasmtl.nope  # noqa: B018


def test_the_demo_module_names_bad_options_before_training(capsys, tmp_path):
    """``python -m atlasmtl.demo --num-epochs 0`` printed a traceback; --random-state -1 failed inside
    scikit-learn as 'unexpected'; --out-dir naming a file failed only after the whole training."""
    import atlasmtl.demo

    (tmp_path / "afile").write_text("keep")
    for argv, pattern in [(["--num-epochs", "0"], "--num-epochs 0 must be an integer"),
                          (["--random-state", "-1"], "--random-state -1 must be an integer in [0, 4294967295]"),
                          (["--out-dir", str(tmp_path / "afile")], "is a file, not a folder")]:
        assert atlasmtl.demo.main(argv) == 2
        err = capsys.readouterr().err
        assert pattern in err and "Traceback" not in err, err
    assert (tmp_path / "afile").read_text() == "keep"


# ---------------------------------------------------------------- evaluate: saved predictions against known labels
def assert_same_metrics(got: dict, expected: dict) -> None:
    """Per level, each metric equal to the API's (numbers to 1e-6: a CSV keeps float32 confidences as text)."""
    assert list(got) == list(expected)
    for level, metrics in expected.items():
        assert set(got[level]) == set(metrics), level
        for key, value in metrics.items():
            if isinstance(value, float):
                assert got[level][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (level, key)
            else:
                assert got[level][key] == value, (level, key)


@pytest.fixture(scope="module")
def saved(pbmc_result, pbmc_split, tmp_path_factory):
    """The session's prediction written as predict writes it: a full CSV, a minimal TSV and an annotated .h5ad;
    the query (the truth) as .h5ad and as a CSV of its labels."""
    _, query = pbmc_split
    d = tmp_path_factory.mktemp("evaluate")
    pbmc_result.to_csv(d / "pred.csv", mode="full")
    pbmc_result.to_csv(d / "pred_min.tsv.gz")
    pbmc_result.write_h5ad(d / "annotated.h5ad", query, mode="full")
    query.write_h5ad(d / "query.h5ad")
    query.obs[LEVELS].rename(columns={"lineage": "coarse", "bulk_labels": "fine"}).to_csv(d / "truth.csv")
    return d


def test_evaluate_gives_the_python_apis_metrics(saved, pbmc_result, pbmc_split, monkeypatch, capsys):
    monkeypatch.chdir(saved)
    expected = atlasmtl.evaluate(pbmc_result, pbmc_split[1])
    assert set(expected["levels"]) == set(LEVELS)
    for predictions, truth, extra in (("pred.csv", "query.h5ad", []), ("annotated.h5ad", "query.h5ad", []),
                                      ("pred.csv", "truth.csv", ["--truth-columns", "coarse,fine"]),
                                      ("annotated.h5ad", "truth.csv", ["--truth-columns", "bulk_labels=fine,lineage=coarse"]),
                                      # the level names fine first: paired by name (by position they paired
                                      # fine with coarse and scored every cell wrong without a word)
                                      ("pred.csv", "query.h5ad", ["--truth-columns", "bulk_labels,lineage"])):
        assert cli.main(["evaluate", "--predictions", predictions, "--truth", truth, *extra, "--json"]) == 0, predictions
        out = json.loads(capsys.readouterr().out)
        assert out["command"] == "evaluate" and out["ok"] is True and out["warnings"] == []
        assert out["predictions"] == predictions and out["truth"] == truth and out["n_cells"] == 210
        assert out["truth_columns"] == ({"lineage": "lineage", "bulk_labels": "bulk_labels"}
                                        if truth == "query.h5ad" else {"lineage": "coarse", "bulk_labels": "fine"})
        assert "novel" not in out
        assert_same_metrics(out["metrics"], expected["levels"])
        # the hierarchy section: inferred from the truth here (a table keeps no model), the same figures
        assert out["hierarchy"]["source"] == "truth" and out["hierarchy"]["n_full_path"] == 210
        for key in ("path_consistency", "full_path_accuracy"):
            assert out["hierarchy"][key] == pytest.approx(expected["hierarchy"][key]), key
    # a minimal table (pred_ columns only): the label metrics, no confidence ones; one level by its name
    assert cli.main(["evaluate", "--predictions", "pred_min.tsv.gz", "--truth", "query.h5ad",
                     "--truth-columns", "bulk_labels", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["metrics"]) == ["bulk_labels"] and out["metrics"]["bulk_labels"]["ece"] is None
    assert out["metrics"]["bulk_labels"]["accuracy"] == pytest.approx(expected["levels"]["bulk_labels"]["accuracy"])
    # the human-readable table: one row per level
    assert cli.main(["evaluate", "--predictions", "pred.csv", "--truth", "query.h5ad"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("210 cells of pred.csv scored against query.h5ad (lineage, bulk_labels)")
    for level in LEVELS:
        row = next(line.split() for line in text.splitlines() if line.startswith(level + " "))
        metrics = expected["levels"][level]
        shown = [f"{metrics[k]:.3f}" if metrics[k] is not None else "-"
                 for k in ("accuracy", "macro_f1", "balanced_accuracy", "coverage", "network_error",
                           "unknown_withheld_error", "ece")]
        assert row[1:] == ["210"] + shown
    hierarchy = expected["hierarchy"]
    assert text.rstrip().splitlines()[-1] == (
        f"paths: {hierarchy['path_consistency']:.1%} of {hierarchy['n_checked']:,} checkable cells follow the "
        f"truth's hierarchy; full-path accuracy {hierarchy['full_path_accuracy']:.3f} (210 cells labelled at every level)")
    assert "not scored" not in text  # full predictions: every column could be scored
    assert cli.main(["evaluate", "--predictions", "pred.csv", "--truth", "query.h5ad", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    # minimal predictions: the columns that read "-" are named, with the mode that writes what they need
    assert cli.main(["evaluate", "--predictions", "pred_min.tsv.gz", "--truth", "query.h5ad",
                     "--novel-labels", "bulk_labels=Dendritic,CD34+"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line.split() for line in lines if line.startswith("bulk_labels "))
    assert row[6:9] == ["-", "-", "-"] and row[9] == "-"  # network error, withheld wrong, ECE; novel AUROC
    notes = lines[lines.index("not scored:") + 1:lines.index("not scored:") + 3]
    assert notes[0].startswith("  ECE and novel AUROC: no conf_<level> column") and "--mode standard" in notes[0]
    assert notes[1].startswith("  network error and Unknown: withheld wrong: no pred_<level>_raw") and \
        "--mode full" in notes[1]


def test_evaluate_writes_json_and_csv_with_novel_labels(saved, pbmc_result, pbmc_split, monkeypatch, capsys):
    monkeypatch.chdir(saved)
    expected = atlasmtl.evaluate(pbmc_result, pbmc_split[1], novel_labels={"bulk_labels": ["Dendritic", "CD34+"]})
    for name in ("metrics/m.json", "metrics/m.csv", "m.tsv"):
        assert cli.main(["evaluate", "--predictions", "annotated.h5ad", "--truth", "query.h5ad",
                         "--novel-labels", "bulk_labels=Dendritic,CD34+", "--out", name, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["out"] == name and out["novel"]["n_novel"] == 76 and out["novel"]["n_known"] == 134
        assert out["novel"]["levels"]["bulk_labels"]["auroc"] == pytest.approx(
            expected["novel"]["levels"]["bulk_labels"]["auroc"])
    written = json.loads((saved / "metrics" / "m.json").read_text())
    assert set(written) == set(expected) and written["n_cells"] == 210
    assert_same_metrics(written["levels"], expected["levels"])
    assert_same_metrics(written["novel"]["levels"], expected["novel"]["levels"])
    for table in (pd.read_csv(saved / "metrics" / "m.csv", index_col="level"),
                  pd.read_csv(saved / "m.tsv", sep="\t", index_col="level")):
        assert list(table.index) == LEVELS
        for level in LEVELS:  # one row per level: the level metrics and the novelty figures, as in the JSON
            for key, value in {**written["levels"][level], **written["novel"]["levels"][level]}.items():
                cell = table.loc[level, key]
                assert (pd.isna(cell) if value is None else cell == pytest.approx(value) if isinstance(value, float)
                        else cell == value), (level, key)
    # the table's novelty columns on stdout
    assert cli.main(["evaluate", "--predictions", "pred.csv", "--truth", "query.h5ad",
                     "--novel-labels", "bulk_labels=Dendritic,CD34+"]) == 0
    text = capsys.readouterr().out
    assert "76 novel and 134 known cells" in text and "novel->Unknown" in text


def test_novel_labels_syntax():
    assert cli.parse_novel_labels(None) is None
    assert cli.parse_novel_labels(["bulk_labels=Dendritic, CD34+", "lineage=Progenitor"]) == \
        {"bulk_labels": ["Dendritic", "CD34+"], "lineage": ["Progenitor"]}
    assert cli.parse_novel_labels(["bulk_labels=Dendritic;lineage=Progenitor"]) == \
        {"bulk_labels": ["Dendritic"], "lineage": ["Progenitor"]}
    for bad, pattern in ((["Dendritic"], "use LEVEL=LABEL"), (["lineage="], "use LEVEL=LABEL"),
                         (["lineage=B", "lineage=T"], "names the level 'lineage' twice"), ([";"], "names no level")):
        with pytest.raises(cli.UsageError, match=pattern):
            cli.parse_novel_labels(bad)


@pytest.mark.parametrize("argv,pattern", [
    (["--predictions", "missing.csv", "--truth", "query.h5ad"], "InputError: No such predictions file: 'missing.csv'"),
    (["--predictions", "pred.csv", "--truth", "missing.h5ad"], "InputError: No such truth file: 'missing.h5ad'"),
    (["--predictions", "truth.csv", "--truth", "query.h5ad"],
     "InputError: 'truth.csv' has no pred_<level> column (its columns: 'coarse', 'fine')"),
    (["--predictions", "pred.csv", "--truth", "truth.csv"],
     "LabelError: 'truth.csv' has no column named as a predicted level ('lineage', 'bulk_labels'); its columns are "
     "'coarse', 'fine'. Name the truth columns with --truth-columns"),
    (["--predictions", "pred.csv", "--truth", "query.h5ad", "--truth-columns", "lineage,cell_type"],
     "LabelError: 'query.h5ad' has no column 'cell_type'; its columns are 'lineage', 'bulk_labels'"),
    (["--predictions", "pred.csv", "--truth", "query.h5ad", "--truth-columns", "a,b,c"],
     "--truth-columns names 3 column(s) ('a', 'b', 'c') for 2 predicted level(s)"),
    (["--predictions", "pred.csv", "--truth", "first50.csv", "--truth-columns", "coarse,fine"],
     "InputError: 160 of 210 predicted cells are not in the truth"),
    (["--predictions", "pred.csv", "--truth", "query.h5ad", "--novel-labels", "cell_type=Dendritic"],
     "--novel-labels names level(s) 'cell_type' that the predictions do not have (their levels: 'lineage', "
     "'bulk_labels')"),
    (["--predictions", "pred.csv", "--truth", "query.h5ad", "--novel-labels", "Dendritic"], "use LEVEL=LABEL"),
    (["--predictions", "pred.csv", "--truth", "query.h5ad", "--out", "m.txt"],
     "--out 'm.txt': the metrics file must end in .json, .csv or .tsv"),
    (["--predictions", "pred.csv", "--truth", "truth.csv", "--out", "./pred.csv"],
     "InputError: --out './pred.csv' is the --predictions file itself"),
    (["--predictions", "pred.csv", "--truth", "truth.csv", "--out", "truth.csv"],
     "InputError: --out 'truth.csv' is the --truth file itself"),
    (["--predictions", "pred.csv"], "the following arguments are required: --truth"),
])
def test_evaluate_errors_are_one_line_exit_2(saved, monkeypatch, capsys, argv, pattern):
    monkeypatch.chdir(saved)
    pd.read_csv(saved / "truth.csv", index_col=0).iloc[:50].to_csv(saved / "first50.csv")
    before = {p.name: p.stat().st_mtime_ns for p in saved.iterdir()}
    assert cli.main(["evaluate", *argv, "--json"]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("atlasmtl evaluate: error: ") and pattern in lines[0], lines[0]
    outcome = json.loads(captured.out)
    assert outcome["command"] == "evaluate" and outcome["ok"] is False and outcome["exit_code"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in saved.iterdir()} == before  # nothing written or replaced


def test_evaluate_imports_no_torch(saved):
    """``evaluate --help`` imports nothing heavy; scoring saved predictions reads no model, so no PyTorch."""
    heavy = ("torch", "anndata", "pandas", "sklearn")
    code = ("import sys\nfrom atlasmtl import cli\n"
            "assert cli.main(['evaluate', '--help']) == 0\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
            "assert cli.main(['evaluate', '--predictions', 'annotated.h5ad', '--truth', 'query.h5ad', '--quiet']) == 0\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=saved)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "--novel-labels" in proc.stdout
    assert lines[-2:] == ["[]", "['anndata', 'pandas', 'sklearn']"]
