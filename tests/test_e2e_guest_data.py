"""Guest data in the lab: what Debian's cloud-init (its CloudStack data source) and curl read
from the router, each guest only its own, and what a guest forging another's address gets
(nothing: its packets are dropped and counted)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import EXAMPLES, example_lab, write_payload
from vr.lab.cloudinit import read_as_cloud_init
from vr.services.supervisor_rpc import SupervisorClient

TIER2 = "10.1.2.1"  # the router on tier2 (anti-spoofing on: no dynamic range there)
A = {"ns": "ga", "mac": "02:00:00:00:02:21", "ip": "10.1.2.21", "hostname": "vm-a"}
B = {"ns": "gb", "mac": "02:00:00:00:02:22", "ip": "10.1.2.22", "hostname": "vm-b"}


def ssh_key(comment: str, kind: str = "ed25519") -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    private = ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else rsa.generate_private_key(65537, 2048)
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{public.decode()} {comment}"


KEYS = {"ga": [ssh_key("alice@a"), ssh_key("ops@a", "rsa")], "gb": [ssh_key("bob@b")]}
USER_DATA = {"ga": b"#cloud-config\nhostname: vm-a\nruncmd: [echo a]\n", "gb": None}


def guest_doc(generation: int, passwords: dict[str, str]) -> dict:
    """The example router with two more VMs on tier2, each with its own guest data."""
    doc = json.loads((EXAMPLES / "router.json").read_text())
    vms = []
    for vm in (A, B):
        doc["dhcp"]["entries"].append({"tier": "tier2", "mac": vm["mac"], "ip": vm["ip"], "hostname": vm["hostname"]})
        data = {"mac": vm["mac"], "public_keys": KEYS[vm["ns"]],
                "meta_data": {"instance-id": f"i-{vm['hostname']}", "availability-zone": "zone-1",
                              "service-offering": "Small Instance", "custom.key": f"for {vm['hostname']}"}}  # fmt: skip
        if USER_DATA[vm["ns"]]:
            data["user_data"] = base64.b64encode(USER_DATA[vm["ns"]]).decode()
        if vm["ns"] in passwords:
            data["password"] = passwords[vm["ns"]]
        vms.append(data)
    return {**doc, "generation": generation, "guest_data": {"vms": vms}}


def curl(lab, guest: str, url: str, *headers: str, timeout: float = 3) -> tuple[int | None, str]:
    """(HTTP status, body) as the guest gets it; (None, why) when nothing answers."""
    command = ["ip", "netns", "exec", lab.ns(guest), "curl", "-s", "-m", str(timeout), "-o", "-", "-w",
               "\n%{http_code}", *(arg for h in headers for arg in ("-H", h)), url]  # fmt: skip
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout + 10)
    body, _, code = result.stdout.rpartition("\n")
    return (int(code), body) if result.returncode == 0 and code != "000" else (None, f"curl exit {result.returncode}")


def password(lab, guest: str, asked: str = "send_my_password") -> tuple[int | None, str]:
    return curl(lab, guest, f"http://{TIER2}:8080/", f"DomU_Request: {asked}")


def spoof_drops(lab) -> int:
    """What anti-spoofing dropped: IP packets (table inet vr) and ARP (table arp vr)."""
    dropped = 0
    for family in ("inet", "arp"):
        listed = subprocess.run(["ip", "netns", "exec", lab.router_ns, "nft", "list", "chain", family, "vr",
                                 "spoof_check"], capture_output=True, text=True, check=True, timeout=10).stdout  # fmt: skip
        dropped += int(re.search(r"counter packets (\d+) bytes \d+ drop", listed).group(1))
    return dropped


# A gratuitous ARP reply and a request to the router, each claiming an address for a MAC.
FORGED_ARP = r"""
import socket, struct, sys
mac, claimed, router = bytes.fromhex(sys.argv[1].replace(":", "")), socket.inet_aton(sys.argv[2]), socket.inet_aton(sys.argv[3])
with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as raw:
    for operation, target_mac, target in ((2, b"\xff" * 6, claimed), (1, b"\0" * 6, router)):
        arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, operation) + mac + claimed + target_mac + target
        for _ in range(3):
            raw.sendto(b"\xff" * 6 + mac + struct.pack("!H", 0x0806) + arp, ("eth0", 0x0806))
