"""Training ideas measured against the defaults and not adopted (research script; patches atlasmtl in this
process only).

``swa:<start>``
    Stochastic weight averaging (Izmailov et al. 2018; dense, every step, as SWAD): each ensemble member's
    weights are averaged over every optimiser step after ``start`` × its total steps, and the member keeps
    the average (no batch norm to refit). ``swa:0.5`` averages the second half of the run.
``rank`` / ``logrank``
    Within-cell rank input: after log1p, each cell's detected values are replaced by their rank among that
    cell's detected genes (ties averaged) divided by the number detected (``rank``: in (0, 1]) or by
    ``log1p(rank) / log1p(detected)`` (``logrank``); zeros stay zero. The per-gene z-score, its statistics
    and the augmentation (applied to counts first) then work on these values as on log values. Rank
    encodings do not change when a cell's depth or a protocol's monotone capture bias changes.
``cosine:<scale>``
    Cosine-similarity heads (NormFace / CosFace without margin): each level's logits are ``scale`` times the
    cosine between the embedding and a learned class vector, in place of a linear layer. Training then takes
    PyTorch's autograd path (the hand-written step knows only linear heads).
``pca:<k>``
    The first layer restricted to the reference's top ``k`` principal components of the network input
    (fitted on up to 10,000 training cells, unaugmented): ``W ← W Vᵀ V`` at the start and after every
    optimiser step, so the encoder sees only the projection ``V f(x)`` (the subspace that logistic regression
    on PCA, the strongest peer, works in), learned end to end.
``genes:<keep>``
    Random-subspace members: ensemble member ``i`` sees a fixed random ``keep`` fraction of the genes (its
    first-layer columns of the others zeroed at the start and after every optimiser step; drawn from seed
    ``i`` of each model), so the members disagree where a subset of genes shifts (capture biases of a
    protocol, orthologues, missing genes) and their average leans on the rest.
``genestd:<s0>``
    A pseudo standard deviation in the z-score input: each gene's reference standard deviation becomes
    ``sqrt(std² + s0²)`` (log1p CP10k units; genes with std < 1e-3 keep 1). Without it a gene detected in a
    fraction ``f`` of the reference's cells gives an expressing cell ``z ≈ 1/sqrt(f)`` whatever its level, so
    the genes a reference rarely detects saturate at the clip (±10) in a query that detects them more often
    (another protocol or species); with it such a gene's z is about its log value ÷ ``s0``.
``viewstd:<s0>``
    The pseudo standard deviation of ``genestd`` in the novelty input view only: the network is trained on
    the usual z-scores, while the view's PCA (fitted at training) and its projection of query cells (at
    prediction) see each gene's z-score times ``std / sqrt(std² + s0²)``, so a gene the reference rarely
    detects weighs in the view by its level rather than by its rarity.
``clip:<c>``
    The z-score input clipped to ±``c`` instead of ±10 (training and prediction).
``levelweight:<w>``
    The coarsest level's cross-entropy weighs ``w`` times the others' in the training loss (its targets,
    to which the loss and its gradient are linear, scaled by ``w``); a one-level reference is unchanged.
``supcon:<w>``
    A supervised contrastive term (Khosla et al. 2020), weighted ``w``, added to the loss: on each minibatch's
    L2-normalised embeddings (the space of the KNN vote and the novelty distances), every labelled cell's
    softmax over its cosine similarities to the other cells (temperature 0.1) against a target that weighs
    each other cell by how much their finest-level targets overlap (``p_i · p_j`` of the row-normalised
    cross-entropy targets, so mixed cells count for both labels). Distances to the nearest reference cells
    of a class are what the novelty score and the vote read; the term pulls each class together and apart
    from the others (Sun et al. 2022: nearest-neighbour distances on such features detect unseen classes
    well). Training then takes PyTorch's autograd path.

Per case and seed, the model trained with the patch predicts at the defaults and with KNN off; rows in
``threshold_table.py``'s format under the labels ``<patch>`` and ``<patch>_off``:

    PYTHONPATH=$PWD python benchmark/experiments/training_patch_study.py <case,case,...> 0,1,2 out.json swa:0.5 [--work DIR]
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import atlasmtl  # noqa: E402
import atlasmtl.training as tr  # noqa: E402
import atlasmtl.reference as rf  # noqa: E402
import atlasmtl.training_loop as loop  # noqa: E402
from atlasmtl import genes  # noqa: E402
from common import read_study_case  # noqa: E402
from study_scores import print_progress, score_model  # noqa: E402


def patch_swa(start: float) -> None:
    """Average each member's weights over its steps after ``start`` of the run (see the module docstring)."""
    state = {"total": 0, "n": 0, "avg": None, "count": 0}
    fit, step = tr.fit, loop._AdamW.step

    def patched_fit(net, objective, train_cells, val_cells, rng, **kw):
        state.update(total=kw["num_epochs"] * math.ceil(len(train_cells) / kw["batch_size"]), n=0, avg=None, count=0)
        return fit(net, objective, train_cells, val_cells, rng, **kw)

    @torch.no_grad()
    def patched_step(self):
        step(self)
        state["n"] += 1
        if state["n"] > start * state["total"]:
            if state["avg"] is None:
                state["avg"], state["count"] = [p.detach().clone() for p in self.params], 1
            else:
                state["count"] += 1
                for a, p in zip(state["avg"], self.params):
                    a.add_(p.detach() - a, alpha=1.0 / state["count"])
        if state["n"] == state["total"] and state["avg"] is not None:  # the last step: keep the average
            for a, p in zip(state["avg"], self.params):
                p.copy_(a)  # in place: the optimiser's first-layer parameter is a view of the network's weight

    tr.fit, loop._AdamW.step = patched_fit, patched_step


