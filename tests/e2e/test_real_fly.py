"""End-to-end, with Fly Proxy's balancing: ordinary traffic reaches function Machines as on Fly.

One `flyfn dev` of the e2e project for the module; its function Machines do not stop while it runs
(autostop's pass every 6000 s), so they stay the least loaded candidates of ordinary requests.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.stack import Dev, running_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

UPLOAD = os.urandom(5 * 1024 * 1024)  # 5 MB: five times what Fly Proxy can replay
# Uploads are sent until this many landed on a function Machine; each lands on one about as
# often as on the app Machine (both started, least loaded first, ties at random).
LANDINGS_WANTED = 3
MAX_UPLOADS = 60


@pytest.fixture(scope="module")
def dev() -> Iterator[Dev]:
    with running_stack(time_scale=0.05) as stack:
        yield stack


def test_request_forced_onto_a_function_machine_is_bounced_to_the_app(dev: Dev) -> None:
    # Here, not beside the other routing tests: their autostop's pass every 1.5 s may be
    # stopping the function Machine just when the request is forced onto it (Fly's PR04).
    assert httpx.get(f"{dev.url}/square/6/", timeout=60).status_code == 200
    (fn,) = dev.group_machines("default")
    app_id = dev.app_machine()["id"]
    mark = len(dev.lines)
    response = httpx.get(
        f"{dev.url}/plain/", headers={"fly-force-instance-id": fn["id"]}, timeout=60
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"view": "plain", "machine": app_id, "group": None}
    assert response.headers["x-flyfn-machine"] == app_id
    assert f"fn:{fn['id'][:4]} → elsewhere → main:{app_id[:4]} 200" in dev.log_for("/plain/", mark)


def test_large_uploads_answer_200_whichever_machine_they_land_on(dev: Dev) -> None:
    with httpx.Client(base_url=dev.url, timeout=120) as client:
        assert client.get("/square/3/").status_code == 200  # the function Machine exists
        (fn,) = dev.group_machines("default")
        app_id = dev.app_machine()["id"]
        mark = len(dev.lines)

        async def send_all() -> list[httpx.Response]:
            # Two at a time: each Machine is as likely to be the least loaded one.
            responses: list[httpx.Response] = []
            async with httpx.AsyncClient(base_url=dev.url, timeout=120) as aclient:
                while len(responses) < MAX_UPLOADS:
                    pair = await asyncio.gather(
                        *(aclient.post("/upload/", content=UPLOAD) for _ in range(2))
                    )
                    responses += pair
                    ran = [r.json().get("machine") for r in responses if r.status_code == 200]
                    if ran.count(fn["id"]) >= LANDINGS_WANTED:
                        break
            return responses

        responses = asyncio.run(send_all())

    digest = hashlib.sha256(UPLOAD).hexdigest()
    assert [r.status_code for r in responses] == [200] * len(responses), [
        r.text[:200] for r in responses if r.status_code != 200
    ]
    answers = [r.json() for r in responses]
    assert all(a["size"] == len(UPLOAD) and a["sha256"] == digest for a in answers)
    ran_on = [a["machine"] for a in answers]
    assert set(ran_on) <= {app_id, fn["id"]}
    # Some landed on the function Machine and ran there: it could not send them on (a body over
    # Fly's replay limit) and an ordinary request never fails for landing there.
    assert ran_on.count(fn["id"]) >= LANDINGS_WANTED

    def upload_routes() -> list[str]:
        return [ln for ln in dev.lines[mark:] if ln.startswith("POST /upload/ ")]

    # The proxy prints a route once its answer is sent: the last lines may trail the answers.
    waited = time.monotonic() + 60  # safety bound
    while len(upload_routes()) < len(responses) and time.monotonic() < waited:
        time.sleep(0.1)
    routes = upload_routes()
    assert len(routes) == len(responses), "\n".join(routes)
    on_function = [ln for ln in routes if ln.split()[2] == f"fn:{fn['id'][:4]}"]
    assert len(on_function) == ran_on.count(fn["id"]), "\n".join(routes)
    assert all(" 200 " in ln and "→" not in ln for ln in on_function), "\n".join(on_function)
    print(
        f"5 MB uploads: {len(responses)} sent, all 200; {len(on_function)} landed on and ran on "
        f"the function Machine, e.g. {on_function[0]!r}"
    )
