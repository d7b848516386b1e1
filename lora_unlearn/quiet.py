"""Known-harmless library messages, filtered once at the CLI and API entry.

Each entry below is a message that reads like a failure but is not one on a supported setup:
bitsandbytes' optional CPU kernel package (``kernels``) missing, transformers' deprecation notices
for arguments it passes to itself, and the per-load "Loading weights" bar. Everything else,
real warnings included, still shows. ``lora-unlearn --verbose`` or ``LORA_UNLEARN_VERBOSE=1``
turns the filter off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

# (category, regex matched against the start of the message), as ``warnings.filterwarnings`` takes them.
KNOWN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (FutureWarning, r"`past_key_values` is deprecated"),
)
# logger name -> message prefix
KNOWN_LOGS: dict[str, str] = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}


class _DropKnown(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_installed: list[tuple[logging.Logger, logging.Filter]] = []
_warning_filters: list[tuple] = []


def verbose() -> bool:
    return os.environ.get("LORA_UNLEARN_VERBOSE", "").strip().lower() not in ("", "0", "false", "no")


def quiet_known_messages() -> None:
    """Install the filters once (no-op when verbose or already installed)."""
    if verbose() or _installed:
        return
    for category, pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
        _warning_filters.append(warnings.filters[0])
    for name, prefix in KNOWN_LOGS.items():
        logger, drop = logging.getLogger(name), _DropKnown(prefix)
        logger.addFilter(drop)
        _installed.append((logger, drop))


def show_everything() -> None:
    """Undo :func:`quiet_known_messages` (``--verbose``) and keep it off for this process."""
    os.environ["LORA_UNLEARN_VERBOSE"] = "1"
    for logger, drop in _installed:
        logger.removeFilter(drop)
    for entry in _warning_filters:
        with contextlib.suppress(ValueError):
            warnings.filters.remove(entry)
    _installed.clear()
    _warning_filters.clear()
    warnings._filters_mutated()  # the warnings module caches its filter decisions


@contextlib.contextmanager
def no_loading_bar():
    """transformers' "Loading weights" bar off for one load (unless verbose), restored after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was and not verbose():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
