"""``covspec serve`` and ``covspec keys add``: run the service on Ray Serve; manage API keys."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serve.commands.base import Command

DEFAULT_CONFIG = Path("deploy/local.yaml")
STOP_RAY_S = 6.0  # a Ray whose processes are gone already can hang its own shutdown: not waited for
DRAIN_CALL_S = 3.0  # one call to the Gateway while stopping, at most


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="Serve config YAML (deploy/*.yaml)")
    p.add_argument("--keys", type=Path, help="API keys file (default: the config's keys_file)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the API")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every one)")


def app_args(config: Path) -> dict[str, Any]:
    """The ``args:`` of the config's single application."""
    import yaml

    if not config.is_file():
        raise ValueError(f"config {config} does not exist")
    try:
        data = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config {config} is not valid YAML: {e}") from e
    apps = data.get("applications") if isinstance(data, dict) else None
    if not isinstance(apps, list) or len(apps) != 1:
        raise ValueError(f"config {config} must hold exactly one entry under applications:")
    args = apps[0].get("args") or {}
    if not isinstance(args, dict):
        raise ValueError(f"config {config}: applications[0].args must be a mapping")
    return args


def _serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from serve.auth import KeyStore
    from serve.deployments import build_app
    from serve.local_redis import start_redis
    from serve.settings import ServeSettings

    settings_args = app_args(args.config)
    if args.keys is not None:
        settings_args["keys_file"] = str(args.keys)
    settings = ServeSettings.model_validate(settings_args).resolved(Path.cwd())  # fail before starting
    KeyStore.load(settings.keys_file)  # likewise for a missing or malformed keys file
    cache = settings.prefix_cache
    redis = None if cache.redis_url or os.environ.get("REDIS_URL") or not cache.enabled else start_redis()
    redis_url = cache.redis_url or os.environ.get("REDIS_URL") or (redis.url if redis else None)
    # validated again, so a $REDIS_URL that is no Redis URL fails here too
    cache = type(cache).model_validate({**cache.model_dump(), "redis_url": redis_url})
    settings = settings.model_copy(update={"prefix_cache": cache})
    started_ray = not os.environ.get("RAY_ADDRESS")
    stop = threading.Event()
    stopped = True
    try:
        context = ray.init(address=os.environ.get("RAY_ADDRESS"), dashboard_host="127.0.0.1")
        _on_signals(stop)  # after ray.init, which sets handlers of its own
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(settings.model_dump(mode="json")), name="covspec", route_prefix="/")
        gateway = serve.get_deployment_handle("Gateway", app_name="covspec")  # now, while Ray is up
        _announce(args, context, redis_url or "none (prefix cache off)")
        stop.wait()
        print("Stopping: no new requests; waiting for the running ones ...", flush=True)
        _drain(gateway, settings.shutdown_grace_s)
    finally:
        stopped = _within(STOP_RAY_S, lambda: _stop(started_ray))
        if redis is not None:
            redis.stop()
    print("Stopped." if stopped else "Stopped (Ray was already going down).", flush=True)
    if not stopped:
        os._exit(0)  # Ray's exit hook would wait on the same dead processes
    return 0


def _within(seconds: float, work: Callable[[], None]) -> bool:
    """Run ``work``, waiting for it ``seconds`` at most; whether it finished."""
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


def _on_signals(stop: threading.Event) -> None:
    """SIGINT (Ctrl-C) and SIGTERM (``docker stop``, systemd, Kubernetes) start a clean stop; a
    second one during the stop is ignored, so the stop finishes."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())


def _drain(gateway: Any, grace_s: float) -> None:
    """The Gateway admits nothing new (503 + Retry-After); running requests get ``grace_s`` to
    finish. A Ray already going down (its processes got the signal too) ends the wait: a call
    to it may then block, so each one is given ``DRAIN_CALL_S``."""
    deadline = time.monotonic() + grace_s
    while (running := _ask_drain(gateway)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if running is None:
        print("  (no gateway answered: Ray is going down already)", flush=True)


def _ask_drain(gateway: Any) -> int | None:
    """The Gateway's running requests once told to drain; None without an answer in time."""
    answer: list[int] = []

    def ask() -> None:
        with contextlib.suppress(Exception):  # gone: no answer
            answer.append(gateway.drain.remote().result(timeout_s=DRAIN_CALL_S))

    _within(DRAIN_CALL_S, ask)
    return answer[0] if answer else None


def _stop(started_ray: bool) -> None:
    """Take the app down. A Ray this command started goes with its actors at once (no replica
    is waited for: the drain is done); on a cluster it joined, only the app is deleted."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        if not started_ray:
            serve.delete("covspec")
    finally:
        ray.shutdown()


def deployment_states() -> str:
    """``Engine: HEALTHY (1 replica), Gateway: HEALTHY (1 replica)`` from Ray Serve's status."""
    from ray import serve

    app = serve.status().applications["covspec"]
    return ", ".join(
        f"{name}: {d.status.value} ({sum(d.replica_states.values())} replica(s))"
        for name, d in app.deployments.items()
    )


def _announce(args: argparse.Namespace, context: Any, redis_url: str) -> None:
    dashboard = getattr(context, "dashboard_url", "") or "127.0.0.1:8265"
    print(
        f"CoVSpec Serve is up.\n"
        f"  API (OpenAI-compatible): http://{args.host}:{args.port}/v1   (health: /health)\n"
        f"  Deployments: {deployment_states()}\n"
        f"  Ray dashboard: http://{dashboard}   (if it asks for a token: `.venv/bin/ray get-auth-token`)\n"
        f"  Redis: {redis_url}\n"
        f"  Keys: the demo users' keys are in README.md; new ones: covspec keys add --user U --tenant T\n"
        f"Ctrl-C stops everything this command started.",
        flush=True,
    )


SERVE = Command(
    name="serve",
    help="serve the models over HTTP on Ray Serve (starts Ray and Redis unless RAY_ADDRESS / REDIS_URL)",
    add_arguments=_serve_args,
    run=_serve,
)


def _keys_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    add = sub.add_parser("add", help="create an API key (printed once; only its hash is stored)")
    add.add_argument("--user", required=True)
    add.add_argument("--tenant", required=True)
    add.add_argument("--adapter", help="the user's drafter adapter (a folder name under adapters_dir)")
    add.add_argument("--file", type=Path, required=True, help="keys file to append to (created if missing)")
    add.add_argument(
        "--learn",
        action="store_true",
        help="let the service keep this user's requests to train their drafter adapter (online_learning)",
    )


def _keys(args: argparse.Namespace) -> int:
    from serve.auth import add_key

    key = add_key(args.file, args.user, args.tenant, args.adapter, learn=args.learn)
    print(key)
    return 0


KEYS = Command(name="keys", help="manage API keys", add_arguments=_keys_args, run=_keys)
