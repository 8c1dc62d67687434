"""The CUDA backend without a GPU: the extension build, its pointer-level validation, the Python
launchers' checks, and how fastgpt reports the backend when the extension is absent.

The fresh build is marked `slow` (about a minute for one architecture on 2 cores; the suite
runs it, `-m "not slow"` leaves it out); the nvcc checks of the attention and decode kernels
take up to 25 s each; the other tests a second.
"""

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastgpt
from fastgpt import _backends
from fastgpt.ops import _cuda

ROOT = Path(__file__).resolve().parent.parent
HAS_NVCC = shutil.which("nvcc") is not None
ELF_MAGIC = b"\x7fELF"


def _built_extension():
    try:
        return importlib.import_module("fastgpt._C")
    except ImportError:
        return None


requires_built = pytest.mark.skipif(_built_extension() is None, reason="fastgpt._C is not built here")


@pytest.fixture
def no_extension(monkeypatch):
    """fastgpt as installed without the extension: `import fastgpt._C` fails."""
    monkeypatch.setitem(sys.modules, "fastgpt._C", None)
    _backends._import_cuda_extension.cache_clear()
    yield
    _backends._import_cuda_extension.cache_clear()


# ----------------------------------------------------------------------------- the build


@pytest.mark.slow
@pytest.mark.skipif(not HAS_NVCC, reason="nvcc not found")
def test_fresh_build_produces_an_importable_elf_extension(tmp_path):
    env = dict(os.environ, FASTGPT_CUDA_ARCHS=os.environ.get("FASTGPT_CUDA_ARCHS", "80"), MAX_JOBS="2",
               FASTGPT_WERROR="1", FASTGPT_SKIP_CUDA="0")
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
           "--build-temp", str(tmp_path / "tmp")]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (so,) = (tmp_path / "lib" / "fastgpt").glob("_C*.so")
    assert so.read_bytes()[:4] == ELF_MAGIC
    # Import that file (not the source tree's) in a fresh interpreter, on a machine without a GPU.
    probe = (
        "import importlib.util, sys; spec = importlib.util.spec_from_file_location('fastgpt._C', sys.argv[1]); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "print(m.archs, m.decode_num_splits(1, 8, 8, 1, 4096, 100, 4))"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(so)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == env["FASTGPT_CUDA_ARCHS"]


def test_skip_cuda_builds_the_pure_python_package(tmp_path):
    env = dict(os.environ, FASTGPT_SKIP_CUDA="1")
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("fastgpt")
    assert "building without the CUDA extension fastgpt._C: FASTGPT_SKIP_CUDA=1" in result.stderr


def test_gencode_flags():
    spec = importlib.util.spec_from_file_location("fastgpt_setup", ROOT / "setup.py")
    setup_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_module)  # defines the helpers; setup() runs only as __main__
    assert setup_module.gencode_flags("80;90a") == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
    ]
    assert setup_module.gencode_flags("90+PTX")[-1] == "-gencode=arch=compute_90,code=compute_90"
    with pytest.raises(ValueError, match="cannot parse"):
        setup_module.gencode_flags("sm_80")


@requires_built
def test_inplace_extension_is_elf_and_has_the_kernels():
    C = _built_extension()
    assert Path(C.__file__).read_bytes()[:4] == ELF_MAGIC
    for name in ("attention", "decode_attention", "decode_num_splits", "decode_blocks_per_sm", "layer_norm", "sample"):
        assert callable(getattr(C, name))
    assert C.cuda_version >= 11080


# ----------------------------------------------------------------------------- the extension's own checks


