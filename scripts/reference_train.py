"""data2vec's own fine-tuning path under fairseq-hydra-train, for the end-to-end benchmark only.

fairseq's examples/data2vec needs two shims on Python 3.11 (d2v_plugin/testing/reference.py applies
them); this imports it that way, then runs fairseq-hydra-train's entry point with the command-line
arguments.
"""
import sys

from d2v_plugin.testing import reference

reference.data2vec()  # registers data2vec's tasks and models (mae_image_classification)

# data2vec's fine-tuning transform is timm's RandAugment 'inc1', which crashes on Pillow >= 10 at full
# strength; the plugin's fix (0 posterize bits = black, as before) lets the reference run too
from d2v_plugin.compat import install_timm_posterize_fix  # noqa: E402

install_timm_posterize_fix()

from fairseq_cli.hydra_train import cli_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli_main())
