"""What the tests share: small training flags, the one-process reference runs (each run
once per session), persistent multi-process launches (one set of processes per world
size, reused by every layout test), and the comparison of a layout with one process.

Layout tests pin what they need (CPU, fp32, gloo), so the suite runs the same on a
machine with a GPU: several ranks sharing one GPU over NCCL is not a layout we test.
"""
import contextlib
import importlib.metadata
import io
import json
import math
import os
import signal
import subprocess
import sys

import pytest

# torch.compile's on-disk cache does not tell kernels built for one CPU capability from
# another's: under ATEN_CPU_CAPABILITY=avx2 it reuses AVX-512 kernels (NaN losses), under
# =default it compiles them without their vector header (C++ errors). A cache per capability
# keeps a run under another setting (scripts/tolerances.sh) from reading this one's.
if "ATEN_CPU_CAPABILITY" in os.environ and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import getpass
    import tempfile
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}")

# transformers' progress bars (saving, loading) go to stderr, which tests of our one-line
# errors read: a test that builds a Hugging Face folder first (whichever worker runs it
# first, under -n) would see them.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402 (after the cache is chosen)

# Under pytest-xdist (the README's `-n 2`) the workers share the cores: each computes with
# its share of them, whatever OMP_NUM_THREADS says (two workers of two threads each on two
# cores run slower than two of one).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# Triton's interpreter must be chosen before triton is first imported (kernels.py says
# why): set it here, before any test module imports kernels, so that without a GPU
# tests/test_triton.py runs its kernels in this very process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    """Refuse to start beside Hugging Face's `kernels` package: our kernels.py has its module
    name and shadows it, so transformers (the test oracle) would import ours and fail deep
    inside its own import."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    pytest.exit("error: Hugging Face's `kernels` package is installed, and this project's kernels.py "
                "shadows it: run `pip uninstall -y kernels` (or install requirements-test.txt, whose "
                "pins leave it out, in a new venv)", returncode=2)

# Small and quick, on the CPU even where a GPU is (the ranks of LocalRanks talk over gloo);
# --peak-tflops skips the start-up matmul that measures the CPU.
FAST = ["--config", "test", "--seq-len", "32", "--global-batch-size", "8", "--steps", "10",
        "--warmup-steps", "2", "--lr", "3e-3", "--sample-tokens", "0", "--peak-tflops", "1",
        "--eval-every", "0", "--eval-batches", "1", "--device", "cpu"]

# For comparing a layout with one process, where a wrong gradient scale must show:
# clipping off (every step would be clipped at 1.0, hiding the scale from the update)
# and a larger Adam eps (with 1e-8 the update lr * m / (sqrt(v) + eps) ignores the scale).
# The gradient norm, compared at every step, shows a scale error by itself; these make
# the losses and parameters show it too.
LAYOUT = [*FAST, "--clip-grad", "0", "--adam-eps", "1e-3", "--precision", "fp32"]


# ----------------------------------------------------------------------------
# How much of its tolerance each comparison uses (TOLERANCE_LOG=FILE)
# ----------------------------------------------------------------------------

TOLERANCE_LOG = os.environ.get("TOLERANCE_LOG")


