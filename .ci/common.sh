# Shared by .ci/run, .ci/run-latest and .ci/refresh-constraints (sourced, not run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MOECOMPRESS_CACHE="${TMPDIR:-/tmp}/moecompress-ci-cache-$$"

# fresh_venv DIR: a new virtualenv at DIR, activated, with a current pip.
fresh_venv() {
  rm -rf "$1"
  "${PYTHON:-python3}" -m venv "$1"
  # shellcheck disable=SC1091
  . "$1/bin/activate"
  python -m pip install --quiet --upgrade pip
}

# run_tests: the test command exactly as README.md writes it ("Run the tests"), after ruff.
run_tests() {
  python -c "import torch, transformers, lm_eval, compressed_tensors as ct; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'lm-eval', lm_eval.__version__, 'compressed-tensors', ct.__version__)"
  ruff check moecompress tests bench
  python -m pytest -q -p no:cacheprovider
}
