"""The `vr` command. Heavy modules are imported inside each command, so that a quick
command does not pay for pydantic, jinja2 and pyroute2 it does not use."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def _settings(args):
    from vr.foundation.settings import Settings

    return Settings.from_env(root=args.root, netns=args.netns)


def _read_bytes(source: str) -> bytes:
    from vr.foundation import jsontext
    from vr.foundation.errors import InvalidPayload, Problem

    try:
        if source == "-":
            data = sys.stdin.buffer.read(jsontext.MAX_BYTES + 1)
        else:
            with open(source, "rb") as file:
                data = file.read(jsontext.MAX_BYTES + 1)
    except OSError as error:
        raise InvalidPayload([Problem("", f"cannot read {jsontext.quote(source)}: {error.strerror}")]) from None
    try:
        jsontext.check_size(len(data))  # refused here as in-process: not sent to the daemon
    except jsontext.JsonRefused as error:
        raise InvalidPayload([Problem(error.path, error.reason)]) from None
    return data


def _read_payload(source: str) -> object:
    return _payload_of(_read_bytes(source))


def _recover_interrupted_patch(args) -> None:
    """A patch a crash interrupted is rolled back first; if that switched the release, the
    command starts again as the release now current."""
    settings = _settings(args)
    if not settings.patch_journal_path.exists():
        return
    from vr.patching.bundles import Patcher
    from vr.patching.releases import reexec_if_not_current

    if Patcher(settings).recover():
        reexec_if_not_current(args.argv)


def _daemon(args):
    """The running daemon's local API, or None (first boot, a test, a broken daemon): the
    command then runs in-process, as it always could. VR_NO_DAEMON=1 asks for that."""
    import os

    # Fault points (VR_FAULT_*) are test hooks of the in-process pipeline, and templates of its
    # own (VR_TEMPLATE_DIR) are not the daemon's: a command carrying one runs in-process.
    if os.environ.get("VR_NO_DAEMON") == "1" or any(os.environ.get(name) for name in IN_PROCESS_ONLY):
        return None
    from vr.client import LocalClient
    from vr.foundation.lock import flock_holder

    settings = _settings(args)
    if flock_holder(settings.daemon_pid_path) is None:
        return None  # no daemon process: its socket may still take a connection (kept for the next one)
    client = LocalClient(settings.daemon_socket)
    return client if client.available() else None


DAEMON_RESTART_WAIT_S = 60.0
IN_PROCESS_ONLY = ("VR_FAULT_AT", "VR_FAULT_ENOSPC", "VR_TEMPLATE_DIR")


class _DaemonGone(Exception):
    """The daemon went away and none took its place: the command runs in-process instead."""


def _ask(args, daemon, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    """One request to the daemon. While it restarts (503, its socket refuses for a moment, a
    connection it dropped when killed or replaced by a patch), asked again, for at most
    DAEMON_RESTART_WAIT_S; once no daemon process is left, _DaemonGone."""
    import time

    from vr.foundation.lock import flock_holder

    deadline = time.monotonic() + DAEMON_RESTART_WAIT_S
    while True:
        try:
            status, answer = daemon.request(method, path, body)
            if status != 503 or time.monotonic() > deadline:
                return status, answer
        except (ConnectionError, FileNotFoundError):  # refused, reset, cut off: a daemon restarting
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)
        if flock_holder(_settings(args).daemon_pid_path) is None:
            time.sleep(1.0)  # supervisord starts the next one at once: give it a moment to lock
            if flock_holder(_settings(args).daemon_pid_path) is None:
                raise _DaemonGone()


def _through_daemon(args, method: str, path: str, body: bytes | None = None) -> tuple[int, dict] | None:
    """The daemon's answer, or None when there is no daemon to ask (the caller runs in-process)."""
    daemon = _daemon(args)
    if daemon is None:
        return None
    try:
        return _ask(args, daemon, method, path, body)
    except _DaemonGone:
        return None


def _payload_of(data: bytes) -> object:
    from vr.foundation import jsontext
    from vr.foundation.errors import InvalidPayload, Problem

    try:
        return jsontext.loads(data)
    except jsontext.JsonRefused as error:
        raise InvalidPayload([Problem(error.path, error.reason)]) from None


def _refused(status: int, body: dict) -> int:
    """A daemon's refusal, said as the in-process command says it, with its exit code."""
    from vr.client import BadRequest, Invalid, TooLarge, error_for, print_refused

    error = error_for(status, body)
    if isinstance(error, BadRequest | TooLarge | Invalid):
        print_refused(error.problems)
        return 2
    print(f"vr: {error.reason}", file=sys.stderr)
    return error.exit_code