"""


@pytest.fixture
def guests(tmp_path):
    """The example lab with vm-a and vm-b (ga, gb) on tier2's link, leased, their data applied."""
    with example_lab(guests=("g1",)) as lab:
        lab.add_guests("g2", {A["ns"]: A["mac"], B["ns"]: B["mac"]})
        lab.vr("apply", write_payload(tmp_path, guest_doc(2, {"ga": "Pass-A-1", "gb": "Pass-B-1"})))
        for vm in (A, B):
            assert lab.dhcp(vm["ns"])["address"] == vm["ip"]
        yield lab


def test_cloud_init_reads_each_guests_own_data_keys_and_password_exactly_once(guests, tmp_path):
    lab = guests
    # vm-a as at boot: the router found from its DHCP lease.
    seen = read_as_cloud_init(lab.ns("ga"), lease_file=str(lab.dir / "ga.leases"))
    assert seen["ok"], seen["error"]
    assert (seen["vr_address"], seen["discovery"]) == (TIER2, "lease-file")
    assert seen["userdata_raw"] == USER_DATA["ga"].decode()
    assert seen["instance_id"] == "i-vm-a" and seen["metadata"]["local-hostname"] == "vm-a"
    assert seen["metadata"]["local-ipv4"] == A["ip"] and seen["metadata"]["custom.key"] == "for vm-a"
    assert seen["public_keys"] == KEYS["ga"]  # both keys
    assert seen["password"] == "Pass-A-1"
    # vm-b finds the router by name (data-server, answered by the router with its tier2 address).
    seen = read_as_cloud_init(lab.ns("gb"), nameserver=TIER2)
    assert seen["ok"], seen["error"]
    assert (seen["vr_address"], seen["discovery"]) == (TIER2, "data-server")
    assert seen["userdata_raw"] == "" and seen["instance_id"] == "i-vm-b"  # no user data: 404, as CloudStack
    assert seen["public_keys"] == KEYS["gb"] and seen["password"] == "Pass-B-1"

    # Answered once: a second boot gets none, and the service says it is saved.
    again = read_as_cloud_init(lab.ns("ga"), vr_address=TIER2)
    assert again["ok"] and again["password"] is None and again["public_keys"] == KEYS["ga"]
    assert password(lab, "ga") == (200, "saved_password")

    # A new password (vm_passwords alone, even the same text again) is answered once more.
    lab.vr("apply", write_payload(tmp_path, {"generation": 3, "vm_passwords": [{"mac": A["mac"], "password": "Pass-A-1"}]}))
    assert read_as_cloud_init(lab.ns("ga"), vr_address=TIER2)["password"] == "Pass-A-1"
    assert password(lab, "ga") == (200, "saved_password")

    # A pending password survives the daemon's restart; one answered stays answered.
    lab.vr("apply", write_payload(tmp_path, {"generation": 4, "vm_passwords": [{"mac": B["mac"], "password": "Pass-B-2"}]}))
    supervisor = SupervisorClient(lab.settings)
    supervisor.restart("monitor")  # the daemon is supervisord's program `monitor`
    deadline = time.monotonic() + 20
    while (answer := password(lab, "ga", "saved_password"))[0] is None:
        assert time.monotonic() < deadline, "the guest data server did not come back"
        time.sleep(0.2)
    assert answer == (200, "saved_password")
    assert password(lab, "gb") == (200, "Pass-B-2")
    assert password(lab, "gb") == (200, "saved_password")

    # Passwords and user data never leave the router but to their VM: not in events, logs or a diff.
    diff = lab.vr("diff", write_payload(tmp_path, {"generation": 5, "vm_passwords": [{"mac": A["mac"], "password": "Pass-A-9"}]}))
    shown = diff.stdout + diff.stderr
    assert "Pass-A-9" not in shown and "secret" in shown
    settings = lab.settings
    logs = b"".join(p.read_bytes() for p in settings.log_dir.rglob("*") if p.is_file()) + settings.events_path.read_bytes()
    for secret in (b"Pass-A-1", b"Pass-B-2", b"runcmd"):
        assert secret not in logs
    kept = [settings.state_dir / "passwords-served.json", settings.document_path, settings.document_path.with_suffix(".log"),
            *settings.service_dir("guestdata").glob("vms/*")]  # fmt: skip
    assert kept[3:] and all(p.stat().st_mode & 0o777 == 0o600 for p in kept), [oct(p.stat().st_mode) for p in kept]


