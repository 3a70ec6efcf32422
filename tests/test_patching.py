"""Live-patch bundles without a network: building, signing, every refusal, and the release
switch on a router root with nothing configured yet (so no namespace is needed). The `vr`
command runs as a real process, as an operator would run it."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from tests.conftest import PATCH_EXAMPLES, REPO_DIR, make_source
from vr import __version__
from vr.foundation.lock import router_lock
from vr.foundation.settings import Settings
from vr.foundation.version import is_version, version_key
from vr.patching import bundles as patching
from vr.patching.releases import Releases

EXAMPLE = PATCH_EXAMPLES / "0.1.1"


def vr(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vr", "--root", str(root), *args], capture_output=True, text=True,
                          check=False, timeout=120, cwd=REPO_DIR, env={**os.environ, **(env or {})})  # fmt: skip


@pytest.fixture
def router(tmp_path, workshop) -> Path:
    """A router root that trusts the publisher."""
    root = tmp_path / "router"
    keys = Settings.under_root(root).trusted_keys_dir
    keys.mkdir(parents=True)
    shutil.copy(workshop["pub"], keys / "publisher.pub")
    return root


def releases_state(root: Path) -> dict:
    releases = Settings.under_root(root).releases_dir
    if not releases.exists():
        return {}
    return {p.name: (os.readlink(p) if p.is_symlink() else "dir") for p in releases.iterdir()}


def status_release(root: Path) -> str:
    return json.loads(vr(root, "status", "--json").stdout)["release"]


def rewrite(bundle: Path, out: Path, change) -> Path:
    """A copy of bundle with change(name, data, info) -> list of (TarInfo, data) applied per member."""
    with tarfile.open(bundle) as source, tarfile.open(out, "w:gz") as target:
        for member in source:
            data = source.extractfile(member).read() if member.isfile() else b""
            for info, content in change(member.name, data, member):
                info.size = len(content) if info.isfile() else 0
                target.addfile(info, io.BytesIO(content) if info.isfile() else None)
    return out


def signed_manifest(workshop, edit) -> tuple[bytes, bytes]:
    """The example's manifest edited, and signed by the publisher: refusals past the signature."""
    with tarfile.open(workshop["bundle"]) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
    edit(manifest)
    data = json.dumps(manifest).encode()
    return data, patching._load_private_key(workshop["key"]).sign(data)


# --------------------------------------------------------------------------- the happy path
def test_apply_switches_every_vr_command_to_the_new_release_and_rollback_returns(router, workshop):
    assert status_release(router) == __version__
    result = vr(router, "patch", "apply", str(workshop["bundle"]), "--json")
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert (outcome["from"], outcome["to"], outcome["outcome"]) == (__version__, "0.1.1", "ok")
    assert releases_state(router) == {__version__: "dir", "0.1.1": "dir", "current": "0.1.1"}
    # The installed package's `vr` now runs the release's code: it reports the release's version.
    assert status_release(router) == "0.1.1"
    new_code = Settings.under_root(router).releases_dir / "0.1.1" / "vr" / "services" / "haproxy.py"
    assert "X-Vr-Release" not in new_code.read_text() and "running_version()" in new_code.read_text()
    listing = vr(router, "patch", "list").stdout
    assert "* 0.1.1" in listing and f"  {__version__}" in listing
    status = json.loads(vr(router, "patch", "status", "--json").stdout)
    assert (status["current"], status["previous"], status["last"]["outcome"]) == ("0.1.1", __version__, "ok")

    result = vr(router, "patch", "rollback")
    assert result.returncode == 0, result.stderr
    assert f"rollback 0.1.1 -> {__version__}: ok" in result.stdout
    assert releases_state(router)["current"] == __version__ and status_release(router) == __version__
    status = json.loads(vr(router, "patch", "status", "--json").stdout)
    assert (status["current"], status["previous"]) == (__version__, "0.1.1")
    steps = [json.loads(line)["outcome"] for line in vr(router, "events", "--resource", "release").stdout.splitlines()]
    assert steps[:5] == ["verified", "unpacked", "self-tested", "adopted", "switched"]
    assert steps.count("committed") == 2 and "post-hook" in steps and "switched" in steps

    # Applying it again uses the installed release (checked, not unpacked twice).
    assert vr(router, "patch", "apply", str(workshop["bundle"])).returncode == 0
    assert status_release(router) == "0.1.1"
    again = vr(router, "patch", "apply", str(workshop["bundle"]))
    assert again.returncode == 2 and "release 0.1.1 is already running" in again.stderr


