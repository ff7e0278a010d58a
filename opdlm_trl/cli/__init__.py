"""Command-line entry points, installed as console scripts (``[project.scripts]`` in pyproject.toml).

* ``opdlm-convert`` (:mod:`.convert`): the training run, a TRL script (``--config file.yaml`` + overrides);
* ``opdlm-generate`` (:mod:`.generate`): decode prompts with a saved student;
* ``opdlm-eval`` lives with the evaluation code (:mod:`opdlm_trl.eval.cli`).

They live in the package, not in ``examples/``, so that an installed ``opdlm-trl`` has them and tests import them
as modules; ``examples/convert.py`` and ``examples/generate.py`` are the same commands as files (for
``accelerate launch examples/convert.py``). Nothing is imported here: each command loads only what it needs.
"""
