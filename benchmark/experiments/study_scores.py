"""What the setting studies record per trained model, and the loop of the post-hoc studies.

``score_model`` (predictions at the defaults and with KNN off, scored) is shared by
``build_setting_study.py`` and ``refit_study.py`` (rows in one format, so one ``--summarise`` reads both);
``score_result`` scores one prediction. ``posthoc_main`` runs a study that predicts with default models
trained once and kept (``query_prior_study.py``, ``novelty_ensemble_study.py``, ``knn_rule_study.py``,
``self_training_study.py``; pass one ``--models`` folder to all of them to train each model once).
``default_models`` is that loop over cases, seeds and saved default models; the post-hoc probes
(``*_probe.py``) walk it too, with ``train=False``.
"""
import argparse
import gzip
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import anndata as ad
import pandas as pd
import torch

import atlasmtl
from atlasmtl.model import TrainedModel
from common import read_cells, read_study_case

NOVELTY_KEYS = ("auroc", "auroc_neighbourhood", "novel_unknown_rate", "known_unknown_rate")
#: The benchmark's peers, whose best per case and level the studies compare with.
PEERS = ("celltypist", "logreg", "knn", "symphonypy")


def constant_patcher(patches: dict):
    """For ``{label: {"module.NAME": value}}`` (modules of ``atlasmtl``): a function that sets one label's
    constants and every other named constant back to its default (``apply({})`` restores them all)."""
    import importlib

    def target(name):
        module, attr = name.rsplit(".", 1)
        return importlib.import_module("atlasmtl." + module), attr

    saved = {name: getattr(*target(name)) for patch in patches.values() for name in patch}

    def apply(patch: dict) -> None:
        for name, default in saved.items():
            setattr(*target(name), patch.get(name, default))

    return apply


def keep_view_points(state: dict) -> None:
    """Patch :func:`atlasmtl.prediction._input_view_block` so that each prediction also keeps every query
    cell's input-view coordinates (with the residual coordinate, where the view has one) in
    ``state["points"]`` (cells × coordinates, rows in query order)."""
    import numpy as np
    import atlasmtl.prediction as P

    shipped = P._input_view_block

    def block(view, x, zero, buffers, rows):
        shipped(view, x, zero, buffers, rows)
        pts = view.project(x.rows, zero) if isinstance(x, P.SparseInput) else view.project(x.cpu().numpy())
        n = len(buffers.no_signal)
        if state.get("points") is None or state["points"].shape != (n, pts.shape[1]):
            state["points"] = np.zeros((n, pts.shape[1]))
        state["points"][rows] = pts

    P._input_view_block = block


def read_rows(path) -> list | dict:
    """A study's rows (or a benchmark results file): JSON, gzipped when the name ends in ``.gz``."""
    path = str(path)
    return json.loads(gzip.open(path, "rt").read() if path.endswith(".gz") else Path(path).read_text())


def peer_levels(results="benchmark/results/results.json") -> dict:
    """``{case: {method: per-level metrics}}`` of the successful runs in a benchmark results file."""
    peers: dict = {}
    for x in read_rows(results)["runs"]:
        if x["status"] == "ok":
            peers.setdefault(x["case"], {})[x["method"]] = x["metrics"]["levels"]
    return peers


def best_peer(peers: dict, case: str, levels: list) -> dict:
    """The best peer's macro-F1 per level of a case (``peers``: :func:`peer_levels`)."""
    return {lv: max(peers[case][m][lv]["macro_f1"] for m in PEERS if m in peers[case]) for lv in levels}


def score_result(res, truth, spec) -> dict:
    """Per level the numeric metrics of ``atlasmtl.evaluate`` (Unknown counts as wrong), and the novelty
    metrics where the case has novel labels."""
    levels, novel = spec["levels"], ({"novel_labels": spec["novel"]} if spec.get("novel") else {})
    met = atlasmtl.evaluate(res, truth, label_columns=levels, **novel)
    return {
        "levels": {lv: {k: v for k, v in met["levels"][lv].items() if isinstance(v, (int, float, type(None)))} for lv in levels},
        "novel": {lv: {k: v.get(k) for k in NOVELTY_KEYS} for lv, v in met["novel"]["levels"].items()} if met.get("novel") else None}


def print_progress(case, seed, row, fine) -> None:
    """One JSON line per study row: the finest macro-F1 of every scored setting in ``row``."""
    print(json.dumps({"case": case, "seed": seed, **{n: round(v["levels"][fine]["macro_f1"], 4)
                                                      for n, v in row.items() if isinstance(v, dict)}}), flush=True)


