"""Programmatic dependent launch (kernels/pdl.py): when kernels launch as dependents, and the
check that every such kernel waits for the previous grid before it touches memory (which the
compile checks of each kernel apply to its sm_90 PTX: tests/gpu_compile.py's compile_for)."""

import ast
from pathlib import Path

import pytest
import torch

from fastgpt import _backends
from fastgpt.kernels import pdl
from tests.gpu_compile import assert_waits_first, run_compile_check

_ENTRY = ".visible .entry k(\n.param .u64 k_param_0\n)\n{\n\tld.param.b64 \t%rd1, [k_param_0];\n"


def _ptx(*lines):
    return _ENTRY + "".join(f"\t{line}\n" for line in lines) + "\tret;\n}\n"


def test_launch_pdl_off_the_gpu(monkeypatch):
    monkeypatch.delenv("FASTGPT_PDL", raising=False)
    assert not _backends.launch_pdl(torch.device("cpu"))  # Triton's interpreter: no griddepcontrol there
    monkeypatch.setattr(_backends, "_capability", lambda index: 9)
    assert _backends.launch_pdl(torch.device("cuda", 0))
    with _backends.plain_launches():  # a captured step of many rows (fastgpt/_graphs.py)
        assert not _backends.launch_pdl(torch.device("cuda", 0))
        with _backends.plain_launches(False):  # an inner block does not turn it back on
            assert not _backends.launch_pdl(torch.device("cuda", 0))
    with _backends.plain_launches(False):
        assert _backends.launch_pdl(torch.device("cuda", 0))
    monkeypatch.setenv("FASTGPT_PDL", "0")
    assert not _backends.launch_pdl(torch.device("cuda", 0))


