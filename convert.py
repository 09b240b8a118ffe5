"""Hugging Face import and export.

    python convert.py import HF_DIR CKPT_DIR     # a HF model folder -> one of our checkpoints
    python convert.py export CKPT_DIR HF_DIR     # one of our checkpoints -> a HF model folder

In Python, `convert.from_hf(path)` returns a model whose forward, called like the HF
model's (`input_ids`, optional `attention_mask`; BERT also `token_type_ids`), returns the
same logits (BERT: a dict of its heads' logits, see bert.Bert.forward; T5 also takes
`decoder_input_ids`, or `labels` to shift right, as T5ForConditionalGeneration does).

A Hugging Face folder is config.json plus safetensors weights (one `model.safetensors`,
or shards listed in `model.safetensors.index.json`). Conversion is two translations, both
in each model file's Hugging Face section:

  1. the config: `config_from_hf(hf, model_type)` and `config_to_hf(cfg)`, HF's
     config.json <-> our Config. A setting our model cannot reproduce (a bias on o_proj, a
     RoPE scaling other than LLaMA 3.1's, another activation) is refused, never ignored;
  2. the tensors: `hf_name(name, cfg)` names our parameter's HF tensor, `from_hf(name,
     tensor, cfg)` puts it in our layout and `to_hf(name, tensor, cfg)` back.

The family's record (models.FAMILIES, section 1 here) says the rest: the HF model types it
covers and the class written for each, the tensors a file may hold as copies of others
(tied), the heads a file may hold that the config does not use, the tensors a file may lack.

Import streams (section 2). The model is built first, only this rank's part of it (its
tensor-parallel shards; a pipeline stage would simply have fewer parameters); then each
parameter is filled with exactly the region of the global tensor it holds
(`parallel.global_region`). safetensors reads a region without reading the rest
(`get_slice`), so a tp rank of a LLaMA reads 1/tp of each sharded matrix. GPT-2's
tensors are transposed on the way in, so there a rank reads that one tensor whole and
keeps its slice. Nothing is ever unpickled (no `torch.load`).

Both directions write into a temporary sibling of the target and rename it into place
last (section 3): a failure leaves the target as it was, and a non-empty target is never
overwritten.
"""
import dataclasses
import json
import os
import shlex
import shutil
import sys

import torch
from safetensors import SafetensorError, safe_open

import checkpoint
import data
import errors
import models
import parallel
from errors import UsageError

# ----------------------------------------------------------------------------
# 1. Families: each model family's record (models.FAMILIES) says how it converts
# ----------------------------------------------------------------------------

BY_HF_TYPE = {model_type: f for f in models.FAMILIES.values() for model_type in f.hf_classes}


def family_of(model):
    """The record of a model built by models.build."""
    family = models.FAMILIES[models.name_of(model)]
    if not family.hf_classes:
        raise UsageError(f"{type(model).__name__} has no Hugging Face conversion")
    return family


# ----------------------------------------------------------------------------
# 2. Import: read config.json, stream each parameter's region from safetensors
# ----------------------------------------------------------------------------

# Buffers that old transformers versions saved with the weights: not parameters.
OLD_BUFFERS = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias", "embeddings.position_ids")


