"""Issue 10 (coarse levels never below the best peer): the embedding's novelty flag above the finest level
(research script).

Each level whose model has a novelty null flags a cell novel (Unknown, and Unknown below) when its embedding
distance to the training cells of its call there is far (z above ``novelty_threshold``, confidence below the
guard). On known-type cases every such flag at a coarse level is an abstention on a cell of a known
compartment (brain human → mouse, seed 0: 25 of its 80 glia end Unknown at the coarse level, all flagged,
z 3.5–5.1). Variants, post hoc on the default models:

``finest_only``
    No embedding flag above the finest level (a type the reference lacks then keeps a known coarse call).
``coarse_plus<d>``
    Above the finest level the flag needs a z ``d`` higher (the level's null median raised by ``d`` scales).

The finest level and everything else are as shipped.

    PYTHONPATH=$PWD python benchmark/experiments/coarse_novelty_study.py <case,case,...> 0,1,2 out.json [--work DIR] [--models DIR]
    python benchmark/experiments/threshold_table.py out.json
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_scores import posthoc_main, print_progress, score_result  # noqa: E402
import atlasmtl  # noqa: E402
import atlasmtl.prediction as P  # noqa: E402

#: name → how many scales the null median of a level above the finest rises (None: no flag there)
VARIANTS = {"finest_only": None, "coarse_plus1": 1.0, "coarse_plus2": 2.0}
STATE: dict = {"variant": "default"}
_assemble = P._assemble


def assemble(model, buffers, gate, decoder, novelty_threshold, neighbourhood_k=0):
    saved = decoder.null
    name = STATE["variant"]
    if name in VARIANTS and saved:
        finest = model.label_columns[-1]
        delta = VARIANTS[name]
        decoder.null = {lv: v if lv == finest else {**v, "median": float(v["median"]) + delta * float(v["scale"])}
                        for lv, v in saved.items() if lv == finest or delta is not None}
    try:
        return _assemble(model, buffers, gate, decoder, novelty_threshold, neighbourhood_k)
    finally:
        decoder.null = saved


P._assemble = assemble


def study(models):
    for case, seed, spec, ref, query, truth, model in models:
        row = {"case": case, "seed": seed, "K": "auto"}
        for name in ["default", *VARIANTS]:
            STATE["variant"] = name
            row[name] = score_result(atlasmtl.predict(model, query, show_progress=False, show_summary=False), truth, spec)
        STATE["variant"] = "default"
        print_progress(case, seed, row, spec["levels"][-1])
        yield row


if __name__ == "__main__":
    posthoc_main(study, lambda *a: "use threshold_table.py", "/work/bench_models")
