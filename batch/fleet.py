"""CI fleet commands: `dhbatch report merge` (the shards' reports as one). Registered by batch/cli.py, whose error
handling they share: they raise batch.errors types and print only their results."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from batch.manifest import display_path

EXIT_OK, EXIT_FAILED = 0, 1


def add_parsers(sub: argparse._SubParsersAction, common: Callable[..., None]) -> None:
    sp = sub.add_parser("report", help="work on build reports: `report merge` combines the shards' reports")
    reports = sp.add_subparsers(dest="report_command", required=True, metavar="ACTION")
    merge = reports.add_parser(
        "merge",
        help="combine build/<manifest>/report.shard-I-of-N.json into report.json and report.html",
        description="Run it where the shard jobs' build/<manifest>/ folders were gathered into one.",
    )
    merge.add_argument("-v", "--verbose", dest="verbose_after", action="count", default=0, help=argparse.SUPPRESS)
    merge.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    merge.add_argument("folder", type=Path, metavar="FOLDER", help="build/<manifest>/ holding the shard reports")


def cmd_report(args: argparse.Namespace) -> int:
    from batch.report import merge_reports

    merged = merge_reports(args.folder)
    for name in merged.ignored:
        print(f"ignored {name}: another split than the newest ({merged.count} shards)")
    counts = ", ".join(f"{n} {status}" for status, n in merged.summary.items() if n)
    print(
        f"merged {len(merged.found)}/{merged.count} shards: {counts} — report: "
        f"{display_path(merged.report.with_suffix('.html'))}"
    )
    if merged.missing:
        print(
            f"missing shards: {', '.join(f'{i}/{merged.count}' for i in merged.missing)} (their jobs wrote no report)"
        )
    bad = merged.summary.get("failed", 0) + merged.summary.get("skipped", 0)
    return EXIT_FAILED if bad or merged.missing else EXIT_OK


COMMANDS = {"report": cmd_report}
