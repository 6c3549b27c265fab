"""What reaches the console of a run: our own progress lines and real warnings, not third-party INFO chatter.

A training run logs to two places (``conf/hydra/default.yaml``): the run's log file gets every record, the console
only those :class:`ConsoleFilter` lets through. faiss's loader announces each instruction set it tries at import
("Could not load library with AVX512 support due to: ModuleNotFoundError(...)", harmless: faiss picks the best
one it has), matplotlib announces building its font cache, Lightning prints which accelerators it found; all of it
stays in the log file. Kept cheap to import: Hydra loads it while it configures logging, before torch.
"""

from __future__ import annotations

import logging

__all__ = ["CHATTY_LOGGERS", "LIGHTNING_LOGGERS", "OWN_LOGGERS", "ConsoleFilter", "quiet_lightning_console"]

# Loggers whose INFO lines are progress the user asked for.
OWN_LOGGERS = ("metricsearch", "__main__")
# Third-party loggers whose warnings are chatter too (matplotlib's "building the font cache" is a WARNING): only
# their errors reach the console.
CHATTY_LOGGERS = ("faiss", "matplotlib")
# The loggers Lightning may give console handlers of their own (the package, and its two halves when imported before
# logging was configured).
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


def _under(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


class ConsoleFilter(logging.Filter):
    """Lets through our own records of any level, other libraries' warnings and errors, chatty ones' errors.

    Example:
        >>> console = ConsoleFilter()
        >>> record = lambda name, level: logging.LogRecord(name, level, __file__, 1, "message", None, None)
        >>> console.filter(record("metricsearch.pipelines.train", logging.INFO))
        True
        >>> console.filter(record("faiss.loader", logging.INFO)), console.filter(record("lightning.pytorch", 20))
        (False, False)
        >>> console.filter(record("torch", logging.WARNING)), console.filter(record("matplotlib.font_manager", 30))
        (True, False)
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if _under(record.name, OWN_LOGGERS):
            return True
        if _under(record.name, CHATTY_LOGGERS):
            return record.levelno >= logging.ERROR
        return record.levelno >= logging.WARNING


def quiet_lightning_console(level: int = logging.WARNING) -> None:
    """Raises the console handlers ``import lightning`` attaches to its own loggers to ``level``.

    Lightning prints its INFO lines ("GPU available: False", "Seed set to 42") through those handlers, beside the
    root logger's. Its records are passed on to the root logger (Lightning stops them there when it was imported
    before logging was configured), so the run's log file keeps them.
    """
    # A logging configuration applied after Lightning was imported (``dictConfig`` disables the loggers it does not
    # name) would drop its records altogether: they belong in the log file.
    for name, existing in list(logging.root.manager.loggerDict.items()):
        if isinstance(existing, logging.Logger) and _under(name, LIGHTNING_LOGGERS):
            existing.disabled = False
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        own = [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]
        own = [h for h in own if not isinstance(h, logging.FileHandler)]
        for handler in own:
            handler.setLevel(max(handler.level, level))
        if own:
            logger.propagate = True
