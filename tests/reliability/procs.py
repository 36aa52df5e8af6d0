"""Processes of a `flyfn dev` stack, read from /proc: descendants, Machine pids, liveness."""

from __future__ import annotations

from pathlib import Path

# A process is identified by (pid, start time) so a reused pid is never mistaken for it.
Proc = tuple[int, int]


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # fields after the command name


def identity(pid: int) -> Proc | None:
    fields = _stat(pid)
    return (pid, int(fields[19])) if fields is not None else None


def alive(proc: Proc) -> bool:
    fields = _stat(proc[0])
    return fields is not None and int(fields[19]) == proc[1] and fields[0] not in ("Z", "X")


def descendants(root: int) -> set[Proc]:
    """Every live process below `root` (Machines run in their own sessions, not its group)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[Proc] = set()
    stack = [root]
    while stack:
        for pid in children.get(stack.pop(), []):
            proc = identity(pid)
            if proc is not None:
                found.add(proc)
                stack.append(pid)
    return found


def machine_pid(root: int, machine_id: str) -> int | None:
    """The live process below `root` that runs the Machine `machine_id`, if any."""
    marker = f"FLY_MACHINE_ID={machine_id}".encode()
    for proc in descendants(root):
        try:
            environ = Path(f"/proc/{proc[0]}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ and alive(proc):
            return proc[0]
    return None
