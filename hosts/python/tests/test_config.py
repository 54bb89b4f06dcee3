"""The AnyEvent::MP configuration file, as the Rust host reads it."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

import aemp
from aemp.config import ConfigError, load_profile

from conftest import RustNode, RustNodes, echo

RC = """{
   "secret" : "top",   # defaults for every profile
   "monitor_timeout" : 5,
   "profile" : {
      "seed"  : { "binds" : ["127.0.0.1:0"], "framing_format" : ["json", "storable", "x"], },
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
    assert web.framings == ["json"]  # storable (and an unknown one) is never offered
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


async def test_node_from_config_talks_to_rust(rust: RustNodes, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    rc = tmp_path / "rc"
    rc.write_text(RC)
    monkeypatch.setenv("PERL_ANYEVENT_MP_RC", str(rc))
    async with await aemp.Node.from_config("seed", node_id="py-rc") as py:
        assert py.listen_addrs and py.listen_addrs[0].startswith("127.0.0.1:")
        await rust.dialed_by(py, "rust-rc", "top", "json")
        assert await echo(py, "rust-rc", "via the rc file") == ["via the rc file"]


def test_auth_keys_and_secure_as_the_rust_host_reads_them(tmp_path: Path) -> None:
    rc = tmp_path / "rc"
    rc.write_text('{"binds": [4040], "profile": {"a": {"auth_offer": ["hmac_sha3_512"],'
                  ' "auth_accept": ["tls_sha3_512", "hmac_sha3_512"], "secure": "0"},'
                  ' "b": {"secure": "yes"}, "c": {"monitor_timeout": -1}}}')
    a = load_profile("a", rc)
    assert a.auth_offer == ["hmac_sha3_512"]
    assert a.auth_accept == ["tls_sha3_512", "hmac_sha3_512"]
    assert a.binds == ["4040"]  # a number, as Perl has it
    assert a.secure is False  # Perl truthiness: "0" is false
    assert load_profile("b", rc).secure is True
    default = load_profile("x", tmp_path / "missing")
    assert default.auth_offer == ["tls_sha3_512", "hmac_sha3_512"]
    assert default.auth_accept == ["tls_sha3_512", "hmac_sha3_512", "tls_anon", "cleartext"]
    assert default.secure is False
    with pytest.raises(ConfigError, match="monitor_timeout"):
        load_profile("c", rc)


async def test_unknown_framing_given_to_start_is_an_error() -> None:
    with pytest.raises(aemp.AempError, match="unknown framing 'storable'"):
        await aemp.Node.start("py-storable", framings=["json", "storable"])


async def test_unknown_auth_method_is_an_error(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    rc = tmp_path / "rc"
    # AnyEvent::MP 1.x's method: the engine (AEMP 2) does not know it.
    rc.write_text('{"auth_offer": ["tls_md6_64_256"]}')
    monkeypatch.setenv("PERL_ANYEVENT_MP_RC", str(rc))
    with pytest.raises(aemp.AempError, match="unknown auth method 'tls_md6_64_256'"):
        await aemp.Node.from_config("x", node_id="py-md6")


async def handshake_log(profile: str, peer: RustNode) -> str:
    """Connects a node of ``profile`` to ``peer``; the first connect or disconnect line."""
    async with await aemp.Node.from_config(profile, node_id=f"py-{profile}") as py:
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def on_log(level: str, message: str) -> None:
            if (" connected as " in message or " disconnected - " in message) \
                    and not done.done():
                done.set_result(message)

        py.on("log", on_log)
        py.connect(peer.addr)
        return await asyncio.wait_for(done, 10)


async def test_auth_keys_restrict_the_handshake_with_rust(
        rust: RustNodes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tls_peer = await rust.start("rust-auth-tls", "top", cert=True)
    hmac_peer = await rust.start("rust-auth-hmac", "top")
    rc = tmp_path / "rc"
    tls_only = ["tls_sha3_512"]
    hmac_only = ["hmac_sha3_512"]
    rc.write_text(json.dumps({"secret": "top", "cert": tls_peer.rc["cert"], "profile": {
        "tls": {"auth_offer": tls_only, "auth_accept": tls_only},
        "hmac": {"cert": None, "auth_offer": hmac_only, "auth_accept": hmac_only},
        "hmac-in-tls": {"auth_offer": hmac_only},
        "tls-without-cert": {"cert": None, "auth_accept": tls_only},
    }}))
    monkeypatch.setenv("PERL_ANYEVENT_MP_RC", str(rc))
    assert (await handshake_log("tls", tls_peer)).endswith(
        "connected as rust-auth-tls (tls_sha3_512/tls_sha3_512 cbor/cbor, tls).")
    assert (await handshake_log("hmac", hmac_peer)).endswith(
        "connected as rust-auth-hmac (hmac_sha3_512/hmac_sha3_512 cbor/cbor).")
    # Inside TLS only tls_* methods may be sent (the reference's rule and text).
    assert (await handshake_log("hmac-in-tls", tls_peer)).endswith(
        "disconnected - hmac_sha3_512: fatal, selected unsupported snd auth method.")
    # Accepting only a TLS method with no TLS: the peer finds nothing it may send.
    assert " disconnected - " in await handshake_log("tls-without-cert", hmac_peer)


async def test_binds_as_the_rust_host_reads_them(rust: RustNodes) -> None:
    seed = await rust.start("rust-binds", "s")
    # A bare number is that port on every interface (0: a dynamic one), a port `*` a
    # dynamic one.
    async with await aemp.Node.start("py-binds", secret="s", binds=["0", "127.0.0.1:*"],
                                     seeds=[seed.addr]) as py:
        every, local = py.listen_addrs
        assert every.startswith("0.0.0.0:") and local.startswith("127.0.0.1:")
        assert not every.endswith(":0") and not local.endswith(":0")
        await py.wait_up("rust-binds")
        # The unspecified address is announced as the host name.
        listeners = (await py.db_family("'l"))["py-binds"]
        assert listeners == [f"{socket.gethostname()}:{every.rpartition(':')[2]}", local]
    with pytest.raises(aemp.AempError, match="cannot listen on 127.0.0.1:x"):
        await aemp.Node.start("py-bad-bind", binds=["127.0.0.1:x"])
