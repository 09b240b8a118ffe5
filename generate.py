"""Sampling with a KV cache, from a model in memory, a checkpoint or a Hugging Face folder.

    python generate.py --load runs/llama --prompt "def main(" --max-new-tokens 200
    python generate.py --load runs/llama --prompt "def " --prompt "class " --stop "\n\n"
    python generate.py --load runs/llama --prompts-file prompts.txt --temperature 0
    python generate.py --load hf:path/to/hf-model-folder --prompt "Hello"
    torchrun --nproc-per-node 2 generate.py --load runs/llama --tp 2 --prompt "Hello"
    python generate.py --load runs/t5 --prompt "import <extra_id_0> as np"   (T5: fill spans)

The prompts are run through the model once (prefill), filling every layer's KV cache;
then each new token costs one forward pass over a single position, attending to the
cached keys and values instead of recomputing the whole prefix. Several prompts decode
as one batch: left-padded to the longest, with a padding mask that the caches keep for
every cached key and each row's own positions, so that each row gets the logits it
would get alone; a row that reaches end-of-text, a --stop string or the token limit
leaves the batch (and its rows of the caches). A sliding-window model (Mistral) keeps a
rolling cache bounded by its window (kernels.KVCache). Under torchrun with --tp (and
--ep for Mixtral) each rank holds and loads only its shard; the logits are gathered
over the vocabulary and every rank samples the same token from the same seeded
generator, so the text is the one-process text. An encoder-decoder (T5) encodes the
prompt once and decodes from its start token the same way, its cross-attention keys and
values computed from the encoder output once.

From Python: generate(model, tokenizer, prompts, max_new_tokens, temperature, top_k,
stop, seed) -> texts; load_model(path) -> (model, tokenizer name).
"""
import os
import re
import sys
import time

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
    # Shifted to a maximum of 0 before the division: a tiny temperature then sends the
    # others to -inf (greedy in the limit), never the largest to inf (inf - inf: NaN).
    logits = logits.float()
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def sample_batch(model, prompts, max_new_tokens, temperature=0.8, top_k=50, generator=None,
                 finished=None):
    """New token ids for each prompt (lists of token ids, of any lengths), decoded as one
    batch of a causal model. The prompts are left-padded to the longest; the padding mask
    goes to the caches, which keep it for every cached key, and each row gets its own
    positions (counting from its first real token), so each row's logits are those it
    gets alone. `finished(i, new_ids)`, called after each token of prompt i, says
    whether that row is done (end-of-text, a stop string): it leaves the batch and the
    caches, costing nothing more. Returns a list of lists."""
    out = [[] for _ in prompts]
    if max_new_tokens <= 0:
        return out
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    real = torch.zeros(len(prompts), longest, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p, device=device)
        real[i, longest - len(p):] = True
    positions = (real.cumsum(1) - 1).clamp(min=0)
    caches = model.new_kv_caches(longest + max_new_tokens)
    mask = None if bool(real.all()) else real  # none needed: the models' unmasked fast path
    logits = model(ids, attention_mask=mask, kv_caches=caches, positions=positions)[:, -1]
    rows = list(range(len(prompts)))  # the prompt of each row of the batch
    for step in range(max_new_tokens):
        next_ids = next_token(logits, temperature, top_k, generator)
        done = []
        for i, token in zip(rows, next_ids[:, 0].tolist()):
            out[i].append(token)
            done.append(finished is not None and finished(i, out[i]))
        if all(done) or step + 1 == max_new_tokens:
            break
        if any(done):  # finished rows leave the batch
            keep = torch.tensor([r for r, d in enumerate(done) if not d], device=device)
            rows = [i for i, d in zip(rows, done) if not d]
            next_ids, positions = next_ids[keep], positions[keep]
            for cache in caches:
                if cache is not None:
                    cache.keep_rows(keep)
        positions = positions[:, -1:] + 1
        logits = model(next_ids, kv_caches=caches, positions=positions)[:, -1]
    model.train(was_training)
    return out


def sample(model, prompt_ids, max_new_tokens, temperature=0.8, top_k=50, generator=None):
    """Continue `prompt_ids` (B, T) by `max_new_tokens` tokens; returns (B, T + new)."""
    new = sample_batch(model, prompt_ids.tolist(), max_new_tokens, temperature, top_k, generator)
    return torch.cat([prompt_ids, torch.tensor(new, dtype=prompt_ids.dtype, device=prompt_ids.device)], 1)