class _HFTensors:
    """The tensors of a HF folder by name, across one or several safetensors files.
    Every file is opened up front, so a missing or truncated shard fails before any work."""

    def __init__(self, hf_dir):
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    listing = json.load(f)
            except (OSError, ValueError) as e:
                raise UsageError(f"cannot read {index} ({e}); the folder is damaged") from None
            self.where = errors.check_json(listing, index, {"weight_map": dict}, required=("weight_map",))["weight_map"]
            errors.check_json(self.where, f"{index} (weight_map)", dict.fromkeys(self.where, str))
        elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
            self.where = None
        else:
            raise UsageError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json "
                             f"(only safetensors weights are read; pickled .bin files never are)")
        self.files = {}
        names = ["model.safetensors"] if self.where is None else sorted(set(self.where.values()))
        for name in names:
            path = errors.path_inside(hf_dir, name, os.path.basename(index))
            if not os.path.isfile(path):
                raise UsageError(f"{path} is missing (listed in {os.path.basename(index)})")
            try:
                self.files[name] = safe_open(path, framework="pt")
            except (OSError, SafetensorError) as e:
                raise UsageError(f"cannot read {path} ({e}); is it truncated or damaged?") from None
        if self.where is None:
            self.where = {key: "model.safetensors" for key in self.files["model.safetensors"].keys()}
        self.views = {}
        self._split_fused_experts(hf_dir)

    def _split_fused_experts(self, hf_dir):
        """Mixtral and Qwen-MoE files name one tensor per expert (Mixtral's
        `block_sparse_moe.experts.5.w1.weight`, Qwen's `mlp.experts.5.gate_proj.weight`);
        transformers 5 holds them fused in memory and writes them fused only when asked
        (save_original_format=False): `mlp.experts.gate_up_proj` (experts, 2 * ffn, dim, gate
        rows then up rows), `mlp.experts.down_proj` (experts, dim, ffn), the router
        `mlp.gate.weight`. Such tensors are listed under the per-expert names of the
        family config.json names: {name: (fused name, expert, rows)}."""
        fused = [k for k in self.where
                 if k.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))]
        if not fused:
            return
        with open(os.path.join(hf_dir, "config.json")) as f:
            mixtral_names = json.load(f).get("model_type") == "mixtral"
        names = {"gate": "w1", "up": "w3", "down": "w2"} if mixtral_names else \
            {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
        routers = [k for k in self.where if k.endswith(".mlp.gate.weight")] if mixtral_names else []
        for key in fused + routers:  # (a Qwen router keeps its name)
            layer, _, kind = key.partition(".mlp.")
            moe = f"{layer}.block_sparse_moe." if mixtral_names else f"{layer}.mlp."
            shape = self.files[self.where[key]].get_slice(key).get_shape()
            if kind == "gate.weight":
                views = {moe + kind: (key, None, None)}
            elif kind == "experts.down_proj":
                views = {f"{moe}experts.{e}.{names['down']}.weight": (key, e, None) for e in range(shape[0])}
            else:
                ffn = shape[1] // 2
                views = {f"{moe}experts.{e}.{names[w]}.weight": (key, e, rows) for e in range(shape[0])
                         for w, rows in (("gate", (0, ffn)), ("up", (ffn, 2 * ffn)))}
            for name, view in views.items():
                self.views[name], self.where[name] = view, self.where[key]
            del self.where[key]

    def find(self, key):
        """`key`, or the older names that transformers also reads: without the base-model
        prefix ("transformer.", "model.", "bert."; files saved from the base model, GPT-2's
        own), and LayerNorm's TensorFlow names gamma and beta (BERT's own files)."""
        old = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        names = (key, key.partition(".")[2], old, old.partition(".")[2])
        return next((k for k in names if k in self.where), None)

    def get_slice(self, key):
        try:
            if key in self.views:
                return _ExpertView(self.files[self.where[key]].get_slice(self.views[key][0]),
                                   *self.views[key][1:])
            return self.files[self.where[key]].get_slice(key)
        except SafetensorError as e:
            raise UsageError(f"cannot read tensor {key} from {self.where[key]} ({e})") from None


class _ExpertView:
    """One expert's tensor (and rows) inside a fused tensor, read like a safetensors slice."""

    def __init__(self, fused, expert, rows):
        self.fused, self.expert, self.rows = fused, expert, rows

    def get_shape(self):
        shape = self.fused.get_shape()[0 if self.expert is None else 1:]
        return [self.rows[1] - self.rows[0], *shape[1:]] if self.rows else shape

    def __getitem__(self, region):
        if self.expert is None:
            return self.fused[region]
        rows, *rest = region if isinstance(region, tuple) else (region,)
        if self.rows:  # a region of w1 or w3: the same rows shifted within gate_up_proj
            start, stop, _ = rows.indices(self.rows[1] - self.rows[0])
            rows = slice(self.rows[0] + start, self.rows[0] + stop)
        return self.fused[(slice(self.expert, self.expert + 1), rows, *rest)][0]


# config.json keys that are sizes in some family (a positive integer where present, or null),
# checked before a translation computes with them (hidden_size // num_attention_heads).
HF_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "n_embd", "n_layer", "n_head", "d_model", "num_heads", "d_kv",
            "d_ff", "num_layers", "state_size", "max_position_embeddings", "n_positions")


