"""Tables (Markdown) and the figure (PNG) from the benchmark's ``results.json``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

METHOD_ORDER = ["atlasmtl", "atlasmtl_knn_off", "atlasmtl_knn_all", "celltypist", "scanvi", "logreg", "knn", "symphonypy"]
LABEL = {
    "atlasmtl": "atlasmtl (default: KNN low-conf)",
    "atlasmtl_knn_off": "atlasmtl, KNN off",
    "atlasmtl_knn_all": "atlasmtl, KNN all",
    "celltypist": "CellTypist 1.7.1",
    "scanvi": "scANVI + scArches",
    "logreg": "logreg (100 PCs)",
    "knn": "kNN (15, 50 PCs)",
    "symphonypy": "symphonypy 0.2.4",
}
SHORT = {"atlasmtl": "atlasmtl", "atlasmtl_knn_off": "atl. knn-off", "atlasmtl_knn_all": "atl. knn-all",
         "celltypist": "CellTypist", "scanvi": "scANVI", "logreg": "logreg", "knn": "kNN", "symphonypy": "symphonypy"}


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, (int, float)):
        return f"{x:.{digits}f}"
    return str(x)


def _secs(x: Any) -> str:
    if x is None:
        return "–"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def _ratio(r: dict, key: str) -> str:
    v = (r.get("ratio_to_celltypist") or {}).get(key)
    return "–" if v is None else (f"{v:.2f}×" if v < 10 else f"{v:.0f}×")


def _sorted(runs: list[dict]) -> list[dict]:
    return sorted(runs, key=lambda r: METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER else 99)


def _level(r: dict, lv: str, key: str, section: str = "levels") -> Any:
    m = r.get("metrics") or {}
    if section == "known_only":
        m = m.get("known_only") or {}
        section = "levels"
    return ((m.get(section) or {}).get(lv) or {}).get(key)


def _novel(r: dict, lv: str, key: str) -> Any:
    n = (r.get("metrics") or {}).get("novel") or {}
    return ((n.get("levels") or {}).get(lv) or {}).get(key)


def _extra(r: dict, key: str, lv: str) -> Any:
    """A per-level figure the method reported itself (atlasmtl: share routed to KNN, share Unknown)."""
    return ((r.get("extra") or {}).get(key) or {}).get(lv)


def _unknown_share(r: dict, lv: str) -> Any:
    cov = _level(r, lv, "coverage")
    return None if cov is None else 1.0 - cov


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def case_table(case: str, info: dict, runs: list[dict]) -> str:
    levels = info["levels"]
    fine, coarse = levels[-1], (levels[0] if len(levels) > 1 else None)
    header = ["method", f"{fine} macro-F1", "accuracy", "balanced acc.", "coverage", "acc. on covered", "ECE", "Brier", "AURC",
              "routed to KNN", "Unknown", "network error", "Unknown: withheld wrong"]
    if coarse:
        header += [f"{coarse} macro-F1", f"{coarse} accuracy", "path consistency", "full-path acc."]
    if info.get("novel"):
        header += ["novel AUROC", "neighbourhood AUROC", "novel → Unknown", "known → Unknown", "known-only macro-F1"]
    if info.get("coords"):
        header += ["UMAP RMSE", "trustworthiness", "15-NN overlap"]
    header += ["train s", "predict s", "peak RSS MB", "train ÷ CT", "predict ÷ CT", "RSS ÷ CT"]
    rows = []
    for r in _sorted(runs):
        if r["status"] != "ok":
            rows.append([LABEL.get(r["method"], r["method"]), f"**{r['status']}**: {r.get('reason', '')}"]
                        + [""] * (len(header) - 2))
            continue
        h = (r["metrics"] or {}).get("hierarchy") or {}
        row = [LABEL.get(r["method"], r["method"])] + [_f(_level(r, fine, k)) for k in
                                                        ("macro_f1", "accuracy", "balanced_accuracy", "coverage",
                                                         "accuracy_covered", "ece", "brier", "aurc")]
        row += [_f(_extra(r, "knn_routed_rate", fine)), _f(_unknown_share(r, fine)),
                _f(_level(r, fine, "network_error")), _f(_level(r, fine, "unknown_withheld_error"))]
        if coarse:
            row += [_f(_level(r, coarse, "macro_f1")), _f(_level(r, coarse, "accuracy")),
                    _f(h.get("path_consistency")), _f(h.get("full_path_accuracy"))]
        if info.get("novel"):
            row += [_f(_novel(r, fine, "auroc")), _f(_novel(r, fine, "auroc_neighbourhood")), _f(_novel(r, fine, "novel_unknown_rate")),
                    _f(_novel(r, fine, "known_unknown_rate")), _f(_level(r, fine, "macro_f1", "known_only"))]
        if info.get("coords"):
            c = next(iter(((r["metrics"] or {}).get("coords") or {}).values()), {}) or {}
            row += [_f(c.get("rmse")), _f(c.get("trustworthiness")), _f(c.get("neighbour_overlap"))]
        row += [_secs(r.get("train_seconds")), _secs(r.get("predict_seconds")), _f(r.get("peak_rss_mb"), 0),
                _ratio(r, "train_seconds"), _ratio(r, "predict_seconds"), _ratio(r, "peak_rss_mb")]
        rows.append(row)
    notes = [
        f"# {case}",
        "",
        f"**{info['title']}**. {info.get('n_ref')} reference / {info.get('n_query')} query cells, {info.get('n_genes')} genes; "
        f"levels {' → '.join(levels)}. Source: {info.get('source')}.",
        "",
        _table(header, rows),
        "",
        "Times are seconds on this machine in this run (compare within the run only; ratios ÷ CT are to CellTypist "
        "on the same case). Peak RSS is the whole subprocess (data loading included). atlasmtl's three rows share one "
        "training (its time and memory are that one process's); Unknown counts as wrong; peers never abstain. "
        "ECE/Brier/AURC judge each method's confidence (peers: top probability; atlasmtl: the network's calibrated "
        "probability of its own call). \"routed to KNN\": share of cells whose call went to atlasmtl's KNN vote "
        "(– for methods without one); \"Unknown\": share of cells the method abstained on. \"network error\": "
        "share of wrong calls among the network's own calls before any abstention; \"Unknown: withheld wrong\": "
        "share of the Unknown cells whose withheld network call was wrong (atlasmtl only: both need its "
        "pred_<level>_raw column; – where nothing was withheld).",
    ]
    settings = {}
    for r in _sorted(runs):
        if r["status"] == "ok" and r["method"] not in settings:
            settings[r["method"]] = r.get("settings")
    notes += ["", "<details><summary>settings</summary>", "", "```"]
    for m, s in settings.items():
        notes.append(f"{m}: {s}")
    notes += ["```", "</details>", ""]
    return "\n".join(notes)


def _by_case(runs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in runs:
        out.setdefault(r["case"], []).append(r)
    return out


def _finest_table(by_case: dict, cases: dict, methods: list[str], cell: Callable[[dict, str], str]) -> str:
    """One row per case, one column per method; ``cell(run, finest_level)`` fills a successful run's cell."""
    rows = []
    for case, rs in by_case.items():
        fine = cases[case]["levels"][-1]
        cells = {r["method"]: cell(r, fine) if r["status"] == "ok" else r["status"].replace("_", " ") for r in rs}
        rows.append([f"{case} ({fine})"] + [cells.get(mm, "") for mm in methods])
    return _table(["case (finest level)"] + [SHORT[mm] for mm in methods], rows)


