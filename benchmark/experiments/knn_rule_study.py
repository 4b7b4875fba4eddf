"""Issue 9, item 5: should an accepted KNN vote replace a low-confidence call instead of only confirming it?

Research script. The shipped rule (``atlasmtl.gating``) accepts a vote only when it names the network's
call (it then keeps the call labelled below ``confidence_low``); a vote for another class changes nothing.
Per case and seed, the default model (trained, or loaded from ``--models``) predicts the query at the
defaults and with ``knn_correction="off"``; post hoc, ``replace<f>`` lets a vote for another class with a
weighted fraction ≥ ``f`` (0.6 = ``knn_conf_low``) replace the call of a low-confidence cell that is not
novel (short votes change nothing, as now). Finest-level macro-F1 over the true labels (Unknown and novel
cells count as wrong), and the number of calls replaced.

    PYTHONPATH=$PWD python benchmark/experiments/knn_rule_study.py <case,case,...> 0,1,2 out.json [--work DIR] [--models DIR]
    python benchmark/experiments/knn_rule_study.py --summarise out.json[.gz] [results.json]
"""
import json, statistics as st, sys
from pathlib import Path
import numpy as np
from sklearn.metrics import f1_score
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import PEERS, peer_levels, posthoc_main, read_rows
import atlasmtl

FRACTIONS = (0.6, 0.8)


def study(models):
    for case, seed, spec, ref, query, truth, model in models:
        fine = spec["levels"][-1]
        t = truth[fine].astype(str).to_numpy()
        f1 = lambda pred: float(f1_score(t, pred, labels=sorted(set(t)), average="macro", zero_division=0))
        row = {"case": case, "seed": seed}
        off = atlasmtl.predict(model, query, show_progress=False, show_summary=False, knn_correction="off")
        row["off"] = f1(off.to_dataframe()[f"pred_{fine}"].astype(str).to_numpy())
        df = atlasmtl.predict(model, query, show_progress=False, show_summary=False).to_dataframe(mode="full")
        pred = df[f"pred_{fine}"].astype(str).to_numpy()
        row["confirm (default)"] = f1(pred)
        knn, frac = df[f"pred_{fine}_knn"].astype(str).to_numpy(), np.nan_to_num(df[f"knn_vote_frac_{fine}"].to_numpy())
        novel = np.logical_or.reduce([df[f"is_novel_{lv}"].to_numpy(dtype=bool) for lv in spec["levels"]])
        low = df[f"is_low_conf_{fine}"].to_numpy(dtype=bool) & ~novel & (knn != "Unknown")
        for f in FRACTIONS:
            swap = low & (frac >= f) & (knn != pred)
            replaced = pred.copy()
            replaced[swap] = knn[swap]
            row[f"replace{f}"], row[f"n_replaced{f}"] = f1(replaced), int(swap.sum())
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        yield row


def summarise(path, results="benchmark/results/results.json"):
    rows, peers = read_rows(path), peer_levels(results)
    rules = ["off", "confirm (default)"] + [f"replace{f}" for f in FRACTIONS]
    lines = ["| case | best peer | " + " | ".join(rules) + " | calls replaced at 0.6 (per seed) |", "|" + "---|" * (3 + len(rules))]
    delta = {r: [] for r in rules}
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = [r for r in rows if r["case"] == case]
        fine = list(peers[case]["logreg"])[-1]
        best = max(peers[case][m][fine]["macro_f1"] for m in PEERS if m in peers[case])
        cells = []
        for r in rules:
            v = st.mean(x[r] for x in rs)
            delta[r].append(v - best)
            cells.append(f"{v:.3f}")
        lines.append(f"| {case} | {best:.3f} | " + " | ".join(cells) + f" | {[x['n_replaced0.6'] for x in rs]} |")
    lines.append("| finest mean Δ to best peer (worst) | | " + " | ".join(f"{st.mean(d):+.4f} ({min(d):+.3f})" for d in delta.values()) + " | |")
    return "\n".join(lines)


if __name__ == "__main__":
    posthoc_main(study, summarise, "/tmp/atlasmtl_knn_rule_models")
