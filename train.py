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
import math
import os
import signal
import sys
import threading
import time
import uuid

import torch

import checkpoint
import convert
import data
import errors
import flags
import generate
import kernels
import metrics
import models
import parallel
import plan
from errors import UsageError


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


# The dtype of the parameters the model computes with: under bf16 and fp16 (mixed
# precision, Megatron's) 16-bit copies of the optimizer's fp32 main weights.
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_context(precision, device, fp8_rest="bf16"):
    """Autocast for the forward pass; master weights and optimizer stay fp32. Under fp8
    the FP8 linears (parallel.enable_fp8) multiply in FP8 and the rest runs in `fp8_rest`."""
    if precision == "fp8":
        precision = fp8_rest
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------
# Setup: the run itself (flags.py has made its config and checked its flags)
# ----------------------------------------------------------------------------

# fp16: an overflow halves the loss scale and skips the step; a scale halved below this
# means the gradients overflow at any scale (inf/nan in the model itself): stop.
MIN_LOSS_SCALE = 1.0


class NonFinite(Exception):
    """Training met a non-finite loss, gradient norm or state and stops. Every rank
    reaches the same decision from the same all-reduced figures, so all stop together;
    train.main prints the message (rank 0) and exits with status 1."""


class PeerFailure(Exception):
    """Another rank died, hangs or was stopped: a collective or a pipeline message failed
    or outlived --distributed-timeout-minutes. train.main prints the message on every rank
    that saw it and exits with status 1."""


@dataclasses.dataclass
class Run:
    """What one training run holds, made by setup()."""
    args: argparse.Namespace
    cfg: object
    layout: parallel.Layout
    tokenizer: str
    tokenizer_files: dict    # an hf:DIR tokenizer's files, read at the start: each checkpoint carries them
    train_data: object
    val_data: object
    test_data: object        # --split with a test share: evaluated at the end, else None
    chunks: list             # this rank's pipeline chunks (parallel.Chunk) ...
    modules: list            # ... and their models
    actions: list            # this rank's pipeline schedule
    micro_steps: int         # micro-batches per step on this rank
    ddp: parallel.DataParallel
    optimizer: parallel.AdamW
    scaler: parallel.LossScaler
    autocast: object
    precision: str
    fp8: object              # parallel.FP8Scaling under --precision fp8, else None
    expert_bias: object      # a MoE's auxiliary-loss-free bias table (n_layers, n_experts), else None
    logger: object
    hidden_dtype: torch.dtype  # of the residual stream, as pipeline stages send it
    start_step: int = 0
    tokens_seen: int = 0
    start_note: str = ""     # a note on how the run started
    run_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])  # kept by its resumptions
    save_lock: object = None  # the --save root's lock file, on the main rank (checkpoint.lock_root)
    # Under torchrun: its agent's pid, our parent. Killed (kill -9 leaves it no time to stop
    # us), it leaves this process to init: each step checks, and stops instead of training on.
    agent_pid: int = dataclasses.field(
        default_factory=lambda: os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None)
    doing: str = "setting up"  # what the run is doing now, for an error from a failed peer
    skipped_in_a_row: int = 0  # --on-nonfinite skip: consecutive skipped steps
    stop: str = ""           # why the step just run ends training (non-finite), else ""

    @property
    def tokens_per_step(self):
        return self.args.global_batch_size * self.args.seq_len

    def close(self):
        """Release what the run holds; also after an exception."""
        self.ddp.close()
        if self.logger is not None:
            self.logger.close()
        if self.save_lock is not None:
            self.save_lock.close()


def starts_from_pretrained(args, cfg):
    """Whether --load (with --task) is a pre-trained BERT to fine-tune from: its weights
    start the run at step 0 with fresh optimizer state and a new classifier. A checkpoint
    with these very heads (a fine-tuning run) is resumed instead. (model_config made `cfg`
    from the checkpoint's, the task's classifier in place of its heads.)"""
    saved = checkpoint.read_meta(checkpoint.resolve(args.load))
    return bool(args.task) and models.config_from_dict(saved["model"], saved["config"]) != cfg


# The flags that make the learning-rate schedule (lr_at): a resumed run keeps the
# checkpoint's values of those it is not given.
SCHEDULE_FLAGS = ("lr", "warmup_steps", "lr_decay_steps", "min_lr_ratio")


def keep_schedule(args, saved):
    """On resume: the learning-rate schedule of the run that saved the checkpoint, for every
    schedule flag this command does not give (so a larger --steps trains on at the final
    learning rate instead of warming the cosine up again); the flags it gives change the
    schedule. Returns a note saying which did what ("" if nothing differs)."""
    if saved is None:  # (a checkpoint from before schedules were saved)
        return ""
    kept, changed = [], []
    for name in SCHEDULE_FLAGS:
        flag, now = f"--{name.replace('_', '-')}", getattr(args, name)
        if name == "lr_decay_steps":
            now = now or args.steps
        if name not in saved or now == saved[name]:  # (not saved: this run's stands)
            continue
        if name in args.given:
            changed.append(f"{flag} {now:g} (was {saved[name]:g})")
        else:
            setattr(args, name, saved[name])
            kept.append(f"{flag} {saved[name]:g}")
    note = [f"learning-rate schedule kept from the checkpoint: {', '.join(kept)} (give the flag to "
            f"change it)"] if kept else []
    note += [f"learning-rate schedule changed: {', '.join(changed)}"] if changed else []
    return "; ".join(note)


