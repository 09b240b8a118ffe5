"""parallel.LocalRanks, which the layout tests and benchmarks run on: a failed or hung job
kills every process of the launch, so none is left waiting in a collective."""
import time

import pytest
import torch.distributed as dist

import parallel


def _rank_1_fails_while_rank_0_waits():
    if dist.get_rank() == 1:
        raise ValueError("rank 1 gave up")
    dist.barrier()  # never completes: rank 1 is not coming


def _hang(seconds):
    time.sleep(seconds)


def test_a_failed_rank_kills_the_launch():
    ranks = parallel.LocalRanks(2)
    procs = list(ranks.procs)
    with pytest.raises(RuntimeError, match="rank 1 of 2 failed:(.|\n)*ValueError: rank 1 gave up"):
        ranks.run(_rank_1_fails_while_rank_0_waits)
    assert not any(p.is_alive() for p in procs)
    with pytest.raises(RuntimeError, match="closed"):
        ranks.run(_hang, seconds=0)


def test_a_job_past_its_timeout_kills_the_launch():
    ranks = parallel.LocalRanks(2, timeout=2)
    assert ranks.run(_hang, seconds=0) == {0: None, 1: None}
    procs = list(ranks.procs)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="_hang did not finish on 2 ranks in 2 s"):
        ranks.run(_hang, seconds=600)
    assert time.monotonic() - start < 10 and not any(p.is_alive() for p in procs)
