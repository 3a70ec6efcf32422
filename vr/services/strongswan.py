"""strongSwan: site-to-site tunnels and remote-access VPN (IKEv2, EAP-MSCHAPv2 users).

charon runs under supervisord with its own strongswan.conf (STRONGSWAN_CONF) and VICI
socket in the router's run dir. vr renders one swanctl.conf fragment per connection, per
secret and per user, and loads only the fragments that changed through VICI: load-conn of
an unchanged connection is never sent, so every other tunnel keeps its SAs. Whatever the
fragments no longer name is unloaded and its SAs terminated (unload-conn alone leaves a
responder's SAs up); a removed user's sessions are terminated too.

The checker is a second charon, alone in an empty network namespace (`unshare --net`):
the changed fragments are loaded into it and unloaded again, so charon's own parser
judges them before anything live does. swanctl cannot do this (see vr/services/swanctl.py).

Kernels without ESP (some cloud kernels are built without it) get charon's userspace
ESP (kernel-libipsec: a TUN device, ESP in UDP 4500); a probe decides at render time.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from vr.foundation.certificates import pem_problems, subject_name, under
from vr.foundation.document import PROPOSAL_KEYWORDS, RemoteAccess, RouterDocument, SiteToSite
from vr.foundation.errors import Problem
from vr.foundation.files import listed_files, read_json
from vr.services import swanctl
from vr.services.base import Change, CheckFailed, Program, Service, repeats
from vr.services.probes import ProbeSpec
from vr.services.runtime import Runtime

PROGRAM, CHECKER = "charon", "charon-check"
LIVE_CONF, CHECK_CONF = "strongswan.conf", "strongswan-check.conf"
LOAD_SCRIPT = "vpn-load.sh"  # what charon runs when it starts
CHARON = "/usr/sbin/charon-systemd"  # foreground, no pid file: one per namespace side by side
IKE_PORTS = (500, 4500)  # IKE, and IKE/ESP in UDP behind NAT
REMOTE_ACCESS = "remote-access"  # its connection, child and pool; tunnels are "s2s-<id>"
_PLUGINS = "random nonce openssl pem pkcs1 pkcs8 x509 revocation constraints pubkey kdf hmac {kernel} " \
    "socket-default vici eap-identity eap-mschapv2"  # fmt: skip
# What IKEv2 clients offer out of the box: Windows still proposes SHA1 with MODP1024.
_RA_IKE = ["aes256-sha256-ecp256", "aes256-sha256-modp2048", "aes256-sha1-modp1024", "default"]
_RA_ESP = ["aes256gcm16", "aes256-sha256", "aes256-sha1", "default"]
VICI_TIMEOUT_S = 5.0


class StrongswanService(Service):
    name = "strongswan"

    def read(self, doc: RouterDocument) -> Any:
        return (doc.router.name, doc.interfaces, doc.nat, doc.vpn)

    def configured(self, doc: RouterDocument) -> bool:
        vpn = doc.vpn
        return any(t.enabled for t in vpn.site_to_site) or bool(vpn.remote_access and vpn.remote_access.enabled)

    def verify(self, doc: RouterDocument) -> list[Problem]:
        vpn = doc.vpn
        problems: list[Problem] = []
        assigned = {p.ip for p in doc.nat.public_ips if not p.reserved}
        tiers = [a.network for i in doc.guest_interfaces() for a in i.ipv4s()]
        routed = [a.network for i in doc.routed_tiers() for a in i.ipv4s()]  # a tunnel reaches these only
        forwarded = {(f.public_ip, port) for f in doc.nat.port_forwarding if f.protocol == "udp"
                     for port in IKE_PORTS if f.public_ports.start <= port <= f.public_ports.end}  # fmt: skip
        pool = vpn.remote_access.pool if vpn.remote_access else None

        static = {s.public_ip for s in doc.nat.static_nat}

        def gateway_problems(path: str, ip: Any) -> list[Problem]:
            if ip not in assigned:
                return [Problem(path, f"{ip} is not an assigned public IP of this router (nat.public_ips)")]
            if ip in static:
                return [Problem(path, f"{ip} is taken whole by a static NAT")]
            taken = [port for port in IKE_PORTS if (ip, port) in forwarded]
            if taken:
                return [Problem(path, f"udp {ip}:{taken[0]} is a port forward; IKE needs it")]
            return []

        claimed: list[tuple[str, IPv4Network]] = []  # (path, peer subnet) of enabled tunnels
        for n, tunnel in enumerate(vpn.site_to_site):
            path = f"vpn.site_to_site[{n}]"
            problems += gateway_problems(f"{path}.local_ip", tunnel.local_ip)
            if tunnel.peer_ip in assigned or any(tunnel.peer_ip in tier for tier in tiers):
                problems.append(Problem(f"{path}.peer_ip", f"{tunnel.peer_ip} is this router's own address"))
            for m, subnet in enumerate(tunnel.local_subnets):
                if not any(subnet.overlaps(tier) for tier in routed):
                    problems.append(Problem(f"{path}.local_subnets[{m}]", f"{subnet} holds none of the guest tiers "
                                                                          "the router is the gateway of"))
            for m, subnet in enumerate(tunnel.peer_subnets):
                where = f"{path}.peer_subnets[{m}]"
                clash = next((t for t in tiers if subnet.overlaps(t)), None)
                if clash is not None:
                    problems.append(Problem(where, f"{subnet} overlaps the guest tier {clash}"))
                elif pool is not None and subnet.overlaps(pool):
                    problems.append(Problem(where, f"{subnet} overlaps the remote-access pool {pool}"))
                if tunnel.enabled:
                    claimed.append((where, subnet))
        problems += _overlapping(claimed)
        problems += _proposal_problems(vpn.site_to_site)
        for n, first in repeats(t.id for t in vpn.site_to_site):
            problems.append(Problem(f"vpn.site_to_site[{n}].id", f"already vpn.site_to_site[{first}]"))
        for n, first in repeats((t.local_ip, t.peer_ip) for t in vpn.site_to_site):
            problems.append(
                Problem(f"vpn.site_to_site[{n}].peer_ip", f"the same gateways as vpn.site_to_site[{first}]")
            )

        access = vpn.remote_access
        if access is not None:
            problems += gateway_problems("vpn.remote_access.public_ip", access.public_ip)
            clash = next((t for t in tiers if access.pool.overlaps(t)), None)
            if clash is not None:
                problems.append(Problem("vpn.remote_access.pool", f"{access.pool} overlaps the guest tier {clash}"))
            for n, first in repeats(u.username for u in access.users):
                problems.append(Problem(f"vpn.remote_access.users[{n}].username", f"already users[{first}]"))
            if access.certificate is not None:
                found = pem_problems(access.certificate.certificate, access.certificate.key)
                problems += under("vpn.remote_access.certificate", found)
                usable = not any(not p.warning for p in found)
                identity = subject_name(access.certificate.certificate) if usable else None
                if usable and (identity is None or not swanctl.is_plain(identity)):
                    problems.append(Problem("vpn.remote_access.certificate.certificate",
                                            "needs a DNS or IP subject alternative name (letters, digits, '.-')"
                                            " for clients to match"))  # fmt: skip
        return problems

    def generate(self, doc: RouterDocument, runtime: Runtime) -> dict[str, bytes]:
        if not self.configured(doc):
            return {}
        run_dir = runtime.settings.run_dir
        files = {
            # The start script is a file of its own: a new vr release (a patch) rewrites it, not
            # strongswan.conf, so charon (and every SA) is not restarted for it.
            LIVE_CONF: _charon_conf(
                runtime,
                "live",
                f"charon of router {doc.router.name}",
                run_dir / "charon.vici",
                start_script=swanctl.value(f"/bin/sh {runtime.settings.service_dir(self.name) / LOAD_SCRIPT}"),
            ),
            LOAD_SCRIPT: _load_script(runtime),
            CHECK_CONF: _checker_conf(runtime, run_dir / "charon-check.vici"),
        }
        tunnels = [t for t in doc.vpn.site_to_site if t.enabled]
        for rendered in runtime.memoized("strongswan/s2s", tunnels, lambda t, _: _tunnel_files(t, runtime)):
            files.update(rendered)
        access = doc.vpn.remote_access
        if access is not None and access.enabled:
            tiers = [str(a.network) for i in doc.routed_tiers() for a in i.ipv4s()]
            files.update(_remote_access_files(access, tiers, runtime))
            for user in access.users:
                secrets = {f"eap-{_digest(user.username)}": {"secret": swanctl.secret(user.password),
                                                             "id": user.username}}  # fmt: skip
                files[f"user-{user.username}.secrets"] = _fragment(runtime, {"secrets": secrets})
        return files

    def check(self, staged_dir: Path, change: Change, runtime: Runtime) -> None:
        names = [p for p in change.written if _is_fragment(p)]
        if not names:
            return
        loaded = _read_fragments(staged_dir, names)  # raises CheckFailed on a fragment vr cannot read
        try:
            with _checker(runtime) as session:
                _load(session, loaded)
                for name in loaded.conns:
                    session.unload_conn({"name": name})
                for name in loaded.pools:
                    session.unload_pool({"name": name})
        except _vici_errors() as error:
            raise CheckFailed(f"charon refused the configuration: {error}") from None
        except OSError as error:
            raise CheckFailed(f"the checker charon does not answer: {error}") from None

    def programs(self, doc: RouterDocument, runtime: Runtime) -> list[Program]:
        if not self.configured(doc):
            return []
        here = runtime.settings.service_dir(self.name)
        return [
            Program(PROGRAM, [CHARON], environment={"STRONGSWAN_CONF": str(here / LIVE_CONF)}),
            Program(CHECKER, ["unshare", "--net", CHARON], environment={"STRONGSWAN_CONF": str(here / CHECK_CONF)},
                    autorestart=True),  # no probe watches the checker: supervisord restarts it
        ]  # fmt: skip

    def apply(self, change: Change, doc: RouterDocument | None, runtime: Runtime) -> None:
        if doc is None or not self.configured(doc):
            return  # supervisord stopped charon with the program (TERM: it sends DELETE for every SA)
        client = runtime.supervisor
        fresh = False
        loading = _loading_marker(runtime)
        try:
            for program, conf in ((CHECKER, CHECK_CONF), (PROGRAM, LIVE_CONF)):
                running = client.state(program) == "RUNNING"
                if running and conf not in change.written:  # plugins or socket: only a restart reads strongswan.conf
                    continue
                if program == PROGRAM:
                    loading.touch()  # before charon starts: its start script sees it
                    fresh = True
                if running:
                    client.restart(program)
                else:
                    client.start(program)
            # A restarted charon, or a rollback (charon may hold either version), loads everything.
            changed = None if fresh or change.restore else [p for p in change.written if _is_fragment(p)]
            gone = _read_removed(change)
            removed_users = [o for s in gone.shared.values() if s["type"] == "EAP" for o in s["owners"]]
            load_live(runtime, changed, removed_users)
        finally:
            loading.unlink(missing_ok=True)

    def probe_spec(self, doc: RouterDocument, runtime: Runtime) -> ProbeSpec | None:
        """charon answers `stats` over VICI and has every connection loaded; an active tunnel
        that is down is initiated again (with back-off) and why it is down is kept for `vr
        status --vpn`, never counted against charon (its peer may be down or misconfigured)."""
        if not self.configured(doc):
            return None
        args = {"vici_socket": str(live_socket(runtime)), "connections": sorted(connection_names(doc)),
                "tunnels": active_tunnels(doc), "state_file": str(tunnel_state_file(runtime))}  # fmt: skip
        return {"program": PROGRAM, "check": "vpn", "args": args}


def load_live(runtime: Runtime, changed: list[str] | None = None, removed_users: Sequence[str] = ()) -> None:
    """Make the live charon hold what the live fragments say: load the changed ones (None:
    all of them), unload what none of them names, end removed users' sessions. Also what
    charon runs at its own start (`vr vpn-load`), so a charon restarted after a crash is
    not left empty."""
    here = runtime.settings.service_dir(StrongswanService.name)
    parsed = {p: _messages(p, (here / p).read_bytes(), here) for p in listed_files(here) if _is_fragment(p)}
    wanted = _merged(list(parsed.values()))
    with vici_session(live_socket(runtime), wait_s=VICI_TIMEOUT_S) as session:
        _load(session, wanted if changed is None else _merged([parsed[p] for p in changed if p in parsed]))
        _unload_unwanted(session, wanted)
        _terminate_users(session, removed_users)


def _overlapping(claimed: list[tuple[str, IPv4Network]]) -> list[Problem]:
    """Peer subnets two tunnels both claim, found in one sweep by address (256 tunnels of 32
    subnets each would be 33 million pairwise tests); the later one in the document is named."""
    problems = []
    widest: tuple[int, int] | None = None  # (last address, claim number) of the subnets swept so far
    order = sorted(range(len(claimed)), key=lambda n: (int(claimed[n][1].network_address), -claimed[n][1].prefixlen))
    for n in order:
        subnet = claimed[n][1]
        if widest is not None and int(subnet.network_address) <= widest[0]:
            later, earlier = max(n, widest[1]), min(n, widest[1])
            problems.append(Problem(claimed[later][0], f"{claimed[later][1]} overlaps {claimed[earlier][0]}, "
                                                       "another tunnel's"))  # fmt: skip
        if widest is None or int(subnet.broadcast_address) > widest[0]:
            widest = (int(subnet.broadcast_address), n)
    return problems


def connection_names(doc: RouterDocument) -> list[str]:
    names = [f"s2s-{t.id}" for t in doc.vpn.site_to_site if t.enabled]
    access = doc.vpn.remote_access
    return names + ([REMOTE_ACCESS] if access is not None and access.enabled else [])


def active_tunnels(doc: RouterDocument) -> list[str]:
    """The tunnels this router initiates (and so keeps initiating until they are up)."""
    return [f"s2s-{t.id}" for t in doc.vpn.site_to_site if t.enabled and not t.passive]


def tunnel_state_file(runtime: Runtime) -> Path:
    """Why each tunnel that is down is down, kept by the probe (vr.services.probes.keep_tunnels_up)."""
    return runtime.settings.run_dir / "vpn-tunnels.json"


def live_socket(runtime: Runtime) -> Path:
    return runtime.settings.run_dir / "charon.vici"


@functools.cache
def kernel_has_esp() -> bool:
    """Whether this kernel can hold an ESP state; tried in a namespace of its own, so nothing
    live is touched (a kernel with ESP as a module loads it here)."""
    key = "0x" + "00" * 16
    command = ["unshare", "--net", "ip", "xfrm", "state", "add", "src", "192.0.2.1", "dst", "192.0.2.2",
               "proto", "esp", "spi", "0x100", "mode", "tunnel", "enc", "cbc(aes)", key,
               "auth", "hmac(sha256)", key + "00" * 16]  # fmt: skip
    return subprocess.run(command, capture_output=True, check=False, timeout=10).returncode == 0


# The PRF charon derives for an IKE proposal that names none: its integrity algorithm's.
_IMPLIED_PRF = {"HMAC_SHA1_96": "PRF_HMAC_SHA1", "HMAC_SHA2_256_128": "PRF_HMAC_SHA2_256",
                "HMAC_SHA2_384_192": "PRF_HMAC_SHA2_384", "HMAC_SHA2_512_256": "PRF_HMAC_SHA2_512",
                "HMAC_MD5_96": "PRF_HMAC_MD5", "AES_XCBC_96": "PRF_AES128_XCBC", "AES_CMAC_96": "PRF_AES128_CMAC"}  # fmt: skip
_ALGORITHMS: dict[tuple, dict[str, frozenset[str]]] = {}  # charon binary -> what it implements


def charon_algorithms() -> dict[str, frozenset[str]] | str:
    """What this router's charon implements, by transform type (VICI get-algorithms), or why
    that could not be learnt. Its plugins decide (a keyword charon parses may still have no
    implementation: aesxcbc parses, then key derivation fails at runtime), so a checker charon
    (the checker's strongswan.conf, alone in an empty network namespace) is asked, once per
    charon binary: a patched or upgraded charon is asked again."""
    try:
        info = os.stat(CHARON)
    except OSError as error:
        return f"{CHARON}: {error.strerror}"
    key = (CHARON, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    if key not in _ALGORITHMS:
        from vr.foundation.settings import Settings

        try:
            with tempfile.TemporaryDirectory(prefix="vr-charon-algs-") as directory, \
                    _one_off_checker(Runtime(Settings()), Path(directory)) as session:  # fmt: skip
                listed = session.get_algorithms()
        except (CheckFailed, OSError, *_vici_errors()) as error:
            return str(error)  # not kept: the next verify asks again
        _ALGORITHMS[key] = {transform: frozenset(names) for transform, names in listed.items()}
    return _ALGORITHMS[key]


def _proposal_problems(tunnels: Sequence[SiteToSite]) -> list[Problem]:
    """Each proposal keyword that this router's charon cannot do, by its path in the document.
    ESP's ciphers are the kernel's when it has ESP; with userspace ESP they are charon's."""
    if not tunnels:
        return []
    algorithms = charon_algorithms()
    if isinstance(algorithms, str):
        return [Problem("vpn.site_to_site", f"cannot learn which algorithms charon implements: {algorithms}")]
    esp_in_charon = not kernel_has_esp()
    problems = []
    for n, tunnel in enumerate(tunnels):
        for field, proposals in (("ike_proposals", tunnel.ike_proposals), ("esp_proposals", tunnel.esp_proposals)):
            for m, proposal in enumerate(proposals):
                reason = _unsupported(proposal, field == "ike_proposals", esp_in_charon, algorithms)
                if reason:
                    problems.append(Problem(f"vpn.site_to_site[{n}].{field}[{m}]", reason))
    return problems


def _unsupported(proposal: str, ike: bool, esp_in_charon: bool, algorithms: dict[str, frozenset[str]]) -> str | None:
    words = proposal.split("-")  # the document checked every keyword's spelling
    names_prf = any(PROPOSAL_KEYWORDS[w][0] == "prf" for w in words)
    for word in words:
        transform, name = PROPOSAL_KEYWORDS[word]
        if transform == "esn" or not (ike or esp_in_charon or transform == "dh"):
            continue
        needed = [(transform, name)]
        if ike and transform == "integrity" and not names_prf:
            needed.append(("prf", _IMPLIED_PRF[name]))
        for kind, algorithm in needed:
            if algorithm not in algorithms.get(kind, ()):
                derived = "" if kind == transform else f" (the PRF charon derives from {word})"
                return f"{word!r}: this router's charon has no {algorithm} {kind}{derived}: none of its plugins " \
                       "implements it"  # fmt: skip
    return None


def _kernel_plugins(runtime: Runtime) -> str:
    """The probe's answer is kept in the run dir: it holds until the next boot."""
    known = runtime.settings.run_dir / "kernel-esp"
    try:
        esp = known.read_text() == "yes"
    except FileNotFoundError:
        esp = kernel_has_esp()
        with contextlib.suppress(OSError):  # no run dir (a dry render): just not kept
            known.write_text("yes" if esp else "no")
    return "kernel-netlink" if esp else "kernel-libipsec kernel-netlink"


def vpn_report(doc: RouterDocument, runtime: Runtime) -> list[dict]:
    """Each connection as charon sees it: state, time up, bytes, remote-access users, and for
    a tunnel that is down, why. A tunnel is ESTABLISHED only with a CHILD_SA installed (an
    IKE_SA alone carries no traffic). Secrets are never part of what VICI returns."""
    empty = {"state": "DOWN", "established_s": None, "bytes_in": 0, "bytes_out": 0, "users": [], "reason": None}
    rows: dict[str, dict] = {name: {"connection": name, **copy.deepcopy(empty)} for name in connection_names(doc)}
    with vici_session(live_socket(runtime), wait_s=0) as session:
        for item in session.list_sas():
            for name, sa in item.items():
                row = rows.get(name)
                if row is None:
                    continue
                state = sa["state"].decode()
                children = sa.get("child-sas", {}).values()
                if (
                    name != REMOTE_ACCESS
                    and state == "ESTABLISHED"
                    and not any(c["state"] in (b"INSTALLED", b"REKEYING", b"REKEYED") for c in children)
                ):
                    state = "DOWN"  # the IKE_SA is up, its CHILD_SA is not: no traffic passes
                if row["state"] != "ESTABLISHED":
                    row["state"] = state
                if state == "ESTABLISHED" and row["established_s"] is None:
                    row["established_s"] = int(sa.get("established", b"0"))
                for child in children:
                    row["bytes_in"] += int(child.get("bytes-in", b"0"))
                    row["bytes_out"] += int(child.get("bytes-out", b"0"))
                if name == REMOTE_ACCESS and state == "ESTABLISHED":
                    user = (sa.get("remote-eap-id") or sa.get("remote-id") or b"?").decode()
                    addresses = [v.decode() for v in sa.get("remote-vips", [])]
                    row["users"].append({"user": user, "address": ", ".join(addresses)})
    known = read_json(tunnel_state_file(runtime)) or {}
    active = set(active_tunnels(doc))
    for name, row in rows.items():
        if name == REMOTE_ACCESS or row["state"] == "ESTABLISHED":
            continue
        if name not in active:
            row["reason"] = "passive: waits for the peer to initiate"
            continue
        entry = known.get(name) or {}
        row["reason"] = entry.get("reason") or "not up yet"
        if entry.get("attempts"):
            row["retries"] = entry["attempts"]
            row["next_retry_s"] = max(0, round(entry["next_s"] - time.time()))
    return list(rows.values())


# ------------------------------------------------------------------------ rendering
def _fragment(runtime: Runtime, tree: dict) -> bytes:
    return runtime.render("strongswan/swanctl.conf.j2", tree=_plain(tree))


def _plain(tree: dict) -> dict:
    """Every key and value made safe for swanctl.conf, or refused (never escaped into syntax)."""
    out = {}
    for key, item in tree.items():
        swanctl.value(key)
        out[key] = _plain(item) if isinstance(item, dict) else swanctl.value(item)
    return out


def _load_script(runtime: Runtime) -> bytes:
    variables = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(runtime.settings.environment().items()))
    return runtime.render("strongswan/vpn-load.sh.j2", variables=variables, python=shlex.quote(sys.executable),
                          loading=shlex.quote(str(_loading_marker(runtime))))  # fmt: skip


