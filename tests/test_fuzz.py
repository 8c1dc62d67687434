"""scripts/fuzz.py, the random-case check of every kernel op against the reference: a few cases
here (on CPU: Triton's interpreter, and the CUDA kernels on tests/simt's emulator); run it for
minutes by hand (its docstring says how)."""

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _fuzz(*args, **env_vars):
    env = {**os.environ, "TRITON_INTERPRET": "1", **env_vars}
    return subprocess.run([sys.executable, "scripts/fuzz.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_fuzz_cases_pass():
    proc = _fuzz("--cases", "7", "--seed", "0")  # one case of each op
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "7 cases on cpu, 0 failed" in proc.stdout


def test_fuzz_cases_pass_on_the_cuda_kernels(simt_module):
    proc = _fuzz("--cases", "40", "--seed", "0", "--backends", "cuda", "--ops",
                 "attention,masked_attention,decode,layer_norm,sample", FASTGPT_CUDA_EMULATOR=str(simt_module))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "40 cases on cpu, 0 failed" in proc.stdout


def test_fuzz_reports_a_failure_with_its_replay():
    """A case that cannot pass (the cuda backend, not built on this machine, on CPU tensors) is a
    failure naming the arguments that replay it, and the exit status says so."""
    proc = _fuzz("--cases", "1", "--seed", "7", "--ops", "layer_norm", "--backends", "cuda")
    assert proc.returncode == 1
    assert "replay: --ops layer_norm --backends cuda --seed 7 --cases 1" in proc.stdout


def test_fuzz_leaves_linear_out_where_triton_cannot_run(simt_module):
    """--backends cuda on the emulator outside Triton's interpreter: the fused linear and the
    persistent step (Triton kernels only) have nowhere to run, so their turns are left out, not failed."""
    proc = _fuzz("--cases", "12", "--seed", "0", "--backends", "cuda", FASTGPT_CUDA_EMULATOR=str(simt_module),
                 TRITON_INTERPRET="0")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "9 cases on cpu, 0 failed, 3 linear and step turns left out" in proc.stdout
