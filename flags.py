"""train.py's command line: its flags in groups, every check of them, and the model's config
and tokenizer they name (from --model/--config/--set, a checkpoint, or a Hugging Face folder).
Everything here runs before any process group, model or batch exists, the same on every rank:
a bad flag is one UsageError naming the fix. (memory.py's --plan uses the same checks.)

  Flags                  parse_args: model, data, optimization, parallelism, precision,
                         memory and speed, checkpointing, logging, planning
  The model's config     model_config: a preset, a checkpoint's or a Hugging Face folder's
  Checks                 check_args (numbers, the family, the layout, the batch), check_save_root
"""
import argparse
import dataclasses
import os
import sys

import torch

import checkpoint
import convert
import data
import errors
import kernels
import models
import parallel
from errors import UsageError

# The preset a run uses without --config (or --load).
DEFAULT_CONFIG = "tiny"

# The FP8 flags' defaults: given otherwise without --precision fp8, they are an error.
FP8_DEFAULTS = {"fp8_recipe": "delayed", "fp8_amax_history_len": 1024, "fp8_margin": 0,
                "fp8_bf16_layers": 1, "fp8_rest": "bf16"}


# ----------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------

def parse_args(argv=None):
    """train.py's flags, in groups (`python train.py --help` lists them so)."""
    p = errors.ArgumentParser(description="Train a language model.", allow_abbrev=False)
    a = p.add_argument_group("model").add_argument
    a("--model", default=None, help=f"one of: {', '.join(models.FAMILIES)} (default: the model "
                                     f"--load names)")
    a("--config", default=None,
      help=f"preset of the model file (test, tiny, llama3-8b, gpt2, ...; default: {DEFAULT_CONFIG}, "
           f"or with --load the checkpoint's own config)")
    a("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    a("--moe-capacity-factor", type=float, default=None,
      help="mixture of experts: each expert keeps at most factor x its even share of a "
           "micro-batch's choices, dropping the rest (default: the preset's, 0 = dropless)")
    a("--moe-aux-loss-coef", type=float, default=None,
      help="mixture of experts: load-balancing loss coefficient (default: the preset's)")
    a("--moe-z-loss-coef", type=float, default=None,
      help="mixture of experts: router z-loss coefficient (default: the preset's)")
    a("--moe-router-score-function", choices=["softmax", "sigmoid"], default=None,
      help="mixture of experts: the router's scores (default: the preset's, softmax)")
    a("--moe-router-num-groups", type=int, default=None,
      help="mixture of experts: group-limited routing over this many expert groups (default: none)")
    a("--moe-router-group-topk", type=int, default=None,
      help="mixture of experts: the groups each token keeps, with --moe-router-num-groups")
    a("--moe-router-bias-update-rate", type=float, default=None,
      help="mixture of experts: the auxiliary-loss-free expert bias, moved this much a step "
           "towards the mean load (default: the preset's, 0 = none)")
    a("--moe-router-load-balancing-type", choices=["aux_loss", "seq_aux_loss", "global_aux_loss"], default=None,
      help="mixture of experts: the balance loss over each micro-batch (aux_loss), each "
           "sequence (seq_aux_loss) or the global batch (global_aux_loss) (default: the preset's, aux_loss)")

    a = p.add_argument_group("data").add_argument
    a("--data", nargs="+", default=["stdlib"], metavar="SOURCE",
      help="stdlib (built in), a text or JSON Lines file/folder/glob, a prepared dir, or a Megatron "
           "dataset's PREFIX (PREFIX.bin + .idx); or a blend: WEIGHT SOURCE WEIGHT SOURCE ...")
    a("--json-key", default="text", help="JSON Lines data: the key of each record's text")
    a("--split", default=None, metavar="TRAIN,VAL[,TEST]",
      help="shares of the documents for training, validation and test, e.g. 98,1,1 (Megatron's); "
           "a test share is evaluated at the end (default: 95,5; a prepared folder: its own split)")
    a("--eod-mask-loss", action="store_true",
      help="causal models: no loss on the prediction made at each end-of-text (its target starts "
           "another document) (Megatron's flag)")
    a("--reset-attention-mask", action="store_true",
      help="llama, gpt, mixtral: a token attends only within its document (documents end with "
           "end-of-text) (Megatron's flag)")
    a("--reset-position-ids", action="store_true",
      help="llama, gpt, mixtral: positions restart at 0 after each end-of-text (Megatron's flag)")
    a("--tokenizer", default=None,
      help="byte, gpt2, cl100k_base, o200k_base, or hf:DIR (a Hugging Face tokenizer.json) "
           "(default: the tokenizer of the --load checkpoint or folder, or of the prepared "
           "--data, else byte)")
    a("--seq-len", type=int, default=256, help="tokens per training sequence")
    a("--mask-prob", type=float, default=0.15,
      help="bert pre-training: share of tokens to predict (80%% [MASK], 10%% random, 10%% kept)")
    a("--whole-word-masking", action="store_true", help="bert pre-training: mask whole words")
    a("--task", default=None, metavar="TASK",
      help="bert: fine-tune a sequence classifier on a labelled task instead of pre-training: "
           "stdlib-packages (built in: which standard-library package a snippet is from) or a "
           "directory with one sub-directory of text files per class; --load a pre-trained "
           "checkpoint to start from it")

    a = p.add_argument_group("optimization").add_argument
    a("--steps", type=int, default=200, help="optimizer steps to train (in all, counting a resumed "
      "run's earlier steps)")
    a("--global-batch-size", type=int, default=16, help="sequences per optimizer step")
    a("--micro-batch-size", type=int, default=None,
      help="sequences per forward pass (default: global batch / dp, no accumulation; under "
           "pipeline parallelism global batch / dp / pp, pp micro-batches per step)")
    a("--warmup-steps", type=int, default=20, help="steps of linear learning-rate warmup")
    a("--lr-decay-steps", type=int, default=None, help="cosine decay length (default: --steps)")
    a("--lr", type=float, default=argparse.SUPPRESS,  # (a default that depends on --model)
      help=f"peak learning rate (default: {models.Family.default_lr:g}; " + ", ".join(
          f"{name} {f.default_lr:g}" for name, f in models.FAMILIES.items()
          if f.default_lr != models.Family.default_lr) + ")")
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
    a("--seed", type=int, default=1337,
      help="weights and batches follow from it: the same seed, the same run, on any layout")

    a = p.add_argument_group("parallelism").add_argument
    a("--tp", type=int, default=1, help="tensor-parallel size")
    a("--pp", type=int, default=1, help="pipeline-parallel size")
    a("--cp", type=int, default=1, help="context-parallel size")
    a("--ep", type=int, default=1, help="expert-parallel size")
    a("--etp", type=int, default=None,
      help="expert tensor-parallel size, dividing --tp (default: --tp): the experts are split over "
           "etp ranks, and ep may span the tp ranks it leaves")
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
    a("--device", choices=["auto", "cpu", "cuda"], default="auto",
      help="auto: cuda (+ NCCL) when a GPU is visible, else cpu (+ gloo)")
    a("--distributed-timeout-minutes", type=float, default=10.0,
      help="how long a rank waits for the others in any collective or pipeline message before "
           "it gives up with an error naming what it waited for (a rank died, hangs or was stopped)")

    a = p.add_argument_group("precision").add_argument
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
    a("--grad-dtype", choices=["fp32", "model"], default="fp32",
      help="bf16/fp16: the dtype gradients accumulate and are reduced in: fp32 (Megatron's "
           "--accumulate-allreduce-grads-in-fp32), or the model's (half the memory and bytes)")
    a("--fp32-residual", action="store_true",
      help="bf16/fp16: keep the residual stream (and what pipeline stages send) in fp32, not "
           "the model's dtype (Megatron's --fp32-residual-connection)")
    a("--initial-loss-scale", type=float, default=2.0**16, help="fp16: the loss scale to start from")
    a("--loss-scale-window", type=int, default=1000,
      help="fp16: double the loss scale after this many steps without overflow")

    a = p.add_argument_group("memory and speed").add_argument
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

    a = p.add_argument_group("checkpointing").add_argument
    a("--save", default=None, metavar="DIR", help="checkpoint root")
    a("--save-every", type=int, default=0, help="also save every N steps (always at the end)")
    a("--load", default=None, metavar="DIR",
      help="resume: a save root (newest step) or a step dir; or hf:DIR to fine-tune a Hugging "
           "Face model (its config replaces --config, its tokenizer.json the default tokenizer)")

    a = p.add_argument_group("logging").add_argument
    a("--metrics", default=None, metavar="FILE", help="append JSON lines, one per step")
    a("--wandb", default=None, metavar="PROJECT", help="log to Weights & Biases")
    a("--log-every", type=int, default=10, help="a progress line every N steps")
    a("--eval-every", type=int, default=100, help="validation loss every N steps (0: only at the end)")
    a("--eval-batches", type=int, default=4,
      help="validation batches (of --global-batch-size sequences) per evaluation")
    a("--sample-tokens", type=int, default=300, help="tokens to sample at the end (0: none)")
    a("--peak-tflops", type=float, default=None,
      help="per-device peak for MFU (default: known GPUs, or a measured matmul on CPU)")

    a = p.add_argument_group("planning (no training)").add_argument
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
    if args.model is None:
        try:
            args.model = loaded_model(args)
        except UsageError as e:
            p.error(str(e))
    if "lr" not in vars(args):  # (an unknown --model is refused later, with the other checks)
        args.lr = getattr(models.FAMILIES.get(args.model), "default_lr", models.Family.default_lr)
    # Which flags the command gave (a resumed run keeps the checkpoint's schedule for the
    # others). Exact names only: allow_abbrev is off, so --warm cannot stand for --warmup-steps.
    args.given = sorted({action.dest for action in p._actions for arg in argv
                         if any(arg == o or arg.startswith(o + "=") for o in action.option_strings)})
    return args


