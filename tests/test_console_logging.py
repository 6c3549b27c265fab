"""What reaches the console: our own progress lines and real warnings; third-party INFO chatter only the log file.

The end-to-end check (faiss's loader lines in ``train.log``, not on the console of ``python train.py``) is in
tests/test_train.py; here the filter, Lightning's own handler and the command-line setup.
"""

from __future__ import annotations

import doctest
import logging

import metricsearch.utils.console_logging as console_logging
from metricsearch.cli.args import Command, run_command
from metricsearch.utils.console_logging import LIGHTNING_LOGGERS, ConsoleFilter, quiet_lightning_console


def test_doctests():
    assert doctest.testmod(console_logging).failed == 0


def _record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "message", None, None)


def test_the_filter_keeps_our_lines_and_warnings_and_drops_chatter():
    console = ConsoleFilter()
    kept = [("metricsearch.data.synthetic", logging.INFO), ("__main__", logging.DEBUG), ("torch", logging.WARNING),
            ("faiss.loader", logging.ERROR), ("lightning.pytorch", logging.ERROR)]  # fmt: skip
    dropped = [("faiss.loader", logging.INFO), ("faiss", logging.WARNING), ("matplotlib.font_manager", logging.WARNING),
               ("lightning.pytorch.utilities.rank_zero", logging.INFO), ("metricsearchx", logging.INFO)]  # fmt: skip
    assert all(console.filter(_record(name, level)) for name, level in kept)
    assert not any(console.filter(_record(name, level)) for name, level in dropped)


def test_lightnings_console_handler_is_quieted_but_its_records_still_reach_the_root(caplog):
    import lightning  # noqa: F401  (attaches its own console handler to the "lightning" logger)

    handlers = [
        h for name in LIGHTNING_LOGGERS for h in logging.getLogger(name).handlers if type(h) is logging.StreamHandler
    ]
    assert handlers
    quiet_lightning_console()
    assert all(h.level >= logging.WARNING for h in handlers)
    with caplog.at_level(logging.INFO):
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False")
    assert "GPU available: False" in caplog.text  # what the run's log file receives


def test_a_command_line_keeps_the_chatter_off_its_console(capsys):
    def body(args) -> int:
        logging.getLogger("faiss.loader").warning("Could not load library with AVX512 support")
        logging.getLogger("matplotlib.font_manager").warning("Matplotlib is building the font cache")
        logging.getLogger("metricsearch.cli.test").info("Embedded 1/1 batches")
        return 0

    root = logging.getLogger()
    before = list(root.handlers)
    for handler in before:
        root.removeHandler(handler)  # basicConfig only configures a root logger without handlers
    try:
        assert run_command(Command(name="probe", summary="", options={}), [], body) == 0
        err = capsys.readouterr().err
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in before:
            root.addHandler(handler)
    assert "Embedded 1/1 batches" in err
    assert "AVX512" not in err and "font cache" not in err
