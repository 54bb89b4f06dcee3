"""The AnyEvent::MP configuration file, as the Rust host reads it."""

from __future__ import annotations

from pathlib import Path

import pytest

import aemp
from aemp.config import ConfigError, load_profile

from conftest import RustNode, rust_node

RC = """{
   "secret" : "top",   # defaults for every profile
   "monitor_timeout" : 5,
   "profile" : {
      "seed"  : { "binds" : ["127.0.0.1:0"], "framing_format" : ["json", "storable"], },
      "web"   : { "parent" : "seed", "nodeid" : "web/%n", "secret" : null },
   },
}
"""


def test_profiles_layer_defaults_top_level_and_parents(tmp_path: Path) -> None:
    rc = tmp_path / "rc"
    rc.write_text(RC)
    web = load_profile("web", rc)
    assert web.node_id == "web/%n"  # expanded by the engine when the node starts
    assert web.secret is None  # null: not set, the built-in default (none) applies
    assert load_profile("seed", rc).secret == "top"
    assert web.binds == ["127.0.0.1:0"]
    assert web.framings == ["json"]  # storable is never offered
    assert web.monitor_timeout == 5 and web.connect_interval == 2
    other = load_profile("box", rc)
    assert other.node_id == "box/" and other.binds == ["*"]
    assert other.framings == ["cbor", "json"]
    assert load_profile("x", tmp_path / "missing").secret is None


def test_bad_files_are_errors(tmp_path: Path) -> None:
    rc = tmp_path / "rc"
    rc.write_text('{"profile": {"a": {"parent": "b"}, "b": {"parent": "a"}}}')
    with pytest.raises(ConfigError, match="parent cycle: a -> b -> a"):
        load_profile("a", rc)
    rc.write_text('{"seeds": 7}')
    with pytest.raises(ConfigError, match="seeds"):
        load_profile("a", rc)
    rc.write_text("[1]")
    with pytest.raises(ConfigError, match="top level"):
        load_profile("a", rc)


async def test_node_from_config_talks_to_rust(rust: list[RustNode], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    r = await rust_node("rust-rc", "top", "json")
    rust.append(r)
    rc = tmp_path / "rc"
    rc.write_text(RC)
    monkeypatch.setenv("PERL_ANYEVENT_MP_RC", str(rc))
    async with await aemp.Node.from_config("seed", node_id="py-rc") as py:
        assert py.listen_addrs and py.listen_addrs[0].startswith("127.0.0.1:")
        py.connect(r.addr)
        await py.wait_up("rust-rc")
        port = py.port()
        await py.send("rust-rc#echo", port.id, "via the rc file")
        assert await port.recv() == ["via the rc file"]
