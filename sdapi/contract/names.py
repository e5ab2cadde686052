"""Queue, function, key and service names, job ids, and how long keys live.

Every Redis key prefix and channel sdapi uses is spelled here, and only here
(tests/test_docs.py keeps it so): one page lists what lives in Redis.
"""

from __future__ import annotations

from uuid import UUID

# How long per-generation Redis state (events, PNGs, cancel flags) outlives the
# last write, in seconds: long enough for a late subscriber or a slow `jobs`
# worker, short enough that Redis does not become an image store.
EVENT_TTL_S = 6 * 3600
IMAGE_TTL_S = 24 * 3600
CANCEL_TTL_S = 24 * 3600
# An input image waits in Redis for the node this long after each (re-)enqueue,
# in seconds; PostgreSQL keeps the original and puts it back on a re-enqueue.
INPUT_TTL_S = 24 * 3600
# A node's announcement in Redis expires unless refreshed (seconds).
NODE_TTL_S = 15
# A model's learned speeds outlive their last measurement this long (seconds),
# and a record older than that is not used: a node that ran the model last
# week still tells how long it takes, one from last month does not.
SPEED_TTL_S = 7 * 24 * 3600
# Most entries kept in one generation's event stream (progress is every step).
EVENT_STREAM_MAXLEN = 2000

# Consul service names.
GPU_SERVICE = "sdapi-gpu"
WEB_SERVICE = "sdapi-web"


QUEUE_PREFIX = "sdapi:gpu"
RESULTS_QUEUE = "sdapi:jobs"  # the `jobs` worker's arq queue

GENERATE_FUNCTION = "generate"  # one premium generation
BATCH_FUNCTION = "generate_batch"  # several normal generations, one pipeline call
STORE_RESULT_FUNCTION = "store_result"  # jobs: persist a finished generation
MARK_STARTED_FUNCTION = "mark_started"  # jobs: record that a node began work


def premium_queue(model: str) -> str:
    """The arq queue a node serving `model` drains first."""
    return f"{QUEUE_PREFIX}:{model}:premium"


def batch_queue(model: str) -> str:
    """The arq queue of normal-tier batches for `model`."""
    return f"{QUEUE_PREFIX}:{model}:batch"


# How long fair-queueing state outlives its last use, in seconds (a user's
# finish tag, a job's tag, a queue's clock). Longer than any premium job waits
# or is retried; a queue idle this long starts its clock again from zero.
FAIR_STATE_TTL_S = 24 * 3600


def fair_clock_key(queue: str) -> str:
    """The virtual time of a fair queue: the round of the job last started."""
    return f"{queue}:fair:clock"


def fair_owner_key(queue: str, owner: str) -> str:
    """The round after a user's last job on a fair queue (their finish tag)."""
    return f"{queue}:fair:owner:{owner}"


def fair_tag_key(job_id: str) -> str:
    """Hash of a fair job's score and owner, kept so a re-enqueue of the same
    work (the next attempt) goes back to the same place."""
    return f"sdapi:fair:tag:{job_id}"


def wake_channel(queue: str) -> str:
    """Pub/sub channel told of new work on `queue`, so nodes need not wait a poll."""
    return f"{queue}:wake"


# Pub/sub channel carrying the ids of cancelled generations (the flag at
# `cancel_key` stays the truth; the message only saves a node from polling it).
CANCEL_CHANNEL = "sdapi:cancels"
# Pub/sub channel carrying the ids of revoked tokens: every web replica closes
# the WebSockets opened with one at once (the database stays the truth).
REVOKED_TOKENS_CHANNEL = "sdapi:tokens:revoked"
# Pub/sub channel carrying the ids of users whose row changed (premium, email,
# default model): every web replica drops the tokens it cached for them.
USERS_CHANGED_CHANNEL = "sdapi:users:changed"


def events_key(generation_id: UUID | str) -> str:
    """Redis stream of a generation's events, replayed to late subscribers."""
    return f"sdapi:events:{generation_id}"


def done_key(generation_id: UUID | str) -> str:
    """Set (NX) by whoever appends the single `done` event of a generation."""
    return f"sdapi:done:{generation_id}"