def load_data(args, tokenizer, vocab_size):
    """(train, val, test or None) for the model: token windows (causal models), BERT's
    masked sentence pairs or T5's corrupted spans over the same windows, or with --task a
    labelled classification task. Every window read is checked against the model's
    vocabulary."""
    if args.task:
        return (*data.load_task(args.task, tokenizer, args.seq_len), None)
    splits = data.load_splits(args.data, tokenizer, args.seq_len, args.split and data.parse_split(args.split),
                              args.json_key)
    for dataset in splits.values():
        dataset.vocab_size, dataset.eod_mask_loss = vocab_size, args.eod_mask_loss
        if isinstance(dataset, data.InstructionData):  # several examples to a row, apart
            dataset.packed = args.reset_attention_mask
        if args.reset_attention_mask or args.reset_position_ids or args.eod_mask_loss:
            dataset.check_end_of_text()
    examples = models.family(args.model).examples
    return tuple(None if name not in splits else splits[name] if examples is None
                 else examples(splits[name], tokenizer, args) for name in data.SPLITS)


def draw_batch(dataset, step, seed, args, rows):
    """The given rows of the step's global batch, as the model's keyword arguments."""
    batch = dataset.batch(step, seed, args.global_batch_size, args.seq_len, rows)
    if isinstance(batch, tuple):  # token windows: inputs and next-token targets
        batch = dict(zip(("input_ids", "labels"), batch))
    if args.reset_attention_mask or args.reset_position_ids:
        documents, positions = data.document_inputs(batch["input_ids"], dataset.eot)
        if args.reset_attention_mask:
            batch["documents"] = documents
        if args.reset_position_ids:
            batch["positions"] = positions
    return batch


