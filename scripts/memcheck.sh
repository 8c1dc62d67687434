#!/usr/bin/env bash
# compute-sanitizer memcheck over a short run of every CUDA kernel of fastgpt._C (GPU machine).
# Shapes are small and awkward (partial tiles, Sq != Sk, GQA, clamped lengths, unaligned rows)
# so that any out-of-bounds access shows up. Exits non-zero on any reported error.
#
#   scripts/memcheck.sh            # needs the extension built: pip install -e . (with nvcc)
#   TOOL=racecheck scripts/memcheck.sh   # shared-memory races instead
set -euo pipefail

cd "$(dirname "$0")/.."
TOOL="${TOOL:-memcheck}"
if ! command -v compute-sanitizer >/dev/null; then
    for dir in "${CUDA_HOME:-}" /usr/local/cuda; do
        [ -n "$dir" ] && [ -x "$dir/compute-sanitizer/compute-sanitizer" ] && PATH="$dir/compute-sanitizer:$PATH"
        [ -n "$dir" ] && [ -x "$dir/bin/compute-sanitizer" ] && PATH="$dir/bin:$PATH"
    done
fi
if ! command -v compute-sanitizer >/dev/null; then  # toolkits that keep it outside bin/
    found=$(find /usr/local /opt -maxdepth 5 -name compute-sanitizer -type f -perm -u+x 2>/dev/null | head -1)
    [ -n "$found" ] && PATH="$(dirname "$found"):$PATH"
fi
command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found (CUDA toolkit)"; exit 2; }

script="$(mktemp --suffix=.py)"
trap 'rm -f "$script"' EXIT
cat >"$script" <<'EOF'
import torch
import fastgpt

assert torch.cuda.is_available(), "needs a GPU"
dev = "cuda"
r = lambda *s, dt=torch.bfloat16: torch.randn(*s, device=dev).to(dt)  # noqa: E731

for dt in (torch.bfloat16, torch.float16):
    for D in (64, 128):
        for (B, Hq, Hkv, Sq, Sk) in [(1, 2, 1, 1, 1), (2, 3, 3, 65, 65), (1, 4, 2, 33, 130), (1, 2, 2, 130, 47)]:
            for causal in (False, True):
                fastgpt.attention(r(B, Hq, Sq, D, dt=dt), r(B, Hkv, Sk, D, dt=dt), r(B, Hkv, Sk, D, dt=dt),
                                  causal=causal, backend="cuda")
        for (B, Hq, Hkv, Smax) in [(2, 6, 2, 37), (1, 16, 1, 3000), (3, 4, 4, 1)]:
            lens = torch.tensor([Smax + 5, 0, 1][:B], dtype=torch.int32, device=dev)
            fastgpt.decode_attention(r(B, Hq, 1, D, dt=dt), r(B, Hkv, Smax, D, dt=dt), r(B, Hkv, Smax, D, dt=dt),
                                     lens, backend="cuda")
for dt in (torch.float32, torch.bfloat16, torch.float16):
    for N in (1, 7, 100, 1024, 1030, 5000, 40000):
        x = r(3, N + 3, dt=dt)[:, 3:]  # unaligned rows: the scalar path
        fastgpt.layer_norm(x, torch.randn(N, device=dev), None, residual=r(3, N, dt=dt), backend="cuda")
        fastgpt.layer_norm(r(5, N, dt=dt), None, torch.randn(N, device=dev), backend="cuda")
        for rows in (5, 1100) if N <= 1030 else (5,):  # weight, bias in x's dtype: with x (<= 1024 rows) or late
            fastgpt.layer_norm(r(rows, N, dt=dt), r(N, dt=dt), r(N, dt=dt), residual=r(rows, N, dt=dt), backend="cuda")
    for V in (1, 3, 1000, 50257):
        logits = r(3, V, dt=dt)
        fastgpt.sample(logits, temperature=0.0, backend="cuda")
        fastgpt.sample(logits, temperature=0.8, top_k=min(40, V), top_p=0.9, min_p=0.05, backend="cuda")  # candidates
        fastgpt.sample(logits, temperature=0.8, top_p=0.9, backend="cuda")  # one block per row
torch.cuda.synchronize()
print("memcheck run: all kernels exercised")
EOF

if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
compute-sanitizer --tool "$TOOL" --error-exitcode 1 --print-limit 20 "$PY" "$script"
