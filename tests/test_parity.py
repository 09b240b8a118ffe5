"""parity.py: the bisector names the first point where a layout departs from one process,
for faults a model author might make, and finds none on correct code; --replay-step
recomputes a recorded step at world size 1."""
import contextlib
import os
import re
import subprocess
import sys
import types

import pytest
import torch

import metrics
import parallel
import parity
import train
from conftest import ROOT

SMALL = ["--config", "test", "--seq-len", "32", "--global-batch-size", "4"]


@contextlib.contextmanager
def patched(owner, name, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def row_bias_on_every_rank():
    """A row-parallel linear adding its bias to each rank's partial sum (tp copies)."""
    def forward(self, x):
        y = self.partial(x)
        return parallel.leave_tp_region(y if self.bias is None else y + self.bias, self.layout)
    return patched(parallel.RowParallelLinear, "forward", forward)


def qk_norm_unmarked():
    """A QK-norm weight, which each tp rank's heads see a part of, without its mark."""
    return patched(parallel, "mark_partial_grad", lambda *params: None)


def sp_gather_without_sum():
    """Sequence parallelism's gather before the column-parallel linears, whose backward
    keeps this rank's rows of the input gradient instead of summing them over tp."""
    def backward(ctx, grad):
        rows = grad.shape[1] // torch.distributed.get_world_size(ctx.group)
        rank = torch.distributed.get_rank(ctx.group)
        return grad[:, rank * rows:(rank + 1) * rows].contiguous(), None
    return patched(parallel._GatherSequence, "backward", staticmethod(backward))


def cp_positions_from_zero():
    """LLaMA numbering each cp rank's tokens from 0 (its RoPE positions), not by their
    place in the sequence."""
    import llama
    wrong = types.SimpleNamespace(**{k: getattr(parallel, k) for k in dir(parallel) if not k.startswith("__")})
    wrong.zigzag_positions = lambda seq_len, layout, device=None: torch.arange(seq_len // layout.cp, device=device)
    return patched(llama, "parallel", wrong)


def expert_gradient_not_reduced():
    """Expert gradients left unreduced over the ranks that hold the same experts."""
    reduce = parallel.DataParallel._reduce
    return patched(parallel.DataParallel, "_reduce",
                   lambda self, bucket, async_op: None if bucket.expert else reduce(self, bucket, async_op))


def zero1_parameters_not_gathered():
    """ZeRO-1's updated slices cast into the parameters but not all-gathered: each rank
    keeps the old values of the slices other ranks updated."""
    def all_gather_params(self):
        for b in self.buckets:
            if b.data.dtype != b.main.dtype:
                b.data[b.shard].copy_(b.main)
    return patched(parallel.DataParallel, "all_gather_params", all_gather_params)


FAULTS = {f.__name__: f for f in (row_bias_on_every_rank, qk_norm_unmarked, sp_gather_without_sum,
                                  cp_positions_from_zero, expert_gradient_not_reduced,
                                  zero1_parameters_not_gathered)}


def record_with_fault(args, fault):
    """parity.record_step on a rank, with a fault planted for the step (then removed: the
    ranks serve other tests after)."""
    with FAULTS[fault]():
        return parity.record_step(args)


def bisect(ranks, argv, nproc, fault=None):
    job = dict(job=record_with_fault, fault=fault) if fault else {}
    _, found, counts = parity.bisect(argv, nproc, ranks=ranks(nproc), **job)
    return found, counts


@pytest.mark.parametrize("fault, argv, nproc, first", [
    # (biases start at zero, so the forward is still right: the bias's gradient, counted
    # tp times, is the first to depart, the last layer's first in backward)
    ("row_bias_on_every_rank", ["--model", "gpt", "--tp", "2"], 2,
     r"backward gradient of layers\.1\.mlp\.proj\.bias"),
    ("qk_norm_unmarked", ["--model", "llama", "--set", "qk_norm=true", "--tp", "2", "--no-sp"], 2,
     r"backward gradient of layers\.1\.attn\.[qk]_norm\.weight"),
    # (the first gather backward meets is the output layer's: the final norm's gradient)
    ("sp_gather_without_sum", ["--model", "llama", "--tp", "2"], 2, r"backward gradient of norm\.weight"),
    ("cp_positions_from_zero", ["--model", "llama", "--cp", "2"], 2,
     r"forward layers\.0\.attn\.o_proj input \(micro-batch 0\)"),
    ("expert_gradient_not_reduced", ["--model", "mixtral", "--ep", "2"], 4,
     r"backward gradient of layers\.1\.mlp\.experts\.\d\.\w+_proj\.weight"),
    ("zero1_parameters_not_gathered", ["--model", "llama"], 2, r"update \S+ after the step"),
])
def test_the_first_departure_names_the_planted_fault(ranks, fault, argv, nproc, first):
    found, _ = bisect(ranks, [*argv, *SMALL], nproc, fault)
    assert found and re.match(first, f"{found[0].where} {found[0].what}"), [str(d) for d in found[:3]]


@pytest.mark.parametrize("model, layouts", [
    ("llama", [["--tp", "2", "--pp", "2"], ["--cp", "2"], ["--tp", "2", "--no-sp"]]),
    ("gpt", [["--tp", "2", "--pp", "2"], ["--cp", "2"]]),
    ("mixtral", [["--tp", "2", "--pp", "2"], ["--cp", "2"], ["--ep", "2"], ["--tp", "2", "--etp", "1", "--ep", "2"]]),
    ("mamba", [["--tp", "2", "--pp", "2"], ["--cp", "2"]]),
    ("bert", [["--tp", "2", "--pp", "2"], ["--cp", "2"]]),
    ("t5", [["--tp", "2", "--pp", "2"], ["--pp", "2"]]),
])
def test_no_departure_on_correct_code(ranks, model, layouts):
    """Each family on 4 processes at tp 2 x pp 2, and cp 2 (T5 refuses it: pp 2) with dp 2
    and ZeRO-1; Mixtral at ep 2 over dp 4 and etp 1 x ep 2 over tp 2 x dp 2; LLaMA's tp
    without sp."""
    for layout in layouts:
        found, counts = bisect(ranks, ["--model", model, *layout, *SMALL], 4)
        assert not found, (layout, [str(d) for d in found[:3]])
        assert counts["outputs"] > 10 and counts["gradients"] > 10, counts


@pytest.mark.parametrize("model", ["llama", "mixtral"])
def test_replay_of_a_tp2_pp2_step_equals_the_record(ranks, tmp_path, model):
    """A tp 2 x pp 2 run (4 ranks) saves at step 2 and records steps 1-3; step 3 replayed at
    world size 1 gives its loss and gradient norm to 1e-6 (Mixtral's router losses too: the
    replay keeps the run's two micro-batches)."""
    save, log = tmp_path / "run", tmp_path / "run.jsonl"
    router = ["--moe-aux-loss-coef", "1"] if model == "mixtral" else []  # (weighty enough to show)
    argv = ["--model", model, *router, *SMALL, "--tp", "2", "--pp", "2", "--steps", "3", "--save-every", "2",
            "--save", str(save), "--metrics", str(log), "--clip-grad", "0", "--adam-eps", "1e-3",
            "--sample-tokens", "0", "--eval-batches", "1", "--device", "cpu"]
    ranks(4).run(train_job_quiet, argv=argv)
    recorded = {r["step"]: r for r in metrics.read_metrics(log)}
    replayed, record, step_dir = parity.replay(["--metrics", str(log)], 3)
    assert step_dir.endswith("step_00000002") and record == recorded[3]
    for key in ("loss", "grad_norm"):
        assert replayed[key] == pytest.approx(recorded[3][key], rel=1e-6), (replayed, recorded[3])


def train_job_quiet(argv):
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        return train.train(train.flags.parse_args(argv))


def test_command_line(tmp_path):
    """As a user runs it: a departure exits 1 naming it (here none: exit 0, one summary);
    bad input is one line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "parity.py", "--model", "llama", "--tp", "2", *SMALL],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "no departure" in out.stdout, out.stdout + out.stderr
    bad = subprocess.run([sys.executable, "parity.py", "--replay-step", "3", "--metrics", str(tmp_path / "none")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1, bad.stderr


@pytest.mark.parametrize("argv, says", [
    (["--model", "llama", "--nproc", "3", "--tp", "2"], "--nproc 3 is not a multiple of tp x cp x pp = 2"),
    (["--model", "t5", "--cp", "2"], "T5 does not support context parallelism"),  # (said by the ranks)
    (["--model", "llama", "--replay-step", "3"], "--replay-step needs --metrics FILE"),
])
def test_bad_input_is_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as exit:
        parity.main([*argv, *SMALL])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and says in err and len(err.splitlines()) == 1, err
