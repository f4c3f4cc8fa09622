"""Markdown pages from templates, tables from DataFrames.

Every report page is a Jinja2 template in `fersynth/templates/*.md.j2`; every table on it is a
DataFrame built by one small function next to the page's writer and rendered here with
`DataFrame.to_markdown` (tabulate's pipe tables). The comparison table with its bold maxima is
the one exception (`fersynth.compare.to_markdown`): its exact text is tracked by DVC.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2
    import pandas as pd

MISSING = "-"  # an empty cell: a class without images, a skipped row


@functools.cache
def environment() -> jinja2.Environment:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("fersynth", "templates"),
        keep_trailing_newline=True,
        trim_blocks=True,  # a line holding only {% ... %} leaves no blank line behind
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,  # a missing value is a bug, not an empty cell
        autoescape=False,  # Markdown, not HTML
    )


def template(name: str) -> jinja2.Template:
    return environment().get_template(name)


def render(name: str, **values: Any) -> str:
    """The page `templates/<name>` filled with `values`."""
    return template(name).render(**values)


def table(
    frame: pd.DataFrame,
    formats: Mapping[str, str] | None = None,
    *,
    default: str = "g",
    preformatted: bool = False,
) -> str:
    """`frame` as a pipe table, its index as the first column (named by the index name).

    `formats`: a format spec per column name (".1f", "+.2f"); other float columns use
    `default`. Integers are written as they are, empty cells (NaN, None) as "-", and a
    pipe inside a text cell is escaped. `preformatted`: the cells are text already written
    ("+2.00 ± 0.50 *") and stay exactly as they are.
    """
    formats = dict(formats or {})
    unknown = set(formats) - set(frame.columns)
    if unknown:
        raise KeyError(f"formats for columns the table does not have: {sorted(unknown)}")
    floatfmt = [default, *(formats.get(column, default) for column in frame.columns)]
    shown = frame.map(_cell).astype(object).where(frame.notna(), None)
    shown.index = shown.index.map(_cell)
    return shown.to_markdown(floatfmt=floatfmt, missingval=MISSING, disable_numparse=preformatted)


def _cell(value: Any) -> Any:
    """A text cell with its pipes escaped (a pipe would end the cell); other values as they are."""
    return value.replace("|", "\\|") if isinstance(value, str) else value
