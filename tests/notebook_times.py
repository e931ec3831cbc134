"""Rewrite ``tests/notebook_times.json`` from the times a test run recorded (run by hand).

    COURSE_RECORD_TIMES=/tmp/times.jsonl make test      # or only tests/test_notebooks_execute.py
    .venv/bin/python tests/notebook_times.py /tmp/times.jsonl [more.jsonl ...]

Each file holds one JSON line per notebook run (``test_notebooks_execute._record``). Kinds not in
the new files keep their old times; the processor of the new times is recorded beside them.
"""

import datetime
import json
import sys
from pathlib import Path

TARGET = Path(__file__).with_name("notebook_times.json")


def main(paths: list[str]) -> None:
    table = json.loads(TARGET.read_text())
    rows = [json.loads(line) for path in paths for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        sys.exit("no recorded times in " + ", ".join(paths))
    processors = {f"{r['processor']} (bfloat16 {r['bfloat16']})" for r in rows}
    measured = set()
    for row in rows:
        table["seconds"].setdefault(row["kind"], {})[row["notebook"]] = row["seconds"]
        measured.add(f"{row['kind']}/{row['notebook']}")
    unmeasured = sorted(f"{kind}/{nb}" for kind, times in table["seconds"].items() for nb in times
                        if f"{kind}/{nb}" not in measured and f"{kind}/{nb}" in table.get("not measured", [f"{kind}/{nb}"]))
    table["not measured"] = unmeasured  # still the provisional figure: measure them with the next run
    table["processor"] = "; ".join(sorted(processors))
    table["measured"] = datetime.date.today().isoformat()
    TARGET.write_text(json.dumps(table, indent=1) + "\n")
    print(f"{len(rows)} times from {table['processor']} written to {TARGET}")


if __name__ == "__main__":
    main(sys.argv[1:])
