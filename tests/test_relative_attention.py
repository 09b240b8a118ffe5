"""T5's relative position bias in kernels.py's attention: the bucketing against Hugging
Face's, and the Triton kernels (which compute the bias from the bucket table, forward and
backward, the table's gradient included) and the torch path against the reference with
the bias materialized.

Without a GPU the kernels run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1
before triton is imported), with BLOCK_M=16 and BLOCK_N=32 (see kernels._autotune): at 75
or 80 positions and max_distance 20, blocks far from the diagonal take the dQ kernel's
one-atomic-per-block path for the table's gradient, the others one atomic per element.
"""
import time

import pytest
import torch

import kernels
from conftest import triton_kernels_or_skip

DEVICE = triton_kernels_or_skip()
CUDA = DEVICE == "cuda"


# ----------------------------------------------------------------------------
# The bucketing and the materialized bias, against Hugging Face's T5

@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (16, 50), (64, 256), (4, 3)])
def test_relative_position_bucket_matches_hugging_face(bidirectional, num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention
    distance = torch.arange(-1000, 1001)
    got = kernels.relative_position_bucket(distance, bidirectional, num_buckets, max_distance)
    want = T5Attention._relative_position_bucket(distance, bidirectional, num_buckets, max_distance)
    assert got.dtype == want.dtype and torch.equal(got, want)
    # What the dQ kernel's far-block path relies on: on each side, every distance at least
    # max_distance away is in one bucket.
    for side in (distance <= -max_distance, distance >= max_distance):
        assert got[side].unique().numel() == 1


@pytest.mark.parametrize("is_decoder,q_len,k_len", [(False, 13, 13), (True, 13, 13), (True, 3, 40)])
def test_bias_reference_matches_hugging_face(is_decoder, q_len, k_len):
    """The materialized bias is T5Attention.compute_bias's: encoder (bidirectional), decoder
    (past only), and decoder queries after cached keys (the last q_len positions)."""
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention
    config = T5Config(d_model=16, d_kv=4, num_heads=4, relative_attention_num_buckets=8,
                      relative_attention_max_distance=10, is_decoder=is_decoder)
    hf = T5Attention(config, has_relative_attention_bias=True, layer_idx=0)
    pb = kernels.RelativePositionBias(hf.relative_attention_bias.weight, bidirectional=not is_decoder,
                                      max_distance=10)
    with torch.no_grad():
        want = hf.compute_bias(q_len, k_len, past_seen_tokens=k_len - q_len)
        got = kernels.relative_position_bias_reference(pb, q_len, k_len)
    assert got.shape == (1, 4, q_len, k_len)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------
# attention() with position_bias against the reference

def _case(B, H, Hkv, Tq, Tk, D, num_buckets, dtype, padded, seed=0):
    """q, k, v, a key padding mask (random holes, every 4th key real, and the last third
    of sequence 0 padded), dO, and a table that is a column slice of a wider one (a rank's
    heads of a tensor-parallel table: not contiguous)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, t, D, generator=g).to(DEVICE, dtype).requires_grad_()
               for h, t in ((H, Tq), (Hkv, Tk), (Hkv, Tk)))
    mask = None
    if padded:
        mask = torch.rand(B, Tk, generator=g) > 0.3
        mask[:, ::4] = True
        mask[0, Tk - Tk // 3:] = False
        mask = mask.to(DEVICE)
    do = torch.randn(B, H, Tq, D, generator=g).to(DEVICE, dtype)
    wide = torch.randn(num_buckets, 2 * H, generator=g).to(DEVICE).requires_grad_()
    return q, k, v, mask, do, wide


def _run(fn, q, k, v, do, wide, H, bidirectional, max_distance, **kw):
    """out and the gradients of q, k, v and the table, with T5's scale (1, no 1/sqrt(d))."""
    pb = kernels.RelativePositionBias(wide[:, H:], bidirectional, max_distance)
    out = fn(q, k, v, pb, scale=1.0, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v, wide), do))


def _kernel(q, k, v, pb, **kw):
    return kernels.attention(q, k, v, position_bias=pb, **kw)


