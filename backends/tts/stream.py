"""Streaming one speech request: sentence by sentence, each sent as soon as it is synthesized.

The first sentence is synthesized before the response starts, so an engine error there still gets
a proper status. Later failures cut the stream short (no final chunk), which clients notice.
A client that goes away stops synthesis before the next sentence.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from .formats import RESPONSE_FORMATS, Encoder, ResponseFormat
from .runner import EngineRunner
from .speech_request import SpeechRequest
from .text import split_sentences

log = logging.getLogger(__name__)


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def encode(response_format: ResponseFormat, encoder: Encoder, pcm: bytes) -> bytes:
    if response_format.cpu_heavy:
        return await asyncio.to_thread(encoder.encode, pcm)
    return encoder.encode(pcm)


async def stream_speech(
    request: web.Request, runner: EngineRunner, speech: SpeechRequest
) -> web.StreamResponse:
    """Answer `request` with `speech` in its response format, streamed per sentence."""
    response_format = RESPONSE_FORMATS[speech.response_format]
    sample_rate = runner.engine.sample_rate
    encoder = response_format.encoder(sample_rate)
    sentences = split_sentences(speech.text)
    first_pcm = await runner.synthesize(sentences[0], speech)

    response = web.StreamResponse(headers={
        "Content-Type": response_format.content_type,
        "X-Sample-Rate": str(sample_rate),
        "X-Sentences": str(len(sentences)),
        "Cache-Control": "no-store",
    })
    await response.prepare(request)
    sent = 0
    try:
        await response.write(await encode(response_format, encoder, first_pcm))
        sent = 1
        for sentence in sentences[1:]:
            if client_gone(request):
                break
            pcm = await runner.synthesize(sentence, speech)
            await response.write(await encode(response_format, encoder, pcm))
            sent += 1
        if sent == len(sentences):
            await response.write(encoder.finish())
            await response.write_eof()
            return response
    except ConnectionResetError:
        pass
    except Exception:
        log.exception("synthesis failed after %d of %d sentences; cutting the stream", sent, len(sentences))
        if request.transport is not None:
            request.transport.close()
        return response
    log.info("client went away after %d of %d sentences; synthesis stopped", sent, len(sentences))
    return response
