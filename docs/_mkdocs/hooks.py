"""MkDocs hooks: the site shows README, BENCHMARKS and CHANGELOG from the repository root, links included.

Each of those files has a page in ``docs/`` that holds only a link to it (so the page reads well on a
repository browser); on the site the page shows the root file instead. Links are written for the
repository's layout (``docs/faq.md`` from README, ``../BENCHMARKS.md`` from a guide) and rewritten here
for the site's, so ``mkdocs build --strict`` still checks every one of them.
"""

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
#: Site page -> the root file it shows.
INCLUDED = {"index.md": "README.md", "benchmarks.md": "BENCHMARKS.md", "changelog.md": "CHANGELOG.md"}
PAGE_OF = {root: page for page, root in INCLUDED.items()}
_ROOT_FILE = "|".join(re.escape(name) for name in PAGE_OF)
_LINK_INTO_DOCS = re.compile(r"\]\(docs/")
_LINK_TO_ROOT_FILE = re.compile(rf"\]\(({_ROOT_FILE})")


def site_links_of_root_file(text: str) -> str:
    """A root file's links as the site needs them: ``docs/x.md`` -> ``x.md``, ``README.md`` -> ``index.md``.

    Example:
        >>> site_links_of_root_file("[a](docs/faq.md#x), [b](BENCHMARKS.md), [c](CHANGELOG.md)")
        '[a](faq.md#x), [b](benchmarks.md), [c](changelog.md)'
    """
    text = _LINK_INTO_DOCS.sub("](", text)
    return _LINK_TO_ROOT_FILE.sub(lambda m: "](" + PAGE_OF[m.group(1)], text)


def site_links_of_guide(text: str, depth: int = 0) -> str:
    """A guide's links to root files as the site needs them: ``../BENCHMARKS.md`` -> ``benchmarks.md``.

    ``depth`` is the number of folders between ``docs/`` and the guide (1 for ``docs/api/x.md``).

    Example:
        >>> site_links_of_guide("[a](../README.md#install), [b](faq.md)")
        '[a](index.md#install), [b](faq.md)'
        >>> site_links_of_guide("[a](../../BENCHMARKS.md)", depth=1)
        '[a](../benchmarks.md)'
    """
    to_root = re.compile(rf"\]\({re.escape('../' * (depth + 1))}({_ROOT_FILE})")
    return to_root.sub(lambda m: "](" + "../" * depth + PAGE_OF[m.group(1)], text)


def on_page_markdown(markdown: str, *, page: Any, **kwargs: Any) -> str:
    """The page's Markdown for the site: a root file's text in place of its stub, links rewritten."""
    root_file = INCLUDED.get(page.file.src_uri)
    if root_file is not None:
        return site_links_of_root_file((ROOT / root_file).read_text(encoding="utf-8"))
    return site_links_of_guide(markdown, page.file.src_uri.count("/"))
