"""The test suite. Its folders mirror the code they prove: runtime/, models/, peft/, data/, checkpoint/,
inference/, training/ and planner/ follow framework/; launch/ holds the entry points (the mft CLI, Slurm,
the converters' command lines, the benchmark scripts, the docs' examples). The modules at this level are
shared support (tiny models, job configs, tolerances), imported as ``tests.NAME``; no test imports another."""
