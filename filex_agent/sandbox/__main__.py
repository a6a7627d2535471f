"""``python -m filex_agent.sandbox --data-dir DIR``: run the sandbox in the foreground.

Prints one JSON line with the URLs and the sandbox's own (throw-away) credentials for benchmark
scripts, then serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from filex_agent.sandbox import Sandbox


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m filex_agent.sandbox", description=__doc__)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--processing-delay", type=float, default=0.5)
    ap.add_argument("--token-seconds", type=int, default=3600)
    ap.add_argument("--s3-credential-seconds", type=int, default=3600)
    ap.add_argument("--sftp", action="store_true", help="also start the SFTP server")
    ap.add_argument("--receive-lag", type=float, default=0.0,
                    help="seconds before fileX takes an upload from in/ (default 0)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    sb = Sandbox(args.data_dir, processing_delay=args.processing_delay, token_seconds=args.token_seconds,
                 s3_credential_seconds=args.s3_credential_seconds, sftp=args.sftp,
                 receive_lag=args.receive_lag)
    with sb:
        info: dict[str, Any] = {
            "fip_token_url": sb.fip_token_url,
            "api_base_url": sb.api_base_url,
            "s3_endpoint_url": sb.s3_endpoint_url,
            "bucket": sb.bucket,
            "region": sb.region,
            "client_id": sb.client_id,
            "client_secret": sb.client_secret,
            "entitlements": sb.entitlements,
            "data_dir": str(sb.data_dir),
        }
        if sb.sftp is not None:
            info["sftp"] = {
                "host": getattr(sb.sftp, "host", "127.0.0.1"),
                "port": getattr(sb.sftp, "port", None),
                "username": sb.sftp_username,
                "password": sb.sftp_password,
            }
        print(json.dumps(info), flush=True)
        while not done.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
