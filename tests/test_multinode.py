"""Several nodes: one torchrun agent per node, as scripts/slurm.sh launches them (`torchrun
--nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint HEAD:PORT train.py ...`),
here two agents of two processes each on loopback, the first hosting the rendezvous.

What it proves:
- a two-node run (tp 2 x dp 2 over 4 ranks) trains as one process does: the loss, the
  gradient norm (before clipping, with clipping off) and the validation loss of every step,
  fp32, within the layout tests' 1e-5; a rank of the second node that scaled its gradients
  wrongly, or missed the reduction across nodes, shows from step 1's gradient norm and step
  2's loss on;
- torchrun numbers the ranks 0..3 across the nodes and LOCAL_RANK 0, 1 within each, and
  each rank takes its GPU by LOCAL_RANK (parallel.cuda_device_index), never by RANK;
- the two-node run's checkpoint resumes on one node of 4 processes (the same layout), and
  the resumed steps equal the uninterrupted one-process run;
- a node that dies (its agent and its processes, SIGKILL) ends the other node's processes
  within seconds (bound: a 3-second --distributed-timeout-minutes plus 20 s of slack for a
  loaded machine, far below the 10-minute default a hang would wait), each with one line
  `error: rank N, ...` as its whole stderr, and that node's agent exits non-zero.

Every launch is killed when its test ends, workers included (torchrun starts each worker in
a session of its own, so killing an agent's process group leaves them running): each
process carries an environment variable naming its test and node, which the cleanup finds
in /proc.
"""
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

import metrics
import parallel
from conftest import LAYOUT, ROOT, assert_same_run, one_process

ARGV = ["--model", "llama", *LAYOUT]  # fp32, clipping off: a wrong gradient scale shows
MARK = "MULTINODE_TEST_NODE"  # in every process of a launch: "<test id>:<node>"

# train.main as train.py runs it, after writing down what torchrun told this rank and the
# CUDA device it would take on a node of 2 or of 4 GPUs.
RECORD_RANK = """
import json, os, sys
sys.path.insert(0, {root!r})
import parallel, train
env = {{k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}}
env.update(node=os.environ[{mark!r}].rsplit(":", 1)[1],
           device_of_2=parallel.cuda_device_index(os.environ, 2), device_of_4=parallel.cuda_device_index(os.environ, 4))
with open(os.path.join({ranks!r}, "rank%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(env, f)
train.main(sys.argv[1:])
"""


