"""fastgpt inside Hugging Face transformers models.

    import fastgpt.hf
    fastgpt.hf.register()                     # once: adds attn_implementation="fastgpt"
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fastgpt")
    fastgpt.hf.patch(model)                   # optional: nn.LayerNorm -> fastgpt.nn.LayerNorm

register() adds fastgpt's attention to transformers' AttentionInterface, so every model that
dispatches attention through that interface (GPT-2, Llama-style GQA models, ...) can use it. It
also registers the name in the AttentionMaskInterface with transformers' SDPA mask builder, so the
model hands over a mask exactly when SDPA would get one: None when plain causal attention is
right (then fastgpt.attention runs), a boolean (B, 1, Sq, Sk) mask when there is padding or a
static cache (then fastgpt.ops.attention.masked_attention runs: the Triton kernel reading the mask
on a GPU, plain PyTorch on CPU).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import fastgpt
from fastgpt.ops import attention as ops_attention

NAME = "fastgpt"
INSTEAD = "use attn_implementation='eager' (or 'sdpa' where the model supports it)"
# Keyword arguments that change attention's math beyond what the kernels compute, and what they are:
# Gemma 2's soft-capping, gpt-oss's sinks, T5-style relative position biases, and the sparse
# attention of DeepSeek-V3.2-style indexers, whose key indices transformers folds into the mask
# only for "eager" and "sdpa".
UNSUPPORTED_KWARGS = {
    "softcap": "attention logit soft-capping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "position_bias": "an additive position bias",
    "indices": "sparse attention over selected keys",
    "block_indices": "block-sparse attention",
}


def masked_attention(q, k, v, mask, scale, backend: str = "auto"):
    """Attention under transformers' boolean mask (True = attend).

    q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D); mask (B or 1, 1 or Hq, Sq, Sk) bool. A query that may
    attend to nothing returns zeros.
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"attn_implementation='fastgpt' expects a boolean attention mask (True = attend, as "
                         f"transformers' sdpa_mask builds it), got {mask.dtype}: additive masks and biases (ALiBi, "
                         f"relative positions) are not supported; {INSTEAD}")
    # The cuda kernels take no mask: a model registered with backend="cuda" runs its masked calls
    # as "auto" does, on the Triton kernel where it can run, else on PyTorch (register's docstring).
    backend = "auto" if backend == "cuda" else backend
    return ops_attention.masked_attention(q, k, v, mask, scale=scale, backend=backend)


def check_kwargs(kwargs, mask, Sk: int) -> None:
    """Refuse the attention variants fastgpt would otherwise silently compute as plain attention."""
    for name, what in UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='fastgpt' does not support {what} (the model passes {name}); "
                             f"{INSTEAD}")
    # transformers puts a sliding window into the mask it builds (sdpa_mask, registered with this
    # attention) and leaves the mask out only when the window spans every key: then, as for SDPA,
    # the mask is all there is to it. Without a mask a window shorter than the keys would be lost.
    window = kwargs.get("sliding_window")
    if window is not None and mask is None and Sk > window:
        raise ValueError(f"attn_implementation='fastgpt' got sliding_window={window} over {Sk} keys without a mask "
                         "to apply it; build the mask with transformers' sdpa_mask (fastgpt.hf.register does)")


def make_attention_forward(backend: str = "auto"):
    """The function transformers calls in place of SDPA (same signature and return)."""

    def fastgpt_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                  is_causal=None, **kwargs):
        """query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D) -> ((B, Sq, Hq, D), None)."""
        check_kwargs(kwargs, attention_mask, key.shape[2])
        if dropout and module.training:
            raise ValueError("attn_implementation='fastgpt' is for inference: no attention dropout (call model.eval())")
        Sq, Sk = query.shape[2], key.shape[2]
        if attention_mask is not None:
            # As transformers' SDPA path: a mask built for a longer cache is cut to the keys given.
            out = masked_attention(query, key, value, attention_mask[..., :Sk], scaling, backend)
        else:
            causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)) and Sq > 1
            if causal and Sk > Sq:
                # transformers drops the mask for a prefill into an empty static cache and relies on
                # top-left aligned is_causal; the keys past Sq are unwritten. Bottom-right alignment
                # (fastgpt's) then needs those keys cut off, as transformers' SDPA path does.
                key, value = key[:, :, :Sq], value[:, :, :Sq]
            out = fastgpt.attention(query, key, value, causal=causal, scale=scaling, backend=backend)
        return out.transpose(1, 2).contiguous(), None

    return fastgpt_attention_forward


def register(name: str = NAME, backend: str = "auto") -> None:
    """Make attn_implementation=name (default "fastgpt") available in transformers.

    `backend` is fastgpt's backend for the model's attention calls; with "cuda", calls that carry
    a mask (padding, static cache) take "auto"'s choice (the Triton kernel on a GPU), as the cuda
    kernels take no mask.
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(name, make_attention_forward(backend))
    AttentionMaskInterface.register(name, make_mask_builder())


def make_mask_builder():
    """transformers' SDPA mask builder, refusing models it would give the wrong attention."""
    from transformers.masking_utils import sdpa_mask

    def fastgpt_mask(*, config=None, **kwargs):
        """(B, 1, q_length, kv_length) bool, True = attend; None when causal attention is right."""
        if config is not None:
            check_model(config)
        return sdpa_mask(config=config, **kwargs)

    return fastgpt_mask


def check_model(config) -> None:
    """Refuse models that compute attention themselves instead of calling the AttentionInterface.

    transformers accepts any registered attn_implementation for any model. BLOOM and MPT (ALiBi)
    would then take fastgpt's boolean mask, or None for causal, as their own additive mask and
    attend to the wrong keys; their modeling modules never import the interface.
    """
    modeling = sys.modules.get(type(config).__module__.replace(".configuration_", ".modeling_"))
    if modeling is not None and not hasattr(modeling, "ALL_ATTENTION_FUNCTIONS"):
        raise ValueError(f"attn_implementation='fastgpt' cannot run model type {config.model_type!r}: it computes "
                         f"attention itself (with ALiBi, say), not through transformers' AttentionInterface; {INSTEAD}")


def patch(model: nn.Module, backend: str = "auto") -> int:
    """Patch `model` in place: every nn.LayerNorm becomes a fastgpt.nn.LayerNorm (weights shared).

    Returns how many modules were replaced. Subclasses of nn.LayerNorm (which may change the math)
    are left alone; so are other norms such as Llama's RMSNorm.
    """
    from fastgpt.nn import LayerNorm

    targets = [(parent, child_name, child) for parent in model.modules()
               for child_name, child in parent.named_children()
               if type(child) is nn.LayerNorm and len(child.normalized_shape) == 1]
    for parent, child_name, child in targets:
        setattr(parent, child_name, LayerNorm.from_torch(child, backend=backend))
    return len(targets)
