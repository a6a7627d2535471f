"""Benchmarks: the agent's transports side by side with the tools a firm would use instead.

``python -m bench`` (``make bench``) starts real servers on loopback (OpenSSH sshd restricted to
fileX's algorithms, an S3 server, the sandbox fileX), measures, stops them and writes
``bench/RESULTS.md``. See ``python -m bench --help`` for sizes (the smoke test uses tiny ones).
"""
