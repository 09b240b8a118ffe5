"""kernels.py's FP8 matmul: the quantization helpers against values worked out by hand,
the Triton GEMM against `fp8_matmul_reference`, and its argument checks and dispatch.

Without a GPU the kernel runs in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1),
whose one configuration is BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2 (see the kernel's
autotuning lists): M=33 ends mid-tile and leaves a last group of one row of tiles, N=40
ends mid-tile, K=48, 40 and 16 end mid-block (K=16 inside the first block). With a GPU the
same tests run compiled, and the tests marked `gpu` add real shapes, against the reference
and torch._scaled_mm (python -m pytest -m gpu tests/test_fp8_matmul.py).
"""
import pytest
import torch

import kernels
from conftest import triton_kernels_or_skip

DEVICE = triton_kernels_or_skip()
CUDA = DEVICE == "cuda"
E4M3, E5M2 = kernels.FP8_E4M3, kernels.FP8_E5M2
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def exact_fp32_matmul():
    """The reference's fp32 matmul in fp32 on a GPU too, not TF32 (10 mantissa bits).
    (Not monkeypatch: the flag is a property of a module object, which it cannot restore.)"""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


# ----------------------------------------------------------------------------
# Quantization, by hand
# ----------------------------------------------------------------------------

def _round_trip(values, dtype, scale=1.0):
    """fp8_quantize of `values`, read back as fp32 (dequantized with the same scale)."""
    x = torch.tensor(values, dtype=torch.float32)
    return (kernels.fp8_quantize(x, torch.tensor(scale), dtype).float() / scale).tolist()


def test_fp8_formats_limits():
    assert kernels.fp8_max(E4M3) == 448.0      # 1.75 * 2^8 (E4M3 "fn": no inf, S.1111.111 is NaN)
    assert kernels.fp8_max(E5M2) == 57344.0    # 1.75 * 2^15 (E5M2 keeps inf and NaN, as IEEE)


@pytest.mark.parametrize("dtype,values", [
    # E4M3: exponent bias 7, 3 mantissa bits: normals 1.mmm * 2^(-6..8), subnormals 0.mmm * 2^-6
    (E4M3, [0.0, 1.0, -1.0, 1.125, -1.875, 0.5, 2.0**-6, 2.0**-9, 3 * 2.0**-9, 240.0, 256.0, 448.0, -448.0]),
    # E5M2: exponent bias 15, 2 mantissa bits: normals 1.mm * 2^(-14..15), subnormals 0.mm * 2^-14
    (E5M2, [0.0, 1.0, -1.25, 1.5, 1.75, 2.0**-14, 2.0**-16, 3 * 2.0**-16, 49152.0, 57344.0, -57344.0]),
])
def test_representable_values_round_trip_exactly(dtype, values):
    assert _round_trip(values, dtype) == values
    # a power-of-two scale moves the exponent only: still exact
    assert _round_trip([v / 4 for v in values if abs(v) <= 256], dtype, scale=4.0) == \
        [v / 4 for v in values if abs(v) <= 256]


@pytest.mark.parametrize("dtype,values,expected", [
    # E4M3 between 1 and 2 has steps of 2^-3 = 0.125. 1.0625 is the midpoint of 1.0 (mantissa
    # 000) and 1.125 (001): a tie, rounded to the even mantissa, 1.0; 1.1875, the midpoint of
    # 1.125 (001) and 1.25 (010), goes up to 1.25. 1.07 and 1.05 are no ties: nearest.
    # In [256, 448] the step is 2^(8-3) = 32: 300 -> 288 (12 away; 320 is 20 away).
    (E4M3, [1.0625, 1.1875, 1.07, 1.05, 300.0, -300.0], [1.0, 1.25, 1.125, 1.0, 288.0, -288.0]),
    # E5M2 between 1 and 2 has steps of 0.25: 1.125 is a tie between 1.0 (00) and 1.25 (01)
    # -> 1.0 (even); 1.375, a tie between 1.25 (01) and 1.5 (10) -> 1.5; 1.2 -> 1.25.
    (E5M2, [1.125, 1.375, 1.2], [1.0, 1.5, 1.25]),
])
def test_quantize_rounds_to_nearest_even(dtype, values, expected):
    assert _round_trip(values, dtype) == expected


