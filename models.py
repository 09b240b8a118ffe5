"""The model registry: one record per model family (Family), looked up by name, and
building a model from a preset.

Everything the machinery must know of a family is in its record: train.py, flags.py,
memory.py, generate.py and convert.py read FAMILIES[name] and never branch on the name. A
new family is its model file and one record here (and, for `--plan`, its activation terms
in memory.py). A model file stays free of anything but its own architecture.
"""
import dataclasses
import os
import types

import torch

import bert
import data
import gpt
import llama
import mamba
import memory
import mixtral
import t5
from errors import UsageError


def tied_lm_head(cfg):
    """A tied decoder's Hugging Face file may still hold its output layer (older ones do)."""
    return {"lm_head.weight": "embed.weight"} if cfg.tie_embeddings else {}


@dataclasses.dataclass(frozen=True)
class Family:
    """What the machinery must know of a model family."""
    name: str               # --model
    file: types.ModuleType  # the model file: Config, PRESETS; Hugging Face's names (hf_name, from_hf,
                            # to_hf: each tensor) and config.json (config_from_hf, config_to_hf)
    model: type             # its nn.Module: the whole model, or one pipeline chunk of it
    planner: memory.Terms   # the activations one micro-batch saves, for --plan
    default_lr: float = 2e-3
    # tokenizer name -> the ids of the family's special tokens (BERT's [MASK], T5's
    # sentinels: data.bert_special_tokens ...), whose n_vocab the model must embed; None:
    # the tokenizer's own vocabulary
    special_tokens: object = None
    # (token windows, tokenizer, flags) -> the family's training examples (BERT's masked
    # sentence pairs, T5's corrupted spans); None: the windows, next-token prediction
    examples: object = None
    causal: bool = True         # its attention sees only the past (FLOPs: see memory.flops_per_step)
    # its forward takes each token's document and position in it (--reset-attention-mask,
    # --reset-position-ids): attention-only decoders (a Mamba scan would carry its state over)
    documents: bool = False
    decoder_len: object = None  # an encoder-decoder: seq_len -> its decoder's tokens
    # Config -> whether the residual stream stays fp32 under mixed precision whatever
    # --fp32-residual says (Mamba's residual_in_fp32, as Hugging Face's models have it)
    fp32_residual: object = lambda cfg: False
    check: object = None        # (flags, Config, tokenizer): a UsageError for flags it cannot take
    # --task: (Config, number of classes) -> the Config of a sequence classifier, and the
    # fields that change (a pre-trained checkpoint differs from its classifier only there)
    classifier: object = None
    classifier_fields: tuple = ()
    # Hugging Face (convert.py): model_type -> the transformers class export writes (or a
    # function of our Config choosing it; BERT's class depends on its heads)
    hf_classes: dict = dataclasses.field(default_factory=dict)
    hf_preset: str = ""            # `convert.py import` writes a config as overrides of this preset
    hf_reads_slices: bool = True   # from_hf is the identity: a rank reads only its region from disk
    hf_copies: object = tied_lm_head  # Config -> {HF tensor a file may hold as a copy: ours it equals}
    hf_absent_heads: object = lambda cfg: ()  # Config -> prefixes of HF heads it lacks (skipped)
    hf_stand_ins: object = lambda cfg: {}     # Config -> {HF tensor a file may lack: its stand-in}

    def hf_class(self, model_type, cfg):
        """The transformers class that export writes into config.json."""
        chosen = self.hf_classes[model_type]
        return chosen if isinstance(chosen, str) else chosen(cfg)

    @property
    def config(self):
        return self.file.Config

    @property
    def presets(self):
        return self.file.PRESETS

    def flops_per_token(self, module, seq_len):
        """Training FLOPs of `module` per (encoder) token at this sequence length."""
        return module.flops_per_token(seq_len, **({"decoder_len": self.decoder_len(seq_len)}
                                                  if self.decoder_len else {}))


def _masked_pairs(windows, tokenizer, args):
    return data.MaskedLMData(windows, tokenizer, args.mask_prob, args.whole_word_masking)


def _check_bert(args, cfg, tokenizer):
    if not 0 < args.mask_prob <= 1:
        raise UsageError(f"--mask-prob must be in (0, 1], got {args.mask_prob}: a batch "
                         f"without a masked token has nothing to learn from")


def _classifier(cfg, n_classes):
    return dataclasses.replace(cfg, mlm_head=False, binary_head=False, n_classes=n_classes)


def _decoder_len(seq_len):
    return data.span_corruption_lengths(seq_len)[1]


def _check_t5(args, cfg, tokenizer):
    tokens = data.t5_special_tokens(tokenizer)
    if cfg.decoder_start_token_id != tokens.pad:
        raise UsageError(f"the decoder starts with token {cfg.decoder_start_token_id} but the "
                         f"tokenizer's pad token is {tokens.pad}; pass --set "
                         f"decoder_start_token_id={tokens.pad}")
    if args.cp > 1:
        raise UsageError("--cp: T5 does not support context parallelism (its cross-attention "
                         "would need a ring over keys of another length); use --tp, --pp or "
                         "data parallelism")
    if args.sp and args.tp > 1 and _decoder_len(args.seq_len) % args.tp:
        raise UsageError(f"the decoder's {_decoder_len(args.seq_len)} tokens are not divisible by "
                         f"tp={args.tp}, as sequence parallelism needs; pass --no-sp")


