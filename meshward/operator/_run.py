"""``meshward operator``: the same operator as ``kopf run -m meshward.operator -A``."""

from __future__ import annotations

import argparse
import asyncio
import logging

from meshward.operator import _settings


def run(args: argparse.Namespace) -> int:
    import kopf

    _settings.apply_arguments(args)
    _settings.from_env()  # fail fast, with the variable's name, before connecting anywhere
    import meshward.operator  # noqa: F401 - registers the handlers

    kopf.configure(verbose=bool(args.verbose), log_format=kopf.LogFormat.PLAIN)
    logging.getLogger("meshward").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    # kopf's verbose mode turns on every logger; the API client's debug log prints whole
    # responses, Secrets (the anchor's and issuer's keys) included.
    logging.getLogger("kubernetes_asyncio").setLevel(logging.WARNING)
    namespaces = list(args.namespace)
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces,
        )
    )
    return 0
