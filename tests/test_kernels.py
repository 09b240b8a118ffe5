"""kernels.py: each public function against its plain reference."""
import pytest
import torch

import kernels


@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 1), (8, 2)])
@pytest.mark.parametrize("causal,window,padded", [
    (True, None, False), (False, None, False), (True, 3, False), (True, None, True), (False, None, True),
])
def test_attention_matches_reference(h, hkv, causal, window, padded):
    torch.manual_seed(0)
    q = torch.randn(2, h, 9, 16, requires_grad=True)
    k = torch.randn(2, hkv, 9, 16, requires_grad=True)
    v = torch.randn(2, hkv, 9, 16, requires_grad=True)
    mask = None
    if padded:
        mask = torch.ones(2, 9, dtype=torch.bool)
        mask[0, 6:] = False  # right padding keeps every query row non-empty
    out = kernels.attention(q, k, v, causal, window, mask)
    ref = kernels.attention_reference(q, k, v, causal, window, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_decoding_queries_sit_at_the_end():
    """With fewer queries than keys (a KV cache), query i is position k_len - q_len + i."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    full = kernels.attention(q, k, v, causal=True, window=4)
    last3 = kernels.attention(q[:, :, -3:], k, v, causal=True, window=4)
    torch.testing.assert_close(last3, full[:, :, -3:], atol=1e-6, rtol=1e-6)


def test_window_mask_semantics():
    mask = kernels.attention_mask(5, 5, "cpu", causal=True, window=2)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_rmsnorm_and_swiglu():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    w = torch.randn(32, dtype=torch.float64)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(kernels.rmsnorm(x.float(), w.float(), 1e-6), expected.float())
    g, u = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(kernels.swiglu(g, u), g * torch.sigmoid(g) * u)


def test_rope_rotation_is_relative():
    """RoPE's point: q.k depends only on the distance between positions."""
    inv_freq = kernels.rope_inv_freq(16, 10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = kernels.rope_cos_sin(torch.tensor([pq]), inv_freq)
        ck, sk = kernels.rope_cos_sin(torch.tensor([pk]), inv_freq)
        return (kernels.apply_rope(q, cq, sq) * kernels.apply_rope(k, ck, sk)).sum()
    torch.testing.assert_close(score(3, 1), score(10, 8))


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="KERNELS_BACKEND"):
        kernels.rmsnorm(torch.ones(2), torch.ones(2))


def _cross_entropy_case(tokens=10, dim=8, vocab=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens // 2, dim, generator=g, requires_grad=True)
    w = torch.randn(vocab, dim, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (2, tokens // 2), generator=g)
    labels[0, 1] = labels[1, 3] = -100  # ignored targets
    return x, w, labels


@pytest.mark.parametrize("chunk_tokens", [None, 1, 3, 10])
def test_linear_cross_entropy_matches_reference(chunk_tokens):
    """Loss and gradients equal the logits-at-once reference, whatever the chunking."""
    x, w, labels = _cross_entropy_case()
    loss = kernels.linear_cross_entropy(x, w, labels, chunk_tokens=chunk_tokens)
    ref = kernels.linear_cross_entropy_reference(x, w, labels)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-6)
    grads = torch.autograd.grad(3.0 * loss, (x, w))  # a scale: backward multiplies by it
    ref_grads = torch.autograd.grad(3.0 * ref, (x, w))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_linear_cross_entropy_with_bias():
    """An output bias (BERT's): loss and the gradients of x, W and b equal the reference's."""
    x, w, labels = _cross_entropy_case()
    b = torch.randn(w.shape[0], requires_grad=True)
    loss = kernels.linear_cross_entropy(x, w, labels, chunk_tokens=3, bias=b)
    ref = kernels.linear_cross_entropy_reference(x, w, labels, bias=b)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-6)
    for got, want in zip(torch.autograd.grad(2.0 * loss, (x, w, b)), torch.autograd.grad(2.0 * ref, (x, w, b))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_linear_cross_entropy_vocab_padding_and_split():
    """Rows past vocab_size take no probability. Split over two ranks of 8 rows each, with
    the all-reduces emulated by adding what the other rank would contribute: every rank
    gets the whole loss, its dx parts sum to the reference's, its dW is its slice's."""
    x, w, labels = _cross_entropy_case(vocab=13)
    padded = torch.cat([w.detach(), torch.randn(3, w.shape[1])]).requires_grad_()  # 3 padding rows
    ref = kernels.linear_cross_entropy_reference(x, w, labels)
    ref_dx, ref_dw = torch.autograd.grad(ref, (x, w))
    torch.testing.assert_close(kernels.linear_cross_entropy(x, padded, labels, vocab_size=13), ref)

    with torch.no_grad():
        logits = torch.nn.functional.linear(x, padded).flatten(0, 1)
        logits = logits.masked_fill(torch.arange(16) >= 13, float("-inf"))
        max_logit = logits.max(-1).values
        shifted = logits - max_logit[:, None]
        target = shifted.gather(-1, labels.flatten().clamp(min=0)[:, None])[:, 0]

    def contribution(rank):  # (sum of exponentials, target logit) from rank's 8 rows
        in_slice = (labels.flatten() >= 8 * rank) & (labels.flatten() < 8 * rank + 8)
        return torch.stack([shifted[:, 8 * rank:8 * rank + 8].exp().sum(-1), target * in_slice])

    dx_sum = torch.zeros_like(x)
    for rank in range(2):
        def all_reduce(tensor, op, other=1 - rank):
            tensor.copy_(max_logit) if op == "max" else tensor.add_(contribution(other))
        rows = padded[8 * rank:8 * rank + 8].detach().requires_grad_()
        loss = kernels.linear_cross_entropy(x, rows, labels, vocab_start=8 * rank, vocab_size=13,
                                            all_reduce=all_reduce, chunk_tokens=10)  # one chunk
        torch.testing.assert_close(loss, ref)
        dx, dw = torch.autograd.grad(loss, (x, rows))
        dx_sum += dx
        want_dw = torch.cat([ref_dw, torch.zeros(3, w.shape[1])])[8 * rank:8 * rank + 8]
        torch.testing.assert_close(dw, want_dw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx_sum, ref_dx, atol=1e-5, rtol=1e-5)


def test_linear_cross_entropy_under_bf16_autocast():
    """Under autocast the matmuls run in bf16 as the reference's do; gradients keep the
    inputs' dtypes and agree within bf16 rounding."""
    x, w, labels = _cross_entropy_case(tokens=64, dim=32, vocab=50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kernels.linear_cross_entropy(x, w, labels, chunk_tokens=16)
        ref = kernels.linear_cross_entropy_reference(x, w, labels)
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=0)
    for got, want in zip(torch.autograd.grad(loss, (x, w)), torch.autograd.grad(ref, (x, w))):
        assert got.dtype == want.dtype == torch.float32
        assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_linear_cross_entropy_without_grad_computes_no_gradient():
    x, w, labels = _cross_entropy_case()
    with torch.no_grad():
        loss = kernels.linear_cross_entropy(x, w, labels, chunk_tokens=3)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, kernels.linear_cross_entropy_reference(x, w, labels).detach())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_linear_cross_entropy_bf16_gpu_memory():
    """bf16 autocast at llama3's vocabulary: the reference's loss and gradients within
    bf16 rounding, at under a third of its peak memory."""
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens, dim, vocab = 8192, 2048, 128256
    x = torch.randn(tokens, dim, device="cuda", generator=g).requires_grad_()
    w = (0.02 * torch.randn(vocab, dim, device="cuda", generator=g)).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    runs = {}
    for name, fn in (("reference", kernels.linear_cross_entropy_reference),
                     ("chunked", kernels.linear_cross_entropy)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(x, w, labels)
        grads = torch.autograd.grad(loss, (x, w))
        runs[name] = (loss.item(), grads, torch.cuda.max_memory_allocated() - before)
    (ref_loss, ref_grads, ref_peak), (loss, grads, peak) = runs["reference"], runs["chunked"]
    assert loss == pytest.approx(ref_loss, rel=1e-3)
    for got, want in zip(grads, ref_grads):
        assert (got.float() - want.float()).abs().max() <= 2e-2 * want.float().abs().max()
    assert peak < ref_peak / 3, (peak, ref_peak)


def test_attention_with_lse_is_attention_by_blocks():
    """kernels.attention_with_lse (what context parallelism's ring runs on each block of
    keys): at the default positions its output is attention_reference's (the same masking
    rule, positions_mask); its lse is the log-sum-exp of the scores; and two blocks of keys
    at arbitrary positions, merged by their lse, give the whole."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    padding = torch.rand(2, 10) > 0.2
    padding[:, 0] = True
    q_pos, k_pos = torch.arange(4, 10), torch.arange(10)
    for causal, window in ((True, None), (True, 3), (False, None)):
        out, lse = kernels.attention_with_lse(q, k, v, q_pos, k_pos, causal, window, key_padding_mask=padding)
        torch.testing.assert_close(out, kernels.attention_reference(q, k, v, causal, window, padding),
                                   rtol=1e-5, atol=1e-6)
        mask = kernels.attention_mask(6, 10, "cpu", causal, window, padding)
        scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 8 ** -0.5
        torch.testing.assert_close(lse, scores.masked_fill(~mask, float("-inf")).logsumexp(-1))
        halves = [kernels.attention_with_lse(q, k[:, :, part], v[:, :, part], q_pos, k_pos[part], causal, window,
                                             key_padding_mask=padding[:, part])
                  for part in (torch.tensor([0, 2, 4, 6, 8]), torch.tensor([1, 3, 5, 7, 9]))]
        (a, lse_a), (b, lse_b) = halves
        whole = torch.logaddexp(lse_a, lse_b)
        merged = a * torch.exp(lse_a - whole)[..., None] + b * torch.exp(lse_b - whole)[..., None]
        torch.testing.assert_close(merged, out, rtol=1e-5, atol=1e-6)
