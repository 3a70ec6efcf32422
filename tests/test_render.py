"""What the services render: the lines that matter, not whole-file snapshots."""

from __future__ import annotations

import pytest

from vr.foundation import document as docmod
from vr.foundation.settings import Settings
from vr.services.dnsmasq import DnsmasqService
from vr.services.network import NetworkService
from vr.services.runtime import Runtime
from vr.services.supervisor import SupervisorService, _ini


@pytest.fixture
def runtime(tmp_path) -> Runtime:
    return Runtime(Settings.under_root(tmp_path))


def render(example: dict, runtime: Runtime, service=None) -> dict[str, str]:
    doc = docmod.build_document(example)
    files = (service or DnsmasqService()).generate(doc, runtime)
    return {name: content.decode() for name, content in files.items()}


def test_dnsmasq_serves_only_guest_tiers(example, runtime):
    conf = render(example, runtime)["dnsmasq.conf"]
    assert "listen-address=10.1.1.1\n" in conf and "listen-address=10.1.2.1\n" in conf
    assert "192.0.2.10" not in conf and "169.254.0.10" not in conf  # no DNS on public or control


def test_dnsmasq_ranges_and_tier_options(example, runtime):
    conf = render(example, runtime)["dnsmasq.conf"]
    assert "dhcp-range=set:tier_tier1,10.1.1.100,10.1.1.150,255.255.255.0,3600\n" in conf
    assert "dhcp-range=set:tier_tier2,10.1.2.0,static,255.255.255.0,3600\n" in conf
    assert "dhcp-option=tag:tier_tier1,option:router,10.1.1.1\n" in conf
    assert "dhcp-option-force=tag:tier_tier1,option:mtu,1450\n" in conf
    assert "dhcp-option=tag:tier_tier2,option:dns-server,10.1.2.1\n" in conf
    assert "domain=cloud.internal\n" in conf and "server=192.0.2.1\n" in conf


def test_lease_file_lives_in_state_dir(example, runtime):
    conf = render(example, runtime)["dnsmasq.conf"]
    assert f"dhcp-leasefile={runtime.settings.state_dir}/dnsmasq.leases\n" in conf


def test_one_host_line_and_one_name_per_vm(example, runtime):
    files = render(example, runtime)
    assert files["dhcp-hosts"].splitlines() == [
        "02:00:00:00:01:10,10.1.1.10,web1,3600",
        "02:00:00:00:02:10,10.1.2.10,db1,3600",
    ]
    assert "set:" not in files["dhcp-hosts"]  # dnsmasq 2.90 crashes on SIGHUP with tagged hostsfile lines
    names = "".join(content for path, content in files.items() if path.startswith("names/")).splitlines()
    assert sorted(names) == ["10.1.1.1 r-101-vm data-server", "10.1.1.10 web1", "10.1.2.1 r-101-vm data-server",
                            "10.1.2.10 db1"]
    assert files["names/router"].splitlines() == ["10.1.1.1 r-101-vm data-server", "10.1.2.1 r-101-vm data-server"]


def test_second_nic_gets_no_default_gateway_and_per_vm_options(example, runtime):
    entry = example["dhcp"]["entries"][1]
    entry["default_gateway"] = False
    entry["options"] = [{"code": 42, "values": ["10.1.2.5", "10.1.2.6"]}]
    files = render(example, runtime)
    conf = files["dnsmasq.conf"]
    assert "dhcp-host=02:00:00:00:02:10,set:vm020000000210,10.1.2.10,db1,3600\n" in conf
    assert "dhcp-option=tag:vm020000000210,option:router\n" in conf
    assert "dhcp-option=tag:vm020000000210,42,10.1.2.5,10.1.2.6\n" in conf
    assert "02:00:00:00:02:10" not in files["dhcp-hosts"]


def test_router_without_guests_runs_no_dnsmasq(example, runtime):
    example["interfaces"] = [i for i in example["interfaces"] if i["role"] != "guest"]
    example["dhcp"] = {"tiers": [], "entries": []}
    doc = docmod.build_document(example)
    assert DnsmasqService().generate(doc, runtime) == {}
    assert DnsmasqService().programs(doc, runtime) == []


