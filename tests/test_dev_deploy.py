"""What `flyfn dev` deploys: fly.toml (`flyfn.emulator.flytoml`), the Dockerfile
(`flyfn.emulator.dockerfile`), the image's command on a Machine's own port
(`flyfn.emulator.listen`) and the local secrets (`--secrets-file`)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from flyfn.emulator.dev import DeployPlan, DevOptions, DevSetupError, read_secrets_file
from flyfn.emulator.dockerfile import DockerfileError, read_dockerfile
from flyfn.emulator.flytoml import FlyTomlError, load_fly_toml
from flyfn.emulator.listen import ListenAddressError, bind_locally

ROOT = Path(__file__).resolve().parent.parent


# -- fly.toml -------------------------------------------------------------------------------------


def test_the_demos_fly_toml_makes_an_app_machine_that_scales_to_zero() -> None:
    fly_toml = load_fly_toml(ROOT / "fly.toml")
    assert fly_toml.app == "flyfn-demo-store"
    assert fly_toml.primary_region == "ams"
    assert fly_toml.process_groups() == ["app"]
    assert fly_toml.dockerfile == ROOT / "Dockerfile"
    config = fly_toml.machine_config("app", "local/demo:dev-1")
    assert config.image == "local/demo:dev-1"
    assert config.env == {"DEBUG": "false", "LOG_LEVEL": "INFO", "FLYFN_METRICS_PORT": "9091"}
    assert config.metadata == {"fly_process_group": "app", "fly_platform_version": "v2"}
    (service,) = config.services or []
    assert service.internal_port == 8000
    assert service.autostop == "stop"
    assert service.autostart is True
    assert service.min_machines_running == 0
    assert service.concurrency is not None
    assert (service.concurrency.soft_limit, service.concurrency.hard_limit) == (20, 40)
    ports = {p.port: p for p in service.ports or []}
    assert ports[80].handlers == ["http"]
    assert ports[80].force_https is True
    assert ports[443].handlers == ["tls", "http"]
    assert config.guest is not None
    assert (config.guest.cpu_kind, config.guest.cpus, config.guest.memory_mb) == ("shared", 1, 512)
    assert fly_toml.deploy.release_command is not None
    assert "flyfn prepare" in fly_toml.deploy.release_command


def test_processes_services_vms_and_the_stop_signal(tmp_path: Path) -> None:
    path = tmp_path / "fly.toml"
    path.write_text(
        """
app = "two"
kill_signal = "SIGTERM"
kill_timeout = 30

[env]
  WORKERS = 3
  VERBOSE = true

[processes]
  web = "gunicorn -w 4 -b :8080 proj.wsgi"
  worker = "python manage.py db_worker"

[[services]]
  internal_port = 8080
  protocol = "tcp"
  processes = ["web"]
  auto_stop_machines = true
  [[services.ports]]
    port = 443
    handlers = ["tls", "http"]

[[vm]]
  size = "performance-cpu-2x"
  processes = ["worker"]
"""
    )
    fly_toml = load_fly_toml(path)
    assert fly_toml.process_groups() == ["web", "worker"]
    web = fly_toml.machine_config("web", "img")
    worker = fly_toml.machine_config("worker", "img")
    assert web.env == {"WORKERS": "3", "VERBOSE": "true"}  # Machines see strings
    assert web.init is not None
    assert web.init.cmd == ["gunicorn", "-w", "4", "-b", ":8080", "proj.wsgi"]
    (service,) = web.services or []
    assert service.autostop == "stop"  # fly.toml's boolean
    assert worker.services is None  # the service is web's only
    assert worker.guest is not None
    assert (worker.guest.cpu_kind, worker.guest.cpus, worker.guest.memory_mb) == (
        "performance",
        2,
        4096,
    )
    assert web.guest is None
    assert web.stop_config is not None
    assert web.stop_config.signal == "SIGTERM"
    assert web.stop_config.timeout == "30s"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("app = ", "not valid TOML"),
        ('[[vm]]\nsize = "huge"', "shared-cpu-Nx"),
        ('[[vm]]\nmemory = "lots"', "512mb"),
        ("[http_service]\ninternal_port = 'x'", "http_service.internal_port"),
    ],
)
def test_a_fly_toml_error_names_the_file_and_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "fly.toml"
    path.write_text(text)
    with pytest.raises(FlyTomlError, match=message) as error:
        load_fly_toml(path)
    assert str(path) in str(error.value)


def test_the_fly_toml_is_the_one_named_or_the_current_directorys(tmp_path: Path) -> None:
    assert DeployPlan.load(DevOptions(), tmp_path).fly_toml is None  # none: today's defaults
    (tmp_path / "fly.toml").write_text('app = "here"\n')
    here = DeployPlan.load(DevOptions(), tmp_path)
    assert here.fly_toml is not None
    assert here.fly_toml.app == "here"
    assert here.image is None  # no Dockerfile beside it
    named = DeployPlan.load(DevOptions(config=ROOT / "fly.toml"), tmp_path)
    assert named.fly_toml is not None
    assert named.fly_toml.app == "flyfn-demo-store"
    assert named.image is not None
    assert named.internal_port == 8000
    with pytest.raises(DevSetupError, match="cannot be read"):
        DeployPlan.load(DevOptions(config=tmp_path / "missing.toml"), tmp_path)


# -- the Dockerfile -------------------------------------------------------------------------------


def test_the_demos_image_runs_two_workers_in_its_copied_workdir() -> None:
    image = read_dockerfile(ROOT / "Dockerfile")
    assert image.command() == [
        "uvicorn",
        "demo_store.asgi:application",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--workers",
        "2",
    ]
    assert image.env["DATABASE_URL"] == "sqlite:////app/data/db.sqlite3"  # kept as it is
    assert image.workdir == "/app/demo_store"
    assert image.local_workdir == ROOT / "demo_store"  # COPY demo_store ./demo_store


def test_entrypoint_cmd_env_and_stages(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "Dockerfile").write_text(
        """FROM python:3.12 AS build
