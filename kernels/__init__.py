"""Triton kernels, one module per op; installed as `fastgpt.kernels`.

Each module holds the kernels (`@triton.jit`, math and memory only) and a launcher that picks the
grid and block sizes and allocates the outputs. `fastgpt.ops` validates inputs and calls the
launchers; nothing is imported here so that importing the package never imports Triton.
"""
