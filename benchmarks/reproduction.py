"""The paper's ordering on a small task: dense, static, SET and RigL (ERK) at 80, 90 and 95 %.

    python benchmarks/reproduction.py       # 3 seeds each; prints a table, writes reproduction.json

Each run is `examples/digits.py` (an MLP on scikit-learn's digits, 40 epochs, delta_t=25,
t_end=0.75, SGD with Nesterov momentum and cosine learning rate); dense is the same run with
sparsity 0 and method "static" (no mask ever changes, nothing is zero).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import statistics
from pathlib import Path

EXAMPLE = Path(__file__).parent.parent / "examples" / "digits.py"


def load_example():
    spec = importlib.util.spec_from_file_location("digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", default="reproduction.json")
    args = parser.parse_args()
    digits = load_example()

    def accuracy(method: str, sparsity: float, seed: int) -> float:
        argv = ["--method", method, "--sparsity", str(sparsity), "--seed", str(seed), "--epochs", str(args.epochs)]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return digits.main(argv)["accuracy"]

    results = {"dense": {0.0: [accuracy("static", 0.0, seed) for seed in args.seeds]}}
    for method in ("static", "set", "rigl"):
        results[method] = {s: [accuracy(method, s, seed) for seed in args.seeds] for s in args.sparsities}

    print(f"{'method':<8}" + "".join(f"{f'S={s}':>18}" for s in args.sparsities))
    dense = results["dense"][0.0]
    print(f"{'dense':<8}" + f"{statistics.mean(dense) * 100:>12.2f} ± {statistics.stdev(dense) * 100:.2f}")
    for method in ("static", "set", "rigl"):
        cells = [
            f"{statistics.mean(v) * 100:>12.2f} ± {statistics.stdev(v) * 100:.2f}" for v in results[method].values()
        ]
        print(f"{method:<8}" + "".join(f"{c:>18}" for c in cells))
    gaps = {s: statistics.mean(results["rigl"][s]) - statistics.mean(results["static"][s]) for s in args.sparsities}
    print("RigL - static (points): " + ", ".join(f"S={s}: {g * 100:+.2f}" for s, g in gaps.items()))
    with open(args.out, "w") as f:
        table = {method: {str(s): v for s, v in row.items()} for method, row in results.items()}
        json.dump({"args": vars(args), "results": table}, f)


if __name__ == "__main__":
    main()
