#!/usr/bin/env bash
# The floors of requirements.txt and requirements-dev.txt, proven: a fresh virtual environment
# holding the oldest release each `>=` line admits (its newest patch: `torch>=2.9` installs
# torch==2.9.*), then the suite.
# Not part of CI: on Linux it downloads a CUDA build of torch (~3 GB). Run it when a floor moves:
#     bash tests/floors.sh [VENV]        # default /tmp/qwen3-floors, made anew
#     PYTHON=python3.11 bash tests/floors.sh  # with the oldest Python too (3.10 lacks hashlib.file_digest)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/qwen3-floors}
rm -rf "$venv"
"${PYTHON:-python}" -m venv "$venv"
mapfile -t floors < <(sed -n 's/^\([A-Za-z0-9_.-]*\)>=\([0-9.]*\).*/\1==\2.*/p' requirements.txt requirements-dev.txt)
"$venv/bin/python" -m pip install --quiet "${floors[@]}" -r requirements-dev.txt
"$venv/bin/python" -m pip list 2>/dev/null | grep -iE "^($(IFS='|'; echo "${floors[*]%%==*}")) "
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$venv/bin/python" -m pytest -q -p no:cacheprovider
