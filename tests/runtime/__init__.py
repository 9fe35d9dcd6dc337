"""Tests of framework/runtime: the CPU compatibility layer and the launcher's environment."""
