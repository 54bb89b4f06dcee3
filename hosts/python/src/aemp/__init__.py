"""AEMP (AnyEvent::MP's node protocol) for asyncio: the aemp engine component on
wasmtime does the protocol, this package the sockets, TLS, time and API.

>>> node = await aemp.Node.start("py/", secret="shared", binds=["127.0.0.1:0"])
"""

from ._node import (AempError, ClosedError, Node, Port, PortFullError, RefusedError, decode,
                    tls_contexts)

__all__ = ["AempError", "ClosedError", "Node", "Port", "PortFullError", "RefusedError", "decode",
           "tls_contexts"]
