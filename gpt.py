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

import torch.nn as nn
import torch.nn.functional as F

import errors
import kernels
import parallel


@dataclass
class Config:
    """GPT-2 small by default; the fields in the order of Hugging Face's GPT2Config."""
    vocab_size: int = 50257
    max_seq_len: int = 1024        # learned positions: no longer sequence is possible
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_dim: int = 0               # 0: 4 * dim
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        errors.check_config_fields(self)
        if not self.ffn_dim:
            self.ffn_dim = 4 * self.dim
        if self.dim % self.n_heads:
            raise errors.UsageError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")


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


def hf_name(name, cfg):
    """Our parameter name -> Hugging Face GPT2LMHeadModel's."""
    if name == "lm_head.weight":
        return name
    for ours, theirs in (("pos_embed.", "wpe."), ("embed.", "wte."), ("layers.", "h."),
                         ("attn_norm.", "ln_1."), ("mlp_norm.", "ln_2."), ("attn.qkv.", "attn.c_attn."),
                         ("attn.proj.", "attn.c_proj."), ("mlp.fc.", "mlp.c_fc."),
                         ("mlp.proj.", "mlp.c_proj."), ("norm.", "ln_f.")):
        name = name.replace(ours, theirs)
    return "transformer." + name


def from_hf(name, tensor, cfg):
    """A Hugging Face tensor in our layout. HF stores GPT-2's linear weights as (in, out)
    (its Conv1D), so they are transposed; its fused c_attn is [Q | K | V] along the
    output, which is our (3, dim, ...) Q/K/V grouping."""
    if "layers." in name and name.endswith("weight") and tensor.dim() == 2:
        tensor = tensor.t()
    if ".attn.qkv." in name:
        tensor = tensor.reshape(3, -1, *tensor.shape[1:])
    return tensor


def to_hf(name, tensor, cfg):
    """Our tensor in Hugging Face's layout: the inverse of from_hf."""
    if ".attn.qkv." in name:  # (3, dim, ...) -> HF's fused [Q | K | V]
        tensor = tensor.reshape(-1, *tensor.shape[2:])
    if "layers." in name and name.endswith("weight") and tensor.dim() == 2:
        tensor = tensor.t()  # HF's Conv1D stores (in, out)
    return tensor


class Attention(nn.Module):
    """Causal self-attention; under tp each rank owns n_heads/tp heads."""
    recompute_core = False  # set by parallel.apply_recompute (selective recomputation)

    def __init__(self, cfg: Config, layout):
        super().__init__()
        self.layout = layout
        self.head_dim = cfg.dim // cfg.n_heads
        self.qkv = parallel.ColumnParallelLinear(cfg.dim, 3 * cfg.dim, layout, bias=True, groups=3)
        self.proj = parallel.RowParallelLinear(cfg.dim, cfg.dim, layout, bias=True)

    def forward(self, x, positions, key_padding_mask=None, kv_cache=None, documents=None):
        x = parallel.linear_input(x, self.layout)
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        if kv_cache is not None:  # the cache's mask covers every cached key, not just these
            k, v, key_padding_mask = kv_cache.update(k, v, key_padding_mask)
        y = parallel.context_attention(q, k, v, positions, self.layout, causal=True,
                                       key_padding_mask=key_padding_mask, recompute=self.recompute_core,
                                       documents=documents)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """dim -> ffn_dim -> dim with GELU, biases on both layers. GPT-2 uses GELU's tanh
    approximation; BERT (bert.py) the exact erf form: `gelu="none"`."""

    def __init__(self, cfg: Config, layout, gelu="tanh"):
        super().__init__()
        self.layout, self.gelu = layout, gelu
        self.fc = parallel.ColumnParallelLinear(cfg.dim, cfg.ffn_dim, layout, bias=True)
        self.proj = parallel.RowParallelLinear(cfg.ffn_dim, cfg.dim, layout, bias=True)

    def forward(self, x):
        x = parallel.linear_input(x, self.layout)
        return self.proj(F.gelu(self.fc(x), approximate=self.gelu))


