"""Which of the novelty input view's two spaces flags a case's cells (research script; patches atlasmtl in this
process only).

The input view scores each cell in a PCA of the network input and again with its residual coordinate (the
distance from the PCA's subspace), and keeps the larger z (``atlasmtl.novelty.InputView.score``). Per case and
seed, with the saved default models: the known cells that end Unknown at the finest level, how many of them each
space's z (the larger over the levels) puts above ``novelty_threshold``, and the same for the novel cells:

    PYTHONPATH=$PWD python benchmark/experiments/input_view_sources_probe.py <case,case,...> 0,1,2 MODELS [WORK]
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import atlasmtl  # noqa: E402
import atlasmtl.novelty as nv  # noqa: E402
from common import open_set_truth  # noqa: E402
from study_scores import default_models  # noqa: E402

THRESHOLD = 3.5  # atlasmtl.predict's novelty_threshold default


def main() -> None:
    cases, seeds, models = sys.argv[1].split(","), [int(s) for s in sys.argv[2].split(",")], Path(sys.argv[3])
    work = Path(sys.argv[4]) if len(sys.argv) > 4 else Path("/work/bench_work")
    spaces: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    score = nv.InputView.score

    def recording_score(self, log_d, log_d_residual, calls, level):
        spaces[level] = (self.z(log_d, calls, level), self.z(log_d_residual, calls, level, space="residual"))
        return score(self, log_d, log_d_residual, calls, level)

    nv.InputView.score = recording_score
    print("| case | seed | known → Unknown | of them: PCA z / residual z / both above 3.5 | novel cells: PCA / residual above 3.5 |")
    print("|---|---|---|---|---|")
    for case, seed, spec, _, query, truth, model in default_models(cases, seeds, work=work, models=models,
                                                                   train=False, reference=False):
        novel, _, _ = open_set_truth(spec, truth)
        finest = spec["levels"][-1]
        spaces.clear()
        calls = atlasmtl.predict(model, query, show_progress=False, show_summary=False).to_dataframe()
        unknown = (calls[f"pred_{finest}"].to_numpy() == "Unknown") & ~novel
        if spaces:
            pca = np.fmax.reduce([z for z, _ in spaces.values()]) > THRESHOLD
            res = np.fmax.reduce([z for _, z in spaces.values()]) > THRESHOLD
        else:  # a model without an input view
            pca = res = np.zeros(len(novel), dtype=bool)
        print(f"| {case} | {seed} | {unknown.sum()} of {(~novel).sum()} | {(pca & unknown).sum()} / "
              f"{(res & unknown).sum()} / {(pca & res & unknown).sum()} | {(pca & novel).sum()} / "
              f"{(res & novel).sum()} of {novel.sum()} |", flush=True)


if __name__ == "__main__":
    main()
