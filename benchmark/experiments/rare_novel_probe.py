"""Issue 9: is a type the reference lacks still called Unknown when the query holds only a few of its cells?

Research probe. Per removed-type case and seed, the default model (``MODELS/<case>_<seed>.pth``) predicts
sub-queries that keep every known cell and a seeded random sample of ``m`` novel cells, ``m`` in
:data:`COUNTS` (a rare type: a neighbourhood of 30 query cells then holds mostly known cells), once per label
of a JSON ``{label: {"module.NAME": value}}`` (as ``posthoc_constants_study.py`` takes; ``{}`` = the
defaults). Per case, seed, label and ``m``: the share of the kept novel cells called Unknown at the finest
level (``nU``) and of the known cells (``kU``). Draws with ``m`` larger than the case's novel cells are skipped.

    PYTHONPATH=$PWD python benchmark/experiments/rare_novel_probe.py <case,case,...> 0,1,2 out.csv MODELS '{"default": {}}' [WORK]

(The support constants it was run with come from ``patches/novelty_neighbourhood_support.diff``.)
"""
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import open_set_truth, probe_arguments  # noqa: E402
from study_scores import constant_patcher, default_models  # noqa: E402
import atlasmtl  # noqa: E402

COUNTS = (3, 10, 30)


def main() -> None:
    warnings.filterwarnings("ignore")
    patches = json.loads(sys.argv.pop(5))
    cases, seeds, out, models, work = probe_arguments(sys.argv)
    apply = constant_patcher(patches)
    rows = []
    for case, seed, spec, _, query, truth, model in default_models(cases, seeds, work=work, models=models,
                                                                   train=False, reference=False):
        novel = open_set_truth(spec, truth)[0]
        fine = spec["levels"][-1]
        rng = np.random.default_rng(seed)
        for m in COUNTS:
            if m > novel.sum():
                continue
            kept_novel = rng.choice(np.flatnonzero(novel), m, replace=False)
            keep = np.sort(np.concatenate([np.flatnonzero(~novel), kept_novel]))
            sub, is_novel = query[keep].copy(), novel[keep]
            for label, patch in patches.items():
                apply(patch)
                unknown = np.asarray(atlasmtl.predict(model, sub, show_progress=False, show_summary=False)
                                     .levels[fine].is_unknown)
                rows.append({"case": case, "seed": seed, "m": m, "label": label,
                             "nU": unknown[is_novel].mean(), "kU": unknown[~is_novel].mean()})
            apply({})
        print(case, seed, flush=True)
        pd.DataFrame(rows).to_csv(out, index=False)
    table = pd.DataFrame(rows).groupby(["label", "m", "case"])["nU"].mean().unstack("case")
    print(table.round(2).to_string())


if __name__ == "__main__":
    main()
