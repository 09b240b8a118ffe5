"""Where does a layout depart from one process? A parity bisector, and exact step replay.

  python parity.py --model llama --config test --tp 2                # one step: tp 2 vs one process
  python parity.py --model mixtral --config test --ep 2 --nproc 4    # dp 4 x ep 2
  python parity.py --load runs/a --tp 2 --pp 2                       # the checkpoint's next step
  python parity.py --replay-step 37 --metrics runs/a.jsonl           # step 37 again, at world size 1

Every layout computes what one process computes (the layout-independent initialization
and batches, train.py's loss divisor). When a change to a model file breaks that, the loss
differs, and this says *where*: it runs one training step under the layout, in `--nproc`
local processes over gloo, and the same step in this process at world size 1 from the same
weights and batch, recording on both sides every module's input and output, each
micro-batch and call apart, every parameter's gradient once reduced, and every parameter
after the update (nothing is saved). Each rank's piece is set beside the same piece of the
one-process tensor, cut by the layout's own rules (data rows by micro-batch; the sequence
by cp's zigzag and sp's shards; a tensor-parallel linear's features by its weight's region
in the global weight; a parameter or its gradient by its region), and the first departure
in execution order is printed (the forward module by module, the loss; then the gradients
in the order backward finished them, the gradient norm; then the updated parameters), with
the ranks whose pieces differ, then the next few. Tensors whose pieces no rule places (an
expert's routed rows, tensors split over heads inside a module) are counted, not compared.

--replay-step N recomputes step N of a run at world size 1 in fp32: from the run's
--metrics file it takes the run's flags and the step's recorded loss and gradient norm, from
its checkpoint (the newest at or before step N - 1; steps in between are trained again) the
state, and prints the replayed figures beside the recorded ones. The batches of a step depend
only on the seed and the step, so a spike seen on many GPUs can be studied on a laptop.

This is a tool of its own rather than a train.py mode: it starts its ranks itself (no
torchrun) and runs a reference beside them, which a trainer does not. (Not "bisect.py": that
name would hide the standard library's bisect module, which `random` imports.)
"""
import contextlib
import copy
import itertools
import math
import os
import sys

import torch

import checkpoint
import errors
import flags
import metrics
import parallel
import train
from errors import UsageError

RTOL, ATOL = 1e-4, 1e-7  # a piece departs when |piece - reference| > RTOL |reference| + ATOL sqrt(n)


# ----------------------------------------------------------------------------
# Recording one step
# ----------------------------------------------------------------------------

def feature_index(module, side):
    """Global indices of the last dimension of `module`'s output (or input) on this rank,
    where a tensor-parallel weight of its own places them: a column-parallel linear's
    output features are its weight's rows (GPT-2's (3, dim, dim) included), a row-parallel
    linear's input features its columns. None where no weight says."""
    for p in module.parameters(recurse=False):
        t = parallel.tags(p)
        if t.tp_sharded and t.global_shape is not None:
            shape, offset, extent = parallel.global_region(p)
            dims = slice(p.dim() - 1, p.dim()) if side == "input" and p.dim() > 1 else slice(0, max(1, p.dim() - 1))
            index = torch.arange(math.prod(shape[dims])).reshape(shape[dims])
            return index[tuple(slice(o, o + e) for o, e in zip(offset[dims], extent[dims]))].flatten()
    return None


