"""Tests of framework/training: the job engine, SFT jobs, resume, async saves, optimizer, tracking, train state."""
