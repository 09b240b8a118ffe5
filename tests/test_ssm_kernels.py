"""The state-space scans of kernels.py against their sequential references: Mamba-1's
selective scan and Mamba-2's chunked SSD in PyTorch, and SSD's Triton kernels stage by
stage and whole, forward and backward.

Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py before anything imports triton) at tiny shapes: there the chunk scan's tiles
are 8 positions (see `_autotune`), so chunks of 16 take two tiles, chunks of 12 end
mid-tile, and head_dim and N below 16 are masked parts of a 16-wide tile. With a GPU the
same tests run compiled, and the `gpu` ones add bf16 at Mamba-2's real shapes
(python -m pytest -m gpu tests/test_ssm_kernels.py).
"""
import pytest
import torch
import torch.nn.functional as F

import kernels
from conftest import triton_kernels_or_skip

DEVICE = triton_kernels_or_skip()
CUDA = DEVICE == "cuda"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _close(got, want, name, atol=1e-4, rtol=1e-4):
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _with_grads(fn, inputs, dy, d_final):
    """(y, final state, gradient of every input) of fn(*inputs), for upstream gradients
    dy and d_final (the final state's gradient is part of the check)."""
    y, final = fn(*inputs)
    loss = (y * dy).sum() + (final * d_final).sum()
    return (y, final, *torch.autograd.grad(loss, inputs))


# ----------------------------------------------------------------------------
# Mamba-1: selective_scan (PyTorch) against its sequential reference
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 2, 5, 16, 17, 50])
@pytest.mark.parametrize("reverse", [False, True])
def test_linear_scan_matches_the_recurrence(T, reverse):
    """The chunked scan at lengths that are, and are not, multiples of its chunk (about
    sqrt(T)), forwards and backwards."""
    g = torch.Generator().manual_seed(T)
    a, b = torch.rand(2, T, 3, 4, generator=g), torch.randn(2, T, 3, 4, generator=g)
    order = range(T - 1, -1, -1) if reverse else range(T)
    h, expected = torch.zeros(2, 3, 4), torch.empty(2, T, 3, 4)
    for t in order:
        h = a[:, t] * h + b[:, t]
        expected[:, t] = h
    _close(kernels.linear_scan(a, b, reverse=reverse), expected, "h", atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("batch,T,D,N", [(2, 13, 6, 4), (1, 37, 3, 5)])
def test_selective_scan_matches_reference(batch, T, D, N):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, T, D, generator=g)
    dt = F.softplus(torch.randn(batch, T, D, generator=g) - 1)
    A = -(0.5 + torch.rand(D, N, generator=g))
    B, C = (torch.randn(batch, T, N, generator=g) for _ in range(2))
    initial = torch.randn(batch, D, N, generator=g)
    inputs = [t.to(DEVICE).requires_grad_() for t in (x, dt, A, B, C, initial)]
    dy = torch.randn(batch, T, D, generator=g).to(DEVICE)
    d_final = torch.randn(batch, D, N, generator=g).to(DEVICE)
    got = _with_grads(kernels.selective_scan, inputs, dy, d_final)
    want = _with_grads(kernels.selective_scan_reference, inputs, dy, d_final)
    for name, a, b in zip(("y", "final", "dx", "ddt", "dA", "dB", "dC", "d_initial"), got, want):
        _close(a, b, name)


# ----------------------------------------------------------------------------
# Mamba-2: SSD
# ----------------------------------------------------------------------------

