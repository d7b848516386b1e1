"""Evaluation: TOFU's unlearning metrics (``tofu``), knowledge-edit metrics (``edits``) and result tables (``report``).

Importing this package loads torch but not transformers or PEFT; the model functions import
them when called.
"""

from .edits import evaluate_edits, key_span, mentions
from .report import markdown, tables, write_results
from .tofu import (
    SPLITS,
    evaluate_split,
    evaluate_tofu,
    extraction_strength,
    forget_quality,
    model_utility,
    normalised_probability,
    probability_score,
    rouge_l_recall,
    tofu_mini_splits,
    tofu_splits,
    truth_ratio,
    truth_ratio_summary,
)

__all__ = [
    "SPLITS", "evaluate_edits", "evaluate_split", "evaluate_tofu", "extraction_strength", "forget_quality", "key_span",
    "markdown", "mentions", "model_utility", "normalised_probability", "probability_score", "rouge_l_recall", "tables",
    "tofu_mini_splits", "tofu_splits", "truth_ratio", "truth_ratio_summary", "write_results",
]
