"""Issue 9 (novel types under a shift): align the query with the reference in the input view before its
distances (research script).

The novelty scores are located at the query by a scalar (``novelty.query_location_z``): every cell's z falls
by the same amount, so a known type that another platform or species moves away from its reference class
keeps its distance relative to the novel cells. A shift of the whole query also has a *direction*: in the
input view's PCA, each called class's query cells sit displaced from the class's kept training cells by about
the same vector, while a type the reference lacks sits elsewhere. Here the query's PCA coordinates are moved
back by that vector before the view's distances are taken:

- per called class ``c`` at the alignment level with at least ``MIN_QUERY`` query cells, the displacement
  ``d_c`` = coordinate-wise median of its query cells' coordinates − that of its kept training cells;
- ``delta`` = coordinate-wise median of the ``d_c`` over those classes (none when fewer than two), so a class
  made up mostly of novel cells does not move it;
- the view's log distances at every level are then those of ``points − delta`` (the residual coordinate, a
  norm, is left as it is); everything after (the view's located z, the flags, the neighbourhood novelty)
  is as shipped.

Variants: ``default`` (shipped), ``align_fine`` (classes of the finest level), ``align_coarse`` (classes of the
coarsest level); ``noq`` / ``align_fine_noq``: without / with the finest alignment, and without the view's
per-class location (``novelty.INPUT_VIEW_CLASS_QUANTILE`` = 0: a called class is located with the query as a
whole), which the alignment might make unnecessary. Post hoc on the default models; the network, the embedding view and the gate are unchanged.

    PYTHONPATH=$PWD python benchmark/experiments/view_alignment_study.py <case,case,...> 0,1,2 out.json [--work DIR] [--models DIR]
    python benchmark/experiments/threshold_table.py out.json
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import keep_view_points, posthoc_main, print_progress, score_result  # noqa: E402
import atlasmtl  # noqa: E402
import atlasmtl.novelty as N  # noqa: E402
import atlasmtl.prediction as P  # noqa: E402

#: name → (alignment level: None = none, -1 = finest, 0 = coarsest; the view's per-class quantile)
VARIANTS = {"default": (None, None), "align_fine": (-1, None), "align_coarse": (0, None),
            "noq": (None, 0.0), "align_fine_noq": (-1, 0.0)}
MIN_QUERY = 10
CLASS_QUANTILE = N.INPUT_VIEW_CLASS_QUANTILE
STATE: dict = {"level": None, "points": None, "delta": None}
_assemble = P._assemble
keep_view_points(STATE)


def displacement(points: np.ndarray, calls: np.ndarray, kept: np.ndarray, members: np.ndarray) -> np.ndarray:
    """The median over called classes of (query class median − kept training cells' median), coordinate-wise."""
    per_class = []
    for c in np.unique(calls[calls >= 0]):
        own = members == c
        at = calls == c
        if at.sum() >= MIN_QUERY and own.sum() >= 2:
            per_class.append(np.median(points[at], axis=0) - np.median(kept[own], axis=0))
    return np.median(np.stack(per_class), axis=0) if len(per_class) >= 2 else np.zeros(points.shape[1])


def assemble(model, buffers, gate, decoder, novelty_threshold, neighbourhood_k=0):
    """The view's log distances recomputed from the aligned query coordinates, then the shipped assembly."""
    view, which = decoder.input_view, STATE["level"]
    if which is not None and view is not None and STATE["points"] is not None:
        nc = view.n_components
        usable = ~buffers.no_signal
        lv_align = model.label_columns[which]
        calls = np.where(usable, buffers.levels[lv_align]["raw"], -1)
        members = view.members.get(lv_align)
        if members is not None:
            delta = displacement(STATE["points"][:, :nc][usable], calls[usable], view.points[:, :nc], members)
            STATE["delta"] = float(np.linalg.norm(delta))
            points = STATE["points"].copy()
            points[:, :nc] -= delta
            for lv in view.levels:
                o = buffers.levels[lv]
                called = np.where(usable, o["raw"], -1)
                o["input_distance"], o["input_distance_residual"] = view.log_distances(points, called, lv)[:2]
    return _assemble(model, buffers, gate, decoder, novelty_threshold, neighbourhood_k)


P._assemble = assemble


def study(models):
    for case, seed, spec, ref, query, truth, model in models:
        row = {"case": case, "seed": seed, "K": "auto"}
        for name, (level, quantile) in VARIANTS.items():
            STATE["level"], STATE["delta"] = level, None
            N.INPUT_VIEW_CLASS_QUANTILE = CLASS_QUANTILE if quantile is None else quantile
            row[name] = score_result(atlasmtl.predict(model, query, show_progress=False, show_summary=False), truth, spec)
            if STATE["delta"] is not None:
                row[name]["delta_norm"] = STATE["delta"]
        STATE["level"], N.INPUT_VIEW_CLASS_QUANTILE = None, CLASS_QUANTILE
        print_progress(case, seed, row, spec["levels"][-1])
        yield row


if __name__ == "__main__":
    posthoc_main(study, lambda *a: "use threshold_table.py", "/work/bench_models")
