"""The compute kernels the models call: attention, RMSNorm, SwiGLU, the FP8 matmul, the loss
(linear + cross-entropy), RoPE and the KV cache, and the state-space scans.

Each kernel sits beside its plain PyTorch reference (the `*_reference` functions):
short, obviously correct, and the oracle every faster implementation is tested
against. The public functions (`attention`, `rmsnorm`, `swiglu`) are what models call;
they dispatch through `backend()`:

  - "triton": the Triton kernels of this file, each wrapped in a torch.autograd.Function
    (forward and backward kernels). Chosen automatically for CUDA tensors when Triton
    is installed.
  - "torch": plain PyTorch. `attention` uses scaled_dot_product_attention (which picks
    FlashAttention/cuDNN/memory-efficient kernels on CUDA, the math path on CPU);
    RMSNorm and SwiGLU are their references. Chosen everywhere else.

`linear_cross_entropy` (the loss, through parallel.output_layer) is plain PyTorch on every
backend: its saving is memory, from computing the loss in chunks of tokens.

KERNELS_BACKEND=torch|triton forces either. Triton kernels can also run on a CPU
through Triton's interpreter (TRITON_INTERPRET=1, which executes each kernel program
with numpy: slow, for tests at small shapes). Triton decides between compiling and
interpreting when a function is decorated with @triton.jit: Triton's own library when
triton is first imported, our kernels when this file is. So TRITON_INTERPRET must be set
before the process first imports triton (or this file, which imports it).

Triton is optional: without it this file imports, `BACKENDS` is ("torch",) and every
function runs its reference.

  Backend dispatch         Triton or torch (backend()), and the autotuning lists per GPU
  Attention                the masking rule (positions_mask), attention over blocks of keys
                           (attention_with_lse), FlashAttention-2 forward and backward with
                           T5's relative position bias computed from its bucket table
  RMSNorm and LayerNorm    LayerNorm run in its input's dtype, under autocast too
  SwiGLU
  FP8 matmul               quantization and the scaled GEMM (per-tensor or per-row scales)
  Linear + cross-entropy   the loss, chunked: never all the logits at once
  RoPE and the KV cache    rotary position tables; decoding's cache (rolling under a window)
  State-space scans        Mamba-1's selective scan; Mamba-2's SSD, chunked, with Triton
                           kernels forward and backward
"""
import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

    class _NoTriton:
        """Stand-in for `triton` and `triton.language` when Triton is not installed, so
        that the kernel definitions below still execute as plain (never launched)
        Python functions: backend() never chooses "triton" without Triton."""
        constexpr = None

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton


# ----------------------------------------------------------------------------
# Backend dispatch: Triton or torch, and the autotuning lists
# ----------------------------------------------------------------------------

def _interpret_requested():
    """TRITON_INTERPRET as Triton itself reads it."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


# Whether the kernels below are defined for Triton's CPU interpreter (see the docstring).
_INTERPRET = HAVE_TRITON and _interpret_requested()

BACKENDS = ("torch", "triton") if HAVE_TRITON else ("torch",)


def backend(x):
    """Which implementation runs for tensor `x`: "triton" for CUDA tensors when Triton is
    installed, else "torch". KERNELS_BACKEND=torch|triton overrides; forcing "triton"
    for a CPU tensor needs Triton's interpreter (TRITON_INTERPRET=1)."""
    choice = os.environ.get("KERNELS_BACKEND", "")
    if not choice:
        return "triton" if HAVE_TRITON and x.is_cuda else "torch"
    if choice not in ("torch", "triton"):
        raise ValueError(f"KERNELS_BACKEND={choice!r} is not a backend; choose from {BACKENDS}")
    if choice == "triton":
        if not HAVE_TRITON:
            raise ValueError("KERNELS_BACKEND=triton, but triton is not installed: "
                             "pip install triton (or unset KERNELS_BACKEND)")
        if not x.is_cuda and not _INTERPRET:
            hint = ("TRITON_INTERPRET=1 was set after `import kernels`; set it before "
                    "triton is first imported" if _interpret_requested()
                    else "set TRITON_INTERPRET=1 (before triton or kernels is imported) to "
                         "run them in Triton's interpreter, which is slow and meant for tests")
            raise ValueError(f"KERNELS_BACKEND=triton on a {x.device.type} tensor: Triton "
                             f"kernels compile for GPUs only; {hint}")
    return choice


def _autotune(key, hopper, interpreter, ampere=None, ada=None, meta=("BLOCK_M", "BLOCK_N"), accumulates=()):
    """triton.autotune over a short list of launch configurations for this GPU.

    Configurations are tuples: the values of the `meta` parameters (by default BLOCK_M,
    BLOCK_N), then num_warps and num_stages. There is one list per GPU generation: Hopper
    (sm_90: more shared memory and registers per SM, so larger tiles and deeper pipelines
    pay), Ada (sm_89, optional: 99 KiB of shared memory per block) and Ampere (sm_80/86,
    optional for kernels that need newer instructions, such as FP8 tl.dot). A GPU gets the
    list of the newest generation it has reached (an sm_89 card without an Ada list gets
    Ampere's). The first launch for a new `key` times each configuration and keeps the
    fastest; configurations that do not fit the card's shared memory are skipped by the
    autotuner. Under the interpreter there is one small fixed configuration: timing is
    meaningless there, and slow. KERNELS_AUTOTUNE=first keeps the first configuration of
    this GPU's list and times nothing: one compilation per kernel and shape class, for
    correctness runs (scripts/gpu_check.sh's tests) where tuning would only cost minutes.

    The lists were chosen from `python bench.py kernels-compile`, which compiles every
    configuration for each listed GPU without a GPU and reports ptxas's register spills
    and the shared memory used: each list has configurations that spill nothing at head
    dims 64 and 128 (the FP8 matmul's: none spills). The decorated kernel keeps them as
    `configs_by_arch` ({90: [...], 89: [...], 80: [...]}, the lists given), and
    `with_configs(configs, do_bench=None)` makes the same kernel tuned over other
    configurations (timed by `do_bench(kernel_call, quantiles)`, triton's, if given).

    `accumulates` names the outputs the kernel adds into (atomics) instead of writing once.
    While it times the configurations the autotuner launches the kernel several times, each
    launch adding again: these are zeroed before each timed launch and after the last
    (triton's reset_to_zero). So each launch passes a buffer of its own there, never another
    argument as a placeholder (it would be zeroed too).
    """
    if not HAVE_TRITON:
        return lambda fn: fn

    def config(c):
        *values, num_warps, num_stages = c
        return triton.Config(dict(zip(meta, values, strict=True)), num_warps=num_warps, num_stages=num_stages)

    by_arch = {arch: [config(c) for c in configs]
               for arch, configs in ((90, hopper), (89, ada), (80, ampere)) if configs}

    def this_gpu(configs, named_args, **kwargs):
        major, minor = torch.cuda.get_device_capability()
        reached = [arch for arch in by_arch if arch <= 10 * major + minor]
        return by_arch[max(reached) if reached else min(by_arch)]

    def decorate(fn):
        def tuned_over(configs, prune=None, do_bench=None):
            tuner = triton.autotune(configs, key=key, prune_configs_by=prune, do_bench=do_bench,
                                    reset_to_zero=list(accumulates) or None)(fn)
            tuner.configs_by_arch = by_arch
            tuner.with_configs = lambda tuples, do_bench=None: tuned_over([config(c) for c in tuples],
                                                                          do_bench=do_bench)
            return tuner
        if _INTERPRET:  # one config: nothing is timed
            return tuned_over([config(interpreter)])
        every_config = [c for configs in by_arch.values() for c in configs]
        if _autotune_mode() == "first":
            return tuned_over(every_config, {"early_config_prune": lambda *a, **kw: this_gpu(*a, **kw)[:1]},
                              do_bench=_not_timed)
        return tuned_over(every_config, {"early_config_prune": this_gpu})
    return decorate


def _autotune_mode():
    mode = os.environ.get("KERNELS_AUTOTUNE", "all") or "all"
    if mode not in ("all", "first"):
        raise ValueError(f"KERNELS_AUTOTUNE={mode!r}: choose all (time every configuration, the "
                         f"default) or first (the first of this GPU's list, nothing timed)")
    return mode


def _not_timed(kernel_call, quantiles):
    """The autotuner's timing under KERNELS_AUTOTUNE=first: with one configuration left there
    is nothing to choose, so the kernel is not launched to be timed."""
    return [0.0] * len(quantiles)


def _launch_ready(t):
    """Kernels take strides for every dimension but the last, which must be 1."""
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------

def document_runs(documents):
    """Megatron's --reset-attention-mask marks each token with its document: `documents`
    (B, T), a document index at every position. A document is a run of consecutive equal
    indices (the same index after another document's run is a new document, as the Triton
    kernels see it): the runs numbered 0, 1, ... along each row."""
    new_run = torch.ones_like(documents, dtype=torch.long)
    new_run[:, 1:] = (documents[:, 1:] != documents[:, :-1]).long()
    return new_run.cumsum(1)


def document_bounds(documents):
    """(start, end) int32 (B, T): the positions [start, end) of the document holding each
    position (document_runs' documents). What the Triton kernels read instead of a
    (T x T) mask: key j is in query i's document when start_i <= j < end_i."""
    runs = document_runs(documents)
    index = torch.arange(runs.shape[1], device=runs.device).expand_as(runs)
    first = torch.ones_like(runs, dtype=torch.bool)
    first[:, 1:] = runs[:, 1:] != runs[:, :-1]
    start = torch.where(first, index, 0).cummax(1).values
    last = torch.ones_like(first)
    last[:, :-1] = first[:, 1:]
    end = torch.where(last, index + 1, runs.shape[1]).flip(1).cummin(1).values.flip(1)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def positions_mask(q_pos, k_pos, causal=True, window=None, key_padding_mask=None, documents=None):
    """The masking rule of every attention here (the Triton kernels' is tested against it):
    query at position i may attend key at position j when j <= i (causal) and i - w < j
    (`window` w, Mistral's sliding window) and key j is real (`key_padding_mask` (B, keys),
    True on real tokens) and, with `documents` (B, sequence: every position's document,
    document_runs), j is in i's document. Boolean (B or 1, 1, queries, keys), True = may
    attend."""
    mask = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool, device=q_pos.device)
    if causal:
        mask &= k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    mask = mask[None, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :].bool()
    if documents is not None:
        runs = document_runs(documents)
        mask = mask & (runs[:, None, q_pos, None] == runs[:, None, None, k_pos])
    return mask


def attention_mask(q_len, k_len, device, causal=True, window=None, key_padding_mask=None, documents=None):
    """positions_mask for queries that are the *last* q_len positions of the k_len keys
    (decoding with a KV cache appends queries at the end), or None when nothing is masked."""
    if not causal and window is None and key_padding_mask is None and documents is None:
        return None
    return positions_mask(torch.arange(k_len - q_len, k_len, device=device), torch.arange(k_len, device=device),
                          causal, window, key_padding_mask, documents)


