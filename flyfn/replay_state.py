"""flyfn's signed replay state: `sign_state` / `verify_state` and what a state binds of a request.

An app Machine puts a state in the `fly-replay` it answers (`flyfn.fly.replay`); the function
Machine reads it back from `fly-replay-src` and runs the request only if it verifies. The state is
an HMAC-SHA256 (key derived from the secret, `SECRET_KEY`) bound to method, path, query string,
body (`body_binding`) and group, with a timestamp for a short validity (never more than
`MAX_STATE_AGE`) and, for elastic groups, a hop count.

Django-free: callers pass the secret (the MAC is the one Django's `salted_hmac` computes).
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import hmac
import importlib
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = [
    "MAX_CLOCK_SKEW",
    "MAX_STATE_AGE",
    "MAX_STATE_HOP",
    "STATE_BODY_DIGEST_LIMIT",
    "STATE_PREFIX",
    "StateCheck",
    "body_binding",
    "sign_state",
    "verify_state",
]

# flyfn2: the state binds the query string and the body too (flyfn1 bound method, path, group).
STATE_PREFIX = "flyfn2"
# The name of the module that first signed states: a new salt would void every state in flight.
_STATE_SALT = "flyfn.replay.state"
# A state sent on by a function Machine of the group (elastic groups) carries its hop count:
# `flyfn2.<issued>.h<hop>.<mac>`; one from an app Machine (hop 0) has none.
_STATE_RE = re.compile(r"^flyfn2\.([0-9]{1,12})(?:\.h([1-9][0-9]?))?\.([A-Za-z0-9_-]{43})$")
# The most hops a state can carry.
MAX_STATE_HOP = 99
# A state issued this far in the future (another Machine's clock) is still accepted.
MAX_CLOCK_SKEW = 30.0


@dataclass(frozen=True, slots=True)
class StateCheck:
    """The outcome of `verify_state`: `ok`, or why not (`reason`). Truthy when ok."""

    ok: bool
    reason: str | None = None
    hop: int = 0  # how many function Machines sent the request on (signed with it)

    def __bool__(self) -> bool:
        return self.ok


# Standard base64 to its url-safe alphabet.
_URL_SAFE = bytes.maketrans(b"+/", b"-_")
# SHA-256's block size: an HMAC key is padded to it (RFC 2104).
_SHA256_BLOCK = 64
# The state's MAC: a SHA-256 digest in unpadded base64.
_MAC_CHARS = 43


_Sha256 = Callable[[bytes], "hashlib._Hash"]


def _own_sha256() -> _Sha256:
    """Python's own SHA-256 (`_sha2`, `_sha256` before 3.12), else hashlib's (OpenSSL's): the
    same digests. Copying one of its states is a plain copy, where OpenSSL's allocates and
    copies a context (each MAC copies two states and takes two digests, each a copy too)."""
    for name in ("_sha2", "_sha256"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        constructor: _Sha256 = module.sha256
        return constructor
    return hashlib.sha256


_SHA256 = _own_sha256()


@functools.lru_cache(maxsize=16)
def _keyed_hmac(secret: str | bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    """The HMAC-SHA256 keyed as `salted_hmac(_STATE_SALT, ..., secret=secret)` keys it, as its two
    SHA-256 states before any message (RFC 2104: the key xor `ipad`, and xor `opad`): each MAC
    copies them, cheaper than deriving the key per request, and two C calls where an
    `hmac.HMAC` copy takes several Python ones. Cached by the secret's value, so a changed
    SECRET_KEY (or a fallback) gets its own."""
    raw = secret if isinstance(secret, bytes) else secret.encode()
    key = hashlib.sha256(_STATE_SALT.encode() + raw).digest().ljust(_SHA256_BLOCK, b"\0")
    inner = _SHA256(bytes(byte ^ 0x36 for byte in key))
    outer = _SHA256(bytes(byte ^ 0x5C for byte in key))
    return inner, outer


# A body up to this size is bound by its SHA-256 digest; a larger one (Fly replays up to 1 MB) by
# its length only, so that the app Machine never reads a large body just to sign it.
STATE_BODY_DIGEST_LIMIT = 65_536
# The most a state is ever accepted for, whatever the caller asks: a captured state is worthless
# after it (the longest replay timeout flyfn allows is 60 s, plus 30 s of clock skew and queueing).
MAX_STATE_AGE = 90.0


def body_binding(length: int, body: bytes | None = None) -> str:
    """What a signed state binds of a request body: `""` for none, the SHA-256 digest of
    `body` when it is given and at most `STATE_BODY_DIGEST_LIMIT` bytes long, else
    `"<length>"`. Both sides compute it the same way (see the middleware)."""
    if body is not None and len(body) <= STATE_BODY_DIGEST_LIMIT:
        return f"sha256:{hashlib.sha256(body).hexdigest()}" if body else ""
    return str(length) if length > 0 else ""


def _message(
    issued: int, method: str, path: str, group: str, query: str, body: str, hop: int = 0
) -> str:
    """The signed message. Method, group and body binding hold no newline (checked or made so);
    the query string is length-prefixed and the path goes last, so no two inputs share one. A hop
    count is a first line starting with `h` (never a digit, as the time is)."""
    message = f"{issued}\n{method.upper()}\n{group}\n{body}\n{len(query)}:{query}\n{path}"
    return f"h{hop}\n{message}" if hop else message


def _mac(secret: str | bytes, message: str) -> str:
    """Unpadded url-safe base64 of
    `salted_hmac(_STATE_SALT, message, secret=secret, algorithm="sha256")`."""
    inner, outer = _keyed_hmac(secret)
    digest = inner.copy()
    digest.update(message.encode())
    mac = outer.copy()
    mac.update(digest.digest())
    # `base64.urlsafe_b64encode`'s own two steps, without its two Python calls around them; a
    # digest's 32 bytes are 43 characters and one "=" of padding, cut off.
    encoded = binascii.b2a_base64(mac.digest(), newline=False)[:_MAC_CHARS]
    return encoded.translate(_URL_SAFE).decode()


def _unbindable(method: str, group: str, body: str) -> bool:
    return "\n" in method or "\n" in group or "\n" in body


def sign_state(
    secret: str | bytes,
    method: str,
    path: str,
    group: str,
    now: float | None = None,
    *,
    query: str = "",
    body: str = "",
    hop: int = 0,
) -> str:
    """A replay `state` that proves an app Machine sent this request now: its method, path,
    query string (`request.META["QUERY_STRING"]`), body (`body_binding()` of it) and group.
    `hop`: how many function Machines of the group have sent it on since (0 to
    `MAX_STATE_HOP`), signed too.

    `secret` is `settings.SECRET_KEY`; `path` is `request.path`.
    """
    if not secret:
        raise ValueError("sign_state needs a non-empty secret (settings.SECRET_KEY)")
    if _unbindable(method, group, body):
        raise ValueError("sign_state: method, group and body binding cannot contain newlines")
    if not 0 <= hop <= MAX_STATE_HOP:
        raise ValueError(f"sign_state: hop must be 0 to {MAX_STATE_HOP} (got {hop})")
    issued = int(time.time() if now is None else now)
    mac = _mac(secret, _message(issued, method, path, group, query, body, hop))
    return f"{STATE_PREFIX}.{issued}.h{hop}.{mac}" if hop else f"{STATE_PREFIX}.{issued}.{mac}"


def verify_state(
    state: str | None,
    secret: str | bytes,
    method: str,
    path: str,
    group: str,
    *,
    max_age: float,
    now: float | None = None,
    fallback_secrets: Iterable[str | bytes] = (),
    query: str = "",
    body: str = "",
) -> StateCheck:
    """Check a `state` from `fly-replay-src`: signed with `secret` (or one of
    `fallback_secrets`, i.e. `SECRET_KEY_FALLBACKS`) for this method, path, query string, body
    binding and group, issued at most `max_age` seconds ago (never more than `MAX_STATE_AGE`).
    Never raises for bad input; the reason says what failed, and a valid check has the hop count.
    """
    if not state:
        return StateCheck(False, "no signed state")
    if not isinstance(state, str) or len(state) > 128:
        return StateCheck(False, "malformed state")
    match = _STATE_RE.fullmatch(state)
    if match is None:
        return StateCheck(False, "malformed state")
    if _unbindable(method, group, body):
        return StateCheck(False, "signature mismatch")
    issued = int(match.group(1))
    clock = time.time() if now is None else now
    if issued > clock + MAX_CLOCK_SKEW:
        return StateCheck(False, "state issued in the future")
    if clock - issued > min(max_age, MAX_STATE_AGE):
        return StateCheck(False, "state expired")
    hop = int(match.group(2) or 0)
    message = _message(issued, method, path, group, query, body, hop)
    for key in (secret, *fallback_secrets):
        if key and hmac.compare_digest(_mac(key, message), match.group(3)):
            return StateCheck(True, hop=hop)
    return StateCheck(False, "signature mismatch")
