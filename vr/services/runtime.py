"""What services share during one pipeline run: settings, templates, the supervisor client."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vr.foundation.memo import Memo
from vr.foundation.settings import Settings

if TYPE_CHECKING:
    import jinja2

    from vr.services.supervisor_rpc import SupervisorClient


DAEMON_PROGRAM = "monitor"  # vr's resident daemon: supervisord's event listener of this name


@dataclass
class Runtime:
    settings: Settings
    memo: Memo = field(default_factory=Memo, repr=False)
    _rendered: dict[str, tuple[dict, bytes]] = field(default_factory=dict, repr=False)
    # What the resident daemon does itself when an apply runs inside it (by service name):
    # a service then calls it instead of signalling the daemon from outside.
    hooks: dict[str, Callable[[], None]] = field(default_factory=dict, repr=False)

    @functools.cached_property
    def templates(self) -> jinja2.Environment:
        import jinja2

        return jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(self.settings.template_dir)),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )

    def render(self, template: str, **values: object) -> bytes:
        """The last rendering of a template is kept with its values: a warm process asked
        for the same again (supervisord's config on every apply) compares, not renders."""
        last = self._rendered.get(template)
        if last is not None and last[0] == values:
            return last[1]
        rendered = self.templates.get_template(template).render(**values).encode()
        self._rendered[template] = (values, rendered)
        return rendered

    def render_each(
        self, template: str, items: Sequence[object], values: Callable[[Any, Any], dict], setting: Any = None
    ) -> bytes:
        """One rendered chunk per item, concatenated; a one-VM change renders one line."""
        compiled = self.templates.get_template(template)
        chunks = self.memoized(template, items, lambda item, s: compiled.render(**values(item, s)), setting)
        return "".join(chunks).encode()

    def memoized(
        self, slot: str, items: Sequence[object], compute: Callable[[Any, Any], Any], setting: Any = None
    ) -> list:
        """Rendering results per unchanged document model (see Memo.map)."""
        return self.memo.map(slot, items, compute, setting)

    def signal_daemon(self) -> None:
        """SIGHUP to vr's resident daemon (supervisord's program `monitor`): it reads again the
        files it serves (the agent's, guest data). None running: it reads them when it starts."""
        import os
        import signal

        pid = self.supervisor.pid(DAEMON_PROGRAM) if self.supervisor.is_running() else None
        if pid:
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                pass

    @functools.cached_property
    def supervisor(self) -> SupervisorClient:
        from vr.services.supervisor_rpc import SupervisorClient

        return SupervisorClient(self.settings)
