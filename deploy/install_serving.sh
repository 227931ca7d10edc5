#!/usr/bin/env sh
# Install histolite's serving runtime (ONNX Runtime + FastAPI + whole-slide reading, no torch)
# into a virtualenv.
# The Dockerfile runs exactly this; tests/test_deploy.py runs it in a fresh venv too.
#   deploy/install_serving.sh VENV_DIR SOURCE_DIR
set -eu
venv=${1:?usage: install_serving.sh VENV_DIR SOURCE_DIR}
source_dir=${2:?usage: install_serving.sh VENV_DIR SOURCE_DIR}
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --no-cache-dir --upgrade pip
"$venv/bin/python" -m pip install --quiet --no-cache-dir "$source_dir[serve,slide]"
"$venv/bin/python" -c "import histolite.serve.app, histolite.slide.inference, histolite.slide.merge, histolite.slide.features, sys; assert 'torch' not in sys.modules"
