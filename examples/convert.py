"""Convert an ARLM into a block-diffusion LM by OPD: the ``opdlm-convert`` command as a file.

    python examples/convert.py --config examples/configs/cpu_demo.yaml
    accelerate launch examples/convert.py --config examples/configs/qwen3_0.6b_full.yaml

Same options as ``opdlm-convert`` (``--help``; the code is opdlm_trl/cli/convert.py); the recipes are the YAML files
in examples/configs/. Write your own run as a config, or copy opdlm_trl/cli/convert.py's ``build_trainer`` to change
how the model or prompts are loaded.
"""

from opdlm_trl.cli.convert import main

if __name__ == "__main__":
    main()
