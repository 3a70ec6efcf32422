"""Enter a router's network namespace for the whole vr process.

Done once, before any thread starts, so that netlink, sysctls, the daemons supervisord
forks and the health probes all see the router's namespace.
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNET = 0x40000000


def enter(name: str) -> None:
    path = f"/run/netns/{name}"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise SystemExit(f"vr: network namespace {name!r} does not exist ({path})") from None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)