def test_each_guest_reads_only_its_own_and_a_forger_gets_nothing(guests):
    lab = guests
    assert curl(lab, "ga", f"http://{TIER2}/latest/meta-data/instance-id") == (200, "i-vm-a")
    assert curl(lab, "gb", f"http://{TIER2}/latest/meta-data/instance-id") == (200, "i-vm-b")
    # vm-b takes vm-a's address with its own MAC: the router drops what it sends, so it gets
    # neither vm-a's data nor its password, nor a DNS answer or a route out.
    before = spoof_drops(lab)
    subprocess.run(["ip", "-n", lab.ns("gb"), "addr", "flush", "dev", "eth0"], check=True, timeout=10)
    subprocess.run(["ip", "-n", lab.ns("gb"), "addr", "add", f"{A['ip']}/24", "dev", "eth0"], check=True,
                   timeout=10)  # fmt: skip
    assert curl(lab, "gb", f"http://{TIER2}/latest/user-data", timeout=2)[0] is None
    assert password(lab, "gb")[0] is None
    assert curl(lab, "gb", "http://192.0.2.1/", timeout=2)[0] is None  # the public side, through the router
    with pytest.raises(TimeoutError):
        lab.resolve(lab.ns("gb"), "web1.cloud.internal", TIER2)
    assert spoof_drops(lab) >= before + 3  # each attempt's ARP (or packet) at least, counted
    # Nor does its ARP move vm-a's address to its MAC in the router's neighbour table (where
    # the answers meant for vm-a would follow it): the router still knows vm-a by vm-a's MAC.
    subprocess.run(["ip", "netns", "exec", lab.ns("gb"), sys.executable, "-c", FORGED_ARP, B["mac"], A["ip"], TIER2],
                   check=True, capture_output=True, timeout=10)  # fmt: skip
    neighbours = subprocess.run(["ip", "-n", lab.router_ns, "neigh", "show", A["ip"]], capture_output=True, text=True,
                                check=True, timeout=10).stdout  # fmt: skip
    assert B["mac"] not in neighbours, neighbours
    # The real vm-a is not disturbed (its password still pending: the forger never got it).
    assert curl(lab, "ga", f"http://{TIER2}/latest/meta-data/local-ipv4") == (200, A["ip"])
    assert password(lab, "ga") == (200, "Pass-A-1")


def test_without_anti_spoofing_the_neighbour_table_still_tells_a_forger_apart(guests, tmp_path):
    """tier2's anti-spoofing off: the forger's packets reach the router, but the MAC the
    neighbour table has for the address is not the VM's entry's, so it gets a 404, not vm-a's data."""
    lab = guests
    doc = guest_doc(3, {"ga": "Pass-A-1", "gb": "Pass-B-1"})
    next(i for i in doc["interfaces"] if i["id"] == "tier2")["anti_spoofing"] = False
    lab.vr("apply", write_payload(tmp_path, doc))
    listed = subprocess.run(["ip", "netns", "exec", lab.router_ns, "nft", "list", "set", "inet", "vr", "spoof_ifs"],
                            capture_output=True, text=True, check=True, timeout=10).stdout  # fmt: skip
    assert '"eth3"' not in listed and '"eth2"' in listed
    assert curl(lab, "ga", f"http://{TIER2}/latest/meta-data/instance-id") == (200, "i-vm-a")
    subprocess.run(["ip", "-n", lab.ns("gb"), "addr", "flush", "dev", "eth0"], check=True, timeout=10)
    subprocess.run(["ip", "-n", lab.ns("gb"), "addr", "add", f"{A['ip']}/24", "dev", "eth0"], check=True, timeout=10)
    subprocess.run(["ip", "-n", lab.router_ns, "neigh", "flush", "dev", "eth3"], check=True, timeout=10)
    assert curl(lab, "gb", f"http://{TIER2}/latest/user-data")[0] == 404
    assert password(lab, "gb")[0] == 404


