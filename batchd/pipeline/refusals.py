"""What refused creates prove, and how creates go on after them (design: Refusals and faults).

A state machine with no I/O: the submitter tells it what happened to each create (sent,
accepted, refused) and asks it what to send next (which tasks, how many, how many bytes,
whether to wait). It never touches the store or the API; what it decides about tasks
(a culprit to mark invalid) it hands back for the submitter to write.

    held_s()                      seconds creates must still wait (a pause, a 429), or None
    max_requests_cap, max_bytes   the limits refusals taught (bisection, a 413)
    suspect_to_retry(), retry_dropped(task_id)
                                  suspects to send again alone, one create each
    plan(limit)                   which pending tasks the next chunk may take
    no_control()                  no task to send as the control: pause, the wait
    create_sent()                 an intent is recorded and its create goes out
    create_not_sent()             -> its connection never opened: the wait before the next
    create_accepted(batch_id, chunk)  -> the culprit the accepted control proves, or None
    diagnose(chunk, exc)          -> Diagnosis: the tasks a refusal proves invalid
    put_back(diagnosis)           after the intent is released: the wait before the next create
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import structlog

from batchd.api import ApiStatusError, BadRequestError, RateLimitError, RequestTooLargeError
from batchd.config import BatchingConfig
from batchd.pipeline.chunker import Chunk

log = structlog.get_logger("batchd.pipeline.refusals")

_BAD_INDEX = re.compile(r"requests\.(\d+)\.")
# A 400 that names no request may be about the account, not the batch (a spend limit
# reached, a credit balance too low: spec §6.1). A lone request refused so is a suspect and
# the next create a control (another task, alone); a refused control is one more suspect,
# since bad requests may sit next to each other in the queue. This many different tasks
# refused alone in a row, with no create accepted, read as the account: creates pause
# this long, doubling each time, until one is accepted.
_MAX_SUSPECTS = 3
_REFUSAL_PAUSE_FIRST_S = 60.0
_REFUSAL_PAUSE_MAX_S = 900.0
# A create refused with 429 and no retry-after (the spend-cap 429 has none, §6.1): wait
# this long, doubling each time, until a create is accepted. A retry-after is honoured,
# but never below the floor: each attempt uploads the whole body again.
_RATE_LIMIT_FIRST_S = 5.0
_RATE_LIMIT_MAX_S = 300.0
_RETRY_AFTER_FLOOR_S = 1.0
_MAX_DOUBLINGS = 16  # keeps 2**n small; every wait is capped long before
# A create whose connection never opened (the API unreachable): creates wait this long,
# doubling each time, until one is answered; each try costs an intent and its release.
_NOT_SENT_FIRST_S = 1.0
_NOT_SENT_MAX_S = 60.0
# Suspects kept for a later verdict: a bound on memory only (each is dropped once it is
# accepted or blamed).
_SUSPECTS_KEPT = 64

# What a lone request refused by a create that names no request tells us.
_LoneVerdict = Literal["culprit", "control", "pause"]


@dataclass(frozen=True, slots=True)
class Suspect:
    """A lone request refused by a create that named no request (a 400, or a 413).

    The refusal alone proves nothing: the API refuses every create so while the account
    is (§6.1). Guilty when it is the only suspect and the control right after it is
    accepted, or when it is refused alone again after a create was accepted
    (`accepted_before` tells), creates not being paused.
    """

    task_id: int
    custom_id: str
    message: str  # the API's message
    reason: str  # what the task's `error` will say if it is blamed
    accepted_before: int  # creates accepted by this process before the refusal
    version: str  # the row as read for the refused create: blamed only if still that row


@dataclass(frozen=True, slots=True)
class Pick:
    """Which pending tasks the next chunk may take, oldest first."""

    max_requests: int
    only: int | None = None  # this task alone (a suspect retried)
    exclude: frozenset[int] = frozenset()  # suspects: a control must be another task
    after: int = 0  # tasks after this id only (the probe after a pause)


@dataclass(frozen=True, slots=True)
class Plan:
    """Picks to try in order: the first whose chunk holds a task is sent, else the last's.

    `control`: the chunk is a control (one task, not a suspect); none pending while tasks
    are means there is nothing to test the suspects against (`no_control`).
    """

    picks: tuple[Pick, ...]
    control: bool = False


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """What a refused create proves, decided before its intent is released."""

    error: ApiStatusError
    invalid: list[tuple[str, str]]  # (custom_id, reason): released as invalid
    judged: list[int]  # their task ids
    verdict: _LoneVerdict | None  # for a lone request refused by a create naming nobody
    names_nobody: bool  # a 413, or a 400 that names no request


class Refusals:
    """The refusal-diagnosis state of one submitter: bisection, suspects, pauses, backoffs."""

    def __init__(self, config: BatchingConfig, *, monotonic: Callable[[], float]) -> None:
        self._config = config
        self._monotonic = monotonic
        # Lowered by a 413 on a batch of several; only ever a packing limit (the submitter
        # sends a request over it alone, under the configured limit).
        self._max_bytes = config.max_bytes
        # Bisection after a 400 that names no request: batches are halved until the one
        # request the API refuses is alone (a suspect, see Suspect). The cap is lifted
        # once a batch accepted reaches the end of the last refused one.
        self._max_requests_cap: int | None = None
        self._bisect_end: int | None = None  # the last task id of that refused batch
        self._suspects: dict[int, Suspect] = {}  # task id ->, oldest first
        self._verify: list[int] = []  # suspects to retry alone, one create each
        self._accepted = 0  # creates accepted so far
        self._refusal_pauses = 0  # creates paused in a row for a refusal of everything
        self._probe_due = False  # the next create is the probe after such a pause
        self._probe_after = 0  # the task id the last lone refusal was about
        self._rate_limited = 0  # creates refused with 429 in a row
        self._not_sent = 0  # creates whose connection never opened, in a row
        self._probe_sending = False  # the create in flight is the probe after a pause
        # No create before this monotonic time (a pause, a 429 backoff): the daemon's
        # wait may be cut short when a batch ends, this may not.
        self._hold_until: float | None = None

    @property
    def max_bytes(self) -> int:
        """The byte limit batches are packed to: `max_bytes`, or lower after a 413."""
        return self._max_bytes

    @property
    def max_requests_cap(self) -> int | None:
        """The request count batches are halved to while bisecting, or None."""
        return self._max_requests_cap

    def held_s(self) -> float | None:
        """Seconds left before creates may resume, or None."""
        if self._hold_until is None:
            return None
        left = self._hold_until - self._monotonic()
        if left <= 0:
            self._hold_until = None
            return None
        return left

    def suspect_to_retry(self) -> int | None:
        """The task id of the next suspect to send again alone, before anything else."""
        return self._verify[0] if self._verify else None

    def retry_dropped(self, task_id: int) -> None:
        """That suspect is no longer pending (canceled, say): nothing to retry."""
        self._verify.remove(task_id)

    def plan(self, limit: int) -> Plan:
        """Which pending tasks the next chunk may take, once no suspect is to be retried."""
        suspects = frozenset(self._suspects)
        if self._probe_due:
            # The probe after a pause starts after the last task refused alone: a run of
            # bad requests longer than _MAX_SUSPECTS is walked through, a pause per
            # request, instead of the same ones being probed for ever. A suspect itself
            # only when no other task is pending.
            return Plan(
                (
                    Pick(1, exclude=suspects, after=self._probe_after),
                    Pick(1, exclude=suspects),
                    Pick(1),
                )
            )
        if self._run() or self._refusal_pauses:
            return Plan((Pick(1, exclude=suspects),), control=True)
        return Plan((Pick(limit),))

    def no_control(self) -> float:
        """No other task to test a lone refusal against: blame nobody, retry it later."""
        wait = self._pause_creates()
        log.warning(
            "refusal_unproven",
            custom_ids=[suspect.custom_id for suspect in self._run()],
            reason="no other pending task to send as a control",
            wait_s=wait,
        )
        return wait

    def create_sent(self) -> None:
        """An intent is recorded and its create goes out: that is the probe, if one was due."""
        self._probe_sending, self._probe_due = self._probe_due, False

    def create_not_sent(self) -> float:
        """That create's connection never opened: it proved nothing (a probe is still due)
        and the API is unreachable: how long creates wait before the next try."""
        self._probe_due = self._probe_sending
        doublings = min(self._not_sent, _MAX_DOUBLINGS)
        self._not_sent += 1
        wait = min(_NOT_SENT_FIRST_S * 2.0**doublings, _NOT_SENT_MAX_S)
        self._hold(wait)
        return wait

    def create_accepted(self, batch_id: str, chunk: Chunk) -> Suspect | None:
        """Backoffs end; limits learned from refusals relax; suspects are judged.

        Returns the suspect this accepted control proves guilty, already forgotten here:
        the caller marks its task invalid.
        """
        self._rate_limited = 0
        self._not_sent = 0
        paused, self._refusal_pauses = self._refusal_pauses, 0
        if paused:
            log.warning("creates_resumed", pauses=paused)
        for innocent in self._forget(chunk.task_ids):
            log.info("suspect_accepted", custom_id=innocent.custom_id, batch_id=batch_id)
        run = self._run()
        self._accepted += 1
        self._probe_after = 0
        self._relax_limits(chunk)
        if paused or not run:
            # After a pause the refusals were the account's: the suspects go out again in
            # full batches, and one refused alone again is blamed then.
            return None
        if len(run) > 1:
            # Several refused in a row is also how a refusal of the account looks that
            # ended just before this control: each is retried alone before it is blamed.
            self._verify = [suspect.task_id for suspect in run]
            log.warning("suspects_retrying", custom_ids=[s.custom_id for s in run])
            return None
        suspect = run[0]
        self._forget([suspect.task_id])
        return suspect

    def diagnose(self, chunk: Chunk, exc: ApiStatusError) -> Diagnosis:
        """The API answered and created nothing: which tasks that proves invalid, if any."""
        invalid: list[tuple[str, str]] = []  # (custom_id, reason)
        judged: list[int] = []  # their task ids
        named = _BAD_INDEX.search(exc.message) if isinstance(exc, BadRequestError) else None
        names_nobody = isinstance(exc, RequestTooLargeError) or (
            isinstance(exc, BadRequestError) and named is None
        )
        verdict: _LoneVerdict | None = None
        if named is not None:
            index = int(named.group(1))
            if index < len(chunk.custom_ids):
                invalid.append((chunk.custom_ids[index], f"refused by the API: {exc.message}"))
                judged.append(chunk.task_ids[index])
        elif names_nobody and len(chunk) == 1:
            # Too large alone, or refused alone: the request, or every create (§6.1)?
            verdict = self._judge_lone_refusal(chunk, exc)
            if verdict == "culprit":
                invalid.append((chunk.custom_ids[0], _refusal_reason(exc, chunk)))
                judged.append(chunk.task_ids[0])
        elif isinstance(exc, RequestTooLargeError):
            # Our byte count is exact, so the server's limit is lower than this body.
            self._max_bytes = min(self._max_bytes, max(1024, chunk.body.size // 2))
            log.error("batch_too_large", body_bytes=chunk.body.size, new_max_bytes=self._max_bytes)
        return Diagnosis(exc, invalid, judged, verdict, names_nobody)

    def put_back(self, chunk: Chunk, diagnosis: Diagnosis) -> float | None:
        """The refused tasks are pending again (the invalid ones marked): how long before
        the next create (None, or 0: at once)."""
        self._forget(diagnosis.judged)
        self._not_sent = 0  # the API answered: it is reachable again
        exc, verdict = diagnosis.error, diagnosis.verdict
        retry_after = exc.retry_after_s
        if isinstance(exc, RateLimitError):
            wait = self._rate_limit_wait(retry_after)
            log.warning("batch_create_rate_limited", retry_after_s=retry_after, wait_s=wait)
            return wait
        if diagnosis.invalid:
            log.warning("task_refused", custom_id=diagnosis.invalid[0][0], error=exc.message)
            return retry_after  # at once
        if verdict == "control":
            return retry_after  # at once
        if verdict == "pause":
            retry_after = self._pause_creates()
        elif diagnosis.names_nobody and isinstance(exc, BadRequestError):
            self._bisect(chunk, exc.message)
            return retry_after  # at once
        elif isinstance(exc, RequestTooLargeError):
            # A batch of several, too large: diagnose() halved the byte limit. The refusal
            # is about size, nothing to wait out: the smaller batch goes at once.
            return retry_after
        else:
            log.error("batch_create_refused", status=exc.status, error=exc.message)
            retry_after = retry_after or 60.0
        return retry_after

    def _run(self) -> list[Suspect]:
        """The suspects refused since the last create accepted, oldest first."""
        return [s for s in self._suspects.values() if s.accepted_before == self._accepted]

    def _forget(self, task_ids: list[int]) -> list[Suspect]:
        """These tasks are judged (accepted, or invalid): the suspects among them, dropped."""
        if not self._suspects:
            return []  # the usual case: no set of a 100,000-request batch's ids
        judged = set(task_ids)
        dropped = [suspect for suspect in self._suspects.values() if suspect.task_id in judged]
        for suspect in dropped:
            del self._suspects[suspect.task_id]
        self._verify = [task_id for task_id in self._verify if task_id not in judged]
        return dropped

    def _relax_limits(self, chunk: Chunk) -> None:
        """An accepted batch shows what the API takes: lift what refusals lowered."""
        if chunk.body.size > self._max_bytes:
            # A request over the learned limit went alone and was taken: the server takes
            # at least this much. Never raised further blindly: each try re-uploads a body
            # that may be hundreds of MB only to be refused again.
            self._max_bytes = chunk.body.size
            log.info("max_bytes_raised", max_bytes=self._max_bytes)
        if self._bisect_end is not None and chunk.task_ids[-1] >= self._bisect_end:
            # Past the end of the last refused batch: every request of it was taken or
            # isolated, so the refusal is behind us and full batches are safe again.
            # Lifting at the first half accepted would send the refused half again at
            # full size, uploading it once more for every halving.
            self._bisect_end = None
            if self._max_requests_cap is not None:
                self._max_requests_cap = None
                log.info("bisection_done", max_requests=self._config.max_requests)

    def _bisect(self, chunk: Chunk, message: str) -> None:
        """A batch refused with a 400 naming no request: the next ones are half as big."""
        self._max_requests_cap = max(1, len(chunk) // 2)
        self._bisect_end = chunk.task_ids[-1]
        log.warning(
            "batch_refused_bisecting",
            count=len(chunk),
            next_count=self._max_requests_cap,
            error=message,
        )

    def _judge_lone_refusal(self, chunk: Chunk, exc: ApiStatusError) -> _LoneVerdict:
        """A lone request refused by a create that names no request: what it proves.

        Refused alone again after a create was accepted: the culprit. Otherwise it is a
        suspect and the next create a control, another task alone; but so many suspects
        in a row, or a refused probe after a pause, mean the account is refused (§6.1).
        """
        task_id, custom_id, message = chunk.task_ids[0], chunk.custom_ids[0], exc.message
        self._probe_after = task_id
        known = self._suspects.get(task_id)
        if self._refusal_pauses:
            # The probe after a pause: the account may still be refused, so this says
            # nothing about the request, which is never blamed now. A suspect is the
            # probe only when no other task is pending (the control that follows finds
            # none and pauses again); any other probe refused pauses longer.
            return "control" if known is not None else "pause"
        if known is not None and known.accepted_before < self._accepted:
            return "culprit"
        self._suspects[task_id] = Suspect(
            task_id,
            custom_id,
            message,
            _refusal_reason(exc, chunk),
            self._accepted,
            chunk.versions[0],
        )
        while len(self._suspects) > _SUSPECTS_KEPT:
            del self._suspects[next(iter(self._suspects))]
        run = self._run()
        if len(run) < _MAX_SUSPECTS:
            log.warning("request_refused_alone", custom_id=custom_id, error=message)
            return "control"
        log.error(
            "creates_refused_not_about_requests",
            error=message,
            suspects=[suspect.custom_id for suspect in run],
            hint="an account setting (spend limit, credit balance)? nobody is blamed",
        )
        return "pause"

    def _pause_creates(self) -> float:
        """Hold creates, longer each time, until one is accepted; then one request each."""
        doublings = min(self._refusal_pauses, _MAX_DOUBLINGS)
        wait = min(_REFUSAL_PAUSE_FIRST_S * 2.0**doublings, _REFUSAL_PAUSE_MAX_S)
        self._refusal_pauses += 1
        self._probe_due = True
        self._max_requests_cap = None
        self._bisect_end = None
        if self._max_bytes < self._config.max_bytes:
            # Every create was refused, whatever its size: the 413s that lowered the
            # limit may have been that too (a proxy refusing everything), not a limit.
            self._max_bytes = self._config.max_bytes
            log.warning("max_bytes_restored", max_bytes=self._max_bytes)
        self._hold(wait)
        log.error("creates_paused", wait_s=wait, pauses=self._refusal_pauses)
        return wait

    def _rate_limit_wait(self, retry_after_s: float | None) -> float:
        """How long to hold creates after a 429: the API's wait, or a growing one."""
        doublings = min(self._rate_limited, _MAX_DOUBLINGS)
        self._rate_limited += 1
        if retry_after_s:  # the API's wait, but never a re-upload many times a second
            wait = max(retry_after_s, _RETRY_AFTER_FLOOR_S)
        else:
            wait = min(_RATE_LIMIT_FIRST_S * 2.0**doublings, _RATE_LIMIT_MAX_S)
        self._hold(wait)
        return wait

    def _hold(self, wait_s: float) -> None:
        self._hold_until = self._monotonic() + wait_s


def _refusal_reason(exc: ApiStatusError, chunk: Chunk) -> str:
    """Why a lone request found to be the culprit is invalid, in the API's words."""
    if isinstance(exc, RequestTooLargeError):
        return f"refused by the API as too large ({chunk.body.size} bytes alone): {exc.message}"
    return f"refused by the API: {exc.message}"
