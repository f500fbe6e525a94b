"""Starts one node of the earlier Python implementation (a checkout of the public repository
ThiagoAVicente/Distributed-Pytest, never committed here) with its HTTP port taken from the
environment: upstream hard-codes Flask's port 10000, so several nodes cannot share a host.

Usage: python reference_launcher.py <checkout> ; environment as upstream (NODE_PORT, HOST,
OUTSIDE_IP, OUTSIDE_PORT, API_PORT). The node's working directory is the current directory.
"""
import os
import runpy
import sys

checkout = os.path.abspath(sys.argv[1])
src = os.path.join(checkout, "src")
sys.path.insert(0, src)

import api  # noqa: E402  (the reference's module, from the checkout)

_original_init = api.FlaskInterface.__init__


def _init_with_port(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    self.http_port = int(os.environ["API_PORT"])


api.FlaskInterface.__init__ = _init_with_port
sys.argv = [os.path.join(src, "initNode.py")]
runpy.run_path(os.path.join(src, "initNode.py"), run_name="__main__")