def row_ranks(m: sp.csr_matrix, log: bool) -> np.ndarray:
    """Per stored value of a canonical CSR matrix: its average rank within its row over the row's count
    (or ``log1p(rank) / log1p(count)``)."""
    counts = np.diff(m.indptr)
    rows = np.repeat(np.arange(m.shape[0]), counts)
    order = np.lexsort((m.data, rows))
    values, r = m.data[order], rows[order]
    position = np.arange(len(values)) - m.indptr[r]
    new = np.ones(len(values), dtype=bool)
    new[1:] = (r[1:] != r[:-1]) | (values[1:] != values[:-1])
    group = np.cumsum(new) - 1
    rank = np.bincount(group, weights=position)[group] / np.bincount(group)[group] + 1.0
    out = np.empty(len(values), dtype=np.float32)
    out[order] = np.log1p(rank) / np.log1p(counts[r]) if log else rank / counts[r]
    return out


def patch_rank(log: bool) -> None:
    """Rank values in place of log values on every path into the network (see the module docstring)."""
    sparse_values, transform, detected = (genes.GeneAligner._sparse_values, genes.GeneAligner.transform,
                                          genes.GeneAligner.detected)

    def patched_sparse_values(self, block):
        out = sparse_values(self, block)
        if self.input_transform != "binary":
            out.sort_indices()
            out.data = row_ranks(out, log)
        return out

    def as_csr(block):
        return block if sp.issparse(block) else sp.csr_matrix(np.asarray(block, dtype=np.float32))

    genes.GeneAligner._sparse_values = patched_sparse_values
    genes.GeneAligner.transform = lambda self, block: transform(self, as_csr(block))
    genes.GeneAligner.detected = lambda self, block: detected(self, as_csr(block))


class CosineHead(torch.nn.Module):
    """``scale · cos(embedding, class vector)`` per class (see the module docstring)."""

    def __init__(self, width: int, n_classes: int, scale: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(n_classes, width))
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation
        self.scale = scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        normalise = torch.nn.functional.normalize
        return self.scale * normalise(z, dim=1) @ normalise(self.weight, dim=1).t()


def patch_cosine(scale: float) -> None:
    """Cosine heads in every network built (see the module docstring)."""
    from atlasmtl import network

    init = network.MultiTaskNetwork.__init__

    def patched_init(self, n_genes, n_classes, coord_dims, hidden_sizes=(256, 128), dropout_rate=0.5):
        init(self, n_genes, n_classes, coord_dims, hidden_sizes, dropout_rate)
        self.label_heads = torch.nn.ModuleList([CosineHead(self.embedding_size, k, scale) for k in n_classes])

    network.MultiTaskNetwork.__init__ = patched_init
    network.MultiTaskNetwork.step_by_hand_fits = lambda self, x, dropout_keep: False