# ----------------------------------------------------------------------------
# The model's config
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
        tokenizer = args.tokenizer or data.recorded_tokenizer(args.data) or data.BYTE_TOKENIZER
        source = f"preset {preset}" + "".join(f" --set {s}" for s in args.set)
        needed = tokenizer_vocab(args.model, tokenizer)
        if needed > cfg.vocab_size and not any(s.startswith("vocab_size=") for s in args.set):
            cfg = dataclasses.replace(cfg, vocab_size=needed)
            source += f", vocab_size {needed} to fit tokenizer {tokenizer}"
    balancing = {"aux_loss": "micro_batch", "seq_aux_loss": "sequence", "global_aux_loss": "global"}
    moe = {"capacity_factor": args.moe_capacity_factor, "aux_loss_coef": args.moe_aux_loss_coef,
           "z_loss_coef": args.moe_z_loss_coef, "router_score": args.moe_router_score_function,
           "router_groups": args.moe_router_num_groups, "router_group_topk": args.moe_router_group_topk,
           "expert_bias_rate": args.moe_router_bias_update_rate,
           "balance_loss": balancing.get(args.moe_router_load_balancing_type)}
    moe = {field: value for field, value in moe.items() if value is not None}
    if moe and not hasattr(cfg, "n_experts"):
        raise UsageError(f"--moe-* flags apply to mixture-of-experts models (--model mixtral), "
                         f"not to --model {args.model}")
    for flag in ("moe_capacity_factor", "moe_aux_loss_coef", "moe_z_loss_coef", "moe_router_num_groups",
                 "moe_router_group_topk", "moe_router_bias_update_rate"):  # before the config checks them
        if getattr(args, flag) is not None:
            errors.require_number(f"--{flag.replace('_', '-')}", getattr(args, flag), at_least=0)
    cfg = dataclasses.replace(cfg, **moe)
    if saved:
        # (--task replaces the heads: a pre-trained BERT and its classifier differ there)
        trained = models.config_from_dict(meta["model"], meta["config"])
        differ = [f"{f.name}={getattr(trained, f.name)!r} (this command: {getattr(cfg, f.name)!r})"
                  for f in dataclasses.fields(cfg) if getattr(trained, f.name) != getattr(cfg, f.name)
                  and not (args.task and f.name in models.family(args.model).classifier_fields)]
        if differ:
            raise UsageError(f"{step_dir} was trained with {', '.join(differ)}; drop the flags "
                             f"that change them (the checkpoint's config is used) or make them agree")
    if args.task:
        if hf_dir:
            raise UsageError("--task with --load hf:DIR: import the folder first (python convert.py "
                             "import DIR CKPT), then fine-tune with --task ... --load CKPT")
        family = models.family(args.model)
        if family.classifier is None:
            able = ", ".join(name for name, f in models.FAMILIES.items() if f.classifier)
            raise UsageError(f"--task fine-tunes a classifier on an encoder: pass --model {able}, "
                             f"not {args.model}")
        cfg = family.classifier(cfg, len(data.task_class_names(args.task)))
    return cfg, tokenizer, hf_dir, source


