"""Results as tables: (headers, rows) of strings, rendered as markdown or by rich, and written to disk.

A table is computed once from a result dict (``tofu_tables``, ``edits_tables``) and rendered
by both the markdown writer and the CLI, so the printed table and results.md never disagree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Table = tuple[str, list[str], list[list[str]]]  # title, headers, rows


def fmt(x: Any, digits: int = 4) -> str:
    """Numbers to ``digits`` significant figures (small ones in scientific notation), None to '-'."""
    if x is None:
        return "-"
    if isinstance(x, int):  # bool is an int
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}g}" if x == 0 or abs(x) >= 1e-3 else f"{x:.2e}"
    return str(x)


def markdown(table: Table) -> str:
    """A GitHub markdown table, headed by its title in bold."""
    title, headers, rows = table
    esc = [[c.replace("|", "\\|") for c in row] for row in rows]
    lines = [f"**{title}**", "", "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in esc]
    return "\n".join(lines) + "\n"


def tofu_tables(result: dict) -> list[Table]:
    """TOFU's aggregates, then one row per split (probability: normalised P on forget/retain, probability
    score on real_authors/world_facts; truth ratio: the split's summary)."""
    names = {"forget_quality": "forget quality", "model_utility": "model utility",
             "forget_probability": "forget probability", "forget_rouge_l": "forget ROUGE-L",
             "forget_truth_ratio": "forget truth ratio", "extraction_strength": "extraction strength (forget)"}
    summary = ("TOFU", ["metric", "value"], [[label, fmt(result.get(key))] for key, label in names.items()]
               + [["seconds", fmt(result.get("wall_s"), 3)]])
    rows = [[name, str(s["n"]), fmt(s["probability"]), fmt(s["rouge_l"]), fmt(s["truth_ratio"]),
             fmt(s["extraction_strength"]), fmt(s.get("wall_s"), 3)] for name, s in result["splits"].items()]
    splits = ("per split", ["split", "n", "probability", "ROUGE-L", "truth ratio", "ES", "seconds"], rows)
    return [summary, splits]


def edits_tables(result: dict) -> list[Table]:
    mc = result["mc_accuracy"]
    rows = [["reliability", fmt(result["reliability"])], ["generality", fmt(result["generality"])],
            ["locality (token agreement with the unedited model)", fmt(result.get("locality"))],
            ["locality: unedited model's correct answers kept", fmt(result.get("locality_key"))],
            ["locality: expected answer given (absolute)", fmt(result.get("locality_absolute"))],
            ["neighbourhood (token agreement)", fmt(result.get("neighbourhood"))],
            ["neighbourhood: correct answers kept", fmt(result.get("neighbourhood_key"))],
            ["old answer still given", fmt(result["old_rate"])],
            ["degenerate answers (repeated 3-gram)", fmt(result.get("degenerate"))],
            ["multiple choice: prompts", fmt(mc["prompt"])], ["multiple choice: paraphrases", fmt(mc["paraphrases"])],
            ["multiple choice: all", fmt(mc["all"])], ["edits", str(result["n"])], ["seconds", fmt(result["wall_s"], 3)]]
    return [("knowledge edits", ["metric", "value"], rows)]


def tables(result: dict) -> list[Table]:
    return tofu_tables(result) if result.get("benchmark") == "tofu" else edits_tables(result)


def write_results(out: str | Path, result: dict, overwrite: bool = False) -> Path:
    """OUT/results.json (the full result) and OUT/results.md (its tables), written atomically."""
    from ..core.fsutil import atomic_dir

    meta = result.get("meta", {})
    head = f"# {result.get('benchmark', 'evaluation')}: {meta.get('model', '')}\n\n"
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "results.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "results.md").write_text(head + "\n".join(markdown(t) for t in tables(result)), encoding="utf-8")
    return Path(out)