class Recorder:
    """This rank's module inputs (the first argument) and outputs during a step's forward
    passes, keyed (module, side, global micro-batch, call within it), in the order they
    were made; the order in which parameters' gradients became final. What is recomputed
    inside backward is left out. (A departing input whose producer's output did not depart
    was made by the code of the module around it.)"""

    def __init__(self, modules, first_micro):
        self.outputs, self.features, self.grad_order = {}, {}, []
        self.micro, self.calls, self.handles = None, {}, []
        for chunk in modules:
            # Each chunk runs its micro-batches in order (every schedule does): count them.
            seen = itertools.count(first_micro)
            self.handles.append(chunk.register_forward_pre_hook(
                lambda module, inputs, seen=seen: setattr(self, "micro", next(seen))))
            for name, module in chunk.named_modules():
                if name:
                    self.handles.append(module.register_forward_pre_hook(self._record(name, "input")))
                    self.handles.append(module.register_forward_hook(self._record(name, "output")))
                    self.features.update({(name, side): feature_index(module, side) for side in ("input", "output")})
            for name, p in chunk.named_parameters():
                self.handles.append(p.register_post_accumulate_grad_hook(
                    lambda p, name=name: self.grad_order.append(name)))

    def _record(self, name, side):
        def hook(module, inputs, output=None):
            t = inputs[0] if side == "input" and inputs else output
            in_backward = torch._C._current_graph_task_id() != -1  # (a recomputed forward)
            if not isinstance(t, torch.Tensor) or in_backward:
                return
            call = self.calls.get((name, side, self.micro), 0)
            self.calls[(name, side, self.micro)] = call + 1
            self.outputs[(name, side, self.micro, call)] = t.detach().float().clone()
        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


def pieces(ddp, tensor_of):
    """{name: (tensor_of(parameter) on this rank, its offset, its extent in the global
    tensor)}; the last pipeline stage's copy of a tied embedding is left out (the first
    stage's holds the same)."""
    out = {}
    for name, p in ddp.named_params:
        if not parallel.tags(p).pp_tied_copy:
            _, offset, extent = parallel.global_region(p)
            out[name] = (tensor_of(p).detach().float().clone(), offset, extent)
    return out


def gradient_pieces(ddp):
    """Each parameter's reduced gradient after ddp.finish(), as pieces(); ZeRO-1 slices are
    gathered first (each rank reduced only its own)."""
    for b in ddp.buckets:
        if b.sharded:
            parallel.all_gather_single(b.grads, b.grad_shard.clone(), group=b.group)
    return pieces(ddp, ddp.grad)


def record_step(args):
    """One rank's job (every rank of the layout, or the one process): one step's forward
    and backward from --load (or the initialization) under train.py's parsed flags;
    returns what it saw: module inputs and outputs, the loss, the reduced gradients, the
    gradient norm, and the parameters after the step's update (nothing is saved)."""
    cfg, tokenizer, hf_dir, source = flags.model_config(args)
    flags.check_args(args, cfg, tokenizer)
    layout = train.init_layout(args)
    run = recorder = None
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            run = train.setup(args, cfg, tokenizer, hf_dir, source, layout)
        step = run.start_step
        recorder = Recorder(run.modules, layout.dp_rank * run.micro_steps)
        run.ddp.zero_grad()
        loss = train.forward_backward(run, lambda rows: train.draw_batch(run.train_data, step, args.seed, args, rows))
        run.ddp.finish()
        grads = gradient_pieces(run.ddp)
        grad_norm = parallel.clip_grad_norm(run.ddp, args.clip_grad).item()
        run.optimizer.lr = train.lr_at(step, args)
        run.optimizer.step()
        return {"step": step + 1, "loss": loss, "grad_norm": grad_norm, "outputs": recorder.outputs,
                "features": recorder.features, "grad_order": recorder.grad_order, "grads": grads,
                "updated": pieces(run.ddp, lambda p: p),
                "coords": {"tp": layout.tp_rank, "cp": layout.cp_rank, "dp": layout.dp_rank, "pp": layout.pp_rank},
                "layout": layout.describe()}
    finally:
        if recorder is not None:
            recorder.close()
        if run is not None:
            run.close()
        parallel.destroy_distributed(layout)


# ----------------------------------------------------------------------------
# Cutting the one-process tensor as the layout cuts it
# ----------------------------------------------------------------------------

def sequence_positions(length, piece_length, coords, tp, cp):
    """Positions in the whole sequence of a piece's tokens (dim 1), or None where no rule
    gives them: the whole sequence; cp's zigzag share; sp's shard of that share."""
    if piece_length == length:
        return torch.arange(length)
    if length % (2 * cp):
        return None
    share = parallel.zigzag_positions(length, parallel.Layout(cp=cp, rank=coords["cp"])) if cp > 1 \
        else torch.arange(length)
    if piece_length == length // cp:
        return share
    if piece_length * cp * tp == length:
        return share[coords["tp"] * piece_length:(coords["tp"] + 1) * piece_length]
    return None


