"""The daemon's guest data server (aiohttp's low-level server: one handler, no router).

What a VM reads at boot, as CloudStack's router serves it and cloud-init's CloudStack data
source asks: on port 80 of each guest tier's router address

  /latest/user-data                     the VM's user data (404 when it has none)
  /latest/meta-data/                    an index, one key per line
  /latest/meta-data/<key>               one value; public-keys: every SSH key, one per line
  /latest/<key>                         the same, for older guests

and on port 8080 its one-time password (the header DomU_Request: send_my_password answers
it once, then "saved_password"; saved_password acknowledges and forgets it; anything else
"bad_request").

A VM is known by where its request comes from, never by what the request says: the tier of
the address it asked (the listening socket's) and its source address there (its DHCP
entry's). On a tier with anti-spoofing the ruleset already drops a source whose MAC is not
its entry's; on one without, the neighbour table must give the entry's MAC. Anything else is
404. What was served is kept in the state dir (0600): which VM acknowledged which password.
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from aiohttp import web, web_server

from vr.foundation.files import read_json, stat_key, write_json_atomic
from vr.services.guestdata import CONFIG

SERVED = "passwords-served.json"  # in the state dir: MAC -> the password generation it got
PARSED_KEPT = 512  # VMs kept parsed (those booting now ask a dozen times in a second)
NUD_REACHABLE, NUD_STALE, NUD_DELAY, NUD_PROBE, NUD_PERMANENT = 0x02, 0x04, 0x08, 0x10, 0x80  # a neighbour's states
IDLE_TIMEOUT_S = 15.0
# The meta data keys, in the order CloudStack's router lists them; the VM's own keys follow.
INDEX_ORDER = ("service-offering", "availability-zone", "local-ipv4", "local-hostname", "public-ipv4",
               "public-hostname", "instance-id", "vm-id", "public-keys", "cloud-identifier",
               "hypervisor-host-name")  # fmt: skip


class Vm:
    """One VM as the shards hold it: where it is, and its guest data as the JSON line it came
    in (parsed when asked: 4,000 VMs held parsed cost the daemon three times the memory)."""

    __slots__ = ("hostname", "ip", "line", "mac", "tier")

    def __init__(self, entry: dict, line: bytes | None) -> None:
        self.mac, self.tier, self.ip, self.hostname = entry["mac"], entry["tier"], entry["ip"], entry["hostname"]
        self.line = line


class Served:
    """What one VM is answered: its meta data (index and values), user data and password."""

    __slots__ = ("index", "meta", "password", "password_generation", "user_data")

    def __init__(self, vm: Vm) -> None:
        import base64

        data = json.loads(vm.line) if vm.line else {}
        meta = {"local-hostname": vm.hostname, "local-ipv4": vm.ip, "instance-id": vm.hostname}
        meta.update(data.get("meta_data") or {})
        keys = data.get("public_keys") or []
        if keys:
            meta["public-keys"] = "\n".join(keys)
        self.meta = {k: v.encode() for k, v in meta.items()}
        ordered = [k for k in INDEX_ORDER if k in meta] + sorted(k for k in meta if k not in INDEX_ORDER)
        self.index = "\n".join(ordered).encode()
        self.user_data = base64.b64decode(data["user_data"]) if data.get("user_data") else None
        self.password = data.get("password")
        self.password_generation = data.get("password_generation")


class GuestDataServer:
    """Listens where guestdata.json says, on sockets kept in the daemon's listener registry
    (the keeper holds them across a daemon's restart); serves the VMs of the shard files."""

    def __init__(self, daemon: Any, registry: Any) -> None:
        self.settings = daemon.settings
        self.registry = registry  # vr.control.agent.AgentServer: its listeners, held and handed over
        self.here = self.settings.service_dir("guestdata")
        self.config: dict = {}
        self.by_address: dict[str, dict] = {}  # listening address -> its tier's listen item
        self.shards: dict[str, tuple[tuple, list[Vm]]] = {}  # file -> (its stat key, its VMs)
        self.vms: dict[tuple[str, str], Vm] = {}  # (tier, source address) -> the VM
        self.sites: dict[str, web.SockSite] = {}  # by the registry's name: where this server listens
        self.runner: web.ServerRunner | None = None
        self.served_path = self.settings.state_dir / SERVED
        self.served: dict[str, int] = self._load_served()
        self.parsed: collections.OrderedDict[Vm, Served] = collections.OrderedDict()  # the last PARSED_KEPT asked
        self.netlink: Any = None  # the one thread that asks the neighbour table (made when first needed)

    # ------------------------------------------------------------ what to serve
    def load(self, paths: list[str] | None = None) -> None:
        """The files as the last apply left them: only shards that changed are read again
        (paths: those an apply changed; None: whichever differs on disk)."""
        if paths is None or CONFIG in paths:
            config = read_json(self.here / CONFIG) or {}
            self.config = config
            self.by_address = {item["address"]: item for item in config.get("listen", [])}
        vms_dir = self.here / "vms"
        if paths is None:
            names = {f"vms/{p.name}" for p in vms_dir.iterdir()} if vms_dir.is_dir() else set()
            checked = names
        else:
            checked = {p for p in paths if p.startswith("vms/")}
            names = (set(self.shards) | checked) - {p for p in checked if not (self.here / p).exists()}
        vms, gone = dict(self.vms), False  # a new index, swapped in whole: a request sees one or the other
        for name in set(self.shards) - names:
            for vm in self.shards.pop(name)[1]:
                vms.pop((vm.tier, vm.ip), None)
                gone = True
        for name in checked & names:
            key = stat_key(self.here / name)
            known = self.shards.get(name)
            if known is not None and known[0] == key:
                continue
            for vm in known[1] if known else ():
                vms.pop((vm.tier, vm.ip), None)
                gone = True
            shard = _read_shard(self.here / name)
            self.shards[name] = (key, shard)
            vms.update(((vm.tier, vm.ip), vm) for vm in shard)
        self.vms = vms
        self.parsed = collections.OrderedDict()  # a VM changed is a new Vm: nothing stale is kept
        if gone and self.served:  # a VM gone: what it acknowledged is forgotten
            macs = {vm.mac for vm in vms.values()}
            if any(mac not in macs for mac in self.served):
                self.served = {mac: g for mac, g in self.served.items() if mac in macs}
                self._save_served()

    # ------------------------------------------------------------ listening
    async def reload(self, paths: list[str] | None = None) -> None:
        """Serve what the files say now; a listening socket is kept while its address is wanted."""
        from vr.control import keeper
        from vr.control.daemon import DRAIN_S

        if paths is None:
            await asyncio.get_running_loop().run_in_executor(None, self.load)
        else:
            self.load(paths)  # a few shards: at once, in the loop (a thread's hand-over costs more)
        wanted = set()
        ports = (self.config.get("data_port"), self.config.get("password_port"))
        for address in self.by_address:
            wanted |= {keeper.tcp_name(address, port) for port in ports if port}
        if wanted == self.sites.keys():
            return
        if self.runner is None:
            self.runner = web.ServerRunner(web_server.Server(self.handle), access_log=None, handle_signals=False,
                                           keepalive_timeout=IDLE_TIMEOUT_S, shutdown_timeout=DRAIN_S)  # fmt: skip
            await self.runner.setup()
        listeners, held = self.registry.listeners, self.registry.held
        for name in sorted(wanted - self.sites.keys()):
            address, port = name.removeprefix("tcp:").rsplit(":", 1)
            try:
                if name not in listeners:
                    listeners[name] = held.pop(name, None) or keeper.bind_tcp(address, int(port))
                site = web.SockSite(self.runner, listeners[name][1].dup(), backlog=512)
                await site.start()
            except OSError as error:
                print(f"vr daemon: guest data cannot listen on {address} port {port}: {error.strerror}", file=sys.stderr)
                continue
            self.sites[name] = site
        for name in self.sites.keys() - wanted:
            await self.sites.pop(name).stop()
            if name in listeners:
                listeners.pop(name)[1].close()
        keeper.hand_over(self.settings, list(listeners.values()))

    def not_listening(self) -> str | None:
        """Why guest data is not served everywhere guestdata.json says (None: it is)."""
        from vr.control.keeper import tcp_name

        ports = [p for p in (self.config.get("data_port"), self.config.get("password_port")) if p]
        missing = [f"{a} port {p}" for a in self.by_address for p in ports if tcp_name(a, p) not in self.sites]
        return f"guest data is not listening on {', '.join(missing[:4])}" if missing else None

    async def rebind(self) -> None:
        """Every listener anew (the monitor found one not answering)."""
        for name in list(self.sites):
            await self.sites.pop(name).stop()
            listener = self.registry.listeners.pop(name, None)
            if listener is not None:
                listener[1].close()
        await self.reload()

    async def stop(self) -> None:
        for site in self.sites.values():
            await site.stop()
        if self.netlink is not None:
            self.netlink.shutdown(wait=False)
        if self.runner is not None:
            await self.runner.cleanup()

    # ------------------------------------------------------------ answering
    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            vm, item = self._vm_of(request)
            if vm is not None and not item["mac_checked"]:
                # A tier without anti-spoofing: the neighbour table says, now (one netlink
                # question in netlink's own thread, never a remembered answer), whose MAC has it.
                peer = request.transport.get_extra_info("peername")[0]
                loop = asyncio.get_running_loop()
                if not await loop.run_in_executor(self._netlink_thread(), _neighbour_is, peer, item.get("ifname"),
                                                  vm.mac):  # fmt: skip
                    vm = None
            return self._answer(request, vm)
        except Exception:  # noqa: BLE001 - logged for the operator; the guest gets no trace
            import traceback

            print(f"vr daemon: guest data {request.method} {request.path[:200]}: {traceback.format_exc()}",
                  file=sys.stderr)  # fmt: skip
            return _text(500, b"internal error")

    def _vm_of(self, request: web.BaseRequest) -> tuple[Vm | None, dict | None]:
        """The VM at the request's source address on the tier of the address it asked."""
        transport = request.transport
        if transport is None:
            return None, None
        local, peer = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
        item = self.by_address.get(local[0]) if local else None
        return (self.vms.get((item["tier"], peer[0])) if item and peer else None), item

    def _netlink_thread(self) -> Any:
        if self.netlink is None:
            from concurrent.futures import ThreadPoolExecutor

            self.netlink = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vr-neighbours")
        return self.netlink

    def _answer(self, request: web.BaseRequest, vm: Vm | None) -> web.Response:
        if vm is None:
            return _text(404, b"not found")
        local = request.transport.get_extra_info("sockname")
        if request.method not in ("GET", "HEAD"):
            return _text(405, b"method not allowed", {"Allow": "GET, HEAD"})
        served = self.parsed.get(vm)
        if served is None:
            served = self.parsed[vm] = Served(vm)
            if len(self.parsed) > PARSED_KEPT:
                self.parsed.popitem(last=False)
        if local[1] == self.config.get("password_port"):
            return self._password(request, vm, served)
        return _data(request.path, served)

    def _password(self, request: web.BaseRequest, vm: Vm, served: Served) -> web.Response:
        asked = request.headers.get("DomU_Request", "")
        pending = served.password if served.password and self.served.get(vm.mac) != served.password_generation else None
        if asked == "send_my_password":
            if pending is None:
                return _text(200, b"saved_password")
            self._acknowledge(vm, served)  # answered once: kept before it is sent, as CloudStack's router does
            return _text(200, pending.encode())
        if asked == "saved_password":
            if pending is not None:
                self._acknowledge(vm, served)
            return _text(200, b"saved_password")
        return _text(400, b"bad_request")

    def _acknowledge(self, vm: Vm, served: Served) -> None:
        self.served[vm.mac] = served.password_generation
        self._save_served()

    def _load_served(self) -> dict[str, int]:
        data = read_json(self.served_path)
        return {k: v for k, v in data.items() if isinstance(v, int)} if isinstance(data, dict) else {}

    def _save_served(self) -> None:
        try:
            write_json_atomic(self.served_path, self.served, mode=0o600)
        except OSError as error:  # a full disk: the password was still answered once in this process
            print(f"vr daemon: cannot keep which passwords were answered: {error.strerror}", file=sys.stderr)


def _data(path: str, vm: Served) -> web.Response:
    parts = path.strip("/").split("/")
    if len(parts) < 2 or parts[0] != "latest":
        return _text(404, b"not found")
    rest = parts[1:]
    if rest[0] == "meta-data":
        rest = rest[1:]
        if not rest:
            return _text(200, vm.index)
    if len(rest) != 1:
        return _text(404, b"not found")
    key = rest[0]
    if key == "user-data":
        return _text(404, b"not found") if vm.user_data is None else _text(200, vm.user_data, octets=True)
    value = vm.meta.get(key)
    return _text(404, b"not found") if value is None else _text(200, value)


def _text(status: int, body: bytes, headers: dict | None = None, octets: bool = False) -> web.Response:
    return web.Response(status=status, body=body, headers=headers,
                        content_type="application/octet-stream" if octets else "text/plain", charset=None if octets else "utf-8")  # fmt: skip


_netlink = threading.local()  # pyroute2's IPRoute of the neighbour thread (it may not run in the loop's)


def _neighbour_is(address: str, ifname: str | None, mac: str) -> bool:
    """Whether the neighbour table has the address at this MAC (on this interface), usable."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    if getattr(_netlink, "route", None) is None:
        _netlink.route = IPRoute()
    try:
        index = socket.if_nametoindex(ifname) if ifname else 0
        found = _netlink.route.neigh("get", dst=address, **({"ifindex": index} if index else {}))
    except (NetlinkError, OSError):
        return False
    usable = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT
    return any(entry.get_attr("NDA_LLADDR") == mac and entry["state"] & usable for entry in found)


def _read_shard(path: Path) -> list[Vm]:
    """The VMs of one shard file: each DHCP entry with its guest data, if any."""
    entries, data = [], {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            fact = json.loads(line)
        except ValueError:
            continue
        if "tier" in fact:
            entries.append(fact)
        else:
            data[fact.get("mac")] = line
    return [Vm(entry, data.get(entry["mac"])) for entry in entries]


__all__ = ["GuestDataServer"]
