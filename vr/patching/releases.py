"""Which release of vr runs. Releases live side by side in the releases dir:

    <releases>/<version>/{manifest.json, vr/, configs/, scripts/}
    <releases>/current -> <version>        (switched by an atomic rename)

Every `vr` command first makes sure it is the current release's code that runs (dispatch):
a console script or `python -m vr` started from the installed package re-executes itself
with the current release on PYTHONPATH. So a patched release survives a reboot, and
supervisord's programs (the monitor) run the current code once restarted. Stdlib only:
this runs before every command."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from vr.foundation.files import fsync_dir
from vr.foundation.settings import Settings
from vr.foundation.version import MANIFEST, code_dir, is_version, version_key

CURRENT = "current"
NO_DISPATCH = "VR_NO_DISPATCH"  # set: run the code on sys.path as it is (a pinned release, or a loop guard)
class Releases:
    def __init__(self, settings: Settings):
        self.dir = settings.releases_dir

    @property
    def current_link(self) -> Path:
        return self.dir / CURRENT

    def current(self) -> str | None:
        try:
            target = os.readlink(self.current_link)
        except OSError:
            return None
        return target if is_version(target) else None

    def path(self, version: str) -> Path:
        if not is_version(version):
            raise ValueError(f"not a release version: {version!r}")
        return self.dir / version

    def installed(self) -> list[str]:
        try:
            names = [p.name for p in self.dir.iterdir() if p.is_dir() and not p.is_symlink()]
        except FileNotFoundError:
            return []
        return sorted((n for n in names if is_version(n) and (self.dir / n / MANIFEST).exists()), key=version_key)

    def manifest(self, version: str) -> dict:
        try:
            return json.loads((self.path(version) / MANIFEST).read_text())
        except (OSError, ValueError):
            return {}

    def switch(self, version: str) -> None:
        """Point `current` at version: a new symlink renamed over the old one, so a reader (or
        a crash) sees either the old or the new target, never none."""
        if not (self.path(version) / "vr" / "__init__.py").is_file():
            raise FileNotFoundError(f"release {version} is not installed in {self.dir}")
        temporary = self.dir / f".{CURRENT}.{os.getpid()}"
        temporary.unlink(missing_ok=True)
        os.symlink(version, temporary)
        os.replace(temporary, self.current_link)
        fsync_dir(self.dir)

    def command(self, version: str, settings: Settings, *args: str) -> tuple[list[str], dict[str, str]]:
        """argv and environment that run `vr ARGS` with exactly this release's code."""
        env = {k: v for k, v in os.environ.items() if k != "VR_TEMPLATE_DIR"}  # each release its own, unless chosen
        env.update(settings.environment(), PYTHONPATH=str(self.path(version)), **{NO_DISPATCH: "1"})
        argv = [sys.executable, "-P", "-m", "vr"]
        if settings.netns:
            argv += ["--netns", settings.netns]
        return [*argv, *args], env


def _root_from_argv(argv: list[str]) -> str | None:
    for index, arg in enumerate(argv):
        if arg == "--root" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--root="):
            return arg.split("=", 1)[1]
        if not arg.startswith("-"):
            return None  # the command: options after it are its own
    return None


def dispatch(argv: list[str]) -> None:
    """Re-execute as the current release if another code runs (returns only if this is it)."""
    if os.environ.get(NO_DISPATCH):
        return
    settings = Settings.from_env(root=_root_from_argv(argv))
    version = Releases(settings).current()
    if version is None:
        return
    target = (settings.releases_dir / version).resolve()
    if target == code_dir() or not (target / "vr" / "__main__.py").is_file():
        return
    env = {**os.environ, "PYTHONPATH": str(target), NO_DISPATCH: "1"}
    if os.environ.get("VR_TEMPLATE_DIR") == str(code_dir() / "configs"):
        env.pop("VR_TEMPLATE_DIR")  # pinned to the old release's templates by the one that started us
    os.execve(sys.executable, [sys.executable, "-P", "-m", "vr", *argv], env)


def reexec_if_not_current(argv: list[str]) -> None:
    """After a switch made by this very process (a recovered patch): run the command again,
    as whatever release is current now (a pinned run included)."""
    os.environ.pop(NO_DISPATCH, None)
    dispatch(argv)
