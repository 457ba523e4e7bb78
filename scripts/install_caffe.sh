#!/usr/bin/env bash
# Build pycaffe (Caffe's Python bindings) from source and make `import caffe`
# work in the current Python environment.
#
#   bash scripts/install_caffe.sh [--cuda] [--no-apt] [--jobs N] [--rebuild]
#   PYTHON=.venv/bin/python bash scripts/install_caffe.sh
#
# Run with -h for the details. The build is cached under
# ${STYLE_TRANSFER_CACHE:-~/.cache/style-transfer}/caffe-<version>[-cuda]; a second
# run only re-checks the packages and the import, which takes a few seconds.
set -euo pipefail

readonly CAFFE_DIST=brocolli-caffe
readonly CAFFE_VERSION=9.0.2
readonly CAFFE_SDIST_SHA256=c6410cc60bdd6db685d441b66be7df05410f8850ac88d6b75d48ef9b2315c08a
# Bump when the patches (scripts/caffe_patches.py) or the build flags below
# change: cached builds made by an older recipe are then rebuilt.
readonly BUILD_RECIPE=1
# The Python protobuf runtime that matches the protoc of Debian 12 (3.21.x),
# which generates caffe_pb2.py.
readonly PY_PROTOBUF_VERSION=4.21.12
# What pycaffe's python modules import (caffe/__init__ -> pycaffe, io,
# net_spec): numpy, scipy.ndimage, skimage.io, six, google.protobuf.
readonly PY_PACKAGES=(numpy scipy scikit-image six "protobuf==${PY_PROTOBUF_VERSION}")
readonly APT_PACKAGES=(
  build-essential cmake
  libboost-python-dev libboost-thread-dev libboost-system-dev
  libboost-filesystem-dev libboost-regex-dev
  libprotobuf-dev protobuf-compiler
  libgoogle-glog-dev libgflags-dev libhdf5-dev libopenblas-dev
)

