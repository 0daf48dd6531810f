#!/usr/bin/env bash
# Installs what the test suite needs from outside pip: PostgreSQL's server binaries and headless
# Chromium (Debian packages), and the Azurite blob-storage emulator (npm package, pinned) into
# .ci/node. Idempotent: a second run with everything present returns at once, without touching
# apt. The GCS emulator (gcp-storage-emulator) and the other test-only Python packages come from
# pip with the project's `test` extra.
#
#   bash .ci/install-services.sh          # then: tests/emulators.py finds .ci/node/node_modules/.bin/azurite-blob
#
# Override the location with TICKETSMITH_NODE_PREFIX (tests read the same variable).
set -euo pipefail

sudo=""
if [[ "$(id -u)" != "0" ]]; then
  sudo="sudo"
fi
# apt_install PACKAGE...: Debian packages, with one `apt-get update` per run (install-chromium.sh
# skips its own when TICKETSMITH_APT_UPDATED=1).
apt_install() {
  if [[ "${TICKETSMITH_APT_UPDATED:-0}" != 1 ]]; then
    $sudo apt-get update -qq
    export TICKETSMITH_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# PostgreSQL server binaries (initdb, postgres) for the shared-setup tests: `mlflow server` on a
# PostgreSQL backend store, an Optuna study on PostgreSQL, a database restart during a run
# (tests/postgres.py starts a throwaway server; in CI a missing one fails those tests).
# Debian puts them in /usr/lib/postgresql/<major>/bin, outside PATH.
postgres_binaries() {
  command -v initdb >/dev/null 2>&1 && return 0
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}
if postgres_binaries; then
  echo "postgresql server binaries already installed"
elif command -v apt-get >/dev/null 2>&1; then
  apt_install postgresql
  postgres_binaries || { echo "error: postgresql installed but no initdb found" >&2; exit 1; }
  echo "installed postgresql: $(compgen -G '/usr/lib/postgresql/*/bin/initdb' | head -n 1)"
else
  echo "error: no PostgreSQL server binaries and no apt-get to install them" >&2
  exit 1
fi

# Headless Chromium for the HTML report test and the MLflow UI test (tests/tracking/test_ui.py, driven
# by the `playwright` package from the `test` extra: never a downloaded browser). Debian
# package; returns at once if present.
bash "$(dirname "${BASH_SOURCE[0]}")/install-chromium.sh"

# 3.35.0 is the newest release whose engines accept Node 20 (the Node these machines ship);
# 3.36+ require Node >= 21.
AZURITE_VERSION="3.35.0"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prefix="${TICKETSMITH_NODE_PREFIX:-$here/node}"
pkg="$prefix/node_modules/azurite/package.json"

installed_version() {
  [[ -f "$pkg" ]] && node -p "require('$pkg').version" 2>/dev/null || true
}

if [[ "$(installed_version)" == "$AZURITE_VERSION" && -x "$prefix/node_modules/.bin/azurite-blob" ]]; then
  echo "azurite $AZURITE_VERSION already installed in $prefix"
  exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
  echo "npm not found: installing Node.js from Debian packages" >&2
  if command -v apt-get >/dev/null 2>&1; then
    apt_install nodejs npm
  else
    echo "error: npm is required to install azurite (Azure Blob emulator)" >&2
    exit 1
  fi
fi

mkdir -p "$prefix"
# --no-fund/--no-audit: no extra registry round trips; --ignore-scripts: azurite needs no
# install scripts (only a protobufjs postinstall hint), and skipping them keeps the install fast.
npm install --prefix "$prefix" --no-fund --no-audit --no-save --ignore-scripts \
  "azurite@$AZURITE_VERSION" >/dev/null
echo "installed azurite $(installed_version) in $prefix"
