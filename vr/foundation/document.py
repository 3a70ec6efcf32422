"""The router document: its schema, the partial-update merge, and error paths.

Every string that can reach a daemon config is constrained here to a charset that
cannot open a new directive, field or quote in any of the daemons' syntaxes.
"""

from __future__ import annotations

import functools
import hashlib
import re
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)

from vr.foundation.errors import InvalidPayload, Problem, StalePayload
from vr.foundation.jsontext import quote


def _pattern(regex: str, what: str):
    compiled = re.compile(regex)

    def check(value: str) -> str:
        # fullmatch, never '$': '$' also matches before a trailing newline.
        if not compiled.fullmatch(value):
            raise ValueError(f"not a valid {what}: {quote(value)}")
        return value

    return AfterValidator(check)


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"

Hostname = Annotated[str, _pattern(_LABEL, "hostname (RFC 1123 label: letters, digits, inner hyphens, 1-63)")]
DomainName = Annotated[
    str,
    Field(max_length=253),
    _pattern(rf"{_LABEL}(?:\.{_LABEL})*", "domain name (dot-separated RFC 1123 labels)"),
]
Identifier = Annotated[str, _pattern(r"[a-z0-9][a-z0-9_-]{0,31}", "identifier (a-z, 0-9, '_', '-', 1-32)")]
InterfaceName = Annotated[str, _pattern(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}", "interface name (1-15 chars)")]
MacAddress = Annotated[
    str,
    BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v),
    _pattern(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}", "MAC address (six colon-separated hex octets)"),
]
DhcpOptionName = Annotated[str, _pattern(r"[a-z][a-z0-9-]{0,39}", "DHCP option name")]
# No comma, quote, space, '#' or control character: each is a separator or comment in dnsmasq.
DhcpOptionValue = Annotated[str, _pattern(r"[A-Za-z0-9._:/@+=-]{1,255}", "DHCP option value")]
Duid = Annotated[
    str,
    BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v),
    _pattern(r"[0-9a-f]{2}(?::[0-9a-f]{2}){3,129}", "DUID (colon-separated hex octets)"),
]


class _Address(IPv4Address):
    """An IPv4 address that keeps its text: rendering 10,000 rules formats each address
    several times, and ipaddress builds the string anew every time."""

    __slots__ = ("_hash", "_text")

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._text = super().__str__()
        self._hash = super().__hash__()  # the same value, computed once

    def __str__(self) -> str:
        return self._text

    def __hash__(self) -> int:
        return self._hash

    def __format__(self, spec: str) -> str:
        return self._text if not spec else super().__format__(spec)


class _Network(IPv4Network):
    """An IPv4 network that keeps its text and integer bounds (see _Address)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._text = super().__str__()
        self.bounds = (int(self.network_address), int(self.broadcast_address))

    def __str__(self) -> str:
        return self._text

    def __format__(self, spec: str) -> str:
        return self._text if not spec else super().__format__(spec)


# Addresses are immutable and repeat across thousands of rules: parse each text once.
_parse_ipv4 = functools.lru_cache(maxsize=65536)(_Address)
_parse_ipv4_network = functools.lru_cache(maxsize=65536)(_Network)


def _from_text(parse, what: str, own_type: type | tuple[type, ...], schema_format: str) -> tuple:
    """Addresses come as strings, never as numbers: 0 is not 0.0.0.0, nor ::. The validator
    is the whole validation (a plain one), in Python and in JSON mode alike."""

    def validate(value: object) -> object:
        if own_type and isinstance(value, own_type):
            value = str(value)  # defaults and programmatic values: the same (cached) objects
        if not isinstance(value, str):
            # ValueError, not TypeError: pydantic reports only the former as a validation error.
            raise ValueError(f"not a valid {what}: expected a string, got {type(value).__name__}")  # noqa: TRY004
        if len(value) > 64 or "%" in value:  # '%': a zone id, free text that no daemon config may take
            raise ValueError(f"not a valid {what}: {quote(value)}")
        try:
            return parse(value)
        except ValueError as error:
            raise ValueError(f"not a valid {what}: {quote(value)} ({str(error)[:80]})") from None

    return (PlainValidator(validate), PlainSerializer(str, return_type=str, when_used="json"),
            WithJsonSchema({"type": "string", "format": schema_format}))  # fmt: skip


def _ip_address(text: str) -> IPv4Address | IPv6Address:
    return _parse_ipv4(text) if ":" not in text else IPv6Address(text)


def _ip_interface(text: str) -> IPv4Interface | IPv6Interface:
    return IPv4Interface(text) if ":" not in text else IPv6Interface(text)


def _ip_network(text: str) -> IPv4Network | IPv6Network:
    return _parse_ipv4_network(text) if ":" not in text else IPv6Network(text)


IPv4 = Annotated[IPv4Address, *_from_text(_parse_ipv4, "IPv4 address", IPv4Address, "ipv4")]
IPv4Net = Annotated[IPv4Network, *_from_text(_parse_ipv4_network, "IPv4 network", IPv4Network, "ipv4-network")]
IPv6 = Annotated[IPv6Address, *_from_text(IPv6Address, "IPv6 address", IPv6Address, "ipv6")]
IPv6Net = Annotated[IPv6Network, *_from_text(IPv6Network, "IPv6 network", IPv6Network, "ipv6-network")]
IPAddress = Annotated[IPv4Address | IPv6Address,
                      *_from_text(_ip_address, "IP address", (IPv4Address, IPv6Address), "ip")]  # fmt: skip
IPNetwork = Annotated[IPv4Network | IPv6Network,
                      *_from_text(_ip_network, "IP network", (IPv4Network, IPv6Network), "ip-network")]  # fmt: skip
IPInterface = Annotated[IPv4Interface | IPv6Interface,
                        *_from_text(_ip_interface, "interface address (address/prefix length)",
                                    (IPv4Interface, IPv6Interface), "ip-interface")]  # fmt: skip
# The largest integer a JSON number carries exactly in every parser (IEEE double):
# beyond it a manager's generation could not be compared, nor ever exceeded.
JSON_SAFE_MAX = 2**53 - 1


def _json_safe(value: int) -> int:
    if value > JSON_SAFE_MAX:
        raise ValueError(f"at most {JSON_SAFE_MAX} (2^53-1, the largest integer JSON carries exactly); "
                         "a larger generation would leave the manager no newer one to send")  # fmt: skip
    return value


Generation = Annotated[int, Field(ge=1), AfterValidator(_json_safe)]


def json_safe_generation(value: object) -> int | None:
    """value when it is a generation a document may carry, else None (never repeated as is)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= JSON_SAFE_MAX else None


