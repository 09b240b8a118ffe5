"""Every command of the README and of docs/ runs and produces what it should, so that no
example rots.

Each command of the ```bash blocks of README.md and docs/*.md (together "the README" below)
is run here as written, with flags appended that make it small (`REDUCE`: two steps, the `test` preset unless the command names
another, tiny batches; a few more per command in `EXTRA`), each in a working directory of
its own: what it reads that another README command makes (`--load runs/a`, `--data
data/stdlib-byte`, ...) is made once per session by running that command, reduced, and
copied in, so every case stands alone and in any order. Each then checks its output: the
steps trained, the checkpoint and metrics saved, the text generated, the files written.
torchrun commands run on the session's local ranks (`--nproc-per-node`, at most 4). A
command that cannot run here says why in `ELSEWHERE`: the test suite itself, GPU-only
checks, a multi-node job; a benchmark checked by another test names that test, which must
exist; a benchmark that starts processes of its own has its command line parsed only. A
table entry no longer in the README fails the test; a README command in no table runs as a
train/generate/data/convert command, or fails (bench.py needs its entry).
"""
import contextlib
import io
import json
import os
import re
import shlex
import shutil

import pytest

import bench
import checkpoint
import convert
import data
import generate
import metrics
import parallel
import parity
import train
from conftest import FAST, ROOT
from errors import UsageError

# Small: two steps of 8 x 32 tokens, no sample, one validation batch, the CPU.
REDUCE = ["--steps", "2", "--seq-len", "32", "--global-batch-size", "8", "--sample-tokens", "0",
          "--eval-batches", "1", "--peak-tflops", "1", "--device", "cpu"]
GENERATE_REDUCE = ["--max-new-tokens", "4", "--device", "cpu"]

# Flags appended after REDUCE for particular commands (the last value of a flag wins).
EXTRA = {
    "torchrun train.py --model llama --save runs/a --save-every 50 --metrics runs/a.jsonl": ["--save-every", "1"],
    "torchrun train.py --model llama --save runs/a --load runs/a --steps 400": ["--steps", "4"],
    "python parity.py --replay-step 37 --metrics runs/a.jsonl": ["--replay-step", "2"],  # (from step 1's checkpoint)
    "torchrun --nproc-per-node 4 train.py --model llama --load runs/a --tp 2 --pp 2 --save runs/c --steps 400":
        ["--steps", "4"],
    # planned at its own sizes (a plan builds nothing)
    "python train.py --model llama --config llama3-70b --tp 8 --pp 4 --world-size 64 --seq-len 8192 "
    "--global-batch-size 64 --micro-batch-size 1 --precision bf16 --plan --device-memory-gb 80":
        ["--seq-len", "8192", "--global-batch-size", "64"],
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
    "python bench.py megatron-memory": [],
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
    "-m pytest -q -n 2 tests": "this test suite",
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
    "bash scripts/tolerances.sh": "this test suite, five times",
    **{f"bash scripts/gpu_check.sh{mode}": "tests/test_gpu_check.py::test_dry_run_writes_what_a_gpu_run_writes"  # (dry)
       for mode in ("", " mamba", " bert", " t5", " fp8", " memory", " mfu")},
}


PAGES = ["README.md", *sorted(os.path.join("docs", p) for p in os.listdir(os.path.join(ROOT, "docs"))
                            if p.endswith(".md"))]


def readme_commands():
    """The commands of the bash blocks of every page, each once: continuation lines joined,
    comments and blank lines dropped, spaces collapsed."""
    blocks = []
    for page in PAGES:
        with open(os.path.join(ROOT, page)) as f:
            blocks += re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(re.sub(r"(^|\s)#.*$", "", line).split())
            if line and line not in commands:
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


# Inputs the README assumes are there: a Hugging Face folder (a test llama's export),
# books/*.txt, prompts.txt.
GIVEN = ("path/to/hf-folder", "books", "prompts.txt", "pairs.jsonl")


@pytest.fixture(scope="session")
def given(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme-given")
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(["--model", "llama", *FAST, "--steps", "1", "--save", str(root / "seed")])
        convert.main(["export", str(root / "seed"), str(root / "path" / "to" / "hf-folder")])
    os.makedirs(root / "books")
    for name in ("a", "b"):
        (root / "books" / f"{name}.txt").write_text(f"Book {name}. " + "Once upon a time, " * 400)
    (root / "prompts.txt").write_text("def main(\nimport os\n")
    (root / "pairs.jsonl").write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "response": f" {i + 1}"}) + "\n"
                                              for i in range(40)))
    return root