def reference_piece(reference, piece, features, coords, tp, cp):
    """The part of the one-process output `reference` that this rank's `piece` holds, or
    None where no rule places it."""
    if piece.dim() < 3 or piece.shape[0] != reference.shape[0]:
        return None
    positions = sequence_positions(reference.shape[1], piece.shape[1], coords, tp, cp)
    if positions is None:
        return None
    ref = reference.index_select(1, positions)
    if piece.shape[-1] != ref.shape[-1]:
        if features is None or len(features) != piece.shape[-1]:
            return None
        ref = ref.index_select(-1, features)
    return ref if ref.shape == piece.shape else None


class Departure:
    """Where (forward or backward), what (a module's input or output of a micro-batch, a
    gradient, the loss), the relative difference over all pieces, the ranks whose differ."""

    def __init__(self, where, what, relative, ranks):
        self.where, self.what, self.relative, self.ranks = where, what, relative, ranks

    def __str__(self):
        return f"{self.where} {self.what}: relative difference {self.relative:.2e}, on {self.ranks}"


def describe_ranks(ranks, coords, world):
    axes = [a for a in ("tp", "cp", "dp", "pp") if any(c[a] for c in coords.values())]
    if len(ranks) == world:
        return "every rank"
    return ", ".join(f"rank {r}" + (" (" + " ".join(f"{a} {coords[r][a]}" for a in axes) + ")" if axes else "")
                     for r in ranks)


def compare(reference, by_rank):
    """(departures in execution order, counts): the layout's pieces against the one-process
    step, outputs first (each micro-batch's modules in the order they ran), then the loss,
    then gradients in the order backward finished them, the gradient norm, and the
    parameters after the update (AdamW, ZeRO-1's slices gathered back)."""
    coords = {r: c["coords"] for r, c in by_rank.items()}
    tp = 1 + max(c["tp"] for c in coords.values())
    cp = 1 + max(c["cp"] for c in coords.values())
    found, counts = [], {"outputs": 0, "not placed": 0, "gradients": 0, "largest": (0.0, "")}

    def judge(where, what, pairs):
        ranks, diff, scale = [], 0.0, 0.0
        for rank, piece, ref in pairs:
            d, r = (piece - ref).norm().item(), ref.norm().item()
            if d > RTOL * r + ATOL * math.sqrt(ref.numel()):  # this rank's piece departs
                ranks.append(rank)
            diff, scale = diff + d ** 2, scale + r ** 2
        rel = math.sqrt(diff) / max(math.sqrt(scale), 1e-30)
        if RTOL * math.sqrt(scale) > ATOL * math.sqrt(sum(ref.numel() for _, _, ref in pairs)):  # (not ~0)
            counts["largest"] = max(counts["largest"], (rel, f"{where} {what}"))
        if ranks:
            found.append(Departure(where, what, rel, describe_ranks(ranks, coords, len(by_rank))))

    for key, whole in reference["outputs"].items():
        name, side, micro, call = key
        pairs = []
        for rank, capture in by_rank.items():
            if key in capture["outputs"]:
                piece = capture["outputs"][key]
                ref = reference_piece(whole, piece, capture["features"].get((name, side)), coords[rank], tp, cp)
                if ref is None:
                    pairs = None
                    break
                pairs.append((rank, piece, ref))
        if not pairs:
            counts["not placed"] += 1
            continue
        counts["outputs"] += 1
        judge("forward", f"{name} {side} (micro-batch {micro}" + (f", call {call + 1})" if call else ")"), pairs)
    def figure(key):  # (the loss and the gradient norm: every rank holds the global value)
        return [(r, torch.tensor([c[key]]), torch.tensor([reference[key]])) for r, c in by_rank.items()]

    judge("forward", "loss", figure("loss"))
    def parameters(kind):  # [(name, [(rank, piece, the reference's part)])], in backward's order
        order = reference["grad_order"] + list(reference[kind])
        for name in dict.fromkeys(order):
            whole, pairs = reference[kind][name][0], []
            for rank, capture in by_rank.items():
                if name in capture[kind]:
                    piece, offset, extent = capture[kind][name]
                    region = tuple(slice(o, o + e) for o, e in zip(offset, extent))
                    pairs.append((rank, piece[tuple(slice(0, e) for e in extent)], whole[region]))
            if pairs:
                yield name, pairs

    for name, pairs in parameters("grads"):
        counts["gradients"] += 1
        judge("backward", f"gradient of {name}", pairs)
    judge("backward", "gradient norm", figure("grad_norm"))
    for name, pairs in parameters("updated"):
        judge("update", f"{name} after the step", pairs)
    return found, counts


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

