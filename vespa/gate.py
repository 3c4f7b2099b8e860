"""The asyncio face of admission: waits a queued request's turn, bounded by the max wait time.

``enter`` returns a started ticket or raises ``Overloaded``; ``leave`` must follow every ticket
``enter`` returned. A caller cancelled while in line (the client went away) frees its place.
"""

from __future__ import annotations

import asyncio

from .admission import Admission, Rejection, Ticket


class Overloaded(Exception):
    """The request was not admitted; carries the rejection for the 429 answer."""

    def __init__(self, rejection: Rejection):
        super().__init__(rejection.message)
        self.rejection = rejection


class Gate:
    def __init__(self, admission: Admission):
        self.admission = admission
        self.turns: dict[Ticket, asyncio.Future[None]] = {}

    async def enter(self, workload: float) -> Ticket:
        decision = self.admission.admit(workload)
        if isinstance(decision, Rejection):
            raise Overloaded(decision)
        if decision.started:
            return decision
        turn = asyncio.get_running_loop().create_future()
        self.turns[decision] = turn
        try:
            await asyncio.wait_for(asyncio.shield(turn), self.admission.max_wait_time)
        except asyncio.TimeoutError:
            self.leave(decision)
            raise Overloaded(self.admission.queue_timeout()) from None
        except BaseException:
            self.leave(decision)
            raise
        finally:
            self.turns.pop(decision, None)
        return decision

    def leave(self, ticket: Ticket) -> None:
        for started in self.admission.finish(ticket):
            turn = self.turns.get(started)
            if turn is not None and not turn.done():
                turn.set_result(None)
