"""Benchmarks: `python bench.py MODE [options] [--json FILE]`.

Speed and memory targets are checked here, never in timed tests. Each mode prints a
small table and a one-line summary; `--json FILE` also writes its numbers, so a figure
quoted in a note comes from a command anyone can rerun.

Modes (in the order of their sections below):
  train-vs-hf   training tokens/s of our `llama` against transformers' LlamaForCausalLM
                of the identical shape and weights, in one process (target: ours >= 1.0x).
                python bench.py train-vs-hf [--config tiny] [--batch-size 16] [--seq-len 256]
                [--compile] (also ours with its layers compiled, same process and shape)
  zero1-memory  optimizer-state bytes per rank at dp=4 with and without ZeRO-1 (expect ~1/4)
  sp-memory     activations saved for backward per rank at tp=2, seq 1024, with and without
                sequence parallelism (expect the norm/residual part ~1/2)
  pp-schedules  first-stage activation memory of GPipe vs 1F1B at pp=2,4 with 8 micro-batches,
                and measured step time against the theoretical bubble
  cp-memory     activation memory per rank of the tiny llama at seq 8192 with cp = 1, 2, 4
                (expect ~1/cp), and bytes sent per rank, ring vs all-gather
  moe-ep        training tokens/s of the tiny Mixtral at ep = 1, 2, 4 (and plain dp at the
                same process counts) with the same global batch, and all-to-all bytes per step;
                each with the experts as grouped matmuls and as their reference loop
  kernels       attention forward/backward TFLOP/s vs SDPA (flash), head dim 128, seq 1k-16k;
                T5's attention (relative position bias inside the kernel) vs SDPA with the
                bias materialized, head dim 64, seq 1k-4k;
                RMSNorm and SwiGLU GB/s vs the card's HBM peak and torch.compile (GPU targets:
                attention fwd >= 1.0x, bwd >= 0.9x SDPA; RMSNorm >= 80%, SwiGLU >= 85% of peak);
                chunked linear + cross-entropy (llama3's vocabulary) vs logits at once: time, memory;
                on a GPU also Mamba-2's SSD scan (Triton) vs ssd_chunked and mamba_ssm, fwd and fwd+bwd
  kernels-compile  every Triton kernel and autotune configuration compiled ahead of time for
                sm_80 and sm_90 (the FP8 matmul for sm_89 and sm_90), no GPU needed: registers
                and spilled bytes (ptxas), shared memory against the card's limit
  fp8-gemm      FP8 GEMM TFLOP/s of kernels.fp8_matmul (tensorwise and row-wise scales) against
                torch._scaled_mm (cuBLASLt) and bf16 torch.matmul at 8192^3 and an 8B model's
                projections on 8192 tokens (target: ours >= 0.95x _scaled_mm); on a CPU, what
                the emulation (quantize + fp8_matmul_reference) costs against an fp32 matmul
  fp8-curve     FP8 training's per-step loss against fp32's on the same batches: the default
                recipe (delayed, bf16 rest) and each recipe alone (every layer FP8, fp32 rest)
                python bench.py fp8-curve [--config tiny] [--steps 120] [--skip-bf16]
  long-context  forward + backward time and activation memory per token against sequence
                length, a Mamba-2 model and a LLaMA of similar size in one run (expect Mamba's
                time per token to stay flat and LLaMA's to grow with the length; memory per
                token stays flat for both, attention being a fused kernel on CPU and GPU)
  mfu           one device training a ~1B LLaMA (LLaMA 3.2 1B's shape) in bf16 at seq 4096:
                tokens/s and MFU against the card's datasheet peak, eager vs --compile, with
                kernels.py's torch and Triton paths; on a CPU the test preset at seq 64, fp32
                (a CPU figure, against a measured matmul)
                python bench.py mfu [--seq-len 4096] [--batch-size 2] [--backends torch triton]
  recompute     activation recomputation none / selective / full: the activations of one
                micro-batch and the forward + backward time of the tiny llama (CPU) or, on a
                GPU, e.g. --config llama3-8b --set n_layers=2 --seq-len 4096
  megatron-memory  the planner's (train.py --plan's) bytes per GPU on pipeline stage 0 beside
                Megatron's formula (Korthikanti et al. 2022, written out here) for GPT-3 22B and
                175B (their Table 3 layouts) and llama3-70b/8b, bf16, sp, ZeRO-1 (target: <= 1.1x);
                no GPU needed
  generate      decoding tokens/s and KV-cache bytes of a sliding-window llama (test dims,
                window 256) at context 1k-8k, rolling cache vs full cache (expect the rolling
                bytes flat, the full ones growing with the context); 8 prompts batched vs one by one
  determinism   two identical training runs (separate processes, the README's tiny llama by
                default: 200 steps) give bit-identical metrics: every loss, gradient norm,
                learning rate and validation loss equal, not merely close
                python bench.py determinism [--steps 200] [--nproc 1] [-- extra train.py flags]
  plot          training curves of one or more --metrics files, side by side: loss, validation
                loss, learning rate and tokens/s against step (or tokens), one line per file
                python bench.py plot A.jsonl [B.jsonl ...] -o curves.png [--x tokens]
                (needs matplotlib: pip install matplotlib)

Adding a mode: write `def MODE_NAME(args, device) -> dict` that prints its table and
summary line and returns its results, plus a function adding its options, in a section whose
header names the mode, and register both in `MODES` at the bottom (and the mode in this
list, in the same order). Common options (--device, --seed, --json) come for free.

A run can be cut short (a GPU lent for minutes, a time limit) or fail in one part: the modes
a GPU check runs (kernels, fp8-gemm, long-context, mfu) add each row to `args.rows` as they
measure it, which prints it at once and rewrites the --json file ("complete": false until the
end), and run each part under `args.rows.section(name)`: a part that raises is reported
(its traceback, a row with its error) and the next part runs; the exit status is then 1.
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time
import traceback
from statistics import median

import torch
import torch.nn.functional as F

import data
import kernels
import metrics
import mixtral
import models
import parallel
from errors import UsageError


# ----------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------

def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def header(device):
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu: {cpu_name()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "load_avg_1min": os.getloadavg()[0]}  # other processes skew CPU timings


def print_table(rows, columns):
    """rows: list of dicts; columns: list of (key, title, format spec); None prints n/a."""
    cells = [[title for _, title, _ in columns]] + [
        ["n/a" if row.get(key) is None else format(row[key], spec) for key, _, spec in columns]
        for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for n, r in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, reps):
    """Median milliseconds of fn() over `reps` runs, after warm-up runs (which include
    Triton's compilation and autotuning, and torch.compile's)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return median(times)


class Rows(list):
    """The rows a mode has measured so far (see the module docstring): append() prints the
    row and, with --json, rewrites the file whole (a temporary file renamed over it), so a
    run killed at any point leaves every row measured before it."""

    def __init__(self, path, head):
        super().__init__()
        self.path, self.head, self.failed = path, head, []

    def append(self, row):
        super().append(row)
        print("row: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in row.items()), flush=True)
        self.save()

    def extend(self, rows):
        for row in rows:
            self.append(row)

    def save(self, results=None):
        if not self.path:
            return
        record = {**self.head, "failed": self.failed, "complete": results is not None}
        record.update({"results": results} if results is not None else {"rows": list(self)})
        with open(self.path + ".tmp", "w") as f:
            json.dump(record, f, indent=2, default=str)
        os.replace(self.path + ".tmp", self.path)

    @contextlib.contextmanager
    def section(self, name):
        """Run one part of a mode; if it raises, report it and go on with the next part."""
        try:
            yield
        except Exception as e:  # (not KeyboardInterrupt: Ctrl-C still stops the run)
            traceback.print_exc()
            print(f"section {name} failed: {type(e).__name__}: {e}", flush=True)
            self.failed.append(name)
            self.append({"section": name, "error": f"{type(e).__name__}: {e}"})


class ActivationMeter:
    """Counts the bytes autograd saves for backward (the activation memory), live:
    each saved tensor is wrapped in a token whose deletion (when backward has used it
    and the graph is freed) subtracts its bytes. Bytes are attributed to the innermost
    module class running when they were saved.

    A checkpoint (torch.utils.checkpoint, non-reentrant: activation recomputation, ring
    attention's blocks) keeps its inputs itself, out of the saved-tensor hooks' sight, and
    saves nothing inside. With `checkpoint_inputs`, the meter also counts those inputs (as
    "(checkpoint inputs)"), by wrapping torch.utils.checkpoint.checkpoint while it is
    active, until it exits: right for the peak of a forward measured alone."""

    def __init__(self, modules=(), checkpoint_inputs=False):
        self.checkpoint_inputs, self.held = checkpoint_inputs, []
        self.live = self.peak = 0
        self.by_module = {}
        self.stack = ["(top level)"]
        def enter(module, _):
            self.stack.append(type(module).__name__)

        def leave(*_):  # a forward hook that returned something would replace the output
            self.stack.pop()
        for m in modules:
            for sub in m.modules():
                sub.register_forward_pre_hook(enter)
                sub.register_forward_hook(leave)

    def __enter__(self):
        meter = self

        class Token:
            def __init__(self, tensor):
                self.tensor, self.size = tensor, tensor.numel() * tensor.element_size()
                meter.live += self.size
                meter.peak = max(meter.peak, meter.live)
                key = meter.stack[-1]
                meter.by_module[key] = meter.by_module.get(key, 0) + self.size

            def __del__(self):
                meter.live -= self.size

        self.hooks = torch.autograd.graph.saved_tensors_hooks(Token, lambda token: token.tensor)
        self.hooks.__enter__()
        if self.checkpoint_inputs:
            self.checkpoint = checkpoint = torch.utils.checkpoint.checkpoint

            def counted(fn, *args, **kwargs):
                if torch.is_grad_enabled():
                    meter.stack.append("(checkpoint inputs)")
                    self.held += [Token(a) for a in args if isinstance(a, torch.Tensor)]
                    meter.stack.pop()
                return checkpoint(fn, *args, **kwargs)
            torch.utils.checkpoint.checkpoint = counted
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)
        if self.checkpoint_inputs:
            torch.utils.checkpoint.checkpoint = self.checkpoint
            self.held.clear()


# ----------------------------------------------------------------------------
# train-vs-hf: our llama against transformers' LlamaForCausalLM
# ----------------------------------------------------------------------------

