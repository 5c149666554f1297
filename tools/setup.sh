#!/usr/bin/env bash
# Set up megapgs on a fresh Debian/Ubuntu machine with Python 3.11: Fashion-MNIST (Debian's
# dataset-fashion-mnist, the embedded default's data), a virtualenv in .venv and the pinned
# requirements. Safe to re-run: what is there is kept.
#   bash tools/setup.sh          # to train
#   bash tools/setup.sh --dev    # to run the tests as well
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "setup: installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
  if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist; } >/dev/null; then
    echo "setup: could not apt-get dataset-fashion-mnist; megapgs will try torchvision's downloader" >&2
  fi
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
requirements=requirements.txt
[ "${1:-}" = "--dev" ] && requirements=requirements-dev.txt
echo "setup: pip install -r $requirements (torch, DeepSpeed, DALI, open_clip, ...)"
.venv/bin/python -m pip install -q --disable-pip-version-check -r "$requirements"
echo "setup: done"