def test_a_bundle_is_fetched_by_url(router, workshop):
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(workshop["dir"]), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        missing = vr(router, "patch", "apply", f"{base}/nothing.tar.gz")
        assert missing.returncode == 2 and "HTTP 404" in missing.stderr
        assert releases_state(router) == {}
        result = vr(router, "patch", "apply", f"{base}/{workshop['bundle'].name}")
        assert result.returncode == 0, result.stderr
        assert status_release(router) == "0.1.1"
        assert not list((Settings.under_root(router).state_dir / "incoming").iterdir())
    finally:
        server.shutdown()


# --------------------------------------------------------------------------- refusals: nothing changes
def _untrusted(workshop, tmp):
    bundle = tmp / "stranger.tar.gz"
    patching.build(workshop["source"], "0.1.1", workshop["stranger"], bundle)
    return bundle


def _altered_file(workshop, tmp):
    def change(name, data, info):
        return [(info, data + b"# one more line\n" if name == "payload/vr/services/haproxy.py" else data)]

    return rewrite(workshop["bundle"], tmp / "altered.tar.gz", change)


def _altered_same_size(workshop, tmp):
    def change(name, data, info):
        return [(info, data.replace(b"import", b"IMPORT", 1) if name == "payload/vr/cli.py" else data)]

    return rewrite(workshop["bundle"], tmp / "same-size.tar.gz", change)


def _manifest_edited(workshop, tmp):
    def change(name, data, info):
        return [(info, data.replace(b'"0.1.0"', b'"0.0.9"') if name == "manifest.json" else data)]

    return rewrite(workshop["bundle"], tmp / "edited.tar.gz", change)


def _member(name: str, kind=tarfile.REGTYPE, link: str = ""):
    def make(workshop, tmp):
        def change(member_name, data, info):
            out = [(info, data)]
            if member_name == "manifest.sig":
                extra = tarfile.TarInfo(name)
                extra.type, extra.linkname = kind, link
                out.append((extra, b"#!/bin/sh\necho owned\n"))
            return out

        return rewrite(workshop["bundle"], tmp / "member.tar.gz", change)

    return make


def _signed(edit, payload_change=None):
    def make(workshop, tmp):
        manifest, signature = signed_manifest(workshop, edit)

        def change(name, data, info):
            if name == "manifest.json":
                return [(info, manifest)]
            if name == "manifest.sig":
                return [(info, signature)]
            return payload_change(name, data, info) if payload_change else [(info, data)]

        return rewrite(workshop["bundle"], tmp / "signed.tar.gz", change)

    return make


def _escaping_manifest(manifest):
    manifest["files"][0]["path"] = "../../etc/cron.d/x"


def _not_a_tar(workshop, tmp):
    path = tmp / "junk.tar.gz"
    path.write_bytes(b"this is not a tar file\n" * 10)
    return path