def patch_first_layer(prepare, project) -> None:
    """Keep every ensemble member's first-layer weight in a constraint set: ``prepare(net, objective,
    train_cells)`` runs before each member trains, and ``project(w)`` projects the weight in place, given
    transposed (genes × units), at the start and after every optimiser step."""
    fit, step = tr.fit, loop._AdamW.step
    n_genes = [0]

    def patched_fit(net, objective, train_cells, val_cells, rng, **kw):
        prepare(net, objective, train_cells)
        weight = net.encoder.layers[0].weight
        n_genes[0] = weight.shape[1]
        with torch.no_grad():
            project(weight.t())  # a view: projected in place
        return fit(net, objective, train_cells, val_cells, rng, **kw)

    @torch.no_grad()
    def patched_step(self):
        step(self)
        for p in self.params:
            if p.dim() == 2 and p.shape[0] == n_genes[0]:  # the first layer's weight, stored transposed
                project(p)

    tr.fit, loop._AdamW.step = patched_fit, patched_step


def patch_pca(k: int) -> None:
    """The first layer kept in the span of the input's top ``k`` principal components (see the module docstring)."""
    from sklearn.decomposition import PCA
    state = {"V": None, "ref": None}

    def prepare(net, objective, train_cells):
        if state["ref"] is not objective.ref:
            rng = np.random.default_rng(0)
            rows = np.sort(rng.choice(train_cells, size=min(10_000, len(train_cells)), replace=False))
            x = objective.ref.aligner.sparse_input(objective.ref.source.rows(rows)).toarray()
            pca = PCA(n_components=min(k, x.shape[0] - 1, x.shape[1]), svd_solver="randomized", random_state=0).fit(x)
            state["V"], state["ref"] = torch.from_numpy(pca.components_.astype(np.float32)), objective.ref

    def project(w_t):
        w_t.copy_(state["V"].t() @ (state["V"] @ w_t))

    patch_first_layer(prepare, project)


def patch_gene_subspace(keep: float) -> None:
    """Each ensemble member's first layer restricted to its own random genes (see the module docstring)."""
    state = {"member": 0, "ref": None, "dropped": None}

    def prepare(net, objective, train_cells):
        if state["ref"] is not objective.ref:
            state["ref"], state["member"] = objective.ref, 0
        draw = np.random.default_rng(state["member"])
        state["member"] += 1
        state["dropped"] = torch.from_numpy(draw.random(net.encoder.layers[0].weight.shape[1]) >= keep)

    def project(w_t):
        w_t[state["dropped"]] = 0.0

    patch_first_layer(prepare, project)


def pseudo_std_factor(std: np.ndarray, s0: float) -> np.ndarray:
    """``std / sqrt(std² + s0²)`` per gene: what the pseudo standard deviation multiplies a z-score by (1 for
    the genes ``reference_gene_statistics`` set to std 1, those under 1e-3)."""
    factor = np.ones_like(std, dtype=np.float64)
    kept = std != 1.0
    factor[kept] = std[kept] / np.sqrt(std[kept].astype(np.float64) ** 2 + s0**2)
    return factor


def patch_gene_std(s0: float) -> None:
    """Pseudo standard deviation ``sqrt(std² + s0²)`` for the z-score input (see the module docstring)."""
    stats = rf.reference_gene_statistics

    def patched_stats(*args, **kwargs):
        keep, mean, std = stats(*args, **kwargs)
        return keep, mean, (std / pseudo_std_factor(std, s0)).astype(np.float32)

    rf.reference_gene_statistics = patched_stats


def patch_view_std(s0: float) -> None:
    """The ``genestd`` weighting in the novelty input view alone (see the module docstring)."""
    import atlasmtl.prediction as pr
    from atlasmtl.network import SparseInput

    stats, fit_view, view_block = rf.reference_gene_statistics, tr.fit_input_view, pr._input_view_block
    weight: dict[str, np.ndarray] = {}  # set when a model's statistics are computed; used by its predictions

    def patched_stats(*args, **kwargs):
        keep, mean, std = stats(*args, **kwargs)
        weight["w"] = pseudo_std_factor(std, s0).astype(np.float32)
        return keep, mean, std

    def scaled(m):
        return sp.csr_matrix(m.multiply(weight["w"][None, :]), dtype=np.float32)

    def patched_fit_view(read_dense, read_offset, zero_input, *args):
        w = weight["w"]
        return fit_view(lambda rows: read_dense(rows) * w, lambda rows: scaled(read_offset(rows)),
                        None if zero_input is None else zero_input * w, *args)

    def patched_block(view, x, zero, buffers, rows):
        w = weight["w"]
        if isinstance(x, SparseInput):
            x = x._replace(rows=scaled(x.rows), rows_t=None)
        else:
            x = x * torch.as_tensor(w, device=x.device)
        return view_block(view, x, None if zero is None else zero * w, buffers, rows)

    rf.reference_gene_statistics, tr.fit_input_view, pr._input_view_block = patched_stats, patched_fit_view, patched_block


