"""Mamba-1, Mamba-2 and hybrid Mamba/attention models.

A Mamba model is a stack of pre-norm residual layers whose sequence mixer is a
selective state-space model instead of attention:

    tokens -> embedding -> n_layers x [ x + Mixer(RMSNorm(x)) ] -> RMSNorm -> logits

The mixer keeps, for every channel, a hidden state of N numbers that each token
updates: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, output y_t = C_t . h_t (+ D x_t).
dt (the step size), B and C are computed from the token ("selective"), A is learned
per channel (Mamba-1) or per head (Mamba-2). Training computes all of it in parallel
over the sequence (kernels.selective_scan, kernels.ssd); decoding carries the state
from token to token, so memory per generated token is constant, unlike a KV cache.

  Mamba-1 (Gu & Dao, 2023): in_proj to x and a gate z; a causal depthwise convolution
    over x; x_proj to (dt, B, C), dt through a low-rank dt_proj and softplus; the
    selective scan with A = -exp(A_log) of shape (channels, N); D skip; y * silu(z);
    out_proj.
  Mamba-2 (Dao & Gu, 2024, "SSD"): one in_proj to [z | x | B | C | dt]; the convolution
    over x, B and C; heads of head_dim channels sharing one scalar A and one dt, B and
    C shared by the heads of a group (n_groups), like grouped-query attention; dt
    clamped to time_step_limit; the chunked SSD scan; D skip; a gated RMSNorm (per
    group) of y * silu(z); out_proj.
  Hybrids (Megatron's notation): `pattern` names each layer's mixer, M for Mamba, * for
    attention, - for an MLP (e.g. "M-M*-M-"); attention and MLP are llama.py's.

Tensor parallelism follows Megatron: each rank holds whole heads and whole groups.
Mamba-2's in_proj is one column-parallel matrix whose output features we order group by
group ([z | x | B | C | dt] of group 0, then of group 1, ...; Hugging Face orders them
component by component, and from_hf/to_hf permute), so a rank's contiguous slice is
whole groups with their heads; the convolution, A_log, D, dt_bias and the norm split
with them, out_proj is row-parallel. Mamba-1 has no heads, and each channel's scan is
independent: a rank owns a slice of the channels (in_proj, the convolution, dt_proj, A,
D) and computes its channels' part of x_proj's output (dt, B, C read every channel),
summed over tp; out_proj is row-parallel.

Context parallelism (Megatron's approach): the convolution and the scan need whole
sequences, so an all-to-all turns "my tokens of every head" into "every token of 1/cp of
my heads" around them (parallel.context_to_heads) and back; the hybrid's attention
layers use ring attention as llama.py does.

Parameter names follow Hugging Face's (mixer.in_proj, mixer.A_log, ...); layers are keyed
by global index.
"""
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
class Config:
    vocab_size: int = 50280
    dim: int = 768
    n_layers: int = 24
    version: int = 2               # 1: Mamba-1 mixers, 2: Mamba-2 (SSD)
    pattern: str = ""              # one symbol per layer: M Mamba, * attention, - MLP; "" = all M
    d_state: int = 128             # N, the state size per channel
    d_conv: int = 4                # width of the causal convolution
    expand: int = 2                # inner width = expand * dim
    head_dim: int = 64             # Mamba-2: channels per head
    n_heads: int = 0               # Mamba-2: 0 = expand * dim // head_dim
    n_groups: int = 1              # Mamba-2: groups of heads sharing B and C
    chunk_size: int = 256          # Mamba-2: the SSD scan's chunk length
    dt_rank: int = 0               # Mamba-1: width of dt's low-rank projection; 0 = ceil(dim / 16)
    dt_min: float = 0.001          # initial step sizes are log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit_min: float = 0.0      # Mamba-2: dt is clamped to [dt_limit_min, dt_limit_max]
    dt_limit_max: float = math.inf
    conv_bias: bool = True
    proj_bias: bool = False        # a bias on in_proj and out_proj
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True  # keep the residual stream in fp32 under low precision
    tie_embeddings: bool = True
    # Hybrid models: the attention and MLP layers (llama.py's, without RoPE by default, as
    # Megatron's hybrids: the Mamba layers carry the position information).
    attn_heads: int = 32
    attn_kv_heads: int = 8
    attn_head_dim: int = 128
    rope: bool = False
    rope_theta: float = 10000.0
    ffn_dim: int = 0               # MLP width; 0 = 4 * dim
    mlp: str = "swiglu"            # swiglu (llama.py's) or relu2 (squared ReLU, Nemotron-H)
    max_seq_len: int = 1 << 20     # no learned positions: only memory limits the length
    init_std: float = 0.02

    def __post_init__(self):
        errors.check_config_fields(self)
        self.pattern = self.pattern or "M" * self.n_layers
        self.d_inner = self.expand * self.dim
        self.n_heads = self.n_heads or self.d_inner // self.head_dim
        self.dt_rank = self.dt_rank or math.ceil(self.dim / 16)
        self.ffn_dim = self.ffn_dim or 4 * self.dim
        error = errors.UsageError
        if len(self.pattern) != self.n_layers:
            raise error(f"pattern {self.pattern!r} has {len(self.pattern)} symbols but n_layers="
                        f"{self.n_layers}; give one symbol per layer")
        unknown = sorted(set(self.pattern) - set("M*-"))
        if unknown:
            raise error(f"pattern {self.pattern!r}: unknown symbol(s) {''.join(unknown)!r}; use M "
                        f"(Mamba), * (attention) and - (MLP)")
        if self.version not in (1, 2):
            raise error(f"version={self.version}: Mamba has versions 1 and 2")
        if self.version == 2:
            if self.n_heads * self.head_dim != self.d_inner:
                raise error(f"n_heads * head_dim = {self.n_heads} * {self.head_dim} != expand * dim = "
                            f"{self.d_inner}; set n_heads=0 to derive it")
            if self.n_heads % self.n_groups:
                raise error(f"n_heads={self.n_heads} is not divisible by n_groups={self.n_groups}")
        if self.mlp not in ("swiglu", "relu2"):
            raise error(f"mlp={self.mlp!r}: choose swiglu or relu2")

    def attention_config(self):
        """llama.py's Config for the hybrid's attention and MLP layers."""
        return llama.Config(vocab_size=self.vocab_size, dim=self.dim, n_layers=self.n_layers,
                            n_heads=self.attn_heads, n_kv_heads=self.attn_kv_heads,
                            head_dim=self.attn_head_dim, ffn_dim=self.ffn_dim, norm_eps=self.norm_eps,
                            max_seq_len=self.max_seq_len, rope_theta=self.rope_theta)