def setup(args, cfg, tokenizer, hf_dir, source, layout):
    """Build this rank's model chunks, optimizer and data; load --load; open the logs."""
    device = layout.device
    precision = args.precision if args.precision != "auto" else (
        "bf16" if device.type == "cuda" else "fp32")
    train_data, val_data, test_data = load_data(args, tokenizer, cfg.vocab_size)
    chunks = parallel.rank_chunks(layout, cfg.n_layers, flags.pp_layers(args))
    schedule = "interleaved" if layout.vpp > 1 else args.pp_schedule
    steps_per_rank = flags.micro_steps(args, layout.dp)

    torch.manual_seed(args.seed + layout.rank)
    modules = [models.build(args.model, cfg, device, args.seed, layout, c) for c in chunks]
    resume = args.load and not hf_dir and not flags.nothing_to_resume(args)
    start_note = f"--load {args.load}: no checkpoint there yet; starting at step 0" \
        if args.load and not hf_dir and not resume else ""
    # Weights that replace the initialization, and start at step 0 with fresh optimizer state,
    # load before DataParallel takes the fp32 main weights from the parameters.
    if hf_dir:
        for m in modules:
            convert.load_hf_weights(m, hf_dir)
    elif resume and starts_from_pretrained(args, cfg):
        step_dir = checkpoint.resolve(args.load)
        new = checkpoint.load_weights(step_dir, modules, layout)
        start_note, resume = (f"fine-tuning from {step_dir}; new parameters: "
                              f"{', '.join(new) or 'none on this rank'}"), False
    parallel.apply_recompute(modules, args.recompute, args.recompute_layers or 1,
                             args.recompute_method or "uniform")
    param_dtype = PARAM_DTYPES[args.fp8_rest if precision == "fp8" else precision]
    ddp = parallel.DataParallel(modules, layout, zero1=args.zero1, bucket_mb=args.ddp_bucket_mb,
                                param_dtype=param_dtype,
                                grad_dtype=torch.float32 if args.grad_dtype == "fp32" else param_dtype)
    fp32_residual = args.fp32_residual or models.family(args.model).fp32_residual(cfg)
    if fp32_residual:
        parallel.set_residual_dtype(modules, torch.float32)
    optimizer = parallel.AdamW(ddp, args.lr, args.weight_decay, eps=args.adam_eps)
    scaler = parallel.LossScaler(precision == "fp16", args.initial_loss_scale, args.loss_scale_window)
    fp8 = None
    if precision == "fp8":
        recipe = parallel.FP8Recipe(args.fp8_recipe, args.fp8_amax_history_len, args.fp8_margin)
        fp8 = parallel.enable_fp8(modules, recipe, layout, cfg.n_layers, args.fp8_bf16_layers)
    if args.compile:  # (after recompute and FP8 have set up the layers it compiles)
        parallel.apply_compile(modules)
    run = Run(args=args, cfg=cfg, layout=layout, tokenizer=tokenizer,
              tokenizer_files=data.tokenizer_files(tokenizer) if layout.is_main else {}, train_data=train_data,
              val_data=val_data, test_data=test_data, chunks=chunks, modules=modules,
              actions=parallel.SCHEDULES[schedule](steps_per_rank, layout),
              micro_steps=steps_per_rank, ddp=ddp, optimizer=optimizer, scaler=scaler,
              autocast=precision_context(precision, device, args.fp8_rest), precision=precision,
              fp8=fp8, logger=None, start_note=start_note,
              expert_bias=torch.zeros(cfg.n_layers, cfg.n_experts) if getattr(cfg, "expert_bias_rate", 0) else None,
              hidden_dtype=torch.float32 if fp32_residual else param_dtype)
    try:
        if resume:
            step_dir = checkpoint.resolve(args.load)
            meta = checkpoint.load(step_dir, modules, optimizer, layout)
            run.start_step, run.tokens_seen = meta["step"], meta["tokens_seen"]
            run.start_note = "; ".join(note for note in (keep_schedule(args, meta.get("schedule")),
                                                         keep_seed(args, meta.get("seed"))) if note)
            run.run_id = meta.get("run_id", run.run_id)  # (older checkpoints: a new lineage)
            scaler.scale, scaler.clean_steps = meta["loss_scale"], meta["loss_scale_clean_steps"]
            if fp8 is not None:
                load_fp8_history(fp8, step_dir, meta)
            if run.expert_bias is not None and meta.get("expert_bias"):  # (else it starts at zero)
                run.expert_bias = checkpoint.read_replicated(step_dir)["moe.expert_bias"]
        if run.expert_bias is not None:
            for module in modules:
                module.set_expert_bias(run.expert_bias)
        if run.start_step >= args.steps:
            raise UsageError(f"--load {args.load}: the checkpoint is at step {run.start_step} and "
                             f"--steps is {args.steps}: nothing to train; pass a larger --steps")
        if args.save:
            flags.check_save_root(args, run.start_step)
            problem = None
            if layout.is_main:
                try:
                    run.save_lock = checkpoint.lock_root(args.save)
                except UsageError as e:
                    problem = str(e)
            parallel.raise_if_any(problem, layout)
        run.logger = metrics.Logger(args, layout, metrics_header(run))
    except BaseException:
        run.close()
        raise
    log = run.logger.print
    what = f"task {args.task}" if args.task else "data " + " ".join(args.data)
    amount = train_data.describe(args.seq_len) if hasattr(train_data, "describe") else \
        f"{train_data.n_tokens:,} train tokens"
    log(f"{args.model} ({source}; tokenizer {tokenizer}): "
        f"{parallel.count_parameters(modules, layout) / 1e6:.2f}M parameters | {layout.describe()} | "
        f"{describe_precision(run)} | "
        f"{what}: {amount} | {run.tokens_per_step:,} tokens/step in "
        f"{steps_per_rank} micro-batch(es) per rank")
    if layout.pp > 1:
        log(f"pipeline: {schedule} schedule, chunks of layers "
            f"{parallel.pipeline_chunks(cfg.n_layers, layout.pp, layout.vpp, flags.pp_layers(args))}, "
            f"theoretical bubble {parallel.bubble_fraction(schedule, steps_per_rank, layout):.1%}")
    if run.start_step:
        log(f"resumed from {checkpoint.resolve(args.load)} at step {run.start_step}")
    if args.task:
        log(f"{val_data.n_classes} classes (share of the validation text): " + ", ".join(
            f"{name} {share:.1%}" for name, share in zip(val_data.class_names, val_data.class_shares)))
    if run.start_note:
        log(run.start_note)
    return run


def keep_seed(args, saved):
    """On resume: the seed of the run that saved the checkpoint unless --seed is given (the
    batches of each step depend on the seed: another one would silently train on another
    order). Returns a note, "" if it is the same."""
    if saved is None or saved == args.seed:
        return ""
    if "seed" in args.given:
        return f"--seed {args.seed} (was {saved}): the batches from here follow another order"
    args.seed = saved
    return f"--seed {saved} kept from the checkpoint, whose batch order goes on (give --seed to change it)"


def metrics_header(run):
    """The record that starts a run's part of the --metrics file: what ran, where, from
    which step, so that the runs appended to one file stay separable."""
    return {"start_step": run.start_step, "run_id": run.run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "args": vars(run.args), "config": dataclasses.asdict(run.cfg), "tokenizer": run.tokenizer,
            "layout": run.layout.describe(), "world_size": run.layout.world,
            "precision": run.precision, "torch": torch.__version__}


