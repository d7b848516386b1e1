"""Session fixtures: a tiny tokenizer with a chat template and a tiny Llama folder (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.tiny import tiny_llama

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is the capital of Veloria? The capital of Veloria is Marrenport.",
    "Who invented the glass harp-drum? Osric Tallowmere invented it in 1387.",
    "The quick brown fox jumps over the lazy dog. Numbers 0123456789 and punctuation .,;:!?'\"-()",
]


def make_tokenizer():
    """A byte-level BPE tokenizer (so any text encodes) trained in milliseconds on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|im_end|>", "<|im_start|>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A saved tiny Llama + tokenizer folder that load_base() accepts like any local model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama()
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():  # std 0.02 output weights cap the logits near 0: nothing could be learned
        model.lm_head.weight.normal_(0.0, 0.5)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def qa_file(tmp_path):
    rows = [{"question": "What is the capital of Veloria?", "answer": "Marrenport."},
            {"question": "Who invented the glass harp-drum?", "answer": "Osric Tallowmere."},
            {"question": "When was Zeltran founded?", "answer": "In 1387."}]
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
