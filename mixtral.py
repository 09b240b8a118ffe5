"""Mixtral: a sparse mixture-of-experts (MoE) decoder.

    tokens -> embedding -> n_layers x [ x + Attention(RMSNorm(x)); x + MoE(RMSNorm(x)) ]
           -> RMSNorm -> linear head -> logits

Mixtral is LLaMA with a mixture of experts (MoE) in place of each block's MLP, so this file
imports llama.py and keeps only what differs: attention (RoPE, grouped-query, optional
sliding window), the blocks, the pipeline chunks and the output layer are llama.py's. The
MoE replaces the one SwiGLU MLP by n_experts of them and a router:

    probs = softmax(router(x))          router: one linear layer, dim -> n_experts
    the top_k experts of each token by probability, their weights renormalized to sum 1
    MoE(x) = sum over the chosen e of weight_e * Expert_e(x)

(Hugging Face's order of operations; the same as a softmax over the chosen logits.)
Mixtral 8x7B: 8 experts, 2 per token, 46.7B parameters of which 12.9B active per token.
The router runs in fp32 whatever the autocast, as Megatron's can.

Qwen's mixtures of experts are presets of this file (hf_type qwen2_moe, qwen3_moe): Qwen1.5/2
add a shared expert that every token goes through, scaled by sigmoid(x . w_gate), and leave
the top-k weights as the softmax gave them (norm_topk_prob false); some of their blocks keep
a dense MLP (every moe_layer_step-th block has experts, but those in dense_layers); Qwen2's
attention has biases on Q, K, V and Qwen3's QK-norm (llama.py's). Qwen3-30B-A3B: 128
experts of width 768, 8 per token, 30.5B parameters of which 3.3B active.

Experts are named by their global index, `layers.3.mlp.experts.5.gate_proj.weight`, as
layers are: under expert parallelism (parallel.py, "Expert parallelism") a rank builds,
initializes and loads only its n_experts / ep experts, under the same names, so
initialization and checkpoints never depend on the layout, and the names map one to one
onto Hugging Face's files.
Under tp each expert is split like llama's MLP, over all tp ranks; with --etp below tp
over etp of them (Megatron's expert tensor parallelism): the tp ranks then form tp / etp
groups, each routing its share of the tokens (parallel.expert_tokens) to experts split
over its etp ranks, and ep can span the groups (etp 1: each tp rank holds whole experts of
its own, and routes 1/tp of the tokens).

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
times N, divided by etp (the etp ranks of a group route the same tokens). The balance loss can also
be taken over each sequence (balance_loss=sequence: f and P per sequence, averaged), or
over the global batch (balance_loss=global, Qwen's "global-batch" balancing as Megatron
computes it: f counts the micro-batch's choices of every data-parallel rank, averaged over
the step's micro-batches so far; P stays each rank's own). The global f depends on how the
batch is cut over dp ranks and micro-batches: dp 2 with one micro-batch each is one
process with the two as one micro-batch. The trainer adds them to
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
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import errors
import kernels
import llama
import parallel


@dataclass
class Config(llama.Config):
    """llama.Config (every LLaMA field applies to the attention and norms) with Mixtral
    8x7B's sizes as defaults, and the mixture of experts."""
    n_kv_heads: int = 8
    ffn_dim: int = 14336           # of each expert
    max_seq_len: int = 32768
    rope_theta: float = 1000000.0
    n_experts: int = 8
    top_k: int = 2
    aux_loss_coef: float = 0.01    # load balancing
    z_loss_coef: float = 0.0
    capacity_factor: float = 0.0   # 0 = dropless
    norm_topk_prob: bool = True    # the top-k weights renormalized to sum 1 (Qwen2-MoE: not)
    shared_expert_ffn_dim: int = 0  # Qwen2-MoE: one more expert, on every token, sigmoid-gated; 0: none
    moe_layer_step: int = 1        # layer i has experts when (i + 1) % step == 0 (HF decoder_sparse_step) ...
    dense_layers: str = ""         # ... and is not listed here ("0,5": HF mlp_only_layers): else a dense MLP
    dense_ffn_dim: int = 0         # that dense MLP's width (HF intermediate_size); 0: ffn_dim
    hf_type: str = "mixtral"       # the Hugging Face family its files follow: mixtral, qwen2_moe, qwen3_moe
    # Routing options (Megatron's --moe-router-*): scores by softmax or sigmoid; top-k within
    # the router_group_topk best of router_groups expert groups (0: no groups); the
    # auxiliary-loss-free expert bias, moved by expert_bias_rate a step (0: none); the balance
    # loss over each micro-batch or each sequence
    router_score: str = "softmax"
    router_groups: int = 0
    router_group_topk: int = 0
    expert_bias_rate: float = 0.0
    balance_loss: str = "micro_batch"  # or "sequence", "global"

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.top_k <= self.n_experts:
            raise errors.UsageError(f"top_k={self.top_k} must be between 1 and "
                                      f"n_experts={self.n_experts}")
        if self.hf_type not in HF_TYPES:
            raise errors.UsageError(f"hf_type={self.hf_type!r}: choose one of {', '.join(HF_TYPES)}")
        for field, value, allowed in (("router_score", self.router_score, ("softmax", "sigmoid")),
                                      ("balance_loss", self.balance_loss, ("micro_batch", "sequence", "global"))):
            if value not in allowed:
                raise errors.UsageError(f"{field}={value!r}: choose one of {', '.join(allowed)}")
        if self.router_groups and not (self.n_experts % self.router_groups == 0
                                       and 0 < self.router_group_topk <= self.router_groups
                                       and self.top_k % self.router_group_topk == 0
                                       and self.top_k <= self.router_group_topk * self.n_experts // self.router_groups):
            raise errors.UsageError(f"router_groups={self.router_groups}, router_group_topk={self.router_group_topk}: "
                                    f"the groups must divide n_experts={self.n_experts}, and the groups a token "
                                    f"keeps (1 to router_groups) divide top_k={self.top_k} and hold at least "
                                    f"top_k experts")
        if self.moe_layer_step < 1:
            raise errors.UsageError(f"moe_layer_step={self.moe_layer_step} must be at least 1")
        try:
            dense = self.dense_layer_numbers()
        except ValueError:
            dense = [-1]
        if not all(0 <= i < self.n_layers for i in dense):
            raise errors.UsageError(f"dense_layers={self.dense_layers!r}: expected layer numbers below "
                                    f"n_layers={self.n_layers}, comma-separated")

    def dense_layer_numbers(self):
        """dense_layers as numbers ("0,5" -> [0, 5])."""
        return [int(i) for i in self.dense_layers.split(",") if i.strip()]

    def has_experts(self, layer):
        """Whether block `layer` has the mixture of experts (else a dense SwiGLU MLP)."""
        return (layer + 1) % self.moe_layer_step == 0 and layer not in self.dense_layer_numbers()


HF_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")


_QWEN_MOE = dict(norm_eps=1e-6, rope_theta=1000000.0, aux_loss_coef=0.001)
PRESETS = {
    "mixtral-8x7b": dict(),
    "mixtral-8x22b": dict(vocab_size=32768, dim=6144, n_layers=56, n_heads=48, ffn_dim=16384,
                          max_seq_len=65536),
    # A model that learns visibly in a few CPU minutes (byte-level vocabulary).
    "tiny": dict(vocab_size=257, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=256,
                 max_seq_len=1024),
    # Qwen's mixtures of experts (their config.json files): Qwen1.5/2 with a shared expert and
    # biases on Q, K, V; Qwen3 with QK-norm, 128 experts and no shared one.
    "qwen1.5-moe-a2.7b": dict(**_QWEN_MOE, hf_type="qwen2_moe", vocab_size=151936, dim=2048, n_layers=24,
                              n_heads=16, n_kv_heads=16, ffn_dim=1408, n_experts=60, top_k=4,
                              norm_topk_prob=False, shared_expert_ffn_dim=5632, dense_ffn_dim=5632,
                              qkv_bias=True, max_seq_len=8192),
    "qwen2-57b-a14b": dict(**_QWEN_MOE, hf_type="qwen2_moe", vocab_size=151936, dim=3584, n_layers=28,
                           n_heads=28, n_kv_heads=4, ffn_dim=2560, n_experts=64, top_k=8,
                           norm_topk_prob=False, shared_expert_ffn_dim=20480, dense_ffn_dim=18944,
                           qkv_bias=True, max_seq_len=131072),
    "qwen3-30b-a3b": dict(**_QWEN_MOE, hf_type="qwen3_moe", vocab_size=151936, dim=2048, n_layers=48,
                          n_heads=32, n_kv_heads=4, head_dim=128, ffn_dim=768, n_experts=128, top_k=8,
                          dense_ffn_dim=6144, qk_norm=True, max_seq_len=40960),
    "qwen3-235b-a22b": dict(**_QWEN_MOE, hf_type="qwen3_moe", vocab_size=151936, dim=4096, n_layers=94,
                            n_heads=64, n_kv_heads=4, head_dim=128, ffn_dim=1536, n_experts=128, top_k=8,
                            dense_ffn_dim=12288, qk_norm=True, max_seq_len=40960),
    # A unit-test model: 4 experts, so that ep = 2 and 4 both divide them.
    "test": dict(vocab_size=257, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                 n_experts=4, max_seq_len=256),
    # Qwen2-MoE's features at test size: a shared expert, every other layer dense, no
    # renormalized top-k, biases on Q, K, V (4 layers: pp 2 puts a dense and a MoE layer on each).
    "test-qwen2-moe": dict(vocab_size=257, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=32,
                           n_experts=4, max_seq_len=256, hf_type="qwen2_moe", shared_expert_ffn_dim=48,
                           moe_layer_step=2, dense_ffn_dim=96, norm_topk_prob=False, qkv_bias=True),
    # Qwen3-MoE's: QK-norm, layer 0 dense (mlp_only_layers), the top-k renormalized.
    "test-qwen3-moe": dict(vocab_size=257, dim=64, n_layers=3, n_heads=4, n_kv_heads=1, head_dim=32,
                           ffn_dim=32, n_experts=4, max_seq_len=256, hf_type="qwen3_moe", dense_layers="0",
                           dense_ffn_dim=96, qk_norm=True),
}


def active_parameters(cfg):
    """Parameters one token uses: all but the experts, and top_k of each layer's experts."""
    with torch.device("meta"):
        model = Mixtral(cfg)
    dense = sum(p.numel() for p in model.parameters() if not parallel.tags(p).expert)
    experts = sum(p.numel() for p in model.parameters() if parallel.tags(p).expert)
    return dense + experts * cfg.top_k // cfg.n_experts


# Hugging Face's Mixtral files hold one tensor per expert, in LLaMA's layout.
from_hf, to_hf = llama.from_hf, llama.to_hf


def hf_name(name, cfg):
    """Our parameter name -> the tensor name in a MixtralForCausalLM safetensors file, or
    Qwen2/3-MoE's: llama.py's names, the router `mlp.gate`; the experts, the shared expert
    (`mlp.shared_expert.*`, `mlp.shared_expert_gate`) and a dense layer's MLP as ours."""
    if cfg.hf_type != "mixtral":
        return llama.hf_name(name.replace("mlp.router.", "mlp.gate."), cfg)
    if name == "lm_head.weight":
        return name
    for ours, theirs in (("embed.", "embed_tokens."), ("attn_norm.", "input_layernorm."),
                         ("mlp_norm.", "post_attention_layernorm."), ("attn.", "self_attn."),
                         ("mlp.router.", "block_sparse_moe.gate."),
                         ("mlp.experts.", "block_sparse_moe.experts."),
                         ("gate_proj.", "w1."), ("down_proj.", "w2."), ("up_proj.", "w3.")):
        name = name.replace(ours, theirs)
    return "model." + name


class Expert(llama.MLP):
    """One SwiGLU MLP, llama.py's; under tp each rank owns ffn_dim/tp of its hidden features."""

    def forward(self, x):
        # down_proj's partial sum only: the sum over tp (RowParallelLinear.forward's) waits
        # until MoE.forward has combined the experts.
        return self.down_proj.partial(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class _GroupedLinear(torch.autograd.Function):
    """y[rows of expert e] = x[those rows] @ weights[e]^T for every e at once: one grouped
    matmul (torch._grouped_mm) over rows sorted by expert, `offsets` the cumulative row
    counts. The weights are stacked for the matmul and again in backward, never saved:
    autograd keeps x and the parameters themselves, as a loop of F.linear would."""

    @staticmethod
    def forward(ctx, x, offsets, *weights):
        ctx.save_for_backward(x, offsets, *weights)
        return torch._grouped_mm(x, torch.stack(weights).to(x.dtype).transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, dy):
        x, offsets, *weights = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch._grouped_mm(dy, torch.stack(weights).to(dy.dtype), offs=offsets)
        dw = torch._grouped_mm(dy.t(), x, offs=offsets)  # (experts, out, in): dy_e^T x_e
        return dx, None, *(g.to(w.dtype) for g, w in zip(dw.unbind(0), weights))


def grouped_linear(x, offsets, weights):
    """_GroupedLinear in the autocast dtype where autocast is on (as F.linear would run)."""
    x = parallel.autocast_input(x)
    with torch.autocast(x.device.type, enabled=False):
        return _GroupedLinear.apply(x, offsets, *weights)


class Experts(nn.ModuleDict):
    """This rank's experts, keyed by their global index, run together on rows sorted by
    expert (counts[i] rows for the i-th): each projection one grouped matmul over every
    expert's rows, no padding, one launch instead of one per expert."""

    # Eager under --compile: torch.compile's tracing of _grouped_mm accepts bf16 only (its
    # GPU kernel's rule) where the CPU multiplies fp32 too, and the dispatch around the
    # experts (data-dependent row counts) is a graph break anyway.
    @torch.compiler.disable
    def forward(self, x, counts):
        experts = list(self.values())
        if any(e.gate_proj.fp8 is not None for e in experts):  # FP8 scales are per expert
            return self.loop(x, counts)
        offsets = counts.cumsum(0).to(torch.int32)
        x = parallel.autocast_input(x)  # once, for gate and up to share (and save once)
        gate = grouped_linear(x, offsets, [e.gate_proj.weight for e in experts])
        up = grouped_linear(x, offsets, [e.up_proj.weight for e in experts])
        # down_proj's partial sum only, as Expert.forward's
        return grouped_linear(kernels.swiglu(gate, up), offsets, [e.down_proj.weight for e in experts])

    def loop(self, x, counts):
        """The reference (and the FP8 path): each expert on its own slice of rows. An
        expert with no rows still runs (on an empty slice), so that every expert parameter
        gets a gradient and its DataParallel hook fires; the grouped matmuls give zeros."""
        parts = parallel.autocast_input(x).split(counts.tolist())  # one cast, as forward's
        return torch.cat([expert(parallel.in_tp_region(part)) for expert, part in zip(self.values(), parts)])


def capacity_mask(expert_ids, n_experts, capacity):
    """(N, top_k) choices -> True where kept: the first `capacity` choices of each expert,
    in token order (token 0's choices, then token 1's, ...)."""
    one_hot = F.one_hot(expert_ids.reshape(-1), n_experts)
    position = (one_hot.cumsum(0) * one_hot).sum(1) - 1  # place in its expert's queue
    return (position < capacity).view_as(expert_ids)


class MoE(nn.Module):
    """Router + experts (+ Qwen2-MoE's shared expert). This rank builds only its experts
    (ep) and its slice of each (etp)."""

    def __init__(self, cfg: Config, layout):
        super().__init__()
        self.cfg, self.layout = cfg, layout
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        experts_layout = parallel.expert_layout(layout)
        self.experts = Experts({str(e): Expert(cfg, experts_layout)
                                for e in parallel.local_experts(layout, cfg.n_experts)})
        parallel.mark_expert_parallel(*self.experts.parameters())
        # Replicated over tp, but each tp rank's copy weights only its partial outputs.
        parallel.mark_partial_grad(self.router.weight)
        if cfg.expert_bias_rate:  # set from the run's table (Mixtral.set_expert_bias), never trained
            self.register_buffer("expert_bias", torch.zeros(cfg.n_experts), persistent=False)
        if cfg.shared_expert_ffn_dim:  # every token's, split over tp like a dense MLP
            self.shared_expert = Expert(dataclasses.replace(cfg, ffn_dim=cfg.shared_expert_ffn_dim), layout)
            self.shared_expert_gate = nn.Linear(cfg.dim, 1, bias=False)
            parallel.mark_partial_grad(self.shared_expert_gate.weight)

    def forward(self, x):
        c = self.cfg
        x = parallel.enter_tp_region(x, self.layout)  # under tp, every rank holds every token ...
        shape = x.shape
        x = x.reshape(-1, c.dim)
        part = parallel.expert_tokens(len(x), self.layout)  # ... and routes these (all: etp = tp)
        # The router in fp32 whatever the autocast (Megatron's --moe-router-dtype fp32): which
        # experts a token gets must not hang on bf16 rounding of close logits.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x[part].float(), self.router.weight.float())
        probs = logits.softmax(dim=-1) if c.router_score == "softmax" else logits.sigmoid()
        top_e = self.choose(probs)
        top_p = probs.gather(1, top_e)
        weights = top_p / top_p.sum(dim=-1, keepdim=True) if c.norm_topk_prob else top_p
        self.kept = torch.ones_like(top_e, dtype=torch.bool)
        if c.capacity_factor > 0:  # (over the whole micro-batch's choices, in token order)
            every = parallel.gather_expert_tokens(top_e, self.layout)
            self.kept = self.within_capacity(every.view(*shape[:2], c.top_k)).view(-1, c.top_k)[part]
        self.traffic, self.shape, self.part = {}, shape, part
        y = parallel.moe_dispatch_combine(x[part], top_e.masked_fill(~self.kept, -1), weights,
                                          self.experts, c.n_experts, self.layout,
                                          self.traffic)
        # Zeros for the tokens other groups routed: leave_tp_region sums their outputs in.
        y = F.pad(y, (0, 0, part.start, len(x) - part.stop))
        if c.shared_expert_ffn_dim:  # (a partial sum under tp, as the experts' outputs)
            shared_in = parallel.in_tp_region(parallel.autocast_input(x))  # cast once, for all three
            y = y + torch.sigmoid(self.shared_expert_gate(shared_in)) * self.shared_expert(shared_in)
        self.router_losses(logits, probs, top_e)
        return parallel.leave_tp_region(y.view(shape), self.layout)

    def choose(self, scores):
        """The top_k experts of each token (N, top_k). The expert bias shifts the choice but
        not the weights (DeepSeek-V3's auxiliary-loss-free balancing). With groups, a token
        first keeps its router_group_topk best groups, a group scored by the sum of its
        top_k / router_group_topk best scores (Megatron's group-limited routing), and chooses
        among their experts only."""
        c = self.cfg
        if c.expert_bias_rate:
            scores = scores + self.expert_bias
        if c.router_groups:
            grouped = scores.view(len(scores), c.router_groups, -1)
            group_scores = grouped.topk(c.top_k // c.router_group_topk, dim=-1).values.sum(-1)
            kept = torch.zeros_like(group_scores, dtype=torch.bool)
            kept.scatter_(1, group_scores.topk(c.router_group_topk, dim=-1).indices, True)
            scores = grouped.masked_fill(~kept[..., None], float("-inf")).view_as(scores)
        return scores.topk(c.top_k, dim=-1).indices

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
        if c.router_score == "sigmoid":  # the balance loss needs a distribution over the experts
            probs = probs / probs.sum(dim=-1, keepdim=True)
        # Balanced over each sequence (B rows of tokens), or over the micro-batch as one row.
        rows = self.shape[0] if c.balance_loss == "sequence" else 1
        per_row = self.shape[0] * self.shape[1] // rows  # tokens of a row on this tp rank
        row_of_token = torch.arange(self.part.start, self.part.stop, device=top_e.device) // per_row
        counts = torch.bincount((row_of_token[:, None] * c.n_experts + top_e).reshape(-1),
                                minlength=rows * c.n_experts).view(rows, c.n_experts)
        # With etp < tp the tp ranks' groups routed other tokens: count them all (each
        # group's etp ranks counted the same). Under cp a sequence is spread over the cp
        # group: count its choices and tokens whole. The global loss counts the choices of
        # every data-parallel rank too. Each rank keeps the terms of its own tokens'
        # probabilities.
        if layout.etp < layout.tp:
            counts = parallel.all_reduce(counts, layout.tp_group) // layout.etp
        pooled = layout.dp_cp_group if c.balance_loss == "global" else layout.cp_group
        counts = parallel.all_reduce(counts, pooled).float()
        n_tokens = per_row * (layout.dp_cp if c.balance_loss == "global" else layout.cp)
        if c.balance_loss == "global" and self.training:
            counts = self.step_average(counts)
        row_probs = probs.new_zeros(rows, c.n_experts).index_add(0, row_of_token, probs)
        balance_times_n = c.n_experts / (c.top_k * n_tokens) * (counts * row_probs).sum()
        self.aux_loss = c.aux_loss_coef * balance_times_n / layout.etp
        self.z_loss = c.z_loss_coef * logits.logsumexp(dim=-1).pow(2).sum() / layout.etp

    def step_average(self, counts):
        """The global loss's counts: the mean over this step's micro-batches so far
        (Megatron's running global_tokens_per_expert / ga_steps). Rebound, never changed in
        place: a recomputed forward must see the sums its first run saw (see
        parallel.apply_recompute); Mixtral.pop_router_stats starts a new step."""
        self.step_counts = getattr(self, "step_counts", 0) + counts
        self.step_micro_batches = getattr(self, "step_micro_batches", 0) + 1
        return self.step_counts / self.step_micro_batches


class Mixtral(llama.Llama):
    """llama.Llama (the whole model, or one pipeline chunk of it) with a mixture of experts
    as each block's feed-forward network; its forward also leaves the router losses in
    `aux_loss`, `z_loss` and `extra_loss`, and counts the router's statistics."""

    def __init__(self, cfg: Config, layout=None, chunk=None):
        parallel.check_expert_layout(layout or parallel.Layout(), cfg.n_experts)
        super().__init__(cfg, layout, chunk)

    @staticmethod
    def feed_forward(cfg, layout, layer):
        if cfg.has_experts(layer):
            return MoE(cfg, layout)
        return llama.MLP(dataclasses.replace(cfg, ffn_dim=cfg.dense_ffn_dim or cfg.ffn_dim), layout)

    def forward(self, input_ids, labels=None, attention_mask=None, kv_caches=None, hidden=None,
                positions=None, documents=None):
        """As llama.Llama.forward: logits, or with `labels` the sum of token losses. Also
        sets this forward's router losses and statistics (module docstring)."""
        out = super().forward(input_ids, labels, attention_mask, kv_caches, hidden, positions, documents)
        moe = [layer.mlp for layer in self.layers.values() if isinstance(layer.mlp, MoE)]
        zero = out.new_zeros(())  # (a pipeline chunk may hold only dense layers)
        self.aux_loss = sum((m.aux_loss for m in moe), zero)
        self.z_loss = sum((m.z_loss for m in moe), zero)
        self.extra_loss = self.aux_loss + self.z_loss if moe else None
        if self.training:
            self.count_router_stats(moe)
        return out

    def count_router_stats(self, moe):
        """Add this forward's router figures to `router_stats` (module docstring)."""
        etp = self.layout.etp  # the etp ranks of a group route the same tokens: each counts 1/etp
        tokens = torch.zeros(self.cfg.n_layers, self.cfg.n_experts, device=self.inv_freq.device)
        for i, layer in zip(self.chunk.layers, self.layers.values()):
            if isinstance(layer.mlp, MoE):
                tokens[i] = layer.mlp.tokens_per_expert.float() / etp
        kept = torch.cat([m.kept.reshape(-1) for m in moe] or [tokens.new_ones(0, dtype=torch.bool)])
        figures = {"aux_loss": self.aux_loss.detach(), "z_loss": self.z_loss.detach(),
                   "tokens_per_expert": tokens, "dropped": (~kept).sum().float() / etp,
                   "choices": tokens.new_tensor(kept.numel() / etp),
                   "all_to_all_bytes": tokens.new_tensor(
                       sum(m.traffic.get("bytes_sent", 0) for m in moe) / etp)}
        stats = getattr(self, "router_stats", None) or {}
        self.router_stats = {k: stats.get(k, 0) + v for k, v in figures.items()}

    def set_expert_bias(self, table):
        """Each MoE layer's expert bias from `table` (n_layers, n_experts), the run's."""
        for i, layer in zip(self.chunk.layers, self.layers.values()):
            if isinstance(layer.mlp, MoE):
                layer.mlp.expert_bias.copy_(table[i])

    @staticmethod
    def expert_bias_step(table, tokens_per_expert, rate):
        """The auxiliary-loss-free balancing update (DeepSeek-V3; Megatron's
        --moe-router-enable-expert-bias), in place: each expert's bias moves by `rate`
        towards its layer's mean load, up for an expert that got fewer of this step's
        tokens than the mean, down for one that got more. tokens_per_expert (n_layers,
        n_experts): the step's global counts, the same on every rank, so every rank's table
        stays the same (a dense layer's row, all zeros, never moves)."""
        table += rate * torch.sign(tokens_per_expert.mean(dim=1, keepdim=True) - tokens_per_expert)

    def pop_router_stats(self):
        """The router figures summed since the last call (this rank's shares), and reset;
        the global balance loss starts a new step."""
        stats, self.router_stats = getattr(self, "router_stats", None) or {}, None
        for moe in (layer.mlp for layer in self.layers.values() if isinstance(layer.mlp, MoE)):
            moe.step_counts = moe.step_micro_batches = 0
        return stats

    @staticmethod
    def ffn_matmul_weights(cfg):
        """Matrix weights one token multiplies in a block's feed-forward network, averaged
        over the blocks (only the active parameters count, see llama.Llama.flops_per_token):
        a MoE block's router, top_k experts, and shared expert with its gate; a dense
        block's MLP."""
        moe = cfg.dim * cfg.n_experts + cfg.top_k * 3 * cfg.dim * cfg.ffn_dim
        if cfg.shared_expert_ffn_dim:
            moe += 3 * cfg.dim * cfg.shared_expert_ffn_dim + cfg.dim
        dense = 3 * cfg.dim * (cfg.dense_ffn_dim or cfg.ffn_dim)
        n_moe = sum(cfg.has_experts(i) for i in range(cfg.n_layers))
        return (n_moe * moe + (cfg.n_layers - n_moe) * dense) / cfg.n_layers


# ----------------------------------------------------------------------------
# Hugging Face: config.json <-> Config (convert.py reads and writes the files; a setting
# this model cannot reproduce is refused, never ignored)
# ----------------------------------------------------------------------------

def config_from_hf(hf, model_type):
    """Mixtral, Qwen2-MoE or Qwen3-MoE -> mixtral.Config. The router's training settings
    (router_aux_loss_coef, whose loss is normalized differently from ours) are not
    architecture and are not read."""
    if model_type != "mixtral":
        return _qwen_config_from_hf(hf, model_type)
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        errors.unsupported_hf(model_type, f"hidden_act={hf['hidden_act']!r}")
    if hf.get("router_jitter_noise"):
        errors.unsupported_hf(model_type, f"router_jitter_noise={hf['router_jitter_noise']}")
    rope = llama.rope_from_hf(hf, model_type)
    if set(rope) != {"rope_theta"}:
        errors.unsupported_hf(model_type, "RoPE scaling")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    return Config(
        vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or dim // heads, ffn_dim=hf["intermediate_size"],
        n_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
        norm_eps=hf.get("rms_norm_eps", 1e-5), max_seq_len=hf.get("max_position_embeddings", 4096),
        sliding_window=int(hf.get("sliding_window") or 0),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=rope["rope_theta"])


def _qwen_config_from_hf(hf, model_type):
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        errors.unsupported_hf(model_type, f"hidden_act={hf['hidden_act']!r}")
    if hf.get("use_sliding_window"):
        errors.unsupported_hf(model_type, "use_sliding_window")
    if hf.get("attention_bias"):  # (Qwen3-MoE's: on the output projection too)
        errors.unsupported_hf(model_type, "attention_bias")
    rope = llama.rope_from_hf(hf, model_type)
    if set(rope) != {"rope_theta"}:
        errors.unsupported_hf(model_type, "RoPE scaling")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    qwen2 = model_type == "qwen2_moe"
    return Config(
        hf_type=model_type, vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"],
        n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or dim // heads, ffn_dim=hf["moe_intermediate_size"],
        dense_ffn_dim=hf["intermediate_size"], top_k=hf["num_experts_per_tok"],
        # (Qwen's files say num_experts; transformers 5 writes Qwen3-MoE's as num_local_experts)
        n_experts=hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"],
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        shared_expert_ffn_dim=hf.get("shared_expert_intermediate_size", 0) if qwen2 else 0,
        moe_layer_step=hf.get("decoder_sparse_step", 1),
        dense_layers=",".join(str(i) for i in hf.get("mlp_only_layers") or []),
        qkv_bias=bool(hf.get("qkv_bias", True)) if qwen2 else False, qk_norm=not qwen2,
        norm_eps=hf.get("rms_norm_eps", 1e-6), max_seq_len=hf.get("max_position_embeddings", 32768),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=rope["rope_theta"])


def config_to_hf(cfg):
    if cfg.hf_type != "mixtral":
        return _qwen_config_to_hf(cfg)
    for field, what in (("qkv_bias", "a bias on Q, K, V"), ("qk_norm", "QK-norm"),
                        ("rope_scaling_factor", "RoPE scaling"), ("shared_expert_ffn_dim", "a shared expert"),
                        ("dense_layers", "dense layers")):
        if getattr(cfg, field):
            raise errors.UsageError(f"Hugging Face's Mixtral has no {what} ({field}); cannot export "
                                    f"(--set hf_type=qwen2_moe has)")
    if not cfg.norm_topk_prob or cfg.moe_layer_step != 1:
        raise errors.UsageError("Hugging Face's Mixtral renormalizes the top-k weights and has experts "
                                "in every layer; cannot export (--set hf_type=qwen2_moe can)")
    return "mixtral", dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
        num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len, sliding_window=cfg.sliding_window or None,
        tie_word_embeddings=cfg.tie_embeddings, router_jitter_noise=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rope_theta=cfg.rope_theta)


def _qwen_config_to_hf(cfg):
    qwen2 = cfg.hf_type == "qwen2_moe"
    refused = [("rope_scaling_factor", "RoPE scaling"), ("sliding_window", "a sliding window"),
               ("qk_norm" if qwen2 else "qkv_bias", "QK-norm" if qwen2 else "a bias on Q, K, V"),
               *([] if qwen2 else [("shared_expert_ffn_dim", "a shared expert")])]
    for field, what in refused:
        if getattr(cfg, field):
            raise errors.UsageError(f"Hugging Face's {cfg.hf_type} has no {what} ({field}); cannot export")
    if not (qwen2 or cfg.qk_norm):
        raise errors.UsageError("Hugging Face's qwen3_moe always has QK-norm; cannot export (qk_norm=false)")
    hf = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.dense_ffn_dim or cfg.ffn_dim,
              moe_intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
              num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
              hidden_act="silu", num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
              norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=cfg.moe_layer_step,
              mlp_only_layers=cfg.dense_layer_numbers(),
              rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len,
              tie_word_embeddings=cfg.tie_embeddings, use_sliding_window=False,
              rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, rope_theta=cfg.rope_theta)
    if qwen2:
        hf.update(qkv_bias=cfg.qkv_bias, shared_expert_intermediate_size=cfg.shared_expert_ffn_dim)
    else:
        hf.update(attention_bias=False)
    return cfg.hf_type, hf