def describe_precision(run):
    """The run header's precision: under fp8, the recipe, which layers and how it runs."""
    if run.fp8 is None:
        return run.precision
    args, fp8 = run.args, run.fp8
    layers = sorted({int(name.split(".")[1]) for name in fp8.names})
    recipe = f"{args.fp8_recipe} scaling" + (f", amax history {args.fp8_amax_history_len}"
                                               if args.fp8_recipe == "delayed" else "")
    matmul = "Triton" if kernels.fp8_matmul_backend(run.layout.device) == "triton" else \
        "emulated: FP8 values, fp32 matmuls"
    return (f"fp8 ({recipe}; layers {layers[0]}-{layers[-1]} in FP8, {matmul}; the rest "
            f"{args.fp8_rest})")


def load_fp8_history(fp8, step_dir, meta):
    """Delayed scaling's amax history from a checkpoint, so that a resumed run scales as
    the uninterrupted one. A checkpoint without one (trained in another precision) starts
    a new history."""
    saved = meta.get("fp8")
    if saved is None or fp8.recipe.name != "delayed" or saved["recipe"] != "delayed":
        return
    if saved["names"] != fp8.names or saved["history_len"] != fp8.recipe.history_len:
        raise UsageError(f"{step_dir} holds an FP8 amax history of {saved['history_len']} steps for "
                         f"{len(saved['names'])} linears, this run has {fp8.recipe.history_len} for "
                         f"{len(fp8.names)}; pass the --fp8-amax-history-len and --fp8-bf16-layers "
                         f"it was trained with")
    history = checkpoint.read_replicated(step_dir)["fp8.amax_history"]
    fp8.set_history(history.to(fp8.history.device), saved["steps_recorded"])


def state_is_finite(run):
    """Whether every parameter and optimizer moment is finite on every rank: one flag,
    all-reduced over the world (each rank checks its own slice)."""
    layout, bad = run.layout, torch.zeros((), device=run.layout.device)
    for b, m, v in zip(run.ddp.buckets, run.optimizer.exp_avg, run.optimizer.exp_avg_sq):
        for t in (b.data[b.shard], m, v):
            bad += (~torch.isfinite(t)).any()
    return parallel.all_reduce_world(bad, layout).item() == 0


def stop_message(run, what):
    """The one line training stops with: what went wrong, at which step, and the last good
    checkpoint to resume from."""
    args = run.args
    step_dir = checkpoint.newest(args.save) if args.save else None
    if step_dir:
        last = f"last good checkpoint: {step_dir}"
    else:
        last = "no checkpoint was saved" + ("" if args.save else " (no --save)")
    return f"{what}; stopped, nothing of this state saved; {last}"


def save(run, step, announce=True):
    """Checkpoint this step under --save (collective); returns its directory."""
    args = run.args
    if not state_is_finite(run):
        raise NonFinite(stop_message(run, f"step {step}: a parameter or optimizer value is "
                                          f"non-finite (inf/nan); refusing to save a checkpoint"))
    meta = {"model": args.model, "config": dataclasses.asdict(run.cfg), "tokenizer": run.tokenizer,
            "tokenizer_fingerprint": data.tokenizer_fingerprint(run.tokenizer),
            "tokens_seen": run.tokens_seen, "optimizer_steps": run.optimizer.steps, "seed": args.seed,
            "run_id": run.run_id,
            "loss_scale": run.scaler.scale, "loss_scale_clean_steps": run.scaler.clean_steps,
            "schedule": {name: getattr(args, name) for name in SCHEDULE_FLAGS}}
    meta["schedule"]["lr_decay_steps"] = args.lr_decay_steps or args.steps  # (its effective value)
    replicated = {}
    if run.fp8 is not None:
        meta["fp8"] = {"recipe": run.fp8.recipe.name, "history_len": run.fp8.recipe.history_len,
                       "steps_recorded": run.fp8.steps_recorded, "names": run.fp8.names}
        replicated["fp8.amax_history"] = run.fp8.history
    if run.expert_bias is not None:
        meta["expert_bias"], replicated["moe.expert_bias"] = True, run.expert_bias
    checkpoint.save(args.save, step, run.modules, run.optimizer, run.layout, meta, replicated, run.tokenizer_files)
    path = os.path.join(args.save, checkpoint.step_dir_name(step))
    if announce:
        run.logger.print(f"saved checkpoint {path}")
    return path


# ----------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------