FAMILIES = {f.name: f for f in (
    Family("llama", llama, llama.Llama, memory.LLAMA, hf_preset="llama2-7b", documents=True,
           hf_classes={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                       "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}),
    Family("gpt", gpt, gpt.GPT, memory.GPT, hf_classes={"gpt2": "GPT2LMHeadModel"}, hf_preset="gpt2", documents=True,
           hf_reads_slices=False),  # GPT-2's Conv1D weights are transposed
    Family("mixtral", mixtral, mixtral.Mixtral, memory.LLAMA, hf_preset="mixtral-8x7b", documents=True,
           hf_classes={"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                       "qwen3_moe": "Qwen3MoeForCausalLM"}),
    Family("mamba", mamba, mamba.Mamba, memory.MAMBA, fp32_residual=lambda cfg: cfg.residual_in_fp32,
           hf_preset="mamba2-130m",
           hf_classes={"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"},
           hf_reads_slices=False),  # in_proj and conv1d are reordered
    # BERT's post-LN layers sit at the unigram plateau (always guessing the commonest token)
    # at 2e-3 on the tiny preset; at 5e-4 they leave it within 100 steps.
    Family("bert", bert, bert.Bert, memory.BERT, causal=False, default_lr=5e-4,
           special_tokens=data.bert_special_tokens,
           examples=_masked_pairs, check=_check_bert, classifier=_classifier,
           classifier_fields=("mlm_head", "binary_head", "n_classes"),
           hf_classes={"bert": bert.hf_architecture, "megatron-bert": bert.hf_architecture},
           hf_preset="bert-base", hf_copies=bert.hf_copies, hf_absent_heads=bert.hf_absent_heads),
    Family("t5", t5, t5.T5, memory.T5, causal=False, special_tokens=data.t5_special_tokens,
           examples=lambda windows, tokenizer, args: data.SpanCorruptionData(windows, tokenizer),
           decoder_len=_decoder_len, check=_check_t5, hf_classes={"t5": "T5ForConditionalGeneration"},
           hf_preset="t5-base", hf_copies=t5.hf_copies, hf_absent_heads=t5.hf_absent_heads,
           hf_stand_ins=t5.hf_stand_ins),
)}


def family(name):
    """The record of the family called `name`, or a UsageError listing them."""
    if name not in FAMILIES:
        raise UsageError(f"unknown --model {name!r}; choose from {', '.join(FAMILIES)}")
    return FAMILIES[name]


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
    f = family(model)
    if preset not in f.presets:
        raise UsageError(f"unknown --config {preset!r} for {model}; choose from {', '.join(f.presets)}")
    return f.config(**{**f.presets[preset], **parse_overrides(f.config, overrides)})


def build(model, cfg, device, seed, layout=None, chunk=None):
    """Construct this rank's part of the model (its tensor-parallel shards; with a
    pipeline `chunk`, only those layers) on the meta device (no memory, no wasted random
    init), then allocate on `device` and fill with the layout-independent initialization."""
    check_layer_count(model, cfg, layout, device)
    with torch.device("meta"):
        module = family(model).model(cfg, layout, chunk)
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


# Beyond this many layers (no published model has a tenth of it) the parameter count is
# estimated from a model of one and two layers before the real one is built: building a
# typo's billion layers, even on the meta device, would run for hours.
MANY_LAYERS = 1000


def check_layer_count(model, cfg, layout, device):
    """Refuse, from an estimate, a config with more layers than the memory of all this
    job's ranks could hold (n_layers=1000000000 is a typo, not a model): the bytes of a
    one-layer model plus n_layers - 1 times what a second layer adds, over tp * pp ranks."""
    n_layers = getattr(cfg, "n_layers", 0)
    if n_layers <= MANY_LAYERS:
        return
    try:
        small = [dataclasses.replace(cfg, n_layers=n) for n in (1, 2)]
    except UsageError:  # (a config whose layers are listed: Mamba's pattern, built as given)
        return
    with torch.device("meta"):
        one, two = (sum(p.numel() * p.element_size() for p in family(model).model(c).parameters())
                    for c in small)
    shards = (layout.tp * layout.pp) if layout is not None else 1
    need = (one + (n_layers - 1) * (two - one)) / shards
    free = available_bytes(torch.device(device))
    if need > free:
        raise UsageError(f"n_layers={n_layers:,}: the parameters alone would need about {need / 1e9:,.0f} GB "
                         f"per rank, and {torch.device(device).type} has {free / 1e9:,.1f} GB free; check "
                         f"n_layers")


def name_of(model):
    """The registry name of a model built here ("llama", "mixtral", ...)."""
    return next(name for name, f in FAMILIES.items() if type(model) is f.model)


def config_from_dict(model, values):
    """Rebuild a Config saved as a dict (checkpoint meta.json). A field it lacks takes its
    default (a checkpoint written before the field existed); an unknown one is refused."""
    if model not in FAMILIES:
        raise UsageError(f"unknown model {model!r}; known: {', '.join(FAMILIES)}")
    if not isinstance(values, dict):
        raise UsageError(f"the config must be a JSON object of fields, got {values!r}")
    config = FAMILIES[model].config
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(config)})
    if unknown:
        raise UsageError(f"the {model} config has unknown field(s): {', '.join(unknown)}")
    return config(**values)
