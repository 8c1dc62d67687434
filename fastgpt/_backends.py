"""Which backends exist here, and why not.

This is the only module that imports the compiled extension `fastgpt._C`. Every op resolves its
`backend=` argument through `resolve`, so the rules live in one place:

- "torch": the plain-PyTorch reference; always available.
- "triton": needs `triton` importable and CUDA tensors, or CPU tensors under `TRITON_INTERPRET=1`
  (Triton's interpreter, which is how CPU CI reaches the kernels).
- "cuda": needs the compiled extension, built for an architecture the GPU runs (FASTGPT_CUDA_ARCHS;
  sm_80 and sm_90a by default), and CUDA tensors, or CPU tensors under
  `FASTGPT_CUDA_EMULATOR=<path>`: the same kernels compiled for the host by tests/simt/ (a SIMT
  emulator; slow, for tests), which is how CPU CI runs csrc/'s kernels.
- "auto": on a CUDA device, the compiled backends in the op's order of preference (the
  measured one, below); else torch.

Asking for a backend that cannot run raises `BackendUnavailableError` with the reason: never a
silent fallback.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

BACKENDS = ("auto", "cuda", "triton", "torch")
ENV_VAR = "FASTGPT_BACKEND"
EMULATOR_ENV_VAR = "FASTGPT_CUDA_EMULATOR"  # the path of a host build of fastgpt._C (tests/simt/build.py)
EMULATOR_SMS = 4  # the emulator's pretend SM count: few, so that small test caches split


class AttentionOutput(NamedTuple):
    """fastgpt.attention's result with return_lse, and every backend's attention launcher's."""

    out: torch.Tensor  # (B, Hq, Sq, D) in q's dtype, contiguous
    lse: torch.Tensor  # (B, Hq, Sq) fp32: ln sum_j exp(scores) over the keys a query sees; -inf where none


class LayerNormOutput(NamedTuple):
    """What every backend's layer_norm launcher returns."""

    y: torch.Tensor  # (M, N) LN(h), x's dtype
    h: torch.Tensor | None  # (M, N) x + residual, or None without a residual


# "auto"'s order of preference on a CUDA device, from the H200 measurements of 2026-11-30
# (benchmarks/results/nvidia-h200/): layer_norm, Triton 4107 / 3964 GB/s against CUDA's 3667 /
# 3449 (65536x1024, 16384x4096), 2.3 us against 4.8 at 32x768. attention, decode_attention and
# sample depend on the problem's size: see their functions.
TRITON_FIRST = ("triton", "cuda")
CUDA_FIRST = ("cuda", "triton")
ATTENTION_TRITON_MIN_FLOPS = 20e9  # attention with less work: CUDA first (less host time a call)
DECODE_TRITON_EAGER_MIN_BYTES = 160 << 20  # one eager decode call reading this much cache: Triton first
SAMPLE_TRITON_MAX_ROWS = 8  # B up to here: Triton first (its split path keeps 32 chunks a row)
SAMPLE_CANDIDATE_MAX_K = 256  # top_k bounds below this take the samplers' candidate paths


def attention_preference(flops: float) -> tuple[str, str]:
    """auto's order for attention doing `flops` (4 B Hq Sq Sk D, halved when causal). The Triton
    kernel is the faster on the GPU: measured on an H200 (bf16, causal; `fastgpt bench`,
    2026-11-30), one eager call at B16 H12 S1024 D64 (26 GFLOP) 98 us against CUDA's 163, B4 H12
    S4096 D64 288 against 542, B4 H16 S4096 D128 640 against 1170. An eager call of it costs
    more host time (Triton's launch with TMA descriptors, our checks), which a call of little
    work does not hide: ATTENTION_TRITON_MIN_FLOPS sits under the smallest shape measured, and
    below it CUDA goes first (not measured there: an estimate)."""
    return TRITON_FIRST if flops >= ATTENTION_TRITON_MIN_FLOPS else CUDA_FIRST


