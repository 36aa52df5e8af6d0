"""The tasks benchmark's project: one no-op task, run by flyfn.tasks or by django-tasks-db."""
