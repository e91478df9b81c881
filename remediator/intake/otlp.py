"""Decode OTLP/HTTP metrics export requests and feed the golden-signal store.

The `POST /v1/metrics` route in `remediator.intake.app` calls `export_metrics`
with the raw body and headers. Both OTLP/HTTP encodings are accepted, binary
protobuf (`application/x-protobuf`) and JSON (`application/json`), optionally
compressed with `Content-Encoding: gzip` or `deflate`. Responses follow the
OTLP/HTTP specification: an `ExportMetricsServiceResponse` in the request's
encoding on success, and a `google.rpc.Status` on failure.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from remediator.intake.store import GoldenSignalStore

logger = logging.getLogger(__name__)

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
SUPPORTED_CONTENT_TYPES = (PROTOBUF, JSON)


class BodyTooLargeError(ValueError):
    """The body, after decompression, is larger than the configured limit."""


class UnsupportedEncodingError(ValueError):
    """The Content-Encoding is neither identity, gzip nor deflate."""


@dataclass(frozen=True)
class OtlpResponse:
    """An HTTP response to send back to the OTLP exporter."""

    status_code: int
    body: bytes
    media_type: str
    # Points of a decoded request that the store kept or refused.
    accepted_points: int = 0
    rejected_points: int = 0


def media_type_of(content_type: str | None) -> str:
    """Return the lower-case media type of a Content-Type header, without parameters."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode_content(body: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """Undo `Content-Encoding`, never producing more than `max_bytes` bytes.

    Raises BodyTooLargeError when the decompressed body exceeds the limit (a
    small gzip body can expand a thousandfold), UnsupportedEncodingError for
    other encodings, and zlib.error for a corrupt stream.
    """
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding == "gzip":
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        decompressor = zlib.decompressobj()
    else:
        raise UnsupportedEncodingError(
            f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none"
        )
    data = decompressor.decompress(body, max_bytes + 1)
    if len(data) > max_bytes or decompressor.unconsumed_tail:
        raise BodyTooLargeError(
            f"decompressed body is larger than the limit of {max_bytes} bytes"
        )
    if not decompressor.eof:
        raise zlib.error("compressed body is truncated")
    return data


def decode_request(body: bytes, media_type: str) -> ExportMetricsServiceRequest:
    """Parse an export request; raise ValueError with the reason when it is invalid."""
    request = ExportMetricsServiceRequest()
    if media_type == PROTOBUF:
        try:
            request.ParseFromString(body)
        except DecodeError as error:
            raise ValueError(
                f"invalid protobuf ExportMetricsServiceRequest: {error}"
            ) from error
        return request
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"OTLP JSON body is not UTF-8: {error}") from error
    try:
        # OTLP/JSON encodes trace and span ids of exemplars as hex, while
        # json_format expects base64. The store reads no exemplars, so a wrong
        # decoding of those bytes is harmless.
        json_format.Parse(text, request, ignore_unknown_fields=True)
    except json_format.ParseError as error:
        raise ValueError(
            f"invalid OTLP JSON ExportMetricsServiceRequest: {error}"
        ) from error
    return request


def encode_message(message: Message, media_type: str) -> bytes:
    """Serialize a response message in the request's encoding."""
    if media_type == PROTOBUF:
        return message.SerializeToString()
    return json_format.MessageToJson(message, indent=None).encode()


def error_response(
    status_code: int, code: int, message: str, media_type: str
) -> OtlpResponse:
    """Build an OTLP failure response: a google.rpc.Status in the request's encoding."""
    if media_type not in SUPPORTED_CONTENT_TYPES:
        media_type = JSON
    status = status_pb2.Status(code=code, message=message)
    return OtlpResponse(status_code, encode_message(status, media_type), media_type)


def export_metrics(
    body: bytes,
    content_type: str | None,
    content_encoding: str | None,
    store: GoldenSignalStore,
    max_body_bytes: int,
) -> OtlpResponse:
    """Decode one OTLP/HTTP metrics request, store its points and build the response.

    Returns 415 for an unsupported Content-Type or Content-Encoding, 413 when
    the decompressed body is too large and 400 for a body that does not
    decode. Points the store rejects are reported as OTLP partial success.
    """
    media_type = media_type_of(content_type)
    if media_type not in SUPPORTED_CONTENT_TYPES:
        return error_response(
            415,
            code_pb2.INVALID_ARGUMENT,
            f"unsupported Content-Type {media_type or '(none)'!r}; "
            f"use {PROTOBUF} or {JSON}",
            JSON,
        )
    try:
        raw = decode_content(body, content_encoding, max_body_bytes)
    except UnsupportedEncodingError as error:
        return error_response(415, code_pb2.INVALID_ARGUMENT, str(error), media_type)
    except BodyTooLargeError as error:
        return error_response(413, code_pb2.RESOURCE_EXHAUSTED, str(error), media_type)
    except zlib.error as error:
        message = f"invalid {content_encoding} body: {error}"
        return error_response(400, code_pb2.INVALID_ARGUMENT, message, media_type)

    try:
        request = decode_request(raw, media_type)
    except ValueError as error:
        logger.warning("Rejected an OTLP metrics request: %s", error)
        return error_response(400, code_pb2.INVALID_ARGUMENT, str(error), media_type)

    result = store.ingest(request)
    response = ExportMetricsServiceResponse()
    if result.rejected_points:
        response.partial_success.rejected_data_points = result.rejected_points
        response.partial_success.error_message = "; ".join(result.errors)
        logger.warning(
            "Rejected %d of %d OTLP duration points: %s",
            result.rejected_points,
            result.rejected_points + result.accepted_points,
            response.partial_success.error_message,
        )
    return OtlpResponse(
        200,
        encode_message(response, media_type),
        media_type,
        accepted_points=result.accepted_points,
        rejected_points=result.rejected_points,
    )