def patch_clip(c: float) -> None:
    """The z-score input clipped to ±``c`` (see the module docstring)."""
    genes.ZSCORE_CLIP = c


def patch_level_weight(weight: float) -> None:
    """The coarsest level's loss scaled by ``weight`` (see the module docstring)."""
    minibatch = loop.Objective.minibatch

    def patched_minibatch(self, *args, **kwargs):
        batch = minibatch(self, *args, **kwargs)
        if len(batch.targets) > 1:
            batch.targets[0] = batch.targets[0] * weight
        return batch

    loop.Objective.minibatch = patched_minibatch


def patch_supcon(weight: float, tau: float = 0.1) -> None:
    """A supervised contrastive term on the embedding (see the module docstring)."""
    def patched_loss(self, net, batch):
        out = net(batch.x, mix=batch.mix, dropout_keep=batch.dropout_keep)
        loss = torch.zeros((), device=self.dev)
        for j, lg in enumerate(out.logits):
            loss = loss - (batch.targets[j] * torch.log_softmax(lg, dim=1)).sum() / batch.n_labelled[j]
        for n in self.coord_std:
            target = batch.coords[n]
            if batch.mix is not None:
                partner, w = batch.mix[:2]
                target = w.unsqueeze(1) * target + (1.0 - w.unsqueeze(1)) * target[partner]
            loss = loss + torch.mean((out.coords[n] - target) ** 2)
        t = batch.targets[-1]
        z = torch.nn.functional.normalize(out.embedding[: t.shape[0]], dim=1)
        p = t / t.sum(1, keepdim=True).clamp_min(1e-12)
        eye = torch.eye(t.shape[0], dtype=torch.bool, device=t.device)
        s = (p @ p.t()).masked_fill(eye, 0.0)
        log_p = torch.log_softmax((z @ z.t() / tau).masked_fill(eye, float("-inf")), dim=1).masked_fill(eye, 0.0)
        mass = s.sum(1)
        anchors = mass > 0
        if anchors.any():
            contrast = -((s / mass.clamp_min(1e-12).unsqueeze(1)) * log_p).sum(1)[anchors].mean()
            loss = loss + weight * contrast
        return loss

    loop.Objective.loss = patched_loss
    from atlasmtl import network
    network.MultiTaskNetwork.step_by_hand_fits = lambda self, x, dropout_keep: False


#: ``<name>:<value>`` patches (``rank`` and ``logrank`` take no value).
PATCHES = {"swa": patch_swa, "cosine": patch_cosine, "pca": patch_pca, "genes": patch_gene_subspace,
           "genestd": patch_gene_std, "viewstd": patch_view_std, "clip": patch_clip, "levelweight": patch_level_weight,
           "supcon": patch_supcon}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cases")
    ap.add_argument("seeds")
    ap.add_argument("out", type=Path)
    ap.add_argument("patch", help="swa:<start fraction>, rank, logrank, cosine:<scale>, pca:<k>, genes:<keep>, genestd:<s0>, viewstd:<s0>, clip:<c>, levelweight:<w> or supcon:<w>")
    ap.add_argument("--work", type=Path, default=Path("/work/bench_work"))
    a = ap.parse_args()
    name, _, value = a.patch.partition(":")
    if a.patch in ("rank", "logrank"):
        patch_rank(a.patch == "logrank")
        label = a.patch
    elif name in PATCHES and value:
        PATCHES[name](int(value) if name == "pca" else float(value))
        label = f"swa{round(float(value) * 100)}" if name == "swa" else f"{name}{value}"  # the labels of the committed rows
    else:
        raise SystemExit(f"unknown patch {a.patch!r}")
    torch.set_num_threads(1)
    rows = json.loads(a.out.read_text()) if a.out.exists() else []
    done = {(r["case"], r["seed"]) for r in rows}
    for case in a.cases.split(","):
        spec, ref, query, truth = read_study_case(a.work / "cases" / case)
        for seed in (int(s) for s in a.seeds.split(",")):
            if (case, seed) in done:
                continue
            model = atlasmtl.build_model(ref, spec["levels"], random_state=seed, num_threads=1,
                                         show_progress=False, show_summary=False)
            scores = score_model(model, query, truth, spec)
            row = {"case": case, "seed": seed, "K": "auto", label: scores["default"], label + "_off": scores["off"],
                   "train_seconds": model.train_config["train_seconds"]}
            rows.append(row)
            a.out.write_text(json.dumps(rows))
            print_progress(case, seed, row, spec["levels"][-1])


if __name__ == "__main__":
    main()
