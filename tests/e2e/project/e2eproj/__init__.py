"""A small Django project the end-to-end tests run under `flyfn dev` (cwd tests/e2e/project)."""
