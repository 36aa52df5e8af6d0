"""The local Fly Proxy: an ASGI reverse proxy over emulated Machines, honouring fly-replay.

`FlyProxy` load-balances requests like Fly Proxy over every Machine of the app with a service on
the request's port, function Machines included (the decision lives in `balancer`:
concurrency limits, started first, autostart at the soft limit, waiting at the hard limit, replays
to one `instance` included), and acts on `fly-replay` answers (header and JSON forms: instance,
prefer_instance, app, region, elsewhere, state, timeout, fallback, transform) the way Fly Proxy
does: it re-delivers the request with `fly-replay-src`, falls back with `fly-replay-failed`,
refuses to replay bodies over 1 MB and chains of more than 10 replays. Stopped or suspended targets
are started on demand (through the `MachinesEmulator`, so the state machine and events stay
right), and Fly's autostop pass (every `autostop_interval` seconds, one Machine per app, region
and role at a time) stops or suspends them per their services' `autostop`.

Bodies stream both ways; a request body is buffered up to 10 MB as Fly's edge does (to replay or
retry it), and a larger one that needs a replay or a retry fails with PA01.
Every response carries `Fly-Request-Id` and `X-Flyfn-Machine: <id>` (an emulator-only aid); proxy
errors are short plain pages with a Fly-style code. A `RequestLog` per request tells its route.

The parts: `app` (the request loop), `routing` (the pure decisions), `forwarding` and `bodies`
(HTTP to and from Machines), `resend` (when a request is sent again), `load` and `autostop`.
The package exports nothing: import from the module that owns a name.
"""
