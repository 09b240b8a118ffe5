"""Parallelism written by hand over torch.distributed.

This file holds every piece of distributed machinery the models and train.py use.
Each section is one concept and can be read (and copied) alone:

  1. Errors meant for the user
  2. The layout: how `world = tp * cp * dp * pp` ranks are arranged and grouped
  3. Layout-independent initialization: the same global weights whatever the layout
  4. Data parallelism: bucketed gradient all-reduce overlapped with backward
  5. Loss and gradient-norm helpers that must agree across ranks

Rank order follows Megatron: tp varies fastest, then cp, then dp, then pp, so
tensor-parallel peers (which talk the most) sit on the same node.
"""
import datetime
import os
import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F


# ----------------------------------------------------------------------------
# 1. Errors meant for the user
# ----------------------------------------------------------------------------

class UsageError(ValueError):
    """Bad input from the user (flags, paths, layouts). train.py prints its message
    as one line and exits with status 2, instead of a traceback."""


# ----------------------------------------------------------------------------
# 2. The layout
# ----------------------------------------------------------------------------

@dataclass
class Layout:
    """Where this process sits in the (pp, dp, cp, tp) grid, and its process groups.

    A group is None when its axis has size 1 (nothing to communicate), and every
    helper below treats None as "single process on this axis".
    """
    tp: int = 1
    cp: int = 1
    dp: int = 1
    pp: int = 1
    ep: int = 1
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: object = None
    cp_group: object = None
    dp_group: object = None
    pp_group: object = None

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
    def is_main(self):
        """Rank 0 prints, logs and writes the checkpoint index."""
        return self.rank == 0

    def describe(self):
        return (f"world={self.world} tp={self.tp} cp={self.cp} dp={self.dp} pp={self.pp} "
                f"ep={self.ep} device={self.device}")


def check_layout(world, tp=1, cp=1, pp=1, ep=1):
    """Return dp for this world size, or raise UsageError naming the fix."""
    for name, size in (("tp", tp), ("cp", cp), ("pp", pp), ("ep", ep)):
        if size < 1:
            raise UsageError(f"--{name} must be >= 1, got {size}")
    model_parallel = tp * cp * pp
    if world % model_parallel:
        raise UsageError(f"world size {world} is not divisible by tp*cp*pp = {tp}*{cp}*{pp} = "
                         f"{model_parallel}; launch a multiple of {model_parallel} processes "
                         f"(torchrun --nproc-per-node) or change --tp/--cp/--pp")
    dp = world // model_parallel
    if (dp * cp) % ep:
        raise UsageError(f"--ep {ep} must divide dp*cp = {dp}*{cp} = {dp * cp}")
    return dp


