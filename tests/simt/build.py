"""Builds the host version of fastgpt._C: csrc/ compiled by g++ against the SIMT emulator's
headers (include/) and runtime (runtime/), so that its kernels run on CPU tensors' memory.

    python -m tests.simt.build        # builds (or finds) it and prints its path

The module lands in build/simt-<hash>/, the hash taken over every source, header and flag, so an
unchanged tree reuses it (g++ 12 or later: -ftrivial-auto-var-init). Two processes may build at once: each compiles into its own temporary
directory and renames the finished module into place.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pybind11

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"
CXX = os.environ.get("CXX", "g++")
KERNEL_SOURCES = ("attention.cu", "decode.cu", "layer_norm.cu", "sampling.cu", "bindings.cpp")
SOURCES = [CSRC / name for name in KERNEL_SOURCES] + sorted((HERE / "runtime").glob("*.cpp"))
FLAGS = [
    "-std=c++20", "-O2", "-g0", "-fPIC", "-DFASTGPT_SIMT", '-DFASTGPT_CUDA_ARCHS="simt"',
    "-fno-strict-aliasing",  # csrc reinterprets registers and vectors (pack2, load_vec)
    "-ffp-contract=off",     # the same float results whether or not the host has FMA
    # __shared__ is thread_local (simt_device.h), and attention.cu's extern __shared__ array is
    # defined in the runtime: g++ would call its (absent) dynamic-initialisation function.
    "-fno-extern-tls-init",
    # Uninitialised locals (registers, on the GPU) start as 0xFE bytes, not as whatever the
    # previous block's thread left on the reused fiber stack.
    "-ftrivial-auto-var-init=pattern",
    "-Wall", "-Wno-unknown-pragmas",  # #pragma unroll
    "-Wno-maybe-uninitialized",  # layer_norm's v[c][j]: read under the same col < N test that wrote it
]  # fmt: skip


def _includes() -> list[str]:
    # The emulator's headers first: the toolkit's cuda_runtime.h must never be found.
    dirs = [HERE / "include", HERE / "runtime", CSRC, pybind11.get_include(), sysconfig.get_paths()["include"]]
    return [f"-I{d}" for d in dirs]


def _fingerprint() -> str:
    h = hashlib.sha256()
    inputs = SOURCES + sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.h"))
    inputs += sorted((HERE / "include").glob("*.h")) + sorted((HERE / "runtime").glob("*.h"))
    for path in inputs:
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    compiler = subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout
    for part in (*FLAGS, *_includes(), compiler, sysconfig.get_config_var("EXT_SUFFIX"), pybind11.__version__):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _compile(source: Path, obj: Path) -> None:
    cmd = [CXX, *FLAGS, *_includes(), "-x", "c++", "-c", str(source), "-o", str(obj)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"compiling {source.relative_to(ROOT)} failed:\n{' '.join(cmd)}\n{result.stderr}")
    sys.stderr.write(result.stderr)  # warnings: csrc compiles cleanly with -Wall here, and should stay so


def build(build_dir: Path | None = None) -> Path:
    """Path of the host module `_C<EXT_SUFFIX>` for the current sources: in build/simt-<hash>/,
    compiled there unless it already is; in `build_dir` when given, compiled there always."""
    reuse = build_dir is None
    build_dir = ROOT / "build" / f"simt-{_fingerprint()}" if reuse else Path(build_dir)
    target = build_dir / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    if reuse and target.exists():
        return target
    build_dir.mkdir(parents=True, exist_ok=True)
    jobs = max(1, int(os.environ.get("MAX_JOBS", "2")))
    with tempfile.TemporaryDirectory(dir=build_dir, prefix=".tmp-") as tmp:
        objs = [Path(tmp) / f"{i}-{source.stem}.o" for i, source in enumerate(SOURCES)]
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            for future in [pool.submit(_compile, s, o) for s, o in zip(SOURCES, objs)]:
                future.result()
        partial = Path(tmp) / target.name
        cmd = [CXX, "-shared", "-o", str(partial), *map(str, objs), "-ldl"]  # dladdr: kernel names
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"linking {target.name} failed:\n{' '.join(cmd)}\n{result.stderr}")
        os.replace(partial, target)  # atomic: a concurrent build replaces it with an identical file
    return target


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
