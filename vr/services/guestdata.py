"""Guest data: what a VM reads from its router at boot (user data, meta data, SSH keys, its
one-time password), as cloud-init's CloudStack data source and password-enabled templates
ask for it. Its part of the document (`guest_data`, `dhcp.entries`, the guest tiers'
addresses) is rendered into guestdata.json (where to listen) and VM shards (vms/NNN.secrets,
0600, never shown: user data and passwords). The daemon serves them (vr/control/guestdata.py):
port 80 for data and 8080 for passwords on each guest tier's router addresses, each VM
known by its address on its tier. This module lays out what to serve and tells the daemon
to read it again: directly when the apply runs inside it, else by SIGHUP.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from vr.foundation.document import DhcpEntry, RouterDocument, VmData
from vr.foundation.errors import Problem
from vr.services.base import Change, Service, repeats
from vr.services.runtime import DAEMON_PROGRAM, Runtime

CONFIG = "guestdata.json"
VMS = "vms"  # a directory of shard files, one JSON line per VM fact
VM_SHARDS = 256  # 4,000 VMs: about 16 a shard; a one-VM change rewrites one
DATA_PORT, PASSWORD_PORT = 80, 8080  # CloudStack's router's
# runtime.hooks, when the apply runs inside the daemon: its own reload (given the files that
# changed, None: all), and why it does not listen where it should (None: it does).
HOOK, LISTENING_HOOK = "guestdata", "guestdata.listening"


def shard_of(mac: str) -> str:
    return f"{VMS}/{zlib.crc32(mac.encode()) % VM_SHARDS:03d}.secrets"


def listen_addresses(doc: RouterDocument) -> list[dict]:
    """Every router IPv4 address on a guest tier (one per subnet): a VM asks the one of its own."""
    checked = {i.id for i in doc.spoof_checked_tiers()}
    return [{"tier": i.id, "address": str(a.ip), "ifname": i.name, "mac_checked": i.id in checked}
            for i in doc.guest_interfaces() for a in i.ipv4s()]  # fmt: skip


class GuestDataService(Service):
    name = "guestdata"
    checker_reads_unchanged = False  # no checker: the shards are JSON this module wrote

    def __init__(self) -> None:
        self._known: tuple[list, set[str]] = ([], set())  # the last dhcp.entries seen, and their MACs

    def read(self, doc: RouterDocument) -> Any:
        return (doc.guest_interfaces(), doc.dhcp.entries, doc.guest_data)

    def configured(self, doc: RouterDocument) -> bool:
        return bool(listen_addresses(doc))

    def verify(self, doc: RouterDocument) -> list[Problem]:
        vms = doc.guest_data.vms
        if not vms:
            return []
        problems = [Problem(f"guest_data.vms[{n}].mac", f"{vms[n].mac} is also guest_data.vms[{first}]")
                    for n, first in repeats(vm.mac for vm in vms)]  # fmt: skip
        if self._known[0] is not doc.dhcp.entries:  # a guest data change keeps the entries' list
            self._known = (doc.dhcp.entries, {e.mac for e in doc.dhcp.entries})
        known = self._known[1]
        problems += [Problem(f"guest_data.vms[{n}].mac", f"no VM has MAC {vm.mac} (dhcp.entries)")
                     for n, vm in enumerate(vms) if vm.mac not in known]  # fmt: skip
        if not listen_addresses(doc):
            problems.append(Problem("guest_data", "guest data is served on guest tiers: the document has none with "
                                                  "an IPv4 address"))  # fmt: skip
        return problems

    def generate(self, doc: RouterDocument, runtime: Runtime) -> dict[str, bytes]:
        listen = listen_addresses(doc)
        if not listen:
            return {}
        config = {"listen": listen, "data_port": DATA_PORT, "password_port": PASSWORD_PORT, "shards": VM_SHARDS}
        files = {CONFIG: (json.dumps(config, indent=1, sort_keys=True) + "\n").encode()}
        # The entries and the guest data in one pass, as bytes: each shard's file is the memo's
        # own joined text (a one-VM change joins one shard; nothing is copied or encoded again).
        facts = [*doc.dhcp.entries, *doc.guest_data.vms]
        files.update(runtime.memo.grouped("guestdata/vms", facts, _vm_facts, separator=b""))
        return files

    def apply(self, change: Change, doc: RouterDocument | None, runtime: Runtime) -> None:
        """The daemon serves what the files say once told: at once when the apply runs inside
        it, else by SIGHUP. A daemon not running yet reads the files when it starts."""
        hook = runtime.hooks.get(HOOK)
        if hook is not None:
            hook(None if change.restore else change.paths)
            return
        runtime.signal_daemon()

    def probe_spec(self, doc: RouterDocument, runtime: Runtime) -> dict | None:
        listen = listen_addresses(doc) if doc is not None else []
        if not listen:
            return None  # no guest tier: nothing to serve, nothing down
        return {"program": None, "check": "http_answers",
                "args": {"addresses": [item["address"] for item in listen], "ports": [DATA_PORT, PASSWORD_PORT]}}

    def probe(self, doc: RouterDocument, runtime: Runtime) -> str | None:
        spec = self.probe_spec(doc, runtime)
        if spec is None:
            return None
        listening = runtime.hooks.get(LISTENING_HOOK)
        if listening is not None:  # the daemon itself: it knows what it listens on, without asking itself
            return listening()
        if runtime.supervisor.is_running() and (reason := runtime.supervisor.not_running(DAEMON_PROGRAM)):
            return f"no daemon serves guest data: {reason}"
        from vr.services import probes

        return probes.run(spec)


def _vm_facts(item: DhcpEntry | VmData, _setting: Any) -> list[tuple[str, bytes]]:
    """One JSON line: where a VM is (its DHCP entry: tier, address, name, what meta data
    defaults to), or what it is served beyond that (its guest data)."""
    if isinstance(item, DhcpEntry):
        fact = {"mac": item.mac, "tier": item.tier, "ip": str(item.ip), "hostname": item.hostname}
    else:
        fact = {"mac": item.mac, "user_data": item.user_data, "meta_data": item.meta_data,
                "public_keys": item.public_keys, "password": item.password,
                "password_generation": item.password_generation}  # fmt: skip
    return [(shard_of(item.mac), (json.dumps(fact, sort_keys=True) + "\n").encode())]
