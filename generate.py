"""Sampling with a KV cache, from a model in memory, a checkpoint or a Hugging Face folder.

    python generate.py --load runs/llama --prompt "def main(" --max-new-tokens 200
    python generate.py --load path/to/hf-model-folder --prompt "Hello"
    python generate.py --load runs/t5 --prompt "import <extra_id_0> as np"   (T5: fill spans)

The prompt is run through the model once (prefill), filling every layer's KV cache;
then each new token costs one forward pass over a single position, attending to
the cached keys and values instead of recomputing the whole prefix. An encoder-decoder
(T5) encodes the prompt once and decodes from its start token the same way, its
cross-attention keys and values computed from the encoder output once.
"""
import os
import re
import sys

import torch

import checkpoint
import convert
import data
import errors
import models
import parallel


def next_token(logits, temperature=0.8, top_k=50, generator=None):
    """(B, 1) tokens drawn from the last position's logits (B, vocab): temperature 0 is
    greedy decoding; top_k keeps only the k most likely tokens."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def sample(model, prompt_ids, max_new_tokens, temperature=0.8, top_k=50, generator=None):
    """Continue `prompt_ids` (B, T) by `max_new_tokens` tokens; returns (B, T + new)."""
    was_training = model.training
    model.eval()
    ids = prompt_ids
    caches = model.new_kv_caches(prompt_ids.shape[1] + max_new_tokens)
    logits = model(ids, kv_caches=caches)[:, -1]
    for i in range(max_new_tokens):
        next_id = next_token(logits, temperature, top_k, generator)
        ids = torch.cat([ids, next_id], dim=1)
        if i + 1 < max_new_tokens:
            logits = model(next_id, kv_caches=caches)[:, -1]
    model.train(was_training)
    return ids


@torch.no_grad()
def sample_seq2seq(model, input_ids, attention_mask, max_new_tokens, temperature=0.8, top_k=50,
                   generator=None, eos_id=None):
    """An encoder-decoder's output for `input_ids` (B, T) (attention_mask: 1 on real
    tokens, or None): the encoder runs once; the decoder starts from its start token and
    adds one token per step, its self-attention keys and values cached and the
    cross-attention's computed from the encoder output at the first step only. Returns
    (B, new) tokens; stops early once every row has produced `eos_id`."""
    was_training = model.training
    model.eval()
    memory = model.encode(input_ids, attention_mask)
    caches = model.new_caches(max_new_tokens)
    next_id = torch.full((input_ids.shape[0], 1), model.cfg.decoder_start_token_id, device=input_ids.device)
    out, finished = [], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits = model.decode(next_id, memory, attention_mask, caches)[:, -1]
        next_id = next_token(logits, temperature, top_k, generator)
        out.append(next_id)
        if eos_id is not None:
            finished |= next_id[:, 0] == eos_id
            if finished.all():
                break
    model.train(was_training)
    return torch.cat(out, dim=1)


def sample_text(model, tokenizer, prompt, max_new_tokens, temperature=0.8, top_k=50, seed=0):
    """Decode a continuation of the string `prompt` (empty: start after end-of-text)."""
    device = next(model.parameters()).device
    ids = tokenizer.encode_ordinary(prompt) if prompt else [tokenizer.eot_token]
    max_len = getattr(model.cfg, "max_seq_len", None)
    if max_len is not None:
        max_new_tokens = min(max_new_tokens, max_len - len(ids))
    generator = torch.Generator(device=device).manual_seed(seed)
    out = sample(model, torch.tensor([ids], device=device), max_new_tokens, temperature, top_k,
                 generator)
    new = [t for t in out[0, len(ids):].tolist() if t < tokenizer.n_vocab]
    return prompt + tokenizer.decode(new)


SENTINEL = re.compile(r"<extra_id_(\d+)>")


def encode_with_sentinels(text, tokenizer_name):
    """Token ids of `text` in which "<extra_id_N>" marks the N-th missing span (T5's
    sentinels), ending with end-of-sequence, as the encoder saw them in training."""
    tokenizer, tokens = data.get_tokenizer(tokenizer_name), data.t5_special_tokens(tokenizer_name)
    ids = []
    for i, piece in enumerate(SENTINEL.split(text)):
        if i % 2 == 0:
            ids += tokenizer.encode_ordinary(piece) if piece else []
        elif int(piece) < len(tokens.sentinels):
            ids.append(tokens.sentinels[int(piece)])
        else:
            raise parallel.UsageError(f"<extra_id_{piece}>: the tokenizer has "
                                      f"{len(tokens.sentinels)} sentinels (0 to {len(tokens.sentinels) - 1})")
    return ids + [tokens.eos]


def fill_spans_text(model, tokenizer_name, text, max_new_tokens, temperature=0.8, top_k=50, seed=0):
    """T5: the model's text for the spans that "<extra_id_N>" marks in `text` (each
    sentinel followed by the span the model proposes), up to end-of-sequence."""
    device = next(model.parameters()).device
    tokens = data.t5_special_tokens(tokenizer_name)
    ids = torch.tensor([encode_with_sentinels(text, tokenizer_name)], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = sample_seq2seq(model, ids, None, max_new_tokens, temperature, top_k, generator, tokens.eos)
    new = out[0].tolist()
    new = new[:new.index(tokens.eos)] if tokens.eos in new else new
    return data.get_tokenizer(tokenizer_name).decode(new)


def load_model(path, device="cpu"):
    """Model and tokenizer name from a checkpoint (a step directory or a save root), or
    from a Hugging Face model folder (config.json + safetensors, see convert.py)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return convert.from_hf(path, device), convert.tokenizer_name(path)
    step_dir = checkpoint.resolve(path)
    meta = checkpoint.read_meta(step_dir)
    cfg = models.config_from_dict(meta["model"], meta["config"])
    model = models.build(meta["model"], cfg, torch.device(device), seed=0)
    checkpoint.load(step_dir, model, None, parallel.Layout(device=torch.device(device)))
    return model, meta["tokenizer"]