def tokenizer_vocab(model, tokenizer):
    """The ids a model trained with this tokenizer must embed (BERT's and T5's special
    tokens included). A UsageError for a tokenizer the model cannot use."""
    special_tokens = models.family(model).special_tokens
    return (special_tokens or data.get_tokenizer)(tokenizer).n_vocab


def saved_checkpoint(args):
    """(step directory, meta) of the checkpoint --load names, or None (no --load, or the
    first run of a job that resumes itself, see nothing_to_resume)."""
    if not args.load or nothing_to_resume(args):
        return None
    if os.path.isfile(os.path.join(args.load, "config.json")):
        raise UsageError(f"--load {args.load} is a Hugging Face model folder: pass --load hf:{args.load}")
    step_dir = checkpoint.resolve(args.load)
    return step_dir, checkpoint.read_meta(step_dir)


def loaded_model(args):
    """The model family of what --load names (a checkpoint's meta.json, a Hugging Face
    folder's config.json), for a command that gives no --model; a UsageError when there is
    none to read."""
    if args.load and args.load.startswith("hf:"):
        return convert.read_hf_config(args.load[len("hf:"):])[0]
    saved = saved_checkpoint(args) if args.load else None
    if saved is None:
        raise UsageError(f"--model is required: one of {', '.join(models.FAMILIES)} (a --load of a "
                         f"checkpoint or Hugging Face folder names its own)")
    return saved[1]["model"]


