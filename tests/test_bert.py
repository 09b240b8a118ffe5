"""bert.py: pre-training (masked tokens + sentence order) and classification under every
parallel layout, equal to one process (loss, gradient norm, validation loss and the heads'
accuracies per step, on padded batches); every parameter's gradient under tp and cp (the
sentence head reads one token, held by one rank); fine-tuning from a pre-trained
checkpoint; bad input as one line. (Parity with transformers' BertFor* is in
test_convert.py, the data in test_bert_data.py, the Triton path in test_triton.py.)"""
import os

import pytest
import torch

import checkpoint
import data
import models
import parallel
from conftest import (LAYOUT, assert_gradient_part, assert_same_run, assert_within_bf16, local_gradients,
                      one_line_error, one_process, train_job, train_on)
from errors import UsageError

BERT = ["--model", "bert", *LAYOUT, "--eval-every", "5"]
ACCURACIES = ("mlm_accuracy", "sentence_order_accuracy", "val_mlm_accuracy",
              "val_sentence_order_accuracy", "accuracy", "val_accuracy")


def _same_accuracies(got, expected):
    """Top-1 counts equal to one process: a head counted on two ranks, or on none, shows.
    (A tie between two logits broken otherwise by rounding could move one hit: allowed.)"""
    for a, b in zip(got, expected):
        assert {k for k in ACCURACIES if k in a} == {k for k in ACCURACIES if k in b}
        for key in (k for k in ACCURACIES if k in b):
            assert abs(a[key] - b[key]) <= 0.02, (b["step"], key, a[key], b[key])


def test_the_layout_tests_see_padding():
    """The test batches (seq 32, 8 rows, 10 steps) hold padding and both segment types."""
    train, _ = data.load_dataset("stdlib", "byte", 32)
    batches = [data.MaskedLMData(train, "byte").batch(step, 1337, 8, 32) for step in range(10)]
    assert sum((b["attention_mask"] == 0).sum().item() for b in batches) > 0
    assert all((b["token_type_ids"] == 1).any() for b in batches)


@pytest.mark.parametrize("layouts", [
    [(2, ["--tp", "2"]), (2, ["--tp", "2", "--no-sp"]), (2, ["--cp", "2"]), (2, ["--pp", "2"])],
    [(4, ["--tp", "2", "--cp", "2"]), (2, ["--cp", "2", "--cp-comm", "allgather"]),
     (4, ["--pp", "2", "--tp", "2", "--micro-batch-size", "2"])],
    [(2, []), (4, ["--no-zero1", "--micro-batch-size", "1"])],  # dp = 2, 4; accumulation
], ids=["tp-cp-pp", "combined", "dp"])
def test_pretraining_layouts_equal_one_process(ranks, layouts):
    expected = one_process(BERT)
    for nproc, flags in layouts:
        got, _ = train_on(ranks, nproc, BERT + flags)
        assert_same_run(got, expected)
        _same_accuracies(got, expected)


def test_post_ln_and_pre_ln_both_train(ranks):
    """Megatron's pre-LN form under tp x cp (its final norm on the last stage)."""
    argv = BERT + ["--set", "pre_ln=true"]
    expected = one_process(argv)
    got, _ = train_on(ranks, 4, argv + ["--tp", "2", "--cp", "2"])
    assert_same_run(got, expected)
    _same_accuracies(got, expected)


# ----------------------------------------------------------------------------
# Every gradient: the heads are small next to the embedding
# ----------------------------------------------------------------------------

def _batch(classifier):
    """4 sentence pairs (one padded for certain); a classifier's labels are 3 classes."""
    train, _ = data.load_dataset("stdlib", "byte", 32)
    batch = data.MaskedLMData(train, "byte").batch(0, 3, 4, 32)
    batch["attention_mask"][1, 20:] = 0
    batch["labels"][1, 20:] = -100
    if classifier:
        batch["labels"] = torch.tensor([0, 2, 1, 2])
    return batch


