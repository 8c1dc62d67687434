"""Build script: the pure-Python package, plus the CUDA extension fastgpt._C when nvcc is found.

`kernels/` (the Triton kernels) is installed as `fastgpt.kernels`, so the repository keeps a
top-level layout while imports stay `fastgpt.*`.

The extension (csrc/*.cu + csrc/bindings.cpp) links no libtorch and links cudart statically, so
one build works with any torch and imports on machines without a GPU. It is compiled through a
generated build.ninja so the nvcc steps run in parallel. Environment:
  FASTGPT_SKIP_CUDA=1     build the pure-Python package only
  FASTGPT_CUDA_ARCHS      ';'-separated SM targets, default "80;90a" ("90a" = sm_90a, Hopper's
                          wgmma/TMA target; "NN+PTX" also embeds PTX for newer GPUs)
  MAX_JOBS                parallel compile jobs (default: the CPU count)
  CUDA_HOME / CUDA_PATH   the CUDA toolkit (default: found from nvcc on PATH, or /usr/local/cuda)
  FASTGPT_WERROR=1        treat compiler warnings as errors (CI)
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = Path("csrc")  # relative: setuptools wants relative source paths
# Every package under fastgpt/ (subpackages such as fastgpt.bench.cases included), plus kernels/
# and its subpackages (fastgpt.kernels.sampling).
PACKAGES = (find_packages(include=["fastgpt", "fastgpt.*"]) + ["fastgpt.kernels"]
            + [f"fastgpt.kernels.{name}" for name in find_packages(where="kernels")])
DEFAULT_ARCHS = "80;90a"
# Kernels whose math tolerates approximate exp2/division; sampling (exact division by the
# temperature, logs) and LayerNorm (statistics) are built without it.
FAST_MATH = {"attention.cu", "decode.cu"}


def find_cuda_home() -> tuple[Path | None, str]:
    """(toolkit root, "") when nvcc and the cudart headers/static library are found, else (None, why)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    candidates.append("/usr/local/cuda")
    for home in filter(None, candidates):
        home = Path(home)
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime_api.h").exists():
            return home, ""
    if not nvcc:
        return None, "nvcc was not found (put it on PATH or set CUDA_HOME)"
    return None, f"found nvcc at {nvcc} but no CUDA toolkit with include/cuda_runtime_api.h (set CUDA_HOME)"


def why_no_cuda() -> str | None:
    """Why the CUDA extension will not be built here, or None when it will."""
    if os.environ.get("FASTGPT_SKIP_CUDA", "0") == "1":
        return "FASTGPT_SKIP_CUDA=1"
    home, reason = find_cuda_home()
    return None if home else reason


def gencode_flags(archs: str) -> list[str]:
    """"80;90a;100+PTX" -> nvcc -gencode flags (sm_90a needs the explicit -gencode form)."""
    flags = []
    for arch in filter(None, (a.strip() for a in archs.replace(",", ";").split(";"))):
        match = re.fullmatch(r"(\d+[a-z]?)(\+PTX)?", arch)
        if not match:
            raise ValueError(f"FASTGPT_CUDA_ARCHS: cannot parse {arch!r} (expected e.g. 80, 90a, 90+PTX)")
        sm = match.group(1)
        flags.append(f"-gencode=arch=compute_{sm},code=sm_{sm}")
        if match.group(2):
            flags.append(f"-gencode=arch=compute_{sm},code=compute_{sm}")
    if not flags:
        raise ValueError("FASTGPT_CUDA_ARCHS names no architecture")
    return flags


