"""Stage 2 of trust_study.py: every post-hoc method evaluated from the cached network outputs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score

from atlasmtl.metrics import macro_f1, path_consistency
from atlasmtl.calibration import expected_calibration_error
from trust_study import CACHE, UNKNOWN


def softmax(x):
    x = x - x.max(1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(1, keepdims=True)


def normalise(z):
    n = np.linalg.norm(z, axis=1, keepdims=True)
    return np.divide(z, n, out=np.zeros_like(z), where=n > 0)


def fit_temperature(logits, y):
    ok = y >= 0
    lg, y = logits[ok].astype(np.float64), y[ok]
    if len(y) == 0:
        return 1.0

    # soft targets: the held-out accuracy is estimated with a Laplace prior (n+1)/(n+2), so a perfectly
    # separated held-out set does not drive T to 0 (infinitely confident)
    eps = 1.0 / (len(y) + 2)
    K = lg.shape[1]

    def nll(logt):
        l = lg / np.exp(logt)
        lp = l - logsumexp(l, axis=1, keepdims=True)
        return -((1 - eps) * lp[np.arange(len(y)), y] + eps / max(K - 1, 1) * (lp.sum(1) - lp[np.arange(len(y)), y])).mean()

    return float(np.exp(minimize_scalar(nll, bounds=(-4, 4), method="bounded").x))


def codes_of(labels, classes):
    pos = {c: i for i, c in enumerate(classes)}
    return np.array([pos.get(x, -1) for x in labels], dtype=np.int64)


def knn_dist_to_class(query, ref, ref_codes, cls, k, exclude_self=False):
    """Mean distance of each query row to its k nearest ref rows of class cls[i]."""
    out = np.full(len(query), np.nan)
    for c in np.unique(cls):
        rows = np.flatnonzero(cls == c)
        members = ref[ref_codes == c]
        if len(members) == 0:
            continue
        d = np.sqrt(np.maximum(((query[rows, None, :] - members[None]) ** 2).sum(-1), 0)) if len(members) * len(rows) < 4e6 else None
        if d is None:
            d = np.stack([np.linalg.norm(members - q, axis=1) for q in query[rows]])
        d.sort(axis=1)
        if exclude_self:
            d = d[:, 1:]
        kk = max(1, min(k, d.shape[1]))
        if d.shape[1] == 0:
            continue
        out[rows] = d[:, :kk].mean(1)
    return out


def pvalue(score, null):
    null = np.sort(null[np.isfinite(null)])
    ge = len(null) - np.searchsorted(null, score, side="left")
    return (1 + ge) / (len(null) + 1)


# ----------------------------------------------------------------------------- decoding
def decode(probs, levels, classes, hierarchy, joint):
    """Per-level codes; joint = path maximising the product of level probabilities."""
    codes = [p.argmax(1) for p in probs]
    if not joint:
        return codes
    j = 0
    L = len(levels)
    while j < L:
        end = j
        while end + 1 < L and levels[end + 1] in hierarchy:
            end += 1
        if end > j:  # levels j..end nest: enumerate leaf classes of `end`
            leaves = np.arange(len(classes[levels[end]]))
            anc = np.zeros((len(leaves), end - j + 1), dtype=np.int64)
            anc[:, -1] = leaves
            for m in range(end, j, -1):
                cmap = hierarchy[levels[m]]
                pidx = {c: i for i, c in enumerate(classes[levels[m - 1]])}
                names = classes[levels[m]]
                anc[:, m - j - 1] = [pidx[cmap[names[i]]] for i in anc[:, m - j]]
            score = np.zeros((len(probs[0]), len(leaves)))
            for m in range(j, end + 1):
                score += np.log(np.clip(probs[m][:, anc[:, m - j]], 1e-12, None))
            best = score.argmax(1)
            for m in range(j, end + 1):
                codes[m] = anc[best, m - j]
        j = end + 1
    return codes


def vote(nbr, dist, ref_codes, n_cls, weighted, balanced, class_counts, allowed=None):
    k = nbr.shape[1]
    codes = ref_codes[nbr]
    w = np.ones_like(dist, dtype=np.float64)
    if weighted:
        dk = np.maximum(dist[:, -1:], 1e-6)
        w = np.exp(-((dist / dk) ** 2))
    if allowed is not None:
        w = w * allowed[np.arange(len(nbr))[:, None], np.maximum(codes, 0)]
    w = np.where(codes >= 0, w, 0)
    sc = np.zeros((len(nbr), n_cls))
    np.add.at(sc, (np.repeat(np.arange(len(nbr)), k), np.maximum(codes, 0).ravel()), w.ravel())
    if balanced:
        sc = sc * (k / np.clip(np.minimum(class_counts, k), 1, None))[None]
    tot = w.sum(1) if not balanced else sc.sum(1)
    win = sc.argmax(1)
    best = sc[np.arange(len(win)), win]
    frac = np.divide(best, tot, out=np.zeros_like(best), where=tot > 0)
    if not weighted and not balanced and allowed is None:
        frac = best / k
    win = np.where(best > 0, win, -1)
    return win, frac


# ----------------------------------------------------------------------------- one configuration
DEFAULT = dict(temp=True, joint=True, novelty="knn_cls", alpha=0.01, knn="low_conf_only", vote="wbal",
               conf_high=0.7, conf_low=0.4, margin=0.2, knn_k=15, knn_conf_low=0.6, nov_k=10,
               knn_parent=True, index_held=True)
OLD = dict(temp=False, joint=False, novelty=None, alpha=0.0, knn="low_conf_only", vote="maj",
           conf_high=0.7, conf_low=0.4, margin=0.2, knn_k=15, knn_conf_low=0.6, nov_k=10,
           knn_parent=False, index_held=False)


class Prepared:
    """Everything computed once per cached model."""

    def __init__(self, st):
        self.st = st
        self.levels, self.classes, self.hier = st["levels"], st["classes"], st["hierarchy"]
        has_held = st["held"] is not None and len(st["held_labels"])
        self.has_held = has_held
        self.T = []
        for j, lv in enumerate(self.levels):
            if has_held:
                self.T.append(fit_temperature(st["held"]["logits"][j], codes_of(st["held_labels"][:, j], self.classes[lv])))
            else:
                self.T.append(1.0)
        self.ztr = normalise(st["train"]["z"])
        self.zq = normalise(st["query"]["z"])
        self.zh = normalise(st["held"]["z"]) if has_held else np.zeros((0, self.ztr.shape[1]))
        self.tr_codes = [codes_of(st["ref_labels"][:, j], self.classes[lv]) for j, lv in enumerate(self.levels)]
        self.h_codes = [codes_of(st["held_labels"][:, j], self.classes[lv]) for j, lv in enumerate(self.levels)] if has_held else None
        self._cache = {}

    def probs(self, which, temp):
        lg = self.st[which]["logits"]
        return [softmax(l / (t if temp else 1.0)) for l, t in zip(lg, self.T)]

    def novelty(self, kind, which, codes, j, k):
        """Novelty score (higher = more novel) of `which` rows with decoded codes at level j."""
        key = (kind, which, j, k, codes.tobytes())
        if key in self._cache:
            return self._cache[key]
        st = self.st
        if kind == "energy":
            s = -logsumexp(st[which]["logits"][j], axis=1)
        elif kind == "knn_cls":
            emb = {"query": self.zq, "held": self.zh}[which]
            s = knn_dist_to_class(emb, self.ztr, self.tr_codes[j], codes, k)
        elif kind == "knn_cls_norm":
            emb = {"query": self.zq, "held": self.zh}[which]
            s = knn_dist_to_class(emb, self.ztr, self.tr_codes[j], codes, k)
            scale = self._class_scale(j, k, self.ztr, "emb")
            s = s / scale[codes]
        elif kind == "knn_any":
            emb = {"query": self.zq, "held": self.zh}[which]
            s = knn_dist_to_class(emb, self.ztr, np.zeros(len(self.ztr), int), np.zeros(len(emb), int), k)
        elif kind == "pca_cls":
            emb = st["pca"][which]
            s = knn_dist_to_class(emb, st["pca"]["train"], self.tr_codes[j], codes, k)
        elif kind == "maha":
            z = st[which]["z"]
            ztr = st["train"]["z"]
            from sklearn.covariance import LedoitWolf

            if ("maha", j) not in self._cache:
                cls = self.tr_codes[j]
                means = np.stack([ztr[cls == c].mean(0) if (cls == c).any() else np.zeros(ztr.shape[1]) for c in range(len(self.classes[self.levels[j]]))])
                cov = LedoitWolf().fit(ztr[cls >= 0] - means[cls[cls >= 0]]).precision_
                self._cache[("maha", j)] = (means, cov)
            means, prec = self._cache[("maha", j)]
            d = z - means[codes]
            s = np.einsum("ij,jk,ik->i", d, prec, d)
        elif kind == "msp":
            s = None
        self._cache[key] = s
        return s

    def _class_scale(self, j, k, ref, space):
        key = ("scale", j, k, space)
        if key not in self._cache:
            cls = self.tr_codes[j]
            loo = knn_dist_to_class(ref, ref, cls, cls, k, exclude_self=True)
            scale = np.array([np.nanmedian(loo[cls == c]) if (cls == c).sum() > 1 else np.nan for c in range(len(self.classes[self.levels[j]]))])
            scale = np.where(np.isfinite(scale), scale, np.nanmedian(scale))
            self._cache[key] = scale
        return self._cache[key]


def run_config(P: Prepared, cfg: dict):
    st, levels, classes, hier = P.st, P.levels, P.classes, P.hier
    n = len(P.zq)
    probs = P.probs("query", cfg["temp"])
    dec = decode(probs, levels, classes, hier, cfg["joint"])
    conf = [p[np.arange(n), c] for p, c in zip(probs, dec)]
    margin = []
    for p, c in zip(probs, dec):
        q = p.copy()
        q[np.arange(n), c] = -1
        margin.append(conf[len(margin)] - q.max(1) if p.shape[1] > 1 else conf[len(margin)])
    zero = st["query"]["n_detected"] == 0
    out = {"dec": dec, "conf": conf, "zero": zero}
    # novelty per level (decoded class), p-values against held-out reference cells
    novel_flag, nov_score = [], []
    for j in range(len(levels)):
        if cfg["novelty"] is None or cfg["novelty"] == "msp":
            s = 1 - conf[j]
            nov_score.append(s)
            if cfg["novelty"] == "msp" and P.has_held:
                hp = P.probs("held", cfg["temp"])
                hdec = decode(hp, levels, classes, hier, cfg["joint"])
                null = 1 - hp[j][np.arange(len(hdec[j])), hdec[j]]
                novel_flag.append(pvalue(s, null) < cfg["alpha"])
            else:
                novel_flag.append(np.zeros(n, bool))
            continue
        hp = P.probs("held", cfg["temp"])
        hdec = decode(hp, levels, classes, hier, cfg["joint"])
        pv, zs = [], []
        for kind in cfg["novelty"].split("+"):
            s = P.novelty(kind, "query", dec[j], j, cfg["nov_k"])
            null = P.novelty(kind, "held", hdec[j], j, cfg["nov_k"])
            pv.append(pvalue(np.nan_to_num(s, nan=np.inf), null))
            if kind in ("energy",):
                ls, ln = s, null
            else:
                ls, ln = np.log(np.maximum(np.nan_to_num(s, nan=1e9), 1e-9)), np.log(np.maximum(null[np.isfinite(null)], 1e-9))
            med = np.median(ln)
            sd = 1.4826 * np.median(np.abs(ln - med))
            fin = ls[np.isfinite(ls) & (ls < 20)]
            qmed = np.median(fin)
            qsd = 1.4826 * np.median(np.abs(fin - qmed))
            loc = cfg.get("loc", "held")
            if loc == "query":
                med, sd = qmed, qsd
            elif loc == "shift":
                med = max(med, qmed)
            elif loc == "pc":
                hcodes = hdec[j][np.isfinite(null)]
                shift = max(0.0, qmed - med)
                cm, cs = np.full(len(ls), med + shift), np.full(len(ls), sd)
                for c in np.unique(dec[j]):
                    hc = ln[hcodes == c]
                    if len(hc) >= cfg.get("pc_min", 15):
                        m_c = np.median(hc)
                        cm[dec[j] == c] = m_c + shift
                        cs[dec[j] == c] = max(1.4826 * np.median(np.abs(hc - m_c)), 0.05)
                med, sd = cm, cs
            elif loc == "classq":
                cm = np.full(len(ls), med)
                for c in np.unique(dec[j]):
                    r = dec[j] == c
                    fr = ls[r][np.isfinite(ls[r]) & (ls[r] < 20)]
                    if len(fr) >= 10:
                        cm[r] = max(med, np.median(fr))
                    else:
                        cm[r] = max(med, qmed)
                med = cm
            elif loc == "max":
                med, sd = max(med, qmed), max(sd, qsd)
            zs.append((ls - med) / np.maximum(sd, 1e-6))
        z = np.max(zs, axis=0)
        if cfg.get("zthr") is not None:
            nov_score.append(z)
            novel_flag.append(z > cfg["zthr"])
        else:
            p = np.min(pv, axis=0) * len(pv)
            nov_score.append(1 - p + 1e-9 * np.nan_to_num(s, nan=1e9))
            novel_flag.append(p < cfg["alpha"])
    out["nov_score"] = nov_score
    # coarse novel => below novel too
    for j in range(1, len(levels)):
        if levels[j] in hier:
            novel_flag[j] = novel_flag[j] | novel_flag[j - 1]
    # KNN
    if cfg["index_held"] and P.has_held:
        ref_emb = np.vstack([P.ztr, P.zh])
        ref_codes = [np.concatenate([a, b]) for a, b in zip(P.tr_codes, P.h_codes)]
    else:
        ref_emb, ref_codes = P.ztr, P.tr_codes
    low = [(c < cfg["conf_high"]) | (m < cfg["margin"]) for c, m in zip(conf, margin)]
    any_low = np.any(low, axis=0)
    final, used, searched, unknown = [], [], [], []
    nbr = dist = None
    if cfg["knn"] != "off":
        k = min(cfg["knn_k"], len(ref_emb))
        d2 = ((P.zq ** 2).sum(1)[:, None] - 2 * P.zq @ ref_emb.T + (ref_emb ** 2).sum(1)[None])
        nbr = np.argsort(d2, axis=1)[:, :k]
        dist = np.sqrt(np.maximum(np.take_along_axis(d2, nbr, 1), 0))
    for j, lv in enumerate(levels):
        fin = dec[j].copy()
        unk = (conf[j] < cfg["conf_low"]) | ~np.isfinite(conf[j])
        acc = np.zeros(n, bool)
        srch = np.zeros(n, bool)
        parent_changed = np.zeros(n, bool)
        if j > 0 and lv in hier and cfg["knn_parent"]:
            pmap = hier[lv]
            pidx = {c: i for i, c in enumerate(classes[levels[j - 1]])}
            parent_of = np.array([pidx[pmap[c]] for c in classes[lv]])
            parent_changed = (final[j - 1] >= 0) & (final[j - 1] != parent_of[dec[j]])
        if cfg["knn"] != "off":
            if cfg["knn"] == "low_conf_only":
                srch = low[j] | parent_changed
            else:
                srch = np.ones(n, bool)
            srch &= ~novel_flag[j] & ~zero & np.isfinite(conf[j])
            rows = np.flatnonzero(srch)
            allowed = None
            if j > 0 and lv in hier and cfg["knn_parent"]:
                allowed = (parent_of[None, :] == final[j - 1][rows][:, None]).astype(float)
            if cfg.get("knn_minprob"):
                ap = (probs[j][rows] >= cfg["knn_minprob"]).astype(float)
                allowed = ap if allowed is None else allowed * ap
            cc = np.bincount(ref_codes[j][ref_codes[j] >= 0], minlength=len(classes[lv]))
            w = cfg["vote"]
            win, frac = vote(nbr[rows], dist[rows], ref_codes[j], len(classes[lv]), "w" in w, "bal" in w, cc, allowed)
            ok = (win >= 0) & (frac >= cfg["knn_conf_low"])
            acc[rows[ok]] = True
            fin[rows[ok]] = win[ok]
            if cfg["knn"] == "low_conf_only":
                unk |= srch & ~acc
            else:
                unk |= srch & low[j] & ~acc
        unk = (unk & ~acc) | novel_flag[j] | zero | (srch & parent_changed & ~acc)
        if j > 0 and lv in hier:
            unk |= final[j - 1] < 0
        fin[unk] = -1
        final.append(fin)
        used.append(acc)
        searched.append(srch)
        unknown.append(unk)
    out.update(final=final, used=used, searched=searched, unknown=unknown, novel_flag=novel_flag, low=low, any_low=any_low)
    return out


def metrics(P: Prepared, out, case_name, cfg_name):
    st, levels, classes = P.st, P.levels, P.classes
    truth = st["truth"]
    rows = []
    names = []
    for j, lv in enumerate(levels):
        cl = np.array(classes[lv] + [UNKNOWN], dtype=object)
        names.append(cl[out["final"][j]])
    hier_maps = [None] + [P.hier.get(lv) for lv in levels[1:]]
    pc = path_consistency(names, hier_maps)[0] if len(levels) > 1 else None
    for j, lv in enumerate(levels):
        y = truth[lv].to_numpy().astype(object)
        novel = np.isin(y, st["novel"].get(lv, []))
        pred = names[j]
        dec_names = np.array(classes[lv], dtype=object)[out["dec"][j]]
        known = ~novel
        correct_dec = dec_names == y
        r = {"case": case_name, "cfg": cfg_name, "level": lv, "fine": j == len(levels) - 1,
             "macro_f1": macro_f1(y[known], pred[known]) if known.any() else np.nan,
             "acc": float(np.mean(pred[known] == y[known])),
             "net_err": float(1 - correct_dec[known].mean()),
             "ece": expected_calibration_error(out["conf"][j][known], correct_dec[known]),
             "mean_conf": float(out["conf"][j][known].mean()),
             "to_knn": float(out["searched"][j].mean()), "knn_acc": float(out["used"][j].mean()),
             "unknown": float(out["unknown"][j].mean()),
             "known_unk": float(out["unknown"][j][known].mean()),
             "novel_unk": float(out["unknown"][j][novel].mean()) if novel.any() else np.nan,
             "auroc": float(roc_auc_score(novel, np.nan_to_num(out["nov_score"][j], nan=1e9))) if novel.any() and known.any() else np.nan,
             "path_cons": pc}
        rows.append(r)
    return rows


def load(case, variant):
    p = CACHE / f"{case}__{variant}.pkl"
    return pickle.loads(p.read_bytes()) if p.exists() else None


def main(args=None):
    pd.set_option("display.width", 250, "display.max_columns", 40, "display.max_rows", 500)
    import trust_study

    case_names = sorted({p.name.split("__")[0] for p in CACHE.glob("*.pkl")})
    configs = {
        **{f"z{t}_{nv}_{loc}": ("ls01_h20", dict(DEFAULT, novelty=nv, zthr=t, loc=loc)) for t in (2.5, 3, 3.5, 4) for nv in ("knn_cls", "knn_cls+pca_cls", "knn_cls_norm+pca_cls") for loc in ("held", "shift")},
        "old@full": ("ls01_full", OLD),
        "old@h20": ("ls01_h20", OLD),
        "T_only": ("ls01_h20", dict(OLD, temp=True)),
        "new": ("ls01_h20", DEFAULT),
        "new_ls0": ("ls0_h20", DEFAULT),
        "new_knnoff": ("ls01_h20", dict(DEFAULT, knn="off")),
        "new_knnall": ("ls01_h20", dict(DEFAULT, knn="all")),
        "new_maj": ("ls01_h20", dict(DEFAULT, vote="maj")),
        "new_indep": ("ls01_h20", dict(DEFAULT, joint=False)),
    }
    if os.environ.get("FINAL"):
        D = dict(DEFAULT, novelty="knn_cls", zthr=4.0, loc="shift", vote="bal")
        configs = {"old@full": ("ls01_full", OLD), "old@h20": ("ls01_h20", OLD), "T_only": ("ls01_h20", dict(OLD, temp=True)),
                   "new": ("ls01_h20", D), "new_knnoff": ("ls01_h20", dict(D, knn="off")), "new_knnall": ("ls01_h20", dict(D, knn="all")),
                   "new_maj": ("ls01_h20", dict(D, vote="maj")), "new_w": ("ls01_h20", dict(D, vote="w")),
                   "new_wbal": ("ls01_h20", dict(D, vote="wbal")), "new_indep": ("ls01_h20", dict(D, joint=False)),
                   "new_ls0": ("ls0_h20", D), "new_z3": ("ls01_h20", dict(D, zthr=3.0)), "new_z4": ("ls01_h20", dict(D, zthr=4.0)),
                   "new_noparent": ("ls01_h20", dict(D, knn_parent=False)),
                   **{f"nov_{nv}": ("ls01_h20", dict(D, novelty=nv)) for nv in ("msp", "energy", "knn_any", "knn_cls_norm", "maha", "pca_cls", "knn_cls+pca_cls")},
                   "new_nonovelty": ("ls01_h20", dict(D, novelty=None)),
                   **{f"z{t}_perclassnull": ("ls01_h20", dict(D, loc="pc", zthr=t)) for t in (3, 4)},
                   **{f"z{t}_heldnull": ("ls01_h20", dict(D, loc="held", zthr=t)) for t in (3, 4)},
                   **{f"z{t}": ("ls01_h20", dict(D, zthr=t)) for t in (3, 3.5, 4.5)}}
    if os.environ.get("BINARY"):
        D = dict(DEFAULT, novelty="knn_cls", zthr=4.0, loc="shift", vote="bal")
        configs = {"old@full": ("bin_full", OLD), "new": ("bin_h20", D), "new_knnoff": ("bin_h20", dict(D, knn="off")),
                   "new_knnall": ("bin_h20", dict(D, knn="all")), "z3.5": ("bin_h20", dict(D, zthr=3.5)),
                   "T_only": ("bin_h20", dict(OLD, temp=True)),
                   "new_maj": ("bin_h20", dict(D, vote="maj")),
                   **{f"new_mp{m}": ("bin_h20", dict(D, knn_minprob=m)) for m in (0.1, 0.2, 0.3)}}
        if os.environ.get("BINARY") == "float":
            configs = {k: (v[0].replace("bin_h20", "ls01_h20").replace("bin_full", "ls01_full"), v[1]) for k, v in configs.items()}
    if os.environ.get("QUICK"):
        configs = {k: v for k, v in configs.items() if k.startswith("z") or k in ("new", "old@full", "T_only")}
    for nov in () if os.environ.get("QUICK") or os.environ.get("BINARY") else ("knn_cls+pca_cls", "knn_cls_norm+pca_cls", "msp", "energy", "knn_cls_norm", "knn_any", "pca_cls", "maha"):
        configs[f"nov_{nov}"] = ("ls01_h20", dict(DEFAULT, novelty=nov))
    for a in () if os.environ.get("QUICK") or os.environ.get("BINARY") else (0.005, 0.02, 0.05):
        configs[f"alpha{a}"] = ("ls01_h20", dict(DEFAULT, alpha=a))
    rows = []
    preps = {}
    for case in case_names:
        for cname, (variant, cfg) in configs.items():
            if (case, variant) not in preps:
                st = load(case, variant)
                preps[(case, variant)] = Prepared(st) if st is not None else None
            P = preps[(case, variant)]
            if P is None:
                continue
            rows += metrics(P, run_config(P, cfg), case, cname)
    df = pd.DataFrame(rows)
    df.to_csv(CACHE / os.environ.get("RESULTS", "results.csv"), index=False)
    return df
    T = {c: [round(t, 2) for t in preps[(c, "ls01_h20")].T] for c in case_names if preps.get((c, "ls01_h20"))}
    print("temperatures (ls01_h20):", T)
    T0 = {c: [round(t, 2) for t in preps[(c, "ls0_h20")].T] for c in case_names if preps.get((c, "ls0_h20"))}
    print("temperatures (ls0_h20):", T0)
    fine = df[df.fine]
    cols = ["macro_f1", "acc", "net_err", "ece", "to_knn", "knn_acc", "unknown", "known_unk", "novel_unk", "auroc", "path_cons"]
    print(fine.pivot_table(index="cfg", values=cols, aggfunc="mean").round(3).reindex(columns=cols).to_string())
    print(fine.pivot_table(index="case", columns="cfg", values="macro_f1").round(3).to_string())
    print(fine.pivot_table(index="case", columns="cfg", values="ece").round(3).to_string())
    for m in ("known_unk", "novel_unk", "auroc"):
        print(m, "(all cases, fine)")
        print(fine.pivot_table(index="case", columns="cfg", values=m).round(3).filter(regex="^z|new$|old@full").to_string())
    coarse = df[~df.fine]
    print("coarse")
    print(coarse.pivot_table(index="cfg", values=cols, aggfunc="mean").round(3).reindex(columns=cols).to_string())
    return df
    nov = fine[fine.case.isin([c for c in case_names if "_no" in c or c.startswith("zil")])]
    for m in ("auroc", "novel_unk", "known_unk"):
        print(m)
        print(nov.pivot_table(index="case", columns="cfg", values=m).round(3).to_string())
    return df


def markdown(path=None):
    """Per-case tables (fine and coarse levels) of the chosen configuration against the old defaults."""
    df = pd.read_csv(CACHE / "results.csv")
    cols = ["macro_f1", "acc", "net_err", "ece", "to_knn", "knn_acc", "unknown", "known_unk", "novel_unk", "auroc", "path_cons"]
    out = ["# Trust study (issue 9): figures per case", "",
           "Command: `PYTHONPATH=$PWD:$PWD/benchmark/experiments python benchmark/experiments/trust_study.py --train` "
           "then `FINAL=1 ... trust_study.py` (float input, seed 0, one thread).", "",
           "Columns: macro-F1 and accuracy over known cells (Unknown counts as wrong); net_err = error of the network's "
           "decoded call on known cells; ECE = top-label ECE (15 bins) of the reported confidence on known cells; "
           "to_knn = share of cells routed to the KNN vote; knn_acc = share whose label came from an accepted vote; "
           "unknown = share Unknown (all cells); known→Unknown / novel→Unknown; AUROC of the novelty score, novel vs "
           "known; path consistency (all levels).", ""]
    for level_kind, fine in (("finest level", True), ("coarse level", False)):
        for cfg, title in (("new", "new defaults"), ("old@full", "old defaults (main 5b545d1, float input)"),
                           ("new_knnoff", "new, KNN off"), ("new_knnall", "new, KNN all")):
            t = df[(df.cfg == cfg) & (df.fine == fine)].set_index("case")[cols]
            if t.empty:
                continue
            out += [f"## {title}, {level_kind}", "", "| case | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            for case, r in t.iterrows():
                out.append(f"| {case} | " + " | ".join("–" if pd.isna(v) else f"{v:.3f}" for v in r) + " |")
            m = t.mean(numeric_only=True)
            out.append("| **mean** | " + " | ".join("–" if pd.isna(v) else f"{v:.3f}" for v in m) + " |")
            out.append("")
    f = df[df.fine]
    g = f.groupby("cfg")[cols].mean().round(3)
    out += ["## Every configuration, finest level, mean over cases", "", "| configuration | " + " | ".join(cols) + " |",
            "|---" * (len(cols) + 1) + "|"]
    out += [f"| {c} | " + " | ".join("–" if pd.isna(v) else f"{v:.3f}" for v in r) + " |" for c, r in g.iterrows()]
    a = f.pivot_table(index="case", columns="cfg", values="auroc").dropna(how="all").round(3)
    out += ["", "## Novelty AUROC per removed-type case (finest level)", "", "| case | " + " | ".join(a.columns) + " |",
            "|---" * (len(a.columns) + 1) + "|"]
    out += [f"| {c} | " + " | ".join("–" if pd.isna(v) else f"{v:.3f}" for v in r) + " |" for c, r in a.iterrows()]
    out.append("")
    text = "\n".join(out)
    if path:
        Path(path).write_text(text)
    return text
