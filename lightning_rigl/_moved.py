"""The root modules of release 0.1.0 that moved: their names, and where each lives now.

Served like the core's (see :mod:`lightning_rigl.core._moved`), from a table of their own: the core names
nothing of the adapters.
"""

_CORE = "lightning_rigl.core"

#: Old module path -> its public names -> where each lives now (module path and name).
MOVED: dict[str, dict[str, str]] = {
    "lightning_rigl.callback": {
        "Kernels": f"{_CORE}.kernels.choice.Kernels",
        "RigLCallback": "lightning_rigl.adapters.callback.RigLCallback",
    },
    "lightning_rigl.monitor": {
        "SparsityMonitor": "lightning_rigl.adapters.monitor.SparsityMonitor",
    },
    "lightning_rigl.inference": {
        "FixedMasks": f"{_CORE}.kernels.sparsify.FixedMasks",
        "sparsify": f"{_CORE}.kernels.sparsify.sparsify",
    },
    "lightning_rigl.report": {
        "density": f"{_CORE}.flops.report.density",
        "draw_figure": f"{_CORE}.flops.report.draw_figure",
        "optional_import": f"{_CORE}.flops.report.optional_import",
        "print_table": f"{_CORE}.flops.report.print_table",
        "si": f"{_CORE}.flops.report.si",
        "summary": f"{_CORE}.flops.report.summary",
        "table_rows": f"{_CORE}.flops.report.table_rows",
    },
}
