#!/usr/bin/env bash
# CI stage: the Slicer module in a real, headless Slicer scene (slicer-core). Slicer's Python is a virtual environment
# of its own, made from tests/slicer_scene/requirements.txt; the model runs in the caller's interpreter
# (CAUSALCLIPSEG_PYTHON, by default the `python` on PATH, e.g. the activated CI environment that has causalclipseg).
#   bash tests/slicer_scene/run.sh [pytest arguments]
# The environment (about 1 GB: VTK and Slicer's libraries) is kept for the next run in
# ~/.cache/causalclipseg/slicer-scene-<hash of the requirements and python3's version>, made again when the
# requirements change (older ones are removed); SLICER_SCENE_VENV=DIR uses DIR instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS
model_python="$(command -v "${CAUSALCLIPSEG_PYTHON:-python}")"
# asked from / so that this checkout (the working directory) does not count as an installed package
(cd / && "$model_python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('causalclipseg') is None)") || {
    echo "slicer scene: $model_python has no causalclipseg; set CAUSALCLIPSEG_PYTHON to the project's Python" >&2
    exit 2
}
requirements=tests/slicer_scene/requirements.txt
if [ -n "${SLICER_SCENE_VENV:-}" ]; then
    venv="$SLICER_SCENE_VENV"
else
    key="$( (cat "$requirements"; python3 --version) | sha256sum | cut -c1-12)"
    cache="${XDG_CACHE_HOME:-$HOME/.cache}/causalclipseg"
    venv="$cache/slicer-scene-$key"
    for old in "$cache"/slicer-scene-*; do
        [ -e "$old" ] && [ "$old" != "$venv" ] && rm -rf "$old"
    done
fi
if [ ! -e "$venv/.complete" ]; then  # none yet, or an install that did not finish
    rm -rf "$venv"
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile -r "$requirements"
touch "$venv/.complete"
echo "slicer scene: environment $venv ready in $((SECONDS - start)) s ($("$venv/bin/python" -c \
    'import importlib.metadata as m; print("slicer-core", m.version("slicer-core"))'))"
run_start=$SECONDS
# pytest's own script, not `python -m pytest`, which would put this checkout on sys.path: Slicer's Python does not
# see the causalclipseg folder here, only what is installed for it.
CAUSALCLIPSEG_PYTHON="$model_python" "$venv/bin/pytest" -q -p no:cacheprovider tests/slicer_scene "$@"
echo "slicer scene: tests ran in $((SECONDS - run_start)) s; the stage took $((SECONDS - start)) s"
