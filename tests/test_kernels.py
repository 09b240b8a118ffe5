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
