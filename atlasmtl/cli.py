"""The ``atlasmtl`` command: train, predict, report, evaluate and demo from a shell or a pipeline.

::

    atlasmtl train   --reference ref.h5ad [--reference-filter COL=V,...|COL!=V,...] --labels anno_lv1,anno_lv2 \\
                     [--coords latent=X_ref_latent,umap=X_umap] --out model_dir/ [training options]
    atlasmtl predict --model model_dir/ --query query.h5ad [--query-filter COL=V,...|COL!=V,...] \\
                     --out predictions.csv|predictions.tsv|annotated.h5ad \\
                     [--mode minimal|standard|full] [--include-coords] [prediction options]
    atlasmtl report  --model model_dir/ --query query.h5ad [--query-filter ...] \\
                     [--predictions predictions.csv] [--truth-columns lv1,lv2] \\
                     [--reference ref.h5ad [--reference-filter ...]] --out report.html [prediction options]
    atlasmtl evaluate --predictions predictions.csv|predictions.tsv|annotated.h5ad \\
                     --truth truth.h5ad|truth.csv|truth.tsv [--truth-columns COL,...|LEVEL=COL,...] \\
                     [--novel-labels LEVEL=LABEL,... ...] [--out metrics.json|metrics.csv|metrics.tsv]
    atlasmtl demo    [--num-epochs 40] [--out-dir atlasmtl_demo]

``evaluate`` scores predictions that ``predict`` wrote against known labels matched by
cell name (:func:`atlasmtl.evaluate`), reading neither the model nor the query matrix.

``--reference-filter`` / ``--query-filter`` select cells by an ``obs`` column, so one
file can hold both sides of a mapping: ``--reference-filter 'dataset!=3pv1'`` for
training and ``--query-filter dataset=3pv1`` for prediction (like
``adata[adata.obs["dataset"] != "3pv1"]`` in scanpy). Repeated, they combine: a cell
must pass every one.

The training and prediction options are generated from the signatures of
:func:`atlasmtl.build_model` and :func:`atlasmtl.predict` (same names with
dashes, same defaults, help taken from their docstrings), so the command line
and the Python API cannot drift apart.

Exit codes (see :data:`EXIT_CODES`): 0 success; 2 bad usage or bad input
(any :class:`~atlasmtl.exceptions.AtlasMTLError` other than a model-file error,
a missing or unreadable file); 3 the model files are missing, corrupted or
unsafe; 1 an unexpected internal error; 130 interrupted. Errors are one line
on stderr (``atlasmtl <command>: error: ...``), a parameter named by its option
(:func:`~atlasmtl.validation.option_spelling`); ``--verbose`` adds the traceback.
Warnings are one line each (``atlasmtl: warning: ...``). Progress bars go to
stderr; results go to stdout, as one JSON object with ``--json``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import shlex
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

# Nothing heavy at import time: --help and --version must not wait for PyTorch or anndata.

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_MODEL = 3
EXIT_INTERRUPTED = 130
#: Exit status by meaning.
EXIT_CODES = {
    "ok": EXIT_OK,
    "internal error": EXIT_ERROR,
    "usage or input error": EXIT_USAGE,
    "model files missing, corrupted or unsafe": EXIT_MODEL,
    "interrupted": EXIT_INTERRUPTED,
}

#: API parameters the command line supplies itself (positional data, or handled by the CLI).
_TRAIN_SKIP = {"adata", "label_columns", "coord_targets", "show_summary"}
_PREDICT_SKIP = {"model", "adata", "show_summary"}
_DEMO_SKIP = {"quiet", "out_dir"}


class UsageError(Exception):
    """A command-line usage error (exit status 2)."""


# ---------------------------------------------------------------- argparse plumbing
class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and raise instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)


def _clean_rst(text: str) -> str:
    text = re.sub(r":(?:func|class|meth|mod|data|attr):`~?([^`]+)`", lambda m: m.group(1).split(".")[-1], text)
    text = text.replace("``", "")
    return re.sub(r"\s+", " ", text).strip()


def param_docs(func: Callable) -> dict[str, str]:
    """Parameter descriptions from a numpydoc ``Parameters`` section (``name`` → text)."""
    doc = inspect.getdoc(func) or ""
    match = re.search(r"^Parameters\n-+\n(.*?)(?:^\S[^\n]*\n-+\n|\Z)", doc, flags=re.S | re.M)
    if not match:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    lines: list[str] = []
    for line in match.group(1).splitlines() + [""]:
        if line and not line.startswith(" "):
            if names:
                for n in names:
                    out[n] = _clean_rst(" ".join(lines))
            names = [n.strip() for n in line.split(":")[0].split(",") if n.strip()]
            lines = []
        else:
            lines.append(line.strip())
    if names:
        for n in names:
            out[n] = _clean_rst(" ".join(lines))
    return out


def _float_or_none(text: str) -> float | None:
    if text.strip().lower() in ("none", ""):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _int_or_none(text: str) -> int | None:
    if text.strip().lower() in ("none", ""):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def _int_or_str(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text


def _int_list(text: str) -> list[int]:
    items = text.replace(" ", "").split(",")
    if "" in items[:-1]:  # "16,,8": a number left out, not (16, 8); one trailing comma is harmless
        raise argparse.ArgumentTypeError(f"{text!r} has an empty item between commas; give comma-separated integers "
                                         "such as 256,128")
    try:
        values = [int(v) for v in items if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 256,128, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _choices() -> dict[str, tuple[str, ...]]:
    from .gating import KNN_MODES
    from .genes import GENE_SELECTIONS, INPUT_TRANSFORMS
    from .knn import COORDINATE_SOURCES
    from .training import LR_SCHEDULES, REFERENCE_STORAGE

    return {"input_transform": INPUT_TRANSFORMS, "reference_storage": REFERENCE_STORAGE, "knn_correction": KNN_MODES,
            "lr_schedule": LR_SCHEDULES, "gene_selection": GENE_SELECTIONS, "coordinates": COORDINATE_SOURCES}


def _fmt_default(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)


#: Help texts the command line words differently from the API's docstring.
_PREDICT_HELP = {"gene_map": "a CSV/TSV file mapping query gene names (first column) to the model's (second), "
                             "or an orthologue table with a column per species, for genes named differently "
                             "(another namespace or species)"}


def add_signature_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    func: Callable,
    skip: set[str],
    extra_help: dict[str, str] | None = None,
) -> list[str]:
    """Add one ``--option`` per parameter of ``func`` (minus ``skip``); return the parameter names.

    Names become ``--dashed-names``; defaults are the function's; the help text
    comes from its numpydoc docstring.
    """
    docs = param_docs(func)
    choices = _choices()
    added = []
    for name, p in inspect.signature(func).parameters.items():
        if name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", str(p.annotation))
        ann = ann.replace(" ", "")
        default = None if p.default is inspect.Parameter.empty else p.default
        text = (extra_help or {}).get(name) or docs.get(name, "")
        text = text.replace("%", "%%")
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": name, "default": default}
        if ann in ("bool", "bool|None") or isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
            if default is None:
                text += " (default: automatic — on when stderr is a terminal)"
            else:
                text += f" (default: {'on' if default else 'off'})"
        else:
            if ann.startswith("Sequence[int]") or ann.startswith("list[int]"):
                kwargs["type"], metavar = _int_list, "INT,INT,..."
            elif ann in ("int|None", "Optional[int]"):
                kwargs["type"], metavar = _int_or_none, "INT|none"
            elif ann in ("float|None", "Optional[float]"):
                kwargs["type"], metavar = _float_or_none, "FLOAT|none"
            elif ann == "int|str":  # the word each takes: ensemble_size "auto", num_threads "max"
                kwargs["type"], metavar = _int_or_str, "INT|" + (default if isinstance(default, str) else "max")
            elif ann == "int" or (isinstance(default, int) and p.annotation is inspect.Parameter.empty):
                kwargs["type"], metavar = int, "INT"
            elif ann == "float" or isinstance(default, float):
                kwargs["type"], metavar = float, "FLOAT"
            else:
                kwargs["type"], metavar = str, name.split("_")[-1].upper()
            if name in choices:
                kwargs["choices"] = list(choices[name])
                metavar = "{" + ",".join(choices[name]) + "}"
            kwargs["metavar"] = metavar
            text += f" (default: {_fmt_default(default)})"
        parser.add_argument(flag, help=text.strip(), **kwargs)
        added.append(name)
    return added


def _filter_option(group: argparse._ArgumentGroup, flag: str, what: str, example: str) -> None:
    group.add_argument(flag, metavar="COL=V,...|COL!=V,...", action="append",
                       help=f"use only the {what} cells whose obs column COL is one of the values (COL=V,...) "
                       f"or none of them (COL!=V,...), e.g. {flag} {example}; repeat it to combine "
                       "selections (a cell must pass every one); the selected cells are loaded into memory")


def _common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("output and errors")
    g.add_argument("--json", action="store_true", help="print one JSON object with the outcome on stdout")
    g.add_argument("--quiet", action="store_true", help="print nothing on stdout but --json output; no warnings")
    g.add_argument("--verbose", action="store_true", help="show tracebacks on errors and where warnings come from")


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``atlasmtl`` argument parser.

    Parameters
    ----------
    commands
        Subcommands whose API options (generated from :func:`~atlasmtl.build_model`,
        :func:`~atlasmtl.predict` and ``run_demo``) are added; ``None`` = all of them.
        Those options need their module imported (PyTorch, anndata), so :func:`main`
        asks only for the command it runs: ``atlasmtl --help`` and ``--version`` import
        neither.
    """
    from ._version import __version__

    wanted = set(_COMMANDS) if commands is None else set(commands)

    def api(name: str) -> Callable:
        if name == "run_demo":
            from .demo import run_demo

            return run_demo
        if name == "predict":
            from .prediction import predict

            return predict
        from .training import build_model

        return build_model

    exit_help = "exit status: " + "; ".join(f"{code} {meaning}" for meaning, code in EXIT_CODES.items())
    parser = _Parser(
        prog="atlasmtl",
        description="Multi-level single-cell reference mapping: train on a labelled reference, "
        "predict every annotation level of a query, and report on the mapping.",
        epilog=exit_help,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"atlasmtl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,predict,report,evaluate,demo}", parser_class=_Parser)
    sub.required = True

    # train
    p = sub.add_parser("train", help="train a model on a labelled reference .h5ad", formatter_class=_Formatter,
                       description="Train a model on a labelled reference and save it (model.pth, "
                       "model_metadata.pkl, model_reference.pkl, model_embedding.npy, model_manifest.json).",
                       epilog=exit_help)
    g = p.add_argument_group("data")
    g.add_argument("--reference", required=True, metavar="H5AD", help="labelled reference .h5ad file")
    g.add_argument("--labels", required=True, metavar="COL,COL,...",
                   help="obs columns with the annotation levels, coarse to fine (comma-separated)")
    g.add_argument("--coords", metavar="NAME=KEY,...",
                   help="coordinate heads: name=obsm key pairs, e.g. latent=X_ref_latent,umap=X_umap "
                   "(a bare key such as X_umap is named umap)")
    _filter_option(g, "--reference-filter", "reference", "'dataset!=3pv1'")
    g.add_argument("--out", required=True, metavar="DIR|FILE.pth",
                   help="the model folder: DIR/model.pth, DIR/model_metadata.pkl, DIR/model_reference.pkl, "
                   "DIR/model_embedding.npy and DIR/model_manifest.json are written in it (created if needed); "
                   "or a weights path FILE.pth, "
                   "whose companions FILE_metadata.pkl ... go beside it. Another suffix (model.pt) is refused; "
                   "end a folder name that has a dot with a slash (runs/v1.2/)")
    g.add_argument("--backed", action="store_true",
                   help="train from disk: read the reference's matrix in shuffled blocks of cells instead of "
                   "loading it into memory, so memory stays flat however large the file (implied by --distributed)")
    if "train" in wanted:
        add_signature_options(p.add_argument_group("training options (atlasmtl.build_model)"), api("build_model"),
                              _TRAIN_SKIP)
    _common(p)

    # predict
    p = sub.add_parser("predict", help="annotate a query .h5ad with a trained model", formatter_class=_Formatter,
                       description="Predict every level for each query cell, place it on the reference "
                       "coordinates, and write the predictions. The query is read backed (in chunks).",
                       epilog=exit_help)
    g = p.add_argument_group("data")
    g.add_argument("--model", required=True, metavar="MODEL",
                   help="the model folder (train --out), or its *_manifest.json or .pth file")
    g.add_argument("--query", required=True, metavar="H5AD", help="query .h5ad file")
    _filter_option(g, "--query-filter", "query", "dataset=3pv1")
    g.add_argument("--out", required=True, metavar="FILE",
                   help="predictions.csv / .tsv (a table, one row per cell; .csv.gz etc. compressed) or annotated.h5ad "
                   "(the query with prediction columns in obs)")
    g.add_argument("--mode", choices=["minimal", "standard", "full"], default="minimal",
                   help="columns to write: minimal (pred_<level>), standard (+ conf_, margin_, is_unknown_), "
                   "full (+ raw and KNN labels, vote fraction, flags, novelty scores) (default: minimal)")
    g.add_argument("--include-coords", action="store_true",
                   help="also write the predicted coordinates (obsm X_pred_<name> in .h5ad; "
                   "<name>_1, <name>_2, ... columns in tables)")
    g.add_argument("--distributed", action="store_true",
                   help="run under torchrun: each process predicts its slice of the query and rank 0 gathers "
                   "and writes the whole table (torchrun --nproc_per_node=N -m atlasmtl.cli predict --distributed ...)")
    if "predict" in wanted:
        add_signature_options(p.add_argument_group("prediction options (atlasmtl.predict)"), api("predict"),
                              _PREDICT_SKIP, _PREDICT_HELP)
    _common(p)

    # report
    p = sub.add_parser("report", help="write a self-contained HTML report of a mapping", formatter_class=_Formatter,
                       description="Write one self-contained HTML file with the mapping's plots, gene-overlap "
                       "and input checks, settings, versions and resource summaries; with --truth-columns also "
                       "the accuracy against known labels. Without --predictions the query is predicted "
                       "with the prediction options below.", epilog=exit_help)
    g = p.add_argument_group("data")
    g.add_argument("--model", required=True, metavar="MODEL",
                   help="the model folder (train --out), or its *_manifest.json or .pth file")
    g.add_argument("--query", required=True, metavar="H5AD", help="query .h5ad file")
    _filter_option(g, "--query-filter", "query", "dataset=3pv1")
    g.add_argument("--predictions", metavar="FILE",
                   help="reuse predictions written by 'atlasmtl predict --mode full' (.csv, .tsv or .h5ad) "
                   "instead of predicting again; an .h5ad keeps the prediction's metadata (gene overlap, input "
                   "checks, settings), a table does not: the report then states the options given here")
    g.add_argument("--truth-columns", metavar="COL,... | LEVEL=COL,...",
                   help="query obs columns with the true labels: one per level (coarse to fine), "
                   "names equal to the levels (paired by name, in any order), or level=column pairs")
    g.add_argument("--reference", metavar="H5AD",
                   help="reference .h5ad whose coordinates are drawn in grey behind the query cells")
    _filter_option(g, "--reference-filter", "reference", "'dataset!=3pv1'")
    g.add_argument("--title", help="page title")
    g.add_argument("--out", required=True, metavar="HTML", help="report file (.html)")
    if "report" in wanted:
        add_signature_options(p.add_argument_group("prediction options (atlasmtl.predict)"), api("predict"),
                              _PREDICT_SKIP, _PREDICT_HELP)
    _common(p)

    # evaluate
    p = sub.add_parser("evaluate", help="score saved predictions against the true labels of the query cells",
                       formatter_class=_Formatter,
                       description="Score predictions written by 'atlasmtl predict' against known labels, matched by "
                       "cell name (atlasmtl.evaluate): per level accuracy, macro-F1, balanced accuracy, coverage and "
                       "calibration (ECE; needs --mode standard or full), and with --novel-labels how novel cell "
                       "types were flagged. Neither the model nor the query matrix is read.", epilog=exit_help)
    g = p.add_argument_group("data")
    g.add_argument("--predictions", required=True, metavar="FILE",
                   help="predictions written by 'atlasmtl predict': a .csv / .tsv table (compressed too: .csv.gz) "
                   "or an annotated .h5ad (only its obs is read); the levels are its pred_<level> columns")
    g.add_argument("--truth", required=True, metavar="FILE",
                   help="the true labels: an .h5ad (labels in obs; only obs is read) or a .csv / .tsv table whose "
                   "first column is the cell name; every predicted cell must be in it")
    g.add_argument("--truth-columns", metavar="COL,... | LEVEL=COL,...",
                   help="truth columns with the true labels: one per level (coarse to fine), names equal to the "
                   "levels (paired by name, in any order), or level=column pairs (default: the columns named as "
                   "the levels)")
    g.add_argument("--novel-labels", action="append", metavar="LEVEL=LABEL,...",
                   help="true labels of LEVEL absent from the reference (novel cell types), e.g. "
                   "--novel-labels bulk_labels=Dendritic,Megakaryocyte; repeat the option for another level, or "
                   "separate levels with ';' (quoted). Adds the novelty AUROC and the novel and known cells called "
                   "Unknown")
    g.add_argument("--out", metavar="FILE",
                   help="also write the metrics: .json (atlasmtl.evaluate's answer) or .csv / .tsv (one row per level)")
    _common(p)

    # demo
    p = sub.add_parser("demo", help="run the README's reference mapping on pbmc68k_reduced", formatter_class=_Formatter,
                       description="Split pbmc68k_reduced (ships with scanpy) into reference and query, train, "
                       "save, load, predict, print per-level accuracy, and write the model, the annotated query "
                       "and an HTML report into one folder.", epilog=exit_help)
    if "demo" in wanted:
        add_signature_options(p, api("run_demo"), _DEMO_SKIP, {"num_epochs": "training epochs",
                                                               "random_state": "seed of the split and the training"})
    p.add_argument("--out-dir", default="atlasmtl_demo", metavar="DIR",
                   help="folder for model/, query_annotated.h5ad and report.html (default: ./atlasmtl_demo)")
    _common(p)
    return parser