# Presets are keyword arguments of Config (train.py: Config(**PRESETS[name], **overrides)).
_MAMBA1 = dict(version=1, d_state=16, vocab_size=50280)
_MAMBA2 = dict(version=2, d_state=128, vocab_size=50288)
PRESETS = {
    "mamba-130m": dict(**_MAMBA1, dim=768, n_layers=24),
    "mamba-370m": dict(**_MAMBA1, dim=1024, n_layers=48),
    "mamba-1.4b": dict(**_MAMBA1, dim=2048, n_layers=48),
    "mamba-2.8b": dict(**_MAMBA1, dim=2560, n_layers=64),
    "mamba2-130m": dict(**_MAMBA2, dim=768, n_layers=24),
    "mamba2-2.7b": dict(**_MAMBA2, dim=2560, n_layers=64),
    # Nemotron-H 8B's published shape: 52 layers, 24 Mamba-2 (128 heads, 8 groups), 4
    # attention (32 heads, 8 KV heads, no position embedding), 24 squared-ReLU MLPs.
    "nemotron-h-8b": dict(version=2, vocab_size=131072, dim=4096, n_layers=52,
                          pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
                          n_heads=128, n_groups=8, ffn_dim=21504, mlp="relu2", tie_embeddings=False),
    # Learns visibly in a few CPU minutes (byte-level vocabulary): Mamba-2.
    "tiny": dict(version=2, vocab_size=257, dim=256, n_layers=4, d_state=16, head_dim=64,
                 n_groups=2, chunk_size=32, max_seq_len=1024),
    "tiny-mamba1": dict(version=1, vocab_size=257, dim=256, n_layers=4, d_state=8, max_seq_len=1024),
    "tiny-hybrid": dict(version=2, vocab_size=257, dim=256, n_layers=6, pattern="M-M*M-",
                        d_state=32, head_dim=32, n_groups=2, chunk_size=64, attn_heads=8,
                        attn_kv_heads=4, attn_head_dim=32, ffn_dim=704, max_seq_len=1024),
    # Unit-test models: every feature, in milliseconds.
    "test": dict(version=2, vocab_size=257, dim=64, n_layers=2, d_state=8, head_dim=16,
                 n_groups=2, chunk_size=16, max_seq_len=256),
    "test-mamba1": dict(version=1, vocab_size=257, dim=64, n_layers=2, d_state=8, max_seq_len=256),
    "test-hybrid": dict(version=2, vocab_size=257, dim=64, n_layers=4, pattern="M*-M", d_state=8,
                        head_dim=16, n_groups=2, chunk_size=16, attn_heads=4, attn_kv_heads=2,
                        attn_head_dim=16, ffn_dim=128, rope=True, max_seq_len=256),
}