def test_pdl_report_says_why(monkeypatch):
    monkeypatch.delenv("FASTGPT_PDL", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _backends.pdl_report() == "off (no GPU)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_backends, "_capability", lambda index: 8)
    assert "needs compute capability 9.0" in _backends.pdl_report()
    monkeypatch.setattr(_backends, "_capability", lambda index: 9)
    monkeypatch.setattr(_backends, "_cuda_code_arch", lambda index: 90)
    assert _backends.pdl_report().startswith("on") and "plainly" not in _backends.pdl_report()
    monkeypatch.setattr(_backends, "_cuda_code_arch", lambda index: 80)  # sm_80 PTX JIT-compiled for a newer GPU
    assert _backends.pdl_report().endswith("the CUDA kernels' code for this GPU is sm_80's, without the wait: "
                                           "they launch plainly")
    monkeypatch.setenv("FASTGPT_PDL", "0")
    assert _backends.pdl_report() == "off (FASTGPT_PDL=0)"


@pytest.mark.parametrize("major, expected", [(7, False), (8, False), (9, True), (10, True), (12, True)])
def test_launch_pdl_by_capability(monkeypatch, major, expected):
    monkeypatch.delenv("FASTGPT_PDL", raising=False)
    monkeypatch.setattr(_backends, "_capability", lambda index: major)
    assert _backends.launch_pdl(torch.device("cuda", 0)) is expected


@pytest.mark.parametrize("archs, capability, expected", [
    ("80;90a", (8, 0), 80), ("80;90a", (8, 6), 80), ("80;90a", (8, 9), 80),  # an sm_80 cubin on any 8.x
    ("80;90a", (9, 0), 90), ("80;90a", (10, 0), None), ("80;90a", (12, 0), None), ("80;90a", (7, 5), None),
    ("80;90a+PTX", (10, 0), None),  # sm_90a PTX is for 9.0 only
    ("80+PTX;90a", (9, 0), 90), ("80+PTX;90a", (10, 0), 80), ("80+PTX;90+PTX", (12, 0), 90),
    ("86", (8, 0), None), ("80;86", (8, 9), 86), ("80,100", (10, 3), 100), ("unknown", (9, 0), None),
    ("100f", (10, 3), 100), ("100f+PTX", (10, 3), 100), ("120f", (12, 1), 120), ("100f+PTX", (12, 0), None),
    ("100a", (10, 3), None),  # a family target runs on its family's later minors; an "a" one does not
])  # fmt: skip
def test_code_arch_picks_the_code_cuda_runs(archs, capability, expected):
    assert _backends.code_arch(archs, capability) == expected


def test_a_gpu_the_extension_was_not_built_for_leaves_auto_to_triton(monkeypatch):
    """A Blackwell GPU (10.0) and the default build (sm_80, sm_90a): the cuda backend is unavailable,
    saying why, and auto takes Triton instead of failing at the first launch. Without a GPU (a CPU
    build of torch) it says that, rather than asking torch for a capability."""
    pytest.importorskip("fastgpt._C")
    monkeypatch.delenv("FASTGPT_BACKEND", raising=False)
    monkeypatch.delenv(_backends.EMULATOR_ENV_VAR, raising=False)
    monkeypatch.setattr(_backends, "_cuda_code_arch", lambda index: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (10, 0))
    cuda = torch.device("cuda", 0)
    reason = _backends.why_not("cuda", cuda)
    assert "none of which runs on this GPU (compute capability 10.0)" in reason and "FASTGPT_CUDA_ARCHS" in reason
    assert _backends.resolve("attention", "auto", cuda) == "triton"
    with pytest.raises(_backends.BackendUnavailableError, match="compute capability 10.0"):
        _backends.resolve("attention", "cuda", cuda)
    monkeypatch.setattr(_backends, "_cuda_code_arch", lambda index: 90)
    assert _backends.why_not("cuda", cuda) is None and _backends.resolve("attention", "cuda", cuda) == "cuda"
    monkeypatch.setattr(_backends, "_cuda_code_arch", lambda index: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _backends.why_not("cuda", cuda) == "the cuda backend needs a CUDA GPU, and torch sees none"


def test_waits_first_accepts_a_prefetch_before_the_wait():
    assert_waits_first(_ptx("cp.async.bulk.prefetch.L2.global [%rd1], %r1;", "griddepcontrol.wait;",
                            "griddepcontrol.launch_dependents;", "ld.global.b32 %r2, [%rd1];"))  # fmt: skip


@pytest.mark.parametrize("early", ["ld.global.b32 %r2, [%rd1];", "@%p1 ld.global.v4.b32 {%r2, %r3, %r4, %r5}, [%rd1];",
                                   "st.global.b32 [%rd1], %r2;", "atom.global.acq_rel.gpu.add.u32 %r2, [%rd1], 1;",
                                   "red.global.add.u32 [%rd1], 1;", "cp.async.cg.shared.global [%r3], [%rd1], 16;",
                                   "ld.global.nc.L1::evict_last.b16 %rs1, [%rd1];", "@%p1 bra $L__BB0_2;"])  # fmt: skip
def test_waits_first_rejects_memory_before_the_wait(early):
    with pytest.raises(AssertionError, match="before griddepcontrol.wait"):
        assert_waits_first(_ptx(early, "griddepcontrol.wait;", "griddepcontrol.launch_dependents;"))


def test_waits_first_needs_the_wait_before_the_signal():
    with pytest.raises(AssertionError, match="no griddepcontrol.wait"):
        assert_waits_first(_ptx("ld.global.b32 %r2, [%rd1];", "griddepcontrol.launch_dependents;"))
    with pytest.raises(AssertionError):
        assert_waits_first(_ptx("griddepcontrol.launch_dependents;", "griddepcontrol.wait;"))


def compile_prefetch(arch):
    """_prefetch_l2 lowers to one bulk prefetch a row (sm_90 only: none is compiled for sm_80)."""
    import triton
    import triton.language as tl

    from tests.gpu_compile import compile_for

    @triton.jit
    def _kernel(w_ptr, stride_w, nbytes, out_ptr, PDL: tl.constexpr):
        rows = tl.arange(0, 16)
        if PDL:
            pdl._prefetch_l2(w_ptr + rows.to(tl.int64) * stride_w, tl.full([16], nbytes, tl.int32))
        pdl._wait_for_previous_grid(PDL)
        tl.store(out_ptr + rows, tl.load(w_ptr + rows * stride_w))

    kernel = compile_for(_kernel, {"w_ptr": "*bf16", "out_ptr": "*bf16"}, {}, arch=arch, num_warps=4, num_stages=1)
    ptx = kernel.asm["ptx"]
    assert ("cp.async.bulk.prefetch.L2.global" in ptx) == (arch >= 90)
    assert ("griddepcontrol.wait" in ptx) == (arch >= 90)


def test_prefetch_compiles():
    run_compile_check("tests.test_pdl.compile_prefetch")


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 32])
def test_gpu_decode_step_is_the_same_launched_as_dependents(monkeypatch, B):
    """GPT-2's decode step (B1: Triton kernels throughout; B32: CUDA's decode attention among
    them, where the extension is built) gives the same logits and cache to the bit with its kernels
    launched as programmatic dependents as without, eagerly and over 20 graph replays: a kernel
    that touched memory before its wait would read a half-written input and move them."""
    from fastgpt.bench.timing import capture_graph
    from fastgpt.decoder import KVCache
    from fastgpt.model import GPT, GPTConfig

    if torch.cuda.get_device_capability()[0] < _backends.PDL_MIN_CAPABILITY:
        pytest.skip("programmatic dependent launch needs sm_90 or later")
    config = GPTConfig(n_layer=4)
    torch.manual_seed(0)
    model = GPT(config).to("cuda", torch.bfloat16).eval()
    cache = KVCache(config, B, 288, torch.bfloat16, "cuda")
    cache.kv.normal_()
    tok = torch.randint(0, config.vocab_size, (B,), device="cuda")
    pos = torch.randint(100, 287, (B,), device="cuda")
    seqlens = (pos + 1).int()
    with torch.inference_mode():
        monkeypatch.setenv("FASTGPT_PDL", "0")
        expected, expected_kv = model.decode(tok, pos, cache, seqlens).clone(), cache.kv.clone()
        assert expected.isfinite().all()  # so that equality below means something
        monkeypatch.setenv("FASTGPT_PDL", "1")
        assert torch.equal(model.decode(tok, pos, cache, seqlens), expected)
        assert torch.equal(cache.kv, expected_kv)
        logits = {}
        graph = capture_graph(lambda _: logits.update(step=model.decode(tok, pos, cache, seqlens)), 1)
        for _ in range(20):
            logits["step"].fill_(float("nan"))
            graph.replay()
            assert torch.equal(logits["step"], expected)
        assert torch.equal(cache.kv, expected_kv)