# ---------------------------------------------------------------- helpers
def _api_kwargs(args: argparse.Namespace, func: Callable, skip: set[str]) -> dict[str, Any]:
    names = [n for n in inspect.signature(func).parameters if n not in skip]
    return {n: getattr(args, n) for n in names if hasattr(args, n)}


def _split(text: str | None) -> list[str]:
    """``"a, b"`` → ``["a", "b"]``; an empty item between commas (``"a,,b"``: a name left out) is a usage error,
    a trailing comma is ignored."""
    items = [t.strip() for t in (text or "").split(",")]
    if "" in items[:-1] and any(items):
        raise UsageError(f"{text!r} has an empty item between commas; give comma-separated names such as a,b")
    return [t for t in items if t]


def parse_coords(text: str | None) -> dict[str, str] | None:
    """``"latent=X_ref_latent,umap=X_umap"`` → dict; a bare ``X_umap`` is named ``umap``."""
    items = _split(text)
    if not items:
        return None
    out = {}
    for item in items:
        name, _, key = item.partition("=")
        if not key:
            key = name
            name = key[2:] if key.startswith("X_") else key
        if not name or not key:
            raise UsageError(f"--coords entry {item!r} is not name=obsm_key")
        out[name.strip()] = key.strip()
    return out


def parse_truth_columns(text: str | None) -> list[str] | dict[str, str] | None:
    """``"a,b"`` → list, ``"lv1=a,lv2=b"`` → dict."""
    items = _split(text)
    if not items:
        if text is not None:  # given but empty ("", " , "): the user meant some columns
            raise UsageError(f"--truth-columns {text!r} names no column; give the query's label columns, e.g. "
                             "--truth-columns cell_type_broad,cell_type")
        return None
    if any("=" in i for i in items):
        if not all("=" in i for i in items):
            raise UsageError("--truth-columns: use either plain column names or level=column pairs, not both")
        pairs = [(k.strip(), v.strip()) for k, v in (i.split("=", 1) for i in items)]
        for what, names in (("level", [k for k, _ in pairs]), ("column", [v for _, v in pairs])):
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise UsageError(f"--truth-columns names the {what} {twice[0]!r} twice; give each level=column pair "
                                 "once, e.g. --truth-columns lineage=lineage,bulk_labels=bulk_labels")
        return dict(pairs)
    return items