def _loading_marker(runtime: Runtime) -> Path:
    """Present while an apply that started charon itself loads it: charon's start script then
    leaves the loading to it (two loads at once of 50 tunnels doubled a cold start's)."""
    return runtime.settings.run_dir / "charon.loading"


def _charon_conf(
    runtime: Runtime, role: str, purpose: str, vici_socket: Path, start_script: str | None = None
) -> bytes:
    """strongswan.conf for one charon, by role: "live", "checker" (alone in an empty network
    namespace: never installs an SA or a route) or "client" (a road warrior: lab, tests)."""
    checker = role == "checker"
    return runtime.render(
        "strongswan/strongswan.conf.j2",
        purpose=purpose,
        plugins=_PLUGINS.format(kernel="kernel-netlink" if checker else _kernel_plugins(runtime)),
        install_routes="no" if checker else "yes",
        install_virtual_ip="yes" if role == "client" else "no",
        socket=vici_socket,
        start_script=start_script,
    )


def _checker_conf(runtime: Runtime, vici_socket: Path) -> bytes:
    purpose = "the checker: alone in an empty network namespace, it only parses what vr loads into it"
    return _charon_conf(runtime, "checker", purpose, vici_socket)


def client_conf(runtime: Runtime, vici_socket: Path) -> bytes:
    """A road warrior's charon (the lab's and the tests' client): it takes a virtual IP."""
    return _charon_conf(runtime, "client", "a remote-access client (lab and tests)", vici_socket)


