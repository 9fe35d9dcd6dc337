"""Tests of preference tuning (framework/training/dpo*.py): the loss against TRL, layouts, packing, the job."""