def cudart_static_dir(home: Path) -> Path:
    for sub in ("lib64", "lib", "lib/x64", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        if (home / sub / "libcudart_static.a").exists():
            return home / sub
    raise RuntimeError(f"libcudart_static.a not found under {home}")


def quote(args) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def compile_flags(home: Path, cxx: str, archs: str) -> dict[str, list[str]]:
    """nvcc, host C++ and link flags: -O3, -lineinfo, the archs' -gencode, static cudart, no libtorch."""
    import pybind11  # a build requirement (pyproject.toml)

    includes = [f"-I{ROOT / CSRC}", f"-I{home / 'include'}"]
    flags = {
        "nvcc_flags": ["-std=c++17", "-O3", "-lineinfo", "-ccbin", cxx, "-Xcompiler",
                       "-fPIC,-fvisibility=hidden,-Wall", *includes, *gencode_flags(archs)],
        "cxx_flags": ["-std=c++17", "-O3", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", *includes,
                      f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
                      f"-DFASTGPT_CUDA_ARCHS=\"{archs}\""],
        "link_flags": [f"-L{cudart_static_dir(home)}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"],
    }
    if os.environ.get("FASTGPT_WERROR", "0") == "1":
        flags["nvcc_flags"] += ["-Werror", "all-warnings", "-Xcompiler", "-Werror"]
        flags["cxx_flags"] += ["-Werror"]
    return flags


NINJA_RULES = """
rule nvcc
  command = $nvcc $nvcc_flags $extra -MD -MF $out.d -c $in -o $out
  depfile = $out.d
  deps = gcc
  description = NVCC $in
rule cxx
  command = $cxx $cxx_flags -MMD -MF $out.d -c $in -o $out
  depfile = $out.d
  deps = gcc
  description = CXX $in
rule link
  command = $cxx -shared $in $link_flags -o $out
  description = LINK $out
"""


def ninja_file(home: Path, cxx: str, flags: dict[str, list[str]], sources, build_dir: Path, output: Path) -> str:
    """build.ninja: one compile step per source (nvcc for .cu, the host compiler otherwise), one link."""
    lines = ["# generated by setup.py (NinjaBuildExt); rebuilt on every build", "ninja_required_version = 1.3",
             f"nvcc = {home / 'bin' / 'nvcc'}", f"cxx = {cxx}"]
    lines += [f"{name} = {quote(values)}" for name, values in flags.items()]
    lines.append(NINJA_RULES)
    objects = []
    for src in map(lambda name: ROOT / name, sources):
        obj = build_dir / (src.name + ".o")
        objects.append(obj)
        lines.append(f"build {obj}: {'nvcc' if src.suffix == '.cu' else 'cxx'} {src}")
        if src.name in FAST_MATH:
            lines.append("  extra = --use_fast_math")
    lines += [f"build {output}: link {' '.join(map(str, objects))}", f"default {output}", ""]
    return "\n".join(lines)


class NinjaBuildExt(build_ext):
    """Builds fastgpt._C from csrc/ with nvcc + the host C++ compiler through a generated build.ninja."""

    def build_extension(self, ext: Extension) -> None:
        home, reason = find_cuda_home()
        if home is None:
            raise RuntimeError(f"cannot build {ext.name}: {reason}")
        ninja = shutil.which("ninja")
        if ninja is None:
            raise RuntimeError("ninja was not found: pip install ninja (a build requirement of fastgpt)")
        archs = os.environ.get("FASTGPT_CUDA_ARCHS", DEFAULT_ARCHS) or DEFAULT_ARCHS
        cxx = os.environ.get("CXX", "c++")
        build_dir = Path(self.build_temp).resolve() / "fastgpt_C"
        build_dir.mkdir(parents=True, exist_ok=True)
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        flags = compile_flags(home, cxx, archs)
        (build_dir / "build.ninja").write_text(ninja_file(home, cxx, flags, ext.sources, build_dir, output))
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        print(f"fastgpt: building {ext.name} for archs {archs} with {jobs} jobs (CUDA at {home})", flush=True)
        subprocess.run([ninja, "-C", str(build_dir), "-j", jobs], check=True)


def extensions() -> list[Extension]:
    reason = why_no_cuda()
    if reason:
        print(f"fastgpt: building without the CUDA extension fastgpt._C: {reason}", file=sys.stderr, flush=True)
        return []
    def files(pattern: str) -> list[str]:
        return sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC).glob(pattern))

    sources = files("*.cu") + files("*.cpp")
    depends = files("*.cuh") + files("*.h")
    return [Extension("fastgpt._C", sources=sources, depends=depends)]


if __name__ == "__main__":  # pip's build backend runs this file as __main__ too
    setup(
        packages=PACKAGES,
        package_dir={"fastgpt": "fastgpt", "fastgpt.kernels": "kernels"},
        ext_modules=extensions(),
        cmdclass={"build_ext": NinjaBuildExt},
    )
