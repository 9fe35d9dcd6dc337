"""Typed configuration: one structured section per config group, its defaults, types and checks in one place.

Each group of conf/ (model, peft (one per method), data, parallel, trainer, precision) has a dataclass here
(an OmegaConf structured config). :func:`framework.config.job.typed` merges the composed Hydra config onto
them before any process group starts: values get their declared types, a wrong type or an unknown key is
reported with its key, and each section's ``problems()`` checks what a type cannot say (ranges, choices, keys
that exclude each other). Checks that need another layer's knowledge (the model's heads for a TP size, the
data files, a method's target names) live in that layer and are gathered with these
(framework/training/job_config.py, framework/inference/options.py). Sizes derived from several sections
(data-parallel size, accumulation) are computed once: :class:`framework.config.job.Layout`.
"""
