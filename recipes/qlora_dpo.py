"""The QLoRA DPO recipe (hf_dpo/recipe.py): `accelerate launch recipes/qlora_dpo.py [config.yaml] [--flags]`."""

import sys

from hf_dpo.recipe import cli

if __name__ == "__main__":
    sys.exit(cli())