def read_hf_config(hf_dir):
    """(our model name, Config) from HF_DIR/config.json."""
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except OSError:
        raise UsageError(f"{hf_dir} has no config.json: not a Hugging Face model folder") from None
    except ValueError as e:
        raise UsageError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise UsageError(f"{path} is not a JSON object of config fields")
    model_type = hf.get("model_type")
    if model_type not in BY_HF_TYPE:
        raise UsageError(f"{path}: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(sorted(BY_HF_TYPE))}")
    for key in HF_SIZES:  # before a translation divides by one
        value = hf.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UsageError(f"{path}: {key}={value!r} must be a positive integer; the folder's "
                             f"config.json is damaged")
    family = BY_HF_TYPE[model_type]
    try:
        return family.name, family.file.config_from_hf(hf, model_type)
    except KeyError as e:
        raise UsageError(f"{path} has no {e.args[0]!r}, which a {model_type} config needs") from None
    except UsageError as e:  # our Config refused a value, named by our field's name
        raise UsageError(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:  # e.g. float("fast") for a RoPE field
        raise UsageError(f"{path}: a value has the wrong type ({e}); the folder's config.json is "
                         f"damaged") from None


@torch.no_grad()
def load_hf_weights(model, hf_dir):
    """Fill every parameter of `model` (from models.build, under any layout) with its
    region of the HF folder's tensors. Returns the model."""
    family, tensors = family_of(model), _HFTensors(hf_dir)
    module, used, stand_ins = family.file, set(), family.hf_stand_ins(model.cfg)
    for ours, param in model.named_parameters():
        name = module.hf_name(ours, model.cfg)
        key = tensors.find(name)
        if key is None and name in stand_ins:
            key = tensors.find(stand_ins[name])
        if key is None:
            raise UsageError(f"{hf_dir} has no tensor {name} (our {ours}); the "
                             f"weights do not match config.json")
        shape, offset, extent = parallel.global_region(param)
        expected = list(module.to_hf(ours, torch.empty(shape, device="meta"), model.cfg).shape)
        hf_slice = tensors.get_slice(key)
        if list(hf_slice.get_shape()) != expected:
            raise UsageError(f"{key} has shape {list(hf_slice.get_shape())} in {hf_dir}, but "
                             f"config.json implies {expected}")
        region = tuple(slice(o, o + n) for o, n in zip(offset, extent))
        if family.hf_reads_slices:
            piece = hf_slice[region]  # reads this rank's region only
        else:
            piece = module.from_hf(ours, hf_slice[:], model.cfg)[region]
        if not torch.isfinite(piece).all():
            raise UsageError(f"{key} in {hf_dir} holds non-finite values (inf/nan); refusing to "
                             f"import weights that cannot train")
        param.zero_()  # vocabulary padding past the global tensor stays zero
        param[tuple(slice(0, n) for n in extent)] = piece.to(param.dtype)
        used.add(key)
    # The whole model (no pipeline stage, no expert shard): every tensor must find a place,
    # but for tied copies and the heads the config does not use.
    if getattr(model.layout, "pp", 1) == 1 and getattr(model.layout, "ep", 1) == 1:
        copies, absent = family.hf_copies(model.cfg), family.hf_absent_heads(model.cfg)
        extra = sorted(k for k in tensors.where if k not in used and k not in copies
                       and not k.endswith(OLD_BUFFERS) and not k.startswith(absent))
        if extra:
            raise UsageError(f"{hf_dir} holds {len(extra)} tensor(s) our {family.name} model has no place "
                             f"for ({', '.join(extra[:3])}...); config.json does not describe them")
        params = dict(model.named_parameters())
        for copy in (c for c in copies if c in tensors.where):  # a stored copy must be a copy (as in HF)
            param = params[copies[copy]]
            _, offset, extent = parallel.global_region(param)
            stored = tensors.get_slice(copy)[tuple(slice(o, o + n) for o, n in zip(offset, extent))]
            if not torch.equal(stored.to(param.dtype), param[tuple(slice(0, n) for n in extent)]):
                raise UsageError(f"{hf_dir}: config.json ties {copy} to "
                                 f"{module.hf_name(copies[copy], model.cfg)}, but {copy} differs from "
                                 f"it; set tie_word_embeddings false")
    return model


def from_hf(path, device="cpu"):
    """A one-process model (eval mode) with the weights of the HF folder `path`."""
    name, cfg = read_hf_config(path)
    model = models.build(name, cfg, torch.device(device), seed=0)
    return load_hf_weights(model, path).eval()


def has_tokenizer(hf_dir):
    return os.path.isfile(os.path.join(hf_dir, "tokenizer.json"))


def tokenizer_name(hf_dir):
    """The data.get_tokenizer name for a HF folder: its tokenizer.json, else bytes."""
    if has_tokenizer(hf_dir):
        return data.HF_PREFIX + os.path.abspath(hf_dir)
    return data.BYTE_TOKENIZER


# ----------------------------------------------------------------------------
# 3. Writing: atomic target directories, import into a checkpoint, export
# ----------------------------------------------------------------------------


def _check_target(target):
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise UsageError(f"{target} already exists and is not empty: refusing to overwrite it; "
                         f"choose another directory")


def _write_atomically(target, write):
    """write(tmp) into a temporary sibling of `target`, then rename it to `target`."""
    _check_target(target)
    tmp = f"{os.path.abspath(target).rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise UsageError(f"{target}: cannot create it ({e.strerror}); choose another directory") from None
    try:
        write(tmp)
        os.replace(tmp, target)  # also replaces an empty directory
    except (OSError, checkpoint.SaveFailed) as e:  # a full disk, ...: the target is as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"cannot write {target} ({checkpoint.write_failure(getattr(e, 'error', e))}); "
                         f"nothing was written; free space or choose another directory") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def import_hf(hf_dir, ckpt_dir):
    """HF folder -> a checkpoint root that `train.py --load CKPT_DIR` resumes (step 0, fresh
    AdamW moments). Returns (its step directory, the model)."""
    _check_target(ckpt_dir)
    model = from_hf(hf_dir).train()
    layout = parallel.Layout()
    ddp = parallel.DataParallel(model, layout)
    optimizer = parallel.AdamW(ddp, lr=0.0, weight_decay=0.0)
    tokenizer = tokenizer_name(hf_dir)
    meta = {"model": family_of(model).name, "config": dataclasses.asdict(model.cfg),
            "tokenizer": tokenizer, "tokenizer_fingerprint": data.tokenizer_fingerprint(tokenizer),
            "tokens_seen": 0, "optimizer_steps": 0, "seed": 0,
            "loss_scale": 65536.0, "loss_scale_clean_steps": 0}  # as train.py writes them
    _write_atomically(ckpt_dir, lambda tmp: checkpoint.save(tmp, 0, model, optimizer, layout, meta,
                                                            files=data.tokenizer_files(tokenizer)))
    ddp.close()  # the model goes back to the caller without gradient hooks
    return os.path.join(ckpt_dir, checkpoint.step_dir_name(0)), model


