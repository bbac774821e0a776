#!/usr/bin/env bash
# One-step set-up into the active Python environment (a virtual environment is recommended):
# system packages for the offline speech corpus (installed when root, else listed), then
# clasp_jax with the PyTorch parity/conversion extra and the test/benchmark extra.
set -euo pipefail
cd "$(dirname "$0")"
scripts/install_system_packages.sh
python -m pip install --upgrade pip >/dev/null
python -m pip install -e ".[torch,dev]"