def decode_preference(queries: int, cache_bytes: int, graphed: bool) -> tuple[str, str]:
    """auto's order for decode_attention: `queries` a row, over a cache of `cache_bytes` (k and v,
    every slot), in a step being captured in a CUDA graph (`graphed`: generate's decode step) or
    one eager call. Measured on an H200 (D64, one query; gpu-probe's decode_batch and `fastgpt
    bench`, 2026-11-30, with Triton's split plan before that run's change): in device time
    Triton's split-KV kernels are the faster from B1 to B64 (H12 L1024: 4.6 / 9.1 / 30.2 / 54.4
    us at B1 / 8 / 32 / 64 against CUDA's 7.9 / 9.6 / 39.4 / 70.3; L4096 B64: 189 against 244)
    but for B11, where CUDA's is 5% faster (10.8 against 11.3). One eager call of them costs ~60
    us of host time (two Triton launches) against CUDA's ~25: B1 H12 L1024 (3 MB) 63 us a call
    against 24.5, B64 L1024 (201 MB) 73.6 against 80.8, B64 L4096 (805 MB) 201 against 255. So
    Triton first in graphs, and eager from DECODE_TRITON_EAGER_MIN_BYTES, where CUDA's ~2.9 TB/s
    makes its call as long as Triton's host time (an estimate between the measured 3 and 201
    MB). Several queries a row: Triton first (its tile takes up to 64 (head, query) pairs on
    tensor cores; B1 H32/8 L4096 D128 Sq 8: 10.7 us against CUDA's 52.2, SDPA's 25.6)."""
    if queries > 1 or graphed or cache_bytes >= DECODE_TRITON_EAGER_MIN_BYTES:
        return TRITON_FIRST
    return CUDA_FIRST


def sample_preference(rows: int, top_k_bound: int = 0) -> tuple[str, str]:
    """auto's order for sample over `rows` = B. Measured on an H200 (V 50257, fp32, t 0.8, top-k
    50, top-p 0.9; graph replay; gpu-probe's sample_batch of 2026-11-30):

    - With every row's top_k bounded on the host below SAMPLE_CANDIDATE_MAX_K (top_k_bound; 0 is
      unknown), Triton's candidate path goes first at every B: 16 / 25 / 86 us at B1 / 32 / 256
      against CUDA's candidate path's 41 / 99 / 543 (its sorted form; bounded as Triton's since,
      not measured).
    - Without a bound, Triton's split path up to SAMPLE_TRITON_MAX_ROWS (186 / 208 / 254 us at
      B1 / 4 / 8 against CUDA's 286), CUDA's block a row beyond (287 us at B16 against Triton's
      425, 287 against 548 at B32, 587 against 1164 at B256). CUDA's block a row has loaded 4
      tokens a thread ahead in each pass since (not measured): gpu-probe's sample_batch and
      sample_top_p say whether it now wins at small B too.
    """
    if sample_candidate_k(top_k_bound):
        return TRITON_FIRST
    return TRITON_FIRST if rows <= SAMPLE_TRITON_MAX_ROWS else CUDA_FIRST


def sample_candidate_k(top_k_bound: int) -> int:
    """Entries the samplers' candidate paths list per vocabulary chunk and row, for a bound on
    every row's top_k: a power of two above the bound (the list must reach past the k-th entry
    to show where its tie group ends), at least 16; 0 (no candidate path) for an unknown (0) or
    too large a bound. One rule for both backends (kernels/sampling/, csrc/sampling.cu)."""
    if not 0 < top_k_bound < SAMPLE_CANDIDATE_MAX_K:
        return 0
    return max(16, 1 << top_k_bound.bit_length())


@functools.cache
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device: launchers size split-KV / split-V grids by it."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Kernels of a decode step, and every CUDA-backend kernel, launch as programmatic dependents where
# the GPU has it (sm_90 on): each may start while the kernel before it finishes, and waits for it
# before touching memory (kernels/pdl.py, csrc/common.cuh). FASTGPT_PDL=0 launches them plainly
# (gpu-probe's decode_step section times both), and so do the steps of PDL_PLAIN_ROWS rows or
# more that fastgpt.generate captures: measured on an H200 (GPT-2 124M, bf16, graph replay,
# 2026-11-30), a step at B1 took 440 us as dependents against 482 plainly, at B32 878 against
# 818 (twice alike). Only those two batches were measured: the 32 is where the second was.
PDL_ENV_VAR = "FASTGPT_PDL"
PDL_MIN_CAPABILITY = 9
PDL_PLAIN_ROWS = 32
_plain_launches = contextvars.ContextVar("fastgpt_plain_launches", default=False)


def launch_pdl(device: torch.device) -> bool:
    """Whether kernels launched on `device` go as programmatic dependents: the device is a CUDA
    GPU of compute capability 9.0 or later (never under Triton's interpreter, whose tensors are
    on the CPU), FASTGPT_PDL is not 0, and no plain_launches() block is open. Read at each
    launch (a graph keeps what it captured)."""
    return (device.type == "cuda" and _capability(device.index) >= PDL_MIN_CAPABILITY
            and os.environ.get(PDL_ENV_VAR, "1") != "0" and not _plain_launches.get())  # fmt: skip


@contextlib.contextmanager
def plain_launches(plain: bool = True):
    """Within the block (when `plain`), kernels launch plainly, not as programmatic dependents."""
    token = _plain_launches.set(plain or _plain_launches.get())
    try:
        yield
    finally:
        _plain_launches.reset(token)


