"""filex-agent: files outbox folders with FINRA fileX and files the feedback."""

__version__ = "0.1.0"
