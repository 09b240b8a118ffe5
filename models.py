"""The model registry: names -> model files, and building a model from a preset.

train.py, generate.py and bench.py build models through here, so that a model file
stays free of anything but its own architecture.
"""
import dataclasses

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


def name_of(model):
    """The registry name of a model built here ("llama", "mixtral", ...)."""
    return next(name for name, (_, _, cls) in MODELS.items() if type(model) is cls)


def config_from_dict(model, values):
    """Rebuild a Config saved as a dict (checkpoint meta.json)."""
    return MODELS[model][0](**values)
