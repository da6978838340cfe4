"""Keeping the good ones: grades, review, near-duplicates, the judge, coverage, diversity."""
