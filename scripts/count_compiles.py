"""How many Triton compilations a command would make on a GPU, counted on the CPU.

    python scripts/count_compiles.py -m pytest -q tests/test_triton.py
    python scripts/count_compiles.py train.py --model llama --config tiny --steps 2 ...

runs the command (a module with -m, else a script) in this process under Triton's
interpreter, with every kernel launch recorded, and prints on stderr, at exit, one line:

    compiles: 57 (_attn_fwd_kernel 12, _attn_bwd_dq_kernel 12, ...)

On a GPU, Triton compiles a kernel once for each distinct specialization it is launched
with, and caches it in the process: the values of its constexpr arguments (the autotuned
configuration included, with num_warps and num_stages), the dtype of each tensor argument,
and for each integer argument whether it is 1, a multiple of 16, or neither (Triton
specializes on those, to drop a stride or vectorize a load). The interpreter launches the
same kernels with the same arguments, so counting distinct keys of that kind counts the
compilations, for one configuration per kernel (KERNELS_AUTOTUNE=first; the interpreter's
own configuration stands in for the GPU's first). Autotuning everything multiplies each
count by the length of that GPU's list (kernels._autotune). The shapes matter only through
the constexprs and the multiples of 16, so a command at a test size counts the compiles
of the same command at full size when those agree (same head dim, dtype and masks).
scripts/gpu_check.sh sets each step's time limit from these counts.
"""
import atexit
import collections
import os
import runpy
import sys


def specialization(fn, args, kwargs):
    """The part of a launch that picks the compiled binary (see the module docstring)."""
    import inspect

    import torch
    import triton.language as tl

    params = inspect.signature(fn).parameters
    bound = dict(zip(params, args)) | kwargs
    key = []
    for name, value in sorted(bound.items()):
        param = params.get(name)
        constexpr = param is not None and param.annotation in (tl.constexpr, "tl.constexpr")
        if constexpr or param is None:  # configuration values arrive as keywords (num_warps too)
            key.append((name, repr(value)))
        elif isinstance(value, torch.Tensor):
            key.append((name, str(value.dtype)))
        elif isinstance(value, bool) or not isinstance(value, int):
            key.append((name, type(value).__name__))
        else:
            key.append((name, "1" if value == 1 else "16k" if value % 16 == 0 else "int"))
    return tuple(key)


def main():
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 else 2)
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    from triton.runtime.interpreter import InterpretedFunction

    seen = collections.defaultdict(set)
    launch = InterpretedFunction.run

    def recording_launch(self, *args, grid, warmup, **kwargs):
        seen[self.fn.__name__].add(specialization(self.fn, args, kwargs))
        return launch(self, *args, grid=grid, warmup=warmup, **kwargs)
    InterpretedFunction.run = recording_launch

    def report():
        per_kernel = sorted(((len(keys), name) for name, keys in seen.items()), reverse=True)
        detail = ", ".join(f"{name} {n}" for n, name in per_kernel)
        print(f"compiles: {sum(n for n, _ in per_kernel)}" + (f" ({detail})" if detail else ""),
              file=sys.stderr)
    atexit.register(report)

    if sys.argv[1] == "-m":
        sys.argv = sys.argv[2:]
        sys.path.insert(0, os.getcwd())  # as `python -m` does
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
        runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
