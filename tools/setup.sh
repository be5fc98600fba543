#!/usr/bin/env bash
# Installs every system package kvtier needs on Debian 12. Idempotent: when all
# packages are present it only queries dpkg and python3, and exits.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config
  libtbb-dev libhwloc-dev liburing-dev libabsl-dev libxxhash-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  fio
)
# The Python module (tools/run-tests) needs python3 with venv and its C
# headers; Debian's python3 gets them from these packages, an interpreter of
# its own (pyenv, here) usually has them already.
if ! python3 -c 'import ensurepip, os, sys, sysconfig, venv
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
  PACKAGES+=(python3 python3-dev python3-venv python3-pip)
fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ -x /usr/local/cuda/bin/nvcc ]]; then
  echo "setup: CUDA found at /usr/local/cuda ($(/usr/local/cuda/bin/nvcc --version | tail -n 2 | head -n 1))"
else
  echo "setup: no CUDA toolkit at /usr/local/cuda; building the CPU backend only"
fi
