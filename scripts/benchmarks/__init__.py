"""The sections of `make bench` (scripts/bench.py), one module each: run() measures, report() writes its
markdown with the prose next to the numbers it explains."""
