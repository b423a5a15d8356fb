"""The pre-flight port check: a taken port is named by its flag before a service loads anything."""

from __future__ import annotations

import socket

import pytest

from pagedserve.ports import ListenPort, PortInUseError, check_ports


@pytest.fixture
def taken_port():
    """A port on 127.0.0.1 that another socket is listening on for the test's duration."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_listening_port_is_reported_with_its_flag(taken_port):
    with pytest.raises(PortInUseError) as raised:
        check_ports([ListenPort("--metrics-port", "127.0.0.1", taken_port)])
    message = str(raised.value)
    assert message.startswith(f"--metrics-port: cannot listen on 127.0.0.1:{taken_port}: ")
    assert "already in use" in message
    assert raised.value.listen.flag == "--metrics-port"


def test_the_first_taken_port_is_named(taken_port):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        free_port = free.getsockname()[1]
    with pytest.raises(PortInUseError, match=r"^--http-port: "):
        check_ports([ListenPort("--port", "127.0.0.1", free_port),
                     ListenPort("--http-port", "127.0.0.1", taken_port)])


def test_free_ephemeral_and_disabled_ports_pass(taken_port):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        free_port = free.getsockname()[1]
    check_ports([ListenPort("--port", "127.0.0.1", free_port), ListenPort("--port", "127.0.0.1", 0),
                 ListenPort("--metrics-port", "127.0.0.1", -1)])


def test_a_host_that_is_not_ours_is_named_too():
    with pytest.raises(PortInUseError, match=r"^--port: cannot listen on 192\.0\.2\.1:5"):
        check_ports([ListenPort("--port", "192.0.2.1", 50051)])      # TEST-NET-1: never a local address


def test_a_port_in_time_wait_is_free():
    """A restarted service binds again while its old connections linger (SO_REUSEADDR, as the servers)."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()                    # the server side closes first: its end goes to TIME_WAIT
        client.close()
    check_ports([ListenPort("--port", "127.0.0.1", port)])
