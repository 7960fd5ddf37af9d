"""Fixed values and defaults of vtkit's settings, in a module that imports nothing.

The stages check their settings against these tables, and the CLI lists them in ``--help`` and
rejects other values while parsing, without loading torch. The conversation templates, which
carry their text, live in :mod:`vtkit.prompts` (itself light).
"""

#: Importance scorers `vtkit extract` stores and `vtkit sweep --scorer` chooses from.
SCORERS = ("l2", "cls", "random", "uniform")
#: The --image-mode values (see :mod:`vtkit.images`).
IMAGE_MODES = ("pad", "crop")
#: The --dtype names (the library also takes torch's aliases, e.g. fp16).
DTYPES = ("float16", "bfloat16", "float32")
#: The --device values; ``cuda:N`` names the GPU of index N.
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
#: The conversation template of the official LLaVA-1.5 ScienceQA evaluation.
DEFAULT_CONV_MODE = "vicuna_v1"
#: Relative cut-off for the numerical rank: above float16/bfloat16 rounding noise (docs/rank.md).
DEFAULT_THRESHOLD = 1e-3
