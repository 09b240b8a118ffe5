"""LLaMA 1/2/3/3.1, with Mistral and Qwen 2/2.5/3 as presets of the same file.

A decoder-only transformer, read top to bottom:

    tokens -> embedding -> n_layers x [ x + Attention(RMSNorm(x)); x + MLP(RMSNorm(x)) ]
           -> RMSNorm -> linear head (or the embedding matrix, when tied) -> logits

What distinguishes the family from GPT-2:
  - RMSNorm instead of LayerNorm, no biases (Qwen 2 adds biases to Q, K and V);
  - rotary position embedding (RoPE) on queries and keys instead of learned positions,
    with LLaMA 3.1's long-context frequency scaling as an option;
  - grouped-query attention: n_kv_heads <= n_heads, each KV head serves a group of
    query heads (LLaMA 2 7B: 32/32, LLaMA 3 8B: 32/8);
  - a SwiGLU MLP: down(silu(gate(x)) * up(x));
  - Mistral: sliding-window attention; Qwen 3: RMSNorm on each query and key head.

Parameter names follow Hugging Face's (q_proj, gate_proj, ...) so conversion is a
renaming, and layers are keyed by their global index so names never depend on the
parallel layout.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

import errors
import kernels
import parallel


@dataclass
class Config:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 0              # 0: dim // n_heads
    ffn_dim: int = 11008
    norm_eps: float = 1e-5
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 0.0  # LLaMA 3.1 scaling; 0 = off
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    sliding_window: int = 0        # Mistral; 0 = full causal attention
    qkv_bias: bool = False         # Qwen 2 / 2.5
    qk_norm: bool = False          # Qwen 3
    tie_embeddings: bool = False   # small Qwen models
    init_std: float = 0.02

    def __post_init__(self):
        errors.check_config_fields(self)
        if self.n_heads % self.n_kv_heads:
            raise errors.UsageError(f"n_heads={self.n_heads} is not a multiple of "
                                      f"n_kv_heads={self.n_kv_heads}")
        if not self.head_dim:
            if self.dim % self.n_heads:
                raise errors.UsageError(f"dim={self.dim} is not divisible by n_heads="
                                          f"{self.n_heads}; change one, or set head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise errors.UsageError(f"head_dim={self.head_dim} is odd: RoPE rotates pairs of "
                                      f"channels; choose dim and n_heads (or head_dim) for an "
                                      f"even head dimension")
        if self.rope_theta <= 0:
            raise errors.UsageError(f"rope_theta must be > 0, got {self.rope_theta}")


# Presets are keyword arguments of Config (train.py: Config(**PRESETS[name], **overrides)).
_LLAMA3 = dict(vocab_size=128256, n_kv_heads=8, rope_theta=500000.0)
_QWEN = dict(norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=32768)
PRESETS = {
    "llama2-7b": dict(),
    "llama3-8b": dict(**_LLAMA3, ffn_dim=14336, max_seq_len=8192),
    "llama3.1-8b": dict(**_LLAMA3, ffn_dim=14336, max_seq_len=131072, rope_scaling_factor=8.0),
    "llama3-70b": dict(**_LLAMA3, dim=8192, n_layers=80, n_heads=64, ffn_dim=28672,
                       max_seq_len=8192),
    "mistral-7b": dict(n_kv_heads=8, ffn_dim=14336, max_seq_len=32768, sliding_window=4096),
    "qwen2.5-0.5b": dict(**_QWEN, vocab_size=151936, dim=896, n_layers=24, n_heads=14,
                         n_kv_heads=2, ffn_dim=4864, qkv_bias=True, tie_embeddings=True),
    "qwen2.5-7b": dict(**_QWEN, vocab_size=152064, dim=3584, n_layers=28, n_heads=28,
                       n_kv_heads=4, ffn_dim=18944, qkv_bias=True),
    "qwen3-8b": dict(**_QWEN, vocab_size=151936, dim=4096, n_layers=36, n_heads=32,
                     n_kv_heads=8, head_dim=128, ffn_dim=12288, qk_norm=True),
    # A model that learns visibly in a few CPU minutes (byte-level vocabulary).
    "tiny": dict(vocab_size=257, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=704,
                 max_seq_len=1024),
    # A unit-test model: every feature small enough to run in milliseconds.
    "test": dict(vocab_size=257, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                 max_seq_len=256),
}


def from_hf(name, tensor, cfg):
    """A Hugging Face tensor in our layout (the same for this family)."""
    return tensor


def to_hf(name, tensor, cfg):
    """Our tensor in Hugging Face's layout: the inverse of from_hf (the same)."""
    return tensor


