"""griffe extension for the API reference: a docstring's ``Example:`` section is read as ``Examples:``.

The project's docstrings title their doctests ``Example:``; Google style (and griffe) know the plural, and would
otherwise render the doctest as prose. Nothing else of the docstring changes.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

SINGULAR = re.compile(r"^(?P<indent>\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = SINGULAR.sub(r"\g<indent>Examples:", obj.docstring.value)
