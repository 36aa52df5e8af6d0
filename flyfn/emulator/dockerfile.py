"""The Dockerfile instructions that shape a Machine, read without a Docker engine: the image's
command (`ENTRYPOINT` + `CMD`), its `ENV` and its `WORKDIR`, mapped to this computer.

A Machine of the local image runs in the directory the image's `WORKDIR` was copied from: the
`COPY`/`ADD` instructions of the final stage say which directory of the build context ends up
there (`COPY demo_store ./demo_store` under `WORKDIR /app` maps `/app/demo_store` to
`<context>/demo_store`). Values of `ENV` are kept as they are, image paths included: a local
value goes in a local secret (`flyfn dev --secrets-file`), as on Fly a secret overrides the image.
"""

from __future__ import annotations

import io
import json
import posixpath
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from dockerfile_parse import DockerfileParser

__all__ = ["DockerfileError", "ImageFacts", "read_dockerfile"]


class DockerfileError(ValueError):
    """The Dockerfile cannot be read, or its command cannot be run."""


@dataclass(frozen=True)
class ImageFacts:
    """What a Machine of the image starts with."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"  # in the image
    local_workdir: Path | None = None  # where that is on this computer, when COPY says

    def command(self, cmd: list[str] | None = None) -> list[str]:
        """The argv a Machine runs: the entrypoint, then `cmd` (a Machine's `init.cmd` or a
        fly.toml process) or the image's CMD, as Docker and Fly combine them."""
        return [*self.entrypoint, *(self.cmd if cmd is None else cmd)]


def _argv(value: str, instruction: str) -> tuple[str, ...]:
    """An exec-form (`["a", "b"]`) or shell-form (`a b`) CMD/ENTRYPOINT as argv."""
    text = value.strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(item, str) for item in parsed):
            return tuple(parsed)
    if not text:
        return ()
    try:
        shlex.split(text)
    except ValueError as exc:
        raise DockerfileError(f"{instruction} {text!r}: {exc}") from None
    return ("/bin/sh", "-c", text)


def _copies(value: str) -> tuple[list[str], str] | None:
    """The sources and destination of a COPY/ADD from the build context (None for
    `--from=<stage>`, which copies from another image)."""
    parts = [p for p in shlex.split(value) if p]
    if any(p.startswith("--from") for p in parts):
        return None
    parts = [p for p in parts if not p.startswith("--")]
    if parts and parts[0].startswith("["):
        parts = json.loads(value[value.index("[") :])
    if len(parts) < 2:
        return None
    return parts[:-1], parts[-1]


def read_dockerfile(path: Path) -> ImageFacts:
    """The image facts of the Dockerfile at `path` (its final stage); the build context is its
    directory. DockerfileError names the file and the problem."""
    try:
        content = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DockerfileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    parser = DockerfileParser(fileobj=io.BytesIO(content.encode()))
    context = path.parent.resolve()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    workdir = "/"
    # image directory -> build-context directory, from the final stage's COPY/ADD
    mapped: dict[str, Path] = {}
    try:
        for item in parser.structure:
            instruction, value = item["instruction"], item["value"]
            if instruction == "FROM":  # a new stage starts from scratch
                entrypoint, cmd, workdir, mapped = (), (), "/", {}
            elif instruction == "WORKDIR":
                workdir = posixpath.normpath(posixpath.join(workdir, value.strip()))
            elif instruction == "ENTRYPOINT":
                entrypoint, cmd = _argv(value, "ENTRYPOINT"), ()  # ENTRYPOINT resets CMD
            elif instruction == "CMD":
                cmd = _argv(value, "CMD")
            elif instruction in ("COPY", "ADD"):
                copy = _copies(value)
                if copy is not None:
                    _map_copy(mapped, context, workdir, *copy)
        env = dict(parser.envs)
    except (ValueError, KeyError) as exc:
        raise DockerfileError(f"{path}: {exc}") from None
    return ImageFacts(
        entrypoint=entrypoint,
        cmd=cmd,
        env=env,
        workdir=workdir,
        local_workdir=_local(mapped, workdir),
    )


def _map_copy(
    mapped: dict[str, Path], context: Path, workdir: str, sources: list[str], dest: str
) -> None:
    target = posixpath.normpath(posixpath.join(workdir, dest))
    for source in sources:
        local = (context / source).resolve()
        if not local.is_dir():
            continue  # a file lands in a directory; only directories map a WORKDIR
        # Docker copies a directory's contents into the destination, whatever its spelling.
        mapped[target] = local


def _local(mapped: dict[str, Path], workdir: str) -> Path | None:
    """The local directory the image's `workdir` was copied from (the deepest mapping)."""
    best: tuple[int, Path] | None = None
    for image_dir, local in mapped.items():
        if workdir == image_dir or workdir.startswith(image_dir.rstrip("/") + "/"):
            rest = posixpath.relpath(workdir, image_dir)
            candidate = local if rest == "." else local / rest
            if best is None or len(image_dir) > best[0]:
                best = (len(image_dir), candidate)
    if best is None or not best[1].is_dir():
        return None
    return best[1]
