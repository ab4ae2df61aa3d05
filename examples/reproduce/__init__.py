"""``python -m examples.reproduce``: does AttnRes help? See run.py and RESULTS.md."""
