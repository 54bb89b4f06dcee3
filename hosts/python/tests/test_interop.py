"""The Python node and the Rust `aemp` node on loopback."""

from __future__ import annotations

import asyncio
import gc

import cbor2
import pytest

import aemp
from aemp import _engine

from conftest import RustNodes, assert_sender_held_back, echo, logs_of


@pytest.mark.parametrize("framing", ["json", "cbor"])
async def test_messages_both_ways(rust: RustNodes, framing: str) -> None:
    async with await aemp.Node.start(f"py-{framing}", secret="shared",
                                     framings=[framing]) as py:
        logs = logs_of(py)
        await rust.dialed_by(py, f"rust-{framing}", "shared", framing)
        assert any(f"connected as rust-{framing} (hmac_sha3_512/hmac_sha3_512 "
                   f"{framing}/{framing})" in line for line in logs), logs
        args = ["hello", 42, {"k": [1.5, True, None]}]
        assert await echo(py, f"rust-{framing}", *args) == args


async def test_rust_connects_to_python(rust: RustNodes) -> None:
    async with await aemp.Node.start("py-listen", secret="shared",
                                     binds=["127.0.0.1:0"]) as py:
        # cbor (the default): a json link turns byte strings into text.
        await rust.dialing(py, "rust-dialer", "shared")
        assert await echo(py, "rust-dialer", b"\x00\x01\xff", 2**70) == [b"\x00\x01\xff", 2**70]


async def test_wrong_secret_refused_with_reference_text(rust: RustNodes) -> None:
    r = await rust.start("rust-secret", "right")
    async with await aemp.Node.start("py-secret", secret="wrong") as py:
        refused = asyncio.get_running_loop().create_future()

        def on_log(level: str, message: str) -> None:
            if "authentication failure/shared secret mismatch" in message and not refused.done():
                refused.set_result(message)

        py.on("log", on_log)
        py.connect(r.addr)
        message = await asyncio.wait_for(refused, 10)
        assert message.endswith("disconnected - authentication failure/shared secret mismatch.")
        assert not py.is_up("rust-secret")


async def test_tls_with_reference_certificate(rust: RustNodes) -> None:
    r = await rust.start("rust-tls", "shared", cert=True)
    cert = r.rc["cert"]
    assert isinstance(cert, str)
    async with await aemp.Node.start("py-tls", secret="shared", cert=cert) as py:
        logs = logs_of(py)
        py.connect(r.addr)
        await py.wait_up("rust-tls")
        assert any("connected as rust-tls (tls_sha3_512/tls_sha3_512 cbor/cbor, tls)" in line
                   for line in logs), logs
        assert await echo(py, "rust-tls", b"\x00\x01\xff") == [b"\x00\x01\xff"]


async def test_monitor_fires_on_kill(rust: RustNodes) -> None:
    async with await aemp.Node.start("py-mon", secret="shared") as py:
        await rust.dialed_by(py, "rust-mon", "shared")
        watched = asyncio.ensure_future(py.monitor("rust-mon#echo"))
        await asyncio.sleep(0.2)
        assert not watched.done()
        py.kill("rust-mon#echo", "bye", 7)
        assert await asyncio.wait_for(watched, 10) == ["bye", 7]


async def test_found_through_rust_seed(rust: RustNodes) -> None:
    seed = await rust.start("rust-seed", "shared")
    async with await aemp.Node.start("py-a", secret="shared", binds=["127.0.0.1:0"],
                                     seeds=[seed.addr]) as a, \
            await aemp.Node.start("py-b", secret="shared", binds=["127.0.0.1:0"],
                                  seeds=[seed.addr]) as b:
        inbox = a.port("inbox")
        await b.wait_up("rust-seed")
        # b knows nothing of a but its id: the seed tells it where a listens.
        await b.send("py-a#inbox", "found")
        assert await asyncio.wait_for(inbox.recv(), 15) == ["found"]


