"""Tests of framework/planner: parameter counts and the memory estimate."""
