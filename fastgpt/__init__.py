"""fastgpt: fused GPU kernels for GPT inference, behind one PyTorch API.

    fastgpt.attention(q, k, v, causal=True)              prefill attention (GQA, bottom-right causal)
    fastgpt.attention(q, k, v, return_lse=True)          ... and each query's log-sum-exp (AttentionOutput)
    fastgpt.decode_attention(q, k_cache, v_cache, lens)  a row's new tokens over a static KV cache
    fastgpt.layer_norm(x, w, b, residual=r)              fused residual add + LayerNorm
    fastgpt.filter_logits / fastgpt.sample               Hugging Face sampling semantics, fused
    fastgpt.GPT.from_pretrained("gpt2")                  GPT-2 on these kernels

Every kernel op takes backend="auto" | "cuda" | "triton" | "torch" (default: FASTGPT_BACKEND).
"""

from fastgpt._backends import AttentionOutput, BackendUnavailableError
from fastgpt.ops import linear as _linear  # noqa: F401 (registers torch.ops.fastgpt.linear, GPT.decode's op)
from fastgpt.ops.attention import attention
from fastgpt.ops.decode import decode_attention
from fastgpt.ops.layer_norm import layer_norm
from fastgpt.ops.sampling import filter_logits, sample

__version__ = "0.1.0"

__all__ = [
    "AttentionOutput",
    "BackendUnavailableError",
    "GPT",
    "attention",
    "decode_attention",
    "filter_logits",
    "layer_norm",
    "sample",
]


def __getattr__(name):
    # GPT pulls in the model code; load it on first use so `import fastgpt` stays light.
    if name == "GPT":
        from fastgpt.model import GPT

        return GPT
    raise AttributeError(f"module 'fastgpt' has no attribute {name!r}")