def _print_applied(result: dict) -> None:
    from vr.client import applied_text

    print(applied_text(result))
    for warning in result["warnings"]:
        print(f"vr: warning: {warning}", file=sys.stderr)


def cmd_apply(args) -> int:
    _recover_interrupted_patch(args)
    data = _read_bytes(args.file)  # once: stdin does not read twice
    answer = _through_daemon(args, "PATCH", "/v1/config", data)
    if answer is not None:
        status, body = answer
        if status != 200:
            return _refused(status, body)
        _print_applied(body)
        return 0
    from dataclasses import asdict

    from vr.transaction.pipeline import Pipeline

    _print_applied(asdict(Pipeline(_settings(args)).apply(_payload_of(data))))
    return 0


def _recovered(settings) -> None:
    """Commands that read state first roll back an apply a crash interrupted, so they never
    compare against half-applied files; one that is running is said, not waited for."""
    from vr.control.status import recover_first

    busy = recover_first(settings)
    if busy:
        print(f"vr: {busy}; what follows may change when it ends", file=sys.stderr)


def cmd_render(args) -> int:
    from vr.transaction.pipeline import Pipeline

    settings = _settings(args)
    _recovered(settings)
    written = Pipeline(settings).render(_read_payload(args.file), Path(args.out))
    for service, files in written.items():
        for name in files:
            print(Path(args.out) / service / name)
    return 0


def cmd_diff(args) -> int:
    data = _read_bytes(args.file)
    answer = _through_daemon(args, "POST", "/v1/config/validate", data)
    if answer is not None:
        status, body = answer
        if status != 200:
            return _refused(status, body)
        _print_diffs(body["files"])
        return 0
    from vr.transaction.pipeline import Pipeline

    settings = _settings(args)
    _recovered(settings)
    _, _, files = Pipeline(settings).preview(_payload_of(data))
    _print_diffs(files)
    return 0


def _print_diffs(files: list[dict]) -> None:
    for item in files:
        if item["diff"] is None:
            print(f"secret file {item['service']}/{item['path']} {'removed' if item['removed'] else 'changed'}"
                  " (content not shown)")  # fmt: skip
        else:
            sys.stdout.write(item["diff"])
    if not files:
        print("no change")


def cmd_schema(args) -> int:
    from vr.foundation.document import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_status(args) -> int:
    from vr.control.status import render_text

    flags = "&".join(f"{name}={int(bool(getattr(args, name)))}" for name in ("firewall", "lb", "vpn", "usage"))
    answer = _through_daemon(args, "GET", f"/v1/status?{flags}")
    if answer is not None:
        status, report = answer
        if status != 200:
            return _refused(status, report)
    else:
        from vr.control.status import collect, recover_first

        settings = _settings(args)
        recover_first(settings)  # an interrupted apply is rolled back before it is reported on
        report = collect(settings, firewall=args.firewall, lb=args.lb, vpn=args.vpn, usage=args.usage)
    print(json.dumps(report, indent=2) if args.json else render_text(report))
    return 0 if report["healthy"] else 1


def cmd_events(args) -> int:
    from urllib.parse import urlencode

    query = urlencode({"limit": 100000, **({"resource": args.resource} if args.resource else {})})
    answer = _through_daemon(args, "GET", f"/v1/events?{query}")
    if answer is not None:
        status, body = answer
        if status != 200:
            return _refused(status, body)
        found = body["events"]
    else:
        from vr.control.status import recover_first
        from vr.foundation.events import EventLog

        settings = _settings(args)
        recover_first(settings)  # the recovery's own events are then among those shown
        found = EventLog(settings.events_path).read(args.resource)
    for item in found:
        print(json.dumps(item, sort_keys=True))
    return 0


def cmd_watch(args) -> int:
    if _daemon(args) is not None:
        print("vr: the router's daemon watches the spool already (vr daemon); files dropped there are applied",
              file=sys.stderr)  # fmt: skip
        return 2
    from vr.control.spool import Spool
    from vr.transaction.pipeline import Pipeline

    spool = Spool(Pipeline(_settings(args)))
    if args.once:
        print(f"processed {spool.drain()} file(s)")
    else:
        spool.watch(stop_after=args.seconds)
    return 0


def cmd_start(args) -> int:
    from vr.transaction.pipeline import Pipeline

    _recover_interrupted_patch(args)
    result = Pipeline(_settings(args)).start()
    print("nothing applied yet" if result is None else f"started generation {result.generation}")
    return 0


