"""A SIMT emulator that runs csrc/'s CUDA kernels on the CPU for tests (include/simt.h)."""
