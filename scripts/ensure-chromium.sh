#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for the browser tests, once.
# Never fails the build: without root or apt the Chromium tests skip instead.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-chromium: chromium unavailable (needs root and apt-get); browser tests will skip"
  exit 0
fi

if apt-get update -qq \
  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
    >/dev/null; then
  exit 0
fi
echo "ensure-chromium: chromium unavailable (apt-get failed); browser tests will skip"
exit 0
