"""The preservation stream: a general prompt pool that must stay clear of what is learned and evaluated.

Every adapter that adds knowledge trains with ``nll``'s preserve term (KL to the starting model on
this pool), so the pool must not hold what the adapter is meant to change, nor what an evaluation
probes: the same prompt, or the same subject under other words. :func:`protected_terms` collects
what a set of rows talks about (edit prompts, paraphrases, locality and neighbourhood probes,
subjects, answers, and the proper nouns of question/answer rows). :func:`check_pool` refuses a pool
that is empty or mentions any of an evaluation set, naming the pool row and the term;
:func:`clear_of` leaves out the pool rows that mention the data being learned.

The vendored pool (``resources/preservation/pool.jsonl``, source ``preservation``): 439 instructions,
everyday and quiz questions with no proper nouns, answered by the embedded model itself (greedy, 48
tokens). ``preservation+facts`` adds 95 short factual questions (capitals, currencies, languages,
authors, painters, inventors, chemical symbols) on subjects that no evaluation set of the project
uses (``benchmarks/pool_facts.py``): opt-in, since it holds an edit's neighbours in place but
also its paraphrases (README, "Knowledge updates").
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from ..core.text import normalise
from ..errors import UserError

_PROPER = re.compile(r"(?<=[A-Za-z0-9,;:] )[A-Z][a-z]+(?:[- ][A-Z][a-z]+)*")
_COMMON = {"i", "the", "a", "an", "of", "in", "is", "to"}


def _entities(text: str) -> list[str]:
    """Capitalised words not at a sentence start ("Veloria", "Osric Tallowmere")."""
    return _PROPER.findall(text)


def _specific(value: str) -> bool:
    """A name ("Tokyo", "Au", "New Delhi") or a multi-word term ("square root"), not a common word or a number."""
    words = normalise(value).split()
    return bool(words) and not any(w.isdigit() for w in words) and (any(c.isupper() for c in value) or len(words) >= 2)


def protected_terms(rows: Iterable[dict[str, Any]]) -> tuple[set[str], set[str]]:
    """(prompts, terms) that a preservation pool must not contain, normalised.

    Accepts edit rows (prompt, old/new answers, paraphrases, locality, neighbourhood, subject),
    locality rows (prompt, answer, subject) and question/answer rows. Terms are names and
    multi-word terms: subjects, short answers (``a|b`` alternatives apart) and the proper nouns of
    every prompt and answer; common lowercase words and numbers are not terms.
    """
    prompts, raw = set(), []
    for row in rows:
        for key in ("prompt", "question"):
            if isinstance(row.get(key), str):
                prompts.add(normalise(row[key]))
                raw += _entities(row[key])
        prompts.update(normalise(p) for p in row.get("paraphrases", []) if isinstance(p, str))
        for key in ("subject", "old_answer", "new_answer", "answer"):
            value = row.get(key)
            if isinstance(value, str):
                short = len(normalise(value).split()) <= 3
                raw += [v for v in value.split("|")] if short else _entities(value)
        for key in ("locality", "neighbourhood"):
            for probe in row.get(key, []) or []:
                if isinstance(probe, dict):
                    sub_prompts, sub_terms = protected_terms([probe])
                    prompts |= sub_prompts
                    raw += list(sub_terms)
    terms = {normalise(t) for t in raw if _specific(t) or " " in t}
    return prompts, {t for t in terms if len(t) >= 2 and t not in _COMMON}


def _overlap(row: dict[str, Any], prompts: set[str], terms: set[str]) -> str | None:
    """Why a pool row may not be used ("is the same prompt (...)", "mentions 'x'"), or None."""
    question = normalise(row.get("question", ""))
    if question in prompts:
        return f"is the same prompt ({row['question']!r})"
    padded = f" {question} "
    for term in sorted(terms):
        if f" {term} " in padded:
            return f"({row['question'][:60]!r}) mentions {term!r}"
    return None


def check_pool(pool: list[dict[str, str]], protected: Iterable[dict[str, Any]], *, pool_name: str = "preservation pool",
               what: str = "the data", terms: bool = True) -> None:
    """Refuse an empty pool, or one whose prompts repeat or (``terms``) mention what ``protected`` holds
    (an evaluation set)."""
    if not pool:
        raise UserError(f"the {pool_name} is empty: give a pool of general prompts unrelated to {what}")
    prompts, names = protected_terms(protected)
    names = names if terms else set()
    for i, row in enumerate(pool):
        why = _overlap(row, prompts, names)
        if why is not None:
            raise UserError(f"the {pool_name} overlaps {what}: row {row.get('_line', i + 1)} {why}; "
                            "remove it from the pool or use another pool")


def clear_of(pool: list[dict[str, str]], rows: Iterable[dict[str, Any]], *, pool_name: str = "preservation pool",
             what: str = "the data to learn") -> list[dict[str, str]]:
    """The pool rows that neither repeat nor mention anything of ``rows`` (the data being learned).

    A general pool can name what a user's facts change (the vendored pool asks for the capitals of
    countries no evaluation uses; a user may edit one of them): those rows would pull the edit back,
    so they are left out of this training, not refused. Refused: a pool with no row left.
    """
    prompts, terms = protected_terms(rows)
    kept = [row for row in pool if _overlap(row, prompts, terms) is None]
    if not kept:
        raise UserError(f"the {pool_name} is empty once the rows that repeat or mention {what} are left out "
                        f"({len(pool)} rows): give a pool of general prompts unrelated to {what}")
    return kept
