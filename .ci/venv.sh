#!/usr/bin/env bash
# Ensure the project's virtual environment exists and print its path on stdout.
#
# The venv lives outside the clone, in a cache folder keyed by a hash of pyproject.toml and this
# script, so CI and developers reuse it across fresh clones; a missing or half-built one is
# rebuilt from scratch. The project itself is installed editable and re-pointed at the current
# clone whenever the clone moves (cheap: no dependency resolution).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${YOLOQ_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/yoloq}"
key="$(cat "$root/pyproject.toml" "$root/.ci/venv.sh" | sha256sum | cut -c1-16)"
venv="$cache/venv-$key"
py="${PYTHON:-python3}"
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9  # one builder at a time; the others wait and then reuse what it built

if [ ! -f "$venv/.complete" ]; then
    echo "[venv] building $venv (first run only; torch comes from this machine's disk)" >&2
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip "setuptools>=77" wheel >&2
    # ultralytics needs torchvision, and PyPI's torchvision imports only beside these torch builds.
    case "$(uname -m)" in
        x86_64) "$venv/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1" >&2 ;;
        aarch64) "$venv/bin/pip" install -q "torch==2.9.1" "torchvision==0.24.1" >&2 ;;
    esac
    # Dependencies only: the project is installed editable below, per clone.
    "$venv/bin/python" - "$root/pyproject.toml" > "$cache/requirements-$key.txt" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["test"]))
PY
    "$venv/bin/pip" install -q -r "$cache/requirements-$key.txt" >&2
    touch "$venv/.complete"
fi

if [ "$(cat "$venv/.clone" 2>/dev/null)" != "$root" ]; then
    "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$root" >&2
    echo "$root" > "$venv/.clone"
fi
echo "$venv"
