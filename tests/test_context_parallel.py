"""Context parallelism: ring attention against full attention, then training under
torchrun against the one-process run."""
import pytest
import torch
import torch.distributed as dist

import kernels
import parallel
from conftest import LAYOUT, check_layouts
from errors import UsageError


CASES = [(comm, causal, window, n_kv_heads, documents) for comm in ("ring", "allgather")
         for causal, window, n_kv_heads, documents in [
             (True, None, 4, False), (False, None, 4, False),
             (True, None, 1, False),  # GQA: one KV head for four queries
             (True, 2, 2, False),     # window smaller than a chunk (24 tokens, cp=2: chunks of 6)
             (True, 9, 2, False),     # window larger than a chunk
             (True, None, 2, True),   # documents (--reset-attention-mask) across chunks
             (False, 9, 2, True),
         ]]
# Each token's document: boundaries inside chunks and on their edges (cp 2, 3, 4).
DOCUMENTS = torch.tensor([[0] * 5 + [1] * 7 + [2] * 3 + [3] * 9, [0] * 13 + [1] * 11])


def _ring_vs_full():
    """On each cp rank, for every case: attention of its zigzag share, forward and
    backward, against the same slice of full attention computed in one piece."""
    results = {}
    for comm, causal, window, n_kv_heads, with_documents in CASES:
        layout = parallel.Layout(cp=dist.get_world_size(), rank=dist.get_rank(), cp_comm=comm,
                                 cp_group=dist.group.WORLD)
        gen = torch.Generator().manual_seed(0)
        T, H = 24, 4
        q = torch.randn(2, H, T, 8, generator=gen, requires_grad=True)
        k = torch.randn(2, n_kv_heads, T, 8, generator=gen, requires_grad=True)
        v = torch.randn(2, n_kv_heads, T, 8, generator=gen, requires_grad=True)
        weight = torch.randn(2, H, T, 8, generator=gen)  # makes every output element matter

        documents = DOCUMENTS if with_documents else None
        full = kernels.attention_reference(q, k, v, causal, window, documents=documents)
        (full * weight).sum().backward()
        expected = [parallel.context_shard(t, layout, dim=2) for t in (full, q.grad, k.grad, v.grad)]

        local = [parallel.context_shard(t.detach(), layout, dim=2).requires_grad_() for t in (q, k, v)]
        positions = parallel.zigzag_positions(T, layout)
        out = parallel.context_attention(*local, positions, layout, causal=causal, window=window,
                                         documents=documents)
        (out * parallel.context_shard(weight, layout, dim=2)).sum().backward()
        got = [out] + [t.grad for t in local]
        results[(comm, causal, window, n_kv_heads, with_documents)] = [(g - e).abs().max().item()
                                                       for g, e in zip(got, expected)]
    return results


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_context_attention_equals_full_attention(ranks, cp):
    """Outputs and the gradients of q, k, v (dK/dV come back round the ring) equal full
    attention's, for ring and all-gather, causal or not, GQA, windows, documents."""
    for rank, results in ranks(cp).run(_ring_vs_full).items():
        for case, diffs in results.items():
            assert max(diffs) < 1e-5, f"cp={cp} rank {rank} {case}: out, dq, dk, dv diffs {diffs}"


def test_zigzag_split_balances_and_checks_length():
    shares = [parallel.zigzag_positions(16, parallel.Layout(cp=4, rank=r)).tolist() for r in range(4)]
    assert shares[0] == [0, 1, 14, 15] and shares[3] == [6, 7, 8, 9]
    assert sorted(sum(shares, [])) == list(range(16))
    # Balanced causal work: every rank's queries see the same number of keys in total.
    assert len({sum(p + 1 for p in share) for share in shares}) == 1
    with pytest.raises(UsageError, match="not divisible by 2\\*cp = 8"):
        parallel.zigzag_positions(20, parallel.Layout(cp=4, rank=0))


CP = [*LAYOUT, "--set", "n_layers=4", "--micro-batch-size", "2", "--steps", "5"]


@pytest.mark.parametrize("model,overrides,layouts", [
    # A Mistral-style window (6) shorter than the 32-token sequence and than a cp=2 chunk (8).
    ("llama", ["--set", "sliding_window=6"],
     [(2, ["--cp", "2"]), (4, ["--cp", "4"]), (2, ["--cp", "2", "--cp-comm", "allgather"]),
      (4, ["--cp", "2", "--tp", "2"]), (4, ["--cp", "2", "--pp", "2"])]),
    ("llama", [], [(4, ["--cp", "2", "--zero1"])]),  # cp=2 x dp=2, ZeRO-1 over dp x cp
    ("gpt", [], [(2, ["--cp", "2"])]),
])
def test_context_parallel_equals_one_process(ranks, model, overrides, layouts):
    """Loss and gradient norm every step, validation loss (forward only) at the end."""
    argv = ["--model", model, *CP, *overrides]
    check_layouts(ranks, argv, layouts)
