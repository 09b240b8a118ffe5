"""Predicting memory per rank, without training and without allocating weights:
`python train.py ... --plan` calls `plan()` and prints `describe()`.

One concept, kept out of train.py: train.py runs a layout, this file predicts what the
layout holds. `--plan` (plan.py) reads and checks the flags as training does (flags.py)
and calls in here.

What a rank holds (bytes):
  weights, gradients, optimizer state: counted exactly, by building this rank's model
      chunks on the meta device (no memory) and the real parallel.DataParallel and
      parallel.AdamW over them (their flat buffers are meta tensors too): the weights in
      flat buffers padded to a multiple of the replicas (fp32, or bf16 under mixed
      precision), gradient buffers of the same size (fp32, or with --grad-dtype model the
      weights' dtype), and per bucket on the rank's ZeRO-1 slice (all of it without
      ZeRO-1): Adam's two fp32 moments and, under mixed precision, the fp32 main weights
      (the reduced gradient slice lands in the gradient buffer itself; which elements
      decay and which count in the gradient norm are ranges: no memory).
      Experts are split over ep, tp shards and vocabulary padding are what the layers
      build, a tied embedding has its copy on the last stage.
  activations: the bytes saved for backward by one micro-batch (formulas below), times
      the micro-batches the schedule keeps in flight on the stage.
      (No weight copies: under mixed precision the parameters are 16-bit themselves, so
      autocast has nothing to cast.)
  the loss: kernels.linear_cross_entropy keeps dx (tokens x dim, the residual's dtype) and
      dW (the vocabulary shard x dim, fp32) for backward (counted with the activations
      of the last stage) and, transiently, one chunk of fp32 logits (LOGITS_PER_CHUNK).

The measured quantity that `activation_bytes` predicts (tests/test_memory.py measures
it): the distinct storages of the tensors autograd saves during one micro-batch's
forward and still holds at its end (a branch the forward drops, such as the final state
of Mamba's scan, frees what it saved), each storage counted once at its full size,
excluding the parameters and the tensors that are only views of them.
bench.ActivationMeter counts
more: every saved tensor, parameters and repeated views of one storage included.
"""
import dataclasses
import math

import torch

import kernels
import parallel


# ----------------------------------------------------------------------------
# Activations of one micro-batch, per component
# ----------------------------------------------------------------------------
# Notation (per rank): n = b * s / cp tokens of the micro-batch on this rank, h = dim;
# under sequence parallelism the residual stream and the norms hold n / tp tokens
# ("n_sp"), the linears' gathered inputs all n. a = query heads / tp, q = a * head_dim,
# kv = kv_heads / tp * head_dim (one head when tp exceeds them), f = ffn_dim / tp. e = bytes of the model's dtype (2
# under bf16/fp16, 4 in fp32: the parameters' and what autocast computes in), r = bytes
# of the residual stream (e; 4 with --fp32-residual or Mamba's residual_in_fp32). The
# softmax and norm statistics and RoPE's tables are fp32 whatever the precision.
# "torch path" is kernels.py's torch code (the CPU, where tests measure), "Triton" its
# kernels (a GPU): where they save different tensors, both are written out.
#
# What each piece of code saves (read off the code, checked by the test):
#   RMSNorm, torch path (kernels.rmsnorm_reference, x32 * rsqrt(mean(x32^2)) * weight):
#       x32 (4 n_sp h: x itself when r = 4, else an fp32 copy), rsqrt (4 n_sp), normed
#       (r n_sp h)                                          -> 4 n_sp (h + 1) + r n_sp h
#     Triton: x and rstd                                    -> r n_sp h + 4 n_sp
#   LayerNorm (kernels.LayerNorm, in x's dtype): x (r n_sp h), mean and rstd (2 n_sp in
#       x's dtype on the CPU, fp32 on a GPU)                -> r n_sp h + 2 c n_sp
#   a norm's output y as the input of the column-parallel linears after it: one tensor
#       (all n tokens after sp's all-gather) shared by them, cast once under autocast
#       (parallel.linear_input): e n h.
#       (LayerNorm's y is also the linear input, not saved by the norm itself.)
#   LLaMA attention: K and V after RoPE/transposition e n kv each, Q e n q, the
#       attention output e n q (also o_proj's input: the same storage), the softmax
#       log-sum-exp 4 n a; RoPE's cos and sin 2 * 4 s/cp hd once per chunk, shared by
#       its layers. No (s x s) scores: flash/SDPA attention recomputes them.
#       Korthikanti's 5as/h term (scores + dropout mask) is therefore absent.
#   GPT attention: the fused qkv output 3 e n h (one storage, q k v are views), the
#       output e n h, lse 4 n a.
#   SwiGLU MLP: gate, up, silu(gate), the product (down's input): 4 e n f; the Triton
#       kernel recomputes silu(gate) in backward: 3 e n f.
#   GELU MLP: fc output and gelu output: 2 e n f.
#   MoE (Mixtral): router probabilities 4 n E, top-k indices 8 n k, their sum 4 n,
#       top-k weights 4 n k; the router losses' logits 4 n E, logsumexp 4 n and counts 4 E;
#       the gather index 8 n k; the n k routed token copies as the experts' input (cast
#       once under autocast: e n k h); per expert its SwiGLU on the tokens routed to it:
#       4 e (n k) f in all (dropless; a capacity factor c caps it at c times the even
#       share: an upper bound, the drops depend on the routing); the combine saves two
#       indices 2 x 8 n k, the weights 4 n k, the experts' outputs e n k h and their
#       weighted product r n k h (the residual stream's dtype).
#   Embedding: token ids 8 b s/cp (int64), GPT's positions 8 s/cp too.
#   The last stage: final norm (as above; its y is not saved: the chunked loss keeps dx
#       instead, in the norm's output dtype: r n h), dW 4 V/tp h (+ 4 V/tp for a bias).
#
# Recompute (--recompute): selective keeps no attention scores/probabilities, which
# this code never stores anyway (flash attention), so it changes nothing here; full
# keeps only each checkpointed unit's input (r n_sp h, the residual stream) and, during
# backward, one unit's full activations while it is recomputed.