def score_model(model, query, truth, spec) -> dict:
    """``{"default": ..., "off": ...}``: :func:`score_result` of the predictions at the defaults and with
    ``knn_correction="off"``."""
    return {name: score_result(atlasmtl.predict(model, query, show_progress=False, show_summary=False, **kw), truth, spec)
            for name, kw in {"default": {}, "off": {"knn_correction": "off"}}.items()}


def default_models(cases: Iterable[str], seeds: Sequence[int], rows: Iterable[dict[str, Any]] = (), *,
                   work: Path, models: Path, train: bool = True, reference: bool = True,
                   ) -> Iterator[tuple[str, int, dict[str, Any], ad.AnnData | None, ad.AnnData, pd.DataFrame, TrainedModel]]:
    """The default model of each (case, seed) with its prepared case: the loop of the post-hoc studies and probes.

    Each case is read once (:func:`common.read_study_case`), then its seeds are visited in order; the model is
    ``models/<case>_<seed>.pth``, loaded with :meth:`atlasmtl.model.TrainedModel.load`.

    Parameters
    ----------
    cases
        Names of prepared cases under ``work / "cases"``.
    seeds
        The seeds of every case (each case walks them all).
    rows
        Rows already written (each with ``"case"`` and ``"seed"``): their (case, seed) pairs are skipped.
    work
        The benchmark's work folder (``/work/bench_work`` in the studies' command lines).
    models
        The folder of the saved default models.
    train
        Where ``models/<case>_<seed>.pth`` is missing, train the default model on one thread
        (``atlasmtl.build_model(ref, levels, random_state=seed)``) and save it there, so several studies share
        one training. ``False``: never train; a missing model raises (``TrainedModel.load``'s error).
    reference
        Read the reference and yield it; ``False``: ``ref`` is ``None`` (it is still read to train a missing
        model).

    Yields
    ------
    tuple
        ``(case, seed, spec, ref, query, truth, model)``: the case name and seed, ``case.json``, the reference
        (or ``None``), the query (without ``obsm``), its true labels, and the default model.
    """
    for case, seed, spec, ref, query, truth in study_cases(cases, seeds, rows, work=work, reference=reference):
        path = models / f"{case}_{seed}.pth"
        if path.exists() or not train:
            model = TrainedModel.load(path)
        else:
            training = ref if ref is not None else read_cells(work / "cases" / case / "ref.h5ad")
            model = atlasmtl.build_model(training, spec["levels"], random_state=seed, num_threads=1,
                                         show_progress=False, show_summary=False)
            model.save(path)
        yield case, seed, spec, ref, query, truth, model


def study_cases(cases: Iterable[str], seeds: Sequence[int], rows: Iterable[dict[str, Any]] = (), *, work: Path,
                reference: bool = True) -> Iterator[tuple[str, int, dict[str, Any], ad.AnnData | None, ad.AnnData, pd.DataFrame]]:
    """``(case, seed, spec, ref, query, truth)`` for every (case, seed) not yet in ``rows``: each case read once
    (:func:`common.read_study_case` under ``work / "cases"``), then its seeds in order. The loop of
    :func:`default_models` and of the studies that train models of their own."""
    done = {(r["case"], r["seed"]) for r in rows}
    for case in cases:
        if all((case, seed) in done for seed in seeds):
            continue
        spec, ref, query, truth = read_study_case(work / "cases" / case, reference=reference)
        for seed in seeds:
            if (case, seed) not in done:
                yield case, seed, spec, ref, query, truth


def posthoc_main(study, summarise, models_default: str) -> None:
    """Command line of a post-hoc study: ``<cases> <seeds> out.json [--work DIR] [--models DIR]`` runs
    ``study(default_models(...))`` (it yields one row per case and seed; each is saved as it comes), and
    ``--summarise ARGS`` prints ``summarise(*ARGS)``."""
    if len(sys.argv) > 1 and sys.argv[1] == "--summarise":
        print(summarise(*sys.argv[2:]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("cases")
    ap.add_argument("seeds")
    ap.add_argument("out", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/work/bench_work"))
    ap.add_argument("--models", type=Path, default=Path(models_default))
    a = ap.parse_args()
    a.models.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    rows = json.loads(a.out.read_text()) if a.out.exists() else []
    for row in study(default_models(a.cases.split(","), [int(s) for s in a.seeds.split(",")], rows,
                                    work=a.work, models=a.models)):
        rows.append(row)
        a.out.write_text(json.dumps(rows))