def generate(model, tokenizer, prompts, max_new_tokens=200, temperature=0.8, top_k=50, stop=(), seed=0,
             stream=None, stats=None):
    """Each prompt (a string; "" starts after end-of-text) with its continuation, all
    decoded as one batch (sample_batch). A row ends at end-of-text, before the first of
    the `stop` strings, or after max_new_tokens (fewer where a model without a sliding
    window runs out of context). `stream(text)` receives the first prompt's continuation
    piece by piece as it is decoded: complete characters only (a multi-byte character
    split over tokens waits for its last byte), and none that could still turn out to
    begin a stop string. `stats` (a dict), if given, gets "new_tokens": how many tokens
    were sampled in all."""
    device = next(model.parameters()).device
    prompt_ids = [tokenizer.encode_ordinary(p) if p else [tokenizer.eot_token] for p in prompts]
    max_len = getattr(model.cfg, "max_seq_len", None)
    if max_len is not None and not getattr(model.cfg, "sliding_window", 0):
        max_new_tokens = min(max_new_tokens, max_len - max(len(p) for p in prompt_ids))
    texts, shown = [""] * len(prompts), 0  # shown: characters of texts[0] streamed so far
    hold = max((len(s) for s in stop), default=1) - 1

    def finished(i, new_ids):
        nonlocal shown
        ended = new_ids[-1] == tokenizer.eot_token
        text = tokenizer.decode([t for t in new_ids[:len(new_ids) - ended] if t < tokenizer.n_vocab])
        cut = min((j for j in (text.find(s) for s in stop) if j >= 0), default=-1)
        done = ended or cut >= 0 or len(new_ids) == max_new_tokens
        texts[i] = text[:cut] if cut >= 0 else text
        if stream is not None and i == 0:
            ready = texts[0] if done else texts[0].rstrip("\ufffd")  # (an incomplete character)
            ready = ready if done else ready[:max(len(ready) - hold, 0)]
            if len(ready) > shown:
                stream(ready[shown:])
                shown = len(ready)
        return done

    generator = torch.Generator(device=device).manual_seed(seed)
    new = sample_batch(model, prompt_ids, max_new_tokens, temperature, top_k, generator, finished)
    if stats is not None:
        stats["new_tokens"] = sum(len(n) for n in new)
    return [p + t for p, t in zip(prompts, texts)]


