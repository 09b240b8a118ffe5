"""What a training run measures and reports: the device's peak for MFU and its memory, the
progress line every --log-every steps, the --metrics file (JSON lines: each run's header
record, then one record per step) and wandb.

  Measuring                                  GPU_PEAK_FLOPS, peak_flops, memory_gb
  The progress line and the --metrics file   read_metrics, trim_metrics (a resumed run's steps
                                             recorded once); Logger: the line, the file and
                                             wandb, on the main rank
"""
import contextlib
import errno
import json
import os
import resource
import tempfile
import time

import torch

from errors import UsageError


# ----------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------

# Dense bf16 tensor-core peaks (FLOP/s) of common GPUs, for MFU.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12,
                  "A800": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device, args):
    """Per-device peak FLOP/s for MFU: --peak-tflops, else the GPU's datasheet, else (CPU)
    a measured fp32 matmul so that MFU still says how busy the cores are: the best of five,
    after one that wakes the BLAS threads. Measured under load it is too low: the training
    loop raises it to any faster rate a step achieves (see cpu_peak_seen), so a CPU's MFU
    never reads above 100%."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)
    a = torch.randn(2048, 2048)  # large enough to reach the BLAS library's full speed
    a @ a
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best


def cpu_peak_seen(peak, step_flops_per_s, device, args):
    """The measured CPU peak, raised to a step's achieved FLOP/s if that was faster (the
    reference matmul ran while something else took the cores); a datasheet or --peak-tflops
    stays as given."""
    if device.type == "cuda" or args.peak_tflops or peak is None:
        return peak
    return max(peak, step_flops_per_s)


def memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # peak RSS


# ----------------------------------------------------------------------------
# The progress line and the --metrics file
# ----------------------------------------------------------------------------

def describe_accuracies(record, prefix=""):
    """"mlm acc 41.2% sentence order 63.0%" for the accuracies in a record ("" if none)."""
    baseline = "commonest token" if prefix + "mlm_accuracy" in record else "majority class"
    names = {"mlm_accuracy": "mlm acc", "sentence_order_accuracy": "sentence order",
             "accuracy": "acc", "majority_baseline": baseline}
    return " ".join(f"{label} {record[prefix + key]:.1%}" for key, label in names.items()
                    if prefix + key in record)


def describe_mfu(records, device):
    """The mean MFU of these steps' records, "41.2%" (of a GPU's datasheet peak), on a CPU
    "41.2% of cpu matmul" (of the fastest fp32 matmul rate seen: peak_flops), or "n/a"
    without a peak."""
    if records[0]["mfu"] is None:
        return "n/a"
    mfu = sum(r["mfu"] for r in records) / len(records)
    return f"{mfu:.1%}" if device.type == "cuda" else f"{mfu:.1%} of cpu matmul"


def describe_data_progress(record):
    """" | epoch 0.42", or for a blend " | epochs 0.42/1.10, shares 0.70/0.30"; "" for data
    read otherwise (BERT's, T5's and tasks' examples)."""
    if "epoch" not in record:
        return ""
    if "blend_shares" not in record:
        return f" | epoch {record['epoch']:.2f}"
    return (f" | epochs {'/'.join(f'{e:.2f}' for e in record['epoch'])}, shares "
            f"{'/'.join(f'{s:.2f}' for s in record['blend_shares'])}")


def clock(seconds):
    """h:mm:ss"""
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def read_metrics(path):
    """The step records of a --metrics file, in order (without the runs' header records)."""
    with open(path) as f:
        return [r for r in map(_record, f) if "step" in r]


def _record(line):
    """A --metrics line as a dict; a line of another kind (not a JSON object: written by
    something else, or cut short) as {}, which no reader takes for a record or header."""
    try:
        record = json.loads(line)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _header(record):
    return record["run"] if isinstance(record.get("run"), dict) else None


def run_of_step(path, step):
    """(header, record) of a --metrics file's record of `step` and of the run that wrote it
    (the last such record: a resumed run writes again the steps after its checkpoint)."""
    found, header = None, None
    try:
        with open(path) as f:
            for record in map(_record, f):
                if _header(record) is not None:
                    header = _header(record)
                elif record.get("step") == step and header is not None:
                    found = header, record
    except OSError as e:
        raise UsageError(f"{path}: cannot read the metrics file ({e.strerror})") from None
    if found is None or not isinstance(found[0].get("args"), dict):
        raise UsageError(f"{path}: no record of step {step} after a run's header")
    return found


def describe_run(path):
    """A --metrics file's last run in a few words, from its header: "llama tp=2 bf16"
    (the model, the axes of its layout above 1, the precision), or "" without a header."""
    with open(path) as f:
        headers = [h for h in map(_header, map(_record, f)) if h is not None]
    if not headers:
        return ""
    run = headers[-1]
    axes = [part for part in run.get("layout", "").split() if "=" in part and part.split("=")[0] in
            ("tp", "cp", "dp", "pp", "ep") and part.split("=")[1] != "1"]
    return " ".join([run.get("args", {}).get("model", "?"), *axes, run.get("precision", "")]).strip()


def trim_metrics(path, start_step, run_id=None):
    """Before a run resumed at `start_step` appends to its --metrics file: remove the
    records of later steps, which the interrupted run wrote after its last checkpoint and
    this run trains again, so that no step is recorded twice; and a last line cut short by
    a crash. Only records of this run's lineage go: those under the headers of `run_id`
    (the id a run's resumptions keep: an unrelated run before it, or appended to the same
    file since, keeps its own), or for a file without that id, after the header of the last
    run started from step 0. Returns how many records were removed; a ValueError if a line
    is not a JSON object (not a metrics file: nothing is changed)."""
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    complete = [line for line in lines if line.endswith("\n")]  # a crash may cut the last one
    records = [_record(line) for line in complete]
    if not all(records):
        raise ValueError(f"{path} is not a metrics file")
    headers = [_header(r) for r in records]
    ours, owner = [], None
    if any(h is not None and h.get("run_id") == run_id for h in headers) and run_id is not None:
        for h in headers:
            owner = h.get("run_id") if h is not None else owner
            ours.append(owner == run_id)
    else:
        lineage = max((i for i, h in enumerate(headers) if h is not None and h.get("start_step") == 0),
                      default=0)
        ours = [i >= lineage for i in range(len(records))]
    keep = [line for line, r, mine in zip(complete, records, ours)
            if not mine or not isinstance(r.get("step"), int) or r["step"] <= start_step]
    if len(keep) < len(lines):
        # A new file of its own beside it (created exclusively, no link followed: a planted
        # `.tmp` name cannot redirect the write), then renamed over it.
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".metrics-")
        with os.fdopen(fd, "w") as f:
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
                removed = trim_metrics(args.metrics, start, header["run_id"]) \
                    if start and os.path.exists(args.metrics) else 0
                os.makedirs(os.path.dirname(args.metrics) or ".", exist_ok=True)  # as --save makes its folder
                self.metrics = open(args.metrics, "a")
            except OSError as e:
                raise UsageError(f"--metrics {args.metrics}: cannot open it ({e.strerror}); "
                                 f"choose another file") from None
            except ValueError:
                raise UsageError(f"--metrics {args.metrics} is not a metrics file (a line is not "
                                 f"a JSON object); choose another file") from None
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
            self.print(f"step {done:5d}/{args.steps} | loss {record['loss']:.4f}{train_acc}{val}{moe}"
                       f"{describe_data_progress(record)} | lr "
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
