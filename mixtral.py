"""Mixtral: a sparse mixture-of-experts (MoE) decoder.

    tokens -> embedding -> n_layers x [ x + Attention(RMSNorm(x)); x + MoE(RMSNorm(x)) ]
           -> RMSNorm -> linear head -> logits

Attention is LLaMA's/Mistral's (RoPE, grouped-query, optional sliding window): the class
below is a copy of llama.py's without its Qwen options, as model files do not import
each other. The MoE replaces the one SwiGLU MLP by n_experts of them and a router:

    probs = softmax(router(x))          router: one linear layer, dim -> n_experts
    the top_k experts of each token by probability, their weights renormalized to sum 1
    MoE(x) = sum over the chosen e of weight_e * Expert_e(x)

(Hugging Face's order of operations; the same as a softmax over the chosen logits.)
Mixtral 8x7B: 8 experts, 2 per token, 46.7B parameters of which 12.9B active per token.

Experts are named by their global index, `layers.3.mlp.experts.5.gate_proj.weight`, as
layers are: under expert parallelism (parallel.py, section 9) a rank builds, initializes
and loads only its n_experts / ep experts, under the same names, so initialization and
checkpoints never depend on the layout, and the names map one to one onto Hugging Face's
files.
Under tp each expert is split like llama's MLP.

Router losses. The forward with labels returns the token-loss sum, like llama.py's, and
leaves in `model.aux_loss` and `model.z_loss` (tensors with their graph) this rank's share
of two router losses, summed over its layers, and their sum in `model.extra_loss`, which
parallel.run_schedule adds to the objective of every chunk:

  load balancing (Switch Transformer; Megatron's normalization), per layer
      balance = n_experts * sum_e f_e * P_e,   1 when perfectly balanced, where
      f_e = fraction of the top-k choices going to expert e, P_e = its mean probability;
  z-loss (ST-MoE): mean over tokens of logsumexp(router logits)^2.

Each is taken over the N tokens of one micro-batch of one data-parallel rank (as
Megatron does; a sequence split over cp counts whole) and stored times its coefficient,
times N, divided by tp (all tp ranks compute the same router). The trainer adds them to
the loss sum before dividing by the global token count, on every rank and stage:

    (loss_sum + model.extra_loss) / global_tokens
        = mean token loss + aux_loss_coef * (mean over micro-batches of the sum over
          layers of balance) + z_loss_coef * (the same for the z-loss)

The value depends on how the global batch is cut into micro-batches, not on tp, cp, pp
or ep: compare layouts at a fixed --micro-batch-size. (Hugging Face's router loss is
top_k * balance pooled over layers, so its router_aux_loss_coef is not ours.)

Capacity: dropless by default. With capacity_factor > 0 each expert keeps at most
ceil(capacity_factor * N * top_k / n_experts) choices of the micro-batch's N tokens, the
first in token order (whole sequences under cp); a dropped choice contributes 0 (the
residual passes through). Per layer, `layers[i].mlp.kept` (N, top_k) says which choices
of the last forward were kept.

Statistics: while training, every forward adds to `model.router_stats` (take them with
pop_router_stats): this rank's shares of the router losses, the top-k choices per layer
and expert (before dropping), the dropped and all choices, and the bytes sent to other
ranks by the expert-parallel all-to-all in the forward (the backward sends as much).
Shares, like the losses: summed over all ranks they give the global figures.
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
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 0              # 0: dim // n_heads
    ffn_dim: int = 14336           # of each expert
    n_experts: int = 8
    top_k: int = 2
    norm_eps: float = 1e-5
    max_seq_len: int = 32768
    rope_theta: float = 1000000.0
    sliding_window: int = 0        # 0 = full causal attention
    tie_embeddings: bool = False
    init_std: float = 0.02
    aux_loss_coef: float = 0.01    # load balancing
    z_loss_coef: float = 0.0
    capacity_factor: float = 0.0   # 0 = dropless

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise parallel.UsageError(f"n_heads={self.n_heads} is not a multiple of "
                                      f"n_kv_heads={self.n_kv_heads}")
        if not 1 <= self.top_k <= self.n_experts:
            raise parallel.UsageError(f"top_k={self.top_k} must be between 1 and "
                                      f"n_experts={self.n_experts}")


PRESETS = {
    "mixtral-8x7b": dict(),
    "mixtral-8x22b": dict(vocab_size=32768, dim=6144, n_layers=56, n_heads=48, ffn_dim=16384,
                          max_seq_len=65536),
    # A model that learns visibly in a few CPU minutes (byte-level vocabulary).
    "tiny": dict(vocab_size=257, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=256,
                 max_seq_len=1024),
    # A unit-test model: 4 experts, so that ep = 2 and 4 both divide them.
    "test": dict(vocab_size=257, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                 n_experts=4, max_seq_len=256),
}


def active_parameters(cfg):
    """Parameters one token uses: all but the experts, and top_k of each layer's experts."""
    with torch.device("meta"):
        model = Mixtral(cfg)
    dense = sum(p.numel() for p in model.parameters() if not getattr(p, "expert_parallel", False))
    experts = sum(p.numel() for p in model.parameters() if getattr(p, "expert_parallel", False))
    return dense + experts * cfg.top_k // cfg.n_experts


