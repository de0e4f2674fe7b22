#!/usr/bin/env bash
# Idempotent setup used by the README's commands: a virtualenv at .venv with ubt-ray (and its test extra)
# installed editable, and the Debian package dataset-fashion-mnist when its files are missing.
# Fast the second time: pip runs only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.ubt-install-stamp
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "bootstrap: installing ubt-ray and its pinned dependencies into .venv (several minutes the first time)" >&2
    if ! .venv/bin/python -m pip install -q -e ".[dev]" > .venv/install.log 2>&1; then
        grep -v "^WARNING: Location" .venv/install.log | tail -30 >&2
        echo "bootstrap: pip install failed; the full log is .venv/install.log" >&2
        exit 1
    fi
    echo "$want" > "$stamp"
fi

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ] && command -v apt-get > /dev/null; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "bootstrap: installing the Debian package dataset-fashion-mnist" >&2
    $SUDO apt-get update -qq > /dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist > /dev/null
fi
