"""A full disk, a stored document that no longer loads, warnings: on a real lab router."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import EXAMPLES, example_lab, live_files, make_ca_and_certificate, write_payload
from vr.lab.harness import Lab

EXAMPLE = json.loads((EXAMPLES / "router.json").read_text())
NEW_VM = {"tier": "tier1", "mac": "02:00:00:00:01:55", "ip": "10.1.1.55", "hostname": "newvm"}


def status(lab: Lab) -> dict:
    return json.loads(lab.vr("status", "--json", check=False).stdout)


@contextlib.contextmanager
def lab_on_small_disk(size: str = "48m") -> Iterator[tuple[Lab, Path]]:
    """A lab router whose every file (config, state, run, log) lives on a small tmpfs of
    the test's own, unmounted afterwards."""
    root = Path(tempfile.mkdtemp(prefix="vr-test-disk-"))
    root.chmod(0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "vr-test-disk", str(root)], check=True)
    lab = Lab(root, prefix=f"vrtd{os.getpid() % 100000}")
    try:
        lab.up()
        lab.vr("apply", str(EXAMPLES / "router.json"))
        lab.dhcp("g1")
        yield lab, root
    finally:
        lab.down()
        subprocess.run(["umount", "-l", str(root)], check=False)
        shutil.rmtree(root, ignore_errors=True)


def fill(root: Path) -> Path:
    """Take every free block of the disk."""
    filler = root / "filler"
    with open(filler, "wb", buffering=0) as file:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while file.write(b"\0" * size):
                    pass
    return filler


def test_a_full_disk_fails_cleanly_and_changes_nothing(tmp_path):
    with lab_on_small_disk() as (lab, root):
        payload = write_payload(tmp_path, {"generation": 2, "dhcp_entries": {"upsert": [NEW_VM]}})
        bad = write_payload(tmp_path, {"generation": 2, "dns": {"domain": "x" * 50_000}}, "bad.json")
        before = live_files(lab)
        filler = fill(root)
        result = lab.vr("apply", payload, check=False)
        assert result.returncode == 4, result.stderr
        assert "no space left on " + str(root) in result.stderr and "Traceback" not in result.stderr
        refusal = lab.vr("apply", bad, check=False)  # its event cannot be written: still a clean answer
        assert refusal.returncode == 2 and "dns.domain" in refusal.stderr and "Traceback" not in refusal.stderr
        assert live_files(lab) == before
        assert lab.resolve(lab.ns("g1"), "db1.cloud.internal", "10.1.1.1") == ["10.1.2.10"]
        filler.unlink()
        assert lab.vr("apply", payload).returncode == 0
        assert status(lab)["generation"] == 2
        assert lab.resolve(lab.ns("g1"), "newvm.cloud.internal", "10.1.1.1") == ["10.1.1.55"]


def test_a_disk_that_fills_at_commit_rolls_the_services_back(lab, tmp_path):
    before = live_files(lab)
    payload = write_payload(tmp_path, {"generation": 2, "dhcp_entries": {"upsert": [NEW_VM]}})
    result = lab.vr("apply", payload, check=False, env={"VR_FAULT_ENOSPC": "commit"})
    assert result.returncode == 4 and "commit failed for router: no space left on" in result.stderr
    assert "Traceback" not in result.stderr
    assert live_files(lab) == before and status(lab)["generation"] == 1
    assert lab.resolve(lab.ns("g1"), "newvm.cloud.internal", "10.1.1.1") == []
    events = [json.loads(line) for line in lab.vr("events", "--resource", "router").stdout.splitlines()]
    assert events[-1]["outcome"] == "rolled-back" and "no space left" in events[-1]["message"]