def attention_with_lse(q, k, v, q_pos, k_pos, causal=True, window=None, scale=None, key_padding_mask=None,
                       documents=None):
    """(out, lse): attention of q on keys at arbitrary positions (positions_mask's rule),
    in fp32, and each query's log-sum-exp of its scores, so that attention over disjoint
    blocks of keys merges exactly (online softmax: context parallelism's ring). A query
    with every key masked gets lse = -inf and output 0. Shapes as attention_reference's."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    mask = positions_mask(q_pos, k_pos, causal, window, key_padding_mask, documents)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(scores - safe[..., None]) @ v.float(), lse


@dataclass
class RelativePositionBias:
    """T5's learned relative position bias: table (num_buckets, H) (this rank's heads), the
    bucket of each key-minus-query distance as T5 defines it (`relative_position_bucket`).
    The score of query i and key j gets table[bucket(pos_j - pos_i), h] added."""
    table: torch.Tensor
    bidirectional: bool     # encoder: True; decoder self-attention: False (past only)
    max_distance: int = 128

    def __post_init__(self):
        # T5's bucketing needs an exact bucket and max_distance past the exact ones (else
        # it divides by log(1) = 0 or makes negative buckets); the kernels rely on every
        # |distance| >= max_distance on one side sharing a bucket.
        max_exact = self.table.shape[0] // (2 if self.bidirectional else 1) // 2
        if self.table.dim() != 2 or max_exact < 1 or self.max_distance <= max_exact:
            raise ValueError(f"RelativePositionBias: table {tuple(self.table.shape)} must be "
                             f"(num_buckets, heads) with num_buckets >= {4 if self.bidirectional else 2} "
                             f"and max_distance ({self.max_distance}) > num_buckets // "
                             f"{4 if self.bidirectional else 2}")


def relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """T5's bucketing (exactly Hugging Face's T5Attention._relative_position_bucket, written
    out by us): relative_position = key position - query position (LongTensor) -> bucket ids.

    Bidirectional, half the buckets are for keys after the query and half for keys at or
    before it; unidirectional, keys after the query all share bucket 0. On each side, the
    first half of the buckets hold distances 0, 1, .. exactly, the rest logarithmically
    wider ranges up to max_distance; every |distance| >= max_distance is in the last
    bucket of its side."""
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets = (relative_position > 0).to(torch.long) * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    # (the same float operations, in the same order, as Hugging Face's: a bucket boundary
    # must round the same way. log(0) = -inf is converted but never chosen.)
    if_large = max_exact + (torch.log(distance.float() / max_exact)
                            / math.log(max_distance / max_exact)
                            * (num_buckets - max_exact)).to(torch.long)
    if_large = torch.clamp(if_large, max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, if_large)


def relative_position_bias_reference(position_bias, q_len, k_len):
    """(1, H, q_len, k_len): table[bucket(j - (i + k_len - q_len))].T — queries are the last
    q_len of the k_len positions (KV-cached decoding), as everywhere in this file.
    Differentiable with respect to the table (a gather)."""
    q_pos = torch.arange(k_len - q_len, k_len, device=position_bias.table.device)[:, None]
    k_pos = torch.arange(k_len, device=position_bias.table.device)[None, :]
    buckets = relative_position_bucket(k_pos - q_pos, position_bias.bidirectional,
                                       position_bias.table.shape[0], position_bias.max_distance)
    return position_bias.table[buckets].permute(2, 0, 1)[None]


@functools.lru_cache(maxsize=64)
def _distance_buckets(q_len, k_len, bidirectional, num_buckets, max_distance, device):
    """What the Triton kernels read instead of a (q_len, k_len) bias: the bucket of every
    key-minus-query distance d = -(k_len - 1) .. q_len - 1, at index d + k_len - 1 (int32,
    q_len + k_len - 1 of them). Bucketed here, in torch, so that boundaries round exactly
    as `relative_position_bucket` (Hugging Face's) does; cached, since every layer of a
    model asks for the same ones."""
    distances = torch.arange(-(k_len - 1), q_len, device=device)
    return relative_position_bucket(distances, bidirectional, num_buckets, max_distance).to(torch.int32)


def attention_reference(q, k, v, causal=True, window=None, key_padding_mask=None, scale=None,
                        bias=None, documents=None):
    """softmax(q k^T * scale + bias + mask) v, written out. q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D)
    with H a multiple of Hkv (grouped-query attention: query head h reads KV head h // (H/Hkv)).
    `bias` (broadcastable to (B, H, Tq, Tk)) is an additive position bias, materialized
    (T5's: `relative_position_bias_reference`). `documents` (B, Tk): each key position's
    document (positions_mask; a query sees only its own document's keys).
    A query row whose keys are all masked gets NaN here (0/0); the Triton path defines it as 0."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.float()
    mask = attention_mask(q.shape[2], k.shape[2], q.device, causal, window, key_padding_mask, documents)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


# FlashAttention-2 (Dao, 2023) in Triton.
#
# Attention for one query row i is softmax(s_i) V with s_ij = scale * q_i . k_j. The
# reference materializes the whole (Tq, Tk) score matrix; FlashAttention never does.
# Each program owns a block of BLOCK_M query rows and streams over blocks of BLOCK_N
# keys, keeping for each row a running maximum m, a running denominator l and an
# unnormalized output acc ("online softmax"). When a new block raises the maximum from
# m to m', everything accumulated so far is rescaled by exp(m - m'), so at the end
# acc / l is exactly the softmax-weighted sum. Memory is O(T) instead of O(T^2), and
# each K/V block is read from HBM once per query block instead of materializing S and P.
#
# Conventions shared by the kernels below:
#   - Scores are kept in base 2: s2 = s * log2(e), so exp(x) becomes exp2(x2), one
#     hardware instruction. The saved log-sum-exp LSE is in the same base-2 units.
#   - Query index i (0 <= i < Tq) sits at position i + Tk - Tq (queries are the last Tq
#     positions: KV-cached decoding), key index j at position j.
#   - GQA: query head h reads KV head h // GROUP, GROUP = H / Hkv; K and V are never
#     repeated in memory.
#   - A query row with no visible key (all keys padded) outputs 0 and gets LSE = +inf,
#     which makes its recomputed probabilities exp2(s2 - LSE) exactly 0 in the backward
#     pass, so it contributes no gradient instead of NaN.
#   - Masking: `_attn_visible` is the Triton twin of `attention_mask`. Blocks that are
#     entirely masked by causality or the window are skipped by the loop bounds
#     (`_attn_key_range`, `_attn_query_range`); the mask is evaluated on the blocks that
#     remain. (FlashAttention-2 proper also splits off the diagonal blocks so that full
#     blocks skip the mask arithmetic; we keep one loop for clarity.)
#   - Documents (HAS_DOCS, Megatron's --reset-attention-mask): a query sees only keys of
#     its own document, given as each position's document bounds [start, end)
#     (`document_bounds`, two int32 (B, Tk) vectors: O(T), never a (T x T) mask). The
#     loop bounds also skip key blocks outside the query block's documents (and query
#     blocks outside the key block's), so packed short documents cost what they attend.
#   - T5's relative position bias (HAS_POS_BIAS): s_ij += table[bucket(pos_j - pos_i), h],
#     gathered from the (num_buckets, H) table (fp32, times log2(e) like the scores) and
#     an int32 vector DIST_BUCKETS, the bucket of every distance (`_distance_buckets`,
#     O(T)), never from a (Tq, Tk) bias. Its gradient is dS summed over the elements of
#     each (bucket, head): the dQ kernel, which has dS of one head's query block, adds it
#     into an fp32 (num_buckets, H) buffer with atomics.

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)


@triton.jit
def _attn_visible(q_pos, k_idx, k_real, window, doc_start, doc_end, IS_CAUSAL: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr):
    """May query position q_pos attend key position k_idx? (broadcastable tiles)

    `k_real` is False for keys past the end of the sequence or padded out; causal keeps
    k <= q, the sliding window keeps k > q - window, documents keep the keys of the
    query's document [doc_start, doc_end) (exactly `attention_mask`)."""
    visible = k_real
    if IS_CAUSAL:
        visible = visible & (k_idx <= q_pos)
    if HAS_WINDOW:
        visible = visible & (k_idx > q_pos - window)
    if HAS_DOCS:
        visible = visible & (k_idx >= doc_start) & (k_idx < doc_end)
    return visible


@triton.jit
def _attn_doc_bounds(DOC_START, DOC_END, pos, valid, HAS_DOCS: tl.constexpr):
    """The document bounds [start, end) of positions `pos` (where `valid`; elsewhere an
    empty document). Without documents, unused placeholders."""
    start = pos
    end = pos
    if HAS_DOCS:
        start = tl.load(DOC_START + pos, mask=valid, other=0)
        end = tl.load(DOC_END + pos, mask=valid, other=0)
    return start, end


@triton.jit
def _attn_key_real(KPM, stride_mt, k_idx, Tk, HAS_PADDING: tl.constexpr):
    """Which keys of the block exist and are real tokens (key_padding_mask True)."""
    real = k_idx < Tk
    if HAS_PADDING:
        real = real & (tl.load(KPM + k_idx * stride_mt, mask=k_idx < Tk, other=0) != 0)
    return real


@triton.jit
def _attn_pos_bias(DIST_BUCKETS, TABLE, q_pos, k_idx, Tk, H, needed):
    """T5's bias of a tile (broadcastable q_pos, k_idx) where `needed` (the visible
    elements of real query rows): (bucket, bias). DIST_BUCKETS[d + Tk - 1] is the bucket
    of distance d = k - q; TABLE points at head h's column of the (num_buckets, H) table,
    which the host scaled by log2(e) (the scores are in base 2). Elsewhere bucket 0 and
    bias 0, and nothing out of range is read."""
    bucket = tl.load(DIST_BUCKETS + (k_idx - q_pos + Tk - 1), mask=needed, other=0)
    return bucket, tl.load(TABLE + bucket * H, mask=needed, other=0.0)


@triton.jit
def _attn_key_range(start_m, offset, Tk, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[lo, hi): the keys that queries start_m .. start_m + BLOCK_M - 1 can see.

    Causal: the last query of the block (position start_m + BLOCK_M - 1 + offset) sees
    keys up to its own position. Window: the first query (position start_m + offset)
    sees keys from position - window + 1 on; `lo` is rounded down to a key block so the
    loads stay aligned. Key blocks outside [lo, hi) are skipped, not masked: this is
    where causal attention saves half the work and a window saves all but ~w/T of it."""
    lo = 0
    hi = Tk
    if IS_CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + offset)
    if HAS_WINDOW:
        lo = tl.maximum(0, start_m + offset - window + 1) // BLOCK_N * BLOCK_N
    return lo, hi


@triton.jit
def _attn_query_range(start_n, offset, Tq, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[lo, hi): the queries that can see keys start_n .. start_n + BLOCK_N - 1.

    The mirror image of `_attn_key_range`: causal, key j is seen by queries at positions
    >= j (index >= j - offset); window, by positions < j + window."""
    lo = 0
    hi = Tq
    if IS_CAUSAL:
        lo = tl.maximum(0, start_n - offset) // BLOCK_M * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(hi, start_n + BLOCK_N - 1 - offset + window)
    return lo, hi


@triton.jit
def _attn_doc_key_range(lo, hi, q_start, q_end, rows, BLOCK_N: tl.constexpr):
    """[lo, hi) narrowed to the documents of a query block's rows (their bounds q_start,
    q_end; `rows` the real ones): keys before the first row's document or after the last
    row's are never visible. Documents are consecutive runs, so the block's keys lie in
    [min start, max end); lo rounded down to a key block, as in _attn_key_range."""
    first = tl.min(tl.where(rows, q_start, hi))
    last = tl.max(tl.where(rows, q_end, lo))
    return tl.maximum(lo, first // BLOCK_N * BLOCK_N), tl.minimum(hi, last)


@triton.jit
def _attn_doc_query_range(lo, hi, DOC_START, DOC_END, start_n, Tk, offset, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """[lo, hi) narrowed to the queries in the documents of keys start_n ..
    start_n + BLOCK_N - 1: from the first key's document start to the last key's document
    end (as query indices: positions - offset); lo rounded down to a query block."""
    last_key = tl.minimum(start_n + BLOCK_N, Tk) - 1
    first = tl.maximum(tl.load(DOC_START + start_n) - offset, 0)
    return tl.maximum(lo, first // BLOCK_M * BLOCK_M), tl.minimum(hi, tl.load(DOC_END + last_key) - offset)


_ATTN_KEY = ["HEAD_DIM", "Q_BUCKET", "K_BUCKET", "IS_CAUSAL", "HAS_WINDOW", "HAS_PADDING", "HAS_POS_BIAS",
             "HAS_DOCS"]


@_autotune(_ATTN_KEY,
           hopper=[(128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3)],
           ampere=[(128, 64, 8, 2), (64, 128, 8, 3), (64, 64, 8, 2), (64, 32, 4, 2)],
           interpreter=(16, 32, 4, 1))
@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, KPM, DOC_START, DOC_END, DIST_BUCKETS, TABLE,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                     stride_mb, stride_mt,
                     H, GROUP, Tq, Tk, window, qk_scale,
                     Q_BUCKET, K_BUCKET,  # autotuning keys only (powers of two of Tq, Tk)
                     HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     HAS_PADDING: tl.constexpr, HAS_POS_BIAS: tl.constexpr, HAS_DOCS: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Forward pass: one program computes O and LSE for BLOCK_M query rows of one head.

    For each visible key block: S = Q K^T (scaled, base 2) + T5's bias, mask, raise the
    running row maximum m, rescale the running sum l and the accumulator by
    exp2(m_old - m_new), add P = exp2(S - m_new) and P V. At the end O = acc / l and
    LSE = m + log2(l), saved for the backward pass (it replaces the softmax matrix
    there). grid: (query blocks, B * H)."""
    pid_m = tl.program_id(0)
    if IS_CAUSAL:  # the last query blocks see the most keys: start them first, so that
        pid_m = tl.num_programs(0) - 1 - pid_m  # the long programs are not the last wave
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: b * stride overflows int32 on big batches
    h = pid_bh % H
    h_kv = h // GROUP  # GQA: index the shared KV head, never copy it
    offset = Tk - Tq  # position of query 0

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=offs_m[:, None] < Tq, other=0.0)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    kpm_base = KPM + b * stride_mb
    q_start, q_end = _attn_doc_bounds(DOC_START + b * Tk, DOC_END + b * Tk, offs_m + offset, offs_m < Tq, HAS_DOCS)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                 # running denominator
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)       # running numerator, P V

    lo, hi = _attn_key_range(start_m, offset, Tk, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    if HAS_DOCS:
        lo, hi = _attn_doc_key_range(lo, hi, q_start, q_end, offs_m < Tq, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        k_idx = start_n + offs_n
        k = tl.load(k_base + k_idx[:, None] * stride_kt + offs_d[None, :],
                    mask=k_idx[:, None] < Tk, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        k_real = _attn_key_real(kpm_base, stride_mt, k_idx, Tk, HAS_PADDING)
        visible = _attn_visible(offs_m[:, None] + offset, k_idx[None, :], k_real[None, :], window,
                                q_start[:, None], q_end[:, None], IS_CAUSAL, HAS_WINDOW, HAS_DOCS)
        if HAS_POS_BIAS:
            _, bias = _attn_pos_bias(DIST_BUCKETS, TABLE + h, offs_m[:, None] + offset, k_idx[None, :],
                                     Tk, H, visible & (offs_m[:, None] < Tq))
            s += bias
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet has m_new = -inf; subtracting 0 instead
        # keeps exp2(-inf - -inf) = NaN out (its p and alpha are then exactly 0).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + k_idx[:, None] * stride_vt + offs_d[None, :],
                    mask=k_idx[:, None] < Tk, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # every key masked: define the output as 0 (the reference gives NaN)
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=offs_m[:, None] < Tq)
    tl.store(LSE + pid_bh * Tq + offs_m, lse, mask=offs_m < Tq)


@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot,
                                stride_db, stride_dh, stride_dt, H, Tq,
                                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id, for each query row.

    Softmax's backward is dS = P * (dP - rowsum(P * dP)), and rowsum(P * dP) =
    rowsum(P * (dO V^T)) = rowsum(dO * (P V)) = rowsum(dO * O): one number per row,
    computed once here instead of in every key block. grid: (query blocks, B * H)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < Tq
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=rows, other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :],
                 mask=rows, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * Tq + offs_m, delta, mask=offs_m < Tq)


@_autotune(_ATTN_KEY,
           hopper=[(64, 128, 8, 3), (64, 64, 8, 3), (32, 64, 8, 2), (16, 64, 8, 2)],
           ampere=[(32, 64, 8, 2), (16, 64, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
           interpreter=(16, 32, 4, 1))
@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KPM, DOC_START, DOC_END, DIST_BUCKETS, TABLE,
                          stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                          stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                          stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                          stride_mb, stride_mt,
                          H, GROUP, Tq, Tk, window, qk_scale, sm_scale,
                          Q_BUCKET, K_BUCKET,
                          HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                          HAS_PADDING: tl.constexpr, HAS_POS_BIAS: tl.constexpr, HAS_DOCS: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Backward, dK and dV: one program owns BLOCK_N keys of one KV head.

    It holds its K, V block and accumulators in registers and streams over the query
    blocks that can see it, for every query head of its GQA group (so dK and dV are
    summed over the group here, with no atomics and no per-query-head copies). For each
    query block it recomputes P^T = exp2(K Q^T * scale + bias^T - LSE) from the saved
    LSE, then
      dV += P^T dO,   dP^T = V dO^T,   dS^T = P^T * (dP^T - delta),   dK += dS^T Q * scale.
    grid: (key blocks, B * Hkv). The price of summing the group in-program: with few KV
    heads and a small batch there are fewer programs than with one per query head
    (FlashAttention-2 writes per-query-head dK, dV and sums them: more memory, more
    parallelism)."""
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    H_kv = H // GROUP
    b = (pid_bkv // H_kv).to(tl.int64)
    h_kv = pid_bkv % H_kv
    offset = Tk - Tq

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    keys = offs_n[:, None] < Tk
    k = tl.load(K + b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=keys, other=0.0)
    v = tl.load(V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=keys, other=0.0)
    k_real = _attn_key_real(KPM + b * stride_mb, stride_mt, offs_n, Tk, HAS_PADDING)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    doc_start, doc_end = DOC_START + b * Tk, DOC_END + b * Tk
    lo, hi = _attn_query_range(start_n, offset, Tq, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    if HAS_DOCS:
        lo, hi = _attn_doc_query_range(lo, hi, doc_start, doc_end, start_n, Tk, offset, BLOCK_M, BLOCK_N)
    for h in range(h_kv * GROUP, (h_kv + 1) * GROUP):
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row_base = (b * H + h) * Tq  # LSE and delta are (B, H, Tq), contiguous
        for start_m in range(lo, hi, BLOCK_M):
            q_idx = start_m + offs_m
            rows = q_idx[:, None] < Tq
            q = tl.load(q_base + q_idx[:, None] * stride_qt + offs_d[None, :], mask=rows, other=0.0)
            do = tl.load(do_base + q_idx[:, None] * stride_dot + offs_d[None, :], mask=rows, other=0.0)
            lse = tl.load(LSE + row_base + q_idx, mask=q_idx < Tq, other=float("inf"))
            delta = tl.load(DELTA + row_base + q_idx, mask=q_idx < Tq, other=0.0)

            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (keys, queries)
            q_start, q_end = _attn_doc_bounds(doc_start, doc_end, q_idx + offset, q_idx < Tq, HAS_DOCS)
            visible = _attn_visible(q_idx[None, :] + offset, offs_n[:, None], k_real[:, None], window,
                                    q_start[None, :], q_end[None, :], IS_CAUSAL, HAS_WINDOW, HAS_DOCS)
            if HAS_POS_BIAS:
                _, bias_t = _attn_pos_bias(DIST_BUCKETS, TABLE + h, q_idx[None, :] + offset,
                                           offs_n[:, None], Tk, H, visible & (q_idx[None, :] < Tq))
                s_t += bias_t
            p_t = tl.exp2(tl.where(visible, s_t, float("-inf")) - lse[None, :])
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    dk = dk * sm_scale  # S = scale * Q K^T, so dK = scale * dS^T Q
    tl.store(DK + b * stride_dkb + h_kv * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=keys)
    tl.store(DV + b * stride_dvb + h_kv * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=keys)


@_autotune(_ATTN_KEY,
           hopper=[(128, 64, 8, 3), (64, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)],
           ampere=[(128, 64, 8, 3), (64, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2)],
           interpreter=(16, 32, 4, 1), accumulates=("DTABLE",))
@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KPM, DOC_START, DOC_END, DIST_BUCKETS, TABLE, DTABLE,
                        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                        stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                        stride_dqb, stride_dqh, stride_dqt,
                        stride_mb, stride_mt,
                        H, GROUP, Tq, Tk, window, qk_scale, sm_scale, max_distance,
                        Q_BUCKET, K_BUCKET,
                        HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                        HAS_PADDING: tl.constexpr, HAS_POS_BIAS: tl.constexpr, HAS_DOCS: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Backward, dQ: one program owns BLOCK_M query rows of one head and streams over the
    key blocks they can see (the forward's loop), recomputing P from LSE:
      dP = dO V^T,   dS = P * (dP - delta),   dQ += dS K * scale,
    and, with T5's bias, d table[bucket, h] += dS summed over the bucket's elements.
    A separate pass rather than atomic adds from the dK/dV kernel: deterministic, and
    each dQ row is written once (the table's gradient, from atomics, is deterministic
    only up to the order of its fp32 additions). grid: (query blocks, B * H)."""
    pid_m = tl.program_id(0)
    if IS_CAUSAL:  # longest programs first, as in the forward pass
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    h_kv = h // GROUP
    offset = Tk - Tq

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < Tq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=rows, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=rows, other=0.0)
    lse = tl.load(LSE + pid_bh * Tq + offs_m, mask=offs_m < Tq, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    kpm_base = KPM + b * stride_mb
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    q_first = start_m + offset  # the block's query positions (for the far-block test below)
    q_last = start_m + BLOCK_M - 1 + offset
    q_start, q_end = _attn_doc_bounds(DOC_START + b * Tk, DOC_END + b * Tk, offs_m + offset, offs_m < Tq, HAS_DOCS)

    lo, hi = _attn_key_range(start_m, offset, Tk, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    if HAS_DOCS:
        lo, hi = _attn_doc_key_range(lo, hi, q_start, q_end, offs_m < Tq, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        k_idx = start_n + offs_n
        k = tl.load(k_base + k_idx[:, None] * stride_kt + offs_d[None, :],
                    mask=k_idx[:, None] < Tk, other=0.0)
        v = tl.load(v_base + k_idx[:, None] * stride_vt + offs_d[None, :],
                    mask=k_idx[:, None] < Tk, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        k_real = _attn_key_real(kpm_base, stride_mt, k_idx, Tk, HAS_PADDING)
        visible = _attn_visible(offs_m[:, None] + offset, k_idx[None, :], k_real[None, :], window,
                                q_start[:, None], q_end[:, None], IS_CAUSAL, HAS_WINDOW, HAS_DOCS)
        if HAS_POS_BIAS:
            needed = visible & rows
            bucket, bias = _attn_pos_bias(DIST_BUCKETS, TABLE + h, offs_m[:, None] + offset, k_idx[None, :],
                                          Tk, H, needed)
            s += bias
        p = tl.exp2(tl.where(visible, s, float("-inf")) - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])  # exactly 0 where masked (p = 0, the rest finite)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        if HAS_POS_BIAS:
            # The table's gradient: dS of each element to its (bucket, h). All distances
            # >= max_distance share one bucket, and so do all <= -max_distance
            # (`relative_position_bucket`), so a block whose distances all lie on one of
            # those sides ("far" from the diagonal: most blocks of a long sequence) takes
            # one sum and one atomic instead of BLOCK_M * BLOCK_N atomics contending for
            # that one address. Near the diagonal, one atomic per needed element.
            # (Relaxed: a sum needs no ordering; the default acq_rel fences each atomic.)
            d_min = start_n - q_last  # the block's smallest and largest key - query distance
            d_max = tl.minimum(start_n + BLOCK_N, Tk) - 1 - q_first  # (a real pair's: in range)
            if (d_max <= -max_distance) | (d_min >= max_distance):
                far_bucket = tl.load(DIST_BUCKETS + d_max + Tk - 1)
                tl.atomic_add(DTABLE + far_bucket * H + h, tl.sum(ds), sem="relaxed")
            else:
                tl.atomic_add(DTABLE + bucket * H + h, ds, mask=needed, sem="relaxed")

    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=rows)


def _strides(t):
    """Strides of the leading three dimensions (batch, head, position) of (B, H, T, D)."""
    return t.stride(0), t.stride(1), t.stride(2)


class FlashAttention(torch.autograd.Function):
    """attention() on the Triton kernels above: forward saves (q, k, v, o, LSE), backward
    runs the delta preprocess, the dK/dV kernel and the dQ kernel (which also gives T5's
    table its gradient)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, window, key_padding_mask, scale, table, bidirectional,
                max_distance, documents):
        q, k, v = (_launch_ready(t) for t in (q, k, v))
        B, H, Tq, D = q.shape
        Tk = k.shape[2]
        ctx.scale = D ** -0.5 if scale is None else scale
        kpm = None
        if key_padding_mask is not None:  # bool -> int8 (one byte per key); (1, Tk) broadcasts
            kpm = key_padding_mask.to(device=q.device, dtype=torch.int8).expand(B, Tk)
        doc_bounds = None if documents is None else document_bounds(documents.to(q.device).expand(B, Tk))
        buckets = table2 = None
        if table is not None:  # T5: the bucket of each distance, and the table in base 2, fp32
            buckets = _distance_buckets(Tq, Tk, bidirectional, table.shape[0], max_distance, q.device)
            table2 = (table.float() * LOG2E).contiguous()
        ctx.max_distance = max_distance
        ctx.table_dtype = table.dtype if table is not None else None
        # What the attention kernels take after their tensors, strides and scales:
        ctx.sizes = (H, H // k.shape[1], Tq, Tk, window or 0)
        ctx.flags = dict(Q_BUCKET=triton.next_power_of_2(Tq), K_BUCKET=triton.next_power_of_2(Tk),
                         HEAD_DIM=D, IS_CAUSAL=bool(causal), HAS_WINDOW=window is not None,
                         HAS_PADDING=kpm is not None, HAS_POS_BIAS=table is not None,
                         HAS_DOCS=doc_bounds is not None,
                         # fp32 inputs: exact fp32 products (torch's default), not TF32
                         DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")

        # O is laid out (B, Tq, H, D) in memory: the caller's o.transpose(1, 2).reshape(...)
        # back to (B, Tq, H * D) is then free.
        o = torch.empty(B, Tq, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
        lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)

        def grid(meta):
            return triton.cdiv(Tq, meta["BLOCK_M"]), B * H
        _attn_fwd_kernel[grid](
            q, k, v, o, lse,  # q stands in for the pointers that are not used
            kpm if kpm is not None else q, *(doc_bounds or (q, q)),
            *(t if t is not None else q for t in (buckets, table2)),
            *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            *(kpm.stride() if kpm is not None else (0, 0)),
            *ctx.sizes, ctx.scale * LOG2E, **ctx.flags)
        ctx.save_for_backward(q, k, v, o, lse, kpm, table2, *(doc_bounds or ()))
        ctx.buckets = buckets  # (cached by _distance_buckets, perhaps made under inference_mode,
        return o               # which save_for_backward refuses; neither input nor output)

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kpm, table2, *doc_bounds = ctx.saved_tensors
        buckets = ctx.buckets
        do = _launch_ready(do)
        B, H, Tq, D = q.shape
        H_kv, Tk = k.shape[1], k.shape[2]
        kpm_ptr, kpm_strides = (kpm, kpm.stride()) if kpm is not None else (q, (0, 0))
        mask_ptrs = (kpm_ptr, *(doc_bounds or (q, q)))
        bias_ptrs = (buckets, table2) if buckets is not None else (q, q)
        dtable = torch.zeros_like(table2) if table2 is not None else None  # fp32, atomics add to it
        scales = (ctx.scale * LOG2E, ctx.scale)

        delta = torch.empty_like(lse)
        block = 16 if _INTERPRET else 64
        _attn_bwd_preprocess_kernel[(triton.cdiv(Tq, block), B * H)](
            o, do, delta, *_strides(o), *_strides(do), H, Tq, HEAD_DIM=D, BLOCK_M=block)

        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

        def dkdv_grid(meta):
            return triton.cdiv(Tk, meta["BLOCK_N"]), B * H_kv
        _attn_bwd_dkdv_kernel[dkdv_grid](
            q, k, v, do, lse, delta, dk, dv, *mask_ptrs, *bias_ptrs,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
            *kpm_strides, *ctx.sizes, *scales, **ctx.flags)

        def dq_grid(meta):
            return triton.cdiv(Tq, meta["BLOCK_M"]), B * H
        _attn_bwd_dq_kernel[dq_grid](
            q, k, v, do, lse, delta, dq, *mask_ptrs, *bias_ptrs,
            dtable if dtable is not None else q.new_zeros(1, dtype=torch.float32),  # (zeroed while tuning)
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
            *kpm_strides, *ctx.sizes, *scales, ctx.max_distance, **ctx.flags)
        dtable = dtable.to(ctx.table_dtype) if dtable is not None else None
        return dq, dk, dv, None, None, None, None, dtable, None, None, None


def _flash_supports(q, k, v, position_bias=None):
    """The cases the Triton attention handles; anything else takes the torch path.
    T5's position bias is handled (in the kernels, from its table)."""
    D = q.shape[-1]
    return (q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and q.dtype == k.dtype == v.dtype
            # fp32 tiles are twice as large: at head dim 256 no configuration fits Hopper's
            # shared memory (bench.py kernels-compile), so fp32 stops at 128
            and D in (16, 32, 64, 128, 256) and D <= (128 if q.dtype == torch.float32 else 256)
            and k.shape[-1] == D and v.shape[-1] == D
            and q.shape[1] % k.shape[1] == 0
            and q.shape[2] > 0 and k.shape[2] > 0
            and (position_bias is None or position_bias.table.is_floating_point()))


def attention(q, k, v, causal=True, window=None, key_padding_mask=None, scale=None,
              position_bias=None, recompute=False, documents=None):
    """Multi-head attention with GQA, causal / sliding-window / key-padding / document masks,
    and T5's relative position bias. Shapes as in `attention_reference`; returns (B, H, Tq, D).

    `documents` (B, Tk): each position's document (Megatron's --reset-attention-mask: packed
    documents do not see each other); the Triton kernels read it as document bounds, the
    torch path as a boolean (B, 1, Tq, Tk) mask.

    `position_bias` (a RelativePositionBias, table (num_buckets, H)) adds
    table[bucket(key position - query position), h] to every score (T5; T5 also passes
    scale=1.0); its table gets a gradient.

    Triton path (backend "triton"): FlashAttention-2 above, for head dims 16..256 that
    are powers of two (16..128 in fp32), with or without the position bias, which the
    kernels compute from the table (in fp32, under autocast too), never materializing a
    (Tq, Tk) bias; a row with every key masked outputs 0. Another head dim runs the
    torch path: scaled_dot_product_attention, with the bias materialized
    (`relative_position_bias_reference`) and added to the scores as a float mask.

    `recompute` (selective activation recomputation, parallel.apply_recompute): the torch
    path runs under a checkpoint, so backward recomputes the scores and probabilities
    that SDPA's CPU path would store, keeping only q, k, v (and the bias table). The
    Triton path stores no scores and recomputes them in backward anyway: unchanged."""
    if position_bias is not None and position_bias.table.shape[1:] != (q.shape[1],):
        raise ValueError(f"position_bias.table {tuple(position_bias.table.shape)} must be "
                         f"(num_buckets, {q.shape[1]}): one column per query head")
    use_triton = backend(q) == "triton"
    if use_triton and torch.is_autocast_enabled(q.device.type):
        # A custom Function is invisible to autocast; cast as autocast casts SDPA.
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if use_triton and _flash_supports(q, k, v, position_bias):
        if position_bias is None:
            return FlashAttention.apply(q, k, v, causal, window, key_padding_mask, scale, None, None, None,
                                        documents)
        return FlashAttention.apply(q, k, v, causal, window, key_padding_mask, scale, position_bias.table,
                                    position_bias.bidirectional, position_bias.max_distance, documents)

    if recompute and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(_torch_attention, q, k, v, causal, window,
                                                 key_padding_mask, scale, position_bias, documents,
                                                 use_reentrant=False, preserve_rng_state=True)
    return _torch_attention(q, k, v, causal, window, key_padding_mask, scale, position_bias, documents)


def _torch_attention(q, k, v, causal, window, key_padding_mask, scale, position_bias, documents=None):
    simple_causal = (causal and window is None and key_padding_mask is None and position_bias is None
                     and documents is None and q.shape[2] == k.shape[2])
    mask = None if simple_causal else attention_mask(
        q.shape[2], k.shape[2], q.device, causal, window, key_padding_mask, documents)
    if position_bias is not None:  # a float mask is added to the scores: bias, and -inf where masked
        bias = relative_position_bias_reference(position_bias, q.shape[2], k.shape[2]).to(q.dtype)
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=simple_causal,
                                          scale=scale, enable_gqa=q.shape[1] != k.shape[1])


# ----------------------------------------------------------------------------
# RMSNorm and LayerNorm
# ----------------------------------------------------------------------------

def rmsnorm_reference(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (as LLaMA does) and cast back."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


# RMSNorm is memory-bound (a few flops per byte), so the kernels' job is to read x once
# and write y once: each program loads a tile of whole rows, reduces in registers and
# stores. The tile shape is a heuristic, not autotuned: about 4K elements, so short rows
# (QK-norm's head_dim) are batched several per program and long ones take one each.

@triton.jit
def _rmsnorm_fwd_kernel(X, W, Y, RSTD, n_rows, n_cols, stride_x, stride_y, eps,
                        BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """y = w * round_to_x_dtype(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps), per row.

    Statistics in fp32 whatever the input dtype; the normalized value is rounded to x's
    dtype before the weight multiplies it, exactly as `rmsnorm_reference` (and Hugging
    Face's LLaMA) do, so the two agree bit for bit up to the order of the sum. rstd is
    saved for the backward pass. grid: (cdiv(n_rows, BLOCK_ROWS),)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / n_cols + eps)
    normed = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], (normed * w[None, :]).to(Y.dtype.element_ty),
             mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@triton.jit
def _rmsnorm_bwd_kernel(X, W, DY, RSTD, DX, DW_PARTIAL, n_rows, n_cols,
                        stride_x, stride_dy, stride_dx,
                        BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """dx and this program's share of dw.

    With x_hat = x * rstd and y = w * x_hat:
      dw = sum over rows of dy * x_hat
      dx = rstd * (g - x_hat * mean(g * x_hat)),  g = dy * w
    (the second term is the gradient through rstd, which depends on the whole row).
    dw is a reduction over *all* rows: each program walks a strided set of row tiles,
    keeps its partial dw in registers and writes one row of DW_PARTIAL; the caller sums
    those few rows. No atomics, so the result is deterministic.
    grid: (n_programs,), at most a few per SM."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_COLS], dtype=tl.float32)
    for start in range(pid * BLOCK_ROWS, n_rows, tl.num_programs(0) * BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        rows64 = rows.to(tl.int64)
        mask = (rows[:, None] < n_rows) & col_ok[None, :]
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)
        x_hat = x * rstd[:, None]
        # the forward multiplied w by x_hat rounded to x's dtype: so does its gradient
        dw += tl.sum(dy * x_hat.to(X.dtype.element_ty).to(tl.float32), 0)
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - x_hat * (tl.sum(g * x_hat, 1) / n_cols)[:, None])
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_ok)


def _row_tile(n_cols):
    """(BLOCK_ROWS, BLOCK_COLS, num_warps) for row-wise kernels: ~4K elements per tile."""
    block_cols = triton.next_power_of_2(n_cols)
    block_rows = max(1, 4096 // block_cols)
    num_warps = 4 if block_cols <= 4096 else 8 if block_cols <= 16384 else 16
    return block_rows, block_cols, num_warps


class RMSNormFunction(torch.autograd.Function):
    """rmsnorm() on the Triton kernels above."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        shape, n_cols = x.shape, x.shape[-1]
        x2 = _launch_ready(x.reshape(-1, n_cols))
        n_rows = x2.shape[0]
        y = torch.empty(n_rows, n_cols, device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
        rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        block_rows, block_cols, num_warps = _row_tile(n_cols)
        _rmsnorm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
            x2, weight, y, rstd, n_rows, n_cols, x2.stride(0), y.stride(0), eps,
            BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=num_warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = shape
        return y.view(*shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = _launch_ready(dy.reshape(n_rows, n_cols))
        dx = torch.empty(n_rows, n_cols, device=x2.device, dtype=x2.dtype)
        block_rows, block_cols, num_warps = _row_tile(n_cols)
        tiles = triton.cdiv(n_rows, block_rows)
        sms = torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 1
        n_programs = min(tiles, 4 * sms)
        dw_partial = torch.empty(n_programs, n_cols, device=x2.device, dtype=torch.float32)
        _rmsnorm_bwd_kernel[(n_programs,)](
            x2, weight, dy2, rstd, dx, dw_partial, n_rows, n_cols,
            x2.stride(0), dy2.stride(0), dx.stride(0),
            BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=num_warps)
        dw = dw_partial.sum(0).to(weight.dtype)
        return dx.view(ctx.x_shape), dw, None


def rmsnorm(x, weight, eps=1e-6):
    """RMSNorm over the last dimension (see `rmsnorm_reference`)."""
    if (backend(x) == "triton" and x.numel() > 0 and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and weight.dim() == 1 and weight.numel() == x.shape[-1] <= 65536):
        return RMSNormFunction.apply(x, weight, eps)
    return rmsnorm_reference(x, weight, eps)


class RMSNorm(torch.nn.Module):
    """The module form of `rmsnorm`, for models to hold a learned gain."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rmsnorm(x, self.weight, self.eps)


class LayerNorm(torch.nn.LayerNorm):
    """torch's LayerNorm run in its input's dtype, autocast or not: torch's kernels keep the
    statistics in fp32 for a bf16/fp16 input, and backward keeps the 16-bit input, as
    Megatron's fused LayerNorm does. (CUDA's autocast would run layer_norm in fp32: an fp32
    copy of a bf16 input saved per norm, twice the bytes; the CPU's leaves it in x's dtype.)
    The gain and bias are cast to x's dtype (a no-op unless --fp32-residual makes x fp32)."""

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), bias, self.eps)


# ----------------------------------------------------------------------------
# SwiGLU
# ----------------------------------------------------------------------------

def swiglu_reference(gate, up):
    """SwiGLU's elementwise part: silu(gate) * up."""
    return F.silu(gate) * up


# Unfused, silu(gate) * up reads gate, writes silu(gate), reads it back with up and
# writes the product (and autograd keeps silu(gate) for the backward pass). The fused
# kernels read each input once and write each output once, and the backward pass
# recomputes the sigmoid instead of storing it.

SWIGLU_BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    """y = silu(g) * u = g * sigmoid(g) * u, elementwise, computed in fp32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(G, U, DY, DG, DU, n, BLOCK: tl.constexpr):
    """du = dy * silu(g);  dg = dy * u * silu'(g), silu'(g) = sig(g) * (1 + g * (1 - sig(g)))."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(DU + offs, (dy * g * sig).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    """swiglu() on the Triton kernels above (inputs flattened: the op is elementwise)."""

    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        n = gate.numel()
        _swiglu_fwd_kernel[(triton.cdiv(n, SWIGLU_BLOCK),)](gate, up, y, n, BLOCK=SWIGLU_BLOCK)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_bwd_kernel[(triton.cdiv(n, SWIGLU_BLOCK),)](gate, up, dy, dg, du, n, BLOCK=SWIGLU_BLOCK)
        return dg, du


def swiglu(gate, up):
    """silu(gate) * up (see `swiglu_reference`)."""
    if (backend(gate) == "triton" and gate.shape == up.shape and gate.dtype == up.dtype
            and gate.dtype in (torch.float16, torch.bfloat16, torch.float32) and gate.numel() > 0):
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)


# ----------------------------------------------------------------------------
# FP8 matmul
# ----------------------------------------------------------------------------
# FP8 stores a number in one byte: E4M3 (4 exponent bits, 3 mantissa bits, largest 448)
# for weights and activations, E5M2 (largest 57344: more range, less precision) for
# gradients, the "hybrid" recipe of Transformer Engine and Megatron. A tensor is
# multiplied by a scale before the cast so that its largest magnitude (amax) lands near
# the top of the format: scale = fp8_max / amax. The matmul then multiplies the FP8
# values, accumulates in fp32 and multiplies the result by both inverse scales.
# Scales are per tensor (one number) or per row (one per row of an operand, rows taken
# along the dimension that is *not* summed over, so the inverse scales still factor out
# of each dot product).
#
# `fp8_matmul_reference` is the oracle and the CPU emulation: the same quantized values,
# dequantized, then one fp32 matmul.

FP8_E4M3 = torch.float8_e4m3fn
FP8_E5M2 = torch.float8_e5m2


def fp8_max(dtype):
    """The largest finite value of an FP8 format (448 for E4M3, 57344 for E5M2)."""
    return torch.finfo(dtype).max


def fp8_scale(amax, dtype, margin=0):
    """fp8_max / amax / 2^margin, elementwise over a tensor of amaxes (fp32). An amax of 0
    (an all-zero tensor) or a non-finite one gives scale 1: nothing to fit."""
    amax = amax.float()
    ok = (amax > 0) & torch.isfinite(amax)
    return torch.where(ok, fp8_max(dtype) / torch.where(ok, amax, 1.0) / 2.0 ** margin, 1.0)


def fp8_quantize(x, scale, dtype):
    """x * scale cast to `dtype`, saturating: values beyond the format's range become
    +-fp8_max rather than inf/NaN. `scale`: one element, or one per row of x (shape
    (rows, 1))."""
    m = fp8_max(dtype)
    return (x.float() * scale).clamp(-m, m).to(dtype)


def fp8_matmul_reference(a, b, a_scale_inv, b_scale_inv, out_dtype=torch.float32):
    """a @ b.T of FP8 operands a (M, K) and b (N, K), each times its inverse scale
    (`a_scale_inv`: one element, or (M,); `b_scale_inv`: one element, or (N,)): the
    operands dequantized to fp32, one fp32 matmul, the result cast to `out_dtype`."""
    a = a.float() * a_scale_inv.float().reshape(-1, 1)
    b = b.float() * b_scale_inv.float().reshape(-1, 1)
    return (a @ b.t()).to(out_dtype)


# The GEMM. Both operands are read along K, the summed dimension: A (M, K) and B (N, K)
# row-major, C = A B^T, the "TN" layout that Hopper's FP8 tensor cores (wgmma) take from
# shared memory without a transpose; the backward pass hands over transposed copies
# (dgrad: dY and W^T; wgrad: dY^T and X^T), as Transformer Engine's cast-transpose does.
# Any pair of the two formats multiplies: E4M3 x E4M3 forward, E5M2 x E4M3 for the
# gradients.
#
# One program computes a (BLOCK_M, BLOCK_N) tile of C, walking K BLOCK_K at a time:
#   - order: consecutive programs take GROUP_M tiles down a column of tiles before moving
#     right (Triton's matmul tutorial), so a wave of programs reuses the same rows of A
#     and columns of B from L2 instead of streaming all of B per row of tiles;
#   - edges: rows of A past M (of B past N) in the last tiles are read wrapped around
#     (row % M, always in bounds, so the loads need no row mask) and the store drops
#     them; columns past K are masked to 0, which adds nothing to the dot products;
#   - accumulation: fp32. Hopper's FP8 tensor cores keep fewer bits than fp32 while they
#     accumulate (about 14: DeepSeek-V3 measured relative errors near 2% at K = 4096), and
#     Triton's default on sm_90 accumulates the whole K that way; a weight gradient sums
#     over every token of the batch. So each tl.dot's BLOCK_K products are added into the
#     fp32 accumulator on the CUDA cores (max_num_imprecise_acc=BLOCK_K): DeepSeek-V3's
#     promotion every 128 elements, and what cuBLAS does unless asked for fast
#     accumulation (torch._scaled_mm's use_fast_accum). It costs registers: the partial
#     accumulator is as large as the tile's. (Triton applies it to Hopper's wgmma only.)
#   - scales: the inverse scales factor out of each dot product, so they multiply the
#     finished tile once: a scalar per operand (tensorwise) or a vector per tile of rows
#     (row-wise), chosen by the A_ROWWISE / B_ROWWISE constexprs.
#
# Autotuning lists, from `bench.py kernels-compile` (sm_90 and sm_89, both pairs of formats,
# bf16 and fp32 outputs, compiled with the alignment a launch at our sizes has): none
# spills. Hopper: 128x128 tiles, BLOCK_K 128, 8 warps (two warpgroups; 165 registers,
# 4 or 5 stages: 128 or 160 KiB of shared memory), and 64x128 / 128x64 with 4 warps for
# GEMMs of few tiles. 128x256 and 256x128 tiles spill: the promoted accumulation keeps a
# second, partial accumulator as large as the first (255 registers and 240 bytes spilled
# at 8 warps; 16 warps cap a thread at 128 registers). Ada: 99 KiB of shared memory and
# mma.sync, whose fragments take more registers (242 to 254 at 128x128, 64x128 and
# 128x64 tiles). There is no Ampere list: sm_80/86 have no FP8 tensor cores (and tl.dot
# no FP8 path there), so fp8_matmul runs the reference on them.

_FP8_MATMUL_KEY = ["M", "N", "K", "A_ROWWISE", "B_ROWWISE"]
FP8_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@_autotune(_FP8_MATMUL_KEY, meta=("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"),
           hopper=[(128, 128, 128, 8, 8, 4), (128, 128, 128, 8, 8, 5), (64, 128, 128, 8, 4, 4),
                   (128, 64, 128, 8, 4, 4)],
           ada=[(128, 128, 64, 8, 8, 4), (64, 128, 128, 8, 4, 3), (128, 64, 128, 8, 4, 3),
                (64, 64, 128, 8, 4, 4)],
           interpreter=(16, 32, 32, 2, 4, 1))
@triton.jit
def _fp8_matmul_kernel(A, B, C, A_SCALE_INV, B_SCALE_INV, M, N, K, stride_am, stride_bn, stride_cm,
                       A_ROWWISE: tl.constexpr, B_ROWWISE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C = (A @ B^T) * a_scale_inv[m] * b_scale_inv[n] for one (BLOCK_M, BLOCK_N) tile of C:
    A (M, K) and B (N, K) FP8, K-contiguous; C (M, N) in its own dtype; an inverse scale
    is one element, or one per row with A_ROWWISE / B_ROWWISE.
    grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),)."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * tiles_n  # programs per group: GROUP_M rows of tiles, every column
    first_m = pid // group * GROUP_M
    rows_in_group = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)  # the last group may be short
    pid_m = first_m + (pid % group) % rows_in_group
    pid_n = (pid % group) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_a = offs_m % M  # wrapped: see the comment above
    rows_b = offs_n % N
    # int64: rows * stride overflows int32 past 2^31 bytes (131072 tokens x 16384 features)
    a_ptrs = A + rows_a.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = B + rows_b.to(tl.int64)[None, :] * stride_bn + offs_k[:, None]  # B^T's tile: (BLOCK_K, BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k, other=0.0)
        acc = tl.dot(a, b, acc, out_dtype=tl.float32, max_num_imprecise_acc=BLOCK_K)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if A_ROWWISE:
        acc *= tl.load(A_SCALE_INV + rows_a)[:, None]
    else:
        acc *= tl.load(A_SCALE_INV)
    if B_ROWWISE:
        acc *= tl.load(B_SCALE_INV + rows_b)[None, :]
    else:
        acc *= tl.load(B_SCALE_INV)
    tl.store(C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :], acc.to(C.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _fp8_check(a, b, a_scale_inv, b_scale_inv, out_dtype):
    """ValueError unless fp8_matmul's arguments are what it multiplies."""
    fp8 = (FP8_E4M3, FP8_E5M2)
    if a.dtype not in fp8 or b.dtype not in fp8:
        raise ValueError(f"fp8_matmul: operands must be float8 ({FP8_E4M3} or {FP8_E5M2}); "
                         f"got {a.dtype} and {b.dtype} (quantize them with fp8_quantize)")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"fp8_matmul: a must be (M, K) and b (N, K), the same K; got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    for name, scale, rows in (("a_scale_inv", a_scale_inv, a.shape[0]), ("b_scale_inv", b_scale_inv, b.shape[0])):
        if scale.numel() not in (1, rows):
            raise ValueError(f"fp8_matmul: {name} must have 1 element (per tensor) or {rows} "
                             f"(one per row); got shape {tuple(scale.shape)}")
    devices = {t.device for t in (a, b, a_scale_inv, b_scale_inv)}
    if len(devices) > 1:
        raise ValueError(f"fp8_matmul: operands and scales must be on one device; got {sorted(map(str, devices))}")
    if out_dtype not in FP8_OUT_DTYPES:
        raise ValueError(f"fp8_matmul: out_dtype must be one of {FP8_OUT_DTYPES}; got {out_dtype}")


def _fp8_tensor_cores(t):
    """Whether Triton can multiply FP8 for tensor t: on the interpreter (forced backend),
    or on a GPU with FP8 tensor cores (compute capability 8.9, Ada, and up)."""
    return not t.is_cuda or torch.cuda.get_device_capability(t.device) >= (8, 9)


def fp8_matmul_backend(device):
    """Which implementation fp8_matmul runs for tensors on `device`: "triton" (the kernel)
    or "torch" (the reference: the CPU, or a GPU without FP8 tensor cores)."""
    probe = torch.empty(0, device=device)
    return "triton" if backend(probe) == "triton" and _fp8_tensor_cores(probe) else "torch"


def fp8_matmul(a, b, a_scale_inv, b_scale_inv, out_dtype=torch.float32):
    """a @ b.T * a_scale_inv * b_scale_inv: the FP8 GEMM. a (M, K) and b (N, K) are FP8
    (E4M3 or E5M2, either pair); `a_scale_inv` has one element or M (one per row of a),
    `b_scale_inv` one or N; the result is (M, N) in `out_dtype` (fp32, bf16 or fp16).

    Triton (`_fp8_matmul_kernel`) on backend "triton" where FP8 tensor cores are (sm_89
    and up) or under the interpreter; elsewhere (the CPU, Ampere) `fp8_matmul_reference`.
    The two differ by the rounding of the sums: their order, and on Hopper the tensor
    cores' narrower accumulation within each BLOCK_K. An operand whose last dimension is
    not contiguous (a transposed view) is copied first."""
    _fp8_check(a, b, a_scale_inv, b_scale_inv, out_dtype)
    M, K = a.shape
    N = b.shape[0]
    if fp8_matmul_backend(a.device) != "triton" or M == 0 or N == 0:
        return fp8_matmul_reference(a, b, a_scale_inv, b_scale_inv, out_dtype)
    a, b = _launch_ready(a), _launch_ready(b)
    a_scale_inv, b_scale_inv = (s.reshape(-1).float().contiguous() for s in (a_scale_inv, b_scale_inv))
    c = torch.empty(M, N, device=a.device, dtype=out_dtype)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _fp8_matmul_kernel[grid](a, b, c, a_scale_inv, b_scale_inv, M, N, K, a.stride(0), b.stride(0), c.stride(0),
                             A_ROWWISE=a_scale_inv.numel() > 1, B_ROWWISE=b_scale_inv.numel() > 1)
    return c


# ----------------------------------------------------------------------------
# Linear + cross-entropy: chunked, never all the logits at once
# ----------------------------------------------------------------------------

def linear_cross_entropy_reference(x, weight, labels, bias=None):
    """Sum over tokens of -log softmax(x W^T + b)[label], labels == -100 ignored, written
    out: the logits of every token at once, (tokens, vocab) floats, the largest activation
    of a language model (llama3-8b, 8 x 4096 tokens: 4.2 billion of them)."""
    logits = F.linear(x, weight, bias).float()
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="sum")


# The loss is a sum over tokens, so it and its gradient can be computed a chunk of tokens
# at a time. For each chunk the forward pass computes the logits, the loss, and at once the
# gradient of the loss with respect to the logits, softmax - onehot, which it pushes
# through the linear layer (dx for the chunk's tokens, dW accumulated) before freeing the
# chunk. Only dx and dW (the sizes of x and W) wait for the backward pass, which scales
# them by the incoming gradient. Peak memory: one chunk's logits instead of all of them.
# The matmuls are the same ones autograd would run (cuBLAS on a GPU), so this needs no
# kernel of its own; the price is that the gradient is computed even if backward never
# comes, which is why it runs only when a gradient is wanted.
#
# Vocabulary parallelism (tensor parallelism at the output layer): `weight` may hold
# rows vocab_start .. of a vocabulary split over ranks. The softmax then needs three
# numbers per token from the other ranks, the max, the sum of exponentials and the
# target's logit (the rank holding it contributes it, the others 0): `all_reduce(t, op)`,
# op "max" or "sum", supplies them (parallel.py passes tp's all-reduce). Rows at or past
# `vocab_size` are padding and take no probability. An optional `bias` (BERT's output
# layer has one) is split like the weight's rows; its gradient is the column sums of
# d loss / d logits.

LOGITS_PER_CHUNK = 2 ** 26  # fp32 elements of one chunk's logits (256 MiB)


def _linear_cross_entropy_chunks(x, weight, bias, labels, vocab_start, vocab_size, all_reduce,
                                 chunk_tokens, want_dx, want_dw):
    """(loss sum, dx, dw, db) of x (tokens, dim) against labels (tokens,); dx, dw and db
    None unless wanted (db: also None without a bias)."""
    per_rank = weight.shape[0]
    padding = None  # (a bool worked out on the host: no device sync in the loop below)
    if vocab_start + per_rank > vocab_size:
        padding = torch.arange(vocab_start, vocab_start + per_rank, device=x.device) >= vocab_size
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if want_dx else None  # contiguous
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else None
    db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
        if want_dw and bias is not None else None
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], chunk_tokens):
        xc, lc = x[start:start + chunk_tokens], labels[start:start + chunk_tokens]
        logits = F.linear(xc, weight, bias).float()  # under autocast a bf16 matmul, as in the reference
        if padding is not None:
            logits.masked_fill_(padding, float("-inf"))
        max_logit = logits.max(dim=-1).values
        all_reduce(max_logit, "max")
        logits -= max_logit[:, None]
        local = lc - vocab_start
        mine = (local >= 0) & (local < per_rank)
        local = local.clamp(0, per_rank - 1)
        target = logits.gather(-1, local[:, None])[:, 0] * mine
        probs = logits.exp_()  # in place: the shifted logits are not needed again
        sums = torch.stack([probs.sum(dim=-1), target])
        all_reduce(sums, "sum")
        sum_exp, target = sums
        ignored = lc == -100
        loss += (sum_exp.log() - target).masked_fill(ignored, 0.0).sum()
        if want_dx or want_dw:
            # d loss / d logits = softmax - onehot(label), zero for ignored tokens. The
            # matmuls run in the weight's dtype, or autocast's (bf16), as autograd's would.
            # (scaled and indexed without boolean indexing, which would sync with the GPU)
            kept = (~ignored).float()
            probs *= (kept / sum_exp)[:, None]
            probs.scatter_add_(1, local[:, None], -(mine * kept)[:, None])
            grad_logits = probs.to(weight.dtype)
            if want_dx:
                dx[start:start + chunk_tokens] = grad_logits @ weight
            if want_dw:
                dw += grad_logits.t() @ xc.to(weight.dtype)  # (bf16 under autocast) into fp32
            if db is not None:
                db += probs.sum(dim=0)
    return loss, dx, dw, db


class LinearCrossEntropy(torch.autograd.Function):
    """linear_cross_entropy() with its gradient computed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, x, weight, bias, labels, vocab_start, vocab_size, all_reduce, chunk_tokens):
        want_dw = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        loss, dx, dw, db = _linear_cross_entropy_chunks(
            x.reshape(-1, x.shape[-1]), weight, bias, labels.reshape(-1), vocab_start, vocab_size,
            all_reduce, chunk_tokens, ctx.needs_input_grad[0], want_dw)
        ctx.save_for_backward(dx, dw, db)
        ctx.x_shape = x.shape
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw, db = ctx.saved_tensors
        dx = None if dx is None else dx.view(ctx.x_shape) * grad_loss.to(dx.dtype)
        dw = None if dw is None else dw * grad_loss
        db = None if db is None else db * grad_loss
        return dx, dw, db, None, None, None, None, None


def linear_cross_entropy(x, weight, labels, vocab_start=0, vocab_size=None, all_reduce=None,
                         chunk_tokens=None, bias=None):
    """The summed cross-entropy of `linear_cross_entropy_reference` without materializing
    the logits of more than `chunk_tokens` tokens (default: LOGITS_PER_CHUNK logits), for
    a vocabulary that may be split over ranks (see above). Without a gradient to compute
    (evaluation), the chunks only compute the loss."""
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    all_reduce = all_reduce or (lambda tensor, op: None)
    chunk_tokens = chunk_tokens or max(1, LOGITS_PER_CHUNK // weight.shape[0])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return LinearCrossEntropy.apply(x, weight, bias, labels, vocab_start, vocab_size, all_reduce,
                                        chunk_tokens)
    return _linear_cross_entropy_chunks(x.reshape(-1, x.shape[-1]), weight, bias, labels.reshape(-1),
                                        vocab_start, vocab_size, all_reduce, chunk_tokens, False, False)[0]


# ----------------------------------------------------------------------------
# RoPE and the KV cache: rotary position embedding, and decoding's cache of keys and values
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



def rope_cos_sin_rows(positions, inv_freq):
    """rope_cos_sin for per-row positions (B, T) (a left-padded batch decoding):
    cos and sin (B, 1, T, head_dim), the same for every head."""
    cos, sin = rope_cos_sin(positions.flatten(), inv_freq)
    return tuple(t.view(*positions.shape, -1)[:, None] for t in (cos, sin))


def apply_rope(x, cos, sin):
    """Rotate channel pairs (i, i + d/2) of x (B, H, T, D) by the position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)



class KVCache:
    """Keys and values of the tokens seen so far, for one attention layer, and which of
    them are real tokens (a left-padded batch, see generate.py).

    Without a window: preallocated to `max_len` on the first update, appended in place.

    With a sliding window w (Mistral): a query at position i sees the keys i - w < j <= i
    (kernels.attention_mask), so a forward call needs only the w - 1 keys before its first
    token: a rolling buffer of 2w slots, appended in place; when full, its last w - 1 keys
    move to the front (one copy every ~w tokens: amortized O(1) per token). Memory stays
    bounded by the window (plus a long call's own tokens), whatever the number of tokens
    generated. `update` returns the kept keys in position order, which is all attention
    needs: it aligns the queries to the end of the keys, and the window mask cuts the
    extra kept ones. `length` counts every position seen (RoPE's next position).
    """

    def __init__(self, max_len, window=None):
        self.window = window
        self.capacity = 2 * window if window else max_len
        self.length = 0  # positions seen
        self.filled = 0  # slots of the buffer in use
        # k, v (B, Hkv, slots, D) and valid (B, 1, slots, 1): one slot axis (2) for all three.
        self.k = self.v = self.valid = None

    def buffers(self):
        return [b for b in (self.k, self.v, self.valid) if b is not None]

    def update(self, k, v, valid=None):
        """Append k, v (B, Hkv, T, D) and `valid` (B, T, True on real tokens; None: all
        real). Returns the keys, values and key padding mask (B, keys) the new queries
        attend to (the mask None while every key is real)."""
        B, T = k.shape[0], k.shape[2]
        if self.k is None:
            shape = (B, k.shape[1], self.capacity, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        if valid is not None and self.valid is None:  # every key before was a real token
            self.valid = torch.ones(B, 1, self.capacity, 1, dtype=torch.bool, device=k.device)
        if self.valid is not None:
            valid = torch.ones(B, T, dtype=torch.bool, device=k.device) if valid is None else valid
            valid = valid.bool()[:, None, :, None]
        new = [k, v] + ([valid] if self.valid is not None else [])
        self.length += T
        if self.filled + T > self.capacity:
            if not self.window:
                raise ValueError(f"KV cache holds {self.capacity} positions; asked for {self.filled + T}")
            keep = min(self.window - 1, self.filled)  # the last window - 1 keys move to the front
            for b in self.buffers():
                b[:, :, :keep] = b[:, :, self.filled - keep:self.filled].clone()
            self.filled = keep
        if self.filled + T > self.capacity:  # a call longer than the buffer (a long prompt)
            out = [torch.cat([b[:, :, :self.filled], n], dim=2) for b, n in zip(self.buffers(), new)]
            keep = self.window - 1
            for b, o in zip(self.buffers(), out):
                b[:, :, :keep] = o[:, :, o.shape[2] - keep:]
            self.filled = keep
        else:
            for b, n in zip(self.buffers(), new):
                b[:, :, self.filled:self.filled + T] = n
            self.filled += T
            out = [b[:, :, :self.filled] for b in self.buffers()]
        key_padding_mask = out[2][:, 0, :, 0] if self.valid is not None else None
        return out[0], out[1], key_padding_mask

    def keep_rows(self, rows):
        """Only these rows of the batch from now on (generate.py drops finished ones)."""
        self.k, self.v, self.valid = (None if b is None else b[rows] for b in (self.k, self.v, self.valid))

    def nbytes(self):
        return sum(b.numel() * b.element_size() for b in self.buffers())


# ----------------------------------------------------------------------------
# State-space scans: the selective scan (Mamba-1) and SSD (Mamba-2)
# ----------------------------------------------------------------------------
# Both compute, for every channel, the linear recurrence of a hidden state h:
#
#     h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t        y_t = C_t . h_t
#
# Mamba-1 gives each channel d its own A[d, :] over N states; Mamba-2 (SSD) gives each
# head one scalar A[h] shared by its head_dim channels, and B, C shared by the heads of
# a group. The sequential loops are the oracles: one step per token, obviously the
# recurrence. The fast forms compute the same numbers in parallel over the sequence.
# Shapes: x (batch, T, channels) for Mamba-1, (batch, T, heads, head_dim) for Mamba-2;
# dt has x's shape without head_dim; B and C are (batch, T, N) for Mamba-1 and
# (batch, T, groups, N) for Mamba-2; states are (batch, channels, N) and
# (batch, heads, head_dim, N). Everything is computed in fp32.

def selective_scan_step(state, x, dt, A, B, C):
    """One token of the Mamba-1 recurrence: x, dt (batch, D); B, C (batch, N); state
    (batch, D, N). Returns (y (batch, D), the new state)."""
    state = torch.exp(dt[..., None] * A) * state + (dt * x)[..., None] * B[:, None, :]
    return torch.einsum("bdn,bn->bd", state, C), state


def selective_scan_reference(x, dt, A, B, C, initial_state=None):
    """Mamba-1's scan one token at a time (the oracle). Returns (y, final state)."""
    x, dt, A, B, C = (t.float() for t in (x, dt, A, B, C))
    state = x.new_zeros(x.shape[0], x.shape[2], A.shape[1]) if initial_state is None \
        else initial_state.float()
    ys = []
    for t in range(x.shape[1]):
        y, state = selective_scan_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), state


def linear_scan(a, b, reverse=False):
    """h_t = a_t * h_{t-1} + b_t along dim 1 with h_{-1} = 0 (from the end when
    `reverse`), as a chunked scan. The sequence is cut into chunks of about sqrt(T)
    positions; every chunk scans its own positions at once (one step per position of a
    chunk, over all chunks together), recording the product of its decays so far; the
    chunks' end states are then carried from chunk to chunk (one step per chunk); last,
    each position adds the state its chunk started with, times its decay product. About
    2 sqrt(T) sequential steps instead of T, and O(T) work (a log-depth scan does
    O(T log T)). Products of decays in [0, 1] never overflow. Writes in place: call it
    without autograd (SelectiveScan does)."""
    if reverse:
        return linear_scan(a.flip(1), b.flip(1)).flip(1)
    batch, T, *rest = a.shape
    chunk = math.isqrt(T - 1) + 1 if T > 1 else 1
    n_chunks = -(-T // chunk)
    pad = n_chunks * chunk - T
    if pad:  # positions after the end change nothing before it
        a, b = (torch.cat([t, t.new_zeros(batch, pad, *rest)], dim=1) for t in (a, b))
    a, b = (t.reshape(batch, n_chunks, chunk, *rest) for t in (a, b))
    h, decay = torch.empty_like(b), torch.empty_like(a)
    h[:, :, 0], decay[:, :, 0] = b[:, :, 0], a[:, :, 0]
    for t in range(1, chunk):
        torch.addcmul(b[:, :, t], a[:, :, t], h[:, :, t - 1], out=h[:, :, t])
        torch.mul(a[:, :, t], decay[:, :, t - 1], out=decay[:, :, t])
    state, entering = h.new_zeros(batch, *rest), []
    for c in range(n_chunks):
        entering.append(state)
        state = torch.addcmul(h[:, c, -1], decay[:, c, -1], state)
    h.addcmul_(decay, torch.stack(entering, dim=1)[:, :, None])
    return h.reshape(batch, n_chunks * chunk, *rest)[:, :T]


class SelectiveScan(torch.autograd.Function):
    """Mamba-1's scan with states recomputed in backward rather than stored.

    The states h (batch, T, D, N) are N times larger than the layer's input; like the
    fused Mamba kernel, nothing of that size is kept between forward and backward.
    Backward is the same recurrence run backwards: the gradient reaching h_t is
    g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}, and from g every input's gradient follows
    by the product rule."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, initial_state):
        h, _ = SelectiveScan._states(x, dt, A, B, initial_state)
        ctx.save_for_backward(x, dt, A, B, C, initial_state)
        return torch.einsum("btdn,btn->btd", h, C), h[:, -1]

    @staticmethod
    def _states(x, dt, A, B, initial_state):
        """Every state h_t, and every decay exp(dt_t A): (batch, T, D, N) each."""
        decay = torch.exp(dt[..., None] * A)
        inputs = (dt * x)[..., None] * B[:, :, None, :]
        inputs[:, 0] += decay[:, 0] * initial_state
        return linear_scan(decay, inputs), decay

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, initial_state = ctx.saved_tensors
        h, decay = SelectiveScan._states(x, dt, A, B, initial_state)
        g_out = dy[..., None] * C[:, :, None, :]
        g_out[:, -1] += dfinal
        # g_t = g_out_t + decay_{t+1} g_{t+1}: a reverse scan with the decays shifted by one.
        next_decay = torch.cat([decay[:, 1:], torch.zeros_like(decay[:, :1])], dim=1)
        g = linear_scan(next_decay, g_out, reverse=True)
        h_prev = torch.cat([initial_state[:, None], h[:, :-1]], dim=1)
        g_decay = g * h_prev * decay                            # d(dt * A) of each (t, d, n)
        g_input = torch.einsum("btdn,btn->btd", g, B)          # d(dt * x) of each (t, d)
        dC = torch.einsum("btdn,btd->btn", h, dy)
        dB = torch.einsum("btdn,btd->btn", g, dt * x)
        dx = g_input * dt
        ddt = g_input * x + torch.einsum("btdn,dn->btd", g_decay, A)
        dA = torch.einsum("btdn,btd->dn", g_decay, dt)
        d_initial = g[:, 0] * decay[:, 0]
        return dx, ddt, dA, dB, dC, d_initial


def selective_scan(x, dt, A, B, C, initial_state=None):
    """Mamba-1's selective scan (see the section comment): (y, final state), in fp32.
    A chunked parallel scan (linear_scan) whose backward recomputes the states (SelectiveScan)."""
    x, dt, A, B, C = (t.float() for t in (x, dt, A, B, C))
    if initial_state is None:
        initial_state = x.new_zeros(x.shape[0], x.shape[2], A.shape[1])
    return SelectiveScan.apply(x, dt, A, B, C, initial_state.float())


def _heads_of_groups(t, heads):
    """B or C (batch, T, groups, N) -> (batch, T, heads, N): each group serves heads/groups
    consecutive heads."""
    return t.repeat_interleave(heads // t.shape[2], dim=2)


def ssd_step(state, x, dt, A, B, C):
    """One token of the Mamba-2 recurrence: x (batch, H, P); dt (batch, H); B, C
    (batch, G, N); state (batch, H, P, N). Returns (y (batch, H, P), the new state)."""
    heads = x.shape[1]
    B, C = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (B, C))
    state = (torch.exp(dt * A)[..., None, None] * state
             + (dt[..., None] * x)[..., None] * B[:, :, None, :])
    return torch.einsum("bhpn,bhn->bhp", state, C), state


def ssd_reference(x, dt, A, B, C, initial_state=None):
    """Mamba-2's scan one token at a time (the oracle). Returns (y, final state)."""
    x, dt, A, B, C = (t.float() for t in (x, dt, A, B, C))
    batch, _, heads, head_dim = x.shape
    state = x.new_zeros(batch, heads, head_dim, B.shape[-1]) if initial_state is None \
        else initial_state.float()
    ys = []
    for t in range(x.shape[1]):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), state


def _segment_sums(a):
    """a (..., L) -> (..., L, L) with [t, s] = a[s+1] + ... + a[t] for s <= t (the log
    of the decay from position s to t), and -inf above the diagonal (no influence of
    the future)."""
    L = a.shape[-1]
    cum = torch.cumsum(a, dim=-1)
    sums = cum[..., :, None] - cum[..., None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=a.device).tril()
    return sums.masked_fill(~causal, float("-inf"))


def ssd_chunked(x, dt, A, B, C, chunk_size, initial_state=None):
    """Mamba-2's scan as the chunked SSD algorithm, in plain PyTorch (differentiable by
    autograd). The sequence is cut into chunks of `chunk_size`:

      1. within each chunk, y is a masked attention-like product: y_t = sum_{s<=t}
         (C_t . B_s) exp(sum of dt*A from s+1 to t) dt_s x_s  (a matmul per chunk);
      2. each chunk's own contribution to the state at its end (a matmul);
      3. the states passed from chunk to chunk: state_c = decay_c * state_{c-1} + own_c
         (the only sequential part, over T / chunk_size chunks);
      4. each position's output from the state its chunk started with, decayed to it.

    y = (1) + (4). A sequence that is not a multiple of chunk_size is padded with dt = 0
    (decay 1, no input): the padding leaves the states unchanged. Returns (y, final state)."""
    x, dt, A, B, C = (t.float() for t in (x, dt, A, B, C))
    batch, T, heads, head_dim = x.shape
    pad = -T % chunk_size
    if pad:
        x, dt, B, C = (F.pad(t, (0,) * (2 * t.dim() - 4) + (0, pad)) for t in (x, dt, B, C))
    n_chunks = x.shape[1] // chunk_size
    B, C = _heads_of_groups(B, heads), _heads_of_groups(C, heads)
    # (batch, chunks, L, heads, ...) and the log decays a = dt * A as (batch, heads, chunks, L).
    x, dt, B, C = (t.reshape(batch, n_chunks, chunk_size, *t.shape[2:]) for t in (x, dt, B, C))
    a = (dt * A).permute(0, 3, 1, 2)
    a_cum = torch.cumsum(a, dim=-1)
    u = x * dt[..., None]                                             # dt_s x_s

    # 1. Within chunks.
    decay_within = torch.exp(_segment_sums(a))                        # (b, h, c, L, L)
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * decay_within
    y_within = torch.einsum("bhcls,bcshp->bclhp", scores, u)

    # 2. Each chunk's contribution to the state at its end.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)                 # (b, h, c, L)
    own = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, u)

    # 3. States between chunks: the state entering chunk c, for c = 0 .. n_chunks.
    state = x.new_zeros(batch, heads, head_dim, B.shape[-1]) if initial_state is None \
        else initial_state.float()
    chunk_decay = torch.exp(a_cum[..., -1])                           # (b, h, c)
    entering = [state]
    for c in range(n_chunks):
        state = chunk_decay[:, :, c, None, None] * state + own[:, c]
        entering.append(state)
    entering = torch.stack(entering[:-1], dim=1)                      # (b, c, h, p, n)

    # 4. From the entering state to each position of the chunk.
    y_from_state = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, entering, torch.exp(a_cum))
    y = (y_within + y_from_state).reshape(batch, n_chunks * chunk_size, heads, head_dim)
    return y[:, :T], state


# SSD in Triton: the four stages of `ssd_chunked` as kernels, forward and backward.
#
# Notation, for one (batch, head) and one chunk c of L = chunk_size positions, l and s
# positions inside it (l the output's, s the input's): a_cum[l] = A * (dt_0 + ... + dt_l)
# (within the chunk), u_s = dt_s x_s (head_dim), S_c the state entering chunk c
# (head_dim x N), "end" = position L - 1. The forward pass:
#
#   1. chunk cumsum   a_cum[l]
#   2. chunk states   own_c = sum_s exp(a_cum[end] - a_cum[s]) u_s B_s^T
#   3. state passing  S_{c+1} = exp(a_cum[end]) S_c + own_c          (sequential over c)
#   4. chunk scan     y_l = exp(a_cum[l]) S_c C_l + sum_{s<=l} (C_l . B_s) exp(a_cum[l] - a_cum[s]) u_s
#
# The backward pass, with dy given and G_c the gradient reaching S_c:
#
#   2'. local state gradients   dS_c = sum_l exp(a_cum[l]) dy_l C_l^T  (stage 2's kernel with
#       other operands: what chunk c's outputs send back to the state entering it)
#   3'. state passing, last chunk first: G_{c+1} is the gradient of own_c;
#       G_c = exp(a_cum[end]) G_{c+1} + dS_c, from G_n = the final state's gradient;
#       G_0 is the initial state's.
#   4'. per output position l:  dC_l = exp(a_cum[l]) dy_l^T S_c
#                                      + sum_{s<=l} exp(a_cum[l] - a_cum[s]) (dy_l . u_s) B_s
#       per input position s:   du_s = exp(a_cum[end] - a_cum[s]) G_{c+1} B_s
#                                      + sum_{l>=s} (C_l . B_s) exp(a_cum[l] - a_cum[s]) dy_l
#                               dB_s = exp(a_cum[end] - a_cum[s]) G_{c+1}^T u_s
#                                      + sum_{l>=s} exp(a_cum[l] - a_cum[s]) (dy_l . u_s) C_l
#       and dx_s = dt_s du_s; dt_s gets x_s . du_s through u_s.
#   1'. the decays: every term carrying exp(a_cum[l]) (as an output position) has
#       d/d a_cum[l] = itself, and every term carrying exp(-a_cum[s]) minus itself; summed,
#       d a_cum[l] = C_l . dC_l - u_l . du_l, plus sum(G_{c+1} * S_{c+1}) at l = end (the
#       chunk's own state and its passed-on state both decay by exp(a_cum[end])). Then
#       d a_l = d a_cum[l] + ... + d a_cum[end] (a_l enters every a_cum from l on), and
#       ddt_l = x_l . du_l + A d a_l, dA = sum over positions of dt_l d a_l.
#
# B and C are per group; the kernels index the group of their head (h // heads_per_group)
# and write dB, dC per head, summed over each group's heads afterwards (no atomics).
# A sequence that does not fill its last chunk is masked: positions past T load dt = 0,
# x = B = C = dy = 0, so they decay nothing and add nothing, as the padding of ssd_chunked.
# Everything is computed in fp32 whatever the inputs' dtype (tl.dot in exact fp32 for
# fp32 inputs, TF32 for 16-bit ones). Each program holds a whole head's state in
# registers (head_dim x N tiles, padded to powers of two of at least 16, the smallest
# tl.dot takes), hence the bounds in `_ssd_supports`.

SSD_MAX_HEAD_DIM = 128
SSD_MAX_STATE_DIM = 256
# and head_dim x N, padded, at most 128 x 128 (or 64 x 256): at 128 x 256 the backward
# kernels need more shared memory than sm_86/89 cards have (99 KiB; kernels-compile)
SSD_MAX_STATE_SIZE = 128 * 128
SSD_MAX_CHUNK = 1024  # the cumsum kernels hold one chunk per program

# Autotuning lists: from `bench.py kernels-compile` at Mamba-2's head_dim 64 and N 128,
# configurations that spill no registers on sm_80 and sm_90 (the backward kernels hold
# the most tiles: hence 8 warps, or 16-row tiles). Not yet timed on a GPU.
_SSD_STATE_KEY = ["head_dim", "STATE_BLOCK", "chunk_size", "FROM_START"]
_SSD_SCAN_KEY = ["HEAD_BLOCK", "STATE_BLOCK", "chunk_size"]


@triton.jit
def _ssd_load_rows(PTR, stride_t, t, rows_ok, cols, n_cols):
    """A (positions, features) tile of a (T, features) slice, in fp32: 0 outside."""
    return tl.load(PTR + t[:, None] * stride_t + cols[None, :],
                   mask=rows_ok[:, None] & (cols[None, :] < n_cols), other=0.0).to(tl.float32)


@triton.jit
def _ssd_decay(a_out, a_in, out_pos, in_pos, chunk_size):
    """exp(a_cum[l] - a_cum[s]) for input position s <= output position l inside the
    chunk, 0 elsewhere (broadcastable tiles). Masked before the exp: above the diagonal
    the exponent is positive and could overflow to inf (and inf * 0 is NaN)."""
    causal = (in_pos <= out_pos) & (out_pos < chunk_size)
    return tl.exp(tl.where(causal, a_out - a_in, float("-inf")))


@triton.jit
def _ssd_chunk_cumsum_kernel(DT, A, A_CUM, stride_dtb, stride_dtt, T, H, n_chunks, chunk_size,
                             CHUNK_BLOCK: tl.constexpr):
    """Stage 1: a_cum[l] = A[h] * (dt_0 + ... + dt_l) over the positions of one chunk of
    one head, into A_CUM (batch, heads, n_chunks, chunk_size); positions past T count
    dt = 0. grid: (batch * heads, n_chunks)."""
    pid_bh = tl.program_id(0)
    c = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    l = tl.arange(0, CHUNK_BLOCK)
    t = c * chunk_size + l
    dt = tl.load(DT + b * stride_dtb + t * stride_dtt + h, mask=(l < chunk_size) & (t < T),
                 other=0.0).to(tl.float32)
    a_cum = tl.cumsum(dt * tl.load(A + h).to(tl.float32), 0)
    tl.store(A_CUM + (pid_bh.to(tl.int64) * n_chunks + c) * chunk_size + l, a_cum, mask=l < chunk_size)


@_autotune(_SSD_STATE_KEY,
           hopper=[(64, 64, 4, 2), (32, 64, 8, 2)],
           ampere=[(64, 64, 4, 2), (32, 64, 4, 2)],
           interpreter=(8, 8, 4, 1))
@triton.jit
def _ssd_chunk_state_kernel(X, DT, B, A_CUM, OUT,
                            stride_xb, stride_xt, stride_xh, stride_dtb, stride_dtt,
                            stride_bb, stride_bt, stride_bg,
                            T, H, HEADS_PER_GROUP, n_chunks, chunk_size, head_dim, state_dim,
                            FROM_START: tl.constexpr, STATE_BLOCK: tl.constexpr,
                            DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stage 2, OUT[b, c, h] = sum over positions l of chunk c of w_l X_l B_l^T, a
    (head_dim, N) matrix; X is (batch, T, heads, head_dim), B (batch, T, groups, N):
      - FROM_START False (forward): X = x, B = B, w_l = dt_l exp(a_cum[end] - a_cum[l]),
        the chunk's own contribution to the state at its end (own_c);
      - FROM_START True (backward, 2'): X = dy, B = C, w_l = exp(a_cum[l]), the gradient
        that the chunk's outputs send to the state entering it (dS_c).
    One program: BLOCK_M rows of head_dim by all N, over the chunk BLOCK_N positions at a
    time. grid: (cdiv(head_dim, BLOCK_M), n_chunks, batch * heads)."""
    c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    p = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.arange(0, STATE_BLOCK)
    x_base = X + b * stride_xb + h * stride_xh
    b_base = B + b * stride_bb + (h // HEADS_PER_GROUP) * stride_bg
    a_row = A_CUM + (pid_bh.to(tl.int64) * n_chunks + c) * chunk_size
    a_end = tl.load(a_row + chunk_size - 1)

    acc = tl.zeros([BLOCK_M, STATE_BLOCK], dtype=tl.float32)
    for start in range(0, chunk_size, BLOCK_N):
        l = start + tl.arange(0, BLOCK_N)
        t = c * chunk_size + l
        real = (l < chunk_size) & (t < T)
        x_t = tl.load(x_base + t[None, :] * stride_xt + p[:, None],  # transposed: (head_dim, positions)
                      mask=(p[:, None] < head_dim) & real[None, :], other=0.0).to(tl.float32)
        b_l = _ssd_load_rows(b_base, stride_bt, t, real, n, state_dim)
        a_l = tl.load(a_row + l, mask=l < chunk_size, other=0.0)
        if FROM_START:
            w = tl.exp(a_l)
        else:
            dt = tl.load(DT + b * stride_dtb + t * stride_dtt + h, mask=real, other=0.0).to(tl.float32)
            w = dt * tl.exp(a_end - a_l)
        w = tl.where(real, w, 0.0)
        acc = tl.dot(x_t * w[None, :], b_l, acc, input_precision=DOT_PRECISION)

    out = OUT + ((b * n_chunks + c) * H + h) * head_dim * state_dim
    tl.store(out + p[:, None] * state_dim + n[None, :], acc,
             mask=(p[:, None] < head_dim) & (n[None, :] < state_dim))


@triton.jit
def _ssd_state_passing_kernel(OWN, A_CUM, INITIAL, STATES, H, n_chunks, chunk_size, state_size,
                              HAS_INITIAL: tl.constexpr, BLOCK: tl.constexpr):
    """Stage 3: S_{c+1} = exp(a_cum[c, end]) S_c + own_c, from S_0 = INITIAL (or 0), one
    chunk after the other, for BLOCK elements of one head's flattened (head_dim * N)
    state. STATES (batch, n_chunks + 1, heads, head_dim, N) receives every S_c: S_c is
    what chunk c's outputs read (stage 4), and the last is the final state.
    grid: (cdiv(head_dim * N, BLOCK), batch * heads)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < state_size
    if HAS_INITIAL:
        state = tl.load(INITIAL + pid_bh.to(tl.int64) * state_size + idx, mask=ok, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK], dtype=tl.float32)
    a_ends = A_CUM + pid_bh.to(tl.int64) * n_chunks * chunk_size + chunk_size - 1
    for c in range(n_chunks):
        tl.store(STATES + ((b * (n_chunks + 1) + c) * H + h) * state_size + idx, state, mask=ok)
        own = tl.load(OWN + ((b * n_chunks + c) * H + h) * state_size + idx, mask=ok, other=0.0)
        state = tl.exp(tl.load(a_ends + c * chunk_size)) * state + own
    tl.store(STATES + ((b * (n_chunks + 1) + n_chunks) * H + h) * state_size + idx, state, mask=ok)


@_autotune(_SSD_SCAN_KEY,
           hopper=[(64, 32, 4, 2), (32, 64, 8, 2), (16, 64, 4, 2)],
           ampere=[(64, 32, 8, 2), (16, 64, 8, 2), (16, 64, 4, 2)],
           interpreter=(8, 8, 4, 1))
@triton.jit
def _ssd_chunk_scan_kernel(X, DT, B, C, A_CUM, STATES, Y,
                           stride_xb, stride_xt, stride_xh, stride_dtb, stride_dtt,
                           stride_bb, stride_bt, stride_bg, stride_cb, stride_ct, stride_cg,
                           stride_yb, stride_yt, stride_yh,
                           T, H, HEADS_PER_GROUP, n_chunks, chunk_size, head_dim, state_dim,
                           HEAD_BLOCK: tl.constexpr, STATE_BLOCK: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stage 4, the outputs of BLOCK_M positions l of one chunk of one head:
      y_l = exp(a_cum[l]) S_c C_l + sum_{s<=l} (C_l . B_s) exp(a_cum[l] - a_cum[s]) dt_s x_s,
    the entering state's part first, then the chunk's inputs BLOCK_N positions at a time
    (up to the block's last row: the later ones are masked by causality anyway).
    grid: (cdiv(chunk_size, BLOCK_M), n_chunks, batch * heads)."""
    pid_m = tl.program_id(0)
    c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    g = h // HEADS_PER_GROUP
    p = tl.arange(0, HEAD_BLOCK)
    n = tl.arange(0, STATE_BLOCK)
    l = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t_l = c * chunk_size + l
    out_real = (l < chunk_size) & (t_l < T)
    a_row = A_CUM + (pid_bh.to(tl.int64) * n_chunks + c) * chunk_size
    a_l = tl.load(a_row + l, mask=l < chunk_size, other=0.0)
    c_l = _ssd_load_rows(C + b * stride_cb + g * stride_cg, stride_ct, t_l, out_real, n, state_dim)

    state = STATES + ((b * (n_chunks + 1) + c) * H + h) * head_dim * state_dim
    state_t = tl.load(state + p[None, :] * state_dim + n[:, None],  # S_c^T: (N, head_dim)
                      mask=(p[None, :] < head_dim) & (n[:, None] < state_dim), other=0.0)
    acc = tl.dot(c_l, state_t, input_precision=DOT_PRECISION) * tl.exp(a_l)[:, None]

    x_base = X + b * stride_xb + h * stride_xh
    b_base = B + b * stride_bb + g * stride_bg
    for start in range(0, tl.minimum((pid_m + 1) * BLOCK_M, chunk_size), BLOCK_N):
        s = start + tl.arange(0, BLOCK_N)
        t_s = c * chunk_size + s
        in_real = (s < chunk_size) & (t_s < T)
        b_s = _ssd_load_rows(b_base, stride_bt, t_s, in_real, n, state_dim)
        x_s = _ssd_load_rows(x_base, stride_xt, t_s, in_real, p, head_dim)
        dt_s = tl.load(DT + b * stride_dtb + t_s * stride_dtt + h, mask=in_real, other=0.0).to(tl.float32)
        a_s = tl.load(a_row + s, mask=s < chunk_size, other=0.0)
        scores = tl.dot(c_l, tl.trans(b_s), input_precision=DOT_PRECISION)  # C_l . B_s
        scores *= _ssd_decay(a_l[:, None], a_s[None, :], l[:, None], s[None, :], chunk_size) * dt_s[None, :]
        acc = tl.dot(scores, x_s, acc, input_precision=DOT_PRECISION)

    tl.store(Y + b * stride_yb + h * stride_yh + t_l[:, None] * stride_yt + p[None, :], acc,
             mask=out_real[:, None] & (p[None, :] < head_dim))


@triton.jit
def _ssd_state_passing_bwd_kernel(D_LOCAL, A_CUM, STATES, D_FINAL, D_PASSED, D_A_END, D_INITIAL,
                                  H, n_chunks, chunk_size, state_size,
                                  HAS_INITIAL: tl.constexpr, BLOCK: tl.constexpr):
    """Stage 3', last chunk first, for BLOCK elements of one head's flattened state:
    G (the gradient reaching the state that leaves chunk c, starting from D_FINAL) is
    stored as D_PASSED[b, c, h] (own_c's gradient: own_c is added to that state); its
    product with that state, sum(G * S_{c+1}), is this block's share of d a_cum[c, end],
    stored in D_A_END (batch, heads, n_chunks, programs); then
    G <- exp(a_cum[c, end]) G + D_LOCAL[b, c, h] (stage 2'), and after chunk 0 it is the
    initial state's gradient. grid: (cdiv(head_dim * N, BLOCK), batch * heads)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    ok = idx < state_size
    g = tl.load(D_FINAL + pid_bh.to(tl.int64) * state_size + idx, mask=ok, other=0.0).to(tl.float32)
    a_ends = A_CUM + pid_bh.to(tl.int64) * n_chunks * chunk_size + chunk_size - 1
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        tl.store(D_PASSED + ((b * n_chunks + c) * H + h) * state_size + idx, g, mask=ok)
        leaving = tl.load(STATES + ((b * (n_chunks + 1) + c + 1) * H + h) * state_size + idx, mask=ok, other=0.0)
        tl.store(D_A_END + (pid_bh.to(tl.int64) * n_chunks + c) * tl.num_programs(0) + pid, tl.sum(g * leaving, 0))
        local = tl.load(D_LOCAL + ((b * n_chunks + c) * H + h) * state_size + idx, mask=ok, other=0.0)
        g = tl.exp(tl.load(a_ends + c * chunk_size)) * g + local
    if HAS_INITIAL:
        tl.store(D_INITIAL + pid_bh.to(tl.int64) * state_size + idx, g, mask=ok)


@_autotune(_SSD_SCAN_KEY,
           hopper=[(64, 64, 8, 2), (32, 64, 8, 2)],
           ampere=[(64, 64, 8, 2), (32, 64, 8, 2)],
           interpreter=(8, 8, 4, 1))
@triton.jit
def _ssd_chunk_scan_bwd_dc_kernel(DY, X, DT, B, C, A_CUM, STATES, DC, D_A_OUT,
                                  stride_dyb, stride_dyt, stride_dyh, stride_xb, stride_xt, stride_xh,
                                  stride_dtb, stride_dtt, stride_bb, stride_bt, stride_bg,
                                  stride_cb, stride_ct, stride_cg,
                                  T, H, HEADS_PER_GROUP, n_chunks, chunk_size, head_dim, state_dim,
                                  HEAD_BLOCK: tl.constexpr, STATE_BLOCK: tl.constexpr,
                                  DOT_PRECISION: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stage 4', output side, for BLOCK_M positions l of one chunk of one head:
      dC_l = exp(a_cum[l]) dy_l^T S_c + sum_{s<=l} exp(a_cum[l] - a_cum[s]) (dy_l . dt_s x_s) B_s
    into DC (batch, T, heads, N) (this head's share of its group's dC), and
    C_l . dC_l = dy_l . y_l, the output side of d a_cum[l] (every term of y_l carries
    exp(a_cum[l])), into D_A_OUT (batch, heads, n_chunks, chunk_size).
    grid: (cdiv(chunk_size, BLOCK_M), n_chunks, batch * heads)."""
    pid_m = tl.program_id(0)
    c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    g = h // HEADS_PER_GROUP
    p = tl.arange(0, HEAD_BLOCK)
    n = tl.arange(0, STATE_BLOCK)
    l = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t_l = c * chunk_size + l
    out_real = (l < chunk_size) & (t_l < T)
    row = (pid_bh.to(tl.int64) * n_chunks + c) * chunk_size  # this chunk in (batch, heads, n_chunks, chunk_size)
    a_row = A_CUM + row
    a_l = tl.load(a_row + l, mask=l < chunk_size, other=0.0)
    dy_l = _ssd_load_rows(DY + b * stride_dyb + h * stride_dyh, stride_dyt, t_l, out_real, p, head_dim)
    c_l = _ssd_load_rows(C + b * stride_cb + g * stride_cg, stride_ct, t_l, out_real, n, state_dim)

    state = STATES + ((b * (n_chunks + 1) + c) * H + h) * head_dim * state_dim
    s_c = tl.load(state + p[:, None] * state_dim + n[None, :],
                  mask=(p[:, None] < head_dim) & (n[None, :] < state_dim), other=0.0)
    dc = tl.dot(dy_l, s_c, input_precision=DOT_PRECISION) * tl.exp(a_l)[:, None]

    x_base = X + b * stride_xb + h * stride_xh
    b_base = B + b * stride_bb + g * stride_bg
    for start in range(0, tl.minimum((pid_m + 1) * BLOCK_M, chunk_size), BLOCK_N):
        s = start + tl.arange(0, BLOCK_N)
        t_s = c * chunk_size + s
        in_real = (s < chunk_size) & (t_s < T)
        x_s = _ssd_load_rows(x_base, stride_xt, t_s, in_real, p, head_dim)
        b_s = _ssd_load_rows(b_base, stride_bt, t_s, in_real, n, state_dim)
        dt_s = tl.load(DT + b * stride_dtb + t_s * stride_dtt + h, mask=in_real, other=0.0).to(tl.float32)
        a_s = tl.load(a_row + s, mask=s < chunk_size, other=0.0)
        weights = tl.dot(dy_l, tl.trans(x_s), input_precision=DOT_PRECISION)  # dy_l . x_s
        weights *= _ssd_decay(a_l[:, None], a_s[None, :], l[:, None], s[None, :], chunk_size) * dt_s[None, :]
        dc = tl.dot(weights, b_s, dc, input_precision=DOT_PRECISION)

    tl.store(DC + ((b * T + t_l[:, None]) * H + h) * state_dim + n[None, :], dc,
             mask=out_real[:, None] & (n[None, :] < state_dim))
    tl.store(D_A_OUT + row + l, tl.sum(c_l * dc, 1), mask=l < chunk_size)


@_autotune(_SSD_SCAN_KEY,
           hopper=[(64, 32, 8, 2), (16, 64, 8, 2)],
           ampere=[(16, 64, 8, 2), (16, 64, 4, 2)],
           interpreter=(8, 8, 4, 1))
@triton.jit
def _ssd_chunk_scan_bwd_dx_kernel(DY, X, DT, B, C, A_CUM, D_PASSED, DX, DDT_X,
                                  stride_dyb, stride_dyt, stride_dyh, stride_xb, stride_xt, stride_xh,
                                  stride_dtb, stride_dtt, stride_bb, stride_bt, stride_bg,
                                  stride_cb, stride_ct, stride_cg, stride_dxb, stride_dxt, stride_dxh,
                                  T, H, HEADS_PER_GROUP, n_chunks, chunk_size, head_dim, state_dim,
                                  HEAD_BLOCK: tl.constexpr, STATE_BLOCK: tl.constexpr,
                                  DOT_PRECISION: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stages 4' and 2' (through own_c), input side, for BLOCK_M positions s of one chunk
    of one head, with G = D_PASSED[b, c, h] the gradient of own_c (stage 3'):
      du_s = exp(a_cum[end] - a_cum[s]) G B_s + sum_{l>=s} (C_l . B_s) exp(a_cum[l] - a_cum[s]) dy_l
    (u_s = dt_s x_s), the later outputs BLOCK_N positions at a time. Stores dx_s = dt_s du_s
    into DX, and x_s . du_s (dt_s's gradient through u_s; times -dt_s it is the input side
    of d a_cum[s], every term of du_s carrying exp(-a_cum[s])) into DDT_X (batch, heads,
    n_chunks, chunk_size). (dB_s, which has the same shape of sum, is a kernel of its own:
    both accumulators in one program spill registers.)
    grid: (cdiv(chunk_size, BLOCK_M), n_chunks, batch * heads)."""
    pid_m = tl.program_id(0)
    c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    g = h // HEADS_PER_GROUP
    p = tl.arange(0, HEAD_BLOCK)
    n = tl.arange(0, STATE_BLOCK)
    s = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t_s = c * chunk_size + s
    in_real = (s < chunk_size) & (t_s < T)
    row = (pid_bh.to(tl.int64) * n_chunks + c) * chunk_size  # this chunk in (batch, heads, n_chunks, chunk_size)
    a_row = A_CUM + row
    a_s = tl.load(a_row + s, mask=s < chunk_size, other=0.0)
    a_end = tl.load(a_row + chunk_size - 1)
    b_s = _ssd_load_rows(B + b * stride_bb + g * stride_bg, stride_bt, t_s, in_real, n, state_dim)

    passed = D_PASSED + ((b * n_chunks + c) * H + h) * head_dim * state_dim
    g_t = tl.load(passed + p[None, :] * state_dim + n[:, None],  # G^T: (N, head_dim)
                  mask=(p[None, :] < head_dim) & (n[:, None] < state_dim), other=0.0)
    to_end = tl.where(in_real, tl.exp(a_end - a_s), 0.0)
    du = tl.dot(b_s, g_t, input_precision=DOT_PRECISION) * to_end[:, None]

    dy_base = DY + b * stride_dyb + h * stride_dyh
    c_base = C + b * stride_cb + g * stride_cg
    for start in range(pid_m * BLOCK_M, chunk_size, BLOCK_N):  # outputs at or after the block's first input
        l = start + tl.arange(0, BLOCK_N)
        t_l = c * chunk_size + l
        out_real = (l < chunk_size) & (t_l < T)
        dy_l = _ssd_load_rows(dy_base, stride_dyt, t_l, out_real, p, head_dim)
        c_l = _ssd_load_rows(c_base, stride_ct, t_l, out_real, n, state_dim)
        a_l = tl.load(a_row + l, mask=l < chunk_size, other=0.0)
        scores = tl.dot(b_s, tl.trans(c_l), input_precision=DOT_PRECISION)  # B_s . C_l: (s, l)
        scores *= _ssd_decay(a_l[None, :], a_s[:, None], l[None, :], s[:, None], chunk_size)
        du = tl.dot(scores, dy_l, du, input_precision=DOT_PRECISION)

    x_s = _ssd_load_rows(X + b * stride_xb + h * stride_xh, stride_xt, t_s, in_real, p, head_dim)
    dt_s = tl.load(DT + b * stride_dtb + t_s * stride_dtt + h, mask=in_real, other=0.0).to(tl.float32)
    tl.store(DX + b * stride_dxb + h * stride_dxh + t_s[:, None] * stride_dxt + p[None, :],
             (du * dt_s[:, None]).to(DX.dtype.element_ty), mask=in_real[:, None] & (p[None, :] < head_dim))
    tl.store(DDT_X + row + s, tl.sum(x_s * du, 1), mask=s < chunk_size)


@_autotune(_SSD_SCAN_KEY,
           hopper=[(64, 64, 8, 2), (32, 64, 8, 2)],
           ampere=[(64, 32, 8, 2), (32, 64, 8, 2)],
           interpreter=(8, 8, 4, 1))
@triton.jit
def _ssd_chunk_scan_bwd_db_kernel(DY, X, DT, C, A_CUM, D_PASSED, DB,
                                  stride_dyb, stride_dyt, stride_dyh, stride_xb, stride_xt, stride_xh,
                                  stride_dtb, stride_dtt, stride_cb, stride_ct, stride_cg,
                                  T, H, HEADS_PER_GROUP, n_chunks, chunk_size, head_dim, state_dim,
                                  HEAD_BLOCK: tl.constexpr, STATE_BLOCK: tl.constexpr,
                                  DOT_PRECISION: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stages 4' and 2' (through own_c), input side, dB for BLOCK_M positions s of one
    chunk of one head, G = D_PASSED[b, c, h] as in `_ssd_chunk_scan_bwd_dx_kernel`:
      dB_s = exp(a_cum[end] - a_cum[s]) G^T u_s + sum_{l>=s} exp(a_cum[l] - a_cum[s]) (dy_l . u_s) C_l
    into DB (batch, T, heads, N) (this head's share of its group's dB).
    grid: (cdiv(chunk_size, BLOCK_M), n_chunks, batch * heads)."""
    pid_m = tl.program_id(0)
    c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    g = h // HEADS_PER_GROUP
    p = tl.arange(0, HEAD_BLOCK)
    n = tl.arange(0, STATE_BLOCK)
    s = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t_s = c * chunk_size + s
    in_real = (s < chunk_size) & (t_s < T)
    a_row = A_CUM + (pid_bh.to(tl.int64) * n_chunks + c) * chunk_size
    a_s = tl.load(a_row + s, mask=s < chunk_size, other=0.0)
    a_end = tl.load(a_row + chunk_size - 1)
    x_s = _ssd_load_rows(X + b * stride_xb + h * stride_xh, stride_xt, t_s, in_real, p, head_dim)
    dt_s = tl.load(DT + b * stride_dtb + t_s * stride_dtt + h, mask=in_real, other=0.0).to(tl.float32)

    passed = D_PASSED + ((b * n_chunks + c) * H + h) * head_dim * state_dim
    g_c = tl.load(passed + p[:, None] * state_dim + n[None, :],
                  mask=(p[:, None] < head_dim) & (n[None, :] < state_dim), other=0.0)
    to_end = tl.where(in_real, tl.exp(a_end - a_s), 0.0)
    db = tl.dot(x_s, g_c, input_precision=DOT_PRECISION) * (dt_s * to_end)[:, None]

    dy_base = DY + b * stride_dyb + h * stride_dyh
    c_base = C + b * stride_cb + g * stride_cg
    for start in range(pid_m * BLOCK_M, chunk_size, BLOCK_N):  # outputs at or after the block's first input
        l = start + tl.arange(0, BLOCK_N)
        t_l = c * chunk_size + l
        out_real = (l < chunk_size) & (t_l < T)
        dy_l = _ssd_load_rows(dy_base, stride_dyt, t_l, out_real, p, head_dim)
        c_l = _ssd_load_rows(c_base, stride_ct, t_l, out_real, n, state_dim)
        a_l = tl.load(a_row + l, mask=l < chunk_size, other=0.0)
        weights = tl.dot(x_s, tl.trans(dy_l), input_precision=DOT_PRECISION)  # x_s . dy_l: (s, l)
        weights *= _ssd_decay(a_l[None, :], a_s[:, None], l[None, :], s[:, None], chunk_size) * dt_s[:, None]
        db = tl.dot(weights, c_l, db, input_precision=DOT_PRECISION)

    tl.store(DB + ((b * T + t_s[:, None]) * H + h) * state_dim + n[None, :], db,
             mask=in_real[:, None] & (n[None, :] < state_dim))


@triton.jit
def _ssd_chunk_cumsum_bwd_kernel(DT, A, D_A_OUT, DDT_X, D_A_END, DDT, DA_PARTIAL,
                                 stride_dtb, stride_dtt, T, H, n_chunks, chunk_size,
                                 CHUNK_BLOCK: tl.constexpr):
    """Stage 1', one chunk of one head: the gradient of each a_cum[l],
      d a_cum[l] = D_A_OUT[l] - dt_l DDT_X[l]  (+ D_A_END at l = end),
    then d a_l = d a_cum[l] + ... + d a_cum[end] (a reversed cumsum: a_l enters every
    later a_cum) and, with a_l = dt_l A: DDT (batch, T, heads) = DDT_X + A d a_l, and this
    chunk's share of dA, sum_l dt_l d a_l, into DA_PARTIAL (batch, heads, n_chunks).
    grid: (batch * heads, n_chunks)."""
    pid_bh = tl.program_id(0)
    c = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    l = tl.arange(0, CHUNK_BLOCK)
    t = c * chunk_size + l
    in_chunk = l < chunk_size
    real = in_chunk & (t < T)
    row = (pid_bh.to(tl.int64) * n_chunks + c) * chunk_size
    dt = tl.load(DT + b * stride_dtb + t * stride_dtt + h, mask=real, other=0.0).to(tl.float32)
    ddt_x = tl.load(DDT_X + row + l, mask=in_chunk, other=0.0)
    d_a_cum = tl.load(D_A_OUT + row + l, mask=in_chunk, other=0.0) - dt * ddt_x
    d_a_cum += tl.where(l == chunk_size - 1, tl.load(D_A_END + pid_bh.to(tl.int64) * n_chunks + c), 0.0)
    d_a = tl.cumsum(d_a_cum, 0, reverse=True)
    tl.store(DDT + b * stride_dtb + t * stride_dtt + h, ddt_x + tl.load(A + h).to(tl.float32) * d_a, mask=real)
    tl.store(DA_PARTIAL + pid_bh.to(tl.int64) * n_chunks + c, tl.sum(dt * d_a, 0))


def _ssd_block(n):
    """A tile's side covering n features: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(n))


def _ssd_dot_precision(*inputs):
    """Exact fp32 products for fp32 inputs; TF32 for 16-bit ones, whose own rounding is
    coarser. (Exact fp32 tl.dot runs on the CUDA cores, not the tensor cores.)"""
    return "ieee" if all(t.dtype == torch.float32 for t in inputs) else "tf32"


_SSD_STATE_BLOCK = 16 if _INTERPRET else 1024  # state elements per program in stage 3 (and 3')


# The stages as functions (launchers), each the kernel of the same name on ready
# (`_launch_ready`) inputs and contiguous intermediates (a_cum, states and their gradients,
# as these functions create them); SSDFunction chains them, and the tests check them one
# by one.

def _ssd_chunk_cumsum(dt, A, chunk_size):
    """Stage 1: a_cum (batch, heads, n_chunks, chunk_size), fp32."""
    batch, T, H = dt.shape
    n_chunks = triton.cdiv(T, chunk_size)
    a_cum = torch.empty(batch, H, n_chunks, chunk_size, device=dt.device, dtype=torch.float32)
    _ssd_chunk_cumsum_kernel[(batch * H, n_chunks)](
        dt, A, a_cum, dt.stride(0), dt.stride(1), T, H, n_chunks, chunk_size,
        CHUNK_BLOCK=triton.next_power_of_2(chunk_size))
    return a_cum


def _ssd_chunk_states(x, dt, B, a_cum, from_start=False):
    """Stage 2 (from_start False: own_c from x, dt, B) or 2' (from_start True: dS_c from
    dy, C, passed as x and B; dt unused): (batch, n_chunks, heads, head_dim, N), fp32."""
    batch, T, H, P = x.shape
    N = B.shape[-1]
    n_chunks, chunk_size = a_cum.shape[2:]
    out = torch.empty(batch, n_chunks, H, P, N, device=x.device, dtype=torch.float32)

    def grid(meta):
        return triton.cdiv(P, meta["BLOCK_M"]), n_chunks, batch * H
    _ssd_chunk_state_kernel[grid](
        x, dt, B, a_cum, out, *_strides(x), dt.stride(0), dt.stride(1), *_strides(B),
        T, H, H // B.shape[2], n_chunks, chunk_size, P, N,
        FROM_START=from_start, STATE_BLOCK=_ssd_block(N), DOT_PRECISION=_ssd_dot_precision(x, B))
    return out


def _ssd_pass_states(own, a_cum, initial_state=None):
    """Stage 3: states (batch, n_chunks + 1, heads, head_dim, N), fp32: [:, c] enters
    chunk c, [:, -1] is the final state."""
    batch, n_chunks, H, P, N = own.shape
    states = torch.empty(batch, n_chunks + 1, H, P, N, device=own.device, dtype=torch.float32)
    initial = own if initial_state is None else initial_state.float().contiguous()  # (unread if None)
    _ssd_state_passing_kernel[(triton.cdiv(P * N, _SSD_STATE_BLOCK), batch * H)](
        own, a_cum, initial, states, H, n_chunks, a_cum.shape[3], P * N,
        HAS_INITIAL=initial_state is not None, BLOCK=_SSD_STATE_BLOCK)
    return states


def _ssd_chunk_scan(x, dt, B, C, a_cum, states):
    """Stage 4: y (batch, T, heads, head_dim), fp32."""
    batch, T, H, P = x.shape
    N = B.shape[-1]
    n_chunks, chunk_size = a_cum.shape[2:]
    y = torch.empty(batch, T, H, P, device=x.device, dtype=torch.float32)

    def grid(meta):
        return triton.cdiv(chunk_size, meta["BLOCK_M"]), n_chunks, batch * H
    _ssd_chunk_scan_kernel[grid](
        x, dt, B, C, a_cum, states, y, *_strides(x), dt.stride(0), dt.stride(1),
        *_strides(B), *_strides(C), *_strides(y), T, H, H // B.shape[2], n_chunks, chunk_size, P, N,
        HEAD_BLOCK=_ssd_block(P), STATE_BLOCK=_ssd_block(N), DOT_PRECISION=_ssd_dot_precision(x))
    return y


def _ssd_pass_states_bwd(d_local, a_cum, states, d_final, want_initial):
    """Stage 3': (d_passed (batch, n_chunks, heads, head_dim, N), d a_cum[c, end]
    (batch, heads, n_chunks), the initial state's gradient or None), fp32."""
    batch, n_chunks, H, P, N = d_local.shape
    programs = triton.cdiv(P * N, _SSD_STATE_BLOCK)
    d_passed = torch.empty_like(d_local)
    d_a_end = torch.empty(batch, H, n_chunks, programs, device=d_local.device, dtype=torch.float32)
    d_initial = torch.empty(batch, H, P, N, device=d_local.device, dtype=torch.float32) if want_initial else None
    _ssd_state_passing_bwd_kernel[(programs, batch * H)](
        d_local, a_cum, states, d_final.float().contiguous(), d_passed, d_a_end,
        d_initial if want_initial else d_local, H, n_chunks, a_cum.shape[3], P * N,
        HAS_INITIAL=want_initial, BLOCK=_SSD_STATE_BLOCK)
    return d_passed, d_a_end.sum(-1), d_initial  # the blocks' shares, summed


def _ssd_chunk_scan_bwd(dy, x, dt, B, C, a_cum, states, d_passed):
    """Stage 4' (both sides): (dx in x's dtype, dB and dC per head (batch, T, heads, N),
    d a_cum's output side and x . du, both (batch, heads, n_chunks, chunk_size)), fp32."""
    batch, T, H, P = x.shape
    N = B.shape[-1]
    n_chunks, chunk_size = a_cum.shape[2:]
    dc = torch.empty(batch, T, H, N, device=x.device, dtype=torch.float32)
    db = torch.empty_like(dc)
    d_a_out, ddt_x = torch.empty_like(a_cum), torch.empty_like(a_cum)
    dx = torch.empty_like(x)
    flags = dict(HEAD_BLOCK=_ssd_block(P), STATE_BLOCK=_ssd_block(N), DOT_PRECISION=_ssd_dot_precision(x))
    sizes = (T, H, H // B.shape[2], n_chunks, chunk_size, P, N)
    inputs = (*_strides(dy), *_strides(x), dt.stride(0), dt.stride(1), *_strides(B), *_strides(C))

    def grid(meta):
        return triton.cdiv(chunk_size, meta["BLOCK_M"]), n_chunks, batch * H
    _ssd_chunk_scan_bwd_dc_kernel[grid](dy, x, dt, B, C, a_cum, states, dc, d_a_out, *inputs, *sizes, **flags)
    _ssd_chunk_scan_bwd_dx_kernel[grid](dy, x, dt, B, C, a_cum, d_passed, dx, ddt_x,
                                        *inputs, *_strides(dx), *sizes, **flags)
    _ssd_chunk_scan_bwd_db_kernel[grid](dy, x, dt, C, a_cum, d_passed, db, *_strides(dy), *_strides(x),
                                        dt.stride(0), dt.stride(1), *_strides(C), *sizes, **flags)
    return dx, db, dc, d_a_out, ddt_x


def _ssd_chunk_cumsum_bwd(dt, A, d_a_out, ddt_x, d_a_end):
    """Stage 1': (ddt (batch, T, heads), dA (heads,)), fp32."""
    batch, T, H = dt.shape
    n_chunks, chunk_size = d_a_out.shape[2:]
    ddt = torch.empty(batch, T, H, device=dt.device, dtype=torch.float32)
    da_partial = torch.empty(batch, H, n_chunks, device=dt.device, dtype=torch.float32)
    _ssd_chunk_cumsum_bwd_kernel[(batch * H, n_chunks)](
        dt, A, d_a_out, ddt_x, d_a_end.contiguous(), ddt, da_partial,
        dt.stride(0), dt.stride(1), T, H, n_chunks, chunk_size,
        CHUNK_BLOCK=triton.next_power_of_2(chunk_size))
    return ddt, da_partial.sum((0, 2))


def _ssd_group_sum(per_head, groups):
    """(batch, T, heads, N) -> (batch, T, groups, N): a group's gradient is its heads' sum."""
    batch, T, H, N = per_head.shape
    return per_head.view(batch, T, groups, H // groups, N).sum(3)


class SSDFunction(torch.autograd.Function):
    """ssd() on the Triton kernels above: forward runs stages 1-4 and saves the inputs,
    a_cum and the states entering each chunk ((batch, n_chunks + 1, heads, head_dim, N),
    1/chunk_size of the per-position states); backward runs 2', 3', 4' and 1'. Both
    outputs are differentiable, the final state too."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, initial_state):
        x, dt, B, C = (_launch_ready(t) for t in (x, dt, B, C))
        A = A.contiguous()
        a_cum = _ssd_chunk_cumsum(dt, A, chunk_size)
        states = _ssd_pass_states(_ssd_chunk_states(x, dt, B, a_cum), a_cum, initial_state)
        y = _ssd_chunk_scan(x, dt, B, C, a_cum, states)
        ctx.save_for_backward(x, dt, A, B, C, a_cum, states)
        ctx.has_initial = initial_state is not None
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        # a copy: the saved states must not change if the caller edits the final state in place
        return y, states[:, -1].clone()

    @staticmethod
    def backward(ctx, dy, d_final):
        x, dt, A, B, C, a_cum, states = ctx.saved_tensors
        dy = _launch_ready(dy)
        d_local = _ssd_chunk_states(dy, dt, C, a_cum, from_start=True)
        d_passed, d_a_end, d_initial = _ssd_pass_states_bwd(
            d_local, a_cum, states, d_final, ctx.has_initial and ctx.needs_input_grad[6])
        dx, db, dc, d_a_out, ddt_x = _ssd_chunk_scan_bwd(dy, x, dt, B, C, a_cum, states, d_passed)
        ddt, dA = _ssd_chunk_cumsum_bwd(dt, A, d_a_out, ddt_x, d_a_end)
        groups = B.shape[2]
        return (dx, ddt.to(dt.dtype), dA.to(A.dtype), _ssd_group_sum(db, groups).to(B.dtype),
                _ssd_group_sum(dc, groups).to(C.dtype), None,
                None if d_initial is None else d_initial.to(ctx.initial_dtype))


def _ssd_supports(x, dt, A, B, C, chunk_size, initial_state):
    """The cases the Triton SSD handles; anything else runs ssd_chunked."""
    if x.dim() != 4 or B.dim() != 4:
        return False
    batch, T, heads, head_dim = x.shape
    float_types = (torch.float16, torch.bfloat16, torch.float32)
    return (all(t.dtype in float_types for t in (x, dt, A, B, C))
            and dt.shape == (batch, T, heads) and A.shape == (heads,)
            and B.shape == C.shape and B.shape[:2] == (batch, T) and heads % B.shape[2] == 0
            and (initial_state is None or (initial_state.shape == (batch, heads, head_dim, B.shape[3])
                                           and initial_state.dtype in float_types))
            # one program holds a head's whole state: head_dim x N registers
            and 0 < head_dim <= SSD_MAX_HEAD_DIM and 0 < B.shape[3] <= SSD_MAX_STATE_DIM
            and _ssd_block(head_dim) * _ssd_block(B.shape[3]) <= SSD_MAX_STATE_SIZE
            and 0 < chunk_size <= SSD_MAX_CHUNK and T > 0 and batch > 0)


def ssd(x, dt, A, B, C, chunk_size, initial_state=None):
    """Mamba-2's SSD scan (see the section comment): (y, final state), in fp32.

    Triton path (backend "triton"): the kernels above (SSDFunction), forward and
    backward, for head_dim <= 128, N <= 256 and head_dim x N <= 128 x 128 (any sizes up
    to those: masked; Mamba-2's own are 64 x 128), chunk_size <= 1024, any T and groups,
    with or without an initial state, and gradients of every input and of both outputs.
    Otherwise (or on the torch backend) ssd_chunked."""
    if backend(x) == "triton" and _ssd_supports(x, dt, A, B, C, chunk_size, initial_state):
        return SSDFunction.apply(x, dt, A, B, C, chunk_size, initial_state)
    return ssd_chunked(x, dt, A, B, C, chunk_size, initial_state)
