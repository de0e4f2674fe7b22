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
# What pip is configured with here (its environment first, then its config files): one setting's value, read
# from `pip config list`, which uv_install runs once.
pip_setting() {
    sed -n "s/^[^.]*\.$1='\(.*\)'\$/\1/p" <<< "$pip_config" | head -1
}

# uv installs the same packages as pip, from the same indexes, in about a third of the time here (torch pulls
# in some fifteen CUDA wheels). It reads pip's settings from here, and takes the best version over all
# indexes as pip does. Bytecode is compiled up front, as pip does: imports in every Ray worker need it.
uv_install() {
    .venv/bin/python -m pip install -q uv || return 1
    local pip_config
    pip_config=$(.venv/bin/python -m pip config list 2>/dev/null)
    local args=(--python .venv/bin/python --index-strategy unsafe-best-match --compile-bytecode -q) v
    v=$(pip_setting index-url); [ -z "$v" ] || args+=(--default-index "$v")
    for v in $(pip_setting extra-index-url); do args+=(--index "$v"); done
    for v in $(pip_setting find-links); do args+=(--find-links "$v"); done
    for v in $(pip_setting constraint); do args+=(--constraint "$v"); done
    v=$(pip_setting cert); [ -z "$v" ] || export SSL_CERT_FILE="$v"
    .venv/bin/uv pip install "${args[@]}" -e ".[dev]"
}

if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "bootstrap: installing ubt-ray and its pinned dependencies into .venv (a few minutes the first time)" >&2
    if ! uv_install > .venv/install.log 2>&1; then
        echo "bootstrap: uv could not install (see .venv/install.log); installing with pip instead" >&2
        if ! .venv/bin/python -m pip install -q -e ".[dev]" >> .venv/install.log 2>&1; then
            grep -v "^WARNING: Location" .venv/install.log | tail -30 >&2
            echo "bootstrap: pip install failed; the full log is .venv/install.log" >&2
            exit 1
        fi
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