def hf_name(name, cfg):
    """Our parameter name -> Hugging Face's (LlamaForCausalLM, Mistral, Qwen2, Qwen3)."""
    if name == "lm_head.weight":
        return name
    for ours, theirs in (("embed.", "embed_tokens."), ("attn_norm.", "input_layernorm."),
                         ("mlp_norm.", "post_attention_layernorm."), ("attn.", "self_attn.")):
        name = name.replace(ours, theirs)
    return "model." + name


class Attention(nn.Module):
    """Grouped-query attention; under tp each rank owns n_heads/tp query heads and the
    n_kv_heads/tp KV heads they read (with fewer KV heads than tp ranks, the one KV head
    they read, which its neighbours hold too: parallel.tp_replicas)."""
    recompute_core = False  # set by parallel.apply_recompute (selective recomputation)

    def __init__(self, cfg: Config, layout):
        super().__init__()
        self.cfg, self.layout = cfg, layout
        hd = cfg.head_dim
        self.q_proj = parallel.ColumnParallelLinear(cfg.dim, cfg.n_heads * hd, layout, cfg.qkv_bias)
        kv_replicas = parallel.tp_replicas(layout.tp, cfg.n_kv_heads, "n_kv_heads")
        self.k_proj = parallel.ColumnParallelLinear(cfg.dim, cfg.n_kv_heads * hd, layout, cfg.qkv_bias,
                                                    replicas=kv_replicas)
        self.v_proj = parallel.ColumnParallelLinear(cfg.dim, cfg.n_kv_heads * hd, layout, cfg.qkv_bias,
                                                    replicas=kv_replicas)
        self.o_proj = parallel.RowParallelLinear(cfg.n_heads * hd, cfg.dim, layout)
        if cfg.qk_norm:
            self.q_norm = kernels.RMSNorm(hd, cfg.norm_eps)
            self.k_norm = kernels.RMSNorm(hd, cfg.norm_eps)
            # Shared by all heads, but under tp each rank sees only its own heads.
            parallel.mark_partial_grad(self.q_norm.weight, self.k_norm.weight)

    def forward(self, x, positions, cos, sin, key_padding_mask=None, kv_cache=None, documents=None):
        x = parallel.linear_input(x, self.layout)
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, -1, hd)
        k = self.k_proj(x).view(B, T, -1, hd)
        v = self.v_proj(x).view(B, T, -1, hd)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        if cos is not None:  # None: no position embedding (the attention of Mamba hybrids)
            q, k = kernels.apply_rope(q, cos, sin), kernels.apply_rope(k, cos, sin)
        if kv_cache is not None:  # the cache's mask covers every cached key, not just these
            k, v, key_padding_mask = kv_cache.update(k, v, key_padding_mask)
        y = parallel.context_attention(q, k, v, positions, self.layout, causal=True,
                                       window=self.cfg.sliding_window or None,
                                       key_padding_mask=key_padding_mask, recompute=self.recompute_core,
                                       documents=documents)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU; under tp each rank owns ffn_dim/tp of the hidden features (a matching
    slice of gate and up, and the same slice of down's inputs)."""

    def __init__(self, cfg: Config, layout):
        super().__init__()
        self.layout = layout
        self.gate_proj = parallel.ColumnParallelLinear(cfg.dim, cfg.ffn_dim, layout)
        self.up_proj = parallel.ColumnParallelLinear(cfg.dim, cfg.ffn_dim, layout)
        self.down_proj = parallel.RowParallelLinear(cfg.ffn_dim, cfg.dim, layout)

    def forward(self, x):
        x = parallel.linear_input(x, self.layout)
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm residual block: attention, then the feed-forward network `mlp` (the SwiGLU
    MLP here; Mixtral passes its mixture of experts)."""

    def __init__(self, cfg: Config, layout, mlp):
        super().__init__()
        self.attn_norm = kernels.RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layout)
        self.mlp_norm = kernels.RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = mlp

    def forward(self, x, positions, cos, sin, key_padding_mask=None, kv_cache=None, documents=None):
        x = x + self.attn(self.attn_norm(x), positions, cos, sin, key_padding_mask, kv_cache, documents)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """The whole model, or under pipeline parallelism one chunk of it (`chunk`, see
    parallel.keep_chunk: which layers, and whether it holds the embedding and/or the
    final norm and output layer)."""

    def __init__(self, cfg: Config, layout=None, chunk=None):
        super().__init__()
        self.cfg = cfg
        self.layout = layout = layout or parallel.Layout()
        parallel.check_divisible(layout.tp, n_heads=cfg.n_heads, ffn_dim=cfg.ffn_dim)
        self.embed = parallel.VocabParallelEmbedding(cfg.vocab_size, cfg.dim, layout)
        self.layers = nn.ModuleDict({str(i): Block(cfg, layout, self.feed_forward(cfg, layout, i))
                                     for i in range(cfg.n_layers)})
        self.norm = kernels.RMSNorm(cfg.dim, cfg.norm_eps)
        # Tied: the output layer multiplies by the embedding matrix (vocabulary-sharded too).
        self.lm_head = (None if cfg.tie_embeddings else
                        parallel.VocabParallelOutput(cfg.vocab_size, cfg.dim, layout))
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        # This pipeline chunk of the whole model; sets self.chunk (its layers, first, last).
        parallel.keep_chunk(self, chunk, first=["embed"], last=["norm", "lm_head"],
                            tied_embedding="embed" if cfg.tie_embeddings else None)

    @staticmethod
    def feed_forward(cfg, layout, layer):
        """Block `layer`'s feed-forward network (mixtral.py's has experts)."""
        return MLP(cfg, layout)

    def init_weights(self, seed):
        """Deterministic, layout-independent initialization (see parallel.init_parameters).
        Output projections of each residual branch get std / sqrt(2 * n_layers) (GPT-2)."""
        c = self.cfg

        def std_for(name):
            residual_output = name.endswith(("o_proj.weight", "down_proj.weight"))
            return c.init_std / math.sqrt(2 * c.n_layers) if residual_output else c.init_std
        parallel.init_parameters(self, seed, std_for)
        self.inv_freq.copy_(kernels.rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling_factor,
                                                  c.rope_low_freq_factor, c.rope_high_freq_factor,
                                                  c.rope_original_max_seq_len))

    def new_kv_caches(self, max_len):
        """Decoding caches, one per layer; with a sliding window, rolling buffers bounded
        by the window whatever max_len (see kernels.KVCache)."""
        return [kernels.KVCache(max_len, self.cfg.sliding_window or None) for _ in self.layers]

    def forward(self, input_ids, labels=None, attention_mask=None, kv_caches=None, hidden=None,
                positions=None, documents=None):
        """Logits (B, T, vocab), or with `labels` the *sum* of token losses (see
        parallel.output_layer). `attention_mask` (B, T) marks real tokens as HF does;
        `kv_caches` (from new_kv_caches) makes this a decoding step after the cached
        tokens, the caches keeping the mask of every cached token. `positions` (B, T):
        each row's own positions (a left-padded batch, generate.py; documents' restarted
        positions, --reset-position-ids); default: the same for every row, after the
        cached tokens. `documents` (B, T): each token's document; a token attends only
        within its own (--reset-attention-mask). Under sp the residual stream holds this
        rank's tokens. A pipeline chunk after the first takes the previous chunk's output
        as `hidden`; one before the last returns its hidden states."""
        start = kv_caches[0].length if kv_caches else 0
        # Where this rank's tokens sit in the sequence (under cp, its zigzag share of it).
        index = start + parallel.zigzag_positions(input_ids.shape[1], self.layout, input_ids.device)
        if positions is None:
            cos, sin = kernels.rope_cos_sin(index, self.inv_freq)
        else:
            cos, sin = kernels.rope_cos_sin_rows(parallel.context_shard(positions, self.layout), self.inv_freq)
        x = self.embed(parallel.context_shard(input_ids, self.layout)) if hidden is None else hidden
        for i, layer in enumerate(self.layers.values()):
            x = layer(x, index, cos, sin, attention_mask, kv_caches[i] if kv_caches else None, documents)
        return parallel.language_model_output(self, x, labels)

    @staticmethod
    def ffn_matmul_weights(cfg):
        """Matrix weights one token multiplies in a block's feed-forward network."""
        return 3 * cfg.dim * cfg.ffn_dim

    def flops_per_token(self, seq_len):
        """Training FLOPs per token of the whole model (forward + backward = 3 x forward):
        each weight of a matrix multiply costs 2 FLOPs (multiply, add) per token, and
        attention's QK^T and AV cost 2 * 2 * seq_len * head_dim per head (the full square,
        by the usual convention, though causal masking skips half)."""
        c = self.cfg
        q_and_o = 2 * c.dim * c.n_heads * c.head_dim
        k_and_v = 2 * c.dim * c.n_kv_heads * c.head_dim
        per_layer = q_and_o + k_and_v + self.ffn_matmul_weights(c)
        matmul_weights = c.n_layers * per_layer + c.dim * c.vocab_size
        attention = c.n_layers * c.n_heads * 2 * 2 * seq_len * c.head_dim
        return 3 * (2 * matmul_weights + attention)


