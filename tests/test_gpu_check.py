"""scripts/gpu_check.sh, dry: every mode's steps run on the CPU (Triton's interpreter,
test-size models, a few selected tests: GPU_CHECK_DRY_RUN=1) and write the files a GPU run
writes, so that the plumbing a GPU lent for minutes depends on has run before it does.

Checked per mode: every step passes; what comes back is at most 8 files, at most 2 folders
below $OUT; summary.txt has the versions and one line per step with its limit, and the
limits add up to the mode's budget (8 minutes for the general checks, 5 for each other
mode); train.jsonl has each run's records; each bench.py JSON file is complete.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

BUDGET_S = {"general": 480, "t5": 300, "mamba": 300, "bert": 300, "fp8": 300, "memory": 300, "mfu": 300}


@pytest.mark.parametrize("mode", list(BUDGET_S))
def test_dry_run_writes_what_a_gpu_run_writes(tmp_path, mode):
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_DRY_RUN": "1", "OMP_NUM_THREADS": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}  # its python3: ours
    env.pop("KERNELS_BACKEND", None)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", mode], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = [os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert len(files) <= 8 and all(f.count(os.sep) <= 2 for f in files), files
    summary = (tmp_path / mode / "summary.txt").read_text()
    assert re.search(r"^python 3\.\S+ \| torch \S+ \| triton \S+ \| pytest \S+ \| pytest-xdist \S+ \| "
                     r"pytest-timeout \S+", summary, re.M), summary
    steps = re.findall(r"^step: (\S+) +(\S+(?: \(\d+\))?) +(\d+) s of +(\d+) s$", summary, re.M)
    assert steps and all(verdict == "pass" for _, verdict, _, _ in steps), summary
    assert sum(int(limit) for *_, limit in steps) <= BUDGET_S[mode], summary
    assert summary.rstrip().endswith("\n".join(proc.stdout.rstrip().split("\n")[-len(steps):]))
    names = [name for name, *_ in steps]
    runs = [name for name in names if f"== {name} " in (tmp_path / mode / "train.log").read_text()] \
        if (tmp_path / mode / "train.log").exists() else []
    if runs:
        records = [json.loads(line) for line in (tmp_path / mode / "train.jsonl").read_text().splitlines()]
        assert sum("step" not in r for r in records) == len(runs)  # one header per run
        assert all(r["loss"] > 0 for r in records if "step" in r)
    for name in names:
        if (tmp_path / mode / f"{name}.json").exists():
            assert json.loads((tmp_path / mode / f"{name}.json").read_text())["complete"]


def test_a_step_that_fails_or_overruns_is_recorded_and_the_next_one_runs(tmp_path):
    """The script's `step` (taken from it as written): a failing command is `fail (status)`,
    one past its limit is killed (SIGTERM, and SIGKILL 10 s later, 2 s here, if it ignores that, as
    train.py does while it saves) and is `timeout`; the steps after it still run."""
    with open(os.path.join(ROOT, "scripts", "gpu_check.sh")) as f:
        step_function = re.search(r"^step\(\) \{.*?^\}$", f.read(), re.M | re.S)[0]
    script = "\n".join([
        f"out={tmp_path}; summary=$out/summary.txt; lines=(); kill_after=2", step_function,
        "step fails 5 a.log python3 -c 'raise SystemExit(3)'",
        "step ignores-sigterm 1 a.log python3 -c \"import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)\"",
        "step passes 5 a.log true"])
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    verdicts = re.findall(r"^step: (\S+) +(\S+(?: \(\d+\))?) +(\d+) s", (tmp_path / "summary.txt").read_text(),
                          re.M)
    assert [(name, verdict) for name, verdict, _ in verdicts] == [
        ("fails", "fail (3)"), ("ignores-sigterm", "timeout"), ("passes", "pass")], proc.stdout + proc.stderr
    assert int(verdicts[1][2]) <= 5  # 1 s, then SIGKILL 2 s after the SIGTERM


def test_count_compiles_counts_distinct_specializations(tmp_path):
    """scripts/count_compiles.py: a launch repeated is one compile; another dtype, or a size
    that stops being a multiple of 16, is another (as Triton specializes)."""
    script = tmp_path / "launch.py"
    script.write_text(
        "import os, torch, kernels\n"
        "os.environ['KERNELS_BACKEND'] = 'triton'\n"
        "w = torch.ones(64)\n"
        "for rows, dtype in [(32, torch.float32), (32, torch.float32), (32, torch.float16), (33, torch.float32)]:\n"
        "    kernels.rmsnorm(torch.randn(rows, 64, dtype=dtype), w.to(dtype), 1e-5)\n")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "count_compiles.py"), str(script)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "compiles: 3 (_rmsnorm_fwd_kernel 3)", proc.stderr[-2000:]