def _ranks_along(axis, layout_sizes):
    """All groups of ranks that differ only in `axis` ('tp', 'cp', 'dp' or 'pp')."""
    order = ("tp", "cp", "dp", "pp")  # fastest first
    sizes = [layout_sizes[a] for a in order]
    strides = [1]
    for s in sizes[:-1]:
        strides.append(strides[-1] * s)
    a = order.index(axis)
    world = strides[-1] * sizes[-1]
    groups = []
    for base in range(world):
        if (base // strides[a]) % sizes[a] == 0:  # the member with coordinate 0 on `axis`
            groups.append([base + i * strides[a] for i in range(sizes[a])])
    return groups


def init_distributed(tp=1, cp=1, pp=1, ep=1, device=None, timeout_minutes=10):
    """Set up the process groups from torchrun's environment (RANK, WORLD_SIZE, ...),
    or a single process when launched with plain `python`.

    CUDA + NCCL when a GPU is present, CPU + gloo otherwise; `device` forces one.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dp = check_layout(world, tp, cp, pp, ep)

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    layout = Layout(tp=tp, cp=cp, dp=dp, pp=pp, ep=ep, rank=rank, device=device)
    if world == 1:
        return layout

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    sizes = {"tp": tp, "cp": cp, "dp": dp, "pp": pp}
    for axis in ("tp", "cp", "dp", "pp"):
        if sizes[axis] == 1:
            continue
        # new_group is collective: every rank creates every group, in the same order.
        for ranks in _ranks_along(axis, sizes):
            group = dist.new_group(ranks)
            if rank in ranks:
                setattr(layout, f"{axis}_group", group)
    return layout


def destroy_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce(tensor, group, op=dist.ReduceOp.SUM):
    """In-place all-reduce that is a no-op on a size-1 axis."""
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


# ----------------------------------------------------------------------------
# 3. Layout-independent initialization
# ----------------------------------------------------------------------------

def init_parameters(module, seed, std_for):
    """Fill every parameter of `module` so that the *global* weights depend only on
    (seed, parameter name), never on the layout.

    Each tensor is drawn whole from its own generator keyed by (seed, name); a rank
    holding a shard would then keep its slice. Names must therefore be global (models
    key their layers by global index, so layer 7 is `layers.7` on every stage).
    `std_for(name)` gives the normal std of matrices and embeddings; biases start at
    zero and the other 1-D parameters (the gains of norms) at one.
    """
    for name, param in module.named_parameters():
        with torch.no_grad():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1:
                param.fill_(1.0)
            else:
                gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                full = torch.empty(param.shape, dtype=torch.float32)
                full.normal_(0.0, std_for(name), generator=gen)
                param.copy_(full)


# ----------------------------------------------------------------------------
# 4. Data parallelism: bucketed all-reduce overlapped with backward
# ----------------------------------------------------------------------------

class DataParallel:
    """Hand-written DDP.

    Every parameter's .grad is a view into one flat buffer per bucket. Buckets are
    filled in reverse parameter order (roughly the order backward produces them); a
    post-accumulate-grad hook counts the parameters of a bucket as their gradients
    land, and when a bucket is complete its all-reduce starts asynchronously while
    backward keeps computing earlier layers. `finish()` waits for them all.

    Gradients are summed, not averaged: the loss is already divided by the global
    token count, so the sum over ranks is exactly the gradient of the global mean.

    On gradient-accumulation micro-steps call `backward` inside `no_sync()`: no
    communication happens, gradients just accumulate in the buffers.
    """

    def __init__(self, module, group, bucket_mb=25.0):
        self.group = group
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.buckets = []  # each: dict(params, buffer, ready, handle)
        bucket, size = [], 0
        limit = int(bucket_mb * 2**20 / 4)
        for p in reversed(self.params):
            bucket.append(p)
            size += p.numel()
            if size >= limit:
                self._add_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            self._add_bucket(bucket)
        self.sync = True
        if group is not None:
            for b in self.buckets:
                for p in b["params"]:
                    p.register_post_accumulate_grad_hook(self._make_hook(b))

    def _add_bucket(self, params):
        device = params[0].device
        buffer = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=device)
        offset = 0
        for p in params:
            # Autograd accumulates into an existing .grad in place, so the views stay views.
            p.grad = buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.buckets.append({"params": params, "buffer": buffer, "ready": 0, "handle": None})

    def _make_hook(self, bucket):
        def hook(param):
            if not self.sync:
                return
            bucket["ready"] += 1
            if bucket["ready"] == len(bucket["params"]):
                bucket["handle"] = dist.all_reduce(bucket["buffer"], group=self.group, async_op=True)
        return hook

    class _NoSync:
        def __init__(self, ddp):
            self.ddp = ddp

        def __enter__(self):
            self.ddp.sync = False

        def __exit__(self, *exc):
            self.ddp.sync = True

    def no_sync(self):
        return self._NoSync(self)

    def finish(self):
        """Wait for every bucket's all-reduce (call after the last backward of a step)."""
        if self.group is None:
            return
        for b in self.buckets:
            if b["handle"] is None:
                # A parameter got no gradient this step (unused branch); reduce anyway so
                # every rank issues the same collectives.
                dist.all_reduce(b["buffer"], group=self.group)
            else:
                b["handle"].wait()
            b["handle"], b["ready"] = None, 0

    def zero_grad(self):
        for b in self.buckets:
            b["buffer"].zero_()


# ----------------------------------------------------------------------------
# 5. Loss and gradient norm
# ----------------------------------------------------------------------------

def cross_entropy_sum(logits, labels):
    """Sum of token losses (labels == -100 ignored). The caller divides by the global
    count of target tokens, which makes the loss the exact mean over the global batch
    however it is split into ranks and micro-batches."""
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(),
                           ignore_index=-100, reduction="sum")


def clip_grad_norm(params, max_norm, layout):
    """Clip gradients by their global L2 norm and return that norm (before clipping).

    After the data-parallel all-reduce every dp rank holds identical gradients, so
    the local norm is already the global one; sharded axes add their reduction here.
    """
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.zeros((), device=layout.device)
    for g in grads:
        total += g.detach().float().pow(2).sum()
    norm = total.sqrt()
    if max_norm and max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale)
    return norm
