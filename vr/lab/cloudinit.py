"""Read a lab router's guest metadata the way a booting guest's cloud-init does.

Runs Debian's real cloud-init CloudStack data source (`cloudinit.sources.DataSourceCloudStack`,
package `cloud-init`, for /usr/bin/python3; it shells out to `wget` for the password) inside a
guest namespace: `ip netns exec <netns> /usr/bin/python3 -I -c _SCRIPT`. The venv has no
cloud-init, so nothing of it is imported here.

What the child points where, so that nothing on the host is read or written:

  Paths        cloud_dir, run_dir: under a fresh mkdtemp() of the caller's, removed afterwards
               even after a timeout (so no seed dir /var/lib/cloud/seed/cs is found, and
               instance-data.json lands there too; all the child's scratch files live there)
  DNS          `ip netns exec` gives the child a private mount namespace (a slave of the
               host's); the child bind-mounts over /etc/resolv.conf, there only, a file with
               `nameserver <nameserver>` (none: no nameserver line, so glibc asks 127.0.0.1 of
               the guest namespace and fails at once) and `options timeout:1 attempts:1`, and
               over /etc/hosts one with localhost only. The host's nameserver is never asked.
               It refuses to mount if its mount namespace is the caller's.
  networkd     cloudinit.net.dhcp.NETWORKD_LEASES_DIR (/run/systemd/netif/leases): an empty
               temp dir
  dhclient     DataSourceCloudStack.get_dhclient_d (which scans /var/lib/dhclient,
               /var/lib/dhcp, /var/lib/NetworkManager): a temp dir holding a copy of
               `lease_file` (under its own name if cloud-init would take it, i.e. it ends in
               .lease/.leases and does not start with dhclient6, else as dhclient.leases), or
               None without lease_file
  vr_address   given: DataSourceCloudStack.get_vr_address returns it, discovery is skipped

Discovery at boot, in this cloud-init (22.4.2): the `data-server` DNS name, then networkd's
SERVER_ADDRESS, then the newest dhclient lease's (last) dhcp-server-identifier, then the
default route's gateway (/proc/net/route, which the guest namespace has of its own). The result
names the one that answered ("discovery").
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile

PYTHON = "/usr/bin/python3"
# Proxies would send the guest's requests (requests, wget) somewhere else than the router.
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")

_SCRIPT = r"""
import json, logging, os, shutil, subprocess, sys, traceback

args = json.loads(sys.argv[1])
records = []


class Keep(logging.Handler):
    def emit(self, record):
        records.append(self.format(record))


out = {"ok": False, "vr_address": None, "discovery": None, "userdata_raw": None, "metadata": {},
       "instance_id": None, "public_keys": [], "password": None, "cfg": {}, "error": ""}
tmp = args["tmp"]
try:
    if os.readlink("/proc/self/ns/mnt") == args["host_mnt_ns"]:
        raise RuntimeError("not in a private mount namespace: refusing to bind-mount over /etc")
    resolv = os.path.join(tmp, "resolv.conf")
    with open(resolv, "w") as f:
        if args["nameserver"]:
            f.write("nameserver %s\n" % args["nameserver"])
        f.write("options timeout:1 attempts:1\n")
    hosts = os.path.join(tmp, "hosts")
    with open(hosts, "w") as f:
        f.write("127.0.0.1 localhost\n::1 localhost\n")
    for source, target in ((resolv, "/etc/resolv.conf"), (hosts, "/etc/hosts")):
        subprocess.run(["mount", "--bind", source, target], check=True, capture_output=True)

    from cloudinit import distros, helpers
    from cloudinit.net import dhcp
    from cloudinit.sources import DataSourceCloudStack as cs

    # After the imports: cloudinit.log resets the root logger when imported.
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(name)s %(levelname)s: %(message)s",
                        force=True)
    keep = Keep(logging.WARNING)
    keep.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.getLogger().addHandler(keep)

    dhcp.NETWORKD_LEASES_DIR = os.path.join(tmp, "networkd-leases")
    os.mkdir(dhcp.NETWORKD_LEASES_DIR)
    lease_d = None
    if args["lease_file"]:
        lease_d = os.path.join(tmp, "dhcp")
        os.mkdir(lease_d)
        name = os.path.basename(args["lease_file"])
        if name.startswith("dhclient6") or not name.endswith((".lease", ".leases")):
            name = "dhclient.leases"
        shutil.copyfile(args["lease_file"], os.path.join(lease_d, name))
    cs.get_dhclient_d = lambda: lease_d if lease_d and os.listdir(lease_d) else None

    found = {}

    def record(key, func):
        def wrapped(*a, **kw):
            value = func(*a, **kw)
            found.setdefault(key, value)
            return value
        return wrapped

    cs.get_data_server = record("data-server", cs.get_data_server)
    dhcp.networkd_get_option_from_leases = record("networkd", dhcp.networkd_get_option_from_leases)
    cs.get_latest_lease = record("lease-file", cs.get_latest_lease)
    cs.get_default_gateway = record("default-route", cs.get_default_gateway)
    if args["vr_address"]:
        cs.get_vr_address = lambda: args["vr_address"]

    sys_cfg = {
        "datasource_list": ["CloudStack"],
        "datasource": {"CloudStack": {"max_wait": args["max_wait"], "timeout": args["url_timeout"]}},
        "system_info": {"distro": "debian", "paths": {"cloud_dir": os.path.join(tmp, "cloud"),
                                                      "run_dir": os.path.join(tmp, "run"),
                                                      "templates_dir": "/etc/cloud/templates/"}},
    }
    paths = helpers.Paths(sys_cfg["system_info"]["paths"])
    distro = distros.fetch("debian")("debian", dict(sys_cfg["system_info"]), paths)
    ds = cs.DataSourceCloudStack(sys_cfg, distro, paths)
    out["vr_address"] = ds.vr_addr
    if args["vr_address"]:
        out["discovery"] = "given"
    elif found.get("data-server"):
        out["discovery"] = "data-server"
    elif found.get("networkd"):
        out["discovery"] = "networkd"
    elif found.get("lease-file") and "default-route" not in found:
        out["discovery"] = "lease-file"
    else:
        out["discovery"] = "default-route"
    try:
        out["ok"] = bool(ds.get_data())
    except Exception as e:  # after the crawl, e.g. persisting a list-valued local-hostname
        frame = traceback.extract_tb(e.__traceback__)[-1]
        out["error"] = "get_data() raised %s: %s (%s:%s)" % (type(e).__name__, e, frame.filename, frame.lineno)
    raw = ds.userdata_raw
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    out["userdata_raw"] = raw
    out["metadata"] = ds.metadata
    out["instance_id"] = ds.metadata.get("instance-id") if isinstance(ds.metadata, dict) else None
    out["public_keys"] = ds.get_public_ssh_keys() if isinstance(ds.metadata, dict) else []
    out["cfg"] = ds.get_config_obj()
    out["password"] = out["cfg"].get("password")
    if not out["ok"] and not out["error"]:
        out["error"] = "get_data() returned False"