@functools.cache
def _capability(device_index: int | None) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def pdl_report() -> str:
    """launch_pdl's answer for this machine's first GPU, and why, for `fastgpt info`."""
    if not torch.cuda.is_available():
        return "off (no GPU)"
    if _capability(0) < PDL_MIN_CAPABILITY:
        return "off (programmatic dependent launch needs compute capability 9.0 or later)"
    if not launch_pdl(torch.device("cuda", 0)):
        return f"off ({PDL_ENV_VAR}=0)"
    report = (f"on: a decode step's kernels launch as programmatic dependents, in captured steps of fewer than "
              f"{PDL_PLAIN_ROWS} rows ({PDL_ENV_VAR}=0 turns it off)")
    code = _cuda_code_arch(0)
    if code is not None and code < 90:  # csrc's launch_kernel launches code without the wait plainly
        report += f"; the CUDA kernels' code for this GPU is sm_{code}'s, without the wait: they launch plainly"
    return report


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run these inputs here; the message says why."""


def code_arch(archs: str, capability: tuple[int, int]) -> int | None:
    """The SM version (major * 10 + minor) of the code a GPU of compute `capability` runs from an
    extension built for `archs` (FASTGPT_CUDA_ARCHS, e.g. "80;90a;100f;120+PTX"), picked as CUDA
    picks it: a cubin of the GPU's major version and no higher minor, else the newest PTX no newer
    than the GPU (JIT-compiled); None when none runs. An "a" target (sm_90a) runs at its exact
    version only, cubin or PTX; an "f" one (sm_100f) within its family (its major version)."""
    version = capability[0] * 10 + capability[1]
    cubins, ptx = [], []
    for arch in filter(None, (a.strip() for a in archs.replace(",", ";").split(";"))):
        match = re.fullmatch(r"(\d+)([af]?)(\+PTX)?", arch)
        if match is None:  # not a target this rule knows
            continue
        sm, suffix, with_ptx = int(match.group(1)), match.group(2), match.group(3)
        same_major = sm // 10 == capability[0]
        if sm > version or (suffix == "a" and sm != version) or (suffix == "f" and not same_major):
            continue
        if same_major:
            cubins.append(sm)
        if with_ptx:
            ptx.append(sm)
    return max(cubins or ptx, default=None)


@torch.compiler.assume_constant_result
def _cuda_code_arch(device_index: int | None) -> int | None:
    """code_arch of the built extension on CUDA device `device_index` (a constant of the process)."""
    return _code_arch_of(device_index)


@functools.cache
def _code_arch_of(device_index: int | None) -> int | None:
    module = _import_cuda_extension(None)[0]
    if module is None or not torch.cuda.is_available():  # no GPU to ask (a CPU build of torch raises)
        return None
    return code_arch(module.archs, torch.cuda.get_device_capability(device_index))


def interpreting() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The import checks are constants of the process. torch.compile cannot trace an import, so they
# are marked as such: Dynamo calls them while tracing an op's dispatch and keeps the answer.
@functools.cache
def _import_triton() -> str | None:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"triton is not importable ({type(exc).__name__}: {exc}); pip install 'fastgpt[triton]'"
    return None


@torch.compiler.assume_constant_result
def _triton_missing() -> str | None:
    """None when triton imports, else why not."""
    return _import_triton()


def emulating_cuda() -> bool:
    """True when the cuda backend runs the host build of its kernels (FASTGPT_CUDA_EMULATOR)."""
    return _emulator() is not None


def _emulator() -> str | None:
    """FASTGPT_CUDA_EMULATOR: the path of the extension's host build, or None (unset or empty)."""
    return os.environ.get(EMULATOR_ENV_VAR) or None


