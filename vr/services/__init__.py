"""The services, in the order the pipeline applies them (network first, daemons, then vr's daemon: its
monitor, its agent and the guest data it serves)."""

from vr.services.agent import AgentService
from vr.services.dnsmasq import DnsmasqService
from vr.services.guestdata import GuestDataService
from vr.services.haproxy import HaproxyService
from vr.services.monitor import MonitorService
from vr.services.network import NetworkService
from vr.services.nftables import NftablesService
from vr.services.radvd import RadvdService
from vr.services.strongswan import StrongswanService
from vr.services.supervisor import SupervisorService

SERVICES = (
    NetworkService(),
    NftablesService(),
    SupervisorService(),
    DnsmasqService(),
    RadvdService(),
    HaproxyService(),
    StrongswanService(),
    MonitorService(),
    AgentService(),
    GuestDataService(),
)


def by_name(name: str):
    return next(s for s in SERVICES if s.name == name)