def _tunnel_files(tunnel: SiteToSite, runtime: Runtime) -> dict[str, bytes]:
    name = f"s2s-{tunnel.id}"
    active = not tunnel.passive
    child = {
        "local_ts": tunnel.local_subnets,
        "remote_ts": tunnel.peer_subnets,
        "esp_proposals": tunnel.esp_proposals,
        "rekey_time": f"{tunnel.esp_lifetime_s}s",
        "dpd_action": tunnel.dpd_action,
        "start_action": "start" if active else "none",
    }
    conn = {
        "version": tunnel.ike_version,
        "local_addrs": tunnel.local_ip,
        "remote_addrs": tunnel.peer_ip,
        "proposals": tunnel.ike_proposals,
        "rekey_time": f"{tunnel.ike_lifetime_s}s",
        "dpd_delay": f"{tunnel.dpd_interval_s}s",
        # An active tunnel keeps trying: charon retransmits to a silent peer forever; one that
        # refused (NO_PROPOSAL_CHOSEN...) charon gives up on, and vr's probe initiates it again.
        "keyingtries": 0 if active else 1,
        "mobike": "no",  # a gateway does not move; MOBIKE would tell the peer every tier address
        "local": {"auth": "psk", "id": tunnel.local_ip},
        "remote": {"auth": "psk", "id": tunnel.peer_ip},
        "children": {name: child},
    }
    secret = {"secret": swanctl.secret(tunnel.psk), "id-local": tunnel.local_ip, "id-remote": tunnel.peer_ip}
    return {
        f"{name}.conf": _fragment(runtime, {"connections": {name: conn}}),
        f"{name}.secrets": _fragment(runtime, {"secrets": {f"ike-{name}": secret}}),
    }