def parse_novel_labels(values: Sequence[str] | None) -> dict[str, list[str]] | None:
    """``--novel-labels`` values → ``{level: [label, ...]}`` (``None`` when not given).

    Parameters
    ----------
    values
        The option's values, each ``LEVEL=LABEL,LABEL`` or several such separated by ``;``
        (``"lineage=B;bulk_labels=CD19+ B"``); the option may be repeated.

    Returns
    -------
    dict of str to list of str, or None
        The novel true labels of each level, as :func:`atlasmtl.evaluate` takes them (``novel_labels=``).

    Raises
    ------
    UsageError
        An item that is not ``LEVEL=LABEL,...``, or a level named twice.
    """
    if values is None:
        return None
    out: dict[str, list[str]] = {}
    for value in values:
        for item in (value or "").split(";"):
            if not item.strip():
                continue
            level, eq, labels = item.partition("=")
            names = _split(labels)
            if not eq or not level.strip() or not names:
                raise UsageError(f"--novel-labels {item.strip()!r}: use LEVEL=LABEL[,LABEL...], e.g. "
                                 "--novel-labels bulk_labels=Dendritic,Megakaryocyte (repeat it for another level)")
            level = level.strip()
            if level in out:
                raise UsageError(f"--novel-labels names the level {level!r} twice; list all its novel labels once, "
                                 f"e.g. --novel-labels {level}=A,B")
            out[level] = names
    if not out:
        raise UsageError("--novel-labels names no level; give LEVEL=LABEL[,LABEL...]")
    return out


