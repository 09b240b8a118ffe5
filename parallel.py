"""Parallelism written by hand over torch.distributed.

Every piece of distributed machinery the models and train.py use is here, in sections
that can each be read (and copied) alone. Each section uses only the sections above it:

  The layout             how `world = tp * cp * dp * pp` ranks are arranged, and their groups
  Parameter tags         what the machinery must know of each parameter (sharded, partial, ...)
  Initialization         the same global weights whatever the layout
  FP8 matmuls            scaling recipes and the three matmuls of a linear layer
  Tensor parallelism     Megatron's column/row-parallel layers, and sequence parallelism
  Context parallelism    zigzag sequence split, ring attention, all-to-all to heads
  Expert parallelism     experts sharded over data-parallel ranks, all-to-all dispatch
  Model chunks           a model cut into pipeline chunks; the output layer and loss
  Recomputation          attention cores or whole layers recomputed in backward
  Compilation            torch.compile applied layer by layer
  Data parallelism       bucketed gradient reduction overlapped with backward, ZeRO-1, AdamW
  Gradient norm          clipping and fp16 loss scaling, agreed across ranks
  Pipeline schedules     GPipe, 1F1B, interleaved 1F1B, and running them
  Local ranks            N processes on one machine, for tests and benchmarks

Rank order follows Megatron: tp varies fastest, then cp, then dp, then pp, so
tensor-parallel peers (which talk the most) sit on the same node.
"""
import contextlib
import dataclasses
import datetime
import functools
import math
import os
import queue
import socket
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import kernels
from errors import UsageError

# torch 2.13 named these collectives *_single and deprecated the old names; torch 2.11 (the
# GPU machines' image) has only the old ones. Same arguments, same result.
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# ----------------------------------------------------------------------------
# The layout: the rank grid and its process groups
# ----------------------------------------------------------------------------

@dataclass
class Layout:
    """Where this process sits in the (pp, dp, cp, tp) grid, and its process groups.

    A group is None when it would hold one rank (nothing to communicate), and every
    helper below treats None as "single process on this axis".
    """
    tp: int = 1
    cp: int = 1
    dp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 0                    # experts' tensor parallelism, dividing tp (0: tp, the dense layers')
    sp: bool = False                # sequence parallelism (meaningful when tp > 1)
    vpp: int = 1                    # virtual pipeline stages (model chunks) per rank
    cp_comm: str = "ring"           # context parallelism: "ring" or "allgather"
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: object = None
    cp_group: object = None
    dp_group: object = None
    pp_group: object = None
    dp_cp_group: object = None      # replicas of the same weights: gradients reduce here
    embedding_group: object = None  # first + last pipeline stage (tied embeddings)
    ep_group: object = None         # ranks holding different experts ("Expert parallelism")
    expert_dp_group: object = None  # replicas of the same experts: their gradients reduce here
    etp_group: object = None        # ranks holding slices of the same experts (tp_group if etp = tp)
    created: list = field(default_factory=list, repr=False)  # groups made by init_distributed
    owns_world: bool = False        # init_distributed also made the default process group

    def __post_init__(self):
        self.etp = self.etp or self.tp

    @property
    def world(self):
        return self.tp * self.cp * self.dp * self.pp

    # Coordinates from the rank: tp fastest, then cp, dp, pp.
    @property
    def tp_rank(self):
        return self.rank % self.tp

    @property
    def cp_rank(self):
        return self.rank // self.tp % self.cp

    @property
    def dp_rank(self):
        return self.rank // (self.tp * self.cp) % self.dp

    @property
    def pp_rank(self):
        return self.rank // (self.tp * self.cp * self.dp)

    @property
    def dp_cp(self):
        """Ranks holding the same weights: data-parallel replicas and context-parallel
        ranks (which see other tokens of the same sequences) reduce gradients together."""
        return self.dp * self.cp

    @property
    def dp_cp_rank(self):
        return self.dp_rank * self.cp + self.cp_rank

    # The experts cut each pipeline stage's tp * dp * cp ranks their own way (Megatron's
    # expert grid): in the order of expert_index, etp fastest, then ep, then the replicas.
    @property
    def expert_index(self):
        """This rank's place in its pipeline stage: tp_rank + tp * dp_cp_rank."""
        return self.rank % (self.tp * self.dp_cp)

    @property
    def etp_rank(self):
        """Which slice of each of its experts this rank holds."""
        return self.expert_index % self.etp

    @property
    def ep_rank(self):
        """Which of the expert groups (n_experts / ep experts each) this rank holds."""
        return self.expert_index // self.etp % self.ep

    @property
    def expert_dp(self):
        """Ranks holding the same expert slices (their gradients reduce over them)."""
        return self.tp * self.dp_cp // (self.etp * self.ep)

    @property
    def expert_dp_rank(self):
        """Position among the ranks holding the same expert slices (ZeRO-1 slices of experts)."""
        return self.expert_index // (self.etp * self.ep)

    @property
    def separate_experts(self):
        """Whether experts are replicated over other ranks than the dense weights (and need
        gradient buckets of their own): under ep, or with etp below tp."""
        return self.ep > 1 or self.etp < self.tp

    @property
    def is_main(self):
        """Rank 0 prints, logs and writes the checkpoint index."""
        return self.rank == 0

    @property
    def pp_next(self):
        """Global rank of the next pipeline stage (the ring wraps for interleaving)."""
        return (self.rank + self.tp * self.cp * self.dp) % self.world

    @property
    def pp_prev(self):
        return (self.rank - self.tp * self.cp * self.dp) % self.world

    def describe(self):
        sp = " (sp)" if self.sp and self.tp > 1 else ""
        vpp = f" (vpp={self.vpp})" if self.vpp > 1 else ""
        etp = f" etp={self.etp}" if self.etp != self.tp else ""
        return (f"world={self.world} tp={self.tp}{sp} cp={self.cp} dp={self.dp} pp={self.pp}{vpp} "
                f"ep={self.ep}{etp} device={self.device}")


def world_size():
    """Processes of this job: the default process group's if one exists, else torchrun's
    WORLD_SIZE, else 1 (plain `python`)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def check_layout(world, tp=1, cp=1, pp=1, ep=1, etp=None):
    """Return dp for this world size, or raise UsageError naming the fix."""
    etp = etp or tp
    for name, size in (("tp", tp), ("cp", cp), ("pp", pp), ("ep", ep), ("etp", etp)):
        if size < 1:
            raise UsageError(f"--{name} must be >= 1, got {size}")
    model_parallel = tp * cp * pp
    if world % model_parallel:
        raise UsageError(f"world size {world} is not divisible by tp*cp*pp = {tp}*{cp}*{pp} = "
                         f"{model_parallel}; launch a multiple of {model_parallel} processes "
                         f"(torchrun --nproc-per-node) or change --tp/--cp/--pp")
    dp = world // model_parallel
    check_expert_layout(Layout(tp=tp, cp=cp, dp=dp, pp=pp, ep=ep, etp=etp))
    return dp


def check_expert_layout(layout, n_experts=None):
    """etp must divide tp, and ep the expert count and the ranks left to it: dp * cp, and
    the tp ranks etp leaves (tp / etp)."""
    if n_experts is not None and n_experts % layout.ep:
        raise UsageError(f"n_experts={n_experts} is not divisible by --ep {layout.ep}; "
                         f"choose an --ep that divides it")
    if layout.tp % layout.etp:
        raise UsageError(f"--etp {layout.etp} must divide --tp {layout.tp} (the experts are split "
                         f"over part of the tp ranks); choose another --etp")
    spare_tp = layout.tp // layout.etp
    if (spare_tp * layout.dp * layout.cp) % layout.ep:
        ranks = f"dp*cp = {layout.dp}*{layout.cp} = {layout.dp * layout.cp}" if spare_tp == 1 else \
            f"tp/etp*dp*cp = {spare_tp}*{layout.dp}*{layout.cp} = {spare_tp * layout.dp * layout.cp}"
        raise UsageError(f"--ep {layout.ep} must divide {ranks} (expert parallelism splits the "
                         f"data-parallel ranks, and the tp ranks --etp leaves); launch more processes "
                         f"or choose another --ep")


def _ranks_along(axis, layout):
    """All groups of ranks that differ only in `axis` ('tp', 'cp', 'dp' or 'pp')."""
    return _grid_groups([(a, getattr(layout, a)) for a in ("tp", "cp", "dp", "pp")], axis)


def _grid_groups(grid, axis):
    """All groups of ranks that differ only in `axis`, in a grid of (axis, size), fastest first."""
    sizes = [size for _, size in grid]
    strides = [1]
    for s in sizes[:-1]:
        strides.append(strides[-1] * s)
    a = [name for name, _ in grid].index(axis)
    groups = []
    for base in range(math.prod(sizes)):
        if (base // strides[a]) % sizes[a] == 0:  # the member with coordinate 0 on `axis`
            groups.append([base + i * strides[a] for i in range(sizes[a])])
    return groups


def _replica_ranks(layout):
    """For each (tp, pp) coordinate: its dp * cp ranks ordered by dp_cp_rank (cp fastest)."""
    tp, dpcp = layout.tp, layout.dp * layout.cp
    return [[tp_rank + tp * j + tp * dpcp * pp_rank for j in range(dpcp)]
            for pp_rank in range(layout.pp) for tp_rank in range(tp)]


def expert_groups(layout, axis):
    """Rank lists of all groups along `axis` of the expert grid: 'etp', 'ep' or 'expert_dp'
    (see Layout.expert_index). With etp = tp an ep group is `ep` consecutive
    data(-context)-parallel ranks of the same tp rank."""
    grid = [("etp", layout.etp), ("ep", layout.ep), ("expert_dp", layout.expert_dp), ("pp", layout.pp)]
    return _grid_groups(grid, axis)


def group_ranks(layout):
    """{Layout field: the rank lists of every instance of that group}, in creation order."""
    groups = {f"{axis}_group": _ranks_along(axis, layout) for axis in ("tp", "cp", "dp", "pp")}
    groups["dp_cp_group"] = _replica_ranks(layout)
    if layout.separate_experts:  # else the expert-data-parallel group is dp_cp_group itself
        for axis in ("ep", "expert_dp", *(("etp",) if layout.etp < layout.tp else ())):
            groups[f"{axis}_group"] = expert_groups(layout, axis)
    if layout.pp > 1:  # the first and the last stage of each pipeline
        groups["embedding_group"] = [[ranks[0], ranks[-1]] for ranks in _ranks_along("pp", layout)]
    return groups


def cuda_device_index(environ, device_count):
    """The CUDA device a process takes: its LOCAL_RANK (its place among the processes
    torchrun started on its own node; 0 under plain `python`) modulo the node's
    `device_count`, never its global RANK. With one torchrun agent per node (`--nnodes 2
    --nproc-per-node 2`), RANK 2 and 3 run on the second node as LOCAL_RANK 0 and 1 and take
    its devices 0 and 1; by RANK they would ask for devices 2 and 3, which a two-GPU node
    does not have (or, on a node with more, leave 0 and 1 idle). The modulo lets more
    processes than devices share them (tests on one GPU)."""
    return int(environ.get("LOCAL_RANK", "0")) % device_count


def init_distributed(tp=1, cp=1, pp=1, ep=1, sp=True, vpp=1, cp_comm="ring", device=None,
                     timeout_minutes=10, etp=None):
    """This process's Layout, with its process groups.

    The processes are torchrun's (RANK, WORLD_SIZE, ...), or one under plain `python`, or
    those of a default process group that already exists (a test running many layouts in
    the same processes, see "Local ranks"): then only the layout's groups are made, and
    destroy_distributed removes only those. CUDA + NCCL when a GPU is present, CPU + gloo
    otherwise; `device` forces one.
    """
    world = world_size()
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    dp = check_layout(world, tp, cp, pp, ep, etp)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", cuda_device_index(os.environ, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    layout = Layout(tp=tp, cp=cp, dp=dp, pp=pp, ep=ep, etp=etp or tp, sp=sp and tp > 1, vpp=vpp,
                    cp_comm=cp_comm, rank=rank, device=device)
    if world == 1:
        return layout
    # How long any collective or message may wait for a peer before it raises (gloo) or
    # NCCL's watchdog ends the process: each group has its own, the world's is not inherited.
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                                world_size=world, timeout=timeout)
        layout.owns_world = True
    for name, rank_lists in group_ranks(layout).items():
        for ranks in rank_lists:
            if len(ranks) == 1:
                continue
            group = dist.new_group(ranks, timeout=timeout)  # collective: every rank makes every group, in order
            layout.created.append(group)
            if rank in ranks:
                setattr(layout, name, group)
    if not layout.separate_experts:
        layout.expert_dp_group = layout.dp_cp_group
    if layout.etp == layout.tp:
        layout.etp_group = layout.tp_group
    return layout


def destroy_distributed(layout):
    """Undo init_distributed: its groups, and the default group if it made that too."""
    if dist.is_initialized():
        if layout.owns_world:
            dist.destroy_process_group()
        else:
            for group in layout.created:
                dist.destroy_process_group(group)
    layout.created = []


def raise_if_any(problem, layout):
    """Collective over the world: where any rank met `problem` (a message; None on the
    others), every rank raises that UsageError (the lowest rank's), so that none is left
    waiting in the next collective for one that stopped."""
    if layout.world > 1 and dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, problem)
        problem = next((p for p in everyone if p), None)
    if problem:
        raise UsageError(problem)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce(tensor, group, op=dist.ReduceOp.SUM):
    """In-place all-reduce that is a no-op on a size-1 axis."""
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_reduce_world(tensor, layout, op=dist.ReduceOp.SUM):
    """In-place all-reduce over every rank of the layout: its replicas (dp x cp, expert
    ranks included), tensor and pipeline groups together span the world."""
    for group in (layout.dp_cp_group, layout.tp_group, layout.pp_group):
        all_reduce(tensor, group, op)
    return tensor


# What gloo's errors say (lower-cased) when the other end of a collective or a pipeline
# message failed: "Timed out waiting 3000ms for recv operation", "Application timeout
# caused pair closure", "Connection reset by peer", ... (NCCL's watchdog aborts the process
# itself once a collective outlives the timeout.)
_PEER_FAILURES = {"timed out": "no answer from the other ranks within the timeout",
                  "application timeout": "no answer from the other ranks within the timeout",
                  "connection reset": "another rank closed its connection (it exited)",
                  "connection closed": "another rank closed its connection (it exited)",
                  "broken pipe": "another rank closed its connection (it exited)"}


def peer_failure(error):
    """What went wrong, in a few words, when `error` means that another rank died, hangs
    or was stopped; None for any other error (a bug here, to be reported as such)."""
    text = str(error)
    reason = next((why for sign, why in _PEER_FAILURES.items() if sign in text.lower()), None)
    if reason is None and isinstance(error, dist.DistError):
        reason = text.splitlines()[0] if text else type(error).__name__
    return reason


# ----------------------------------------------------------------------------
# Parameter tags: what the machinery must know of each parameter
# ----------------------------------------------------------------------------

@dataclass
class Tags:
    """What a parameter is, for the parallel machinery: set where the parameter is made
    (the parallel layers below, or a model where its math decides), read by DataParallel,
    the gradient norm, checkpoints and Hugging Face import. The defaults describe a plain
    parameter replicated on every rank."""
    global_shape: list = None   # the whole tensor's shape, when this is a part of it
    global_offset: list = None  # where this part starts in the whole tensor
    tp_sharded: bool = False    # a slice of a tensor split over tp: each tp rank holds another ...
    tp_replicas: int = 1        # ... or the same as its neighbours: a slice held by this many
                                # consecutive tp ranks (KV heads when tp exceeds them), each
                                # computing part of its gradient (summed over them)
    partial_grad: bool = False  # replicated over tp, but each tp rank computes only part of the
                                # gradient (a QK-norm seeing its heads): summed over tp
    pp_tied: bool = False       # a tied embedding held by the first and the last pipeline stage
    pp_shared: bool = False     # held by every pipeline chunk (T5's position-bias tables)
    pp_tied_copy: bool = False  # a copy of either kind but the first chunk's: never saved or counted
    expert: bool = False        # an expert's: one rank of each ep group holds it


def tags(param):
    """The Tags of `param` (the defaults until something tags it)."""
    if not hasattr(param, "tags"):
        param.tags = Tags()
    return param.tags


def global_region(param):
    """Where this rank's `param` sits in its global tensor: (global shape, offset,
    extent). The extent is the part's shape clipped to the global shape: a part may reach
    past it (vocabulary padding), and that part belongs to no global tensor."""
    t = tags(param)
    shape = list(t.global_shape or param.shape)
    offset = list(t.global_offset or [0] * param.dim())
    extent = [max(0, min(n, g - o)) for n, g, o in zip(param.shape, shape, offset)]
    return shape, offset, extent


def grad_is_partial(param, layout):
    """Whether each tp rank computes only part of `param`'s gradient, to be summed over tp:
    tagged so, or, under sequence parallelism, any parameter not split over tp, as it then
    sees only this rank's tokens (norms, learned positions, a bias added after the
    reduce-scatter). Without sp those see every token and hold the whole gradient."""
    t = tags(param)
    return layout.tp > 1 and (t.partial_grad or (layout.sp and not t.tp_sharded))


def counts_once(param, layout):
    """Whether this rank's copy of `param` is the one that counts among the tp ranks and
    pipeline stages: a tp shard is a part of its own (on the first of its replicas), a
    tensor replicated over tp counts on tp rank 0, the last stage's copy of a tied
    embedding never counts. The gradient norm,
    checkpoints and the parameter count use it. (Replicas over dp x cp hold the same
    values: each user of this predicate handles them its own way.)"""
    t = tags(param)
    first_holder = layout.tp_rank % t.tp_replicas == 0 if t.tp_sharded else layout.tp_rank == 0
    return first_holder and not t.pp_tied_copy


def count_parameters(modules, layout):
    """Parameters of the whole model, from this rank's parts (collective)."""
    counts = torch.zeros(2, device=layout.device)  # [dense, experts]: each ep rank holds others
    for p in (p for m in modules for p in m.parameters()):
        if counts_once(p, layout):
            counts[int(tags(p).expert)] += math.prod(global_region(p)[2])
    for group in (layout.ep_group, layout.etp_group):
        all_reduce(counts[1:], group)
    all_reduce(counts[:1], layout.tp_group)
    all_reduce(counts, layout.pp_group)
    return int(counts.sum())


