#!/usr/bin/env bash
# Installs what the tests, the stack checks and the benchmarks need beyond the Rust
# toolchain: Debian packages (the real Prometheus and promtool, the real Alertmanager and
# amtool, Redis for the replica tests, nginx and wrk for the benchmark) and two Python
# packages, and Chromium, which tests/status_page.rs drives headless. Installs only what is
# missing; needs root for apt.
set -euo pipefail

DEBIAN_PACKAGES=(prometheus prometheus-alertmanager nginx wrk curl redis-server chromium)
PYTHON_PACKAGES=(pyyaml jsonschema)

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    echo "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # No init system here: keep the packages' services from being started.
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
fi

py_missing=()
python3 -c "import yaml" 2>/dev/null || py_missing+=(pyyaml)
python3 -c "import jsonschema" 2>/dev/null || py_missing+=(jsonschema)
if [ "${#py_missing[@]}" -gt 0 ]; then
    echo "installing Python packages: ${py_missing[*]}"
    python3 -m pip install -q "${py_missing[@]}"
fi
: "${PYTHON_PACKAGES[@]}"