def test_network_desired_state_is_exact(example, runtime):
    import json

    state = json.loads(render(example, runtime, NetworkService())["network.json"])
    tier1 = next(i for i in state["interfaces"] if i["id"] == "tier1")
    assert tier1 == {"id": "tier1", "name": "eth2", "mac": None, "mtu": 1450, "role": "guest", "addresses": ["10.1.1.1/24"]}
    assert state["routes"] == [{"destination": "0.0.0.0/0", "gateway": "192.0.2.1", "metric": 0}]


def test_supervisor_runs_dnsmasq_in_foreground_with_own_paths(example, runtime):
    conf = render(example, runtime, SupervisorService())["supervisord.conf"]
    settings = runtime.settings
    assert f"file={settings.run_dir}/supervisor.sock" in conf
    assert "[program:dnsmasq]" in conf and "--keep-in-foreground" in conf
    assert f"--pid-file={settings.run_dir}/dnsmasq.pid" in conf
    assert "autostart=false" in conf  # a daemon starts only once its files are in place


def test_supervisor_values_cannot_break_the_ini(tmp_path):
    with pytest.raises(ValueError, match="control character"):
        _ini("/tmp/x\n[program:evil]")
    assert _ini("/tmp/100%") == "/tmp/100%%"


def test_templates_fail_loudly_on_missing_values(runtime):
    import jinja2

    with pytest.raises(jinja2.UndefinedError):
        runtime.render("dnsmasq/host-name.j2")


def test_network_refuses_overlaps_and_unreachable_gateways(example):
    example["interfaces"][3]["addresses"] = ["10.1.1.129/25"]
    example["routes"].append({"destination": "10.9.0.0/16", "gateway": "10.200.0.1"})
    doc = docmod.build_document(example)
    found = {p.path: p.reason for p in NetworkService().verify(doc)}
    assert "overlaps interfaces[2].addresses[0]" in found["interfaces[3].addresses[0]"]
    assert "not on any connected subnet" in found["routes[1].gateway"]


def test_several_public_ips_in_one_subnet_but_no_duplicates(example):
    example["interfaces"][1]["addresses"] += ["192.0.2.11/24", "192.0.2.10/24"]
    doc = docmod.build_document(example)
    found = {p.path: p.reason for p in NetworkService().verify(doc)}
    assert list(found) == ["interfaces[1].addresses[2]"]
    assert "already interfaces[1].addresses[0]" in found["interfaces[1].addresses[2]"]


def shared_tier2(example: dict) -> dict:
    """tier2 as a shared network: two subnets on its interface (ipaliases), each with its
    own gateway (not the router), its own domain; tier1 stays routed by the router."""
    tier2 = next(i for i in example["interfaces"] if i["id"] == "tier2")
    tier2["addresses"] = ["10.1.2.1/24", "10.9.0.2/24"]
    tier2["gateways"] = ["10.1.2.254", "10.9.0.1"]
    example["dhcp"]["tiers"][1] |= {"domain": "shared.example", "range": {"start": "10.9.0.100", "end": "10.9.0.120"}}
    example["dhcp"]["entries"].append({"tier": "tier2", "mac": "02:00:00:00:09:10", "ip": "10.9.0.10",
                                       "hostname": "alias-vm", "lease_time": "infinite"})  # fmt: skip
    return example


def test_a_shared_tier_sends_its_own_gateway_per_subnet_and_its_own_domain(example, runtime):
    files = render(shared_tier2(example), runtime)
    conf = files["dnsmasq.conf"]
    assert "dhcp-range=set:tier_tier2,10.1.2.0,static,255.255.255.0,3600\n" in conf
    assert "dhcp-range=set:tier_tier2_1,10.9.0.100,10.9.0.120,255.255.255.0,3600\n" in conf
    assert "dhcp-option=tag:tier_tier2,option:router,10.1.2.254\n" in conf
    assert "dhcp-option=tag:tier_tier2_1,option:router,10.9.0.1\n" in conf
    assert "dhcp-option=tag:tier_tier2_1,option:dns-server,10.9.0.2\n" in conf  # the router's address there
    assert "dhcp-option=tag:tier_tier2_1,option:domain-name,shared.example\n" in conf
    assert "dhcp-option=tag:tier_tier1,option:router,10.1.1.1\n" in conf  # the routed tier: the router
    assert "domain=shared.example,10.1.2.0/24\n" in conf and "domain=shared.example,10.9.0.0/24\n" in conf
    assert "local=/shared.example/\n" in conf and "domain=cloud.internal\n" in conf
    assert "02:00:00:00:09:10,10.9.0.10,alias-vm,infinite\n" in files["dhcp-hosts"]
    assert "02:00:00:00:01:10,10.1.1.10,web1,3600\n" in files["dhcp-hosts"]  # the tier's lease time


