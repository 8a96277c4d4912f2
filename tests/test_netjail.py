"""The jail itself must hold: these tests prove it refuses before any packet is sent."""

import socket
import subprocess
import sys

import pytest

import netjail


def test_jail_refuses_private_and_public_addresses():
    start = len(netjail.violations)
    for addr in [("10.0.0.1", 80), ("169.254.169.254", 80), ("192.168.1.1", 80), ("8.8.8.8", 53)]:
        with socket.socket() as s, pytest.raises(netjail.JailViolation):
            s.connect(addr)
    with pytest.raises(netjail.JailViolation):
        socket.getaddrinfo("example.com", 80)
    del netjail.violations[start:]  # provoked on purpose


def test_jail_allows_loopback():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass


def test_subprocesses_are_jailed():
    code = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('10.1.2.3', 80), timeout=1)\n"
        "except OSError as e:\n"
        "    print(type(e).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "JailViolation"
