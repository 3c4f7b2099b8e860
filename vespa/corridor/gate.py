"""The asyncio face of admission: waits a queued request's turn, bounded by the max wait time.

``enter`` returns a started ticket or raises ``Overloaded`` (``admit`` then ``wait`` do the same
in two steps, with no coroutine when the ticket starts at once); ``leave`` must follow every
ticket handed out. A caller cancelled while in line (the client went away) frees its place.
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
        ticket = self.admit(workload)
        if not ticket.started:
            await self.wait(ticket)
        return ticket

    def admit(self, workload: float) -> Ticket:
        """A ticket, started or in line (then ``wait`` for its turn); ``Overloaded`` if none."""
        decision = self.admission.admit(workload)
        if isinstance(decision, Rejection):
            raise Overloaded(decision)
        return decision

    async def wait(self, ticket: Ticket) -> None:
        """Wait for a queued ticket's turn, at most the max wait time (then ``Overloaded``)."""
        turn = asyncio.get_running_loop().create_future()
        self.turns[ticket] = turn
        try:
            await asyncio.wait_for(asyncio.shield(turn), self.admission.max_wait_time)
        except asyncio.TimeoutError:
            self.leave(ticket)
            raise Overloaded(self.admission.queue_timeout()) from None
        except BaseException:
            self.leave(ticket)
            raise
        finally:
            self.turns.pop(ticket, None)

    def leave(self, ticket: Ticket) -> None:
        for started in self.admission.finish(ticket):
            turn = self.turns.get(started)
            if turn is not None and not turn.done():
                turn.set_result(None)
