"""Issues 9/10: one ``build_model`` setting against the defaults, on the benchmark's real cases.

Research script. Per case, seed and setting (a JSON dict of ``build_model`` keyword arguments; keys
``augment.<field>`` set a field of the training augmentation, ``atlasmtl.augment.ShiftAugmentation``,
e.g. ``{"augment.gene_scale_sd": 0.5}``: per-gene scale noise; keys ``<module>.<NAME>`` set a
constant of ``atlasmtl.<module>``, e.g. ``calibration.ACCURACY_PRIOR_COUNT`` (and in the other modules that
imported the name: ``novelty.NOVELTY_K`` also sets ``training.NOVELTY_K``); key ``variant``: a training
variant of ``variants.py`` (ensemble members on other inputs or without augmentation, LayerNorm, a wide
path); key ``reference.hvg``: train on the
reference's ``N`` most variable genes only, ``scanpy.pp.highly_variable_genes(flavor="seurat")`` on its log
values, when it has more) one
model, predicted at the defaults and with ``knn_correction="off"``, scored with ``atlasmtl.evaluate``
(finest and coarse macro-F1, ECE, novelty metrics). Compare with the defaults' rows of
``results/novelty_threshold_ensemble_seeds012.json.gz`` (threshold 4.5 = the default; same models).

    PYTHONPATH=$PWD python benchmark/experiments/build_setting_study.py <case,case,...> 0,1,2 '{"calibration_fraction": 0.1}' out.json
    (cases are read from $ATLASMTL_STUDY_WORK/cases, default /work/bench_work/cases)
    python benchmark/experiments/build_setting_study.py --summarise out.json[.gz] [results.json]
"""
import functools, importlib, json, os, statistics as st, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import read_study_case
from study_scores import best_peer, peer_levels, read_rows as _read, score_model
import atlasmtl
import atlasmtl.calibration
import atlasmtl.training as tr
from atlasmtl.augment import ShiftAugmentation

DEFAULTS = Path(__file__).resolve().parent / "results" / "novelty_threshold_ensemble_seeds012.json.gz"


def summarise(path, results="benchmark/results/results.json"):
    """Per case and setting: mean over seeds of finest / coarse macro-F1 at the default KNN, with the
    defaults (threshold-study rows at 4.5) and the mean / worst delta to the best peer of ``results``."""
    peers = peer_levels(results)
    rows = [dict(r, results={"default": r["4.5"]}, setting="defaults") for r in _read(DEFAULTS)] + _read(path)
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    cases = list(dict.fromkeys(r["case"] for r in _read(path)))
    lines = ["| case | best peer fine / coarse | " + " | ".join(settings) + " |", "|" + "---|" * (2 + len(settings))]
    delta = {s: {"fine": [], "coarse": []} for s in settings}
    for case in cases:
        levels = list(rows[[r["case"] for r in rows].index(case)]["results"]["default"]["levels"])
        fine, coarse = levels[-1], (levels[0] if len(levels) > 1 else None)
        best = best_peer(peers, case, levels)
        line = f"| {case} | {best[fine]:.3f} / " + (f"{best[coarse]:.3f}" if coarse else "–") + " |"
        for s in settings:
            rs = [r["results"]["default"]["levels"] for r in rows if r["case"] == case and r["setting"] == s]
            f1 = st.mean(r[fine]["macro_f1"] for r in rs)
            delta[s]["fine"].append(f1 - best[fine])
            cell = f" {f1:.3f} ({f1 - best[fine]:+.3f})"
            if coarse:
                c1 = st.mean(r[coarse]["macro_f1"] for r in rs)
                delta[s]["coarse"].append(c1 - best[coarse])
                cell += f" / {c1:.3f} ({c1 - best[coarse]:+.3f})"
            line += cell + f" [{len(rs)}] |"
        lines.append(line)
    lines.append("")
    for s in settings:
        d = delta[s]
        lines.append(f"- {s}: finest mean Δ {st.mean(d['fine']):+.4f} (worst {min(d['fine']):+.3f}); coarse mean Δ "
                     f"{st.mean(d['coarse']):+.4f} (worst {min(d['coarse']):+.3f})")
    return "\n".join(lines)


if len(sys.argv) > 1 and sys.argv[1] == "--summarise":
    print(summarise(*sys.argv[2:]))
    sys.exit(0)

torch.set_num_threads(1)
CASES, SEEDS = sys.argv[1].split(","), [int(s) for s in sys.argv[2].split(",")]
SETTING, OUT = json.loads(sys.argv[3]), Path(sys.argv[4])
WORK = Path(os.environ.get("ATLASMTL_STUDY_WORK", "/work/bench_work"))
key = json.dumps(SETTING, sort_keys=True)
AUGMENT = {k.split(".", 1)[1]: v for k, v in SETTING.items() if k.startswith("augment.")}
CONSTANTS = {k: v for k, v in SETTING.items()  # "<module>.<CONSTANT>": a module constant of atlasmtl.<module>
             if "." in k and k.split(".", 1)[1].isupper() and not k.startswith(("augment.", "reference."))}
for k, v in CONSTANTS.items():  # a name another module imported is set there too (training's NOVELTY_K)
    module, name = k.split(".", 1)
    for where in dict.fromkeys((module, "training", "prediction", "calibration", "novelty")):
        target = importlib.import_module("atlasmtl." + where)
        if where == module or hasattr(target, name):
            setattr(target, name, v)
HVG = SETTING.get("reference.hvg")
VARIANT = SETTING.pop("variant", None)
if VARIANT:
    import variants
    variants.apply(VARIANT)
SETTING = {k: v for k, v in SETTING.items() if k not in CONSTANTS and not k.startswith(("augment.", "reference."))}
if AUGMENT:  # build_model builds ShiftAugmentation() when augment=True
    tr.ShiftAugmentation = functools.partial(ShiftAugmentation, **AUGMENT)
rows = json.loads(OUT.read_text()) if OUT.exists() else []
done = {(r["case"], r["seed"], r["setting"]) for r in rows}
for case in CASES:
    spec, ref, query, truth = read_study_case(WORK / "cases" / case)
    levels = spec["levels"]
    if HVG and ref.n_vars > HVG:
        import scanpy as sc
        genes = sc.pp.highly_variable_genes(ref, n_top_genes=int(HVG), flavor="seurat", inplace=False)["highly_variable"].to_numpy()
        ref = ref[:, genes].copy()
    for seed in SEEDS:
        if (case, seed, key) in done: continue
        if VARIANT: variants.new_model()
        model = atlasmtl.build_model(ref, levels, random_state=seed, num_threads=1, show_progress=False, show_summary=False, **SETTING)
        row = {"case": case, "seed": seed, "setting": key, "train_seconds": model.train_config["train_seconds"], "results": score_model(model, query, truth, spec)}
        rows.append(row); OUT.write_text(json.dumps(rows))
        print(case, seed, key, {n: round(v["levels"][levels[-1]]["macro_f1"], 3) for n, v in row["results"].items()}, flush=True)