usage() {
  cat <<EOF
Usage: [PYTHON=/path/to/python] bash scripts/install_caffe.sh [options]

Builds pycaffe ${CAFFE_VERSION} (sdist ${CAFFE_DIST}==${CAFFE_VERSION} from PyPI, a
fork of BVLC Caffe) with CMake and makes \`import caffe\` work for the target
interpreter by writing caffe_style_transfer.pth into its site-packages.

The target interpreter is \$PYTHON, or \`python3\` on PATH (e.g. an activated
virtualenv). Its major.minor version must match Debian's libboost-python
(3.11 on Debian 12).

Options:
  --cuda       build with CUDA (no cuDNN) into a separate cache folder; needs
               the CUDA toolkit (nvcc). GPU architectures: \$CAFFE_CUDA_ARCH_BIN
               and \$CAFFE_CUDA_ARCH_PTX (space-separated, e.g. "75 86"; the
               defaults depend on the nvcc version; PTX may be set empty;
               a cached build is kept when they change: add --rebuild).
  --no-apt     do not install Debian packages (they must already be there)
  --jobs N     parallel build jobs (default: nproc = $(nproc 2>/dev/null || echo 1))
  --rebuild    discard the cached build and build again from the sdist
  -h, --help   show this help

Environment:
  PYTHON                target interpreter (default: python3)
  STYLE_TRANSFER_CACHE  cache root (default: \$HOME/.cache/style-transfer);
                        the build goes to <root>/caffe-${CAFFE_VERSION}[-cuda]
  CAFFE_CMAKE_ARGS      extra CMake arguments, split on spaces
                        (e.g. -DCUDA_HOST_COMPILER=/usr/bin/g++-11)
EOF
}

log() { printf '[install_caffe] %s\n' "$*"; }
die() { printf '[install_caffe] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- arguments
CUDA=0
APT=1
REBUILD=0
JOBS="$(nproc 2>/dev/null || echo 1)"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cuda) CUDA=1 ;;
    --no-apt) APT=0 ;;
    --rebuild) REBUILD=1 ;;
    --jobs)
      [[ $# -ge 2 ]] || die "--jobs needs a number"
      JOBS="$2"
      shift
      ;;
    --jobs=*) JOBS="${1#--jobs=}" ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || die "--jobs must be a positive integer, got '$JOBS'"

# ------------------------------------------------------ target interpreter
PYTHON="${PYTHON:-python3}"
if [[ "$PYTHON" == */* ]]; then
  [[ -x "$PYTHON" ]] || die "PYTHON=$PYTHON is not an executable file"
  # Absolute path without resolving the symlink (a venv's python is one).
  PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"
else
  PYTHON="$(command -v "$PYTHON")" || die "'$PYTHON' is not on PATH (set PYTHON=/path/to/python)"
fi
# Version, cache tag, include dir, site-packages (purelib): one per line.
PY_INFO="$("$PYTHON" -c 'import sys, sysconfig
p = sysconfig.get_paths()
print("%d.%d" % sys.version_info[:2], sys.implementation.cache_tag, p["include"], p["purelib"], sep="\n")')" ||
  die "cannot run $PYTHON"
mapfile -t PY_INFO_LINES <<<"$PY_INFO"
[[ ${#PY_INFO_LINES[@]} -eq 4 ]] || die "unexpected answer from $PYTHON: $PY_INFO"
PY_VERSION="${PY_INFO_LINES[0]}"
PY_TAG="${PY_INFO_LINES[1]}"
PY_INCLUDE="${PY_INFO_LINES[2]}"
PY_SITE="${PY_INFO_LINES[3]}"
PY_BOOST_SUFFIX="${PY_VERSION//./}" # 3.11 -> 311: links libboost_python311

VARIANT=cpu
SUFFIX=""
if [[ $CUDA -eq 1 ]]; then
  VARIANT=cuda
  SUFFIX="-cuda"
fi
CACHE_ROOT="${STYLE_TRANSFER_CACHE:-${HOME:?HOME is not set; set STYLE_TRANSFER_CACHE}/.cache/style-transfer}"
WORK="$CACHE_ROOT/caffe-${CAFFE_VERSION}${SUFFIX}"
SRC="$WORK/src"     # the extracted and patched sdist
BUILD="$WORK/build" # the CMake build tree
PYDIR="$WORK/python" # holds only the caffe package; the .pth points here
LOG="$WORK/build.log"
STAMP="$WORK/.installed"
STAMP_VALUE="${CAFFE_DIST}==${CAFFE_VERSION} recipe=${BUILD_RECIPE} variant=${VARIANT} python=${PY_TAG}"
PTH="$PY_SITE/caffe_style_transfer.pth"
PATCHES_PY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/caffe_patches.py"
SDIST="$CACHE_ROOT/downloads/${CAFFE_DIST}-${CAFFE_VERSION}.tar.gz"

log "python:  $PYTHON ($PY_VERSION)"
log "variant: $VARIANT, cache: $WORK"
mkdir -p "$WORK" "$CACHE_ROOT/downloads"

# Two runs at once (e.g. two CI jobs) would build into the same folder.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$WORK.lock"
  flock 9
fi

SUDO=()
if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo)
fi

# ----------------------------------------------------------- Debian packages
apt_step() {
  if ! command -v dpkg-query >/dev/null 2>&1; then
    log "no dpkg: not a Debian system, assuming the build dependencies are installed"
    return
  fi
  local p missing=()
  for p in "${APT_PACKAGES[@]}"; do
    if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]]; then
      missing+=("$p")
    fi
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    log "Debian packages: all ${#APT_PACKAGES[@]} present"
    return
  fi
  if [[ $APT -eq 0 ]]; then
    log "WARNING: --no-apt, but these Debian packages are missing: ${missing[*]}"
    return
  fi
  if [[ $(id -u) -ne 0 && ${#SUDO[@]} -eq 0 ]]; then
    die "need root (or sudo) to install: ${missing[*]}; or run with --no-apt"
  fi
  log "Debian packages: installing ${missing[*]}"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

# ----------------------------------------------------------- Python packages
py_deps_ok() {
  "$PYTHON" - "$PY_PROTOBUF_VERSION" <<'PY' >/dev/null 2>&1
import sys
import numpy, scipy.ndimage, skimage.io, six  # noqa: F401
import google.protobuf
sys.exit(google.protobuf.__version__ != sys.argv[1])
PY
}

py_step() {
  if py_deps_ok; then
    log "Python packages: present (numpy, scipy, scikit-image, six, protobuf==$PY_PROTOBUF_VERSION)"
    return
  fi
  "$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip"
  # Keep the numpy the environment already has (pip could otherwise upgrade
  # it while resolving scikit-image).
  local constraints numpy_version
  constraints="$(mktemp)"
  numpy_version="$("$PYTHON" -c 'import numpy; print(numpy.__version__)' 2>/dev/null || true)"
  if [[ -n "$numpy_version" ]]; then
    echo "numpy==$numpy_version" >"$constraints"
  fi
  log "Python packages: pip install ${PY_PACKAGES[*]}"
  if ! "$PYTHON" -m pip install --disable-pip-version-check -c "$constraints" "${PY_PACKAGES[@]}"; then
    rm -f "$constraints"
    die "pip install failed"
  fi
  rm -f "$constraints"
  py_deps_ok || die "the Python packages still do not import after pip install"
}

# ---------------------------------------------------------------- the check
# Imports the built package with the target interpreter, from a neutral folder.
import_check() {
  [[ -f "$PYDIR/caffe/_caffe.so" ]] || return 1
  (
    cd / && PYTHONPATH="$PYDIR${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - "$PYDIR" <<'PY'
import os, sys
import caffe
caffe.set_mode_cpu()
want = os.path.realpath(os.path.join(sys.argv[1], "caffe"))
got = os.path.realpath(os.path.dirname(caffe.__file__))
sys.exit(0 if got == want else "caffe imported from %s, not %s" % (got, want))
PY
  )
}

# ------------------------------------------------------------------ sources
fetch_sdist() {
  if [[ -f "$SDIST" ]] && ! echo "$CAFFE_SDIST_SHA256  $SDIST" | sha256sum -c --status; then
    log "cached sdist has the wrong checksum, downloading it again"
    rm -f "$SDIST"
  fi
  if [[ ! -f "$SDIST" ]]; then
    log "downloading ${CAFFE_DIST}==${CAFFE_VERSION} (sdist) from PyPI"
    "$PYTHON" -m pip download --disable-pip-version-check --no-deps \
      --no-binary :all: "${CAFFE_DIST}==${CAFFE_VERSION}" -d "$(dirname "$SDIST")"
  fi
  echo "$CAFFE_SDIST_SHA256  $SDIST" | sha256sum -c --status ||
    die "checksum mismatch for $SDIST (expected sha256 $CAFFE_SDIST_SHA256)"
}

extract_sdist() {
  [[ -f "$SRC/CMakeLists.txt" ]] && return
  log "extracting $SDIST"
  rm -rf "$SRC" "$SRC.tmp"
  mkdir -p "$SRC.tmp"
  tar -xzf "$SDIST" -C "$SRC.tmp" --strip-components=1
  mv "$SRC.tmp" "$SRC"
}

# Build fixes: scripts/caffe_patches.py (named patches; a re-run is a no-op, a patch that finds nothing to patch
# fails the run).
patch_sources() {
  "$PYTHON" "$PATCHES_PY" "$SRC"
}

# ------------------------------------------------------------------ building
cuda_cmake_args() {
  local nvcc
  nvcc="$(command -v nvcc || true)"
  if [[ -z "$nvcc" && -x /usr/local/cuda/bin/nvcc ]]; then
    nvcc=/usr/local/cuda/bin/nvcc
  fi
  [[ -n "$nvcc" ]] || die "--cuda: nvcc not found (install the CUDA toolkit or put it on PATH)"
  local release major minor bin ptx
  release="$("$nvcc" --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')"
  major="${release%%.*}"
  minor="${release#*.}"
  [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] || die "cannot read the CUDA version from $nvcc --version"
  # Caffe's default (Auto) needs a GPU at build time and its "All" list
  # (sm_20..sm_61) is rejected by current nvcc: pick a list this nvcc supports.
  if ((major >= 13)); then
    bin="75 80 86 90" ptx=86
  elif ((major == 12 || (major == 11 && minor >= 1))); then
    bin="60 70 75 80 86" ptx=86
  elif ((major == 11)); then
    bin="60 70 75 80" ptx=80
  else
    bin="50 60 70 75" ptx=75
  fi
  bin="${CAFFE_CUDA_ARCH_BIN:-$bin}"
  ptx="${CAFFE_CUDA_ARCH_PTX-$ptx}" # set but empty: no PTX
  log "CUDA $release ($nvcc): sm $bin, PTX ${ptx:-none}, no cuDNN" >&2
  printf '%s\n' -DCPU_ONLY=OFF -DUSE_CUDNN=OFF -DUSE_NCCL=OFF \
    "-DCUDA_TOOLKIT_ROOT_DIR=$(dirname "$(dirname "$(readlink -f "$nvcc")")")" \
    -DCUDA_ARCH_NAME=Manual "-DCUDA_ARCH_BIN=$bin" "-DCUDA_ARCH_PTX=$ptx"
}

show_tail() {
  printf '[install_caffe] ---- last lines of %s ----\n' "$LOG" >&2
  tail -n 60 "$LOG" >&2 || true
  printf '[install_caffe] ---- end of log ----\n' >&2
}

# Prints the make progress every 10%.
show_progress() {
  local line pct step last=-1
  while IFS= read -r line; do
    if [[ "$line" =~ ^\[\ *([0-9]+)%\] ]]; then
      pct="${BASH_REMATCH[1]}"
      step=$((pct / 10))
      if ((step > last)); then
        last=$step
        log "  ${pct}% (${SECONDS}s)"
      fi
    fi
  done
}

build() {
  local cmake_args=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_python=ON -Dpython_version=3
    -DUSE_OPENCV=OFF -DUSE_LEVELDB=OFF -DUSE_LMDB=OFF
    "-DPython3_EXECUTABLE=$PYTHON"
  )
  if [[ $CUDA -eq 1 ]]; then
    local cuda_args arg
    cuda_args="$(cuda_cmake_args)" # exits here if nvcc is missing
    while IFS= read -r arg; do cmake_args+=("$arg"); done <<<"$cuda_args"
  else
    cmake_args+=(-DCPU_ONLY=ON)
  fi
  if [[ -n "${CAFFE_CMAKE_ARGS:-}" ]]; then
    local extra
    read -r -a extra <<<"$CAFFE_CMAKE_ARGS"
    cmake_args+=("${extra[@]}")
  fi

  # A build tree configured for another interpreter or other options is
  # dropped; otherwise an interrupted build resumes where it stopped.
  local config="${STAMP_VALUE} ${cmake_args[*]}"
  if [[ -d "$BUILD" && "$(cat "$BUILD/.config" 2>/dev/null || true)" != "$config" ]]; then
    log "build tree was configured differently: starting it afresh"
    rm -rf "$BUILD"
  fi
  mkdir -p "$BUILD"
  echo "$config" >"$BUILD/.config"

  log "building pycaffe with $JOBS job(s); log: $LOG"
  local start=$SECONDS
  echo "=== $(date -u '+%Y-%m-%d %H:%M:%S') cmake ${cmake_args[*]}" >"$LOG"
  if ! cmake -S "$SRC" -B "$BUILD" "${cmake_args[@]}" >>"$LOG" 2>&1; then
    show_tail
    die "cmake configure failed (full log: $LOG)"
  fi
  echo "=== $(date -u '+%Y-%m-%d %H:%M:%S') build" >>"$LOG"
  if ! cmake --build "$BUILD" --target pycaffe -j "$JOBS" 2>&1 | tee -a "$LOG" | show_progress; then
    show_tail
    die "build failed (full log: $LOG)"
  fi
  log "built in $((SECONDS - start))s"

  # Lay out $PYDIR/caffe: pycaffe's python modules, the freshly generated
  # caffe_pb2.py and _caffe.so (a copy, not the build tree's symlink).
  local new="$WORK/python.new"
  rm -rf "$new" "$WORK/python.old"
  mkdir -p "$new"
  cp -a "$SRC/python/caffe" "$new/caffe"
  rm -rf "$new/caffe/test" "$new/caffe/_caffe.cpp" "$new/caffe/_caffe.so"
  find "$new" -name __pycache__ -type d -prune -exec rm -rf {} +
  cp "$BUILD/lib/_caffe.so" "$new/caffe/_caffe.so"
  cp "$BUILD/include/caffe/proto/caffe_pb2.py" "$new/caffe/proto/caffe_pb2.py"
  if [[ -d "$PYDIR" ]]; then mv "$PYDIR" "$WORK/python.old"; fi
  mv "$new" "$PYDIR"
  rm -rf "$WORK/python.old"
}

# -------------------------------------------------------------- verification
verify() {
  local tmp
  tmp="$(mktemp -d)"
  # Through the .pth only (no PYTHONPATH of ours), from a neutral folder;
  # glog's INFO lines about the net are not wanted here.
  if ! (cd "$tmp" && GLOG_minloglevel=1 "$PYTHON" - "$PYDIR" "$tmp" <<'PY'
import os, sys
import numpy as np
import caffe
caffe.set_mode_cpu()
print(caffe.__file__)
want = os.path.realpath(os.path.join(sys.argv[1], "caffe"))
got = os.path.realpath(os.path.dirname(caffe.__file__))
if got != want:
    sys.exit("caffe was imported from %s, not from %s" % (got, want))

path = os.path.join(sys.argv[2], "check.prototxt")
with open(path, "w") as f:
    f.write("""name: "install_check"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 2 kernel_size: 3
                            weight_filler { type: "gaussian" std: 0.1 }
                            bias_filler { type: "constant" value: 0.5 } } }
""")
net = caffe.Net(path, caffe.TEST)
x = np.random.RandomState(0).rand(1, 3, 8, 8).astype(np.float32)
net.blobs["data"].data[...] = x
out = net.forward()["conv"]
w, b = net.params["conv"][0].data, net.params["conv"][1].data
ref = np.array([[[(x[0, :, i:i + 3, j:j + 3] * w[o]).sum() + b[o]
                  for j in range(6)] for i in range(6)] for o in range(2)])
if out.shape != (1, 2, 6, 6) or not np.allclose(out[0], ref, atol=1e-4):
    sys.exit("Convolution output does not match numpy: %r" % (out,))
print("OK: caffe %s, Net(Input 1x3x8x8 + Convolution) forward %s matches numpy"
      % (caffe.__version__, tuple(out.shape)))
PY
  ); then
    rm -rf "$tmp"
    return 1
  fi
  rm -rf "$tmp"
}

# ---------------------------------------------------------------------- main
apt_step
[[ -f "$PY_INCLUDE/Python.h" ]] ||
  die "no Python.h in $PY_INCLUDE: install the headers of $PYTHON (python3-dev for Debian's python3)"
LDCONFIG="$(command -v ldconfig || echo /sbin/ldconfig)"
if [[ -x "$LDCONFIG" && "$("$LDCONFIG" -p)" != *"libboost_python${PY_BOOST_SUFFIX}.so"* ]]; then
  die "no libboost_python${PY_BOOST_SUFFIX} on this system: Python $PY_VERSION does not match the system's Boost.Python (Debian 12 has 3.11)"
fi
py_step

if [[ $REBUILD -eq 1 ]]; then
  log "--rebuild: discarding $SRC, $BUILD and $PYDIR"
  rm -rf "$SRC" "$BUILD" "$PYDIR" "$STAMP"
fi

if [[ "$(cat "$STAMP" 2>/dev/null || true)" == "$STAMP_VALUE" ]] && import_check; then
  log "cached build is good: skipping the build"
else
  if [[ -f "$STAMP" ]]; then
    # It worked once and no longer does, or was made by another recipe or
    # for another python: build again from scratch.
    log "cached build ($(cat "$STAMP")) is out of date or fails its check: rebuilding from scratch"
    rm -rf "$SRC" "$BUILD" "$PYDIR" "$STAMP"
  fi
  [[ -f "$PATCHES_PY" ]] || die "$PATCHES_PY is missing (it comes with this script)"
  fetch_sdist
  extract_sdist
  log "patching $SRC"
  patch_sources || die "patching $SRC failed"
  build
  import_check || die "the new build does not import; see $LOG"
  echo "$STAMP_VALUE" >"$STAMP"
fi

# Make `import caffe` work in the environment.
if [[ "$(cat "$PTH" 2>/dev/null || true)" != "$PYDIR" ]]; then
  echo "$PYDIR" >"$PTH" || die "cannot write $PTH"
  log "wrote $PTH -> $PYDIR"
else
  log "$PTH already points at $PYDIR"
fi

log "verifying with $PYTHON"
verify || die "verification failed"
log "done: pycaffe ${CAFFE_VERSION} ($VARIANT) is importable as 'caffe' by $PYTHON (${SECONDS}s)"