def _reference(q, k, v, pb, **kw):
    bias = kernels.relative_position_bias_reference(pb, q.shape[2], k.shape[2])
    return kernels.attention_reference(q, k, v, bias=bias, **kw)


def _on_triton(monkeypatch, fn):
    """fn run with the Triton kernels, where materializing the bias is an error."""
    def refuse(*args):
        raise AssertionError("the Triton path materialized the (Tq, Tk) bias")
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    with monkeypatch.context() as m:
        m.setattr(kernels, "relative_position_bias_reference", refuse)
        return fn()


def _compare(got, want, tol):
    for name, a, b in zip(("out", "dq", "dk", "dv", "dtable"), got, want):
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m: f"{name}: {m}")


# B, H, Hkv, Tq, Tk, D, causal, bidirectional, num_buckets, max_distance, padded.
# The "-far" cases have blocks (16 queries x 32 keys in the interpreter) whose distances
# are all >= max_distance (the dQ kernel's one-atomic path), and 16 buckets per side with
# max_distance 20, where the last bucket starts at distance 18: a far-block test that is
# off by a few distances lumps distances of different buckets together, and shows.
CASES = {
    "encoder": (2, 4, 4, 37, 37, 16, False, True, 32, 128, True),
    "decoder": (2, 4, 2, 37, 37, 16, True, False, 32, 128, False),
    "decoding-1": (2, 4, 4, 1, 37, 16, True, False, 32, 128, False),
    "decoding-3": (1, 4, 2, 3, 37, 32, True, False, 32, 128, True),
    "encoder-far": (1, 2, 2, 75, 75, 16, False, True, 32, 20, True),
    "decoder-far": (1, 2, 1, 80, 80, 16, True, False, 16, 20, False),
}


@pytest.mark.parametrize("case", CASES)
def test_triton_position_bias_matches_reference_fp32(monkeypatch, case):
    B, H, Hkv, Tq, Tk, D, causal, bidirectional, nb, md, padded = CASES[case]
    q, k, v, mask, do, wide = _case(B, H, Hkv, Tq, Tk, D, nb, torch.float32, padded)
    kw = dict(causal=causal, key_padding_mask=mask)
    got = _on_triton(monkeypatch, lambda: _run(_kernel, q, k, v, do, wide, H, bidirectional, md, **kw))
    want = _run(_reference, q, k, v, do, wide, H, bidirectional, md, **kw)
    _compare(got, want, dict(atol=2e-5, rtol=1e-4))


def test_autotuning_adds_the_table_gradient_once(monkeypatch):
    """To pick a configuration, the autotuner launches a kernel once per configuration (and
    several times while timing each), and the dQ kernel adds the table's gradient into its
    output with atomics: that output must be zeroed before each launch and after the last
    (kernels._autotune's `accumulates`). The interpreter lists one configuration, where
    nothing is timed; here each attention kernel is tuned over two, and every output, the
    table's gradient included, must be the reference's (it was 2 configurations x several
    launches times too large). Without a position bias no input may be zeroed in its place."""
    def three_launches(kernel_call, quantiles):  # a timer for the CPU (triton's needs a GPU)
        start = time.perf_counter()
        for _ in range(3):
            kernel_call()
        return [time.perf_counter() - start] * len(quantiles)
    for name in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        tuned = getattr(kernels, name).with_configs([(16, 32, 4, 1), (32, 16, 4, 1)], do_bench=three_launches)
        monkeypatch.setattr(kernels, name, tuned)
    B, H, Hkv, Tq, Tk, D, causal, bidirectional, nb, md, padded = CASES["decoder-far"]
    q, k, v, mask, do, wide = _case(B, H, Hkv, Tq, Tk, D, nb, torch.float32, padded)
    kw = dict(causal=causal, key_padding_mask=mask)
    got = _on_triton(monkeypatch, lambda: _run(_kernel, q, k, v, do, wide, H, bidirectional, md, **kw))
    want = _run(_reference, q, k, v, do, wide, H, bidirectional, md, **kw)
    _compare(got, want, dict(atol=2e-5, rtol=1e-4))
    inputs = [t.detach().clone() for t in (q, k, v)]
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    out = kernels.attention(q, k, v, causal=True)
    got = (out, *torch.autograd.grad(out, (q, k, v), do))
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    out = kernels.attention_reference(q, k, v, causal=True)
    _compare(got, (out, *torch.autograd.grad(out, (q, k, v), do)), dict(atol=2e-5, rtol=1e-4))
    assert all(torch.equal(t, before) for t, before in zip((q, k, v), inputs))