@functools.cache
def _import_cuda_extension(emulator: str | None):
    """(module, None) when fastgpt._C (or the emulator's host build at path `emulator`) imports,
    else (None, reason)."""
    if emulator:
        try:
            # Its own module name: CPython hands back a loaded fastgpt._C for a second file of that name.
            spec = importlib.util.spec_from_file_location("fastgpt_simt._C", emulator)
            if spec is None:
                raise ImportError(f"not an extension module: {emulator}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module, None
        except ImportError as exc:
            return None, f"{EMULATOR_ENV_VAR}={emulator} does not load (build it: python -m tests.simt.build): {exc}"
    try:
        return importlib.import_module("fastgpt._C"), None
    except ImportError as exc:
        return None, (
            "the CUDA extension fastgpt._C is not built (this install had no nvcc, or "
            f"FASTGPT_SKIP_CUDA=1 was set): {exc}"
        )


@torch.compiler.assume_constant_result
def _cuda_extension_missing(emulator: str | None) -> str | None:
    """None when fastgpt._C (the emulator's build at path `emulator`, if one) imports, else why not."""
    return _import_cuda_extension(emulator)[1]


def cuda_extension():
    """The compiled module `fastgpt._C` (its host build under FASTGPT_CUDA_EMULATOR); raises
    BackendUnavailableError if it is not built."""
    module, reason = _import_cuda_extension(_emulator())
    if module is None:
        raise BackendUnavailableError(reason)
    return module


def why_not(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on tensors living on `device`, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "triton":
        reason = _triton_missing()
        if reason:
            return reason
        if device.type == "cuda" and torch.version.hip:  # ROCm's torch calls its devices "cuda" too
            return (f"fastgpt's Triton kernels are written for NVIDIA GPUs (they hold PTX: programmatic dependent "
                    f"launch, L2 prefetches, TMA) and this torch is ROCm's (HIP {torch.version.hip}): use "
                    f"backend='torch'")  # fmt: skip
        if device.type == "cuda" or (device.type == "cpu" and interpreting()):
            return None
        return (f"the triton backend needs CUDA tensors (got {device.type}; set TRITON_INTERPRET=1 to run "
                f"Triton's interpreter on CPU tensors)")
    if backend == "cuda":
        emulator = _emulator()
        reason = _cuda_extension_missing(emulator)
        if reason:
            return reason
        if emulator:
            return None if device.type == "cpu" else f"{EMULATOR_ENV_VAR} is set: the cuda backend takes CPU tensors"
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors (got {device.type})"
        if _cuda_code_arch(device.index) is None:
            if not torch.cuda.is_available():
                return "the cuda backend needs a CUDA GPU, and torch sees none"
            major, minor = torch.cuda.get_device_capability(device.index)
            return (f"fastgpt._C was built for {cuda_extension().archs} (FASTGPT_CUDA_ARCHS), none of which runs on "
                    f"this GPU (compute capability {major}.{minor}): rebuild with FASTGPT_CUDA_ARCHS naming it, "
                    f"e.g. '{major}{minor}'")  # fmt: skip
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def default_backend() -> str:
    """The backend used when an op is called with backend="auto": FASTGPT_BACKEND, else auto."""
    name = os.environ.get(ENV_VAR, "auto") or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {name!r}")
    return name


def resolve(
    op: str,
    backend: str,
    device: torch.device,
    unsupported: Callable[[str], str | None] = lambda name: None,
    preference: Sequence[str] = ("cuda", "triton"),
) -> str:
    """Pick the concrete backend ("cuda", "triton" or "torch") for one call of `op`.

    `unsupported(name)` returns why backend `name` cannot handle these particular inputs (dtype,
    head dim, ...), or None. `preference` orders the compiled backends for "auto" on a CUDA
    device: those `op` has. A FASTGPT_BACKEND default naming a backend `op` does not have (cuda
    for GPT's fused matmuls) leaves "auto" as it is; asked for by name, it raises.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        default = default_backend()
        backend = default if default in (*preference, "torch", "auto") else "auto"
    if backend != "auto":
        reason = why_not(backend, device) or unsupported(backend)
        if reason:
            raise BackendUnavailableError(f"{op}: backend={backend!r} is unavailable: {reason}")
        return backend
    if device.type == "cuda":
        for name in preference:
            if why_not(name, device) is None and unsupported(name) is None:
                return name
    return "torch"


def runs_on_triton(op: str, backend: str, device: torch.device) -> bool:
    """Whether `op`, a piece only Triton implements (GPT's fused decode matmuls, the decode step's
    bookkeeping), runs on Triton for a model whose ops run on `backend`: under "auto" where
    Triton can run (FASTGPT_BACKEND honoured), under "triton"; never under "cuda" or "torch",
    whose models keep the PyTorch form of that piece."""
    return backend in ("auto", "triton") and resolve(op, backend, device, preference=("triton",)) == "triton"


def report() -> dict[str, str]:
    """Backend name -> "available" or the reason it is not, for `fastgpt info`."""
    emulating = emulating_cuda()
    device = torch.device("cuda" if torch.cuda.is_available() and not emulating else "cpu")
    report = {name: why_not(name, device) or f"available ({device.type})" for name in BACKENDS[1:]}
    if emulating and why_not("cuda", device) is None:
        report["cuda"] = f"available (cpu: csrc's kernels on the SIMT emulator, {EMULATOR_ENV_VAR})"
    return report


@functools.cache
def launchers(backend: str, op: str):
    """The module holding `op`'s launchers for a compiled backend: fastgpt.kernels.<op> (Triton)
    or fastgpt.ops._cuda (CUDA). The Triton ones are imported on first use, so `import fastgpt`
    does not import Triton. Cached: every kernel call asks."""
    if backend == "triton":
        return importlib.import_module(f"fastgpt.kernels.{op}")
    if backend == "cuda":
        return importlib.import_module("fastgpt.ops._cuda")
    raise ValueError(f"no launchers for backend {backend!r}")