def cancel_key(generation_id: UUID | str) -> str:
    """Present while a generation is cancelled; the node checks it every step."""
    return f"sdapi:cancel:{generation_id}"


def image_key(generation_id: UUID | str, index: int) -> str:
    """PNG bytes of one image, from the node until `jobs` has stored them."""
    return f"sdapi:image:{generation_id}:{index}"


def input_key(sha256: str) -> str:
    """Bytes of an input image (init image or mask), named by their SHA-256."""
    return f"sdapi:input:{sha256}"


def progress_key(generation_id: UUID | str) -> str:
    """Hash with the latest `step` and `total` of a running generation."""
    return f"sdapi:progress:{generation_id}"


def speed_key(model: str) -> str:
    """Hash of what the nodes learned of their speed with `model`: one field
    per node and size bucket, one per node's loads (`sdapi.contract.speed`)."""
    return f"sdapi:speed:{model}"


def node_key(node_id: str) -> str:
    """A node's `NodeInfo`, refreshed while it lives (used without Consul)."""
    return f"sdapi:node:{node_id}"


def generation_job_id(generation_id: UUID | str, attempt: int = 1) -> str:
    """arq job id of a premium generation; a re-enqueue gets a new one."""
    return str(generation_id) if attempt <= 1 else f"{generation_id}:{attempt}"


def batch_job_id(batch_id: UUID | str, attempt: int = 1) -> str:
    """arq job id of a normal-tier batch."""
    return f"batch:{batch_id}" if attempt <= 1 else f"batch:{batch_id}:{attempt}"


def result_job_id(generation_id: UUID | str, attempt: int = 1) -> str:
    """arq job id of the `store_result` job of one attempt of a generation."""
    return f"result:{generation_id}:{attempt}"


def started_job_id(generation_id: UUID | str, attempt: int = 1) -> str:
    """arq job id of the `mark_started` job of one attempt of a generation."""
    return f"started:{generation_id}:{attempt}"


# Sorted set of the ids of nodes announced in Redis, scored by expiry time.
NODES_INDEX = "sdapi:nodes"
# Last NodeInfo seen per model: defaults for normal-tier requests made while
# no node of that model is up (they wait in the database for one).
KNOWN_MODELS_KEY = "sdapi:models:known"
# Sorted set: model -> when (Unix time) a node was last seen serving it.
KNOWN_MODELS_SEEN_KEY = "sdapi:models:seen"


# --- keys of one process, named here so the list above is the whole of Redis.

# web: failed sign-ins counted per client, per account name and per pair
# (`web/throttle.py`).
SIGNIN_FAILURES_PREFIX = "sdapi:signin-failures"
# web: when a password reset last lifted an account's sign-in limits.
SIGNIN_LIFTED_PREFIX = "sdapi:signin-lifted"
# web: sign-ups (and other emails to any address) per client address.
SIGNUPS_PREFIX = "sdapi:signups"
# web: "someone tried to sign up with your address" mails per address today.
SIGNUP_NOTICES_PREFIX = "sdapi:signup-notices"
# web: password reset attempts per client and per token.
PASSWORD_RESET_ATTEMPTS_PREFIX = "sdapi:password-reset-attempts"  # noqa: S105
# web: one key per user while a re-sent verification email holds back the
# next, and a daily count under `<prefix>:day:<user id>`.
VERIFY_RESEND_PREFIX = "sdapi:verify-resend"
# web: password reset emails one account got today.
PASSWORD_RESETS_PREFIX = "sdapi:password-resets"  # noqa: S105 (a key name)
# web: the playground's server-side sessions, `<prefix><session id>`
# (aiohttp-session's cookie name plus "_").
SESSION_KEY_PREFIX = "sdapi_session_"
# jobs: rounds in a row the reconciler failed on one unit of work.
RECONCILE_FAILURES_PREFIX = "sdapi:reconcile:failures:"


def dispatch_lock_key(model: str) -> str:
    """Name of the PostgreSQL advisory lock one dispatcher of `model` holds
    while it takes room on the batch queue (not a Redis key)."""
    return f"sdapi:dispatch:{model}"