def from_hf(name, tensor):
    """A Hugging Face tensor (as saved: one tensor per expert) in our layout: the same."""
    return tensor


def hf_name(name):
    """Our parameter name -> the tensor name in a MixtralForCausalLM safetensors file."""
    if name == "lm_head.weight":
        return name
    for ours, theirs in (("embed.", "embed_tokens."), ("attn_norm.", "input_layernorm."),
                         ("mlp_norm.", "post_attention_layernorm."), ("attn.", "self_attn."),
                         ("mlp.router.", "block_sparse_moe.gate."),
                         ("mlp.experts.", "block_sparse_moe.experts."),
                         ("gate_proj.", "w1."), ("down_proj.", "w2."), ("up_proj.", "w3.")):
        name = name.replace(ours, theirs)
    return "model." + name


class Attention(nn.Module):
    """Grouped-query attention (a copy of llama.py's, without QKV bias and QK-norm)."""

    def __init__(self, cfg: Config, layout):
        super().__init__()
        self.cfg, self.layout = cfg, layout
        hd = cfg.head_dim
        self.q_proj = parallel.ColumnParallelLinear(cfg.dim, cfg.n_heads * hd, layout)
        self.k_proj = parallel.ColumnParallelLinear(cfg.dim, cfg.n_kv_heads * hd, layout)
        self.v_proj = parallel.ColumnParallelLinear(cfg.dim, cfg.n_kv_heads * hd, layout)
        self.o_proj = parallel.RowParallelLinear(cfg.n_heads * hd, cfg.dim, layout)

    def forward(self, x, positions, cos, sin, key_padding_mask=None, kv_cache=None):
        x = parallel.enter_tp_region(x, self.layout)
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, -1, self.cfg.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = kernels.apply_rope(q, cos, sin), kernels.apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        y = parallel.context_attention(q, k, v, positions, self.layout, causal=True,
                                       window=self.cfg.sliding_window or None,
                                       key_padding_mask=key_padding_mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class Expert(nn.Module):
    """One SwiGLU MLP; under tp each rank owns ffn_dim/tp of its hidden features."""

    def __init__(self, cfg: Config, layout):
        super().__init__()
        self.gate_proj = parallel.ColumnParallelLinear(cfg.dim, cfg.ffn_dim, layout)
        self.up_proj = parallel.ColumnParallelLinear(cfg.dim, cfg.ffn_dim, layout)
        self.down_proj = parallel.RowParallelLinear(cfg.ffn_dim, cfg.dim, layout)

    def forward(self, x):
        # down_proj's weight only: under tp its output is a partial sum, and the sum over
        # tp (RowParallelLinear.forward's) waits until MoE.forward has combined the experts.
        return F.linear(kernels.swiglu(self.gate_proj(x), self.up_proj(x)), self.down_proj.weight)


def capacity_mask(expert_ids, n_experts, capacity):
    """(N, top_k) choices -> True where kept: the first `capacity` choices of each expert,
    in token order (token 0's choices, then token 1's, ...)."""
    one_hot = F.one_hot(expert_ids.reshape(-1), n_experts)
    position = (one_hot.cumsum(0) * one_hot).sum(1) - 1  # place in its expert's queue
    return (position < capacity).view_as(expert_ids)


class MoE(nn.Module):
    """Router + experts. This rank builds only its experts (ep) and its slice of each (tp)."""

    def __init__(self, cfg: Config, layout):
        super().__init__()
        self.cfg, self.layout = cfg, layout
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = nn.ModuleDict({str(e): Expert(cfg, layout)
                                      for e in parallel.local_experts(layout, cfg.n_experts)})
        parallel.mark_expert_parallel(*self.experts.parameters())
        if layout.tp > 1:  # replicated, but each tp rank's copy weights only its partial outputs
            parallel.mark_partial_grad(self.router.weight)

    def forward(self, x):
        c = self.cfg
        x = parallel.enter_tp_region(x, self.layout)  # under tp, every rank routes every token
        shape = x.shape
        x = x.reshape(-1, c.dim)
        logits = self.router(x).float()
        probs = logits.softmax(dim=-1)
        top_p, top_e = probs.topk(c.top_k, dim=-1)
        weights = top_p / top_p.sum(dim=-1, keepdim=True)
        self.kept = torch.ones_like(top_e, dtype=torch.bool)
        if c.capacity_factor > 0:
            self.kept = self.within_capacity(top_e.view(*shape[:2], c.top_k)).view_as(top_e)
        self.traffic = {}
        y = parallel.moe_dispatch_combine(x, top_e.masked_fill(~self.kept, -1), weights,
                                          list(self.experts.values()), c.n_experts, self.layout,
                                          self.traffic)
        self.router_losses(logits, probs, top_e)
        return parallel.leave_tp_region(y.view(shape), self.layout)

    def within_capacity(self, top_e):
        """capacity_mask over the micro-batch's whole sequences (B, T, top_k): under cp each
        rank sees its zigzag share of T, so the choices are gathered in token order first."""
        c, layout = self.cfg, self.layout
        whole = parallel.context_gather(top_e, layout)
        capacity = math.ceil(c.capacity_factor * whole.numel() / c.n_experts)
        kept = capacity_mask(whole.reshape(-1, c.top_k), c.n_experts, capacity)
        return parallel.context_shard(kept.view_as(whole), layout)

    def router_losses(self, logits, probs, top_e):
        """This rank's shares of the two router losses (see the module docstring)."""
        c, layout = self.cfg, self.layout
        self.tokens_per_expert = torch.bincount(top_e.reshape(-1), minlength=c.n_experts)
        # Under cp a sequence is spread over the cp group: count its choices and tokens
        # whole; each rank keeps the terms of its own tokens' probabilities.
        counts = parallel.all_reduce(self.tokens_per_expert.clone(), layout.cp_group)
        n_tokens = probs.shape[0] * layout.cp
        balance_times_n = c.n_experts / (c.top_k * n_tokens) * (counts.float() * probs.sum(0)).sum()
        self.aux_loss = c.aux_loss_coef * balance_times_n / layout.tp
        self.z_loss = c.z_loss_coef * logits.logsumexp(dim=-1).pow(2).sum() / layout.tp


class Block(nn.Module):
    def __init__(self, cfg: Config, layout):
        super().__init__()
        self.attn_norm = kernels.RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layout)
        self.mlp_norm = kernels.RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MoE(cfg, layout)
        if layout.sp:  # norms run on this rank's tokens only
            parallel.mark_partial_grad(self.attn_norm.weight, self.mlp_norm.weight)

    def forward(self, x, positions, cos, sin, key_padding_mask=None, kv_cache=None):
        x = x + self.attn(self.attn_norm(x), positions, cos, sin, key_padding_mask, kv_cache)
        return x + self.mlp(self.mlp_norm(x))