class Strict(BaseModel):
    """strict: a JSON true is not the number 1, "13" is not 13 and "yes" is not a boolean."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def model_post_init(self, _context: object) -> None:
        """Models that were given the same fields share one set of their names: a large router
        holds ~35,000 models, and a set each was ~14 MB of the daemon's memory. Sharing is safe
        because the models are frozen; pydantic copies the set before a model_copy changes it."""
        fields = self.__pydantic_fields_set__
        object.__setattr__(self, "__pydantic_fields_set__", _FIELD_SETS.setdefault(tuple(fields), fields))


_FIELD_SETS: dict[tuple, set] = {}  # by the names in the set's own order: equal names share one


class RouterIdentity(Strict):
    """isolated and vpc routers route their tiers; a dhcp router (CloudStack's "dhcpsrvr", in
    shared networks) routes nothing: it serves DHCP, DNS and guest data to tiers whose
    gateways are other machines."""

    name: Hostname
    type: Literal["isolated", "vpc", "dhcp"]


class Interface(Strict):
    id: Identifier
    # private_gateway: a VPC's link to a private network (CloudStack's private gateway): routed
    # under its own network ACL like a tier, static routes through it, answering nothing itself.
    role: Literal["control", "public", "guest", "private_gateway"]
    name: InterfaceName | None = None
    mac: MacAddress | None = None
    addresses: list[IPInterface] = Field(default_factory=list, max_length=64)
    mtu: int = Field(1500, ge=576, le=9216)
    # A guest tier of a shared network: the gateway of each of its IPv4 subnets, which is not
    # the router (empty: the router is the tier's gateway). The router serves such a tier
    # DHCP (option 3 names that gateway), DNS and guest data, and neither routes, NATs nor
    # firewalls it.
    gateways: list[IPv4] = Field(default_factory=list, max_length=64)
    source_nat: bool = False  # private_gateway: the tiers' traffic leaves by it with its address
    # guest: drop packets whose source address and MAC are not a DHCP entry's of this tier
    # (a tier's dynamic range, dhcp.tiers[].range, stays open to MACs no entry has).
    # None: on; false: off, for a tier with VMs the router does not know.
    anti_spoofing: bool | None = None

    @model_validator(mode="after")
    def _named(self) -> Interface:
        if self.name is None and self.mac is None:
            raise ValueError("an interface needs a name or a mac to be found on the router")
        if self.source_nat and self.role != "private_gateway":
            raise ValueError("source_nat applies to a private_gateway interface")
        if self.anti_spoofing is not None and self.role != "guest":
            raise ValueError("anti_spoofing applies to a guest interface")
        return self

    def ipv4(self) -> IPv4Interface | None:
        """The interface's first IPv4 address (a guest tier's: the router's address in its first subnet)."""
        return next((a for a in self.addresses if isinstance(a, IPv4Interface)), None)

    def ipv4s(self) -> list[IPv4Interface]:
        """Every IPv4 address: a guest tier has one in each of its subnets (CloudStack's ipaliases)."""
        return [a for a in self.addresses if isinstance(a, IPv4Interface)]

    def shared(self) -> bool:
        """A shared network's tier: its gateways are not the router."""
        return bool(self.gateways)

    def gateway_in(self, own: IPv4Interface) -> IPv4Address:
        """The gateway of the subnet of one of the interface's addresses: the shared
        network's, else the router's own address there."""
        return next((g for g in self.gateways if g in own.network), own.ip)

    def ipv6(self) -> IPv6Interface | None:
        """The interface's global IPv6 address (a guest tier's: the router's address in its /64)."""
        return next((a for a in self.addresses if isinstance(a, IPv6Interface)), None)


class Route(Strict):
    destination: IPNetwork
    gateway: IPAddress
    metric: int = Field(0, ge=0, le=65535)


class DnsSettings(Strict):
    domain: DomainName
    upstream: list[IPAddress] = Field(default_factory=list, max_length=8)
    cache_size: int = Field(1000, ge=0, le=100000)
    # The guests' names answered on the public interface's address too (CloudStack's
    # "exposedns"): authoritatively, for the router's domains only, never recursively (not an
    # open resolver). Off: the public side gets no DNS at all.
    public: bool = False


class DhcpOption(Strict):
    """A DHCP option by name (dnsmasq's option names) or number, with its values."""

    name: DhcpOptionName | None = None
    code: int | None = Field(None, ge=1, le=254)
    values: list[DhcpOptionValue] = Field(default_factory=list, max_length=32)

    @model_validator(mode="after")
    def _one_key(self) -> DhcpOption:
        if (self.name is None) == (self.code is None):
            raise ValueError("give exactly one of 'name' or 'code'")
        return self


class DhcpRange(Strict):
    start: IPv4
    end: IPv4


LeaseTime = Annotated[int, Field(ge=120, le=31536000)]


class DhcpTier(Strict):
    tier: Identifier
    range: DhcpRange | None = None  # dynamic addresses, inside one of the tier's subnets
    lease_time: LeaseTime = 86400
    domain: DomainName | None = None  # the tier's own DNS domain (default: dns.domain)
    dns_servers: list[IPv4] = Field(default_factory=list, max_length=8)
    options: list[DhcpOption] = Field(default_factory=list, max_length=64)


class DhcpEntry(Strict):
    tier: Identifier
    mac: MacAddress
    ip: IPv4
    hostname: Hostname
    ipv6: IPv6 | None = None  # its address on a DHCPv6 (stateful) tier, served with an AAAA name
    duid: Duid | None = None  # the DHCPv6 client's id; without it dnsmasq matches the MAC
    default_gateway: bool = True
    options: list[DhcpOption] = Field(default_factory=list, max_length=32)
    # The VM's own lease time, both families (default: its tier's); "infinite": a static
    # lease that never expires (CloudStack's static leases)
    lease_time: LeaseTime | Literal["infinite"] | None = None


class Dhcp(Strict):
    tiers: list[DhcpTier] = Field(default_factory=list, max_length=64)
    entries: list[DhcpEntry] = Field(default_factory=list, max_length=65536)


def _port_range(value: object) -> object:
    """8080 or "8000-8010" as shorthands for {"start": .., "end": ..}."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {"start": value, "end": value}
    if isinstance(value, str):
        low, _, high = value.partition("-")
        ranged = "-" in value
        if low.isascii() and low.isdigit() and (not ranged or (high.isascii() and high.isdigit())) and len(value) <= 11:
            return {"start": int(low), "end": int(high or low)}
        raise ValueError(f"not a valid port or port range (8080 or \"8000-8010\"): {quote(value)}")
    return value


class PortRange(Strict):
    start: int = Field(ge=1, le=65535)
    end: int = Field(ge=1, le=65535)

    @model_validator(mode="after")
    def _ordered(self) -> PortRange:
        if self.start > self.end:
            raise ValueError(f"start {self.start} is above end {self.end}")
        return self

    @property
    def size(self) -> int:
        return self.end - self.start + 1


Ports = Annotated[PortRange, BeforeValidator(_port_range)]


class PublicIp(Strict):
    ip: IPv4
    reserved: bool = False  # held by the manager for later use: accepted, carries no rules


class SourceNat(Strict):
    tier: Identifier
    ip: IPv4


class StaticNat(Strict):
    public_ip: IPv4
    private_ip: IPv4


class PortForward(Strict):
    id: Identifier
    public_ip: IPv4
    protocol: Literal["tcp", "udp"]
    public_ports: Ports
    private_ip: IPv4
    private_ports: Ports
    source_cidrs: list[IPv4Net] = Field(default_factory=list, max_length=256)

    @model_validator(mode="after")
    def _same_length(self) -> PortForward:
        if self.public_ports.size != self.private_ports.size:
            raise ValueError("public_ports and private_ports must be ranges of equal length")
        return self


class Nat(Strict):
    public_ips: list[PublicIp] = Field(default_factory=list, max_length=1024)
    source_nat: list[SourceNat] = Field(default_factory=list, max_length=64)
    static_nat: list[StaticNat] = Field(default_factory=list, max_length=1024)
    port_forwarding: list[PortForward] = Field(default_factory=list, max_length=20000)


class _TrafficMatch(Strict):
    protocol: Literal["tcp", "udp", "icmp", "all"]
    ports: Ports | None = None
    icmp_type: int | None = Field(None, ge=0, le=255)
    icmp_code: int | None = Field(None, ge=0, le=255)  # with icmp_type: that type's one code (default: any)

    @model_validator(mode="after")
    def _fits_protocol(self) -> _TrafficMatch:
        if self.ports is not None and self.protocol not in ("tcp", "udp"):
            raise ValueError("ports apply to tcp or udp only")
        if self.protocol in ("tcp", "udp") and self.ports is None:
            raise ValueError(f"a {self.protocol} rule needs ports")
        if self.icmp_type is not None and self.protocol not in ("icmp", "icmpv6"):
            raise ValueError("icmp_type applies to icmp only")
        if self.icmp_code is not None and self.icmp_type is None:
            raise ValueError("icmp_code needs icmp_type (a code means something only within its type)")
        return self


class IngressRule(_TrafficMatch):
    """Opens traffic to one public IP (the router itself, a port forward or a static NAT)."""

    id: Identifier
    public_ip: IPv4
    source_cidrs: list[IPv4Net] = Field(default_factory=lambda: [_parse_ipv4_network("0.0.0.0/0")], max_length=256)


class EgressRule(_TrafficMatch):
    destination_cidrs: list[IPv4Net] = Field(default_factory=lambda: [_parse_ipv4_network("0.0.0.0/0")], max_length=256)
    source_cidrs: list[IPv4Net] = Field(default_factory=list, max_length=256)  # inside the tier; empty: all of it


class TierEgress(Strict):
    """Guest traffic leaving by the public side: `default` for what no rule matches; each
    rule is an exception to it (CloudStack's semantics)."""

    tier: Identifier
    default: Literal["allow", "deny"] = "allow"
    rules: list[EgressRule] = Field(default_factory=list, max_length=10000)


class Firewall(Strict):
    ingress: list[IngressRule] = Field(default_factory=list, max_length=20000)
    egress: list[TierEgress] = Field(default_factory=list, max_length=64)


class AclRule(_TrafficMatch):
    """One numbered entry of a VPC tier's ACL; the lowest number that matches decides, for
    IPv4 and IPv6 alike: an entry applies to the families of its CIDRs (by default both, or
    the one family its protocol has: icmp is IPv4's, icmpv6 IPv6's, each with its own types)."""

    number: int = Field(ge=1, le=65535)
    action: Literal["allow", "deny"]
    protocol: Literal["tcp", "udp", "icmp", "icmpv6", "all"] | Annotated[int, Field(ge=0, le=255)]
    cidrs: list[IPv4Net | IPv6Net] = Field(default_factory=list, max_length=256)

    @model_validator(mode="after")
    def _families(self) -> AclRule:
        if "cidrs" not in self.model_fields_set:  # anywhere, in the families the protocol has
            anywhere = {"icmp": ["0.0.0.0/0"], "icmpv6": ["::/0"]}.get(self.protocol, ["0.0.0.0/0", "::/0"])
            object.__setattr__(self, "cidrs", [_parse_ipv4_network(n) if "." in n else IPv6Network(n) for n in anywhere])
        elif not self.cidrs:
            raise ValueError("cidrs: at least one network (leave cidrs out for anywhere)")
        if self.protocol == "icmp" and any(n.version == 6 for n in self.cidrs):
            raise ValueError("icmp is IPv4's: use protocol icmpv6 for IPv6 networks")
        if self.protocol == "icmpv6" and any(n.version == 4 for n in self.cidrs):
            raise ValueError("icmpv6 is IPv6's: use protocol icmp for IPv4 networks")
        return self


class TierAcl(Strict):
    """Ingress: traffic entering the tier (cidrs are sources); egress: leaving it (destinations)."""

    tier: Identifier
    ingress: list[AclRule] = Field(default_factory=list, max_length=2000)
    egress: list[AclRule] = Field(default_factory=list, max_length=2000)
    ingress_default: Literal["allow", "deny"] = "deny"
    egress_default: Literal["allow", "deny"] = "allow"


# Characters a PEM block may hold: base64, its armour lines and headers. The text goes to a
# file of its own (never into a config line); cryptography parses it in verify.
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]{1,64})-----\r?\n[A-Za-z0-9+/=:,.() \r\n-]*?\r?\n-----END \1-----")


