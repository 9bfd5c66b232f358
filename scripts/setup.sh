#!/usr/bin/env bash
# Set up robustdissect on a fresh Debian machine: system packages, a virtual environment in .venv,
# the CPU build of torch first (pinned by constraints.txt for every later pip call), then the package.
#   bash scripts/setup.sh          # runtime only
#   bash scripts/setup.sh --dev    # plus test/lint tools and the browser used by the report test
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1

apt_packages=(dataset-fashion-mnist)
[ "$dev" = 1 ] && apt_packages+=(chromium)

missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: please run as root: apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q -c constraints.txt)
.venv/bin/python -c "import torch" 2>/dev/null || { echo "setup: installing torch==2.13.0 (CPU)"; "${pip[@]}" torch==2.13.0; }
if [ "$dev" = 1 ]; then
  "${pip[@]}" -e ".[dev]"
else
  "${pip[@]}" -e .
fi
echo "setup: done (.venv/bin/robustdissect)"
