"""Runs: a run from config to run folder (session.py), the folder's rules (folder.py), a finished run reopened
(run.py: Run), comparisons (compare.py), reports and diagnostics."""