def _pem_blocks(value: str) -> str:
    """Only the PEM blocks are kept: text around them (openssl's "Bag Attributes", or
    anything else) is never written to a key file."""
    blocks = [match.group(0).replace("\r\n", "\n") for match in _PEM_BLOCK.finditer(value)]
    if not blocks:
        raise ValueError("no PEM block (-----BEGIN ...----- ... -----END ...-----)")
    return "\n".join(blocks) + "\n"


PemText = Annotated[
    str,
    Field(min_length=1, max_length=65536),
    _pattern(r"[A-Za-z0-9+/=:,.() \n\r-]+", "PEM text"),
    AfterValidator(_pem_blocks),
]
# An HTTP path for health checks: no space, quote or '#', which haproxy's config reads as syntax.
HttpPath = Annotated[str, Field(max_length=255), _pattern(r"/[A-Za-z0-9._~/?=&%+:@!$*,;-]*", "HTTP path")]
CookieName = Annotated[str, _pattern(r"[A-Za-z0-9_-]{1,64}", "cookie name (letters, digits, '_', '-')")]


class LbMember(Strict):
    ip: IPv4
    port: int | None = Field(None, ge=1, le=65535)  # default: the rule's private_port
    weight: int = Field(1, ge=0, le=256)  # 0: drained, takes no new connections


class LbHealthCheck(Strict):
    type: Literal["tcp", "http"] = "tcp"
    path: HttpPath = "/"
    expect_status: int = Field(200, ge=100, le=599)
    interval_ms: int = Field(2000, ge=100, le=3_600_000)
    rise: int = Field(2, ge=1, le=100)
    fall: int = Field(3, ge=1, le=100)


class LbStickiness(Strict):
    """source: by client IP; cookie: haproxy's own cookie (inserted, or rewritten or prefixed
    into the application's); app_cookie: follows the application's cookie of that name.
    CloudStack's parameters: a cookie's mode, indirect, nocache and expiry; a stick table's
    size and expiry (source and app_cookie), an application cookie's length."""

    type: Literal["none", "source", "cookie", "app_cookie"] = "none"
    cookie: CookieName | None = None
    mode: Literal["insert", "rewrite", "prefix"] = "insert"  # cookie
    indirect: bool = True  # cookie insert: the member never sees haproxy's cookie
    nocache: bool = True  # cookie insert: caches are told not to keep a response that sets it
    expire_s: int | None = Field(None, ge=1, le=2_592_000)  # stick table entries; an inserted cookie's life
    table_size: int | None = Field(None, ge=1, le=10_000_000)  # stick table entries (default 200k)
    length: int | None = Field(None, ge=1, le=1024)  # app_cookie: the longest value kept (default 64)

    @model_validator(mode="after")
    def _named(self) -> LbStickiness:
        if self.type == "app_cookie" and self.cookie is None:
            raise ValueError("app_cookie stickiness needs the cookie's name")
        if self.type in ("none", "source") and self.cookie is not None:
            raise ValueError(f"a cookie name does not apply to {self.type} stickiness")
        # By value, never by what was given: the stored document holds every field.
        given = {name for name, default in _STICKINESS_DEFAULTS.items() if getattr(self, name) != default}
        applies = {"mode": ("cookie",), "indirect": ("cookie",), "nocache": ("cookie",),
                   "expire_s": ("source", "cookie", "app_cookie"), "table_size": ("source", "app_cookie"),
                   "length": ("app_cookie",)}  # fmt: skip
        for name, types in applies.items():
            if name in given and self.type not in types:
                raise ValueError(f"{name} does not apply to {self.type} stickiness")
        if self.type == "cookie" and self.mode != "insert" and given & {"indirect", "nocache", "expire_s"}:
            raise ValueError("indirect, nocache and expire_s apply to an inserted cookie (mode insert)")
        return self


_STICKINESS_DEFAULTS = {"mode": "insert", "indirect": True, "nocache": True, "expire_s": None, "table_size": None,
                        "length": None}  # fmt: skip


class LbTimeouts(Strict):
    connect_ms: int = Field(5000, ge=1, le=3_600_000)
    client_ms: int = Field(50000, ge=1, le=86_400_000)
    server_ms: int = Field(50000, ge=1, le=86_400_000)


class LbCertificate(Strict):
    certificate: PemText
    key: PemText
    chain: PemText | None = None


class LbTls(Strict):
    """Several certificates on one rule are chosen by SNI (their names); the first is the default."""

    certificates: list[LbCertificate] = Field(min_length=1, max_length=32)


class LbRule(Strict):
    id: Identifier
    public_ip: IPv4
    public_port: int = Field(ge=1, le=65535)
    private_port: int = Field(ge=1, le=65535)
    protocol: Literal["tcp", "http", "https"] = "http"  # https: TLS terminated here, plain HTTP to members
    algorithm: Literal["roundrobin", "leastconn", "source"] = "roundrobin"
    members: list[LbMember] = Field(default_factory=list, max_length=256)
    health_check: LbHealthCheck | None = None
    stickiness: LbStickiness = Field(default_factory=LbStickiness)
    max_connections: int | None = Field(None, ge=1, le=1_000_000)
    timeouts: LbTimeouts = Field(default_factory=LbTimeouts)
    source_cidrs: list[IPv4Net] = Field(default_factory=list, max_length=256)  # empty: from anywhere
    tls: LbTls | None = None
    # The client's address to members in a PROXY protocol header (CloudStack's "tcp-proxy");
    # the members must expect it.
    proxy_protocol: Literal["none", "v1", "v2"] = "none"
    http2: bool = False  # https: HTTP/2 offered to clients by ALPN (h2, then http/1.1)
    forwarded_headers: bool | None = None  # http(s): X-Forwarded-For and -Proto to members (None: yes)

    @model_validator(mode="after")
    def _consistent(self) -> LbRule:
        if (self.protocol == "https") != (self.tls is not None):
            raise ValueError("tls (certificates) is required for https and applies to https only")
        if self.http2 and self.protocol != "https":
            raise ValueError("http2 (ALPN) needs protocol https")
        if self.forwarded_headers and self.protocol == "tcp":
            raise ValueError("forwarded_headers needs protocol http or https (tcp carries no headers)")
        if self.stickiness.type in ("cookie", "app_cookie") and self.protocol == "tcp":
            raise ValueError("cookie stickiness needs protocol http or https")
        if self.health_check is not None and self.health_check.type == "http" and self.protocol == "tcp":
            raise ValueError("an http health check needs protocol http or https")
        return self