def export_model(model, hf_dir, tokenizer=None):
    """Write a one-process model as a HF folder: config.json + model.safetensors (fp32),
    and with `tokenizer` (a data.get_tokenizer name) its files and end-of-text id: an
    hf:DIR tokenizer's own files, a tiktoken encoding's (ours: byte) as a tokenizer.json
    that encodes the same (data.tokenizer_json). Returns the transformers class."""
    family = family_of(model)
    if model.layout.tp > 1 or model.layout.pp > 1 or model.layout.ep > 1:
        raise UsageError("export needs the whole model: build it with parallel.Layout() "
                         "(checkpoint.load reassembles the shards)")
    model_type, fields = family.file.config_to_hf(model.cfg)
    architecture = family.hf_class(model_type, model.cfg)
    enc = data.get_tokenizer(tokenizer) if tokenizer else None  # (a moved hf:DIR: one line, not a silent loss)
    eos_token_id = enc.eot_token if enc is not None and enc.eot_token < model.cfg.vocab_size else None
    config = {"architectures": [architecture], "model_type": model_type,
              "bos_token_id": None, "eos_token_id": eos_token_id, "pad_token_id": None,
              **fields, "torch_dtype": "float32", "dtype": "float32"}  # fields may set a pad token
    # Copies (contiguous, unshared): parameters may be views of one flat training buffer.
    # A tied model has no parameter for its output layer (lm_head, BERT's decoder): none is written.
    module = family.file
    tensors = {module.hf_name(n, model.cfg): module.to_hf(n, p.detach().cpu().float(), model.cfg)
               .contiguous().clone() for n, p in model.named_parameters()}
    broken = next((name for name, t in tensors.items() if not torch.isfinite(t).all()), None)
    if broken is not None:
        raise UsageError(f"{broken} holds non-finite values (inf/nan); refusing to export weights "
                         f"that cannot be used")

    def write(tmp):
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        checkpoint.write_safetensors(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if isinstance(enc, data.HFTokenizer):
            for file in data.TOKENIZER_FILES:
                if os.path.isfile(os.path.join(enc.directory, file)):
                    shutil.copy(os.path.join(enc.directory, file), tmp)
        elif enc is not None:
            with open(os.path.join(tmp, "tokenizer.json"), "w") as f:
                json.dump(data.tokenizer_json(enc), f, ensure_ascii=False)
            eot = next(s for s, i in enc._special_tokens.items() if i == enc.eot_token)
            with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
                json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eot,
                           "model_max_length": getattr(model.cfg, "max_seq_len", None), "encoding": enc.name}, f,
                          indent=2)
    _write_atomically(hf_dir, write)
    return architecture


