"""Where a removed type's cells score, model seed by model seed (research probe).

For one removed-type case and saved default models ``<case>_<seed>.pth``: per seed, the median finest
novelty z and neighbourhood novelty of the novel cells, the 95th percentile of both over the known cells,
the share of each group called ``Unknown`` at the defaults, and what the novel cells are called.

    PYTHONPATH=$PWD python benchmark/experiments/novel_seed_probe.py CASE MODELS_DIR 0,1,...,8 [WORK]
"""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import atlasmtl  # noqa: E402
from atlasmtl.model import TrainedModel  # noqa: E402
from common import open_set_truth, read_study_case  # noqa: E402


def main(case: str, models: Path, seeds: list[int], work: Path) -> None:
    torch.set_num_threads(1)
    spec, _, query, truth = read_study_case(work / "cases" / case, reference=False)
    novel, _, _ = open_set_truth(spec, truth)
    lv = spec["levels"][-1]
    print(f"{case}: {novel.sum()} novel cells of {len(novel)}")
    print("| seed | novel: z median / neighbourhood median / Unknown | known: z q95 / neighbourhood q95 / Unknown "
          "| novel cells called |\n|---|---|---|---|")
    for seed in seeds:
        res = atlasmtl.predict(TrainedModel.load(models / f"{case}_{seed}.pth"), query, show_progress=False,
                               show_summary=False)
        c = res.levels[lv]
        z, nz = c.novelty, c.neighbourhood_novelty
        names, counts = np.unique(np.asarray(c.raw)[novel], return_counts=True)
        called = ", ".join(f"{res.classes[lv][i]} {n}" for i, n in zip(names, counts))
        print(f"| {seed} | {np.nanmedian(z[novel]):.2f} / {np.nanmedian(nz[novel]):.2f} / {c.is_unknown[novel].mean():.2f} "
              f"| {np.nanquantile(z[~novel], 0.95):.2f} / {np.nanquantile(nz[~novel], 0.95):.2f} / "
              f"{c.is_unknown[~novel].mean():.3f} | {called} |")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")],
         Path(sys.argv[4]) if len(sys.argv) > 4 else Path("/work/bench_work"))
