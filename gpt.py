"""GPT-2 and GPT-3: the original decoder-only transformer.

    tokens -> token embedding + learned position embedding
           -> n_layers x [ x + Attention(LayerNorm(x)); x + MLP(LayerNorm(x)) ]
           -> LayerNorm -> logits through the (tied) token embedding matrix

Pre-LN (the norm sits inside each residual branch, as in GPT-2), biases on every
linear layer and norm, a GELU MLP four times wider than the model, and one fused
projection producing Q, K and V. GPT-3 is the same architecture at other sizes
(its alternating sparse attention is not modelled; all layers are dense).

Parameter names are chosen for readability; `convert.py` maps them to Hugging Face's.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
import parallel


@dataclass
class Config:
    vocab_size: int = 50257
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_dim: int = 0               # 0: 4 * dim
    max_seq_len: int = 1024
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        if not self.ffn_dim:
            self.ffn_dim = 4 * self.dim
        if self.dim % self.n_heads:
            raise parallel.UsageError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")


# Presets are keyword arguments of Config (train.py: Config(**PRESETS[name], **overrides)).
PRESETS = {
    "gpt2": dict(),
    "gpt2-medium": dict(dim=1024, n_layers=24, n_heads=16),
    "gpt2-large": dict(dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl": dict(dim=1600, n_layers=48, n_heads=25),
    "gpt3-175b": dict(dim=12288, n_layers=96, n_heads=96, max_seq_len=2048),
    "tiny": dict(vocab_size=257, dim=256, n_layers=4, n_heads=4, max_seq_len=1024),
    "test": dict(vocab_size=257, dim=64, n_layers=2, n_heads=4, max_seq_len=256),
}


def hf_name(name):
    """Our parameter name -> Hugging Face GPT2LMHeadModel's. HF stores GPT-2's linear
    weights as (in, out) (its Conv1D), so every 2-D weight but the embeddings is
    transposed on the way (see `hf_transposed`)."""
    if name == "lm_head.weight":
        return name
    for ours, theirs in (("pos_embed.", "wpe."), ("embed.", "wte."), ("layers.", "h."),
                         ("attn_norm.", "ln_1."), ("mlp_norm.", "ln_2."), ("attn.qkv.", "attn.c_attn."),
                         ("attn.proj.", "attn.c_proj."), ("mlp.fc.", "mlp.c_fc."),
                         ("mlp.proj.", "mlp.c_proj."), ("norm.", "ln_f.")):
        name = name.replace(ours, theirs)
    return "transformer." + name


def hf_transposed(name):
    return name.endswith("weight") and "layers." in name and "norm" not in name


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x, key_padding_mask=None, kv_cache=None):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_heads, -1).transpose(1, 2)
                   for t in self.qkv(x).split(C, dim=-1))
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        y = kernels.attention(q, k, v, causal=True, key_padding_mask=key_padding_mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.fc = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.proj = nn.Linear(cfg.ffn_dim, cfg.dim)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, key_padding_mask=None, kv_cache=None):
        x = x + self.attn(self.attn_norm(x), key_padding_mask, kv_cache)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def init_weights(self, seed):
        """Deterministic, layout-independent initialization (see parallel.init_parameters).
        Residual output projections get std / sqrt(2 * n_layers), as GPT-2 does."""
        std = self.cfg.init_std

        def std_for(name):
            return std / math.sqrt(2 * self.cfg.n_layers) if name.endswith("proj.weight") else std
        parallel.init_parameters(self, seed, std_for)

    def new_kv_caches(self, max_len):
        return [kernels.KVCache(max_len) for _ in self.layers]

    def forward(self, input_ids, labels=None, attention_mask=None, kv_caches=None):
        """Logits (B, T, vocab), or with `labels` the *sum* of token losses (see
        parallel.cross_entropy_sum). `attention_mask` (B, T) marks real tokens as HF does;
        `kv_caches` (from new_kv_caches) makes this a decoding step after the cached tokens."""
        start = kv_caches[0].length if kv_caches else 0
        T = input_ids.shape[1]
        if start + T > self.cfg.max_seq_len:
            raise parallel.UsageError(f"sequence of {start + T} tokens exceeds max_seq_len="
                                      f"{self.cfg.max_seq_len} (learned positions)")
        positions = torch.arange(start, start + T, device=input_ids.device)
        x = self.embed(input_ids) + self.pos_embed(positions)
        for i, layer in enumerate(self.layers.values()):
            x = layer(x, attention_mask, kv_caches[i] if kv_caches else None)
        x = self.norm(x)
        head = self.embed.weight if self.cfg.tie_embeddings else self.lm_head.weight
        logits = x @ head.t()
        return logits if labels is None else parallel.cross_entropy_sum(logits, labels)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 3 x forward, where the forward is 2 FLOPs per weight
        of every matrix multiply (the head included) plus attention's QK^T and AV."""
        c = self.cfg
        matmul_params = sum(p.numel() for n, p in self.named_parameters()
                            if p.dim() == 2 and n not in ("embed.weight", "pos_embed.weight"))
        if c.tie_embeddings:
            matmul_params += self.embed.weight.numel()
        attention = 2 * 2 * seq_len * c.dim * c.n_layers
        return 3 * (2 * matmul_params + attention)
