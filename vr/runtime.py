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
    # slot -> {(id(item), setting): (item, result)}: what the previous memoized pass computed
    _chunks: dict[str, dict[tuple[int, Any], tuple[object, Any]]] = field(default_factory=dict, repr=False)

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
        """One rendered chunk per item, concatenated; a one-VM change renders one line."""
        compiled = self.templates.get_template(template)
        chunks = self.memoized(template, items, lambda item, setting: compiled.render(**values(item, setting)))
        return "".join(chunks).encode()

    def memoized(self, slot: str, items: Iterable[tuple[object, Any]], compute: Callable[[Any, Any], Any]) -> list:
        """compute(item, setting) for each pair, reusing the previous pass's result for the
        same immutable object (a frozen document model) with the same setting."""
        previous = self._chunks.get(slot, {})
        current: dict[tuple[int, Any], tuple[object, Any]] = {}
        results = []
        for item, setting in items:
            key = (id(item), setting)
            hit = previous.get(key)
            if hit is None or hit[0] is not item:
                hit = (item, compute(item, setting))
            current[key] = hit
            results.append(hit[1])
        self._chunks[slot] = current
        return results

    @functools.cached_property
    def supervisor(self) -> SupervisorClient:
        from vr.services.supervisor import SupervisorClient

        return SupervisorClient(self.settings)
