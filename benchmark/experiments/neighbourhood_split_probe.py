"""Issue 9: split a called class whose neighbourhood novelty has two modes (research probe).

The finest-level neighbourhood flag (API contract, "Neighbourhood novelty: evidence") calls a cell Unknown when
the mean novelty z of its 30 nearest query cells exceeds ``novelty_threshold`` (3.5). It ranks a missing type's
cells well (AUROC 0.97-0.99 on eight of the nine removed-type cases) but flags few on five of them: their
neighbourhoods sit at z 2-3, under any threshold that leaves a protocol shift (CellBench Drop-seq) alone. A
protocol shift moves all of a class's query cells together; a missing type is a *group* among the cells called
that class, further out than the rest. This probe looks for that second mode.

Per finest class ``c`` called (not Unknown) by at least ``MIN_CELLS`` query cells, their finite neighbourhood
novelty values are split in two at Otsu's cut (the cut that maximises the between-group variance). The upper
group is flagged Unknown when both hold:

- the groups are far apart: the upper group's mean exceeds the lower's by at least ``G`` (z units);
- the upper group stands out from the reference: its mean neighbourhood z >= ``F``.

(Ashman's D is no test here: a neighbourhood mean is a smooth field, its spread within a group is small, and
Otsu's two halves of a unimodal class already reach D of 2.5-4.)

Per case and seed the default model (``MODELS/<case>_<seed>.pth``) predicts once at the defaults; its finest
calls, Unknown flags and neighbourhood novelty are cached in ``CACHE/<case>_<seed>.npz`` so rules can be
re-scored without predicting again. As in ``neighbourhood_threshold_probe.py``, the truth of the novel cells
is Unknown (abstaining on them is right). Per case, seed and rule: finest macro-F1 at the defaults (``f1``),
its change under the rule (``d``), known -> Unknown (``kU``) and novel -> Unknown (``nU``) before and after.

    PYTHONPATH=$PWD python benchmark/experiments/neighbourhood_split_probe.py <case,...> 0,1 out.csv MODELS CACHE [WORK]
"""
import sys
import warnings
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import load_case, open_set_truth, read_truth  # noqa: E402

MIN_CELLS = 20
G_GRID = (1.0, 1.5, 2.0)
F_GRID = (2.0, 2.5, 3.0)


def otsu_split(v: np.ndarray) -> tuple[float, np.ndarray]:
    """Otsu's cut of 1-D values: ``(cut, upper mask)``, the cut maximising the between-group variance."""
    order = np.sort(v)
    n = len(order)
    csum = np.cumsum(order)
    k = np.arange(1, n)  # lower group = first k values
    m_lo = csum[:-1] / k
    m_hi = (csum[-1] - csum[:-1]) / (n - k)
    between = k * (n - k) * (m_hi - m_lo) ** 2
    distinct = order[1:] > order[:-1]  # a cut must fall between two different values
    if not distinct.any():
        return np.inf, np.zeros(n, dtype=bool)
    best = np.argmax(np.where(distinct, between, -1.0))
    cut = 0.5 * (order[best] + order[best + 1])
    return cut, v > cut


def split_flags(values: np.ndarray, called: np.ndarray, g_min: float, f_min: float,
                min_cells: int = MIN_CELLS) -> np.ndarray:
    """Cells in the upper mode of their called class's neighbourhood novelty (see the module docstring)."""
    flags = np.zeros(len(values), dtype=bool)
    ok = np.isfinite(values) & (called != "Unknown")
    for c in np.unique(called[ok]):
        members = np.flatnonzero(ok & (called == c))
        if len(members) < min_cells:
            continue
        v = values[members]
        _, upper = otsu_split(v)
        if upper.sum() < 2 or (~upper).sum() < 2:
            continue
        hi, lo = v[upper], v[~upper]
        if hi.mean() - lo.mean() >= g_min and hi.mean() >= f_min:
            flags[members[upper]] = True
    return flags


def cached_calls(case: str, seed: int, models: Path, cache: Path, work: Path) -> dict[str, np.ndarray]:
    path = cache / f"{case}_{seed}.npz"
    if path.exists():
        return dict(np.load(path, allow_pickle=False))
    import atlasmtl
    from atlasmtl.model import TrainedModel
    from common import read_cells

    spec = load_case(work / "cases" / case)
    fine = spec["levels"][-1]
    query = read_cells(work / "cases" / case / "query.h5ad", obsm=False)
    result = atlasmtl.predict(TrainedModel.load(models / f"{case}_{seed}.pth"), query, num_threads=1,
                              show_progress=False, show_summary=False)
    calls = result.levels[fine]
    out = {"pred": result.to_dataframe(mode="minimal")[f"pred_{fine}"].astype(str).to_numpy().astype("U"),
           "unknown": np.asarray(calls.is_unknown, dtype=bool),
           "around": np.asarray(calls.neighbourhood_novelty, dtype=np.float64),
           "z": np.asarray(calls.novelty, dtype=np.float64)}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def main() -> None:
    warnings.filterwarnings("ignore")
    cases, seeds, out = sys.argv[1].split(","), [int(s) for s in sys.argv[2].split(",")], Path(sys.argv[3])
    models, cache = Path(sys.argv[4]), Path(sys.argv[5])
    work = Path(sys.argv[6]) if len(sys.argv) > 6 else Path("/work/bench_work")
    rows = []
    for case in cases:
        spec = load_case(work / "cases" / case)
        novel, t, labels = open_set_truth(spec, read_truth(work / "cases" / case))
        for seed in seeds:
            if not (cache / f"{case}_{seed}.npz").exists() and not (models / f"{case}_{seed}.pth").exists():
                continue
            c = cached_calls(case, seed, models, cache, work)
            f1 = f1_score(t, c["pred"], labels=labels, average="macro")
            base = {"case": case, "seed": seed, "f1": f1, "kU": c["unknown"][~novel].mean(),
                    "nU": c["unknown"][novel].mean() if novel.any() else np.nan}
            for g_min, f_min in product(G_GRID, F_GRID):
                flagged = split_flags(c["around"], c["pred"], g_min, f_min)
                pred = np.where(flagged, "Unknown", c["pred"])
                unknown = c["unknown"] | flagged
                rows.append({**base, "rule": f"G{g_min}_F{f_min}",
                             "d": f1_score(t, pred, labels=labels, average="macro") - f1,
                             "kU_rule": unknown[~novel].mean(),
                             "nU_rule": unknown[novel].mean() if novel.any() else np.nan})
            print(case, seed, flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(out, index=False)
    per_case = df.groupby(["rule", "case"]).mean(numeric_only=True)
    for rule, table in per_case.groupby(level="rule"):
        table = table.droplevel("rule")
        print(f"{rule}: finest change {table['d'].mean():+.4f} (worst {table['d'].min():+.3f}, {table['d'].idxmin()}); "
              f">= 50% novel -> Unknown: {(table['nU'] >= 0.5).sum()} -> {(table['nU_rule'] >= 0.5).sum()}; "
              f"> 5% known -> Unknown: {(table['kU'] > 0.05).sum()} -> {(table['kU_rule'] > 0.05).sum()}")
    print(per_case.round(3).to_string())


if __name__ == "__main__":
    main()