# ----------------------------------------------------------------------------
# Hugging Face names and layouts (MambaForCausalLM, Mamba2ForCausalLM)
# ----------------------------------------------------------------------------


def hf_name(name, cfg):
    """Our parameter name -> Hugging Face's."""
    if name == "lm_head.weight":
        return name
    name = name.replace("embed.", "embeddings.")
    return "backbone." + ("norm_f." + name[len("norm."):] if name.startswith("norm.") else name)


def _mamba2_components(cfg):
    """Widths of in_proj's components in Hugging Face's order, per group: z, x, B, C, dt."""
    per_group = cfg.d_inner // cfg.n_groups
    return [per_group, per_group, cfg.d_state, cfg.d_state, cfg.n_heads // cfg.n_groups]


def _group_major(tensor, widths, groups):
    """HF's [A | B | ...] (each component holding every group in turn) -> ours: group 0's
    part of every component, then group 1's, ... (dimension 0)."""
    parts = tensor.split([w * groups for w in widths])
    per_group = [p.reshape(groups, w, *p.shape[1:]) for p, w in zip(parts, widths)]
    return torch.cat(per_group, dim=1).reshape(tensor.shape)


def _component_major(tensor, widths, groups):
    """The inverse of _group_major."""
    parts = tensor.reshape(groups, sum(widths), *tensor.shape[1:]).split(widths, dim=1)
    return torch.cat([p.reshape(-1, *p.shape[2:]) for p in parts]).reshape(tensor.shape)


def _hf_reorder(name, cfg):
    """(widths, groups) of the grouped reordering `name` needs, or None."""
    if cfg.version != 2 or ".mixer." not in name:
        return None
    widths = _mamba2_components(cfg)
    if name.endswith("mixer.in_proj.weight") or name.endswith("mixer.in_proj.bias"):
        return widths, cfg.n_groups
    if name.endswith(("mixer.conv1d.weight", "mixer.conv1d.bias")):
        return widths[1:4], cfg.n_groups  # the convolution runs over x, B and C
    return None


def from_hf(name, tensor, cfg):
    """A Hugging Face tensor in our layout: Mamba-1's in_proj as (2, d_inner, dim), [x; z];
    Mamba-2's in_proj and convolution channels group by group."""
    if cfg.version == 1 and name.endswith("mixer.in_proj.weight"):
        return tensor.reshape(2, -1, tensor.shape[-1])
    if cfg.version == 1 and name.endswith("mixer.in_proj.bias"):
        return tensor.reshape(2, -1)
    reorder = _hf_reorder(name, cfg)
    return _group_major(tensor, *reorder) if reorder else tensor


def to_hf(name, tensor, cfg):
    """Our tensor in Hugging Face's layout: the inverse of from_hf."""
    if cfg.version == 1 and name.endswith(("mixer.in_proj.weight", "mixer.in_proj.bias")):
        return tensor.reshape(-1, *tensor.shape[2:])
    reorder = _hf_reorder(name, cfg)
    return _component_major(tensor, *reorder) if reorder else tensor

# ----------------------------------------------------------------------------
# The mixers
# ----------------------------------------------------------------------------


def causal_conv(x, weight, bias, state=None):
    """Depthwise causal convolution over the sequence: x (B, T, channels), weight
    (channels, 1, width). `state` holds the width - 1 inputs before x (decoding; zeros
    at the start of a sequence). Returns (silu(conv), the new state)."""
    width = weight.shape[-1]
    if state is None:
        state = x.new_zeros(x.shape[0], width - 1, x.shape[2])
    padded = torch.cat([state.to(x.dtype), x], dim=1)
    y = F.conv1d(padded.transpose(1, 2), weight, bias, groups=x.shape[2]).transpose(1, 2)
    return F.silu(y), padded[:, padded.shape[1] - (width - 1):]


def skip_pads(t, real):
    """t (B, T, ...) zeroed where `real` (B, T) is False (None: nothing to zero). Applied
    to the convolution's input, a pad looks like the zeros before a sequence's start; to
    dt, it makes the SSM step the identity (exp(0 * A) = 1, dt * B x = 0): left pads leave
    every state exactly as at the start."""
    if real is None:
        return t
    return t * real.view(*real.shape, *[1] * (t.dim() - 2)).to(t.dtype)


class SSMCache:
    """One Mamba layer's decoding state: the convolution's last inputs and the SSM state.
    Its size does not grow with the sequence."""

    def __init__(self):
        self.conv = self.ssm = None
        self.length = 0

    def keep_rows(self, rows):
        """Only these rows of the batch from now on (generate.py drops finished ones)."""
        self.conv, self.ssm = self.conv[rows], self.ssm[rows]


class Mamba1Mixer(nn.Module):
    """in_proj -> [x | z]; x = silu(conv(x)); (dt, B, C) = x_proj(x), dt = softplus(dt_proj(dt));
    y = scan(x, dt, A, B, C) + D x; out_proj(y * silu(z)). Under tp a rank owns a slice of
    the channels (d_inner / tp) and everything indexed by them."""

    def __init__(self, cfg: Config, layout):
        super().__init__()
        self.cfg, self.layout = cfg, layout
        D, N, R = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.in_proj = parallel.ColumnParallelLinear(cfg.dim, 2 * D, layout, cfg.proj_bias, groups=2,
                                                     name="expand * dim")
        self.conv1d = nn.Module()
        self.conv1d.weight = parallel.tp_sharded_parameter((D, 1, cfg.d_conv), 0, layout, "expand * dim")
        self.conv1d.bias = parallel.tp_sharded_parameter((D,), 0, layout, "expand * dim") \
            if cfg.conv_bias else None
        # Used through slices of their weights (forward below): parameters, not linears (so
        # they also stay in higher precision under --precision fp8). x_proj's input channels
        # are split over tp (the partial outputs are summed in forward), dt_proj's outputs.
        self.x_proj = nn.Module()
        self.x_proj.weight = parallel.tp_sharded_parameter((R + 2 * N, D), 1, layout, "expand * dim")
        self.dt_proj = nn.Module()
        self.dt_proj.weight = parallel.tp_sharded_parameter((D, R), 0, layout, "expand * dim")
        self.dt_proj.bias = parallel.tp_sharded_parameter((D,), 0, layout, "expand * dim")
        self.A_log = parallel.tp_sharded_parameter((D, N), 0, layout, "expand * dim")
        self.D = parallel.tp_sharded_parameter((D,), 0, layout, "expand * dim")
        self.out_proj = parallel.RowParallelLinear(D, cfg.dim, layout, cfg.proj_bias)

    def forward(self, u, cache=None, real=None):
        """`real` (B, T): False on a left-padded batch's pads (decoding), which then leave
        the states as at the sequence start (`skip_pads`)."""
        cfg, layout = self.cfg, self.layout
        u = parallel.linear_input(u, layout)
        x, z = self.in_proj(u).chunk(2, dim=-1)                    # this rank's channels
        # Under cp: every token of this rank's 1/cp of the channels.
        x = parallel.context_to_heads(x, layout)
        part = parallel.context_heads(self.D.shape[0], layout)
        x, conv_state = causal_conv(skip_pads(x, real), self.conv1d.weight[part],
                                    None if self.conv1d.bias is None else self.conv1d.bias[part],
                                    cache and cache.conv)
        # dt, B and C read every channel: sum this rank's part over tp and cp.
        dt_B_C = F.linear(x, self.x_proj.weight[:, part])
        dt_B_C = parallel.sum_partials(parallel.sum_partials(dt_B_C, layout.tp_group), layout.cp_group)
        dt, B, C = dt_B_C.split([cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
        dt = skip_pads(F.softplus(F.linear(dt, self.dt_proj.weight[part], self.dt_proj.bias[part])), real)
        A = -torch.exp(self.A_log[part].float())
        if cache is not None and cache.ssm is not None and x.shape[1] == 1:
            y, state = kernels.selective_scan_step(cache.ssm, x[:, 0].float(), dt[:, 0].float(), A,
                                                   B[:, 0].float(), C[:, 0].float())
            y = y[:, None]
        else:
            y, state = kernels.selective_scan(x, dt, A, B, C, cache and cache.ssm)
        if cache is not None:
            cache.conv, cache.ssm = conv_state, state
        y = parallel.heads_to_context(y + x * self.D[part], layout)
        return self.out_proj((y * F.silu(z.float())).to(u.dtype))


class Mamba2Mixer(nn.Module):
    """in_proj -> [z | x | B | C | dt] per group; (x, B, C) = silu(conv(x, B, C));
    dt = clamp(softplus(dt + dt_bias)); y = ssd(x, dt, A, B, C) + D x per head;
    out_proj(RMSNorm per group of y * silu(z)). Under tp a rank owns whole groups and
    their heads (see the file's docstring for the order of in_proj's features)."""

    def __init__(self, cfg: Config, layout):
        super().__init__()
        self.cfg, self.layout = cfg, layout
        parallel.check_divisible(layout.tp, n_heads=cfg.n_heads, n_groups=cfg.n_groups)
        H, G, N = cfg.n_heads, cfg.n_groups, cfg.d_state
        self.heads, self.groups = H // layout.tp, G // layout.tp
        self.cp_groups = parallel.context_head_groups(self.heads, self.groups, layout)  # per cp rank
        conv_channels = cfg.d_inner + 2 * G * N
        self.in_proj = parallel.ColumnParallelLinear(cfg.dim, sum(_mamba2_components(cfg)) * G, layout,
                                                     cfg.proj_bias, name="n_groups")
        self.conv1d = nn.Module()
        self.conv1d.weight = parallel.tp_sharded_parameter((conv_channels, 1, cfg.d_conv), 0, layout,
                                                           "n_groups")
        self.conv1d.bias = parallel.tp_sharded_parameter((conv_channels,), 0, layout, "n_groups") \
            if cfg.conv_bias else None
        self.dt_bias = parallel.tp_sharded_parameter((H,), 0, layout, "n_heads")
        self.A_log = parallel.tp_sharded_parameter((H,), 0, layout, "n_heads")
        self.D = parallel.tp_sharded_parameter((H,), 0, layout, "n_heads")
        self.norm = nn.Module()
        self.norm.weight = parallel.tp_sharded_parameter((cfg.d_inner,), 0, layout, "n_heads")
        self.out_proj = parallel.RowParallelLinear(cfg.d_inner, cfg.dim, layout, cfg.proj_bias)

    def _scan_share(self, x, B, C, dt):
        """What this rank scans: under cp, every token of its 1/cp of the heads, with the
        groups those heads read (a group serving heads of several cp ranks goes to each),
        and the slices of the convolution and the per-head parameters that go with them.
        Without cp, everything."""
        layout = self.layout
        heads = parallel.context_heads(self.heads, layout)
        x, dt = parallel.context_to_heads(x, layout), parallel.context_to_heads(dt, layout)
        B, C = (parallel.groups_to_heads(t, self.cp_groups, layout) for t in (B, C))
        groups = slice(self.cp_groups[layout.cp_rank][0], self.cp_groups[layout.cp_rank][-1] + 1)
        conv = [None if t is None else self._conv_channels(t, heads, groups)
                for t in (self.conv1d.weight, self.conv1d.bias)]
        return x, B, C, dt, conv, heads

    def _conv_channels(self, t, heads, groups):
        """The convolution's weight or bias for [x of `heads` | B of `groups` | C of
        `groups`], from its group-major layout ([x | B | C] of each group in turn)."""
        cfg = self.cfg
        t = t.reshape(self.groups, -1, *t.shape[1:])
        tx, tB, tC = t.split([cfg.d_inner // cfg.n_groups, cfg.d_state, cfg.d_state], dim=1)
        tx = tx.reshape(self.heads, cfg.head_dim, *t.shape[2:])[heads]
        return torch.cat([tx.flatten(0, 1), tB[groups].flatten(0, 1), tC[groups].flatten(0, 1)])

    def forward(self, u, cache=None, real=None):
        """`real`: as Mamba1Mixer.forward's."""
        cfg, layout = self.cfg, self.layout
        u = parallel.linear_input(u, layout)
        batch, T, _ = u.shape
        P, N = cfg.head_dim, cfg.d_state
        d_group = cfg.d_inner // cfg.n_groups
        z, x, B, C, dt = self.in_proj(u).view(batch, T, self.groups, -1).split(
            _mamba2_components(cfg), dim=-1)
        x, B, C, dt, (conv_w, conv_b), heads = self._scan_share(
            x.reshape(batch, T, self.heads, P), B, C, dt.reshape(batch, T, self.heads))
        T_all, n_heads, n_groups = x.shape[1], x.shape[2], B.shape[2]
        xBC, conv_state = causal_conv(skip_pads(torch.cat([x.flatten(2), B.flatten(2), C.flatten(2)], dim=-1),
                                                real), conv_w, conv_b, cache and cache.conv)
        x, B, C = xBC.split([n_heads * P, n_groups * N, n_groups * N], dim=-1)
        x = x.view(batch, T_all, n_heads, P)
        B, C = B.view(batch, T_all, n_groups, N), C.view(batch, T_all, n_groups, N)
        dt = F.softplus(dt.float() + self.dt_bias[heads].float())
        dt = skip_pads(dt.clamp(cfg.dt_limit_min, cfg.dt_limit_max), real)
        A = -torch.exp(self.A_log[heads].float())
        if cache is not None and cache.ssm is not None and T_all == 1:
            y, state = kernels.ssd_step(cache.ssm, x[:, 0].float(), dt[:, 0], A, B[:, 0].float(),
                                        C[:, 0].float())
            y = y[:, None]
        else:
            y, state = kernels.ssd(x, dt, A, B, C, cfg.chunk_size, cache and cache.ssm)
        if cache is not None:
            cache.conv, cache.ssm = conv_state, state
        y = parallel.heads_to_context(y + x * self.D[heads, None], layout)
        y = gated_rmsnorm(y.reshape(batch, T, self.groups, d_group), z, cfg.norm_eps)
        y = y.flatten(2) * self.norm.weight
        return self.out_proj(y.to(u.dtype))


def gated_rmsnorm(y, z, eps):
    """RMSNorm of y * silu(z) over each group's channels (Mamba-2 normalizes per group, so
    that a tp rank holding whole groups needs nothing from the others), in fp32."""
    y = y.float() * F.silu(z.float())
    return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)


class SquaredReLUMLP(nn.Module):
    """Nemotron-H's MLP: down(relu(up(x))^2); under tp each rank owns ffn_dim/tp features."""

    def __init__(self, cfg: llama.Config, layout):
        super().__init__()
        self.layout = layout
        self.up_proj = parallel.ColumnParallelLinear(cfg.dim, cfg.ffn_dim, layout)
        self.down_proj = parallel.RowParallelLinear(cfg.ffn_dim, cfg.dim, layout)

    def forward(self, x):
        x = parallel.linear_input(x, self.layout)
        return self.down_proj(F.relu(self.up_proj(x)).square())

# ----------------------------------------------------------------------------
# Layers and the model
# ----------------------------------------------------------------------------


class Layer(nn.Module):
    """One residual branch, x + mixer(RMSNorm(x)): the mixer is Mamba, attention or an MLP
    (one symbol of the pattern)."""

    def __init__(self, kind, cfg: Config, layout):
        super().__init__()
        self.kind, self.residual_in_fp32 = kind, cfg.residual_in_fp32
        self.norm = kernels.RMSNorm(cfg.dim, cfg.norm_eps)
        if kind == "M":
            self.mixer = (Mamba1Mixer if cfg.version == 1 else Mamba2Mixer)(cfg, layout)
        elif kind == "*":
            self.mixer = llama.Attention(cfg.attention_config(), layout)
        else:
            mlp = llama.MLP if cfg.mlp == "swiglu" else SquaredReLUMLP
            self.mixer = mlp(cfg.attention_config(), layout)

    def forward(self, x, positions, cos, sin, cache=None, real=None):
        residual = x.float() if self.residual_in_fp32 else x
        h = self.norm(x)
        if self.kind == "M":
            h = self.mixer(h, cache, real)
        elif self.kind == "*":
            h = self.mixer(h, positions, cos, sin, real, kv_cache=cache)
        else:
            h = self.mixer(h)
        return residual + h


class Mamba(nn.Module):
    """The whole model, or under pipeline parallelism one chunk of it (see
    parallel.keep_chunk)."""

    def __init__(self, cfg: Config, layout=None, chunk=None):
        super().__init__()
        self.cfg = cfg
        self.layout = layout = layout or parallel.Layout()
        if "*" in cfg.pattern:
            parallel.check_divisible(layout.tp, attn_heads=cfg.attn_heads)
            parallel.tp_replicas(layout.tp, cfg.attn_kv_heads, "attn_kv_heads")
        if "-" in cfg.pattern:
            parallel.check_divisible(layout.tp, ffn_dim=cfg.ffn_dim)
        self.embed = parallel.VocabParallelEmbedding(cfg.vocab_size, cfg.dim, layout)
        self.layers = nn.ModuleDict({str(i): Layer(kind, cfg, layout) for i, kind in enumerate(cfg.pattern)})
        self.norm = kernels.RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = (None if cfg.tie_embeddings else
                        parallel.VocabParallelOutput(cfg.vocab_size, cfg.dim, layout))
        self.register_buffer("inv_freq", torch.empty(cfg.attn_head_dim // 2), persistent=False)
        # This pipeline chunk of the whole model; sets self.chunk (its layers, first, last).
        parallel.keep_chunk(self, chunk, first=["embed"], last=["norm", "lm_head"],
                            tied_embedding="embed" if cfg.tie_embeddings else None)

    def init_weights(self, seed):
        """Deterministic, layout-independent initialization (see parallel.init_parameters),
        then Mamba's own: A = -(1, 2, ..., N) per channel (Mamba-1) or -(1, ..., heads)
        (Mamba-2), D = 1, and dt_bias such that softplus(dt_bias) is log-uniform in
        [dt_min, dt_max]. Convolutions and Mamba-1's dt_proj start as PyTorch's default
        (uniform with the fan-in's variance); outputs of residual branches get
        std / sqrt(n_layers)."""
        c = self.cfg

        def std_for(name):
            if name.endswith("conv1d.weight"):
                return 1 / math.sqrt(3 * c.d_conv)
            if name.endswith("dt_proj.weight"):
                return 1 / math.sqrt(3 * c.dt_rank)
            if name.endswith(("out_proj.weight", "o_proj.weight", "down_proj.weight")):
                return c.init_std / math.sqrt(c.n_layers)
            return c.init_std
        parallel.init_parameters(self, seed, std_for)
        for name, p in self.named_parameters():
            if name.endswith("mixer.A_log"):
                n = p.shape[-1] if c.version == 1 else c.n_heads
                a = torch.arange(1, n + 1, dtype=torch.float32).log()
                parallel.copy_global(p, a.expand(c.d_inner, n) if c.version == 1 else a)
            elif name.endswith(("mixer.dt_bias", "mixer.dt_proj.bias")):
                dt = torch.rand(parallel.global_region(p)[0], generator=parallel.init_generator(seed, name))
                dt = torch.exp(dt * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
                dt = dt.clamp(min=c.dt_init_floor)
                parallel.copy_global(p, dt + torch.log(-torch.expm1(-dt)))  # softplus^-1
        if "*" in c.pattern:
            self.inv_freq.copy_(kernels.rope_inv_freq(c.attn_head_dim, c.rope_theta))

    def new_kv_caches(self, max_len):
        """Decoding caches: a constant-size SSMCache per Mamba layer, a KV cache per
        attention layer, nothing for an MLP."""
        return [SSMCache() if layer.kind == "M" else kernels.KVCache(max_len) if layer.kind == "*"
                else None for layer in self.layers.values()]

    def forward(self, input_ids, labels=None, attention_mask=None, kv_caches=None, hidden=None,
                positions=None):
        """Called like every model here (llama.Llama.forward says how). `attention_mask`
        (padding) only while decoding (kv_caches), left padding (generate.py's batches):
        pads leave every state as at the start (skip_pads). A training batch cannot
        have it: the convolution of a token after a pad would see the pad."""
        if kv_caches is None and attention_mask is not None and not bool(attention_mask.all()):
            raise errors.UsageError("Mamba models take no padding mask: batch sequences of "
                                      "equal length")
        real = attention_mask if kv_caches else None
        caches = kv_caches or [None] * len(self.layers)
        start = next((c.length for c in caches if c is not None), 0)
        T = input_ids.shape[1]
        rope = kernels.rope_cos_sin_rows if positions is not None else kernels.rope_cos_sin
        if positions is None:
            positions = start + parallel.zigzag_positions(T, self.layout, input_ids.device)
        cos = sin = None
        if self.cfg.rope and "*" in self.cfg.pattern:
            cos, sin = rope(positions, self.inv_freq)
        x = self.embed(parallel.context_shard(input_ids, self.layout)) if hidden is None else hidden
        for i, layer in enumerate(self.layers.values()):
            x = layer(x, positions, cos, sin, caches[i], real)
        for c in caches:
            if isinstance(c, SSMCache):
                c.length = start + T
        return parallel.language_model_output(self, x, labels)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (3 x forward; 2 per weight of each matrix multiply). The
        scans' own work (O(d_inner * d_state) per token, independent of seq_len) and the
        hybrid's attention scores (as llama.py counts them) are added."""
        c = self.cfg
        if c.version == 1:
            mamba = c.dim * 2 * c.d_inner + c.d_inner * (c.dt_rank + 2 * c.d_state) \
                + c.dt_rank * c.d_inner + c.d_inner * c.dim
        else:
            mamba = c.dim * sum(_mamba2_components(c)) * c.n_groups + c.d_inner * c.dim
        scan = 3 * c.d_inner * c.d_state  # decay, input and output per channel and state
        a = c.attention_config()
        attention = 2 * c.dim * (a.n_heads + a.n_kv_heads) * a.head_dim
        mlp = (3 if c.mlp == "swiglu" else 2) * c.dim * c.ffn_dim
        per_kind = {"M": mamba + scan, "*": attention + a.n_heads * 2 * seq_len * a.head_dim, "-": mlp}
        return 3 * 2 * (sum(per_kind[k] for k in c.pattern) + c.dim * c.vocab_size)


# ----------------------------------------------------------------------------
# Hugging Face: config.json <-> Config (convert.py reads and writes the files; a setting
# this model cannot reproduce is refused, never ignored)
# ----------------------------------------------------------------------------

def config_from_hf(hf, model_type):
    """Mamba (MambaForCausalLM) and Mamba-2 (Mamba2ForCausalLM) -> mamba.Config."""
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        errors.unsupported_hf(model_type, f"hidden_act={hf['hidden_act']!r}")
    rank = hf.get("time_step_rank", "auto")
    fields = dict(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                  d_state=hf["state_size"], d_conv=hf.get("conv_kernel", 4), expand=hf.get("expand", 2),
                  conv_bias=bool(hf.get("use_conv_bias", True)), proj_bias=bool(hf.get("use_bias", False)),
                  norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                  residual_in_fp32=bool(hf.get("residual_in_fp32", True)),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", model_type == "mamba")),
                  dt_min=hf.get("time_step_min", 0.001), dt_max=hf.get("time_step_max", 0.1),
                  dt_init_floor=hf.get("time_step_floor", 1e-4))
    if model_type == "mamba":
        return Config(version=1, dt_rank=0 if rank == "auto" else int(rank), **fields)
    # transformers 5 writes infinity as {"__float__": "Infinity"}; json writes Infinity.
    low, high = (float(v["__float__"] if isinstance(v, dict) else v)
                 for v in hf.get("time_step_limit", (0.0, math.inf)))
    return Config(version=2, n_heads=hf["num_heads"], head_dim=hf["head_dim"],
                        n_groups=hf.get("n_groups", 1), chunk_size=hf.get("chunk_size", 256),
                        dt_limit_min=low, dt_limit_max=high, **fields)


def config_to_hf(cfg):
    if cfg.pattern != "M" * cfg.n_layers:
        raise errors.UsageError(f"pattern {cfg.pattern!r}: Hugging Face's Mamba classes hold Mamba layers "
                         f"only; a hybrid cannot be exported")
    fields = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
                  state_size=cfg.d_state, conv_kernel=cfg.d_conv, expand=cfg.expand,
                  use_conv_bias=cfg.conv_bias, use_bias=cfg.proj_bias, hidden_act="silu",
                  layer_norm_epsilon=cfg.norm_eps, residual_in_fp32=cfg.residual_in_fp32,
                  tie_word_embeddings=cfg.tie_embeddings, time_step_min=cfg.dt_min,
                  time_step_max=cfg.dt_max, time_step_floor=cfg.dt_init_floor)
    if cfg.version == 1:
        return "mamba", dict(fields, time_step_rank=cfg.dt_rank)
    return "mamba2", dict(fields, num_heads=cfg.n_heads, head_dim=cfg.head_dim, n_groups=cfg.n_groups,
                          chunk_size=cfg.chunk_size,
                          time_step_limit=[cfg.dt_limit_min, cfg.dt_limit_max])
