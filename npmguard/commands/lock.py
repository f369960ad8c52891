"""``npmguard lock``: make the daemon forget the file vault's key."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from npmguard.vault import remote

    try:
        reply = remote.lock()
    except remote.DaemonNotRunning:
        print("No npmguard daemon is running, so no process holds the file "
              "vault's key.")
        return 0
    except remote.VaultNotServed:
        print("The running npmguard daemon does not serve the file vault, so "
              "it holds no key.")
        return 0
    if reply.get("was_unlocked"):
        print("Locked: the daemon dropped the file vault's key.")
    else:
        print("The file vault was locked already.")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``lock`` takes no arguments of its own."""