def _remote_access_files(access: RemoteAccess, tiers: list[str], runtime: Runtime) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    conn: dict[str, Any] = {
        "version": 2,
        "local_addrs": access.public_ip,
        "remote_addrs": "%any",
        "pools": REMOTE_ACCESS,
        "unique": "replace",  # a user who dials in again replaces their stale session
        # MOBIKE would send every client each address of the router, guest tiers included.
        # A client that moves dials in again (unique = replace); the router never moves.
        "mobike": "no",
        "proposals": _RA_IKE,
        "dpd_delay": "30s",
        "remote": {"auth": "eap-mschapv2", "eap_id": "%any"},
        "children": {REMOTE_ACCESS: {"local_ts": tiers, "esp_proposals": _RA_ESP, "dpd_action": "clear"}},
    }
    if access.certificate is not None:
        # Named by content: a new certificate changes the fragment, so the connection reloads.
        cert, key = access.certificate.certificate.encode(), access.certificate.key.encode()
        cert_file = f"{REMOTE_ACCESS}-cert-{_digest(cert)}.pem"
        key_file = f"{REMOTE_ACCESS}-key-{_digest(key)}.pem"
        files[cert_file], files[key_file] = cert, key
        conn["send_cert"] = "always"
        identity = subject_name(access.certificate.certificate)
        conn["local"] = {"auth": "pubkey", "certs": cert_file, "id": identity}
        secrets = {f"private-{REMOTE_ACCESS}": {"file": key_file}}
    else:
        conn["local"] = {"auth": "psk", "id": access.public_ip}
        secrets = {f"ike-{REMOTE_ACCESS}": {"secret": swanctl.secret(access.psk or ""), "id": access.public_ip}}
    pool: dict[str, Any] = {"addrs": access.pool}
    if access.dns:
        pool["dns"] = access.dns
    files[f"{REMOTE_ACCESS}.conf"] = _fragment(
        runtime, {"connections": {REMOTE_ACCESS: conn}, "pools": {REMOTE_ACCESS: pool}}
    )
    files[f"{REMOTE_ACCESS}.secrets"] = _fragment(runtime, {"secrets": secrets})
    return files


