"""swanctl.conf fragments: vr renders them (configs/strongswan/swanctl.conf.j2) and reads them
back here into VICI messages, so what charon loads is exactly what the files say.

swanctl itself cannot be used for either step: it has no parse-only mode, and a file with a
syntax error makes `swanctl --load-all` unload every connection and still exit 0.
The reader accepts the subset vr writes (sections, `key = value`, comments) and refuses the
rest; its errors give a line number, never the line, which may hold a secret.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass, field

# Keys swanctl sends as VICI lists (comma-separated in the file), as in its load_conns.c.
LIST_KEYS = frozenset(
    [
        "local_addrs",
        "remote_addrs",
        "proposals",
        "esp_proposals",
        "ah_proposals",
        "local_ts",
        "remote_ts",
        "vips",
        "pools",
        "groups",
        "certs",
        "cacerts",
        "pubkeys",
        "dns",
    ]
)
_SECTION = re.compile(r"([A-Za-z0-9_-]+)\s*\{")
_SETTING = re.compile(r"([A-Za-z0-9_-]+)\s*=\s*(.*)")
# What vr ever writes as a value: addresses, CIDRs, ids, keywords, file names, base64.
_SAFE_VALUE = re.compile(r"[A-Za-z0-9_.:/@%+=, -]*")


class SwanctlError(ValueError):
    """A fragment that does not read as swanctl.conf; the message says where."""


Tree = dict[str, "str | Tree"]


def is_plain(text: str) -> bool:
    return bool(_SAFE_VALUE.fullmatch(text))


def value(text: object) -> str:
    """A value for the template: refused unless it is plain (no newline, brace, quote or '#')."""
    text = ", ".join(map(str, text)) if isinstance(text, list | tuple) else str(text)
    if not _SAFE_VALUE.fullmatch(text):
        raise SwanctlError("a value with characters swanctl.conf would read as syntax")
    return text


def secret(data: str) -> str:
    """A secret as swanctl's `0s` base64 form: any character survives, nothing needs escaping."""
    return "0s" + base64.b64encode(data.encode()).decode()


def parse(text: str) -> Tree:
    root: Tree = {}
    stack = [root]
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line == "}":
            if len(stack) == 1:
                raise SwanctlError(f"line {number}: '}}' closes no section")
            stack.pop()
        elif match := _SECTION.fullmatch(line):
            section: Tree = {}
            _put(stack[-1], match[1], section, number)
            stack.append(section)
        elif match := _SETTING.fullmatch(line):
            if not _SAFE_VALUE.fullmatch(match[2]):
                raise SwanctlError(f"line {number}: the value has characters vr never writes")
            _put(stack[-1], match[1], match[2].strip(), number)
        else:
            raise SwanctlError(f"line {number}: neither 'name {{', 'key = value' nor '}}'")
    if len(stack) > 1:
        raise SwanctlError("a section is not closed at the end of the file")
    return root


def _put(section: Tree, key: str, item: str | Tree, number: int) -> None:
    if key in section:
        raise SwanctlError(f"line {number}: {key!r} given twice")
    section[key] = item


@dataclass
class Messages:
    """A fragment as the VICI messages that load it."""

    conns: dict[str, dict] = field(default_factory=dict)  # name -> load-conn body
    pools: dict[str, dict] = field(default_factory=dict)  # name -> load-pool body
    shared: dict[str, dict] = field(default_factory=dict)  # secret id -> load-shared message
    keys: list[dict] = field(default_factory=list)  # load-key messages


def messages(tree: Tree, read_file: Callable[[str], bytes]) -> Messages:
    """read_file gives the bytes of a file a fragment names (certs, private keys)."""
    out = Messages()
    for top, body in tree.items():
        if not isinstance(body, dict):
            raise SwanctlError(f"{top!r} is a setting outside any section")
        for name, section in body.items():
            if not isinstance(section, dict):
                raise SwanctlError(f"{top}.{name} is not a section")
            if top == "connections":
                out.conns[name] = _vici(section, read_file)
            elif top == "pools":
                out.pools[name] = _vici(section, read_file)
            elif top == "secrets":
                _secret(out, name, section, read_file)
            else:
                raise SwanctlError(f"{top!r}: vr writes only connections, pools and secrets")
    return out


def _vici(section: Tree, read_file: Callable[[str], bytes]) -> dict:
    body: dict = {}
    for key, item in section.items():
        if isinstance(item, dict):
            body[key] = _vici(item, read_file)
        elif key in ("certs", "cacerts"):
            body[key] = [read_file(name.strip()) for name in item.split(",")]
        elif key in LIST_KEYS:
            body[key] = [part.strip() for part in item.split(",")]
        else:
            body[key] = item
    return body


def _secret(out: Messages, name: str, section: Tree, read_file: Callable[[str], bytes]) -> None:
    kind = name.split("-", 1)[0]
    if kind == "private":
        out.keys.append({"type": "any", "data": read_file(_text(section, name, "file"))})
        return
    if kind not in ("ike", "eap"):
        raise SwanctlError(f"secrets.{name}: vr writes only ike-, eap- and private- secrets")
    data = _text(section, name, "secret")
    if not data.startswith("0s"):
        raise SwanctlError(f"secrets.{name}.secret: not in the 0s (base64) form")
    try:
        decoded = base64.b64decode(data[2:], validate=True)
    except ValueError:
        raise SwanctlError(f"secrets.{name}.secret: not valid base64") from None
    owners = [v for k, v in section.items() if k.startswith("id") and isinstance(v, str)]
    out.shared[name] = {"id": name, "type": kind.upper(), "data": decoded, "owners": owners}


def _text(section: Tree, name: str, key: str) -> str:
    item = section.get(key)
    if not isinstance(item, str):
        raise SwanctlError(f"secrets.{name}.{key} is missing")
    return item