def words_of(command):
    """(processes, script, its arguments as written)."""
    words = shlex.split(command)
    nproc = int(words[words.index("--nproc-per-node") + 1]) if "--nproc-per-node" in words else 1
    script = next(w for w in words if w.endswith(".py"))
    return nproc, script, words[words.index(script) + 1:]


def flag(args, name):
    """The last value of a flag (as argparse takes it), or None."""
    values = [args[i + 1] for i, a in enumerate(args[:-1]) if a == name]
    return values[-1] if values else None


def reads_and_writes(command):
    """(paths the command reads, paths it writes), relative to its working directory."""
    script, args = reduced(command)
    reads, writes = set(), set()
    if script == "convert.py":
        (reads if args[0] == "export" else set()).add(args[1])
        writes.add(args[2])
    elif script == "data.py" and args[0] == "inspect":
        reads.add(args[1])
    elif script == "data.py":  # a folder of shards, or a Megatron dataset's two files
        writes.update(megatron_files(args[2]) if "megatron" in args else [args[2]])
    elif script == "bench.py" and args[0] == "plot":
        reads.update(a for a in args[1:] if a.endswith(".jsonl"))
        writes.add(flag(args, "-o"))
    for name in ("--load", "--prompts-file"):
        if flag(args, name):
            reads.add(flag(args, name).removeprefix("hf:"))
    if "--data" in args:  # (the last) a source, or a blend: WEIGHT SOURCE ...
        after = args[len(args) - args[::-1].index("--data"):]
        sources = after[:next((i for i, a in enumerate(after) if a.startswith("--")), len(after))]
        reads.update(s for s in sources if not re.fullmatch(r"[\d.]+", s))
    for name in ("--save", "--metrics"):
        if flag(args, name):
            (reads if script == "parity.py" else writes).add(flag(args, name))
    reads = {file for r in reads for file in (megatron_files(r) if r in MEGATRON_PREFIXES else [r])}
    return {r for r in reads if not r.startswith(("stdlib", "books/"))}, writes


def megatron_files(prefix):
    return [prefix + ".bin", prefix + ".idx"]


# Megatron datasets the README prepares: named by a prefix, they are two files
MEGATRON_PREFIXES = {shlex.split(c)[4] for c in COMMANDS if c.startswith("python data.py prepare") and "megatron" in c}


def maker_of(path):
    """The README command that makes `path` (from nothing that it would itself make)."""
    for command in COMMANDS:
        if command not in ELSEWHERE:
            reads, writes = reads_and_writes(command)
            if path in writes and path not in reads:
                return command
    raise AssertionError(f"no README command makes {path}")


class Made:
    """What README commands made this session: path -> the working directory holding it."""

    def __init__(self, given, tmp_path_factory):
        self.given, self.tmp, self.where = given, tmp_path_factory, {}

    def workdir(self, command, ranks):
        """A fresh working directory with the given inputs and everything `command` reads."""
        root = self.tmp.mktemp("readme")
        for path in GIVEN:
            copy(self.given / path, root / path)
        for path in reads_and_writes(command)[0] - set(GIVEN):
            if path not in self.where:
                maker = maker_of(path)
                made_in = self.workdir(maker, ranks)
                run_command(maker, made_in, ranks)
                self.where.update(dict.fromkeys(reads_and_writes(maker)[1], made_in))
            copy(self.where[path] / path, root / path)
        return root


def copy(source, target):
    os.makedirs(target.parent, exist_ok=True)
    (shutil.copytree if source.is_dir() else shutil.copy)(source, target)


@pytest.fixture(scope="session")
def made(given, tmp_path_factory):
    return Made(given, tmp_path_factory)


def in_workdir(root, args):
    """The command's relative paths, made absolute (the local ranks have their own cwd)."""
    relative = re.compile(r"^(hf:)?((runs|data|books|path)/|prompts\.txt|pairs\.jsonl|curves\.png)")
    return [relative.sub(lambda m: (m[1] or "") + str(root) + "/" + m[2], a) for a in args]


