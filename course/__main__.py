"""The course's command line: ``python -m course <group> <command>`` (see ``--help``)."""

from __future__ import annotations

import argparse
import json
import sys


def _notebooks(args) -> int:
    from course import notebooks

    if args.command == "build":
        changed = notebooks.build()
        for path in changed:
            print(f"wrote {path.relative_to(notebooks.ROOT)}")
        print(f"{len(changed)} notebook(s) changed" if changed else "notebooks/ already up to date")
        return 0
    if args.command == "check":
        problems = notebooks.check()
        for line in problems:
            print(line)
        if problems:
            print("Student notebooks are out of date: run `python -m course notebooks build`.")
            return 1
        print("notebooks/ matches solutions/")
        return 0
    rows = notebooks.run_solutions(args.paths or None)
    print(f"\n{'notebook':40s} {'seconds':>8s}  status")
    for name, seconds, status in rows:
        print(f"{name:40s} {seconds:8.1f}  {status}")
    return 0 if all(status == "ok" for _, _, status in rows) else 1


def _model(args) -> int:
    from course import models

    try:
        if args.command == "prepare":
            source = models.resolve_model()
            if source.kind == "embedded":
                models.prepare_embedded()
            elif source.kind == "hub":
                from huggingface_hub import snapshot_download

                snapshot_download(source.path)
            print(f"base model: {source}")
            return 0
        info = models.model_info(args.name)
    except models.ModelNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:11s} {value:,}" if isinstance(value, int) else f"{key:11s} {value}")
    return 0


def _adapters(args) -> int:
    from course.adapters import build_all

    build_all(names=args.names or None, steps=args.steps, out_dir=args.out)
    return 0


def _site(args) -> int:
    from course import site

    html, warnings = site.build(quiet=True)
    for line in warnings:
        print(line)
    print(f"site built in {html.relative_to(site.ROOT)}: open {(html / 'index.html').relative_to(site.ROOT)}"
          + (f" ({len(warnings)} warnings)" if warnings else ""))
    return 1 if warnings else 0


def _grade(args) -> int:
    from course.grade import grade_many

    return grade_many(args.paths, as_json=args.json, csv_path=args.csv, quick=args.quick, timeout=args.timeout,
                      run=not args.no_execute, assignment=args.assignment)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["finetune"]:  # its flags are its own: python -m course finetune --help
        from course.finetune import main as finetune

        return finetune(argv[1:])
    if argv[:1] == ["gpu-check"]:  # make gpu-check; its flags are its own too
        from course.gpu_check import main as gpu_check

        return gpu_check(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m course", description=__doc__)
    groups = parser.add_subparsers(dest="group", required=True)

    nb = groups.add_parser("notebooks", help="build, check or run the notebooks")
    nb.add_argument("command", choices=["build", "check", "run"])
    nb.add_argument("paths", nargs="*", help="(run) solution notebooks to run; default all")
    nb.set_defaults(func=_notebooks)

    model = groups.add_parser("model", help="the base model: where it comes from")
    model.add_argument("command", choices=["info", "prepare"])
    model.add_argument("--name", help="a hub id or local directory (default: COURSE_MODEL or SmolLM2)")
    model.add_argument("--json", action="store_true")
    model.set_defaults(func=_model)

    adapters = groups.add_parser("adapters", help="retrain the adapters shipped with the course")
    adapters.add_argument("command", choices=["build"])
    adapters.add_argument("names", nargs="*", help="which adapters (default: all)")
    adapters.add_argument("--steps", type=int, help="override the recipe's step count (a quick try; the result is not what ships)")
    adapters.add_argument("--out", help="write the adapters into this folder instead of the package "
                          "(for another base model: then set COURSE_ADAPTERS to it)")
    adapters.set_defaults(func=_adapters)

    grade = groups.add_parser("grade", help="grade student notebooks (files or folders)")
    grade.add_argument("paths", nargs="+", help="notebooks, or folders of notebooks")
    grade.add_argument("--json", action="store_true", help="print one JSON object per notebook")
    grade.add_argument("--csv", metavar="FILE", help="write a gradebook: one row per submission, one column per exercise")
    grade.add_argument("--timeout", type=float, default=900, metavar="S",
                       help="seconds a notebook may run before its kernel is stopped (default 900)")
    grade.add_argument("--quick", action="store_true", help="shrink training budgets (COURSE_QUICK=1)")
    grade.add_argument("--assignment", metavar="NN_name",
                       help="grade every file as this chapter (a notebook of another chapter gets an error row)")
    grade.add_argument("--no-execute", action="store_true",
                       help="judge the exercises without running the notebooks (no cell errors reported)")
    grade.set_defaults(func=_grade)

    site = groups.add_parser("site", help="build the course website from the solution notebooks (make site)")
    site.add_argument("command", choices=["build"])
    site.set_defaults(func=_site)

    from course.experiments.cli import add_parser as add_experiments

    add_experiments(groups)

    groups.add_parser("finetune", help="fine-tune a model with LoRA, DoRA, OLoRA or VeRA (see finetune --help)")
    groups.add_parser("gpu-check", help="every solution notebook on a CUDA device at the full budget, timed "
                      "(make gpu-check; see gpu-check --help)")

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
