#!/usr/bin/env bash
# Create (or reuse) the project venv .venv from the pinned requirement files.
# Idempotent: a stamp file records the hash of the requirement files; nothing is reinstalled
# while they are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp=.venv/.leap-requirements.sha256
want=$(cat requirements.txt requirements-hosts.txt setup.cfg | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[bootstrap] creating .venv with $($PY --version) (first run: a few minutes)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -r requirements-hosts.txt
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
# fastreid's evaluator wants its Cython rank module compiled inside site-packages; its Makefile
# calls whatever `python3` is first on PATH, so build it here with the venv's own interpreter.
rank_dir=$(.venv/bin/python -c "import os, fastreid; print(os.path.join(os.path.dirname(fastreid.__file__), 'evaluation', 'rank_cylib'))")
(cd "$rank_dir" && "$OLDPWD/.venv/bin/python" setup.py -q build_ext --inplace >/dev/null 2>&1 && rm -rf build) \
  || echo "[bootstrap] warning: fastreid's Cython rank module did not compile; its Python evaluator is used instead"
echo "$want" > "$stamp"
echo "[bootstrap] .venv ready"