def test_an_option_vr_sends_itself_is_replaced_by_the_tiers_never_doubled(example, runtime):
    example["dhcp"]["tiers"][0]["options"] = [{"name": "router", "values": ["10.1.1.254"]},
                                              {"code": 6, "values": ["10.1.1.53"]},
                                              {"name": "mtu", "values": ["1400"]}]  # fmt: skip
    conf = render(example, runtime)["dnsmasq.conf"]
    tier1 = [line for line in conf.splitlines() if "tag:tier_tier1," in line]
    assert [line for line in tier1 if "option:router" in line] == ["dhcp-option=tag:tier_tier1,option:router,10.1.1.254"]
    assert [line for line in tier1 if "dns-server" in line or ",6," in line] == ["dhcp-option=tag:tier_tier1,6,10.1.1.53"]
    assert [line for line in tier1 if "mtu" in line] == ["dhcp-option-force=tag:tier_tier1,option:mtu,1400"]


def lb_doc(example: dict, **rule) -> dict:
    example["nat"]["public_ips"].append({"ip": "192.0.2.12"})
    base = {"id": "web", "public_ip": "192.0.2.12", "public_port": 80, "private_port": 8000,
            "members": [{"ip": "10.1.1.10"}]}  # fmt: skip
    example["load_balancer"] = {"rules": [base | rule]}
    return example


@pytest.mark.parametrize(("stickiness", "lines"), [
    ({"type": "cookie"}, ["cookie SERVERID insert indirect nocache"]),
    ({"type": "cookie", "cookie": "LB", "indirect": False, "expire_s": 600}, ["cookie LB insert nocache maxlife 600s"]),
    ({"type": "cookie", "cookie": "JSESSIONID", "mode": "prefix"}, ["cookie JSESSIONID prefix"]),
    ({"type": "source", "table_size": 5000, "expire_s": 120}, ["stick-table type ip size 5000 expire 120s", "stick on src"]),
    ({"type": "app_cookie", "cookie": "sid", "length": 128},
     ["stick-table type string len 128 size 200000 expire 1800s", "stick on req.cook(sid)"]),
])  # fmt: skip
def test_stickiness_parameters_reach_haproxy(example, runtime, stickiness, lines):
    from vr.services.haproxy import HaproxyService

    config = render(lb_doc(example, stickiness=stickiness), runtime, HaproxyService())["haproxy.cfg"]
    for line in lines:
        assert f"  {line}\n" in config


@pytest.mark.parametrize(("stickiness", "reason"), [
    ({"type": "source", "mode": "rewrite"}, "mode does not apply to source stickiness"),
    ({"type": "cookie", "length": 10}, "length does not apply to cookie stickiness"),
    ({"type": "cookie", "mode": "rewrite", "nocache": False}, "apply to an inserted cookie"),
    ({"type": "none", "expire_s": 60}, "expire_s does not apply to none stickiness"),
])  # fmt: skip
def test_stickiness_parameters_that_do_not_apply_are_refused(example, stickiness, reason):
    with pytest.raises(docmod.InvalidPayload) as caught:
        docmod.build_document(lb_doc(example, stickiness=stickiness))
    assert any(reason in p.reason and p.path == "load_balancer.rules[0].stickiness" for p in caught.value.problems)


def test_proxy_protocol_reaches_members_and_their_checks(example, runtime):
    from vr.services.haproxy import HaproxyService

    doc = lb_doc(example, protocol="tcp", proxy_protocol="v2", health_check={"type": "tcp"})
    config = render(doc, runtime, HaproxyService())["haproxy.cfg"]
    assert " send-proxy-v2 check-send-proxy" in config and "option forwardfor" not in config
