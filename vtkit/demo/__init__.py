"""The embedded default: a synthetic ScienceQA task and the tiny LLaVA that learns it.

vtkit runs on this when no real model or data are given (``vtkit demo``, ``make all``). It sits
behind the pipeline: it uses the stages, and no stage imports it.

- :mod:`vtkit.demo.task`: the synthetic ScienceQA folder (scenes, questions, the real layout)
  and the shipped demo model;
- :mod:`vtkit.demo.tiny`: tiny LLaVA checkpoints in both formats, and their tokenizer;
- :mod:`vtkit.demo.train`: training the demo model (``vtkit demo --train``), imported on its
  own as it needs torch.
"""

from vtkit.demo.task import (
    DEMO_MODEL_DIR,
    DEMO_N_TEST,
    TRAINING_RECORD,
    generate_problems,
    write_demo,
    write_demo_scienceqa,
)

__all__ = ["DEMO_MODEL_DIR", "DEMO_N_TEST", "TRAINING_RECORD", "generate_problems", "write_demo",
           "write_demo_scienceqa"]
