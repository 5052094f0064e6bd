"""The ``otcbench`` commands, one module per group; :mod:`otcbench.cli` assembles them into the app."""