def _digest(data: str | bytes) -> str:
    """A short stable name for a user's secret or a certificate file (user names may hold '.')."""
    return hashlib.blake2b(data.encode() if isinstance(data, str) else data, digest_size=6).hexdigest()


# ------------------------------------------------------------------------ loading over VICI
def _is_fragment(relpath: str) -> bool:
    return relpath.endswith((".conf", ".secrets")) and relpath not in (LIVE_CONF, CHECK_CONF)


def _read_fragments(directory: Path, names: list[str]) -> swanctl.Messages:
    return _merged([_messages(name, (directory / name).read_bytes(), directory) for name in names])


def _merged(parts: list[swanctl.Messages]) -> swanctl.Messages:
    total = swanctl.Messages()
    for part in parts:
        total.conns.update(part.conns)
        total.pools.update(part.pools)
        total.shared.update(part.shared)
        total.keys += part.keys
    return total


def _messages(name: str, content: bytes, directory: Path | None) -> swanctl.Messages:
    def read_file(relpath: str) -> bytes:
        if directory is None or "/" in relpath:
            raise swanctl.SwanctlError(f"{relpath}: not a file of this service")
        return (directory / relpath).read_bytes()

    try:
        return swanctl.messages(swanctl.parse(content.decode()), read_file)
    except (swanctl.SwanctlError, UnicodeDecodeError, OSError) as error:
        raise CheckFailed(f"strongswan {name}: {error}") from None