@requires_built
def test_extension_validates_before_touching_the_gpu():
    C = _built_extension()
    s3 = (8192, 1024, 64)
    no_mask = (0, (0, 0, 0))  # the mask pointer and its strides
    with pytest.raises(ValueError, match=r"fastgpt\._C\.attention: head dim must be 64 or 128, got 96"):
        C.attention(16, 16, 16, 16, 0, *no_mask, 1, 1, 1, 1, 1, 96, s3, s3, s3, s3, False, 1.0, 1, 0, 0, False)
    with pytest.raises(ValueError, match="unsupported dtype code 0"):
        C.attention(16, 16, 16, 16, 0, *no_mask, 1, 1, 1, 1, 1, 64, s3, s3, s3, s3, False, 1.0, 0, 0, 0, False)
    with pytest.raises(ValueError, match="must be a multiple of heads_kv"):
        C.attention(16, 16, 16, 16, 0, *no_mask, 1, 3, 2, 1, 1, 64, s3, s3, s3, s3, False, 1.0, 1, 0, 0, False)
    with pytest.raises(ValueError, match="q must be 16-byte aligned"):
        C.attention(18, 16, 16, 16, 0, *no_mask, 1, 1, 1, 1, 1, 64, s3, s3, s3, s3, False, 1.0, 1, 0, 0, False)
    with pytest.raises(ValueError, match="strides must be multiples of 8"):
        C.attention(16, 16, 16, 16, 0, *no_mask, 1, 1, 1, 1, 1, 64, (8192, 1024, 65), s3, s3, s3, False, 1.0, 1, 0,
                    0, False)  # fmt: skip
    with pytest.raises(ValueError, match=r"sequence lengths must be in \[1, 2\^30\]"):
        C.attention(16, 16, 16, 16, 0, *no_mask, 1, 1, 1, 1, 2**31 - 1, 64, s3, (8192, 1024, 0), (8192, 1024, 0), s3,
                    False, 1.0, 1, 0, 0, False)  # fmt: skip
    with pytest.raises(ValueError, match="lse must be null or an aligned fp32 pointer"):
        C.attention(16, 16, 16, 16, 18, *no_mask, 1, 1, 1, 1, 1, 64, s3, s3, s3, s3, False, 1.0, 1, 0, 0, False)
    with pytest.raises(ValueError, match="mask strides must be >= 0"):
        C.attention(16, 16, 16, 16, 0, 16, (0, -1, 1), 1, 1, 1, 1, 1, 64, s3, s3, s3, s3, False, 1.0, 1, 0, 0, False)
    with pytest.raises(ValueError, match="residual and h must be given together"):
        C.layer_norm(16, 16, 0, 0, 16, 0, 1, 8, 8, 8, 8, 8, 1e-5, 0, 0, 0, 0, 0, False)
    with pytest.raises(ValueError, match=r"vocab must be in \[1, 2\^24\)"):
        C.sample(16, 16, 16, 16, 16, 16, 16, 0, 0, False, 1, 1 << 24, 1 << 24, 0, 0, 0, False)
    with pytest.raises(ValueError, match="null pointer"):
        C.sample(16, 0, 16, 16, 16, 16, 16, 0, 0, False, 1, 10, 10, 0, 0, 0, False)
    with pytest.raises(ValueError, match=r"cand_k must be 0 or a power of two in \[16, 256\], got 48"):
        C.sample(16, 16, 16, 16, 16, 16, 16, 16, 48, True, 1, 10, 10, 0, 0, 0, False)
    for workspace in (0, 24):
        with pytest.raises(ValueError, match="needs its workspace, 16-byte aligned"):
            C.sample(16, 16, 16, 16, 16, 16, 16, workspace, 64, True, 1, 10, 10, 0, 0, 0, False)
    with pytest.raises(ValueError, match="batch x vocabulary chunks must be < 2\\^31"):
        C.sample(16, 16, 16, 16, 16, 16, 16, 16, 64, True, 2**31 - 1, 5000, 5000, 0, 0, 0, False)
    # 50 chunks of 1024: 50 x 64 candidates, a list of 512, 50 x 16 group maxima, the bound and the count
    assert C.sample_workspace_bytes(1, 50257, 64) == 50 * 64 * 8 + 512 * 8 + 50 * 16 * 4 + 16 + 16
    assert C.sample_workspace_bytes(3, 1024, 16) == 3 * 16 * 8 + 3 * 512 * 8 + 3 * 16 * 4 + 16 + 16
    assert C.sample_workspace_bytes(8, 50257, 0) == 0


def _decode_args(**changes) -> dict:
    """decode_attention's binding arguments, valid (B 2, Hq 4, Hkv 2, Sq 3, Smax 8, D 64, 2 splits,
    contiguous, pointers 16-byte aligned) but for `changes`."""
    args = dict(q=16, k_cache=16, v_cache=16, seqlens=16, o=16, o_partial=16, lse_partial=16, counters=0,
                num_counters=0, lse=0, mask=0, stride_mask=(0, 0, 0), batch=2, heads_q=4, heads_kv=2, seqlen_q=3,
                max_seqlen=8, head_dim=64, num_splits=2, stride_q=(768, 192, 64), stride_k=(1024, 512, 64),
                stride_v=(1024, 512, 64), causal=True, scale=0.125, dtype=2, device=0, stream=0, pdl=False)
    return {**args, **changes}


