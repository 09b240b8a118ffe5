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
import contextlib
import dataclasses
import errno
import json
import math
import os
import resource
import signal
import sys
import threading
import time

import torch

import checkpoint
import convert
import data
import errors
import generate
import kernels
import models
import parallel
from parallel import UsageError


# The preset a run uses without --config (or --load).
DEFAULT_CONFIG = "tiny"

# BERT's post-LN layers sit at the unigram plateau (always guessing the commonest token)
# at 2e-3 on the tiny preset; at 5e-4 they leave it within 100 steps.
DEFAULT_LR = {"default": 2e-3, "bert": 5e-4}

# The FP8 flags' defaults: given otherwise without --precision fp8, they are an error.
FP8_DEFAULTS = {"fp8_recipe": "delayed", "fp8_amax_history_len": 1024, "fp8_margin": 0,
                "fp8_bf16_layers": 1, "fp8_rest": "bf16"}


def parse_args(argv=None):
    p = errors.ArgumentParser(description="Train a language model.", allow_abbrev=False,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", required=True, help=f"one of: {', '.join(models.MODELS)}")
    a("--config", default=None,
      help=f"preset of the model file (test, tiny, llama3-8b, gpt2, ...; default: {DEFAULT_CONFIG}, "
           f"or with --load the checkpoint's own config)")
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
    a("--ddp-bucket-mb", type=float, default=25.0,
      help="gradients reduced together, in MiB of fp32 (each bucket's reduction overlaps backward)")
    a("--recompute", choices=parallel.RECOMPUTE_MODES, default="none",
      help="activation recomputation: selective = attention scores recomputed in backward, "
           "not stored; full = whole layers (only each checkpointed unit's input stored)")
    a("--recompute-method", choices=parallel.RECOMPUTE_METHODS, default=None,
      help="--recompute full, per pipeline chunk: uniform = units of --recompute-layers "
           "consecutive layers; block = only the first --recompute-layers layers, one by one "
           "(default: uniform)")
    a("--recompute-layers", type=int, default=None, metavar="N",
      help="--recompute full: layers per unit (uniform) or layers checkpointed (block) "
           "(default: 1)")
    a("--compile", action="store_true",
      help="torch.compile each transformer layer (the first step compiles: its time is "
           "reported as compile, not step time)")
    a("--moe-capacity-factor", type=float, default=None,
      help="mixture of experts: each expert keeps at most factor x its even share of a "
           "micro-batch's choices, dropping the rest (default: the preset's, 0 = dropless)")
    a("--moe-aux-loss-coef", type=float, default=None,
      help="mixture of experts: load-balancing loss coefficient (default: the preset's)")
    a("--moe-z-loss-coef", type=float, default=None,
      help="mixture of experts: router z-loss coefficient (default: the preset's)")
    a("--steps", type=int, default=200, help="optimizer steps to train (in all, counting a resumed "
      "run's earlier steps)")
    a("--warmup-steps", type=int, default=20, help="steps of linear learning-rate warmup")
    a("--lr-decay-steps", type=int, default=None, help="cosine decay length (default: --steps)")
    a("--lr", type=float, default=argparse.SUPPRESS,  # (a default that depends on --model)
      help=f"peak learning rate (default: {DEFAULT_LR['default']:g}; {DEFAULT_LR['bert']:g} for bert)")
    a("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of --lr")
    a("--weight-decay", type=float, default=0.1,
      help="AdamW's decoupled weight decay (weight matrices only: not norms, biases, embeddings)")
    a("--adam-eps", type=float, default=1e-8, help="AdamW's epsilon")
    a("--clip-grad", type=float, default=1.0, help="max global gradient norm (0: off)")
    a("--on-nonfinite", choices=["stop", "skip"], default="stop",
      help="a step whose loss or gradient norm is inf/nan: stop (exit 1, nothing of it saved) or "
           "skip its update (the lr schedule still advances) and stop after --max-skipped-steps "
           "such steps in a row")
    a("--max-skipped-steps", type=int, default=10,
      help="--on-nonfinite skip: stop after this many consecutive skipped steps")
    a("--global-batch-size", type=int, default=16, help="sequences per optimizer step")
    a("--micro-batch-size", type=int, default=None,
      help="sequences per forward pass (default: global batch / dp, no accumulation; under "
           "pipeline parallelism global batch / dp / pp, pp micro-batches per step)")
    a("--seq-len", type=int, default=256, help="tokens per training sequence")
    a("--seed", type=int, default=1337,
      help="weights and batches follow from it: the same seed, the same run, on any layout")
    a("--precision", choices=["auto", "fp32", "bf16", "fp16", "fp8"], default="auto",
      help="auto: bf16 on CUDA, fp32 on CPU")
    a("--fp8-recipe", default=FP8_DEFAULTS["fp8_recipe"],
      metavar="{" + ",".join(parallel.FP8_RECIPES) + "}",
      help="fp8: how scales are chosen: delayed (the largest amax of recent steps), "
           "tensorwise (each tensor's amax now) or rowwise (one scale per row)")
    a("--fp8-amax-history-len", type=int, default=FP8_DEFAULTS["fp8_amax_history_len"],
      help="fp8 delayed: steps of amax history")
    a("--fp8-margin", type=int, default=FP8_DEFAULTS["fp8_margin"],
      help="fp8: scales divided by 2^margin (headroom)")
    a("--fp8-bf16-layers", type=int, default=FP8_DEFAULTS["fp8_bf16_layers"],
      help="fp8: the first and the last N transformer layers stay in higher precision")
    a("--fp8-rest", choices=["bf16", "fp32"], default=FP8_DEFAULTS["fp8_rest"],
      help="fp8: the precision of everything that is not an FP8 matmul (fp32 isolates FP8's "
           "own effect)")
    a("--initial-loss-scale", type=float, default=2.0**16, help="fp16: the loss scale to start from")
    a("--loss-scale-window", type=int, default=1000,
      help="fp16: double the loss scale after this many steps without overflow")
    a("--device", choices=["auto", "cpu", "cuda"], default="auto",
      help="auto: cuda (+ NCCL) when a GPU is visible, else cpu (+ gloo)")
    a("--distributed-timeout-minutes", type=float, default=10.0,
      help="how long a rank waits for the others in any collective or pipeline message before "
           "it gives up with an error naming what it waited for (a rank died, hangs or was stopped)")
    a("--data", default="stdlib", help="stdlib (built in), a text file/folder/glob, or a prepared dir")
    a("--tokenizer", default=None,
      help="byte, gpt2, cl100k_base, o200k_base, or hf:DIR (a Hugging Face tokenizer.json) "
           "(default: byte, or the tokenizer of the --load checkpoint or folder)")
    a("--mask-prob", type=float, default=0.15,
      help="bert pre-training: share of tokens to predict (80%% [MASK], 10%% random, 10%% kept)")
    a("--whole-word-masking", action="store_true", help="bert pre-training: mask whole words")
    a("--task", default=None, metavar="TASK",
      help="bert: fine-tune a sequence classifier on a labelled task instead of pre-training: "
           "stdlib-packages (built in: which standard-library package a snippet is from) or a "
           "directory with one sub-directory of text files per class; --load a pre-trained "
           "checkpoint to start from it")
    a("--save", default=None, metavar="DIR", help="checkpoint root")
    a("--save-every", type=int, default=0, help="also save every N steps (always at the end)")
    a("--load", default=None, metavar="DIR",
      help="resume: a save root (newest step) or a step dir; or hf:DIR to fine-tune a Hugging "
           "Face model (its config replaces --config, its tokenizer.json the default tokenizer)")
    a("--metrics", default=None, metavar="FILE", help="append JSON lines, one per step")
    a("--wandb", default=None, metavar="PROJECT", help="log to Weights & Biases")
    a("--log-every", type=int, default=10, help="a progress line every N steps")
    a("--eval-every", type=int, default=100, help="validation loss every N steps (0: only at the end)")
    a("--eval-batches", type=int, default=4,
      help="validation batches (of --global-batch-size sequences) per evaluation")
    a("--sample-tokens", type=int, default=300, help="tokens to sample at the end (0: none)")
    a("--peak-tflops", type=float, default=None,
      help="per-device peak for MFU (default: known GPUs, or a measured matmul on CPU)")
    a("--plan", action="store_true",
      help="print the predicted memory per rank and the step time (memory.py), then exit: "
           "no training, no weights allocated")
    a("--world-size", type=int, default=None,
      help="--plan: the world size the layout is planned for (default: this job's)")
    a("--plan-mfu", type=float, default=0.4, help="--plan: the MFU the step time assumes")
    a("--plan-gpu", default="H100", help="--plan: the GPU whose datasheet peak (GPU_PEAK_FLOPS) the "
      "step time assumes, unless --peak-tflops gives the peak")
    a("--device-memory-gb", type=float, default=None,
      help="--plan: device memory (GB); say whether the plan fits, and what would make it fit")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if "lr" not in vars(args):
        args.lr = DEFAULT_LR.get(args.model, DEFAULT_LR["default"])
    # Which flags the command gave (a resumed run keeps the checkpoint's schedule for the
    # others). Exact names only: allow_abbrev is off, so --warm cannot stand for --warmup-steps.
    args.given = sorted({action.dest for action in p._actions for arg in argv
                         if any(arg == o or arg.startswith(o + "=") for o in action.option_strings)})
    return args


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


def precision_context(precision, device, fp8_rest="bf16"):
    """Autocast for the forward pass; master weights and optimizer stay fp32. Under fp8
    the FP8 linears (parallel.enable_fp8) multiply in FP8 and the rest runs in `fp8_rest`."""
    if precision == "fp8":
        precision = fp8_rest
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
# Setup: the model's config, every check of the flags, then the run itself
# ----------------------------------------------------------------------------

def model_config(args):
    """(Config, tokenizer name, Hugging Face folder or None, where the config came from).

    From --model/--config/--set; or from the checkpoint of --load, so that resuming or
    fine-tuning needs none of them again (given, they must agree with it); or from the
    folder of `--load hf:DIR`. A preset's vocabulary grows to fit a larger --tokenizer
    unless --set vocab_size says otherwise. Then the --moe-* flags and, with --task, a
    classifier for the task's classes in place of BERT's pre-training heads."""
    hf_dir = args.load[len("hf:"):] if args.load and args.load.startswith("hf:") else None
    saved = None if hf_dir else saved_checkpoint(args)
    if hf_dir:
        hf_model, cfg = convert.read_hf_config(hf_dir)
        if hf_model != args.model:
            raise UsageError(f"--load {args.load} is a {hf_model} model; pass --model {hf_model}")
        cfg = dataclasses.replace(cfg, **models.parse_overrides(type(cfg), args.set))
        tokenizer = args.tokenizer or convert.tokenizer_name(hf_dir)  # the folder's own, if it has one
        source = f"Hugging Face folder {hf_dir}"
    elif saved:
        step_dir, meta = saved
        cfg, tokenizer = checkpoint_config(args, step_dir, meta)
        source = f"checkpoint {step_dir}"
    else:
        preset = args.config or DEFAULT_CONFIG
        cfg = models.make_config(args.model, preset, args.set)
        tokenizer = args.tokenizer or data.BYTE_TOKENIZER
        source = f"preset {preset}" + "".join(f" --set {s}" for s in args.set)
        needed = tokenizer_vocab(args.model, tokenizer)
        if needed > cfg.vocab_size and not any(s.startswith("vocab_size=") for s in args.set):
            cfg = dataclasses.replace(cfg, vocab_size=needed)
            source += f", vocab_size {needed} to fit tokenizer {tokenizer}"
    moe = {"capacity_factor": args.moe_capacity_factor, "aux_loss_coef": args.moe_aux_loss_coef,
           "z_loss_coef": args.moe_z_loss_coef}
    moe = {field: value for field, value in moe.items() if value is not None}
    if moe and not hasattr(cfg, "n_experts"):
        raise UsageError(f"--moe-* flags apply to mixture-of-experts models (--model mixtral), "
                         f"not to --model {args.model}")
    for field, value in moe.items():  # named as the user wrote them, before the config checks them
        errors.require_number(f"--moe-{field.replace('_', '-')}", value, at_least=0)
    cfg = dataclasses.replace(cfg, **moe)
    if saved:
        # (--task replaces the heads: a pre-trained BERT and its classifier differ there)
        trained = models.config_from_dict(meta["model"], meta["config"])
        differ = [f"{f.name}={getattr(trained, f.name)!r} (this command: {getattr(cfg, f.name)!r})"
                  for f in dataclasses.fields(cfg) if getattr(trained, f.name) != getattr(cfg, f.name)
                  and not (args.task and f.name in BERT_HEAD_FIELDS)]
        if differ:
            raise UsageError(f"{step_dir} was trained with {', '.join(differ)}; drop the flags "
                             f"that change them (the checkpoint's config is used) or make them agree")
    if args.task:
        if hf_dir:
            raise UsageError("--task with --load hf:DIR: import the folder first (python convert.py "
                             "import DIR CKPT), then fine-tune with --task ... --load CKPT")
        if args.model != "bert":
            raise UsageError(f"--task fine-tunes a classifier on an encoder: pass --model bert, "
                             f"not {args.model}")
        n_classes = len(data.task_class_names(args.task))
        cfg = dataclasses.replace(cfg, mlm_head=False, binary_head=False, n_classes=n_classes)
    return cfg, tokenizer, hf_dir, source


def tokenizer_vocab(model, tokenizer):
    """The ids a model trained with this tokenizer must embed (BERT's and T5's special
    tokens included). A UsageError for a tokenizer the model cannot use."""
    if model == "bert":
        return data.bert_special_tokens(tokenizer).n_vocab
    if model == "t5":
        return data.t5_special_tokens(tokenizer).n_vocab
    return data.get_tokenizer(tokenizer).n_vocab


def saved_checkpoint(args):
    """(step directory, meta) of the checkpoint --load names, or None (no --load, or the
    first run of a job that resumes itself, see nothing_to_resume)."""
    if not args.load or nothing_to_resume(args):
        return None
    if os.path.isfile(os.path.join(args.load, "config.json")):
        raise UsageError(f"--load {args.load} is a Hugging Face model folder: pass --load hf:{args.load}")
    step_dir = checkpoint.resolve(args.load)
    return step_dir, checkpoint.read_meta(step_dir)


def checkpoint_config(args, step_dir, saved):
    """(Config, tokenizer) of a checkpoint, as --config/--set/--tokenizer would change them
    (model_config then refuses any difference, naming the fields)."""
    if saved["model"] != args.model:
        raise UsageError(f"--load {args.load} holds a {saved['model']} model; pass --model {saved['model']}")
    cfg = models.config_from_dict(saved["model"], saved["config"])
    cfg = (models.make_config(args.model, args.config, args.set) if args.config else
           dataclasses.replace(cfg, **models.parse_overrides(type(cfg), args.set)))
    if args.tokenizer and args.tokenizer != saved["tokenizer"]:
        raise UsageError(f"{step_dir} was trained with tokenizer {saved['tokenizer']}; drop "
                         f"--tokenizer {args.tokenizer} or pass --tokenizer {saved['tokenizer']}")
    return cfg, saved["tokenizer"]


# The smallest value each numeric flag accepts (None: the flag's default applies).
FLAG_MINIMUM = {"steps": 1, "global_batch_size": 1, "micro_batch_size": 1, "seq_len": 1,
                "vpp": 1, "lr_decay_steps": 1, "log_every": 1, "eval_batches": 1,
                "loss_scale_window": 1, "warmup_steps": 0, "save_every": 0, "eval_every": 0,
                "sample_tokens": 0, "lr": 0, "min_lr_ratio": 0, "weight_decay": 0, "clip_grad": 0,
                "fp8_amax_history_len": 1, "fp8_margin": 0, "fp8_bf16_layers": 0,
                "recompute_layers": 1, "max_skipped_steps": 1}
# The value each float flag must exceed. Every float flag must be finite besides: --clip-grad
# inf would be "off", which 0 already says. (memory.plan_report checks the --plan flags.)
FLAG_ABOVE = {"adam_eps": 0, "peak_tflops": 0, "initial_loss_scale": 0, "ddp_bucket_mb": 0,
              "distributed_timeout_minutes": 0}

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


def pp_layers(args):
    """--pp-layers as a list of layer counts, or None."""
    try:
        return [int(n) for n in args.pp_layers.split(",")] if args.pp_layers else None
    except ValueError:
        raise UsageError(f"--pp-layers {args.pp_layers}: expected comma-separated integers") from None


def micro_batch_size(args, dp):
    """Sequences per forward pass: --micro-batch-size; by default all of a data rank's rows,
    in pp micro-batches under pipeline parallelism where they divide (with one, a pipeline
    runs one stage at a time, and the interleaved schedule needs a multiple of pp)."""
    if args.micro_batch_size:
        return args.micro_batch_size
    rows = args.global_batch_size // dp
    return rows // args.pp if args.pp > 1 and rows % args.pp == 0 else rows


def micro_steps(args, dp):
    """Micro-batches per step and data-parallel rank."""
    return args.global_batch_size // dp // micro_batch_size(args, dp)


def check_args(args, cfg, tokenizer):
    """Every check of the flags, before anything starts: a UsageError naming the fix, the
    same on every rank."""
    for name, value in vars(args).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, float):
            errors.require_number(flag, value, FLAG_MINIMUM.get(name), FLAG_ABOVE.get(name))
        elif value is not None and name in FLAG_MINIMUM:
            errors.require_number(flag, value, FLAG_MINIMUM[name])
    if args.min_lr_ratio > 1:
        raise UsageError(f"--min-lr-ratio is a fraction of --lr: between 0 and 1, got {args.min_lr_ratio}")
    fp8_flags = [f"--{name.replace('_', '-')}" for name in FP8_DEFAULTS
                 if getattr(args, name) != FP8_DEFAULTS[name]]
    if fp8_flags and args.precision != "fp8":
        raise UsageError(f"{fp8_flags[0]} applies to FP8 training only; add --precision fp8")
    if args.fp8_recipe not in parallel.FP8_RECIPES:
        raise UsageError(f"unknown --fp8-recipe {args.fp8_recipe}; choose one of "
                         f"{', '.join(parallel.FP8_RECIPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu")
    if args.ep > 1 and not hasattr(cfg, "n_experts"):
        raise UsageError(f"--ep {args.ep}: {args.model} has no experts; expert parallelism "
                         f"needs a mixture-of-experts model (--model mixtral)")
    n_vocab = tokenizer_vocab(args.model, tokenizer)  # a UsageError without BERT's or T5's specials
    if args.model == "bert":
        if not 0 < args.mask_prob <= 1:
            raise UsageError(f"--mask-prob must be in (0, 1], got {args.mask_prob}: a batch "
                             f"without a masked token has nothing to learn from")
    elif args.model == "t5":
        tokens = data.t5_special_tokens(tokenizer)
        if cfg.decoder_start_token_id != tokens.pad:
            raise UsageError(f"the decoder starts with token {cfg.decoder_start_token_id} but the "
                             f"tokenizer's pad token is {tokens.pad}; pass --set "
                             f"decoder_start_token_id={tokens.pad}")
        if args.cp > 1:
            raise UsageError("--cp: T5 does not support context parallelism (its cross-attention "
                             "would need a ring over keys of another length); use --tp, --pp or "
                             "data parallelism")
    if n_vocab > cfg.vocab_size:
        raise UsageError(f"tokenizer {tokenizer} has {n_vocab} tokens but the model's vocab_size "
                         f"is {cfg.vocab_size}; pass --set vocab_size={n_vocab}")
    max_seq_len = getattr(cfg, "max_seq_len", None)  # T5's relative positions have no limit
    if max_seq_len is not None and args.seq_len > max_seq_len:
        raise UsageError(f"--seq-len {args.seq_len} exceeds max_seq_len={max_seq_len}; "
                         f"pass --set max_seq_len={args.seq_len}")
    # The layout.
    dp = parallel.check_layout(args.world_size or parallel.world_size(), args.tp, args.cp, args.pp,
                               args.ep)
    if args.vpp > 1 and args.pp == 1:
        raise UsageError("--vpp needs pipeline parallelism: pass --pp > 1")
    if args.compile and args.precision == "fp8":
        raise UsageError("--compile with --precision fp8: the FP8 linears record their amaxes in "
                         "place, which torch.compile's backward refuses; drop one of them")
    if args.compile and kernels._INTERPRET and os.environ.get("KERNELS_BACKEND") == "triton":
        raise UsageError("--compile cannot trace the Triton kernels run by Triton's interpreter "
                         "(TRITON_INTERPRET=1, KERNELS_BACKEND=triton): drop --compile, or unset "
                         "KERNELS_BACKEND to compile the torch path")
    chunk_layers = parallel.pipeline_chunks(cfg.n_layers, args.pp, args.vpp, pp_layers(args))
    recompute_flags = [f for f, v in (("--recompute-method", args.recompute_method),
                                      ("--recompute-layers", args.recompute_layers)) if v is not None]
    if recompute_flags and args.recompute != "full":
        raise UsageError(f"{recompute_flags[0]} applies to --recompute full only")
    fewest = min(len(layers) for layers in chunk_layers)
    if (args.recompute_layers or 1) > fewest:
        raise UsageError(f"--recompute-layers {args.recompute_layers} exceeds the {fewest} layer(s) "
                         f"of a pipeline chunk ({cfg.n_layers} layers in pp*vpp = "
                         f"{args.pp * args.vpp} chunks); choose at most {fewest}")
    if args.cp > 1 and args.seq_len % (2 * args.cp):
        raise UsageError(f"--seq-len {args.seq_len} is not divisible by 2*cp = {2 * args.cp}, "
                         f"as context parallelism needs; change --seq-len or --cp")
    if args.sp and args.tp > 1 and args.seq_len // args.cp % args.tp:
        raise UsageError(f"--seq-len {args.seq_len} / cp is not divisible by tp={args.tp}, as "
                         f"sequence parallelism needs; change --seq-len or pass --no-sp")
    if args.model == "t5" and args.sp and args.tp > 1:
        decoder_len = data.span_corruption_lengths(args.seq_len)[1]
        if decoder_len % args.tp:
            raise UsageError(f"the decoder's {decoder_len} tokens are not divisible by tp={args.tp}, "
                             f"as sequence parallelism needs; pass --no-sp")
    # The batch.
    gbs, mbs = args.global_batch_size, micro_batch_size(args, dp)
    if gbs % dp:
        raise UsageError(f"--global-batch-size {gbs} is not divisible by dp={dp}")
    if (gbs // dp) % mbs:
        raise UsageError(f"--global-batch-size {gbs} is not divisible by micro-batch-size x dp "
                         f"= {mbs} x {dp}")
    if args.vpp > 1 and micro_steps(args, dp) % args.pp:
        raise UsageError(f"the interleaved schedule (--vpp) needs the micro-batches per step "
                         f"({micro_steps(args, dp)}) to be a multiple of pp={args.pp}; change "
                         f"--global-batch-size or --micro-batch-size")


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


@dataclasses.dataclass
class Run:
    """What one training run holds, made by setup()."""
    args: argparse.Namespace
    cfg: object
    layout: parallel.Layout
    tokenizer: str
    train_data: object
    val_data: object
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
    logger: object
    start_step: int = 0
    tokens_seen: int = 0
    start_note: str = ""     # a note on how the run started
    doing: str = "setting up"  # what the run is doing now, for an error from a failed peer
    skipped_in_a_row: int = 0  # --on-nonfinite skip: consecutive skipped steps
    stop: str = ""           # why the step just run ends training (non-finite), else ""

    @property
    def tokens_per_step(self):
        return self.args.global_batch_size * self.args.seq_len

    def close(self):
        """Release what the run holds; also after an exception."""
        self.ddp.close()
        self.logger.close()


# Fields that say which heads a BERT has: a pre-trained checkpoint differs from its
# fine-tuned classifier only in these.
BERT_HEAD_FIELDS = ("mlm_head", "binary_head", "n_classes")


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
        if now == saved[name]:
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


def nothing_to_resume(args):
    """`--load DIR --save DIR` before DIR holds a checkpoint: the first run of a job that
    resumes itself with the same command (a requeued job, scripts/slurm.sh). It starts at
    step 0; any other --load without a checkpoint is an error."""
    return (args.save is not None and os.path.realpath(args.load) == os.path.realpath(args.save)
            and not checkpoint.complete_steps(args.save))


def load_data(args, tokenizer):
    """(train, val) for the model: token windows (causal models), BERT's masked sentence
    pairs or T5's corrupted spans over the same windows, or with --task a labelled
    classification task."""
    if args.task:
        return data.load_task(args.task, tokenizer, args.seq_len)
    train_data, val_data = data.load_dataset(args.data, tokenizer, args.seq_len)
    if args.model == "bert":
        return tuple(data.MaskedLMData(d, tokenizer, args.mask_prob, args.whole_word_masking)
                     for d in (train_data, val_data))
    if args.model == "t5":
        return tuple(data.SpanCorruptionData(d, tokenizer) for d in (train_data, val_data))
    return train_data, val_data


def draw_batch(dataset, step, seed, args, rows):
    """The given rows of the step's global batch, as the model's keyword arguments."""
    batch = dataset.batch(step, seed, args.global_batch_size, args.seq_len, rows)
    if isinstance(batch, tuple):  # token windows: inputs and next-token targets
        batch = dict(zip(("input_ids", "labels"), batch))
    return batch


def setup(args, cfg, tokenizer, hf_dir, source, layout):
    """Build this rank's model chunks, optimizer and data; load --load; open the logs."""
    device = layout.device
    precision = args.precision if args.precision != "auto" else (
        "bf16" if device.type == "cuda" else "fp32")
    train_data, val_data = load_data(args, tokenizer)
    chunks = parallel.rank_chunks(layout, cfg.n_layers, pp_layers(args))
    schedule = "interleaved" if layout.vpp > 1 else args.pp_schedule
    steps_per_rank = micro_steps(args, layout.dp)

    torch.manual_seed(args.seed + layout.rank)
    modules = [models.build(args.model, cfg, device, args.seed, layout, c) for c in chunks]
    parallel.apply_recompute(modules, args.recompute, args.recompute_layers or 1,
                             args.recompute_method or "uniform")
    ddp = parallel.DataParallel(modules, layout, zero1=args.zero1, bucket_mb=args.ddp_bucket_mb)
    optimizer = parallel.AdamW(ddp, args.lr, args.weight_decay, eps=args.adam_eps)
    scaler = parallel.LossScaler(precision == "fp16", args.initial_loss_scale, args.loss_scale_window)
    fp8 = None
    if precision == "fp8":
        recipe = parallel.FP8Recipe(args.fp8_recipe, args.fp8_amax_history_len, args.fp8_margin)
        fp8 = parallel.enable_fp8(modules, recipe, layout, cfg.n_layers, args.fp8_bf16_layers)
    if args.compile:  # (after recompute and FP8 have set up the layers it compiles)
        parallel.apply_compile(modules)
    run = Run(args=args, cfg=cfg, layout=layout, tokenizer=tokenizer, train_data=train_data,
              val_data=val_data, chunks=chunks, modules=modules,
              actions=parallel.SCHEDULES[schedule](steps_per_rank, layout),
              micro_steps=steps_per_rank, ddp=ddp, optimizer=optimizer, scaler=scaler,
              autocast=precision_context(precision, device, args.fp8_rest), precision=precision,
              fp8=fp8, logger=None)
    resume = args.load and not hf_dir and not nothing_to_resume(args)
    if args.load and not hf_dir and not resume:
        run.start_note = f"--load {args.load}: no checkpoint there yet; starting at step 0"
    try:
        if hf_dir:  # fine-tuning starts at step 0 with fresh optimizer state
            for m in modules:
                convert.load_hf_weights(m, hf_dir)
        elif resume and starts_from_pretrained(args, cfg):
            step_dir = checkpoint.resolve(args.load)
            new = checkpoint.load_weights(step_dir, modules, layout)
            run.start_note = (f"fine-tuning from {step_dir}; new parameters: "
                              f"{', '.join(new) or 'none on this rank'}")
        elif resume:
            step_dir = checkpoint.resolve(args.load)
            meta = checkpoint.load(step_dir, modules, optimizer, layout)
            run.start_step, run.tokens_seen = meta["step"], meta["tokens_seen"]
            run.start_note = keep_schedule(args, meta.get("schedule"))
            scaler.scale, scaler.clean_steps = meta["loss_scale"], meta["loss_scale_clean_steps"]
            if fp8 is not None:
                load_fp8_history(fp8, step_dir, meta)
        if run.start_step >= args.steps:
            raise UsageError(f"--load {args.load}: the checkpoint is at step {run.start_step} and "
                             f"--steps is {args.steps}: nothing to train; pass a larger --steps")
        if args.save:
            check_save_root(args, run.start_step)
        run.logger = Logger(args, layout, metrics_header(run))
    except BaseException:
        ddp.close()
        raise
    log = run.logger.print
    log(f"{args.model} ({source}; tokenizer {tokenizer}): "
        f"{parallel.count_parameters(modules, layout) / 1e6:.2f}M parameters | {layout.describe()} | "
        f"{describe_precision(run)} | "
        f"{f'task {args.task}' if args.task else f'data {args.data}'}: "
        f"{train_data.n_tokens:,} train tokens | {run.tokens_per_step:,} tokens/step in "
        f"{steps_per_rank} micro-batch(es) per rank")
    if layout.pp > 1:
        log(f"pipeline: {schedule} schedule, chunks of layers "
            f"{parallel.pipeline_chunks(cfg.n_layers, layout.pp, layout.vpp, pp_layers(args))}, "
            f"theoretical bubble {parallel.bubble_fraction(schedule, steps_per_rank, layout):.1%}")
    if run.start_step:
        log(f"resumed from {checkpoint.resolve(args.load)} at step {run.start_step}")
    if args.task:
        log(f"{val_data.n_classes} classes (share of the validation text): " + ", ".join(
            f"{name} {share:.1%}" for name, share in zip(val_data.class_names, val_data.class_shares)))
    if run.start_note:
        log(run.start_note)
    return run


def metrics_header(run):
    """The record that starts a run's part of the --metrics file: what ran, where, from
    which step, so that the runs appended to one file stay separable."""
    return {"start_step": run.start_step, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
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
            "tokens_seen": run.tokens_seen, "optimizer_steps": run.optimizer.steps, "seed": args.seed,
            "loss_scale": run.scaler.scale, "loss_scale_clean_steps": run.scaler.clean_steps,
            "schedule": {name: getattr(args, name) for name in SCHEDULE_FLAGS}}
    meta["schedule"]["lr_decay_steps"] = args.lr_decay_steps or args.steps  # (its effective value)
    replicated = {}
    if run.fp8 is not None:
        meta["fp8"] = {"recipe": run.fp8.recipe.name, "history_len": run.fp8.recipe.history_len,
                       "steps_recorded": run.fp8.steps_recorded, "names": run.fp8.names}
        replicated["fp8.amax_history"] = run.fp8.history
    checkpoint.save(args.save, step, run.modules, run.optimizer, run.layout, meta, replicated)
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
    rows_per_rank, mbs = args.global_batch_size // layout.dp, micro_batch_size(args, layout.dp)
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
        loss_scale=(run.scaler.scale if run.scaler.enabled else 1.0) / global_targets)
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
def evaluate(run):
    """Mean loss over --eval-batches fixed validation batches (the same every time)."""
    args = run.args
    total = 0.0
    for i in range(args.eval_batches):
        total += forward_backward(run, lambda rows: draw_batch(run.val_data, i, args.seed + 1, args, rows),
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


def describe_accuracies(record, prefix=""):
    """"mlm acc 41.2% sentence order 63.0%" for the accuracies in a record ("" if none)."""
    baseline = "commonest token" if prefix + "mlm_accuracy" in record else "majority class"
    names = {"mlm_accuracy": "mlm acc", "sentence_order_accuracy": "sentence order",
             "accuracy": "acc", "majority_baseline": baseline}
    return " ".join(f"{label} {record[prefix + key]:.1%}" for key, label in names.items()
                    if prefix + key in record)


def describe_mfu(records, device):
    """The mean MFU of these steps' records, "41.2%" (of a GPU's datasheet peak), on a CPU
    "41.2% of cpu matmul" (see peak_flops), or "n/a" without a peak."""
    if records[0]["mfu"] is None:
        return "n/a"
    mfu = sum(r["mfu"] for r in records) / len(records)
    return f"{mfu:.1%}" if device.type == "cuda" else f"{mfu:.1%} of cpu matmul"


def clock(seconds):
    """h:mm:ss"""
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def read_metrics(path):
    """The step records of a --metrics file, in order (without the runs' header records)."""
    with open(path) as f:
        return [r for r in map(json.loads, f) if "step" in r]


def trim_metrics(path, start_step):
    """Before a run resumed at `start_step` appends to its --metrics file: remove the
    records of later steps, which the interrupted run wrote after its last checkpoint and
    this run trains again, so that no step is recorded twice; and a last line cut short by
    a crash. Only records of this run's lineage go: those after the header of the run that
    started it from step 0 (an earlier, unrelated run in the same file keeps its own).
    Returns how many records were removed."""
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    complete = [line for line in lines if line.endswith("\n")]  # a crash may cut the last one
    records = [json.loads(line) for line in complete]
    lineage = max((i for i, r in enumerate(records) if r.get("run", {}).get("start_step") == 0),
                  default=0)
    keep = [line for i, (line, r) in enumerate(zip(complete, records))
            if i < lineage or r.get("step", 0) <= start_step]
    if len(keep) < len(lines):
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return len(lines) - len(keep)


class Logger:
    """Where each step's record goes: a line every --log-every steps (rank 0; for Mixtral
    with the router's figures over the steps since the last line), the --metrics file (JSON
    lines: each run's header record, then one record per step) and wandb."""

    def __init__(self, args, layout, header):
        self.args, self.layout = args, layout
        self.router_steps = []  # router figures since the last line
        self.interval = []  # the records since the last line
        self.metrics = self.wandb = None
        if not layout.is_main:
            return
        if args.metrics:
            start = header["start_step"]
            try:
                removed = trim_metrics(args.metrics, start) if start and os.path.exists(args.metrics) else 0
                os.makedirs(os.path.dirname(args.metrics) or ".", exist_ok=True)  # as --save makes its folder
                self.metrics = open(args.metrics, "a")
            except OSError as e:
                raise UsageError(f"--metrics {args.metrics}: cannot open it ({e.strerror}); "
                                 f"choose another file") from None
            except ValueError:
                raise UsageError(f"--metrics {args.metrics} is not a metrics file (a line is not "
                                 f"JSON); choose another file") from None
            if removed:
                self.print(f"--metrics {args.metrics}: removed {removed} record(s) after step "
                           f"{start}, which this run trains again")
            self.write({"run": header})
        if args.wandb:
            try:
                import wandb
            except ImportError:
                self.close()
                raise UsageError("--wandb needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project=args.wandb, config=vars(args))

    def print(self, *what, **kwargs):
        if self.layout.is_main:
            print(*what, **kwargs)

    def step(self, record, router, elapsed, eta):
        """Log one step's record; `elapsed` and `eta` in seconds."""
        if router:
            self.router_steps.append(router)
        self.interval.append(record)
        done, args = record["step"], self.args
        if done % args.log_every == 0 or done == args.steps or "val_loss" in record:
            steps, self.interval = self.interval, []  # speed over the steps since the last line
            step_time = sum(r["step_time"] for r in steps) / len(steps)
            on_gpu = self.layout.device.type == "cuda"
            memory = f"peak mem {record['mem_gb']:.2f} GB" if on_gpu else f"peak rss {record['mem_gb']:.2f} GB"
            train_acc, val_acc = describe_accuracies(record), describe_accuracies(record, "val_")
            train_acc = f" ({train_acc})" if train_acc else ""
            val = f" | val {record['val_loss']:.4f}" if "val_loss" in record else ""
            val += f" ({val_acc})" if val_acc else ""
            moe = self.describe_router() if self.router_steps else ""
            self.print(f"step {done:5d}/{args.steps} | loss {record['loss']:.4f}{train_acc}{val}{moe} | lr "
                       f"{record['lr']:.2e} | grad {record['grad_norm']:.2f} | "
                       f"{args.global_batch_size * args.seq_len / step_time:,.0f} tok/s | step "
                       f"{step_time:.2f}s | mfu {describe_mfu(steps, self.layout.device)} | {memory} | "
                       f"{clock(elapsed)} elapsed, eta {clock(eta)}", flush=True)
        if self.metrics:
            self.write(record)
        if self.wandb:
            self.wandb.log(record, step=done)

    def write(self, record):
        """One line of the --metrics file, on disk now (a crash loses no record)."""
        try:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        except OSError as e:
            file, self.metrics = self.metrics, None
            with contextlib.suppress(OSError):  # (closing flushes the same bytes, and fails again)
                file.close()
            reason = "the disk is full" if e.errno == errno.ENOSPC else e.strerror
            raise UsageError(f"--metrics {self.args.metrics}: cannot write it ({reason}); free "
                             f"space or choose another file") from None

    def describe_router(self):
        """Mean losses over the interval's steps, tokens per expert (fewest and most, over
        layers and experts) and the dropped fraction."""
        steps, self.router_steps = self.router_steps, []
        tokens = sum(s["tokens_per_expert"] for s in steps)
        mean = {k: sum(s[k] for s in steps) / len(steps) for k in ("aux_loss", "z_loss", "dropped_fraction")}
        return (f" | aux {mean['aux_loss']:.4f} z {mean['z_loss']:.2e} | tokens/expert "
                f"{tokens.min().item():,.0f}-{tokens.max().item():,.0f} | dropped "
                f"{mean['dropped_fraction']:.1%}")

    def close(self):
        if self.metrics:
            self.metrics.close()
        if self.wandb:
            self.wandb.finish()
        self.metrics = self.wandb = None


# ----------------------------------------------------------------------------
# Stopping on a signal
# ----------------------------------------------------------------------------

class StopSignals:
    """SIGTERM (how schedulers preempt a job, and how torchrun stops its workers), SIGINT
    (Ctrl-C) and SIGUSR1 (SLURM's warning before the time limit, see scripts/slurm.sh) do
    not kill training: the handler only notes the signal. After each step the ranks agree
    on it, since a signal may reach one rank only, and all stop after that same step,
    saving a checkpoint first. Only while training: elsewhere the signals act as usual."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, announce):
        self.received, self.announce, self.previous = 0, announce, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # (only it may set handlers)
            self.previous = {sig: signal.signal(sig, self.note) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

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
    peak = peak_flops(layout.device, args)
    records, t_start = [], time.perf_counter()
    with StopSignals(announce=layout.is_main) as signals:
        for step in range(run.start_step, args.steps):
            run.doing, t_step = f"step {step + 1}", time.perf_counter()
            compiled_before = parallel.compile_seconds()
            record = train_step(run, step)
            router = router_figures(run.modules, layout, run.tokens_per_step)
            record.update(head_figures(run))
            # (evaluation, saving and --compile's compilation, reported apart, not included)
            compile_s = parallel.compile_seconds() - compiled_before
            step_time = time.perf_counter() - t_step - compile_s
            if compile_s:
                record["compile_s"] = compile_s
                run.logger.print(f"compile: {compile_s:.1f} s (step {step + 1}; not in its step time)")
            record.update(tokens_per_s=run.tokens_per_step / step_time, step_time=step_time,
                          mfu=step_flops / step_time / (peak * layout.world) if peak else None,
                          mem_gb=memory_gb(layout.device),
                          **{k: v for k, v in router.items() if k != "tokens_per_expert"})
            done = step + 1
            if done % (args.eval_every or args.steps) == 0 or done == args.steps:
                run.doing = f"the evaluation after step {done}"
                record["val_loss"] = evaluate(run)
                record.update({"val_" + k: v for k, v in head_figures(run).items()})
                if hasattr(run.val_data, "majority_share"):  # what always answering the commonest scores
                    record["val_majority_baseline"] = run.val_data.majority_share
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
    speed = f"{run.tokens_per_step * len(records) / sum(r['step_time'] for r in records):,.0f} tok/s"
    if records[0]["mfu"] is not None:
        speed += f", mfu {describe_mfu(records, run.layout.device)}"
    files = [f"checkpoints in {args.save}" if args.save else "no checkpoint (no --save)"]
    files += [f"metrics in {args.metrics}"] if args.metrics else []
    return (f"done: {len(records)} steps in {clock(seconds)} | loss {records[0]['loss']:.4f} -> "
            f"{records[-1]['loss']:.4f} | val {evaluated[-1]['val_loss']:.4f} (best "
            f"{best['val_loss']:.4f} at step {best['step']}) | {speed} | {', '.join(files)}")


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
    args = run.args
    extra = {"decoder_len": data.span_corruption_lengths(args.seq_len)[1]} if args.model == "t5" else {}
    return run.modules[0].flops_per_token(args.seq_len, **extra) * run.tokens_per_step


def train(args):
    """Train as the flags say; return the records of the steps run (one dict per step,
    what --metrics writes). Under torchrun every rank calls this."""
    cfg, tokenizer, hf_dir, source = model_config(args)
    check_args(args, cfg, tokenizer)
    layout = parallel.init_distributed(args.tp, args.cp, args.pp, args.ep, args.sp, args.vpp,
                                       args.cp_comm, None if args.device == "auto" else args.device,
                                       timeout_minutes=args.distributed_timeout_minutes)
    run = None
    try:
        run = setup(args, cfg, tokenizer, hf_dir, source, layout)
        records = training_loop(run)
    except (UsageError, NonFinite):
        # Every rank checks the same input (the same all-reduced figures) and fails alike,
        # so they can all leave cleanly.
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
    args = parse_args(argv)
    try:
        if args.plan:
            import memory  # (here, not at the top: memory.py imports this file)
            print(memory.plan_report(args))
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
    except PeerFailure as e:  # (each rank that saw it: the main rank may be the one that failed)
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # now: no teardown that would wait for the missing rank again


if __name__ == "__main__":
    main()
