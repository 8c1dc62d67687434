"""Build script: the pure-Python package, plus the CUDA extension fastgpt._C when nvcc is found.

`kernels/` (the Triton kernels) is installed as `fastgpt.kernels`, so the repository keeps a
top-level layout while imports stay `fastgpt.*`.
"""

from setuptools import setup

PACKAGES = ["fastgpt", "fastgpt.ops", "fastgpt.bench", "fastgpt.kernels"]

setup(
    packages=PACKAGES,
    package_dir={"fastgpt": "fastgpt", "fastgpt.kernels": "kernels"},
)