@requires_built
@pytest.mark.parametrize("changes, message", [
    ({"o_partial": 0}, "num_splits > 1 needs the fp32 workspaces"),
    ({"counters": 16, "num_counters": 23},  # one per (row, head, query): 2 * 4 * 3
     r"counters must be null or .* at least batch \* heads_q \* seqlen_q = 24 zeros, got 23"),
    ({"lse": 18}, "lse must be null or an aligned fp32 pointer"),
    ({"mask": 16, "stride_mask": (0, -8, 8)}, "mask strides must be >= 0"),
    ({"mask": 16, "stride_mask": (0, 0, -8)}, "mask strides must be >= 0"),  # the query's
    ({"seqlen_q": 0}, r"seqlen_q must be in \[1, 2\^30\], got 0"),
    ({"seqlen_q": 2**30 + 1}, r"seqlen_q must be in \[1, 2\^30\]"),
    ({"stride_q": (768, 192, 65)}, "q's strides must be multiples of 8"),  # the query stride
    ({"batch": 65535, "heads_q": 65535, "heads_kv": 65535, "seqlen_q": 2},
     r"batch \* heads_q \* seqlen_q \* num_splits is too large"),
    ({"batch": 1, "heads_q": 64, "heads_kv": 64, "seqlen_q": 2**14},  # 64 kv heads x 2048 tiles of 8 queries
     "too many .* tiles for the grid"),
    ({"batch": 1, "heads_q": 64, "heads_kv": 8, "seqlen_q": 8192, "num_splits": 1},  # 8 x 8192 tiles: one too many
     "too many .* tiles for the grid"),
])  # fmt: skip
def test_decode_binding_validates_its_arguments(changes, message):
    """The decode binding's checks of several queries a row, each before anything is launched (the
    pointers are not real: a launch would fault)."""
    C = _built_extension()
    with pytest.raises(ValueError, match=rf"fastgpt\._C\.decode_attention: {message}"):
        C.decode_attention(**_decode_args(**changes))


@requires_built
def test_decode_occupancy_and_splits_validate_their_arguments():
    C = _built_extension()
    with pytest.raises(ValueError, match=r"decode_blocks_per_sm: seqlen_q must be in \[1, 2\^30\], got 0"):
        C.decode_blocks_per_sm(dtype=2, head_dim=64, heads_q=1, heads_kv=1, seqlen_q=0, masked=False, device=0)
    with pytest.raises(ValueError, match="decode_num_splits: invalid shapes"):
        C.decode_num_splits(1, 8, 8, 0, 4096, 132, 4)


