"""Management commands of flyfn."""