def summary(results: dict) -> str:
    runs, cases = results["runs"], results["cases"]
    by_case = _by_case(runs)
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in runs)]
    m = results["machine"]
    out = [
        "# atlasmtl benchmark: summary",
        "",
        f"Generated {results['generated']} by `{results['command']}` in {results['total_seconds']:.0f} s on "
        f"{m['cpu_count']} CPUs ({m['memory_gb']} GB, {m['platform']}; load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}). Every (case, method) ran in its own process "
        f"with {m['threads_per_run']} threads, seed 0. SEMI-SYNTHETIC cases are resampled real counts (see their titles). "
        f"Code: commit {(results.get('code') or {}).get('commit', '?')}"
        + (f" with uncommitted changes in {', '.join((results.get('code') or {}).get('uncommitted_changes'))}"
           if (results.get('code') or {}).get('uncommitted_changes') else "") + ".",
        "",
        "## Finest-level macro-F1 / accuracy",
        "",
    ]
    out += [_finest_table(by_case, cases, methods,
                          lambda r, fine: f"{_f(_level(r, fine, 'macro_f1'))} / {_f(_level(r, fine, 'accuracy'))}"), ""]

    out += ["## Trust: finest-level ECE (if calibrated) / path consistency / share routed to KNN / share Unknown", "",
            "ECE: top-label expected calibration error (15 bins) of each method's confidence; in brackets the ECE a "
            "perfectly calibrated confidence would show on the same cells on average (`ece_if_calibrated`: a finite "
            "query's ECE is biased upward; what lies above it is miscalibration); path consistency: "
            "predicted coarse/fine pairs that exist in the reference (– with one level); routed to KNN: atlasmtl only; "
            "Unknown: share of query cells the method abstained on (peers never abstain).", ""]
    def trust_cell(r: dict, fine: str) -> str:
        h = (r["metrics"] or {}).get("hierarchy") or {}
        ece = _f(_level(r, fine, "ece")) + (f" ({_f(_level(r, fine, 'ece_if_calibrated'))})"
                                             if _level(r, fine, "ece_if_calibrated") is not None else "")
        return " / ".join([ece, _f(h.get("path_consistency")),
                           _f(_extra(r, "knn_routed_rate", fine)), _f(_unknown_share(r, fine))])

    out += [_finest_table(by_case, cases, methods, trust_cell), ""]

    novel_cases = [c for c in by_case if cases[c].get("novel")]
    if novel_cases:
        out += ["## Novel types: AUROC of the novelty score (atlasmtl) or of 1 − confidence (peers), novel vs known / "
                "novel → Unknown / known → Unknown", ""]
        rows = []
        for case in novel_cases:
            fine = cases[case]["levels"][-1]
            cells = {}
            for r in by_case[case]:
                if r["status"] == "ok":
                    cells[r["method"]] = (f"{_f(_novel(r, fine, 'auroc'))} / {_f(_novel(r, fine, 'novel_unknown_rate'))}"
                                          f" / {_f(_novel(r, fine, 'known_unknown_rate'))}")
                else:
                    cells[r["method"]] = r["status"].replace("_", " ")
            label = ", ".join(f"{v}" for v in cases[case]["novel"].get(fine, []))
            rows.append([f"{case} ({label} novel)"] + [cells.get(mm, "") for mm in methods])
        out += [_table(["case"] + [SHORT[mm] for mm in methods], rows), ""]

    scale = [c for c in by_case if cases[c].get("semi_synthetic")]
    if scale:
        out += ["## Scale (SEMI-SYNTHETIC): train s / predict s / peak RSS MB, and ratios to CellTypist", ""]
        rows = []
        for case in scale:
            for r in _sorted(by_case[case]):
                if r["status"] != "ok":
                    rows.append([case, LABEL.get(r["method"], r["method"]), r["status"].replace("_", " ") + ": " +
                                 str(r.get("reason", ""))[:120], "", "", "", "", "", "", ""])
                    continue
                fine = cases[case]["levels"][-1]
                rows.append([case, LABEL.get(r["method"], r["method"]), _f(_level(r, fine, "macro_f1")),
                             _secs(r.get("train_seconds")), _secs(r.get("predict_seconds")), _f(r.get("peak_rss_mb"), 0),
                             _ratio(r, "train_seconds"), _ratio(r, "predict_seconds"), _ratio(r, "peak_rss_mb"),
                             f"{cases[case]['n_ref']:,} / {cases[case]['n_query']:,}"])
        out += [_table(["case", "method", "macro-F1", "train s", "predict s", "peak RSS MB", "train ÷ CT",
                        "predict ÷ CT", "RSS ÷ CT", "ref / query cells"], rows), ""]

    out += ["## Where atlasmtl (default) is not best at the finest level", ""]
    losses = []
    for case, rs in by_case.items():
        fine = cases[case]["levels"][-1]
        ok = {r["method"]: _level(r, fine, "macro_f1") for r in rs if r["status"] == "ok"}
        a = ok.get("atlasmtl")
        if a is None:
            continue
        better = [(mm, v) for mm, v in ok.items() if not mm.startswith("atlasmtl") and v is not None and v > a + 1e-12]
        if better:
            better.sort(key=lambda t: -t[1])
            losses.append(f"- {case}: atlasmtl {a:.3f} < " + ", ".join(f"{SHORT[mm]} {v:.3f}" for mm, v in better))
    out += losses or ["- none"]
    out += ["", "Per-case tables with every metric: `<case>.md`; raw numbers: `results.json`; figure: "
            "`f1_vs_train_time.png`.", ""]
    return "\n".join(out)


def figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_case = _by_case(results["runs"])
    cases = results["cases"]
    names = list(by_case)
    ncol = min(4, len(names))
    nrow = math.ceil(len(names) / ncol)
    height = 3.0 * nrow + 0.9
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, height), squeeze=False)
    colours = dict(zip(METHOD_ORDER, plt.get_cmap("tab10").colors))
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    markers = {"atlasmtl": ("*", 190), "atlasmtl_knn_off": ("v", 70), "atlasmtl_knn_all": ("^", 45)}
    for ax, case in zip(axes.ravel(), names):
        fine = cases[case]["levels"][-1]
        for r in _sorted(by_case[case]):
            if r["status"] != "ok" or not r.get("train_seconds"):
                continue
            f1 = _level(r, fine, "macro_f1")
            marker, size = markers.get(r["method"], ("o", 45))
            ax.scatter(r["train_seconds"], f1, color=colours.get(r["method"]), marker=marker, s=size,
                       label=LABEL.get(r["method"], r["method"]), edgecolor="black", linewidth=0.4, alpha=0.9,
                       zorder=3 if r["method"] in markers else 2)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        title = case + (" (semi-synthetic)" if cases[case].get("semi_synthetic") else "")
        ax.set_title(title, fontsize=8.5)
        ax.set_xlabel("training seconds (log)", fontsize=8)
        ax.set_ylabel(f"macro-F1 ({fine})", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    handles, labels = {}, {}
    for ax in axes.ravel():
        for h, lab in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(lab, h)
    fig.legend(list(labels.values()), list(labels.keys()), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Finest-level macro-F1 against training time (one process per method; same machine, same run)", fontsize=10)
    fig.tight_layout(rect=(0, 0.85 / height, 1, 1 - 0.35 / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, out: Path) -> str:
    """Write ``summary.md``, one ``<case>.md`` per case and ``f1_vs_train_time.png``; return the summary text."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for case, rs in _by_case(results["runs"]).items():
        (out / f"{case}.md").write_text(case_table(case, results["cases"][case], rs))
    text = summary(results)
    (out / "summary.md").write_text(text)
    figure(results, out / "f1_vs_train_time.png")
    return text