def test_guest_data_paths_as_guests_read_them(guests):
    lab = guests
    status, index = curl(lab, "ga", f"http://{TIER2}/latest/meta-data/")
    assert status == 200
    assert index.split("\n") == ["service-offering", "availability-zone", "local-ipv4", "local-hostname",
                                 "instance-id", "public-keys", "custom.key"]  # fmt: skip
    for path, expected in (("/latest/meta-data/public-keys", "\n".join(KEYS["ga"])), ("/latest/public-keys", "\n".join(KEYS["ga"])),
                           ("/latest/local-hostname", "vm-a"), ("/latest/meta-data", index),
                           ("/latest/meta-data/service-offering", "Small Instance"),
                           ("/latest/user-data", USER_DATA["ga"].decode())):  # fmt: skip
        assert curl(lab, "ga", f"http://{TIER2}{path}") == (200, expected), path
    assert curl(lab, "ga", f"http://{TIER2}/latest/meta-data/no-such-key")[0] == 404
    assert curl(lab, "ga", f"http://{TIER2}/latest/meta-data/../../etc/passwd")[0] == 404
    assert curl(lab, "ga", f"http://{TIER2}/")[0] == 404
    assert curl(lab, "gb", f"http://{TIER2}/latest/user-data")[0] == 404  # vm-b has none
    assert password(lab, "ga", "something_else")[0] == 400
    assert curl(lab, "ga", f"http://{TIER2}:8080/")[1] == "bad_request"
    # A machine the document does not know (a dynamic lease on tier1) gets nothing of anyone's.
    lab.set_guest_mac("g1", "02:00:00:00:01:77")
    assert lab.dhcp("g1")["address"].startswith("10.1.1.1")  # from the range 10.1.1.100-150
    assert curl(lab, "g1", "http://10.1.1.1/latest/meta-data/instance-id")[0] == 404
    assert curl(lab, "g1", "http://10.1.1.1:8080/", "DomU_Request: send_my_password")[0] == 404
    # Nothing answers on the public or control side, nor on a guest tier's IPv6.
    for guest, url in (("pub", "http://192.0.2.10/latest/user-data"), ("pub", "http://192.0.2.10:8080/"),
                       ("mgmt", "http://169.254.0.10/latest/user-data")):  # fmt: skip
        assert curl(lab, guest, url, timeout=2)[0] is None, url
    # Hostile bytes: each answered (a 4xx, never a trace) or closed, and the server goes on.
    answers = subprocess.run(["ip", "netns", "exec", lab.ns("ga"), sys.executable, "-c", RAW, TIER2, repr(HOSTILE)],
                             capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()  # fmt: skip
    assert len(answers) == len(HOSTILE) and all(a in ("closed", "400", "405", "404", "413", "431") for a in answers), answers
    assert password(lab, "ga") == (200, "Pass-A-1")  # none of that consumed vm-a's password


HOSTILE = [b"GARBAGE\r\n\r\n", b"GET /latest/user-data HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n",
           b"POST /latest/user-data HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", b"\x00\xff" * 500 + b"\r\n\r\n",
           b"GET /" + b"%" * 9000 + b" HTTP/1.1\r\n\r\n", b"GET /latest/meta-data/\x00 HTTP/1.1\r\nHost: x\r\n\r\n"]
RAW = r"""
import ast, socket, sys
for request in ast.literal_eval(sys.argv[2]):
    try:
        with socket.create_connection((sys.argv[1], 80), timeout=3) as sock:
            sock.sendall(request)
            head = sock.recv(64)
        print(head.split()[1].decode() if head.startswith(b"HTTP/1.") else "closed")
    except OSError:
        print("closed")
"""


BAD = [
    ("oversized user data", lambda vm: vm | {"user_data": base64.b64encode(b"x" * (32 * 1024 + 1)).decode()},
     "vm_data.upsert[0].user_data", "at most 32768 bytes"),
    ("user data not base64", lambda vm: vm | {"user_data": "not base64!"}, "vm_data.upsert[0].user_data", "base64"),
    ("a key that is not one", lambda vm: vm | {"public_keys": ["ssh-rsa AAAA-not-base64 x"]},
     "vm_data.upsert[0].public_keys[0]", "not an SSH public key"),
    ("a key with a newline", lambda vm: vm | {"public_keys": [KEYS["ga"][0] + "\n" + KEYS["gb"][0]]},
     "vm_data.upsert[0].public_keys[0]", "no newline"),
    ("a key of another type", lambda vm: vm | {"public_keys": ["ssh-rsa " + KEYS["ga"][0].split()[1]]},
     "vm_data.upsert[0].public_keys[0]", "not a ssh-rsa key"),
    ("a key with options", lambda vm: vm | {"public_keys": ['command="sh" ' + KEYS["ga"][0]]},
     "vm_data.upsert[0].public_keys[0]", "not a key type"),
    ("a meta data value with a newline", lambda vm: vm | {"meta_data": {"vm-id": "1\ninstance-id"}},
     "vm_data.upsert[0].meta_data.vm-id", "control characters"),
    ("a meta data key served elsewhere", lambda vm: vm | {"meta_data": {"public-keys": "x"}},
     "vm_data.upsert[0].meta_data", "served from its own field"),
    ("a meta data key outside the safe set", lambda vm: vm | {"meta_data": {"../x": "y"}},
     "vm_data.upsert[0].meta_data", "meta data key"),
    ("a password with a space", lambda vm: vm | {"password": "two words"}, "vm_data.upsert[0].password", "without spaces"),
    ("an unknown VM", lambda vm: vm | {"mac": "02:00:00:00:02:99"}, "vm_data.upsert[0].mac", "no VM has MAC"),
]


def test_bad_guest_data_is_refused_with_its_path_and_nothing_changes(guests, tmp_path):
    lab = guests
    before = (curl(lab, "ga", f"http://{TIER2}/latest/user-data"), curl(lab, "ga", f"http://{TIER2}/latest/public-keys"))
    generation = 3
    for label, change, path, reason in BAD:
        vm = change({"mac": A["mac"], "public_keys": KEYS["ga"]})
        refused = lab.vr("apply", write_payload(tmp_path, {"generation": generation, "vm_data": {"upsert": [vm]}}),
                         check=False)  # fmt: skip
        assert refused.returncode == 2, (label, refused.stdout, refused.stderr)
        assert path in refused.stderr and reason in refused.stderr, (label, refused.stderr)
        assert "Traceback" not in refused.stderr and "two words" not in refused.stderr
    unknown = lab.vr("apply", write_payload(tmp_path, {"generation": generation, "vm_passwords": [
        {"mac": "02:00:00:00:02:99", "password": "Whatever1"}]}), check=False)  # fmt: skip
    assert unknown.returncode == 2 and "vm_passwords[0].mac" in unknown.stderr and "Whatever1" not in unknown.stderr
    after = (curl(lab, "ga", f"http://{TIER2}/latest/user-data"), curl(lab, "ga", f"http://{TIER2}/latest/public-keys"))
    assert after == before
    assert json.loads(lab.vr("status", "--json").stdout)["generation"] == 2

    # A VM deleted from dhcp_entries loses its data and its password with it.
    lab.vr("apply", write_payload(tmp_path, {"generation": 3, "dhcp_entries": {"delete": [B["mac"]]}}))
    assert curl(lab, "gb", f"http://{TIER2}/latest/meta-data/instance-id", timeout=2)[0] in (None, 404)


CONCURRENT = r"""
import concurrent.futures, sys, urllib.request
url, expected, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
def one(_):
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status == 200 and answer.read().decode() == expected
    except OSError:
        return False
with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
    results = list(pool.map(one, range(count)))
print(sum(1 for ok in results if not ok))
"""


def test_200_concurrent_requests_during_applies_are_all_answered(guests, tmp_path):
    lab = guests
    client = subprocess.Popen(["ip", "netns", "exec", lab.ns("ga"), sys.executable, "-c", CONCURRENT,
                               f"http://{TIER2}/latest/meta-data/instance-id", "i-vm-a", "200"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        for n in range(5):  # VMs come and go meanwhile, each an apply of the guest data with the rest
            vm = {"tier": "tier1", "mac": f"02:00:00:00:01:{0x30 + n:02x}", "ip": f"10.1.1.{30 + n}", "hostname": f"c{n}"}
            lab.vr("apply", write_payload(tmp_path, {"generation": 3 + n, "dhcp_entries": {"upsert": [vm]},
                                                     "vm_data": {"upsert": [{"mac": vm["mac"], "user_data": "eA=="}]}}))  # fmt: skip
        out, err = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, err
    assert out.strip() == "0"  # failed requests
