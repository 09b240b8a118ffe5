"""The one error type meant for the user, and the checks every tool shares that raise it.

Its own file so that anything can raise it (data.py, checkpoint.py, the model files) without
importing the parallel machinery or the Triton kernels.
"""
import argparse
import contextlib
import dataclasses
import math
import os


class UsageError(ValueError):
    """Bad input from the user (flags, paths, layouts, damaged files). train.py, convert.py
    and generate.py print its message as one line, `error: ...`, and exit with status 2,
    instead of a traceback."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default said once: argparse's, but not where the help says
    it already, nor a default of None or an empty list (which say nothing)."""

    def _get_help_string(self, action):
        if "(default" in (action.help or "") or action.default is None or action.default == []:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad flag is one line, `error: ...`, exit status 2, like every
    other bad input (argparse's own prints the whole usage first); --help shows the defaults
    (HelpFormatter), also of sub-commands' flags."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def path_inside(folder, name, what):
    """folder/name, refused (a UsageError naming `what`, the file that listed it) unless it
    lies inside `folder` once every symbolic link on the way is resolved: a damaged or
    planted index may name "../x", an absolute path, or a link to a file elsewhere."""
    path = os.path.join(folder, name) if isinstance(name, str) and name else None
    root = os.path.realpath(folder)
    if path is None or os.path.isabs(name) or not os.path.realpath(path).startswith(root + os.sep):
        raise UsageError(f"{what} names the file {name!r}, which lies outside {folder} (or is a link "
                         f"out of it); the file is damaged or not ours")
    return path


def unsupported_hf(model_type, what):
    """A Hugging Face config.json setting our model cannot reproduce: refused, never ignored."""
    raise UsageError(f"{model_type} config: {what} is not supported by our model; refusing to "
                     f"convert rather than compute something else")


def require_number(what, value, at_least=None, above=None, at_most=None):
    """`what` (a flag or a config field, named as the user writes it) must be a finite number,
    >= at_least, > above and <= at_most where given: NaN or inf would train nothing useful,
    silently, and a count beyond any sensible one would fail deep inside (an allocation, an
    overflow) or run for ever."""
    if not math.isfinite(value):
        raise UsageError(f"{what} must be a finite number, got {value}")
    if at_least is not None and value < at_least:
        raise UsageError(f"{what} must be >= {at_least}, got {value}")
    if above is not None and value <= above:
        raise UsageError(f"{what} must be > {above}, got {value}")
    if at_most is not None and value > at_most:
        raise UsageError(f"{what} must be <= {at_most:,}, got {value:,}")


def check_config_fields(cfg):
    """Every field of a model's Config (a dataclass) has its declared kind and a usable value,
    wherever it came from (a preset, --set, a checkpoint's meta.json, a HF config.json), before
    anything divides by it or allocates with it. Numbers are finite (inf only where the default
    is: Mamba's dt_limit_max) and never negative; an integer field whose default is not 0 is a
    size or a count, >= 1 (a default of 0 means "derive it" or "off", so there 0 is allowed)."""
    for field in dataclasses.fields(cfg):
        value, default, kind = getattr(cfg, field.name), field.default, type(field.default)
        what = f"config field {field.name}"
        if kind not in _FIELD_KINDS:
            continue
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, _FIELD_KINDS[kind]):
            raise UsageError(f"{what} must be of type {kind.__name__}, got {value!r}")
        if kind in (int, float) and not value == default == math.inf:
            require_number(what, value, at_least=1 if kind is int and default else 0)


# A field's kind (its default's type) -> the values it takes: a float field takes an integer
# too (config.json files write rope_theta 10000 as often as 10000.0).
_FIELD_KINDS = {bool: (bool,), str: (str,), int: (int,), float: (int, float)}


def check_json(value, where, fields=None, required=()):
    """A JSON object read from a file that anyone may have edited (a checkpoint's
    meta.json, a prepared folder's, a Hugging Face index): a dict whose `fields` (name -> a
    type or a tuple of types), where present, have that type (a bool is not a number), and
    which holds every name of `required`; else a one-line UsageError naming the file and
    the field (`where` None: the caller's message names the file). Returns the value."""
    at = f"{where}: " if where else ""
    if not isinstance(value, dict):
        raise UsageError(f"{where or 'the file'} is not a JSON object; the file is damaged or not ours")
    for name, kinds in (fields or {}).items():
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if name not in value:
            if name in required:
                raise UsageError(f"{at}the field {name!r} is missing; the file is damaged or not ours")
            continue
        if not isinstance(value[name], kinds) or (isinstance(value[name], bool) and bool not in kinds):
            expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise UsageError(f"{at}the field {name!r} must be {expected}, got {value[name]!r:.60}; "
                             f"the file is damaged or not ours")
    return value


class Stopped(BaseException):
    """A stop signal (SIGTERM, SIGINT, SIGUSR1) outside a training loop, which notes them
    itself (train.StopSignals): raised where the program was, so that it unwinds cleanly
    (files closed, process groups destroyed) and its tool says so in one line and exits 0.
    A BaseException, as KeyboardInterrupt is: no `except Exception` swallows it."""

    SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self):
        import signal
        return signal.Signals(self.signum).name


@contextlib.contextmanager
def stop_on_signals():
    """While inside, a stop signal raises Stopped where the process is (the main thread's
    handlers; elsewhere nothing changes); the handlers before are back afterwards. A tool's
    main runs inside; the training loop installs its own handlers while it runs and puts
    these back."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stopped(signum)
    previous = {name: signal.signal(getattr(signal, name), stop) for name in Stopped.SIGNALS}
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