def cmd_stop(args) -> int:
    from vr.services.runtime import Runtime
    from vr.services.supervisor_rpc import router_processes, stop_processes

    settings = _settings(args)
    try:
        from vr.services.nftables import save_usage

        save_usage(settings)  # the kernel's counters do not outlive a reboot; the next start restores them
    except OSError as error:
        print(f"vr: usage counters not saved: {error}", file=sys.stderr)
    Runtime(settings).supervisor.shutdown()
    stop_processes(router_processes(settings))  # what no supervisord ran: orphans of a dead one
    print("stopped")
    return 0


def cmd_recover(args) -> int:
    from vr.transaction.pipeline import Pipeline

    _recover_interrupted_patch(args)
    print("recovered an interrupted apply" if Pipeline(_settings(args)).recover() else "nothing to recover")
    return 0


def cmd_selftest(args) -> int:
    from vr.foundation.version import running_version
    from vr.transaction.pipeline import Pipeline

    changed = Pipeline(_settings(args)).selftest()
    report = {"version": running_version(), "changed": changed}
    print(json.dumps(report) if args.json else f"release {report['version']}: rendered and checked; "
          f"would change: {', '.join(changed) or 'nothing'}")  # fmt: skip
    return 0


def cmd_reconcile(args) -> int:
    from vr.foundation.version import running_version
    from vr.transaction.pipeline import Pipeline

    result = Pipeline(_settings(args)).reconcile()
    changed = result.changed if result else []
    report = {"version": running_version(), "changed": changed, "duration_ms": result.duration_ms if result else 0}
    print(json.dumps(report) if args.json else f"re-rendered with release {report['version']}; "
          f"reloaded: {', '.join(changed) or 'nothing'}")  # fmt: skip
    return 0


def cmd_patch(args) -> int:
    from vr.patching import bundles as patching

    needed = {"apply": ["target"], "build": ["target", "version", "key", "out"], "keygen": ["out"],
              "remove": ["target"]}  # fmt: skip
    missing = [name for name in needed.get(args.action, []) if not getattr(args, name)]
    if missing:
        target = "VERSION" if args.action == "remove" else "FILE|URL|SRC"
        names = ", ".join(target if m == "target" else f"--{m}" for m in missing)
        raise patching.PatchRefused(f"patch {args.action} needs {names}")
    if args.action == "keygen":
        private, public = patching.keygen(Path(args.out))
        print(f"private key {private} (keep it off routers)\npublic key {public} (copy it into each router's "
              f"{_settings(args).trusted_keys_dir})")  # fmt: skip
        return 0
    if args.action == "build":
        services = [s for s in args.services.split(",") if s] if args.services is not None else None
        manifest = patching.build(Path(args.target), args.version, Path(args.key), Path(args.out),
                                  base_versions=args.base, description=args.description, services=services)  # fmt: skip
        print(f"built {args.out}: release {manifest['version']} for base {', '.join(manifest['base_versions'])}, "
              f"{len(manifest['files'])} files, services {', '.join(manifest['services']) or 'none'}")  # fmt: skip
        return 0
    patcher = patching.Patcher(_settings(args))
    if args.action == "remove":
        result = patcher.remove(args.target, force=args.force)
        print(json.dumps(result) if args.json else f"removed release {result['removed']}; installed: "
              f"{', '.join(result['installed']) or 'none'}")  # fmt: skip
        return 0
    if args.action in ("apply", "rollback"):
        if args.action == "apply":
            result = patcher.apply(args.target, allow_downgrade=args.allow_downgrade)
        else:
            result = patcher.rollback()
        if args.json:
            print(json.dumps(result))
        elif result["outcome"] == "unchanged":  # a second rollback: nothing to do, and why
            print(result["message"])
        else:
            print(f"{result['action']} {result['from']} -> {result['to']}: {result['outcome']} in "
                  f"{result['duration_ms']:.0f} ms; {result['message']}")  # fmt: skip
        return 0
    report = patcher.status() if args.action == "status" else patcher.list()
    if args.json:
        print(json.dumps(report, indent=2))
    elif args.action == "status":
        last = report["last"] or {}
        print(f"current   {report['current']}\nprevious  {report['previous'] or '-'}")
        print(f"last      {last.get('action', '-')} {last.get('from', '')} -> {last.get('to', '')}: "
              f"{last.get('outcome', '-')} {last.get('message', '')}".rstrip())  # fmt: skip
        if report["interrupted"]:
            print("an interrupted patch waits to be rolled back (vr recover)")
    else:
        for row in report or [{"version": "-", "current": False, "description": "no release installed yet"}]:
            print(f"{'*' if row['current'] else ' '} {row['version']:<12} {row['description']}")
    return 0