def test_quantize_saturates_at_the_largest_finite_value():
    # A plain cast of 1e5 to E5M2 is inf (past 57344 + half a step); E4M3 has no inf at all.
    assert torch.tensor([1e5]).to(E5M2).float().isinf().all()
    big = [1e5, -1e5, 1e7, float("inf"), float("-inf")]  # beyond both formats
    assert _round_trip(big, E4M3) == [448.0, -448.0, 448.0, 448.0, -448.0]
    assert _round_trip(big, E5M2) == [57344.0, -57344.0, 57344.0, 57344.0, -57344.0]
    # with a scale: 100 * 8 = 800 saturates to 448, read back as 448 / 8 = 56
    assert _round_trip([100.0, 3.0], E4M3, scale=8.0) == [56.0, 3.0]


def test_fp8_scale_maps_amax_to_the_top_of_the_format():
    amax = torch.tensor([448.0, 2.0, 1e-3, 0.0, float("inf"), float("nan")])
    # fp8_max / amax; an all-zero (or non-finite) tensor has nothing to fit: scale 1
    assert kernels.fp8_scale(amax, E4M3).tolist() == pytest.approx([1.0, 224.0, 448000.0, 1.0, 1.0, 1.0])
    assert kernels.fp8_scale(amax, E4M3, margin=1).tolist() == pytest.approx([0.5, 112.0, 224000.0, 1.0, 1.0, 1.0])
    assert kernels.fp8_scale(torch.tensor([57344.0, 1.0]), E5M2).tolist() == [1.0, 57344.0]
    assert kernels.fp8_scale(torch.tensor(2, dtype=torch.bfloat16), E4M3).dtype == torch.float32


def test_rowwise_scales_put_each_row_amax_at_448():
    x = torch.tensor([[1.0, 2.0, -4.0, 0.5], [0.0, 0.0, 0.0, 0.0], [100.0, -7.0, 3.0, 1.0]])
    scale = kernels.fp8_scale(x.abs().amax(dim=1, keepdim=True), E4M3)
    assert scale.shape == (3, 1)
    assert scale.flatten().tolist() == pytest.approx([112.0, 1.0, 4.48])
    q = kernels.fp8_quantize(x, scale, E4M3).float()
    # Row 0: 112 = 1.75 * 2^6, 224, -448, 56: all exact. Row 1: zeros, scale 1. Row 2:
    # 100 * 4.48 = 448; -7 * 4.48 = -31.36 -> -32 (step 2 in [16, 32)); 3 * 4.48 = 13.44 ->
    # 13 (step 1 in [8, 16)); 4.48 -> 4.5 (step 0.5 in [4, 8)).
    assert q.tolist() == [[112.0, 224.0, -448.0, 56.0], [0.0, 0.0, 0.0, 0.0], [448.0, -32.0, 13.0, 4.5]]


def test_reference_dequantizes_before_its_fp32_matmul():
    a = kernels.fp8_quantize(torch.tensor([[1.0, 2.0], [3.0, -4.0]]), torch.tensor(1.0), E4M3)
    b = kernels.fp8_quantize(torch.tensor([[0.5, 1.0], [1.5, 0.25], [-2.0, 1.0]]), torch.tensor(1.0), E5M2)
    # rows of a times 2 and 4, rows of b times 1, 10, 100
    got = kernels.fp8_matmul_reference(a, b, torch.tensor([2.0, 4.0]), torch.tensor([1.0, 10.0, 100.0]))
    assert got.tolist() == [[2 * 2.5, 2 * 10 * 2.0, 2 * 100 * 0.0], [4 * -2.5, 4 * 10 * 3.5, 4 * 100 * -10.0]]


# ----------------------------------------------------------------------------
# The Triton GEMM against the reference
# ----------------------------------------------------------------------------

def _quantized(rows, K, dtype, rowwise, g, spread=4):
    """(fp8 tensor (rows, K), inverse scales) of random data whose rows differ in magnitude
    by up to 2^spread either way (so a row-wise scale is not a tensorwise one). Inverse
    scales as parallel.py makes them: 0-d per tensor, (rows,) per row."""
    x = torch.randn(rows, K, generator=g, device=DEVICE)
    x *= 2.0 ** torch.randint(-spread, spread + 1, (rows, 1), generator=g, device=DEVICE)
    amax = x.abs().amax(dim=1, keepdim=True) if rowwise else x.abs().amax()
    scale = kernels.fp8_scale(amax, dtype)
    return kernels.fp8_quantize(x, scale, dtype), (1 / scale).reshape(-1 if rowwise else ())


