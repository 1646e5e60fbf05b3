"""``covspec adapters``: what online learning keeps for a user, listed or forgotten."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from serve.commands.base import Command
from serve.commands.serve_cmd import DEFAULT_CONFIG, app_args


def _args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")
    for name, text in (
        ("list", "each learning user's samples held and adapter versions published"),
        ("forget", "delete a user's samples and learned adapter versions (drafters drop it within poll_s)"),
    ):
        action = sub.add_parser(name, help=text)
        action.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the Serve config YAML")
        if name == "forget":
            action.add_argument(
                "--user", required=True, help="the adapter name (the user's, or their key's adapter)"
            )


def _run(args: argparse.Namespace) -> int:
    from drafter_pool.samples import SampleStore
    from serve.settings import ServeSettings

    settings = ServeSettings.model_validate(app_args(args.config)).resolved(Path.cwd())
    store = SampleStore(settings.online_learning.dir)
    if args.adapters_command == "forget":
        tenants = store.forget(args.user)
        if not tenants:
            raise ValueError(f"nothing is kept for {args.user!r} under {store.root}")
        print(f"forgot {args.user!r} in tenant(s) {', '.join(tenants)} ({store.root})")
        return 0
    rows = [
        {
            "tenant": t,
            "user": u,
            "samples": store.count(t, u)[0],
            "versions": [p.version for p in store.versions(t, u)],
        }
        for t, u in store.users()
    ]
    print(json.dumps(rows))
    return 0


ADAPTERS = Command(
    name="adapters",
    help="online learning's per-user data: list it, or forget a user (samples and learned versions)",
    add_arguments=_args,
    run=_run,
)