def _stats_password(value: str) -> str:
    """A password haproxy's config holds as one word: no space, quote, '#' or backslash.
    The messages never repeat it."""
    if not re.fullmatch(r"[A-Za-z0-9._~!@%^*+=,:/?-]{8,128}", value):
        raise ValueError("a stats password has 8-128 characters: letters, digits and ._~!@%^*+=,:/?-")
    return value


class LbStats(Strict):
    """haproxy's statistics page, on one of the router's own addresses (the input policy
    opens its port on that interface only), behind a user name and password."""

    address: IPv4
    port: int = Field(8404, ge=1, le=65535)
    username: Annotated[str, _pattern(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", "user name (letters, digits, ._-)")]
    password: Annotated[str, AfterValidator(_stats_password)]
    refresh_s: int = Field(10, ge=1, le=3600)


class LoadBalancer(Strict):
    rules: list[LbRule] = Field(default_factory=list, max_length=1000)
    stats: LbStats | None = None


def _secret(what: str, min_length: int):
    """A PSK or password: long enough, printable, at most 255 characters. The messages never
    repeat the value (they reach the event log and the manager)."""

    def check(value: str) -> str:
        if len(value) < min_length:
            raise ValueError(f"a {what} needs at least {min_length} characters")
        if len(value) > 255:
            raise ValueError(f"a {what} has at most 255 characters")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError(f"a {what} may not contain control characters")
        return value

    return AfterValidator(check)


PreSharedKey = Annotated[str, _secret("pre-shared key", 16)]
Password = Annotated[str, _secret("password", 8)]
VpnUsername = Annotated[str, _pattern(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", "VPN user name (letters, digits, ._@-)")]

# strongSwan proposal keywords (strongSwan's IKEv2 cipher suites), joined by '-': at least one
# encryption algorithm, then integrity, PRF and DH groups as the protocol needs. Each keyword
# names the algorithm it asks of charon, as charon's VICI get-algorithms lists it (transform
# type, name). Whether this router's charon implements it is for its plugins to say: the
# strongSwan service asks its checker charon (vr/services/strongswan.py), not this table.
PROPOSAL_KEYWORDS: dict[str, tuple[str, str]] = {
    **{f"aes{bits}": ("encryption", "AES_CBC") for bits in (128, 192, 256)},
    **{f"aes{bits}gcm16": ("aead", "AES_GCM_16") for bits in (128, 192, 256)},
    **{f"aes{bits}gcm12": ("aead", "AES_GCM_12") for bits in (128, 256)},
    **{f"aes{bits}ccm16": ("aead", "AES_CCM_16") for bits in (128, 256)},
    "chacha20poly1305": ("aead", "CHACHA20_POLY1305"),
    "3des": ("encryption", "3DES_CBC"),
    "camellia128": ("encryption", "CAMELLIA_CBC"),
    "camellia256": ("encryption", "CAMELLIA_CBC"),
    "sha1": ("integrity", "HMAC_SHA1_96"),
    "sha256": ("integrity", "HMAC_SHA2_256_128"),
    "sha384": ("integrity", "HMAC_SHA2_384_192"),
    "sha512": ("integrity", "HMAC_SHA2_512_256"),
    "md5": ("integrity", "HMAC_MD5_96"),
    "aesxcbc": ("integrity", "AES_XCBC_96"),
    "aescmac": ("integrity", "AES_CMAC_96"),
    "prfsha1": ("prf", "PRF_HMAC_SHA1"),
    "prfsha256": ("prf", "PRF_HMAC_SHA2_256"),
    "prfsha384": ("prf", "PRF_HMAC_SHA2_384"),
    "prfsha512": ("prf", "PRF_HMAC_SHA2_512"),
    "prfmd5": ("prf", "PRF_HMAC_MD5"),
    "prfaesxcbc": ("prf", "PRF_AES128_XCBC"),
    "prfaescmac": ("prf", "PRF_AES128_CMAC"),
    **{f"modp{bits}": ("dh", f"MODP_{bits}") for bits in (1024, 1536, 2048, 3072, 4096, 6144, 8192)},
    **{f"ecp{bits}": ("dh", f"ECP_{bits}") for bits in (192, 224, 256, 384, 521)},
    "curve25519": ("dh", "CURVE_25519"),
    "x25519": ("dh", "CURVE_25519"),
    "curve448": ("dh", "CURVE_448"),
    "x448": ("dh", "CURVE_448"),
    "esn": ("esn", "ESN"),  # the kernel's (or libipsec's) sequence numbers: no algorithm
    "noesn": ("esn", "NO_ESN"),
}


def _keywords(*transforms: str) -> set[str]:
    return {word for word, (transform, _) in PROPOSAL_KEYWORDS.items() if transform in transforms}


_ENCRYPTION = _keywords("encryption", "aead")
_INTEGRITY = _keywords("integrity")
_PRF = _keywords("prf")
_DH = _keywords("dh")
_ESN = _keywords("esn")


def _proposal(kind: str):
    allowed = _ENCRYPTION | _INTEGRITY | _DH | (_PRF if kind == "ike" else _ESN)

    def check(value: str) -> str:
        words = value.split("-")
        unknown = [w for w in words if w not in allowed]
        if unknown or len(value) > 200:
            raise ValueError(f"unknown {kind.upper()} proposal keyword {unknown[0] if unknown else value!r}"[:240])
        if not _ENCRYPTION & set(words):
            raise ValueError(f"an {kind.upper()} proposal needs an encryption algorithm (e.g. aes256)")
        return value

    return AfterValidator(check)


IkeProposal = Annotated[str, _proposal("ike")]
EspProposal = Annotated[str, _proposal("esp")]


class SiteToSite(Strict):
    """A tunnel to another site (another router of this cloud, e.g. VPC to VPC, or a customer
    gateway). Traffic between local_subnets and peer_subnets goes through it, unNATed."""

    id: Identifier
    local_ip: IPv4  # one of this router's assigned public IPs
    peer_ip: IPv4
    local_subnets: list[IPv4Net] = Field(min_length=1, max_length=32)
    peer_subnets: list[IPv4Net] = Field(min_length=1, max_length=32)
    ike_version: Literal[1, 2] = 2
    ike_proposals: list[IkeProposal] = Field(default_factory=lambda: ["aes256-sha256-modp2048"], min_length=1,
                                              max_length=16)  # fmt: skip
    esp_proposals: list[EspProposal] = Field(default_factory=lambda: ["aes256-sha256"], min_length=1, max_length=16)
    ike_lifetime_s: int = Field(28800, ge=300, le=86400)
    esp_lifetime_s: int = Field(3600, ge=120, le=86400)
    dpd_action: Literal["restart", "clear", "trap", "none"] = "restart"
    dpd_interval_s: int = Field(30, ge=0, le=3600)  # 0: no dead peer detection
    psk: PreSharedKey
    passive: bool = False  # responder only: never initiates
    enabled: bool = True

    @model_validator(mode="after")
    def _lifetimes(self) -> SiteToSite:
        if self.esp_lifetime_s > self.ike_lifetime_s:
            raise ValueError("esp_lifetime_s may not exceed ike_lifetime_s")
        return self


class VpnUser(Strict):
    username: VpnUsername
    password: Password


class ServerCertificate(Strict):
    certificate: PemText
    key: PemText


class RemoteAccess(Strict):
    """Users dial in with IKEv2 and EAP-MSCHAPv2 (what Windows, macOS, iOS and Android speak
    natively); the router proves itself to them with a certificate or a pre-shared key."""

    enabled: bool = True
    public_ip: IPv4
    pool: IPv4Net  # client addresses; may not overlap any tier or peer subnet
    dns: list[IPv4] = Field(default_factory=list, max_length=4)
    psk: PreSharedKey | None = None
    certificate: ServerCertificate | None = None
    users: list[VpnUser] = Field(default_factory=list, max_length=1000)

    @model_validator(mode="after")
    def _one_server_identity(self) -> RemoteAccess:
        if (self.psk is None) == (self.certificate is None):
            raise ValueError("give the router's identity to clients: psk or certificate, one of them")
        if self.pool.prefixlen > 30:
            raise ValueError("pool: a /30 or larger is needed")
        return self


class RouterAdvertisements(Strict):
    """radvd's settings for one tier; the M and O flags follow from the tier's mode."""

    interval_s: int = Field(200, ge=4, le=1800)  # MaxRtrAdvInterval; the minimum is a third of it
    router_lifetime_s: int = Field(1800, ge=0, le=9000)
    valid_lifetime_s: int = Field(86400, ge=0, le=4294967294)
    preferred_lifetime_s: int = Field(14400, ge=0, le=4294967294)
    mtu: int | None = Field(None, ge=1280, le=9216)  # advertised link MTU; default: the tier's MTU

    @model_validator(mode="after")
    def _lifetimes(self) -> RouterAdvertisements:
        if self.preferred_lifetime_s > self.valid_lifetime_s:
            raise ValueError("preferred_lifetime_s may not exceed valid_lifetime_s")
        if 0 < self.router_lifetime_s < self.interval_s:
            raise ValueError("router_lifetime_s must be 0 or at least interval_s")
        return self


class Ipv6Tier(Strict):
    """A tier's routed /64 is the prefix of its interface's IPv6 address (the router's own).
    slaac: guests make their addresses (radvd's prefix, autonomous); dhcpv6: dnsmasq gives
    each VM its configured address (dhcp.entries[].ipv6), radvd sets the M and O flags."""

    tier: Identifier
    mode: Literal["slaac", "dhcpv6"] = "slaac"
    ra: RouterAdvertisements = Field(default_factory=RouterAdvertisements)
    dns: list[IPv6] = Field(default_factory=list, max_length=3)  # RDNSS; default: the router
    search: list[DomainName] = Field(default_factory=list, max_length=6)  # DNSSL; default: dns.domain
    lease_time: int = Field(86400, ge=120, le=31536000)  # DHCPv6 (dhcpv6 mode)


class Ipv6IngressRule(_TrafficMatch):
    """Opens traffic from the public side to guest addresses (no NAT in IPv6: the address is
    the guest's own). protocol "icmp" means ICMPv6 here."""

    id: Identifier
    destination: IPv6Net  # a guest address (/128) or a range inside a tier's prefix
    source_cidrs: list[IPv6Net] = Field(default_factory=lambda: [IPv6Network("::/0")], max_length=256)


class Ipv6EgressRule(_TrafficMatch):
    destination_cidrs: list[IPv6Net] = Field(default_factory=lambda: [IPv6Network("::/0")], max_length=256)


class Ipv6TierEgress(Strict):
    """As firewall.egress, for IPv6: `default` for what no rule matches, rules are exceptions."""

    tier: Identifier
    default: Literal["allow", "deny"] = "allow"
    rules: list[Ipv6EgressRule] = Field(default_factory=list, max_length=10000)


class Ipv6Firewall(Strict):
    """Inbound from the public side is denied by default, but for the ICMPv6 that IPv6 needs."""

    ingress: list[Ipv6IngressRule] = Field(default_factory=list, max_length=20000)
    egress: list[Ipv6TierEgress] = Field(default_factory=list, max_length=64)


class Ipv6(Strict):
    tiers: list[Ipv6Tier] = Field(default_factory=list, max_length=64)
    firewall: Ipv6Firewall = Field(default_factory=Ipv6Firewall)


class Vpn(Strict):
    site_to_site: list[SiteToSite] = Field(default_factory=list, max_length=256)
    remote_access: RemoteAccess | None = None

    def gateways(self) -> tuple[IPv4Address, ...]:
        """This router's public IPs that speak IKE (the firewall opens IKE, NAT-T and ESP on them)."""
        ips = {t.local_ip for t in self.site_to_site if t.enabled}
        if self.remote_access is not None and self.remote_access.enabled:
            ips.add(self.remote_access.public_ip)
        return tuple(sorted(ips))

    def remote_networks(self) -> tuple[IPv4Network, ...]:
        """What lies at the far end of a tunnel (peer subnets, the remote-access pool): never
        source-NATed, and not the public side for the firewall."""
        nets = {n for t in self.site_to_site if t.enabled for n in t.peer_subnets}
        if self.remote_access is not None and self.remote_access.enabled:
            nets.add(self.remote_access.pool)
        return tuple(sorted(nets))


MONITORED = ("dnsmasq", "haproxy", "strongswan", "radvd", "nftables", "guestdata")


class ProbeSettings(Strict):
    """How one service is probed. A probe that fails `failures` times in a row restarts it."""

    enabled: bool = True
    interval_s: float = Field(1.0, ge=0.2, le=3600)
    timeout_s: float = Field(0.5, gt=0, le=60)
    failures: int = Field(2, ge=1, le=100)

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> ProbeSettings:
        if self.timeout_s > self.interval_s:
            raise ValueError("timeout_s may not exceed interval_s")
        return self


class RestartPolicy(Strict):
    """Back-off between restarts (initial, doubling, up to max); after max_restarts within
    window_s a service is marked failed and alerted, then retried every failed_interval_s."""

    backoff_initial_s: float = Field(0.5, ge=0.05, le=300)
    backoff_max_s: float = Field(30.0, ge=0.05, le=3600)
    max_restarts: int = Field(5, ge=1, le=1000)
    window_s: float = Field(300.0, ge=1, le=86400)
    failed_interval_s: float = Field(30.0, ge=1, le=86400)

    @model_validator(mode="after")
    def _ordered(self) -> RestartPolicy:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s may not be less than backoff_initial_s")
        return self


def _default_probes() -> dict[str, ProbeSettings]:
    return {"radvd": ProbeSettings(interval_s=5.0, timeout_s=1.0), "nftables": ProbeSettings(failures=1)}


class Monitor(Strict):
    """Which services the router's monitor watches and how, and where its alerts go."""

    alert_url: str | None = Field(None, max_length=2048)
    services: dict[str, ProbeSettings] = Field(default_factory=_default_probes)
    restart: RestartPolicy = Field(default_factory=RestartPolicy)

    @field_validator("alert_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+(:\d+)?(/[\x21-\x7e]*)?", value):
            raise ValueError("must be an http:// or https:// URL without spaces or control characters")
        return value

    @field_validator("services")
    @classmethod
    def _known_services(cls, value: dict[str, ProbeSettings]) -> dict[str, ProbeSettings]:
        unknown = sorted(set(value) - set(MONITORED))
        if unknown:
            raise ValueError(f"unknown service(s) {', '.join(unknown)}; known: {', '.join(MONITORED)}")
        return value

    def settings_for(self, service: str) -> ProbeSettings:
        return self.services.get(service) or _default_probes().get(service) or ProbeSettings()


def token_digest(token: str) -> str:
    """How a bearer token is kept and compared: never the token itself."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def _token_hash(value: str) -> str:
    """A bearer token is kept only as its SHA-256: the stored document, its log and every
    answer hold a hash nobody can log in with. A token is random and long (at least 32
    characters), so a plain hash is as strong as its entropy; a hash the manager sends
    (`sha256:` and 64 hex digits) is kept as it is."""
    if re.fullmatch(r"sha256:[0-9a-f]{64}", value):
        return value
    if len(value) < 32:
        raise ValueError("a token needs at least 32 characters (or send its hash: sha256:<64 hex digits>)")
    if len(value) > 256:
        raise ValueError("a token has at most 256 characters")
    if any(ord(c) <= 32 or ord(c) >= 127 for c in value):
        raise ValueError("a token is printable ASCII without spaces")
    return token_digest(value)


AgentToken = Annotated[str, Field(max_length=256), AfterValidator(_token_hash)]


class AgentTls(Strict):
    certificate: PemText
    key: PemText


class Agent(Strict):
    """The manager's HTTPS API on the control interface's addresses. Served only when the
    manager can authenticate: a token or a client CA (see vr/control/agent.py)."""

    port: int = Field(8443, ge=1, le=65535)
    tokens: list[AgentToken] = Field(default_factory=list, max_length=8)  # several: rotation
    tls: AgentTls | None = None  # None: a self-signed pair made by the router, kept in its state dir
    client_ca: PemText | None = None  # set: clients present a certificate it signed

    def served(self) -> bool:
        return bool(self.tokens) or self.client_ca is not None


# ------------------------------------------------------------------ guest data
USER_DATA_MAX = 32 * 1024  # decoded bytes, as CloudStack allows
# The meta data CloudStack's router serves; a VM's entry may add its own keys beside them.
META_DATA_KEYS = ("instance-id", "vm-id", "local-hostname", "local-ipv4", "public-ipv4", "public-hostname",
                  "availability-zone", "service-offering", "cloud-identifier", "hypervisor-host-name")  # fmt: skip
SERVED_FROM_FIELDS = ("public-keys", "user-data", "meta-data", "password")  # keys no meta_data entry may take
MetaDataKey = Annotated[str, _pattern(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", "meta data key (letters, digits, '_', "
                                      "'.', '-', 1-64, starting with a letter or digit)")]  # fmt: skip


def _meta_data_value(value: str) -> str:
    """Served as one line of text: no control character (a newline would add a key)."""
    if len(value) > 4096:
        raise ValueError("a meta data value has at most 4096 characters")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value):
        raise ValueError("a meta data value may not contain control characters (a newline included)")
    return value


def _user_data(value: str) -> str:
    """Base64 of at most USER_DATA_MAX bytes; the message never repeats the data."""
    import binascii

    if len(value) > (USER_DATA_MAX + 2) // 3 * 4:
        raise ValueError(f"user data is at most {USER_DATA_MAX} bytes ({USER_DATA_MAX // 1024} KiB) decoded")
    try:
        decoded = binascii.a2b_base64(value.encode("ascii"), strict_mode=True)
    except (ValueError, UnicodeEncodeError):
        raise ValueError("user data is base64 (RFC 4648, no line breaks), and this is not") from None
    if len(decoded) > USER_DATA_MAX:
        raise ValueError(f"user data is at most {USER_DATA_MAX} bytes ({USER_DATA_MAX // 1024} KiB) decoded; "
                         f"this is {len(decoded)}")  # fmt: skip
    return value


SSH_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
                 "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com", "ssh-dss")  # fmt: skip


def _ssh_public_key(value: str) -> str:
    """One OpenSSH public key line: a known type, a base64 body that decodes to a key of
    that type, an optional comment. No options (a guest's authorized_keys takes the line as
    is) and no control character (a newline would make it two keys)."""
    import binascii
    import struct

    if len(value) > 16384:
        raise ValueError("an SSH public key line has at most 16384 characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("an SSH public key is one line: no newline or other control character")
    kind, _, rest = value.partition(" ")
    body, _, _comment = rest.partition(" ")
    if kind not in SSH_KEY_TYPES:
        raise ValueError(f"not an SSH public key: the line starts with {quote(kind[:40])}, not a key type "
                         f"({', '.join(SSH_KEY_TYPES)})")  # fmt: skip
    try:
        blob = binascii.a2b_base64(body.encode("ascii"), strict_mode=True)
        (length,) = struct.unpack_from("!I", blob)
        named = blob[4 : 4 + length].decode("ascii")
    except (ValueError, UnicodeError, struct.error):
        raise ValueError(f"not an SSH public key: the {kind} key's body is not base64 of a key") from None
    if named != kind or len(blob) <= 4 + length:
        raise ValueError(f"not an SSH public key: the body is not a {kind} key")
    return value


def _vm_password(value: str) -> str:
    """What the password service answers as its whole body: printable ASCII, no space; the
    messages never repeat it."""
    if not 1 <= len(value) <= 255:
        raise ValueError("a VM password has 1 to 255 characters")
    if any(not 33 <= ord(c) <= 126 for c in value):
        raise ValueError("a VM password is printable ASCII without spaces")
    if value == "<redacted>":
        raise ValueError("this is what GET /v1/config shows in place of a password, not a password")
    return value


MetaDataValue = Annotated[str, AfterValidator(_meta_data_value)]
UserData = Annotated[str, AfterValidator(_user_data)]
SshPublicKey = Annotated[str, AfterValidator(_ssh_public_key)]
VmPassword = Annotated[str, AfterValidator(_vm_password)]


class VmData(Strict):
    """What a VM reads from its router at boot (cloud-init's CloudStack data source): served
    only to the VM of this MAC, at its address on its tier (dhcp.entries)."""

    mac: MacAddress
    user_data: UserData | None = None  # base64
    # The named META_DATA_KEYS and any other; local-hostname, local-ipv4 and instance-id
    # default to the VM's DHCP entry (its hostname, its address).
    meta_data: dict[MetaDataKey, MetaDataValue] = Field(default_factory=dict, max_length=64)
    public_keys: list[SshPublicKey] = Field(default_factory=list, max_length=32)
    password: VmPassword | None = None  # one-time: answered once, then "saved_password"
    # Set by vr, never by the manager: the generation whose payload set the password (a new
    # one, even the same text again, is answered once more).
    password_generation: Generation | None = None

    @field_validator("meta_data")
    @classmethod
    def _not_served_elsewhere(cls, value: dict[str, str]) -> dict[str, str]:
        taken = sorted(k for k in value if k in SERVED_FROM_FIELDS)
        if taken:
            raise ValueError(f"{', '.join(taken)}: served from its own field (user_data, public_keys, password), "
                             "not a meta data key")  # fmt: skip
        return value


class GuestData(Strict):
    vms: list[VmData] = Field(default_factory=list, max_length=65536)


class RouterDocument(Strict):
    generation: Generation
    router: RouterIdentity
    interfaces: list[Interface] = Field(min_length=1, max_length=64)
    routes: list[Route] = Field(default_factory=list, max_length=4096)
    dns: DnsSettings
    dhcp: Dhcp = Field(default_factory=Dhcp)
    nat: Nat = Field(default_factory=Nat)
    firewall: Firewall = Field(default_factory=Firewall)
    network_acls: list[TierAcl] = Field(default_factory=list, max_length=64)
    load_balancer: LoadBalancer = Field(default_factory=LoadBalancer)
    vpn: Vpn = Field(default_factory=Vpn)
    ipv6: Ipv6 = Field(default_factory=Ipv6)
    monitor: Monitor = Field(default_factory=Monitor)
    agent: Agent = Field(default_factory=Agent)
    guest_data: GuestData = Field(default_factory=GuestData)

    def interface(self, interface_id: str) -> Interface | None:
        return next((i for i in self.interfaces if i.id == interface_id), None)

    def guest_interfaces(self) -> list[Interface]:
        return [i for i in self.interfaces if i.role == "guest"]

    def private_gateways(self) -> list[Interface]:
        return [i for i in self.interfaces if i.role == "private_gateway"]

    def spoof_checked_tiers(self) -> list[Interface]:
        """The guest tiers whose VMs may send only from their own address and MAC."""
        return [i for i in self.guest_interfaces() if i.anti_spoofing is not False]

    def routed_tiers(self) -> list[Interface]:
        """The guest tiers the router is the gateway of (not a shared network's)."""
        return [i for i in self.interfaces if i.role == "guest" and not i.gateways]

    def tier_domains(self) -> dict[str, str]:
        """Each guest tier's DNS domain: its own (dhcp.tiers) or the router's."""
        own = {t.tier: t.domain for t in self.dhcp.tiers if t.domain}
        return {i.id: own.get(i.id, self.dns.domain) for i in self.guest_interfaces()}

    def public_interface(self) -> Interface | None:
        """The first public interface: the main routing table's (the document's routes)."""
        return next((i for i in self.interfaces if i.role == "public"), None)

    def interface_holding(self, ip: IPv4Address) -> Interface | None:
        """The interface one of the router's own addresses is on."""
        return next((i for i in self.interfaces if any(a.ip == ip for a in i.addresses)), None)

    def public_interfaces(self) -> list[Interface]:
        return [i for i in self.interfaces if i.role == "public"]

    def public_marks(self) -> dict[str, int]:
        """Each public interface after the first -> its mark, which is also its routing table's
        number less PUBLIC_TABLE_BASE: connections by it are routed by its own table."""
        return {i.id: n for n, i in enumerate(self.public_interfaces()) if n > 0}

    def public_interface_of(self, ip: IPv4Address) -> Interface | None:
        """The public interface whose subnets hold a public IP."""
        return next((i for i in self.public_interfaces() if any(ip in a.network for a in i.ipv4s())), None)


class DhcpEntryChanges(Strict):
    """Per-VM changes, so the manager can add one VM without resending four thousand."""

    upsert: list[DhcpEntry] = Field(default_factory=list, max_length=65536)
    delete: list[MacAddress] = Field(default_factory=list, max_length=65536)


class PortForwardChanges(Strict):
    """Per-rule changes by id: one rule changed without resending ten thousand."""

    upsert: list[PortForward] = Field(default_factory=list, max_length=20000)
    delete: list[Identifier] = Field(default_factory=list, max_length=20000)


class IngressRuleChanges(Strict):
    upsert: list[IngressRule] = Field(default_factory=list, max_length=20000)
    delete: list[Identifier] = Field(default_factory=list, max_length=20000)


class VmDataChanges(Strict):
    """One VM's guest data changed without resending every VM's."""

    upsert: list[VmData] = Field(default_factory=list, max_length=65536)
    delete: list[MacAddress] = Field(default_factory=list, max_length=65536)


class VmPasswordSet(Strict):
    """A VM's next one-time password, alone (null: none pending any more)."""

    mac: MacAddress
    password: VmPassword | None


SECTIONS = (
    "router", "interfaces", "routes", "dns", "dhcp", "nat", "firewall", "network_acls", "load_balancer", "vpn",
    "ipv6", "monitor", "agent", "guest_data",
)  # fmt: skip
ITEM_CHANGES = ("dhcp_entries", "port_forwarding_rules", "ingress_rules", "vm_data", "vm_passwords")


def _section_field(name: str) -> tuple[Any, None]:
    """A payload section is the document's own field, its type and its limits, or absent:
    a section the payload model accepts is one the document model loads, by construction."""
    info = RouterDocument.model_fields[name]
    annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    return (annotation | None, None)


class _PayloadBase(Strict):
    """What the manager pushes: any subset of sections, each replacing the stored one, and
    per-item changes (by MAC, by id) that do not resend the rest of a big list."""

    generation: Generation
    dhcp_entries: DhcpEntryChanges | None = None
    port_forwarding_rules: PortForwardChanges | None = None
    ingress_rules: IngressRuleChanges | None = None
    vm_data: VmDataChanges | None = None
    vm_passwords: list[VmPasswordSet] | None = Field(None, max_length=65536)


Payload = create_model("Payload", __base__=_PayloadBase, **{name: _section_field(name) for name in SECTIONS})
Payload.__doc__ = _PayloadBase.__doc__


def json_path(loc: tuple[Any, ...]) -> str:
    """('dhcp', 'entries', 12, 'mac') -> 'dhcp.entries[12].mac'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = str(part)
            if not re.fullmatch(r"[A-Za-z0-9_:.-]{1,64}", text):  # a key from outside: quoted, cut short
                text = quote(text)
            out += ("." if out else "") + text
    return out


_EXPECTED = {"int_type": "an integer", "bool_type": "true or false", "string_type": "a string",
             "float_type": "a number", "list_type": "a list", "dict_type": "an object",
             "model_type": "an object", "model_attributes_type": "an object"}  # fmt: skip


def _json_type(value: object) -> str:
    """The JSON name of what arrived, for 'expected an integer, got a string'."""
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                       (list, "a list"), (dict, "an object"), (type(None), "null")):  # fmt: skip
        if isinstance(value, kind):
            return name
    return type(value).__name__


def problems_from(error: ValidationError) -> list[Problem]:
    problems = []
    for item in error.errors(include_url=False):
        # Drop pydantic's internal union/validator labels from the path.
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        path = json_path(loc)
        if item["type"] == "extra_forbidden":
            reason = "unknown field"
        elif item["type"] in _EXPECTED:
            reason = f"expected {_EXPECTED[item['type']]}, got {_json_type(item.get('input'))}"
        else:
            reason = item["msg"].removeprefix("Value error, ")[:300]
        problems.append(Problem(path, reason))
    # A union reports one error per branch; keep the first per path.
    seen: dict[str, Problem] = {}
    for p in problems:
        seen.setdefault(p.path, p)
    return list(seen.values())


def parse_payload(raw: object) -> Payload:
    if not isinstance(raw, dict):
        raise InvalidPayload([Problem("", "a payload is a JSON object")])
    try:
        return Payload.model_validate(raw)
    except ValidationError as error:
        raise InvalidPayload(problems_from(error)) from None


def merge(stored: RouterDocument | None, payload: Payload) -> RouterDocument:
    """Sections replace stored sections; dhcp_entries, port_forwarding_rules and
    ingress_rules upsert/delete single items (by MAC, by id).

    Sections arrive already validated (as part of the Payload), so the merged document is
    assembled from them without a second validation pass: a one-VM change costs one VM.
    """
    if stored is not None and payload.generation <= stored.generation:
        raise StalePayload(
            f"generation {payload.generation} is not newer than the applied generation "
            f"{stored.generation}: payload refused as stale"
        )
    sections = {s: getattr(payload, s) for s in SECTIONS if getattr(payload, s) is not None}
    if stored is None:
        required = [name for name, f in RouterDocument.model_fields.items() if f.is_required() and name in SECTIONS]
        missing = [name for name in required if name not in sections]
        if missing:
            raise InvalidPayload(
                [Problem(s, "required: the first payload must carry the whole router") for s in missing]
            )
        doc = RouterDocument.model_construct(generation=payload.generation, **sections)  # absent: defaults
    else:
        doc = stored.model_copy(update={**sections, "generation": payload.generation})
    for section, items, key in _REUSED if stored is not None else ():
        if getattr(payload, section) is not None:
            sent, kept = getattr(getattr(doc, section), items), getattr(getattr(stored, section), items)
            reused = _reuse_equal(sent, kept, key)
            doc = doc.model_copy(update={section: getattr(doc, section).model_copy(update={items: reused})})
    if payload.dhcp_entries is not None:
        entries = _apply_item_changes(doc.dhcp.entries, payload.dhcp_entries, "mac", "dhcp_entries")
        _within_limit(entries, Dhcp, "entries", "dhcp_entries", "dhcp.entries")
        doc = doc.model_copy(update={"dhcp": doc.dhcp.model_copy(update={"entries": entries})})
    if payload.port_forwarding_rules is not None:
        rules = _apply_item_changes(
            doc.nat.port_forwarding, payload.port_forwarding_rules, "id", "port_forwarding_rules"
        )
        _within_limit(rules, Nat, "port_forwarding", "port_forwarding_rules", "nat.port_forwarding")
        doc = doc.model_copy(update={"nat": doc.nat.model_copy(update={"port_forwarding": rules})})
    if payload.ingress_rules is not None:
        rules = _apply_item_changes(doc.firewall.ingress, payload.ingress_rules, "id", "ingress_rules")
        _within_limit(rules, Firewall, "ingress", "ingress_rules", "firewall.ingress")
        doc = doc.model_copy(update={"firewall": doc.firewall.model_copy(update={"ingress": rules})})
    if payload.guest_data is not None or payload.vm_data is not None or payload.vm_passwords is not None \
            or payload.dhcp is not None or (payload.dhcp_entries is not None and payload.dhcp_entries.delete):  # fmt: skip
        doc = _merged_guest_data(stored, doc, payload)
    return doc


def _merged_guest_data(stored: RouterDocument | None, doc: RouterDocument, payload: Any) -> RouterDocument:
    """vm_data and vm_passwords into guest_data; a password new in this payload stamped with
    its generation (answered once from then on); a VM gone from dhcp.entries gone here too."""
    vms = doc.guest_data.vms
    if payload.vm_data is not None:
        vms = _apply_item_changes(vms, payload.vm_data, "mac", "vm_data")
        _within_limit(vms, GuestData, "vms", "vm_data", "guest_data.vms")
    sent = vms if payload.guest_data is not None else (payload.vm_data.upsert if payload.vm_data else [])
    before = {vm.mac: vm for vm in stored.guest_data.vms} if stored is not None and sent else {}
    stamped = {}
    for vm in sent:
        old = before.get(vm.mac)
        kept = old.password_generation if old is not None and old.password == vm.password else None
        wanted = None if vm.password is None else (kept or payload.generation)
        if vm.password_generation != wanted:
            stamped[vm.mac] = vm.model_copy(update={"password_generation": wanted})
    if payload.vm_passwords:
        stamped.update(_passwords_set(doc, vms, payload.vm_passwords, stamped, payload.generation))
    if stamped:
        known = {vm.mac for vm in vms}
        vms = [stamped.get(vm.mac, vm) for vm in vms] + [vm for mac, vm in stamped.items() if mac not in known]
    if stored is not None and vms and (payload.dhcp is not None or payload.dhcp_entries is not None):
        if payload.dhcp is not None:
            gone = {e.mac for e in stored.dhcp.entries} - {e.mac for e in doc.dhcp.entries}
        else:
            gone = set(payload.dhcp_entries.delete)
        if gone and any(vm.mac in gone for vm in vms):
            vms = [vm for vm in vms if vm.mac not in gone]
    if vms is doc.guest_data.vms:
        return doc
    return doc.model_copy(update={"guest_data": doc.guest_data.model_copy(update={"vms": vms})})


def _passwords_set(doc: RouterDocument, vms: list[VmData], passwords: list[VmPasswordSet], stamped: dict,
                   generation: int) -> dict[str, VmData]:  # fmt: skip
    """vm_passwords: each VM's password, stamped; a VM without guest data gets an entry."""
    macs = {e.mac for e in doc.dhcp.entries}
    problems = [Problem(f"vm_passwords[{n}].mac", f"no VM has MAC {item.mac} (dhcp.entries)")
                for n, item in enumerate(passwords) if item.mac not in macs]  # fmt: skip
    seen: dict[str, int] = {}
    for n, item in enumerate(passwords):
        if seen.setdefault(item.mac, n) != n:
            problems.append(Problem(f"vm_passwords[{n}].mac", f"{item.mac} is also vm_passwords[{seen[item.mac]}]"))
    if problems:
        raise InvalidPayload(problems)
    current = {vm.mac: vm for vm in vms}
    result = {}
    for item in passwords:
        vm = stamped.get(item.mac) or current.get(item.mac) or VmData(mac=item.mac)
        result[item.mac] = vm.model_copy(update={"password": item.password,
                                                 "password_generation": generation if item.password else None})
    return result


def _one_change_per_item(changes: Any, key: str, where: str) -> None:
    """One payload says one thing about an item: the same MAC or id twice, or upserted and
    deleted at once, is refused rather than settled by whichever comes last."""
    problems, first = [], {}
    for n, item in enumerate(changes.upsert):
        earlier = first.setdefault(getattr(item, key), n)
        if earlier != n:
            problems.append(Problem(f"{where}.upsert[{n}].{key}", f"{getattr(item, key)} is also {where}.upsert[{earlier}]"))
    seen_delete: dict = {}
    for n, value in enumerate(changes.delete):
        if value in first:
            problems.append(Problem(f"{where}.delete[{n}]", f"{value} is also upserted ({where}.upsert[{first[value]}])"))
        elif seen_delete.setdefault(value, n) != n:
            problems.append(Problem(f"{where}.delete[{n}]", f"{value} is also {where}.delete[{seen_delete[value]}]"))
    if problems:
        raise InvalidPayload(problems)


def _within_limit(items: list, model: type[BaseModel], name: str, where: str, target: str) -> None:
    """Upserts may not grow a list past the bound the document model loads it with."""
    limit = next(m.max_length for m in model.model_fields[name].metadata if hasattr(m, "max_length"))
    if len(items) > limit:
        raise InvalidPayload([Problem(f"{where}.upsert", f"would make {target} {len(items)} items long; "
                                                          f"a router holds at most {limit}")])  # fmt: skip


# Item lists of sections sent whole whose equal items are the stored objects again.
_REUSED = (("vpn", "site_to_site", "id"), ("load_balancer", "rules", "id"), ("nat", "port_forwarding", "id"),
           ("firewall", "ingress", "id"), ("dhcp", "entries", "mac"), ("guest_data", "vms", "mac"))  # fmt: skip


def _reuse_equal(new: list, old: list, key: str) -> list:
    """The stored object for each item equal to it (matched by its key): a section sent whole
    then hits every per-item cache (rendering, verify) except for the items that changed."""
    stored = {getattr(item, key): item for item in old}
    return [stored[k] if (k := getattr(item, key)) in stored and stored[k] == item else item for item in new]


# The position index of the list each item payload kind last produced: the next payload of
# that kind usually merges into that very list (the stored document's), so a one-rule upsert
# does not index ten thousand rules again.
_last_positions: dict[str, tuple[list, dict]] = {}


def _apply_item_changes(items: list, changes: Any, key: str, where: str) -> list:
    """Upsert and delete items of a big list by their key (a VM's MAC, a rule's id)."""
    cached = _last_positions.get(where)
    if cached is not None and cached[0] is items:
        position = dict(cached[1])
    else:
        position = {getattr(item, key): i for i, item in enumerate(items)}
    unknown = [(n, value) for n, value in enumerate(changes.delete) if value not in position]
    if unknown:
        raise InvalidPayload([Problem(f"{where}.delete[{n}]", f"no entry with {key} {v}") for n, v in unknown])
    _one_change_per_item(changes, key, where)
    result = list(items)
    for item in changes.upsert:
        value = getattr(item, key)
        if value in position:
            result[position[value]] = item
        else:
            position[value] = len(result)
            result.append(item)
    if changes.delete:
        gone = set(changes.delete)
        result = [item for item in result if getattr(item, key) not in gone]
        _last_positions.pop(where, None)
    else:
        _last_positions[where] = (result, position)
    return result


_ITEM_LISTS = {  # item-change kind -> (where its items live in the document, their key)
    "dhcp_entries": ("dhcp.entries", "mac"),
    "port_forwarding_rules": ("nat.port_forwarding", "id"),
    "ingress_rules": ("firewall.ingress", "id"),
    "vm_data": ("guest_data.vms", "mac"),
}


def _item_list(doc: RouterDocument, where: str) -> list:
    section, name = where.split(".")
    return getattr(getattr(doc, section), name)


def in_payload_terms(problems: list[Problem], payload: Any, doc: RouterDocument) -> list[Problem]:
    """Problems found in the merged document name positions the manager never sent
    (nat.port_forwarding[1002]): an item the payload upserted is named by its place in the
    payload (port_forwarding_rules.upsert[0]) instead, in the path and in the reason."""
    renames: list[tuple[re.Pattern, list, dict[int, str]]] = []
    for kind, (where, _) in _ITEM_LISTS.items():
        changes = getattr(payload, kind, None)
        if changes is not None and changes.upsert:
            sent = {id(item): f"{kind}.upsert[{k}]" for k, item in enumerate(changes.upsert)}
            renames.append((re.compile(re.escape(where) + r"\[(\d+)\]"), _item_list(doc, where), sent))
    if not renames:
        return problems

    def rename(text: str) -> str:
        for pattern, items, sent in renames:
            text = pattern.sub(functools.partial(_sent_name, items=items, sent=sent), text)
        return text

    return [Problem(rename(p.path), rename(p.reason), p.warning) for p in problems]


def _sent_name(match: re.Match, items: list, sent: dict[int, str]) -> str:
    n = int(match.group(1))
    return sent.get(id(items[n]), match.group(0)) if n < len(items) else match.group(0)


def build_document(raw: dict) -> RouterDocument:
    """A whole document, validated as one (the pipeline merges payloads with `merge`)."""
    try:
        return RouterDocument.model_validate(raw)
    except ValidationError as error:
        raise InvalidPayload(problems_from(error)) from None


def json_schema() -> dict:
    return Payload.model_json_schema()