def export(ckpt, hf_dir):
    """One of our checkpoints (a save root or a step directory) -> a HF folder."""
    step_dir = checkpoint.resolve(ckpt)
    meta = checkpoint.read_meta(step_dir)
    _check_target(hf_dir)
    cfg = models.config_from_dict(meta["model"], meta["config"])
    model = models.build(meta["model"], cfg, "cpu", 0)
    checkpoint.load(step_dir, model, None, parallel.Layout())  # reassembles tp shards
    return step_dir, export_model(model, hf_dir, checkpoint.tokenizer(step_dir, meta))


def main(argv=None):
    p = errors.ArgumentParser(description="Hugging Face import/export.")
    commands = p.add_subparsers(dest="command", required=True)
    c = commands.add_parser("import", help="HF model folder -> checkpoint root for train.py --load")
    c.add_argument("hf_dir", help="a Hugging Face model folder (config.json, safetensors)")
    c.add_argument("ckpt_dir", help="the checkpoint root to write (must not exist, or be empty)")
    c = commands.add_parser("export", help="checkpoint (save root or step dir) -> HF model folder")
    c.add_argument("ckpt_dir", help="one of our checkpoints: a save root (its newest step) or a step")
    c.add_argument("hf_dir", help="the Hugging Face folder to write (must not exist, or be empty)")
    args = p.parse_args(argv)
    try:
        if args.command == "import":
            step_dir, model = import_hf(args.hf_dir, args.ckpt_dir)
            name, n = family_of(model).name, sum(p.numel() for p in model.parameters())
            # (the checkpoint records the model, its config and the tokenizer: nothing to retype)
            note = "" if has_tokenizer(args.hf_dir) else (" (the folder has no tokenizer.json: the byte tokenizer "
                                                          "is recorded; train with --tokenizer for another)")
            print(f"imported {args.hf_dir} ({name}, {n / 1e6:.2f}M parameters) into {step_dir}{note}; "
                  f"train with: python train.py {shlex.join(['--load', args.ckpt_dir])}")
        else:
            step_dir, architecture = export(args.ckpt_dir, args.hf_dir)
            print(f"exported {step_dir} to {args.hf_dir} ({architecture}: "
                  f"config.json + model.safetensors)")
    except UsageError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