def test_cuda_device_index_follows_the_local_rank():
    """2 nodes x 2 processes: RANK 0..3, LOCAL_RANK 0, 1, 0, 1. With 2 GPUs a node, RANK
    would ask the second node for devices 2 and 3; with 4, it would leave its 0 and 1 idle."""
    launch = [{"RANK": str(r), "LOCAL_RANK": str(r % 2), "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
              for r in range(4)]
    assert [parallel.cuda_device_index(env, 2) for env in launch] == [0, 1, 0, 1]
    assert [parallel.cuda_device_index(env, 4) for env in launch] == [0, 1, 0, 1]
    assert [parallel.cuda_device_index(env, 1) for env in launch] == [0, 0, 0, 0]  # all share one
    assert parallel.cuda_device_index({}, 2) == 0  # plain `python train.py`: no LOCAL_RANK


# ----------------------------------------------------------------------------
# Launching nodes
# ----------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked(prefix):
    """The pids of the processes whose MARK starts with `prefix` (agents and workers)."""
    found, needle = [], f"{MARK}={prefix}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if any(v.startswith(needle) for v in f.read().split(b"\0")):
                    found.append(int(pid))
        except OSError:
            continue
    return found


def kill_marked(prefix):
    """SIGKILL every process of these launches: each one's process group (a worker's is its
    own session), then the process itself."""
    for _ in range(3):  # (an agent might start a worker while we look)
        pids = marked(prefix)
        if not pids:
            return
        for pid in pids:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        time.sleep(0.2)


class Nodes:
    """torchrun agents of one test, each a "node"; node(...) starts one in the background."""

    def __init__(self, tmp_path):
        self.tmp_path, self.test_id, self.procs = tmp_path, uuid.uuid4().hex, {}
        self.ranks_dir = tmp_path / "ranks"
        self.ranks_dir.mkdir()
        self.script = tmp_path / "record_rank.py"
        self.script.write_text(RECORD_RANK.format(root=ROOT, mark=MARK, ranks=str(self.ranks_dir)))

    def node(self, name, argv, nproc, rendezvous=None, is_host=False):
        """One agent of `nproc` workers running train.py's main with `argv`: of a c10d
        rendezvous of two nodes at `rendezvous` ((port, id)), or --standalone."""
        where = ["--standalone"] if rendezvous is None else [
            "--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rendezvous[0]}",
            "--rdzv-id", rendezvous[1], "--rdzv-conf", f"is_host={'true' if is_host else 'false'}"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *where, "--nproc-per-node", str(nproc),
               "--max-restarts", "0", "--log-dir", str(self.tmp_path / f"logs-{name}"), "--redirects", "3",
               str(self.script), *argv]
        env = {**os.environ, "OMP_NUM_THREADS": "1", MARK: f"{self.test_id}:{name}"}
        with open(self.tmp_path / f"agent-{name}.out", "w") as out, \
                open(self.tmp_path / f"agent-{name}.err", "w") as err:
            self.procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err,
                                                start_new_session=True)
        return self.procs[name]

    def finish(self, name, timeout):
        """Wait for an agent: its exit status; a failure shows what its workers said."""
        code = self.procs[name].wait(timeout=timeout)
        assert code == 0, f"node {name} exited {code}:\n" + self.output(name)
        return code

    def worker_logs(self, name, stream="stderr"):
        """{local rank: what that worker wrote to `stream`} (torchrun's --redirects)."""
        paths = glob.glob(str(self.tmp_path / f"logs-{name}" / "*" / "attempt_0" / "*" / f"{stream}.log"))
        return {int(os.path.basename(os.path.dirname(p))): open(p).read() for p in paths}

    def output(self, name):
        workers = "".join(f"--- worker {r} {s}:\n{text[-2000:]}" for s in ("stdout", "stderr")
                          for r, text in sorted(self.worker_logs(name, s).items()))
        return workers + "--- agent:\n" + (self.tmp_path / f"agent-{name}.err").read_text()[-3000:]

    def ranks(self):
        """{RANK: what that rank recorded} of the launches so far (the latest per rank)."""
        return {int(p.stem[4:]): json.loads(p.read_text()) for p in self.ranks_dir.glob("rank*.json")}

    def kill(self, name):
        """The node dies: its agent and all its workers, SIGKILL."""
        kill_marked(f"{self.test_id}:{name}")

    def close(self):
        kill_marked(self.test_id)
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)


@pytest.fixture
def nodes(tmp_path):
    nodes = Nodes(tmp_path)
    try:
        yield nodes
    finally:
        nodes.close()


def two_nodes(nodes, argv):
    """Start node a (the head: it hosts the rendezvous) and node b, 2 processes each."""
    rendezvous = (free_port(), nodes.test_id[:8])
    nodes.node("a", argv, nproc=2, rendezvous=rendezvous, is_host=True)
    nodes.node("b", argv, nproc=2, rendezvous=rendezvous)


# ----------------------------------------------------------------------------
# Training on two nodes, resuming on one
# ----------------------------------------------------------------------------

