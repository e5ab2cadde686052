"""The `sdapi` command: one subcommand per process, plus operator commands.

Each subcommand imports its package only when chosen, so `sdapi web` never
loads torch and `sdapi gpu-node` never loads Tortoise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from sdapi.devtools.parent import tie_to_parent
from sdapi.infra.settings import SettingsError


def _dev(args: argparse.Namespace) -> int:
    from sdapi.dev import run

    return run()


def _web(args: argparse.Namespace) -> int:
    from web.main import run

    return run()


def _jobs(args: argparse.Namespace) -> int:
    from jobs.main import run

    return run()


def _gpu_node(args: argparse.Namespace) -> int:
    from gpu_node.main import run

    return run()


def _migrate(args: argparse.Namespace) -> int:
    from sdapi.operator import migrate

    return migrate()


def _storage_migrate(args: argparse.Namespace) -> int:
    from sdapi.operator import migrate_storage

    return migrate_storage(to=args.to, batch_size=args.batch_size)


def _premium_code_create(args: argparse.Namespace) -> int:
    from sdapi.operator import create_premium_codes

    return create_premium_codes(days=args.days, count=args.count)


def _user_set_premium(args: argparse.Namespace) -> int:
    from sdapi.operator import set_premium

    return set_premium(email=args.email, days=args.days)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `sdapi` (settings come from SDAPI_* variables)."""
    parser = argparse.ArgumentParser(
        prog="sdapi",
        description="Stable Diffusion as an API. Settings come from SDAPI_* "
        "environment variables (see the README).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, handler: Callable[[argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    add(
        "dev",
        _dev,
        "Run everything on this machine: embedded PostgreSQL and Valkey (unless "
        "URLs are set), migrations, web, jobs and a GPU node, and a local mail sink.",
    )
    add("web", _web, "Run the HTTP API, WebSocket and docs.")
    add("jobs", _jobs, "Run the jobs worker: dispatch, results, email, repairs.")
    add("gpu-node", _gpu_node, "Run a GPU node serving SDAPI_MODEL.")
    add("migrate", _migrate, "Apply database migrations.")

    code = add("premium-code", lambda _: 2, "Manage premium codes.")
    code_commands = code.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = code_commands.add_parser(
        "create",
        help="Print new single-use premium codes, one per line.",
        description="Print new single-use premium codes, one per line, nothing else.",
    )
    create.add_argument("--days", type=_positive, required=True, help="premium days")
    create.add_argument("--count", type=_positive, default=1, help="how many codes")
    create.set_defaults(handler=_premium_code_create)

    storage = add("storage", lambda _: 2, "Manage the image store.")
    storage_commands = storage.add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    move = storage_commands.add_parser(
        "migrate",
        help="Move every image to another image store.",
        description="Copy every image whose row names another store to the "
        "store at --to, checking each by its SHA-256, and switch its row; the "
        "old copies are deleted by `sdapi jobs` once downloads that started "
        "from them are over. Runs while the service is live; run it again to "
        "continue after an interruption. It does not change "
        "SDAPI_STORAGE_URL: run it, set SDAPI_STORAGE_URL to the same URL on "
        "web and jobs and restart them, then run it again for the images "
        "written meanwhile (docs/DEPLOY.md). Exit status: 0 every image "
        "moved, 1 some were not (run it again), 2 a bad URL.",
    )
    move.add_argument(
        "--to",
        required=True,
        metavar="URL",
        help="postgres, file:///path or s3://bucket/prefix?endpoint=URL&region=NAME",
    )
    move.add_argument(
        "--batch-size",
        type=_positive,
        default=100,
        help="rows read per query (default 100)",
    )
    move.set_defaults(handler=_storage_migrate)

    user = add("user", lambda _: 2, "Manage users.")
    user_commands = user.add_subparsers(dest="action", required=True, metavar="ACTION")
    premium = user_commands.add_parser(
        "set-premium",
        help="Grant premium to a user.",
        description="Grant premium for N days, added to any premium time left.",
    )
    premium.add_argument("email")
    premium.add_argument("--days", type=_positive, required=True)
    premium.set_defaults(handler=_user_set_premium)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sdapi` console script."""
    tie_to_parent()
    args = build_parser().parse_args(argv)
    try:
        result: int = args.handler(args)
    except SettingsError as exc:
        print(f"sdapi: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except KeyboardInterrupt:
        return 130
    return result
