"""fastgpt inside Hugging Face transformers models.

    import fastgpt.hf
    fastgpt.hf.register()                     # once: adds attn_implementation="fastgpt"
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fastgpt")
    fastgpt.hf.patch(model)                   # optional: nn.LayerNorm -> fastgpt.nn.LayerNorm

register() adds fastgpt's attention to transformers' AttentionInterface, so every model that
dispatches attention through that interface (GPT-2, Llama, Mistral, Qwen, Gemma, Phi, GPT-NeoX,
OPT, ...) can use it. It also registers the name in the AttentionMaskInterface with transformers'
SDPA mask builder (make_mask_builder), so the model hands over a mask when plain causal attention is
not right: None for causal attention (then fastgpt.attention runs), a boolean (B, 1, Sq, Sk) mask
for padding, a static cache or a sliding window (then fastgpt.ops.attention.masked_attention runs:
the Triton kernel reading the mask on a GPU, plain PyTorch on CPU). What the kernels do not compute
(soft-capping, attention sinks, position biases, sparse attention, models such as BLOOM that
compute attention themselves) raises a ValueError rather than giving other numbers.
"""

from __future__ import annotations

import sys
import warnings

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
        if value.shape[-1] != query.shape[-1]:  # DeepSeek-V3's MLA, say: fastgpt's kernels take one head dim
            raise ValueError(f"attn_implementation='fastgpt' needs value heads as wide as query heads, got "
                             f"{value.shape[-1]} and {query.shape[-1]}; {INSTEAD}")  # fmt: skip
        if dropout and module.training:
            raise ValueError("attn_implementation='fastgpt' is for inference: no attention dropout (call model.eval())")
        if kwargs.get("output_attentions"):  # as transformers' SDPA: said, and the weights left out
            warnings.warn("attn_implementation='fastgpt' computes no attention weights: output_attentions=True "
                          "returns none (attn_implementation='eager' does)", stacklevel=2)  # fmt: skip
        Sq, Sk = query.shape[2], key.shape[2]
        if attention_mask is not None:
            # As transformers' SDPA path: a mask built for a longer cache is cut to the keys given.
            out = masked_attention(query, key, value, attention_mask[..., :Sk], scaling, backend)
        else:
            # Without a mask (fastgpt_mask's contract) causal attention is aligned bottom-right.
            causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)) and Sq > 1
            out = fastgpt.attention(query, key, value, causal=causal, scale=scaling, backend=backend)
        return out.transpose(1, 2).contiguous(), None

    return fastgpt_attention_forward


def register(name: str = NAME, backend: str = "auto") -> None:
    """Make attn_implementation=name (default "fastgpt") available in transformers.

    `backend` is fastgpt's backend for the model's attention calls, those that carry a mask
    (padding, static caches, sliding windows) included.
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(name, make_attention_forward(backend))
    AttentionMaskInterface.register(name, make_mask_builder())


def make_mask_builder():
    """transformers' SDPA mask builder, with the two differences fastgpt needs (see the comments)."""
    from transformers.masking_utils import sdpa_mask

    def fastgpt_mask(*, q_length: int, kv_length: int, allow_is_causal_skip: bool = True, config=None, **kwargs):
        """(B, 1, q_length, kv_length) bool, True = attend; None when causal attention is right."""
        if config is not None:
            check_model(config)
        # No mask means causal attention aligned bottom-right (as in FlashAttention). sdpa_mask also
        # leaves the mask out for a prefill into an empty static cache (keys past the queries are
        # unwritten), counting on SDPA's top-left alignment; so the mask is built there. A model may
        # then drop leading queries (Gemma 4's KV-shared layers keep the last): bottom-right is right.
        allow_is_causal_skip = allow_is_causal_skip and q_length in (1, kv_length)
        return sdpa_mask(q_length=q_length, kv_length=kv_length, allow_is_causal_skip=allow_is_causal_skip,
                         config=config, **kwargs)

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