@dataclasses.dataclass
class Shape:
    """The per-rank sizes the formulas use."""
    b: int
    s: int
    tp: int
    cp: int
    sp: bool
    e: int  # bytes of an autocast tensor (and of a bf16 parameter)
    r: int = 4  # bytes of the residual stream's elements: e under mixed precision, 4 with fp32
    s_dec: int = 0  # T5: the decoder's length (data.span_corruption_lengths)
    torch_kernels: bool = False  # kernels.py's torch path (the CPU), not its Triton kernels (a GPU)
    etp: int = 0  # the experts' tensor parallelism (0: tp)

    @property
    def n(self):
        return self.b * self.s // self.cp

    @property
    def n_experts(self):
        """Tokens this rank routes (parallel.expert_tokens): n, or n / (tp / etp)."""
        return self.n * (self.etp or self.tp) // self.tp

    @property
    def n_sp(self):
        return self.n // self.tp if self.sp and self.tp > 1 else self.n

    def at(self, s):
        """The same shape for a sequence of s tokens (T5's decoder)."""
        return dataclasses.replace(self, s=s)


def rmsnorm(sh, h):
    """kernels.rmsnorm on the residual stream (r bytes). The torch path saves x in fp32 (x
    itself when r = 4, else an fp32 copy), rsqrt (4 n) and the normed x in x's dtype; the
    Triton kernel saves x and rsqrt only (it recomputes the rest in backward)."""
    if not sh.torch_kernels:
        return sh.r * sh.n_sp * h + 4 * sh.n_sp
    return 4 * sh.n_sp * (h + 1) + sh.r * sh.n_sp * h


def layernorm(sh, h, x_bytes=None):
    """kernels.LayerNorm of x (the residual stream, or x_bytes per element): x itself, and
    its mean and rstd: in x's dtype on the CPU, fp32 on a GPU (CUDA's kernel keeps the
    statistics in its accumulation type)."""
    x = sh.r if x_bytes is None else x_bytes
    return x * sh.n_sp * h + 2 * (x if sh.torch_kernels else 4) * sh.n_sp


def linear_inputs(sh, h):
    """A norm's output as read by the column-parallel linears after it (one tensor, cast once
    under autocast: parallel.linear_input): all n tokens, or under sp this rank's n/tp, which
    the linears save instead of the gathered input (gathering it again in backward)."""
    return sh.e * sh.n_sp * h


def head_rmsnorm(sh, rows, hd):
    """Qwen3's QK-norm: kernels.rmsnorm over each head's hd channels of a projection's output
    (the autocast dtype, e bytes): what rmsnorm saves, for `rows` = tokens x heads."""
    if not sh.torch_kernels:
        return sh.e * rows * hd + 4 * rows
    return 4 * rows * (hd + 1) + sh.e * rows * hd


def llama_attention(sh, cfg):
    a, kv_heads = cfg.n_heads // sh.tp, max(cfg.n_kv_heads // sh.tp, 1)
    q, kv = a * cfg.head_dim, kv_heads * cfg.head_dim
    qk_norm = head_rmsnorm(sh, sh.n * (a + kv_heads), cfg.head_dim) if cfg.qk_norm else 0
    return sh.e * sh.n * (2 * q + 2 * kv) + 4 * sh.n * a + ring(sh, q, kv, a) + qk_norm


