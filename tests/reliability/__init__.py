"""Reliability tests: Machines API faults, a soak through `flyfn dev`, hostile input."""
