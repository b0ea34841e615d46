"""Executing notebooks in tests: a kernel of this interpreter, offline, behind a guard that blocks the network.

``execute(nb, workdir)`` runs a notebook top to bottom with nbclient in a fresh kernel started from
``sys.executable`` (a kernelspec written to a temporary folder, so a user's own ``python3`` kernelspec can
never pick another interpreter) and raises ``CellExecutionError`` on the first failing cell.

The guard is an IPython startup file (in a temporary ``IPYTHONDIR``) that runs in the kernel before the
first cell: it patches Python's ``socket`` so that resolving a host name other than localhost, or
connecting / sending to an address that is not loopback, raises ``NetworkBlocked`` (a ``RuntimeError``, so
that HTTP clients do not mistake it for a connection error and fall back silently). Every attempt is also
recorded in ``socket.headlab_blocked``, and ``execute`` appends a last cell that fails when the list is
not empty: a notebook that swallows the exception still fails. Subprocesses a notebook starts are not
guarded (headlab's notebooks start none); loopback and Unix sockets stay allowed (the kernel needs them).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

KERNEL_NAME = "headlab-test"
CHECK_CELL = (
    "import socket as _socket\n"
    "assert not getattr(_socket, 'headlab_blocked', None), "
    "f'the notebook tried to reach the network: {_socket.headlab_blocked}'"
)

GUARD = '''\
"""headlab's notebook tests: nothing leaves this machine (loopback and Unix sockets are allowed)."""


def _headlab_block_network():
    import ipaddress
    import socket

    class NetworkBlocked(RuntimeError):
        """A notebook tried to reach the network; headlab's notebooks run offline."""

    blocked = []
    socket.NetworkBlocked = NetworkBlocked
    socket.headlab_blocked = blocked

    def refuse(what):
        blocked.append(what)
        raise NetworkBlocked(f"network access is blocked while headlab's notebooks run: {what}")

    def local_name(host):
        if isinstance(host, (bytes, bytearray)):
            host = host.decode("ascii", "replace")
        if host is None or host in ("", "localhost", "localhost.localdomain", "ip6-localhost"):
            return True
        try:
            return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return False

    def numeric(host):
        if isinstance(host, (bytes, bytearray)):
            host = host.decode("ascii", "replace")
        try:
            ipaddress.ip_address(str(host).split("%")[0])
            return True
        except ValueError:
            return False

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple) and address:
            if not local_name(address[0]):
                kind = "UDP datagram" if sock.type == socket.SOCK_DGRAM else "connection"
                refuse(f"{kind} to {address[0]} port {address[1] if len(address) > 1 else '?'}")

    connect, connect_ex, sendto = socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto

    def guarded_connect(self, address):
        check(self, address)
        return connect(self, address)

    def guarded_connect_ex(self, address):
        check(self, address)
        return connect_ex(self, address)

    def guarded_sendto(self, data, *args):
        check(self, args[-1])
        return sendto(self, data, *args)

    socket.socket.connect = guarded_connect
    socket.socket.connect_ex = guarded_connect_ex
    socket.socket.sendto = guarded_sendto

    def resolver(original):
        def guarded(host, *args, **kwargs):
            # IP literals resolve without the network; connecting to them is checked above.
            if not (local_name(host) or numeric(host)):
                refuse(f"name lookup of {host!r}")
            return original(host, *args, **kwargs)

        return guarded

    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex"):
        setattr(socket, name, resolver(getattr(socket, name)))


_headlab_block_network()
del _headlab_block_network
'''


def setup_kernel(root: Path) -> tuple[KernelSpecManager, dict[str, str]]:
    """A kernelspec for this interpreter and an IPython profile whose startup file installs the guard."""
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True, exist_ok=True)
    ipython_dir = root / "ipython"
    startup = ipython_dir / "profile_default" / "startup"
    startup.mkdir(parents=True, exist_ok=True)
    (startup / "00-headlab-offline.py").write_text(GUARD, encoding="utf-8")
    env = {"IPYTHONDIR": str(ipython_dir), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-Xfrozen_modules=off", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "headlab tests (this interpreter, offline)", "language": "python", "env": env}),
        encoding="utf-8")
    return KernelSpecManager(kernel_dirs=[str(root / "kernels")]), env


def execute(nb: nbformat.NotebookNode, workdir: Path, kernel_root: Path, timeout: int = 600
            ) -> nbformat.NotebookNode:
    """Run a copy of ``nb`` top to bottom in ``workdir`` (its cwd) with the network guard; returns the
    executed copy. Raises ``nbclient.exceptions.CellExecutionError`` on the first failing cell, including
    the appended check that no network access was attempted."""
    specs, env = setup_kernel(kernel_root)
    nb = copy.deepcopy(nb)
    nb.cells.append(nbformat.v4.new_code_cell(CHECK_CELL, id="headlab-network-check"))
    # The connection file goes to the temporary folder too: nothing is written under the user's home.
    km = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs,
                            connection_file=str(kernel_root / "connection.json"))
    client = NotebookClient(nb, km=km, timeout=timeout, kernel_name=KERNEL_NAME, allow_errors=False,
                            resources={"metadata": {"path": str(workdir)}})
    # The kernel inherits this process's environment (HEADLAB_HOME, thread counts) plus the spec's env. One
    # torch thread unless the caller chose: on a shared CI machine more threads than free cores made a
    # notebook ten times slower (04 took 10 min at 2 threads on a busy 2-core machine, 67 s at 1).
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    # cleanup_kc: shut the kernel down afterwards (nbclient keeps a kernel it did not create alive).
    client.execute(env={**os.environ, **env, **threads}, cleanup_kc=True)
    return nb
