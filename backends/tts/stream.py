"""Answering one speech request: streamed sentence by sentence, or whole.

The first sentence is synthesized before the response starts, so an engine error there still gets
a proper status. Then:
- one sentence in all, or `"stream": false`: the whole audio is made first and sent in one sized
  answer (Content-Length; a WAV with its RIFF and data sizes filled in); an engine error in any
  sentence still gets a proper status;
- else streamed: each sentence is sent as soon as it is synthesized (a WAV with open sizes: the
  length is not known when the header goes out). Later failures cut the stream short (no final
  chunk), which clients notice.
A client that goes away stops synthesis before the next sentence.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from .formats import RESPONSE_FORMATS, Encoder, ResponseFormat, encode_whole
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


def answer_headers(response_format: ResponseFormat, sample_rate: int, sentences: int) -> dict[str, str]:
    return {
        "Content-Type": response_format.content_type,
        "X-Sample-Rate": str(sample_rate),
        "X-Sentences": str(sentences),
        "Cache-Control": "no-store",
    }


async def answer_speech(
    request: web.Request, runner: EngineRunner, speech: SpeechRequest
) -> web.StreamResponse:
    """Answer `request` with `speech` in its response format: whole or streamed per sentence."""
    sentences = split_sentences(speech.text)
    first_pcm = await runner.synthesize(sentences[0], speech)
    if len(sentences) == 1 or not speech.stream:
        return await whole_speech(request, runner, speech, sentences, first_pcm)
    return await stream_speech(request, runner, speech, sentences, first_pcm)


async def whole_speech(
    request: web.Request, runner: EngineRunner, speech: SpeechRequest, sentences: list[str],
    first_pcm: bytes,
) -> web.Response:
    """All sentences synthesized, then one sized answer."""
    response_format = RESPONSE_FORMATS[speech.response_format]
    sample_rate = runner.engine.sample_rate
    pieces = [first_pcm]
    for sentence in sentences[1:]:
        if client_gone(request):
            log.info("client went away after %d of %d sentences; synthesis stopped",
                     len(pieces), len(sentences))
            return web.Response(status=499)  # nobody reads it
        pieces.append(await runner.synthesize(sentence, speech))
    pcm = b"".join(pieces)
    if response_format.cpu_heavy:
        body = await asyncio.to_thread(encode_whole, response_format, sample_rate, pcm)
    else:
        body = encode_whole(response_format, sample_rate, pcm)
    return web.Response(body=body, headers=answer_headers(response_format, sample_rate, len(sentences)))


async def stream_speech(
    request: web.Request, runner: EngineRunner, speech: SpeechRequest, sentences: list[str],
    first_pcm: bytes,
) -> web.StreamResponse:
    """The first sentence's audio at once, then each further sentence's as it is made."""
    response_format = RESPONSE_FORMATS[speech.response_format]
    sample_rate = runner.engine.sample_rate
    encoder = response_format.encoder(sample_rate, None)
    response = web.StreamResponse(headers=answer_headers(response_format, sample_rate, len(sentences)))
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
