"""Training data: question/answer pairs and plain text, from JSONL files or Hugging Face datasets.

QA pairs go through the tokenizer's chat template (user question, assistant answer) and carry
labels on the answer tokens only; plain text is labelled everywhere. Rows are rendered as
``{"input_ids", "attention_mask", "labels"}`` in a ``datasets.Dataset``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import UserError

IGNORE = -100


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: expected JSON Lines") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: malformed JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append({**row, "_line": number})
    return rows


def load_records(source: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Rows from a JSONL file, a ``datasets`` folder saved to disk, or a Hub dataset id."""
    path = Path(source)
    if path.is_file():
        rows = _read_jsonl(path)
    elif path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise UserError(f"{path} is a folder but not a dataset saved with datasets' save_to_disk") from None
        rows = list(ds[split] if isinstance(ds, datasets.DatasetDict) else ds)
    elif str(source).count("/") == 1 and not str(source).startswith((".", "/")):
        import datasets  # a Hub dataset id (needs network access)

        rows = list(datasets.load_dataset(str(source), split=split))
    else:
        raise UserError(f"data file {source} does not exist: give a JSONL file, a saved dataset folder or a Hub id")
    if not rows:
        raise UserError(f"{source} holds no rows: the data set is empty")
    return rows


def _where(source: str | Path, row: dict[str, Any], index: int) -> str:
    return f"{source}:{row['_line']}" if "_line" in row else f"{source} row {index}"


def load_qa(source: str | Path, split: str = "train") -> list[dict[str, str]]:
    """Question/answer rows (keys ``question`` and ``answer``, strings)."""
    rows = load_records(source, split)
    out = []
    for i, row in enumerate(rows):
        q, a = row.get("question"), row.get("answer")
        if not isinstance(q, str) or not isinstance(a, str) or not q.strip() or not a.strip():
            raise UserError(f"{_where(source, row, i)}: expected non-empty string fields 'question' and 'answer'")
        out.append({"question": q, "answer": a})
    return out


def load_texts(source: str | Path, split: str = "train") -> list[dict[str, str]]:
    """Plain-text rows (key ``text``)."""
    rows = load_records(source, split)
    for i, row in enumerate(rows):
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise UserError(f"{_where(source, row, i)}: expected a non-empty string field 'text'")
    return [{"text": row["text"]} for row in rows]


def load_any(source: str | Path, split: str = "train") -> list[dict[str, str]]:
    """QA rows if the first row has ``question``, else text rows."""
    first = load_records(source, split)[0]
    return load_qa(source, split) if "question" in first else load_texts(source, split)


def fingerprint(rows: list[dict[str, str]]) -> dict[str, Any]:
    """A hash and a count that identify a data set without revealing it."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return {"sha256": h.hexdigest(), "rows": len(rows)}


def prompt_text(tokenizer, question: str) -> str:
    """The prompt the model sees for ``question``, ending where the answer starts."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             add_generation_prompt=True, tokenize=False)
    return f"Question: {question}\nAnswer: "


def completion_text(tokenizer, question: str, answer: str) -> str:
    """What follows the prompt in a full exchange: the answer and the end-of-turn marker."""
    prompt = prompt_text(tokenizer, question)
    if tokenizer.chat_template:
        full = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}], tokenize=False)
        if full.startswith(prompt):
            return full[len(prompt):].rstrip("\n")
    return answer + (tokenizer.eos_token or "")


def encode_qa(tokenizer, question: str, answer: str, max_length: int) -> dict[str, list[int]]:
    prompt = tokenizer(prompt_text(tokenizer, question), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(completion_text(tokenizer, question, answer), add_special_tokens=False)["input_ids"]
    if len(prompt) >= max_length:
        raise UserError(f"a prompt is {len(prompt)} tokens, not shorter than max_length {max_length}: "
                        f"raise --max-length (question: {question[:60]!r})")
    ids = (prompt + answer_ids)[:max_length]
    labels = ([IGNORE] * len(prompt) + answer_ids)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def encode_text(tokenizer, text: str, max_length: int) -> dict[str, list[int]]:
    ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


def to_dataset(tokenizer, rows: list[dict[str, str]], max_length: int = 256):
    """A tokenized ``datasets.Dataset`` (input_ids, attention_mask, labels) of QA or text rows."""
    import datasets

    if not rows:
        raise UserError("the data set is empty: nothing to train or evaluate on")
    encoded = [encode_qa(tokenizer, r["question"], r["answer"], max_length) if "question" in r
               else encode_text(tokenizer, r["text"], max_length) for r in rows]
    return datasets.Dataset.from_list(encoded)
