"""How SparsityMonitor shows a run to a person: the per-layer table and the density and update figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from lightning_rigl.core.flops.count import FlopsCount
from lightning_rigl.core.history import UpdateRecord


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


def table_rows(
    params: Mapping[str, Tensor], active: Mapping[str, int], flops: FlopsCount | None, kernels: Mapping[str, str]
) -> list[list[str]]:
    """Header, one row per watched weight and a totals row; FLOPs shares are of the sparse forward FLOPs.

    Args:
        params: Watched weights by name.
        active: Active weights of each.
        flops: The model's FLOPs count (no FLOPs columns when None).
        kernels: Layer name to ``"sparse"`` / ``"dense"`` (a kernels column when not empty).

    Example:
        >>> import torch
        >>> table_rows({"fc.weight": torch.zeros(4, 5)}, {"fc.weight": 2}, None, {})[1]
        ['fc.weight', '4x5', '0.100', '2 / 20']
    """

    def share(name: str) -> float:
        if flops is None or name not in flops.per_layer or not flops.sparse:
            return 0.0
        return flops.per_layer[name].sparse / flops.sparse

    numel = {name: p.numel() for name, p in params.items()}
    rows = [[name, "x".join(map(str, p.shape)), active[name], numel[name], share(name)] for name, p in params.items()]
    rows.append(["total", "", sum(active.values()), sum(numel.values()), sum(share(name) for name in params)])
    header = ["layer", "shape", "density", "active weights"] + (["FLOPs share"] if flops is not None else [])
    table = [header] + [
        [name, shape, f"{density(n, total):.3f}", f"{n:,} / {total:,}"] + ([f"{part:.1%}"] if flops is not None else [])
        for name, shape, n, total, part in rows
    ]
    if kernels:
        # "-": a weight RigLCallback does not mask (the monitor's own include/exclude).
        total = f"{sum(choice == 'sparse' for choice in kernels.values())} sparse"
        column = ["kernels"] + [kernels.get(name, "-") for name in params] + [total]
        table = [row + [kernel] for row, kernel in zip(table, column, strict=True)]
    return table


def summary(when: str, flops: FlopsCount | None, train_flops: float, dense_train_flops: float) -> str:
    """The table's title and caption: when, forward FLOPs per sample, training FLOPs so far.

    Example:
        >>> summary("fit end", None, 0.0, 0.0)
        'SparsityMonitor at fit end'
    """
    lines = [f"SparsityMonitor at {when}"]
    if flops is not None:
        lines.append(
            f"forward FLOPs per sample: dense {si(flops.dense)}, sparse {si(flops.sparse)} ({flops.ratio:.3f}x)"
        )
        if dense_train_flops:
            lines.append(f"training FLOPs so far: {si(train_flops)} ({train_flops / dense_train_flops:.3f}x dense)")
    return "\n".join(lines)


def density(active: int, numel: int) -> float:
    """Fraction of active weights; 1.0 for a zero-size weight (a Linear with 0 features has no zeros).

    Example:
        >>> density(3, 12), density(0, 0)
        (0.25, 1.0)
    """
    return active / numel if numel else 1.0
