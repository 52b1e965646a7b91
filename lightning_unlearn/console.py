"""A quiet console for the commands: Lightning's messages that are noise for this project's uses, silenced narrowly.

:func:`quiet` is a context manager the commands (``train``, ``unlearn``, ``demo``, the request pipeline) put around
the calls that cause the messages; nothing is silenced at import or outside those blocks, and every other warning and
log line passes. Each entry below says why the message is noise here:
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

#: Warnings (message regexes) that say nothing actionable in these commands.
NOISE_WARNINGS = (
    # one-step methods write their update directly: they have no optimizer by design
    r".*configure_optimizers` returned `None`",
    # a one-step request has a handful of batches; its results are logged per epoch, not per step
    r"The number of training batches .* is smaller than the logging interval",
    # unlearning runs the network in eval mode on purpose (BatchNorm statistics and dropout frozen)
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # a deprecation inside Lightning's own use of torch's pytree (nothing a user of this package can change)
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
    # the commands hand LightningCLI their arguments explicitly (sys.argv must stay as it is for DDP's launcher)
    r"LightningCLI's args parameter is intended to run from within Python",
)
#: Log lines (regexes) of Lightning's rank-zero and seed loggers that are noise in these commands.
NOISE_LOGS = (
    r"💡 Tip: For seamless cloud",  # advertisements (litlogger, litmodels), repeated by every Trainer
    r"GPU available: ",
    r"TPU available: ",
    r"HPU available: ",
    r"Seed set to ",
    r"`Trainer.fit` stopped: `max_epochs=\d+` reached",  # every request is one fit of its planned epochs
)
#: Where those lines are logged (``rank_zero_info`` logs through whichever of the two rank-zero loggers was set last).
LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
)


class _DropNoise(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Within the block, drop :data:`NOISE_WARNINGS` and :data:`NOISE_LOGS`; everything else passes as usual."""
    drop = _DropNoise(NOISE_LOGS)
    loggers = [logging.getLogger(name) for name in LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for pattern in NOISE_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


__all__ = ["NOISE_LOGS", "NOISE_WARNINGS", "quiet"]
