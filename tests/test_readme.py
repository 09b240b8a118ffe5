"""Every command of the README runs, so that no example rots.

Each command of the README's ```bash blocks is run here as written, with flags appended
that make it small (`REDUCE`: two steps, the `test` preset unless the command names
another, tiny batches; a few more per command in `EXTRA`), in README order, in one working
directory, so that what one command saves the next can load. torchrun commands run on the
session's local ranks (`--nproc-per-node`, at most 4). A command that cannot run here says
why in `ELSEWHERE`: the test suite itself, GPU-only checks, a multi-node job; a benchmark
checked by another test names that test, which must exist; a benchmark that starts
processes of its own has its command line parsed only. A table entry no longer in the
README fails the test; a README command in no table runs as a train/generate/data/convert
command, or fails (bench.py needs its entry).
"""
import contextlib
import io
import os
import re
import shlex

import pytest

import bench
import convert
import data
import generate
import parallel
import train
from conftest import FAST, ROOT
from errors import UsageError

# Small: two steps of 8 x 32 tokens, no sample, one validation batch, the CPU.
REDUCE = ["--steps", "2", "--seq-len", "32", "--global-batch-size", "8", "--sample-tokens", "0",
          "--eval-batches", "1", "--peak-tflops", "1", "--device", "cpu"]
GENERATE_REDUCE = ["--max-new-tokens", "4", "--device", "cpu"]

# Flags appended after REDUCE for particular commands (the last value of a flag wins).
EXTRA = {
    "torchrun train.py --model llama --save runs/a --load runs/a --steps 400": ["--steps", "4"],
    "torchrun --nproc-per-node 4 train.py --model llama --pp 2 --vpp 2": ["--set", "n_layers=4"],
    "torchrun train.py --model llama --set n_layers=8 --set dim=512": ["--set", "dim=128"],
    "torchrun train.py --model llama --precision fp8": ["--set", "n_layers=3"],  # (its middle layer in FP8)
    "torchrun train.py --model bert --task stdlib-packages --load runs/bert --save runs/cls --lr 2e-4 "
    "--seq-len 128 --steps 300": ["--seq-len", "64"],
    # a model this size is planned (--plan: memory and time per rank), not built
    "torchrun --nproc-per-node 8 train.py --model llama --config llama3-8b --data data/prepared "
    "--tokenizer cl100k_base --set vocab_size=128256 --global-batch-size 256 --micro-batch-size 1 "
    "--seq-len 4096": ["--plan", "--world-size", "8", "--data", "stdlib", "--tokenizer", "byte",
                       "--global-batch-size", "256", "--seq-len", "4096"],
}
BENCH = {  # bench modes run here, reduced
    "python bench.py recompute": ["--config", "test", "--seq-len", "64", "--reps", "1"],
    "python bench.py generate": ["--lengths", "64", "--window", "16", "--new-tokens", "2", "--batch", "2"],
    "python bench.py plot runs/a.jsonl runs/b.jsonl -o curves.png": [],
}
# Bench modes that start processes of their own (5-20 s each here): their command lines are
# parsed (the mode and its options exist), not run.
BENCH_PARSED = ["python bench.py zero1-memory", "python bench.py sp-memory", "python bench.py pp-schedules",
                "python bench.py cp-memory", "python bench.py determinism"]
ELSEWHERE = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt && torchrun "
    "train.py --model llama": "the same training command runs below; the fresh machine is "
                              "../shared/fresh-clone-check's",
    "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements-test.txt && python "
    "-m pytest -q tests": "this test suite",
    "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-id job42 --rdzv-backend c10d --rdzv-endpoint "
    "head-node:29500 train.py --model llama --config llama3-8b ...": "two nodes",
    "python bench.py train-vs-hf": "tests/test_bench.py::test_train_vs_hf_runs_and_checks_logits",
    "python bench.py moe-ep": "tests/test_bench.py::test_moe_ep_counts_all_to_all_bytes",
    "python bench.py long-context": "tests/test_bench.py::test_long_context_measures_both_models",
    "python bench.py kernels": "tests/test_bench.py::test_kernels_runs_on_cpu",
    "python bench.py mfu": "tests/test_bench.py::test_mfu_runs_on_cpu_eager_and_compiled",
    "python bench.py fp8-gemm": "tests/test_bench.py::test_fp8_gemm_reports_the_emulation_cost_on_cpu",
    "python bench.py fp8-curve": "tests/test_bench.py::test_fp8_curve_compares_each_recipe_with_fp32",
    **{command: "parsed by test_bench_command_lines_parse" for command in BENCH_PARSED},
    "python bench.py kernels-compile":
        "tests/test_triton.py::test_every_kernel_configuration_compiles_for_ampere_and_hopper",
    "python -m pytest -m gpu tests": "a GPU",
    "bash scripts/gpu_check.sh": "a GPU",
    "bash scripts/tolerances.sh": "this test suite, five times",
    **{f"bash scripts/gpu_check.sh {mode}": "a GPU" for mode in ("mamba", "bert", "t5", "fp8", "memory")},
}