def test_two_nodes_train_as_one_process_and_resume_on_one_node(nodes, tmp_path):
    ckpt = tmp_path / "ckpt"
    two_nodes(nodes, [*ARGV, "--tp", "2", "--save", str(ckpt), "--save-every", "5",
                      "--metrics", str(tmp_path / "two.jsonl")])
    expected = one_process(ARGV)  # 10 steps, in this process while the nodes start
    nodes.finish("a", timeout=240)
    nodes.finish("b", timeout=60)
    assert "world=4 tp=2 (sp) cp=1 dp=2" in "".join(nodes.worker_logs("a", "stdout").values()) + \
        "".join(nodes.worker_logs("b", "stdout").values())
    assert_same_run(metrics.read_metrics(tmp_path / "two.jsonl"), expected)

    ranks = nodes.ranks()
    assert sorted(ranks) == [0, 1, 2, 3]
    assert {r["node"] for r in ranks.values()} == {"a", "b"}
    for group in ([0, 1], [2, 3]):  # consecutive ranks on one node: tp 2 stays inside it
        assert ranks[group[0]]["node"] == ranks[group[1]]["node"], ranks
    assert [ranks[r]["LOCAL_RANK"] for r in range(4)] == ["0", "1", "0", "1"], ranks
    assert [ranks[r]["GROUP_RANK"] for r in range(4)] == ["0", "0", "1", "1"], ranks
    assert [ranks[r]["device_of_2"] for r in range(4)] == [0, 1, 0, 1], ranks
    assert [ranks[r]["device_of_4"] for r in range(4)] == [0, 1, 0, 1], ranks

    # Step 5's checkpoint, on one node of 4 processes: steps 6..10 as the uninterrupted run.
    nodes.node("one", [*ARGV, "--tp", "2", "--load", str(ckpt / "step_00000005"),
                       "--metrics", str(tmp_path / "resumed.jsonl")], nproc=4)
    nodes.finish("one", timeout=240)
    assert_same_run(metrics.read_metrics(tmp_path / "resumed.jsonl"), expected[5:])
    assert [nodes.ranks()[r]["LOCAL_RANK"] for r in range(4)] == ["0", "1", "2", "3"]


# ----------------------------------------------------------------------------
# A node dies
# ----------------------------------------------------------------------------

def steps_in(path):
    """Step records in a --metrics file being written (a last line may be cut short)."""
    try:
        with open(path) as f:
            return sum('"step":' in line for line in f)
    except FileNotFoundError:
        return 0


def test_a_dead_node_ends_the_other_nodes_ranks_with_one_line_each(nodes, tmp_path):
    timeout_s = 3
    metrics_file = tmp_path / "m.jsonl"
    two_nodes(nodes, [*ARGV, "--steps", "100000", "--log-every", "100000", "--tp", "2",
                      "--distributed-timeout-minutes", str(timeout_s / 60), "--metrics", str(metrics_file)])
    start = time.monotonic()
    while steps_in(metrics_file) < 1:  # training runs on both nodes
        assert time.monotonic() - start < 240, "no step in 240 s:\n" + nodes.output("a") + nodes.output("b")
        assert nodes.procs["a"].poll() is None and nodes.procs["b"].poll() is None, \
            nodes.output("a") + nodes.output("b")
        time.sleep(0.1)
    nodes.kill("b")
    killed = time.monotonic()
    code = nodes.procs["a"].wait(timeout=timeout_s + 120)
    waited = time.monotonic() - killed
    assert code != 0
    assert not marked(f"{nodes.test_id}:a"), "a process of node a outlived its agent"

    survivors = sorted(r for r, rec in nodes.ranks().items() if rec["node"] == "a")
    logs = nodes.worker_logs("a")
    assert len(survivors) == 2 and sorted(logs) == [0, 1], nodes.output("a")
    for local_rank, err in logs.items():
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: rank "), nodes.output("a")
        line = lines[0]
        assert line.startswith(f"error: rank {survivors[local_rank]}, step "), line
        assert ("another rank closed its connection" in line
                or "no answer from the other ranks within the timeout" in line), line
        assert "(--distributed-timeout-minutes 0.05)" in line, line
    # Far below the 10-minute default a hang would wait: the lost connection is seen at
    # once, the timeout is the bound for a peer that stops answering without closing.
    assert waited < timeout_s + 20, f"node a ended {waited:.1f} s after node b died"
    print(f"node a ended {waited:.1f} s after node b died; ranks {survivors}: {line}")
