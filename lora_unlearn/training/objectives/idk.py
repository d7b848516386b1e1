"""IDK, "I don't know" fine-tuning (TOFU, Maini et al., "TOFU: A Task of Fictitious Unlearning
for LLMs", 2024, arXiv 2401.06121): answer the forget questions with refusals.

    forget rows (q, a)  ->  (q, r),  r drawn uniformly from resources/idontknow.txt
    L = NLL_idk + alpha * NLL_r

NLL_* is the mean answer-token NLL of one batch of the stream. The 100 refusals are TOFU's
``data/idontknow.jsonl`` (MIT, see resources/README.md). Two deliberate differences from TOFU's
code (locuslab/tofu: ``data_module.py`` draws the refusals, ``dataloader.py`` has the loss):
- TOFU draws a fresh refusal each time a row is read; here each row gets one refusal, drawn once
  with ``random.Random(seed)`` (the run's seed, recorded in the lineage), so the rows trained on
  can be rebuilt from the forget data and the seed.
- TOFU takes one token mean over the concatenated idk + retain batch, which weights the streams
  by their token counts; here the two stream means are added (alpha = 1), as in GradDiff.
"""

from __future__ import annotations

import random
from functools import cache
from importlib import resources

from ...errors import UserError
from . import register
from .common import nll


@cache
def refusals() -> tuple[str, ...]:
    text = resources.files("lora_unlearn").joinpath("resources", "idontknow.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def swap_answers(streams: dict[str, list], seed: int, params: dict) -> dict[str, list]:
    """The streams with every forget answer replaced by a seeded draw from :func:`refusals`."""
    if any("question" not in row for row in streams["forget"]):
        raise UserError("objective 'idk' needs question/answer rows in the forget stream (it answers the "
                        "questions with refusals); got plain text rows")
    rng = random.Random(seed)
    choices = refusals()
    return {**streams, "forget": [{"question": row["question"], "answer": rng.choice(choices)}
                                  for row in streams["forget"]]}


@register("idk", streams=("forget", "retain"), defaults={"alpha": 1.0}, prepare=swap_answers,
          reference="TOFU IDK baseline (Maini et al. 2024, arXiv 2401.06121)")
def idk(model, batches, alpha):
    return nll(model, batches["forget"]) + alpha * nll(model, batches["retain"])
