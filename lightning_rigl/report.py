"""How SparsityMonitor shows a run to a person: the per-layer table and the density and update figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning_rigl.core import UpdateRecord


def optional_import(module: str) -> Any:
    """The module, or None when it is not installed (rich and matplotlib are optional).

    Example:
        >>> optional_import("no_such_module") is None
        True
    """
    try:
        return __import__(module)
    except ImportError:
        return None


def si(value: float) -> str:
    """A number with an SI suffix and two decimals.

    Example:
        >>> si(7.03e6), si(672)
        ('7.03 M', '672')
    """
    for threshold, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.2f} {suffix}"
    return f"{value:.0f}"


def print_table(rows: list[list[str]], title: str) -> None:
    """Print a header row, body rows and a totals row: with rich when it is installed, plain text otherwise.

    The first column is left-aligned, the others right-aligned; the title's first line heads the table
    and its other lines go below it. A name wider than rich's column folds onto the next line rather
    than losing its end: in a transformer the end is what tells layers apart.

    Example:
        >>> rows = [["layer", "density"], ["fc.weight", "0.100"], ["total", "0.100"]]
        >>> print_table(rows, "At fit end")  # doctest: +SKIP
    """
    rich = optional_import("rich")
    if rich is not None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title.splitlines()[0], caption="\n".join(title.splitlines()[1:]) or None)
        for i, header in enumerate(rows[0]):
            # Names fold; numbers never wrap.
            table.add_column(header, justify="left" if i == 0 else "right", overflow="fold", no_wrap=i > 0)
        for row in rows[1:-1]:
            table.add_row(*row)
        table.add_section()
        table.add_row(*rows[-1], style="bold")
        Console().print(table)
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        " | ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    rule = "-+-".join("-" * w for w in widths)
    print("\n".join([title, lines[0], rule, *lines[1:-1], rule, lines[-1]]))


def draw_figure(
    densities: Mapping[str, float],
    numel: Mapping[str, int],
    history: Sequence[UpdateRecord],
    itop_curve: Sequence[tuple[int, float]],
) -> Any:
    """Per-layer densities as bars (the overall density dashed), and drop fraction and ITOP rate over steps.

    Args:
        densities: Layer name to fraction of active weights.
        numel: Layer name to its number of weights (for the overall density).
        history: The topology updates made so far.
        itop_curve: ``(optimizer step, ITOP rate)`` points.

    Returns:
        A matplotlib ``Figure`` (matplotlib must be installed).

    Example:
        >>> figure = draw_figure({"fc.weight": 0.1}, {"fc.weight": 100}, [], [])  # doctest: +SKIP
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 0.5 + 0.3 * max(len(densities), 8)), layout="constrained")
    bars, curves = figure.subplots(1, 2, width_ratios=[3, 2])
    names = list(densities)
    bars.barh(range(len(names)), [densities[name] for name in names])
    bars.set_yticks(range(len(names)), names, fontsize="small")
    bars.invert_yaxis()
    overall = sum(densities[name] * numel[name] for name in names) / max(sum(numel[name] for name in names), 1)
    bars.axvline(overall, color="black", linestyle="--", label=f"all watched weights: {overall:.3f}")
    bars.legend(loc="lower right")
    bars.set_xlim(0, 1)
    bars.set_xlabel("density (fraction of active weights)")
    bars.set_title("per-layer density")
    if history:
        curves.plot([r.step for r in history], [r.drop_fraction for r in history], "o-", label="drop fraction")
    if itop_curve:
        curves.plot(*zip(*itop_curve, strict=True), "s-", label="ITOP rate")
    curves.set_xlabel("optimizer step")
    curves.set_ylim(0, 1)
    curves.set_title("topology updates")
    if history or itop_curve:
        curves.legend()
    else:
        curves.text(0.5, 0.5, "no RigLCallback", ha="center", va="center", transform=curves.transAxes)
    return figure
