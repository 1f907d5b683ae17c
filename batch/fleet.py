"""CI fleet commands: `report merge` (the shards' reports as one), `push` / `pull` (the remote step cache by hand),
the remote cache options of `build`, and `gc --remote`. Registered by batch/cli.py, whose error handling they share:
they raise batch.errors types and print only their results."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batch.errors import UsageError
from batch.manifest import display_path, project_root

if TYPE_CHECKING:
    from batch.remote import RemoteCache

logger = logging.getLogger("batch")

EXIT_OK, EXIT_FAILED = 0, 1


def add_parsers(sub: argparse._SubParsersAction, common: Callable[..., None], shard_arg: Callable[[str], Any]) -> None:
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

    for name, text in (
        ("push", "upload the manifest's steps built here to the remote cache"),
        ("pull", "download the manifest's steps from the remote cache (a following build only publishes)"),
    ):
        sp = sub.add_parser(name, help=text)
        common(sp)
        sp.add_argument("--only", nargs="+", default=[], metavar="ID", help="only these video ids")
        sp.add_argument("--shard", type=shard_arg, metavar="I/N", help="only shard I of N")
        add_remote_options(sp, build=False)
        sp.set_defaults(force=[])


def add_remote_options(sp: argparse.ArgumentParser, build: bool = True) -> None:
    sp.add_argument(
        "--remote",
        metavar="URL",
        help="shared step cache: an fsspec URL, file:///path or s3://bucket/prefix (default: `remote` in dhbatch.toml "
        "or [tool.dhbatch] of pyproject.toml)",
    )
    sp.add_argument("--no-remote", action="store_true", help="ignore the configured remote cache")
    if build:
        sp.add_argument("--remote-read-only", action="store_true", help="download hits, never upload (untrusted jobs)")
        sp.add_argument(
            "--remote-required", action="store_true", help="fail when the remote cannot be used (default: warn)"
        )


def add_gc_options(sp: argparse.ArgumentParser) -> None:
    add_remote_options(sp, build=False)
    sp.add_argument(
        "--older-than",
        type=float,
        metavar="DAYS",
        help="with --remote: remove the remote entries uploaded more than DAYS ago, whatever reaches them",
    )


def open_remote(
    args: argparse.Namespace, root: Path, required_by_command: bool = False, reading: bool = False
) -> RemoteCache | None:
    """The remote cache the options and the project config name, checked; None when there is none, or when it cannot
    be used and is not required (a warning: the build goes on with the local cache). `reading`: the command only
    reads it (no write is tried)."""
    from batch.remote import RemoteCache, RemoteError, remote_settings

    settings = remote_settings(
        root,
        args.remote,
        read_only=getattr(args, "remote_read_only", False) or reading,
        required=getattr(args, "remote_required", False) or required_by_command,
        disabled=args.no_remote,
    )
    if settings is None:
        if required_by_command:
            raise UsageError("no remote cache given", "pass --remote URL, or set `remote` in dhbatch.toml")
        return None
    try:
        remote = RemoteCache(settings)
        remote.check()
    except RemoteError as exc:
        if settings.required:
            raise
        logger.warning("%s — building with the local cache only (--remote-required makes this an error)", exc)
        return None
    return remote


def with_remote(plan: Any, remote: RemoteCache | None) -> Any:
    """The plan as a build with this remote cache would run it: a step missing here that the remote has is not run
    (it is downloaded). One listing of the remote's records, so that `plan` on the machine that merges the shards'
    folders sees their work."""
    import dataclasses

    if remote is None or not any(not d.cached for v in plan.videos for d in v.decisions):
        return plan
    there = set(remote.records(read=False))
    videos = []
    for v in plan.videos:
        decisions = tuple(
            dataclasses.replace(d, cached=True, reason="in the remote cache")
            if not d.cached and d.key in there and not d.reason.startswith("forced")
            else d
            for d in v.decisions
        )
        videos.append(dataclasses.replace(v, decisions=decisions))
    return dataclasses.replace(plan, videos=tuple(videos))


def build_fields(shard: Any, remote: RemoteCache | None) -> dict[str, Any]:
    """What `build --json` says about the shard it built and the remote cache it used."""
    out: dict[str, Any] = {"shard": str(shard)} if shard else {}
    if remote is not None:
        out["remote"] = {
            "url": remote.url,
            "read_only": remote.read_only,
            "hits": remote.hits,
            "uploaded": remote.uploaded,
            "errors": list(remote.errors),
        }
    return out


def check_required(remote: RemoteCache | None) -> None:
    """After a build: with --remote-required, a failed transfer fails the command (the report is written)."""
    if remote is not None and remote.required and remote.errors:
        from batch.remote import RemoteError

        raise RemoteError(
            f"remote cache {remote.url}: {len(remote.errors)} transfer(s) failed: {remote.errors[0]}",
            "the outputs are built and cached here; run `dhbatch push` when the remote works again",
        )


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


def _steps(plan: Any) -> dict[str, Any]:
    """Each step of a plan once, by key."""
    return {s.key: s for v in plan.videos for s in v.steps}


def cmd_push(args: argparse.Namespace) -> int:
    from batch.cli import _plan

    plan, cache, _ = _plan(args)
    remote = open_remote(args, project_root(args.manifest), required_by_command=True)
    if remote.read_only:
        raise UsageError(f"remote cache {remote.url} is read-only here", "drop remote_read_only to push")
    steps = _steps(plan)
    local = [s for s in steps.values() if cache.is_cached(s.stage, s.key)]
    pushed = sum(remote.push(cache, s.stage, s.key) for s in local)
    print(
        f"pushed {pushed} steps to {remote.url} ({len(local) - pushed - len(remote.errors)} already there"
        + (f", {len(steps) - len(local)} not built here" if len(local) < len(steps) else "")
        + ")"
    )
    check_required(remote)
    return EXIT_OK


def cmd_pull(args: argparse.Namespace) -> int:
    from batch.cli import _plan

    plan, cache, _ = _plan(args)
    remote = open_remote(args, project_root(args.manifest), required_by_command=True, reading=True)
    missing = [s for s in _steps(plan).values() if not cache.is_cached(s.stage, s.key)]
    with cache.in_use():
        got = remote.fetch_many(cache, [(s.stage, s.key) for s in missing])
    left = len(missing) - len(got)
    print(
        f"pulled {len(got)} steps from {remote.url}"
        + (f"; {left} not in the remote (a build makes them)" if left else "; every step is cached here now")
    )
    check_required(remote)
    return EXIT_OK if not left else EXIT_FAILED


def cmd_gc_remote(args: argparse.Namespace) -> int:
    """Prune the remote: the entries the given manifests do not reach, or (--older-than) those uploaded longer ago
    whatever reaches them; then the blobs no entry names. Shown first; --yes deletes."""
    from batch.cli import _setup
    from batch.plan import plan_manifest

    remote = open_remote(args, project_root(args.manifests[0]), required_by_command=True)
    older = args.older_than * 86400 if args.older_than is not None else None
    reachable: set[str] = set()
    for path in args.manifests if older is None else ():
        manifest, build_dir, checkpoints, cache = _setup(args, path)
        plan = plan_manifest(manifest, cache, build_dir=build_dir, checkpoints=checkpoints)
        reachable |= set(_steps(plan))
    records, blobs = remote.garbage(reachable, older)
    for stage, key, _ in records:
        print(f"{'remove' if args.yes else 'would remove'} remote {stage} {key[:12]}")
    size = sum(n for _, n in blobs)
    if args.yes:
        remote.delete([path for *_, path in records])
        remote.delete([path for path, _ in blobs])
    verb = "removed" if args.yes else "unreachable"
    print(
        f"{len(records)} remote entries and {len(blobs)} blobs {verb} ({size / 1e6:.1f} MB) in {remote.url}"
        + ("" if args.yes or not records + blobs else "; run again with --yes to delete")
    )
    return EXIT_OK


COMMANDS = {"report": cmd_report, "push": cmd_push, "pull": cmd_pull}