@pytest.fixture
def unwritten_is_nan(monkeypatch):
    """torch.empty filled with NaN for this test, so that an output element the kernel
    never writes shows: fresh memory may otherwise hold an earlier, correct result."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", nan_empty)


def _nan_padded(t, extra):
    """t as the first columns of a wider tensor whose other columns are NaN: a view with
    row stride K + extra, so reads past K show (0 * NaN is NaN)."""
    wide = torch.full((t.shape[0], t.shape[1] + extra), float("nan"), device=t.device).to(t.dtype)
    wide[:, :t.shape[1]] = t
    return wide[:, :t.shape[1]]


def _case(M, N, K, a_dtype, rowwise, seed=0):
    g = torch.Generator(DEVICE).manual_seed(seed)
    return (*_quantized(M, K, a_dtype, rowwise, g), *_quantized(N, K, E4M3, rowwise, g))


# How far the kernel may be from the reference, per element. Both compute the same
# products (an FP8 product is exact in fp32: at most 4 x 4 significant bits) of the same values:
# the reference scales the operands first (one rounding each) and sums in fp32 in its
# order; the kernel sums the exact products in fp32 in its order, then applies the two
# scales (a rounding each). Each fp32 sum of K terms is within K * u * sum|terms| of the
# exact sum (u = 2^-24, for any order), so the two are within (2K + 4) * u * T, with
# T = sum_k |a_k| |b_k| * |a_scale_inv| * |b_scale_inv|. In the interpreter the products
# and sums are numpy's fp32; on a GPU the tensor cores accumulate FP8 products in fewer
# bits than fp32 (about 14, DeepSeek-V3 measured on Hopper): u = 2^-13 there. Casting to a
# 16-bit output then adds at most one unit in the last place on each side, i.e. at most
# eps * |x| each (the interpreter truncates to bf16 where a GPU rounds to nearest: still
# within one unit), plus the smallest subnormal step. These bounds are far below what a
# wrong scale, tile, mask or stride does (errors of the size of the values themselves).
ACCUMULATION_UNIT = 2.0**-13 if CUDA else 2.0**-24


def _assert_close_to_reference(got, a, b, a_inv, b_inv, out_dtype):
    want32 = kernels.fp8_matmul_reference(a, b, a_inv, b_inv, torch.float32).double()
    want = kernels.fp8_matmul_reference(a, b, a_inv, b_inv, out_dtype).double()
    K = a.shape[1]
    T = (a.double().abs() @ b.double().abs().t()) * a_inv.double().abs().reshape(-1, 1) \
        * b_inv.double().abs().reshape(1, -1)
    bound = (2 * K + 4) * ACCUMULATION_UNIT * T
    if out_dtype != torch.float32:
        info = torch.finfo(out_dtype)
        bound = bound + 2 * info.eps * (want32.abs() + bound) + info.eps * info.smallest_normal
    assert got.shape == want.shape and got.dtype == out_dtype
    err = (got.double() - want).abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (f"{(err > bound).sum().item()} of {err.numel()} elements off; worst at "
                                  f"{divmod(worst.item(), err.shape[1])}: got {got.flatten()[worst].item()}, "
                                  f"want {want.flatten()[worst].item()}, bound {bound.flatten()[worst].item():.3g}")


# Compiled, each (formats, scales, output dtype, shape class) is a compilation of every
# autotuning configuration: there the small cases take one output dtype, not to spend
# minutes in ptxas (the real-shape tests below have both bf16 and fp32 outputs).
SMALL_CASE_OUT_DTYPES = (torch.bfloat16,) if CUDA else kernels.FP8_OUT_DTYPES


# In the interpreter a kernel that reads memory other than its operands tends to compute
# with garbage, which numpy reports as overflow (real operands cannot overflow fp32): an error.
@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("M,N,K", [(33, 40, 48), (33, 40, 40), (20, 33, 16), (16, 64, 64)])
@pytest.mark.parametrize("a_dtype", [E4M3, E5M2], ids=["e4m3xe4m3", "e5m2xe4m3"])
@pytest.mark.parametrize("rowwise", [False, True], ids=["tensorwise", "rowwise"])
def test_fp8_matmul_matches_reference(triton_backend, unwritten_is_nan, M, N, K, a_dtype, rowwise):
    a, a_inv, b, b_inv = _case(M, N, K, a_dtype, rowwise)
    for out_dtype in SMALL_CASE_OUT_DTYPES:
        _assert_close_to_reference(kernels.fp8_matmul(a, b, a_inv, b_inv, out_dtype), a, b, a_inv, b_inv, out_dtype)


def test_fp8_matmul_mixed_scales_and_strided_operands(triton_backend, unwritten_is_nan):
    """A row-wise and B tensorwise, and the other way round; row-strided operands (slices
    of wider tensors: their strides are passed, no copy) and a transposed B (copied by
    _launch_ready); scales given as (M, 1) and (1,). Past K the wider tensors hold NaN: a
    load that is not masked there gives NaN (0 * NaN) on a GPU. (Not in the interpreter,
    which decodes FP8's NaN as a finite number, 480 in E4M3: there a K mask missing on one
    operand only multiplies the other's zeros.)"""
    g = torch.Generator(DEVICE).manual_seed(1)
    a, a_inv = _quantized(33, 40, E5M2, True, g)
    b, _ = _quantized(24, 40, E4M3, False, g)
    a, b, b_inv = _nan_padded(a, 16), _nan_padded(b, 8), torch.tensor([0.03], device=DEVICE)
    assert a.stride() == (56, 1) and b.stride() == (48, 1)
    _assert_close_to_reference(kernels.fp8_matmul(a, b, a_inv.reshape(-1, 1), b_inv, torch.float32),
                               a, b, a_inv, b_inv, torch.float32)
    b_t = b.t().contiguous()  # (K, N): b_t.t() is b with stride (1, K)
    assert b_t.t().stride() == (1, 24)
    b_rows = torch.linspace(0.01, 0.1, 24, device=DEVICE)
    _assert_close_to_reference(kernels.fp8_matmul(a, b_t.t(), a_inv[:1], b_rows, torch.bfloat16),
                               a, b, a_inv[:1], b_rows, torch.bfloat16)


def test_fp8_matmul_saturated_and_zero_operands(triton_backend):
    """Extremes: every product 448 * -448 (E4M3 x E4M3) or 57344 * -448 (E5M2 x E4M3), summed
    over K = 64 in fp32 without overflow and scaled back down by powers of two, exactly:
    448^2 * 64 * 2^-18 = (7 * 2^6)^2 * 2^6 * 2^-18 = 49, and 57344 * 448 * 64 * 2^-25 =
    7 * 2^13 * 7 * 2^6 * 2^6 * 2^-25 = 49. An all-zero operand gives zeros; K = 0 too."""
    one = torch.ones((), device=DEVICE)
    for a_dtype, a_inv in ((E4M3, 2.0**-9), (E5M2, 2.0**-16)):
        a = torch.full((17, 64), kernels.fp8_max(a_dtype), device=DEVICE).to(a_dtype)
        b = torch.full((9, 64), -448.0, device=DEVICE).to(E4M3)
        got = kernels.fp8_matmul(a, b, one * a_inv, one * 2.0**-9, torch.float32)
        assert (got == -49.0).all()
        assert (kernels.fp8_matmul(a, torch.zeros_like(b), one, one, torch.bfloat16) == 0).all()
    empty = torch.empty(5, 0, device=DEVICE).to(E4M3)
    got = kernels.fp8_matmul(empty, empty[:3], torch.ones(5, device=DEVICE), one, torch.float16)
    assert got.shape == (5, 3) and (got == 0).all()
    assert kernels.fp8_matmul(empty[:0], empty[:3], one, one).shape == (0, 3)


def test_fp8_matmul_dispatch(monkeypatch):
    """Backend "triton" launches the kernel (the reference is not consulted) where FP8
    tensor cores are (or in the interpreter); "torch" is the reference itself."""
    a, a_inv, b, b_inv = _case(16, 32, 32, E4M3, False)
    want = kernels.fp8_matmul_reference(a, b, a_inv, b_inv)
    original = kernels.fp8_matmul_reference

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference ran")
    monkeypatch.setattr(kernels, "fp8_matmul_reference", no_reference)
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    if not CUDA or torch.cuda.get_device_capability() >= (8, 9):
        torch.testing.assert_close(kernels.fp8_matmul(a, b, a_inv, b_inv), want, rtol=1e-3, atol=1e-3)
    else:  # Ampere: no FP8 tensor cores, the reference it is
        monkeypatch.setattr(kernels, "fp8_matmul_reference", original)
        assert torch.equal(kernels.fp8_matmul(a, b, a_inv, b_inv), want)

    monkeypatch.setattr(kernels, "fp8_matmul_reference", lambda *args: "the reference")
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    assert kernels.fp8_matmul(a, b, a_inv, b_inv) == "the reference"


@pytest.mark.parametrize("make_args,message", [
    (lambda a, b, s: (a.float(), b, s, s), "operands must be float8"),
    (lambda a, b, s: (a, b.to(torch.bfloat16), s, s), "operands must be float8"),
    (lambda a, b, s: (a, b[:, :16], s, s), r"a must be \(M, K\) and b \(N, K\)"),
    (lambda a, b, s: (a[None], b, s, s), r"a must be \(M, K\) and b \(N, K\)"),
    (lambda a, b, s: (a, b, torch.ones(2), s), r"a_scale_inv must have 1 element .* or 4"),
    (lambda a, b, s: (a, b, s, torch.ones(4)), r"b_scale_inv must have 1 element .* or 6"),
    (lambda a, b, s: (a, b, s, torch.ones(1, device="meta")), "on one device"),
])
def test_fp8_matmul_rejects_bad_arguments(make_args, message):
    a, b = torch.zeros(4, 32).to(E4M3), torch.zeros(6, 32).to(E5M2)
    with pytest.raises(ValueError, match=message):
        kernels.fp8_matmul(*make_args(a, b, torch.ones(1)))
    with pytest.raises(ValueError, match="out_dtype must be one of"):
        kernels.fp8_matmul(a, b, torch.ones(1), torch.ones(1), out_dtype=E4M3)


# ----------------------------------------------------------------------------
# GPU: real shapes (python -m pytest -m gpu tests/test_fp8_matmul.py)
# ----------------------------------------------------------------------------

# (M, N, K): a square GEMM; an 8B model's projections on 8192 tokens (q/o, k/v, gate/up,
# down); a weight gradient (K = the tokens).
GPU_SHAPES = [(4096, 4096, 4096), (8192, 4096, 4096), (8192, 1024, 4096), (8192, 14336, 4096),
              (8192, 4096, 14336), (14336, 4096, 8192)]


@gpu
@needs_cuda
@pytest.mark.parametrize("M,N,K", GPU_SHAPES)
@pytest.mark.parametrize("a_dtype,rowwise,out_dtype", [
    (E4M3, False, torch.bfloat16), (E4M3, True, torch.bfloat16), (E5M2, False, torch.bfloat16),
    (E5M2, True, torch.float32)], ids=["fwd-tensorwise", "fwd-rowwise", "dgrad-tensorwise", "wgrad-rowwise-fp32"])
def test_fp8_matmul_gpu(triton_backend, M, N, K, a_dtype, rowwise, out_dtype):
    """Ours, the reference and cuBLAS's FP8 GEMM (torch._scaled_mm, accumulation promoted to
    fp32 as ours) against the exact product (fp64), errors relative to its largest
    magnitude: ours no worse than the reference's and _scaled_mm's, within a margin for
    the tensor cores' accumulation (see ACCUMULATION_UNIT). The errors are printed (-rA)."""
    import bench
    a, a_inv, b, b_inv = _case(M, N, K, a_dtype, rowwise, seed=M + N + K)
    exact = (a.double() * a_inv.double().reshape(-1, 1)) @ (b.double() * b_inv.double().reshape(-1, 1)).t()
    top = exact.abs().max().item()

    def err(x):
        return (x.double() - exact).abs().max().item() / top

    got = kernels.fp8_matmul(a, b, a_inv, b_inv, out_dtype)
    assert got.dtype == out_dtype and torch.isfinite(got).all()
    errors = {"ours": err(got), "reference": err(kernels.fp8_matmul_reference(a, b, a_inv, b_inv, out_dtype))}
    margin = 2.0**-12
    assert errors["ours"] <= 1.5 * errors["reference"] + margin, errors
    # cuBLAS: row-wise scales (CUTLASS, bf16 output only) need Hopper; FP8 anything, sm_89
    capability = torch.cuda.get_device_capability()
    if capability >= ((9, 0) if rowwise else (8, 9)) and not (rowwise and out_dtype != torch.bfloat16):
        errors["_scaled_mm"] = err(bench.scaled_mm(a, b, a_inv, b_inv, out_dtype))
        assert errors["ours"] <= 2 * errors["_scaled_mm"] + margin, errors
    print(f"{M}x{N}x{K} {a_dtype} x e4m3 -> {out_dtype}, {'rowwise' if rowwise else 'tensorwise'}: "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
