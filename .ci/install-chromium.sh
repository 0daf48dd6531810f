#!/usr/bin/env bash
# Installs a headless browser for tests/report/test_report.py, which opens the self-contained HTML
# executive report in real Chromium. Idempotent: returns at once when a Chromium or Chrome
# binary is already on PATH. Debian/Ubuntu package `chromium` (bookworm: 156.x); needs root
# or sudo. Without any browser the HTML test is skipped with a message saying so.
#
#   bash .ci/install-chromium.sh
set -euo pipefail

for name in chromium chromium-browser google-chrome google-chrome-stable; do
  if command -v "$name" >/dev/null 2>&1; then
    echo "$name already installed: $("$name" --version 2>/dev/null || echo 'version unknown')"
    exit 0
  fi
done

if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: no Chromium found and no apt-get to install it; install chromium by hand" >&2
  exit 1
fi
sudo=""
if [[ "$(id -u)" != "0" ]]; then
  sudo="sudo"
fi
if [[ "${TICKETSMITH_APT_UPDATED:-0}" != 1 ]]; then  # install-services.sh may have just run it
  $sudo apt-get update -qq
fi
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
echo "installed: $(chromium --version)"
