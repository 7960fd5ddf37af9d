"""The command-line skin: one module per command, wired together in :mod:`vtkit.cli.main`."""
