"""The life of one scientist's connection on the owner, as an explicit state machine.

    handshake --hello, joins need approval--> joining --accepted--> active
    handshake --hello--------------------------------------------> active
    handshake --hello with a resume token that matches---> merged (its link goes to the suspended one)
    handshake / joining --declined, too many sessions, no such resume--> rejected
    handshake --bad identity, protocol violation, no hello in time--> closed
    active --link dropped, resume window open--> suspended --resume hello--> resuming --> active
    any but merged --link closed, window passed, owner closed--> finished

`merged`, and `finished` are final. A transition the table does not allow is refused and logged
(it is a race the code lost, such as a join decided after the link closed), never applied.
"""
from __future__ import annotations

import enum
import logging
from typing import Dict, FrozenSet

log = logging.getLogger("duet.owner")


class ConnState(str, enum.Enum):
    HANDSHAKE = "handshake"  # the link is open; waiting for a verified hello
    JOINING = "joining"  # identity verified; the join waits in the owner's queue
    ACTIVE = "active"  # serving
    SUSPENDED = "suspended"  # the link dropped; objects, requests and worker kept for the resume window
    RESUMING = "resuming"  # a new link proved the resume token; it is being handed over
    MERGED = "merged"  # this link's connection was only a carrier for a resume: it handed its link over
    REJECTED = "rejected"  # the join was refused; the link is being closed
    CLOSED = "closed"  # the owner closed the link before it became active
    FINISHED = "finished"  # forgotten for good: worker stopped, pending requests cancelled

    def __str__(self) -> str:  # as shown in the panel and logs
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


S = ConnState
TRANSITIONS: Dict[ConnState, FrozenSet[ConnState]] = {
    S.HANDSHAKE: frozenset({S.JOINING, S.ACTIVE, S.MERGED, S.REJECTED, S.CLOSED, S.FINISHED}),
    S.JOINING: frozenset({S.ACTIVE, S.REJECTED, S.CLOSED, S.FINISHED}),
    S.ACTIVE: frozenset({S.SUSPENDED, S.CLOSED, S.FINISHED}),
    S.SUSPENDED: frozenset({S.RESUMING, S.FINISHED}),
    S.RESUMING: frozenset({S.ACTIVE, S.FINISHED}),
    S.MERGED: frozenset(),
    S.REJECTED: frozenset({S.FINISHED}),
    S.CLOSED: frozenset({S.FINISHED}),
    S.FINISHED: frozenset(),
}
# States in which a connection counts against its identity key's session limit.
LIVE = frozenset({S.ACTIVE, S.JOINING, S.SUSPENDED, S.RESUMING})


def allowed(old: ConnState, new: ConnState) -> bool:
    return new in TRANSITIONS[old]


def check(old: ConnState, new: ConnState, who: str) -> bool:
    """Whether `old -> new` may happen; logs it either way (refusals at INFO: they are lost races)."""
    if allowed(old, new):
        log.debug("connection %s: %s -> %s", who, old, new)
        return True
    log.info("connection %s: ignored %s -> %s (not a transition of the connection state machine)", who, old, new)
    return False