# ----------------------------------------------------------------------------
# Hugging Face: config.json <-> Config (convert.py reads and writes the files; a setting
# this model cannot reproduce is refused, never ignored)
# ----------------------------------------------------------------------------

def rope_from_hf(hf, model_type):
    """RoPE fields. transformers 5 writes `rope_parameters`; 4.x `rope_theta` + `rope_scaling`."""
    errors.check_json(hf, None, {"rope_parameters": (dict, type(None)), "rope_scaling": (dict, type(None))})
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    number = (int, float)
    errors.check_json(rope, "rope_parameters", {"rope_theta": number, "factor": number, "low_freq_factor": number,
                                                   "high_freq_factor": number, "rope_type": str, "type": str,
                                                   "original_max_position_embeddings": int})
    if any(isinstance(v, dict) for v in rope.values()):
        errors.unsupported_hf(model_type, "RoPE parameters that differ per layer type")
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        errors.unsupported_hf(model_type, "partial_rotary_factor != 1")
    out = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "llama3":
        out.update(rope_scaling_factor=float(rope["factor"]),
                   rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]),
                   rope_original_max_seq_len=int(rope.get("original_max_position_embeddings",
                                                          hf["max_position_embeddings"])))
    elif kind != "default":
        errors.unsupported_hf(model_type, f"rope_scaling of type {kind!r} (only llama3 is)")
    return out


