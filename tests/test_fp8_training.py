"""FP8 training (`--precision fp8`): the scaling recipes by hand, an FP8 linear's three
matmuls against their emulation written out, every layout against one process, resume,
the loss curve against fp32, and bad input.

On a CPU the FP8 matmuls are the emulation (kernels.fp8_matmul_reference: the FP8 values,
multiplied in fp32), so these runs are exact computations on quantized values; the
layout tests use `--fp8-rest fp32` (everything but the FP8 matmuls in fp32) so that a
layout's only difference from one process is the order of fp32 sums, and a wrong scale,
quantizing differently, shows far above it. The Triton kernel is tested against the same
emulation in tests/test_fp8_matmul.py."""
import pytest
import torch

import checkpoint
import kernels
import parallel
from conftest import FAST, LAYOUT, assert_same_run, one_line_error, one_process, train_job, train_on

E4M3, E5M2 = kernels.FP8_E4M3, kernels.FP8_E5M2
FP8 = ["--model", "llama", *LAYOUT[:-2], "--precision", "fp8", "--fp8-rest", "fp32",
       "--fp8-bf16-layers", "0"]
DELAYED = FP8 + ["--fp8-recipe", "delayed", "--fp8-amax-history-len", "4"]


# ----------------------------------------------------------------------------
# The recipes by hand
# ----------------------------------------------------------------------------

def test_delayed_scaling_keeps_the_largest_amax_of_the_last_steps():
    scaling = parallel.FP8Scaling(parallel.FP8Recipe("delayed", history_len=3), ["a", "b"])
    assert not scaling.delayed  # the first step has no history: it scales tensorwise
    step_amaxes = [(2.0, 8.0), (4.0, 1.0), (1.0, 1.0), (0.5, 1.0)]  # layer a's x, per step
    for first, second in step_amaxes:
        scaling.record(0, 0, torch.tensor(first))   # two micro-batches: the step keeps the max
        scaling.record(0, 0, torch.tensor(second))
        scaling.record(1, 2, torch.tensor(first / 4))
        scaling.end_step()
    assert scaling.delayed and scaling.steps_recorded == 4
    # Newest first, three steps kept: the first step's 8 has left the window.
    torch.testing.assert_close(scaling.history[0, 0], torch.tensor([1.0, 1.0, 4.0]))
    torch.testing.assert_close(scaling.history[1, 2], torch.tensor([0.125, 0.25, 1.0]))
    assert scaling.history[0, 1].eq(0).all() and scaling.step_amax.eq(0).all()
    # Scales: E4M3's 448 (x and W) or E5M2's 57344 (dy) over the window's largest amax.
    assert scaling.scales[0, 0].item() == 448 / 4
    assert scaling.scales[1, 2].item() == 57344 / 1.0
    assert scaling.scales[0, 1].item() == 1.0  # never seen: scale 1
    margin = parallel.FP8Scaling(parallel.FP8Recipe("delayed", 3, margin=2), ["a"])
    margin.record(0, 2, torch.tensor(7.0))
    margin.end_step()
    assert margin.scales[0, 2].item() == 57344 / 7 / 4


def quantized(t, dtype, rows=False):
    """(dequantized values, fp8 values) of t scaled by its own amax, per tensor or per row."""
    amax = t.abs().amax(dim=1, keepdim=True) if rows else t.abs().amax()
    scale = kernels.fp8_max(dtype) / amax
    q = (t * scale).clamp(-kernels.fp8_max(dtype), kernels.fp8_max(dtype)).to(dtype)
    return q.float() / scale, q


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "delayed"])
def test_fp8_linear_is_its_emulation_written_out(recipe):
    """y = x W^T, dx = dy W, dW = dy^T x of an FP8 linear = the same products of operands
    quantized by hand (E4M3 for x and W, E5M2 for dy; per row: along the dimension not
    summed). Delayed scaling's second step scales by the first step's amaxes: values
    beyond them saturate at the format's largest."""
    torch.manual_seed(0)
    x, w, dy = torch.randn(48, 32), torch.randn(16, 32) * 0.05, torch.randn(48, 16) * 1e-3
    scaling = parallel.FP8Scaling(parallel.FP8Recipe(recipe, history_len=2), ["layer"])
    site = parallel.FP8Site(scaling, 0, tp_group=None, cp_group=None, split_in=False)
    if recipe == "delayed":  # step 1 (tensorwise), then step 2 from its history
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        parallel.linear(xs, ws, fp8=site).backward(dy)
        scaling.end_step()
        x, dy = x * 2, dy * 3   # amaxes grown since step 1: the largest values saturate
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = parallel.linear(xg, wg, fp8=site)
    y.backward(dy)

    if recipe == "delayed":
        def q(t, dtype, amax):
            scale = kernels.fp8_max(dtype) / amax
            return (t * scale).clamp(-kernels.fp8_max(dtype), kernels.fp8_max(dtype)).to(dtype).float() / scale
        xd, wd, dyd = q(x, E4M3, x.abs().max() / 2), q(w, E4M3, w.abs().max()), q(dy, E5M2, dy.abs().max() / 3)
        assert xd.abs().max() < x.abs().max()  # saturated
        expected = (xd @ wd.t(), dyd @ wd, dyd.t() @ xd)
    elif recipe == "tensorwise":
        xd, wd, dyd = quantized(x, E4M3)[0], quantized(w, E4M3)[0], quantized(dy, E5M2)[0]
        expected = (xd @ wd.t(), dyd @ wd, dyd.t() @ xd)
    else:
        rows = lambda t, dtype: quantized(t, dtype, rows=True)[0]  # noqa: E731
        expected = (rows(x, E4M3) @ rows(w, E4M3).t(),
                    rows(dy, E5M2) @ rows(w.t(), E4M3).t(),
                    rows(dy.t(), E5M2) @ rows(x.t(), E4M3).t())
    for got, want, what in zip((y, xg.grad, wg.grad), expected, ("y", "dx", "dW")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item(),
                                   msg=lambda m: f"{what}: {m}")
    # And FP8 is not exact: the plain products differ by the quantization error.
    assert not torch.allclose(y, x @ w.t(), rtol=1e-3, atol=0)


CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_linear_through_the_triton_kernel(monkeypatch, recipe):
    """The same three matmuls through kernels.fp8_matmul's Triton kernel (the interpreter
    here; compiled on a GPU), with the operands' transposed copies the backward hands it:
    equal to the emulation up to the order of the fp32 sums. (On a GPU the tensor cores
    add each slice of 128 products in about 14 bits before the fp32 accumulator: 2^-12 of
    the largest output is the bound there.)"""
    if CUDA and kernels.fp8_matmul_backend("cuda") != "triton":
        pytest.skip("this GPU has no FP8 tensor cores (sm_89 and up)")
    device = "cuda" if CUDA else "cpu"
    torch.manual_seed(0)
    x, w, dy = (t.to(device) for t in (torch.randn(40, 32), torch.randn(48, 32) * 0.05,
                                         torch.randn(40, 48) * 1e-3))
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("KERNELS_BACKEND", backend)
        site = parallel.FP8Site(parallel.FP8Scaling(parallel.FP8Recipe(recipe), ["layer"], device), 0,
                                None, None, False)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = parallel.linear(xg, wg, fp8=site)
        y.backward(dy)
        results[backend] = (y, xg.grad, wg.grad)
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=(2 ** -12 if CUDA else 1e-6) * want.abs().max().item())


# ----------------------------------------------------------------------------
# Training: layouts, resume, the curve
# ----------------------------------------------------------------------------

def test_fp8_tracks_fp32_and_learns():
    """10 steps of the test llama, FP8 in every layer: within 1% of the fp32 losses (FP8's
    rounding, 2^-4 relative for E4M3, averages out over the sums of a matmul; the CPU
    bench `fp8-curve` compares 120 steps of the tiny llama), and learning. With the rest
    in bf16 (the default), within bf16's own distance from fp32 too."""
    bf16_rest = ["--model", "llama", *FAST, "--precision", "fp8", "--fp8-bf16-layers", "0"]
    for argv, fp32, rel in ((DELAYED, ["--model", "llama", *LAYOUT], 1e-2),
                            (bf16_rest, ["--model", "llama", *FAST, "--precision", "fp32"], 2e-2)):
        fp8, fp32 = one_process(argv), one_process(fp32)
        assert_same_run(fp8, fp32, rel=rel, keys=("loss", "val_loss"))
        assert fp8[-1]["loss"] < 0.8 * fp8[0]["loss"]
        assert any(a["loss"] != b["loss"] for a, b in zip(fp8, fp32))  # FP8 did run


FP8_LAYOUTS = [  # (flags of both runs, flags of the two-process run only)
    (DELAYED, ["--tp", "2"]),
    (FP8 + ["--fp8-recipe", "tensorwise"], ["--tp", "2"]),
    (FP8 + ["--fp8-recipe", "rowwise"], ["--tp", "2", "--no-sp"]),
    (FP8 + ["--fp8-recipe", "tensorwise"], ["--cp", "2"]),
    (FP8 + ["--fp8-recipe", "rowwise"], ["--cp", "2"]),
    (DELAYED + ["--micro-batch-size", "4"], ["--pp", "2"]),  # the same micro-batches: step 1 scales per micro-batch
    (DELAYED + ["--micro-batch-size", "4"], []),  # dp = 2: one process runs the same micro-batches
    ([a if a != "llama" else "mixtral" for a in FP8] + ["--fp8-recipe", "tensorwise"], ["--tp", "2"]),
]


def amax_history(save_root):
    return checkpoint.read_replicated(checkpoint.resolve(str(save_root)))["fp8.amax_history"]


