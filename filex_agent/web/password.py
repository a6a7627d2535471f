"""``python -m filex_agent.web.password``: read a password (twice, not echoed) and print the
``web.password_hash`` value to store in a secret file (``password_hash = "file:/path"``)."""

from __future__ import annotations

import getpass
import sys

from filex_agent.web.auth import hash_password


def main() -> int:
    if sys.stdin.isatty():
        first = getpass.getpass("password for the status page: ")
        if first != getpass.getpass("again: "):
            print("the passwords differ", file=sys.stderr)
            return 1
    else:
        first = sys.stdin.readline().rstrip("\n")
    if len(first) < 12:
        print("use at least 12 characters", file=sys.stderr)
        return 1
    print(hash_password(first))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
