"""The e2e tasks project: `@task` functions run by flyfn.tasks on function Machines."""