def _launches(tree):
    """(kernel name, call) of each kernel launch, kernel[grid](...), in a module's syntax tree."""
    for node in ast.walk(tree):
        launch = isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
        if launch and isinstance(node.func.value, ast.Name):
            yield node.func.value.id, node


def test_every_dependent_launch_compiles_the_wait():
    """A launch as a programmatic dependent (launch_pdl=...) of a kernel compiled without the wait
    would race, and a kernel compiled with it but launched plainly gains nothing: in kernels/,
    every launch that passes launch_pdl or PDL passes both, as the same expression, and those
    launches are exactly the kernels that take PDL."""
    takes_pdl, launched = set(), set()
    for path in sorted((Path(__file__).resolve().parents[1] / "kernels").rglob("*.py")):
        tree = ast.parse(path.read_text())
        takes_pdl |= {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name.endswith("_kernel")
                      and "PDL" in [a.arg for a in f.args.args]}  # fmt: skip
        for kernel, call in _launches(tree):
            keywords = {k.arg: ast.dump(k.value) for k in call.keywords}
            if "launch_pdl" in keywords or "PDL" in keywords:
                assert keywords.get("launch_pdl") == keywords.get("PDL"), (path.name, kernel)
                launched.add(kernel)
    assert launched == takes_pdl
    assert {"_linear_kernel", "_decode_split_kernel", "_greedy_advance_kernel", "_candidate_draw_kernel"} <= launched
