#!/usr/bin/env bash
# Builds the fastgpt wheel, checks that it holds the CUDA extension, installs it into a scratch
# directory (no dependencies: torch etc. come from this environment) and imports it from outside
# the source tree, where no GPU is needed. Needs nvcc.
#
#   FASTGPT_CUDA_ARCHS  architectures to build (default here: 80, the quickest; the package default is 80;90a)
#   MAX_JOBS            parallel compile jobs (default 2)
#   PIP_ARGS            extra `pip wheel` arguments, e.g. --no-build-isolation
set -euo pipefail

cd "$(dirname "$0")/.."
export FASTGPT_CUDA_ARCHS="${FASTGPT_CUDA_ARCHS:-80}" MAX_JOBS="${MAX_JOBS:-2}" FASTGPT_WERROR="${FASTGPT_WERROR:-1}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

echo "== pip wheel (archs $FASTGPT_CUDA_ARCHS, $MAX_JOBS jobs)"
# shellcheck disable=SC2086
python -m pip wheel . --no-deps -w "$scratch/dist" ${PIP_ARGS:-}
wheel="$(ls "$scratch"/dist/fastgpt-*.whl)"
echo "== wheel: $(basename "$wheel")"

python - "$wheel" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
ext = [n for n in names if n.startswith("fastgpt/_C") and n.endswith(".so")]
assert ext, f"the wheel has no fastgpt/_C*.so: {names}"
for required in ("fastgpt/ops/_cuda.py", "fastgpt/kernels/__init__.py", "fastgpt/reference.py",
                 "fastgpt/bench/cases/__init__.py"):
    assert required in names, f"the wheel lacks {required}"
print("contains", ext[0])
EOF

echo "== install into a scratch directory and import from outside the source tree"
python -m pip install --no-deps --target "$scratch/site" "$wheel" >/dev/null
(cd "$scratch" && PYTHONPATH="$scratch/site" python - <<'EOF'
import fastgpt, fastgpt._C, fastgpt.bench.session, fastgpt.kernels.attention, fastgpt.model
from fastgpt import _backends
assert fastgpt.__file__.startswith(sys_prefix := __import__("os").environ["PYTHONPATH"]), fastgpt.__file__
print("imported", fastgpt._C.__file__, "archs", fastgpt._C.archs)
print("backends:", _backends.report())
EOF
)
echo "OK"