def log_tolerance_use(used, what=""):
    """With TOLERANCE_LOG=FILE, append the fraction of its tolerance a comparison used (1 is
    the limit), keyed by the test line that made it: scripts/tolerances.sh runs the suite
    under several CPU settings and reports each line's largest."""
    frame = sys._getframe(1)
    while frame.f_code.co_filename in (__file__, torch.testing.__file__) or "testing/_comparison" in \
            frame.f_code.co_filename:
        frame = frame.f_back
    line = f"{os.path.relpath(frame.f_code.co_filename, ROOT)}:{frame.f_lineno}"
    with open(TOLERANCE_LOG, "a") as f:
        f.write(json.dumps({"line": line, "what": what, "used": float(used),
                            "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]}) + "\n")


if TOLERANCE_LOG:
    _assert_close = torch.testing.assert_close
    _DEFAULT_TOLERANCES = {torch.float64: (1e-7, 1e-7), torch.float32: (1.3e-6, 1e-5),
                           torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (1e-3, 1e-5)}

    def _logged_assert_close(actual, expected, *args, rtol=None, atol=None, **kwargs):
        try:
            a, b = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
            if b.is_floating_point() and a.shape == b.shape and b.numel():
                default = _DEFAULT_TOLERANCES.get(b.dtype, (0.0, 0.0))
                bound = (default[1] if atol is None else atol) + \
                    (default[0] if rtol is None else rtol) * b.double().abs()
                error = (a.double() - b.double()).abs()
                log_tolerance_use(torch.where(bound > 0, error / bound, torch.where(error > 0, math.inf, 0)).max())
        except (TypeError, RuntimeError, ValueError):
            pass  # not tensors of one shape: the comparison itself says so
        return _assert_close(actual, expected, *args, rtol=rtol, atol=atol, **kwargs)
    torch.testing.assert_close = _logged_assert_close


# ----------------------------------------------------------------------------
# Running train.py
# ----------------------------------------------------------------------------

def without_flags(argv, *flags):
    """argv without these flags and the value after each."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        else:
            out.append(a)
    return out


def train_job(argv):
    """train.py with these flags in this process (a rank of LocalRanks, or the test
    process itself); returns (records, stdout) on rank 0 and None elsewhere."""
    import flags
    import parallel
    import train
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        records = train.train(flags.parse_args(argv))
    return (records, out.getvalue()) if parallel.world_size() == 1 or torch.distributed.get_rank() == 0 \
        else None


def main_job(argv):
    """train.main with these flags, as a rank runs it: (exit status, stderr)."""
    import train
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            train.main(argv)
        except SystemExit as e:
            return e.code, err.getvalue()
    return 0, err.getvalue()


_REFERENCES = {}


def one_process(argv):
    """The per-step records of a one-process run, each distinct run once per session."""
    key = tuple(argv)
    if key not in _REFERENCES:
        _REFERENCES[key] = train_job(list(argv))[0]
    return _REFERENCES[key]


def triton_kernels_or_skip():
    """For a module testing the Triton kernels: skip it unless they can run here (triton
    installed, and a GPU or the interpreter chosen before triton was imported); return
    the device to test on."""
    pytest.importorskip("triton")
    import kernels
    if not torch.cuda.is_available() and not kernels._INTERPRET:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (run through pytest, "
                    "whose conftest.py sets it)", allow_module_level=True)
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_fused_expert_files(hf, path, ids):
    """transformers 5 writes a layer's experts fused when asked (save_original_format=False):
    such a folder (of the mixture-of-experts model `hf`) reads to hf's logits on `ids`, and
    each rank of tp 2 x ep 2 (x dp 2) reads exactly its region of every tensor out of it."""
    import convert
    import models
    import parallel
    try:
        hf.save_pretrained(path, save_original_format=False)
    except TypeError:
        pytest.skip("this transformers version writes experts one by one only")
    with torch.no_grad():
        whole = convert.from_hf(str(path))
        assert_same_logits(whole(ids), hf(input_ids=ids).logits)
    whole, cfg = dict(whole.named_parameters()), whole.cfg
    for rank in range(4):
        part = models.build("mixtral", cfg, "cpu", 0, parallel.Layout(tp=2, dp=2, ep=2, rank=rank))
        convert.load_hf_weights(part, str(path))
        for name, p in part.named_parameters():
            _, offset, extent = parallel.global_region(p)
            mine = p[tuple(slice(0, n) for n in extent)]  # beyond: vocabulary padding
            assert torch.equal(mine, whole[name][tuple(slice(o, o + n) for o, n in zip(offset, extent))]), name


def byte_level_bpe(directory, texts, vocab_size, special_tokens, config):
    """A byte-level BPE trained here on `texts`, saved as directory/tokenizer.json, with
    `config` as its tokenizer_config.json (a Hugging Face tokenizer folder, no download)."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


@pytest.fixture
def triton_backend(monkeypatch):
    """kernels.py's Triton path for this test (compiled on a GPU, else the interpreter)."""
    monkeypatch.setenv("KERNELS_BACKEND", "triton")


@pytest.fixture(scope="session")
def ranks():
    """ranks(world) -> parallel.LocalRanks of `world` processes, started once per session."""
    import parallel
    pools = {}

    def get(world):
        if world not in pools or not pools[world].procs:  # none yet, or killed by a failure
            pools[world] = parallel.LocalRanks(world, timeout=300)
        return pools[world]
    yield get
    for pool in pools.values():
        pool.kill()  # the session is over: nothing is left to wait for


def train_on(ranks, world, argv):
    """train.py with these flags on `world` ranks (the session's processes): (records, stdout)."""
    return ranks(world).run(train_job, argv=list(argv))[0]


def run(args, nproc=1, expect_ok=True, timeout=300):
    """Launch train.py as a user does: plain python, or torchrun when nproc > 1. Returns the
    CompletedProcess. On a timeout the whole process group is killed, torchrun's workers too."""
    launcher = [sys.executable, "train.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "train.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(launcher + args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if expect_ok:
        assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return result


def one_line_error(capsys, argv):
    """train.main(argv) must exit 2 with one line on stderr: `error: ...`. Returns it."""
    import train
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


# ----------------------------------------------------------------------------
# Comparing runs
# ----------------------------------------------------------------------------

# bf16 keeps 8 significant bits: two runs equal in exact arithmetic but rounding in another
# order (a layout, bf16 against fp32, another CPU's kernels or thread count) take
# neighbouring bf16 values here and there, 2^-8 apart, and drift apart by such roundings
# step after step. A loss is a mean over a batch's tokens, whose roundings mostly average
# out; the gradient norm is dominated by a few large gradients, where whole bf16 steps show.
# Measured over FAST's 10 steps (scripts/tolerances.sh, five CPU settings): losses moved by
# up to 2.5e-4, the gradient norm by up to 1.0e-2 (tp = 2, its last step). A wrong gradient
# scale (x2) or a missing reduction shows far above both; fp32 layout tests catch them at 1e-5.
BF16_LOSS, BF16_GRAD_NORM = 2.0 ** -10, 2.0 ** -5
# fp16 keeps 11 significant bits, 3 more: the same reasoning, 8x tighter (fp16 weights round
# apart where the fp32 sums behind them differ in their last bits: measured 2.2e-5 on the
# gradient norm of a dp = 2 run, one thread).
FP16_LOSS, FP16_GRAD_NORM = 2.0 ** -13, 2.0 ** -8


def assert_within_bf16(got, expected, keys=("loss", "grad_norm", "val_loss")):
    """Two runs that differ only in bf16 rounding: per step, within BF16_LOSS and BF16_GRAD_NORM."""
    for key in keys:
        assert_same_run(got, expected, rel=BF16_GRAD_NORM if key == "grad_norm" else BF16_LOSS, keys=(key,))


def check_layouts(ranks, argv, layouts, keys=("loss", "grad_norm", "val_loss")):
    """Train `argv` under each (processes, extra flags) layout: the same run as one process
    (these figures of it at every step)."""
    expected = one_process(argv)
    for nproc, flags in layouts:
        got, _ = train_on(ranks, nproc, argv + flags)
        assert_same_run(got, expected, keys=keys)


def assert_same_logits(got, expected):
    """Logits of two implementations of the same model and weights, in fp32: equal up to
    the rounding of a different order of operations."""
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def local_gradients(modules):
    """[(name, offset in the global tensor, this rank's part)] of every gradient of these
    model chunks (one module or a list; a name once per copy), padding beyond the global
    shape dropped: what a layout test compares with the one-process gradients."""
    import parallel
    out = []
    for m in modules if isinstance(modules, (list, tuple)) else [modules]:
        for name, p in m.named_parameters():
            _, offset, extent = parallel.global_region(p)
            out.append((name, offset, p.grad[tuple(slice(0, n) for n in extent)].clone()))
    return out


def assert_gradient_part(grad, offset, full, what, atol_floor=0.0):
    """A rank's part of a gradient equals that region of the one-process gradient `full`,
    to a tolerance relative to full's largest element: each parameter against its own size,
    so a small one's error shows as much as the embedding's."""
    region = full[tuple(slice(o, o + n) for o, n in zip(offset, grad.shape))]
    torch.testing.assert_close(grad, region, rtol=1e-4, atol=1e-5 * full.abs().max().item() + atol_floor,
                               msg=lambda m: f"{what}: {m}")


# A mixture of experts' figures, beside the loss and gradient norm: its router losses, the
# least and most loaded expert, the dropped choices.
ROUTER_FIGURES = ["loss", "grad_norm", "val_loss", "aux_loss", "z_loss", "tokens_per_expert_min",
                  "tokens_per_expert_max", "dropped_fraction"]


def assert_same_run(got, expected, rel=1e-5, keys=("loss", "grad_norm", "val_loss")):
    """Per step: the loss, the gradient norm (before clipping) and, where evaluated, the
    validation loss (the forward-only path) agree within `rel`."""
    assert expected, "no steps to compare"
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for key in keys:
        assert [key in a for a in got] == [key in b for b in expected], key
        pairs = [(a, b) for a, b in zip(got, expected) if key in b]
        if TOLERANCE_LOG and pairs:
            log_tolerance_use(max(0.0 if a[key] == b[key] else abs(a[key] - b[key]) / (rel * abs(b[key]))
                                  if b[key] else math.inf for a, b in pairs), key)
        for a, b in pairs:
            assert abs(a[key] - b[key]) <= rel * abs(b[key]), \
                f"step {b['step']} {key}: {a[key]} vs {b[key]} (one process)"