def nothing_to_resume(args):
    """`--load DIR --save DIR` before DIR holds a checkpoint: the first run of a job that
    resumes itself with the same command (a requeued job, scripts/slurm.sh). It starts at
    step 0; any other --load without a checkpoint is an error."""
    return (args.save is not None and os.path.realpath(args.load) == os.path.realpath(args.save)
            and not checkpoint.complete_steps(args.save))


def checkpoint_config(args, step_dir, saved):
    """(Config, tokenizer) of a checkpoint, as --config/--set/--tokenizer would change them
    (model_config then refuses any difference, naming the fields)."""
    if saved["model"] != args.model:
        raise UsageError(f"--load {args.load} holds a {saved['model']} model; pass --model {saved['model']}")
    cfg = models.config_from_dict(saved["model"], saved["config"])
    cfg = (models.make_config(args.model, args.config, args.set) if args.config else
           dataclasses.replace(cfg, **models.parse_overrides(type(cfg), args.set)))
    if args.tokenizer and args.tokenizer != saved["tokenizer"]:
        # The same tokenizer somewhere else (its folder moved): the recorded fingerprint says so.
        if saved.get("tokenizer_fingerprint") == data.tokenizer_fingerprint(args.tokenizer):
            return cfg, args.tokenizer
        raise UsageError(f"{step_dir} was trained with tokenizer {saved['tokenizer']}, which "
                         f"--tokenizer {args.tokenizer} does not encode as; drop --tokenizer, or pass the "
                         f"same tokenizer (a moved folder is checked by what it encodes)")
    return cfg, checkpoint.tokenizer(step_dir, saved)


# ----------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------

# The smallest value each numeric flag accepts (None: the flag's default applies).
FLAG_MINIMUM = {"steps": 1, "global_batch_size": 1, "micro_batch_size": 1, "seq_len": 1,
                "vpp": 1, "lr_decay_steps": 1, "log_every": 1, "eval_batches": 1,
                "loss_scale_window": 1, "warmup_steps": 0, "save_every": 0, "eval_every": 0,
                "sample_tokens": 0, "lr": 0, "min_lr_ratio": 0, "weight_decay": 0, "clip_grad": 0,
                "fp8_amax_history_len": 1, "fp8_margin": 0, "fp8_bf16_layers": 0,
                "recompute_layers": 1, "max_skipped_steps": 1, "seed": 0, "initial_loss_scale": 1}

# The largest value a flag takes: beyond any real run, and where a typo would fail deep
# inside (the seed overflows torch's generator; an index of 1e12 rows; a timedelta overflows).
FLAG_MAXIMUM = {"seed": 2**62, "global_batch_size": 2**24, "micro_batch_size": 2**24,
                "distributed_timeout_minutes": 7 * 24 * 60, "fp8_amax_history_len": 100_000}


