"""Issue 9: a sorted query. Is a cell called the same way when its query holds only its own type?

Research script. A sorted population (FACS-sorted cells, one cluster re-mapped on its own, a sample made of
one type) is a common query. The novelty scores are located at the query (``atlasmtl.novelty.query_location_z``;
the API contract's "Where the query is located"), the input view locates each called class with enough cells at
its own low quantile, and the query-only check compares query cells with their query neighbours: all three
read the query as a whole. ``novel_share_study.py`` measured a missing type at 10-90% of the query; this
probe takes the limit. Per case and seed, the default model (loaded from ``--models``) predicts

- the whole query, and
- for every true finest-level type with at least ``--min-cells`` query cells, the query made of that
  type's cells alone,

and each row compares the same cells in the two (``novel``: a type the case's ``novel`` labels list at the finest
level): accuracy and Unknown share per level, and how many calls
changed. ``--locate reference`` repeats it with the query's location switched off (both views scored against
the reference's held-out null as they are; ``query_location_z`` returns 0), to see how much of the
difference that location makes.

    PYTHONPATH=$PWD python benchmark/experiments/sorted_query_probe.py <cases> 0,1,2 out.csv.gz --cases-dir W/cases --models DIR [--locate reference]
    python benchmark/experiments/sorted_query_probe.py --summarise out.csv.gz --cases-dir W/cases

``--summarise`` prints, per case, the finest level's figures: the known types' Unknown share and accuracy
(weighted by cells) in the whole query and sorted, the largest sorted known type's Unknown share, and, on a
removed-type case, the missing type's Unknown share whole and sorted (means over the seeds); with the
``top_share`` columns (the largest share of the called cells one network call takes, over the levels, as
``atlasmtl.calls.dominant_call`` reads it), the whole query's largest over the seeds and the sorted queries'
smallest.
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

def levels_of(cases_dir: Path, case: str) -> list[str]:
    return json.loads((cases_dir / case / "case.json").read_text())["levels"]


def top_share(result) -> float:
    """The largest share of the called cells one network call (before Unknown) takes, over the levels: what
    ``atlasmtl.calls.dominant_call`` compares with ``DOMINANT_CALL_SHARE``."""
    shares = []
    for calls in result.levels.values():
        raw = np.asarray(calls.raw)
        raw = raw[raw >= 0]
        if len(raw):
            shares.append(float(np.bincount(raw).max() / len(raw)))
    return max(shares) if shares else float("nan")


def run(args: argparse.Namespace) -> None:
    import torch
    import atlasmtl
    import atlasmtl.novelty as novelty
    from study_scores import default_models

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    if args.locate == "reference":
        novelty.query_location_z = lambda z, calls=None: 0.0
    rows = []
    for case, seed, spec, _, query, truth, model in default_models(
            args.cases.split(","), [int(s) for s in args.seeds.split(",")], work=args.cases_dir.parent,
            models=args.models, train=False, reference=False):
        levels = spec["levels"]
        fine = levels[-1]
        truth = truth.reindex(query.obs_names)
        whole_result = atlasmtl.predict(model, query, show_progress=False, show_summary=False)
        whole = whole_result.to_dataframe()
        for label, n in truth[fine].value_counts().items():
            if n < args.min_cells:
                continue
            cells = truth.index[truth[fine] == label]
            alone_result = atlasmtl.predict(model, query[cells].copy(), show_progress=False, show_summary=False)
            alone = alone_result.to_dataframe()
            row = {"case": case, "seed": seed, "type": label, "n": int(n), "novel": label in (spec.get("novel") or {}).get(fine, []),
                   "whole|top_share": top_share(whole_result), "sorted|top_share": top_share(alone_result)}
            for lv in levels:
                t = truth.loc[cells, lv].astype(str).to_numpy()
                a = whole.loc[cells, f"pred_{lv}"].astype(str).to_numpy()
                b = alone.loc[cells, f"pred_{lv}"].astype(str).to_numpy()
                row.update({f"{lv}|whole_acc": float((a == t).mean()), f"{lv}|sorted_acc": float((b == t).mean()),
                            f"{lv}|whole_unknown": float((a == "Unknown").mean()),
                            f"{lv}|sorted_unknown": float((b == "Unknown").mean()),
                            f"{lv}|changed": int((a != b).sum())})
            rows.append(row)
            print(json.dumps(row), flush=True)
    pd.DataFrame(rows).to_csv(args.out, index=False)


def summarise(args: argparse.Namespace) -> None:
    df = pd.read_csv(args.summarise)
    out = []
    for case, g in df.groupby("case", sort=False):
        lv = levels_of(args.cases_dir, case)[-1]
        known, novel = g[~g.novel], g[g.novel]
        w = known.n
        r = {"case": case,
             "known Unknown whole": np.average(known[f"{lv}|whole_unknown"], weights=w),
             "known Unknown sorted": np.average(known[f"{lv}|sorted_unknown"], weights=w),
             "largest sorted": known.groupby("type")[f"{lv}|sorted_unknown"].mean().max(),
             "known acc whole": np.average(known[f"{lv}|whole_acc"], weights=w),
             "known acc sorted": np.average(known[f"{lv}|sorted_acc"], weights=w)}
        if len(novel):
            r["novel Unknown whole"] = novel[f"{lv}|whole_unknown"].mean()
            r["novel Unknown sorted"] = novel[f"{lv}|sorted_unknown"].mean()
        if "whole|top_share" in g:
            r["whole top share"] = g["whole|top_share"].max()
            r["sorted top share (min)"] = g["sorted|top_share"].min()
        out.append(r)
    table = pd.DataFrame(out).set_index("case")
    pd.set_option("display.width", 250)
    print(table.round(3).to_string())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="?")
    ap.add_argument("seeds", nargs="?")
    ap.add_argument("out", nargs="?")
    ap.add_argument("--cases-dir", type=Path, required=True)
    ap.add_argument("--models", type=Path)
    ap.add_argument("--min-cells", type=int, default=20)
    ap.add_argument("--locate", choices=("query", "reference"), default="query")
    ap.add_argument("--summarise")
    a = ap.parse_args()
    summarise(a) if a.summarise else run(a)
    sys.exit(0)
