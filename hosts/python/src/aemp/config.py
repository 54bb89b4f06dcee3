"""AnyEvent::MP's configuration file, read as the Rust host reads it.

The file is ``$PERL_ANYEVENT_MP_RC``, else ``~/.perl-anyevent-mp``: JSON in JSON::XS
relaxed mode (``#`` comments, trailing commas). A profile is the built-in defaults, then
the top-level keys, then the profile's ``parent`` chain from the farthest ancestor down to
the profile itself; ``null`` means "not set". Covered keys: ``nodeid``, ``secret``,
``cert``, ``binds``, ``seeds``, ``framing_format``, ``auth_offer``, ``auth_accept``,
``monitor_timeout``, ``connect_interval``, ``secure``, ``parent``; others are ignored.
``secure`` is read (Perl truthiness) but changes nothing: the engine never executes code
sent by other nodes, so the node always behaves as ``secure`` asks.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._node import FRAMINGS

DEFAULTS: dict[str, Any] = {
    "monitor_timeout": 30,
    "connect_interval": 2,
    "framing_format": ["cbor", "json", "storable"],
    "auth_offer": ["tls_sha3_512", "hmac_sha3_512"],
    "auth_accept": ["tls_sha3_512", "hmac_sha3_512", "tls_anon", "cleartext"],
    "binds": ["*"],
    "seeds": [],
    "secure": False,
}


class ConfigError(ValueError):
    """The file cannot be read or a key has the wrong type."""


@dataclass
class Profile:
    """A resolved profile: keyword arguments for :meth:`aemp.Node.start` via
    :meth:`options`."""

    name: str
    node_id: str
    secret: str | None = None
    cert: str | None = None
    binds: list[str] = field(default_factory=list)
    seeds: list[str] = field(default_factory=list)
    framings: list[str] = field(default_factory=list)
    auth_offer: list[str] = field(default_factory=list)
    auth_accept: list[str] = field(default_factory=list)
    monitor_timeout: float = 30.0
    connect_interval: float = 2.0
    #: Never passed on: nothing sent by another node is ever executed.
    secure: bool = False

    def options(self) -> dict[str, Any]:
        """The profile as ``Node.start`` keyword arguments (``node_id`` included)."""
        return {
            "node_id": self.node_id,
            "secret": self.secret,
            "cert": self.cert,
            "binds": self.binds,
            "seeds": self.seeds,
            "framings": self.framings,
            "auth_offer": self.auth_offer,
            "auth_accept": self.auth_accept,
            "monitor_timeout_ms": int(self.monitor_timeout * 1000),
            "connect_interval_ms": int(self.connect_interval * 1000),
        }


def rc_path() -> Path:
    """``$PERL_ANYEVENT_MP_RC``, else ``~/.perl-anyevent-mp``."""
    return Path(os.environ.get("PERL_ANYEVENT_MP_RC") or Path.home() / ".perl-anyevent-mp")


def strict_json(text: str) -> str:
    """JSON::XS relaxed text as strict JSON: ``#`` comments (outside strings, to the end of
    the line) and a trailing comma before ``]`` or ``}`` become spaces."""
    out: list[str] = []
    in_string = escaped = in_comment = False
    comma: int | None = None  # index in out of a comma followed only by blanks so far
    for ch in text:
        if in_comment:
            if ch == "\n":
                in_comment = False
                out.append(ch)
            continue
        if in_string:
            out.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == "#":
            in_comment = True
            continue
        if ch in "]}" and comma is not None:
            out[comma] = " "
        if ch == ",":
            comma = len(out)
        elif not ch.isspace():
            comma = None
        if ch == '"':
            in_string = True
        out.append(ch)
    return "".join(out)


def read_rc(path: Path | None = None) -> dict[str, Any]:
    """The file as a dict; a missing or empty file is ``{}``."""
    path = path or rc_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"{path}: {e}") from e
    text = strict_json(text)
    if not text.strip():
        return {}
    try:
        rc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: "
                          f"{e.msg}") from e
    if not isinstance(rc, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return rc


def _chain(rc: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The profile and its parents, nearest first; a missing one contributes nothing."""
    profiles = rc.get("profile") or {}
    if not isinstance(profiles, dict):
        raise ConfigError("configuration key `profile`: expected an object")
    chain: list[dict[str, Any]] = []
    seen: list[str] = []
    current: Any = name
    while isinstance(current, str) and current in profiles:
        if current in seen:
            raise ConfigError(f"configuration profiles have a parent cycle: "
                              f"{' -> '.join([*seen, current])}")
        seen.append(current)
        profile = profiles[current]
        if not isinstance(profile, dict):
            raise ConfigError(f"configuration key `profile.{current}`: expected an object")
        chain.append(profile)
        current = profile.get("parent")
    return chain


def resolve(rc: dict[str, Any], name: str | None = None) -> Profile:
    """Profile ``name`` (default: the host name) of ``rc``."""
    hostname = socket.gethostname()
    name = name or hostname
    merged: dict[str, Any] = {}
    for layer in [rc, *reversed(_chain(rc, name))]:
        merged.update({k: v for k, v in layer.items() if k != "profile"})

    def get(key: str) -> Any:
        value = merged.get(key)
        return DEFAULTS.get(key) if value is None else value

    def strings(key: str) -> list[str]:
        value = get(key)
        # Numbers count as strings, as Perl would have them (a bind of 4040).
        if not isinstance(value, list) or not all(_scalar(v) for v in value):
            raise ConfigError(f"configuration key `{key}`: expected a list of strings")
        return [str(v) for v in value]

    def seconds(key: str) -> float:
        value = get(key)
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            number = -1.0
        if isinstance(value, bool) or not 0 <= number < float("inf"):
            raise ConfigError(f"configuration key `{key}`: expected a non-negative number "
                              "of seconds")
        return number

    def text(key: str) -> str | None:
        value = get(key)
        if value is None:
            return None
        if not _scalar(value):
            raise ConfigError(f"configuration key `{key}`: expected a string")
        return str(value)

    return Profile(
        name=name,
        node_id=text("nodeid") or f"{name}/",
        secret=text("secret"),
        cert=text("cert"),
        binds=strings("binds"),
        seeds=strings("seeds"),
        # Others (AnyEvent::MP's storable, unknown names) are never offered, as the Rust
        # host drops them.
        framings=[f for f in strings("framing_format") if f in FRAMINGS],
        auth_offer=strings("auth_offer"),
        auth_accept=strings("auth_accept"),
        monitor_timeout=seconds("monitor_timeout"),
        connect_interval=seconds("connect_interval"),
        secure=_perl_true(get("secure")),
    )


def _scalar(value: Any) -> bool:
    """A string or a number (JSON ``true`` is neither)."""
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _perl_true(value: Any) -> bool:
    """Perl truthiness: null, false, 0, "" and "0" are false."""
    if isinstance(value, str):
        return value not in ("", "0")
    return isinstance(value, (list, dict)) or bool(value)


def load_profile(name: str | None = None, path: Path | None = None) -> Profile:
    """Reads the file (:func:`rc_path` unless ``path``) and resolves profile ``name``."""
    return resolve(read_rc(path), name)
