"""Data loading and tokenization: answer-only labels, clear errors with file and line."""

from __future__ import annotations

import json

import pytest

from lora_unlearn.core.data import IGNORE, encode_qa, fingerprint, load_any, load_qa, load_texts, to_dataset
from lora_unlearn.errors import UserError


def test_qa_labels_cover_exactly_the_answer_and_end_of_turn(tokenizer):
    enc = encode_qa(tokenizer, "What is the capital of Veloria?", "Marrenport.", max_length=256)
    labelled = [t for t in enc["labels"] if t != IGNORE]
    assert tokenizer.decode(labelled) == "Marrenport.<|im_end|>"
    first = enc["labels"].index(labelled[0])
    assert all(t == IGNORE for t in enc["labels"][:first])
    prompt = tokenizer.decode(enc["input_ids"][:first])
    assert prompt.endswith("<|im_start|>assistant\n") and "What is the capital of Veloria?" in prompt
    assert len(enc["input_ids"]) == len(enc["labels"]) == len(enc["attention_mask"])


def test_truncation_keeps_the_prompt_and_cuts_the_answer(tokenizer):
    full = encode_qa(tokenizer, "Who invented the glass harp-drum?", "Osric Tallowmere invented it in 1387.", 256)
    n_prompt = full["labels"].count(IGNORE)
    cut = encode_qa(tokenizer, "Who invented the glass harp-drum?", "Osric Tallowmere invented it in 1387.", n_prompt + 2)
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 2]
    assert sum(t != IGNORE for t in cut["labels"]) == 2


def test_prompt_longer_than_max_length_is_refused(tokenizer):
    with pytest.raises(UserError, match="max_length"):
        encode_qa(tokenizer, "a very long question " * 20, "yes", max_length=16)


def test_text_rows_are_labelled_everywhere(tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "The quick brown fox."}) + "\n")
    rows = load_any(path)
    ds = to_dataset(tokenizer, rows, 64)
    assert ds[0]["labels"] == ds[0]["input_ids"]


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n\n{"question": "q2", "answer": \n')
    with pytest.raises(UserError, match=r"bad\.jsonl:3: malformed JSON"):
        load_qa(path)


@pytest.mark.parametrize("content, pattern", [
    ("", "empty"),
    ("\n\n", "empty"),
    ('[1, 2]\n', "expected a JSON object"),
    ('{"question": "q"}\n', r":1: expected non-empty string fields 'question' and 'answer'"),
    ('{"question": "q", "answer": 3}\n', "expected non-empty string"),
])
def test_bad_qa_files(tmp_path, content, pattern):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=pattern):
        load_qa(path)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_qa(tmp_path / "nope.jsonl")
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(UserError, match="not UTF-8"):
        load_qa(binary)
    with pytest.raises(UserError, match="'text'"):
        load_texts(_write(tmp_path / "q.jsonl", {"question": "q", "answer": "a"}))


def test_saved_hf_dataset_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"question": "q?", "answer": "a."}]).save_to_disk(str(tmp_path / "ds"))
    assert load_qa(tmp_path / "ds") == [{"question": "q?", "answer": "a."}]


def test_fingerprint_identifies_without_revealing():
    rows = [{"question": "secret?", "answer": "hidden."}]
    fp = fingerprint(rows)
    assert fp["rows"] == 1 and len(fp["sha256"]) == 64 and "secret" not in json.dumps(fp)
    assert fingerprint(rows) == fp != fingerprint([{"question": "secret?", "answer": "other."}])


def _write(path, row):
    path.write_text(json.dumps(row) + "\n")
    return path