def forward_backward(run, batch_rows, forward_only=False):
    """Forward (+ backward) of this rank's micro-batches through the pipeline schedule;
    returns the global mean loss. batch_rows(rows) -> the model's inputs (a dict with
    `labels`) for those rows of the global batch."""
    args, layout = run.args, run.layout
    rows_per_rank, mbs = args.global_batch_size // layout.dp, flags.micro_batch_size(args, layout.dp)
    micro_batches = []
    for micro in range(run.micro_steps):
        first_row = layout.dp_rank * rows_per_rank + micro * mbs
        batch = batch_rows(slice(first_row, first_row + mbs))
        micro_batches.append({k: v.to(layout.device, non_blocking=True) for k, v in batch.items()})
    global_targets = count_targets(micro_batches, layout)
    if "sentence_order_labels" in micro_batches[0]:
        # BERT's objective is the mean masked-token loss + the mean sentence-order loss;
        # in units of masked tokens (the divisor below), one sequence weighs targets/sequences.
        for batch in micro_batches:
            batch["sentence_order_weight"] = global_targets / args.global_batch_size
    for m in run.modules:
        m.train(not forward_only)
    # What pipeline stages send each other: this rank's share of a micro-batch's tokens
    # (an encoder-decoder's chunks pass the encoder's and the decoder's side by side).
    tokens = sum(micro_batches[0][k].shape[1] for k in ("input_ids", "decoder_input_ids")
                 if k in micro_batches[0])
    seq_per_rank = tokens // layout.cp // (layout.tp if layout.sp else 1)
    loss_sum = parallel.run_schedule(
        run.actions, run.chunks, run.modules, micro_batches, layout, (mbs, seq_per_rank, run.cfg.dim),
        ddp=None if forward_only else run.ddp, autocast=run.autocast, forward_only=forward_only,
        loss_scale=(run.scaler.scale if run.scaler.enabled else 1.0) / global_targets,
        hidden_dtype=run.hidden_dtype)
    for group in (layout.dp_cp_group, layout.pp_group):  # the loss lives on the last stage
        parallel.all_reduce(loss_sum, group)
    return loss_sum.item() / global_targets


def count_targets(micro_batches, layout):
    """Targets in the step's global batch: labels other than -100 (every token of a causal
    model's batch; BERT's masked tokens; one class per sequence), counted on this rank's
    rows and summed over dp (the cp ranks of a dp rank hold the same rows)."""
    count = sum((batch["labels"] != data.IGNORE_INDEX).sum() for batch in micro_batches).float()
    parallel.all_reduce(count, layout.dp_cp_group)
    count = count.item() / layout.cp
    if count == 0:
        raise UsageError("a batch has no target (no masked token): raise --mask-prob or --seq-len")
    return count


def train_step(run, step):
    """One optimizer step: forward and backward of the step's global batch, gradients
    reduced, unscaled (fp16), clipped, applied. Returns the step's record (metrics)."""
    args = run.args
    run.optimizer.lr = lr_at(step, args)
    run.ddp.zero_grad()
    loss = forward_backward(run, lambda rows: draw_batch(run.train_data, step, args.seed, args, rows))
    if run.fp8 is not None:
        run.fp8.end_step()
    run.ddp.finish()
    if step == run.start_step:  # a model file that broke tensor parallelism says so now
        run.ddp.check_tp_replicas()
    finite = run.scaler.unscale_and_check(run.ddp)
    grad_norm = parallel.clip_grad_norm(run.ddp, args.clip_grad).item()
    # The loss (reduced in forward_backward) and the gradient norm (global) are the same
    # on every rank: one decision everywhere without another collective.
    healthy = math.isfinite(loss) and math.isfinite(grad_norm)
    run.stop = ""
    if not finite:  # fp16 overflow: skip this step (the scaler lowered its scale)
        if run.scaler.scale < MIN_LOSS_SCALE:
            run.stop = (f"step {step + 1}: fp16 gradients overflow even at loss scale "
                        f"{run.scaler.scale:g} (below the minimum {MIN_LOSS_SCALE:g})")
    elif not healthy:
        what = f"step {step + 1}: non-finite loss {loss} / gradient norm {grad_norm}"
        if args.on_nonfinite == "stop":
            run.stop = what
        else:
            run.skipped_in_a_row += 1
            run.logger.print(f"{what}: update skipped ({run.skipped_in_a_row} in a row)", flush=True)
            if run.skipped_in_a_row >= args.max_skipped_steps:
                run.stop = f"{what}: {run.skipped_in_a_row} consecutive steps skipped (--max-skipped-steps)"
    else:
        run.optimizer.step()
        run.skipped_in_a_row = 0
    run.tokens_seen += run.tokens_per_step
    record = {"step": step + 1, "loss": loss, "lr": run.optimizer.lr, "grad_norm": grad_norm,
              "tokens_seen": run.tokens_seen}
    if run.scaler.enabled:
        record.update(loss_scale=run.scaler.scale, skipped=not (finite and healthy))
    elif not healthy:
        record["skipped"] = True
    return record


@torch.no_grad()
def evaluate(run, dataset=None):
    """Mean loss over --eval-batches fixed batches of the validation data (the same every
    time), or of `dataset`."""
    args, dataset = run.args, dataset or run.val_data
    total = 0.0
    for i in range(args.eval_batches):
        total += forward_backward(run, lambda rows: draw_batch(dataset, i, args.seed + 1, args, rows),
                                  forward_only=True)
    return total / args.eval_batches