@pytest.mark.parametrize("case", ["decoder-far"])  # (fp32 covers every case; fp16 its rounding)
def test_triton_position_bias_matches_reference_fp16(monkeypatch, case):
    """fp16 q, k, v (the table fp32, as under autocast) against the fp32 reference on the
    same fp16-rounded inputs."""
    B, H, Hkv, Tq, Tk, D, causal, bidirectional, nb, md, padded = CASES[case]
    q, k, v, mask, do, wide = _case(B, H, Hkv, Tq, Tk, D, nb, torch.float16, padded)
    kw = dict(causal=causal, key_padding_mask=mask)
    got = _on_triton(monkeypatch, lambda: _run(_kernel, q, k, v, do, wide, H, bidirectional, md, **kw))
    assert got[0].dtype == torch.float16 and got[4].dtype == torch.float32
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = _run(_reference, q32, k32, v32, do.float(), wide, H, bidirectional, md, **kw)
    _compare(got, want, dict(atol=1e-2, rtol=1e-2))


def test_triton_position_bias_under_autocast(monkeypatch):
    """Autocast casts q, k, v (fp16 here: the interpreter's bf16 matmuls are wrong); the
    table stays fp32, as does its gradient."""
    q, k, v, mask, do, wide = _case(2, 4, 2, 37, 37, 16, 32, torch.float32, padded=True)
    kw = dict(causal=False, key_padding_mask=mask)
    with torch.autocast(DEVICE, dtype=torch.float16):
        got = _on_triton(monkeypatch, lambda: _run(_kernel, q, k, v, do.half(), wide, 4, True, 128, **kw))
    assert got[0].dtype == torch.float16 and got[4].dtype == torch.float32
    q16, k16, v16 = (t.detach().half().float().requires_grad_() for t in (q, k, v))
    want = _run(_reference, q16, k16, v16, do.half().float(), wide, 4, True, 128, **kw)
    _compare(got, want, dict(atol=1e-2, rtol=1e-2))


def test_triton_position_bias_trains_after_inference_mode(monkeypatch):
    """The distance buckets are cached across calls: those made under inference_mode (an
    inference tensor, which autograd may not save) serve a later call that trains."""
    q, k, v, _, do, wide = _case(1, 2, 2, 9, 9, 16, 8, torch.float32, padded=False)
    with torch.inference_mode():
        _on_triton(monkeypatch, lambda: _kernel(q, k, v, kernels.RelativePositionBias(wide[:, 2:], False, 20),
                                                scale=1.0))
    got = _on_triton(monkeypatch, lambda: _run(_kernel, q, k, v, do, wide, 2, False, 20))
    _compare(got, _run(_reference, q, k, v, do, wide, 2, False, 20), dict(atol=2e-5, rtol=1e-4))


def test_triton_position_bias_fully_padded_sequence(monkeypatch):
    """A sequence whose keys are all padding: output 0 and zero, finite gradients, and no
    contribution to the table's gradient (that of the other sequence alone)."""
    q, k, v, _, do, wide = _case(2, 4, 2, 40, 40, 16, 8, torch.float32, padded=False)
    mask = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    got = _on_triton(monkeypatch, lambda: _run(_kernel, q, k, v, do, wide, 4, True, 20, causal=False,
                                               key_padding_mask=mask))
    for t in got:
        assert torch.isfinite(t).all()
    for t in got[:4]:
        assert (t[1] == 0).all()
    first = [t[:1].detach().requires_grad_() for t in (q, k, v)]
    want = _run(_reference, *first, do[:1], wide, 4, True, 20, causal=False, key_padding_mask=mask[:1])
    _compare([t[:1] for t in got[:4]] + [got[4]], want, dict(atol=2e-5, rtol=1e-4))


