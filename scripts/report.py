"""One table and figures of all runs under a dir: `python scripts/report.py logs/multiruns/<time>`."""

import argparse
import sys
from pathlib import Path

from digits.report import markdown_table, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="a log root, multirun dir or sweep dir")
    parser.add_argument("--out", type=Path, help="where to write (default: <root>/report)")
    args = parser.parse_args()
    if not args.root.is_dir():
        sys.exit(f"error: {args.root} is not a directory; expected a log root or a sweep dir")
    result = report(args.root, args.out)
    if not result["runs"]:
        sys.exit(f"error: no finished run (a directory with metrics.json and .hydra/) under {args.root}")
    print(markdown_table(result["runs"]))
    print(f"{len(result['figures'])} figures, report.md and runs.csv in {result['out']}")


if __name__ == "__main__":
    main()