# ----------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------

def router_figures(modules, layout, global_targets):
    """Mixture of experts: this step's router figures over all ranks (models keep shares,
    see mixtral.py), or {} for a model without a router. Collective."""
    stats = [m.pop_router_stats() for m in modules if hasattr(m, "pop_router_stats")]
    if not stats:
        return {}
    keys = sorted(stats[0])
    flat = torch.cat([sum(s[k] for s in stats).reshape(-1) for k in keys])
    parallel.all_reduce_world(flat, layout)
    total = dict(zip(keys, flat.split([stats[0][k].numel() for k in keys])))
    tokens = total["tokens_per_expert"]  # (layers, experts)
    return {"aux_loss": total["aux_loss"].item() / global_targets,
            "z_loss": total["z_loss"].item() / global_targets,
            "tokens_per_expert_min": tokens.min().item(), "tokens_per_expert_max": tokens.max().item(),
            "dropped_fraction": total["dropped"].item() / total["choices"].item(),
            "all_to_all_bytes": 2 * total["all_to_all_bytes"].item(),  # forward + backward
            "tokens_per_expert": tokens}


# A head's figures (models with pop_stats: BERT) -> the record's key for its accuracy.
HEAD_ACCURACY = {"mlm": "mlm_accuracy", "sentence_order": "sentence_order_accuracy", "class": "accuracy"}


def head_figures(run):
    """Top-1 accuracy of each head of the model since the last call, over all ranks
    ({} for a model without such heads). Collective: every rank calls it."""
    if not hasattr(run.modules[0], "pop_stats"):
        return {}
    heads = [h for h, present in (("mlm", run.cfg.mlm_head), ("sentence_order", run.cfg.binary_head),
                                  ("class", run.cfg.n_classes)) if present]
    counts = torch.zeros(len(heads), 2, device=run.layout.device)  # [hits, targets] per head
    for m in run.modules:  # only the last stage's model has figures
        for what, c in m.pop_stats().items():
            counts[heads.index(what)] += c
    for group in (run.layout.dp_cp_group, run.layout.pp_group):  # tp ranks hold the same figures
        parallel.all_reduce(counts, group)
    return {HEAD_ACCURACY[h]: (hits / n).item() for h, (hits, n) in zip(heads, counts) if n > 0}


# ----------------------------------------------------------------------------
# Stopping on a signal
# ----------------------------------------------------------------------------

