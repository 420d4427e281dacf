"""Runs an ipykernel-based kernel (``ipykernel_launcher``, ``bash_kernel``)
with every socket on Unix sockets.

The connection file already asks for ZeroMQ's ``ipc`` transport, but
ipykernel also binds one socket of its own on TCP: the IOPub "pipe" that
forked children (``os.fork``, ``multiprocessing``) send their output
through, on ``tcp://127.0.0.1:<random>``. gVisor's checkpoint cannot save a
listening TCP socket that sits in an epoll set (the save fails and the
sandbox is lost), so this binds that pipe on ``ipc://`` instead and then
runs the kernel module as ``python -m`` would.

Usage (a kernelspec's argv): python3 ipc_kernel.py MODULE -f {connection_file}
"""

import os
import runpy
import sys
import tempfile

import zmq
from ipykernel import iostream
from zmq.eventloop.zmqstream import ZMQStream


def _bind_pipe_in(self):
    self._pipe_uuid = os.urandom(16)
    pipe_in = self.socket.context.socket(zmq.PULL)
    pipe_in.linger = 0
    path = os.path.join(tempfile.gettempdir(), f"ipykernel-pipe-{os.getpid()}-{os.urandom(4).hex()}")
    self._pipe_endpoint = "ipc://" + path
    pipe_in.bind(self._pipe_endpoint)
    self._pipe_in = ZMQStream(pipe_in, self.io_loop)
    self._pipe_in.on_recv(self._handle_pipe_msg)


def _connect_pipe_out(self):
    # A forked child needs a context of its own.
    ctx = zmq.Context()
    pipe_out = ctx.socket(zmq.PUSH)
    pipe_out.linger = 3000
    pipe_out.connect(self._pipe_endpoint)
    return ctx, pipe_out


iostream.IOPubThread._setup_pipe_in = _bind_pipe_in
iostream.IOPubThread._setup_pipe_out = _connect_pipe_out

if __name__ == "__main__":
    module = sys.argv.pop(1)
    # As `python -m module`: the working directory first on the path (so
    # code imports modules beside it), and no trace of this file.
    sys.path[0] = os.getcwd()
    runpy.run_module(module, run_name="__main__", alter_sys=True)
