"""What every front door does with a session, whatever its wire: carry out the session's outputs
(the one interpreter of them: what needs the gateway is asked of ``Seating``, whose answers are
the session's next outputs, carried out here in turn), apply what the bus reports, decode an
upload. A door subclasses ``SessionDriver`` and says only
how an event and a close reach its client (``deliver``, ``hang_up``).

Rule 1: one nursery per session (``nursery``): the writer (``_apply_inbox``, started only while
the bus has reported something not yet applied), the decoder, and the door's own reader run in
it; a ``Close`` cancels it.
Rule 2: an ending session's last words are bounded and shielded (``last_words``): a client that
is gone or stuck cannot hold the gateway's cleanup.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import IO, TypeVar

import trio

from katydid.audio import DecodedStream, first_block_bytes
from katydid.errors import AudioError, ClientGone, ErrorCode, ProtocolError
from katydid.gateway.events import ServerEvent
from katydid.gateway.hub import Hub
from katydid.gateway.live import Live, apply
from katydid.gateway.outputs import (
    Admit,
    CancelJobs,
    Close,
    Decode,
    Forget,
    Output,
    Publish,
    Reattach,
    Remember,
    Send,
)
from katydid.gateway.session_queries import Phase
from katydid.messages import JobResult

T = TypeVar("T")

LAST_WORDS_S = 2.0  # for the error and close of a session that is ending anyway


class SessionDriver:
    def __init__(self, gateway: Hub, live: Live) -> None:
        self.gateway = gateway
        self.seating = gateway.seating
        self.live = live
        self.session = live.session
        self.nursery: trio.Nursery | None = None
        self._writing = False

    # --- what a door says ---

    async def deliver(self, event: ServerEvent) -> None:
        """Get ``event`` to the client (bounded by the door).

        Raises:
            ClientGone: the client cannot be reached.
            trio.TooSlowError: the client does not take it within ``send_timeout_s``.
        """
        raise NotImplementedError

    async def hang_up(self, close: Close) -> None:
        """End the client's connection (bounded by the caller)."""
        raise NotImplementedError

    # --- the session's outputs ---

    def end(self) -> None:
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    def _settle(self, outputs: list[Output]) -> list[Output]:
        """The outputs that need no I/O (admission, cancels) done at once, in order (even a
        closing session's cancels); returns the rest, for the client, in order."""
        rest: list[Output] = []
        for out in outputs:
            if isinstance(out, Admit):
                rest += self._settle(self.seating.admit(self.live, out))
            elif isinstance(out, CancelJobs):
                self.seating.cleanup.cancel(out)
            elif isinstance(out, Remember):
                self.gateway.resumption.remember(self.live, out.state)
            elif isinstance(out, Forget):
                self.gateway.resumption.forget(self.live)
            else:
                rest.append(out)
        self.seating.recount(self.live)
        return rest

    async def emit(self, outputs: list[Output]) -> None:
        """Carry out a session's outputs, in order."""
        for out in self._settle(outputs):
            if isinstance(out, Send):
                await self._send(out.event)
            elif isinstance(out, Publish):
                final = out.job.options.kind == "final"
                refused = await self.gateway.resumption.recorded(self.live, final=final)
                if refused is not None and refused.code is ErrorCode.SESSION_TAKEN:
                    await self.emit(self.session.taken())  # its jobs are the newer one's
                elif refused is not None:
                    await self.emit(self.session.publish_failed(out.job, refused))
                else:
                    await self.emit(await self.seating.publish(self.live, out, self._send))
            elif isinstance(out, Reattach):
                resumption = self.gateway.resumption
                adopt = self.gateway.adopt
                await self.emit(await resumption.reattach(self.live, out, adopt, self._send))
            elif isinstance(out, Decode):
                assert self.nursery is not None
                self.nursery.start_soon(self.decode, out.upload)
            elif isinstance(out, Close):
                with trio.move_on_after(LAST_WORDS_S):
                    await self.hang_up(out)
                self.end()
                return
            if self.session.closed and not isinstance(out, Send):
                return

    async def _send(self, event: ServerEvent) -> None:
        await self.bounded(partial(self.deliver, event))

    async def bounded(self, write: Callable[[], Awaitable[None]]) -> None:
        """``write`` to the client within ``send_timeout_s``; a client that does not take it
        (or is gone) ends the session."""
        try:
            with trio.fail_after(self.gateway.cfg.send_timeout_s):
                await write()
        except trio.TooSlowError:
            stuck = ProtocolError(ErrorCode.TIMEOUT, "client does not read its results")
            await self.last_words(self.session.fail(stuck))
            self.end()
        except ClientGone:
            await self.last_words(self.session.client_gone())
            self.end()

    async def last_words(self, outputs: list[Output]) -> None:
        """Outputs of a session that is ending anyway: bounded, shielded, best effort."""
        with trio.CancelScope(shield=True), trio.move_on_after(LAST_WORDS_S):
            for out in self._settle(outputs):
                try:
                    if isinstance(out, Send):
                        await self.deliver(out.event)
                    elif isinstance(out, Close):
                        await self.hang_up(out)
                except ClientGone:
                    return

    async def next_message(self, receive: Callable[[], Awaitable[T]]) -> T | None:
        """The client's next message (``receive``), or None once the session's deadline passed
        first (the session has then been ticked). While the in-flight bound holds the session
        back, it waits for room before reading: our backpressure, not the client's silence."""
        s = self.session
        if s.phase is Phase.STREAMING and not s.wants_audio:
            await self.live.wait_for_room()
            s.resumed(trio.current_time())
        with trio.move_on_at(s.deadline):
            return await receive()
        await self.emit(s.tick(trio.current_time()))
        return None

    async def gone(self, exc: ClientGone) -> None:
        """The client went away (or its transport closed it): the session ends, jobs cancelled."""
        gone = self.session.client_gone(too_large=exc.too_large, said_goodbye=exc.said_goodbye)
        await self.last_words(gone)
        self.end()

    async def drive(self, reader: Callable[[], Awaitable[None]]) -> None:
        """The session's tasks in one nursery: the door's ``reader``, and the writer.
        A bug ends the session with ``internal``, never the gateway (a handler's exception
        would reach the listener's nursery and stop every session)."""
        s = self.session
        try:
            try:
                async with trio.open_nursery() as nursery:
                    self.open(nursery)
                    await reader()
            except* ClientGone as group:
                # The reader and the writer may both find the connection gone: what either
                # learnt of how (a goodbye, a message too large) holds for the session.
                found = [e for e in group.exceptions if isinstance(e, ClientGone)]
                await self.gone(
                    ClientGone(
                        too_large=any(e.too_large for e in found),
                        said_goodbye=any(e.said_goodbye for e in found),
                    )
                )
            except* Exception as group:
                self.gateway.sampled.log(
                    "error", "session_failed", session_id=s.session_id, exc_info=group
                )
                failed = ProtocolError(ErrorCode.INTERNAL, "the gateway failed on the session")
                await self.last_words(s.fail(failed))
        finally:
            await self.finish()

    def open(self, nursery: trio.Nursery) -> None:
        """The session's tasks run in ``nursery`` from now on; what the bus reports is applied
        by a writer started there when it comes."""
        self.nursery = nursery
        self.live.on_item = self._wake
        self._wake()

    def _wake(self) -> None:
        if self._writing or not self.live.inbox or self.nursery is None:
            return
        try:
            self.nursery.start_soon(self._apply_inbox)
        except RuntimeError:  # the nursery is closed: the session is ending, nothing to apply
            return
        self._writing = True

    async def _apply_inbox(self) -> None:
        """The writer: what the bus reported (results, dead jobs, queue state), applied in
        order; it ends when nothing is left (the next report starts another)."""
        live = self.live
        try:
            while inbox := live.inbox:
                item = inbox.popleft()
                if not inbox:
                    live.inbox = None  # a report delivered meanwhile makes a new one
                outputs = apply(self.session, item)
                self.live.progressed()
                if isinstance(item, JobResult):
                    self.session.progressed(trio.current_time())
                await self.emit(outputs)
        finally:
            self._writing = False

    async def decode(self, upload: IO[bytes]) -> None:
        """An upload, decoded block by block (off the event loop), its chunks published as they
        are cut. The session holds one decoded block and the chunk being cut, never the file's
        samples; publishing waits on the in-flight bound, so decoding goes at the pace of the
        workers, and each block is decoded and published inside the gateway's window (so a
        storm of uploads is decoded a window at a time, not all at once). The decoder itself is
        opened inside the window, and closed once the file is read: an open one holds 16-300 KB
        (see ``audio._DECODER_BYTES``), and in a storm every session whose upload was complete
        held one while it waited its turn."""
        s = self.session
        window = self.gateway.window
        stream: DecodedStream | None = None
        try:
            while True:
                await self.live.wait_for_room()
                if s.closed:
                    return
                # The block and the decoder, plus the chunk in progress that the block may
                # complete (a short file is one chunk, published with its last block).
                need = (
                    first_block_bytes(upload)
                    if stream is None
                    else stream.next_block_bytes() + s.buffered_audio_bytes
                )
                with await window.take(need) as hold:
                    if stream is None:
                        stream = await self._open(upload)
                        if stream is None or s.closed:  # (it may end while the file opens)
                            return
                        s.decoding(stream.duration_s)
                        if min(stream.next_block_bytes(), window.capacity) > hold.bytes:
                            continue  # guessed short (not a 16 kHz mono WAV): queued again
                    self.live.hold = hold
                    try:
                        if not await self._decode_block(stream):
                            return
                        if stream.exhausted:
                            # The last block: its chunk goes out under the same share (queued
                            # again, every session of a storm held its decoded chunk while it
                            # waited), and the decoder and the file's bytes go now, not when
                            # the last result comes back.
                            stream.close()
                            stream = None
                            upload.close()
                            await self.emit(s.decoded_end())
                            return
                    finally:
                        self.live.hold = None
        finally:
            if stream is not None:
                stream.close()

    async def _open(self, upload: IO[bytes]) -> DecodedStream | None:
        """The upload's decoder, or None if it is not audio we decode (the session has then
        failed)."""
        max_s = self.gateway.cfg.max_session_s
        try:
            return await trio.to_thread.run_sync(lambda: DecodedStream(upload, max_audio_s=max_s))
        except AudioError as exc:
            await self.emit(self.session.fail(ProtocolError(ErrorCode.UNSUPPORTED_AUDIO, str(exc))))
            return None

    async def _decode_block(self, stream: DecodedStream) -> bool:
        """Decode the next block and publish the chunks it completes; False if the file is not
        decodable (the session has then failed)."""
        s = self.session
        # Not abandoned on cancel: the block's thread must be done with the decoder before it
        # is closed (a 10 s block decodes in milliseconds).
        try:
            block = await trio.to_thread.run_sync(stream.next_pcm16)
        except AudioError as exc:
            await self.emit(s.fail(ProtocolError(ErrorCode.UNSUPPORTED_AUDIO, str(exc))))
            return False
        if block is not None:
            outputs = s.decoded(block)
            del block  # not held while its chunks are published
            await self.emit(outputs)
        return True

    async def finish(self) -> None:
        """However the session's tasks ended: a session not closed by then was cut off from
        outside (the server stopping, or the client gone)."""
        s = self.session
        if not s.closed:
            await self.last_words(s.shutdown() if self.seating.stopping else s.client_gone())