def sample_text(model, tokenizer, prompt, max_new_tokens, temperature=0.8, top_k=50, seed=0):
    """Decode a continuation of the string `prompt` (empty: start after end-of-text)."""
    return generate(model, tokenizer, [prompt], max_new_tokens, temperature, top_k, seed=seed)[0]


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
    return torch.cat(out, dim=1) if out else input_ids.new_zeros(input_ids.shape[0], 0)


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
            raise errors.UsageError(f"<extra_id_{piece}>: the tokenizer has "
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


def model_source(path):
    """(model name, Config, tokenizer name, load) for a checkpoint (a step directory or a
    save root) or a Hugging Face model folder (plain, or hf:DIR as train.py's --load
    takes it; tokenizer None when it holds no tokenizer.json); load(model, layout) fills a
    built model (this rank's shards only)."""
    hf_dir = path[len("hf:"):] if path.startswith("hf:") else path
    if path.startswith("hf:") or os.path.isfile(os.path.join(path, "config.json")):
        name, cfg = convert.read_hf_config(hf_dir)
        tokenizer = convert.tokenizer_name(hf_dir) if convert.has_tokenizer(hf_dir) else None
        return name, cfg, tokenizer, lambda model, layout: convert.load_hf_weights(model, hf_dir)
    step_dir = checkpoint.resolve(path)
    meta = checkpoint.read_meta(step_dir)
    cfg = models.config_from_dict(meta["model"], meta["config"])
    return (meta["model"], cfg, checkpoint.tokenizer(step_dir, meta),
            lambda model, layout: checkpoint.load(step_dir, model, None, layout))


def load_model(path, device="cpu", layout=None):
    """Model (eval mode; under `layout`, this rank's tp/ep shard) and tokenizer name, from
    a checkpoint or a Hugging Face folder (see model_source)."""
    layout = layout or parallel.Layout(device=torch.device(device))
    name, cfg, tokenizer_name, load = model_source(path)
    model = models.build(name, cfg, layout.device, seed=0, layout=layout)
    load(model, layout)
    return model.eval(), tokenizer_name


def decoding_layout(args, name, cfg):
    """This rank's Layout for --tp/--ep (tp x ep processes, ep sharding Mixtral's experts
    over ranks that decode the same batch), checked before any process group is made:
    a shard must divide the model (built on the meta device, which allocates nothing),
    and the job must have one process per shard. Sequence parallelism stays off: a
    decoding step's single token cannot be split over ranks."""
    for flag in ("pp", "cp"):
        if getattr(args, flag) != 1:
            raise errors.UsageError(f"--{flag} {getattr(args, flag)}: generate.py shards a model with --tp "
                                      f"(and --ep) only; decoding one token at a time leaves nothing to "
                                      f"split over pipeline stages or sequence chunks")
    errors.require_number("--tp", args.tp, at_least=1)
    errors.require_number("--ep", args.ep, at_least=1)
    if args.ep > 1 and not hasattr(cfg, "n_experts"):
        raise errors.UsageError(f"--ep {args.ep}: expert parallelism needs a mixture of experts "
                                  f"(mixtral), not {name}")
    with torch.device("meta"):
        models.family(name).model(cfg, parallel.Layout(tp=args.tp, dp=args.ep, ep=args.ep))
    world = parallel.world_size()
    if world != args.tp * args.ep:
        raise errors.UsageError(f"--tp {args.tp} --ep {args.ep} needs {args.tp * args.ep} processes "
                                  f"(one per shard) but this job has {world}: launch torchrun "
                                  f"--nproc-per-node {args.tp * args.ep} generate.py ...")
    return parallel.init_distributed(tp=args.tp, ep=args.ep, sp=False, device=args.device)


def read_prompts(args):
    """The --prompt strings, then the lines of --prompts-file; [""] (start after
    end-of-text) when neither is given."""
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f]
        except UnicodeDecodeError as e:
            raise errors.UsageError(f"--prompts-file {args.prompts_file} is not UTF-8 text (byte "
                                    f"{e.object[e.start]:#04x} at offset {e.start}); save it as UTF-8") from None
        except OSError as e:
            raise errors.UsageError(f"--prompts-file {args.prompts_file}: cannot read it "
                                      f"({e.strerror})") from None
        lines = [line for line in lines if line.strip()]
        if not lines:
            raise errors.UsageError(f"--prompts-file {args.prompts_file} has no prompts: write one "
                                      f"prompt per line")
        prompts += lines
    return prompts or [""]


def check_device(name):
    """--device: cpu, or cuda[:N] where such a GPU is visible."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise errors.UsageError(f"--device {name}: not a device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise errors.UsageError(f"--device {name}: no CUDA device is visible; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise errors.UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA "
                                  f"device(s) are visible")
    if device.type not in ("cpu", "cuda"):
        raise errors.UsageError(f"--device {name}: generate.py runs on cpu or cuda")


def check_prompt_fits(model, tokenizer, prompt):
    """A prompt must leave room in a model's context for a new token. (A sliding-window
    model attends to the last window only, so its context is not bounded like that.)"""
    max_len = getattr(model.cfg, "max_seq_len", None)
    if max_len is None or getattr(model.cfg, "sliding_window", 0):
        return
    n = len(tokenizer.encode_ordinary(prompt)) if prompt else 1  # (or the end-of-text token)
    if n >= max_len:
        raise errors.UsageError(f"--prompt is {n:,} tokens but the model's context is "
                                  f"max_seq_len={max_len:,} tokens; shorten the prompt to at most "
                                  f"{max_len - 1:,} tokens to leave room for new ones")


def unescape(text):
    """The escapes people type in a shell argument (\\n, \\t, \\\\), as the characters they
    mean: `--stop "\\n\\n"` reaches us as backslash-n twice."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m[1]], text)


