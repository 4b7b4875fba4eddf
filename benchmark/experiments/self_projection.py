"""Map each case's reference back onto its own default model: how many of its cells end ``Unknown``?

A user's first check of a model is often the reference itself. Its training cells should come back labelled
as trained; its held-out calibration cells are out-of-sample, like any query. For every case and seed this
prints, at the finest level, the share of training and of held-out cells that end ``Unknown`` and that the
novelty score flags, and the training cells' accuracy. Models are ``MODELS/<case>_<seed>.pth`` (trained at the
defaults and saved there when missing, as the post-hoc studies do: ``study_scores.default_models``).

    PYTHONPATH=$PWD python benchmark/experiments/self_projection.py --work /work/bench_work --models MODELS \\
        --cases brain_human_mouse,symphony_5p,... --seeds 0
"""
import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import atlasmtl  # noqa: E402
from study_scores import default_models  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--work", type=Path, required=True)
ap.add_argument("--models", type=Path, required=True)
ap.add_argument("--cases", required=True, help="comma-separated case names under WORK/cases")
ap.add_argument("--seeds", default="0")
ap.add_argument("--max-cells", type=int, default=4000, help="labelled reference cells mapped (a random sample)")
args = ap.parse_args()
warnings.filterwarnings("ignore")

rows = []
for case, seed, spec, ref, _, _, model in default_models(args.cases.split(","), [int(s) for s in args.seeds.split(",")],
                                                          work=args.work, models=args.models):
    finest = model.label_columns[-1]
    training = np.asarray(model.reference["training_cell"], dtype=bool)
    labelled = np.flatnonzero(ref.obs[list(model.label_columns)].notna().any(axis=1).to_numpy())
    if len(labelled) != len(training):
        print(f"{case} seed {seed}: {len(labelled)} labelled cells, the model's reference holds {len(training)}; skipped")
        continue
    pick = np.sort(np.random.default_rng(0).choice(len(labelled), min(len(labelled), args.max_cells), replace=False))
    result = atlasmtl.predict(model, ref[labelled[pick]].copy(), show_progress=False, show_summary=False)
    calls = result.levels[finest]
    truth = ref.obs[finest].astype(str).to_numpy()[labelled[pick]]
    right = np.asarray(result.labels(finest)).astype(str) == truth
    train = training[pick]
    row = {"case": case, "seed": seed, "train_unknown": calls.is_unknown[train].mean(),
           "held_unknown": calls.is_unknown[~train].mean() if (~train).any() else np.nan,
           "train_novel": calls.is_novel[train].mean(), "held_novel": calls.is_novel[~train].mean() if (~train).any() else np.nan,
           "train_accuracy": right[train].mean()}
    rows.append(row)
    print(f"{case} seed {seed}: {train.sum()} training / {(~train).sum()} held-out cells | Unknown {row['train_unknown']:.3f} / "
          f"{row['held_unknown']:.3f} | novel {row['train_novel']:.3f} / {row['held_novel']:.3f} | training cells' accuracy "
          f"{row['train_accuracy']:.3f}", flush=True)
if rows:
    print(f"mean over {len(rows)}: Unknown training {np.mean([r['train_unknown'] for r in rows]):.3f} (max "
          f"{max(r['train_unknown'] for r in rows):.3f}), held-out {np.nanmean([r['held_unknown'] for r in rows]):.3f}; "
          f"training cells' accuracy {np.mean([r['train_accuracy'] for r in rows]):.3f}")