def _qwen_window(hf, model_type):
    """Qwen configs carry sliding_window even when it is off: it applies only with
    use_sliding_window, and then to the layers that layer_types (or, in older configs,
    i >= max_window_layers) mark as sliding. Ours is all layers or none."""
    if not hf.get("use_sliding_window") or not hf.get("sliding_window"):
        return 0
    n = hf["num_hidden_layers"]
    kinds = set(hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28)
                                          else "full_attention" for i in range(n)])
    if kinds == {"full_attention"}:
        return 0
    if kinds != {"sliding_attention"}:
        errors.unsupported_hf(model_type, "sliding-window attention on some layers only")
    return int(hf["sliding_window"])


def config_from_hf(hf, model_type):
    """LLaMA 2/3/3.1, Mistral, Qwen 2/2.5, Qwen 3 -> llama.Config."""
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        errors.unsupported_hf(model_type, f"hidden_act={hf['hidden_act']!r}")
    if model_type in ("llama", "qwen3") and hf.get("attention_bias"):
        errors.unsupported_hf(model_type, "attention_bias (a bias on o_proj as well as Q, K, V)")
    if model_type == "llama" and hf.get("mlp_bias"):
        errors.unsupported_hf(model_type, "mlp_bias")
    window = 0
    if model_type == "mistral":
        window = hf.get("sliding_window") or 0
    elif model_type in ("qwen2", "qwen3"):
        window = _qwen_window(hf, model_type)
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    return Config(
        vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or dim // heads, ffn_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6), max_seq_len=hf.get("max_position_embeddings", 2048),
        sliding_window=int(window), qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **rope_from_hf(hf, model_type))


def config_to_hf(cfg):
    """llama.Config -> (model_type, config.json fields): the plainest HF family that has
    every feature used (QK-norm: Qwen 3; Q/K/V bias: Qwen 2; sliding window: Mistral)."""
    if cfg.qk_norm and cfg.qkv_bias:
        raise errors.UsageError("no Hugging Face family has QK-norm with a bias on Q, K, V only; "
                         "cannot export")
    model_type = ("qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else
                  "mistral" if cfg.sliding_window else "llama")
    scaling = None
    if cfg.rope_scaling_factor:
        scaling = dict(rope_type="llama3", factor=cfg.rope_scaling_factor,
                       low_freq_factor=cfg.rope_low_freq_factor,
                       high_freq_factor=cfg.rope_high_freq_factor,
                       original_max_position_embeddings=cfg.rope_original_max_seq_len)
    hf = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
              num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
              num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
              rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len,
              tie_word_embeddings=cfg.tie_embeddings,
              # transformers 5 reads rope_parameters; 4.x rope_theta and rope_scaling.
              rope_parameters={"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rope_theta},
              rope_theta=cfg.rope_theta, rope_scaling=scaling)
    if model_type in ("llama", "qwen3"):
        hf["attention_bias"] = False
    if model_type == "llama":
        hf["mlp_bias"] = False
    if model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    if model_type in ("qwen2", "qwen3"):
        window = cfg.sliding_window
        hf.update(use_sliding_window=bool(window), sliding_window=window or None, max_window_layers=0,
                  layer_types=[("sliding" if window else "full") + "_attention"] * cfg.n_layers)
    return model_type, hf
