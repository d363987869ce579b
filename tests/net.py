"""Ports for servers the tests start: the one place a test asks the OS for a free TCP port on 127.0.0.1.

Every server a test starts (``mlflow server``, sshd, a Ray head) binds the loopback address only, never the machine's
network address: see docs/traps.md ("keep Ray on loopback").
"""

from __future__ import annotations

import socket

#: The only address test servers bind.
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    The OS picks it; the socket is closed at once, so the caller's server can bind it. Also serves as a port that
    refuses connections (nothing is started on it), for tests of an unreachable server.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]