# The value each float flag must exceed. Every float flag must be finite besides: --clip-grad
# inf would be "off", which 0 already says. (plan.report checks the --plan flags.) A
# loss scale starts at 1 or more: below, it shrinks fp16's gradients into underflow.
FLAG_ABOVE = {"adam_eps": 0, "peak_tflops": 0, "ddp_bucket_mb": 0, "distributed_timeout_minutes": 0}


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
            errors.require_number(flag, value, FLAG_MINIMUM.get(name), FLAG_ABOVE.get(name),
                                  FLAG_MAXIMUM.get(name))
        elif value is not None and (name in FLAG_MINIMUM or name in FLAG_MAXIMUM):
            errors.require_number(flag, value, FLAG_MINIMUM.get(name), at_most=FLAG_MAXIMUM.get(name))
    if args.min_lr_ratio > 1:
        raise UsageError(f"--min-lr-ratio is a fraction of --lr: between 0 and 1, got {args.min_lr_ratio}")
    # (before anything lists the layers: n_layers=1000000000 is a typo, not a model)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    models.check_layer_count(args.model, cfg, parallel.Layout(tp=args.tp, pp=args.pp), device)
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
    if args.etp is not None and not hasattr(cfg, "n_experts"):
        raise UsageError(f"--etp {args.etp}: {args.model} has no experts; expert tensor parallelism "
                         f"needs a mixture-of-experts model (--model mixtral)")
    if args.etp is not None and args.etp < args.tp and args.precision == "fp8":
        raise UsageError(f"--precision fp8 with --etp {args.etp} below --tp {args.tp} is not supported "
                         f"yet (each group of experts would need amaxes of its own); leave --etp out")
    n_vocab = tokenizer_vocab(args.model, tokenizer)  # a UsageError without BERT's or T5's specials
    document_flags = [flag for flag, on in (("--reset-attention-mask", args.reset_attention_mask),
                                            ("--reset-position-ids", args.reset_position_ids)) if on]
    if document_flags and not models.family(args.model).documents:
        raise UsageError(f"{document_flags[0]} applies to the attention decoders (--model llama, gpt, "
                         f"mixtral), not {args.model}")
    if document_flags and args.task:
        raise UsageError(f"{document_flags[0]} applies to token data, not --task")
    check_family = models.family(args.model).check  # (what only this family refuses)
    if check_family:
        check_family(args, cfg, tokenizer)
    if n_vocab > cfg.vocab_size:
        raise UsageError(f"tokenizer {tokenizer} has {n_vocab} tokens but the model's vocab_size "
                         f"is {cfg.vocab_size}; pass --set vocab_size={n_vocab}")
    max_seq_len = getattr(cfg, "max_seq_len", None)  # T5's relative positions have no limit
    if max_seq_len is not None and args.seq_len > max_seq_len:
        raise UsageError(f"--seq-len {args.seq_len} exceeds max_seq_len={max_seq_len}; "
                         f"pass --set max_seq_len={args.seq_len}")
    # The layout.
    dp = parallel.check_layout(args.world_size or parallel.world_size(), args.tp, args.cp, args.pp,
                               args.ep, args.etp)
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


def _self_and_parents(path):
    path = os.path.realpath(path)
    while True:
        yield path
        if os.path.dirname(path) == path:
            return
        path = os.path.dirname(path)


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
    step_dir = next((d for d in _self_and_parents(args.save) if checkpoint.STEP_NAME.fullmatch(os.path.basename(d))
                     and os.path.isfile(os.path.join(d, "meta.json"))), None)
    if step_dir is not None:
        raise UsageError(f"--save {args.save} is inside the checkpoint {step_dir}; save into a root "
                         f"of its own (checkpoints nested in a step would start again from step 0)")
    later = [s for s in checkpoint.complete_steps(args.save) if s > start_step]
    if later and not args.load:
        raise UsageError(f"--save {args.save} already holds checkpoints (newest step {later[-1]}); "
                         f"pass --load {args.save} to resume, or choose another directory")
    if later:
        raise UsageError(f"--save {args.save} holds steps after the resumed step {start_step} "
                         f"(up to {later[-1]}) that this run would overwrite; choose another "
                         f"--save directory")
