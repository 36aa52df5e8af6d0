"""The lease of a running task (which claim may write its outcome, and until when it holds), and
the errors of the runs that were retried."""

from __future__ import annotations

from django.db import models
from django_tasks_db.models import DBTaskResult


class TaskLease(models.Model):
    """A RUNNING task's claim. Renewed by the runner while the task runs; once `expires_at` has
    passed, any runner of the group puts the task back to READY (or FAILED after its last
    attempt). Only the holder of `token` writes the task's outcome."""

    task = models.OneToOneField(
        DBTaskResult, on_delete=models.CASCADE, primary_key=True, related_name="flyfn_lease"
    )
    token = models.CharField(max_length=32)
    machine_id = models.CharField(max_length=64)
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        verbose_name = "task lease"

    def __str__(self) -> str:
        return f"lease of {self.task_id} by {self.machine_id} until {self.expires_at:%H:%M:%S}"


class WakeNonce(models.Model):
    """A wake that a function Machine has accepted: the nonce its signed header carried, kept
    while the header is valid so that the same header is not accepted again."""

    nonce = models.CharField(max_length=32, primary_key=True)
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        verbose_name = "used wake"

    def __str__(self) -> str:
        return f"wake {self.nonce} (until {self.expires_at:%H:%M:%S})"


class TaskFailure(models.Model):
    """The error of a run that was retried (`OPTIONS["retries"]`): a task's `result.errors`
    lists these, oldest first, before the row's own error (django-tasks-db keeps one)."""

    task = models.ForeignKey(DBTaskResult, on_delete=models.CASCADE, related_name="flyfn_failures")
    attempt = models.PositiveIntegerField()
    worker_id = models.CharField(max_length=64)
    exception_class_path = models.TextField()
    traceback = models.TextField()
    failed_at = models.DateTimeField()

    class Meta:
        verbose_name = "retried task failure"
        ordering = ["task", "attempt"]

    def __str__(self) -> str:
        return f"attempt {self.attempt} of {self.task_id}: {self.exception_class_path}"


class ScheduledRun(models.Model):
    """One slot of a periodic task (`OPTIONS["schedules"]`) that was enqueued: the unique
    (backend, schedule, slot) makes every slot run at most once, however many Machines look."""

    backend_name = models.CharField(max_length=32)
    schedule = models.CharField(max_length=100)
    slot = models.DateTimeField()
    # The enqueued task's id, not a foreign key: pruning task results (django-tasks-db's
    # `prune_db_task_results`) must not have to touch these rows.
    task_id = models.UUIDField(null=True)
    machine_id = models.CharField(max_length=64)
    enqueued_at = models.DateTimeField()

    class Meta:
        verbose_name = "scheduled run"
        constraints = [
            models.UniqueConstraint(
                fields=["backend_name", "schedule", "slot"], name="flyfn_one_run_per_slot"
            )
        ]
        indexes = [models.Index(fields=["backend_name", "schedule", "-slot"])]

    def __str__(self) -> str:
        return f"{self.schedule} at {self.slot:%Y-%m-%d %H:%M:%S} ({self.backend_name})"