class Block(nn.Module):
    def __init__(self, cfg: Config, layout):
        super().__init__()
        self.attn_norm = kernels.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg, layout)
        self.mlp_norm = kernels.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg, layout)

    def forward(self, x, positions, key_padding_mask=None, kv_cache=None, documents=None):
        x = x + self.attn(self.attn_norm(x), positions, key_padding_mask, kv_cache, documents)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Token and learned position embeddings, the blocks, a final LayerNorm, and the
    output layer (the token embedding matrix when tied). Under pipeline parallelism one
    chunk of it (see parallel.keep_chunk); the embeddings belong to the first chunk."""

    def __init__(self, cfg: Config, layout=None, chunk=None):
        super().__init__()
        self.cfg = cfg
        self.layout = layout = layout or parallel.Layout()
        parallel.check_divisible(layout.tp, n_heads=cfg.n_heads, ffn_dim=cfg.ffn_dim)
        self.embed = parallel.VocabParallelEmbedding(cfg.vocab_size, cfg.dim, layout)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(cfg, layout) for i in range(cfg.n_layers)})
        self.norm = kernels.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = (None if cfg.tie_embeddings else
                        parallel.VocabParallelOutput(cfg.vocab_size, cfg.dim, layout))
        # This pipeline chunk of the whole model; sets self.chunk (its layers, first, last).
        parallel.keep_chunk(self, chunk, first=["embed", "pos_embed"], last=["norm", "lm_head"],
                            tied_embedding="embed" if cfg.tie_embeddings else None)

    def init_weights(self, seed):
        """Deterministic, layout-independent initialization (see parallel.init_parameters).
        Residual output projections get std / sqrt(2 * n_layers), as GPT-2 does."""
        std = self.cfg.init_std

        def std_for(name):
            return std / math.sqrt(2 * self.cfg.n_layers) if name.endswith("proj.weight") else std
        parallel.init_parameters(self, seed, std_for)

    def new_kv_caches(self, max_len):
        return [kernels.KVCache(max_len) for _ in self.layers]

    def forward(self, input_ids, labels=None, attention_mask=None, kv_caches=None, hidden=None,
                positions=None, documents=None):
        """Called like every model here (llama.Llama.forward says how): logits, or with
        `labels` the sum of token losses. Learned positions end at max_seq_len."""
        start = kv_caches[0].length if kv_caches else 0
        T = input_ids.shape[1]
        if start + T > self.cfg.max_seq_len:
            raise errors.UsageError(f"sequence of {start + T} tokens exceeds max_seq_len="
                                      f"{self.cfg.max_seq_len} (learned positions)")
        # Where this rank's tokens sit in the sequence (under cp, its zigzag share of it).
        index = start + parallel.zigzag_positions(T, self.layout, input_ids.device)
        if hidden is None:
            # (positions (B, T), each row's own, give (B, T, dim) directly)
            pos = (self.pos_embed(index)[None] if positions is None
                   else self.pos_embed(parallel.context_shard(positions, self.layout)))
            pos = parallel.sequence_shard(pos, self.layout)
            x = self.embed(parallel.context_shard(input_ids, self.layout)) + pos
        else:
            x = hidden
        for i, layer in enumerate(self.layers.values()):
            x = layer(x, index, attention_mask, kv_caches[i] if kv_caches else None, documents)
        return parallel.language_model_output(self, x, labels)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token of the whole model: 3 x forward, where the forward is
        2 FLOPs per weight of every matrix multiply (QKV, projections, MLP, the output
        layer) plus attention's QK^T and AV, 2 * 2 * seq_len * dim per layer."""
        c = self.cfg
        matmul_weights = c.n_layers * (4 * c.dim * c.dim + 2 * c.dim * c.ffn_dim) + c.dim * c.vocab_size
        attention = c.n_layers * 2 * 2 * seq_len * c.dim
        return 3 * (2 * matmul_weights + attention)


# ----------------------------------------------------------------------------
# Hugging Face: config.json <-> Config (convert.py reads and writes the files; a setting
# this model cannot reproduce is refused, never ignored)
# ----------------------------------------------------------------------------

def config_from_hf(hf, model_type):
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        errors.unsupported_hf(model_type, f"activation_function={hf['activation_function']!r} (ours: tanh GELU)")
    for key, ours in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if hf.get(key, ours) != ours:
            errors.unsupported_hf(model_type, f"{key}={hf[key]}")
    return Config(vocab_size=hf["vocab_size"], dim=hf["n_embd"], n_layers=hf["n_layer"],
                      n_heads=hf["n_head"], ffn_dim=hf.get("n_inner") or 0,
                      max_seq_len=hf.get("n_positions", 1024),
                      norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                      tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def config_to_hf(cfg):
    return "gpt2", dict(vocab_size=cfg.vocab_size, n_embd=cfg.dim, n_layer=cfg.n_layers,
                        n_head=cfg.n_heads, n_inner=cfg.ffn_dim, n_positions=cfg.max_seq_len,
                        n_ctx=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps,
                        activation_function="gelu_new", tie_word_embeddings=cfg.tie_embeddings,
                        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)
