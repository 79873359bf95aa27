#!/usr/bin/env bash
# Set up (or reuse) .venv and run the whole suite: ruff first so style problems fail fast, then pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
# The web page is tested in headless Chromium: install Debian's chromium and chromedriver when missing.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing chromium and chromium-driver (Debian) for the browser test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "[test] chromium/chromedriver missing and cannot be installed here: the browser test will be skipped"
  fi
fi
# The AIGC labels are read back by a third-party reader: install Debian's exiftool when missing.
if ! command -v exiftool >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing libimage-exiftool-perl (Debian) for the AIGC label tests"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libimage-exiftool-perl >/dev/null
  else
    echo "[test] exiftool missing and cannot be installed here: the AIGC label tests that need it will be skipped"
  fi
fi
echo "[test] ruff check"
ruff check .
echo "[test] pytest"
python -m pytest "$@"