def check_device(name):
    """--device: cpu, or cuda[:N] where such a GPU is visible."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise parallel.UsageError(f"--device {name}: not a device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise parallel.UsageError(f"--device {name}: no CUDA device is visible; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise parallel.UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA "
                                  f"device(s) are visible")
    if device.type not in ("cpu", "cuda"):
        raise parallel.UsageError(f"--device {name}: generate.py runs on cpu or cuda")


def check_prompt_fits(model, tokenizer, prompt):
    """A prompt must leave room in a model's context for a new token. (A sliding-window
    model attends to the last window only, so its context is not bounded like that.)"""
    max_len = getattr(model.cfg, "max_seq_len", None)
    if max_len is None or getattr(model.cfg, "sliding_window", 0):
        return
    n = len(tokenizer.encode_ordinary(prompt)) if prompt else 1  # (or the end-of-text token)
    if n >= max_len:
        raise parallel.UsageError(f"--prompt is {n:,} tokens but the model's context is "
                                  f"max_seq_len={max_len:,} tokens; shorten the prompt to at most "
                                  f"{max_len - 1:,} tokens to leave room for new ones")


def main(argv=None):
    p = errors.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True,
                   help="checkpoint (a save root or one step directory) or Hugging Face model folder")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        for flag in ("max_new_tokens", "temperature", "top_k"):
            errors.require_number(f"--{flag.replace('_', '-')}", getattr(args, flag), at_least=0)
        check_device(args.device)
        model, tokenizer_name = load_model(args.load, args.device)
        if not hasattr(model, "new_kv_caches") and not hasattr(model, "encode"):
            raise parallel.UsageError(f"{args.load} holds an encoder ({type(model).__name__}): it "
                                      f"predicts masked tokens and classes, it does not generate "
                                      f"text; generate.py samples causal models (gpt, llama, "
                                      f"mixtral, mamba)")
        if hasattr(model, "encode"):  # an encoder-decoder (T5): fill the marked spans
            if not args.prompt:
                raise parallel.UsageError("T5 completes text with missing spans: pass a --prompt "
                                          "with <extra_id_0>, <extra_id_1>, ... where spans are missing")
            print(fill_spans_text(model, tokenizer_name, args.prompt, args.max_new_tokens,
                                  args.temperature, args.top_k, args.seed))
            return
        tokenizer = data.get_tokenizer(tokenizer_name)
        check_prompt_fits(model, tokenizer, args.prompt)
        print(sample_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                          args.top_k, args.seed))
    except parallel.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
