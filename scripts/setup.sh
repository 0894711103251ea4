#!/usr/bin/env bash
# Create the virtualenv and install peftsweep with its dev tools.
# torch is pinned to the CPU wheel here, BEFORE anything that depends on it: an unpinned torch pulls a
# multi-GB CUDA build. GPU users install their CUDA torch first and then `pip install -e .[dev]`.
set -euo pipefail
venv="${1:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
"$venv/bin/python" -c "import torch, ray, deepspeed, peft, mlflow, optuna; print('installed: torch', torch.__version__, '| ray', ray.__version__, '| deepspeed', deepspeed.__version__, '| peft', peft.__version__, '| mlflow', mlflow.__version__, '| optuna', optuna.__version__)"