@pytest.mark.parametrize("case", ["encoder", "decoder", "decoding-3"])
def test_torch_path_position_bias_matches_reference(monkeypatch, case):
    """backend torch: SDPA with the materialized bias as a float mask; the table's
    gradient through the gather."""
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    B, H, Hkv, Tq, Tk, D, causal, bidirectional, nb, md, padded = CASES[case]
    q, k, v, mask, do, wide = _case(B, H, Hkv, Tq, Tk, D, nb, torch.float32, padded)
    kw = dict(causal=causal, key_padding_mask=mask)
    got = _run(_kernel, q, k, v, do, wide, H, bidirectional, md, **kw)
    want = _run(_reference, q, k, v, do, wide, H, bidirectional, md, **kw)
    _compare(got, want, dict(atol=1e-5, rtol=1e-5))


def test_position_bias_shapes_are_checked():
    """A table needs a column per query head, and (as T5 has) at least one exact bucket
    per side and max_distance beyond them (T5's bucketing makes nonsense buckets otherwise)."""
    q = torch.randn(1, 4, 5, 16)
    with pytest.raises(ValueError, match="num_buckets, 4"):
        kernels.attention(q, q, q, position_bias=kernels.RelativePositionBias(torch.zeros(8, 2), True))
    for table, bidirectional, max_distance in [(torch.zeros(32, 4), True, 8), (torch.zeros(3, 4), True, 128),
                                               (torch.zeros(32), False, 128)]:
        with pytest.raises(ValueError, match="max_distance"):
            kernels.RelativePositionBias(table, bidirectional, max_distance)


# ----------------------------------------------------------------------------
# A T5 trained through the kernels; bf16 at T5-base's shapes on a GPU

def _t5_loss_and_gradients():
    """The test T5's (head dim 16) loss and every gradient on a padded encoder batch."""
    import models
    model = models.build("t5", models.make_config("t5", "test"), DEVICE, 0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 24), generator=g)  # beyond max_distance 20
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 17:] = 0
    labels = torch.randint(0, 256, (2, 8), generator=g)
    loss = model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), labels=labels.to(DEVICE))
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def test_t5_gradients_are_the_same_on_triton_kernels(monkeypatch):
    """Encoder (bidirectional buckets, padding), decoder (causal, past-only buckets) and
    cross-attention (no bias) through the Triton kernels: the loss and every gradient (the
    bias tables' included) of the reference path."""
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    want_loss, want = _t5_loss_and_gradients()
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    loss, grads = _t5_loss_and_gradients()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-5 * want[name].abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("bidirectional", [True, False])
def test_position_bias_bf16_gpu(monkeypatch, bidirectional):
    """bf16 at T5-base's attention (12 heads of 64, 32 buckets, max distance 128), T 1024:
    no worse against an fp32 reference than torch's bf16 SDPA with the bias materialized."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(2, 12, 1024, 64, device="cuda", generator=g).bfloat16() for _ in range(4))
    table = torch.randn(32, 12, device="cuda", generator=g)
    mask = torch.ones(2, 1024, dtype=torch.bool, device="cuda")
    mask[1, 700:] = False

    def run(dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)] + [table.clone().requires_grad_()]
        out = kernels.attention(*leaves[:3], causal=not bidirectional, scale=1.0,
                                key_padding_mask=mask if bidirectional else None,
                                position_bias=kernels.RelativePositionBias(leaves[3], bidirectional))
        grads = torch.autograd.grad(out, leaves, do.to(dtype))
        return [out, *grads]
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    exact, sdpa = run(torch.float32), run(torch.bfloat16)
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    got = run(torch.bfloat16)
    for name, a, s, e in zip(("out", "dq", "dk", "dv", "dtable"), got, sdpa, exact):
        err, base = (a.float() - e).abs().max().item(), (s.float() - e).abs().max().item()
        assert torch.isfinite(a).all() and err <= 2 * base + 1e-2 * e.abs().max().item(), (name, err, base)