class Mixtral(nn.Module):
    """The whole model, or under pipeline parallelism one chunk of it (as llama.Llama)."""

    def __init__(self, cfg: Config, layout=None, chunk=None):
        super().__init__()
        self.cfg = cfg
        self.layout = layout = layout or parallel.Layout()
        self.chunk = chunk = chunk or parallel.Chunk(0, list(range(cfg.n_layers)), True, True)
        parallel.check_divisible(layout.tp, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                                 ffn_dim=cfg.ffn_dim)
        parallel.check_expert_layout(layout, cfg.n_experts)
        if chunk.first or (chunk.last and cfg.tie_embeddings):
            self.embed = parallel.VocabParallelEmbedding(cfg.vocab_size, cfg.dim, layout)
        if cfg.tie_embeddings and chunk.first != chunk.last:
            parallel.mark_tied_across_stages(*((self.embed.weight, None) if chunk.first
                                               else (None, self.embed.weight)))
        self.layers = nn.ModuleDict({str(i): Block(cfg, layout) for i in chunk.layers})
        if chunk.last:
            self.norm = kernels.RMSNorm(cfg.dim, cfg.norm_eps)
            if layout.sp:
                parallel.mark_partial_grad(self.norm.weight)
            if not cfg.tie_embeddings:
                self.lm_head = parallel.VocabParallelEmbedding(cfg.vocab_size, cfg.dim, layout)
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)

    def init_weights(self, seed):
        """Layout-independent (parallel.init_parameters: each expert has its own stream,
        keyed by its global name). Residual-branch outputs get std / sqrt(2 * n_layers)."""
        std = self.cfg.init_std

        def std_for(name):
            residual_output = name.endswith(("o_proj.weight", "down_proj.weight"))
            return std / math.sqrt(2 * self.cfg.n_layers) if residual_output else std
        parallel.init_parameters(self, seed, std_for)
        self.inv_freq.copy_(kernels.rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta))

    def new_kv_caches(self, max_len):
        return [kernels.KVCache(max_len) for _ in self.layers]

    def forward(self, input_ids, labels=None, attention_mask=None, kv_caches=None, hidden=None):
        """As llama.Llama.forward: logits, or with `labels` the sum of token losses. Also
        sets this forward's router losses and statistics (module docstring)."""
        start = kv_caches[0].length if kv_caches else 0
        # Global positions of this rank's tokens (under cp, its zigzag share of them).
        positions = start + parallel.zigzag_positions(input_ids.shape[1], self.layout, input_ids.device)
        cos, sin = kernels.rope_cos_sin(positions, self.inv_freq)
        x = self.embed(parallel.context_shard(input_ids, self.layout)) if self.chunk.first else hidden
        for i, layer in enumerate(self.layers.values()):
            x = layer(x, positions, cos, sin, attention_mask, kv_caches[i] if kv_caches else None)
        moe = [layer.mlp for layer in self.layers.values()]
        self.aux_loss = sum(m.aux_loss for m in moe)
        self.z_loss = sum(m.z_loss for m in moe)
        self.extra_loss = self.aux_loss + self.z_loss
        if self.training:
            self.count_router_stats(moe)
        if not self.chunk.last:
            return x
        x = self.norm(x)
        head = self.embed if self.cfg.tie_embeddings else self.lm_head
        return parallel.output_layer(x, head.weight, labels, self.layout, self.cfg.vocab_size)

    def count_router_stats(self, moe):
        """Add this forward's router figures to `router_stats` (module docstring)."""
        tp = self.layout.tp  # every tp rank routes the same tokens: each counts 1/tp
        tokens = torch.zeros(self.cfg.n_layers, self.cfg.n_experts, device=self.inv_freq.device)
        for i, m in zip(self.chunk.layers, moe):
            tokens[i] = m.tokens_per_expert.float() / tp
        kept = torch.cat([m.kept.reshape(-1) for m in moe])
        figures = {"aux_loss": self.aux_loss.detach(), "z_loss": self.z_loss.detach(),
                   "tokens_per_expert": tokens, "dropped": (~kept).sum().float() / tp,
                   "choices": tokens.new_tensor(kept.numel() / tp),
                   "all_to_all_bytes": tokens.new_tensor(
                       sum(m.traffic.get("bytes_sent", 0) for m in moe) / tp)}
        stats = getattr(self, "router_stats", None) or {}
        self.router_stats = {k: stats.get(k, 0) + v for k, v in figures.items()}

    def pop_router_stats(self):
        """The router figures summed since the last call (this rank's shares), and reset."""
        stats, self.router_stats = getattr(self, "router_stats", None) or {}, None
        return stats

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward = 3 x forward), counting the active
        parameters only: attention, the router and top_k experts (see llama.py)."""
        c = self.cfg
        q_and_o = 2 * c.dim * c.n_heads * c.head_dim
        k_and_v = 2 * c.dim * c.n_kv_heads * c.head_dim
        moe = c.dim * c.n_experts + c.top_k * 3 * c.dim * c.ffn_dim
        matmul_weights = c.n_layers * (q_and_o + k_and_v + moe) + c.dim * c.vocab_size
        attention = c.n_layers * c.n_heads * 2 * 2 * seq_len * c.head_dim
        return 3 * (2 * matmul_weights + attention)