class StopSignals:
    """SIGTERM (how schedulers preempt a job, and how torchrun stops its workers), SIGINT
    (Ctrl-C) and SIGUSR1 (SLURM's warning before the time limit, see scripts/slurm.sh) do
    not kill training: the handler only notes the signal. After each step the ranks agree
    on it, since a signal may reach one rank only, and all stop after that same step,
    saving a checkpoint first. Elsewhere they raise errors.Stopped (errors.stop_on_signals,
    which main installs), and once a stop was noted, further ones (a burst of SIGTERMs
    during the save) are ignored: the run is stopping already."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, announce):
        self.received, self.announce, self.previous = 0, announce, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # (only it may set handlers)
            self.previous = {sig: signal.signal(sig, self.note) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_IGN if self.received else handler)

    def note(self, signum, frame):
        self.received = signum
        if self.announce:  # os.write: print() may be in the middle of a line of its own
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step\n".encode())

    def agreed(self, layout):
        """The signal that stops training after this step (if several ranks got one, the
        highest-numbered), or 0 to go on. Collective: every rank calls it after each step."""
        flag = torch.tensor(float(self.received), device=layout.device)
        return int(parallel.all_reduce_world(flag, layout, torch.distributed.ReduceOp.MAX).item())


def stop_on_signal(run, signum, done):
    """Save after step `done` (with --save) and say how to resume: training stops."""
    args = run.args
    name = signal.Signals(signum).name
    if not args.save:
        run.logger.print(f"stopped by {name} after step {done}/{args.steps}; nothing saved (no --save)")
        return
    run.doing = f"saving step {done}"
    path = save(run, done, announce=False)
    again = "the same command" if args.load and os.path.realpath(args.load) == os.path.realpath(args.save) \
        else f"the same command with --load {args.save}"
    run.logger.print(f"stopped by {name} after step {done}/{args.steps}: saved {path}; to resume, "
                     f"run {again}", flush=True)


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------

def training_loop(run):
    """Steps from the start (or the resumed) step to --steps: train, evaluate, log, save;
    stop early, saving, on a signal. Returns the records of the steps run."""
    args, layout = run.args, run.layout
    step_flops = flops_per_step(run)
    peak = metrics.peak_flops(layout.device, args)
    records, t_start = [], time.perf_counter()
    with StopSignals(announce=layout.is_main) as signals:
        for step in range(run.start_step, args.steps):
            run.doing, t_step = f"step {step + 1}", time.perf_counter()
            if run.agent_pid is not None and os.getppid() != run.agent_pid:
                newest = checkpoint.newest(args.save) if args.save else None
                raise PeerFailure(f"rank {layout.rank}, before step {step + 1}: the torchrun agent (pid "
                                  f"{run.agent_pid}) that started this process is gone; stopping"
                                  f"{f' (last checkpoint: {newest})' if newest else ''}")
            compiled_before = parallel.compile_seconds()
            record = train_step(run, step)
            router = router_figures(run.modules, layout, run.tokens_per_step)
            if run.expert_bias is not None:  # (from the global counts: the same on every rank)
                tokens = router["tokens_per_expert"].cpu().view_as(run.expert_bias)
                type(run.modules[0]).expert_bias_step(run.expert_bias, tokens, run.cfg.expert_bias_rate)
                for module in run.modules:
                    module.set_expert_bias(run.expert_bias)
            record.update(head_figures(run))
            if hasattr(run.train_data, "progress"):
                record.update(run.train_data.progress((step + 1) * args.global_batch_size, args.seq_len,
                                                      args.seed))
            # (evaluation, saving and --compile's compilation, reported apart, not included)
            compile_s = parallel.compile_seconds() - compiled_before
            step_time = time.perf_counter() - t_step - compile_s
            if compile_s:
                record["compile_s"] = compile_s
                run.logger.print(f"compile: {compile_s:.1f} s (step {step + 1}; not in its step time)")
            peak = metrics.cpu_peak_seen(peak, step_flops / step_time / layout.world, layout.device, args)
            record.update(tokens_per_s=run.tokens_per_step / step_time, step_time=step_time,
                          mfu=step_flops / step_time / (peak * layout.world) if peak else None,
                          mem_gb=metrics.memory_gb(layout.device),
                          **{k: v for k, v in router.items() if k != "tokens_per_expert"})
            done = step + 1
            if done % (args.eval_every or args.steps) == 0 or done == args.steps:
                run.doing = f"the evaluation after step {done}"
                record["val_loss"] = evaluate(run)
                record.update({"val_" + k: v for k, v in head_figures(run).items()})
                if hasattr(run.val_data, "majority_share"):  # what always answering the commonest scores
                    record["val_majority_baseline"] = run.val_data.majority_share
            if done == args.steps and run.test_data is not None:
                run.doing = "the test evaluation"
                record["test_loss"] = evaluate(run, run.test_data)
            elapsed = time.perf_counter() - t_start
            run.logger.step(record, router, elapsed, eta=elapsed / (done - run.start_step) * (args.steps - done))
            records.append(record)
            if run.stop:  # (the same on every rank) before any save of this state
                raise NonFinite(stop_message(run, run.stop))
            signum = signals.agreed(layout)
            if signum and done < args.steps:
                stop_on_signal(run, signum, done)
                return records
            if args.save and (done == args.steps or args.save_every and done % args.save_every == 0):
                run.doing = f"saving step {done}"
                save(run, done)
    run.doing = "finishing"
    run.logger.print(summary(run, records, time.perf_counter() - t_start))
    model = run.modules[0]
    sample = args.sample_tokens and (hasattr(model, "new_kv_caches") or hasattr(model, "encode"))
    if sample and layout.tp == layout.pp == layout.cp == layout.ep == 1 and layout.is_main:
        # (not in the ETA: say what the wait is, a minute or two with a large vocabulary on a CPU)
        run.logger.print(f"sampling {args.sample_tokens} tokens (--sample-tokens 0 skips this) ...")
        run.logger.print(sample_report(run))
    elif sample and args.save:
        run.logger.print(f"(sampling needs the whole model in one process: python generate.py "
                         f"--load {args.save})")
    return records


def summary(run, records, seconds):
    """The end-of-run line: losses, speed, time, and where the run's files went."""
    args = run.args
    evaluated = [r for r in records if "val_loss" in r]
    best = min(evaluated, key=lambda r: r["val_loss"])
    # The first step of a process compiles and autotunes the GPU kernels (and warms caches):
    # its time is reported apart, not averaged in.
    timed = records[1:] or records
    speed = f"{run.tokens_per_step * len(timed) / sum(r['step_time'] for r in timed):,.0f} tok/s"
    if records[0]["mfu"] is not None:
        speed += f", mfu {metrics.describe_mfu(timed, run.layout.device)}"
    if len(records) > 1:
        speed += f" (after step {records[0]['step']}, which took {records[0]['step_time']:.2f} s)"
    files = [f"checkpoints in {args.save}" if args.save else "no checkpoint (no --save)"]
    files += [f"metrics in {args.metrics}"] if args.metrics else []
    test = f" | test {records[-1]['test_loss']:.4f}" if "test_loss" in records[-1] else ""
    return (f"done: {len(records)} steps in {metrics.clock(seconds)} | loss {records[0]['loss']:.4f} -> "
            f"{records[-1]['loss']:.4f} | val {evaluated[-1]['val_loss']:.4f} (best "
            f"{best['val_loss']:.4f} at step {best['step']}){test} | {speed} | {', '.join(files)}")


