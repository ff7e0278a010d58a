"""Decode prompts with a saved diffusion student: the ``opdlm-generate`` command as a file.

    python examples/generate.py --model out/student --prompt "Write a function that adds two numbers." --chat

Same options as ``opdlm-generate`` (``--help``; the code is opdlm_trl/cli/generate.py, the library call it makes is
``opdlm_trl.generate``, docs/sampling.md).
"""

from opdlm_trl.cli.generate import main

if __name__ == "__main__":
    main()