def _gradients(tp=1, cp=1, sp=True, overrides=()):
    """This rank's loss and heads' counts (summed over cp: its tp ranks must all hold the
    whole figures), and every parameter's gradient (summed over ranks as DataParallel does)
    for one batch (conftest.local_gradients)."""
    layout = parallel.init_distributed(tp=tp, cp=cp, sp=sp, device="cpu")
    try:
        model = models.build("bert", models.make_config("bert", "test", overrides), "cpu", 0, layout)
        ddp = parallel.DataParallel(model, layout)
        loss = model(**_batch(bool(overrides)), sentence_order_weight=3.0)
        loss.backward()
        ddp.finish()
        figures = torch.cat([loss.detach()[None], *(c for _, c in sorted(model.pop_stats().items()))])
        parallel.all_reduce(figures, layout.cp_group)
        grads = local_gradients(model)
        ddp.close()
        return figures, grads
    finally:
        parallel.destroy_distributed(layout)


@pytest.mark.parametrize("world,layout", [(2, dict(tp=2)), (2, dict(tp=2, sp=False)), (2, dict(cp=2)),
                                          (4, dict(tp=2, cp=2))])
@pytest.mark.parametrize("overrides", [(), ("n_classes=3", "mlm_head=false", "binary_head=false")],
                         ids=["pretraining", "classifier"])
def test_every_gradient_equals_one_process(ranks, world, layout, overrides):
    """Each parameter's gradient against its own size, so that the pooler's and the heads'
    (from one token per sequence) count as much as the embedding's."""
    model = models.build("bert", models.make_config("bert", "test", overrides), "cpu", 0)
    loss = model(**_batch(bool(overrides)), sentence_order_weight=3.0)
    loss.backward()
    figures = torch.cat([loss.detach()[None], *(c for _, c in sorted(model.pop_stats().items()))])
    expected = dict(model.named_parameters())
    for rank, (got_figures, grads) in ranks(world).run(_gradients, overrides=overrides, **layout).items():
        torch.testing.assert_close(got_figures, figures, rtol=1e-5, atol=0,
                                   msg=lambda m: f"rank {rank} loss, [hits, targets] per head: {m}")
        assert [name for name, _, _ in grads] == list(expected)
        for name, offset, grad in grads:
            # (+1e-8: the key bias's gradient is zero but for rounding, softmax ignores it)
            assert_gradient_part(grad, offset, expected[name].grad, f"rank {rank} {name}", atol_floor=1e-8)