REFUSALS = {
    "signed by a stranger": (_untrusted, "signature is not from a trusted key"),
    "file altered": (_altered_file, "the manifest says"),
    "file altered, same size": (_altered_same_size, "SHA-256 does not match the manifest"),
    "manifest altered after signing": (_manifest_edited, "signature is not from a trusted key"),
    "path with ..": (_member("payload/../../etc/evil"), "escapes the release tree"),
    "absolute path": (_member("/etc/evil"), "outside payload/"),
    "link out of the tree": (
        _member("payload/vr/evil", tarfile.SYMTYPE, "../../../../etc/shadow"),
        "points out of the tree",
    ),
    "hard link": (_member("payload/vr/evil", tarfile.LNKTYPE, "payload/vr/cli.py"), "links are not allowed"),
    "device": (_member("payload/vr/evil", tarfile.CHRTYPE), "not a plain file or directory"),
    "file not in the manifest": (_member("payload/vr/extra.py"), "in the bundle but not in the manifest"),
    "manifest path escaping": (_signed(_escaping_manifest), "escapes the release tree"),
    "wrong base version": (
        _signed(lambda m: m.update(base_versions=["0.0.9"])),
        f"applies to base versions 0.0.9; this router runs {__version__}",
    ),
    "bad version": (_signed(lambda m: m.update(version="1.0")), "manifest.version: must be a semantic version"),
    "setuid mode": (_signed(lambda m: m["files"][0].update(mode="4755")), "mode: must be 0644 or 0755"),
    "unknown service": (_signed(lambda m: m.update(services=["sshd"])), "unknown service 'sshd'"),
    "not a tar": (_not_a_tar, "not a readable bundle"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_bad_bundle_is_refused_with_its_reason_and_nothing_changes(router, workshop, tmp_path, case):
    make, reason = REFUSALS[case]
    bundle = make(workshop, tmp_path)
    before = releases_state(router)
    result = vr(router, "patch", "apply", str(bundle))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert reason in result.stderr
    assert releases_state(router) == before
    assert status_release(router) == __version__
    refused = [json.loads(line) for line in vr(router, "events", "--resource", "release").stdout.splitlines()]
    assert refused[-1]["outcome"] == "refused"


def test_no_trusted_key_refuses_every_bundle(tmp_path, workshop):
    result = vr(tmp_path / "router", "patch", "apply", str(workshop["bundle"]))
    assert result.returncode == 2 and "no trusted key in" in result.stderr
    assert releases_state(tmp_path / "router") == {}


def test_a_failing_pre_hook_refuses_the_patch(router, workshop, tmp_path):
    source = make_source(EXAMPLE, tmp_path / "src")
    (source / "scripts" / "pre.sh").write_text("#!/bin/sh\necho 'not enough disk' >&2\nexit 3\n")
    (source / "scripts" / "pre.sh").chmod(0o755)
    described = json.loads((source / "patch.json").read_text())
    described["hooks"]["pre"] = {"path": "scripts/pre.sh", "timeout_s": 5}
    (source / "patch.json").write_text(json.dumps(described))
    patching.build(source, "0.1.1", workshop["key"], tmp_path / "hooked.tar.gz")
    result = vr(router, "patch", "apply", str(tmp_path / "hooked.tar.gz"))
    assert result.returncode == 2 and "pre hook scripts/pre.sh exited 3: not enough disk" in result.stderr
    assert releases_state(router) == {}  # not even the unpacked release is left
    assert status_release(router) == __version__


def test_build_refuses_a_source_that_is_not_a_release(workshop, tmp_path):
    (tmp_path / "src" / "configs").mkdir(parents=True)
    (tmp_path / "src" / "configs" / "haproxy.cfg.j2").write_text("global\n")
    result = vr(tmp_path, "patch", "build", str(tmp_path / "src"), "--version", "0.1.1", "--key",
                str(workshop["key"]), "--base", "0.1.0", "-o", str(tmp_path / "b.tar.gz"))  # fmt: skip
    assert result.returncode == 2 and "vr/__init__.py missing" in result.stderr
    assert not (tmp_path / "b.tar.gz").exists()
    result = vr(tmp_path, "patch", "build", str(workshop["source"]), "--key", str(workshop["key"]))
    assert result.returncode == 2 and "patch build needs --version, --out" in result.stderr


def test_a_second_patch_while_one_runs_is_refused(router, workshop):
    with router_lock(Settings.under_root(router)):
        result = vr(router, "patch", "apply", str(workshop["bundle"]))
    assert result.returncode == 75 and "another apply or patch is running" in result.stderr
    assert releases_state(router) == {}


# --------------------------------------------------------------------------- crashes
@pytest.mark.parametrize("step", ["patch-journaled", "patch-switched", "patch-gated"])
def test_a_patch_killed_half_way_is_rolled_back_at_the_next_start(router, workshop, step):
    killed = vr(router, "patch", "apply", str(workshop["bundle"]), env={"VR_FAULT_AT": step})
    assert killed.returncode == -9
    assert json.loads(vr(router, "patch", "status", "--json").stdout)["interrupted"] is True
    recovered = vr(router, "recover")
    assert recovered.returncode == 0, recovered.stderr
    assert releases_state(router)["current"] == __version__ and status_release(router) == __version__
    status = json.loads(vr(router, "patch", "status", "--json").stdout)
    assert status["interrupted"] is False and status["last"]["outcome"] == "rolled-back"
    assert "interrupted" in status["last"]["message"]
    # And the patch can be applied again.
    assert vr(router, "patch", "apply", str(workshop["bundle"])).returncode == 0
    assert status_release(router) == "0.1.1"


# --------------------------------------------------------------------------- small parts
def test_versions_and_paths():
    assert all(is_version(v) for v in ("0.1.0", "1.20.3", "2.0.0-rc.1", "2.0.0+build.7"))
    assert not any(is_version(v) for v in ("1.0", "01.0.0", "1.0.0-", "1.0.0-a..b", "../1.0.0", "1.0.0\n"))
    ordered = ["0.9.0", "1.0.0-alpha", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.10.0"]
    shuffled = [ordered[i] for i in (5, 2, 0, 4, 1, 3)]
    assert sorted(shuffled, key=version_key) == ordered
    assert patching.path_problem("vr/cli.py") is None
    for bad in ("", "/etc/x", "a/../b", "a//b", "./a", "a\nb", "manifest.json", "a\\b"):
        assert patching.path_problem(bad) is not None, bad


def test_the_switch_is_one_rename(tmp_path):
    settings = Settings.under_root(tmp_path)
    releases = Releases(settings)
    for version in ("1.0.0", "1.1.0"):
        (releases.path(version) / "vr").mkdir(parents=True)
        (releases.path(version) / "vr" / "__init__.py").write_text("")
        (releases.path(version) / "manifest.json").write_text(json.dumps({"version": version}))
    releases.switch("1.0.0")
    inode = os.lstat(releases.current_link).st_ino
    releases.switch("1.1.0")
    assert releases.current() == "1.1.0" and os.lstat(releases.current_link).st_ino != inode
    assert releases.installed() == ["1.0.0", "1.1.0"]
    assert sorted(p.name for p in releases.dir.iterdir()) == ["1.0.0", "1.1.0", "current"]
    with pytest.raises(FileNotFoundError):
        releases.switch("2.0.0")


def test_the_manifest_lists_every_file_with_its_hash(workshop):
    with tarfile.open(workshop["bundle"]) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
        for entry in manifest["files"]:
            data = tar.extractfile("payload/" + entry["path"]).read()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["size"]
    assert manifest["version"] == "0.1.1" and manifest["base_versions"] == ["0.1.0"]
    assert manifest["services"] == ["haproxy"]
    assert manifest["hooks"]["post"] == {"path": "scripts/post-apply.sh", "timeout_s": 30}
    assert not any("__pycache__" in f["path"] or f["path"] == "patch.json" for f in manifest["files"])


# --------------------------------------------------------------------------- hardening (issue 17)
ZEROS = b"\0" * (1 << 20)


def _tar_entry(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    return info.tobuf(tarfile.PAX_FORMAT) + data + b"\0" * (-len(data) % 512)


def bomb(workshop, tmp: Path, mib: int, key: Path | None = None, name: str = "bomb.tar.gz") -> Path:
    """The example bundle with one more file, vr/bomb.bin: MIB MiB of zeros, listed in a manifest
    signed by KEY (the publisher's by default). Built from concatenated gzip members, so a GiB
    of zeros costs about a MB of bundle: what a decompression bomb looks like."""
    with tarfile.open(workshop["bundle"]) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
        payload = [(m.name, tar.extractfile(m).read()) for m in tar if m.name.startswith("payload/")]
    digest = hashlib.sha256()
    for _ in range(mib):
        digest.update(ZEROS)
    manifest["files"].append({"path": "vr/bomb.bin", "sha256": digest.hexdigest(), "size": mib << 20, "mode": "0644"})
    data = json.dumps(manifest).encode()
    signature = patching._load_private_key(key or workshop["key"]).sign(data)
    head = _tar_entry("manifest.json", data) + _tar_entry("manifest.sig", signature)
    head += b"".join(_tar_entry(n, d) for n, d in payload)
    info = tarfile.TarInfo("payload/vr/bomb.bin")
    info.size = mib << 20
    head += info.tobuf(tarfile.PAX_FORMAT)
    import gzip

    out = tmp / name
    out.write_bytes(gzip.compress(head, mtime=0) + gzip.compress(ZEROS, mtime=0) * mib
                    + gzip.compress(b"\0" * 10240, mtime=0))  # fmt: skip
    return out


def in_small_filesystem(router: Path, bundle: Path, options: str) -> subprocess.CompletedProcess:
    """`vr patch apply` with the router's releases dir on a small tmpfs, mounted in a mount
    namespace of its own (the host's mount table never sees it); then what the dir holds."""
    releases = Settings.under_root(router).releases_dir
    releases.mkdir(parents=True, exist_ok=True)
    script = ('mount -t tmpfs -o "$2" vrh1-tmpfs "$1" || exit 99; shift 2; "$@"; rc=$?; '
              'echo "left: $(ls -A "$0")"; exit $rc')  # fmt: skip
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(releases),
                           str(releases), options, sys.executable, "-m", "vr", "--root", str(router), "patch",
                           "apply", str(bundle)],
                          capture_output=True, text=True, check=False, timeout=120, cwd=REPO_DIR)  # fmt: skip


def test_a_bundle_that_unpacks_beyond_the_cap_is_refused_before_anything_is_written(router, workshop, tmp_path):
    bundle = bomb(workshop, tmp_path, 1024)  # a GiB of zeros in a bundle of about a MB
    assert bundle.stat().st_size < 2 << 20
    result = vr(router, "patch", "apply", str(bundle))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "unpacks to" in result.stderr and "more than the" in result.stderr and "Traceback" not in result.stderr
    assert releases_state(router) == {} and status_release(router) == __version__


def test_a_bundle_bigger_than_the_free_space_is_refused(router, workshop, tmp_path):
    result = in_small_filesystem(router, bomb(workshop, tmp_path, 32), "size=16m")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "free" in result.stderr and "Traceback" not in result.stderr
    assert "left: \n" in result.stdout  # nothing was written
    assert status_release(router) == __version__


def test_running_out_of_space_while_unpacking_is_a_clean_refusal(router, workshop, tmp_path):
    # Bytes enough, inodes not: the write itself hits ENOSPC.
    result = in_small_filesystem(router, workshop["bundle"], "size=64m,nr_inodes=16")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "no space left" in result.stderr and "Traceback" not in result.stderr
    assert "left: \n" in result.stdout  # the half-written release was removed
    assert status_release(router) == __version__


def test_an_untrusted_bundle_is_refused_on_its_signature_before_its_payload_is_read(router, workshop, tmp_path):
    # A stranger's bomb, cut short: its payload is never read, so neither its size nor its
    # truncation is what refuses it.
    bundle = bomb(workshop, tmp_path, 64, key=workshop["stranger"])
    bundle.write_bytes(bundle.read_bytes()[:-100])
    result = vr(router, "patch", "apply", str(bundle))
    assert result.returncode == 2 and "signature is not from a trusted key" in result.stderr, result.stderr
    assert releases_state(router) == {}


def _manifest_last(workshop, tmp):
    with tarfile.open(workshop["bundle"]) as source:
        members = [(m, source.extractfile(m).read()) for m in source]
    with tarfile.open(tmp / "late.tar.gz", "w:gz") as target:
        for info, data in members[2:] + members[:2]:
            target.addfile(info, io.BytesIO(data))
    return tmp / "late.tar.gz"


def _truncated(workshop, tmp):
    (tmp / "truncated.tar.gz").write_bytes(workshop["bundle"].read_bytes()[:-100])
    return tmp / "truncated.tar.gz"


def _bad_crc(workshop, tmp):
    data = bytearray(workshop["bundle"].read_bytes())
    data[-8] ^= 0xFF  # the gzip trailer's CRC-32
    (tmp / "crc.tar.gz").write_bytes(bytes(data))
    return tmp / "crc.tar.gz"


def _appended(workshop, tmp):
    (tmp / "twice.tar.gz").write_bytes(workshop["bundle"].read_bytes() * 2)
    return tmp / "twice.tar.gz"


HARDENING_REFUSALS = {
    "manifest not first": (_manifest_last, "must start with manifest.json and manifest.sig"),
    "downgrade": (_signed(lambda m: m.update(version="0.0.1")),
                  f"0.0.1 is older than the running release {__version__}: a downgrade needs --allow-downgrade"),
    "truncated by 100 bytes": (_truncated, "is truncated or corrupt"),
    "gzip CRC wrong": (_bad_crc, "is truncated or corrupt"),
    "data after the end": (_appended, "has data after the end of the archive"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HARDENING_REFUSALS))
def test_a_reordered_truncated_corrupt_or_older_bundle_is_refused(router, workshop, tmp_path, case):
    make, reason = HARDENING_REFUSALS[case]
    bundle = make(workshop, tmp_path)
    result = vr(router, "patch", "apply", str(bundle))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert reason in result.stderr and "Traceback" not in result.stderr
    assert releases_state(router) == {} and status_release(router) == __version__
    refused = [json.loads(line) for line in vr(router, "events", "--resource", "release").stdout.splitlines()]
    assert refused[-1]["outcome"] == "refused"


def test_a_downgrade_is_applied_when_the_operator_asks_for_it(router, workshop, tmp_path):
    bundle = _signed(lambda m: m.update(version="0.0.1"))(workshop, tmp_path)
    result = vr(router, "patch", "apply", str(bundle), "--allow-downgrade")
    assert result.returncode == 0, result.stderr
    assert status_release(router) == "0.0.1"


def test_a_second_rollback_changes_nothing_and_says_so(router, workshop):
    assert vr(router, "patch", "apply", str(workshop["bundle"])).returncode == 0
    assert vr(router, "patch", "rollback").returncode == 0
    assert status_release(router) == __version__
    again = vr(router, "patch", "rollback")
    assert again.returncode == 0, again.stderr
    assert f"nothing to roll back: {__version__} is already the result of a rollback from 0.1.1" in again.stdout
    assert releases_state(router)["current"] == __version__ and status_release(router) == __version__
    status = json.loads(vr(router, "patch", "status", "--json").stdout)
    assert status["last"]["action"] == "rollback" and status["last"]["to"] == __version__
    assert status["rollback_to"] is None
    # Going forward again is an apply.
    assert vr(router, "patch", "apply", str(workshop["bundle"])).returncode == 0
    assert status_release(router) == "0.1.1"


def test_a_rolled_back_release_is_removed_so_its_fixed_bundle_applies(router, workshop, tmp_path):
    assert vr(router, "patch", "apply", str(workshop["bundle"])).returncode == 0
    running = vr(router, "patch", "remove", "0.1.1")
    assert running.returncode == 2 and "release 0.1.1 is running" in running.stderr
    previous = vr(router, "patch", "remove", __version__)
    assert previous.returncode == 2 and "rollback would return to" in previous.stderr and "--force" in previous.stderr
    assert vr(router, "patch", "rollback").returncode == 0

    fixed = tmp_path / "vr-0.1.1-fixed.tar.gz"
    patching.build(workshop["source"], "0.1.1", workshop["key"], fixed, description="0.1.1, fixed")
    blocked = vr(router, "patch", "apply", str(fixed))
    assert blocked.returncode == 2 and "vr patch remove 0.1.1" in blocked.stderr
    removed = vr(router, "patch", "remove", "0.1.1")
    assert removed.returncode == 0, removed.stderr
    assert "removed release 0.1.1" in removed.stdout
    assert releases_state(router) == {__version__: "dir", "current": __version__}
    assert "0.1.1" not in vr(router, "patch", "list").stdout
    unknown = vr(router, "patch", "remove", "0.1.1")
    assert unknown.returncode == 2 and "release 0.1.1 is not installed" in unknown.stderr

    assert vr(router, "patch", "apply", str(fixed)).returncode == 0
    assert status_release(router) == "0.1.1"
    assert "0.1.1, fixed" in vr(router, "patch", "list").stdout


def test_old_releases_are_pruned_after_a_successful_patch(router, workshop):
    releases = Releases(Settings.under_root(router))
    for version in ("0.0.1", "0.0.2", "0.0.3", "0.0.4", "0.0.5"):
        (releases.path(version) / "vr").mkdir(parents=True)
        (releases.path(version) / "vr" / "__init__.py").write_text("")
        (releases.path(version) / "manifest.json").write_text(json.dumps({"version": version}))
    assert vr(router, "patch", "apply", str(workshop["bundle"])).returncode == 0
    # The running one, its predecessor and the newest others: five in all.
    assert releases.installed() == ["0.0.3", "0.0.4", "0.0.5", __version__, "0.1.1"]
    assert releases.current() == "0.1.1"
    steps = [json.loads(line) for line in vr(router, "events", "--resource", "release").stdout.splitlines()]
    assert [e["resource"] for e in steps if e["outcome"] == "removed"] == ["release:0.0.1", "release:0.0.2"]