def _read_removed(change: Change) -> swanctl.Messages:
    """What the removed fragments had loaded (their content before this change): the shared
    secrets, whose owners are the users to cut off. A removed key's file is gone with it and
    is not needed for that."""
    total = swanctl.Messages()
    for name in change.removed:
        content = change.previous.get(name)
        if _is_fragment(name) and name.endswith(".secrets") and content:
            try:
                total.shared.update(swanctl.messages(swanctl.parse(content.decode()), lambda _: b"").shared)
            except (swanctl.SwanctlError, UnicodeDecodeError) as error:
                raise CheckFailed(f"strongswan {name}: {error}") from None
    return total


def _load(session: Any, messages: swanctl.Messages) -> None:
    """Secrets and keys before connections: a connection that starts at once needs them."""
    for key in messages.keys:
        session.load_key(key)
    for shared in messages.shared.values():
        session.load_shared(shared)
    for name, pool in messages.pools.items():
        session.load_pool({name: pool})
    for name, conn in messages.conns.items():
        session.load_conn({name: conn})


def _unload_unwanted(session: Any, wanted: swanctl.Messages) -> None:
    for name in {n.decode() for n in session.get_conns()["conns"]} - set(wanted.conns):
        session.unload_conn({"name": name})
        # A responder's SAs outlive their unloaded connection: close them explicitly.
        with contextlib.suppress(*_vici_errors()):
            list(session.terminate({"ike": name, "force": "yes", "timeout": "1000"}))
    for secret_id in {n.decode() for n in session.get_shared()["keys"]} - set(wanted.shared):
        session.unload_shared({"id": secret_id})
    for name in set(session.get_pools()) - set(wanted.pools):
        session.unload_pool({"name": name})


