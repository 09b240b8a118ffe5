"""Train a model: `torchrun train.py --model llama` (or `python train.py ...`, one process).

One step, for every layout:
  1. draw the global batch of this step from (seed, step); this data-parallel rank
     takes its rows, split into micro-batches of --micro-batch-size;
  2. forward + backward each micro-batch, its loss divided by the global number of
     target tokens, so the summed gradients are those of the global mean loss;
     gradients are all-reduced (bucketed, overlapped) only after the last micro-batch;
  3. clip by the global gradient norm, AdamW step with warmup + cosine learning rate.
Every layout therefore follows the single-process loss curve.
"""
import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import time

import torch

import checkpoint
import convert
import data
import generate
import models
import parallel
from parallel import UsageError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a language model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", required=True, help=f"one of: {', '.join(models.MODELS)}")
    a("--config", default="tiny", help="preset of the model file (tiny, test, llama3-8b, gpt2, ...)")
    a("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    a("--tp", type=int, default=1, help="tensor-parallel size")
    a("--pp", type=int, default=1, help="pipeline-parallel size")
    a("--cp", type=int, default=1, help="context-parallel size")
    a("--ep", type=int, default=1, help="expert-parallel size")
    a("--vpp", type=int, default=1, help="virtual pipeline stages per rank (interleaved 1F1B)")
    a("--pp-schedule", choices=["1f1b", "gpipe"], default="1f1b",
      help="pipeline schedule (with --vpp > 1 always interleaved 1F1B)")
    a("--pp-layers", default=None, metavar="N,N,...",
      help="layers per pipeline chunk (pp*vpp counts), for an uneven split")
    a("--cp-comm", choices=["ring", "allgather"], default="ring",
      help="context parallelism: ring attention, or all-gather K/V (the simple baseline)")
    a("--sp", action=argparse.BooleanOptionalAction, default=True,
      help="sequence parallelism (only meaningful with --tp > 1)")
    a("--zero1", action=argparse.BooleanOptionalAction, default=True,
      help="ZeRO-1: shard optimizer state over data-parallel ranks")
    a("--moe-capacity-factor", type=float, default=None,
      help="mixture of experts: each expert keeps at most factor x its even share of a "
           "micro-batch's choices, dropping the rest (default: the preset's, 0 = dropless)")
    a("--moe-aux-loss-coef", type=float, default=None,
      help="mixture of experts: load-balancing loss coefficient (default: the preset's)")
    a("--moe-z-loss-coef", type=float, default=None,
      help="mixture of experts: router z-loss coefficient (default: the preset's)")
    a("--steps", type=int, default=200)
    a("--warmup-steps", type=int, default=20)
    a("--lr-decay-steps", type=int, default=None, help="cosine decay length (default: --steps)")
    a("--lr", type=float, default=2e-3, help="peak learning rate")
    a("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of --lr")
    a("--weight-decay", type=float, default=0.1)
    a("--adam-eps", type=float, default=1e-8)
    a("--clip-grad", type=float, default=1.0, help="max global gradient norm (0: off)")
    a("--global-batch-size", type=int, default=16, help="sequences per optimizer step")
    a("--micro-batch-size", type=int, default=None,
      help="sequences per forward pass (default: global batch / dp, no accumulation)")
    a("--seq-len", type=int, default=256)
    a("--seed", type=int, default=1337)
    a("--precision", choices=["auto", "fp32", "bf16", "fp16", "fp8"], default="auto",
      help="auto: bf16 on CUDA, fp32 on CPU")
    a("--device", choices=["auto", "cpu", "cuda"], default="auto")
    a("--data", default="stdlib", help="stdlib (built in), a text file/folder/glob, or a prepared dir")
    a("--tokenizer", default="byte",
      help="byte, gpt2, cl100k_base, o200k_base, or hf:DIR (a Hugging Face tokenizer.json)")
    a("--save", default=None, metavar="DIR", help="checkpoint root")
    a("--save-every", type=int, default=0, help="also save every N steps (always at the end)")
    a("--load", default=None, metavar="DIR",
      help="resume: a save root (newest step) or a step dir; or hf:DIR to fine-tune a Hugging "
           "Face model (its config replaces --config, its tokenizer.json the default tokenizer)")
    a("--metrics", default=None, metavar="FILE", help="append JSON lines, one per step")
    a("--wandb", default=None, metavar="PROJECT", help="log to Weights & Biases")
    a("--log-every", type=int, default=10)
    a("--eval-every", type=int, default=100, help="validation loss every N steps (0: only at the end)")
    a("--eval-batches", type=int, default=4)
    a("--sample-tokens", type=int, default=300, help="tokens to sample at the end (0: none)")
    a("--peak-tflops", type=float, default=None,
      help="per-device peak for MFU (default: known GPUs, or a measured matmul on CPU)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------
# Optimizer, schedule, precision
# ----------------------------------------------------------------------------

def lr_at(step, args):
    """Linear warmup to --lr over --warmup-steps, then cosine decay to min_lr_ratio * lr."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    decay_steps = args.lr_decay_steps or args.steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, decay_steps - args.warmup_steps))
    ratio = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr * ratio


def precision_context(precision, device):
    """Autocast for the forward pass; master weights and optimizer stay fp32."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# Dense bf16 tensor-core peaks (FLOP/s) of common GPUs, for MFU.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12,
                  "A800": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device, args):
    """Per-device peak FLOP/s for MFU: --peak-tflops, else the GPU's datasheet, else (CPU)
    a measured fp32 matmul so that MFU still says how busy the cores are."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)
    a = torch.randn(2048, 2048)  # large enough to reach the BLAS library's full speed
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best


def memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # peak RSS


# ----------------------------------------------------------------------------
# Setup checks
# ----------------------------------------------------------------------------

# The smallest value each numeric flag accepts (None: the flag's default applies).
FLAG_MINIMUM = {"steps": 1, "global_batch_size": 1, "micro_batch_size": 1, "seq_len": 1,
                "vpp": 1, "lr_decay_steps": 1, "log_every": 1, "eval_batches": 1,
                "warmup_steps": 0, "save_every": 0, "eval_every": 0, "sample_tokens": 0,
                "lr": 0, "min_lr_ratio": 0, "weight_decay": 0, "clip_grad": 0}


def check_flags(args):
    """Refuse numeric flags no run can use, before anything starts (every rank alike)."""
    for name, minimum in FLAG_MINIMUM.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    if args.min_lr_ratio > 1:
        raise UsageError(f"--min-lr-ratio is a fraction of --lr: between 0 and 1, got {args.min_lr_ratio}")
    for name in ("adam_eps", "peak_tflops"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def check_batch(args, layout):
    """Micro-batches per step, after checking that the batch divides over dp."""
    gbs, dp = args.global_batch_size, layout.dp
    if gbs % dp:
        raise UsageError(f"--global-batch-size {gbs} is not divisible by dp={dp}")
    mbs = args.micro_batch_size or gbs // dp
    if (gbs // dp) % mbs:
        raise UsageError(f"--global-batch-size {gbs} is not divisible by micro-batch-size x dp "
                         f"= {mbs} x {dp}")
    return gbs // dp // mbs


def check_save_root(args, start_step):
    """Never overwrite a user's checkpoints: a save root may hold only steps we resume from.
    And find out now, not after training, that the root cannot be written."""
    if os.path.exists(args.save) and not os.path.isdir(args.save):
        raise UsageError(f"--save {args.save} is a file; checkpoints need a directory")
    try:
        os.makedirs(args.save, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--save {args.save}: cannot create it ({e.strerror}); choose another "
                         f"directory") from None
    if not os.access(args.save, os.W_OK | os.X_OK):
        raise UsageError(f"--save {args.save}: not writable; choose another directory")
    later = [s for s in checkpoint.complete_steps(args.save) if s > start_step]
    if later and not args.load:
        raise UsageError(f"--save {args.save} already holds checkpoints (newest step {later[-1]}); "
                         f"pass --load {args.save} to resume, or choose another directory")
    if later:
        raise UsageError(f"--save {args.save} holds steps after the resumed step {start_step} "
                         f"(up to {later[-1]}) that this run would overwrite; choose another "
                         f"--save directory")


def setup_device(args):
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu")
    device = None if args.device == "auto" else args.device
    if args.precision == "fp8":
        raise UsageError("--precision fp8 is not available yet (it comes with the FP8 matmul "
                         "kernel); use bf16")
    return device


def apply_moe_flags(cfg, args):
    """--moe-* flags -> the config fields of a mixture-of-experts model."""
    flags = {"capacity_factor": args.moe_capacity_factor, "aux_loss_coef": args.moe_aux_loss_coef,
             "z_loss_coef": args.moe_z_loss_coef}
    given = {field: value for field, value in flags.items() if value is not None}
    if given and not hasattr(cfg, "n_experts"):
        raise UsageError(f"--moe-* flags apply to mixture-of-experts models (--model mixtral), "
                         f"not to --model {args.model}")
    if given.get("capacity_factor", 0) < 0:
        raise UsageError("--moe-capacity-factor must be >= 0 (0: dropless)")
    return dataclasses.replace(cfg, **given)


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------

def router_figures(modules, layout, global_targets):
    """Mixture of experts: this step's router figures over all ranks (models keep shares,
    see mixtral.py), or {} for a model without a router. Collective."""
    stats = [m.pop_router_stats() for m in modules if hasattr(m, "pop_router_stats")]
    if not stats:
        return {}
    keys = sorted(stats[0])
    flat = torch.cat([sum(s[k] for s in stats).reshape(-1) for k in keys])
    for group in (layout.dp_cp_group, layout.tp_group, layout.pp_group):  # the whole world
        parallel.all_reduce(flat, group)
    total = dict(zip(keys, flat.split([stats[0][k].numel() for k in keys])))
    return {"aux_loss": total["aux_loss"].item() / global_targets,
            "z_loss": total["z_loss"].item() / global_targets,
            "tokens_per_expert": total["tokens_per_expert"],  # (layers, experts)
            "dropped": total["dropped"].item(), "choices": total["choices"].item(),
            "all_to_all_bytes": 2 * total["all_to_all_bytes"].item()}  # forward + backward


def describe_router(steps):
    """The router's part of a log line: mean losses over the interval's steps, tokens per
    expert (fewest and most, over layers and experts) and the dropped fraction summed."""
    tokens = sum(s["tokens_per_expert"] for s in steps)
    dropped = sum(s["dropped"] for s in steps) / sum(s["choices"] for s in steps)
    return (f" | aux {sum(s['aux_loss'] for s in steps) / len(steps):.4f} "
            f"z {sum(s['z_loss'] for s in steps) / len(steps):.2e} | tokens/expert "
            f"{tokens.min().item():,.0f}-{tokens.max().item():,.0f} | dropped {dropped:.1%}")


@torch.no_grad()
def evaluate(step_fn, val, args, layout):
    """Mean loss over --eval-batches fixed validation batches (the same every time)."""
    total = 0.0
    for i in range(args.eval_batches):
        total += step_fn(lambda rows: val.batch(i, args.seed + 1, args.global_batch_size,
                                                 args.seq_len, rows), forward_only=True)
    return total / args.eval_batches


def train(args):
    check_flags(args)
    if args.vpp > 1 and args.pp == 1:
        raise UsageError("--vpp needs pipeline parallelism: pass --pp > 1")
    config_cls = models.MODELS[args.model][0] if args.model in models.MODELS else None
    if args.ep > 1 and config_cls and not hasattr(config_cls, "n_experts"):
        raise UsageError(f"--ep {args.ep}: {args.model} has no experts; expert parallelism "
                         f"needs a mixture-of-experts model (--model mixtral)")
    layout = parallel.init_distributed(args.tp, args.cp, args.pp, args.ep, args.sp, args.vpp,
                                       args.cp_comm, setup_device(args))
    device = layout.device
    if args.seq_len % (2 * layout.cp):
        raise UsageError(f"--seq-len {args.seq_len} is not divisible by 2*cp = {2 * layout.cp}, "
                         f"as context parallelism needs; change --seq-len or --cp")
    if layout.sp and args.seq_len // layout.cp % layout.tp:
        raise UsageError(f"--seq-len {args.seq_len} / cp is not divisible by tp={layout.tp}, as "
                         f"sequence parallelism needs; change --seq-len or pass --no-sp")
    precision = args.precision if args.precision != "auto" else (
        "bf16" if device.type == "cuda" else "fp32")
    autocast = precision_context(precision, device)
    micro_steps = check_batch(args, layout)

    hf_dir = args.load[len("hf:"):] if args.load and args.load.startswith("hf:") else None
    if hf_dir:
        hf_model, cfg = convert.read_hf_config(hf_dir)
        if hf_model != args.model:
            raise UsageError(f"--load {args.load} is a {hf_model} model; pass --model {hf_model}")
        cfg = dataclasses.replace(cfg, **models.parse_overrides(type(cfg), args.set))
        if args.tokenizer == "byte" and os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
            args.tokenizer = convert.tokenizer_name(hf_dir)
    else:
        cfg = models.make_config(args.model, args.config, args.set)
    cfg = apply_moe_flags(cfg, args)
    tokenizer = data.get_tokenizer(args.tokenizer)
    if tokenizer.n_vocab > cfg.vocab_size:
        raise UsageError(f"tokenizer {args.tokenizer} has {tokenizer.n_vocab} tokens but the model's "
                         f"vocab_size is {cfg.vocab_size}; pass --set vocab_size={tokenizer.n_vocab}")
    if args.seq_len > cfg.max_seq_len:
        raise UsageError(f"--seq-len {args.seq_len} exceeds max_seq_len={cfg.max_seq_len}; "
                         f"pass --set max_seq_len={args.seq_len}")
    train_data, val_data = data.load_dataset(args.data, args.tokenizer, args.seq_len)

    try:
        pp_layers = [int(n) for n in args.pp_layers.split(",")] if args.pp_layers else None
    except ValueError:
        raise UsageError(f"--pp-layers {args.pp_layers}: expected comma-separated integers") from None
    chunks = parallel.rank_chunks(layout, cfg.n_layers, pp_layers)
    schedule = "interleaved" if layout.vpp > 1 else args.pp_schedule
    actions = parallel.SCHEDULES[schedule](micro_steps, layout)

    torch.manual_seed(args.seed + layout.rank)
    modules = [models.build(args.model, cfg, device, args.seed, layout, c) for c in chunks]
    ddp = parallel.DataParallel(modules, layout, zero1=args.zero1)
    optimizer = parallel.AdamW(ddp, args.lr, args.weight_decay, eps=args.adam_eps)
    scaler = parallel.LossScaler(enabled=precision == "fp16")
    start_step, tokens_seen = 0, 0
    if hf_dir:  # fine-tuning starts at step 0 with fresh optimizer state
        for m in modules:
            convert.load_hf_weights(m, hf_dir)
    elif args.load:
        step_dir = checkpoint.resolve(args.load)
        saved = checkpoint.read_meta(step_dir)
        if saved["model"] != args.model or saved["config"] != dataclasses.asdict(cfg):
            raise UsageError(f"{step_dir} holds a different model ({saved['model']} "
                             f"{saved['config']}); pass the --model/--config/--set it was trained with")
        meta = checkpoint.load(step_dir, modules, optimizer, layout)
        start_step, tokens_seen = meta["step"], meta["tokens_seen"]
        scaler.scale, scaler.clean_steps = meta["loss_scale"], meta["loss_scale_clean_steps"]
    if args.save:
        check_save_root(args, start_step)

    counts = torch.zeros(2, device=device)  # [dense, experts]: each ep rank holds other experts
    for p in (p for m in modules for p in m.parameters()):
        if (getattr(p, "tp_sharded", False) or layout.tp_rank == 0) and not getattr(p, "pp_tied_copy", False):
            counts[int(getattr(p, "expert_parallel", False))] += math.prod(parallel.global_region(p)[2])
    parallel.all_reduce(counts[1:], layout.ep_group)
    for group in (layout.tp_group, layout.pp_group):
        parallel.all_reduce(counts, group)
    n_params = int(counts.sum())
    tokens_per_step = args.global_batch_size * args.seq_len
    flops_per_step = modules[0].flops_per_token(args.seq_len) * tokens_per_step
    peak = peak_flops(device, args)
    log = print if layout.is_main else (lambda *a, **k: None)
    log(f"{args.model}/{args.config}: {n_params / 1e6:.2f}M parameters | {layout.describe()} | "
        f"{precision} | data {args.data}: {train_data.n_tokens:,} train tokens | "
        f"{tokens_per_step:,} tokens/step in {micro_steps} micro-batch(es) per rank")
    if layout.pp > 1:
        log(f"pipeline: {schedule} schedule, chunks of layers "
            f"{parallel.pipeline_chunks(cfg.n_layers, layout.pp, layout.vpp, pp_layers)}, "
            f"theoretical bubble {parallel.bubble_fraction(schedule, micro_steps, layout):.1%}")
    if start_step:
        log(f"resumed from {step_dir} at step {start_step}")
    try:
        metrics_file = open(args.metrics, "a") if args.metrics and layout.is_main else None
    except OSError as e:
        raise UsageError(f"--metrics {args.metrics}: cannot open it ({e.strerror}); choose "
                         f"another file") from None
    wandb_run = None
    if args.wandb and layout.is_main:
        try:
            import wandb
        except ImportError:
            raise UsageError("--wandb needs the wandb package: pip install wandb") from None
        wandb_run = wandb.init(project=args.wandb, config=vars(args))

    def save(step):
        checkpoint.save(args.save, step, modules, optimizer, layout, {
            "model": args.model, "config": dataclasses.asdict(cfg), "tokenizer": args.tokenizer,
            "tokens_seen": tokens_seen, "optimizer_steps": optimizer.steps, "seed": args.seed,
            "loss_scale": scaler.scale, "loss_scale_clean_steps": scaler.clean_steps})
        log(f"saved checkpoint {args.save}/{checkpoint.step_dir_name(step)}")

    rows_per_rank = args.global_batch_size // layout.dp
    mbs = rows_per_rank // micro_steps
    global_targets = tokens_per_step  # every position of every sequence has a target
    seq_per_rank = args.seq_len // layout.cp // (layout.tp if layout.sp else 1)
    hidden_shape = (mbs, seq_per_rank, cfg.dim)  # what pipeline stages send each other

    def step_fn(batch_rows, forward_only=False):
        """Forward (+ backward) of this rank's micro-batches through the pipeline;
        returns the global mean loss. batch_rows(rows) -> (inputs, targets)."""
        micro_batches = []
        for micro in range(micro_steps):
            first_row = layout.dp_rank * rows_per_rank + micro * mbs
            x, y = batch_rows(slice(first_row, first_row + mbs))
            micro_batches.append((x.to(device, non_blocking=True), y.to(device, non_blocking=True)))
        for m in modules:
            m.train(not forward_only)
        loss_sum = parallel.run_schedule(
            actions, chunks, modules, micro_batches, layout, hidden_shape,
            ddp=None if forward_only else ddp, autocast=autocast, forward_only=forward_only,
            loss_scale=(scaler.scale if scaler.enabled else 1.0) / global_targets)
        for group in (layout.dp_cp_group, layout.pp_group):  # the loss lives on the last stage
            parallel.all_reduce(loss_sum, group)
        return loss_sum.item() / global_targets

    first_loss, t_start, window_start = None, time.perf_counter(), time.perf_counter()
    interval = []  # router figures of the steps since the last log line
    for step in range(start_step, args.steps):
        optimizer.lr = lr = lr_at(step, args)
        ddp.zero_grad()
        loss_value = step_fn(lambda rows: train_data.batch(step, args.seed, args.global_batch_size,
                                                           args.seq_len, rows))
        ddp.finish()
        finite = scaler.unscale_and_check(ddp)
        grad_norm = parallel.clip_grad_norm(ddp, args.clip_grad)
        if finite:  # fp16 overflow: skip this step (the scaler lowered its scale)
            optimizer.step()
        tokens_seen += tokens_per_step
        router = router_figures(modules, layout, global_targets)

        done = step + 1
        first_loss = first_loss or loss_value
        now = time.perf_counter()
        step_time, window_start = now - window_start, now
        record = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": grad_norm.item(),
                  "tokens_per_s": tokens_per_step / step_time,
                  "mfu": flops_per_step / step_time / (peak * layout.world) if peak else None,
                  "mem_gb": memory_gb(device), "tokens_seen": tokens_seen}
        if router:  # mixture of experts; the log line shows the interval since the last one
            tokens = router["tokens_per_expert"]
            record.update(aux_loss=router["aux_loss"], z_loss=router["z_loss"],
                          tokens_per_expert_min=tokens.min().item(),
                          tokens_per_expert_max=tokens.max().item(),
                          dropped_fraction=router["dropped"] / router["choices"],
                          all_to_all_bytes=router["all_to_all_bytes"])
            interval.append(router)
        if done % (args.eval_every or args.steps) == 0 or done == args.steps:
            record["val_loss"] = evaluate(step_fn, val_data, args, layout)
        if done % args.log_every == 0 or done == args.steps or "val_loss" in record:
            eta = (now - t_start) / (done - start_step) * (args.steps - done)
            mfu = f"{record['mfu']:.1%}" if record["mfu"] is not None else "n/a"
            val = f" | val {record['val_loss']:.4f}" if "val_loss" in record else ""
            moe = describe_router(interval) if interval else ""
            interval = []
            log(f"step {done:5d}/{args.steps} | loss {loss_value:.4f}{val}{moe} | lr {lr:.2e} | "
                f"grad {record['grad_norm']:.2f} | {record['tokens_per_s']:,.0f} tok/s | "
                f"mfu {mfu} | mem {record['mem_gb']:.2f} GB | eta {eta:.0f}s", flush=True)
        if metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        if wandb_run:
            wandb_run.log(record, step=done)
        if args.save and args.save_every and done % args.save_every == 0 and done != args.steps:
            save(done)

    if args.save and start_step < args.steps:
        save(args.steps)
    if first_loss is not None:
        log(f"done: loss {first_loss:.4f} -> {loss_value:.4f} in {time.perf_counter() - t_start:.0f}s")
    if args.sample_tokens and layout.tp == layout.pp == layout.cp == layout.ep == 1 and layout.is_main:
        text = generate.sample_text(modules[0], tokenizer, "", args.sample_tokens, seed=args.seed)
        log("---- sample ----\n" + text + "\n----------------")
    elif args.sample_tokens and args.save:
        log(f"(sampling needs the whole model in one process: python generate.py --load {args.save})")
    ddp.close()
    if metrics_file:
        metrics_file.close()
    if wandb_run:
        wandb_run.finish()


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except UsageError as e:
        # Every rank checks the same input and fails alike, so they can all leave cleanly.
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        parallel.destroy_distributed()
        sys.exit(2)
    # Any other exception propagates without the (collective) teardown: the process
    # exits, and torchrun stops the other ranks instead of leaving them waiting.
    parallel.barrier()  # leave together: no rank closes its connections while a peer still talks
    parallel.destroy_distributed()


if __name__ == "__main__":
    main()
