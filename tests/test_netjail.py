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


def test_jail_refuses_lookups_of_anything_but_loopback():
    """Forward and reverse name-service calls: each refusal is raised and recorded."""
    calls = [
        lambda: socket.gethostbyname("example.com"),
        lambda: socket.gethostbyname_ex("metadata.google.internal"),
        lambda: socket.gethostbyname(b"example.com"),
        lambda: socket.gethostbyaddr("8.8.8.8"),
        lambda: socket.gethostbyaddr("example.com"),
        lambda: socket.getnameinfo(("169.254.169.254", 80), 0),
        lambda: socket.getnameinfo(("2001:4860:4860::8888", 53, 0, 0), 0),
    ]
    start = len(netjail.violations)
    for call in calls:
        with pytest.raises(netjail.JailViolation):
            call()
    assert len(netjail.violations) == start + len(calls)
    del netjail.violations[start:]  # provoked on purpose


def test_jail_allows_loopback_lookups():
    assert socket.gethostbyname("127.0.0.1") == "127.0.0.1"
    assert socket.gethostbyname_ex("127.0.0.1") == ("127.0.0.1", [], ["127.0.0.1"])
    numeric = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
    assert socket.getnameinfo(("127.0.0.1", 80), numeric) == ("127.0.0.1", "80")
    assert socket.getnameinfo(("::1", 80, 0, 0), numeric) == ("::1", "80")


def test_the_machines_own_name_is_answered_without_a_lookup():
    """``socket.getfqdn()`` (Beam's portable runner calls it) must neither fail nor look up."""
    start = len(netjail.violations)
    name = socket.gethostname()
    assert socket.gethostbyaddr(name) == (name, [], ["127.0.0.1"])
    assert socket.getfqdn() == name
    assert len(netjail.violations) == start


def test_jail_refuses_datagrams_to_other_addresses():
    start = len(netjail.violations)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        with pytest.raises(netjail.JailViolation):
            s.sendto(b"x", ("10.0.0.1", 9))
        with pytest.raises(netjail.JailViolation):
            s.sendto(b"x", 0, ("8.8.8.8", 53))
        with pytest.raises(netjail.JailViolation):
            s.sendmsg([b"x"], [], 0, ("169.254.169.254", 9))
    assert len(netjail.violations) == start + 3
    del netjail.violations[start:]  # provoked on purpose


def test_jail_lets_datagrams_reach_loopback():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(5)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            assert tx.sendmsg([b"via ", b"sendmsg"], [], 0, rx.getsockname()) == 11
            assert rx.recv(64) == b"via sendmsg"
            assert tx.sendto(b"via sendto", rx.getsockname()) == 10
            assert rx.recv(64) == b"via sendto"
            tx.connect(rx.getsockname())
            assert tx.sendmsg([b"connected"]) == 9  # no address: the connected peer
            assert rx.recv(64) == b"connected"


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
