"""A label-free check of an interferon-β stimulation shift (research script).

The shared Kang 2018 counts (`kang_ctrl_stim_counts.h5ad`: 1,000 control and 1,000 interferon-β stimulated PBMC,
no cell-type labels) are mapped onto the labelled pbmc68k_reduced reference (the benchmark's 70% split, levels
``lineage`` → ``bulk_labels``). Both halves come from the same donors, so their cell-type make-up is close: a
mapping that is robust to stimulation calls both alike, with a like share of ``Unknown``. Printed per seed and
condition: the shares of ``Unknown``, novelty flags and low-confidence calls, the median confidence, and the
predicted composition at each level.

    PYTHONPATH=$PWD python benchmark/experiments/stimulation_probe.py [--seeds 0,1,2] [--data DIR]
"""
import argparse
import sys
from pathlib import Path

import anndata as ad
import pandas as pd
import torch

import atlasmtl
from atlasmtl.datasets import pbmc68k_reference_query

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import shared_data_dir  # noqa: E402

LEVELS = ["lineage", "bulk_labels"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data", type=Path, default=None, help="the shared data folder (default: the benchmark's)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    ref, _ = pbmc68k_reference_query(test_size=0.3, random_state=0)
    kang = ad.read_h5ad((a.data or shared_data_dir()) / "kang_ctrl_stim_counts.h5ad")
    print(f"reference {ref.n_obs} cells x {ref.n_vars} genes; {len(set(ref.var_names) & set(kang.var_names))} shared with Kang")
    fine, coarse = LEVELS[-1], LEVELS[0]
    for seed in (int(s) for s in a.seeds.split(",")):
        model = atlasmtl.build_model(ref, LEVELS, random_state=seed, num_threads=2, show_progress=False, show_summary=False)
        calls = {}
        for condition in ("ctrl", "stim"):
            query = kang[kang.obs["condition"] == condition].copy()
            df = atlasmtl.predict(model, query, show_progress=False, show_summary=False).to_dataframe(mode="full")
            calls[condition] = df
            print(f"seed {seed} {condition}: Unknown {(df[f'pred_{fine}'].astype(str) == 'Unknown').mean():.3f} fine / "
                  f"{(df[f'pred_{coarse}'].astype(str) == 'Unknown').mean():.3f} coarse; novel {df[f'is_novel_{fine}'].mean():.3f} "
                  f"fine / {df[f'is_novel_{coarse}'].mean():.3f} coarse; low-confidence {df[f'is_low_conf_{fine}'].mean():.3f} "
                  f"fine; median confidence {df[f'conf_{fine}'].median():.2f}")
        for level in LEVELS:
            print(pd.DataFrame({c: d[f"pred_{level}"].astype(str).value_counts(normalize=True) for c, d in calls.items()})
                  .fillna(0).round(3).to_string())


if __name__ == "__main__":
    main()
