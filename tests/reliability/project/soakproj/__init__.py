"""The Django project the soak test runs under `flyfn dev` (cwd tests/reliability/project)."""
