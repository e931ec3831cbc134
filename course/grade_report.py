"""The grader's outputs (``course.grade``): the gradebook's CSV text and the printed report."""

from __future__ import annotations

import csv
import io


def gradebook(reports: list, manifest: dict) -> str:
    """CSV text: one row per submission, one column per exercise (its status), in the manifest's order."""
    order = [e["check"] for chapter in manifest.values() for e in chapter["exercises"]]
    seen = {c["check"] for r in reports for c in r.checks}
    columns = [name for name in order if name in seen]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["notebook", "chapter", "score", "passed", "expected", *columns, "errors", "flagged"])
    for r in reports:
        statuses = {c["check"]: c["status"] for c in r.checks}
        writer.writerow([r.notebook, r.chapter or "", "" if r.score is None else f"{r.score:.4g}", r.passed,
                         r.expected, *[statuses.get(name, "") for name in columns], " | ".join(r.errors), r.flagged])
    return out.getvalue()


def print_report(report, out) -> None:
    score = "not graded" if report.score is None else f"{report.passed}/{report.expected} ({report.score:.0%})"
    print(f"{report.notebook}  [{report.chapter or '?'}]  {score}  {report.seconds:.0f} s", file=out)
    for c in report.checks:
        first = c["message"].splitlines()[0] if c["message"] else ""
        print(f"  {c['status']:14s} {c['check']:24s} {first}", file=out)
    for error in report.errors:
        print(f"  error: {error}", file=out)
    if report.flagged:
        print(f"  FLAGGED: {report.flagged}", file=out)
