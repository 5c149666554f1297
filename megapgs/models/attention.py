"""Attention over packed variable-length sequences: one function, several back-ends behind it.

    out_THd = attention(q_THd, k_THd, v_THd, packed, causal, backend)

q, k, v are (T, H, Dh): the tokens of B sequences concatenated, laid out by `packed`
(cu_seqlens, max_seqlen). Every back-end computes the same function: softmax(q kᵀ/√Dh) v within
each sequence (lower-triangular when causal), never across sequences. Call sites never branch on
the back-end; `resolve_backend` picks one once, at build time, and a requested back-end that is
missing here falls back with one log line.

    torch_varlen  torch.nn.attention.varlen.varlen_attn: flash kernels, CUDA, bf16/fp16
    flash_attn    flash_attn_varlen_func, when the flash-attn package is installed (CUDA, bf16/fp16)
    xformers      memory_efficient_attention with a block-diagonal mask, when installed (CUDA)
    flex          FlexAttention with a document mask (forward only on the CPU; refused for CUDA training)
    sdpa_padded   unpack to (B, max_seqlen), key-padding mask, scaled_dot_product_attention: any device
    reference     a float32 loop over sequences: the definition, for tests
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from megapgs.packed import Packed

log = logging.getLogger(__name__)

Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Packed, bool], torch.Tensor]


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: Packed, causal: bool) -> torch.Tensor:
    bounds = packed.cu_seqlens.tolist()  # host sync: this back-end is for tests only
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q_HSd, k_HSd, v_HSd = (t[start:end].float().transpose(0, 1) for t in (q, k, v))
        scores_HSS = q_HSd @ k_HSd.transpose(1, 2) / math.sqrt(q.shape[-1])
        if causal:
            future = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).triu(1)
            scores_HSS = scores_HSS.masked_fill(future, float("-inf"))
        outs.append((scores_HSS.softmax(-1) @ v_HSd).transpose(0, 1))
    return torch.cat(outs).to(q.dtype)


def _sdpa_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: Packed, causal: bool) -> torch.Tensor:
    B, S = packed.num_segments, packed.max_seqlen  # padding segments of a token budget are rows too
    T, H, Dh = q.shape
    if packed.is_uniform:  # equal lengths (evaluation, or no masking): a plain batch, no mask
        q_BHSd, k_BHSd, v_BHSd = (t.view(B, S, H, Dh).transpose(1, 2) for t in (q, k, v))
        out_BHSd = F.scaled_dot_product_attention(q_BHSd, k_BHSd, v_BHSd, is_causal=causal)
        return out_BHSd.transpose(1, 2).reshape(T, H, Dh)
    seq, pos = packed.seq_ids(), packed.positions()  # (T,), (T,)

    def pad(t_THd: torch.Tensor) -> torch.Tensor:
        return t_THd.new_zeros(B, S, H, Dh).index_put((seq, pos), t_THd).transpose(1, 2)  # (B, H, S, Dh)

    key_valid_BS = torch.arange(S, device=q.device) < packed.segment_lengths()[:, None]
    mask_B11S = key_valid_BS[:, None, None, :]
    if causal:
        mask_B11S = mask_B11S & torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    out_BHSd = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask_B11S)
    return out_BHSd.transpose(1, 2)[seq, pos]  # padded rows dropped: (T, H, Dh)


_flex_masks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one block mask per layout


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: Packed, causal: bool) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    key = (causal,)
    cache = _flex_masks.setdefault(packed, {})
    if key not in cache:
        seq = packed.seq_ids()

        def same_sequence(b, h, q_idx, kv_idx):
            keep = seq[q_idx] == seq[kv_idx]
            return keep & (q_idx >= kv_idx) if causal else keep

        T = packed.total_tokens
        cache[key] = create_block_mask(same_sequence, None, None, T, T, device=q.device)
    out_1HTd = flex_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=cache[key])
    return out_1HTd[0].transpose(0, 1)


try:  # resolved at import, not inside a compiled block (dynamo would have to trace inspect)
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_TAKES_IS_CAUSAL = "is_causal" in inspect.signature(_varlen_attn).parameters  # PyTorch <= 2.11
except ImportError:  # this PyTorch has no varlen_attn: unavailable_reason says so
    _varlen_attn, _VARLEN_TAKES_IS_CAUSAL = None, False


def _torch_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: Packed, causal: bool) -> torch.Tensor:
    cu, S = packed.cu_seqlens, packed.max_seqlen
    if _VARLEN_TAKES_IS_CAUSAL:
        return _varlen_attn(q, k, v, cu, cu, S, S, is_causal=causal)
    return _varlen_attn(q, k, v, cu, cu, S, S, window_size=(-1, 0) if causal else (-1, -1))


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: Packed, causal: bool) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu, S = packed.cu_seqlens, packed.max_seqlen
    return flash_attn_varlen_func(q, k, v, cu, cu, S, S, causal=causal)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: Packed, causal: bool) -> torch.Tensor:
    from xformers.ops import fmha

    # xformers takes the lengths on the host: a layout without host lengths (a token budget)
    # costs a host sync here, every layer
    if packed.host_lengths is not None and packed.num_segments == packed.num_seqs:
        lengths = packed.host_lengths.tolist()
    else:
        lengths = packed.segment_lengths().cpu().tolist()
    mask_cls = fmha.BlockDiagonalCausalMask if causal else fmha.BlockDiagonalMask
    bias = mask_cls.from_seqlens(lengths)
    return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]


BACKENDS: dict[str, Backend] = {
    "torch_varlen": _torch_varlen,
    "flash_attn": _flash_attn,
    "xformers": _xformers,
    "flex": _flex,
    "sdpa_padded": _sdpa_padded,
    "reference": _reference,
}
AUTO_ORDER = ("torch_varlen", "flash_attn", "xformers", "sdpa_padded")  # fastest first


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: Packed, causal: bool,
              backend: str) -> torch.Tensor:
    """Attention within each packed sequence; (T, H, Dh) in, (T, H, Dh) out."""
    return BACKENDS[backend](q, k, v, packed, causal)


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype, training: bool) -> str | None:
    """Why back-end `name` cannot run here, or None when it can."""
    half = dtype in (torch.float16, torch.bfloat16)
    if name in ("torch_varlen", "flash_attn", "xformers") and device.type != "cuda":
        return "it needs a CUDA device"
    if name == "torch_varlen":
        if _varlen_attn is None:
            return "this PyTorch has no torch.nn.attention.varlen"
        if not half:
            return "its flash kernels take bf16/fp16 only"
    if name == "flash_attn":
        if importlib.util.find_spec("flash_attn") is None:
            return "the flash-attn package is not installed"
        if not half:
            return "its kernels take bf16/fp16 only"
    if name == "xformers" and importlib.util.find_spec("xformers") is None:
        return "the xformers package is not installed"
    if name == "flex" and training and device.type == "cpu":
        return "FlexAttention has no backward on the CPU"
    return None


def refused_backend_reason(requested: str, device: torch.device, training: bool) -> str | None:
    """Why a back-end that would run here is refused outright (no fallback), or None."""
    if requested == "flex" and training and device.type == "cuda":
        return ("'flex' is refused for CUDA training: its block mask would be built from a dense T x T mask "
                "over the packed stream (T is about 40 000 tokens at ViT-L batch 256); use auto or torch_varlen")
    return None


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype, training: bool = True) -> str:
    """The back-end to use for `requested` ("auto" or a name) on this device and dtype.

    auto takes the first available of torch_varlen, flash_attn, xformers, sdpa_padded. A named
    back-end that cannot run here falls back the same way, with one log line saying why.
    """
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(f"unknown attention back-end {requested!r}; known: auto, {', '.join(BACKENDS)}")
    refused = refused_backend_reason(requested, device, training)
    if refused:
        raise ValueError(refused)
    if requested != "auto":
        reason = unavailable_reason(requested, device, dtype, training)
        if reason is None:
            return requested
    for name in AUTO_ORDER:
        if unavailable_reason(name, device, dtype, training) is None:
            if requested != "auto":
                log.warning("attention back-end %r is not available (%s); using %r", requested, reason, name)
            return name
    raise AssertionError("sdpa_padded runs everywhere")  # unreachable