def parse_cell_filter(text: str, option: str) -> tuple[str, bool, list[str]]:
    """``"dataset=3pv1,5p"`` → ``("dataset", True, ["3pv1", "5p"])``; ``!=`` gives ``False`` (leave those out)."""
    match = re.fullmatch(r"\s*([^=!]+?)\s*(!=|=)(.*)", text or "")
    values = _split(match.group(3)) if match else []
    if not match or not values:
        raise UsageError(f"{option} {text!r}: use COLUMN=VALUE[,VALUE...] to keep those cells or "
                         f"COLUMN!=VALUE[,VALUE...] to leave them out, e.g. {option} dataset=3pv1")
    return match.group(1), match.group(2) == "=", values


def select_cells(adata: Any, texts: str | Sequence[str], option: str, path: str) -> Any:
    """The cells of ``adata`` (in memory or backed) that every filter in ``texts`` selects, as an in-memory
    AnnData. Each filter is checked (column, values) before any cells are read."""
    import numpy as np

    from .exceptions import InputError

    texts = [texts] if isinstance(texts, str) else list(texts)
    mask = np.ones(adata.n_obs, dtype=bool)
    for text in texts:
        column, keep, values = parse_cell_filter(text, option)
        if column not in adata.obs.columns:
            raise InputError(f"{option}: {path!r} has no obs column {column!r}; its columns are "
                             f"{', '.join(map(repr, adata.obs.columns[:20]))}.")
        col = adata.obs[column].astype(str)
        present = sorted(set(col))
        absent = [v for v in values if v not in present]
        if absent:
            shown = ", ".join(map(repr, present[:20])) + (" ..." if len(present) > 20 else "")
            raise InputError(f"{option}: obs column {column!r} of {path!r} has no value "
                             f"{', '.join(map(repr, absent))}; its values are {shown}.")
        chosen = col.isin(values).to_numpy()
        mask &= chosen if keep else ~chosen
    if not mask.any():
        given = " ".join(f"{option} {t!r}" for t in texts)
        raise InputError(f"{given} leaves no cells of {path!r}"
                         + (" (a cell must pass every selection)." if len(texts) > 1 else "."))
    subset = adata[mask]
    return subset.to_memory() if adata.isbacked else subset.copy()