def cmd_vpn_load(args) -> int:
    from vr.services.runtime import Runtime
    from vr.services.strongswan import load_live

    load_live(Runtime(_settings(args)))
    print("loaded the VPN configuration into charon")
    return 0


def cmd_monitor(args) -> int:
    from vr.control import monitor

    return monitor.main(_settings(args))


def cmd_daemon(args) -> int:
    from vr.control import daemon

    return daemon.main(_settings(args))


def cmd_lab(args) -> int:
    from vr.lab import harness as lab

    return lab.main(args)


class _VersionAction(argparse.Action):
    """The running release's version (a live patch changes it), looked up only when asked."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from vr.foundation.version import running_version

        print(f"vr {running_version()}")
        parser.exit()


NETNS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _where_problem(args) -> str | None:
    """Which router a command acts on is never guessed: an empty --root or VR_ROOT (an unset
    shell variable) would otherwise mean the appliance's own paths, and an empty --netns the
    host's network namespace."""
    import os

    for flag, variable, value in (("--root", "VR_ROOT", args.root), ("--netns", "VR_NETNS", args.netns)):
        if value is not None and not value.strip():
            return f"{flag} is empty: name the router's directory or namespace (an unset variable?)"
        if value is None and variable in os.environ and not os.environ[variable].strip():
            return f"{variable} is set but empty: unset it, or name the router's directory or namespace"
    if args.root is not None and (len(args.root) > 1024 or "\0" in args.root):
        return "--root: not a usable directory name"
    netns = args.netns if args.netns is not None else os.environ.get("VR_NETNS")
    if netns is not None and not NETNS_NAME.fullmatch(netns):
        return f"--netns: {netns[:40]!r} is not a network namespace name (letters, digits, '_', '.', '-'; 1-64)"
    if args.netns and args.command != "lab" and not os.path.exists(f"/run/netns/{args.netns}"):
        return f"--netns: network namespace {args.netns!r} does not exist (/run/netns/{args.netns})"
    return None


def _file_command(sub, name: str, help: str, func, *options: tuple) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    p.add_argument("file")
    for flags, kwargs in options:
        p.add_argument(*flags, **kwargs)
    p.set_defaults(func=func)
    return p


def _json_command(sub, name: str, help: str, func) -> None:
    p = sub.add_parser(name, help=help)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=func)


def _status_command(sub) -> None:
    p = sub.add_parser("status", help="generation, last apply, each service's health")
    p.add_argument("--json", action="store_true")
    p.add_argument("--firewall", action="store_true", help="also each firewall/NAT rule's hit counters")
    p.add_argument("--usage", action="store_true", help="also bytes and packets per public IP and tier (billing)")
    p.add_argument("--lb", action="store_true", help="also each load-balancer rule's members, up or down")
    p.add_argument("--vpn", action="store_true", help="also each VPN connection: state, bytes, users connected")
    p.set_defaults(func=cmd_status)


def _events_command(sub) -> None:
    p = sub.add_parser("events", help="print events (JSON lines)")
    p.add_argument("--resource", help="KIND or KIND:ID, e.g. vm:02:00:00:00:01:10 or service:dnsmasq")
    p.set_defaults(func=cmd_events)


def _watch_command(sub) -> None:
    p = sub.add_parser("watch", help="apply payloads dropped into the spool directory")
    p.add_argument("--once", action="store_true", help="process what is there and exit")
    p.add_argument("--seconds", type=float, help="stop watching after this long")
    p.set_defaults(func=cmd_watch)


def _patch_command(sub) -> None:
    p = sub.add_parser("patch", help="live patches: apply, rollback, list, status, remove; build, keygen")
    p.add_argument("action", choices=["apply", "rollback", "list", "status", "remove", "build", "keygen"])
    p.add_argument("target", nargs="?", help="apply: the bundle, FILE or http(s) URL; build: the source tree; "
                   "remove: the release's VERSION")  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.add_argument("--allow-downgrade", action="store_true", help="apply: even a release older than the running one")
    p.add_argument("--force", action="store_true", help="remove: even the release a rollback would return to")
    p.add_argument("--version", help="build: the release's semantic version")
    p.add_argument("--key", help="build: the ed25519 private key that signs")
    p.add_argument("--base", action="append", help="build: a version the patch applies to (repeatable)")
    p.add_argument("--description", help="build: what the patch does")
    p.add_argument("--services", help="build: services it may change, comma-separated")
    p.add_argument("-o", "--out", help="build: the bundle file; keygen: the key files' prefix")
    p.set_defaults(func=cmd_patch)


