"""Every path vr uses comes from here, so several routers can run side by side."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _default_template_dir() -> Path:
    source_tree = Path(__file__).resolve().parents[2] / "configs"
    if source_tree.is_dir():
        return source_tree
    return Path(sys.prefix) / "share" / "vr" / "configs"


SUPERVISOR_CONFIG = "supervisord.conf"  # in the supervisor service's directory


_FIELDS = ("config_dir", "state_dir", "run_dir", "log_dir", "template_dir", "releases_dir", "netns", "bin_dir")


class Settings:
    """Immutable, compared by value. A plain class, not a dataclass: `dataclasses` loads
    `inspect`, 15 ms of every thin `vr` command's start."""

    __slots__ = _FIELDS

    def __init__(
        self,
        config_dir: Path = Path("/etc/vr"),
        state_dir: Path = Path("/var/lib/vr"),
        run_dir: Path = Path("/run/vr"),
        log_dir: Path = Path("/var/log/vr"),
        template_dir: Path | None = None,
        releases_dir: Path = Path("/opt/vr/releases"),  # installed releases and the `current` symlink (vr patch)
        netns: str | None = None,
        bin_dir: Path | None = None,  # vr's own console scripts (supervisord comes with the package)
    ) -> None:
        values = (config_dir, state_dir, run_dir, log_dir, template_dir or _default_template_dir(), releases_dir,
                  netns, bin_dir or Path(sys.executable).parent)  # fmt: skip
        for name, value in zip(_FIELDS, values, strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Settings are immutable: cannot set {name}")

    def fields(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in _FIELDS}

    def __eq__(self, other: object) -> bool:
        return self.fields() == other.fields() if isinstance(other, Settings) else NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self.fields().values()))

    def __reduce__(self) -> tuple:
        return (Settings, tuple(self.fields().values()))

    def __repr__(self) -> str:
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in self.fields().items()) + ")"

    @classmethod
    def under_root(cls, root: Path | str, netns: str | None = None) -> Settings:
        """All four directories below one root: what tests, the lab and benches use."""
        root = Path(root)
        return cls(
            config_dir=root / "etc",
            state_dir=root / "state",
            run_dir=root / "run",
            log_dir=root / "log",
            releases_dir=root / "releases",
            netns=netns,
        )

    @classmethod
    def from_env(cls, root: str | None = None, netns: str | None = None) -> Settings:
        """CLI flags win over VR_* environment variables, which win over appliance defaults."""
        root = root or os.environ.get("VR_ROOT")
        netns = netns or os.environ.get("VR_NETNS") or None
        base = cls.under_root(root, netns) if root else cls(netns=netns)
        overrides = {}
        for name, env in (
            ("config_dir", "VR_CONFIG_DIR"),
            ("state_dir", "VR_STATE_DIR"),
            ("run_dir", "VR_RUN_DIR"),
            ("log_dir", "VR_LOG_DIR"),
            ("template_dir", "VR_TEMPLATE_DIR"),
            ("releases_dir", "VR_RELEASES_DIR"),
        ):
            if os.environ.get(env):
                overrides[name] = Path(os.environ[env])
        return base if not overrides else cls(**{**base.fields(), **overrides})

    def environment(self) -> dict[str, str]:
        """These settings as VR_* variables: for a vr command that a daemon runs (from_env reads them).
        The template dir only when it was chosen: by default each release uses its own."""
        variables = {"VR_CONFIG_DIR": str(self.config_dir), "VR_STATE_DIR": str(self.state_dir),
                     "VR_RUN_DIR": str(self.run_dir), "VR_LOG_DIR": str(self.log_dir),
                     "VR_RELEASES_DIR": str(self.releases_dir)}  # fmt: skip
        if self.template_dir != _default_template_dir():
            variables["VR_TEMPLATE_DIR"] = str(self.template_dir)
        return variables

    def ensure_dirs(self) -> None:
        for directory in (self.config_dir, self.state_dir, self.run_dir, self.log_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o755)

    # Derived paths, named once here.
    @property
    def document_path(self) -> Path:
        return self.state_dir / "document.json"

    @property
    def document_log_path(self) -> Path:
        return self.state_dir / "document.log"

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal.json"

    @property
    def last_apply_path(self) -> Path:
        return self.state_dir / "last_apply.json"

    @property
    def events_path(self) -> Path:
        return self.log_dir / "events.jsonl"

    @property
    def patch_state_path(self) -> Path:
        return self.state_dir / "patch.json"

    @property
    def patch_journal_path(self) -> Path:
        return self.state_dir / "patch-journal.json"

    @property
    def trusted_keys_dir(self) -> Path:
        return self.config_dir / "trusted-keys"

    @property
    def lock_path(self) -> Path:
        return self.run_dir / "apply.lock"

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    @property
    def supervisor_socket(self) -> Path:
        return self.run_dir / "supervisor.sock"

    @property
    def stop_marker_path(self) -> Path:
        """Present from `vr stop` until the next start: supervisord is down on purpose."""
        return self.run_dir / "stopping"

    @property
    def keeper_pid_path(self) -> Path:
        """Locked by the keeper of supervisord for as long as it lives."""
        return self.run_dir / "keeper.pid"

    @property
    def daemon_socket(self) -> Path:
        """The daemon's local API (HTTP over a unix socket, 0600): the CLI's fast path."""
        return self.run_dir / "vr.sock"

    @property
    def daemon_pid_path(self) -> Path:
        """Locked by `vr daemon` for as long as it lives: the CLI asks it only then."""
        return self.run_dir / "daemon.pid"

    @property
    def agent_tls_dir(self) -> Path:
        """The agent's self-signed certificate and key, when the document brings none."""
        return self.state_dir / "agent-tls"

    @property
    def confirm_path(self) -> Path:
        """A commit-confirm waiting for its confirmation: what to roll back to, and when."""
        return self.state_dir / "confirm.json"

    def service_dir(self, service: str) -> Path:
        return self.config_dir / service