except Exception as e:
    out["error"] = "%s: %s" % (type(e).__name__, e)
if records:
    out["error"] = "\n".join(filter(None, [out["error"], *records[-10:]]))
print(json.dumps(out, default=str))
"""


def _failure(error: str, stderr: str) -> dict:
    """The failure shape, with enough of the child's (DEBUG) log to see where it stood."""
    tail = "\n".join(stderr.strip().splitlines()[-10:])[-3000:]
    return {"ok": False, "error": f"{error}\n{tail}".strip()}


def read_as_cloud_init(
    netns: str,
    *,
    vr_address: str | None = None,
    lease_file: str | None = None,
    nameserver: str | None = None,
    timeout_s: float = 30,
    max_wait_s: int = 5,
    url_timeout_s: int = 2,
) -> dict:
    """Run cloud-init's CloudStack data source in `netns`; return what it read.

    Without vr_address it finds the router itself, as at boot (see the module doc): the
    `data-server` name through `nameserver` (the DNS server the guest got), then a copy of
    `lease_file` (dhclient's, for dhcp-server-identifier), then the namespace's default route.
    max_wait_s/url_timeout_s are the data source's max_wait/timeout (the wait for
    latest/meta-data/instance-id only; cloud-init reads the rest with its fixed 5 s timeout
    and 5 retries, and the password with wget: 3 tries of 20 s).

    Returns {"ok", "vr_address", "discovery" (given | data-server | networkd | lease-file |
    default-route), "userdata_raw" (str, "" for a 404 or empty body), "metadata",
    "instance_id", "public_keys", "password" (None when the router had none for us), "cfg"
    (the data source's config, with the password), "error" (cloud-init's warnings)}; on a
    failure to run, or after timeout_s, {"ok": False, "error": ...} with stderr's tail.
    """
    tmp = tempfile.mkdtemp(prefix="vr-cloudinit-")
    args = {
        "tmp": tmp,
        "vr_address": vr_address,
        "lease_file": os.path.abspath(lease_file) if lease_file else None,
        "nameserver": nameserver,
        "max_wait": int(max_wait_s),
        "url_timeout": int(url_timeout_s),
        "host_mnt_ns": os.readlink("/proc/self/ns/mnt"),
    }
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
    cmd = ["ip", "netns", "exec", netns, PYTHON, "-I", "-c", _SCRIPT, json.dumps(args)]
    try:
        return _run(cmd, env, timeout_s)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(cmd: list[str], env: dict, timeout_s: float) -> dict:
    """Run the child in a session of its own, so that a timeout stops its wget too."""
    process = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        return _failure(f"timed out after {timeout_s} s", stderr)
    if process.returncode != 0:
        return _failure(f"exit {process.returncode}", stderr)
    try:
        return json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return _failure(f"no JSON on stdout: {stdout[-200:]!r}", stderr)
