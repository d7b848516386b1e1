"""Cards of adapter folders on disk: rewrite one (``lora-unlearn card``), or say what a folder holds.

The card itself (what it says, and why a forget adapter's card warns) is
:mod:`lora_unlearn.core.card`; the rule that classifies an adapter is :mod:`lora_unlearn.core.lineage`.
"""

from __future__ import annotations

from pathlib import Path

from ..core.adapter_io import load_adapter
from ..core.card import check_ours, save_card
from ..core.lineage import Kind, classify_folder


def write_card(folder: str | Path, adapter=None, name: str | None = None, force: bool = False,
               results: str | Path | None = None) -> Path:
    """(Re)write ``folder/README.md`` from the adapter's lineage, results and recipe.

    ``adapter`` defaults to the folder's own (loaded and validated); ``name`` to the folder's
    name. A README.md that this library did not write is replaced only with ``force``.
    ``results``: an ``eval --out`` folder or its results.json; by default the one beside the
    adapter, else the newest under the run folder that evaluated this adapter.
    """
    check_ours(folder, force)  # before loading: a foreign README.md is the first thing to fix
    return save_card(folder, adapter if adapter is not None else load_adapter(folder), name, force=True,  # checked
                     results=results)


def kind_of(folder: str | Path, adapter=None) -> Kind:
    """Classify the adapter in ``folder`` (lineage plus the recipe hint); ``adapter`` defaults to the folder's own."""
    return classify_folder(folder, adapter if adapter is not None else load_adapter(folder))