def _nvcc(source: str, arch: str, out: Path, *flags: str) -> subprocess.CompletedProcess:
    """csrc/<source>.cu compiled alone for `arch` into `out` (-cubin, -ptx, ... in flags); fails the test on errors."""
    src = Path(__file__).resolve().parents[1] / "csrc" / f"{source}.cu"
    proc = subprocess.run(["nvcc", "-std=c++17", "-O3", f"-arch={arch}", *flags, str(src), "-o", str(out)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _assert_each_kernel_waits(ptx: str, arch: str, kernels: int):
    """On sm_90a every kernel waits for the kernel before it ahead of any memory access, as a
    programmatic dependent must (csrc/common.cuh's launch_kernel); sm_80 code has no wait (and is
    never launched as a dependent)."""
    from tests.gpu_compile import assert_waits_first

    entries = ptx.split(".visible .entry")[1:]
    assert len(entries) == kernels
    for entry in entries:
        if arch == "sm_80":
            assert "griddepcontrol" not in entry
        else:
            assert_waits_first(".visible .entry" + entry)


# (fp16, bf16) x (D 64, 128) x (masked or not); and for decode ... x row tiles (one query: 1-8,
# several: 2-8) x masked, and combine
ATTENTION_KERNELS = {"attention": 2 * 2 * 2, "decode": 2 * 2 * (4 + 3) * 2 + 2}


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("source", ATTENTION_KERNELS)
def test_attention_kernels_fit_their_registers_and_wait(source, arch, tmp_path):
    """Every attention and decode kernel instance fits its registers (the unmasked MHA decode one
    under a 5-blocks-an-SM bound), those of several queries a row too; and waits as a dependent
    (_assert_each_kernel_waits). One nvcc run gives both: -cubin (no host code, half the time of
    -c) keeps the PTX it assembled."""
    import re

    proc = _nvcc(source, arch, tmp_path / "kernels.cubin", "-cubin", "-Xptxas", "-v", "--keep", "--keep-dir",
                 str(tmp_path))  # fmt: skip
    spills = re.findall(r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores", proc.stderr, re.S)
    assert len(spills) == ATTENTION_KERNELS[source]
    assert all(n == "0" for _, n in spills), [name for name, n in spills if n != "0"]
    if source == "decode":  # a decode step's unmasked GQA tile of 2 heads (Hq = 2 Hkv) at 4 blocks an SM: <= 128
        used = re.findall(r"Compiling entry function '(\w+)'.*?Used (\d+) registers", proc.stderr, re.S)
        # <T, D, GROUP 2, MASKED false, MULTI false>
        pairs = [int(n) for name, n in used if "decode_split_kernel" in name and "Li2ELb0ELb0E" in name]
        assert len(pairs) == 4 and max(pairs) <= 128, pairs
    _assert_each_kernel_waits((tmp_path / f"{source}.ptx").read_text(), arch, ATTENTION_KERNELS[source])


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("source, kernels", [
    # (fp32, fp16, bf16) x ((16-byte with scalar or vector params, scalar) x (3 warp, 1 block) + 3 warp
    # with early params), and looped
    ("layer_norm", 3 * (3 * 4 + 3) + 3),
    ("sampling", 3 * 4 + 1),  # (fp32, fp16, bf16) x (one block a row, group maxima, candidates, draw), key bound
])  # fmt: skip
def test_kernels_wait_for_the_previous_grid(source, kernels, arch, tmp_path):
    """The other kernels wait as dependents too (attention's and decode's: the test above)."""
    _nvcc(source, arch, tmp_path / "kernels.ptx", "-ptx")
    _assert_each_kernel_waits((tmp_path / "kernels.ptx").read_text(), arch, kernels)


@requires_built
def test_num_splits_fill_the_last_wave():
    """The fewest splits whose last wave over the GPU is at least 90% full, else the fullest; no
    split under 128 positions, at most 64; shapes and the GPU only."""
    C = _built_extension()
    assert C.decode_num_splits(64, 12, 12, 1, 4096, 132, 4) == 2  # 768 blocks: 1.45 waves of 528, 2.9 in 2 splits
    assert C.decode_num_splits(44, 12, 12, 1, 4096, 132, 4) == 1  # 528 blocks: one full wave
    assert C.decode_num_splits(64, 32, 32, 1, 128, 132, 4) == 1  # short cache: 128 positions a split at least
    assert C.decode_num_splits(1, 12, 12, 1, 1024, 132, 4) == 8  # short of a wave: as many as the length allows
    assert C.decode_num_splits(1, 12, 12, 1, 1 << 20, 132, 4) == 40  # 480 of 528 slots: the first 90% fill
    assert C.decode_num_splits(1, 1, 1, 1, 1 << 20, 132, 4) == 64  # at most 64
    assert C.decode_num_splits(2, 64, 8, 1, 4096, 132, 4) == 30  # GQA: 8 query heads a block, 16 blocks: 480 of 528
    # Several queries: a kv head's (query head, query) pairs in tiles of up to 8, one block each.
    assert C.decode_num_splits(2, 64, 8, 4, 4096, 132, 4) == 8  # 32 pairs a kv head, 4 tiles: 64 blocks
    assert C.decode_num_splits(64, 12, 12, 2, 4096, 132, 4) == 2  # MHA, 2 queries: one tile a head, as 1
    assert C.decode_num_splits(1, 12, 12, 16, 1 << 20, 132, 4) == 20  # 2 tiles a head: 24 blocks, 480 in 20 splits
    with pytest.raises(ValueError, match=r"blocks_per_sm must be in \[1, 1024\], got 0"):
        C.decode_num_splits(1, 12, 12, 1, 1024, 132, 0)


# ----------------------------------------------------------------------------- the launchers


@pytest.mark.parametrize("built", [True, False], ids=["as-installed", "without-extension"])
def test_launchers_require_cuda_tensors(built, request):
    """The launchers name a misplaced tensor before they ask for the extension, built or not."""
    if not built:
        request.getfixturevalue("no_extension")
    q = torch.randn(1, 2, 3, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"attention \(cuda backend\): q must be a CUDA tensor"):
        _cuda.attention(q, q, q, causal=False, scale=0.125)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        _cuda.decode_attention(q[:, :, :1], q, q, torch.ones(1, dtype=torch.int32), scale=0.125)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        _cuda.layer_norm(x, None, None, eps=1e-5)
    p = torch.ones(4)
    with pytest.raises(ValueError, match="logits must be a CUDA tensor"):
        _cuda.sample(x, p, p.long(), p.double(), p, torch.zeros(1, dtype=torch.int64))


def test_launchers_name_the_supported_head_dims_and_dtypes():
    with pytest.raises(ValueError, match=r"head dim must be one of \(64, 128\), got 96"):
        _cuda._head_dim_supported("attention", torch.empty(1, 1, 1, 96, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="q must be float16, bfloat16, got torch.float32"):
        _cuda._head_dim_supported("attention", torch.empty(1, 1, 1, 64))
    with pytest.raises(TypeError, match="x must be float32, float16, bfloat16, got torch.float64"):
        _cuda._dtype_code("layer_norm", "x", torch.empty(2, dtype=torch.float64))


def test_vector_ready_keeps_aligned_views_and_copies_the_rest():
    base = torch.randn(2, 4, 16, 64, dtype=torch.float16)
    assert _cuda._vector_ready(base) is base
    transposed = base.transpose(1, 2)  # strides (4096, 64, 1024, 1): still 16-byte vectors
    assert _cuda._vector_ready(transposed) is transposed
    narrow = torch.randn(2, 4, 16, 68, dtype=torch.float16)[..., :64]  # row stride 68: not a multiple of 8
    fixed = _cuda._vector_ready(narrow)
    assert fixed is not narrow and fixed.is_contiguous() and torch.equal(fixed, narrow)
    offset = torch.randn(4 * 64 + 1, dtype=torch.float16)[1:].view(1, 1, 4, 64)  # misaligned data pointer
    assert _cuda._vector_ready(offset).data_ptr() % 16 == 0


def test_launchers_check_the_shapes_the_extension_cannot_see():
    t = torch.empty(2, 3, 5, 64, dtype=torch.float16)
    _cuda._require_shape("attention", "k", t, (2, 3, 5, 64), torch.float16)
    _cuda._require_shape("layer_norm", "weight", None, (64,))
    with pytest.raises(ValueError, match=r"attention \(cuda backend\): k must have shape \(2, 3, 7, 64\)"):
        _cuda._require_shape("attention", "k", t, (2, 3, 7, 64))
    with pytest.raises(TypeError, match="v must be torch.bfloat16"):
        _cuda._require_shape("attention", "v", t, (2, 3, 5, 64), torch.bfloat16)
    with pytest.raises(ValueError, match="top_k must have shape"):
        _cuda._require_shape("sample", "top_k", torch.zeros(1, dtype=torch.int64), (4,))


def test_size_one_dims_get_stride_zero():
    t = torch.empty(1, 3, 1, 64)
    assert _cuda._strides(t, (0, 1, 2)) == (0, 64, 0)


# ----------------------------------------------------------------------------- extension absent


def test_without_extension_cuda_backend_is_reported_unavailable(no_extension):
    reason = _backends.why_not("cuda", torch.device("cuda"))
    assert reason and "fastgpt._C is not built" in reason
    assert _backends.why_not("cuda", torch.device("cpu"))
    assert "not built" in _backends.report()["cuda"]


def test_without_extension_backend_cuda_raises(no_extension):
    q = torch.randn(1, 2, 5, 64)
    with pytest.raises(fastgpt.BackendUnavailableError, match="not built"):
        fastgpt.attention(q, q, q, backend="cuda")
    with pytest.raises(fastgpt.BackendUnavailableError, match="not built"):
        fastgpt.layer_norm(torch.randn(3, 8), None, None, backend="cuda")
    with pytest.raises(fastgpt.BackendUnavailableError, match="not built"):
        fastgpt.sample(torch.randn(2, 10), backend="cuda")
    lens = torch.full((1,), 5, dtype=torch.int32)
    with pytest.raises(fastgpt.BackendUnavailableError, match="not built"):
        fastgpt.decode_attention(q[:, :, :1], q, q, lens, backend="cuda")


def test_without_extension_auto_still_works_on_cpu(no_extension):
    x = torch.randn(3, 8)
    torch.testing.assert_close(fastgpt.layer_norm(x, None, None), torch.nn.functional.layer_norm(x, (8,)))


def test_cpu_tensors_with_extension_say_cuda_tensors_are_needed():
    if _built_extension() is None:
        pytest.skip("fastgpt._C is not built here")
    _backends._import_cuda_extension.cache_clear()
    assert "needs CUDA tensors" in _backends.why_not("cuda", torch.device("cpu"))
