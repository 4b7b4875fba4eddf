"""Issue 9: ensemble members alternating label smoothing (the default on even members, another value on odd ones).

Research script (tried 2026-12-01, not adopted; API contract, "`label_smoothing` re-validated with ten members").
Without smoothing, the embedding keeps the within-class spread that makes a missing type look far (B cells left
out of the Symphony reference: AUROC 0.81 → 0.92), but the heads lose accuracy; members of both kinds could
keep some of each. Runs ``build_setting_study.py`` with ``atlasmtl.training.fit`` patched so that every odd
member of each model trains with ``label_smoothing=<odd>``:

    PYTHONPATH=$PWD python benchmark/experiments/mixed_smoothing_study.py 0.0 <case,case,...> 0,1,2 '{}' out.json
"""
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import atlasmtl  # noqa: E402
import atlasmtl.training as tr  # noqa: E402

ODD = float(sys.argv.pop(1))
_count = [0]
_fit, _build = tr.fit, atlasmtl.build_model


def fit(net, objective, *args, **kwargs):
    """``training.fit`` with the objective's smoothing set to ``ODD`` for odd members."""
    member = _count[0]
    _count[0] += 1
    saved = objective.label_smoothing
    objective.label_smoothing = saved if member % 2 == 0 else ODD
    try:
        return _fit(net, objective, *args, **kwargs)
    finally:
        objective.label_smoothing = saved


def build_model(*args, **kwargs):
    _count[0] = 0  # member numbering starts again with each model
    return _build(*args, **kwargs)


tr.fit, atlasmtl.build_model = fit, build_model
sys.argv = [str(HERE / "build_setting_study.py")] + sys.argv[1:]
runpy.run_path(str(HERE / "build_setting_study.py"), run_name="__main__")