def run_tool(tool, argv):
    """One rank's run of a tool's main(argv): its stdout; SystemExit(0) is success."""
    main = {"train.py": train.main, "generate.py": generate.main, "data.py": data.main,
            "convert.py": convert.main, "bench.py": bench.main, "parity.py": parity.main}[tool]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as e:
            assert not e.code, f"{tool} {argv}: exit status {e.code}"
    return out.getvalue()


def reduced(command):
    """The command's script and arguments, made small (see the module docstring)."""
    _, script, args = words_of(command)
    if script == "train.py":
        args = args + REDUCE + ([] if "--config" in args else ["--config", "test"]) + EXTRA.get(command, [])
    elif script == "generate.py":
        args = args + GENERATE_REDUCE
    elif script == "parity.py":
        args = args + EXTRA.get(command, [])
    elif script == "bench.py":  # the mode, then its options
        args = [args[0], "--device", "cpu", *args[1:], *BENCH[command]]
    return script, args


def run_command(command, root, ranks):
    """Run the reduced command in `root` as the README's user would; rank 0's stdout."""
    nproc = words_of(command)[0]
    script, args = reduced(command)
    args = in_workdir(root, args)
    with contextlib.chdir(root):
        if nproc == 1 or "--plan" in args:  # (a plan needs no processes: --world-size says how many)
            out = run_tool(script, args)
        else:
            out = ranks(min(nproc, 4)).run(run_tool, tool=script, argv=args)[0]
    assert parallel.world_size() == 1  # nothing left behind in this process
    return out


def check_output(command, root, out):
    """What the command must have produced in `root`, and printed."""
    script, args = reduced(command)
    _, writes = reads_and_writes(command)
    if script == "train.py" and "--plan" in args:
        assert "peak" in out and "FLOPs per step" in out, out
    elif script == "train.py":
        steps = int(flag(args, "--steps"))  # trained to the last step, and said so
        assert re.search(rf"^step +{steps}/{steps} \| loss \d", out, re.M) and "done: " in out, out[-2000:]
        if flag(args, "--save"):
            assert steps in checkpoint.complete_steps(root / flag(args, "--save")), out[-2000:]
        if flag(args, "--metrics"):
            recorded = [r["step"] for r in metrics.read_metrics(root / flag(args, "--metrics"))]
            assert recorded == list(range(recorded[0], steps + 1)), recorded
    elif script == "generate.py":
        prompts = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--prompt"]
        if flag(args, "--prompts-file"):
            prompts += (root / flag(args, "--prompts-file")).read_text().splitlines()
        if "<extra_id_0>" in " ".join(prompts):  # T5 prints the spans it fills in, one line
            assert out.endswith("\n") and out.count("\n") == 1, out
        else:
            assert all(p.encode().decode("unicode_escape") in out for p in prompts), (prompts, out)
    elif script == "data.py" and args[0] == "inspect":
        assert re.search(r"^\S+: .* \d+ documents, .* tokens", out) and "first document: " in out, out
    elif script == "data.py" and "megatron" in args:
        assert data.IndexedDataset(str(root / args[2])).n_documents > 1 and "prepared" in out, out
    elif script == "data.py":
        meta = json.loads((root / args[2] / "meta.json").read_text())
        assert meta["train"] and meta["val"] and f"prepared {root / args[2]}" in out, out
    elif script == "convert.py" and args[0] == "import":
        assert checkpoint.complete_steps(root / args[2]), out
    elif script == "convert.py":
        assert {"config.json", "model.safetensors"} <= set(os.listdir(root / args[2])), out
    elif script == "parity.py" and "--replay-step" in args:
        assert re.search(r"^step \d+ replayed at world size 1 .*\n  loss .* recorded ", out), out
    elif script == "parity.py":
        assert "\nno departure: " in out, out
    elif args[0] == "plot":
        assert (root / flag(args, "-o")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:  # the other benchmarks print a table
        assert len(out.splitlines()) >= 3, out
    for path in writes:
        assert (root / path).exists(), path


@pytest.mark.parametrize("command", [c for c in COMMANDS if c not in ELSEWHERE])
def test_readme_command(command, made, ranks):
    _, script, args = words_of(command)
    if script == "train.py" and "gpt2" in args:  # tiktoken downloads its encodings; without network, say so
        try:
            data.get_tokenizer("gpt2")
        except UsageError as e:
            pytest.skip(str(e))
    root = made.workdir(command, ranks)
    check_output(command, root, run_command(command, root, ranks))