def options_parser():
    p = errors.ArgumentParser(
        description="Where a layout departs from one process (one step, every module output and "
                    "gradient); or --replay-step N: step N of a run again at world size 1. Every "
                    "other flag is train.py's.", allow_abbrev=False, add_help=False)
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes for the layout (default: tp x cp x pp x the fewest data-parallel "
                        "ranks --ep needs)")
    p.add_argument("--show", type=int, default=5, help="departures to print (default: 5)")
    p.add_argument("--replay-step", type=int, default=None,
                   help="recompute this step of the run --metrics recorded, at world size 1 in fp32")
    return p


def default_nproc(args):
    """tp x cp x pp x the fewest data-parallel ranks that ep (over (tp / etp) x dp x cp) needs."""
    expert_share = (args.tp // (args.etp or args.tp)) * args.cp
    dp = next(d for d in range(1, args.ep + 1) if d * expert_share % args.ep == 0)
    return args.tp * args.cp * args.pp * dp


def rank_step(args, job, **job_kwargs):
    """What each rank of the layout runs: job(args=args, ...), or the UsageError it raised
    (bad input, said once by the parent rather than as a rank's traceback)."""
    try:
        return job(args=args, **job_kwargs)
    except UsageError as e:
        return e


def at_world_size_one(args):
    """The same flags at world size 1 (the layout's micro-batches stay: the same rows pass
    through the model together, as router losses are per micro-batch)."""
    one = copy.copy(args)
    one.tp = one.cp = one.pp = one.vpp = one.ep = 1
    one.etp = None
    return one


def parity_flags(args, dp):
    """train.py's flags for the parity step: fp32 on the CPU, nothing written, the
    micro-batch size fixed, and (from --load) a step to take whatever --steps says."""
    args = copy.copy(args)
    args.micro_batch_size = flags.micro_batch_size(args, dp)
    args.device, args.precision, args.compile, args.steps = "cpu", "fp32", False, 2**40
    args.save = args.metrics = args.wandb = None
    return args


def bisect(argv, nproc=None, ranks=None, job=None, **job_kwargs):
    """Run the parity step: (header line, departures, counts). `ranks`: a LocalRanks of
    nproc processes to use (else started here); `job(args=, **job_kwargs)`: the rank job
    (record_step; the tests' plants a fault first)."""
    args = flags.parse_args(argv)
    nproc = nproc or default_nproc(args)
    if nproc < 1 or nproc % (args.tp * args.cp * args.pp):
        raise UsageError(f"--nproc {nproc} is not a multiple of tp x cp x pp = {args.tp * args.cp * args.pp}")
    args = parity_flags(args, nproc // (args.tp * args.cp * args.pp))
    if ranks is None:
        with parallel.LocalRanks(nproc, timeout=3600) as own:
            by_rank = own.run(rank_step, args=args, job=job or record_step, **job_kwargs)
    else:
        by_rank = ranks.run(rank_step, args=args, job=job or record_step, **job_kwargs)
    if isinstance(by_rank[0], UsageError):  # (bad input: every rank says the same)
        raise by_rank[0]
    reference = record_step(at_world_size_one(args))
    found, counts = compare(reference, by_rank)
    head = (f"parity: step {reference['step']} of {args.model or 'the loaded model'} under "
            f"{next(iter(by_rank.values()))['layout']} ({nproc} processes) vs one process, fp32: "
            f"{counts['outputs']} module inputs and outputs, the loss, {counts['gradients']} gradients, the "
            f"gradient norm and the updated parameters compared ({counts['not placed']} split in ways no rule places: "
            f"not compared)")
    return head, found, counts


def replay(argv, step):
    """Step `step` of the run --metrics recorded, again at world size 1 in fp32: (replayed
    record, recorded record, the checkpoint it started from)."""
    path = train_flag(argv, "--metrics")
    if path is None:
        raise UsageError("--replay-step needs --metrics FILE: the run's metrics (its flags and the "
                         "recorded loss and gradient norm)")
    header, recorded = metrics.run_of_step(path, step)
    saved = dict(header["args"])
    load = train_flag(argv, "--load") or saved.get("save")
    if not load:
        raise UsageError(f"{path}: the run saved no checkpoint (no --save); pass --load DIR")
    steps = [s for s in checkpoint.complete_steps(load) if s < step]
    if not steps:
        raise UsageError(f"--load {load}: no checkpoint before step {step} (checkpoints: "
                         f"{checkpoint.complete_steps(load) or 'none'})")
    step_dir = os.path.join(load, checkpoint.step_dir_name(steps[-1]))
    args = flags.parse_args(["--model", str(saved.get("model"))])
    for name, value in saved.items():
        setattr(args, name, value)
    # The run's micro-batches stay (router losses are per micro-batch), so does its schedule.
    micro_batch_size = flags.micro_batch_size(args, header.get("world_size", 1) // (args.tp * args.cp * args.pp))
    args = at_world_size_one(args)
    args.micro_batch_size, args.load, args.save, args.metrics, args.wandb = micro_batch_size, step_dir, None, None, None
    args.device, args.precision, args.compile, args.steps = "cpu", "fp32", False, max(args.steps, step)
    cfg, tokenizer, hf_dir, source = flags.model_config(args)
    layout = train.init_layout(args)
    run = None
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            run = train.setup(args, cfg, tokenizer, hf_dir, source, layout)
        record = None
        for s in range(run.start_step, step):
            record = train.train_step(run, s)
    finally:
        if run is not None:
            run.close()
        parallel.destroy_distributed(layout)
    return record, recorded, step_dir


def train_flag(argv, name):
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    return values[-1] if values else None


def main(argv=None):
    with errors.stop_on_signals():
        _main(sys.argv[1:] if argv is None else argv)


def _main(argv):
    try:
        parser = options_parser()
        options, rest = parser.parse_known_args(argv)
        if options.help:
            print(__doc__.strip() + "\n\n" + parser.format_help() + "\ntrain.py's flags: python train.py --help")
            return
        for name in ("nproc", "show", "replay_step"):
            if getattr(options, name) is not None and getattr(options, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(options, name)}")
        if options.replay_step is not None:
            record, recorded, step_dir = replay(rest, options.replay_step)
            print(f"step {options.replay_step} replayed at world size 1 in fp32 from {step_dir}:")
            for key, label in (("loss", "loss"), ("grad_norm", "gradient norm")):
                rel = abs(record[key] - recorded[key]) / max(abs(recorded[key]), 1e-30)
                print(f"  {label:13} {record[key]:.9g}  recorded {recorded[key]:.9g}  relative difference {rel:.1e}")
            return
        head, found, counts = bisect(rest, options.nproc)
        print(head)
        if not found:
            rel, where = counts["largest"]
            print(f"no departure: every compared tensor equals one process's (largest "
                  f"relative difference {rel:.1e}, {where})")
            return
        print(f"first departure: {found[0]}")
        if found[0].what.split(" (")[0].endswith(" input"):  # (made between two modules)
            module = found[0].what.split(" ")[0]
            print(f"  (its input departs, and nothing recorded before it did: look at the code of "
                  f"{module.rsplit('.', 1)[0] if '.' in module else 'the model'}'s forward that computes it)")
        for departure in found[1:options.show]:
            print(f"then: {departure}")
        if len(found) > options.show:
            print(f"... {len(found) - options.show} more")
        sys.exit(1)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