async def test_unusual_cbor_survived(rust: RustNodes) -> None:
    async with await aemp.Node.start("py-cbor", secret="shared") as py:
        await rust.dialed_by(py, "rust-cbor", "shared")
        odd = [-(2**80), b"", {1: "int key"}, float("inf"), "\u00e9\U0001f600", [[[[]]]]]
        assert await echo(py, "rust-cbor", *odd) == odd
        # A tagged value cbor2 does not know decodes as a CBORTag.
        assert await echo(py, "rust-cbor", cbor2.CBORTag(4711, "x")) == [cbor2.CBORTag(4711, "x")]
        # Tags whose content cbor2 cannot give their meaning stay tags; simple values and
        # undefined survive.
        odd = [cbor2.CBORTag(1, "not a time"), cbor2.CBORTag(36, 5), cbor2.undefined,
               cbor2.CBORSimpleValue(99)]
        assert await echo(py, "rust-cbor", *odd) == odd
        assert py.is_up("rust-cbor")


async def test_close_delivers_queued() -> None:
    async with await aemp.Node.start("py-close-rx", secret="shared",
                                     binds=["127.0.0.1:0"]) as rx:
        inbox = rx.port("inbox")
        tx = await aemp.Node.start("py-close-tx", secret="shared")
        tx.connect(rx.listen_addrs[0])
        # Queued before the node is even connected: close() must still send them.
        sends = [asyncio.ensure_future(tx.send("py-close-rx#inbox", i)) for i in range(100)]
        await asyncio.gather(*sends)
        await tx.close()
        got = [(await asyncio.wait_for(inbox.recv(), 10))[0] for _ in range(100)]
        assert got == list(range(100))


async def test_refusal_carries_kind() -> None:
    async with await aemp.Node.start("py-refuse") as py:
        py.port("taken")
        with pytest.raises(aemp.RefusedError) as e:
            py.port("taken")
        assert e.value.kind == "port-exists"
        with pytest.raises(aemp.RefusedError) as e:
            await py.send("#no-node", 1)
        assert e.value.kind == "invalid-port-id"
    with pytest.raises(aemp.ClosedError):
        await py.send("x#y", 1)


async def test_thousand_nodes_leave_no_instances() -> None:
    for i in range(1000):
        node = await aemp.Node.start(f"py-life-{i}", binds=["127.0.0.1:0"])
        node.port()
        await node.close()
    gc.collect()
    assert len(_engine.live_instances) == 0


async def test_garbage_from_raw_sockets_harms_nothing(rust: RustNodes) -> None:
    async with await aemp.Node.start("py-garbage", secret="shared",
                                     binds=["127.0.0.1:0"]) as py:
        host, port_no = py.listen_addrs[0].rsplit(":", 1)
        for junk in [b"\x00" * 100 + b"\n", b"aemp;1;x;;;\n" + b"\xff" * 5000, b"GET / HTTP/1.0\r\n\r\n",
                     b"a" * 70000]:
            reader, writer = await asyncio.open_connection(host, int(port_no))
            writer.write(junk)
            await writer.drain()
            await asyncio.wait_for(reader.read(), 10)  # the node hangs up
            writer.close()
        await rust.dialing(py, "rust-after", "shared")
        assert await echo(py, "rust-after", "still here") == ["still here"]


async def test_full_port_holds_the_sender_back() -> None:
    async with await aemp.Node.start("py-bp-rx", secret="s", binds=["127.0.0.1:0"],
                                     port_capacity=8) as rx, \
            await aemp.Node.start("py-bp-tx", secret="s") as tx:
        # At its capacity, plus one read's worth.
        await assert_sender_held_back(rx, tx, lambda inbox: inbox.pending < 8 + 64)


