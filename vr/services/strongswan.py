"""strongSwan: site-to-site tunnels and remote-access VPN (IKEv2, EAP-MSCHAPv2 users).

This release validates the `vpn` section; charon under supervisord and loading through
VICI come next. Until then a router whose document asks for a tunnel or remote access is
refused with a message that says so, rather than told "applied" with no tunnel.
"""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import Any

from vr.certificates import pem_problems, under
from vr.document import RouterDocument
from vr.errors import Problem
from vr.services.base import Service, repeats

IKE_PORTS = (500, 4500)  # IKE, and IKE/ESP in UDP behind NAT


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
        tiers = [i.ipv4().network for i in doc.guest_interfaces() if i.ipv4()]
        forwarded = {(f.public_ip, port) for f in doc.nat.port_forwarding if f.protocol == "udp"
                     for port in IKE_PORTS if f.public_ports.start <= port <= f.public_ports.end}  # fmt: skip
        pool = vpn.remote_access.pool if vpn.remote_access else None

        def gateway_problems(path: str, ip: Any) -> list[Problem]:
            if ip not in assigned:
                return [Problem(path, f"{ip} is not an assigned public IP of this router (nat.public_ips)")]
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
                if not any(subnet.overlaps(tier) for tier in tiers):
                    problems.append(Problem(f"{path}.local_subnets[{m}]", f"{subnet} holds none of the guest tiers"))
            for m, subnet in enumerate(tunnel.peer_subnets):
                where = f"{path}.peer_subnets[{m}]"
                clash = next((t for t in tiers if subnet.overlaps(t)), None)
                if clash is not None:
                    problems.append(Problem(where, f"{subnet} overlaps the guest tier {clash}"))
                elif pool is not None and subnet.overlaps(pool):
                    problems.append(Problem(where, f"{subnet} overlaps the remote-access pool {pool}"))
                if tunnel.enabled:
                    other = next((p for p, s in claimed if s.overlaps(subnet)), None)
                    if other is not None:
                        problems.append(Problem(where, f"{subnet} overlaps {other}, another tunnel's"))
                    claimed.append((where, subnet))
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
        if self.configured(doc) and not any(p for p in problems if not p.warning):
            problems.append(Problem("vpn", "valid, but this version of vr does not run strongSwan yet"))
        return problems
