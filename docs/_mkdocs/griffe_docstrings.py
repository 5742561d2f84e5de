"""Griffe extension for the API reference: the package's docstrings read as Google style in MkDocs.

Two habits of the docstrings that Griffe's Google parser does not know: an ``Example:`` section (Griffe
reads only ``Examples:`` as doctests; any other title becomes an admonition whose ``>>>`` lines render as
nested quotes), and Sphinx roles such as ``:meth:`~pkg.Class.name```, which render with the role's text.
Both are rewritten before the docstring is parsed; the source is left as it is.
"""

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:attr|class|data|exc|func|meth|mod|obj):`(~?)([^`]+)`")


def _role_text(match: re.Match[str]) -> str:
    """The code span a Sphinx role shows: the last dotted part after ``~``, else the whole target."""
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


def as_google(text: str) -> str:
    r"""``text`` with ``Example:`` sections titled ``Examples:`` and Sphinx roles turned into code spans.

    Example:
        >>> as_google("Call :meth:`~pkg.Run.step` or :func:`pkg.go`.\n\nExample:\n    run()")
        'Call `step` or `pkg.go`.\n\nExamples:\n    run()'
    """
    return _ROLE.sub(_role_text, _EXAMPLE.sub(r"\1Examples:", text))


class GoogleDocstrings(griffe.Extension):
    """Rewrite each loaded object's docstring with :func:`as_google`."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite ``obj``'s docstring, if it has one, before anything parses it."""
        if obj.docstring is not None:
            obj.docstring.value = as_google(obj.docstring.value)
