"""`python train.py ... --plan`: memory.py's prediction for train.py's flags, nothing trained.

The flags are read and checked as training checks them (flags.py); the layout, batch,
precision and recomputation they name go to memory.plan; the answer is printed per stage
in GiB, with the step time at a GPU's datasheet peak and, given --device-memory-gb, whether
it fits and the fewest changes that would make it fit.
"""
import copy
import itertools

import flags
import memory
import metrics
import models
import parallel
from errors import UsageError



def for_flags(args, cfg):
    """memory.plan of the layout, batch, precision and recompute these flags name; (stages, world)."""
    world = args.world_size or parallel.world_size()
    dp = parallel.check_layout(world, args.tp, args.cp, args.pp, args.ep, args.etp)
    mbs = flags.micro_batch_size(args, dp)
    precision = args.precision if args.precision != "auto" else "bf16"
    return memory.plan(models.family(args.model), cfg, world=world, tp=args.tp, cp=args.cp, pp=args.pp,
                       ep=args.ep, etp=args.etp, vpp=args.vpp, sp=args.sp, zero1=args.zero1,
                       layers_per_chunk=flags.pp_layers(args), schedule=args.pp_schedule, micro_batch=mbs,
                       n_micro=flags.micro_steps(args, dp), seq_len=args.seq_len,
                       precision="fp32" if precision == "fp32" else "bf16", recompute=args.recompute,
                       recompute_n=args.recompute_layers or 1,
                       recompute_method=args.recompute_method or "uniform", grad_dtype=args.grad_dtype,
                       fp32_residual=args.fp32_residual), world


# Changes --plan tries when a layout does not fit: one at a time, then two or three together.
# tp stays within a node's 8 GPUs (its all-reduces need NVLink; beyond, Megatron adds pp).
TP_WITHIN_NODE = 8
PLAN_KNOBS = (("--tp x2", lambda a: {"tp": a.tp * 2} if a.tp * 2 <= TP_WITHIN_NODE else None), ("--pp x2", lambda a: {"pp": a.pp * 2}),
              ("--recompute selective", lambda a: {"recompute": "selective"}),
              ("--recompute full", lambda a: {"recompute": "full"}),
              ("--micro-batch-size 1", lambda a: {"micro_batch_size": 1}),
              ("--zero1", lambda a: {"zero1": True}))


def report(args):
    """`train.py --plan`: the flags checked as training checks them, then the plan, in GiB."""
    if args.world_size is not None and args.world_size < 1:
        raise UsageError(f"--world-size must be >= 1, got {args.world_size}")
    if not 0 < args.plan_mfu <= 1:
        raise UsageError(f"--plan-mfu must be in (0, 1], got {args.plan_mfu}")
    if args.device_memory_gb is not None and args.device_memory_gb <= 0:
        raise UsageError(f"--device-memory-gb must be > 0, got {args.device_memory_gb}")
    cfg, tokenizer, _, _ = flags.model_config(args)
    flags.check_args(args, cfg, tokenizer)
    stages, world = for_flags(args, cfg)
    # metrics.peak_flops's order: --peak-tflops, else a GPU's datasheet (--plan-gpu: the
    # device is not here to be asked its name)
    gpu = getattr(args, "plan_gpu", None) or "H100"
    if args.peak_tflops:
        peak, source = args.peak_tflops * 1e12, "--peak-tflops"
    elif gpu in metrics.GPU_PEAK_FLOPS:
        peak, source = metrics.GPU_PEAK_FLOPS[gpu], f"{gpu} bf16 datasheet (--plan-gpu)"
    else:
        raise UsageError(f"--plan-gpu {gpu}: unknown; choose from "
                         f"{', '.join(metrics.GPU_PEAK_FLOPS)} or give --peak-tflops")
    family = models.family(args.model)
    dp = world // (args.tp * args.cp * args.pp)
    precision = "fp32" if args.precision == "fp32" else "bf16"
    text = (f"plan of {args.model} ({args.config or flags.DEFAULT_CONFIG}) on {world} ranks: tp {args.tp}"
            f"{' (sp)' if args.sp and args.tp > 1 else ''} x cp {args.cp} x pp {args.pp}"
            f"{f' (vpp {args.vpp})' if args.vpp > 1 else ''} x dp {dp}{f', ep {args.ep}' if args.ep > 1 else ''}"
            f"{f', etp {args.etp}' if (args.etp or args.tp) != args.tp else ''}"
            f"{', ZeRO-1' if args.zero1 and dp * args.cp > 1 else ''} | micro-batch "
            f"{flags.micro_batch_size(args, dp)} x {args.seq_len} tokens, {flags.micro_steps(args, dp)} per step "
            f"and rank | {precision}{' (fp32 gradients)' if precision == 'bf16' and args.grad_dtype == 'fp32' else ''}"
            f" | recompute {args.recompute}\n")
    step_flops = memory.flops_per_step(family, cfg, args.seq_len, args.global_batch_size)
    schedule = "interleaved" if args.vpp > 1 else args.pp_schedule
    bubble = parallel.bubble_fraction(schedule, flags.micro_steps(args, dp), parallel.Layout(pp=args.pp, vpp=args.vpp))
    text += memory.describe(stages, step_flops=step_flops, world=world, peak_flops=peak, mfu=args.plan_mfu,
                            peak_source=source, recompute=args.recompute, bubble=bubble,
                            causal_flops=memory.flops_per_step(family, cfg, args.seq_len, args.global_batch_size,
                                                               causal_half=True))
    if args.device_memory_gb:
        limit = args.device_memory_gb * 1e9
        need = memory.peak_bytes(stages)
        fits = "fits" if need <= limit else "does not fit"
        text += (f"\n{fits}: peak {need / memory.GB:.2f} GiB {'<=' if need <= limit else '>'} "
                 f"{limit / memory.GB:.2f} GiB (--device-memory-gb {args.device_memory_gb:g})")
        if need > limit:
            text += advice(args, cfg, tokenizer, limit)
    return text


def advice(args, cfg, tokenizer, limit):
    """What would make a layout fit `limit` bytes: each change of PLAN_KNOBS that does alone,
    or if none does, the fewest changes together that do (the smallest peak of those)."""
    def peak_with(knobs):
        other = copy.copy(args)
        for _, change in knobs:
            changed = change(other)
            if changed is None:  # (a change not worth advising)
                return None
            vars(other).update(changed)
        try:
            flags.check_args(other, cfg, tokenizer)
            return memory.peak_bytes(for_flags(other, cfg)[0])
        except UsageError:  # (a layout these flags cannot take)
            return None
    for size in (1, 2, 3):
        fitting = []
        for knobs in itertools.combinations(PLAN_KNOBS, size):
            need = peak_with(knobs)
            if need is not None and need <= limit:
                fitting.append((need, " ".join(name for name, _ in knobs)))
        if fitting:
            return "".join(f"\n  would fit with {what}: peak {need / memory.GB:.2f} GiB"
                           for need, what in (sorted(fitting) if size == 1 else sorted(fitting)[:1]))
    return "\n  no combination of up to three of " + ", ".join(name for name, _ in PLAN_KNOBS) + " fits"
