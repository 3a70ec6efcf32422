"""What services share during one pipeline run: settings, templates, the supervisor client."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vr.settings import Settings

if TYPE_CHECKING:
    import jinja2

    from vr.services.supervisor import SupervisorClient


@dataclass
class Runtime:
    settings: Settings

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
        return self.templates.get_template(template).render(**values).encode()

    @functools.cached_property
    def supervisor(self) -> SupervisorClient:
        from vr.services.supervisor import SupervisorClient

        return SupervisorClient(self.settings)
