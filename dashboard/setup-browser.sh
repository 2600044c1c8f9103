#!/usr/bin/env bash
# Debian's Chromium for the dashboard's browser test (tests/test_dashboard.py), driven by Playwright for Python
# (a dev dependency) with executable_path=/usr/bin/chromium. Needs root; idempotent.
set -euo pipefail
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
fi
/usr/bin/chromium --version
