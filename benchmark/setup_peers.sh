#!/usr/bin/env bash
# Create the peers' virtual environment (CellTypist, scvi-tools/scANVI, symphonypy).
# The peers never become atlasmtl dependencies: they live in benchmark/.envs/peers
# (gitignored) and the benchmark drives them through subprocesses.
#
# Usage: bash benchmark/setup_peers.sh            (creates or completes the env)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ENV="${ATLASMTL_PEERS_ENV:-$HERE/.envs/peers}"
PY="${PYTHON:-python3}"
if [ ! -x "$ENV/bin/python" ]; then
  "$PY" -m venv "$ENV"
fi
"$ENV/bin/python" -m pip install --upgrade pip
# torch FIRST and pinned: any other version resolves to a multi-GB CUDA build.
"$ENV/bin/python" -m pip install torch==2.13.0
"$ENV/bin/python" -m pip install \
  torch==2.13.0 \
  celltypist==1.7.1 \
  'scikit-learn>=1.7,<1.8' \
  scvi-tools==1.4.2 \
  symphonypy==0.2.4 \
  anndata scanpy psutil
"$ENV/bin/python" - <<'PY'
import importlib, importlib.metadata
for module, dist in [("torch", "torch"), ("celltypist", "celltypist"), ("sklearn", "scikit-learn"),
                     ("scvi", "scvi-tools"), ("symphonypy", "symphonypy"), ("anndata", "anndata"), ("scanpy", "scanpy")]:
    try:
        importlib.import_module(module)
        print(f"{dist} {importlib.metadata.version(dist)}")
    except Exception as exc:  # report, do not hide
        print(f"{dist} IMPORT FAILED: {type(exc).__name__}: {exc}")
PY
