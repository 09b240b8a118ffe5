"""The compute kernels the models call: attention, RMSNorm, SwiGLU.

Each kernel has a plain PyTorch reference (the `*_reference` functions): short,
obviously correct, and the oracle every faster implementation is tested against.
The public functions (`attention`, `rmsnorm`, `swiglu`) are what models call; they
dispatch through `backend()` to the fastest implementation available.

Today the only implementation is PyTorch: `attention` uses
`torch.nn.functional.scaled_dot_product_attention` (FlashAttention on CUDA, which
also handles grouped-query attention without copying K/V), and RMSNorm/SwiGLU are
their references. Triton kernels plug into `backend()`: set KERNELS_BACKEND=torch
to force the reference path.
"""
import os

import torch
import torch.nn.functional as F

BACKENDS = ("torch",)


def backend(x):
    """Which implementation runs for tensor `x` (KERNELS_BACKEND overrides)."""
    choice = os.environ.get("KERNELS_BACKEND", "torch")
    if choice not in BACKENDS:
        raise ValueError(f"KERNELS_BACKEND={choice!r} is not available; choose from {BACKENDS}")
    return choice


# ----------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------

def attention_mask(q_len, k_len, device, causal=True, window=None, key_padding_mask=None):
    """Boolean mask (True = may attend), shape (B or 1, 1, q_len, k_len), or None.

    Queries are the *last* q_len positions of the k_len keys (decoding with a KV
    cache appends queries at the end). `window` w keeps keys j with i - w < j <= i
    (Mistral's sliding window). `key_padding_mask` (B, k_len) is True on real tokens.
    """
    if not causal and window is None and key_padding_mask is None:
        return None
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        mask &= k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    mask = mask[None, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :].bool()
    return mask


def attention_reference(q, k, v, causal=True, window=None, key_padding_mask=None, scale=None):
    """softmax(q k^T * scale + mask) v, written out. q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D)
    with H a multiple of Hkv (grouped-query attention: query head h reads KV head h // (H/Hkv))."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    mask = attention_mask(q.shape[2], k.shape[2], q.device, causal, window, key_padding_mask)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def attention(q, k, v, causal=True, window=None, key_padding_mask=None, scale=None):
    """Multi-head attention with GQA, causal / sliding-window / key-padding masks.
    Shapes as in `attention_reference`; returns (B, H, Tq, D)."""
    backend(q)
    simple_causal = causal and window is None and key_padding_mask is None and q.shape[2] == k.shape[2]
    mask = None if simple_causal else attention_mask(
        q.shape[2], k.shape[2], q.device, causal, window, key_padding_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=simple_causal,
                                          scale=scale, enable_gqa=q.shape[1] != k.shape[1])


class KVCache:
    """Keys and values of the tokens seen so far, for one attention layer.

    Preallocated to `max_len` on the first update so decoding appends in place.
    """

    def __init__(self, max_len):
        self.max_len = max_len
        self.length = 0
        self.k = self.v = None

    def update(self, k, v):
        """Append k, v (B, Hkv, T, D); return all keys and values so far."""
        if self.k is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k = k.new_empty(shape)
            self.v = v.new_empty(shape)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked for {end}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


# ----------------------------------------------------------------------------
# RMSNorm and SwiGLU
# ----------------------------------------------------------------------------

def rmsnorm_reference(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (as LLaMA does) and cast back."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rmsnorm(x, weight, eps=1e-6):
    backend(x)
    return rmsnorm_reference(x, weight, eps)


def swiglu_reference(gate, up):
    """SwiGLU's elementwise part: silu(gate) * up."""
    return F.silu(gate) * up


def swiglu(gate, up):
    backend(gate)
    return swiglu_reference(gate, up)


class RMSNorm(torch.nn.Module):
    """The module form of `rmsnorm`, for models to hold a learned gain."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rmsnorm(x, self.weight, self.eps)


# ----------------------------------------------------------------------------
# Rotary position embedding (RoPE)
# ----------------------------------------------------------------------------

def rope_inv_freq(head_dim, theta, scaling_factor=0.0, low_freq_factor=1.0,
                  high_freq_factor=4.0, original_max_seq_len=8192):
    """The rotation frequency of each pair of channels: theta^(-2i/d).

    With `scaling_factor` > 0, LLaMA 3.1's long-context scaling: wavelengths longer
    than original_max_seq_len / low_freq_factor are slowed by the factor, shorter than
    original_max_seq_len / high_freq_factor kept, and those between interpolated.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if not scaling_factor:
        return inv_freq
    wavelen = 2 * torch.pi / inv_freq
    low_wavelen = original_max_seq_len / low_freq_factor
    high_wavelen = original_max_seq_len / high_freq_factor
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling_factor, inv_freq)
    smooth = (original_max_seq_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling_factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(positions, inv_freq):
    """cos and sin of angle position * freq, shape (T, head_dim): each frequency is
    repeated over both halves of the head (the "rotate half" layout of HF LLaMA)."""
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate channel pairs (i, i + d/2) of x (B, H, T, D) by the position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
