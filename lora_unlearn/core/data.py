"""Training data: question/answer pairs and plain text, from JSONL files or Hugging Face datasets.

QA pairs go through the tokenizer's chat template (user question, assistant answer) and carry
labels on the answer tokens only; plain text is labelled everywhere. Rows are rendered as
``{"input_ids", "attention_mask", "labels"}`` in a ``datasets.Dataset``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ..errors import UserError

IGNORE = -100


_FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".tsv", ".parquet", ".arrow", ".yaml", ".yml")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file (UTF-8, a BOM allowed), each with its line number as ``_line``."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): "
                        "expected JSON Lines in UTF-8; re-save the file as UTF-8") from None
    rows = []
    # JSON Lines separates records by "\n" only: str.splitlines() would also break at U+0085,
    # U+2028 and U+2029, which JSON allows raw inside strings (json.dumps(ensure_ascii=False)).
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: malformed JSON ({e.msg}); each line must be one JSON object") from None
        except RecursionError:
            raise UserError(f"{path}:{number}: JSON nested too deeply; each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__} "
                            "(JSON Lines: one object per line, not a JSON array)")
        rows.append({**row, "_line": number})
    return rows


def _looks_like_hub_id(source: str) -> bool:
    """``owner/name`` that is not a local path: a missing ``data/x.jsonl`` must not reach the Hub."""
    if not _HUB_ID.match(source) or source.lower().endswith(_FILE_SUFFIXES):
        return False
    return not Path(source.split("/")[0]).exists()


def load_records(source: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Rows from a JSONL file, a ``datasets`` folder saved to disk, or a Hub dataset id."""
    path = Path(source)
    if path.is_file():
        rows = _read_jsonl(path)
    elif path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
            rows = list(ds[split] if isinstance(ds, datasets.DatasetDict) else ds)
        except KeyError:
            raise UserError(f"{path} has no split {split!r}") from None
        except (OSError, ValueError, TypeError):  # missing or corrupt dataset files (pyarrow errors are ValueError)
            raise UserError(f"{path} is a folder but not a dataset saved with datasets' save_to_disk") from None
    elif isinstance(source, str) and _looks_like_hub_id(source):
        import datasets  # a Hub dataset id (needs network access)

        try:
            rows = list(datasets.load_dataset(source, split=split))
        except (OSError, ValueError) as e:  # not found, no network (ConnectionError is an OSError), bad split
            reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"cannot load the Hub dataset {source!r} ({reason}): check the id and the network, "
                            "or give a local JSONL file") from None
    elif path.exists():
        raise UserError(f"data source {source} is neither a file nor a folder")
    else:
        raise UserError(f"data file {source} does not exist: give a JSONL file, a saved dataset folder or a Hub id")
    if not rows:
        raise UserError(f"{source} holds no rows: the data set is empty")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{_where(source, {}, i)}: expected a record, got {type(row).__name__}")
    return rows


def _where(source: str | Path, row: dict[str, Any], index: int) -> str:
    return f"{source}:{row['_line']}" if "_line" in row else f"{source} row {index}"


def text_field(row: dict[str, Any], key: str, where: str) -> str | None:
    """``row[key]`` if it is a non-empty string of valid Unicode, else None."""
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{where}: field {key!r} holds an invalid character (a lone surrogate escape such as "
                        "\\ud800): fix the text") from None
    return value


def qa_rows(rows: list[dict[str, Any]], source: str | Path) -> list[dict[str, str]]:
    """Validated ``{"question", "answer"}`` rows (non-empty strings) from raw records."""
    out = []
    for i, row in enumerate(rows):
        where = _where(source, row, i)
        q, a = text_field(row, "question", where), text_field(row, "answer", where)
        if q is None or a is None:
            raise UserError(f"{where}: expected non-empty string fields 'question' and 'answer'")
        out.append({"question": q, "answer": a})
    return out


def text_rows(rows: list[dict[str, Any]], source: str | Path) -> list[dict[str, str]]:
    """Validated ``{"text"}`` rows (non-empty strings) from raw records."""
    out = []
    for i, row in enumerate(rows):
        where = _where(source, row, i)
        text = text_field(row, "text", where)
        if text is None:
            raise UserError(f"{where}: expected a non-empty string field 'text'")
        out.append({"text": text})
    return out


def load_qa(source: str | Path, split: str = "train") -> list[dict[str, str]]:
    """Question/answer rows (keys ``question`` and ``answer``, strings)."""
    return qa_rows(load_records(source, split), source)


def load_texts(source: str | Path, split: str = "train") -> list[dict[str, str]]:
    """Plain-text rows (key ``text``)."""
    return text_rows(load_records(source, split), source)


def load_any(source: str | Path, split: str = "train") -> list[dict[str, str]]:
    """QA rows if the first row has ``question``, text rows if it has ``text``."""
    rows = load_records(source, split)
    if "question" in rows[0]:
        return qa_rows(rows, source)
    if "text" in rows[0]:
        return text_rows(rows, source)
    raise UserError(f"{_where(source, rows[0], 0)}: expected fields 'question' and 'answer' (QA) or 'text' "
                    f"(plain text), got {', '.join(map(repr, [k for k in rows[0] if k != '_line'][:5])) or 'none'}")


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


def encode_qa(tokenizer, question: str, answer: str, max_length: int,
              answer_tokens: int | None = None) -> dict[str, list[int]]:
    """Prompt and completion ids with answer-only labels; ``answer_tokens`` cuts the completion to that many tokens."""
    prompt = tokenizer(prompt_text(tokenizer, question), add_special_tokens=False)["input_ids"]
    if answer_tokens is not None:
        max_length = min(max_length, len(prompt) + answer_tokens)
    answer_ids = tokenizer(completion_text(tokenizer, question, answer), add_special_tokens=False)["input_ids"]
    if len(prompt) >= max_length:
        raise UserError(f"a prompt is {len(prompt)} tokens, not shorter than max_length {max_length}: "
                        f"raise --max-length (question: {question[:60]!r})")
    ids = (prompt + answer_ids)[:max_length]
    labels = ([IGNORE] * len(prompt) + answer_ids)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def fitting(tokenizer, rows: list[dict[str, str]], max_length: int) -> list[dict[str, str]]:
    """The question/answer rows whose prompt is shorter than ``max_length`` tokens (their answers
    are cut to fit when encoded); for pools where a row may be dropped, such as preservation's."""
    return [r for r in rows if "question" not in r or
            len(tokenizer(prompt_text(tokenizer, r["question"]), add_special_tokens=False)["input_ids"]) < max_length]


def encode_text(tokenizer, text: str, max_length: int) -> dict[str, list[int]]:
    ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


def to_dataset(tokenizer, rows: list[dict[str, str]], max_length: int = 256, answer_tokens: int | None = None):
    """A tokenized ``datasets.Dataset`` (input_ids, attention_mask, labels) of QA or text rows
    (``answer_tokens``: QA completions cut to that many tokens)."""
    import datasets

    if not rows:
        raise UserError("the data set is empty: nothing to train or evaluate on")
    encoded = [encode_qa(tokenizer, r["question"], r["answer"], max_length, answer_tokens) if "question" in r
               else encode_text(tokenizer, r["text"], max_length) for r in rows]
    return datasets.Dataset.from_list(encoded)
