"""vtkit: measure what visual-token pruning does to LLaVA.

The package is a library first: each pipeline stage (extract, sweep, rank, plot) is a plain
function in a module of its own, sharing a few modules for data, prompts, models and caches.
The command-line interface in :mod:`vtkit.cli` only parses options and calls those functions.
"""

__version__ = "0.1.0"
