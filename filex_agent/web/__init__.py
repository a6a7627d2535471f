"""The read-only status web page: overview, submissions search, one submission, charts.

``views`` reads the journal through ``Store``'s read-only methods (so any node, with any Store,
can serve it), ``charts`` draws server-side SVG, ``app`` is the Starlette application (GET only,
strict security headers, optional authentication) and ``server`` runs it under uvicorn in a
thread of the agent. Nothing here changes state.
"""