# How far a layout may drift from one process under FP8, and why (measured over this suite's
# CPU settings: OMP_NUM_THREADS 1 and 2, ATEN_CPU_CAPABILITY avx512/avx2/default, oneDNN's
# AVX2 ISA; scripts/tolerances.sh). A layout sums in another order, so a value differs from
# one process's in its last fp32 bits; FP8 rounds the few that sit on a rounding boundary
# to the neighbouring FP8 value, a whole FP8 step away (2^-3 of it in E4M3, 2^-2 in E5M2).
# Which values do is a matter of the CPU's kernels, so a tolerance must cover such flips:
# - Step 1 (the same weights): each flip moves one term of the gradient by 2^-2 of itself;
#   the gradient norm moved by up to 9e-6 (cp = 2, rowwise). STEP1 = 1e-4 leaves 10x for
#   more flips, and is 10x under what a missing amax reduction does (tp 3e-3, cp 1e-3).
# - Later steps: a flipped gradient element changes that weight's Adam step (at most ~lr per
#   step, whatever the gradient), so such weights differ by up to 2 lr after each step; the
#   loss and gradient norm, sums over every weight, moved by up to 2.2e-4 by step 3.
#   LATER = 1e-3.
# - The delayed-scaling history: its step-1 amaxes come from the same weights, STEP1 again
#   (measured 9e-7); later amaxes from weights that may differ by 2 lr per step (lr 1.5e-3,
#   then 3e-3: up to 9e-3, 11% of the test llama's largest weight 0.08), so they are
#   compared to one E5M2 step, 2^-2. A missing world reduction of the history leaves a
#   rank's own amaxes (smaller, or zero for another stage's layers): off at step 1 already.
STEP1, LATER, LATER_AMAX = 1e-4, 1e-3, 2.0 ** -2


def test_fp8_layouts_equal_one_process(ranks, tmp_path):
    """Each recipe under tp, cp, pp and dp (and Mixtral's experts, FP8 linears with a
    varying number of tokens each, under tp) against the one-process FP8 run, for three
    steps, every scale reduced over the ranks that share its tensor: tolerances above."""
    steps = 3
    for i, (argv, layout) in enumerate(FP8_LAYOUTS):
        argv = argv + ["--steps", str(steps)]
        got, _ = train_on(ranks, 2, argv + layout + ["--save", str(tmp_path / f"layout{i}")])
        expected = one_process(argv)
        assert_same_run(got[:1], expected[:1], rel=STEP1)
        assert_same_run(got, expected, rel=LATER)
        if "delayed" in argv:
            train_job(argv + ["--save", str(tmp_path / f"reference{i}")])
            history = amax_history(tmp_path / f"layout{i}")  # (site, operand, step), newest first
            reference = amax_history(tmp_path / f"reference{i}")
            torch.testing.assert_close(history[..., steps - 1], reference[..., steps - 1], rtol=STEP1, atol=0)
            torch.testing.assert_close(history[..., :steps - 1], reference[..., :steps - 1], rtol=LATER_AMAX, atol=0)
            assert history[..., steps:].eq(0).all() and reference[..., :steps].gt(0).all()


def test_fp8_resume_equals_uninterrupted_run(ranks, tmp_path):
    """The amax history is saved (once: every rank holds it whole), so a resumed
    delayed-scaling run scales as the uninterrupted one: exactly in one process, and
    under tp = 2 from the one-process checkpoint its first step (the same weights, the
    same history) as a layout's first step (STEP1: FP8 rounding flips, see above)."""
    full = one_process(DELAYED)
    ckpt = tmp_path / "ckpt"
    train_job(DELAYED + ["--save", str(ckpt), "--save-every", "5"])
    resumed, _ = train_job(DELAYED + ["--load", str(ckpt / "step_00000005")])
    assert_same_run(resumed, full[5:], rel=1e-6)
    resumed, out = train_on(ranks, 2, DELAYED + ["--tp", "2", "--load", str(ckpt / "step_00000005")])
    assert_same_run(resumed[:1], full[5:6], rel=STEP1)
    assert "fp8 (delayed scaling, amax history 4; layers 0-1 in FP8, emulated" in out


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--set", "dim=40", "--set", "n_heads=5", "--set", "n_kv_heads=5"], "need multiples of 16"),
    (["--fp8-recipe", "mxfp8"], "unknown --fp8-recipe mxfp8; choose one of delayed, tensorwise, rowwise"),
    (["--fp8-amax-history-len", "0"], "--fp8-amax-history-len must be >= 1"),
    (["--fp8-bf16-layers", "1"], "--fp8-bf16-layers 1 keeps all 2 layers in higher precision"),
    (["--precision", "bf16", "--fp8-recipe", "rowwise"], "--fp8-recipe applies to FP8 training only"),
])
def test_fp8_bad_input_is_one_line(capsys, flags, message):
    argv = ["--model", "llama", *FAST, "--precision", "fp8", "--fp8-bf16-layers", "0", *flags]
    assert message in one_line_error(capsys, argv)