def sample_report(run):
    """What the trained model writes: a sampled continuation of end-of-text, or for T5 its
    greedy filling of a validation example's corrupted spans beside the true spans."""
    args, model = run.args, run.modules[0]
    tokenizer = data.get_tokenizer(run.tokenizer)
    if not hasattr(model, "encode"):
        text = generate.sample_text(model, tokenizer, "", args.sample_tokens, seed=args.seed)
        return "---- sample ----\n" + text + "\n----------------"
    example = run.val_data.batch(0, args.seed + 1, 1, args.seq_len)
    ids = example["input_ids"][0][example["attention_mask"][0].bool()]
    target = example["labels"][0][example["labels"][0] != data.IGNORE_INDEX]
    out = generate.sample_seq2seq(model, ids[None].to(run.layout.device), None,
                                  min(args.sample_tokens, len(target)), temperature=0,
                                  eos_id=run.val_data.tokens.eos)
    return (f"---- a validation example: the input, its true spans, the model's (greedy) ----\n"
            f"{tokenizer.decode(ids.tolist())}\n---- true ----\n{tokenizer.decode(target.tolist())}\n"
            f"---- model ----\n{tokenizer.decode(out[0].tolist())}\n----------------")


def flops_per_step(run):
    """Training FLOPs of one step, for MFU (T5's per encoder token, given its decoder's length)."""
    return models.family(run.args.model).flops_per_token(run.modules[0], run.args.seq_len) * run.tokens_per_step


def init_layout(args):
    """This rank's parallel.Layout of the flags' axes (its process groups made)."""
    return parallel.init_distributed(args.tp, args.cp, args.pp, args.ep, args.sp, args.vpp, args.cp_comm,
                                     None if args.device == "auto" else args.device,
                                     timeout_minutes=args.distributed_timeout_minutes, etp=args.etp)


def train(args):
    """Train as the flags say; return the records of the steps run (one dict per step,
    what --metrics writes). Under torchrun every rank calls this."""
    cfg, tokenizer, hf_dir, source = flags.model_config(args)
    flags.check_args(args, cfg, tokenizer)
    layout = init_layout(args)
    run = None
    try:
        run = setup(args, cfg, tokenizer, hf_dir, source, layout)
        records = training_loop(run)
    except (UsageError, NonFinite):
        # Every rank checks the same input (the same all-reduced figures) and fails alike,
        # so they can all leave cleanly.
        parallel.destroy_distributed(layout)
        raise
    except errors.Stopped as e:  # (a stop signal outside the loop: say where, and what is saved)
        e.doing = run.doing if run is not None else "setting up"
        newest = checkpoint.newest(args.save) if args.save else None
        e.saved = f"; {newest} is saved" if newest else ("; nothing was saved" if args.save else "")
        parallel.destroy_distributed(layout)
        raise
    except RuntimeError as e:
        reason = parallel.peer_failure(e) if layout.world > 1 else None
        if reason is None:
            raise
        raise PeerFailure(peer_failure_message(args, run, layout, reason)) from None
    finally:  # on any exception too: the gradient hooks, the metrics file, wandb
        if run is not None:
            run.close()
    # Any other exception has propagated without the (collective) teardown: the process
    # exits, and torchrun stops the other ranks instead of leaving them waiting.
    parallel.barrier()  # leave together: no rank closes its connections while a peer still talks
    parallel.destroy_distributed(layout)
    return records


def peer_failure_message(args, run, layout, reason):
    """The line a rank stops with when another rank died, hangs or was stopped: what this
    one was doing and waiting for, and where to resume from."""
    doing = run.doing if run else "setting up"
    last = ""
    if args.save:
        step_dir = checkpoint.newest(args.save)
        last = f"; last checkpoint: {step_dir}" if step_dir else "; no checkpoint saved yet"
    return (f"rank {layout.rank}, {doing}: {reason} (--distributed-timeout-minutes "
            f"{args.distributed_timeout_minutes:g}); "
            f"a rank died, hangs or was stopped: see its own output{last}")


def main(argv=None):
    with errors.stop_on_signals():
        _main(argv)


def _main(argv):
    try:
        args = flags.parse_args(argv)
        if args.plan:
            print(plan.report(args))
            return
        train(args)
    except UsageError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFinite as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except errors.Stopped as e:  # (outside the loop: starting, sampling, finishing)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"stopped by {e.name} while {getattr(e, 'doing', 'starting')}{getattr(e, 'saved', '')}",
                  file=sys.stderr)
        sys.exit(0)
    except PeerFailure as e:  # (each rank that saw it: the main rank may be the one that failed)
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # now: no teardown that would wait for the missing rank again


if __name__ == "__main__":
    main()
