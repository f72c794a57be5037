"""``meshward demo``: the namespace-jail lockdown on an embedded control plane.

An emojivoto-like application (web, emoji, voting and a vote bot in namespace ``emojivoto``) and
an outsider in another namespace, all meshed; every call is made before and after
``samples/namespace-jail-server-authorization.yaml`` is applied with kubectl, and a table shows
what was expected, what the real proxies did, and which rule decided. Transparent mode (root:
injected pods in network namespaces) where it can run, local mode (processes on loopback)
elsewhere. The command runs :func:`meshward.demo._run.run`; this module stays light, since the
command line imports it for every command.
"""

from __future__ import annotations

import argparse
import pathlib


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        choices=("auto", "local", "transparent"),
        default="auto",
        help="transparent: injected pods as network namespaces with interception (needs root); "
        "local: processes on loopback; auto (default): transparent where it can run",
    )
    parser.add_argument(
        "--keep-logs",
        metavar="DIR",
        type=pathlib.Path,
        help="copy every component's log into DIR before cleaning up",
    )