def _filters_record(texts: Sequence[str] | None) -> str | list[str] | None:
    """The ``--json`` record of repeated ``--*-filter`` options: one filter as its string, several as a list."""
    if not texts:
        return None
    return texts[0] if len(texts) == 1 else list(texts)


def _weights_path(out: str) -> Path:
    """``train --out``: a folder (``DIR/model.pth`` ...) or a weights path ending in ``.pth``."""
    target = Path(out)
    if target.suffix == ".pth":
        return target
    if target.suffix and not target.is_dir() and not out.endswith(("/", os.sep)):
        raise UsageError(
            f"--out {out!r} looks like a file name but does not end in .pth; give the model folder "
            f"(e.g. --out {str(target.parent / target.stem)}/, files written as model.pth, model_manifest.json ...) "
            f"or a weights path ending in .pth (e.g. --out {str(target.with_suffix('.pth'))})"
        )
    return target / "model.pth"


def _model_path(text: str) -> Path:
    """``--model``: the folder, the manifest or the ``.pth`` (resolved by ``TrainedModel.load``)."""
    return Path(text)


def _check_writable(path: Path, what: str) -> None:
    """An :class:`~atlasmtl.exceptions.OutputError` (as the API raises) before any work, when ``path`` cannot be
    written: under a regular file, in a folder without write permission, or a folder itself."""
    from .exceptions import OutputError

    existing = path.absolute().parent
    while not existing.exists():  # the folders are created when the file is written
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"Cannot write the {what} to {str(path)!r}: {str(existing)!r} is not a folder.")
    if not os.access(existing, os.W_OK):
        raise OutputError(f"Cannot write the {what} to {str(path)!r}: {str(existing)!r} is not writable.")
    if path.is_dir():
        raise OutputError(f"The {what} {str(path)!r} is a folder; give a file name.")


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _level_stats(result: Any) -> dict[str, dict[str, Any]]:
    import numpy as np

    out = {}
    for level, calls in result.levels.items():
        counts = result.labels(level).value_counts()
        out[level] = {
            "unknown_rate": round(float(np.mean(calls.is_unknown)), 6),
            "low_confidence_rate": round(float(np.mean(calls.is_low_conf)), 6),
            "knn_rescued_rate": round(float(np.mean(calls.used_knn)), 6),
            "novel_rate": round(float(np.mean(calls.is_novel)), 6),
            "median_confidence": round(float(np.median(calls.conf)), 6),
            "label_counts": {str(k): int(v) for k, v in counts.items() if v},
        }
    return out


def _write_h5ad(result: Any, query: Any, out: Path, mode: str, include_coords: bool) -> None:
    """An annotated copy of the query: of its file (the matrix copied, never loaded), or of the selected cells."""
    result.write_h5ad(out, query, mode=mode, include_coords=include_coords)


# ---------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace, out: dict[str, Any]) -> str:
    from . import build_model
    from .runtime import format_sections

    labels = _split(args.labels)
    if not labels:
        raise UsageError("--labels needs at least one obs column name")
    coords = parse_coords(args.coords)
    weights = _weights_path(args.out)
    _check_writable(weights, "model")
    from .artifacts import artifact_paths, refuse_foreign_files

    refuse_foreign_files(artifact_paths(weights))  # before training: a user's own model.pth is never replaced
    if args.reference_filter:
        reference = select_cells(read_h5ad(args.reference, backed=True), args.reference_filter,
                                 "--reference-filter", args.reference)
    else:  # a distributed run streams each rank's shard from the file
        reference = args.reference if args.backed or args.distributed else read_h5ad(args.reference)
    kwargs = _api_kwargs(args, build_model, _TRAIN_SKIP)
    model = build_model(reference, labels, coords, show_summary=False, **kwargs)
    if model is None:  # a distributed run's other ranks: rank 0 saves the model
        out.update(model=None, rank=_launch_rank())
        return ""
    files = model.save(weights)
    out.update(
        model=str(files["manifest"]),
        files={k: str(v) for k, v in files.items()},
        levels={lv: len(model.classes[lv]) for lv in model.label_columns},
        coord_targets=model.coord_targets,
        n_genes=len(model.genes),
        reference_cells=int(model.reference["embedding"].shape[0]),
        reference_filter=_filters_record(args.reference_filter),
        train_seconds=model.train_config.get("train_seconds"),
        resources=model.resource_summary(),
    )
    shown = shlex.quote(str(args.out))  # as the user named it: the folder, or the weights file with its companions
    return (f"wrote the model to {shown} ({len(files)} files; use it with --model {shown})\n\n"
            + format_sections("atlasmtl model", model.resource_summary()))


