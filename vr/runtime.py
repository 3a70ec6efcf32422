"""What services share during one pipeline run: settings, templates, the supervisor client."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vr.settings import Settings

if TYPE_CHECKING:
    import jinja2

    from vr.services.supervisor import SupervisorClient


@dataclass
class Runtime:
    settings: Settings
    # template -> {(id(item), setting): (item, rendered)}: chunks of the previous render_each pass
    _chunks: dict[str, dict[tuple[int, Any], tuple[object, str]]] = field(default_factory=dict, repr=False)

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

    def render_each(
        self, template: str, items: Iterable[tuple[object, Any]], values: Callable[[Any, Any], dict]
    ) -> bytes:
        """One rendered chunk per item, concatenated. An item is an immutable object (a frozen
        document model) with the setting it is rendered with; a chunk rendered for the same
        pair in the previous pass is reused, so a one-VM change renders one line, not 4,000."""
        compiled = self.templates.get_template(template)
        previous = self._chunks.get(template, {})
        current: dict[tuple[int, Any], tuple[object, str]] = {}
        parts = []
        for item, setting in items:
            key = (id(item), setting)
            hit = previous.get(key)
            if hit is None or hit[0] is not item:
                hit = (item, compiled.render(**values(item, setting)))
            current[key] = hit
            parts.append(hit[1])
        self._chunks[template] = current
        return "".join(parts).encode()

    @functools.cached_property
    def supervisor(self) -> SupervisorClient:
        from vr.services.supervisor import SupervisorClient

        return SupervisorClient(self.settings)