def readme_commands():
    """The commands of the README's bash blocks: continuation lines joined, comments and
    blank lines dropped, spaces collapsed."""
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(re.sub(r"(^|\s)#.*$", "", line).split())
            if line:
                commands.append(line)
    return commands


COMMANDS = readme_commands()


def test_every_readme_command_is_run_or_accounted_for():
    listed = set(EXTRA) | set(BENCH) | set(ELSEWHERE)
    runnable = {c for c in COMMANDS if c not in ELSEWHERE}
    assert not listed - set(COMMANDS), f"no longer in the README: {sorted(listed - set(COMMANDS))}"
    assert all(c.split()[0] in ("torchrun", "python") for c in runnable), runnable
    for command, where in ELSEWHERE.items():
        if "::" in where:  # that test must exist
            assert where.startswith("tests/"), where
            path, name = where.split("::")
            with open(os.path.join(ROOT, path)) as f:
                assert f"def {name}(" in f.read(), where


def test_bench_command_lines_parse():
    for command in BENCH_PARSED:
        args = bench.parse_args(shlex.split(command)[2:])
        assert args.mode == command.split()[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The README's working directory: a Hugging Face folder at path/to/hf-folder (a test
    llama's export), books/*.txt, prompts.txt."""
    root = tmp_path_factory.mktemp("readme")
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(["--model", "llama", *FAST, "--steps", "1", "--save", str(root / "seed")])
        convert.main(["export", str(root / "seed"), str(root / "path" / "to" / "hf-folder")])
    os.makedirs(root / "books")
    for name in ("a", "b"):
        (root / "books" / f"{name}.txt").write_text(f"Book {name}. " + "Once upon a time, " * 400)
    (root / "prompts.txt").write_text("def main(\nimport os\n")
    return root


def in_workdir(root, args):
    """The command's relative paths, made absolute (the local ranks have their own cwd)."""
    relative = re.compile(r"^(hf:)?((runs|data|books|path)/|prompts\.txt|curves\.png)")
    return [relative.sub(lambda m: (m[1] or "") + str(root) + "/" + m[2], a) for a in args]


def run_tool(tool, argv):
    """One rank's run of a tool's main(argv), its stdout dropped; SystemExit(0) is success."""
    main = {"train.py": train.main, "generate.py": generate.main, "data.py": data.main,
            "convert.py": convert.main, "bench.py": bench.main}[tool]
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as e:
            assert not e.code, f"{tool} {argv}: exit status {e.code}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c not in ELSEWHERE])
def test_readme_command(command, workdir, ranks, monkeypatch):
    words = shlex.split(command)
    nproc = int(words[words.index("--nproc-per-node") + 1]) if "--nproc-per-node" in words else 1
    script = next(w for w in words if w.endswith(".py"))
    args = words[words.index(script) + 1:]
    if script == "train.py":
        args += REDUCE + ([] if "--config" in args else ["--config", "test"]) + EXTRA.get(command, [])
        if "gpt2" in args:  # tiktoken downloads its encodings; without network, say so
            try:
                data.get_tokenizer("gpt2")
            except UsageError as e:
                pytest.skip(str(e))
    elif script == "generate.py":
        args += GENERATE_REDUCE
    elif script == "bench.py":  # the mode, then its options
        args = [args[0], "--device", "cpu", *args[1:], *BENCH[command]]
    args = in_workdir(workdir, args)
    monkeypatch.chdir(workdir)
    if nproc == 1 or "--plan" in args:  # (a plan needs no processes: --world-size says how many)
        run_tool(script, args)
    else:
        ranks(min(nproc, 4)).run(run_tool, tool=script, argv=args)
    assert parallel.world_size() == 1  # nothing left behind in this process