async def raw_peer(py: aemp.Node, node_id: str, secret: str) -> tuple[asyncio.StreamReader,
                                                                      asyncio.StreamWriter]:
    """A socket that does the handshake by hand (cleartext: the token is the secret in
    hex, which the node accepts by default) and then speaks cbor framing."""
    host, port_no = py.listen_addrs[0].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port_no))
    writer.write(f"aemp;1;{node_id};hmac_sha3_512;cbor\nnonce\n"
                 f"cleartext;{secret.encode().hex()};cbor\n".encode())
    return reader, writer


async def test_malformed_cbor_cuts_off_that_connection_only(rust: RustNodes) -> None:
    async with await aemp.Node.start("py-malformed", secret="shared",
                                     binds=["127.0.0.1:0"]) as py:
        logs = logs_of(py)
        inbox = py.port("inbox")
        await rust.dialing(py, "rust-beside", "shared")
        head = b"\x82\x65inbox"  # ["inbox", ...: messages name the local port
        for name, bad, why in [
            ("utf8", b"\x82\x62\xff\xfe\x01", "malformed cbor: text string is not UTF-8"),
            ("reserved", head + b"\x1c", "malformed cbor: reserved additional information 28"),
            ("deep", head + b"\x81" * 300 + b"\x00", "message nested deeper than 128 levels"),
        ]:
            reader, writer = await raw_peer(py, f"raw-{name}", "shared")
            # A well-formed message first: the handshake worked.
            writer.write(cbor2.dumps(["inbox", name]))
            assert await asyncio.wait_for(inbox.recv(), 10) == [name]
            writer.write(bad)
            await asyncio.wait_for(reader.read(), 10)  # the node hangs up
            writer.close()
            assert any(line.endswith(f" disconnected - received message rejected: {why}.")
                       for line in logs), logs
            assert not py.is_up(f"raw-{name}")
            # The other connection is still served.
            assert await echo(py, "rust-beside", f"after {name}") == [f"after {name}"]
            assert py.is_up("rust-beside")


async def test_what_cbor2_cannot_represent_is_dropped_with_a_warning() -> None:
    async with await aemp.Node.start("py-odd-tag", secret="shared",
                                     binds=["127.0.0.1:0"]) as py:
        logs = logs_of(py)
        inbox = py.port("inbox")
        reader, writer = await raw_peer(py, "raw-odd", "shared")
        # Well-formed CBOR, so the engine passes it on: a bignum tag on a text string,
        # which cbor2 refuses to decode.
        writer.write(b"\x82\x65inbox\xc2\x61x" + cbor2.dumps(["inbox", "next"]))
        assert await asyncio.wait_for(inbox.recv(), 10) == ["next"]
        assert any(line.startswith(f"message for {inbox.id} dropped: ") and "bignum" in line
                   for line in logs), logs
        assert inbox.pending == 0 and py.is_up("raw-odd")
        writer.close()


async def test_keepalive_and_handshake_settings_reach_the_engine() -> None:
    async with await aemp.Node.start("py-keepalive", secret="shared", binds=["127.0.0.1:0"],
                                     keepalive_interval_ms=200, max_handshakes=1) as py:
        reader, writer = await raw_peer(py, "raw-idle", "shared")
        for _ in range(3):  # the node's greeting, nonce and auth lines
            await asyncio.wait_for(reader.readline(), 10)
        await py.wait_up("raw-idle")
        # Nothing is sent to the peer, yet the keepalive comes.
        assert await asyncio.wait_for(reader.read(1), 5)
        writer.close()
        # Two sockets in their handshake at once: one more than max_handshakes, so one
        # of them is closed at once; the other waits for its greeting.
        host, port_no = py.listen_addrs[0].rsplit(":", 1)
        pending = [await asyncio.open_connection(host, int(port_no)) for _ in range(2)]
        reads = [asyncio.ensure_future(r.read()) for r, _ in pending]
        done, waiting = await asyncio.wait(reads, timeout=5,
                                           return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(0.5)
        assert len(done) == 1 and len(waiting) == 1 and not any(t.done() for t in waiting)
        for task in waiting:
            task.cancel()
        for _, w in pending:
            w.close()
