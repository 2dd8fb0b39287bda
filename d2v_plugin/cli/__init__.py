"""Command-line entry points: python -m d2v_plugin.cli.<name> --help."""
import logging

import d2v_plugin  # noqa: F401  (imports fairseq, whose text_to_speech task sets the root logger to DEBUG)

# keep the commands' stderr to warnings and their own progress bars
logging.getLogger().setLevel(logging.WARNING)
