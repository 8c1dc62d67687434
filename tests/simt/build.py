"""Builds the host version of fastgpt._C: csrc/ compiled by g++ against the SIMT emulator's
headers (include/) and runtime (runtime/), so that its kernels run on CPU tensors' memory.

    python -m tests.simt.build        # builds (or finds) it and prints its path
    python -m tests.simt.build --asan # the same under AddressSanitizer (README.md: memcheck)

The module lands in build/simt-<hash>/, the hash taken over every source, header and flag, so an
unchanged tree reuses it (g++ 12 or later: -ftrivial-auto-var-init). Processes asking at once
build it once: one compiles (into a temporary directory, then renames the finished module into
place) while the others wait on a lock.
With sanitize=True it is compiled and linked with -fsanitize=address into build/simt-asan-<hash>/:
a process loading it must have libasan preloaded (asan_env() gives the environment), and every
out-of-bounds access its kernels make into a heap block's redzone is reported.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
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
# The memcheck build: AddressSanitizer, with frame pointers and line tables (-g1) for the stacks
# in its reports, at -O1 (as ASan advises; a third less compile time than -O2, ~10% more run time).
# runtime/fiber.cpp tells ASan about each switch of fiber stacks when __SANITIZE_ADDRESS__ is set.
SANITIZE_FLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer"]
SANITIZE_REPLACE = {"-O2": "-O1", "-g0": "-g1"}
# What a process loading the memcheck build runs under. Python and torch start and run cleanly
# with libasan preloaded but for LeakSanitizer, which at exit reports what the interpreter and
# torch never free (and so would fail every run): detect_leaks=0. The rest are ASan's defaults,
# spelt out because the tests rely on them: the first report ends the process, status 1, with
# the report on stderr.
ASAN_OPTIONS = "detect_leaks=0:halt_on_error=1:exitcode=1"


def _includes() -> list[str]:
    # The emulator's headers first: the toolkit's cuda_runtime.h must never be found.
    dirs = [HERE / "include", HERE / "runtime", CSRC, pybind11.get_include(), sysconfig.get_paths()["include"]]
    return [f"-I{d}" for d in dirs]


def _flags(sanitize: bool) -> list[str]:
    return [SANITIZE_REPLACE.get(f, f) for f in FLAGS] + SANITIZE_FLAGS if sanitize else FLAGS


def _fingerprint(flags: list[str]) -> str:
    h = hashlib.sha256()
    inputs = SOURCES + sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.h"))
    inputs += sorted((HERE / "include").glob("*.h")) + sorted((HERE / "runtime").glob("*.h"))
    for path in inputs:
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    compiler = subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout
    for part in (*flags, *_includes(), compiler, sysconfig.get_config_var("EXT_SUFFIX"), pybind11.__version__):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _compile(source: Path, obj: Path, flags: list[str]) -> None:
    cmd = [CXX, *flags, *_includes(), "-x", "c++", "-c", str(source), "-o", str(obj)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"compiling {source.relative_to(ROOT)} failed:\n{' '.join(cmd)}\n{result.stderr}")
    sys.stderr.write(result.stderr)  # warnings: csrc compiles cleanly with -Wall here, and should stay so


def build(build_dir: Path | None = None, sanitize: bool = False) -> Path:
    """Path of the host module `_C<EXT_SUFFIX>` for the current sources: in build/simt-<hash>/
    (build/simt-asan-<hash>/ with sanitize=True: AddressSanitizer), compiled there unless it
    already is; in `build_dir` when given, compiled there always."""
    flags = _flags(sanitize)
    reuse = build_dir is None
    prefix = "simt-asan" if sanitize else "simt"
    build_dir = ROOT / "build" / f"{prefix}-{_fingerprint(flags)}" if reuse else Path(build_dir)
    target = build_dir / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    if reuse and target.exists():
        return target
    build_dir.mkdir(parents=True, exist_ok=True)
    # One build at a time into a directory: pytest's workers all ask for the module at the start of
    # a fresh checkout, and the others wait for the first one's build instead of repeating it.
    with open(build_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (reuse and target.exists()):
            _build(target, flags, sanitize)
    return target


def _build(target: Path, flags: list[str], sanitize: bool) -> None:
    build_dir = target.parent
    jobs = max(1, int(os.environ.get("MAX_JOBS", "2")))
    with tempfile.TemporaryDirectory(dir=build_dir, prefix=".tmp-") as tmp:
        objs = [Path(tmp) / f"{i}-{source.stem}.o" for i, source in enumerate(SOURCES)]
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            for future in [pool.submit(_compile, s, o, flags) for s, o in zip(SOURCES, objs)]:
                future.result()
        partial = Path(tmp) / target.name
        link = ["-fsanitize=address"] if sanitize else []
        cmd = [CXX, "-shared", *link, "-o", str(partial), *map(str, objs), "-ldl"]  # dladdr: kernel names
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"linking {target.name} failed:\n{' '.join(cmd)}\n{result.stderr}")
        os.replace(partial, target)  # atomic: a process loading the module never sees half of it


def asan_runtime() -> Path | None:
    """The AddressSanitizer runtime the memcheck build links to (libasan.so of CXX), or None
    when this compiler has none."""
    try:
        out = subprocess.run([CXX, "-print-file-name=libasan.so"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(out.stdout.strip())
    return path.resolve() if path.is_absolute() and path.exists() else None  # else g++ echoes the bare name


def asan_env(module: Path | None, runtime: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default os.environ) for a Python process under AddressSanitizer: libasan preloaded
    (it must come before every other library, and python is not linked with it), ASAN_OPTIONS
    (then any the caller had: later ones win), and FASTGPT_CUDA_EMULATOR set to the memcheck build
    `module` so that backend="cuda" takes CPU tensors; `module` None (the Triton interpreter's
    check, which needs no sanitized build) leaves the emulator out."""
    env = dict(os.environ if env is None else env)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(runtime), env.get("LD_PRELOAD")]))
    env["ASAN_OPTIONS"] = ":".join(filter(None, [ASAN_OPTIONS, env.get("ASAN_OPTIONS")]))
    if module is None:
        env.pop("FASTGPT_CUDA_EMULATOR", None)
    else:
        env["FASTGPT_CUDA_EMULATOR"] = str(module)
    return env


def run_memcheck_cases(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`python -m tests.simt.memcheck_cases *args` in a child with `env` (asan_env), output captured."""
    # sys.executable, not a `python` on the PATH: that may be a shell script (pyenv), whose shell
    # would run under libasan too.
    cmd = [sys.executable, "-m", "tests.simt.memcheck_cases", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)

if __name__ == "__main__":
    args = sys.argv[1:]
    asan = "--asan" in args
    args = [a for a in args if a != "--asan"]
    print(build(Path(args[0]) if args else None, sanitize=asan))