def main(argv=None):
    p = errors.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="checkpoint (a save root or one step directory), or "
                   "Hugging Face model folder (DIR or hf:DIR)")
    p.add_argument("--prompt", action="append", help="a prompt; repeat for several (one batch)")
    p.add_argument("--prompts-file", metavar="FILE", help="more prompts, one per line")
    p.add_argument("--tokenizer", default=None,
                   help="byte, gpt2, cl100k_base, o200k_base or hf:DIR (default: the one the checkpoint "
                        "records, or the folder's tokenizer.json): for a folder without one, or a "
                        "tokenizer folder that moved")
    p.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="end a continuation before this string (repeatable; \\n, \\t and \\\\ as typed "
                        "mean a newline, a tab and a backslash); end-of-text always ends it")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to add to each prompt, at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest (0: all)")
    p.add_argument("--seed", type=int, default=0, help="the sampling's random numbers (the same on every rank)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel shards (torchrun, one process each)")
    p.add_argument("--ep", type=int, default=1, help="Mixtral: expert-parallel shards (x tp processes)")
    p.add_argument("--pp", type=int, default=1, help="must be 1 (decoding splits no layers)")
    p.add_argument("--cp", type=int, default=1, help="must be 1 (decoding splits no sequence)")
    args = p.parse_args(argv)
    with errors.stop_on_signals():
        _main(args)


def _main(args):
    layout = None
    try:
        for flag in ("max_new_tokens", "temperature", "top_k"):
            errors.require_number(f"--{flag.replace('_', '-')}", getattr(args, flag), at_least=0)
        args.stop = [unescape(s) for s in args.stop]
        if "" in args.stop:
            raise errors.UsageError("--stop '': a stop string needs at least one character")
        check_device(args.device)
        prompts = read_prompts(args)
        name, cfg, _, _ = model_source(args.load)
        layout = decoding_layout(args, name, cfg)
        model, tokenizer_name = load_model(args.load, layout=layout)
        tokenizer_name = args.tokenizer or tokenizer_name
        if tokenizer_name is None:
            raise errors.UsageError(f"{args.load} holds no tokenizer (tokenizer.json): pass --tokenizer, "
                                    f"the one the model was trained with")
        if not hasattr(model, "new_kv_caches") and not hasattr(model, "encode"):
            raise errors.UsageError(f"{args.load} holds an encoder ({type(model).__name__}): it "
                                      f"predicts masked tokens and classes, it does not generate "
                                      f"text; generate.py samples causal models (gpt, llama, "
                                      f"mixtral, mamba)")
        if hasattr(model, "encode"):  # an encoder-decoder (T5): fill the marked spans
            if not args.prompt or len(prompts) > 1 or layout.world > 1:
                raise errors.UsageError("T5 completes one text with missing spans, in one process: "
                                          "pass one --prompt with <extra_id_0>, <extra_id_1>, ... "
                                          "where spans are missing (and no --tp)")
            print(fill_spans_text(model, tokenizer_name, prompts[0], args.max_new_tokens,
                                  args.temperature, args.top_k, args.seed))
            return
        tokenizer = data.get_tokenizer(tokenizer_name)
        for prompt in prompts:
            check_prompt_fits(model, tokenizer, prompt)
        print_here = layout.rank == 0  # every rank decodes the same text; one prints it

        def stream(piece):
            print(piece, end="", flush=True)
        if print_here and len(prompts) == 1:  # one prompt: its text appears as it is decoded
            print(prompts[0], end="", flush=True)
        stats, start = {}, time.perf_counter()
        texts = generate(model, tokenizer, prompts, args.max_new_tokens, args.temperature, args.top_k,
                         args.stop, args.seed, stream if print_here and len(prompts) == 1 else None, stats)
        seconds = time.perf_counter() - start
        if print_here:
            print("" if len(prompts) == 1 else "\n----------------\n".join(texts))
            print(f"{stats['new_tokens']} new tokens in {seconds:.2f} s: "
                  f"{stats['new_tokens'] / seconds:.1f} tokens/s ({len(prompts)} prompt(s), "
                  f"{layout.world} process(es))", file=sys.stderr)
    except errors.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except errors.Stopped as e:  # (Ctrl-C, a scheduler's SIGTERM: what was printed stands)
        if layout is None or layout.rank == 0:
            print(f"\nstopped by {e.name}", file=sys.stderr)
        sys.exit(0)
    finally:
        if layout is not None:
            parallel.destroy_distributed(layout)


if __name__ == "__main__":
    main()
