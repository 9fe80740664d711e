#!/usr/bin/env bash
# Installs everything speechclip needs on a fresh Debian machine: system packages (espeak-ng for the
# offline corpus's speech, librsvg2-bin + openclipart-svg for its clip-art images) and a virtual
# environment in .venv (wamerican: an English word list that filters clip-art titles) with the CPU torch wheel pinned, so no multi-GB CUDA build is pulled.
# chromium: the browser the page's tests drive headless through Playwright (no browser download).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(espeak-ng librsvg2-bin openclipart-svg wamerican chromium)
missing=()
for package in "${APT_PACKAGES[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
echo "[setup] installing python packages into .venv"
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[all]"
.venv/bin/pip install -q --no-deps open-clip-torch==3.3.0  # OpenAI's BPE merges for `speechclip convert`; --no-deps keeps the CPU torch
echo "[setup] done"
