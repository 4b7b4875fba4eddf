"""Finest/coarse macro-F1 of atlasmtl (defaults) against the best peer per case, from a results.json.

Usage: python benchmark/delta_to_best_peer.py benchmark/results/results.json [other/results.json ...]
The "incl. scANVI" columns take scANVI's finest macro-F1 from the same run where it ran there
(``scanvi``); otherwise from the first other results.json where it ran (``scanvi+``, e.g.
``benchmark/results/shifted_queries/results.json``); otherwise, on the first 22 cases, from the earlier run
below (shared/docs/what-we-know.md, benchmark at 5b545d1; scANVI takes 600-840 s a case on these machines),
marked ``scanvi*``.
"""
import json,sys
r=json.load(open(sys.argv[1]))
runs=[x for x in r["runs"] if x["status"]=="ok"]
# scANVI figures measured earlier (what-we-know / benchmark at 5b545d1), not in this run
scanvi_fine={"symphony_3pv1":.793,"symphony_3pv2":.824,"symphony_5p":.827,"ding2020_dropseq_indrops":.958,"brain_mouse_human":.666,"cellbench_celseq2_3line":.999,"cellbench_dropseq_3line":.999}
by={}
for x in runs: by.setdefault(x["case"],{})[x["method"]]=x["metrics"]["levels"]
other={}  # scANVI's finest macro-F1 from the other runs named on the command line (first one wins)
for path in sys.argv[2:]:
    for x in json.load(open(path))["runs"]:
        if x["status"]=="ok" and x["method"]=="scanvi" and x["case"] not in other:
            other[x["case"]]=list(x["metrics"]["levels"].values())[-1]["macro_f1"]
peers=["celltypist","logreg","knn","symphonypy"]
rows=[]
for case,m in by.items():
    levels=list(m["atlasmtl"].keys()); fine,coarse=levels[-1],levels[0]
    a=m["atlasmtl"][fine]["macro_f1"]
    best=max((m[p][fine]["macro_f1"],p) for p in peers if p in m)
    scanvi=((m["scanvi"][fine]["macro_f1"],"scanvi") if "scanvi" in m else (other[case],"scanvi+") if case in other
            else (scanvi_fine.get(case,-1),"scanvi*"))
    bests=max(best,scanvi)
    line=f"| {case} | {a:.3f} | {best[0]:.3f} ({best[1]}) | {a-best[0]:+.3f} | {bests[0]:.3f} ({bests[1]}) | {a-bests[0]:+.3f} |"
    if len(levels)>1:
        ac=m["atlasmtl"][coarse]["macro_f1"]; bc=max((m[p][coarse]["macro_f1"],p) for p in peers if p in m)
        line+=f" {ac:.3f} | {bc[0]:.3f} ({bc[1]}) | {ac-bc[0]:+.3f} |"
    else: line+=" – | – | – |"
    rows.append((case,a-best[0],a-bests[0],line))
print("| case | atlasmtl fine | best peer in run | Δ | best incl. scANVI* | Δ | atlasmtl coarse | best peer coarse | Δ |")
print("|---|---|---|---|---|---|---|---|---|")
for r_ in rows: print(r_[3])
import statistics as s
for name,sel in [("all",lambda c:True),("known-type cases (no novel)",lambda c:not r["cases"].get(c,{}).get("novel"))]:
    d1=[x[1] for x in rows if sel(x[0])]; d2=[x[2] for x in rows if sel(x[0])]
    print(f"{name} ({len(d1)}): mean Δ {s.mean(d1):+.3f} (worst {min(d1):+.3f}); incl. scANVI* {s.mean(d2):+.3f} (worst {min(d2):+.3f})")