def _terminate_users(session: Any, users: list[str]) -> None:
    """A removed user's sessions end now, not at their next rekey."""
    if not users:
        return
    # The listing streams over the session: finish it before asking anything else.
    sas = [sa for item in session.list_sas({"ike": REMOTE_ACCESS}) for sa in item.values()]
    for sa in sas:
        identity = (sa.get("remote-eap-id") or sa.get("remote-id") or b"").decode()
        if identity in users:
            with contextlib.suppress(*_vici_errors()):
                list(session.terminate({"ike-id": sa["uniqueid"].decode(), "force": "yes", "timeout": "1000"}))


def _vici_errors() -> tuple[type[Exception], ...]:
    from vici.exception import CommandException, SessionException

    return (CommandException, SessionException)


def _connect(path: Path, wait_s: float) -> socket.socket:
    """charon's VICI socket, waiting up to wait_s for a charon just started."""
    deadline = time.monotonic() + wait_s
    while True:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.settimeout(VICI_TIMEOUT_S)
        try:
            connection.connect(str(path))
            return connection
        except OSError:
            connection.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@contextlib.contextmanager
def vici_session(path: Path | socket.socket, wait_s: float = 0) -> Iterator[Any]:
    import vici

    connection = path if isinstance(path, socket.socket) else _connect(path, wait_s)
    try:
        yield vici.Session(connection)
    finally:
        connection.close()