def check_train_vs_hf(cfg, device):
    """Refuse, before allocating anything, what HF LLaMA cannot express or memory cannot hold."""
    unsupported = [f for f in ("rope_scaling_factor", "sliding_window", "qk_norm") if getattr(cfg, f)]
    if unsupported:
        raise UsageError(f"train-vs-hf compares against HF LLaMA, which lacks {', '.join(unsupported)}; "
                         f"pick a preset without them (tiny, test)")
    with torch.device("meta"):
        n_params = sum(p.numel() for p in models.FAMILIES["llama"].model(cfg).parameters())
    need = 2 * n_params * 4 * 4  # two models x fp32 (weights, grads, AdamW m and v)
    free = (torch.cuda.mem_get_info(device)[0] if device.type == "cuda"
            else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    if need > 0.8 * free:
        raise UsageError(f"two {n_params / 1e9:.2f}B-parameter models with AdamW need ~{need / 1e9:.0f} GB, "
                         f"{free / 1e9:.0f} GB is free; pick a smaller --config")


def hf_llama_like(cfg, ours, device):
    """transformers.LlamaForCausalLM with `cfg`'s shape, holding a copy of `ours`' weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.qkv_bias,
        attn_implementation="sdpa", dtype=torch.float32,
        use_cache=False)  # training: no KV cache to fill on every forward
    with torch.device(device):
        hf = LlamaForCausalLM(hf_cfg)
    renames = {"attn.": "self_attn.", "attn_norm.": "input_layernorm.",
               "mlp_norm.": "post_attention_layernorm."}
    state = {}
    for name, tensor in ours.state_dict().items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            for old, new in renames.items():
                rest = rest.replace(old, new, 1) if rest.startswith(old) else rest
            state[f"model.layers.{i}.{rest}"] = tensor
        elif name == "lm_head.weight":
            state[name] = tensor
        else:  # embed.weight, norm.weight
            state["model." + name.replace("embed.", "embed_tokens.")] = tensor
    if cfg.qkv_bias:  # HF's attention_bias also puts a bias on o_proj; ours has none
        for i in range(cfg.n_layers):
            state[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(cfg.dim, device=device)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state, strict=True)
    return hf


@torch.no_grad()
def check_logits(ours, hf, x, tol=1e-4):
    """Same weights, same batch: the logits must agree, or the comparison is not like for like."""
    for model in (ours, hf):
        model.eval()
    a, b = ours(x), hf(input_ids=x).logits
    for model in (ours, hf):
        model.train()
    diff = (a - b).abs()
    worst = diff.max().item()
    if worst > tol:
        pos = (diff.amax(dim=(0, 2)) > tol).nonzero().flatten().tolist()
        raise AssertionError(f"logits differ from HF LLaMA by up to {worst:.3g} (> {tol}) at "
                             f"positions {pos[:8]}{'...' if len(pos) > 8 else ''} of {x.shape[1]}")
    return worst


def train_vs_hf(args, device):
    import transformers
    cfg = models.make_config("llama", args.config, args.set)
    if args.seq_len > cfg.max_seq_len:
        raise UsageError(f"--seq-len {args.seq_len} exceeds max_seq_len={cfg.max_seq_len}")
    if args.steps < 1 or args.block < 1 or args.warmup < 0:
        raise UsageError("--steps and --block must be >= 1, --warmup >= 0")
    check_train_vs_hf(cfg, device)
    train_data, _ = data.load_dataset("stdlib", "byte", args.seq_len)
    n_batches = args.warmup + args.steps
    batches = [tuple(t.to(device) for t in train_data.batch(s, args.seed, args.batch_size, args.seq_len))
               for s in range(n_batches)]

    torch.manual_seed(args.seed)
    ours = models.build("llama", cfg, device, args.seed)
    hf = hf_llama_like(cfg, ours, device)
    max_diff = check_logits(ours, hf, batches[0][0])

    def loss_ours(model):
        return lambda x, y: model(x, labels=y) / y.numel()

    def loss_hf(x, y):
        return F.cross_entropy(hf(input_ids=x).logits.float().flatten(0, 1), y.flatten())

    contenders = [("ours", ours, loss_ours(ours)), ("hf", hf, loss_hf)]
    if args.compile:  # a second copy of ours (the same weights), its layers compiled
        compiled = models.build("llama", cfg, device, args.seed)
        parallel.apply_compile([compiled])
        contenders.insert(1, ("compiled", compiled, loss_ours(compiled)))
    runs = {}
    for name, model, loss_fn in contenders:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                weight_decay=0.1, fused=device.type == "cuda")
        runs[name] = {"model": model, "loss_fn": loss_fn, "opt": opt, "phases": [], "losses": []}

    def clock():
        sync(device)
        return time.perf_counter()

    def step(run, s):
        """One training step; returns the seconds of (forward + loss, backward, optimizer)."""
        x, y = batches[s]
        t0 = clock()
        loss = run["loss_fn"](x, y)
        t1 = clock()
        loss.backward()
        t2 = clock()
        run["opt"].step()
        run["opt"].zero_grad(set_to_none=True)
        t3 = clock()
        run["losses"].append(loss.item())
        return t1 - t0, t2 - t1, t3 - t2

    for run in runs.values():  # warm-up: allocator, kernels, optimizer state, compilation
        t0 = clock()
        for s in range(args.warmup):
            step(run, s)
        run["warmup_s"] = clock() - t0
    # Timed steps alternate between the models in blocks, so background load hits both.
    for start in range(args.warmup, n_batches, args.block):
        for run in runs.values():
            for s in range(start, min(start + args.block, n_batches)):
                run["phases"].append(step(run, s))

    tokens = args.batch_size * args.seq_len
    rows = []
    for name, run in runs.items():
        t = [sum(p) for p in run["phases"]]
        fwd, bwd, opt = (1e3 * median([p[i] for p in run["phases"]]) for i in range(3))
        title = {"ours": "ours (llama.py)", "compiled": "ours, --compile",
                 "hf": f"HF transformers {transformers.__version__}"}[name]
        rows.append({"model": title, "warmup_s": run["warmup_s"],
                     "params_m": sum(p.numel() for p in run["model"].parameters()) / 1e6,
                     "ms_mean": 1e3 * sum(t) / len(t), "ms_median": 1e3 * median(t), "ms_best": 1e3 * min(t),
                     "fwd_ms": fwd, "bwd_ms": bwd, "opt_ms": opt,
                     "tokens_per_s": tokens * len(t) / sum(t), "tokens_per_s_median": tokens / median(t),
                     "loss_last": run["losses"][-1]})
    ours_row, hf_row = rows[0], rows[-1]
    ratio = ours_row["tokens_per_s"] / hf_row["tokens_per_s"]
    ratio_median = ours_row["tokens_per_s_median"] / hf_row["tokens_per_s_median"]
    print(f"llama/{args.config}: batch {args.batch_size} x seq {args.seq_len} = {tokens:,} tokens/step | "
          f"{args.warmup} warm-up + {args.steps} timed steps each, blocks of {args.block} | fp32 AdamW")
    print(f"logits check: max |ours - HF| = {max_diff:.2e} (<= 1e-4) on batch 0")
    print()
    print_table(rows, [("model", "model", ""), ("params_m", "params (M)", ".2f"),
                       ("ms_mean", "step ms mean", ".1f"), ("ms_median", "median", ".1f"),
                       ("ms_best", "best", ".1f"), ("fwd_ms", "fwd+loss", ".1f"),
                       ("bwd_ms", "bwd", ".1f"), ("opt_ms", "adamw", ".1f"),
                       ("tokens_per_s", "tokens/s", ",.0f"), ("loss_last", "last loss", ".4f"),
                       ("warmup_s", "warm-up s", ".1f")])
    print("(tokens/s = all timed tokens / all timed seconds; phase columns are medians; "
          "warm-up includes --compile's compilation)")
    print()
    print(f"train-vs-hf: ours {ours_row['tokens_per_s']:,.0f} tok/s vs HF {hf_row['tokens_per_s']:,.0f} "
          f"tok/s = {ratio:.2f}x (median step: {ratio_median:.2f}x; target >= 1.0x: "
          f"{'met' if ratio >= 1.0 else 'NOT met'})")
    extra = {}
    if args.compile:
        compiled_row = rows[1]
        extra = {"compiled": compiled_row, "ratio_compiled": compiled_row["tokens_per_s"] / hf_row["tokens_per_s"],
                 "compiled_vs_eager": compiled_row["tokens_per_s"] / ours_row["tokens_per_s"]}
        print(f"compiled: {compiled_row['tokens_per_s']:,.0f} tok/s = {extra['ratio_compiled']:.2f}x HF, "
              f"{extra['compiled_vs_eager']:.2f}x ours eager (compiled in the warm-up: "
              f"{compiled_row['warmup_s']:.1f} s; last losses {compiled_row['loss_last']:.4f} vs "
              f"{ours_row['loss_last']:.4f} eager)")
    return {**extra, "config": args.config, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "steps": args.steps, "warmup": args.warmup, "block": args.block,
            "transformers": transformers.__version__, "logits_max_abs_diff": max_diff,
            "logits_check": "passed", "ours": ours_row, "hf": hf_row, "ratio": ratio,
            "ratio_median": ratio_median, "target_met": ratio >= 1.0}


def add_train_vs_hf(p):
    p.add_argument("--config", default="tiny", help="llama preset (tiny, test, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    p.add_argument("--block", type=int, default=5, help="consecutive steps per model when alternating")
    p.add_argument("--compile", action="store_true",
                   help="also time a copy of ours with its layers compiled (parallel.apply_compile)")


# ----------------------------------------------------------------------------
# zero1-memory, sp-memory, pp-schedules, cp-memory, moe-ep: parallelism's memory and traffic
# ----------------------------------------------------------------------------
# These modes run N gloo processes of their own (torch.multiprocessing) on the CPU:
# the quantities are bytes and schedules, which a CPU measures as well as a GPU.

def _optimizer_bytes(preset, zero1):
    layout = parallel.init_distributed(device="cpu")
    model = models.build("llama", models.make_config("llama", preset), layout.device, 0, layout)
    ddp = parallel.DataParallel(model, layout, zero1=zero1)
    optimizer = parallel.AdamW(ddp, lr=1e-3, weight_decay=0.1)
    state = sum(t.numel() * t.element_size() for t in optimizer.exp_avg + optimizer.exp_avg_sq)
    ddp.close()
    parallel.destroy_distributed(layout)
    return state


def zero1_memory(args, device):
    """Optimizer-state bytes per rank at dp=N with and without ZeRO-1."""
    rows = []
    for zero1 in (False, True):
        per_rank = parallel.run_ranks(args.dp, _optimizer_bytes, preset=args.config, zero1=zero1)
        rows.append({"zero1": str(zero1), "max_mb": max(per_rank.values()) / 2**20,
                     "min_mb": min(per_rank.values()) / 2**20})
    print_table(rows, [("zero1", "ZeRO-1", "s"), ("max_mb", "state MB/rank (max)", ".2f"),
                       ("min_mb", "(min)", ".2f")])
    ratio = rows[1]["max_mb"] / rows[0]["max_mb"]
    print(f"summary: ZeRO-1 at dp={args.dp} keeps {ratio:.3f}x the optimizer state per rank "
          f"(ideal 1/{args.dp} = {1 / args.dp:.3f})")
    return {"rows": rows, "ratio": ratio}


def add_zero1_memory(p):
    p.add_argument("--config", default="tiny")
    p.add_argument("--dp", type=int, default=4)


def _activation_bytes(preset, seq_len, sp):
    layout = parallel.init_distributed(tp=int(os.environ["WORLD_SIZE"]), sp=sp, device="cpu")
    model = models.build("llama", models.make_config("llama", preset, [f"max_seq_len={seq_len}"]),
                         layout.device, 0, layout)
    ids = torch.randint(0, 256, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with ActivationMeter([model]) as meter:
        loss = model(ids, labels=ids)
    del loss
    parallel.destroy_distributed(layout)
    return {"total": meter.peak, **meter.by_module}


def sp_memory(args, device):
    """Activation bytes saved for backward per rank at tp=N, with and without sp."""
    rows, detail = [], {}
    for sp in (False, True):
        per_rank = parallel.run_ranks(args.tp, _activation_bytes, preset=args.config, seq_len=args.seq_len, sp=sp)
        r0 = per_rank[0]
        # Residual additions save nothing for backward: the norms are what sp shards.
        rows.append({"sp": str(sp), "total_mb": r0["total"] / 2**20,
                     "norm_mb": r0.get("RMSNorm", 0) / 2**20})
        detail[str(sp)] = r0
    print_table(rows, [("sp", "sp", "s"), ("total_mb", "activations MB/rank", ".1f"),
                       ("norm_mb", "of which norms MB", ".1f")])
    ratio = rows[1]["norm_mb"] / rows[0]["norm_mb"]
    print(f"summary: at tp={args.tp}, seq {args.seq_len}, sequence parallelism keeps {ratio:.2f}x "
          f"of the norms' activations (ideal 1/{args.tp}) and "
          f"{rows[1]['total_mb'] / rows[0]['total_mb']:.2f}x of all activations")
    return {"rows": rows, "by_module": detail}


def add_sp_memory(p):
    p.add_argument("--config", default="tiny")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)


def _pipeline_step(preset, schedule, n_micro, seq_len, steps):
    world = int(os.environ["WORLD_SIZE"])
    layout = parallel.init_distributed(pp=world, device="cpu")
    cfg = models.make_config("llama", preset)
    chunks = parallel.rank_chunks(layout, cfg.n_layers)
    modules = [models.build("llama", cfg, layout.device, 0, layout, c) for c in chunks]
    ddp = parallel.DataParallel(modules, layout)
    actions = parallel.SCHEDULES[schedule](n_micro, layout)
    gen = torch.Generator().manual_seed(0)
    micro = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 256, (n_micro, 1, seq_len), generator=gen)]
    times = []
    for _ in range(steps):
        ddp.zero_grad()
        parallel.barrier()
        t0 = time.perf_counter()
        with ActivationMeter() as meter:
            parallel.run_schedule(actions, chunks, modules, micro, layout, (1, seq_len, cfg.dim), ddp)
        ddp.finish()
        parallel.barrier()
        times.append(time.perf_counter() - t0)
    ddp.close()
    parallel.destroy_distributed(layout)
    return {"peak": meter.peak, "step_s": median(times)}


def pp_schedules(args, device):
    """First-stage activation memory of GPipe vs 1F1B, and step time vs the bubble."""
    rows = []
    base = parallel.run_ranks(1, _pipeline_step, preset=args.config, schedule="1f1b", n_micro=args.micro,
                     seq_len=args.seq_len, steps=args.steps)[0]
    for pp in args.pp:
        for schedule in ("gpipe", "1f1b"):
            r = parallel.run_ranks(pp, _pipeline_step, preset=args.config, schedule=schedule, n_micro=args.micro,
                          seq_len=args.seq_len, steps=args.steps)
            bubble = (pp - 1) / (args.micro + pp - 1)
            ideal = base["step_s"] / pp / (1 - bubble)  # perfect split plus the bubble
            step = max(x["step_s"] for x in r.values())
            rows.append({"pp": pp, "schedule": schedule, "stage0_mb": r[0]["peak"] / 2**20,
                         "step_s": step, "bubble": bubble, "vs_theory": step / ideal})
    print_table(rows, [("pp", "pp", "d"), ("schedule", "schedule", "s"),
                       ("stage0_mb", "stage 0 peak activations MB", ".1f"), ("step_s", "step s", ".3f"),
                       ("bubble", "theory bubble", ".2f"), ("vs_theory", "step / theory", ".2f")])
    print(f"summary: one process {base['step_s']:.3f}s/step; step / theory = measured step time over "
          f"(one-process time / pp) / (1 - bubble); on {os.cpu_count()} cores, more than "
          f"{os.cpu_count()} stages cannot run in parallel")
    return {"one_process_step_s": base["step_s"], "rows": rows}


def add_pp_schedules(p):
    p.add_argument("--config", default="tiny")
    p.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    p.add_argument("--micro", type=int, default=8, help="micro-batches per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)


def _cp_step(preset, seq_len, comm):
    """One forward + backward of a sequence under cp: activation bytes saved for
    backward and bytes this rank sent to the others (counted at the send calls)."""
    import torch.distributed as dist
    world = int(os.environ["WORLD_SIZE"])
    layout = parallel.init_distributed(cp=world, cp_comm=comm, device="cpu")
    model = models.build("llama", models.make_config("llama", preset, [f"max_seq_len={seq_len}"]),
                         layout.device, 0, layout)
    sent = {"bytes": 0}

    def counting(collective):  # all_gather / reduce_scatter: the local tensor to each peer
        def wrapper(*a, **k):
            local = a[1] if collective is originals["all_gather"] else a[0]
            sent["bytes"] += local.numel() * local.element_size() * (world - 1)
            return collective(*a, **k)
        return wrapper
    originals = {name: getattr(dist, name) for name in ("all_gather", "reduce_scatter")}
    dist.all_gather, dist.reduce_scatter = (counting(originals[n]) for n in ("all_gather", "reduce_scatter"))
    original_p2p = dist.P2POp

    def p2p(op, tensor, peer, *a, **k):
        if op is dist.isend:
            sent["bytes"] += tensor.numel() * tensor.element_size()
        return original_p2p(op, tensor, peer, *a, **k)
    dist.P2POp = p2p
    ids = torch.randint(0, 256, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with ActivationMeter() as meter:
        loss = model(ids, labels=ids)
        loss.backward()
    parallel.destroy_distributed(layout)
    return {"peak": meter.peak, "sent": sent["bytes"]}


def cp_memory(args, device):
    """Activation memory per rank at cp = 1, 2, 4 and bytes sent, ring vs all-gather."""
    rows = []
    for cp in args.cp:
        for comm in (["ring", "allgather"] if cp > 1 else ["ring"]):
            r = parallel.run_ranks(cp, _cp_step, preset=args.config, seq_len=args.seq_len, comm=comm)
            rows.append({"cp": cp, "comm": comm if cp > 1 else "-",
                         "peak_mb": max(x["peak"] for x in r.values()) / 2**20,
                         "sent_mb": max(x["sent"] for x in r.values()) / 2**20})
    print_table(rows, [("cp", "cp", "d"), ("comm", "K/V exchange", "s"),
                       ("peak_mb", "activations MB/rank (peak)", ".1f"),
                       ("sent_mb", "MB sent/rank (fwd+bwd)", ".1f")])
    base = rows[0]["peak_mb"]
    ratios = ", ".join(f"cp={r['cp']} {r['comm']}: {r['peak_mb'] / base:.2f}x" for r in rows[1:])
    print(f"summary: activations vs cp=1 at seq {args.seq_len}: {ratios}")
    return {"rows": rows}


def add_cp_memory(p):
    p.add_argument("--config", default="tiny")
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seq-len", type=int, default=8192)


def _moe_steps(preset, ep, global_batch, seq_len, steps, experts="grouped"):
    """Training steps of Mixtral at this world size and ep (dp = world), the local experts
    run by grouped matmuls or by their reference loop (`experts`): median step
    time after one warm-up step; the bytes this rank sent to others per step through
    all_to_all_single (counted at the call: tokens, results, their gradients, counts),
    and the model's own count of them (router_stats, forward x 2), both averaged."""
    import torch.distributed as dist
    layout = parallel.init_distributed(ep=ep, device="cpu")
    model = models.build("mixtral", models.make_config("mixtral", preset), layout.device, 0, layout)
    if experts == "loop":
        for m in model.modules():
            if isinstance(m, mixtral.Experts):
                m.forward = m.loop
    ddp = parallel.DataParallel(model, layout, zero1=True)
    optimizer = parallel.AdamW(ddp, lr=1e-3, weight_decay=0.1)
    rows = global_batch // layout.dp
    ids = torch.randint(0, 256, (global_batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    ids = ids[layout.dp_rank * rows:(layout.dp_rank + 1) * rows]
    sent = {"bytes": 0}
    original = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, **kwargs):
        sizes = input_split_sizes or [input.shape[0] // layout.ep] * layout.ep
        row_bytes = input[:1].numel() * input.element_size()
        sent["bytes"] += (sum(sizes) - sizes[layout.ep_rank]) * row_bytes
        return original(output, input, output_split_sizes, input_split_sizes, **kwargs)
    dist.all_to_all_single = counting
    times, sent_per_step = [], []
    for step in range(steps + 1):
        if step == 1:
            model.pop_router_stats()  # the warm-up step does not count
        sent["bytes"] = 0
        ddp.zero_grad()
        parallel.barrier()
        t0 = time.perf_counter()
        loss = model(ids[:, :-1], labels=ids[:, 1:])
        ((loss + model.extra_loss) / (global_batch * seq_len)).backward()
        ddp.finish()
        optimizer.step()
        parallel.barrier()
        times.append(time.perf_counter() - t0)
        sent_per_step.append(sent["bytes"])
    reported = 2 * model.pop_router_stats()["all_to_all_bytes"].item() / steps
    ddp.close()
    parallel.destroy_distributed(layout)
    return {"step_s": median(times[1:]), "sent": sum(sent_per_step[1:]) / steps, "reported": reported}


def moe_ep(args, device):
    """Tokens/s of Mixtral at ep = 1, 2, 4 (and plain dp) with one global batch; the
    experts as grouped matmuls and as a loop of one matmul per expert."""
    rows = []
    for world in args.world:
        for ep in sorted({1, world}):
            r, loop = (parallel.run_ranks(world, _moe_steps, preset=args.config, ep=ep,
                                          global_batch=args.global_batch, seq_len=args.seq_len,
                                          steps=args.steps, experts=experts)
                       for experts in ("grouped", "loop"))
            step, loop_step = (max(x["step_s"] for x in runs.values()) for runs in (r, loop))
            rows.append({"world": world, "ep": ep, "step_s": step,
                         "tokens_per_s": args.global_batch * args.seq_len / step,
                         "loop_step_s": loop_step, "grouped_speedup": loop_step / step,
                         "a2a_mb": sum(x["sent"] for x in r.values()) / 2**20,
                         "model_mb": sum(x["reported"] for x in r.values()) / 2**20})
    print_table(rows, [("world", "processes", "d"), ("ep", "ep", "d"), ("step_s", "step s", ".3f"),
                       ("tokens_per_s", "tokens/s", ",.0f"), ("loop_step_s", "loop step s", ".3f"),
                       ("grouped_speedup", "grouped vs loop", ".2f"),
                       ("a2a_mb", "all-to-all MB/step (all ranks)", ".2f"),
                       ("model_mb", "model's count MB", ".2f")])
    base = rows[0]["tokens_per_s"]
    ratios = ", ".join(f"world={r['world']} ep={r['ep']}: {r['tokens_per_s'] / base:.2f}x" for r in rows[1:])
    print(f"summary: tokens/s vs one process (global batch {args.global_batch} x {args.seq_len}): "
          f"{ratios}; one process per core at most on {os.cpu_count()} cores")
    print("experts: grouped matmuls (mixtral.Experts) vs their reference loop, step time: " +
          ", ".join(f"world={r['world']} ep={r['ep']}: {r['grouped_speedup']:.2f}x" for r in rows))
    return {"rows": rows}


def add_moe_ep(p):
    p.add_argument("--config", default="tiny")
    p.add_argument("--world", type=int, nargs="+", default=[1, 2, 4], help="process counts")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)


# ----------------------------------------------------------------------------
# kernels: kernels.py against PyTorch
# ----------------------------------------------------------------------------
# On a GPU the Triton path; on a CPU the reference path at small shapes, so the command
# runs everywhere but says nothing about Triton there.

# Datasheet HBM bandwidth (GB/s) of cards we know; others print "n/a".
HBM_PEAK_GBPS = {"H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000,
                 "H100 NVL": 3900, "A100-SXM4-80GB": 2039, "A100-PCIE-80GB": 1935,
                 "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555, "L40S": 864, "A10": 600,
                 "L4": 300, "RTX 4090": 1008, "RTX 3090": 936}


def hbm_peak_gbps(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, gbps in sorted(HBM_PEAK_GBPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return gbps
    return None


def sdpa_flash(q, k, v, causal):
    """torch's attention, pinned to its FlashAttention backend when it has one here."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        if q.is_cuda:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                              SDPBackend.EFFICIENT_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    except ImportError:
        pass
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def fwd_bwd_fns(fn, inputs, grad_out_like):
    """(forward-only callable, backward-only callable) for fn(*inputs)."""
    def forward():
        with torch.no_grad():
            return fn(*inputs)
    out = fn(*inputs)
    grad = torch.randn_like(out if grad_out_like is None else grad_out_like)

    def backward():
        torch.autograd.grad(out, inputs, grad, retain_graph=True)
    return forward, backward


def bench_attention(rows, device, seq_lens, head_dim, heads, tokens, reps, dtype):
    for T in seq_lens:
        B = max(1, tokens // T)
        for causal in (False, True):
            q, k, v = (torch.randn(B, heads, T, head_dim, device=device, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            ours = fwd_bwd_fns(lambda a, b, c: kernels.attention(a, b, c, causal=causal), (q, k, v), None)
            base = fwd_bwd_fns(lambda a, b, c: sdpa_flash(a, b, c, causal), (q, k, v), None)
            rows.extend(_attention_rows("attention", "sdpa", ours, base, q, causal, device, reps))
            del q, k, v, ours, base


def _attention_rows(kernel, baseline, ours, base, q, causal, device, reps):
    """Timed forward and backward rows of attention `ours` against `base` (each a
    (forward, backward) pair from fwd_bwd_fns) on q's shape (B, H, T, D)."""
    B, heads, T, head_dim = q.shape
    # FLOPs of the two matmuls QK^T and PV, halved when causal; the backward pass
    # does five such matmuls against the forward's two: 2.5x (FlashAttention's count).
    fwd_flops = 4 * B * heads * T * T * head_dim * (0.5 if causal else 1.0)
    rows = []
    for i, pas in enumerate(("fwd", "bwd")):
        flops = fwd_flops * (1.0 if pas == "fwd" else 2.5)
        ms_ours, ms_base = time_ms(ours[i], device, reps), time_ms(base[i], device, reps)
        rows.append({"kernel": kernel, "pass": pas, "shape": f"B{B} H{heads} T{T} D{head_dim}",
                     "causal": causal, "impl": kernels.backend(q), "ms": ms_ours,
                     "tflops": flops / ms_ours / 1e9, "baseline": baseline,
                     "baseline_ms": ms_base, "baseline_tflops": flops / ms_base / 1e9,
                     "speedup": ms_base / ms_ours})
    return rows


def bench_attention_t5(rows, device, seq_lens, heads, tokens, reps, dtype):
    """T5's attention (head dim 64, no score scaling, a relative position bias from a
    32 x heads table): ours adds the bias inside the kernel from the table; the baseline is
    SDPA with the (T, T) bias materialized and passed as its float mask, as a model without
    such a kernel does (with a float mask SDPA cannot use its flash backend). Encoder
    (bidirectional buckets) and decoder (causal, past-only buckets)."""
    head_dim = 64
    for T in seq_lens:
        B = max(1, tokens // T)
        for causal in (False, True):
            q, k, v = (torch.randn(B, heads, T, head_dim, device=device, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            table = torch.randn(32, heads, device=device, requires_grad=True)
            bias = kernels.RelativePositionBias(table, bidirectional=not causal)

            def ours_fn(a, b, c, t):
                return kernels.attention(a, b, c, causal=causal, scale=1.0,
                                         position_bias=kernels.RelativePositionBias(t, not causal))

            def base_fn(a, b, c, t):
                mask = kernels.relative_position_bias_reference(
                    kernels.RelativePositionBias(t, not causal), T, T).to(a.dtype)
                if causal:
                    mask = mask.masked_fill(~kernels.attention_mask(T, T, a.device), float("-inf"))
                return F.scaled_dot_product_attention(a, b, c, attn_mask=mask, scale=1.0)
            ours = fwd_bwd_fns(ours_fn, (q, k, v, bias.table), None)
            base = fwd_bwd_fns(base_fn, (q, k, v, bias.table), None)
            rows.extend(_attention_rows("attention-t5", "sdpa + materialized bias", ours, base, q, causal,
                                        device, reps))
            del q, k, v, table, bias, ours, base


def bench_memory_bound(out, device, rows_, dim, ffn_dim, reps, dtype, compile_reference):
    """RMSNorm and SwiGLU: GB/s = bytes each pass must read and write / its time."""
    peak = hbm_peak_gbps(device)
    x = torch.randn(rows_, dim, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(dim, device=device, dtype=dtype, requires_grad=True)
    gate, up = (torch.randn(rows_, ffn_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    size = torch.finfo(dtype).bits // 8
    cases = [
        # name, ours, reference, inputs, bytes fwd (read x, write y), bytes bwd (read x, dy; write dx)
        ("rmsnorm", lambda a, b: kernels.rmsnorm(a, b, 1e-5), lambda a, b: kernels.rmsnorm_reference(a, b, 1e-5),
         (x, w), 2 * x.numel() * size, 3 * x.numel() * size),
        # swiglu: read gate, up; write y. Backward: read gate, up, dy; write dgate, dup.
        ("swiglu", kernels.swiglu, kernels.swiglu_reference, (gate, up),
         3 * gate.numel() * size, 5 * gate.numel() * size),
    ]
    for name, ours_fn, ref_fn, inputs, bytes_fwd, bytes_bwd in cases:
        impls = {"ours": ours_fn, "eager": ref_fn}
        if compile_reference:
            impls["compiled"] = torch.compile(ref_fn, dynamic=False)
        fns = {k: fwd_bwd_fns(f, inputs, None) for k, f in impls.items() if k != "compiled"}
        if "compiled" in impls:
            try:
                fns["compiled"] = fwd_bwd_fns(impls["compiled"], inputs, None)
            except Exception as e:  # a baseline that does not build is reported, not fatal
                print(f"torch.compile of the {name} reference failed: {type(e).__name__}: {e}")
        for i, (pas, nbytes) in enumerate((("fwd", bytes_fwd), ("bwd", bytes_bwd))):
            ms = {k: time_ms(f[i], device, reps) for k, f in fns.items()}
            gbps = {k: nbytes / t / 1e6 for k, t in ms.items()}
            out.append({"kernel": name, "pass": pas, "shape": "x".join(map(str, inputs[0].shape)),
                        "impl": kernels.backend(inputs[0]), "ms": ms["ours"], "gbps": gbps["ours"],
                        "compiled_gbps": gbps.get("compiled"), "eager_gbps": gbps["eager"],
                        "peak_gbps": peak, "pct_of_peak": 100 * gbps["ours"] / peak if peak else None})


def bench_cross_entropy(rows, device, tokens, dim, vocab, reps, dtype):
    """Chunked linear + cross-entropy against the logits-at-once reference: forward +
    backward time, bytes autograd keeps for backward, and (on a GPU) the peak memory."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, dim, device=device, generator=g).requires_grad_()
    w = (0.02 * torch.randn(vocab, dim, device=device, generator=g)).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    for name, fn in (("chunked", kernels.linear_cross_entropy),
                     ("reference", kernels.linear_cross_entropy_reference)):
        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = fn(x, w, labels)
            torch.autograd.grad(loss, (x, w))
        ms = time_ms(step, device, reps)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        with ActivationMeter() as meter, torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = fn(x, w, labels)
        kept = meter.peak
        torch.autograd.grad(loss, (x, w))
        peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
        rows.append({"kernel": "linear_cross_entropy", "impl": name, "shape": f"{tokens}x{dim} vocab {vocab}",
                     "ms": ms, "kept_mib": kept / 2**20, "peak_mib": peak / 2**20 if peak is not None else None})
        del loss


def bench_ssd(rows, device, reps, batch=4, T=2048, heads=48, head_dim=64, state_dim=128, chunk=256,
              dtype=torch.bfloat16):
    """Mamba-2's SSD scan (mamba2-1.3b's layer shape: 48 heads of 64, N 128, one group,
    chunks of 256): kernels.ssd (the Triton kernels on a GPU) against ssd_chunked (PyTorch)
    and, when installed, mamba_ssm's fused Triton scan, forward and forward + backward."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, T, heads, head_dim, device=device, generator=g).to(dtype)
    dt = F.softplus(torch.randn(batch, T, heads, device=device, generator=g) - 1).to(dtype)
    A = -torch.rand(heads, device=device, generator=g) - 0.5
    B, C = (torch.randn(batch, T, 1, state_dim, device=device, generator=g).to(dtype) for _ in range(2))
    inputs = [t.requires_grad_() for t in (x, dt, A, B, C)]
    impls = {"ours": lambda *a: kernels.ssd(*a, chunk)[0],
             "chunked": lambda *a: kernels.ssd_chunked(*a, chunk)[0]}
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        impls["mamba_ssm"] = lambda *a: mamba_chunk_scan_combined(*a, chunk)
    except ImportError:
        pass
    dy = torch.randn(batch, T, heads, head_dim, device=device, generator=g)

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(*inputs)
        return run

    def forward_backward(fn):
        def run():
            y = fn(*inputs)  # fp32 from ours, x's dtype from mamba_ssm
            torch.autograd.grad(y, inputs, dy.to(y.dtype))
        return run

    for pas, timed in (("fwd", forward), ("fwd+bwd", forward_backward)):
        ms = {name: time_ms(timed(fn), device, reps) for name, fn in impls.items()}
        rows.append({"kernel": "ssd", "pass": pas, "shape": f"B{batch} T{T} H{heads} P{head_dim} N{state_dim} L{chunk}",
                     "impl": kernels.backend(x), "ms": ms["ours"], "chunked_ms": ms["chunked"],
                     "speedup_vs_chunked": ms["chunked"] / ms["ours"], "mamba_ssm_ms": ms.get("mamba_ssm"),
                     "speedup_vs_mamba_ssm": ms["mamba_ssm"] / ms["ours"] if "mamba_ssm" in ms else None})


def benchmark_kernels(args, device):
    """Run the kernel benchmarks, each kind a section of its own (see Rows), print their
    tables, return the rows (list of dicts)."""
    gpu = device.type == "cuda"
    quick = getattr(args, "quick", False)
    if getattr(args, "seq_lens", None):
        seq_lens = [int(s) for s in str(args.seq_lens).split(",")]
    else:
        seq_lens = ([1024, 4096] if quick else [1024, 2048, 4096, 8192, 16384]) if gpu else [128]
    reps = getattr(args, "reps", None) or (20 if gpu else 3)
    head_dim = getattr(args, "head_dim", 128) if gpu else 64
    dtype = torch.bfloat16 if gpu else torch.float32
    compile_reference = gpu and not getattr(args, "no_compile", False)  # inductor on CPU takes minutes

    rows = args.rows
    with rows.section("attention"):
        bench_attention(rows, device, seq_lens, head_dim, heads=16 if gpu else 4,
                        tokens=16384 if gpu else 256, reps=reps, dtype=dtype)
    with rows.section("attention-t5"):
        bench_attention_t5(rows, device, [s for s in seq_lens if s <= 4096] or seq_lens[:1],
                           heads=12 if gpu else 4, tokens=16384 if gpu else 256, reps=reps, dtype=dtype)
    if gpu:
        mem_rows, dim, ffn = 16384, 4096, 14336
    else:
        mem_rows, dim, ffn = 512, 256, 704
    with rows.section("rmsnorm-swiglu"):
        bench_memory_bound(rows, device, mem_rows, dim, ffn, reps, dtype, compile_reference)
    ce_tokens, ce_dim = (8192, 4096) if gpu else (256, 64)
    with rows.section("linear-cross-entropy"):
        bench_cross_entropy(rows, device, ce_tokens, ce_dim, 128256, reps, dtype)
    if gpu:  # on a CPU the Triton SSD would run in the interpreter (or not at all): nothing to time
        with rows.section("ssd"):
            bench_ssd(rows, device, reps)

    print(f"kernels on {torch.cuda.get_device_name(device) if gpu else 'cpu'}, {dtype}"
          + ("" if gpu else " (cpu: the reference path; says nothing about the Triton kernels)"))
    for kernel in ("attention", "attention-t5"):  # T5's: the baseline materializes its bias
        print_table([r for r in rows if r.get("kernel") == kernel], [
            ("kernel", "kernel", ""), ("pass", "pass", ""), ("shape", "shape", ""), ("causal", "causal", ""),
            ("impl", "ours", ""), ("ms", "ms", ".3f"), ("tflops", "TFLOP/s", ".3g"),
            ("baseline_ms", "sdpa ms", ".3f"), ("baseline_tflops", "sdpa TFLOP/s", ".3g"),
            ("speedup", "speedup", ".2f")])
        print()
    print_table([r for r in rows if r.get("kernel") in ("rmsnorm", "swiglu")], [
        ("kernel", "kernel", ""), ("pass", "pass", ""), ("shape", "shape", ""), ("impl", "ours", ""),
        ("ms", "ms", ".3f"), ("gbps", "GB/s", ".0f"), ("pct_of_peak", "% HBM peak", ".0f"),
        ("compiled_gbps", "compiled GB/s", ".0f"), ("eager_gbps", "eager GB/s", ".0f")])
    print()
    print_table([r for r in rows if r.get("kernel") == "linear_cross_entropy"], [
        ("kernel", "kernel", ""), ("impl", "impl", ""), ("shape", "shape", ""), ("ms", "fwd+bwd ms", ".1f"),
        ("kept_mib", "kept for backward MiB", ".0f"), ("peak_mib", "peak MiB", ".0f")])
    if gpu:
        print()
        print_table([r for r in rows if r.get("kernel") == "ssd"], [
            ("kernel", "kernel", ""), ("pass", "pass", ""), ("shape", "shape", ""), ("impl", "ours", ""),
            ("ms", "ms", ".3f"), ("chunked_ms", "ssd_chunked ms", ".3f"), ("speedup_vs_chunked", "speedup", ".2f"),
            ("mamba_ssm_ms", "mamba_ssm ms", ".3f"), ("speedup_vs_mamba_ssm", "vs mamba_ssm", ".2f")])
    return list(rows)


def add_kernels_options(p):
    p.add_argument("--seq-lens", default=None,
                   help="comma-separated attention sequence lengths (default: 1024..16384 on a GPU, 128 on a CPU)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=None, help="timed runs per measurement (median)")
    p.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")


# ----------------------------------------------------------------------------
# kernels-compile: every Triton kernel configuration compiled for real GPUs, without one
# ----------------------------------------------------------------------------
# triton.compile builds a kernel for a named target (sm_80, sm_90) ahead of time, exactly
# as the first launch on that card would, down to ptxas's machine code: so on any machine
# with Triton we can check that every kernel and autotune configuration compiles, read
# ptxas's register and spill counts, and compare the shared memory each needs with the
# card's limit. Spilled registers go to local memory (slow); a configuration over the
# shared-memory limit cannot launch (the autotuner skips it). Neither needs a GPU to see.

# Shared memory one block may use (bytes, with the opt-in): A100 163 KiB, H100/H200 227 KiB,
# Ada (sm_89: L40S, RTX 4090) 99 KiB. The kernels are compiled for sm_80 and sm_90 (an sm_86/89
# card runs Ampere's configurations; there the autotuner skips those that do not fit), the
# FP8 matmul for sm_89 and sm_90, the GPUs with FP8 tensor cores, with its own Ada list.
SHARED_MEMORY_LIMIT = {80: 166912, 89: 101376, 90: 232448}
# Scalar kernel arguments that are floats; every other scalar is an int32.
FLOAT_ARGS = {"qk_scale", "sm_scale", "eps"}
# Arguments that Triton specializes as multiples of 16 (16-byte aligned pointers), as a launch
# at the sizes we run sees them. Only the FP8 matmul is compiled so: for a GEMM the hints
# decide everything (without them its loads are not vectorized, hence not pipelined with
# cp.async, and every configuration spills), while the other kernels are compiled without
# (their lists were chosen that way).
ALIGNED_ARGS = {"_fp8_matmul_kernel": {"A", "B", "C", "A_SCALE_INV", "B_SCALE_INV", "M", "N", "K",
                                       "stride_am", "stride_bn", "stride_cm"}}
# (causal, window, key padding, T5's relative position bias, documents): "masked" turns every
# option on.
ATTENTION_MASKS = {"causal": (True, False, False, False, False), "masked": (True, True, True, True, True),
                   "none": (False, False, False, False, False), "t5": (False, False, True, True, False),
                   "documents": (True, False, False, False, True)}


def _compile_jobs(head_dims, dtypes, masks):
    """One job per (kernel, target, shape, configuration) that the public functions of
    kernels.py can launch: (kernel, arch, label, constexprs, pointer dtypes, warps, stages)."""
    jobs = []
    for arch in (80, 90):
        for dtype in dtypes:
            for head_dim in head_dims:
                pointers = {**dict.fromkeys(["Q", "K", "V", "O", "DO", "DQ", "DK", "DV"], dtype),
                            "LSE": "fp32", "DELTA": "fp32", "KPM": "i8", "DOC_START": "i32", "DOC_END": "i32",
                            "DIST_BUCKETS": "i32", "TABLE": "fp32", "DTABLE": "fp32"}
                for mask in masks:
                    causal, window, padding, pos_bias, documents = ATTENTION_MASKS[mask]
                    flags = dict(HEAD_DIM=head_dim, IS_CAUSAL=causal, HAS_WINDOW=window,
                                 HAS_PADDING=padding, HAS_POS_BIAS=pos_bias, HAS_DOCS=documents,
                                 DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
                    for name in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
                        for c in getattr(kernels, name).configs_by_arch[arch]:
                            jobs.append((name, arch, f"{dtype} D{head_dim} {mask}", {**flags, **c.kwargs},
                                         pointers, c.num_warps, c.num_stages))
                jobs.append(("_attn_bwd_preprocess_kernel", arch, f"{dtype} D{head_dim}",
                             dict(HEAD_DIM=head_dim, BLOCK_M=64), pointers, 4, 3))
            for dim in (4096, 8192):
                block_rows, block_cols, num_warps = kernels._row_tile(dim)
                pointers = {**dict.fromkeys(["X", "W", "Y", "DY", "DX"], dtype),
                            "RSTD": "fp32", "DW_PARTIAL": "fp32"}
                for name in ("_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel"):
                    jobs.append((name, arch, f"{dtype} dim {dim}",
                                 dict(BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols), pointers, num_warps, 3))
            pointers = dict.fromkeys(["G", "U", "Y", "DY", "DG", "DU"], dtype)
            for name in ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel"):
                jobs.append((name, arch, dtype, dict(BLOCK=kernels.SWIGLU_BLOCK), pointers, 4, 3))
            jobs += _ssd_compile_jobs(arch, dtype)
    return jobs + _fp8_compile_jobs()


# The FP8 matmul's three uses in a linear layer (forward, dgrad, wgrad: parallel.py), with
# row-wise scales (the larger epilogue: a vector of scales per operand), and the forward
# also with tensorwise scales.
FP8_MATMUL_CASES = [("fp8e4nv", "bf16", True), ("fp8e4nv", "bf16", False), ("fp8e5", "bf16", True),
                    ("fp8e5", "fp32", True)]
FP8_NAMES = {"fp8e4nv": "e4m3", "fp8e5": "e5m2"}


def _fp8_compile_jobs():
    """The FP8 matmul for each GPU with FP8 tensor cores, pair of formats and output dtype."""
    jobs = []
    for arch, configs in kernels._fp8_matmul_kernel.configs_by_arch.items():
        for a_dtype, out_dtype, rowwise in FP8_MATMUL_CASES:
            pointers = dict(A=a_dtype, B="fp8e4nv", C=out_dtype, A_SCALE_INV="fp32", B_SCALE_INV="fp32")
            label = (f"{FP8_NAMES[a_dtype]} x e4m3 -> {out_dtype}, "
                     + ("rowwise" if rowwise else "tensorwise"))
            for c in configs:
                jobs.append(("_fp8_matmul_kernel", arch, label, {"A_ROWWISE": rowwise, "B_ROWWISE": rowwise,
                                                                 **c.kwargs}, pointers, c.num_warps, c.num_stages))
    return jobs


def _ssd_compile_jobs(arch, dtype, head_dim=64, state_dim=128, chunk_size=256):
    """The SSD kernels at Mamba-2's shape (head_dim 64, N 128, chunks of 256): inputs in
    `dtype`, everything the kernels compute (a_cum, states, gradients) in fp32."""
    inputs = dict.fromkeys(["X", "DT", "B", "C", "DX"], dtype)
    pointers = {**dict.fromkeys(["A", "A_CUM", "OUT", "OWN", "INITIAL", "STATES", "Y", "D_LOCAL", "D_FINAL",
                                 "D_PASSED", "D_A_END", "D_INITIAL", "DY", "DC", "DB", "D_A_OUT", "DDT_X",
                                 "DDT", "DA_PARTIAL"], "fp32"), **inputs}
    label = f"{dtype} P{head_dim} N{state_dim}"
    blocks = dict(HEAD_BLOCK=kernels._ssd_block(head_dim), STATE_BLOCK=kernels._ssd_block(state_dim),
                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    jobs = []
    for from_start in (False, True):  # stage 2 on (x, B) and stage 2' on (dy, C): dy is fp32
        flags = dict(FROM_START=from_start, STATE_BLOCK=blocks["STATE_BLOCK"],
                     DOT_PRECISION=blocks["DOT_PRECISION"])
        for c in kernels._ssd_chunk_state_kernel.configs_by_arch[arch]:
            jobs.append(("_ssd_chunk_state_kernel", arch, label + (" from start" if from_start else " to end"),
                         {**flags, **c.kwargs}, {**pointers, "X": "fp32" if from_start else dtype},
                         c.num_warps, c.num_stages))
    for name in ("_ssd_chunk_scan_kernel", "_ssd_chunk_scan_bwd_dc_kernel", "_ssd_chunk_scan_bwd_dx_kernel",
                 "_ssd_chunk_scan_bwd_db_kernel"):
        for c in getattr(kernels, name).configs_by_arch[arch]:
            jobs.append((name, arch, label, {**blocks, **c.kwargs}, pointers, c.num_warps, c.num_stages))
    for name in ("_ssd_chunk_cumsum_kernel", "_ssd_chunk_cumsum_bwd_kernel"):
        jobs.append((name, arch, f"{dtype} chunk {chunk_size}",
                     dict(CHUNK_BLOCK=chunk_size), pointers, 4, 3))
    for name in ("_ssd_state_passing_kernel", "_ssd_state_passing_bwd_kernel"):
        jobs.append((name, arch, label, dict(HAS_INITIAL=True, BLOCK=kernels._SSD_STATE_BLOCK), pointers, 4, 3))
    return jobs


def _compile_one(job):
    """Compile one job for its target; return ptxas's counts and the shared memory."""
    import contextlib
    import io
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, arch, label, constexprs, pointers, num_warps, num_stages = job
    kernel = getattr(kernels, name)
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel  # unwrap autotuned ones
    signature = {}
    for arg in fn.arg_names:
        signature[arg] = ("constexpr" if arg in constexprs else "*" + pointers[arg] if arg in pointers
                          else "fp32" if arg in FLOAT_ARGS else "i32")
    aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
               if arg in ALIGNED_ARGS.get(name, ())}
    row = {"kernel": name.strip("_").removesuffix("_kernel"), "arch": f"sm_{arch}", "case": label,
           "config": "/".join(str(constexprs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in constexprs)
                     + f" w{num_warps} s{num_stages}"}
    triton.knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its log
    triton.knobs.nvidia.dump_ptxas_log = True       # ptxas -v's report, printed to stdout
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, aligned),
                                      target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as e:  # reported per row: one bad configuration must not hide the others
        return {**row, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}"}
    registers = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores", log.getvalue())
    shared = compiled.metadata.shared
    return {**row, "registers": int(registers.group(1)) if registers else None,
            "spill_bytes": int(spills.group(1)) if spills else None, "shared_kib": shared / 1024,
            "fits": shared <= SHARED_MEMORY_LIMIT[arch], "seconds": time.perf_counter() - start}


def kernels_compile(args, device):
    """Compile every kernel configuration for sm_80 and sm_90 (the FP8 matmul for sm_89 and
    sm_90); print and return the rows."""
    import concurrent.futures
    import multiprocessing
    if not kernels.HAVE_TRITON:
        raise UsageError("kernels-compile needs triton: pip install triton")
    if kernels._INTERPRET:
        raise UsageError("kernels-compile compiles for GPUs: unset TRITON_INTERPRET")
    if args.workers < 1 or min(args.head_dims) < 16 or any(d & (d - 1) for d in args.head_dims):
        raise UsageError("--workers must be >= 1 and --head-dims powers of two >= 16")
    jobs = _compile_jobs(args.head_dims, args.dtypes, args.masks)
    start = time.perf_counter()
    # spawn, not fork: the parent has torch's thread pools running
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = []
        for row in pool.map(_compile_one, jobs):
            rows.append(row)
            if len(rows) % 10 == 0 or len(rows) == len(jobs):
                print(f"compiled {len(rows)}/{len(jobs)} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    failed = [r for r in rows if "error" in r]
    print_table(rows, [
        ("kernel", "kernel", ""), ("arch", "arch", ""), ("case", "case", ""),
        ("config", "BLOCK_M/N(/K) warps stages", ""),
        ("registers", "registers", "d"), ("spill_bytes", "spilled bytes", "d"), ("shared_kib", "shared KiB", ".0f"),
        ("fits", "fits", "")] + ([("error", "error", "")] if failed else []))
    groups = {(r["kernel"], r["arch"], r["case"]) for r in rows}
    clean = {(r["kernel"], r["arch"], r["case"]) for r in rows if r.get("fits") and r.get("spill_bytes") == 0}
    print(f"kernels-compile: {len(rows)} compiles in {time.perf_counter() - start:.0f} s, {len(failed)} failed; "
          f"{len(clean)} of {len(groups)} (kernel, arch, case) have a configuration that fits and spills nothing")
    return rows


def add_kernels_compile_options(p):
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["bf16", "fp16", "fp32"])
    p.add_argument("--masks", nargs="+", default=["causal"], choices=list(ATTENTION_MASKS),
                   help="attention variants: causal; masked (causal + window + key padding + T5's "
                        "position bias); none; t5 (T5's encoder: key padding + position bias)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="compiles run in parallel")


# ----------------------------------------------------------------------------
# fp8-gemm, fp8-curve: the FP8 GEMM against cuBLAS's (torch._scaled_mm) and bf16; FP8 training against fp32
# ----------------------------------------------------------------------------

# (label, M, N, K) of C = A B^T: a square GEMM and the projections of an 8B model (LLaMA 3
# 8B: dim 4096, 8 KV heads of 128, FFN 14336) on 8192 tokens; on a CPU, small stand-ins.
FP8_GEMM_SHAPES = {"cuda": [("square", 8192, 8192, 8192), ("q/o proj", 8192, 4096, 4096),
                            ("k/v proj", 8192, 1024, 4096), ("gate/up proj", 8192, 14336, 4096),
                            ("down proj", 8192, 4096, 14336)],
                   "cpu": [("square", 512, 512, 512), ("q/o proj", 512, 256, 256), ("k/v proj", 512, 64, 256),
                           ("gate/up proj", 512, 896, 256), ("down proj", 512, 256, 896)]}


def scaled_mm(a, b, a_scale_inv, b_scale_inv, out_dtype, fast_accum=False):
    """kernels.fp8_matmul's arguments through torch._scaled_mm (cuBLASLt's FP8 GEMM): b
    column-major (b.t() of the (N, K) operand), scales fp32, one element or (M, 1) and (1, N).
    fast_accum=False is cuBLAS's accumulation with periodic promotion to fp32, as ours."""
    rowwise = a_scale_inv.numel() > 1 or b_scale_inv.numel() > 1
    scale_a = a_scale_inv.float().reshape(-1, 1) if rowwise else a_scale_inv.float().reshape(())
    scale_b = b_scale_inv.float().reshape(1, -1) if rowwise else b_scale_inv.float().reshape(())
    return torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


def _fp8_operands(M, N, K, device, generator, rowwise):
    """E4M3 a (M, K) and b (N, K) of random bf16-like data and their inverse scales."""
    out = []
    for rows in (M, N):
        x = torch.randn(rows, K, generator=generator, device=device)
        amax = x.abs().amax(dim=1, keepdim=True) if rowwise else x.abs().amax()
        scale = kernels.fp8_scale(amax, kernels.FP8_E4M3)
        out += [kernels.fp8_quantize(x, scale, kernels.FP8_E4M3), (1 / scale).reshape(-1)]
    return out


def _tflops(M, N, K, ms):
    return None if ms is None else 2 * M * N * K / ms / 1e9


def _time_or_none(fn, device, reps):
    """time_ms(fn), or None where torch refuses (a _scaled_mm variant this GPU or build lacks)."""
    try:
        return time_ms(fn, device, reps)
    except RuntimeError:
        return None


def _fp8_gemm_gpu_row(label, M, N, K, device, reps, g):
    """TFLOP/s of ours (tensorwise and row-wise scales), _scaled_mm (the same two, and with
    fast accumulation) and bf16 torch.matmul, bf16 outputs, operands already quantized."""
    a, a_inv, b, b_inv = _fp8_operands(M, N, K, device, g, rowwise=False)
    ar, ar_inv, br, br_inv = _fp8_operands(M, N, K, device, g, rowwise=True)
    x, w = a.to(torch.bfloat16), b.to(torch.bfloat16)
    bf16 = torch.bfloat16
    ms = {"ours": time_ms(lambda: kernels.fp8_matmul(a, b, a_inv, b_inv, bf16), device, reps),
          "ours_rowwise": time_ms(lambda: kernels.fp8_matmul(ar, br, ar_inv, br_inv, bf16), device, reps),
          "scaled_mm": _time_or_none(lambda: scaled_mm(a, b, a_inv, b_inv, bf16), device, reps),
          "scaled_mm_rowwise": _time_or_none(lambda: scaled_mm(ar, br, ar_inv, br_inv, bf16), device, reps),
          "scaled_mm_fast_accum": _time_or_none(lambda: scaled_mm(a, b, a_inv, b_inv, bf16, fast_accum=True),
                                                device, reps),
          "bf16": time_ms(lambda: x @ w.t(), device, reps)}
    row = {"shape": f"{label} {M}x{N}x{K}", "M": M, "N": N, "K": K, "impl": kernels.backend(a)}
    row.update({f"{name}_tflops": _tflops(M, N, K, t) for name, t in ms.items()})
    for ours, theirs in (("ours", "scaled_mm"), ("ours_rowwise", "scaled_mm_rowwise")):
        row[f"{ours}_vs_scaled_mm"] = ms[theirs] / ms[ours] if ms[theirs] else None
    return row


def _fp8_gemm_cpu_row(label, M, N, K, device, reps, g):
    """What the CPU emulation costs: quantizing both operands and fp8_matmul_reference
    (dequantize, one fp32 matmul) against the plain fp32 matmul it replaces."""
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)

    def quantize():
        return [kernels.fp8_quantize(t, kernels.fp8_scale(t.abs().amax(), kernels.FP8_E4M3), kernels.FP8_E4M3)
                for t in (x, w)]
    xq, wq = quantize()
    one = torch.ones(1)
    quantize_ms = time_ms(quantize, device, reps)
    matmul_ms = time_ms(lambda: kernels.fp8_matmul_reference(xq, wq, one, one), device, reps)
    fp32_ms = time_ms(lambda: x @ w.t(), device, reps)
    return {"shape": f"{label} {M}x{N}x{K}", "M": M, "N": N, "K": K, "impl": "reference",
            "quantize_ms": quantize_ms, "emulated_matmul_ms": matmul_ms, "fp32_ms": fp32_ms,
            "emulation_vs_fp32": (quantize_ms + matmul_ms) / fp32_ms}


def _gemm_shape(text):
    """"MxNxK" -> (M, N, K), positive sizes."""
    sizes = text.split("x")
    if len(sizes) != 3 or not all(n.isdigit() and int(n) > 0 for n in sizes):
        raise UsageError(f"--shapes takes MxNxK triples of positive sizes, e.g. 4096x4096x4096; got {text!r}")
    return tuple(int(n) for n in sizes)


def fp8_gemm(args, device):
    """FP8 GEMM throughput on a GPU; the cost of the emulation on a CPU."""
    gpu = device.type == "cuda"
    shapes = [("custom", *_gemm_shape(text)) for text in args.shapes] if args.shapes else FP8_GEMM_SHAPES[device.type]
    if gpu and torch.cuda.get_device_capability(device) < (8, 9):
        raise UsageError(f"{torch.cuda.get_device_name(device)} has no FP8 tensor cores (compute capability "
                         "8.9 and up: Ada, Hopper); fp8_matmul would time its fp32 emulation")
    reps = args.reps or (20 if gpu else 5)
    g = torch.Generator(device).manual_seed(args.seed)
    make_row = _fp8_gemm_gpu_row if gpu else _fp8_gemm_cpu_row
    for shape in shapes:
        with args.rows.section(f"{shape[0]} {shape[1]}x{shape[2]}x{shape[3]}"):
            args.rows.append(make_row(*shape, device, reps, g))
    rows = [r for r in args.rows if "error" not in r]
    if gpu:
        print_table(rows, [("shape", "shape", ""), ("ours_tflops", "ours TFLOP/s", ".0f"),
                           ("ours_rowwise_tflops", "ours rowwise", ".0f"),
                           ("scaled_mm_tflops", "_scaled_mm", ".0f"),
                           ("scaled_mm_rowwise_tflops", "_scaled_mm rowwise", ".0f"),
                           ("scaled_mm_fast_accum_tflops", "_scaled_mm fast acc", ".0f"),
                           ("bf16_tflops", "bf16 matmul", ".0f"), ("ours_vs_scaled_mm", "ours/_scaled_mm", ".2f"),
                           ("ours_rowwise_vs_scaled_mm", "rowwise ours/_scaled_mm", ".2f")])
        ratios = [r["ours_vs_scaled_mm"] for r in rows if r["ours_vs_scaled_mm"] is not None]
        worst = f"{min(ratios):.2f}x" if ratios else "n/a"
        print(f"fp8-gemm: ours/_scaled_mm (tensorwise, bf16 out, precise accumulation) at worst {worst} "
              f"over {len(rows)} shapes (target >= 0.95x)")
    else:
        print_table(rows, [("shape", "shape", ""), ("quantize_ms", "quantize ms", ".2f"),
                           ("emulated_matmul_ms", "fp8_matmul_reference ms", ".2f"),
                           ("fp32_ms", "fp32 matmul ms", ".2f"), ("emulation_vs_fp32", "emulation/fp32", ".2f")])
        ratios = [r["emulation_vs_fp32"] for r in rows] or [float("nan")]
        print(f"fp8-gemm (cpu: the emulation, no FP8 arithmetic): quantize + fp8_matmul_reference takes "
              f"{min(ratios):.1f}x to {max(ratios):.1f}x the time of the fp32 matmul it stands for")
    return {"rows": rows}


def add_fp8_gemm(p):
    p.add_argument("--shapes", nargs="+", default=None, metavar="MxNxK",
                   help="GEMM shapes C (M, N) = A (M, K) B^T (default: 8192^3 and an 8B model's projections "
                        "on 8192 tokens on a GPU; small stand-ins on a CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per measurement (median)")


def train_records(launcher, argv):
    """The --metrics records of `train.py argv`, run in processes of its own (`launcher`:
    python train.py, or torchrun ... train.py), its output dropped."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        metrics_file = os.path.join(tmp, "metrics.jsonl")
        subprocess.run([sys.executable if launcher[0] == "python" else launcher[0], *launcher[1:], *argv,
                        "--metrics", metrics_file], check=True, stdout=subprocess.DEVNULL,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
        return metrics.read_metrics(metrics_file)


def fp8_curve(args, device):
    """FP8 training's loss curve against fp32's, step by step on the same batches: the
    default recipe (delayed scaling, the rest in bf16, first and last layer bf16) and each
    recipe alone (every layer FP8, the rest fp32: FP8's own effect), plus bf16 for scale.
    On a CPU the FP8 matmuls are the emulation, so the times say what it costs, not FP8's speed."""
    base = ["--model", args.model, "--config", args.config, "--steps", str(args.steps),
            "--seq-len", str(args.seq_len), "--global-batch-size", str(args.batch_size),
            "--warmup-steps", str(args.warmup), "--sample-tokens", "0", "--eval-every", "0",
            "--eval-batches", "1", "--log-every", str(args.steps), "--device", device.type,
            "--seed", str(args.seed)]
    runs = [("fp32", ["--precision", "fp32"])]
    if not args.skip_bf16:
        runs += [("bf16", ["--precision", "bf16"]),
                 ("fp8 default: delayed, rest bf16, layers 1..n-2", ["--precision", "fp8"])]
    runs += [(f"fp8 {recipe}: every layer, rest fp32", ["--precision", "fp8", "--fp8-recipe", recipe,
                                                        "--fp8-rest", "fp32", "--fp8-bf16-layers", "0"])
             for recipe in args.recipes]
    rows, curves = [], {}
    for name, flags in runs:
        start = time.perf_counter()
        records = train_records(["python", "train.py"], base + flags)
        curves[name] = [r["loss"] for r in records]
        rows.append({"run": name, "seconds": time.perf_counter() - start, "final": records[-1]["loss"],
                     "val": records[-1].get("val_loss")})
        print(f"{name}: {rows[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    fp32 = curves["fp32"]
    after_warmup = slice(args.warmup, None)
    for row in rows:
        rel = [abs(a - b) / b for a, b in zip(curves[row["run"]][after_warmup], fp32[after_warmup])]
        row.update(mean_rel=sum(rel) / len(rel), max_rel=max(rel), time_ratio=row["seconds"] / rows[0]["seconds"])
    print_table(rows, [("run", "run", ""), ("final", "final loss", ".4f"), ("val", "val loss", ".4f"),
                       ("mean_rel", "mean |rel diff| vs fp32", ".2%"), ("max_rel", "max", ".2%"),
                       ("seconds", "time s", ".0f"), ("time_ratio", "x fp32 time", ".2f")])
    worst = max(rows[1:], key=lambda r: r["mean_rel"])
    print(f"fp8-curve: {args.model}/{args.config}, {args.steps} steps, per-step loss vs fp32 after "
          f"warmup: worst mean |rel diff| {worst['mean_rel']:.2%} ({worst['run']})")
    return {"rows": rows, "curves": curves}


def add_fp8_curve(p):
    p.add_argument("--model", default="llama")
    p.add_argument("--config", default="tiny")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--warmup", type=int, default=20, help="warmup steps (left out of the comparison)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--recipes", nargs="+", default=list(parallel.FP8_RECIPES))
    p.add_argument("--skip-bf16", action="store_true",
                   help="leave out the runs with bf16 (slow on CPUs without bf16 matmul units)")


# ----------------------------------------------------------------------------
# long-context: Mamba-2 against LLaMA as the sequence grows
# ----------------------------------------------------------------------------

def _long_context_step(model, seq_len, device, reps):
    """Median seconds of one forward + backward of a batch of one sequence, and the bytes
    autograd saved for backward (the activation memory)."""
    ids = torch.randint(0, 256, (1, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = model(ids, labels=ids)
        loss.backward()
    with ActivationMeter() as meter:
        step()
    model.zero_grad(set_to_none=True)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return median(times), meter.peak


def long_context(args, device):
    """Forward + backward time and activation memory per token against sequence length:
    a Mamba-2 model and a LLaMA of similar size, measured in one run."""
    contenders = {"mamba": ("mamba", args.mamba_config, args.mamba_set),
                  "llama": ("llama", args.llama_config, args.llama_set)}
    for label, (name, preset, overrides) in contenders.items():
        cfg = models.make_config(name, preset, [*overrides, f"max_seq_len={max(args.seq_lens)}"])
        model = models.build(name, cfg, device, args.seed)
        n_params = sum(p.numel() for p in model.parameters())
        for seq_len in args.seq_lens:
            with args.rows.section(f"{label} seq {seq_len}"):
                seconds, saved = _long_context_step(model, seq_len, device, args.reps)
                args.rows.append({"model": f"{label} ({n_params / 1e6:.1f}M)", "seq_len": seq_len,
                                  "ms": seconds * 1e3, "us_per_token": seconds * 1e6 / seq_len,
                                  "kb_per_token": saved / seq_len / 1024})
            model.zero_grad(set_to_none=True)
        del model
    rows = [r for r in args.rows if "error" not in r]
    print_table(rows, [("model", "model", "s"), ("seq_len", "seq len", "d"),
                       ("ms", "fwd+bwd ms", ".1f"), ("us_per_token", "us/token", ".1f"),
                       ("kb_per_token", "activations KB/token", ".1f")])
    first, last = args.seq_lens[0], args.seq_lens[-1]
    growth = []
    for label in contenders:
        mine = [r for r in rows if r["model"].startswith(label)]
        if len(mine) < 2:
            continue
        growth.append(f"{label} {mine[-1]['us_per_token'] / mine[0]['us_per_token']:.2f}x time/token, "
                      f"{mine[-1]['kb_per_token'] / mine[0]['kb_per_token']:.2f}x memory/token")
    print(f"summary: from seq {first} to {last} ({last // first}x): " + "; ".join(growth))
    return {"rows": rows}


def add_long_context(p):
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--mamba-config", default="tiny")
    p.add_argument("--mamba-set", nargs="*", default=["n_layers=8"],
                   help="overrides of the Mamba preset (default: 8 layers, the tiny LLaMA's size)")
    p.add_argument("--llama-config", default="tiny")
    p.add_argument("--llama-set", nargs="*", default=[])
    p.add_argument("--reps", type=int, default=3)


# ----------------------------------------------------------------------------
# mfu: one GPU's training throughput, eager vs compiled, torch vs Triton kernels
# ----------------------------------------------------------------------------

# On a GPU, llama3-8b's preset at LLaMA 3.2 1B's shape (1.5B parameters untied: a model
# one GPU trains whole); on a CPU the test preset.
MFU_SHAPE = ["dim=2048", "n_layers=16", "n_heads=32", "ffn_dim=8192"]


def _mfu_run(cfg, device, args, compiled, peak):
    """Train steps of a fresh llama (AdamW, bf16 autocast on a GPU): the first step's
    compilation, then tokens/s and MFU over the timed steps."""
    torch._dynamo.reset()  # kernels.py picks its backend while tracing: no graph reused across backends
    model = models.build("llama", cfg, device, args.seed)
    if compiled:
        parallel.apply_compile([model])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1),
                        generator=torch.Generator().manual_seed(args.seed)).to(device)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step():
        with autocast:
            loss = model(ids[:, :-1], labels=ids[:, 1:]) / ids[:, 1:].numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # (synchronizes)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup_s = time.perf_counter() - t0
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    seconds = (time.perf_counter() - t0) / args.steps
    tokens_per_s = args.batch_size * args.seq_len / seconds
    mfu = model.flops_per_token(args.seq_len) * tokens_per_s / peak
    return {"step_ms": seconds * 1e3, "tokens_per_s": tokens_per_s, "mfu": mfu, "warmup_s": warmup_s,
            "loss": loss}


def mfu(args, device):
    """Tokens/s and MFU of one device training a ~1B LLaMA: eager vs --compile, with
    kernels.py's torch and Triton paths (KERNELS_BACKEND). On a CPU a tiny shape, and MFU
    against a measured fp32 matmul, not a datasheet."""
    on_gpu = device.type == "cuda"
    preset = args.config or ("llama3-8b" if on_gpu else "test")
    cfg = models.make_config("llama", preset, (MFU_SHAPE if on_gpu and not args.config else []) + args.set)
    seq_len = args.seq_len or (4096 if on_gpu else 64)
    if seq_len > cfg.max_seq_len:
        raise UsageError(f"--seq-len {seq_len} exceeds max_seq_len={cfg.max_seq_len}")
    args.seq_len, args.batch_size = seq_len, args.batch_size or 2
    peak = metrics.peak_flops(device, argparse.Namespace(peak_tflops=args.peak_tflops))
    if peak is None:
        raise UsageError(f"no datasheet peak for {torch.cuda.get_device_name(device)}: pass --peak-tflops")
    backends = args.backends or (["torch", "triton"] if on_gpu and kernels.HAVE_TRITON else ["torch"])
    for backend in backends:
        for compiled in (False, True):
            os.environ["KERNELS_BACKEND"] = backend
            with args.rows.section(f"{backend} kernels{', compiled' if compiled else ''}"):
                r = _mfu_run(cfg, device, args, compiled, peak)
                args.rows.append({"kernels": backend, "compile": "yes" if compiled else "no", **r})
            os.environ.pop("KERNELS_BACKEND")
            if on_gpu:  # (the run's model and optimizer are gone: give their memory back)
                torch.cuda.empty_cache()
    rows = [r for r in args.rows if "error" not in r]
    where = (f"of {torch.cuda.get_device_name(device)}'s datasheet bf16 peak ({peak / 1e12:.0f} TFLOP/s)"
             if on_gpu else f"CPU figure: of a measured fp32 matmul ({peak / 1e9:.0f} GFLOP/s), tiny shape")
    print(f"llama dim {cfg.dim} x {cfg.n_layers} layers, vocab {cfg.vocab_size} | batch {args.batch_size} x "
          f"seq {seq_len} | {'bf16 autocast' if on_gpu else 'fp32'}, AdamW | {args.warmup} warm-up + "
          f"{args.steps} timed steps")
    print()
    print_table(rows, [("kernels", "kernels", ""), ("compile", "compile", ""), ("step_ms", "step ms", ".1f"),
                       ("tokens_per_s", "tokens/s", ",.0f"), ("mfu", "MFU", ".1%"),
                       ("warmup_s", "warm-up s (compile)", ".1f"), ("loss", "last loss", ".4f")])
    if not rows:
        return {"rows": []}
    best = max(rows, key=lambda r: r["mfu"])
    print(f"mfu: best {best['mfu']:.1%} ({best['kernels']} kernels, compile {best['compile']}) {where}")
    return {"config": preset, "dim": cfg.dim, "n_layers": cfg.n_layers, "seq_len": seq_len,
            "batch_size": args.batch_size, "peak_flops": peak, "on_gpu": on_gpu, "rows": rows}


def add_mfu(p):
    p.add_argument("--config", default=None,
                   help="llama preset (default: on a GPU llama3-8b at LLaMA 3.2 1B's shape, MFU_SHAPE; "
                        "on a CPU test)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--seq-len", type=int, default=None, help="default: 4096 on a GPU, 64 on a CPU")
    p.add_argument("--batch-size", type=int, default=None, help="default: 2")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    p.add_argument("--backends", nargs="+", choices=kernels.BACKENDS, default=None,
                   help="kernels.py paths to time (default: torch and, on a GPU, triton)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak")


# ----------------------------------------------------------------------------
# recompute: activations against step time, recompute none / selective / full
# ----------------------------------------------------------------------------

def recompute(args, device):
    """Activation recomputation (train.py --recompute): for none, selective and full, the
    activation bytes of one micro-batch (ActivationMeter's peak, checkpoint inputs counted)
    and the forward + backward time: memory saved and time paid, side by side."""
    cfg = models.make_config("llama", args.config, args.set)
    if args.seq_len > cfg.max_seq_len:
        raise UsageError(f"--seq-len {args.seq_len} exceeds max_seq_len={cfg.max_seq_len}")
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    # A padding mask (all real tokens) makes the torch path materialize a (T x T) mask that
    # SDPA stores for backward; without one, SDPA's CPU and GPU kernels store no scores.
    mask = torch.ones_like(ids) if args.padding_mask else None
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    rows, steps = [], []
    for mode in ("none", "selective", "full"):
        model = models.build("llama", cfg, device, args.seed)
        parallel.apply_recompute([model], mode)
        with ActivationMeter([model], checkpoint_inputs=True) as meter, autocast:
            loss = model(ids, labels=ids, attention_mask=mask)
        del loss

        def step(model=model):
            with autocast:
                loss = model(ids, labels=ids, attention_mask=mask)
            loss.backward()
        rows.append({"recompute": mode, "activation_mb": meter.peak / 2**20})
        steps.append(step)
    # Timed in turns (one step of each mode per round), so that a machine's drift and
    # other load fall on every mode alike.
    for step in steps:
        step()  # untimed: first-call costs (allocations, Triton's compilation on a GPU)
    times = [[] for _ in steps]
    for _ in range(args.reps):
        for step, t in zip(steps, times):
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            t.append(1e3 * (time.perf_counter() - start))
    for r, t in zip(rows, times):
        r["step_ms"] = median(t)
    base = rows[0]
    for r in rows:
        r["memory_vs_none"] = r["activation_mb"] / base["activation_mb"]
        r["time_vs_none"] = r["step_ms"] / base["step_ms"]
    print(f"recompute: llama/{args.config} {' '.join(args.set)}, batch {args.batch_size} x seq "
          f"{args.seq_len}{', padding mask' if args.padding_mask else ''}, one micro-batch")
    print_table(rows, [("recompute", "recompute", "s"), ("activation_mb", "activations MB", ".1f"),
                       ("memory_vs_none", "x none", ".2f"), ("step_ms", "fwd+bwd ms", ".1f"),
                       ("time_vs_none", "x none", ".2f")])
    print(f"summary: full keeps {rows[2]['memory_vs_none']:.2f}x of the activations for "
          f"{rows[2]['time_vs_none']:.2f}x the step time; selective {rows[1]['memory_vs_none']:.2f}x "
          f"for {rows[1]['time_vs_none']:.2f}x")
    return {"rows": rows}


def add_recompute(p):
    p.add_argument("--config", default="tiny", help="llama preset (tiny; on a GPU e.g. llama3-8b)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (e.g. n_layers=2)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--padding-mask", action="store_true",
                   help="pass an attention mask (materialized by the torch path)")
    p.add_argument("--reps", type=int, default=3, help="rounds of timed steps (median per mode)")


# ----------------------------------------------------------------------------
# megatron-memory: the planner against Megatron's own count
# ----------------------------------------------------------------------------
# Megatron's count of a rank's memory (Korthikanti et al. 2022, "Reducing Activation
# Recomputation in Large Transformer Models", Table 2; written out in Megatron-LM's
# training/theoretical_memory_usage.py), for the most loaded rank: pipeline stage 0.
#   weights + gradients + optimizer: its parameters x bytes per parameter, 18 (bf16 weight
#     2, fp32 gradient 4, fp32 main weight 4, Adam's two moments 8), or 6 + 12/dp when the
#     optimizer's state is sharded over dp (ZeRO-1, Megatron's distributed optimizer).
#   activations: each layer saves s*b*h*(18 + 4*ffn/h) bytes (34 at ffn = 4h: no attention
#     scores, which selective recomputation or a fused attention does not keep), divided by
#     t under sequence parallelism; stage 0 holds L/pp layers for pp micro-batches in flight
#     (1F1B), i.e. all L layers' worth, plus the embedding's output per micro-batch; at
#     pp = 1 the output layer's input and the loss's logits (4 bytes/element, 1 + V/h).

MEGATRON_LAYOUTS = {
    # Korthikanti et al., Table 3 (sp + selective recomputation, tp 8): GPT-3 22B and 175B.
    "gpt3-22b": dict(model="gpt", preset="gpt3-175b", set=("dim=6144", "n_layers=48", "n_heads=64"),
                    world=8, tp=8, pp=1, seq_len=2048, micro_batch=4, global_batch=4),
    "gpt3-175b": dict(model="gpt", preset="gpt3-175b", set=(), world=64, tp=8, pp=8, seq_len=2048,
                     micro_batch=1, global_batch=64),
    # LLaMA 3's layouts: 70B at tp 8 x pp 4 x dp 2, 8B at tp 2 x dp 4, seq 8192.
    "llama3-70b": dict(model="llama", preset="llama3-70b", set=(), world=64, tp=8, pp=4, seq_len=8192,
                       micro_batch=1, global_batch=64),
    "llama3-8b": dict(model="llama", preset="llama3-8b", set=(), world=8, tp=2, pp=1, seq_len=8192,
                      micro_batch=1, global_batch=32),
}


def megatron_count(cfg, tp, pp, dp, seq_len, micro_batch, n_micro):
    """(weights + gradients + optimizer, activations) of pipeline stage 0 in bytes, by
    Megatron's formula (above), from a gpt or llama Config."""
    h, L, ffn = cfg.dim, cfg.n_layers, cfg.ffn_dim
    kv_heads = getattr(cfg, "n_kv_heads", cfg.n_heads)
    head_dim = getattr(cfg, "head_dim", 0) or h // cfg.n_heads
    gated = 1.5 if hasattr(cfg, "n_kv_heads") else 1.0  # SwiGLU: three ffn matrices, not two
    per_layer = 2 * h * (cfg.n_heads * head_dim * (1 + kv_heads / cfg.n_heads) + ffn * gated + 2)
    embedding = h * cfg.vocab_size
    params = (L * per_layer + h) / pp + embedding  # (+ h: the final norm)
    if pp == 1 and not cfg.tie_embeddings:
        params += embedding  # the output layer, on the same (only) stage
    static = params / tp * (6 + 12 / dp)
    sbh = seq_len * micro_batch * h
    in_flight = min(n_micro, pp)
    acts = L * sbh * (18 + 4 * ffn / h) * in_flight / pp + in_flight * (sbh + 8 * seq_len * micro_batch)
    if pp == 1:
        acts += 4 * sbh * (1 + cfg.vocab_size / h)
    return static, acts / tp


def megatron_memory(args, device):
    """Stage 0 of each layout in MEGATRON_LAYOUTS, bf16 mixed precision with fp32 gradients,
    sp and ZeRO-1: memory.plan (the --plan of train.py, GPU kernels) against Megatron's
    count, weights + gradients + optimizer and activations apart. No recomputation: the
    fused attention keeps no scores, which is what Megatron's count assumes (its Table 3
    layouts run selective recomputation to get there)."""
    import memory
    rows = []
    for name, lay in MEGATRON_LAYOUTS.items():
        if args.layouts and name not in args.layouts:
            continue
        # Megatron pads the vocabulary to a multiple of 128 x tp; both counts use it.
        base = models.make_config(lay["model"], lay["preset"], lay["set"])
        padded = -(-base.vocab_size // (128 * lay["tp"])) * 128 * lay["tp"]
        cfg = models.make_config(lay["model"], lay["preset"], (*lay["set"], f"vocab_size={padded}",
                                                              f"max_seq_len={lay['seq_len']}"))
        dp = lay["world"] // (lay["tp"] * lay["pp"])
        n_micro = lay["global_batch"] // (lay["micro_batch"] * dp)
        stage = memory.plan(models.family(lay["model"]), cfg, world=lay["world"], tp=lay["tp"], pp=lay["pp"],
                            sp=True, zero1=True, micro_batch=lay["micro_batch"], n_micro=n_micro,
                            seq_len=lay["seq_len"], precision="bf16")[0]
        static, acts = megatron_count(cfg, lay["tp"], lay["pp"], dp, lay["seq_len"], lay["micro_batch"],
                                      n_micro)
        ours_static = stage.weights + stage.gradients + stage.optimizer
        ours_acts = stage.peak - ours_static
        rows.append({"layout": name, "tp_pp_dp": f"{lay['tp']}x{lay['pp']}x{dp}",
                     "ours_static": ours_static / 2**30, "megatron_static": static / 2**30,
                     "ours_acts": ours_acts / 2**30, "megatron_acts": acts / 2**30,
                     "ours": stage.peak / 2**30, "megatron": (static + acts) / 2**30,
                     "ratio": stage.peak / (static + acts)})
    print("megatron-memory: pipeline stage 0, bf16 with fp32 gradients, sp, ZeRO-1, no recomputation; "
          "GiB per rank (ours: memory.plan, i.e. train.py --plan)")
    print_table(rows, [("layout", "layout", "s"), ("tp_pp_dp", "tp x pp x dp", "s"),
                       ("ours_static", "state ours", ".2f"), ("megatron_static", "Megatron", ".2f"),
                       ("ours_acts", "activations ours", ".2f"), ("megatron_acts", "Megatron", ".2f"),
                       ("ours", "peak ours", ".2f"), ("megatron", "Megatron", ".2f"),
                       ("ratio", "ours / Megatron", ".3f")])
    worst = max(rows, key=lambda r: r["ratio"])
    print(f"summary: the planner's stage 0 is {min(r['ratio'] for r in rows):.3f}x-{worst['ratio']:.3f}x "
          f"Megatron's count (largest: {worst['layout']})")
    return {"rows": rows}


def add_megatron_memory(p):
    p.add_argument("--layouts", nargs="*", default=[], choices=list(MEGATRON_LAYOUTS),
                   help="a subset of the layouts (default: all)")


# ----------------------------------------------------------------------------
# generate: decoding speed and KV-cache bytes
# ----------------------------------------------------------------------------

def generate_speed(args, device):
    """Decoding at growing context: the rolling cache (kernels.KVCache with a window) against
    the full cache, then several prompts as one batch against one by one (generate.py)."""
    import generate
    cfg = models.make_config("llama", "test", [f"sliding_window={args.window}", "max_seq_len=65536"])
    model = models.build("llama", cfg, device, seed=args.seed).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, max(args.lengths) + args.new_tokens), device=device)
    rows = []
    with torch.no_grad():
        for length in args.lengths:
            for name in ("rolling", "full"):
                size = length + args.new_tokens
                caches = model.new_kv_caches(size) if name == "rolling" else [
                    kernels.KVCache(size) for _ in model.layers]
                model(ids[:, :length], kv_caches=caches)  # prefill, not timed
                start = time.perf_counter()
                for t in range(length, size):
                    model(ids[:, t:t + 1], kv_caches=caches)
                seconds = time.perf_counter() - start
                rows.append({"context": length, "cache": name, "tokens_per_s": args.new_tokens / seconds,
                             "cache_mb": sum(c.nbytes() for c in caches) / 2**20})
    print_table(rows, [("context", "context", "d"), ("cache", "cache", "s"),
                       ("tokens_per_s", "decode tokens/s", ".0f"), ("cache_mb", "KV cache MiB", ".2f")])
    prompts = [ids[0, :16 * (i + 1)].tolist() for i in range(args.batch)]
    timing = {}
    for name, batches in (("batched", [prompts]), ("one by one", [[p] for p in prompts])):
        start = time.perf_counter()
        new = sum(len(n) for b in batches for n in generate.sample_batch(model, b, args.new_tokens, 0))
        timing[name] = new / (time.perf_counter() - start)
    print(f"{args.batch} prompts of 16-{16 * args.batch} tokens, {args.new_tokens} new each: batched "
          f"{timing['batched']:.0f} tokens/s, one by one {timing['one by one']:.0f} tokens/s "
          f"({timing['batched'] / timing['one by one']:.1f}x)")
    return {"context": rows, "batched_tokens_per_s": timing["batched"],
            "one_by_one_tokens_per_s": timing["one by one"]}


def add_generate(p):
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)


# ----------------------------------------------------------------------------
# determinism, plot: runs compared field by field, and drawn
# ----------------------------------------------------------------------------

# What a metrics record holds that depends on the machine's speed, not on the computation.
TIMING_FIELDS = ("tokens_per_s", "step_time", "mfu", "mem_gb")


def determinism(args, device):
    """Run the same training command twice, each in its own processes (torchrun with
    --nproc > 1), and compare their --metrics records field by field, exactly."""
    command = ["--model", args.model, "--config", args.config, "--steps", str(args.steps),
               "--sample-tokens", "0", "--device", device.type, "--seed", str(args.seed),
               *[f for f in args.train_flags if f != "--"]]
    launcher = ["python", "train.py"] if args.nproc == 1 else [
        "python", "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}", "train.py"]
    runs = []
    for i in range(2):
        start = time.perf_counter()
        runs.append([{k: v for k, v in r.items() if k not in TIMING_FIELDS}
                     for r in train_records(launcher, command)])
        print(f"run {i + 1}: {len(runs[-1])} steps in {time.perf_counter() - start:.0f} s",
              file=sys.stderr, flush=True)
    first, second = runs
    compared = sorted({k for r in first + second for k in r})
    differing = [(a["step"], k) for a, b in zip(first, second) for k in compared if a.get(k) != b.get(k)]
    identical = len(first) == len(second) == args.steps and not differing
    print(f"determinism: {' '.join(launcher + command)}")
    print(f"summary: {len(first)} steps, fields {', '.join(compared)}: " +
          ("bit-identical in both runs" if identical else
           f"DIFFERENT: (step, field) {differing[:10]} (of {len(first)} / {len(second)} records)"))
    return {"identical": identical, "steps": len(first), "fields": compared, "differing_steps": differing,
            "final_loss": first[-1]["loss"] if first else None}


def add_determinism(p):
    p.add_argument("--model", default="llama")
    p.add_argument("--config", default="tiny")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    p.add_argument("train_flags", nargs=argparse.REMAINDER,
                   help="more train.py flags, after `--` (e.g. -- --tp 2)")


def plot(args, device):
    """Draw the curves of each --metrics file (metrics.read_metrics: its step records) into
    one PNG: loss, validation loss, learning rate, tokens/s; x = step or tokens seen."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # a file, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("bench.py plot needs matplotlib: pip install matplotlib") from None
    runs = {}
    for path in args.files:
        try:
            runs[path] = metrics.read_metrics(path)
        except (OSError, ValueError) as e:
            raise UsageError(f"{path}: not a --metrics file ({e})") from None
        if not runs[path]:
            raise UsageError(f"{path} holds no step records")
    x_key, x_label = ("tokens_seen", "tokens seen") if args.x == "tokens" else ("step", "step")
    panels = [("loss", "training loss"), ("val_loss", "validation loss"), ("lr", "learning rate"),
              ("tokens_per_s", "tokens/s")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    # Each run its own line style too, so that identical curves (a layout that equals one
    # process) show as one drawn over the other, not as one missing run.
    styles = ["-", "--", ":", "-."]
    labels = {path: " ".join([os.path.basename(path), *[f"({d})" for d in [metrics.describe_run(path)] if d]])
              for path in runs}
    for ax, (key, title) in zip(axes.flat, panels):
        for i, (path, records) in enumerate(runs.items()):
            points = [(r[x_key], r[key]) for r in records if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o" if key == "val_loss" else None, markersize=3,
                        linestyle=styles[i % len(styles)], linewidth=1.5 + (len(runs) - 1 - i) * 0.8,
                        label=labels[path])
        ax.set_title(title)
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.savefig(args.output, dpi=args.dpi)
    rows = [{"file": path, "steps": len(r), "final_loss": r[-1]["loss"],
             "val_loss": next((x["val_loss"] for x in reversed(r) if "val_loss" in x), None)}
            for path, r in runs.items()]
    print_table(rows, [("file", "file", ""), ("steps", "steps", "d"), ("final_loss", "final loss", ".4f"),
                       ("val_loss", "last val loss", ".4f")])
    print(f"plot: wrote {args.output} ({len(runs)} run(s), x = {x_label})")
    return {"output": args.output, "rows": rows}


def add_plot(p):
    p.add_argument("files", nargs="+", metavar="METRICS.jsonl", help="--metrics files of train.py")
    p.add_argument("-o", "--output", default="curves.png", help="the PNG to write")
    p.add_argument("--x", choices=["step", "tokens"], default="step", help="the horizontal axis")
    p.add_argument("--dpi", type=int, default=110)


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

# mode -> (function, help, options). One entry per mode.
MODES = {
    "train-vs-hf": (train_vs_hf, "training tokens/s: our llama vs HF LlamaForCausalLM", add_train_vs_hf),
    "zero1-memory": (zero1_memory, "optimizer state bytes per rank with/without ZeRO-1", add_zero1_memory),
    "sp-memory": (sp_memory, "activation bytes per rank at tp with/without sequence parallelism",
                  add_sp_memory),
    "pp-schedules": (pp_schedules, "pipeline: stage-0 activations GPipe vs 1F1B, step time vs bubble",
                     add_pp_schedules),
    "cp-memory": (cp_memory, "context parallelism: activations per rank, bytes sent, ring vs all-gather",
                  add_cp_memory),
    "moe-ep": (moe_ep, "Mixtral: tokens/s at ep = 1, 2, 4 and all-to-all bytes per step", add_moe_ep),
    "kernels": (benchmark_kernels, "attention TFLOP/s vs SDPA-flash; RMSNorm/SwiGLU GB/s vs HBM peak",
                add_kernels_options),
    "kernels-compile": (kernels_compile, "every Triton kernel config compiled for sm_80/89/90 (no GPU): "
                        "registers, spills, shared memory", add_kernels_compile_options),
    "fp8-gemm": (fp8_gemm, "FP8 GEMM TFLOP/s: ours vs torch._scaled_mm and bf16 (GPU); emulation cost (CPU)",
                 add_fp8_gemm),
    "fp8-curve": (fp8_curve, "FP8 training's loss curve vs fp32 (each recipe; the CPU runs the emulation)",
                  add_fp8_curve),
    "long-context": (long_context, "Mamba-2 vs LLaMA: fwd+bwd time and activations per token vs seq len",
                     add_long_context),
    "mfu": (mfu, "one device: tokens/s and MFU of a ~1B llama, eager vs compiled, torch vs Triton kernels",
            add_mfu),
    "recompute": (recompute, "activation recomputation none/selective/full: activations vs step time",
                  add_recompute),
    "megatron-memory": (megatron_memory, "the planner's stage 0 against Megatron's formula on its own layouts",
                        add_megatron_memory),
    "generate": (generate_speed, "decoding: rolling vs full KV cache at 1k-8k, batched vs one by one",
                 add_generate),
    "determinism": (determinism, "two identical training runs: bit-identical metrics?", add_determinism),
    "plot": (plot, "training curves of --metrics files: loss, val loss, lr, tokens/s", add_plot),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = p.add_subparsers(dest="mode", required=True, metavar="MODE")
    for name, (_, help_text, add_options) in MODES.items():
        sub = modes.add_parser(name, help=help_text,
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
        sub.add_argument("--seed", type=int, default=1337)
        sub.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
        add_options(sub)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is visible", file=sys.stderr)
        sys.exit(2)
    device = torch.device(args.device if args.device != "auto"
                          else "cuda" if torch.cuda.is_available() else "cpu")
    info = header(device)
    print(f"bench {args.mode} | {info['device']} | torch {info['torch']} | "
          f"{info['threads']} threads | load {info['load_avg_1min']:.2f} | {info['date']}")
    args.rows = Rows(args.json, {"mode": args.mode, **info, "args": dict(vars(args))})
    try:
        results = MODES[args.mode][0](args, device)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    args.rows.save(results)
    if args.json:
        print(f"wrote {args.json}")
    if args.rows.failed:
        print(f"error: {len(args.rows.failed)} part(s) failed: {', '.join(args.rows.failed)} (tracebacks "
              f"above; the other parts' rows are kept)", file=sys.stderr)
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
