"""Command-line entry points: python -m d2v_plugin.cli.<name> --help.

Each command parses its arguments before it imports torch or fairseq, so ``--help`` and argument
errors answer at once; ``common.load_heavy`` then imports fairseq quietly."""