def ring(sh, q, kv, a):
    """Ring attention's extra (cp > 1, parallel.ring_attention): the cp - 1 received K/V
    blocks (each checkpointed block keeps its inputs), each step's block output and lse
    in fp32 for the log-sum-exp merge (in place of the one lse), the positions (int64)."""
    if sh.cp == 1:
        return 0
    return (sh.e * sh.n * 2 * kv * (sh.cp - 1) + 4 * sh.n * (q + a) * sh.cp - 4 * sh.n * a
            + 8 * (sh.s // sh.cp) * (sh.cp + 1))


def gpt_attention(sh, cfg):
    a = cfg.n_heads // sh.tp
    q = cfg.dim // sh.tp
    return sh.e * sh.n * 4 * q + 4 * sh.n * a + ring(sh, q, q, a)


def swiglu_mlp(sh, f, tokens=None):
    """gate, up, silu(gate), the product (down's input) on the torch path; the Triton
    kernel saves gate and up, its product being down's input: 3 tensors, not 4."""
    return (4 if sh.torch_kernels else 3) * sh.e * (sh.n if tokens is None else tokens) * f


def gelu_mlp(sh, f):
    return 2 * sh.e * sh.n * f


def moe(sh, cfg):
    k, E, n = cfg.top_k, cfg.n_experts, sh.n_experts  # n: the tokens this rank routes
    routed = n * k
    if cfg.capacity_factor:  # (the micro-batch's capacity, this rank's share of it)
        routed = min(routed, E * math.ceil(cfg.capacity_factor * sh.n * k / E) * n // sh.n)
    # the router: probabilities, top-k indices, their sum, the top-k weights; its losses
    # (mixtral.MoE.router_losses, computed even with a zero coefficient): the fp32 logits
    # and their logsumexp (z-loss), the tokens per expert as floats (balance)
    router = 4 * n * E + 8 * n * k + 4 * n + 4 * n * k
    # The router runs in fp32: it saves its input (every token, gathered under sp) in fp32,
    # a view of x when that is fp32 (which keeps all of x, every token), else a copy of the
    # tokens it routes; nothing else keeps the block's input
    router += 4 * (sh.n if sh.e == 4 else n) * cfg.dim
    losses = 4 * n * E + 4 * n + 4 * E
    if cfg.router_score == "sigmoid":  # the balance loss's scores normalized per token
        losses += 4 * n * E + 4 * n
    # dispatch (parallel.moe_dispatch_combine): the gather index and the routed token copies
    # (one tensor the experts' gate and up read, cast once under autocast: mixtral.Experts)
    dispatch = 8 * routed + sh.e * routed * cfg.dim
    # combine: the sort order indexing the weights and the index_add's index (token[assignment],
    # computed again: its own storage), the routing weights, the experts' outputs and their
    # weighted product in the residual stream's dtype (index_add saves its source)
    combine = 2 * 8 * routed + 4 * routed + sh.e * routed * cfg.dim + sh.r * routed * cfg.dim
    shared = 0
    if cfg.shared_expert_ffn_dim:  # Qwen2-MoE: a SwiGLU on every token, times sigmoid(its gate),
        # which saves the sigmoid's output and the expert's (partial) output for the product;
        # under autocast also its 16-bit input (the router keeps an fp32 one)
        shared = swiglu_mlp(sh, cfg.shared_expert_ffn_dim // sh.tp) + sh.e * sh.n + sh.e * sh.n * cfg.dim
        if sh.e != 4:
            shared += sh.e * sh.n * cfg.dim
    experts = swiglu_mlp(sh, cfg.ffn_dim // (sh.etp or sh.tp), routed)
    return router + losses + dispatch + experts + combine + shared


def llama_layer(sh, cfg, i=0):
    """One LLaMA/Mistral/Qwen block (Mixtral, Qwen-MoE: experts in place of the MLP, where
    block i has them), by component."""
    h = cfg.dim
    experts = hasattr(cfg, "n_experts") and cfg.has_experts(i)
    if not hasattr(cfg, "n_experts"):
        ffn = swiglu_mlp(sh, cfg.ffn_dim // sh.tp)
    elif experts:
        ffn = moe(sh, cfg)
    else:
        ffn = swiglu_mlp(sh, (cfg.dense_ffn_dim or cfg.ffn_dim) // sh.tp)
    return {"attn_norm": rmsnorm(sh, h), "qkv_inputs": linear_inputs(sh, h),
            "attention": llama_attention(sh, cfg), "mlp_norm": rmsnorm(sh, h),
            "mlp_inputs": 0 if experts else linear_inputs(sh, h),  # (a MoE's: in moe)
            "mlp": ffn}


def gpt_layer(sh, cfg, i=0):
    h = cfg.dim
    return {"attn_norm": layernorm(sh, h), "qkv_input": linear_inputs(sh, h),
            "attention": gpt_attention(sh, cfg), "mlp_norm": layernorm(sh, h),
            "mlp_input": linear_inputs(sh, h), "mlp": gelu_mlp(sh, cfg.ffn_dim // sh.tp)}


# BERT (bert.py). Post-LN and pre-LN layers save the same pieces, in another order: the
# two LayerNorms (input x: the residual sum; mean, rstd), a norm's output as
# q/k/v's inputs and as the MLP's input, attention with separate Q, K, V (GPT's sizes),
# the GELU MLP. The key-padding mask: the torch path hands SDPA a float mask (b, 1, s, s)
# in the autocast dtype, saved by every layer; the Triton path takes the (b, s) bools.
def padding_mask(sh, q_len, k_len, e):
    return e * sh.b * q_len * k_len if sh.torch_kernels else sh.b * k_len


def bert_layer(sh, cfg, i=0):
    h = cfg.dim
    return {"attn_norm": layernorm(sh, h), "qkv_inputs": linear_inputs(sh, h),
            "padding_mask": padding_mask(sh, sh.s // sh.cp, sh.s // sh.cp, sh.e),
            "attention": gpt_attention(sh, cfg), "mlp_norm": layernorm(sh, h),
            "mlp_input": linear_inputs(sh, h), "mlp": gelu_mlp(sh, cfg.ffn_dim // sh.tp)}


# T5 (t5.py): RMSNorm as LLaMA's; bias-free projections; an FFN of ReLU (its output,
# also the output projection's input: e n f) or gated GELU (gate, up, gelu, product:
# 4 e n f, as SwiGLU). Self-attention carries the relative position bias:
#   Triton path: q, k, v, output (e), lse (4 n a) as FlashAttention; the bias is computed
#       in the kernels from the table (a parameter): nothing (s x s).
#   torch path (CPU): the bias is materialized and attention runs SDPA's math path: the
#       bucket index (8 s^2, int64, per layer), the bool mask (b s^2 encoder padding,
#       s^2 decoder causal), q, k^T and v in fp32 copies, the probabilities 4 b a s^2,
#       and o_proj's input (its own copy, e n q).
# Cross-attention (decoder): q from the decoder tokens, k and v from the encoder output
#   (`memory`): that output as k/v's inputs, one tensor for every decoder layer (r n_sp h,
#   this rank's shard under sp; with an fp32 residual each layer's own cast e n_sp h), then
#   flash attention over the n_enc keys: q, output e n_dec q, k, v e n_enc q, lse, and
#   on the torch path the padding mask as a float (b, 1, s_dec, s_enc).
def t5_self_attention(sh, cfg, q_len, mask):
    a = cfg.n_heads // sh.tp
    q = a * cfg.head_dim
    n = sh.b * q_len
    if not sh.torch_kernels:
        return sh.e * n * 4 * q + 4 * n * a
    return (8 * q_len * q_len + mask + 3 * 4 * n * q + 4 * sh.b * a * q_len * q_len
            + sh.e * n * q)


def t5_ffn(sh, cfg):
    f = cfg.ffn_dim // sh.tp
    return {"mlp_inputs": linear_inputs(sh, cfg.dim),
            "mlp": (4 if cfg.gated_gelu else 1) * sh.e * sh.n * f}


def t5_layer(sh, cfg, i):
    h, a = cfg.dim, cfg.n_heads // sh.tp
    q = a * cfg.head_dim
    if i < cfg.n_encoder_layers:
        return {"attn_norm": rmsnorm(sh, h), "qkv_inputs": linear_inputs(sh, h),
                "self_attention": t5_self_attention(sh, cfg, sh.s, sh.b * sh.s * sh.s),
                "mlp_norm": rmsnorm(sh, h), **t5_ffn(sh, cfg)}
    d = sh.at(sh.s_dec)
    n_enc, n_dec = sh.b * sh.s, d.n
    # Every decoder layer's k and v read the one encoder output (this rank's shard of it
    # under sp: parallel.linear_input), counted once per chunk in t5_extras; where it is
    # not in the compute dtype (--fp32-residual) each layer casts a copy of its own.
    memory = 0 if sh.r == sh.e else sh.e * sh.n_sp * h
    cross = (sh.e * n_dec * 2 * q + sh.e * n_enc * 2 * q + 4 * n_dec * a
             + padding_mask(sh, sh.s_dec, sh.s, 4 if sh.e == 4 else sh.e))
    return {"attn_norm": rmsnorm(d, h), "qkv_inputs": linear_inputs(d, h),
            "self_attention_dec": t5_self_attention(d, cfg, sh.s_dec, sh.s_dec * sh.s_dec),
            "cross_norm": rmsnorm(d, h), "cross_q_input": linear_inputs(d, h),
            "cross_memory_inputs": memory, "cross_attention": cross,
            "mlp_norm": rmsnorm(d, h), **t5_ffn(d, cfg)}


# Mamba (mamba.py). Per rank: D = d_inner / tp channels (Mamba-2: H = n_heads / tp heads
# of P = head_dim, G = n_groups / tp groups, D = H P), N = d_state, w = d_conv. Under cp
# the convolution and the scan see every token of 1/cp of the channels: the same count
# of elements as n tokens of all D. Every layer is x + mixer(RMSNorm(x)), the residual
# in r bytes (fp32 under residual_in_fp32); the norm as LLaMA's, its output as in_proj's input.
#   The convolution (causal_conv): the padded input, transposed (b (s + w - 1) channels,
#   conv1d's input), conv1d's output (silu's input) and silu's output (n channels each);
#   under autocast in e.
def _conv(sh, channels, w):
    return sh.e * sh.b * (sh.s // sh.cp + w - 1) * channels + 2 * sh.e * sh.n * channels


#   Mamba-1 (Mamba1Mixer, kernels.selective_scan: SelectiveScan recomputes the states in
#   backward and keeps only its inputs): in_proj's output [x | z] (e n 2D: silu(z) reads
#   the z half; under autocast z.float() is a 4 n D copy instead), the convolution, x_proj's
#   input (a contiguous copy of silu's transposed output, e n D) and output (dt, B, C:
#   n (R + 2N), dt_proj's input and the scan's B, C), dt_proj's output (softplus' input)
#   and softplus' output dt as the scan reads it (4 n D each; under autocast the first is
#   e n D and the second the scan's float() copy), A = -exp(A_log) (exp's output and A: 8 D N), the initial state
#   zeros 4 b D N, then y + D x (in x's dtype, e n D; D x reads silu's output), silu(z)
#   4 n D, and out_proj's input (the gated product, cast under autocast) e n D.
def mamba1_mixer(sh, cfg):
    D, N, R, n, e = cfg.d_inner // sh.tp, cfg.d_state, cfg.dt_rank, sh.n, sh.e
    z = 2 * e * n * D if e == 4 else 4 * n * D
    dt = 2 * 4 * n * D if e == 4 else e * n * D + 4 * n * D
    # under autocast the scan's float() copies of x, B and C are saved as well
    casts = 0 if e == 4 else 4 * n * D + 2 * 4 * n * N
    return {"in_proj_output": z, "conv": _conv(sh, D, cfg.d_conv),
            "x_proj": e * n * D + e * n * (R + 2 * N), "dt": dt, "A_and_state": 8 * D * N + 4 * sh.b * D * N,
            "scan_casts": casts, "gate": 4 * n * D + 2 * e * n * D}


#   Mamba-2 (Mamba2Mixer): in_proj's output (e n W, W = 2D + 2GN + H: silu(z) reads z; under
#   autocast a 4 n D copy of z instead), the convolution over x, B, C (D + 2GN channels;
#   its weight is a concatenation of this rank's slices: a copy, channels x w), dt:
#   dt + dt_bias, softplus and clamp outputs (4 n H each), A (8 H), the scan (ssd below),
#   then y + D x, silu(z), y * silu(z), rsqrt (4 n G), the normed y and its product with
#   the norm's weight (out_proj's input; e under autocast): 5 x 4 n D.
def mamba2_mixer(sh, cfg):
    H, G, N, P = cfg.n_heads // sh.tp, cfg.n_groups // sh.tp, cfg.d_state, cfg.head_dim
    D, n, e = H * P, sh.n, sh.e
    channels = D + 2 * G * N
    W = 2 * D + 2 * G * N + H
    z = e * n * W if e == 4 else 4 * n * D
    return {"in_proj_output": z, "conv": _conv(sh, channels, cfg.d_conv) + e * channels * cfg.d_conv,
            "dt": 3 * 4 * n * H + 8 * H, "ssd": ssd(sh, cfg),
            "gated_norm": 4 * 4 * n * D + 4 * n * G + e * n * D}


#   The SSD scan, L = chunk_size, c = ceil(s / L) chunks, n' = b c L (the sequence padded
#   to whole chunks; padding also saves the padded x and dt, 4 n' (D + H)).
#   Triton (kernels.SSDFunction): x, dt, B, C (the tensors above), a_cum (4 n' H) and the
#       states entering each chunk and the final one (4 b (c + 1) H P N).
#   torch (CPU, kernels.ssd_chunked, plain autograd; under autocast its einsums run in e
#   and save e copies): the causal mask (L^2 bools); per head the (L x L) blocks: the decay
#   (4 n' H L), the raw scores and the decayed ones as einsum's operand (2 e n' H L); B
#   repeated to the heads (4 n' H N, read by the chunk-state product) and einsum's copies
#   of C, B, B * decay and C again (4 e n' H N); dt x as two einsum operands and C.state
#   (3 e n' H P); the decays to the chunk's end and from its start (2 x 4 n' H), the chunk
#   decays (4 b H c), the states passed ((c - 1) x 4 b H P N, fp32: the last chunk's
#   update saves one more, but it only computes the final state, which training drops with
#   its part of the graph) and their stack as einsum's operand (e b c H P N). Under
#   autocast the float() copy of x too (4 n' D).
def ssd(sh, cfg):
    H, N, P, L, e = cfg.n_heads // sh.tp, cfg.d_state, cfg.head_dim, cfg.chunk_size, sh.e
    # under cp the scan sees every token of 1/cp of the heads: as b*cp sequences of H/cp... the
    # same element count as b sequences of s/cp tokens of H heads: model it so
    T, b = sh.s // sh.cp, sh.b
    c = -(-T // L)
    n_pad = b * c * L
    pad = 4 * n_pad * (H * P + H) if c * L != T else 0
    if not sh.torch_kernels:
        return 4 * n_pad * H + 4 * b * (c + 1) * H * P * N + pad
    cast = 0 if e == 4 else 4 * n_pad * H * P
    return (L * L + 4 * n_pad * H * L + 2 * e * n_pad * H * L + 4 * n_pad * H * N
            + 4 * e * n_pad * H * N + 3 * e * n_pad * H * P + 2 * 4 * n_pad * H + 4 * b * H * c
            + (c - 1) * 4 * b * H * P * N + e * b * c * H * P * N + pad + cast)


#   Hybrids: '*' is llama.py's attention (norm, q/k/v inputs, attention), '-' its SwiGLU MLP
#   or Nemotron-H's squared ReLU (up's output, relu's output = square's input, the square
#   = down's input: 2 e n f... relu saves its output, square its input: one storage).
def mamba_layer(sh, cfg, i):
    h, kind = cfg.dim, cfg.pattern[i]
    if kind == "M":
        mixer = mamba1_mixer(sh, cfg) if cfg.version == 1 else mamba2_mixer(sh, cfg)
        return {"norm": rmsnorm(sh, h), "in_proj_input": linear_inputs(sh, h), **mixer}
    a = cfg.attention_config()
    if kind == "*":
        return {"norm": rmsnorm(sh, h), "qkv_inputs": linear_inputs(sh, h),
                "attention": llama_attention(sh, a)}
    f = a.ffn_dim // sh.tp
    if cfg.mlp == "swiglu":
        return {"norm": rmsnorm(sh, h), "mlp_inputs": linear_inputs(sh, h), "mlp": swiglu_mlp(sh, f)}
    return {"norm": rmsnorm(sh, h), "mlp_inputs": linear_inputs(sh, h), "mlp": 2 * sh.e * sh.n * f}


# ----------------------------------------------------------------------------
# Outside the layers: embeddings, RoPE tables, heads, the loss
# ----------------------------------------------------------------------------

def lm_loss(sh, cfg, padded_vocab, norm=rmsnorm):
    """A language model's last chunk: its final norm (x, rsqrt, normed; its output y is
    not saved: the chunked loss keeps dx instead, in y's dtype: the residual stream's),
    and dW (4 V/tp h)."""
    dx = sh.r * sh.n * cfg.dim
    return {"final_norm": norm(sh, cfg.dim), "loss_dx": dx, "loss_dW": 4 * padded_vocab // sh.tp * cfg.dim}


def llama_extras(sh, cfg, chunk, padded_vocab, recompute):
    """RoPE's cos and sin, once per chunk (its layers share them); the token ids (int64)."""
    out = {"rope_cos_sin": 2 * 4 * (sh.s // sh.cp) * cfg.head_dim}
    out.update({"token_ids": 8 * sh.n} if chunk.first else {})
    return {**out, **(lm_loss(sh, cfg, padded_vocab) if chunk.last else {})}


def gpt_extras(sh, cfg, chunk, padded_vocab, recompute):
    """The token ids and the learned positions' ids (int64); LayerNorm before the loss."""
    out = {"token_ids": 8 * sh.n, "positions": 8 * (sh.s // sh.cp)} if chunk.first else {}
    return {**out, **(lm_loss(sh, cfg, padded_vocab, layernorm) if chunk.last else {})}


def mamba_extras(sh, cfg, chunk, padded_vocab, recompute):
    """A hybrid's attention layers share RoPE's tables, as LLaMA's do."""
    out = {"rope_cos_sin": 2 * 4 * (sh.s // sh.cp) * cfg.attn_head_dim} if cfg.rope and "*" in cfg.pattern else {}
    out.update({"token_ids": 8 * sh.n} if chunk.first else {})
    return {**out, **(lm_loss(sh, cfg, padded_vocab) if chunk.last else {})}


def bert_extras(sh, cfg, chunk, padded_vocab, recompute):
    """The ids of tokens, positions and token types; post-LN's norm of the embeddings; at
    the end pre-LN's final norm and the heads."""
    h, out = cfg.dim, {}
    if chunk.first:
        out.update(token_ids=8 * sh.n, positions=8 * (sh.s // sh.cp), token_types=8 * sh.n)
        if not cfg.pre_ln:
            out["embed_norm"] = layernorm(sh, h)
    if not chunk.last:
        return out
    if cfg.pre_ln:
        out["final_norm"] = layernorm(sh, h)
    if cfg.mlm_head:
        # dense's input, GELU's input (e), mlm_norm (its input: GELU's output, e), the
        # predicted-token mask, then the loss over the predicted ~15%: dx (e) and dW, db
        predicted = int(sh.n * 0.15)
        out["mlm_head"] = linear_inputs(sh, h) + sh.e * sh.n_sp * h + layernorm(sh, h, sh.e) + sh.n
        out["loss_dx"] = sh.e * predicted * h
        out["loss_dW"] = 4 * padded_vocab // sh.tp * (h + 1)
    if cfg.pooler:  # the first token (a cast under autocast), tanh's output, the head
        out["pooler"] = (sh.e if sh.e == 2 else 0) * sh.b * h + sh.e * sh.b * h + 16 * sh.b
    return out


def t5_extras(sh, cfg, chunk, padded_vocab, recompute):
    """The encoder's and the decoder's token ids; the encoder's final norm and its output,
    which every decoder layer's cross-attention reads; the loss over the decoder tokens."""
    out = {"token_ids": 8 * sh.n, "decoder_ids": 8 * sh.b * sh.s_dec} if chunk.first else {}
    if cfg.n_encoder_layers - 1 in chunk.layers:
        out["encoder_norm"] = rmsnorm(sh, cfg.dim)
    if any(i >= cfg.n_encoder_layers for i in chunk.layers) and (sh.r == sh.e or recompute == "full"):
        out["encoder_output"] = sh.r * sh.n_sp * cfg.dim
    return {**out, **(lm_loss(sh.at(sh.s_dec), cfg, padded_vocab) if chunk.last else {})}


# ----------------------------------------------------------------------------
# Recomputation
# ----------------------------------------------------------------------------

def recompute_layers(per_layer, recompute_layers_n, method, inputs, kinds):
    """Activations of a chunk's layers (per_layer: bytes of each) under full recomputation:
    (stored, transient). Each checkpointed unit stores its inputs (inputs[i]: bytes of
    layer i's arguments) and nothing inside; during backward one unit's activations exist
    again while it is recomputed (the transient: the largest unit). Units are cut as
    parallel.recompute_units cuts them (never across a change of layer kind, `kinds`)."""
    N = recompute_layers_n or 1
    n = len(per_layer)
    if method == "block":  # the first N layers each keep only their input
        kept = min(N, n)
        return sum(inputs[:kept]) + sum(per_layer[kept:]), max(per_layer[:kept])
    units = []
    for i in range(n):
        if units and len(units[-1]) < N and kinds[units[-1][0]] == kinds[i]:
            units[-1].append(i)
        else:
            units.append([i])
    return (sum(inputs[u[0]] for u in units),
            max(sum(per_layer[i] for i in u) for u in units))


def residual_input(sh, cfg, i):
    """What a checkpointed unit starting at layer i keeps: its input, the residual stream."""
    return sh.r * sh.n_sp * cfg.dim


def flash_selective(sh, cfg, per):
    """A layer's pieces under --recompute selective: the attention core runs under a
    checkpoint that keeps q, k, v (its inputs); what the core itself saved (lse, and on the
    torch path the float mask) is recomputed. Its output is saved by o_proj anyway (counted
    as its input). With the Triton kernels: unchanged."""
    out = dict(per)
    if sh.torch_kernels and "attention" in out:
        out["attention"] -= 4 * sh.n * (cfg.n_heads // sh.tp) if sh.cp == 1 else 0
        out.pop("padding_mask", None)
    return out


def t5_selective(sh, cfg, per):
    """T5's self-attention core keeps only its q, k, v views (torch path); cross-attention
    recomputes its lse and padding mask."""
    out = dict(per)
    a = cfg.n_heads // sh.tp
    if sh.torch_kernels:
        for key, tokens in (("self_attention", sh.n), ("self_attention_dec", sh.b * sh.s_dec)):
            if key in out:
                out[key] = 4 * sh.e * tokens * a * cfg.head_dim
    if "cross_attention" in out:
        d = sh.at(sh.s_dec)
        out["cross_attention"] -= 4 * d.n * a + padding_mask(sh, sh.s_dec, sh.s, 4 if sh.e == 4 else sh.e)
    return out


def t5_unit_input(sh, cfg, i):
    """T5's decoder units keep their input of the decoder's tokens (the encoder output they
    also keep is one tensor for all of them, counted once in t5_extras)."""
    return 4 * (sh.at(sh.s_dec).n_sp if i >= cfg.n_encoder_layers else sh.n_sp) * cfg.dim


# ----------------------------------------------------------------------------
# A family's terms, and one micro-batch of a chunk
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Terms:
    """What the planner computes for a model family (its record, models.Family, holds one)."""
    layer: object      # (Shape, cfg, layer index) -> {component: bytes} of one layer
    extras: object     # (Shape, cfg, chunk, padded vocab, recompute) -> the chunk's other pieces
    selective: object = flash_selective  # (Shape, cfg, a layer's pieces) under --recompute selective
    unit_input: object = residual_input  # (Shape, cfg, i): what a checkpointed unit from layer i keeps
    kind: object = lambda cfg, i: 0      # layers of different kinds never share a recomputed unit


LLAMA = Terms(llama_layer, llama_extras)  # (and Mixtral: llama_layer has the experts)
GPT = Terms(gpt_layer, gpt_extras)
BERT = Terms(bert_layer, bert_extras)
T5 = Terms(t5_layer, t5_extras, t5_selective, t5_unit_input, kind=lambda cfg, i: i >= cfg.n_encoder_layers)
MAMBA = Terms(mamba_layer, mamba_extras)


def activation_bytes(terms, cfg, sh, chunk, padded_vocab, recompute="none",
                     recompute_n=1, method="uniform"):
    """{component: bytes} saved for backward by one micro-batch of a chunk (and the peak
    extra of recomputing one unit, under "recompute_transient")."""
    per = [terms.layer(sh, cfg, i) for i in chunk.layers]
    if recompute == "selective":
        per = [terms.selective(sh, cfg, p) for p in per]
    out = {}
    if recompute == "full":
        stored, transient = recompute_layers(
            [sum(p.values()) for p in per], recompute_n, method,
            [terms.unit_input(sh, cfg, i) for i in chunk.layers], [terms.kind(cfg, i) for i in chunk.layers])
        out["layers (recomputed units: inputs only)"] = stored
    else:
        transient = 0
        for p in per:
            for name, v in p.items():
                out[f"layer.{name}"] = out.get(f"layer.{name}", 0) + v
    out.update(terms.extras(sh, cfg, chunk, padded_vocab, recompute))
    return out, transient, per[0] if per else {}


# ----------------------------------------------------------------------------
# Micro-batches in flight
# ----------------------------------------------------------------------------

def in_flight(schedule, pp, vpp, stage, n_micro):
    """Micro-batch forwards (of one chunk each) whose activations are alive at once at
    the peak of `stage`: GPipe all of them; 1F1B min(pp - stage, n_micro); interleaved
    (Megatron) the warm-up forwards plus one, in chunks: min((pp - stage - 1) * 2 +
    (vpp - 1) * pp + 1, n_micro * vpp)."""
    if pp == 1:
        return 1
    if schedule == "gpipe":
        return n_micro
    if schedule == "interleaved":
        return min((pp - stage - 1) * 2 + (vpp - 1) * pp + 1, n_micro * vpp)
    return min(pp - stage, n_micro)


# ----------------------------------------------------------------------------
# Weights, gradients, optimizer: the real classes on the meta device
# ----------------------------------------------------------------------------

def state_bytes(family, cfg, layout, layers_per_chunk=None, zero1=True, param_dtype=torch.float32,
                grad_dtype=torch.float32):
    """(weights, gradients, optimizer, padded vocabulary, this rank's chunks) of the rank
    `layout.rank`, from DataParallel and AdamW built over meta tensors (the optimizer's:
    its moments, and under mixed precision its fp32 main weights, of its ZeRO-1 slice)."""
    chunks = parallel.rank_chunks(layout, cfg.n_layers, layers_per_chunk)
    with torch.device("meta"):
        modules = [family.model(cfg, layout, c) for c in chunks]
    ddp = parallel.DataParallel(modules, layout, zero1=zero1, param_dtype=param_dtype, grad_dtype=grad_dtype)
    opt = parallel.AdamW(ddp, 1e-3, 0.1)
    ddp.close()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    weights = nbytes(b.data for b in ddp.buckets)
    grads = nbytes(b.grads for b in ddp.buckets)
    optimizer = nbytes([*opt.exp_avg, *opt.exp_avg_sq, *(b.main for b in ddp.buckets if b.main.dtype != b.data.dtype)])
    vocab = -(-cfg.vocab_size // layout.tp) * layout.tp
    return weights, grads, optimizer, vocab, chunks


# ----------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class StagePlan:
    stage: int
    weights: int
    gradients: int
    optimizer: int
    activations_per_micro: dict
    in_flight: int
    recompute_transient: int
    logits_chunk: int
    per_layer: dict

    @property
    def activations(self):
        return sum(self.activations_per_micro.values()) * self.in_flight

    @property
    def peak(self):
        return (self.weights + self.gradients + self.optimizer + self.activations + self.recompute_transient + self.logits_chunk)


def plan(family, cfg, *, world, tp=1, cp=1, pp=1, ep=1, etp=None, vpp=1, sp=True, zero1=True,
         layers_per_chunk=None, schedule="1f1b", micro_batch=1, n_micro=1, seq_len=256,
         precision="fp32", recompute="none", recompute_n=1, recompute_method="uniform",
         torch_kernels=False, grad_dtype="fp32", fp32_residual=False):
    """One StagePlan per pipeline stage (tp rank 0, dp rank 0 of each) of a model of this
    family (models.Family) and config. `precision` fp32 or bf16 (mixed precision: bf16
    parameters, fp32 main weights; `grad_dtype` "fp32" or the model's, `fp32_residual` as
    train.py's flags). torch_kernels: kernels.py's torch path (the CPU), not its Triton
    kernels (a GPU)."""
    dp = world // (tp * cp * pp)
    sp = sp and tp > 1
    e = 4 if precision == "fp32" else 2
    param_dtype = torch.float32 if e == 4 else torch.bfloat16
    stages = []
    for stage in range(pp):
        layout = parallel.Layout(tp=tp, cp=cp, dp=dp, pp=pp, ep=ep, etp=etp or tp, sp=sp, vpp=vpp,
                                 rank=stage * tp * cp * dp)
        weights, grads, optim, vocab, chunks = state_bytes(
            family, cfg, layout, layers_per_chunk, zero1, param_dtype,
            torch.float32 if grad_dtype == "fp32" else param_dtype)
        fp32 = fp32_residual or family.fp32_residual(cfg)  # the residual stream's dtype
        sh = Shape(b=micro_batch, s=seq_len, tp=tp, cp=cp, sp=sp, e=e, r=4 if fp32 else e,
                   torch_kernels=torch_kernels, etp=etp or tp,
                   s_dec=family.decoder_len(seq_len) if family.decoder_len else 0)
        # With vpp chunks per rank the in-flight count is in chunk-forwards: use the
        # mean chunk (chunks of one rank hold the same number of layers unless --pp-layers).
        acts, transients = {}, []
        for c in chunks:
            a, t, per_layer = activation_bytes(family.planner, cfg, sh, c, vocab,
                                               recompute, recompute_n, recompute_method)
            for k, v in a.items():
                acts[k] = acts.get(k, 0) + v / len(chunks)
            transients.append(t)
        sched = "interleaved" if vpp > 1 else schedule
        flight = in_flight(sched, pp, vpp, stage, n_micro)
        last = any(c.last for c in chunks)
        logits = 4 * min(kernels.LOGITS_PER_CHUNK // (vocab // tp) * (vocab // tp),
                         sh.n * vocab // tp) if last else 0
        stages.append(StagePlan(stage, weights, grads, optim, {k: int(v) for k, v in acts.items()},
                                flight, max(transients), logits, per_layer))
    return stages


def flops_per_step(family, cfg, seq_len, global_batch, causal_half=False):
    """Training FLOPs of one step, from the model's own flops_per_token, which counts
    attention as the full (seq_len x seq_len) square; `causal_half`: a causal model's
    attention as half of it, as Megatron counts since 2025 (the attention term is what
    grows with seq_len: flops_per_token(seq_len) - flops_per_token(0))."""
    with torch.device("meta"):
        m = family.model(cfg, parallel.Layout(), parallel.Chunk(0, [0], True, True))
    per_token = family.flops_per_token(m, seq_len)
    if causal_half and family.causal:
        per_token -= (per_token - family.flops_per_token(m, 0)) / 2
    return per_token * seq_len * global_batch


GB = 2**30


def describe(stages, *, step_flops=None, world=1, peak_flops=None, mfu=0.4, peak_source=None,
             recompute="none", causal_flops=None, bubble=0.0):
    """The plan as text, one block per stage (one block if all stages agree). The step
    time runs `step_flops` (the model's FLOPs) and, under full recomputation, each layer's
    forward once more: 4/3 of them, at `mfu` of the peak, and the pipeline idles `bubble`
    of it (parallel.bubble_fraction: the busy time is 1 - bubble of the step)."""
    lines = []
    distinct = {}
    for st in stages:
        key = (st.weights, st.gradients, st.optimizer, st.activations, st.peak)
        distinct.setdefault(key, []).append(st.stage)
    for key, which in distinct.items():
        st = stages[which[0]]
        label = f"stage {which[0]}" if len(which) == 1 else f"stages {','.join(map(str, which))}"
        lines.append(f"-- per rank, pipeline {label} --")
        lines.append(f"  weights                   {st.weights / GB:10.2f} GiB")
        lines.append(f"  gradients                 {st.gradients / GB:10.2f} GiB")
        lines.append(f"  optimizer state           {st.optimizer / GB:10.2f} GiB")
        per_micro = sum(st.activations_per_micro.values())
        lines.append(f"  activations / micro-batch {per_micro / GB:10.2f} GiB:")
        for k, v in st.activations_per_micro.items():
            lines.append(f"    {k:34s} {v / GB:10.3f} GiB")
        lines.append(f"  micro-batches in flight   {st.in_flight:10d}")
        lines.append(f"  activations in flight     {st.activations / GB:10.2f} GiB")
        if st.recompute_transient:
            lines.append(f"  recompute (one unit)      {st.recompute_transient / GB:10.2f} GiB")
        if st.logits_chunk:
            lines.append(f"  loss: one chunk of logits {st.logits_chunk / GB:10.2f} GiB")
        lines.append(f"  peak                      {st.peak / GB:10.2f} GiB")
    if step_flops:
        lines.append(f"FLOPs per step: {step_flops:.3e} (attention as the full square)" + (
            f"; {causal_flops:.3e} with causal attention as half the square (Megatron's count since "
            f"2025)" if causal_flops and causal_flops != step_flops else ""))
        if peak_flops:
            run = step_flops * (4 / 3 if recompute == "full" else 1)
            seconds = run / (world * peak_flops * mfu) / (1 - bubble)
            lines.append(f"step time at {mfu:.0%} of {peak_flops / 1e12:.0f} TFLOP/s x {world} devices: "
                         f"{seconds:.2f} s" + (" (with --recompute full's second forward: 4/3 of the FLOPs)"
                                              if recompute == "full" else "")
                         + (f" (with the pipeline's bubble: {bubble:.0%} of the step idle)" if bubble else "")
                         + (f" (peak: {peak_source})" if peak_source else ""))
    return "\n".join(lines)


def peak_bytes(stages):
    return max(st.peak for st in stages)
