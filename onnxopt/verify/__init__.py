"""Checking results: tolerance classes, `--check`, `validate` on execution providers and their
workers, the conformance suite, the accuracy guard of approximate passes."""