def _launch_rank() -> int:
    """This process's rank as ``torchrun`` set it (``RANK``; 0 outside a launch)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def cmd_predict(args: argparse.Namespace, out: dict[str, Any]) -> str:
    from . import TrainedModel, predict
    from .exceptions import InputError, OutputError
    from .io import table_format
    from .runtime import format_sections

    dest = Path(args.out)
    out_format = "h5ad"
    if dest.suffix != ".h5ad":
        try:
            out_format = "tsv" if table_format(dest)[0] == "\t" else "csv"
        except OutputError as exc:
            raise UsageError(f"--out {args.out!r}: the file must end in .csv, .tsv or .h5ad "
                             "(a table may be compressed: predictions.csv.gz)") from exc
    if _same_file(dest, args.query):
        raise InputError(f"--out {args.out!r} is the query file itself; write the predictions to a new file.")
    _check_writable(dest, "predictions")
    if not os.path.exists(args.query):
        raise InputError(f"No such file: {args.query!r}.")
    model = TrainedModel.load(_model_path(args.model))
    query = args.query  # a path: read backed, in chunks
    if args.query_filter:
        query = select_cells(read_h5ad(args.query, backed=True), args.query_filter, "--query-filter", args.query)
    if args.distributed:
        from . import distributed

        if not distributed.launched_by_torchrun() and not distributed.is_distributed():
            warnings.warn("--distributed without torchrun: the query is predicted in this one process (the same "
                          "result). To share it between N processes, launch `torchrun --nproc_per_node=N -m atlasmtl.cli "
                          "predict --distributed ...`.", stacklevel=2)
        try:
            result = distributed.predict_distributed(model, query, show_summary=False,
                                                     **_api_kwargs(args, predict, _PREDICT_SKIP))
            if result is not None:
                _write_predictions(result, query, dest, args)
            distributed.barrier()  # the other ranks finish when rank 0 has written the file
        finally:
            distributed.destroy()
        if result is None:
            out.update(rank=_launch_rank())  # read from torchrun's environment: the group is gone
            return ""
    else:
        result = predict(model, query, show_summary=False, **_api_kwargs(args, predict, _PREDICT_SKIP))
        _write_predictions(result, query, dest, args)
    out.update(
        out=str(dest),
        format=out_format,
        mode=args.mode,
        n_cells=result.n_obs,
        query_filter=_filters_record(args.query_filter),
        levels=_level_stats(result),
        genes={k: v for k, v in (result.metadata.get("genes") or {}).items()},
        input=result.metadata.get("input"),
        runtime=result.metadata.get("prediction_runtime"),
    )
    return (f"wrote {result.n_obs:,} predictions to {dest} ({_MODE_COLUMNS[args.mode]})\n\n"
            + format_sections("atlasmtl prediction", result.summary()))


#: ``predict --mode``: what the written predictions hold, in words (the next mode adds to it).
_MODE_COLUMNS = {
    "minimal": "--mode minimal: the labels, pred_<level>; --mode standard adds confidences, which evaluate's ECE "
               "needs, and --mode full the network's own calls and novelty scores",
    "standard": "--mode standard: labels, confidences, margins and Unknown flags; --mode full adds the network's own "
                "calls and novelty scores",
    "full": "--mode full: every column, as report --predictions reads them",
}


def _write_predictions(result: Any, query: Any, dest: Path, args: argparse.Namespace) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.suffix == ".h5ad":
        _write_h5ad(result, query, dest, args.mode, args.include_coords)
    else:
        result.to_csv(dest, mode=args.mode, include_coords=args.include_coords)


def cmd_report(args: argparse.Namespace, out: dict[str, Any]) -> str:
    from . import TrainedModel, predict
    from .report import result_from_predictions
    from .report_html import write_report_and_metrics

    dest = Path(args.out)
    if dest.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--out {args.out!r}: the report file must end in .html")
    _check_writable(dest, "report")
    truth = parse_truth_columns(args.truth_columns)
    model = TrainedModel.load(_model_path(args.model))
    query = read_h5ad(args.query, backed=True)
    if args.query_filter:
        query = select_cells(query, args.query_filter, "--query-filter", args.query)
    if truth is not None:  # a misspelt column fails here, named as the option, not after the whole prediction
        from .truth import level_columns

        level_columns(model.label_columns, truth, query.obs.columns, repr(args.query), "--truth-columns")
    reference = read_h5ad(args.reference, backed=True) if args.reference else None
    if args.reference_filter:
        if reference is None:
            raise UsageError("--reference-filter needs --reference")
        reference = select_cells(reference, args.reference_filter, "--reference-filter", args.reference)
    kwargs = _api_kwargs(args, predict, _PREDICT_SKIP)
    if args.predictions:
        import dataclasses

        from .gating import GatingConfig

        settings = {f.name: kwargs[f.name] for f in dataclasses.fields(GatingConfig)}
        # the table keeps no settings: the options given here are those the report describes
        settings.update({name: kwargs[name] for name in ("novelty_threshold", "neighbourhood_k") if name in kwargs})
        result = result_from_predictions(args.predictions, model, settings=settings)
        if list(result.obs_names) != list(query.obs_names):
            from .exceptions import InputError

            raise InputError(
                f"The predictions in {args.predictions!r} ({result.n_obs} cells) are not for the cells of "
                f"{args.query!r} ({query.n_obs} cells; same names and order required)."
            )
    else:
        result = predict(model, query, show_summary=False, **kwargs)
    _, evaluation, used = write_report_and_metrics(dest, result, model=model, adata=query, truth=truth,
                                                   reference=reference, title=args.title)
    out.update(out=str(dest), n_cells=result.n_obs, query_filter=_filters_record(args.query_filter),
               reference_filter=_filters_record(args.reference_filter), levels=_level_stats(result),
               bytes=dest.stat().st_size)
    if evaluation is not None:  # what the report's accuracy section shows
        out["truth_columns"] = used
        out["metrics"] = evaluation["levels"]
    return f"wrote the report to {dest}"


#: ``evaluate --out``: suffix → separator (``None``: JSON).
_METRICS_FORMATS = {".json": None, ".csv": ",", ".tsv": "\t"}


def _shown(names: Sequence[Any], limit: int = 20) -> str:
    names = [str(n) for n in names]
    return ", ".join(map(repr, names[:limit])) + (" ..." if len(names) > limit else "") if names else "none"


def _read_predictions(path: str) -> tuple[Any, list[str]]:
    """``evaluate --predictions``: the table (a CSV/TSV as text, or an ``.h5ad``'s obs) and its levels."""
    from .calls import levels_in_table
    from .exceptions import InputError
    from .io import read_prediction_table

    table = read_prediction_table(path)
    levels = levels_in_table(table.columns)
    if not levels:
        raise InputError(f"{path!r} has no pred_<level> column (its columns: {_shown(table.columns)}); give the file "
                         "'atlasmtl predict --out predictions.csv' or '--out annotated.h5ad' wrote.")
    return table, levels


def _read_truth(path: str) -> Any:
    """``evaluate --truth``: an ``.h5ad``'s obs, or a CSV/TSV indexed by its first column (empty = no label)."""
    from .io import check_input_file, read_h5ad_obs, read_text_table

    check_input_file(path, "truth file")
    if Path(path).suffix.lower() == ".h5ad":
        return read_h5ad_obs(path)
    return read_text_table(path, "truth table", missing_as_nan=True)


def _metrics_frame(evaluation: dict[str, Any]) -> Any:
    """One row per level: the level metrics, then the novelty figures when evaluated."""
    from .metrics import evaluation_table

    frame = evaluation_table(evaluation, "levels")
    if evaluation.get("novel"):
        frame = frame.join(evaluation_table(evaluation, "novel"))
    return frame


def _metrics_text(evaluation: dict[str, Any], used: dict[str, str], predictions: str, truth: str,
                  table: Any) -> str:
    """The human-readable table of ``evaluate``: one row per level, then why whole columns read ``-``."""
    columns = [("n", "n"), ("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("balanced_accuracy", "balanced acc."),
               ("coverage", "coverage"), ("network_error", "network error"),
               ("unknown_withheld_error", "Unknown: withheld wrong"), ("ece", "ECE")]
    novel = evaluation.get("novel")
    if novel:
        columns += [("auroc", "novel AUROC"), ("novel_unknown_rate", "novel->Unknown"),
                    ("known_unknown_rate", "known->Unknown")]

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return "-"
        return f"{value:,}" if isinstance(value, int) else f"{value:.3f}"

    rows = [["level"] + [title for _, title in columns]]
    for level, metrics in evaluation["levels"].items():
        values = {**metrics, **((novel or {}).get("levels", {}).get(level) or {})}
        rows.append([level] + [cell(values.get(key)) for key, _ in columns])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(text.ljust(w) if i == 0 else text.rjust(w) for i, (text, w) in enumerate(zip(row, widths)))
             for row in rows]
    pairs = ", ".join(lv if lv == col else f"{lv}={col}" for lv, col in used.items())
    head = f"{evaluation['n_cells']:,} cells of {predictions} scored against {truth} ({pairs})"
    if novel:
        head += f"; {novel['n_novel']:,} novel and {novel['n_known']:,} known cells"
    return "\n".join([head, ""] + lines + _mode_lines(table, list(evaluation["levels"]), bool(novel))
                     + _hierarchy_lines(evaluation.get("hierarchy")))


def _mode_lines(table: Any, levels: list[str], novel: bool) -> list[str]:
    """What ``evaluate``'s table could not score because the predictions lack the columns it needs
    (``predict --mode minimal`` writes the labels only, ``standard`` adds the confidences, ``full`` the
    network's own calls and the novelty scores), with the mode that writes them. Nothing when every level has
    them."""
    from .calls import column_names

    def lacking(field: str) -> bool:
        return all(column_names(level)[field] not in table.columns for level in levels)

    notes = []
    if lacking("conf"):
        notes.append(f"{'ECE and novel AUROC' if novel else 'ECE'}: no conf_<level> column in the predictions "
                     "(written by 'atlasmtl predict --mode standard' or 'full')")
    elif novel and lacking("novelty"):
        notes.append("novel AUROC is of 1 - confidence: no novelty_<level> column in the predictions "
                     "(atlasmtl's novelty score, written by 'atlasmtl predict --mode full')")
    if lacking("raw"):
        notes.append("network error and Unknown: withheld wrong: no pred_<level>_raw column in the predictions "
                     "(the network's own call, written by 'atlasmtl predict --mode full')")
    return ["", "not scored:"] + [f"  {note}" for note in notes] if notes else []


def _hierarchy_lines(hierarchy: dict[str, Any] | None) -> list[str]:
    """``evaluate``'s hierarchy section in words: path consistency and full-path accuracy (none for one level)."""
    if not hierarchy or not hierarchy.get("pairs"):
        return []
    where = {"truth": "the truth's", "result": "the model's", "argument": "the given"}.get(hierarchy["source"],
                                                                                           hierarchy["source"])
    consistency = hierarchy.get("path_consistency")
    text = (f"paths: {consistency:.1%} of {hierarchy['n_checked']:,} checkable cells follow {where} hierarchy"
            if consistency is not None else f"paths: no cell could be checked against {where} hierarchy")
    if hierarchy.get("full_path_accuracy") is not None:
        text += (f"; full-path accuracy {hierarchy['full_path_accuracy']:.3f} "
                 f"({hierarchy['n_full_path']:,} cells labelled at every level)")
    return ["", text]


def cmd_evaluate(args: argparse.Namespace, out: dict[str, Any]) -> str:
    from .exceptions import InputError

    dest = Path(args.out) if args.out else None
    if dest is not None:
        if dest.suffix.lower() not in _METRICS_FORMATS:
            raise UsageError(f"--out {args.out!r}: the metrics file must end in .json, .csv or .tsv")
        for option, path in (("--predictions", args.predictions), ("--truth", args.truth)):
            if _same_file(dest, path):
                raise InputError(f"--out {args.out!r} is the {option} file itself; write the metrics to a new file.")
        _check_writable(dest, "metrics")
    spec = parse_truth_columns(args.truth_columns)
    novel = parse_novel_labels(args.novel_labels)
    table, levels = _read_predictions(args.predictions)
    if novel:
        unknown = [lv for lv in novel if lv not in levels]
        if unknown:
            raise UsageError(f"--novel-labels names level(s) {_shown(unknown)} that the predictions do not have "
                             f"(their levels: {_shown(levels)})")
    truth = _read_truth(args.truth)
    from .truth import level_columns

    used = level_columns(levels, spec, truth.columns, repr(args.truth), "--truth-columns")
    if novel:
        unscored = [lv for lv in novel if lv not in used]
        if unscored:
            raise UsageError(f"--novel-labels names level(s) {_shown(unscored)} without a truth column; name their "
                             "column with --truth-columns")
    labels = truth.loc[:, list(used.values())]
    labels.columns = list(used)

    from .metrics import evaluate

    evaluation = evaluate(table, labels, list(used), novel_labels=novel)
    out.update(predictions=args.predictions, truth=args.truth, truth_columns=used, n_cells=evaluation["n_cells"],
               metrics=evaluation["levels"], hierarchy=evaluation.get("hierarchy"))
    if novel:
        out["novel"] = evaluation["novel"]
    text = _metrics_text(evaluation, used, args.predictions, args.truth, table)
    if dest is not None:
        from .io import atomic_write, to_json

        sep = _METRICS_FORMATS[dest.suffix.lower()]
        data = to_json(evaluation) + "\n" if sep is None else _metrics_frame(evaluation).to_csv(sep=sep)
        atomic_write(dest, data.encode("utf-8"), "metrics")
        out["out"] = str(dest)
        text += f"\n\nwrote the metrics to {dest}"
    return text


def cmd_demo(args: argparse.Namespace, out: dict[str, Any]) -> str:
    from .demo import run_demo

    kwargs = _api_kwargs(args, run_demo, _DEMO_SKIP)
    scores = run_demo(out_dir=args.out_dir, quiet=args.json or args.quiet, **kwargs)
    out.update(dataset="pbmc68k_reduced", out_dir=str(args.out_dir), scores=scores)
    return ""


_COMMANDS = {"train": cmd_train, "predict": cmd_predict, "report": cmd_report, "evaluate": cmd_evaluate,
             "demo": cmd_demo}


def _to_json(report: dict[str, Any]) -> str:
    from .io import to_json

    return to_json(report)


def read_h5ad(path: str, backed: bool = False) -> Any:
    """:func:`atlasmtl.io.read_h5ad`, imported when a command first reads a file."""
    from .io import read_h5ad as read

    return read(path, backed=backed)


def _subcommand(argv: Sequence[str]) -> str | None:
    """The command ``argv`` runs, known before parsing: its first word that is not an option (``atlasmtl``'s own
    options, ``--help`` and ``--version``, take no value), when that names a command; else ``None``."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in _COMMANDS else None


def _exit_code(exc: BaseException) -> int:
    from .exceptions import ArtifactError, AtlasMTLError

    if isinstance(exc, ArtifactError):
        return EXIT_MODEL
    if isinstance(exc, (AtlasMTLError, UsageError, OSError)):
        return EXIT_USAGE
    return EXIT_ERROR


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, UsageError):
        return text
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = f"{exc.strerror}: {exc.filename!r}"
    return f"{type(exc).__name__}: {text}"


def _emit(text: str | None) -> None:
    """Print to stdout; a reader that closed the pipe early (``| head``) is not an error."""
    if text is None:
        return
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


#: Options that name a file or folder: an empty value is refused, not read as the current folder.
_PATH_OPTIONS = ("reference", "model", "query", "predictions", "truth", "gene_map", "out", "out_dir")


def _refuse_empty_paths(args: argparse.Namespace) -> None:
    """A :class:`UsageError` for a path option given as an empty string (``--out "$OUTDIR"`` with the variable
    unset): ``Path("")`` is the current folder, so ``train --out ""`` wrote ``./model.pth`` over any model there."""
    for dest in _PATH_OPTIONS:
        value = getattr(args, dest, None)
        if isinstance(value, str) and not value.strip():
            flag = "--" + dest.replace("_", "-")
            raise UsageError(f"{flag} is empty; give a file or folder name (an unset shell variable gives an "
                             f"empty {flag})")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``atlasmtl`` command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "atlasmtl"
    json_out = "--json" in argv
    verbose = "--verbose" in argv
    quiet = "--quiet" in argv
    report: dict[str, Any] = {}
    caught: list[str] = []
    parser: argparse.ArgumentParser | None = None

    def show_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        text = " ".join(str(message).split())
        caught.append(text)
        if quiet:
            return
        where = f" ({filename}:{lineno})" if verbose else ""
        print(f"atlasmtl: warning: {text}{where}", file=sys.stderr)

    try:
        sub = _subcommand(argv)
        report.update(command=sub)  # before parsing: an argument error's --json output names the command too
        parser = build_parser([sub] if sub else [])
        prog = f"atlasmtl {sub}" if sub else "atlasmtl"
        args = parser.parse_args(argv)
        report.update(command=args.command)
        _refuse_empty_paths(args)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.showwarning = show_warning
            text = _COMMANDS[args.command](args, report)
        report.update(ok=True, seconds=round(time.perf_counter() - t0, 3), warnings=caught)
        if report.get("rank"):  # a distributed run's other ranks write nothing: one JSON object per run
            return EXIT_OK
        _emit(_to_json(report) if json_out else (text if text and not quiet else None))
        return EXIT_OK
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one line and an exit status
        code = _exit_code(exc)
        if verbose:
            traceback.print_exc(file=sys.stderr)
        hint = "" if verbose or code != EXIT_ERROR else " (unexpected; rerun with --verbose for the traceback)"
        from .exceptions import AtlasMTLError
        from .validation import option_spelling

        # the API names its parameters (use_raw=True); here they read as options (--use-raw)
        line = option_spelling(_one_line(exc), parser) if isinstance(exc, AtlasMTLError) else _one_line(exc)
        print(f"{prog}: error: {line}{hint}", file=sys.stderr)
        if json_out:
            report.update(ok=False, error=line, error_type=type(exc).__name__, exit_code=code,
                          warnings=caught)
            _emit(_to_json(report))
        return code


if __name__ == "__main__":
    sys.exit(main())
