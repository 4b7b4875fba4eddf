"""What the setting studies record per trained model: predictions at the defaults and with KNN off, scored.

Shared by ``build_setting_study.py`` and ``refit_study.py`` (rows in one format, so one ``--summarise``
reads both).
"""
import atlasmtl

NOVELTY_KEYS = ("auroc", "novel_unknown_rate", "known_unknown_rate")


def score_model(model, query, truth, spec) -> dict:
    """``{"default": ..., "off": ...}``: per level the numeric metrics of ``atlasmtl.evaluate``, and the
    novelty metrics where the case has novel labels."""
    levels, novel = spec["levels"], ({"novel_labels": spec["novel"]} if spec.get("novel") else {})
    out = {}
    for name, kw in {"default": {}, "off": {"knn_correction": "off"}}.items():
        res = atlasmtl.predict(model, query, show_progress=False, show_summary=False, **kw)
        met = atlasmtl.evaluate(res, truth, label_columns=levels, **novel)
        out[name] = {
            "levels": {lv: {k: v for k, v in met["levels"][lv].items() if isinstance(v, (int, float, type(None)))} for lv in levels},
            "novel": {lv: {k: v.get(k) for k in NOVELTY_KEYS} for lv, v in met["novel"]["levels"].items()} if met.get("novel") else None}
    return out
