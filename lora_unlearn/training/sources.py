"""Named data sources for recipes: the vendored TOFU-mini, full TOFU, knowledge-edit files.

    tofu-mini:retain | forget01 | holdout01 | real_authors | world_facts   vendored (MIT, see its README)
    tofu:NAME            full TOFU: NAME.jsonl in ``tofu_dir`` if given, else the Hub dataset
                         locuslab/TOFU (config NAME); retainNN = full minus forget(100-NN)
    edits-demo           the demo knowledge-edit set (resources/edits_demo.jsonl)
    edits:dev | edits:test  the project's edit benchmark (resources/edits/, see its README);
                         its shared locality pool is ``edits:locality``
    preservation         the general prompt pool of the preservation stream (resources/preservation/)
    preservation+facts   that pool plus 95 short factual questions of the edit benchmark's kinds on
                         subjects no evaluation uses (opt-in: it holds neighbours in place but costs
                         generality, see the README's "Knowledge updates")
    anything else        a JSONL file, a saved dataset folder or a Hub dataset id

A *view* turns rows into what training needs: ``qa`` (question/answer), ``text``, and for edit
files ``edits_old`` / ``edits_new`` (the edit prompt with the old or new answer).
Knowledge-edit rows are ``{"prompt", "old_answer", "new_answer", "paraphrases": [...],
"locality": [{"prompt", "answer"}, ...]}``; optional: ``neighbourhood`` (rows like locality's: same
relation, other subject), ``subject``, ``relation``, ``unedited_answer`` (informational).
A locality or neighbourhood ``answer`` may list alternatives as ``a|b``.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

from ..core.data import load_qa, load_records, load_texts, qa_rows, text_field
from ..core.text import normalise
from ..errors import UserError

TOFU_MINI = ("retain", "forget01", "holdout01", "real_authors", "world_facts")
VIEWS = ("qa", "text", "edits_old", "edits_new")


def resource_path(*parts: str) -> Path:
    return Path(str(resources.files("lora_unlearn").joinpath("resources", *parts)))


def _tofu_rows(name: str, tofu_dir: str | None) -> list[dict[str, Any]]:
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise UserError(f"TOFU split name {name!r} is not a name such as full, forget01 or retain99")
    if tofu_dir is None:
        import datasets  # the Hub (needs network access)

        try:
            return list(datasets.load_dataset("locuslab/TOFU", name, split="train"))
        except (OSError, ValueError) as e:  # unknown config, no network (ConnectionError is an OSError)
            reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"cannot load TOFU split {name!r} from the Hub ({reason}): check the name, "
                            "or set tofu_dir to a folder of TOFU JSONL files") from None
    folder = Path(tofu_dir)
    if name.startswith("retain") and not (folder / f"{name}.jsonl").is_file():
        percent = name.removeprefix("retain")
        if not re.fullmatch(r"\d\d", percent) or not 0 < int(percent) < 100:
            raise UserError(f"TOFU split {name!r}: retainNN needs NN between 01 and 99 (e.g. retain99), "
                            f"or put {name}.jsonl in {folder}")
        keep = 100 - int(percent)
        full = load_records(folder / "full.jsonl")
        return full[: len(full) - len(load_records(folder / f"forget{keep:02d}.jsonl"))]
    return load_records(folder / f"{name}.jsonl")


EDIT_SPLITS = ("dev", "test")


def _edit_file(source: str | Path) -> str | Path:
    name = str(source)
    if name == "edits-demo":
        return resource_path("edits_demo.jsonl")
    if name.startswith("edits:"):
        split = name.removeprefix("edits:")
        if split not in (*EDIT_SPLITS, "locality"):
            raise UserError(f"unknown edit benchmark split {split!r}. Available: dev, test, locality")
        return resource_path("edits", f"{split}.jsonl")
    return source


def _probes(row: dict[str, Any], key: str, where: str) -> None:
    probes = row.get(key, [])
    if not isinstance(probes, list):
        raise UserError(f"{where}: field {key!r} must be a list of {{'prompt', 'answer'}} objects")
    for j, x in enumerate(probes):
        if not isinstance(x, dict) or not all(isinstance(x.get(f), str) and x[f].strip() for f in ("prompt", "answer")):
            raise UserError(f"{where}: field {key!r} item {j} must be an object with non-empty strings "
                            "'prompt' and 'answer'")


def load_edits(source: str | Path) -> list[dict[str, Any]]:
    """Knowledge-edit rows, validated (file, line and field in every error)."""
    path = _edit_file(source)
    rows = load_records(path)
    for i, row in enumerate(rows):
        where = f"{path}:{row.get('_line', i)}"
        for key in ("prompt", "old_answer", "new_answer"):
            if text_field(row, key, where) is None:
                raise UserError(f"{where}: field {key!r}: an edit needs a non-empty string {key!r}")
        if normalise(row["old_answer"]) == normalise(row["new_answer"]):
            raise UserError(f"{where}: field 'new_answer': equals 'old_answer' ({row['new_answer']!r}): "
                            "an edit must change the answer")
        paraphrases = row.get("paraphrases", [])
        if not isinstance(paraphrases, list) or not all(isinstance(p, str) and p.strip() for p in paraphrases):
            raise UserError(f"{where}: field 'paraphrases' must be a list of non-empty strings")
        _probes(row, "locality", where)
        _probes(row, "neighbourhood", where)
    return rows


def load_locality(source: str | Path) -> list[dict[str, str]]:
    """A shared locality pool: rows ``{"prompt", "answer"}`` (optional ``subject``), validated."""
    path = _edit_file(source)
    rows = load_records(path)
    for i, row in enumerate(rows):
        where = f"{path}:{row.get('_line', i)}"
        for key in ("prompt", "answer"):
            if text_field(row, key, where) is None:
                raise UserError(f"{where}: field {key!r}: a locality row needs a non-empty string {key!r}")
    if not rows:
        raise UserError(f"{path}: the locality pool is empty")
    return rows


def load_source(source: str | Path, view: str = "qa", tofu_dir: str | None = None,
                limit: int | None = None) -> list[dict]:
    """Rows for a recipe's data entry."""
    source = str(source) if isinstance(source, Path) else source
    if not isinstance(source, str) or not source:
        raise UserError(f"data source must be a non-empty string, got {source!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit must be a positive integer, got {limit!r}")
    if view not in VIEWS:
        raise UserError(f"unknown data view {view!r}. Available: {', '.join(VIEWS)}")
    if view.startswith("edits_"):
        field = "old_answer" if view == "edits_old" else "new_answer"
        # Only the edit prompt is trained on: paraphrases measure generality, locality prompts locality.
        rows = [{"question": e["prompt"], "answer": e[field]} for e in load_edits(source)]
    elif source in ("preservation", "preservation+facts"):
        rows = load_qa(resource_path("preservation", "pool.jsonl"))
        if source == "preservation+facts":
            rows += load_qa(resource_path("preservation", "facts.jsonl"))
    elif source.startswith("tofu-mini:"):
        name = source.removeprefix("tofu-mini:")
        if name not in TOFU_MINI:
            raise UserError(f"unknown TOFU-mini split {name!r}. Available: {', '.join(TOFU_MINI)}")
        path = resource_path("tofu_mini", f"{name}.jsonl")
        rows = load_qa(path)
    elif source.startswith("tofu:"):
        rows = qa_rows(_tofu_rows(source.removeprefix("tofu:"), tofu_dir), source)
    else:
        rows = load_texts(source) if view == "text" else load_qa(source)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise UserError(f"data source {source!r} gave no rows: the data set is empty")
    return rows
