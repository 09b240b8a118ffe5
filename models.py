"""The model registry: names -> model files, and building a model from a preset.

train.py, generate.py and bench.py build models through here, so that a model file
stays free of anything but its own architecture.
"""
import dataclasses
import os

import torch

import bert
import gpt
import llama
import mamba
import mixtral
import t5
from errors import UsageError

# name -> (Config class, presets, model class)
MODELS = {
    "llama": (llama.Config, llama.PRESETS, llama.Llama),
    "gpt": (gpt.Config, gpt.PRESETS, gpt.GPT),
    "mixtral": (mixtral.Config, mixtral.PRESETS, mixtral.Mixtral),
    "mamba": (mamba.Config, mamba.PRESETS, mamba.Mamba),
    "bert": (bert.Config, bert.PRESETS, bert.Bert),
    "t5": (t5.Config, t5.PRESETS, t5.T5),
}


def parse_overrides(config_cls, pairs):
    """`--set key=value` pairs -> typed keyword arguments of `config_cls`."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--set {pair}: expected key=value")
        if key not in fields:
            raise UsageError(f"--set {key}: not a config field; fields are {', '.join(fields)}")
        kind = type(fields[key].default)
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise UsageError(f"--set {key}={value}: expected true or false")
            overrides[key] = value.lower() in ("true", "1")
        else:
            try:
                overrides[key] = kind(value)
            except ValueError:
                raise UsageError(f"--set {key}={value}: expected a {kind.__name__}") from None
    return overrides


def make_config(model, preset, overrides=()):
    """The Config of `model` for `preset`, with `--set key=value` overrides."""
    if model not in MODELS:
        raise UsageError(f"unknown --model {model!r}; choose from {', '.join(MODELS)}")
    config_cls, presets, _ = MODELS[model]
    if preset not in presets:
        raise UsageError(f"unknown --config {preset!r} for {model}; choose from {', '.join(presets)}")
    return config_cls(**{**presets[preset], **parse_overrides(config_cls, overrides)})


def build(model, cfg, device, seed, layout=None, chunk=None):
    """Construct this rank's part of the model (its tensor-parallel shards; with a
    pipeline `chunk`, only those layers) on the meta device (no memory, no wasted random
    init), then allocate on `device` and fill with the layout-independent initialization."""
    with torch.device("meta"):
        module = MODELS[model][2](cfg, layout, chunk)
    check_fits(module, cfg, device)
    # Allocating makes new Parameter objects: carry over what the parallel layers recorded
    # on them (where each shard sits in its global tensor, which gradients are partial).
    marks = {name: dict(vars(p)) for name, p in module.named_parameters()}
    # What Module.to_empty does, but with torch.empty: empty_like of a meta tensor takes
    # torch's Python reference path, whose first call imports sympy (~0.7 s per process).
    module._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    for name, p in module.named_parameters():
        vars(p).update(marks[name])
    module.init_weights(seed)
    return module


def available_bytes(device):
    """Memory free for new tensors on `device`: the GPU's free memory, or the host's
    available memory (MemAvailable: free plus what the page cache would give back)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):  # not Linux: the physical memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(module, cfg, device):
    """Refuse, before allocating, a model whose parameters alone exceed the memory free on
    `device` (a typo such as vocab_size=10000000000 would otherwise die in the allocator, or
    in the kernel's OOM killer once the pages are touched). `module` is on the meta device.
    train.py --plan says what a real run needs beyond the parameters."""
    device = torch.device(device)
    need = sum(p.numel() * p.element_size() for p in module.parameters())
    free = available_bytes(device)
    if need > free:
        embedding = cfg.vocab_size * cfg.dim * 4  # fp32, as every parameter
        raise UsageError(f"the model's parameters need {need / 1e9:,.1f} GB (the embedding alone, "
                         f"vocab_size x dim = {cfg.vocab_size:,} x {cfg.dim:,}, {embedding / 1e9:,.1f} "
                         f"GB) but {device.type} has {free / 1e9:,.1f} GB free; check vocab_size, dim "
                         f"and n_layers, or shard the model (--tp, --pp)")


def name_of(model):
    """The registry name of a model built here ("llama", "mixtral", ...)."""
    return next(name for name, (_, _, cls) in MODELS.items() if type(model) is cls)


def config_from_dict(model, values):
    """Rebuild a Config saved as a dict (checkpoint meta.json). A field it lacks takes its
    default (a checkpoint written before the field existed); an unknown one is refused."""
    if model not in MODELS:
        raise UsageError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    if not isinstance(values, dict):
        raise UsageError(f"the config must be a JSON object of fields, got {values!r}")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(MODELS[model][0])})
    if unknown:
        raise UsageError(f"the {model} config has unknown field(s): {', '.join(unknown)}")
    return MODELS[model][0](**values)
