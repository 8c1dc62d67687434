"""fastgpt: fused GPU kernels for GPT inference."""
