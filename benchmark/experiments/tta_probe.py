"""Issue 10: test-time augmentation of the query (research probe, the network's own calls).

Training shows the network shifted copies of every minibatch (thinned cells, genes read as zero;
``atlasmtl.augment.ShiftAugmentation``). Test-time augmentation asks the same network about shifted copies of
each *query* cell and averages the calibrated probabilities with those of the cell as it is, in the hope that
a call which holds over the copies is more robust to the query's own shift than the single forward pass.

Per case and seed the default model (``MODELS/<case>_<seed>.pth``) gives each level's calibrated
probabilities (the model's temperatures) for the query as it is and for ``K`` shifted copies
(``atlasmtl.augment.simulate_shift`` on the query's counts; generator seeded by the seed). Variants:

- ``train``: the training augmentation (half the cells thinned to 10-100% depth, 0-30% of genes zeroed);
- ``thin``: every cell thinned to a log-uniform 50-100% of its depth, no genes zeroed;
- ``drop``: 10% of the genes zeroed per copy, no thinning.

Scores: each level's argmax, macro-F1 over the cells whose true label the model knows (no gate, no KNN, no
novelty), as it is (``none``) and with each variant's mean over the cell and its ``K`` copies. A probe, not the
benchmark: it says whether the network's calls gain before anything is built into ``predict``.

    PYTHONPATH=$PWD python benchmark/experiments/tta_probe.py <case,...> 0,1 out.csv MODELS [WORK] [--k K]
"""
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import probe_arguments  # noqa: E402
from study_scores import default_models  # noqa: E402
from atlasmtl.augment import ShiftAugmentation, simulate_shift  # noqa: E402
from atlasmtl.calibration import softmax  # noqa: E402
from atlasmtl.inputs import detect_semantics, get_matrix_source  # noqa: E402
from atlasmtl.model import TrainedModel  # noqa: E402
from atlasmtl.prediction import _network_input, prepare_query  # noqa: E402

VARIANTS = {
    "train": ShiftAugmentation(),
    "thin": ShiftAugmentation(thin_fraction=1.0, min_depth=0.5, max_gene_dropout=0.0),
    "drop": ShiftAugmentation(thin_fraction=0.0, max_gene_dropout=0.2),  # uniform 0-20%: 10% on average
}


def level_probabilities(model: TrainedModel, adata: ad.AnnData) -> list[np.ndarray]:
    """Calibrated probabilities per level of every cell of ``adata`` (the network alone)."""
    source = get_matrix_source(adata)
    aligner, _, _ = prepare_query(model, source, None, 0.0)
    temps = (model.metadata.get("calibration") or {}).get("temperatures") or {}
    zero = aligner.zero_input()
    zero_input = None if zero is None else torch.from_numpy(zero)
    net = model.network.eval()
    out = [[] for _ in model.label_columns]
    with torch.no_grad():
        for first in range(0, adata.n_obs, 1024):
            x, _ = _network_input(aligner, source.rows(slice(first, min(first + 1024, adata.n_obs))),
                                  torch.device("cpu"), zero_input)
            for i, (lv, logits) in enumerate(zip(model.label_columns, net(x).logits)):
                out[i].append(softmax(logits.numpy().astype(np.float64), float(temps.get(lv, 1.0))))
    return [np.concatenate(parts) for parts in out]


def main() -> None:
    warnings.filterwarnings("ignore")
    argv = list(sys.argv)
    k = 8
    if "--k" in argv:
        at = argv.index("--k")
        k = int(argv[at + 1])
        del argv[at : at + 2]
    cases, seeds, out, models, work = probe_arguments(argv)
    torch.set_num_threads(1)
    rows = []
    for case, seed, _, _, query, truth, model in default_models(cases, seeds, work=work, models=models,
                                                                train=False, reference=False):
        sem = detect_semantics(get_matrix_source(query))["semantics"]
        base = level_probabilities(model, query)
        probs = {"none": base}
        for name, config in VARIANTS.items():
            rng = np.random.default_rng(seed)
            total = [p.copy() for p in base]
            for _ in range(k):
                copy = ad.AnnData(simulate_shift(query.X, sem, rng, config), var=query.var[[]].copy())
                copy.obs_names = query.obs_names
                for t, p in zip(total, level_probabilities(model, copy)):
                    t += p
            probs[name] = [t / (k + 1) for t in total]
        row = {"case": case, "seed": seed}
        for i, lv in enumerate(model.label_columns):
            classes = np.asarray(model.classes[lv], dtype=str)
            t = truth[lv].astype(str).to_numpy()
            known = np.isin(t, classes)
            for name, p in probs.items():
                pred = classes[p[i].argmax(axis=1)]
                row[f"{lv == model.label_columns[-1] and 'fine' or 'coarse'}_{name}"] = f1_score(
                    t[known], pred[known], labels=sorted(set(t[known])), average="macro")
        rows.append(row)
        print(row, flush=True)
        pd.DataFrame(rows).to_csv(out, index=False)
    df = pd.DataFrame(rows).groupby("case").mean(numeric_only=True).drop(columns="seed")
    for col in df.columns:
        if not col.endswith("_none"):
            ref = df[col.rsplit("_", 1)[0] + "_none"]
            d = df[col] - ref
            print(f"{col}: mean change {d.mean():+.4f} (worst {d.min():+.3f} {d.idxmin()}, best {d.max():+.3f} {d.idxmax()})")
    print(df.round(3).to_string())


if __name__ == "__main__":
    main()
