"""Tests of the entry points: the mft CLI, Slurm submission, the converters, the benchmark scripts, and the
examples of README.md and docs/."""