def _hits(tp, vocab):
    layout = parallel.init_distributed(tp=tp, device="cpu")
    try:
        g = torch.Generator().manual_seed(0)
        x, weight, bias = torch.randn(40, 8, generator=g), torch.randn(vocab, 8, generator=g), torch.randn(vocab, generator=g)
        labels = torch.randint(0, vocab, (40,), generator=g)
        best = torch.nn.functional.linear(x, weight, bias).argmax(-1)
        labels[::2] = best[::2]  # at least half are hits
        rows = -(-vocab // tp)
        part = slice(layout.tp_rank * rows, (layout.tp_rank + 1) * rows)
        padded_w = torch.cat([weight, torch.randn(rows * tp - vocab, 8)])[part]  # padding rows never win
        padded_b = torch.cat([bias, torch.full((rows * tp - vocab,), 100.0)])[part]
        return parallel.vocab_parallel_hits(x, padded_w, labels, layout, vocab, padded_b).item(), \
            (best == labels).sum().item()
    finally:
        parallel.destroy_distributed(layout)


def test_top1_hits_over_a_split_vocabulary(ranks):
    """Hits of the masked-token head's accuracy, with the vocabulary (13, padded to 14, the
    padding given huge logits) split over 2 ranks: every rank counts exactly the tokens
    whose label has the largest logit, wherever that logit lives."""
    hits, expected = _hits(1, 13)
    assert hits == expected >= 20
    assert ranks(2).run(_hits, tp=2, vocab=13) == {0: (expected, expected), 1: (expected, expected)}


# ----------------------------------------------------------------------------
# Fine-tuning a classifier from a pre-trained checkpoint
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Three classes of text, told apart by their letters."""
    root = tmp_path_factory.mktemp("task")
    for name, letters in (("abc", "abc "), ("def", "def "), ("xyz", "xyz\n")):
        os.makedirs(root / name)
        for i in range(2):
            (root / name / f"{i}.txt").write_text("".join(letters[(i + j * j) % 4] for j in range(3000)))
    return str(root)


def test_fine_tuning_starts_from_the_pretrained_weights(tmp_path, task_dir):
    pre, tuned = str(tmp_path / "pre"), str(tmp_path / "tuned")
    train_job(BERT + ["--steps", "3", "--save", pre])
    # lr 0: the saved step-1 weights are the ones fine-tuning started from.
    records, out = train_job(BERT + ["--steps", "1", "--task", task_dir, "--load", pre, "--save", tuned,
                                     "--lr", "0"])
    assert "fine-tuning from" in out and "new parameters: classifier.weight, classifier.bias" in out
    assert {"accuracy", "val_accuracy", "val_majority_baseline"} <= records[-1].keys()
    before = models.build("bert", models.make_config("bert", "test"), "cpu", 0)
    after = models.build("bert", models.make_config("bert", "test", ["n_classes=3", "mlm_head=false",
                                                                     "binary_head=false"]), "cpu", 1)
    checkpoint.load(checkpoint.resolve(pre), before, None, parallel.Layout())
    checkpoint.load(checkpoint.resolve(tuned), after, None, parallel.Layout())
    encoder = dict(before.named_parameters())
    for name, p in after.named_parameters():
        if not name.startswith("classifier."):
            assert torch.equal(p, encoder[name]), name
    # The same flags again resume the fine-tuning run (its own heads), not the pre-training.
    _, out = train_job(BERT + ["--steps", "2", "--task", task_dir, "--load", tuned, "--save", tuned, "--lr", "0"])
    assert "resumed from" in out and "fine-tuning from" not in out


def test_classifier_layouts_equal_one_process(ranks, task_dir):
    argv = BERT + ["--task", task_dir]
    expected = one_process(argv)
    assert expected[-1]["val_majority_baseline"] > 0.3
    for nproc, flags in [(2, ["--tp", "2"]), (2, ["--cp", "2"]), (2, ["--pp", "2"])]:
        got, _ = train_on(ranks, nproc, argv + flags)
        assert_same_run(got, expected)
        _same_accuracies(got, expected)


# ----------------------------------------------------------------------------
# Bad input: one line naming the fix
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--mask-prob", "0"], "--mask-prob must be in (0, 1]"),
    (["--seq-len", "512"], "exceeds max_seq_len=256"),
    (["--tokenizer", "gpt2"], "tokenizer gpt2 has no [CLS] token"),
    (["--seq-len", "4"], "--seq-len"),
    (["--set", "n_classes=1"], "a classifier needs at least 2 classes"),
])
def test_bad_input_is_one_line(capsys, flags, message):
    assert message in one_line_error(capsys, BERT + flags)


def test_model_refuses_a_layout_that_does_not_divide():
    with pytest.raises(UsageError, match="n_heads=4 is not divisible by tp=3"):
        models.FAMILIES["bert"].model(models.make_config("bert", "test"), parallel.Layout(tp=3))


def test_bad_task_is_one_line(capsys, tmp_path, task_dir):
    os.makedirs(tmp_path / "only" / "one")
    (tmp_path / "only" / "one" / "a.txt").write_text("text " * 100)
    assert "at least 2 classes" in one_line_error(capsys, BERT + ["--task", str(tmp_path / "only")])
    assert "pass --model bert" in one_line_error(capsys, ["--model", "llama", *LAYOUT, "--task", task_dir])
    pre = str(tmp_path / "pre")
    train_job(BERT + ["--steps", "1", "--save", pre])
    err = one_line_error(capsys, BERT + ["--task", task_dir, "--load", pre, "--set", "ffn_dim=64"])
    assert "was trained with ffn_dim=128 (this command: 64)" in err, err


def test_bf16_pretraining_stays_within_bf16_rounding_of_fp32():
    """bf16 autocast through BERT's heads (the masked-token selection, the vocab-parallel
    bias, the pooled first token): the loss curve stays within bf16 rounding of fp32's."""
    fp32 = one_process(BERT)
    bf16, _ = train_job([*BERT, "--precision", "bf16"])
    assert_within_bf16(bf16, fp32, keys=("loss", "val_loss"))


def test_resumed_pretraining_equals_an_uninterrupted_run(tmp_path):
    """Sentence pairs and masks come from (seed, step, row): a resumed run draws the same."""
    argv = [*BERT, "--steps", "4", "--eval-every", "0"]
    whole, _ = train_job(argv)
    train_job([*BERT, "--steps", "2", "--lr-decay-steps", "4", "--save", str(tmp_path)])
    resumed, _ = train_job([*argv, "--load", str(tmp_path), "--save", str(tmp_path)])
    assert_same_run(resumed, whole[2:], rel=1e-6, keys=("loss", "grad_norm", "mlm_accuracy", "val_loss"))