def _ssd_inputs(batch, T, heads, groups, head_dim, N, dtype=torch.float32, initial=False, seed=0):
    """[x, dt, A, B, C] (+ initial_state) on DEVICE, requiring gradients; x, dt, B, C in
    `dtype`, A and the initial state fp32. And the upstream gradients (dy, d_final)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, T, heads, head_dim, generator=g)
    dt = F.softplus(torch.randn(batch, T, heads, generator=g) - 1)  # positive, as after softplus
    A = -(0.5 + 1.5 * torch.rand(heads, generator=g))
    B, C = (torch.randn(batch, T, groups, N, generator=g) for _ in range(2))
    inputs = [t.to(DEVICE, dtype) for t in (x, dt)] + [A.to(DEVICE)] + [t.to(DEVICE, dtype) for t in (B, C)]
    if initial:
        inputs.append(torch.randn(batch, heads, head_dim, N, generator=g).to(DEVICE))
    dy = torch.randn(batch, T, heads, head_dim, generator=g).to(DEVICE)
    d_final = torch.randn(batch, heads, head_dim, N, generator=g).to(DEVICE)
    return [t.requires_grad_() for t in inputs], dy, d_final


SSD_GRADS = ("dx", "ddt", "dA", "dB", "dC", "d_initial")


@pytest.mark.parametrize("batch,T,heads,groups,head_dim,N,chunk,initial", [
    (2, 37, 4, 2, 3, 5, 8, True),     # T not a multiple of the chunk, 2 heads per group
    (1, 32, 2, 1, 4, 3, 16, False),   # T a multiple of it, one group for all heads
    (2, 9, 3, 3, 2, 4, 16, True),     # shorter than one chunk, a group per head
])
def test_ssd_chunked_matches_reference(batch, T, heads, groups, head_dim, N, chunk, initial):
    inputs, dy, d_final = _ssd_inputs(batch, T, heads, groups, head_dim, N, initial=initial)
    got = _with_grads(lambda *a: kernels.ssd_chunked(*a[:5], chunk, *a[5:]), inputs, dy, d_final)
    want = _with_grads(kernels.ssd_reference, inputs, dy, d_final)
    for name, a, b in zip(("y", "final") + SSD_GRADS, got, want):
        _close(a, b, name)


# The stages of the chunked algorithm in PyTorch, written from their definitions in
# kernels.py's SSD comment (the Triton launchers' counterparts): stage 1, 2 and 3.

def _chunked(t, chunk):
    """(batch, T, ...) -> (batch, n_chunks, chunk, ...), zero-padded at the end."""
    pad = -t.shape[1] % chunk
    t = F.pad(t.float(), (0,) * (2 * t.dim() - 4) + (0, pad))
    return t.reshape(t.shape[0], -1, chunk, *t.shape[2:])


def _torch_a_cum(dt, A, chunk):
    # (b, h, c, L), contiguous as the kernels index it
    return torch.cumsum(_chunked(dt, chunk) * A, dim=2).permute(0, 3, 1, 2).contiguous()


def _torch_own(x, dt, B, a_cum, chunk):
    heads = x.shape[2]
    u = _chunked(x, chunk) * _chunked(dt, chunk)[..., None]
    B = _chunked(kernels._heads_of_groups(B, heads), chunk)
    to_end = torch.exp(a_cum[..., -1:] - a_cum)
    return torch.einsum("bclhn,bhcl,bclhp->bchpn", B, to_end, u)


def _torch_pass_states(own, a_cum, initial):
    state = torch.zeros_like(own[:, 0]) if initial is None else initial
    states = [state]
    for c in range(own.shape[1]):
        state = torch.exp(a_cum[:, :, c, -1])[..., None, None] * state + own[:, c]
        states.append(state)
    return torch.stack(states, dim=1)  # (b, c + 1, h, p, n)


def _torch_chunk_scan(x, dt, B, C, a_cum, states, chunk):
    """Stage 4 from its formula: y_l = exp(a_cum[l]) S_c C_l + sum_{s<=l} (C_l . B_s)
    exp(a_cum[l] - a_cum[s]) dt_s x_s."""
    T, heads = x.shape[1], x.shape[2]
    u = _chunked(x, chunk) * _chunked(dt, chunk)[..., None]
    B, C = (_chunked(kernels._heads_of_groups(t, heads), chunk) for t in (B, C))
    diff = a_cum[..., :, None] - a_cum[..., None, :]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(diff.masked_fill(~causal, float("-inf")))
    y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, decay, u)
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states[:, :-1], torch.exp(a_cum))
    return y.reshape(x.shape[0], -1, heads, x.shape[3])[:, :T]


STAGE_CASE = dict(batch=1, T=21, heads=4, groups=2, head_dim=3, N=5)
STAGE_CHUNK = 16  # two chunks, the second ending at position 5 of 16


def test_ssd_triton_stages_forward():
    """Each forward launcher against the PyTorch of its stage, from the same inputs."""
    (x, dt, A, B, C, initial), _, _ = _ssd_inputs(**STAGE_CASE, initial=True)
    x, dt, A, B, C, initial = (t.detach() for t in (x, dt, A, B, C, initial))
    a_cum = _torch_a_cum(dt, A, STAGE_CHUNK)
    _close(kernels._ssd_chunk_cumsum(dt, A, STAGE_CHUNK), a_cum, "a_cum", atol=1e-5, rtol=1e-5)
    own = _torch_own(x, dt, B, a_cum, STAGE_CHUNK)
    _close(kernels._ssd_chunk_states(x, dt, B, a_cum), own, "own")
    states = _torch_pass_states(own, a_cum, initial)
    _close(kernels._ssd_pass_states(own, a_cum, initial), states, "states")
    _close(kernels._ssd_pass_states(own, a_cum), _torch_pass_states(own, a_cum, None), "states from 0")
    want = kernels.ssd_reference(x, dt, A, B, C, initial)[0]
    _close(_torch_chunk_scan(x, dt, B, C, a_cum, states, STAGE_CHUNK), want, "y (torch stages)")
    _close(kernels._ssd_chunk_scan(x, dt, B, C, a_cum, states), want, "y")


def test_ssd_triton_stages_backward():
    """The backward launchers against autograd through the PyTorch stages they reverse:
    2' (the outputs' gradient of each entering state), 3' (through state passing), 4' with
    2' through own_c (the inputs' and C's gradients), 1' (through the cumsum)."""
    (x, dt, A, B, C, initial), dy, d_final = _ssd_inputs(**STAGE_CASE, initial=True, seed=1)
    x, dt, A, B, C, initial = (t.detach() for t in (x, dt, A, B, C, initial))
    groups = B.shape[2]
    a_cum = _torch_a_cum(dt, A, STAGE_CHUNK)
    states = _torch_pass_states(_torch_own(x, dt, B, a_cum, STAGE_CHUNK), a_cum, initial)

    # 4' and 2': y and own_c from (x, dt, B, C, a_cum, the entering states), pulled back
    # from dy and a gradient d_passed of every own_c.
    leaves = [t.clone().requires_grad_() for t in (x, dt, B, C, a_cum, states)]
    y = _torch_chunk_scan(*leaves, STAGE_CHUNK)
    own = _torch_own(*leaves[:3], leaves[4], STAGE_CHUNK)
    d_passed = torch.randn_like(own)
    dx, ddt, dB, dC, d_a_cum, d_states = torch.autograd.grad((y * dy).sum() + (own * d_passed).sum(), leaves)
    d_local = kernels._ssd_chunk_states(dy, dt, C, a_cum, from_start=True)
    _close(d_local, d_states[:, :-1], "d_local (2')")
    got = kernels._ssd_chunk_scan_bwd(dy, x, dt, B, C, a_cum, states, d_passed)
    k_dx, k_db, k_dc, k_d_a_out, k_ddt_x = got
    _close(k_dx, dx, "dx")
    _close(kernels._ssd_group_sum(k_db, groups), dB, "dB")
    _close(kernels._ssd_group_sum(k_dc, groups), dC, "dC")
    _close(k_ddt_x, _chunked(ddt, STAGE_CHUNK).permute(0, 3, 1, 2), "x . du")  # dt's gradient through u
    # d a_cum: the output side, minus u . du, and own_c's decay to the chunk end
    own_end = torch.zeros_like(a_cum)
    own_end[..., -1] = (own * d_passed).sum((-1, -2)).transpose(1, 2)
    dt_chunked = _chunked(dt, STAGE_CHUNK).permute(0, 3, 1, 2)
    _close(k_d_a_out - dt_chunked * k_ddt_x + own_end, d_a_cum, "d a_cum (4')")

    # 3': states from (own, a_cum, initial), pulled back from d_local (each entering
    # state's gradient from the outputs) and d_final.
    own = _torch_own(x, dt, B, a_cum, STAGE_CHUNK)
    leaves = [t.clone().requires_grad_() for t in (own, a_cum, initial)]
    passed = _torch_pass_states(*leaves)
    loss = (passed[:, :-1] * d_local).sum() + (passed[:, -1] * d_final).sum()
    d_own, d_a_cum, d_initial = torch.autograd.grad(loss, leaves)
    k_passed, k_d_a_end, k_d_initial = kernels._ssd_pass_states_bwd(d_local, a_cum, passed.detach(), d_final, True)
    _close(k_passed, d_own, "d_passed (3')")
    _close(k_d_initial, d_initial, "d_initial")
    # the kernel's d a_cum[end], sum(G * S_{c+1}), also holds own_c's decay to the chunk end
    # (own_c is a leaf here): sum(G * own_c)
    _close(k_d_a_end, d_a_cum[..., -1] + (d_own * own).sum((-1, -2)).transpose(1, 2), "d a_cum[end]")
    assert (d_a_cum[..., :-1] == 0).all()  # state passing reads only the chunk ends

    # 1': a_cum from (dt, A), pulled back from the three parts of d a_cum.
    d_a_out, ddt_x = torch.randn_like(a_cum), torch.randn_like(a_cum)
    d_a_end = torch.randn_like(a_cum[..., -1])
    d_a_cum = d_a_out - dt_chunked * ddt_x
    d_a_cum[..., -1] += d_a_end
    leaves = [dt.clone().requires_grad_(), A.clone().requires_grad_()]
    ddt, dA = torch.autograd.grad((_torch_a_cum(*leaves, STAGE_CHUNK) * d_a_cum).sum(), leaves)
    k_ddt, k_dA = kernels._ssd_chunk_cumsum_bwd(dt, A, d_a_out, ddt_x, d_a_end)
    ddt_x_flat = ddt_x.permute(0, 2, 3, 1).reshape(dt.shape[0], -1, dt.shape[2])[:, :dt.shape[1]]
    _close(k_ddt, ddt + ddt_x_flat, "ddt (1')")
    _close(k_dA, dA, "dA (1')")


# batch, T, heads, groups, head_dim, N, chunk, initial state
SSD_CASES = [
    (1, 21, 4, 2, 6, 5, 16, False),   # T not a multiple of the chunk; 2 heads per group; masked dims
    (2, 24, 2, 1, 8, 8, 8, True),     # T a multiple of the chunk; one group; an initial state
    (1, 20, 3, 3, 12, 16, 12, True),  # a chunk that is not a power of two, nor of tiles; a group
                                      # per head; head_dim in two tiles of stage 2
    (1, 5, 2, 1, 8, 4, 16, False),    # shorter than a chunk
    (1, 37, 4, 2, 5, 6, 16, True),    # all at once: three chunks, the last partial
]


@pytest.mark.parametrize("batch,T,heads,groups,head_dim,N,chunk,initial", SSD_CASES)
def test_ssd_triton_matches_reference(triton_backend, batch, T, heads, groups, head_dim, N, chunk, initial):
    """ssd() on the Triton kernels: y, the final state and the gradients of every input
    (and of the final state) against the sequential reference."""
    inputs, dy, d_final = _ssd_inputs(batch, T, heads, groups, head_dim, N, initial=initial)
    got = _with_grads(lambda *a: kernels.ssd(*a[:5], chunk, *a[5:]), inputs, dy, d_final)
    want = _with_grads(kernels.ssd_reference, inputs, dy, d_final)
    for name, a, b in zip(("y", "final") + SSD_GRADS, got, want):
        _close(a, b, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_ssd_triton_16_bit_inputs(triton_backend, dtype):
    """16-bit x, dt, B, C: computed in fp32 inside, so close to the reference in fp32 on the
    same (rounded) inputs; outputs fp32, gradients in the inputs' dtypes. (The kernels cast
    every load to fp32 before tl.dot, so bf16 runs in the interpreter too.)"""
    inputs, dy, d_final = _ssd_inputs(1, 19, 2, 1, 8, 8, dtype)
    got = _with_grads(lambda *a: kernels.ssd(*a, 16), inputs, dy, d_final)
    exact = [t.detach().float().requires_grad_() for t in inputs]
    want = _with_grads(kernels.ssd_reference, exact, dy, d_final)
    for name, a, b, t in zip(("y", "final") + SSD_GRADS, got, want, [None, None] + inputs):
        assert a.dtype == (torch.float32 if t is None else t.dtype), name
        _close(a.float(), b, name, atol=1e-2, rtol=1e-2)


def test_ssd_dispatch(triton_backend, monkeypatch):
    """ssd() runs SSDFunction on the triton backend for the shapes it handles, and
    ssd_chunked otherwise (a head_dim past SSD_MAX_HEAD_DIM, a state past
    SSD_MAX_STATE_SIZE; the torch backend)."""
    calls, apply = [], kernels.SSDFunction.apply
    monkeypatch.setattr(kernels.SSDFunction, "apply", lambda *a: calls.append(a[0].shape) or apply(*a))
    for head_dim, N in ((4, 2), (kernels.SSD_MAX_HEAD_DIM + 1, 2), (128, 129)):
        inputs, _, _ = _ssd_inputs(1, 3, 1, 1, head_dim, N)
        y, final = kernels.ssd(*inputs, 4)
        want_y, want_final = kernels.ssd_reference(*inputs)
        _close(y, want_y, "y")
        _close(final, want_final, "final")
    assert [shape[-1] for shape in calls] == [4]
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    kernels.ssd(*_ssd_inputs(1, 3, 1, 1, 4, 2)[0], 4)
    assert len(calls) == 1


# ----------------------------------------------------------------------------
# GPU: bf16 at Mamba-2's real shapes (python -m pytest -m gpu tests/test_ssm_kernels.py)
# ----------------------------------------------------------------------------

def _relative_errors(got, want):
    """(max |got - want| / max |want|, ||got - want|| / ||want||)."""
    diff = got.float() - want
    return (diff.abs().max() / want.abs().max()).item(), (diff.norm() / want.norm()).item()


GPU_CASES = [
    (2, 2048, 24, 1, 64, 128, 256),   # mamba2-780m's layer
    (1, 2000, 16, 2, 64, 64, 64),     # T not a multiple of the chunk, 8 heads per group
]


@gpu
@needs_cuda
@pytest.mark.parametrize("batch,T,heads,groups,head_dim,N,chunk", GPU_CASES)
def test_ssd_fp32_gpu(triton_backend, batch, T, heads, groups, head_dim, N, chunk):
    """fp32 inputs at real shapes: exact fp32 products, so ssd_chunked's numbers up to the
    order of the sums."""
    inputs, dy, d_final = _ssd_inputs(batch, T, heads, groups, head_dim, N)
    got = _with_grads(lambda *a: kernels.ssd(*a, chunk), inputs, dy, d_final)
    want = _with_grads(lambda *a: kernels.ssd_chunked(*a, chunk), inputs, dy, d_final)
    for name, a, b in zip(("y", "final") + SSD_GRADS, got, want):
        worst, overall = _relative_errors(a, b)
        assert worst <= 1e-4, (name, worst, overall)


@gpu
@needs_cuda
@pytest.mark.parametrize("batch,T,heads,groups,head_dim,N,chunk", GPU_CASES)
def test_ssd_bf16_gpu(triton_backend, batch, T, heads, groups, head_dim, N, chunk):
    """bf16 inputs, as a model runs them: Triton (fp32 inside, TF32 products) against
    ssd_chunked in fp32 on the same inputs."""
    inputs, dy, d_final = _ssd_inputs(batch, T, heads, groups, head_dim, N, torch.bfloat16)
    got = _with_grads(lambda *a: kernels.ssd(*a, chunk), inputs, dy, d_final)
    exact = [t.detach().float().requires_grad_() for t in inputs]
    want = _with_grads(lambda *a: kernels.ssd_chunked(*a, chunk), exact, dy, d_final)
    for name, a, b, t in zip(("y", "final") + SSD_GRADS, got, want, [None, None] + inputs):
        assert a.dtype == (torch.float32 if t is None else t.dtype), name
        assert torch.isfinite(a).all(), name
        worst, overall = _relative_errors(a, b)
        assert worst <= 2e-2 and overall <= 5e-3, (name, worst, overall)


# ----------------------------------------------------------------------------
# A Mamba-2 model through the Triton path
# ----------------------------------------------------------------------------

def test_mamba2_model_with_triton_ssd_equals_the_torch_path(monkeypatch):
    """One layer of mamba.py's test model (8 heads in 2 groups, chunks of 16, 20 tokens: the
    last chunk partial): the loss and every parameter's gradient are the same whichever
    path kernels.ssd (and RMSNorm) takes."""
    import models
    cfg = models.make_config("mamba", "test", ["n_layers=1"])
    ids = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("KERNELS_BACKEND", backend)
        model = models.build("mamba", cfg, DEVICE, seed=0)
        loss = model(ids, labels=ids)
        loss.backward()
        results[backend] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    _close(results["triton"][0], results["torch"][0], "loss", atol=1e-5, rtol=1e-5)
    for name, grad in results["torch"][1].items():
        _close(results["triton"][1][name], grad, name, atol=1e-5 * grad.abs().max().item(), rtol=1e-4)
