"""Checks of Triton kernels for the GPU without one: lowering a kernel to a cubin for sm_<arch>
(triton.compile takes the target), its registers, spills and shared memory, the order of its
PTX around griddepcontrol.wait; and running a check in a fresh process."""

import importlib
import os
import re
import subprocess
import sys
import tempfile

import pytest

# No GPU is needed to lower a kernel to a cubin: triton.compile takes the target. It must run in a
# process where Triton was imported with the interpreter off (the interpreter rebinds Triton's own
# library functions at import), hence a subprocess.


def load_kernel_module(name):
    """fastgpt.kernels.<name>: kernels/<name>.py, or the package kernels/<name>/."""
    return importlib.import_module(f"fastgpt.kernels.{name}")


def compile_for(fn, pointer_types, constexprs, *, arch, num_warps, num_stages, scalar_types=None, divisible=()):
    """Lower `fn` to a cubin for sm_<arch>, with the 16-divisibility the JIT infers for aligned
    pointers and strides (which enables vectorised, pipelined loads), and for the scalars named in
    `divisible`. Scalars are i32 (fp32 when named *scale*) unless `scalar_types` names them.
    Returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
        else:
            signature[name] = (scalar_types or {}).get(name, "fp32" if "scale" in name else "i32")
        if signature[name].startswith("*") or name.startswith("stride") or name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    if "PDL" in fn.arg_names and "PDL" not in constexprs:  # as the launchers set it (kernels/pdl.py)
        constexprs = constexprs | {"PDL": arch >= 90}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    if constexprs.get("PDL"):
        assert_waits_first(kernel.asm["ptx"])
    return kernel


# Memory instructions that may not run before griddepcontrol.wait: loads, stores, atomics, async
# copies (an L2 prefetch, cp.async.bulk.prefetch, reads no value and may).
_MEMORY_OP = re.compile(r"\b(ld|st|atom|red)(\.[a-z0-9]+)*\.global\b|\bld\.global|\bcp\.async\.(?!bulk\.prefetch)"
                        r"|\bcp\.reduce\.async")  # fmt: skip


def assert_waits_first(ptx: str):
    """A kernel launched as a programmatic dependent (kernels/pdl.py) must wait for the previous
    grid before it touches global memory: in its PTX griddepcontrol.wait comes before every load,
    store, atomic and async copy, and before any branch (so every thread runs it), and it signals
    its dependents only after it."""
    body = [line.split("//")[0].strip() for line in ptx.splitlines()]
    body = body[next(i for i, line in enumerate(body) if line.startswith(".visible .entry")):]
    wait = next((i for i, line in enumerate(body) if line.startswith("griddepcontrol.wait")), None)
    assert wait is not None, "no griddepcontrol.wait"
    early = [line for line in body[:wait] if _MEMORY_OP.search(line) or re.search(r"\bbra\b", line)]
    assert not early, f"before griddepcontrol.wait: {early[:5]}"
    signal = next(i for i, line in enumerate(body) if line.startswith("griddepcontrol.launch_dependents"))
    assert signal > wait


def ptxas_usage(kernel, arch: int) -> tuple[int, int]:
    """(registers a thread, bytes of register spill stores) of `kernel` for sm_<arch>, by Triton's
    bundled ptxas -v."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", path, "-o", os.devnull], capture_output=True,
                              text=True, check=True)  # fmt: skip
    registers = int(re.search(r"Used (\d+) registers", proc.stderr).group(1))
    return registers, sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", proc.stderr))


def ptxas_spills(kernel, arch: int) -> int:
    """Bytes of register spill stores in `kernel` for sm_<arch>."""
    return ptxas_usage(kernel, arch)[1]


SMEM_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory per block (A100, H100/H200)
SMEM_LIMIT_SM86 = 101376  # RTX 30xx/40xx, L4, A10 (sm_86/sm_89): what an untuned launch must fit


def run_compile_check(function: str, archs: tuple[int, ...] = (80, 90)):
    """Run <module>.<function>(arch) (e.g. "tests.test_decode.compile_decode_variants") for each
    of `archs` (sm_80 and sm_90) in a fresh interpreter-free process."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    module = function.rpartition(".")[0]
    code = f"import {module} as m\nfor arch in {tuple(archs)}:\n    m.{function.rpartition('.')[2]}(arch)"
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


def run_isolated(call: str):
    """Run `call` (e.g. "tests.test_x.f('cpu')") in a fresh Python process with this environment
    (TRITON_INTERPRET kept); fail with its stderr if it crashes or fails."""
    module = call.split("(")[0].rpartition(".")[0]
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    code = f"import os\nos.environ.setdefault('TRITON_INTERPRET', '1')\nimport {module}\n{call}"
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    if proc.returncode and "Skipped: " in proc.stderr:
        pytest.skip(proc.stderr.rpartition("Skipped: ")[2].strip())
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-4000:]}"
