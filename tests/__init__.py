"""flyfn's test suite."""