# ----------------------------------------------------------------------------
# Initialization: the same global weights whatever the layout
# ----------------------------------------------------------------------------

def init_parameters(module, seed, std_for):
    """Fill every parameter of `module` so that the *global* weights depend only on
    (seed, parameter name), never on the layout.

    Each tensor is drawn whole from its own generator keyed by (seed, name), and a
    rank holding a shard keeps its box of it (padding beyond the global shape is zero).
    Names must therefore be global (models key their layers by global index, so layer
    7 is `layers.7` on every stage). `std_for(name)` gives the normal std of matrices
    and embeddings; biases start at zero and the other 1-D parameters (norm gains) at one.
    """
    for name, param in module.named_parameters():
        with torch.no_grad():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1:
                param.fill_(1.0)
            else:
                full = torch.empty(global_region(param)[0], dtype=torch.float32)
                full.normal_(0.0, std_for(name), generator=init_generator(seed, name))
                copy_global(param, full)


def init_generator(seed, name):
    """The random generator of parameter `name`'s initialization: keyed by (seed, name)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


@torch.no_grad()
def copy_global(param, full):
    """Fill this rank's part of `param` from `full`, the whole global tensor (padding
    beyond the global shape is zero). Models use it for initializations of their own."""
    _, offset, extent = global_region(param)
    param.zero_()
    param[tuple(slice(0, n) for n in extent)] = full[
        tuple(slice(o, o + n) for o, n in zip(offset, extent))].to(param.device, param.dtype)


# ----------------------------------------------------------------------------
# FP8 matmuls: scaling recipes and the three matmuls of a linear layer
# ----------------------------------------------------------------------------
# Under --precision fp8 the linear layers inside the transformer layers (the column- and
# row-parallel layers of the next section) run their three matmuls in FP8
# (kernels.fp8_matmul: Triton on a GPU; on a CPU the exact emulation, the same quantized
# values multiplied in fp32):
#
#   forward  y  = x W^T     x and W in E4M3
#   dgrad    dx = dy W      dy in E5M2 (gradients need range more than precision)
#   wgrad    dW = dy^T x    into the fp32 gradient
#
# Everything else stays in higher precision: embeddings, the output layer and the loss,
# norms, attention's softmax, residuals, the fp32 master weights and optimizer state, and
# by default the first and the last transformer layer (Megatron's --first-last-layers-bf16).
#
# A scale maps an operand's largest magnitude (amax) onto the top of its format. The
# recipes differ in which amax:
#
#   tensorwise  the tensor's own amax ("current scaling"), one number per operand.
#   rowwise     one amax per row of each operand, rows along the dimension the matmul does
#               not sum over (so each of the three matmuls quantizes its operands anew);
#               an outlier then costs only its own row precision.
#   delayed     the largest amax of the last `history_len` steps (Transformer Engine's
#               delayed scaling): nothing to reduce inside the step. The amaxes a step sees
#               are recorded and, at the step's end, reduced over every rank into the
#               history. The first step has no history and scales tensorwise.
#
# Every layout must compute the one-process run's scales, so an amax is reduced (max)
# over the ranks holding parts of its tensor: tp where the tensor is split over tp (a
# sharded weight, a row-parallel layer's input), cp, whose ranks hold other tokens of
# the same sequences. The max of a tensor every rank holds whole is harmless, so per
# tensor every amax is reduced over tp and cp; per row, only where the dimension summed
# over is split: over tp for a row-parallel layer's forward and a column-parallel layer's
# dgrad, over cp for wgrad (a sum over tokens).

FP8_RECIPES = ("delayed", "tensorwise", "rowwise")
FP8_GEMM_MULTIPLE = 16  # an FP8 GEMM's weight dimensions must be multiples of this
_X, _W, _DY = 0, 1, 2   # an FP8 linear's operands, in the rows of its amax history
_FORMATS = (kernels.FP8_E4M3, kernels.FP8_E4M3, kernels.FP8_E5M2)  # ... and their formats


@dataclass
class FP8Recipe:
    name: str = "delayed"
    history_len: int = 1024  # delayed: steps of amax history (Transformer Engine's default)
    margin: int = 0          # scales divided by 2^margin: headroom for a growing amax


class FP8Scaling:
    """The FP8 state of a model: its recipe and, for delayed scaling, an amax history for
    the three operands (x, W, dy) of every FP8 linear of the *whole* model (`names`, one
    row each, the same order on every rank). Reduced over all ranks each step, the table
    is identical everywhere, so a checkpoint stores it once, whatever the layout."""

    def __init__(self, recipe, names, device=None):
        self.recipe, self.names = recipe, list(names)
        self.step_amax = torch.zeros(len(self.names), 3, device=device)
        self.set_history(torch.zeros(len(self.names), 3, recipe.history_len, device=device), 0)

    def set_history(self, history, steps_recorded):
        """Install an amax history (newest first) and the scales it gives each operand."""
        self.history, self.steps_recorded = history, steps_recorded
        amax = history.max(dim=-1).values
        self.scales = torch.stack([kernels.fp8_scale(amax[:, op], fmt, self.recipe.margin)
                                   for op, fmt in enumerate(_FORMATS)], dim=1)

    @property
    def delayed(self):
        """Whether scales come from the history now (delayed scaling, after its first step)."""
        return self.recipe.name == "delayed" and self.steps_recorded > 0

    def record(self, slot, operand, amax):
        """An amax seen in this step (delayed scaling keeps the step's largest)."""
        if self.recipe.name == "delayed":
            self.step_amax[slot, operand] = torch.maximum(self.step_amax[slot, operand], amax)

    def end_step(self):
        """After a step's backward passes: the step's amaxes, reduced (max) over every rank
        (each holds only its own layers and shards), become the newest history entry."""
        if self.recipe.name != "delayed":
            return
        if dist.is_initialized():
            dist.all_reduce(self.step_amax, op=dist.ReduceOp.MAX)
        self.set_history(torch.cat([self.step_amax[..., None], self.history[..., :-1]], dim=-1),
                         self.steps_recorded + 1)
        self.step_amax.zero_()


@dataclass
class FP8Site:
    """One FP8 linear: its row of the scaling table and the groups its amaxes reduce over."""
    scaling: FP8Scaling
    slot: int
    tp_group: object
    cp_group: object
    split_in: bool  # its input features are split over tp (a row-parallel layer)


def _reduce_max(t, groups):
    for group in groups:
        all_reduce(t, group, op=dist.ReduceOp.MAX)
    return t


def _quantize_tensors(site, operands, record):
    """[(fp8 tensor, inverse scale)] of [(operand, tensor, dtype)], one scale per tensor:
    from the history (delayed), else from the amaxes now, reduced over tp and cp together."""
    scaling = site.scaling
    if scaling.delayed and not record:  # (evaluation: no amax to take)
        return [(kernels.fp8_quantize(t, scaling.scales[site.slot, op], dtype), 1 / scaling.scales[site.slot, op])
                for op, t, dtype in operands]
    amax = torch.stack([t.abs().amax().float() if t.numel() else t.new_zeros((), dtype=torch.float32)
                        for _, t, _ in operands])
    if scaling.delayed:
        scales = [scaling.scales[site.slot, op] for op, _, _ in operands]
    else:
        _reduce_max(amax, (site.tp_group, site.cp_group))
        scales = [kernels.fp8_scale(a, dtype, scaling.recipe.margin) for a, (_, _, dtype) in zip(amax, operands)]
    if record:
        for a, (op, _, _) in zip(amax, operands):
            scaling.record(site.slot, op, a)
    return [(kernels.fp8_quantize(t, s, dtype), 1 / s) for s, (_, t, dtype) in zip(scales, operands)]


def _quantize_rows(t, dtype, groups, margin):
    """(fp8 tensor, inverse scales (rows,)) of a 2-D tensor, one scale per row, its amax
    reduced over `groups` (where the row is split over their ranks)."""
    amax = t.abs().amax(dim=1, keepdim=True).float() if t.shape[1] else t.new_zeros(t.shape[0], 1)
    scale = kernels.fp8_scale(_reduce_max(amax, groups), dtype, margin)
    return kernels.fp8_quantize(t, scale, dtype), (1 / scale).reshape(-1)


class _FP8Linear(torch.autograd.Function):
    """x W^T with the forward, dgrad and wgrad matmuls in FP8; x (..., in), W (out, in)."""

    @staticmethod
    def forward(ctx, x, weight, site, training):
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        ctx.site, ctx.x_shape, ctx.x_dtype = site, x.shape, x.dtype
        x = x.reshape(-1, x.shape[-1])
        with torch.autocast(device, enabled=False):  # no bf16 inside the emulation's fp32 matmul
            if site.scaling.recipe.name == "rowwise":
                groups = (site.tp_group,) if site.split_in else ()
                xq, xs = _quantize_rows(x, kernels.FP8_E4M3, groups, site.scaling.recipe.margin)
                wq, ws = _quantize_rows(weight, kernels.FP8_E4M3, groups, site.scaling.recipe.margin)
                ctx.save_for_backward(x, weight)  # quantized along their other dimension there
            else:
                (xq, xs), (wq, ws) = _quantize_tensors(
                    site, [(_X, x, kernels.FP8_E4M3), (_W, weight, kernels.FP8_E4M3)],
                    record=training)
                ctx.save_for_backward(xq, xs, wq, ws)
            y = kernels.fp8_matmul(xq, wq, xs, ws, out_dtype)
        return y.view(*ctx.x_shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        site = ctx.site
        dy = dy.reshape(-1, dy.shape[-1])
        with torch.autocast(dy.device.type, enabled=False):
            if site.scaling.recipe.name == "rowwise":
                x, weight = ctx.saved_tensors
                margin = site.scaling.recipe.margin
                dgrad_groups = () if site.split_in else (site.tp_group,)  # sums over out features
                dyq, dys = _quantize_rows(dy, kernels.FP8_E5M2, dgrad_groups, margin)
                wtq, wts = _quantize_rows(weight.t(), kernels.FP8_E4M3, dgrad_groups, margin)
                dytq, dyts = _quantize_rows(dy.t(), kernels.FP8_E5M2, (site.cp_group,), margin)
                xtq, xts = _quantize_rows(x.t(), kernels.FP8_E4M3, (site.cp_group,), margin)
            else:
                xq, xs, wq, ws = ctx.saved_tensors
                (dyq, dys), = _quantize_tensors(site, [(_DY, dy, kernels.FP8_E5M2)], record=True)
                # Transposed copies: both operands of an FP8 GEMM are read along the summed dimension.
                wtq, wts, dytq, dyts, xtq, xts = wq.t().contiguous(), ws, dyq.t().contiguous(), dys, \
                    xq.t().contiguous(), xs
            dx = kernels.fp8_matmul(dyq, wtq, dys, wts, ctx.x_dtype) if ctx.needs_input_grad[0] else None
            dw = kernels.fp8_matmul(dytq, xtq, dyts, xts, torch.float32)
        return None if dx is None else dx.view(ctx.x_shape), dw, None, None


def linear(x, weight, bias=None, fp8=None):
    """F.linear(x, weight, bias), or with an FP8Site its matmuls in FP8 (the bias added in
    the output's dtype, as F.linear under autocast does)."""
    if fp8 is None:
        return F.linear(x, weight, bias)
    y = _FP8Linear.apply(x, weight, fp8, torch.is_grad_enabled())  # (no grad mode inside apply)
    return y if bias is None else y + bias.to(y.dtype)


# ----------------------------------------------------------------------------
# Tensor parallelism: Megatron's column/row-parallel layers, and sequence parallelism
# ----------------------------------------------------------------------------
# A transformer layer under tp: the input is made available to every tp rank
# (`enter_tp_region`), column-parallel layers compute a slice of the output features
# each (a slice of the heads, of the FFN width), row-parallel layers turn those slices
# into partial sums of the full output, and `leave_tp_region` adds the partial sums.
#
#   without sp: enter = identity (backward: all-reduce); leave = all-reduce (backward:
#               identity). Norms and residuals run on the full sequence on every rank.
#   with sp:    enter = all-gather the sequence (backward: reduce-scatter); leave =
#               reduce-scatter into sequence shards (backward: all-gather). Norms and
#               residuals run on 1/tp of the tokens: the same communication volume,
#               1/tp of their activation memory.
# Tensors are (batch, sequence, features); sp shards dimension 1.

def _gather_seq(x, group):
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _reduce_scatter_seq(x, group):
    parts = [p.contiguous() for p in x.chunk(dist.get_world_size(group), dim=1)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


def enter_tp_region(x, layout):
    """Before column-parallel layers: every tp rank needs the whole input (the result is
    marked so: see in_tp_region)."""
    if layout.tp == 1:
        return x
    return in_tp_region((_GatherSequence if layout.sp else _CopyToTP).apply(x, layout.tp_group))


def in_tp_region(x):
    """Mark x as whole on every tp rank, its gradient summed over tp on the way back: what
    enter_tp_region returns, or a tensor cut from it (the rows a mixture of experts hands
    each expert). Column-parallel linears refuse an input not so marked."""
    x.in_tp_region = True
    return x


class _Regather:
    """An sp-gathered input as the column-parallel linears reading it keep it for their
    weights' gradients: this rank's shard (each saves it), gathered again in backward once
    for all of them. The first reader's backward starts the all-gather and computes its
    input's gradient while it runs (Megatron's overlap); the last reader drops the
    gathered tensor, which would otherwise live as long as the graph (every layer's, until
    the whole backward ends)."""

    def __init__(self, group):
        self.group, self.readers, self.full, self.pending = group, 0, None, None

    def start(self, shard):
        if self.full is None and self.pending is None:
            parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(self.group))]
            self.pending = parts, dist.all_gather(parts, shard.contiguous(), group=self.group, async_op=True)

    def take(self):
        """The gathered input, for one reader (after start)."""
        if self.pending is not None:
            parts, work = self.pending
            work.wait()
            self.full, self.pending = torch.cat(parts, dim=1), None
        full, self.readers = self.full, self.readers - 1
        if self.readers == 0:
            self.full = None
        return full


class _ColumnLinearSavingShard(torch.autograd.Function):
    """y = x W^T + b for x gathered over sp from `shard`, saving the shard (1/tp of x's
    bytes) instead of x, as Megatron does: backward gathers it again for dW = dy^T x. dx
    flows back through the gather, whose backward reduce-scatters it."""

    @staticmethod
    def forward(ctx, x, weight, bias, shard, regather):
        ctx.save_for_backward(weight, shard)
        ctx.regather, ctx.has_bias = regather, bias is not None
        regather.readers += 1
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        weight, shard = ctx.saved_tensors
        ctx.regather.start(shard)
        dx = dy @ weight.to(dy.dtype)  # while the all-gather runs
        x = ctx.regather.take()
        dy2 = dy.reshape(-1, dy.shape[-1])
        dw = (dy2.t() @ x.reshape(-1, x.shape[-1]).to(dy2.dtype)).to(weight.dtype)
        db = dy2.sum(0) if ctx.has_bias else None
        return dx, dw, db, None, None


def linear_input(x, layout):
    """x as the column-parallel linears after it read it: under autocast cast once to the
    low precision, then whole on every tp rank (enter_tp_region): under tp a column-parallel
    linear refuses any other input. Left to autocast, each linear would cast, and save for
    its weight's gradient, a copy of its own (LLaMA's q, k and v: three copies of one
    activation); one cast serves them all. Cast before the gather, sp's all-gather moves
    half the bytes, and the gradients of the linears' inputs are summed (and reduced over
    tp) in that precision, as Megatron's are. Under sp the linears save this rank's shard
    of it, not the gathered input (see _ColumnLinearSavingShard)."""
    shard = autocast_input(x)
    full = enter_tp_region(shard, layout)
    if layout.tp > 1 and layout.sp:
        full.sp_shard, full.regather = shard, _Regather(layout.tp_group)
    return full


def autocast_input(x):
    """x in autocast's low precision where autocast is on (one copy, for several matmuls
    to share), else x itself."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(device))
    return x


def leave_tp_region(x, layout):
    """After a row-parallel layer: sum the partial outputs (into sequence shards under sp)."""
    if layout.tp == 1:
        return x
    return (_ReduceScatterSequence if layout.sp else _ReduceFromTP).apply(x, layout.tp_group)


def sequence_shard(x, layout):
    """This rank's tokens of a full-sequence tensor (B, T, ...) under sp; else all of it."""
    if layout.tp == 1 or not layout.sp:
        return x
    return x.chunk(layout.tp, dim=1)[layout.tp_rank]


def mark_partial_grad(*params):
    """These parameters are replicated over tp, but each tp rank computes only part of
    their gradient (a QK-norm acting on this rank's heads, a router weighting partial
    expert outputs): DataParallel sums them over tp. (Under sp, parameters outside the
    tensor-parallel layers are partial without being marked: see grad_is_partial.)"""
    for p in params:
        tags(p).partial_grad = True


def _shard(param, dim, layout, global_size, replicas=1):
    """Record that `param` is this rank's slice along `dim` of a tensor whose size
    there is `global_size` (the slice may include padding beyond it), held by `replicas`
    consecutive tp ranks."""
    shape = list(param.shape)
    shape[dim] = global_size
    offset = [0] * param.dim()
    offset[dim] = layout.tp_rank // replicas * param.shape[dim]
    t = tags(param)
    t.global_shape, t.global_offset, t.tp_sharded, t.tp_replicas = shape, offset, True, replicas


def tp_sharded_parameter(global_shape, dim, layout, name):
    """A parameter split over tp along `dim`, beside the column-parallel layer whose
    features it follows (a depthwise convolution's channels, a per-head decay)."""
    shape = list(global_shape)
    shape[dim] = _split(shape[dim], layout.tp, name)
    param = nn.Parameter(torch.empty(shape))
    _shard(param, dim, layout, global_shape[dim])
    return param


def sum_partials(x, group):
    """Sum partial results over `group` for a tensor every rank of it then uses in its
    own way (Mamba-1's x_proj: each rank's channels contribute to dt, B and C, and each
    rank's channels read all of them). Forward and backward are both an all-reduce:
    unlike after a row-parallel layer, the gradients arriving on each rank differ."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _CopyToTP.apply(_ReduceFromTP.apply(x, group), group)


def tp_replicas(tp, size, name):
    """How many tp ranks hold each of `size` heads: 1 where tp divides them; where they
    divide tp (tp beyond the KV heads: Qwen3-30B-A3B's 4 KV heads under tp 8), tp / size,
    each head then serving the query heads of that many consecutive ranks, as Megatron
    replicates them."""
    if size % tp == 0:
        return 1
    if tp % size == 0:
        return tp // size
    raise UsageError(f"{name}={size} and tp={tp} do not divide one another; choose a --tp that "
                     f"divides {name} or is a multiple of it")


def check_divisible(tp, **sizes):
    """Each named size must split evenly over tp ranks (heads, KV heads, FFN width)."""
    for name, size in sizes.items():
        _split(size, tp, name)


def _split(size, parts, what):
    if size % parts:
        raise UsageError(f"{what}={size} is not divisible by tp={parts}; choose a --tp that divides it")
    return size // parts


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with the *output* features split over tp. Every tp rank needs the
    whole input, and its gradient summed over tp: under tp, x must come through
    `linear_input` (or `enter_tp_region`), or this raises. `groups` > 1 fuses several
    projections of equal width (GPT's Q, K, V): the weight is (groups, out/groups, in)
    and each group is split separately, so a rank's slice is whole heads of each of Q, K
    and V. With `replicas` > 1 the output is split into tp / replicas slices, each held by
    that many consecutive ranks (KV heads fewer than tp: see tp_replicas)."""

    def __init__(self, in_features, out_features, layout, bias=False, groups=1, name="out_features",
                 replicas=1):
        super().__init__()
        self.layout, self.fp8 = layout, None  # fp8: an FP8Site under --precision fp8 (enable_fp8)
        per_group = out_features // groups
        local = _split(per_group, layout.tp // replicas, name)
        shape = (groups, local, in_features) if groups > 1 else (local, in_features)
        self.weight = nn.Parameter(torch.empty(shape))
        _shard(self.weight, self.weight.dim() - 2, layout, per_group, replicas)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(shape[:-1]))
            _shard(self.bias, self.bias.dim() - 1, layout, per_group, replicas)

    def forward(self, x):
        if self.layout.tp > 1 and not getattr(x, "in_tp_region", False):
            raise RuntimeError("tensor parallelism: a column-parallel linear's input must come through "
                               "parallel.linear_input (every tp rank needs the whole input, and its "
                               "gradient summed over tp)")
        bias = None if self.bias is None else self.bias.reshape(-1)
        weight = self.weight.reshape(-1, self.weight.shape[-1])
        if self.fp8 is None and hasattr(x, "sp_shard"):
            return _ColumnLinearSavingShard.apply(x, weight, bias, x.sp_shard, x.regather)
        return linear(x, weight, bias, self.fp8)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with the *input* features split over tp: each rank multiplies its
    slice of x (the output of a column-parallel layer) and the partial results are
    summed by `leave_tp_region`; the bias is added once, after the sum."""

    def __init__(self, in_features, out_features, layout, bias=False, name="in_features"):
        super().__init__()
        self.layout, self.fp8 = layout, None
        self.weight = nn.Parameter(torch.empty(out_features, _split(in_features, layout.tp, name)))
        _shard(self.weight, 1, layout, in_features)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def partial(self, x):
        """This rank's partial sum of the output (before the sum over tp)."""
        return linear(x, self.weight, fp8=self.fp8)

    def forward(self, x):
        y = leave_tp_region(self.partial(x), self.layout)
        return y if self.bias is None else y + self.bias


def enable_fp8(modules, recipe, layout, n_layers, high_precision_layers=1):
    """Run the column- and row-parallel linears of these model chunks' transformer layers
    in FP8, but for the first and last `high_precision_layers` of the model's `n_layers`.
    Returns their shared FP8Scaling. Collective: every rank learns the whole model's
    FP8 linears (the rows of the amax history)."""
    sites = {}
    for model in modules:
        for index, layer in model.layers.items():
            if high_precision_layers <= int(index) < n_layers - high_precision_layers:
                for name, m in layer.named_modules():
                    if isinstance(m, (ColumnParallelLinear, RowParallelLinear)):
                        sites[f"layers.{index}.{name}"] = m
    if not sites and n_layers <= 2 * high_precision_layers:
        raise UsageError(f"--fp8-bf16-layers {high_precision_layers} keeps all {n_layers} layers in "
                         f"higher precision, so nothing would run in FP8; lower it (0: every layer FP8)")
    problems = []
    for name, m in sites.items():
        out_features, in_features = m.weight.reshape(-1, m.weight.shape[-1]).shape
        if out_features % FP8_GEMM_MULTIPLE or in_features % FP8_GEMM_MULTIPLE:
            problems.append(f"--precision fp8: {name} has a {out_features} x {in_features} weight on "
                            f"each rank, and FP8 matmuls need multiples of {FP8_GEMM_MULTIPLE}; choose "
                            f"sizes (or --tp) that give them, or keep it in bf16 with --fp8-bf16-layers")
    everyone = [(sorted(sites), problems)]
    if dist.is_initialized():  # (every rank raises the same error: none is left waiting)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (sorted(sites), problems))
    problems = [p for _, rank_problems in everyone for p in rank_problems]
    if problems:
        raise UsageError(problems[0])
    names = set().union(*(rank_names for rank_names, _ in everyone))
    scaling = FP8Scaling(recipe, sorted(names), layout.device)
    slot = {name: i for i, name in enumerate(scaling.names)}
    for name, m in sites.items():
        # An expert under ep sees tokens gathered from its ep group, and its cp peers hold
        # other experts: only without ep do they hold the same expert on other tokens.
        cp_group = layout.cp_group if not tags(m.weight).expert or layout.ep == 1 else None
        m.fp8 = FP8Site(scaling, slot[name], layout.tp_group, cp_group, isinstance(m, RowParallelLinear))
    return scaling


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split over tp (an untied output layer's matrix,
    VocabParallelOutput, is split the same way). The vocabulary is padded to a multiple of
    tp (the padding rows are zero, never looked up, and excluded from the loss and from
    sampling). Each rank looks up the tokens in its range, zeros for the others, and
    `leave_tp_region` sums: every token's row comes from exactly one rank."""

    def __init__(self, vocab_size, dim, layout):
        super().__init__()
        self.layout, self.vocab_size = layout, vocab_size
        self.per_rank = -(-vocab_size // layout.tp)
        self.weight = nn.Parameter(torch.empty(self.per_rank, dim))
        _shard(self.weight, 0, layout, vocab_size)
        self.out_dtype = None  # the residual stream's, where it is not the weight's (set_residual_dtype)

    def forward(self, ids):
        if self.layout.tp == 1:
            x = F.embedding(ids, self.weight)
        else:
            start = self.layout.tp_rank * self.per_rank
            outside = (ids < start) | (ids >= start + self.per_rank)
            x = F.embedding((ids - start).masked_fill(outside, 0), self.weight)
            x = leave_tp_region(x.masked_fill(outside[..., None], 0.0), self.layout)
        return x if self.out_dtype is None else x.to(self.out_dtype)


def set_residual_dtype(modules, dtype):
    """The residual stream starts at the token embedding, in its weight's dtype (16-bit
    under mixed precision): here in `dtype` instead (fp32: Megatron's
    --fp32-residual-connection). What is added to it then keeps that dtype."""
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, VocabParallelEmbedding):
                sub.out_dtype = dtype


def gather_logits(logits, layout, vocab_size):
    """Full-vocabulary logits from the tp slices, padding dropped (for sampling, HF parity)."""
    if layout.tp > 1:
        parts = [torch.empty_like(logits) for _ in range(layout.tp)]
        dist.all_gather(parts, logits.contiguous(), group=layout.tp_group)
        logits = torch.cat(parts, dim=-1)
    return logits[..., :vocab_size]


# ----------------------------------------------------------------------------
# Context parallelism: zigzag sequence split and ring attention
# ----------------------------------------------------------------------------
# The sequence is cut into 2 * cp chunks and rank r keeps chunks r and 2cp - 1 - r
# ("zigzag"): under a causal mask early chunks attend to little and late chunks to
# much, so pairing them gives every rank the same work. Positions stay global (RoPE
# and learned positions see the true index); labels are split the same way, so the
# loss is still over every token of the sequence. Everything outside attention is
# per-token and needs no change; gradients of the (replicated) weights are summed
# over dp x cp by DataParallel.

def zigzag_positions(seq_len, layout, device=None):
    """Global positions of this cp rank's tokens, in its local order."""
    if layout.cp == 1:
        return torch.arange(seq_len, device=device)
    if seq_len % (2 * layout.cp):
        raise UsageError(f"sequence length {seq_len} is not divisible by 2*cp = {2 * layout.cp}, "
                         f"as context parallelism needs; change --seq-len or --cp")
    chunk, r = seq_len // (2 * layout.cp), layout.cp_rank
    first = torch.arange(r * chunk, (r + 1) * chunk, device=device)
    return torch.cat([first, first + (2 * layout.cp - 1 - 2 * r) * chunk])


def _rank_order(seq_len, layout, device=None):
    """Global positions of every cp rank's tokens, rank after rank: the order of a
    sequence gathered from the cp ranks."""
    return torch.cat([zigzag_positions(seq_len, Layout(cp=layout.cp, rank=r), device)
                      for r in range(layout.cp)])


def context_shard(x, layout, dim=1):
    """This cp rank's tokens (zigzag) of a full-sequence tensor."""
    if layout.cp == 1:
        return x
    return x.index_select(dim, zigzag_positions(x.shape[dim], layout, x.device))


def context_gather(x, layout, dim=1):
    """The whole sequence of a tensor of which each cp rank holds its zigzag share
    (the inverse of context_shard; no gradient). Used for decisions that need every
    token of a sequence in order, such as an expert's capacity."""
    if layout.cp == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(layout.cp)]
    dist.all_gather(parts, x.contiguous(), group=layout.cp_group)
    positions = _rank_order(x.shape[dim] * layout.cp, layout, x.device)
    gathered = torch.cat(parts, dim)
    return torch.empty_like(gathered).index_copy_(dim, positions, gathered)


# A sequence mixer that is not attention (Mamba's convolution and scan) needs every
# token of the sequence in order. Megatron's answer, used here: an all-to-all turns "my
# tokens of every head" into "every token of my share of the heads" before the mixer and
# back after it; each rank then scans whole sequences of 1/cp of the heads.

def _sequence_to_heads(x, layout):
    cp = layout.cp
    send = x.unflatten(2, (cp, -1)).movedim(2, 0).contiguous()   # [r] = my tokens of r's heads
    received = torch.empty_like(send)                             # [r] = r's tokens of my heads
    dist.all_to_all_single(received, send, group=layout.cp_group)
    in_rank_order = received.movedim(0, 1).flatten(1, 2)
    positions = _rank_order(in_rank_order.shape[1], layout, x.device)
    return in_rank_order.index_select(1, torch.argsort(positions))


def _heads_to_sequence(x, layout):
    cp = layout.cp
    positions = _rank_order(x.shape[1], layout, x.device)
    send = x.index_select(1, positions).unflatten(1, (cp, -1)).movedim(1, 0).contiguous()
    received = torch.empty_like(send)                             # [r] = my tokens of r's heads
    dist.all_to_all_single(received, send, group=layout.cp_group)
    return received.movedim(0, 2).flatten(2, 3)


class _SequenceToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        return _sequence_to_heads(x, layout)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_sequence(grad, ctx.layout), None


class _HeadsToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        return _heads_to_sequence(x, layout)

    @staticmethod
    def backward(ctx, grad):
        return _sequence_to_heads(grad, ctx.layout), None


def context_to_heads(x, layout):
    """(B, T/cp, cp * k, ...): this cp rank's tokens (zigzag) of all cp * k heads ->
    (B, T, k, ...): every token, in sequence order, of this rank's k heads (part r of
    dimension 2 goes to cp rank r)."""
    return x if layout.cp == 1 else _SequenceToHeads.apply(x, layout)


def heads_to_context(x, layout):
    """The inverse of context_to_heads: (B, T, k, ...) -> (B, T/cp, cp * k, ...)."""
    return x if layout.cp == 1 else _HeadsToSequence.apply(x, layout)


def context_heads(n, layout):
    """This cp rank's share of n heads (or channels), as context_to_heads hands them out:
    the slice of a per-head parameter that goes with them."""
    size = n // layout.cp
    return slice(layout.cp_rank * size, (layout.cp_rank + 1) * size)


def context_head_groups(heads, groups, layout):
    """Heads that read shared per-group inputs (Mamba-2's B and C: `heads` consecutive
    heads in `groups` groups), split over cp by context_to_heads: the groups each cp rank's
    heads read, one row per rank (a group serving heads of several ranks is in each row).
    A UsageError where cp does not split the heads, or splits a group's unevenly."""
    if heads % layout.cp:
        raise UsageError(f"heads per tp rank ({heads}) are not divisible by cp={layout.cp}; "
                         f"choose a --cp that divides them")
    per_group, per_rank = heads // groups, heads // layout.cp
    rows = [list(range(r * per_rank // per_group, ((r + 1) * per_rank - 1) // per_group + 1))
            for r in range(layout.cp)]
    if len({len(row) for row in rows}) > 1:
        raise UsageError(f"cp={layout.cp} splits the {per_group} heads of a group unevenly; choose "
                         f"a --cp that divides or is divided by heads per group")
    return rows


def groups_to_heads(x, rows, layout):
    """(B, T/cp, groups, ...) -> (B, T, rows[cp_rank], ...): every token of the groups this
    cp rank's heads read (rows: context_head_groups), as context_to_heads does for heads."""
    if layout.cp == 1:
        return x
    return context_to_heads(x.index_select(2, torch.tensor(rows, device=x.device).flatten()), layout)


def _merge(out, lse, block_out, block_lse):
    """Combine two partial softmax results over disjoint key sets."""
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    return (out * torch.exp(lse - safe)[..., None] + block_out * torch.exp(block_lse - safe)[..., None],
            new_lse)


def _block_could_attend(q_pos, k_pos, causal, window):
    """False when the mask hides the whole block: then it is skipped, not computed."""
    if causal and k_pos.min() > q_pos.max():
        return False
    if window is not None and k_pos.max() <= q_pos.min() - window:
        return False
    return True


class _RingPass(torch.autograd.Function):
    """Send a tensor to the next cp rank and receive the previous rank's. Backward:
    the gradient goes the other way round the ring (this is how dK and dV return)."""

    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        return _ring_exchange(x, layout, forward=True)

    @staticmethod
    def backward(ctx, grad):
        return _ring_exchange(grad, ctx.layout, forward=False), None


def _cp_peer(layout, offset):
    """Global rank of the cp rank `offset` places further round the ring."""
    return layout.rank + ((layout.cp_rank + offset) % layout.cp - layout.cp_rank) * layout.tp


def _ring_exchange(x, layout, forward):
    x = x.contiguous()
    out = torch.empty_like(x)
    to, frm = (_cp_peer(layout, 1), _cp_peer(layout, -1)) if forward else (_cp_peer(layout, -1), _cp_peer(layout, 1))
    ops = [dist.P2POp(dist.isend, x, to), dist.P2POp(dist.irecv, out, frm)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return out


def _checkpointed_block(q, k, v, q_pos, k_pos, causal, window, scale, key_padding_mask, documents):
    # Recomputed in backward instead of stored: memory per block is its inputs, not the
    # (queries x keys) score matrix (the FlashAttention trade, at block granularity).
    # The padding mask covers the whole sequence: the block's keys are its columns k_pos.
    # So do the documents, which positions index (positions_mask).
    key_real = None if key_padding_mask is None else key_padding_mask[:, k_pos]
    return torch.utils.checkpoint.checkpoint(kernels.attention_with_lse, q, k, v, q_pos, k_pos, causal,
                                             window, scale, key_real, documents, use_reentrant=False)


def ring_attention(q, k, v, positions, layout, causal=True, window=None, scale=None,
                   key_padding_mask=None, documents=None):
    """Attention of this cp rank's queries on the whole sequence's keys.

    q (B, H, T_local, D); k, v (B, Hkv, T_local, D): only the KV heads travel. In cp
    steps the K/V blocks go round the ring; at each step every rank attends its queries
    to the block it holds (skipping blocks the mask hides entirely) and merges the
    result by log-sum-exp. Each rank's positions are known from its ring index, so only
    K and V are sent; so is nothing of a padding mask or the documents, which every rank
    holds whole (B, T), as it holds the batch. Exact forward and backward (autograd
    through the ring).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = lse = None
    seq_len = len(positions) * layout.cp
    for step in range(layout.cp):
        owner = Layout(cp=layout.cp, tp=1, rank=(layout.cp_rank - step) % layout.cp)
        k_pos = zigzag_positions(seq_len, owner, q.device)
        if _block_could_attend(positions, k_pos, causal, window):
            out, lse = _merge(out, lse, *_checkpointed_block(q, k, v, positions, k_pos, causal,
                                                             window, scale, key_padding_mask, documents))
        if step < layout.cp - 1:
            k, v = _RingPass.apply(k, layout), _RingPass.apply(v, layout)
    return out.to(q.dtype)


class _AllGatherSequence(torch.autograd.Function):
    """All-gather along the sequence (dim 2) over cp; backward: reduce-scatter."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, grad):
        parts = [p.contiguous() for p in grad.chunk(dist.get_world_size(ctx.group), dim=2)]
        out = torch.empty_like(parts[0])
        dist.reduce_scatter(out, parts, group=ctx.group)
        return out, None


def allgather_attention(q, k, v, positions, layout, causal=True, window=None, scale=None,
                        key_padding_mask=None, documents=None):
    """The simple baseline: gather every rank's K/V (and know their positions), then
    attend locally. cp - 1 blocks received either way, but all at once in memory."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = (_AllGatherSequence.apply(t, layout.cp_group) for t in (k, v))
    k_pos = _rank_order(len(positions) * layout.cp, layout, q.device)
    out, _ = _checkpointed_block(q, k, v, positions, k_pos, causal, window, scale, key_padding_mask, documents)
    return out.to(q.dtype)


def context_attention(q, k, v, positions, layout, causal=True, window=None, key_padding_mask=None,
                      recompute=False, documents=None):
    """The attention call of the models: plain attention without cp, else ring (or
    all-gather, `--cp-comm allgather`) attention over the cp group. `positions`: where
    this rank's tokens sit in the sequence. `key_padding_mask` (B, T) is True on real
    tokens, `documents` (B, T) each token's document (--reset-attention-mask), both for the
    whole sequence (every cp rank holds them). `recompute`: scores recomputed in backward,
    not stored (selective recomputation; the cp paths checkpoint their blocks always)."""
    if layout.cp == 1:
        return kernels.attention(q, k, v, causal=causal, window=window, key_padding_mask=key_padding_mask,
                                 recompute=recompute, documents=documents)
    fn = ring_attention if layout.cp_comm == "ring" else allgather_attention
    return fn(q, k, v, positions, layout, causal, window, key_padding_mask=key_padding_mask, documents=documents)


# ----------------------------------------------------------------------------
# Expert parallelism: experts sharded over data-parallel ranks, all-to-all dispatch
# ----------------------------------------------------------------------------
# A mixture-of-experts layer sends each token to top_k of n_experts feed-forward
# networks. Under ep the experts are split over `ep` ranks that hold *different tokens*
# (ep groups are carved out of the dp x cp ranks: ep divides dp * cp), so each rank
# stores n_experts / ep of them, and the tokens travel instead:
#
#   route this rank's tokens -> sort the (token, expert) assignments by expert
#   -> all-to-all: each assignment to the rank holding its expert (variable sizes,
#      exchanged first) -> that rank runs its experts on what it received
#   -> all-to-all back (the exact reverse) -> weight by the router, sum per token
#
# With j = dp_cp_rank (cp fastest), the ep group of a rank is the `ep` consecutive
# values of j around it (same tp and pp coordinates), ep_rank = j % ep, and expert e
# lives on ep_rank e // (n_experts / ep), under its global name on every layout.
#
# Expert tensor parallelism (--etp, Megatron's expert grid). By default each expert is
# split over all tp ranks, as the dense MLP is. With etp < tp (etp dividing tp) it is
# split over etp of them, and the tp ranks form tp / etp groups, each routing its own
# 1/(tp/etp) of the micro-batch's tokens (every tp rank holds them all, after
# enter_tp_region: expert_tokens says which part) and adding zeros for the others, which
# leave_tp_region sums in. The ranks of a pipeline stage are then cut, in the order
# expert_index = tp_rank + tp * dp_cp_rank, into etp (fastest) x ep x expert replicas:
# ep can span the tp ranks etp leaves (etp 1, ep = tp: each tp rank holds whole experts
# of its own). With etp = tp this is the paragraph above.
#
# Gradients: the reverse all-to-all in backward brings each expert the gradients of
# every token it processed, from every rank of its ep group. The ranks with the same
# ep_rank and etp_rank in different ep groups hold the same expert slices: the
# expert-data-parallel group (tp * dp * cp / (etp * ep) ranks). DataParallel sums expert
# gradients there, and only there. Nothing here changes which tokens a rank holds, so
# the loss and the (reduced) gradients are those of one process holding every expert.

def expert_layout(layout):
    """The layout the experts' linear layers are split by: tp = etp, over the etp group
    (etp divides tp, so tp_rank, the rank modulo tp, is etp_rank)."""
    if layout.etp == layout.tp:
        return layout
    return dataclasses.replace(layout, tp=layout.etp, tp_group=layout.etp_group)


def expert_tokens(n_tokens, layout):
    """The slice of a micro-batch's n_tokens (which every tp rank holds: enter_tp_region)
    this rank's experts see. With etp = tp, all of them: every tp rank holds a slice of
    every expert. With etp < tp the tp ranks form tp / etp groups of etp ranks, each group
    the tokens of its 1/(tp/etp) (ep can then span the tp ranks)."""
    parts = layout.tp // layout.etp
    if n_tokens % parts:
        raise UsageError(f"--etp {layout.etp}: a micro-batch's {n_tokens} tokens do not split over "
                         f"tp/etp = {parts} groups of ranks; choose sizes that divide")
    size = n_tokens // parts
    start = layout.tp_rank // layout.etp * size
    return slice(start, start + size)


def gather_expert_tokens(t, layout):
    """Per-token values (n / (tp / etp), ...) of this rank's expert_tokens -> those of all n
    tokens, in token order (no gradient: the router's choices)."""
    if layout.etp == layout.tp:
        return t
    pieces = [torch.empty_like(t) for _ in range(layout.tp)]
    dist.all_gather(pieces, t.contiguous(), group=layout.tp_group)
    return torch.cat(pieces[::layout.etp])  # one rank of each group of etp


def local_experts(layout, n_experts):
    """Global indices of the experts this rank holds."""
    per_rank = n_experts // layout.ep
    return range(layout.ep_rank * per_rank, (layout.ep_rank + 1) * per_rank)


def mark_expert_parallel(*params):
    """These parameters belong to experts held by one rank of each ep group: their
    gradients are summed over the expert-data-parallel group only, and their norm over
    the ep group (each of its ranks holds different experts)."""
    for p in params:
        tags(p).expert = True


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable split sizes; backward is the reverse exchange
    (what was sent to rank r comes back from rank r, in the same order)."""

    @staticmethod
    def forward(ctx, x, send_sizes, recv_sizes, group):
        ctx.sizes, ctx.group = (send_sizes, recv_sizes), group
        return _all_to_all(x, send_sizes, recv_sizes, group)

    @staticmethod
    def backward(ctx, grad):
        send_sizes, recv_sizes = ctx.sizes
        return _all_to_all(grad, recv_sizes, send_sizes, ctx.group), None, None, None


def _all_to_all(x, send_sizes, recv_sizes, group):
    out = x.new_empty((sum(recv_sizes), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_sizes, send_sizes, group=group)
    return out


def moe_dispatch_combine(x, expert_ids, weights, experts, n_experts, layout, traffic=None):
    """sum_k weights[:, k] * expert_{expert_ids[:, k]}(x), the experts possibly on other ranks.

    x (N, dim): this rank's tokens; expert_ids (N, top_k): global expert indices, -1 for an
    assignment dropped by a capacity limit (it contributes 0); weights (N, top_k);
    `experts(rows, counts)`: this rank's experts (local_experts, in order) run on rows sorted
    by local expert, counts[i] rows for the i-th (a loop of dense matmuls, or one grouped
    matmul: mixtral.Experts; either way exactly the routed rows, no padding to the largest
    count, whose cost grows with the imbalance). Returns (N, dim). If given,
    `traffic` (a dict) gets "bytes_sent": what this rank sends to other ranks in the two
    exchanges of the forward (the backward sends as much again).
    """
    n_tokens, top_k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    token = torch.arange(n_tokens, device=x.device).repeat_interleave(top_k)
    # Assignments sorted by expert (stable: token order within each expert). Experts
    # are contiguous per rank, so this is also sorted by destination rank.
    kept = (flat >= 0).nonzero().squeeze(1)
    assignment = kept[torch.argsort(flat[kept], stable=True)]
    counts = torch.bincount(flat[kept], minlength=n_experts)  # rows per global expert
    rows = x[token[assignment]]

    if layout.ep == 1:
        out = experts(rows, counts)
    else:
        per_rank = n_experts // layout.ep
        # 1. Counts: recv[s, i] = rows rank s sends to my local expert i.
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=layout.ep_group)
        recv = recv.view(layout.ep, per_rank)
        send_sizes = counts.view(layout.ep, per_rank).sum(1).tolist()
        recv_sizes = recv.sum(1).tolist()
        if traffic is not None:
            me = layout.ep_rank  # rows to itself do not travel
            rows_out = sum(send_sizes) - send_sizes[me] + sum(recv_sizes) - recv_sizes[me]
            traffic["bytes_sent"] = rows_out * rows.shape[1] * rows.element_size()
        # 2. Tokens. They arrive grouped by source rank, then by local expert.
        received = _AllToAll.apply(rows, send_sizes, recv_sizes, layout.ep_group)
        # 3. Regroup by local expert, run the experts, restore the arrival order.
        local_id = torch.arange(per_rank, device=x.device).repeat(layout.ep)
        by_expert = torch.argsort(local_id.repeat_interleave(recv.reshape(-1)), stable=True)
        y = experts(received[by_expert], recv.sum(0))
        y = y[torch.argsort(by_expert)]
        # 4. Back to the ranks the tokens came from (the reverse exchange).
        out = _AllToAll.apply(y, recv_sizes, send_sizes, layout.ep_group)

    w = weights.reshape(-1)[assignment]
    return torch.zeros_like(x).index_add(0, token[assignment], (out * w[:, None]).to(x.dtype))


# ----------------------------------------------------------------------------
# Model chunks: a model cut into pipeline chunks; the output layer and loss
# ----------------------------------------------------------------------------
# Under pipeline parallelism the layers are cut into pp * vpp consecutive chunks; chunk c
# lives on pipeline rank c % pp (with vpp > 1 each rank holds vpp chunks, "virtual stages",
# taken round-robin as Megatron's interleaved schedule wants). The first chunk also holds
# the embedding, the last the final norm, the output layer and the loss.
#
# A model file writes the whole model and ends its __init__ with keep_chunk, which drops
# what its chunk does not hold; its forward takes the previous chunk's output (`hidden`)
# instead of embedding tokens, and a chunk before the last returns its hidden states.
# That is all a model knows of pipelines: sending and receiving happen in run_schedule.

def pipeline_chunks(n_layers, pp, vpp=1, layers_per_chunk=None):
    """Layer indices of each of the pp * vpp chunks, in model order."""
    n_chunks = pp * vpp
    if layers_per_chunk is None:
        if n_layers % n_chunks:
            raise UsageError(f"n_layers={n_layers} is not divisible by pp*vpp = {n_chunks}; "
                             f"choose --pp/--vpp that divide it, or list layers per stage with "
                             f"--pp-layers")
        layers_per_chunk = [n_layers // n_chunks] * n_chunks
    if len(layers_per_chunk) != n_chunks or sum(layers_per_chunk) != n_layers or min(layers_per_chunk) < 1:
        raise UsageError(f"--pp-layers {','.join(map(str, layers_per_chunk))}: need {n_chunks} "
                         f"positive counts (pp*vpp) that add up to n_layers={n_layers}")
    bounds = [sum(layers_per_chunk[:c]) for c in range(n_chunks + 1)]
    return [list(range(bounds[c], bounds[c + 1])) for c in range(n_chunks)]


@dataclass
class Chunk:
    """One model chunk of this rank: its global index and what it holds."""
    index: int
    layers: list
    first: bool  # holds the embedding
    last: bool   # holds the final norm, the output layer and the loss


def rank_chunks(layout, n_layers, layers_per_chunk=None):
    """The chunks this pipeline rank builds, in execution order."""
    all_chunks = pipeline_chunks(n_layers, layout.pp, layout.vpp, layers_per_chunk)
    return [Chunk(c, all_chunks[c], c == 0, c == len(all_chunks) - 1)
            for c in range(layout.pp_rank, len(all_chunks), layout.pp)]


def keep_chunk(model, chunk, first, last, tied_embedding=None, shared=()):
    """Turn `model`, whose __init__ built the whole model, into the pipeline `chunk` of it
    (None: keep the whole model). Its layers are `model.layers`, keyed by global index;
    `first` names the modules only the first chunk holds (the embedding), `last` those only
    the last one holds (final norm, output layer). With tied embeddings, `tied_embedding`
    names the embedding, which the last chunk keeps too, for its output layer: split over
    two stages, the two copies are tagged so that DataParallel sums their gradients (they
    stay equal) and only the first stage's is saved and counted. `shared` names parameters
    that every chunk holds (small ones that layers on several stages read: T5's position-bias
    tables), tagged likewise: gradients summed over all the copies. Sets `model.chunk`.

    Built on the meta device (models.build), the modules dropped here never had memory."""
    chunk = chunk or Chunk(0, [int(i) for i in model.layers], True, True)
    for i in list(model.layers):
        if int(i) not in chunk.layers:
            del model.layers[i]
    for name in first:
        if not chunk.first and not (chunk.last and name == tied_embedding):
            setattr(model, name, None)
    for name in last:
        if not chunk.last:
            setattr(model, name, None)
    if tied_embedding and chunk.first != chunk.last:
        t = tags(getattr(model, tied_embedding).weight)
        t.pp_tied, t.pp_tied_copy = True, chunk.last
    if not (chunk.first and chunk.last):  # several chunks, each with its own copy
        for name in shared:
            t = tags(getattr(model, name))
            t.pp_shared, t.pp_tied_copy = True, not chunk.first
    model.chunk = chunk
    return model


class VocabParallelOutput(nn.Module):
    """An untied output layer: a (vocabulary, dim) matrix of its own, split over tp as the
    embedding's is (VocabParallelEmbedding); called, output_layer over it."""

    def __init__(self, vocab_size, dim, layout):
        super().__init__()
        self.layout, self.vocab_size = layout, vocab_size
        self.weight = nn.Parameter(torch.empty(-(-vocab_size // layout.tp), dim))
        _shard(self.weight, 0, layout, vocab_size)

    def forward(self, x, labels=None):
        return output_layer(x, self.weight, labels, self.layout, self.vocab_size)


def language_model_output(model, x, labels, scale=None):
    """The end of a language model's forward, the same in each model file: a pipeline chunk
    before the last (`model.chunk`, from keep_chunk) returns its hidden states; the last
    applies the final norm (`model.norm`; times `scale` if given: T5 v1.0's tied output)
    and the output layer, `model.lm_head` or, tied (lm_head None), the embedding's matrix."""
    if not model.chunk.last:
        return x
    x = model.norm(x) if scale is None else model.norm(x) * scale
    if model.lm_head is not None:
        return model.lm_head(x, labels)
    return output_layer(x, model.embed.weight, labels, model.layout, model.cfg.vocab_size)


def output_layer(x, weight, labels, layout, vocab_size, bias=None):
    """The end of every language model here: a column-parallel layer over the (padded)
    vocabulary, whose weight may be the embedding's (tied). Without labels, the full
    logits (sampling, HF parity); with labels, the sum of the token losses over this
    rank's targets (under cp, its share of the sequence; labels -100 are not targets).

    The caller divides by the global count of target tokens, which makes the loss the
    exact mean over the global batch however it is split into ranks and micro-batches.
    """
    x = enter_tp_region(x, layout)
    if labels is None:
        return gather_logits(F.linear(x, weight, bias), layout, vocab_size)
    return vocab_parallel_cross_entropy(x, weight, context_shard(labels, layout), layout,
                                        vocab_size, bias)


def _vocab_all_reduce(layout):
    def tp_all_reduce(tensor, op):
        all_reduce(tensor, layout.tp_group, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tp_all_reduce


def vocab_parallel_cross_entropy(x, weight, labels, layout, vocab_size, bias=None):
    """Sum of the cross-entropies of x (tokens on every tp rank, after enter_tp_region)
    against labels, from `kernels.linear_cross_entropy`: chunked, so the logits of the
    whole batch never exist at once, and vocabulary-parallel, each rank holding its
    slice of the vocabulary (and of the bias) and the softmax needing only three numbers
    per token from the other ranks (max, sum of exponentials, target logit)."""
    return kernels.linear_cross_entropy(x, weight, labels, vocab_start=layout.tp_rank * weight.shape[0],
                                        vocab_size=vocab_size, all_reduce=_vocab_all_reduce(layout),
                                        bias=bias)


@torch.no_grad()
def vocab_parallel_hits(x, weight, labels, layout, vocab_size, bias=None):
    """How many of the tokens x (as for vocab_parallel_cross_entropy) give their label
    the largest logit: top-1 accuracy's numerator, with two numbers per token from the
    other tp ranks (the largest logit, and the label's logit from the rank holding it)."""
    logits = F.linear(x, weight, bias).float()
    start = layout.tp_rank * weight.shape[0]
    logits[:, max(0, vocab_size - start):] = float("-inf")  # vocabulary padding
    best = logits.max(dim=-1).values
    local = labels - start
    mine = (local >= 0) & (local < weight.shape[0])
    target = logits.gather(-1, local.clamp(0, weight.shape[0] - 1)[:, None])[:, 0]
    target = target.masked_fill(~mine, float("-inf"))
    reduce = _vocab_all_reduce(layout)
    reduce(best, "max")
    reduce(target, "max")
    return (target >= best).sum()


def vocab_parallel_bias(vocab_size, layout):
    """A bias over the vocabulary (BERT's output layer), split over tp and padded like the
    rows of VocabParallelEmbedding, whose logits it shifts."""
    bias = nn.Parameter(torch.empty(-(-vocab_size // layout.tp)))
    _shard(bias, 0, layout, vocab_size)
    return bias


# A sentence-level head (BERT's pooler and classifiers) reads one token per sequence, the
# first ([CLS], position 0). That token lives on cp rank 0 (zigzag chunk 0) and, under sp,
# only on tp rank 0's sequence shard. The ranks holding it compute the head; the others
# run it on no rows at all, which still gives its parameters a (zero) gradient, so the
# gradient hooks fire alike everywhere. The gradients then sum over dp x cp (and over tp
# under sp, as for any parameter) to exactly the holders' gradients.

def first_token(x, layout):
    """(B, dim): each sequence's first token of x (B, T_local, dim), on the ranks that
    hold position 0; elsewhere an empty (0, dim)."""
    holds = layout.cp_rank == 0 and (layout.tp == 1 or not layout.sp or layout.tp_rank == 0)
    return x[:, 0] if holds else x[:0, 0]


def share_first_token_sums(t, layout):
    """A sum computed from first_token (a loss, a count): under sp only tp rank 0 has it;
    summed over tp (forward only), every tp rank holds it, as it holds the token losses."""
    if layout.tp > 1 and layout.sp:
        return _ReduceFromTP.apply(t, layout.tp_group)
    return t


# ----------------------------------------------------------------------------
# Recomputation: attention cores or whole layers recomputed in backward
# ----------------------------------------------------------------------------
# Backward needs what the forward's ops saved; stored for every layer of every
# micro-batch in flight, that is most of a large model's memory. Recomputation
# (Korthikanti et al. 2022) stores less and runs part of the forward again in backward:
#
#   selective  the attention core only: its (queries x keys) scores and probabilities
#              are the largest activations at long sequences and the cheapest to redo
#              (no weights). Each attention module carries `recompute_core`, which it
#              passes to kernels.attention (directly, or through context_attention);
#              set here, never by a global switch. The Triton path (FlashAttention) and
#              ring attention under cp store no scores anyway, so nothing changes there.
#              Mamba's mixers have no attention: selective leaves them as they are
#              (their scans choose what to store themselves, see kernels.py).
#   full       whole layers: a checkpointed unit keeps only its input; everything inside
#              runs again in backward. Megatron's methods, per model chunk: "uniform"
#              cuts the chunk's layers into units of N consecutive layers, "block"
#              checkpoints the chunk's first N layers one by one and runs the rest as usual.
#
# Full recomputation is torch.utils.checkpoint, non-reentrant (autograd's saved-tensor
# hooks: parameters get their gradients in the usual way, so DataParallel's hooks fire
# as usual), with the RNG state of the forward restored for the recompute. The model
# files know nothing of it: apply_recompute replaces the `forward` of the layers in
# `model.layers` on the instance, so module names, and with them initialization and
# checkpoints, stay what they are (a wrapper module would rename every parameter). A
# unit of several layers runs them all from its first layer's forward; its other layers,
# already run, pass their input through. So every family's loop `x = layer(x, ...)`
# works unchanged, as long as a unit's layers take the same arguments: units never
# cross a change of layer class (T5's encoder -> decoder, where the encoder's final
# norm runs between them). Without gradients (evaluation, decoding) layers run as usual.
#
# Side effects. A recomputed forward must compute what the forward computed, and not do
# twice what it did once. It runs with the modules' plain attributes as the forward found
# them (Mixtral's running counts of the step's micro-batches, which later forwards have
# moved on since: a layer must rebind such an attribute, never change its tensor in
# place), and what it leaves on them (router losses, `kept`, traffic counts, which
# mixtral.py sums after the layers into model.extra_loss and router_stats) is put back as
# it was before the recompute, so the objective and the statistics are the forward's,
# counted once. FP8 amax recording is a max, which a second look at the same tensor leaves as
# it is; scales change only between steps. Collectives inside a layer (tp, sp, ep, cp)
# run again in the recompute; every rank of a group recomputes the same layer at the
# same point of the same schedule, so they still pair up.

RECOMPUTE_MODES = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")


def recompute_units(layers, n, method="uniform"):
    """The checkpointed units of a chunk's layers (a ModuleDict in model order): lists of
    layers, each run under one checkpoint. uniform: consecutive runs of n layers (the
    last may be shorter); block: the first n layers, one unit each. A unit never mixes
    layer classes."""
    layers = list(layers.values())
    if method == "block":
        return [[layer] for layer in layers[:n]]
    units = []
    for layer in layers:
        if units and len(units[-1]) < n and type(units[-1][0]) is type(layer):
            units[-1].append(layer)
        else:
            units.append([layer])
    return units


def apply_recompute(modules, mode, layers_per_unit=1, method="uniform"):
    """Turn on activation recomputation in these model chunks (the section's header
    says what each mode does). Call once, after building them."""
    if mode not in RECOMPUTE_MODES or method not in RECOMPUTE_METHODS:
        raise UsageError(f"recompute {mode!r}/{method!r}: choose a mode of {RECOMPUTE_MODES} "
                         f"and a method of {RECOMPUTE_METHODS}")
    for model in modules:
        if mode == "selective":
            for m in model.modules():
                if hasattr(m, "recompute_core"):
                    m.recompute_core = True
        elif mode == "full":
            for unit in recompute_units(model.layers, layers_per_unit, method):
                unit[0].forward = functools.partial(_checkpointed_unit, unit)
                for layer in unit[1:]:
                    layer.forward = functools.partial(_ran_with_unit, layer)


def _plain_forward(layer, *args, **kwargs):
    # The class's forward, not the instance's (or apply_compile's compiled copy of it).
    return getattr(layer, "compiled_forward", type(layer).forward)(layer, *args, **kwargs)


def _unit_forward(unit, x, *args, **kwargs):
    for layer in unit:
        x = _plain_forward(layer, x, *args, **kwargs)
    return x


def _checkpointed_unit(unit, x, *args, **kwargs):
    if not torch.is_grad_enabled():
        return _plain_forward(unit[0], x, *args, **kwargs)
    return torch.utils.checkpoint.checkpoint(
        _unit_forward, unit, x, *args, use_reentrant=False, preserve_rng_state=True,
        context_fn=functools.partial(_recompute_contexts, unit), **kwargs)


def _ran_with_unit(layer, x, *args, **kwargs):
    # The unit's first layer ran this one already; without gradients units are not used.
    return x if torch.is_grad_enabled() else _plain_forward(layer, x, *args, **kwargs)


def _recompute_contexts(unit):
    """(forward context, recompute context) for one checkpointed run of `unit`: the
    forward's notes the modules' plain attributes (not parameters, buffers or submodules,
    which live in underscored dicts) as it finds them; the recompute runs with those, and
    afterwards they are put back as they were before it."""
    modules = [m for layer in unit for m in layer.modules()]
    found = []

    @contextlib.contextmanager
    def forward():
        found.append(_plain_attributes(modules))
        yield

    @contextlib.contextmanager
    def recompute():
        now = _plain_attributes(modules)
        _set_plain_attributes(modules, found[0])
        try:
            yield
        finally:
            _set_plain_attributes(modules, now)
    return forward(), recompute()


def _plain_attributes(modules):
    return [{k: v for k, v in vars(m).items() if not k.startswith("_")} for m in modules]


def _set_plain_attributes(modules, attributes):
    for m, values in zip(modules, attributes):
        for k in [k for k in vars(m) if not k.startswith("_") and k not in values]:
            delattr(m, k)
        vars(m).update(values)


# ----------------------------------------------------------------------------
# Compilation: each layer compiled by torch.compile, the model around it eager
# ----------------------------------------------------------------------------
# torch.compile fuses a layer's elementwise work (norms, RoPE, SwiGLU, residual adds)
# into a few kernels around the matmuls. It is applied per layer, as torchtitan does,
# not to the whole model: every layer of a family has the same code and shapes, so one
# graph (and one compile) serves them all; the pipeline schedule, the data-parallel
# hooks and the output layer stay plain Python (the final norm before the output layer
# is compiled alone: its dozen elementwise passes over the residual stream become two);
# and what the compiler cannot trace (a collective, an expert dispatch with
# data-dependent sizes) breaks the graph there and runs eagerly, so every layout works
# as before. In place (Module.compile), so parameter names, and with them checkpoints,
# do not change. Under full recomputation the compiled code runs inside the checkpoint
# (torch.compile cannot trace a checkpoint given a context_fn, which _checkpointed_unit
# needs): call apply_recompute first.

def apply_compile(modules):
    """Compile each layer of these model chunks, and the final norm of the last, with
    torch.compile (see above)."""
    for model in modules:
        if getattr(model, "norm", None) is not None:
            model.norm.compile()
        for layer in model.layers.values():
            if "forward" in vars(layer):  # in a unit of apply_recompute: see _plain_forward
                layer.compiled_forward = torch.compile(type(layer).forward)
            else:
                layer.compile()


def compile_seconds():
    """Seconds this process has spent compiling so far (torch.compile's own accounting of
    its compilations: tracing, forward and backward graphs, code generation). Without a
    compilation torch._dynamo was never imported (1 s): 0 without importing it."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    return sum(dynamo.compilation_time_metrics.get("_compile.compile_inner", [])) if dynamo else 0.0


# ----------------------------------------------------------------------------
# Data parallelism: bucketed reduction overlapped with backward, ZeRO-1, AdamW
# ----------------------------------------------------------------------------

@dataclass
class Bucket:
    """Parameters whose gradients are reduced together, through one flat buffer."""
    params: list              # (name, parameter) in their order in the flat buffers
    grads: torch.Tensor       # every parameter's gradient accumulates into a view of this
    data: torch.Tensor        # each parameter's storage is a view into this (ZeRO-1 gathers into it)
    group: object             # the ranks holding replicas: dp x cp, or expert-data-parallel
    sharded: bool             # ZeRO-1: each replica reduces to, and updates, its own slice
    shard: slice              # the part of `data` this rank updates (all of it without ZeRO-1)
    grad_shard: torch.Tensor  # grads[shard]: where the reduced gradient of the shard lands
                              # (ZeRO-1 reduce-scatters in place, as Megatron's optimizer does)
    main: torch.Tensor        # the fp32 weights the optimizer updates: data[shard] itself in
                              # fp32 training; under mixed precision an fp32 copy of it
    norm_ranges: list         # (start, stop) in the shard of the elements that count in the
                              # gradient norm (see counts_once)
    expert: bool = False      # experts' parameters (reduced over their own group)
    deferred: str = None      # reduced in finish(): "embedding" (tied across the first and
                              # last stage) or "pipeline" (parameters every chunk holds)
    done: set = field(default_factory=set)  # ids of parameters whose gradient is final
    launched: bool = False    # its reduction started during backward ...
    handle: object = None     # ... and this is it, in flight


class DataParallel:
    """Hand-written DDP, with ZeRO-1 as an option, and Megatron's mixed precision.

    Every parameter's gradient accumulates into a view of one flat fp32 buffer per bucket
    (its .grad is that view, in fp32 training). Buckets are
    filled in reverse parameter order (roughly the order backward produces gradients);
    a post-accumulate-grad hook records each parameter whose gradient is final, and
    when a bucket is complete its reduction starts asynchronously while backward goes on
    computing earlier layers. `finish()` waits for all of them.

      plain DP: all-reduce each bucket; every rank then updates every parameter.
      ZeRO-1:   reduce-scatter each bucket, so rank r receives the summed gradient of
                its 1/dp slice only; the optimizer state exists only for that slice,
                the update runs on it, and the updated slices are all-gathered back
                into the parameters (which are views into a flat buffer too).

    Gradients are summed, not averaged: the loss is already divided by the global token
    count, so the sum over ranks is exactly the gradient of the global mean. Hooks act
    only while `sync` is on (run_schedule turns it on for each chunk's last backward of
    a step): during gradient accumulation nothing leaves the rank. Gradients that are
    partial over tp (grad_is_partial) are summed over tp first, exactly once each.

    Expert parameters (mark_expert_parallel) are replicated only over the
    expert-data-parallel group: they get buckets of their own, reduced (and ZeRO-sharded)
    over that group instead of dp x cp.

    Mixed precision (`param_dtype` bf16 or fp16, as Megatron's): the parameters the model
    computes with are 16-bit (no autocast copy of a weight is made), and the optimizer
    keeps fp32 main weights (`Bucket.main`), of its own slice only under ZeRO-1; after its
    step the updated slice is cast into the 16-bit parameters and all-gathered (half the
    bytes of fp32). Each backward's 16-bit gradient is added into the fp32 buffer and
    dropped (Megatron's main_grad), so accumulation and the reduction run in fp32, unless
    `grad_dtype` is the 16-bit one: then .grad is a view into a 16-bit buffer, as in fp32
    training, and the reduction moves half the bytes.
    """

    def __init__(self, modules, layout, zero1=False, bucket_mb=25.0, param_dtype=torch.float32,
                 grad_dtype=torch.float32):
        self.layout, self.zero1 = layout, zero1
        self.param_dtype, self.grad_dtype = param_dtype, grad_dtype
        self.grad_views = {}  # id(parameter) -> its gradient's view of its bucket's buffer
        modules = modules if isinstance(modules, (list, tuple)) else [modules]
        self.named_params = [(n, p) for m in modules for n, p in m.named_parameters()
                             if p.requires_grad]
        # Parameters with copies on several pipeline chunks (tied embeddings on the first
        # and last stage; parameters every chunk holds) get buckets of their own, reduced
        # in finish(): their copies' gradients must be summed over the pipeline first, and
        # that cannot wait inside a backward that feeds the pipeline.
        self.buckets = []
        for kind, tag in (("embedding", "pp_tied"), ("pipeline", "pp_shared")):
            copies = [(n, p) for n, p in self.named_params if getattr(tags(p), tag)]
            if copies:
                self.buckets.append(self._make_bucket(copies, deferred=kind))
        for expert in (False, True):
            bucket, size = [], 0
            for name, p in reversed(self.named_params):
                if tags(p).pp_tied or tags(p).pp_shared or tags(p).expert != expert:
                    continue
                bucket.append((name, p))
                size += p.numel()
                if size * 4 >= bucket_mb * 2**20:
                    self.buckets.append(self._make_bucket(bucket))
                    bucket, size = [], 0
            if bucket:
                self.buckets.append(self._make_bucket(bucket))
        self.sync = True
        self.hooks = [p.register_post_accumulate_grad_hook(self._make_hook(b))
                      for b in self.buckets for _, p in b.params]

    def grad(self, p):
        """Parameter p's gradient as accumulated so far: its view of the bucket's buffer."""
        return self.grad_views[id(p)]

    def close(self):
        """Remove the gradient hooks (call when training ends). The cycle parameter ->
        hook -> self -> parameter is not always visible to Python's garbage collector
        (autograd also owns the parameters, from C++), so without this the model and its
        process groups live until the interpreter exits, and tearing gloo down that late
        can abort the process after a run that otherwise succeeded."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def _make_bucket(self, named, deferred=None):
        layout = self.layout
        expert = tags(named[0][1]).expert and layout.separate_experts
        if expert:
            group, replicas, rank = layout.expert_dp_group, layout.expert_dp, layout.expert_dp_rank
        else:
            group, replicas, rank = layout.dp_cp_group, layout.dp_cp, layout.dp_cp_rank
        sharded = self.zero1 and replicas > 1
        numel = sum(p.numel() for _, p in named)
        padded = -(-numel // replicas) * replicas  # ZeRO slices must be equal
        device = named[0][1].device
        grads = torch.zeros(padded, device=device, dtype=self.grad_dtype)
        main = torch.zeros(padded, device=device)  # fp32, as the parameters were initialized
        offset = 0
        for _, p in named:
            n = p.numel()
            main[offset:offset + n] = p.detach().reshape(-1)
            self.grad_views[id(p)] = grads[offset:offset + n].view_as(p)
            offset += n
        data = main if self.param_dtype == torch.float32 else main.to(self.param_dtype)
        offset = 0
        for _, p in named:
            # The parameter's storage becomes the flat buffer (ZeRO all-gathers into it).
            # Where the gradient has the parameter's dtype, autograd accumulates into an
            # existing .grad in place, so its view stays a view; otherwise the hook adds it.
            p.data = data[offset:offset + p.numel()].view_as(p)
            p.grad = self.grad_views[id(p)] if self.grad_dtype == self.param_dtype else None
            offset += p.numel()
        shard = slice(rank * (padded // replicas), (rank + 1) * (padded // replicas)) if sharded \
            else slice(0, padded)
        return Bucket(params=named, grads=grads, data=data, group=group, sharded=sharded, shard=shard,
                      grad_shard=grads[shard], main=main[shard] if data is main else main[shard].clone(),
                      expert=expert, deferred=deferred,
                      norm_ranges=shard_ranges(named, shard, lambda _, p: counts_once(p, layout)))

    def _make_hook(self, bucket):
        def hook(param):
            if self.grad_dtype != self.param_dtype:  # mixed precision: into the fp32 buffer
                self.grad(param).add_(param.grad)
                param.grad = None
            if not self.sync:
                return
            self._sum_partial_grad(param)
            bucket.done.add(id(param))
            if len(bucket.done) == len(bucket.params) and not bucket.deferred:
                bucket.handle, bucket.launched = self._reduce(bucket, async_op=True), True
        return hook

    def _sum_partial_grad(self, param):
        if grad_is_partial(param, self.layout):
            all_reduce(self.grad(param), self.layout.tp_group)
        elif tags(param).tp_replicas > 1:
            sum_over_replicas(self.grad(param), tags(param).tp_replicas, self.layout)

    def _reduce(self, bucket, async_op):
        if bucket.group is None:
            return None
        if bucket.sharded:
            return reduce_scatter_single(bucket.grad_shard, bucket.grads,
                                         group=bucket.group, async_op=async_op)
        return dist.all_reduce(bucket.grads, group=bucket.group, async_op=async_op)

    def finish(self):
        """Wait for every bucket's reduction (call after the last backward of a step).
        A bucket not launched during backward is reduced here: the tied embeddings'
        (summed over the embedding group first), and one with a parameter whose gradient
        no synchronized backward finalized (a branch unused this step), so that every
        rank issues the same collectives; what its hooks did not sum over tp is summed now."""
        for b in self.buckets:
            if b.launched:
                if b.handle is not None:
                    b.handle.wait()
            else:
                for _, p in b.params:
                    if id(p) not in b.done:
                        self._sum_partial_grad(p)
                if b.deferred == "embedding":
                    all_reduce(b.grads, self.layout.embedding_group)
                elif b.deferred == "pipeline":
                    self._sum_pipeline_copies(b)
                self._reduce(b, async_op=False)
            b.done, b.launched, b.handle = set(), False, None

    def _sum_pipeline_copies(self, bucket):
        """Give every copy of a parameter that every chunk holds the sum of all copies'
        gradients: of this rank's chunks (with vpp it holds several), then over pp."""
        copies = {}
        for name, p in bucket.params:
            copies.setdefault(name, []).append(p)
        for same in copies.values():
            total = sum(self.grad(p) for p in same)
            for p in same:
                self.grad(p).copy_(total)
        all_reduce(bucket.grads, self.layout.pp_group)

    def check_tp_replicas(self):
        """A model file's two obligations under tp, checked after a step's backward (train.py:
        the first): every parameter replicated over tp must end with the same gradient on
        every tp rank. One that differs read an input that skipped linear_input (whose
        backward sums the input's gradient over tp), or is computed from this rank's part
        only without being marked so (mark_partial_grad). Collective over tp; raises a
        RuntimeError naming the parameters (the same on every rank)."""
        named = [(name, p) for b in self.buckets for name, p in b.params if not tags(p).tp_sharded]
        if self.layout.tp == 1 or not named:
            return
        prints = torch.stack([torch.stack([self.grad(p).double().sum(), self.grad(p).double().square().sum()])
                              for _, p in named])
        high = all_reduce(prints.clone(), self.layout.tp_group, dist.ReduceOp.MAX)
        low = -all_reduce(-prints, self.layout.tp_group, dist.ReduceOp.MAX)
        differ = ((high - low).abs() > 1e-3 * torch.maximum(high.abs(), low.abs()) + 1e-30).any(dim=1)
        if differ.any():
            names = [name for (name, _), d in zip(named, differ.tolist()) if d]
            raise RuntimeError(f"tensor parallelism: the gradient of {', '.join(names)} differs "
                               f"between tp ranks, though the parameter is the same on each: an "
                               f"input of the column-parallel linears skipped parallel.linear_input, "
                               f"or a parameter that sees only this rank's heads is not marked "
                               f"(parallel.mark_partial_grad)")

    def zero_grad(self):
        for b in self.buckets:
            b.grads.zero_()

    def all_gather_params(self):
        """After the optimizer updated each bucket's fp32 main slice: into the parameters
        (a cast under mixed precision), and under ZeRO-1 every rank's slice to every rank."""
        for b in self.buckets:
            if b.data.dtype != b.main.dtype:  # mixed precision: the 16-bit copy
                b.data[b.shard].copy_(b.main)
            if b.sharded:
                all_gather_single(b.data, b.data[b.shard].clone(), group=b.group)


def sum_over_replicas(grad, replicas, layout):
    """Sum a tp shard's gradient over the `replicas` consecutive tp ranks that hold it (each
    computed it for its own query heads): every rank puts its gradient in its shard's slot
    of a tensor of all tp / replicas shards, one all-reduce over tp sums each slot over its
    holders, and each rank takes its slot back. (A process group per set of replicas would
    move less, but would have to exist before the model says it needs one.)"""
    slot = layout.tp_rank // replicas
    slots = grad.new_zeros(layout.tp // replicas, *grad.shape)
    slots[slot] = grad
    all_reduce(slots, layout.tp_group)
    grad.copy_(slots[slot])


def shard_ranges(named, shard, keep):
    """Where in a bucket's `shard` (a slice of its flat buffer) the parameters that
    `keep(name, param)` selects lie, as merged (start, stop) pairs of shard positions:
    a rule per parameter (decay it, count it in the norm) that costs no memory per element."""
    ranges, offset = [], 0
    for name, p in named:
        start, stop = max(offset, shard.start) - shard.start, min(offset + p.numel(), shard.stop) - shard.start
        offset += p.numel()
        if start >= stop or not keep(name, p):
            continue
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], stop)
        else:
            ranges.append((start, stop))
    return ranges


class AdamW:
    """AdamW on the flat buffers of a DataParallel: each rank updates its own slice of
    every bucket (the whole bucket without ZeRO-1): its fp32 main weights (Bucket.main),
    with fp32 moments.

    No weight decay on norms, biases and embeddings: only on weight matrices (dim >= 2)
    whose name does not contain "embed".
    """

    def __init__(self, ddp, lr, weight_decay, betas=(0.9, 0.95), eps=1e-8):
        self.ddp, self.lr, self.weight_decay, self.betas, self.eps = ddp, lr, weight_decay, betas, eps
        self.steps = 0
        self.exp_avg = [torch.zeros_like(b.main) for b in ddp.buckets]
        self.exp_avg_sq = [torch.zeros_like(b.main) for b in ddp.buckets]
        self.decayed = [shard_ranges(b.params, b.shard, lambda name, p: p.dim() >= 2 and "embed" not in name)
                        for b in ddp.buckets]  # per bucket: where in its slice weight decay applies

    @torch.no_grad()
    def step(self):
        self.steps += 1
        beta1, beta2 = self.betas
        bias1, bias2 = 1 - beta1 ** self.steps, 1 - beta2 ** self.steps
        for b, m, v, decayed in zip(self.ddp.buckets, self.exp_avg, self.exp_avg_sq, self.decayed):
            param, grad = b.main, b.grad_shard.float()
            for start, stop in decayed:
                param[start:stop].mul_(1 - self.lr * self.weight_decay)
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            param.addcdiv_(m, (v / bias2).sqrt_().add_(self.eps), value=-self.lr / bias1)
        self.ddp.all_gather_params()

    # Checkpoints store the moments per parameter, whole: layout-free. Under ZeRO-1 the
    # slices are all-gathered first (a transient full-size copy on each dp rank).
    def _full(self, flat_states):
        fulls = []
        for b, state in zip(self.ddp.buckets, flat_states):
            if b.sharded:
                full = torch.empty(b.grads.shape, dtype=state.dtype, device=state.device)
                all_gather_single(full, state, group=b.group)
                state = full
            fulls.append(state)
        return fulls

    def _per_parameter(self, flat_states):
        """{param name: its part of each bucket's (gathered) flat state}, shaped like it."""
        out = {}
        for b, state in zip(self.ddp.buckets, self._full(flat_states)):
            offset = 0
            for name, p in b.params:
                out[name] = state[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
        return out

    @property
    def mixed(self):
        """Whether the parameters are 16-bit copies of the fp32 main weights."""
        return any(b.data.dtype != b.main.dtype for b in self.ddp.buckets)

    def state_tensors(self):
        """{param name: {"exp_avg": ..., "exp_avg_sq": ...}, and under mixed precision "model":
        the fp32 main weights}, each tensor shaped like its parameter. Collective under
        ZeRO-1 (the slices are gathered)."""
        states = {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}
        if self.mixed:
            states["model"] = [b.main for b in self.ddp.buckets]
        per = {key: self._per_parameter(flat) for key, flat in states.items()}
        return {name: {key: per[key][name] for key in states} for name in per["exp_avg"]}

    def load_state_tensors(self, read_into, steps):
        """`read_into(name, key, tensor)` fills an fp32 tensor shaped like the parameter
        (key "exp_avg", "exp_avg_sq", and under mixed precision "model": the weights, which
        then go into the 16-bit parameters too)."""
        self.steps = steps
        for b, m, v in zip(self.ddp.buckets, self.exp_avg, self.exp_avg_sq):
            flats = [(m, "exp_avg"), (v, "exp_avg_sq")] + ([(b.main, "model")] if b.data.dtype != b.main.dtype
                                                           else [])
            for flat, key in flats:
                full = torch.zeros(b.grads.shape, device=flat.device)
                offset = 0
                for name, p in b.params:
                    read_into(name, key, full[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
                flat.copy_(full[b.shard])
                if key == "model":
                    b.data.copy_(full)


# ----------------------------------------------------------------------------
# Gradient norm: clipping and fp16 loss scaling, agreed across ranks
# ----------------------------------------------------------------------------

def clip_grad_norm(ddp, max_norm):
    """Clip gradients by their global L2 norm and return that norm (before clipping).

    Each element is counted exactly once: ZeRO slices are summed over their bucket's
    group, experts over ep and etp (each rank of those holds others), tp shards over tp,
    pipeline stages over pp; what counts_once excludes (copies replicated over tp, the last
    stage's copy of tied embeddings) is left out.
    """
    layout = ddp.layout
    dense, experts = torch.zeros((), device=layout.device), torch.zeros((), device=layout.device)
    for b in ddp.buckets:
        square = sum(b.grad_shard[start:stop].float().pow(2).sum() for start, stop in b.norm_ranges)
        if b.expert:
            experts += square
        else:
            dense += square
    if ddp.zero1:  # each rank holds a slice of each bucket (or all of it: group None)
        all_reduce(dense, layout.dp_cp_group)
    if layout.separate_experts:  # expert buckets exist only then (else experts count as dense)
        if ddp.zero1:
            all_reduce(experts, layout.expert_dp_group)
        all_reduce(experts, layout.ep_group)
        all_reduce(experts, layout.etp_group)
    all_reduce(dense, layout.tp_group)
    total = dense + experts
    all_reduce(total, layout.pp_group)
    norm = total.sqrt()
    if max_norm and max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for b in ddp.buckets:
            b.grad_shard.mul_(scale)
    return norm


class LossScaler:
    """Dynamic loss scaling for fp16: multiply the loss so small gradients do not
    underflow, divide the gradients back, skip the step (and halve the scale) when any
    rank saw inf/nan, double the scale after `growth_interval` clean steps."""

    def __init__(self, enabled, scale=2.0**16, growth_interval=1000):
        self.enabled, self.scale, self.growth_interval = enabled, scale, growth_interval
        self.clean_steps = 0

    def unscale_and_check(self, ddp):
        """Divide the gradients by the scale; True if they are finite on every rank."""
        if not self.enabled:
            return True
        bad = torch.zeros((), device=ddp.layout.device)
        for b in ddp.buckets:
            b.grad_shard.div_(self.scale)
            bad += (~torch.isfinite(b.grad_shard)).sum()
        all_reduce_world(bad, ddp.layout)  # (expert buckets included)
        finite = bad.item() == 0
        if finite:
            self.clean_steps += 1
            if self.clean_steps % self.growth_interval == 0:
                self.scale *= 2
        else:
            self.scale, self.clean_steps = self.scale / 2, 0
        return finite


# ----------------------------------------------------------------------------
# Pipeline schedules
# ----------------------------------------------------------------------------
# A schedule is a list of actions ("F" or "B", micro-batch, local chunk) per rank. Running
# it: a forward receives its input activation from the previous chunk's rank and sends
# its output to the next; a backward receives the output's gradient from the next and
# sends the input's gradient back. Sends are asynchronous; receives wait.
#
# Messages carry a tag, (direction, micro-batch, chunk), and gloo matches a receive to the
# send with its tag. NCCL ignores tags: between two ranks it matches sends and receives in
# the order they are issued (all messages have the same shape, so a mismatch would pass
# the wrong activation silently). So every schedule here must make each rank send to a
# peer in exactly the order that peer receives from it; tests/test_pipeline_parallel.py
# simulates every schedule and checks this, pair by pair.

def schedule_gpipe(n_micro, layout):
    """All forwards, then all backwards (GPipe): simple, but every micro-batch's
    activations are alive at once."""
    return [("F", m, 0) for m in range(n_micro)] + [("B", m, 0) for m in range(n_micro)]


def schedule_1f1b(n_micro, layout):
    """1F1B (PipeDream-flush): rank r runs pp - r - 1 warm-up forwards, then alternates
    one forward and one backward, then drains the backwards. Same bubble as GPipe, but
    at most pp - r micro-batches of activations are alive."""
    warmup = min(layout.pp - layout.pp_rank - 1, n_micro)
    actions = [("F", m, 0) for m in range(warmup)]
    for i in range(n_micro - warmup):
        actions += [("F", warmup + i, 0), ("B", i, 0)]
    return actions + [("B", m, 0) for m in range(n_micro - warmup, n_micro)]


def schedule_interleaved_1f1b(n_micro, layout):
    """Interleaved 1F1B (Megatron): each rank holds vpp chunks; micro-batches move
    through them in groups of pp, which cuts the bubble by vpp at the cost of vpp
    times more point-to-point messages. Needs n_micro to be a multiple of pp."""
    pp, vpp, rank = layout.pp, layout.vpp, layout.pp_rank
    if n_micro % pp:
        raise UsageError(f"the interleaved schedule needs the number of micro-batches "
                         f"({n_micro}) to be a multiple of pp={pp}; change --global-batch-size "
                         f"or --micro-batch-size")
    total = n_micro * vpp

    def unit(k, backward):
        """The k-th forward (or backward) of this rank: (micro-batch, local chunk)."""
        group, within = divmod(k, pp * vpp)
        chunk = within // pp
        return group * pp + within % pp, (vpp - 1 - chunk) if backward else chunk

    warmup = min((pp - rank - 1) * 2 + (vpp - 1) * pp, total)
    actions = [("F", *unit(k, False)) for k in range(warmup)]
    for i in range(total - warmup):
        actions += [("F", *unit(warmup + i, False)), ("B", *unit(i, True))]
    return actions + [("B", *unit(k, True)) for k in range(total - warmup, total)]


SCHEDULES = {"gpipe": schedule_gpipe, "1f1b": schedule_1f1b, "interleaved": schedule_interleaved_1f1b}


def bubble_fraction(schedule, n_micro, layout):
    """Idle fraction of a step in theory: (pp - 1) / (m * v + pp - 1) with v = vpp for
    the interleaved schedule and 1 otherwise."""
    v = layout.vpp if schedule == "interleaved" else 1
    return (layout.pp - 1) / (n_micro * v + layout.pp - 1)


def _tag(direction, micro, chunk):
    return (micro * 1024 + chunk) * 2 + direction


def run_schedule(actions, chunks, modules, micro_batches, layout, hidden_shape, ddp=None,
                 loss_scale=1.0, autocast=None, forward_only=False, hidden_dtype=torch.float32):
    """Execute a pipeline schedule for one step; return the sum of the micro-batches'
    loss sums (non-zero only on the rank holding the last chunk).

    `modules[i]` is the model of `chunks[i]`, called as model(**micro_batches[m],
    hidden=...): a micro-batch is a dict of the model's inputs, at least `input_ids` and
    `labels` (which only the last chunk uses; models add their own, such as BERT's
    attention_mask). Each chunk gets all of it. Backward starts from
    loss_sum * loss_scale (the caller passes 1 / global target count, times the fp16
    loss scale). A chunk may leave `model.extra_loss` after its forward (Mixtral's
    router losses, in the loss sum's units): it joins the objective on that chunk's rank.
    With pp = 1 the schedule is just F0 B0 F1 B1 ... without messages.

    Gradient reduction (`ddp`): a chunk's gradients are complete after its last backward
    of the step, so that backward, and only that one, runs with ddp.sync on; its buckets'
    reductions then overlap with the backwards still to come. Earlier backwards only
    accumulate: nothing leaves the rank during gradient accumulation.

    What chunks send each other (activations forward, their gradients back) travels in
    `hidden_dtype`, the residual stream's (as Megatron's p2p messages do).
    """
    autocast = autocast or contextlib.nullcontext()
    stored, sends, total = {}, [], torch.zeros((), device=layout.device)
    last_backward = {local: i for i, (kind, _, local) in enumerate(actions) if kind == "B"}

    def recv(direction, micro, chunk, src):
        buf = torch.empty(hidden_shape, device=layout.device, dtype=hidden_dtype)
        dist.recv(buf, src, tag=_tag(direction, micro, chunk))
        return buf

    def send(tensor, direction, micro, chunk, dst):
        sends.append(dist.isend(tensor.contiguous(), dst, tag=_tag(direction, micro, chunk)))

    for i, (kind, micro, local_chunk) in enumerate(actions):
        if forward_only and kind == "B":
            continue
        chunk = chunks[local_chunk]
        model = modules[local_chunk]
        if kind == "F":
            hidden = None
            if not chunk.first:  # from the previous chunk, on the previous rank
                hidden = recv(0, micro, chunk.index - 1, layout.pp_prev).requires_grad_(not forward_only)
            with torch.no_grad() if forward_only else contextlib.nullcontext(), autocast:
                out = model(**micro_batches[micro], hidden=hidden)
            if chunk.last:
                total += out.detach()
            else:
                send(out.detach().to(hidden_dtype), 0, micro, chunk.index, layout.pp_next)
            if not forward_only:
                stored[(micro, chunk.index)] = (hidden, out, getattr(model, "extra_loss", None))
        else:
            hidden, out, extra = stored.pop((micro, chunk.index))
            if ddp is not None:
                ddp.sync = i == last_backward[local_chunk]
            if chunk.last:
                ((out if extra is None else out + extra) * loss_scale).backward()
            else:
                grad = recv(1, micro, chunk.index + 1, layout.pp_next).to(out.dtype)
                if extra is None:
                    torch.autograd.backward(out, grad)
                else:  # None: the scalar's gradient is 1
                    torch.autograd.backward([out, extra * loss_scale], [grad, None])
            if not chunk.first:
                send(hidden.grad, 1, micro, chunk.index, layout.pp_prev)
    if ddp is not None:
        ddp.sync = True
    for handle in sends:
        handle.wait()
    return total


# ----------------------------------------------------------------------------
# Local ranks: N processes on one machine, for tests and benchmarks
# ----------------------------------------------------------------------------

class _Failed(str):
    """A rank's traceback, sent back instead of its result."""


_READY = "ready"  # what each rank sends once it has joined the world


def _rank_main(rank, world, port, jobs, results):
    """One process of LocalRanks: join the gloo world, then run jobs until told to stop."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results.put((rank, _READY))
    for fn, kwargs in iter(jobs.get, None):
        try:
            results.put((rank, fn(**kwargs)))
        except BaseException:
            results.put((rank, _Failed(traceback.format_exc())))
    dist.destroy_process_group()


class LocalRanks:
    """`world` CPU processes joined by gloo, kept alive to run one job after another on
    every rank, so that many layouts (a test's) or modes (a benchmark's) pay for starting
    processes once. Each job sees a default process group of `world` ranks: init_distributed
    makes its layout's groups inside it, and destroy_distributed removes them again.

        with LocalRanks(4) as ranks:
            results = ranks.run(fn, x=1)   # {rank: fn(x=1) on that rank}

    `fn` must be importable by name (a module-level function). If a rank raises, or a job
    runs past `timeout` seconds, every process is killed (none is left waiting in a
    collective) and run() raises with the failing rank's traceback.
    """

    def __init__(self, world, timeout=300):
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        self.world, self.timeout, self.ready = world, timeout, False
        self.results = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(world)]
        self.procs = [ctx.Process(target=_rank_main, args=(r, world, port, self.jobs[r], self.results),
                                  daemon=True) for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, fn, **kwargs):
        if not self.procs:
            raise RuntimeError("these ranks were closed (an earlier job failed)")
        if not self.ready:  # starting the processes does not count against the job's time
            self._collect(120, "starting")
            self.ready = True
        for jobs in self.jobs:
            jobs.put((fn, kwargs))
        return self._collect(self.timeout, fn.__name__)

    def _collect(self, timeout, what):
        """{rank: result} once every rank has answered; kill them all on a failure."""
        out, start = {}, time.monotonic()
        try:
            while len(out) < self.world:
                try:
                    rank, result = self.results.get(timeout=1)
                except queue.Empty:
                    dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                    if dead:
                        raise RuntimeError(f"rank {dead[0]} of {self.world} died (exit code "
                                           f"{self.procs[dead[0]].exitcode})") from None
                    if time.monotonic() - start > timeout:
                        raise TimeoutError(f"{what} did not finish on {self.world} ranks in "
                                           f"{timeout} s") from None
                    continue
                if isinstance(result, _Failed):
                    raise RuntimeError(f"rank {rank} of {self.world} failed:\n{result}")
                out[rank] = result
        except BaseException:
            self.kill()  # no rank is left waiting in a collective
            raise
        return out

    def kill(self):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.join()
        self.procs = []

    def close(self):
        """Let every process leave cleanly (or kill it after 30 s)."""
        for jobs in self.jobs[:len(self.procs)]:
            jobs.put(None)
        for p in self.procs:
            p.join(timeout=30)
        self.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_ranks(world, fn, **kwargs):
    """Run fn(**kwargs) once on `world` fresh ranks: {rank: its return value}."""
    with LocalRanks(world) as ranks:
        return ranks.run(fn, **kwargs)
