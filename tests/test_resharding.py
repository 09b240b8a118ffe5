"""Checkpoints and Hugging Face weights load under any parallel layout.

A run saved at (tp=2, pp=2) continues at other layouts (with dp=2 and ZeRO-1, so the
optimizer state reshards too) on the same trajectory; a Hugging Face folder is
fine-tuned under tp x pp from the same starting loss as in one process."""
import pytest
import torch

from conftest import LAYOUT, assert_same_run, train_job, train_on

LAYERS = ["--model", "llama", *LAYOUT, "--set", "n_layers=4", "--set", "n_kv_heads=4",
          "--micro-batch-size", "2"]


def test_checkpoint_reshards_across_layouts(ranks, tmp_path):
    ckpt = tmp_path / "ckpt"
    original, _ = train_on(ranks, 4, LAYERS + ["--tp", "2", "--pp", "2", "--save", str(ckpt),
                                              "--save-every", "5"])
    expected = original[5:]
    resume = LAYERS + ["--zero1", "--load", str(ckpt / "step_00000005")]
    assert_same_run(train_job(resume)[0], expected)  # one process
    for nproc, flags in [(2, []), (4, ["--pp", "2"]), (8, ["--tp", "4"])]:  # dp=2 each
        got, _ = train_on(ranks, nproc, resume + flags)
        assert_same_run(got, expected)


@pytest.fixture
def hf_llama(tmp_path):
    import transformers as tf
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_finetune_from_hugging_face_under_tp_and_pp(ranks, hf_llama):
    args = ["--model", "llama", *LAYOUT, "--load", f"hf:{hf_llama}", "--steps", "3"]
    one, _ = train_job(args)
    many, _ = train_on(ranks, 4, args + ["--tp", "2", "--pp", "2", "--micro-batch-size", "2"])
    assert_same_run(many, one)
