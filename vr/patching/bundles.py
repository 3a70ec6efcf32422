"""Live patches: signed release bundles, switched in with zero downtime, rolled back by themselves.

A bundle is a gzip-compressed tar file (format: patches/README.md), in this order:

    manifest.json        version, base versions, description, services, hooks, files (sha256, size, mode)
    manifest.sig         ed25519 signature of manifest.json's exact bytes (64 bytes)
    payload/<path>       the release tree: vr/ (the package), configs/ (templates), scripts/

It is read as a stream, front to back: the signature is checked before any payload is read,
nothing more is decompressed than the signed manifest declares (bounded, and checked against
the free space), and the gzip trailer is read and checked (a cut bundle is refused).

Apply: verify -> unpack beside the running release -> self-test the new release against the
live document (its own code imports, renders, runs the daemons' checkers) -> pre hook ->
switch `current` -> restart vr's own processes (the monitor) -> re-render and reload only what
changed, health-gated (the new release's own `vr reconcile`) -> post hook -> record.
A failure after the switch switches back the same way, raises an alert, and says why.

Releases are bounded: after a successful switch the oldest go (KEEP_RELEASES stay), and
`vr patch remove` deletes one by hand. The router's lock is held throughout: one apply or
patch at a time. A journal written before the switch lets the next start (or `vr recover`)
roll back a patch a crash interrupted.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import posixpath
import shutil
import signal
import subprocess
import tarfile
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from vr import __version__
from vr.foundation.errors import Busy, VrError
from vr.foundation.events import EventLog, event
from vr.foundation.files import fault_point, fsync_dir, read_json, read_report, write_atomic, write_json_atomic
from vr.foundation.lock import flock_holder, holder, inheritable_lock_env, router_lock
from vr.foundation.settings import Settings
from vr.foundation.version import MANIFEST, code_dir, is_version, version_key
from vr.patching.releases import Releases

FORMAT = 1
SIGNATURE = "manifest.sig"
PAYLOAD = "payload/"
PATCH_SOURCE = "patch.json"  # a bundle source's own description (not part of the release)
MAX_BUNDLE_BYTES = 256 << 20
MAX_FILES = 20_000
MAX_MANIFEST_BYTES = 4 << 20
MAX_UNPACKED_BYTES = 1 << 30  # a whole release of vr is about a MB: a GiB is a bomb, whatever the signature
FREE_SPACE_RESERVE_BYTES = 8 << 20  # an unpacked release leaves this much free beside it
HEAD_BUDGET_BYTES = MAX_MANIFEST_BYTES + (64 << 10)  # read before the signature is checked, at most
MEMBER_OVERHEAD_BYTES = 4 << 10  # a member's tar header, pax header and padding, at most
TRAILER_BUDGET_BYTES = 1 << 20  # the end-of-archive blocks and record padding
KEEP_RELEASES = 5  # installed releases kept after a patch: the running one, its predecessor, the newest others
MAX_HOOK_TIMEOUT_S = 600
FETCH_DEADLINE_S = 120.0  # a whole download, however slowly its bytes come
PATCH_STATE_FIELDS = {"current": str, "previous": (str, type(None)), "via": str, "last": dict}
SERVICES = ("network", "nftables", "supervisor", "dnsmasq", "radvd", "haproxy", "strongswan", "monitor", "agent",
            "guestdata")
CONTROL_PLANE = ("monitor",)  # vr's own processes under supervisord: restarted on a switch, never the daemons
SELFTEST_TIMEOUT_S = 120
RECONCILE_TIMEOUT_S = 180
CONTROL_PLANE_DEADLINE_S = 15.0
DAEMON_APPLY_WAIT_S = 60.0  # a patch waits this long for the daemon's apply in progress
REQUIRED = ("vr/__init__.py", "vr/__main__.py", "vr/cli.py")
IGNORED_NAMES = ("__pycache__", ".pytest_cache", ".ruff_cache")


class PatchRefused(VrError):
    """Nothing was changed: the bundle or the request was refused before the switch."""

    exit_code = 2


class PatchFailed(VrError):
    """The new release was switched in, failed, and the router was switched back."""

    exit_code = 4


# ------------------------------------------------------------------------------- keys
def keygen(prefix: Path) -> tuple[Path, Path]:
    """PREFIX.key (private, mode 600: keep it off routers) and PREFIX.pub (copy it into each
    router's trusted-keys dir)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path, public_path = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise PatchRefused(f"{path} exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(private_path, private, mode=0o600)
    write_atomic(public_path, public, mode=0o644)
    return private_path, public_path


def _load_private_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise PatchRefused(f"--key {path}: cannot load a private key ({error})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PatchRefused(f"--key {path}: not an ed25519 private key")
    return key


def trusted_keys(settings: Settings) -> list[tuple[str, object]]:
    """(file name, public key) for every *.pub in the trusted-keys dir that is an ed25519 key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    keys = []
    for path in sorted(settings.trusted_keys_dir.glob("*.pub")):
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(key, Ed25519PublicKey):
            keys.append((path.name, key))
    return keys


# ------------------------------------------------------------------------------- manifest
def validate_manifest(manifest: object) -> list[str]:
    """Every problem, each naming its field; empty when the manifest is good."""
    if not isinstance(manifest, dict):
        return ["manifest: must be a JSON object"]
    problems = []
    allowed = {"format", "version", "base_versions", "description", "services", "hooks", "files", "created"}
    problems += [f"manifest.{key}: unknown field" for key in sorted(set(manifest) - allowed)]
    if manifest.get("format") != FORMAT:
        problems.append(f"manifest.format: must be {FORMAT}")
    if not is_version(manifest.get("version")):
        problems.append("manifest.version: must be a semantic version (e.g. 1.4.2)")
    bases = manifest.get("base_versions")
    if not isinstance(bases, list) or not bases:
        problems.append("manifest.base_versions: must list the versions this patch applies to")
    else:
        problems += [f"manifest.base_versions[{i}]: not a semantic version" for i, b in enumerate(bases)
                     if not is_version(b)]  # fmt: skip
    if not isinstance(manifest.get("created", ""), str) or len(manifest.get("created", "")) > 64:
        problems.append("manifest.created: must be a timestamp text")
    description = manifest.get("description", "")
    if not isinstance(description, str) or len(description) > 2000:
        problems.append("manifest.description: must be text of at most 2000 characters")
    services = manifest.get("services")
    if not isinstance(services, list) or not all(isinstance(s, str) for s in services):
        problems.append("manifest.services: must list the services the patch may change (may be empty)")
    else:
        problems += [f"manifest.services[{i}]: unknown service {s!r} (known: {', '.join(SERVICES)})"
                     for i, s in enumerate(services) if s not in SERVICES]  # fmt: skip
    files = manifest.get("files")
    paths: set[str] = set()
    if not isinstance(files, list) or not files:
        problems.append("manifest.files: must list the release's files")
        files = []
    if len(files) > MAX_FILES:
        problems.append(f"manifest.files: more than {MAX_FILES} files")
        files = []
    for i, entry in enumerate(files):
        where = f"manifest.files[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"path", "sha256", "size", "mode"}:
            problems.append(f"{where}: must have exactly path, sha256, size and mode")
            continue
        reason = path_problem(entry["path"])
        if reason:
            problems.append(f"{where}.path: {reason}")
        elif entry["path"] in paths:
            problems.append(f"{where}.path: {entry['path']} listed twice")
        paths.add(entry["path"])
        sha = entry["sha256"]
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            problems.append(f"{where}.sha256: must be 64 lowercase hex digits")
        if not isinstance(entry["size"], int) or isinstance(entry["size"], bool) or entry["size"] < 0:
            problems.append(f"{where}.size: must be a byte count")
        if entry["mode"] not in ("0644", "0755"):
            problems.append(f"{where}.mode: must be 0644 or 0755")
    missing = [p for p in REQUIRED if p not in paths] if files else []
    problems += [f"manifest.files: {p} missing: a release holds the whole vr package" for p in missing]
    hooks = manifest.get("hooks", {})
    if not isinstance(hooks, dict) or set(hooks) - {"pre", "post"}:
        problems.append("manifest.hooks: may only have pre and post")
        hooks = {}
    for when, hook in hooks.items():
        where = f"manifest.hooks.{when}"
        if not isinstance(hook, dict) or set(hook) != {"path", "timeout_s"}:
            problems.append(f"{where}: must have exactly path and timeout_s")
            continue
        listed = next((f for f in files if isinstance(f, dict) and f.get("path") == hook["path"]), None)
        if listed is None:
            problems.append(f"{where}.path: {hook['path']!r} is not one of the bundle's files")
        elif listed.get("mode") != "0755":
            problems.append(f"{where}.path: {hook['path']} is not executable (mode 0755)")
        timeout = hook["timeout_s"]
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not 0 < timeout <= MAX_HOOK_TIMEOUT_S:
            problems.append(f"{where}.timeout_s: must be a number of seconds in (0, {MAX_HOOK_TIMEOUT_S}]")
    return problems


def path_problem(path: object) -> str | None:
    """Why a release-relative path is unsafe, or None: it must stay inside the release tree."""
    if not isinstance(path, str) or not path:
        return "must be a non-empty relative path"
    if path.startswith("/"):
        return f"{path!r} is absolute"
    if any(ord(c) < 32 or c in "\\\x7f" for c in path):
        return f"{path!r} holds a control character or backslash"
    parts = path.split("/")
    if ".." in parts:
        return f"{path!r} escapes the release tree (..)"
    if "" in parts or "." in parts or posixpath.normpath(path) != path:
        return f"{path!r} is not a normalised path"
    if parts[0] in (MANIFEST, SIGNATURE, "current") or len(path) > 255:
        return f"{path!r} is a reserved or too long name"
    return None


# ------------------------------------------------------------------------------- build
def build(source: Path, version: str, key_path: Path, output: Path, base_versions: list[str] | None = None,
          description: str | None = None, services: list[str] | None = None) -> dict:  # fmt: skip
    """Sign SOURCE (a release tree, with an optional patch.json: base_versions, description,
    services, hooks) as a bundle. The manifest is checked by the validator apply uses."""
    if not source.is_dir():
        raise PatchRefused(f"source {source} is not a directory")
    key = _load_private_key(key_path)
    described = read_json(source / PATCH_SOURCE) or {}
    if not isinstance(described, dict):
        raise PatchRefused(f"{source / PATCH_SOURCE}: must be a JSON object")
    contents = _tree_files(source)
    files = [_file_entry(relative, data, mode) for relative, (data, mode) in contents.items()]
    manifest = {
        "format": FORMAT,
        "version": version,
        "base_versions": base_versions or described.get("base_versions") or [],
        "description": description if description is not None else described.get("description", ""),
        "services": services if services is not None else described.get("services", []),
        "hooks": described.get("hooks", {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
    }
    problems = validate_manifest(manifest)
    if problems:
        raise PatchRefused("cannot build: " + "; ".join(problems))
    manifest_bytes = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, MANIFEST, manifest_bytes, 0o644)
        _add(tar, SIGNATURE, key.sign(manifest_bytes), 0o644)
        for entry in files:
            _add(tar, PAYLOAD + entry["path"], contents[entry["path"]][0], int(entry["mode"], 8))
    write_atomic(output, buffer.getvalue(), mode=0o644)
    return manifest


def _tree_files(root: Path) -> dict[str, tuple[bytes, str]]:
    """A release tree's files: {relative path: (content, mode)}; caches and patch.json left out."""
    files = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        parts = path.relative_to(root).parts
        if any(part in IGNORED_NAMES for part in parts) or relative == PATCH_SOURCE or path.suffix == ".pyc":
            continue
        if path.is_symlink():
            raise PatchRefused(f"{relative}: links are not allowed in a release")
        if path.is_file():
            files[relative] = (path.read_bytes(), "0755" if path.stat().st_mode & 0o100 else "0644")
    return files


def _file_entry(relative: str, data: bytes, mode: str) -> dict:
    return {"path": relative, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "mode": mode}


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------- verify
@dataclass
class Bundle:
    path: Path
    manifest: dict
    manifest_bytes: bytes
    signer: str

    @property
    def version(self) -> str:
        return self.manifest["version"]


def verify(path: Path, settings: Settings) -> Bundle:
    """One pass through the bundle, front to back: manifest.json and manifest.sig first, the
    signature checked before any other member is read (nothing unsigned is parsed further),
    then the manifest, its declared sizes against the cap and the free space, then every member
    against it, and the end, so that gzip checks its CRC and length. Raises PatchRefused."""
    try:
        size = path.stat().st_size
    except OSError as error:
        raise PatchRefused(f"cannot read bundle {path}: {error.strerror}") from None
    if size > MAX_BUNDLE_BYTES:
        raise PatchRefused(f"bundle is {size} bytes, more than the {MAX_BUNDLE_BYTES} allowed")
    with _BundleStream(path) as stream:
        manifest_bytes, signature = stream.head()
        signer = _check_signature(manifest_bytes, signature, settings)
        try:
            manifest = json.loads(manifest_bytes)
        except ValueError as error:
            raise PatchRefused(f"manifest.json is not valid JSON: {error}") from None
        problems = validate_manifest(manifest)
        if problems:
            raise PatchRefused("bad manifest: " + "; ".join(problems))
        declared = sum(entry["size"] for entry in manifest["files"])
        if declared > MAX_UNPACKED_BYTES:
            raise PatchRefused(f"release {manifest['version']} unpacks to {declared} bytes, more than the "
                               f"{MAX_UNPACKED_BYTES} a release may hold")  # fmt: skip
        _check_room(manifest, manifest_bytes, Releases(settings))
        stream.allow(manifest)
        listed = {f["path"]: f for f in manifest["files"]}
        found = set()
        for member in stream.members():
            if member.isdir():
                continue
            entry = _listed_entry(member, listed)
            digest = hashlib.sha256()
            for chunk in stream.chunks(member):
                digest.update(chunk)
            if digest.hexdigest() != entry["sha256"]:
                raise PatchRefused(f"{member.name}: SHA-256 does not match the manifest (file altered or corrupt)")
            found.add(entry["path"])
        missing = sorted(set(listed) - found)
        if missing:
            raise PatchRefused(f"files in the manifest but not in the bundle: {', '.join(missing[:5])}")
        stream.drain()
    return Bundle(path, manifest, manifest_bytes, signer)


def _listed_entry(member: tarfile.TarInfo, listed: dict[str, dict]) -> dict:
    """A payload file's manifest entry; its size is checked from the tar header, before its data."""
    entry = listed.get(member.name[len(PAYLOAD) :])
    if entry is None:
        raise PatchRefused(f"{member.name}: in the bundle but not in the manifest")
    if member.size != entry["size"]:
        raise PatchRefused(f"{member.name}: {member.size} bytes, the manifest says {entry['size']}")
    return entry


def _check_room(manifest: dict, manifest_bytes: bytes, releases: Releases) -> None:
    """The declared sizes, in the file system's blocks, against the free space of the releases
    dir, before anything is written (a reserve is kept: logs and state need room too)."""
    target = releases.path(manifest["version"])
    try:
        if (target / MANIFEST).read_bytes() == manifest_bytes:
            return  # installed already: nothing to write
    except OSError:
        pass
    where = releases.dir
    while not where.exists() and where != where.parent:
        where = where.parent
    stat = os.statvfs(where)
    block = stat.f_frsize or 4096
    directories = {posixpath.dirname(f["path"]) for f in manifest["files"]}
    directories |= {posixpath.dirname(d) for d in directories}  # one level up is enough for an estimate
    needed = sum(-(-f["size"] // block) * block for f in manifest["files"])
    needed += -(-len(manifest_bytes) // block) * block + block * (len(directories) + 1)
    free = stat.f_bavail * stat.f_frsize
    if needed + FREE_SPACE_RESERVE_BYTES > free:
        raise PatchRefused(f"release {manifest['version']} needs {needed} bytes in {releases.dir}, which has "
                           f"{free} free ({FREE_SPACE_RESERVE_BYTES} are kept in reserve)")  # fmt: skip


class _BundleStream:
    """A bundle read once, front to back, as a stream (tarfile's "r|": no seeking, no member
    reached before those ahead of it), through a budget: no more bytes come out of gzip than
    the manifest allows before its signature is checked, and than the declared sizes allow
    after. Read errors (gzip's CRC and length included) name the bundle as truncated or corrupt."""

    def __init__(self, path: Path):
        self.path, self.count, self.limit = path, 0, HEAD_BUDGET_BYTES
        try:
            self.raw = open(path, "rb")  # noqa: SIM115 (closed by __exit__)
        except OSError as error:
            raise PatchRefused(f"cannot read bundle {path}: {error.strerror}") from None
        try:
            if self.raw.read(2) != b"\x1f\x8b":
                raise PatchRefused(f"not a readable bundle: {path.name} is not a gzip-compressed tar file")
            self.raw.seek(0)
            self.gzip = gzip.GzipFile(fileobj=self.raw, mode="rb")
            self.tar = self._tar(tarfile.open, fileobj=self, mode="r|")
        except BaseException:
            self.raw.close()
            raise
        self.seen: set[str] = set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.raw.close()

    def _corrupt(self, error: BaseException) -> PatchRefused:
        return PatchRefused(f"not a readable bundle: {self.path.name} is truncated or corrupt ({error})")

    def _tar(self, call, *args, **kwargs):
        try:
            return call(*args, **kwargs)
        except tarfile.TarError as error:
            raise self._corrupt(error) from None

    def read(self, size: int = -1) -> bytes:
        """What tarfile reads through: the decompressed bundle, within the budget."""
        room = self.limit - self.count + 1
        try:
            data = self.gzip.read(room if size < 0 else min(size, room))
        except (EOFError, OSError, zlib.error) as error:
            raise self._corrupt(error) from None
        self.count += len(data)
        if self.count > self.limit:
            raise PatchRefused(f"bundle {self.path.name} holds more than its manifest declares "
                               f"(over {self.limit} bytes unpacked)")  # fmt: skip
        return data

    def head(self) -> tuple[bytes, bytes]:
        """manifest.json and manifest.sig: the first two members, or the bundle is refused."""
        found = []
        for name, limit in ((MANIFEST, MAX_MANIFEST_BYTES), (SIGNATURE, 1024)):
            member = self._tar(self.tar.next)
            if member is None or member.name != name or not member.isfile():
                where = "nothing" if member is None else repr(member.name)
                raise PatchRefused(f"a bundle must start with {MANIFEST} and {SIGNATURE}; found {where} "
                                   f"where {name} belongs")  # fmt: skip
            if member.size > limit:
                raise PatchRefused(f"{name} is {member.size} bytes, more than {limit}")
            found.append(b"".join(self.chunks(member)))
        self.seen = {MANIFEST, SIGNATURE}
        return found[0], found[1]

    def allow(self, manifest: dict) -> None:
        """After the signature: the declared sizes, plus the tar headers and padding around them."""
        self.limit = self.count + sum(f["size"] for f in manifest["files"]) + MEMBER_OVERHEAD_BYTES * (
            len(manifest["files"]) + 2) + TRAILER_BUDGET_BYTES  # fmt: skip

    def members(self):
        """The members after the head, each checked (paths, types, duplicates) from its header."""
        while (member := self._tar(self.tar.next)) is not None:
            reason = _member_problem(member, self.seen)
            if reason:
                raise PatchRefused(f"bundle member {member.name!r}: {reason}")
            self.seen.add(member.name.rstrip("/") if member.isdir() else member.name)
            yield member

    def chunks(self, member: tarfile.TarInfo):
        source = self._tar(self.tar.extractfile, member)
        while chunk := self._tar(source.read, 1 << 20):
            yield chunk

    def drain(self) -> None:
        """Read to the very end, so gzip checks its CRC-32 and length (a cut bundle fails here);
        past the end of the archive only its zero padding may follow."""
        while chunk := self.read(1 << 20):
            if chunk.count(0) != len(chunk):
                raise PatchRefused(f"not a readable bundle: {self.path.name} has data after the end of the archive")


def _member_problem(member: tarfile.TarInfo, seen: set[str]) -> str | None:
    """Why a member may not be in a bundle: only plain files and directories inside payload/."""
    name = member.name.rstrip("/") if member.isdir() else member.name
    if name in (MANIFEST, SIGNATURE):
        reason = None if member.isfile() else "must be a plain file"
    elif name.startswith(PAYLOAD):
        reason = path_problem(name[len(PAYLOAD) :])
    elif name == PAYLOAD.rstrip("/") and member.isdir():
        return None
    else:
        reason = "outside payload/ (a bundle holds manifest.json, manifest.sig and payload/)"
    if reason is None and (member.issym() or member.islnk()):
        target = posixpath.normpath(posixpath.join(posixpath.dirname(name), member.linkname))
        outside = member.linkname.startswith("/") or not target.startswith(PAYLOAD)
        reason = f"link to {member.linkname!r}{' points out of the tree' if outside else ''}: links are not allowed"
    elif reason is None and (member.issparse() or not (member.isfile() or member.isdir())):
        reason = "not a plain file or directory"
    if reason is None and name in seen:
        reason = "appears twice"
    if reason is None and len(seen) > MAX_FILES + 2:
        reason = f"more than {MAX_FILES} members"
    return reason


def _check_signature(manifest_bytes: bytes, signature: bytes, settings: Settings) -> str:
    from cryptography.exceptions import InvalidSignature

    keys = trusted_keys(settings)
    if not keys:
        raise PatchRefused(f"no trusted key in {settings.trusted_keys_dir}: add the publisher's .pub file there")
    for name, key in keys:
        try:
            key.verify(signature, manifest_bytes)
            return name
        except InvalidSignature:
            continue
    raise PatchRefused(f"signature is not from a trusted key ({len(keys)} key(s) in {settings.trusted_keys_dir})")


def unpack(bundle: Bundle, releases: Releases) -> Path:
    """The release dir for the bundle: written beside the others (temporary name, every file
    hashed as it is written, fsynced), then renamed into place. A release already installed
    with this very manifest is used as it is, after its files are checked. A write that fails
    (no space left above all) leaves nothing behind and refuses the patch."""
    target = releases.path(bundle.version)
    if target.exists():
        try:
            same = (target / MANIFEST).read_bytes() == bundle.manifest_bytes
        except OSError:
            same = False
        if not same:
            raise PatchRefused(f"release {bundle.version} is installed with other content; remove it first "
                               f"(vr patch remove {bundle.version})")  # fmt: skip
        _check_tree(target, bundle.manifest)
        return target
    incoming = releases.dir / f".incoming-{bundle.version}-{uuid.uuid4().hex[:8]}"
    try:
        releases.dir.mkdir(parents=True, exist_ok=True)
        incoming.mkdir(mode=0o755)
        listed = {f["path"]: f for f in bundle.manifest["files"]}
        with _BundleStream(bundle.path) as stream:
            if stream.head()[0] != bundle.manifest_bytes:
                raise PatchRefused(f"bundle {bundle.path.name} changed while it was being applied")
            stream.allow(bundle.manifest)
            for member in stream.members():
                if not member.isdir():
                    _extract(stream, member, incoming, _listed_entry(member, listed))
            stream.drain()
        missing = sorted(p for p in listed if not (incoming / p).is_file())
        if missing:
            raise PatchRefused(f"files in the manifest but not in the bundle: {', '.join(missing[:5])}")
        write_atomic(incoming / MANIFEST, bundle.manifest_bytes, mode=0o644)
        for directory in {p.parent for p in incoming.rglob("*")}:
            fsync_dir(directory)
        os.rename(incoming, target)
        fsync_dir(releases.dir)
    except OSError as error:
        shutil.rmtree(incoming, ignore_errors=True)
        raise _write_refusal(error, f"unpacking release {bundle.version}", releases.dir) from None
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    return target


def _write_refusal(error: OSError, doing: str, where: Path) -> PatchRefused:
    """A failed write before the switch: nothing changed, and the reason says so."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return PatchRefused(f"no space left in {where} while {doing}; nothing was changed")
    return PatchRefused(f"{doing} into {where} failed: {error.strerror or error}; nothing was changed")


def _extract(stream: _BundleStream, member: tarfile.TarInfo, root: Path, entry: dict) -> None:
    """Written by us, not by tarfile: directories we made, files created exclusively and not
    through links, so nothing in the archive can write outside root."""
    relative = entry["path"]
    parent = root
    for part in relative.split("/")[:-1]:
        parent = parent / part
        if not parent.is_dir():
            parent.mkdir(mode=0o755)
    digest, size = hashlib.sha256(), 0
    fd = os.open(root / relative, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, int(entry["mode"], 8))
    try:
        for chunk in stream.chunks(member):
            digest.update(chunk)
            size += len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        os.fchmod(fd, int(entry["mode"], 8))
        os.fsync(fd)
    finally:
        os.close(fd)
    if digest.hexdigest() != entry["sha256"] or size != entry["size"]:
        raise PatchRefused(f"payload/{relative}: SHA-256 does not match the manifest (file altered or corrupt)")


def _check_tree(root: Path, manifest: dict) -> None:
    for entry in manifest["files"]:
        try:
            data = (root / entry["path"]).read_bytes()
        except OSError:
            raise PatchRefused(f"installed release {manifest['version']}: {entry['path']} is missing") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise PatchRefused(f"installed release {manifest['version']}: {entry['path']} was altered")


# ------------------------------------------------------------------------------- fetch
def fetch(source: str, settings: Settings) -> Path:
    """A local path as it is; an http(s) URL downloaded (bounded) into the state dir."""
    if "://" not in source:
        return Path(source)
    import requests

    if not source.startswith(("http://", "https://")) or any(ord(c) < 33 for c in source):
        raise PatchRefused(f"bundle URL {source!r}: only http:// and https:// URLs")
    target = settings.state_dir / "incoming" / f"bundle-{uuid.uuid4().hex[:8]}.tar"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with requests.get(source, stream=True, timeout=(5, 30)) as response:
            if response.status_code != 200:
                raise PatchRefused(f"fetching {source}: HTTP {response.status_code}")
            size, deadline = 0, time.monotonic() + FETCH_DEADLINE_S
            with open(target, "wb") as out:
                for chunk in response.iter_content(1 << 16):
                    size += len(chunk)
                    if size > MAX_BUNDLE_BYTES:
                        raise PatchRefused(f"fetching {source}: more than {MAX_BUNDLE_BYTES} bytes")
                    if time.monotonic() > deadline:  # a server dripping bytes would hold the router's lock
                        raise PatchRefused(f"fetching {source}: not done within {FETCH_DEADLINE_S:.0f} s")
                    out.write(chunk)
    except requests.RequestException as error:
        target.unlink(missing_ok=True)
        raise PatchRefused(f"fetching {source}: {type(error).__name__}: {error}") from None
    except OSError as error:  # the download itself could not be written (a full disk)
        target.unlink(missing_ok=True)
        raise _write_refusal(error, f"downloading {source}", target.parent) from None
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target


# ------------------------------------------------------------------------------- the switch
class Patcher:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.releases = Releases(settings)
        self.events = EventLog(settings.events_path)
        settings.ensure_dirs()
        self.lock_fd: int | None = None

    @contextlib.contextmanager
    def _router_lock(self) -> Iterator[int]:
        """The router's lock. While the router's daemon holds it (an apply it runs for a push:
        seconds at most) the patch waits its turn, up to DAEMON_APPLY_WAIT_S; anyone else
        holding it (another patch, an operator's in-process apply) refuses the patch at once."""
        deadline, held = time.monotonic() + DAEMON_APPLY_WAIT_S, contextlib.ExitStack()
        while True:
            try:
                lock_fd = held.enter_context(router_lock(self.settings))
                break
            except Busy:
                daemon = flock_holder(self.settings.daemon_pid_path)
                if daemon is None or holder(self.settings) != daemon or time.monotonic() > deadline:
                    raise
            time.sleep(0.02)
        with held:
            yield lock_fd

    # ---------------------------------------------------------------- commands
    def apply(self, source: str, allow_downgrade: bool = False) -> dict:
        """A bundle, verified, unpacked, self-tested and switched in; a lower version than the
        running one only when the operator asks for it (allow_downgrade)."""
        started = time.monotonic()
        with self._router_lock() as lock_fd:
            self.lock_fd = lock_fd
            self._recover_locked()
            downloaded = fetch(source, self.settings)
            try:
                return self._apply_bundle(downloaded, started, allow_downgrade)
            finally:
                if downloaded != Path(source):
                    downloaded.unlink(missing_ok=True)

    def rollback(self) -> dict:
        started = time.monotonic()
        with self._router_lock() as lock_fd:
            self.lock_fd = lock_fd
            self._recover_locked()
            state = self.state()
            running, previous = self.running(), state.get("previous")
            if state.get("via") == "rollback":  # rolling back a rollback would re-apply the patch
                origin = f" from {previous}" if previous else ""
                message = (f"nothing to roll back: {running} is already the result of a rollback{origin}; "
                           f"`vr patch apply` goes forward again")  # fmt: skip
                self._event(f"release:{running}", "unchanged", message)
                return {"action": "rollback", "from": running, "to": running, "outcome": "unchanged",
                        "message": message, "duration_ms": round((time.monotonic() - started) * 1000, 1)}  # fmt: skip
            if not previous or previous == running:
                raise PatchRefused("no previous release to roll back to")
            if previous not in self.releases.installed():
                raise PatchRefused(f"previous release {previous} is no longer installed")
            changed = self._selftest(previous, resource=f"release:{previous}")
            return self._switch_over(running, previous, "rollback", started, changed=changed)

    def remove(self, version: str, force: bool = False) -> dict:
        """An installed release deleted: never the running one, nor the one a rollback would
        return to unless forced (a rollback then has nowhere to go)."""
        with self._router_lock() as lock_fd:
            self.lock_fd = lock_fd
            self._recover_locked()
            if not is_version(version):
                raise PatchRefused(f"remove: {version!r} is not a release version")
            if not self.releases.path(version).is_dir():
                raise PatchRefused(f"release {version} is not installed")
            if version == self.running():
                raise PatchRefused(f"release {version} is running; it cannot be removed")
            if version == self.rollback_target() and not force:
                raise PatchRefused(f"release {version} is the one rollback would return to; "
                                   f"add --force to remove it anyway")  # fmt: skip
            self._remove(version, "by the operator")
            state = self.state()
            if state.get("previous") == version:
                write_json_atomic(self.settings.patch_state_path, state | {"previous": None})
            return {"removed": version, "installed": self.releases.installed()}

    def recover(self) -> bool:
        with self._router_lock() as lock_fd:
            self.lock_fd = lock_fd
            return self._recover_locked()

    def running(self) -> str:
        """The current release, or the installed package's version before any patch."""
        return self.releases.current() or __version__

    def state(self) -> dict:
        """patch.json; a damaged one reads as no history (never a traceback: rollback must work)."""
        return read_report(self.settings.patch_state_path, PATCH_STATE_FIELDS) or {}

    def rollback_target(self) -> str | None:
        """The release `vr patch rollback` would switch to: none right after a rollback."""
        state = self.state()
        return None if state.get("via") == "rollback" else state.get("previous")

    def status(self) -> dict:
        state = self.state()
        return {"current": self.running(), "previous": state.get("previous"), "last": state.get("last"),
                "rollback_to": self.rollback_target(),
                "interrupted": self.settings.patch_journal_path.exists(),
                "installed": self.releases.installed()}  # fmt: skip

    def list(self) -> list[dict]:
        current = self.releases.current()
        rows = []
        for version in self.releases.installed():
            manifest = self.releases.manifest(version)
            rows.append({"version": version, "current": version == current,
                         "description": manifest.get("description", ""), "created": manifest.get("created"),
                         "base_versions": manifest.get("base_versions", [])})  # fmt: skip
        return rows

    # ---------------------------------------------------------------- apply, step by step
    def _apply_bundle(self, path: Path, started: float, allow_downgrade: bool = False) -> dict:
        running = self.running()
        try:
            bundle = verify(path, self.settings)
        except PatchRefused as error:
            self._event("release:unknown", "refused", str(error))
            raise
        resource = f"release:{bundle.version}"
        try:
            if bundle.version == running:
                raise PatchRefused(f"release {running} is already running")
            if running not in bundle.manifest["base_versions"]:
                raise PatchRefused(f"bundle {bundle.version} applies to base versions "
                                   f"{', '.join(bundle.manifest['base_versions'])}; this router runs {running}")  # fmt: skip
            if version_key(bundle.version) < version_key(running) and not allow_downgrade:
                raise PatchRefused(f"bundle {bundle.version} is older than the running release {running}: "
                                   f"a downgrade needs --allow-downgrade")  # fmt: skip
        except PatchRefused as error:
            self._event(resource, "refused", str(error))
            raise
        self._event(resource, "verified", f"signed by {bundle.signer}; base {running}")
        fresh = not self.releases.path(bundle.version).exists()
        try:
            release_dir = unpack(bundle, self.releases)
        except PatchRefused as error:
            self._event(resource, "refused", str(error))
            raise
        self._event(resource, "unpacked", str(release_dir))
        try:
            changed = self._selftest(bundle.version, resource)
            undeclared = sorted(set(changed) - set(bundle.manifest["services"]))
            if undeclared:
                raise PatchRefused(f"release {bundle.version} changes the files of {', '.join(undeclared)}, "
                                   f"which its manifest does not declare (services: "
                                   f"{', '.join(bundle.manifest['services']) or 'none'})")  # fmt: skip
            self._hook(bundle.manifest, "pre", bundle.version, running)
            try:
                self._adopt_installed()
            except OSError as error:
                raise _write_refusal(error, f"copying the installed release {__version__}", self.releases.dir) from None
        except PatchRefused as error:
            if fresh:  # refused: the release it unpacked goes too
                shutil.rmtree(release_dir, ignore_errors=True)
            self._event(resource, "refused", str(error))
            raise
        return self._switch_over(running, bundle.version, "apply", started, changed=changed, manifest=bundle.manifest)

    def _switch_over(self, old: str, new: str, action: str, started: float, changed: dict,
                     manifest: dict | None = None) -> dict:  # fmt: skip
        """From old to new: switch, control plane, re-render, gate; any failure: back to old."""
        txid = uuid.uuid4().hex[:12]
        resource = f"release:{new}"
        timings: dict[str, float] = {}
        try:
            write_json_atomic(self.settings.patch_journal_path,
                              {"txid": txid, "action": action, "from": old, "to": new, "time": time.time()})  # fmt: skip
        except OSError as error:  # before the switch: nothing changed yet
            raise _write_refusal(error, "writing the patch journal", self.settings.state_dir) from None
        fault_point("patch-journaled")
        step = "switch"
        try:
            mark = time.monotonic()
            self.releases.switch(new)
            self._event(resource, "switched", f"current -> {new} (was {old})")
            fault_point("patch-switched")
            step = "control-plane"
            self._restart_control_plane(new)
            step = "reload"
            reloaded = self._reconcile(new)
            self._event(resource, "reloaded", f"services reloaded: {', '.join(reloaded) or 'none'}")
            step = "health"
            self._wait_control_plane(new)
            if manifest is not None:
                step = "post-hook"
                self._hook(manifest, "post", new, old)
            timings["switch_ms"] = round((time.monotonic() - mark) * 1000, 1)
        except (VrError, OSError, ValueError, subprocess.SubprocessError) as error:
            reason = f"{step} failed: {error}"
            self._event(resource, "failed", reason)
            self._alert(f"{action} to release {new} failed at {step} and was rolled back to {old}: {error}")
            self._switch_back(old, new)
            self._record(txid, action, old, new, "rolled-back", reason, started)
            raise PatchFailed(f"{action} to {new} failed ({reason}); rolled back to {old}") from None
        fault_point("patch-gated")
        result = self._record(txid, action, old, new, "ok", f"services reloaded: {', '.join(reloaded) or 'none'}",
                              started, previous=old)  # fmt: skip
        self._event(resource, "committed", f"{action} {old} -> {new} in {result['duration_ms']:.0f} ms")
        self._prune(keep={new, old})
        return result | {"selftest_changed": sorted(changed), **timings}

    def _switch_back(self, old: str, new: str) -> None:
        """The failure path: old release current again, its monitor, its rendering."""
        resource = f"release:{old}"
        try:
            self.releases.switch(old)
            self._restart_control_plane(old)
            self._reconcile(old)
            self._wait_control_plane(old)
            self._event(resource, "rolled-back", f"back on {old} after {new} failed")
        except (VrError, OSError, ValueError, subprocess.SubprocessError) as error:
            self._event(resource, "failed", f"switching back to {old}: {error}")
            self._alert(f"switching back to release {old} failed too: {error}")

    # ---------------------------------------------------------------- the new release's own code
    def _run_release(self, version: str, *args: str, timeout: float, lock: bool = False):
        argv, env = self.releases.command(version, self.settings, *args)
        pass_fds: tuple[int, ...] = ()
        if lock and self.lock_fd is not None:
            env.update(inheritable_lock_env(self.lock_fd))
            pass_fds = (self.lock_fd,)
        env.pop("VR_FAULT_AT", None)  # crash tests aim at this process, not at its helpers
        return subprocess.run(argv, check=False, env=env, capture_output=True, text=True, timeout=timeout,
                              pass_fds=pass_fds,
                              cwd=self.releases.path(version))  # fmt: skip

    def _selftest(self, version: str, resource: str) -> dict:
        """The release imports, renders the live document and passes the daemons' checkers."""
        result = self._run_release(version, "selftest", "--json", timeout=SELFTEST_TIMEOUT_S)
        if result.returncode != 0:
            raise PatchRefused(f"self-test of release {version} failed: {_last_words(result)}")
        report = json.loads(result.stdout.strip().splitlines()[-1])
        if report.get("version") != version:
            raise PatchRefused(f"self-test ran release {report.get('version')}, not {version}")
        changed = report.get("changed", {})
        self._event(resource, "self-tested", f"would change: {', '.join(sorted(changed)) or 'nothing'}")
        return changed

    def _reconcile(self, version: str) -> list[str]:
        result = self._run_release(version, "reconcile", "--json", timeout=RECONCILE_TIMEOUT_S, lock=True)
        if result.returncode != 0:
            raise PatchFailed(_last_words(result))
        return json.loads(result.stdout.strip().splitlines()[-1]).get("changed", [])

    def _hook(self, manifest: dict, when: str, new: str, old: str) -> None:
        hook = manifest.get("hooks", {}).get(when)
        if not hook:
            return
        release_dir = self.releases.path(new)
        env = {**os.environ, **self.settings.environment(), "VR_RELEASE_DIR": str(release_dir),
               "VR_FROM_VERSION": old, "VR_TO_VERSION": new}  # fmt: skip
        process = subprocess.Popen([str(release_dir / hook["path"])], cwd=release_dir, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            output, _ = process.communicate(timeout=hook["timeout_s"])
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            error = f"{when} hook {hook['path']} did not finish within {hook['timeout_s']} s (killed)"
            raise (PatchRefused if when == "pre" else PatchFailed)(error) from None
        text = output.decode(errors="replace").strip().splitlines()
        if process.returncode != 0:
            error = f"{when} hook {hook['path']} exited {process.returncode}: {' | '.join(text[-3:])}"
            raise (PatchRefused if when == "pre" else PatchFailed)(error)
        self._event(f"release:{new}", f"{when}-hook", " | ".join(text[-3:]))

    # ---------------------------------------------------------------- vr's own processes
    def _control_plane(self) -> list[str]:
        from vr.services.supervisor_rpc import SupervisorClient

        supervisor = SupervisorClient(self.settings)
        if not supervisor.is_running():
            return []
        return [p["name"] for p in supervisor.all_processes() if p["name"] in CONTROL_PLANE]

    def _restart_control_plane(self, version: str) -> None:
        from vr.services.supervisor_rpc import SupervisorClient

        supervisor, names = SupervisorClient(self.settings), self._control_plane()
        for name in names:
            supervisor.restart(name)
        self._event(f"release:{version}", "restarted", f"vr processes: {', '.join(names) or 'none'}")

    def _wait_control_plane(self, version: str) -> None:
        """The restarted monitor runs the new code and works: it wrote its health report with
        its own PID and version (a monitor that dies at import never does), and, for a release
        with a daemon, that daemon answers GET /healthz on its local socket (requests sent
        meanwhile wait for it in the backlog of the sockets the keeper holds)."""
        from vr.control.keeper import probe_health
        from vr.control.monitor import HEALTH
        from vr.services.supervisor_rpc import SupervisorClient

        if "monitor" not in self._control_plane():
            return
        supervisor = SupervisorClient(self.settings)
        serves = (self.releases.path(version) / "vr" / "control" / "daemon.py").exists()
        deadline = time.monotonic() + CONTROL_PLANE_DEADLINE_S
        answer = None
        while True:
            pid = supervisor.pid("monitor")
            health = read_report(self.settings.run_dir / HEALTH, {}) or {}
            if pid and health.get("monitor_pid") == pid and health.get("version") == version:
                answer = probe_health(self.settings.daemon_socket, 1.0) if serves else None
                if answer is None:
                    return
            if time.monotonic() > deadline:
                raise PatchFailed(f"the monitor did not come up on release {version} within "
                                  f"{CONTROL_PLANE_DEADLINE_S:.0f} s (state {supervisor.state('monitor')}, "
                                  f"reports {health.get('version')} pid {health.get('monitor_pid')}"
                                  f"{f'; /healthz: {answer}' if answer else ''})")  # fmt: skip
            time.sleep(0.05)

    # ---------------------------------------------------------------- the installed package as a release
    def _adopt_installed(self) -> None:
        """Before the first patch, the running package becomes release <its version>, so
        there is a release to roll back to."""
        if self.releases.current() is not None:
            return
        from vr.foundation.settings import _default_template_dir

        target = self.releases.dir / __version__
        if not (target / MANIFEST).exists():
            incoming = self.releases.dir / f".incoming-{__version__}-{uuid.uuid4().hex[:8]}"
            shutil.rmtree(target, ignore_errors=True)
            ignore = shutil.ignore_patterns(*IGNORED_NAMES, "*.pyc")
            shutil.copytree(code_dir() / "vr", incoming / "vr", ignore=ignore)
            templates = self.settings.template_dir if self.settings.template_dir.is_dir() else _default_template_dir()
            shutil.copytree(templates, incoming / "configs", ignore=ignore)
            files = [_file_entry(relative, data, mode) for relative, (data, mode) in _tree_files(incoming).items()]
            manifest = {"format": FORMAT, "version": __version__, "base_versions": [__version__],
                        "description": "the release installed with the appliance", "services": [], "hooks": {},
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}  # fmt: skip
            write_atomic(incoming / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
            os.rename(incoming, target)
        self.releases.switch(__version__)
        self._event(f"release:{__version__}", "adopted", f"the installed package, copied to {target}")

    # ---------------------------------------------------------------- crash recovery
    def _recover_locked(self) -> bool:
        """A patch interrupted (crash, kill, power) after its journal: back on the old release.
        Its re-render and reload happen here if the router is up; at boot, `vr start` does it."""
        leftovers = [*self.releases.dir.glob(".incoming-*"), *self.releases.dir.glob(".removing-*")]
        for leftover in leftovers if self.releases.dir.is_dir() else ():
            shutil.rmtree(leftover, ignore_errors=True)
        journal = read_report(self.settings.patch_journal_path, {"from": str, "to": str, "txid": str})
        if journal is None or not {"from", "to"} <= set(journal):
            if self.settings.patch_journal_path.exists():  # damaged: what it was switching is unknown
                os.replace(self.settings.patch_journal_path,
                           self.settings.patch_journal_path.with_name("patch-journal.unreadable.json"))
                self._event(f"release:{self.running()}", "unreadable-journal", "the patch journal did not read "
                            "(kept as patch-journal.unreadable.json); the current release stays")  # fmt: skip
            return False
        if self.state().get("last", {}).get("txid") == journal.get("txid"):
            self._clear_journal()  # it had been recorded: only the clean-up was missing
            return True
        old, new = journal["from"], journal["to"]
        if self.releases.current() != old and (self.releases.path(old) / "vr").is_dir():
            self.releases.switch(old)
        if self._control_plane():
            self._restart_control_plane(old)
            self._reconcile(old)
        self._record(journal["txid"], journal["action"], old, new, "rolled-back",
                     "interrupted (crash or kill); rolled back at the next start", time.monotonic())  # fmt: skip
        self._event(f"release:{old}", "recovered", f"{journal['action']} {old} -> {new} was interrupted; back on {old}")
        return True

    # ---------------------------------------------------------------- bookkeeping
    def _record(self, txid: str, action: str, old: str, new: str, outcome: str, message: str, started: float,
                previous: str | None = None) -> dict:  # fmt: skip
        state = self.state()
        last = {"txid": txid, "action": action, "from": old, "to": new, "outcome": outcome, "message": message,
                "time": time.time(), "duration_ms": round((time.monotonic() - started) * 1000, 1)}  # fmt: skip
        current = self.running()
        via = action if outcome == "ok" else state.get("via")  # how the running release was reached
        write_json_atomic(self.settings.patch_state_path,
                          {"current": current, "previous": previous or state.get("previous"), "last": last,
                           "via": via})  # fmt: skip
        self._clear_journal()
        return last

    def _remove(self, version: str, why: str) -> None:
        """Renamed out of the way first (one step), then deleted: never half a release under its name."""
        doomed = self.releases.dir / f".removing-{version}-{uuid.uuid4().hex[:8]}"
        os.rename(self.releases.path(version), doomed)
        fsync_dir(self.releases.dir)
        shutil.rmtree(doomed, ignore_errors=True)
        self._event(f"release:{version}", "removed", why)

    def _prune(self, keep: set[str]) -> None:
        """After a successful switch: the running release, the one before it and the newest
        others stay, KEEP_RELEASES in all; older ones go (a full disk blocks the next patch)."""
        others = [v for v in reversed(self.releases.installed()) if v not in keep]
        for version in sorted(others[max(KEEP_RELEASES - len(keep), 0) :], key=version_key):
            try:
                self._remove(version, f"pruned: more than {KEEP_RELEASES} releases installed")
            except OSError as error:
                self._event(f"release:{version}", "failed", f"pruning: {error}")

    def _clear_journal(self) -> None:
        self.settings.patch_journal_path.unlink(missing_ok=True)
        fsync_dir(self.settings.state_dir)

    def _event(self, resource: str, outcome: str, message: str) -> None:
        self.events.write([event("patch", resource, outcome, message)])

    def _alert(self, message: str) -> None:
        from vr.control.alerts import AlertQueue, make_alert
        from vr.control.monitor import ALERT_QUEUE

        document = read_report(self.settings.document_path, {"router": dict}) or {}
        router = str((document.get("router") or {}).get("name", ""))
        alert = make_alert(router, "patch", "critical", message)
        self.events.write([event("alert", "service:patch", "critical", json.dumps(alert, sort_keys=True))])
        AlertQueue(self.settings.state_dir / ALERT_QUEUE).put(alert)  # the (restarted) monitor delivers it


def _last_words(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in (result.stderr or "").strip().splitlines() if line.strip()]
    return " | ".join(lines[-3:]) or f"exit code {result.returncode}"
