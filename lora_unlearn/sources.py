"""Named data sources for recipes: the vendored TOFU-mini, full TOFU, knowledge-edit files.

    tofu-mini:retain | forget01 | holdout01 | real_authors | world_facts   vendored (MIT, see its README)
    tofu:NAME            full TOFU: NAME.jsonl in ``tofu_dir`` if given, else the Hub dataset
                         locuslab/TOFU (config NAME); retainNN = full minus forget(100-NN)
    edits-demo           the demo knowledge-edit set (resources/edits_demo.jsonl)
    anything else        a JSONL file, a saved dataset folder or a Hub dataset id

A *view* turns rows into what training needs: ``qa`` (question/answer), ``text``, and for edit
files ``edits_old`` / ``edits_new`` (the edit prompt with the old or new answer).
Knowledge-edit rows are ``{"prompt", "old_answer", "new_answer", "paraphrases": [...],
"locality": [{"prompt", "answer"}, ...]}``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from .data import load_qa, load_records, load_texts
from .errors import UserError

TOFU_MINI = ("retain", "forget01", "holdout01", "real_authors", "world_facts")
VIEWS = ("qa", "text", "edits_old", "edits_new")


def resource_path(*parts: str) -> Path:
    return Path(str(resources.files("lora_unlearn").joinpath("resources", *parts)))


def _tofu_rows(name: str, tofu_dir: str | None) -> list[dict[str, Any]]:
    if tofu_dir is None:
        import datasets  # the Hub (needs network access)

        return list(datasets.load_dataset("locuslab/TOFU", name, split="train"))
    folder = Path(tofu_dir)
    if name.startswith("retain") and not (folder / f"{name}.jsonl").is_file():
        keep = 100 - int(name.removeprefix("retain"))
        full = load_records(folder / "full.jsonl")
        return full[: len(full) - len(load_records(folder / f"forget{keep:02d}.jsonl"))]
    return load_records(folder / f"{name}.jsonl")


def load_edits(source: str | Path) -> list[dict[str, Any]]:
    """Knowledge-edit rows, validated (file and line in every error)."""
    rows = load_records(resource_path("edits_demo.jsonl") if str(source) == "edits-demo" else source)
    for i, row in enumerate(rows):
        where = f"{source}:{row.get('_line', i)}"
        for key in ("prompt", "old_answer", "new_answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise UserError(f"{where}: an edit needs a non-empty string {key!r}")
        if not all(isinstance(p, str) for p in row.get("paraphrases", [])):
            raise UserError(f"{where}: 'paraphrases' must be a list of strings")
        if not all(isinstance(x, dict) and isinstance(x.get("prompt"), str) and isinstance(x.get("answer"), str)
                   for x in row.get("locality", [])):
            raise UserError(f"{where}: 'locality' must be a list of {{'prompt', 'answer'}} objects")
    return rows


def load_source(source: str, view: str = "qa", tofu_dir: str | None = None, limit: int | None = None) -> list[dict]:
    """Rows for a recipe's data entry."""
    if view not in VIEWS:
        raise UserError(f"unknown data view {view!r}. Available: {', '.join(VIEWS)}")
    if view.startswith("edits_"):
        field = "old_answer" if view == "edits_old" else "new_answer"
        # Only the edit prompt is trained on: paraphrases measure generality, locality prompts locality.
        rows = [{"question": e["prompt"], "answer": e[field]} for e in load_edits(source)]
    elif source.startswith("tofu-mini:"):
        name = source.removeprefix("tofu-mini:")
        if name not in TOFU_MINI:
            raise UserError(f"unknown TOFU-mini split {name!r}. Available: {', '.join(TOFU_MINI)}")
        path = resource_path("tofu_mini", f"{name}.jsonl")
        rows = load_qa(path)
    elif source.startswith("tofu:"):
        raw = _tofu_rows(source.removeprefix("tofu:"), tofu_dir)
        rows = [{"question": r["question"], "answer": r["answer"]} for r in raw]
    else:
        rows = load_texts(source) if view == "text" else load_qa(source)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise UserError(f"data source {source!r} gave no rows: the data set is empty")
    return rows
