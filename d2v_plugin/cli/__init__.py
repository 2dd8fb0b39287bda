"""Command-line entry points: python -m d2v_plugin.cli.<name> --help."""
