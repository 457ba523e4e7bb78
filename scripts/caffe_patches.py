#!/usr/bin/env python3
"""Build fixes for the Caffe sources (the brocolli-caffe sdist) that scripts/install_caffe.sh builds.

    python scripts/caffe_patches.py SRC_DIR

Each patch is named and reports whether it was applied now or had been applied before, so a second run over the
same tree changes nothing. A patch that finds neither the text it rewrites nor its own result (upstream changed?)
is a miss: every patch is still tried, then the run exits with status 1 naming the misses.

install_caffe.sh keys its cached build on BUILD_RECIPE, not on this file: bump it there when a patch changes.
Standard library only; it runs under the interpreter pycaffe is built for.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# Marks the patched places, so that a re-run sees the patch is there.
MARK = "style-transfer patch"

APPLIED = "applied"
ALREADY = "already applied"
MISSED = "MISSED"


class PatchMiss(Exception):
    """The sources do not hold the text a patch expects."""


@dataclass(frozen=True)
class Patch:
    name: str
    # Takes the source root and returns the files it changed (relative paths), none when the patch was already
    # there. Raises PatchMiss when it finds neither the text it rewrites nor its own result.
    apply: Callable[[Path], list[str]]


@dataclass(frozen=True)
class Result:
    name: str
    status: str  # APPLIED, ALREADY or MISSED
    changed: tuple[str, ...] = ()
    reason: str = ""


def _has_mark(text: str) -> bool:
    return MARK in text


def _sub1(pattern: str, replacement: str, text: str, flags: int = re.M) -> str:
    """`text` with the one match of `pattern` replaced by `replacement` taken literally (no group references)."""
    new, n = re.subn(pattern, lambda _: replacement, text, flags=flags)
    if n != 1:
        raise PatchMiss(f"pattern {pattern!r} matched {n} times, expected once")
    return new


def _edit(rel: str, change: Callable[[str], str],
          done: Callable[[str], bool] = _has_mark) -> Callable[[Path], list[str]]:
    """A patch rewriting one file with `change`; `done` tells a patched text from an unpatched one."""

    def apply(src: Path) -> list[str]:
        path = src / rel
        if not path.is_file():
            raise PatchMiss(f"{rel} does not exist")
        text = path.read_text(encoding="utf-8")
        if done(text):
            return []
        new = change(text)
        if new == text or not done(new):
            raise PatchMiss(f"{rel} does not look as expected")
        path.write_text(new, encoding="utf-8")
        return [rel]

    return apply


# 1. Top-level CMakeLists.txt: no Anaconda folders; CPU_ONLY only when asked.
def _top_cmake(text: str) -> str:
    text = _sub1(r"^add_definitions\( *-DCPU_ONLY=1 *\)\n",
                 f"# [{MARK}] -DCPU_ONLY=1 is added below only if CPU_ONLY\n", text)
    text = _sub1(r"^include\(cmake/Dependencies\.cmake\)\n",
                 "include(cmake/Dependencies.cmake)\n"
                 f"if(CPU_ONLY)  # [{MARK}]\n"
                 "  add_definitions(-DCPU_ONLY=1)\n"
                 "endif()\n", text)
    text = _sub1(r"^include_directories\(\$\{ANACONDA_HOME\}/include[^\n]*\n", "", text)
    return _sub1(r"^link_directories\(\$\{ANACONDA_HOME\}/lib\)\n",
                 f"# [{MARK}] Python3 (with NumPy headers), HDF5 and Boost found by CMake\n"
                 "find_package(Python3 REQUIRED COMPONENTS Interpreter Development.Module NumPy)\n"
                 "find_package(HDF5 REQUIRED COMPONENTS C HL)\n"
                 "find_package(Boost REQUIRED COMPONENTS thread system filesystem regex\n"
                 "             python${Python3_VERSION_MAJOR}${Python3_VERSION_MINOR})\n"
                 "include_directories(${Python3_INCLUDE_DIRS} ${Python3_NumPy_INCLUDE_DIRS}\n"
                 "                    ${HDF5_INCLUDE_DIRS} ${Boost_INCLUDE_DIRS})\n", text)


# 2. cmake/Dependencies.cmake: the fork never includes Cuda.cmake.
def _dependencies_cmake(text: str) -> str:
    return text.rstrip("\n") + (
        f"\n\n# ---[ CUDA  [{MARK}]\n"
        "if(NOT CPU_ONLY)\n"
        "  include(cmake/Cuda.cmake)\n"
        "  if(NOT HAVE_CUDA)\n"
        '    message(FATAL_ERROR "CPU_ONLY=OFF but CUDA was not found (set CUDA_TOOLKIT_ROOT_DIR)")\n'
        "  endif()\n"
        "endif()\n")


# 3. cmake/Cuda.cmake: do not hand the host C++ standard to nvcc (CUDA 12+ headers want C++17, nvcc picks its own
# default); the .cpp files keep C++14.
def _cuda_cmake(text: str) -> str:
    return _sub1(r'^ *string\(REPLACE "/EHa" "" \$\{var\} "\$\{\$\{var\}\}"\)\n',
                 '    string(REPLACE "/EHa" "" ${var} "${${var}}")\n'
                 f'    string(REPLACE "-std=c++14" "" ${{var}} "${{${{var}}}}")  # [{MARK}]\n', text)


# 4. python/CMakeLists.txt: link the interpreter's boost_python3XX and CMake's HDF5 libraries (not -lboost_python /
# plain -lhdf5); compile the .cu files into _caffe.so for CUDA builds (the fork has no libcaffe target).
def _python_cmake(text: str) -> str:
    text = _sub1(r"^include_directories\(\$\{Caffe_INCLUDE_DIR\}\)\n",
                 "include_directories(${Caffe_INCLUDE_DIR})\n"
                 f"if(HAVE_CUDA)  # [{MARK}]\n"
                 "  include_directories(${CUDA_INCLUDE_DIRS})\n"
                 "  caffe_cuda_compile(cuda_objs ${cuda})\n"
                 "  list(APPEND srcs ${cuda_objs} ${cuda})\n"
                 "endif()\n", text)
    return _sub1(r"^target_link_libraries\(pycaffe proto [^\n]*\n",
                 f"# [{MARK}] interpreter's boost_python, CMake's HDF5\n"
                 "target_link_libraries(pycaffe proto glog gflags protobuf ${Boost_LIBRARIES}\n"
                 "                      ${HDF5_HL_LIBRARIES} ${HDF5_LIBRARIES} openblas)\n"
                 "if(HAVE_CUDA)\n"
                 "  target_link_libraries(pycaffe ${CUDA_CUDART_LIBRARY} ${CUDA_curand_LIBRARY}\n"
                 "                        ${CUDA_CUBLAS_LIBRARIES})\n"
                 "endif()\n", text)


# 5. src/caffe/net.cpp includes a gtest header it does not use.
_TEST_INCLUDE = '#include "caffe/test/test_caffe_main.hpp"'


def _net_cpp(text: str) -> str:
    return _sub1(r'^#include "caffe/test/test_caffe_main\.hpp"\n', "", text)


# 6. src/caffe/common.cpp: Caffe::DeviceQuery() (GPU builds only) prints cudaDeviceProp fields that CUDA 13 removed.
_CUDA13_GONE = (
    r'^  LOG\(INFO\) << "Clock rate: *" << prop\.clockRate;\n',
    r'^  LOG\(INFO\) << "Concurrent copy and execution: "\n *<< \(prop\.deviceOverlap \? "Yes" : "No"\);\n',
    r'^  LOG\(INFO\) << "Kernel execution timeout: *"\n *<< \(prop\.kernelExecTimeoutEnabled \? "Yes" : "No"\);\n',
)


def _common_cpp(text: str) -> str:
    for pattern in _CUDA13_GONE:
        m = re.search(pattern, text, flags=re.M)
        if not m:
            raise PatchMiss(f"common.cpp: {pattern!r} not found")
        text = (text[:m.start()] + f"#if CUDART_VERSION < 13000  // [{MARK}]\n"
                + m.group(0) + "#endif\n" + text[m.end():])
    return text


# 7. src/caffe/layers/proposal_layer.cu (CUDA builds only) instantiates ProposalLayer::Backward_gpu, which the fork
# declares but never defines: define it as a no-op like its Backward_cpu.
def _proposal_layer_cu(text: str) -> str:
    return _sub1(r"^INSTANTIATE_LAYER_GPU_FUNCS\(ProposalLayer\);\n",
                 f"// [{MARK}] declared in the header, defined nowhere\n"
                 "template <typename Dtype>\n"
                 "void ProposalLayer<Dtype>::Backward_gpu(const vector<Blob<Dtype>*>& top,\n"
                 "    const vector<bool>& propagate_down, const vector<Blob<Dtype>*>& bottom) {}\n"
                 "\n"
                 "INSTANTIATE_LAYER_GPU_FUNCS(ProposalLayer);\n", text)


# 8. Layers the fork added without a .cu file (HardSigmoid, HardSwish, MaxUnPool, PixelShuffle, ReLU6, Upsample)
# declare Forward_gpu/Backward_gpu but only define them (as stubs) with CPU_ONLY: a CUDA build links, then fails to
# import (undefined symbol ...Forward_gpu). Give them a GPU path that runs the CPU code, as Caffe's Layer base class
# does for layers without one.
_STUB_GPU = re.compile(r"^([ \t]*)#ifdef CPU_ONLY\n[ \t]*STUB_GPU\((\w+)\);\n[ \t]*#endif\n", re.M)
_CPU_FALLBACK = (
    "#ifdef CPU_ONLY\n"
    "STUB_GPU({cls});\n"
    "#else  // [{mark}] no .cu for this layer: run the CPU code\n"
    "template <typename Dtype>\n"
    "void {cls}<Dtype>::Forward_gpu(const vector<Blob<Dtype>*>& bottom,\n"
    "    const vector<Blob<Dtype>*>& top) {{\n"
    "  this->Forward_cpu(bottom, top);\n"
    "}}\n"
    "template <typename Dtype>\n"
    "void {cls}<Dtype>::Backward_gpu(const vector<Blob<Dtype>*>& top,\n"
    "    const vector<bool>& propagate_down, const vector<Blob<Dtype>*>& bottom) {{\n"
    "  this->Backward_cpu(top, propagate_down, bottom);\n"
    "}}\n"
    "#endif\n"
)


def _gpu_runs_cpu(src: Path) -> list[str]:
    layers = src / "src/caffe/layers"
    if not layers.is_dir():
        raise PatchMiss("src/caffe/layers does not exist")
    changed: list[str] = []
    found = 0
    for path in sorted(layers.glob("*.cpp")):
        if path.with_suffix(".cu").exists():
            continue
        text = path.read_text(encoding="utf-8")
        if MARK in text:
            found += 1
            continue
        m = _STUB_GPU.search(text)
        if not m:
            continue
        text = text[:m.start()] + _CPU_FALLBACK.format(cls=m.group(2), mark=MARK) + text[m.end():]
        path.write_text(text, encoding="utf-8")
        changed.append(str(path.relative_to(src)))
    if not changed and not found:
        raise PatchMiss("no layer .cpp without a .cu has a CPU_ONLY STUB_GPU block")
    return changed


# 9. The sdist ships protoc output of an older protobuf (caffe.pb.h/.pb.cc, caffe_pb2.py). The build generates fresh
# ones into the build tree, but nvcc searches include/ first and would pick the stale header (#error: "generated by
# an older version of protoc"): remove them. (caffe_pb2.py is replaced by the fresh one after the build.)
_STALE_PROTOC_OUTPUT = ("include/caffe/proto/caffe.pb.h", "src/caffe/proto/caffe.pb.cc")


def _remove_stale_protoc_output(src: Path) -> list[str]:
    if not (src / "src/caffe/proto/caffe.proto").is_file():
        raise PatchMiss("src/caffe/proto/caffe.proto does not exist")
    removed = []
    for rel in _STALE_PROTOC_OUTPUT:
        path = src / rel
        if path.exists():
            path.unlink()
            removed.append(rel)
    return removed


# 10. python/caffe/io.py: calls removed from NumPy 2 (ndarray.tostring) or deprecated (np.fromstring on bytes), and
# scikit-image's old as_grey keyword.
def _io_py(text: str) -> str:
    text = _sub1(r"arr\.tostring\(\)", "arr.tobytes()", text)
    text = _sub1(r"np\.fromstring\(datum\.data, dtype=np\.uint8\)",
                 "np.frombuffer(datum.data, dtype=np.uint8).copy()", text)
    return _sub1(r"as_grey=", "as_gray=", text)


def _io_py_done(text: str) -> bool:
    return "tostring()" not in text and "np.fromstring(" not in text and "as_grey" not in text


PATCHES: tuple[Patch, ...] = (
    Patch("CMakeLists.txt (Python3/NumPy/HDF5/Boost)", _edit("CMakeLists.txt", _top_cmake)),
    Patch("cmake/Dependencies.cmake (CUDA)", _edit("cmake/Dependencies.cmake", _dependencies_cmake)),
    Patch("cmake/Cuda.cmake (nvcc C++ standard)", _edit("cmake/Cuda.cmake", _cuda_cmake)),
    Patch("python/CMakeLists.txt (link libraries)", _edit("python/CMakeLists.txt", _python_cmake)),
    Patch("src/caffe/net.cpp (gtest include)",
          _edit("src/caffe/net.cpp", _net_cpp, done=lambda text: _TEST_INCLUDE not in text)),
    Patch("src/caffe/common.cpp (CUDA 13)", _edit("src/caffe/common.cpp", _common_cpp)),
    Patch("proposal_layer.cu (Backward_gpu)", _edit("src/caffe/layers/proposal_layer.cu", _proposal_layer_cu)),
    Patch("layers without a .cu (GPU -> CPU)", _gpu_runs_cpu),
    Patch("stale protoc output (caffe.pb.h/.pb.cc)", _remove_stale_protoc_output),
    Patch("python/caffe/io.py (NumPy 2, scikit-image)", _edit("python/caffe/io.py", _io_py, done=_io_py_done)),
)


def apply_patches(src: Path, patches: Sequence[Patch] = PATCHES) -> list[Result]:
    """Tries every patch on the tree at `src`, in order; a miss does not stop the ones after it."""
    results = []
    for patch in patches:
        try:
            changed = patch.apply(src)
        except PatchMiss as miss:
            results.append(Result(patch.name, MISSED, reason=str(miss)))
        else:
            results.append(Result(patch.name, APPLIED if changed else ALREADY, tuple(changed)))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print("usage: caffe_patches.py SRC_DIR", file=sys.stderr)
        return 2
    src = Path(args[0])
    if not (src / "CMakeLists.txt").is_file():
        print(f"caffe_patches.py: {src} is not a Caffe source tree (no CMakeLists.txt)", file=sys.stderr)
        return 2
    results = apply_patches(src)
    for result in results:
        detail = result.reason or (", ".join(Path(c).name for c in result.changed) if len(result.changed) > 1 else "")
        print(f"  patch {result.name:<44} {result.status}" + (f": {detail}" if detail else ""))
    missed = [r.name for r in results if r.status == MISSED]
    if missed:
        print(f"caffe_patches.py: {len(missed)} patch(es) did not apply to {src} (upstream changed?): "
              + "; ".join(missed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
