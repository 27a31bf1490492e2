"""Run a client snippet as a user would, on a machine with no internet.

Shared by the client tests (tests/e2e/test_clients.py, tests/e2e/test_rerank_stack.py).
"""

from __future__ import annotations

#: Runs a script with the internet unreachable: every non-loopback lookup or connect raises
#: (as on a machine with no network) and is logged to $OFFLINE_GUARD_LOG, so a library that
#: swallows the error is caught too.
OFFLINE_BOOT = r"""
import ipaddress, os, runpy, socket, sys

def _local(host):
    host = host.decode() if isinstance(host, bytes) else host
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False

def _refuse(what):
    with open(os.environ["OFFLINE_GUARD_LOG"], "a") as log:
        log.write(what + "\n")
    raise OSError(101, "no network in this test: refused " + what)

_getaddrinfo, _connect, _connect_ex = (
    socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex)

def getaddrinfo(host, *args, **kwargs):
    if not _local(host):
        _refuse("lookup " + str(host))
    return _getaddrinfo(host, *args, **kwargs)

def _check(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        _refuse("connect " + str(address[0]))

def connect(self, address):
    _check(self, address)
    return _connect(self, address)

def connect_ex(self, address):
    _check(self, address)
    return _connect_ex(self, address)

socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = (
    getaddrinfo, connect, connect_ex)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