@contextlib.contextmanager
def _checker(runtime: Runtime) -> Iterator[Any]:
    """The standing checker, or, before supervisord runs it (a first apply), one of our own."""
    run_dir = runtime.settings.run_dir
    try:
        standing = _connect(run_dir / "charon-check.vici", wait_s=0)
    except OSError:
        standing = None
    if standing is not None:
        with vici_session(standing) as session:
            yield session
        return
    with _one_off_checker(runtime, run_dir) as session:
        yield session


@contextlib.contextmanager
def _one_off_checker(runtime: Runtime, directory: Path) -> Iterator[Any]:
    """A checker charon of our own (its conf and socket in directory), stopped on the way out."""
    conf, vici_socket = directory / "charon-check-once.conf", directory / "charon-check-once.vici"
    conf.write_bytes(_checker_conf(runtime, vici_socket))
    environment = {**os.environ, "STRONGSWAN_CONF": str(conf)}
    with tempfile.TemporaryFile() as log:  # a pipe nobody reads would fill and block charon
        process = subprocess.Popen(["unshare", "--net", CHARON], env=environment, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            try:
                connection = _connect(vici_socket, wait_s=VICI_TIMEOUT_S)
            except OSError:
                _stop(process)
                log.seek(0)
                message = log.read().decode(errors="replace").strip()
                raise CheckFailed(f"the checker charon did not start: {message[-300:]}") from None
            with vici_session(connection) as session:
                yield session
        finally:
            _stop(process)
            conf.unlink(missing_ok=True)
            vici_socket.unlink(missing_ok=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
