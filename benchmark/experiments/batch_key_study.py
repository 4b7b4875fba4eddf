"""Issues 9 and 10: ``predict(..., batch_key=...)`` on the benchmark queries that hold real batches.

Research script (the fifty-third session). Three benchmark queries hold more than one batch of their own: the
CellBench H1975-removed query (the CEL-seq2 and Drop-seq three-line sets, ``protocol``) and the Zilionis queries
(two animals, ``animal``). Per case and seed the default model (``--models``) predicts the query without and with
``batch_key``; ``atlasmtl.evaluate`` scores both against the truth (the case's ``novel`` labels as novel).
A row per case, seed and setting: per level macro-F1, accuracy and coverage, and the novelty figures.

    PYTHONPATH=$PWD python benchmark/experiments/batch_key_study.py <cases> 0,1,2 out.json --cases-dir W/cases --models DIR
"""
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: The query's own batch column, per case family.
BATCH_COLUMNS = ("protocol", "animal", "dataset", "platform", "species")


def main() -> None:
    import torch
    import atlasmtl
    from common import probe_parser
    from study_scores import default_models

    args = probe_parser(__doc__).parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = []
    for case, seed, spec, _, query, truth, model in default_models(
            args.cases.split(","), [int(s) for s in args.seeds.split(",")], work=args.cases_dir.parent,
            models=args.models, train=False, reference=False):
        levels, novel = spec["levels"], spec.get("novel") or {}
        truth = truth.reindex(query.obs_names)
        key = next(c for c in BATCH_COLUMNS if c in query.obs and query.obs[c].nunique() > 1)
        for setting, batch_key in (("default", None), ("batch_key", key)):
            result = atlasmtl.predict(model, query, batch_key=batch_key, show_progress=False, show_summary=False)
            ev = atlasmtl.evaluate(result, truth, label_columns=levels, novel_labels=novel or None)
            row = {"case": case, "seed": seed, "setting": setting, "batch_column": key,
                   "batches": query.obs[key].value_counts().to_dict()}
            for lv in levels:
                m = ev["levels"][lv]
                row.update({f"{lv}|macro_f1": m["macro_f1"], f"{lv}|accuracy": m["accuracy"],
                            f"{lv}|coverage": m["coverage"]})
                nv = ((ev.get("novel") or {}).get("levels") or {}).get(lv)
                if nv:
                    row.update({f"{lv}|novel_{k}": nv.get(k) for k in ("auroc", "novel_unknown_rate",
                                                                        "known_unknown_rate")})
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
