"""One table and figures of all runs under a dir: `python scripts/report.py logs/multiruns/<time>`."""

import argparse
import sys
from pathlib import Path

from digits.report import find_runs, markdown_table, report, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="a log root, multirun dir or sweep dir")
    parser.add_argument("--out", type=Path, help="where to write (default: <root>/report)")
    parser.add_argument("--results", type=Path, help="also write the per-experiment results table here (Markdown)")
    parser.add_argument("--note", default="", help="a paragraph to put under the results table's title")
    args = parser.parse_args()
    if not args.root.is_dir():
        sys.exit(f"error: {args.root} is not a directory; expected a log root or a sweep dir")
    runs = find_runs(args.root)
    if not runs:
        sys.exit(f"error: no finished run (a directory with metrics.json and .hydra/) under {args.root}")
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        command = f"python scripts/report.py {args.root} --results {args.results}"
        write_results(args.root, args.results, command, f"{args.note}\n\n" if args.note else "")
    result = report(args.root, runs, args.out)
    print(markdown_table(result["runs"]))
    print(f"{len(result['figures'])} figures, report.md and runs.csv in {result['out']}")


if __name__ == "__main__":
    main()