def test_a_stored_document_that_does_not_load_is_reported_and_replaced(tmp_path):
    with example_lab(guests=("g1",)) as lab:
        stored = json.loads(lab.settings.document_path.read_bytes())
        # What a release with tighter limits would find (or a router wedged before this fix).
        stored["routes"] = stored["routes"] * 5000
        lab.settings.document_path.write_text(json.dumps(stored))
        one_vm = lab.vr("apply", write_payload(tmp_path, {"generation": 2, "dhcp_entries": {"upsert": [NEW_VM]}}),
                        check=False)  # fmt: skip
        assert one_vm.returncode == 4 and "Traceback" not in one_vm.stderr
        assert "the stored document cannot be loaded (routes:" in one_vm.stderr
        assert "push a whole document" in one_vm.stderr
        report = lab.vr("status", "--json", check=False)
        assert "Traceback" not in report.stderr
        assert "cannot be loaded" in json.loads(report.stdout)["document_error"]
        stale = lab.vr("apply", "-", input=json.dumps(EXAMPLE), check=False)
        assert stale.returncode == 3  # the unreadable document was at generation 1: still newer needed
        assert lab.vr("apply", "-", input=json.dumps({**EXAMPLE, "generation": 2})).returncode == 0
        now = status(lab)
        assert now["generation"] == 2 and now["healthy"] and not now.get("document_error")
        assert lab.resolve(lab.ns("g1"), "db1.cloud.internal", "10.1.1.1") == ["10.1.2.10"]


def test_apply_prints_the_warnings_it_accepted(lab, tmp_path):
    _, pair = make_ca_and_certificate(tmp_path, "www.example.test", days=-1)  # expired yesterday
    payload = {"generation": 2, "load_balancer": {"rules": [{
        "id": "tls", "public_ip": "192.0.2.10", "public_port": 443, "private_port": 80, "protocol": "https",
        "members": [{"ip": "10.1.1.10"}], "tls": {"certificates": [pair]}}]}}  # fmt: skip
    result = lab.vr("apply", write_payload(tmp_path, payload))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("vr: warning: ")]
    assert warnings and "load_balancer.rules[0].tls.certificates[0]" in warnings[0] and "expired" in warnings[0]


def test_damaged_state_files_never_stop_a_command(lab, tmp_path):
    """A journal, report or log that does not read (disk damage, a careless hand): every
    command still answers with a documented code and the router keeps serving."""
    state, run, log = lab.settings.state_dir, lab.settings.run_dir, lab.settings.log_dir
    one_vm = write_payload(tmp_path, {"generation": 2, "dhcp_entries": {"upsert": [NEW_VM]}})
    for path in (state / "last_apply.json", run / "health.json", state / "patch.json"):
        for damage in (b"garbage", b"", b"[1, 2]", b'{"time": "x", "duration_ms": "y", "last": "z"}'):
            path.write_bytes(damage)
            for args in (["status"], ["status", "--json"], ["patch", "status"], ["events"]):
                result = lab.vr(*args, check=False)
                assert "Traceback" not in result.stderr and result.returncode in (0, 1), (path.name, damage, args)
    (log / "events.jsonl").write_bytes(b'\xff\xfe not text\n[1, 2]\n{"resource": 5}\n')
    assert lab.vr("events", "--resource", "router").returncode == 0
    # A journal that does not read: everything is re-rendered from last-known-good.
    (lab.settings.config_dir / "dnsmasq" / "dnsmasq.conf").write_text("# half-applied\n")
    lab.settings.journal_path.write_bytes(b'{"txid": "../../x", "generation": 1, "changes": {"dnsmasq": ["../x"]}}')
    result = lab.vr("status", "--json", check=False)
    assert "Traceback" not in result.stderr
    assert not lab.settings.journal_path.exists() and list(state.glob("journal.unreadable.*.json"))
    assert "# half-applied" not in (lab.settings.config_dir / "dnsmasq" / "dnsmasq.conf").read_text()
    assert lab.vr("apply", one_vm).returncode == 0
    assert lab.resolve(lab.ns("g1"), "newvm.cloud.internal", "10.1.1.1") == ["10.1.1.55"]
    assert status(lab)["healthy"]
