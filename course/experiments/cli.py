"""``python -m course experiments list [--json] [--quick]``, ``table [--readme [PATH]]`` and
``run NAME [--seeds N] [--quick]``."""

from __future__ import annotations

import argparse
import json
import sys


def seeds_argument(text: str) -> int:
    """argparse type for ``--seeds``: a whole number of at least 2."""
    from course.experiments.runner import check_seeds

    try:
        return check_seeds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(groups) -> None:
    parser = groups.add_parser("experiments", help="the notebooks' comparisons: list their results, or run one")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="every experiment: arms' means and 95%% intervals, the verdict")
    listing.add_argument("--json", action="store_true", help="one JSON list (name, chapter, metric, seeds, arms, "
                         "difference, decided, better)")
    listing.add_argument("--quick", action="store_true", help="the quick-budget results (smoke tests) instead")
    table = commands.add_parser("table", help="the README's table: every experiment's arms and verdict, in markdown")
    table.add_argument("--readme", metavar="PATH", nargs="?", const="README.md", default=None,
                       help="write it between the markers of this README (default README.md) instead of printing")
    running = commands.add_parser("run", help="run (or complete) one experiment, reusing finished seeds")
    running.add_argument("name", help="an experiment's name (see `experiments list`)")
    running.add_argument("--seeds", type=seeds_argument, default=None, metavar="N",
                         help="seeds 0 to N-1 (default: the experiment's own, 5)")
    running.add_argument("--quick", action="store_true", help="the smallest budget: checks the code path, "
                         "stored apart, never a result")
    running.add_argument("--ship", action="store_true", help="write into the package's shipped results "
                         "(course maintainers) instead of COURSE_RESULTS")
    running.add_argument("--replace-stale", action="store_true", help="overwrite results made by other code")
    parser.set_defaults(func=main)


def main(args) -> int:
    from course import experiments

    if args.command == "list":
        summaries = experiments.summarise_all(quick=args.quick)
        if args.json:
            for s in summaries:
                if s.stale:
                    print(f"note: {s.name}: results are stale (made by code {s.fingerprint[:12]}, "
                          f"now {experiments.code_fingerprint()[:12]})", file=sys.stderr)
            print(json.dumps([s.to_json() for s in summaries], indent=2))
        else:
            print("\n\n".join(experiments.describe(s) for s in summaries))
        return 0
    if args.command == "table":
        from course.experiments.show import markdown_table, update_readme

        if args.readme is None:
            print(markdown_table())
            return 0
        try:
            changed = update_readme(args.readme)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"{args.readme}: " + ("table updated" if changed else "table already current"))
        return 0
    if args.ship and args.quick:
        print("error: quick results are smoke tests and are not shipped: drop --quick or --ship", file=sys.stderr)
        return 2
    try:
        report = experiments.run(args.name, args.seeds, quick=args.quick, ship=args.ship,
                                 replace_stale=args.replace_stale)
    except (experiments.UnknownExperimentError, experiments.ExperimentBusyError, experiments.StaleResultsError,
            experiments.StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(experiments.describe(experiments.summarise(report.experiment, quick=args.quick)))
    return 0
