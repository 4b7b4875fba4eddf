"""How steady the embedding null's scale is, per case, over seeds (research probe).

Reads models trained with ``patches/null_from_crossfit.diff`` applied and ``novelty.NULL_FROM_CROSSFIT =
True`` (a folder of ``<case>_<seed>.pth``, as ``posthoc_constants_study.py --models`` writes them). Per case,
the finest level's null scale per seed: from the model's held-out cells (as shipped), the same cells under
the model's first members, pooled over the cross-fitting networks, and the ratio estimator; and the
coefficient of variation of each over the seeds.

    PYTHONPATH=$PWD python benchmark/experiments/null_scale_spread.py MODELS_DIR
"""
import re
import statistics as st
import sys
from pathlib import Path

from atlasmtl.model import TrainedModel


def main(folder: Path) -> None:
    per_case: dict[str, list] = {}
    for path in sorted(folder.glob("*.pth")):
        case, seed = re.fullmatch(r"(.+)_(\d+)\.pth", path.name).groups()
        null = TrainedModel.load(path).metadata["novelty"]["null"]
        n = null[list(null)[-1]]
        if "scale_pooled" in n:
            per_case.setdefault(case, []).append(
                (int(seed), n["scale"], n["scale_first_members"], n["scale_pooled"],
                 n["scale"] * n["scale_pooled"] / n["scale_first_members"], n["n"], n["n_pooled"]))
    print("| case | held-out cells / pooled | held out (model) | same cells, first members | pooled | ratio "
          "| CV over seeds: held out / pooled / ratio |\n|---|---|---|---|---|---|---|")
    cvs: dict[str, list] = {"held out": [], "pooled": [], "ratio": []}
    held_to_first = []
    for case, rows in per_case.items():
        rows.sort()
        cols = list(zip(*rows))
        cv = [st.pstdev(c) / st.mean(c) if len(c) > 1 else float("nan") for c in (cols[1], cols[3], cols[4])]
        if len(rows) > 1:
            for key, value in zip(cvs, cv):
                cvs[key].append(value)
        held_to_first += [a / b for a, b in zip(cols[1], cols[2])]
        fmt = lambda values: "/".join(f"{v:.3f}" for v in values)  # noqa: E731
        print(f"| {case} | {rows[0][5]} / {rows[0][6]} | {fmt(cols[1])} | {fmt(cols[2])} | {fmt(cols[3])} "
              f"| {fmt(cols[4])} | {cv[0]:.3f} / {cv[1]:.3f} / {cv[2]:.3f} |")
    print("median CV over the cases with several seeds:", {k: round(st.median(v), 4) for k, v in cvs.items() if v})
    print(f"held out (model) / same cells under its first members: median {st.median(held_to_first):.3f}, "
          f"range {min(held_to_first):.3f}-{max(held_to_first):.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
