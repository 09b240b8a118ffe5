"""Sampling with a KV cache, from a model in memory, a checkpoint or a Hugging Face folder.

    python generate.py --load runs/llama --prompt "def main(" --max-new-tokens 200
    python generate.py --load path/to/hf-model-folder --prompt "Hello"

The prompt is run through the model once (prefill), filling every layer's KV cache;
then each new token costs one forward pass over a single position, attending to
the cached keys and values instead of recomputing the whole prefix.
"""
import argparse
import os
import sys

import torch

import checkpoint
import convert
import data
import models
import parallel


@torch.no_grad()
def sample(model, prompt_ids, max_new_tokens, temperature=0.8, top_k=50, generator=None):
    """Continue `prompt_ids` (B, T) by `max_new_tokens` tokens; returns (B, T + new).

    temperature 0 is greedy decoding; top_k keeps only the k most likely tokens."""
    was_training = model.training
    model.eval()
    ids = prompt_ids
    caches = model.new_kv_caches(prompt_ids.shape[1] + max_new_tokens)
    logits = model(ids, kv_caches=caches)[:, -1]
    for i in range(max_new_tokens):
        if temperature == 0:
            next_id = logits.argmax(-1, keepdim=True)
        else:
            logits = logits.float() / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(logits.softmax(-1), 1, generator=generator)
        ids = torch.cat([ids, next_id], dim=1)
        if i + 1 < max_new_tokens:
            logits = model(next_id, kv_caches=caches)[:, -1]
    model.train(was_training)
    return ids


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
            if getattr(args, flag) < 0:
                raise parallel.UsageError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
        model, tokenizer_name = load_model(args.load, args.device)
        if not hasattr(model, "new_kv_caches"):
            raise parallel.UsageError(f"{args.load} holds an encoder ({type(model).__name__}): it "
                                      f"predicts masked tokens and classes, it does not generate "
                                      f"text; generate.py samples causal models (gpt, llama, "
                                      f"mixtral, mamba)")
        tokenizer = data.get_tokenizer(tokenizer_name)
        print(sample_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                          args.top_k, args.seed))
    except parallel.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