CMD ["never"]
ENV STAGE=build

FROM python:3.12-slim
ARG VERSION=1
ENV APP_VERSION=$VERSION \\
    MODE=web
WORKDIR /srv
COPY --from=build /x /y
COPY src .
ENTRYPOINT ["tini", "--"]
CMD gunicorn --bind :8000 app.wsgi
"""
    )
    image = read_dockerfile(tmp_path / "Dockerfile")
    assert image.entrypoint == ("tini", "--")
    assert image.cmd == ("/bin/sh", "-c", "gunicorn --bind :8000 app.wsgi")
    assert image.command(["python", "worker.py"]) == ["tini", "--", "python", "worker.py"]
    assert image.env["MODE"] == "web"
    assert "STAGE" not in image.env
    assert image.workdir == "/srv"
    assert image.local_workdir == tmp_path / "src"


def test_a_workdir_no_copy_put_there_is_not_mapped(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text('FROM x\nWORKDIR /opt/app\nCMD ["run"]\n')
    assert read_dockerfile(tmp_path / "Dockerfile").local_workdir is None


def test_an_unreadable_dockerfile_is_named(tmp_path: Path) -> None:
    with pytest.raises(DockerfileError, match="Dockerfile"):
        read_dockerfile(tmp_path / "Dockerfile")


# -- the listen address ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            "uvicorn a:app --host 0.0.0.0 --port 8000 --workers 2",
            "uvicorn a:app --host 127.0.0.1 --port 5555 --workers 2",
        ),
        ("uvicorn a:app --port=8000", "uvicorn a:app --port=5555"),
        ("gunicorn -w 4 -b 0.0.0.0:8000 a.wsgi", "gunicorn -w 4 -b 127.0.0.1:5555 a.wsgi"),
        ("gunicorn --bind=[::]:8000 a.wsgi", "gunicorn --bind=127.0.0.1:5555 a.wsgi"),
        ("daphne -b 0.0.0.0 -p 8000 a.asgi:app", "daphne -b 127.0.0.1 -p 5555 a.asgi:app"),
    ],
)
def test_the_command_listens_on_the_machines_own_port(command: str, expected: str) -> None:
    assert bind_locally(shlex.split(command), 8000, "127.0.0.1", 5555) == shlex.split(expected)


def test_a_shell_commands_script_is_rewritten_in_place() -> None:
    script = "python manage.py migrate && gunicorn --bind :8000 a.wsgi; echo done"
    assert bind_locally(["/bin/sh", "-c", script], 8000, "127.0.0.1", 5555) == [
        "/bin/sh",
        "-c",
        "python manage.py migrate && gunicorn --bind 127.0.0.1:5555 a.wsgi; echo done",
    ]


@pytest.mark.parametrize(
    "command", ["uvicorn a:app", "uvicorn a:app --port 9000", "sh -c 'gunicorn a.wsgi'"]
)
def test_a_command_that_does_not_name_the_internal_port_is_refused(command: str) -> None:
    with pytest.raises(ListenAddressError, match="--port 8000"):
        bind_locally(shlex.split(command), 8000, "127.0.0.1", 5555)


# -- the secrets file -----------------------------------------------------------------------------


def test_a_secrets_file_reads_as_fly_secrets_import_does(tmp_path: Path) -> None:
    path = tmp_path / "secrets"
    path.write_text(
        "# local values\nDEBUG=1\nexport DATABASE_URL='sqlite:///db.sqlite3'\nKEY=\"a b\"\n"
    )
    assert read_secrets_file(path) == {
        "DEBUG": "1",
        "DATABASE_URL": "sqlite:///db.sqlite3",
        "KEY": "a b",
    }


def test_a_secrets_file_error_names_the_line_never_a_value(tmp_path: Path) -> None:
    path = tmp_path / "secrets"
    path.write_text("TOKEN=hunter2-very-secret\nNOVALUE\n")
    with pytest.raises(DevSetupError, match="NOVALUE has no value") as error:
        read_secrets_file(path)
    assert "hunter2" not in str(error.value)
    with pytest.raises(DevSetupError, match="cannot be read"):
        read_secrets_file(tmp_path / "missing")