def _remote_command(sub) -> None:
    from vr.client import add_remote_arguments

    add_remote_arguments(sub.add_parser("remote", help="drive a router through its HTTPS agent (the manager's API)"))


def _lab_command(sub) -> None:
    p = sub.add_parser("lab", help="a lab router with guests in network namespaces")
    p.add_argument("action", choices=["up", "down", "status", "demo"])
    p.add_argument("--dir", default="/tmp/vr-lab", help="where the lab keeps its state")
    p.add_argument("--prefix", help="namespace name prefix (default: derived from --dir)")
    p.set_defaults(func=cmd_lab)


def _plain_command(name: str, help: str, func):
    return lambda sub: sub.add_parser(name, help=help).set_defaults(func=func)


# Each command's arguments, in `vr --help` order. A command line builds only its command's
# parser: all 27 with their help texts (and gettext's lookups) cost ~12 ms of a thin `vr apply`.
COMMANDS = {
    "apply": lambda sub: _file_command(sub, "apply", "validate and apply a payload (FILE or - for stdin)", cmd_apply),
    "render": lambda sub: _file_command(sub, "render", "render every config for a payload without applying it",
                                        cmd_render, (("--out",), {"required": True})),
    "diff": lambda sub: _file_command(sub, "diff", "show what a payload would change in the live files", cmd_diff),
    "schema": _plain_command("schema", "print the JSON Schema of a payload", cmd_schema),
    "status": _status_command,
    "events": _events_command,
    "watch": _watch_command,
    "start": _plain_command("start", "bring services up from last-known-good (boot)", cmd_start),
    "stop": _plain_command("stop", "stop supervisord and every daemon of this router", cmd_stop),
    "recover": _plain_command("recover", "finish or roll back an interrupted apply", cmd_recover),
    "selftest": lambda sub: _json_command(sub, "selftest", "render the live document with this release and run the "
                                          "daemons' checkers", cmd_selftest),
    "reconcile": lambda sub: _json_command(sub, "reconcile", "re-render the live document with this release; reload "
                                           "what changed", cmd_reconcile),
    "patch": _patch_command,
    "vpn-load": _plain_command("vpn-load", "load the live VPN files into charon (charon runs this when it starts)",
                               cmd_vpn_load),
    "monitor": _plain_command("monitor", "keep the services alive (supervisord runs it as its event listener)",
                              cmd_monitor),
    "remote": _remote_command,
    "daemon": _plain_command("daemon", "the router's resident process: API, agent, spool, monitor (supervisord runs "
                             "it)", cmd_daemon),
    "lab": _lab_command,
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """vr's parser; only: the one command to build (None: all of them, for help and errors)."""
    parser = argparse.ArgumentParser(prog="vr", description="virtual router control")
    parser.add_argument("--version", action=_VersionAction, help="print the running release's version and exit")
    parser.add_argument("--root", help="put config/state/run/log dirs under DIR (default: appliance paths)")
    parser.add_argument("--netns", help="network namespace the router lives in")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, add in COMMANDS.items():
        if only is None or name == only:
            add(sub)
    return parser


def _command_named(argv: list[str]) -> str | None:
    """The command a command line names, when it plainly names one (the global options
    before it, no help asked for); None otherwise: the whole parser then decides."""
    words = list(argv)
    while words and words[0] in ("--root", "--netns") and len(words) > 1:
        words = words[2:]
    if not words or words[0] not in COMMANDS or any(w in ("-h", "--help") for w in words):
        return None
    return words[0]


def main(argv: list[str] | None = None) -> int:
    line = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(_command_named(line)).parse_args(line)
    args.argv = line
    problem = _where_problem(args)
    if problem:
        print(f"vr: {problem}", file=sys.stderr)
        return 2
    if args.netns and args.command != "lab":
        from vr.foundation import netns

        netns.enter(args.netns)
    from vr.foundation.errors import InvalidPayload, VrError

    try:
        return args.func(args)
    except InvalidPayload as error:
        from vr.client import print_refused

        print_refused([(p.path, p.reason) for p in error.problems])
        return error.exit_code
    except VrError as error:
        print(f"vr: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    except OSError as error:  # outside a transaction (which reports its own): a file vr could not read or write
        from vr.foundation.errors import os_error_reason

        print(f"vr: {args.command} failed: {os_error_reason(error)}", file=sys.stderr)
        return 4


def entry() -> None:
    from vr.patching.releases import dispatch

    dispatch(sys.argv[1:])
    sys.exit(main())
