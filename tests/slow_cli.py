"""``rankwise`` CLI with every shard write slowed down by ``RANKWISE_TEST_SHARD_DELAY`` seconds, so that tests can
kill it or race it while it saves. Run as ``python tests/slow_cli.py compress ...``; not a test module."""

from __future__ import annotations

import os
import signal
import sys
import time

import rankwise.io.shards as shards
from rankwise.cli.app import main

_save_file = shards.save_file


def _slow_save_file(*args, **kwargs):
    _save_file(*args, **kwargs)
    print("shard written", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("RANKWISE_TEST_SHARD_DELAY", "1")))


shards.save_file = _slow_save_file

if __name__ == "__main__":
    # a test run started in the background (``make test &``) hands its children an ignored SIGINT, which Python
    # keeps; the interrupt tests need the interactive default
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = ["rankwise", *sys.argv[1:]]
    main()
