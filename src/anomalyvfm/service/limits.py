"""Limits, timeouts and authentication of the HTTP service, declared once with their defaults and help.

Kept free of FastAPI and uvicorn so that the command line can build `serve --help` from them without
importing either, which would slow every other command's start-up. docs/serving.md ("Limits, timeouts and
errors") explains each one and the answer a client gets when it is hit.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from anomalyvfm.errors import UserInputError

API_KEY_ENV = "ANOMALYVFM_API_KEY"
API_KEY_HEADER = "X-API-Key"
MB = 1024 * 1024


def _option(default: float, help: str) -> float:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServiceLimits:
    """Every bound the service enforces. Memory: see docs/serving.md for what the defaults add up to."""

    max_pixels: int = _option(40_000_000, "largest image accepted, in pixels (413 above)")
    max_bytes: int = _option(50 * MB, "largest upload accepted per image, in bytes (413 above)")
    max_files: int = _option(32, "most images in one /predict/batch (400 above)")
    max_inflight_pixels: int = _option(48_000_000, "decoded pixels held by all requests together; "
                                       "a request waits for room until its deadline, then gets 503")
    max_inflight_bytes: int = _option(128 * MB, "request-body bytes held in memory by all requests together "
                                      "(503 when full; 413 for a body that alone is larger)")
    max_queue: int = _option(64, "images waiting for the inference thread (503 with Retry-After when full)")
    max_connections: int = _option(256, "open connections (uvicorn answers 503 beyond this)")
    header_timeout: float = _option(10.0, "seconds a connection may take to send its request headers (then closed)")
    body_timeout: float = _option(60.0, "seconds a client may take to send the request body (408 after)")
    request_timeout: float = _option(60.0, "seconds from a request's body to its verdict: waiting for memory, "
                                     "queue and inference (503 after)")
    shutdown_timeout: float = _option(30.0, "seconds in-flight requests get to finish after SIGTERM/Ctrl-C")

    def validate(self, pil_limit: int | None) -> None:
        """One `UserInputError` naming the first option out of range."""
        for item in fields(self):
            if not getattr(self, item.name) > 0:
                raise UserInputError(f"--{item.name.replace('_', '-')} must be positive, got {getattr(self, item.name)}")
        if pil_limit and self.max_pixels > pil_limit:
            raise UserInputError(f"--max-pixels must be at most PIL's decompression-bomb limit {pil_limit}, "
                                 f"got {self.max_pixels}")
        if self.max_inflight_pixels < self.max_pixels:
            raise UserInputError(f"--max-inflight-pixels ({self.max_inflight_pixels}) must be at least --max-pixels "
                                 f"({self.max_pixels}), or the largest accepted image could never be decoded")
        if self.max_inflight_bytes < self.max_bytes:
            raise UserInputError(f"--max-inflight-bytes ({self.max_inflight_bytes}) must be at least --max-bytes "
                                 f"({self.max_bytes})")


def api_key_from(option: str | None, environ: dict[str, str]) -> str | None:
    """The API key `serve` requires: `--api-key`, else `$ANOMALYVFM_API_KEY`, else none.

    A key that is given but empty or only whitespace (`ANOMALYVFM_API_KEY=` in a unit file whose secret
    did not render) is refused: taken as "no key" it would silently switch authentication off.
    """
    for key, source in ((option, "--api-key"), (environ.get(API_KEY_ENV), API_KEY_ENV)):
        if key is None:
            continue
        if not key.strip():
            raise UserInputError(f"{source} is set but empty: give a key, or unset it to serve without one")
        return key
    return None


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    """One `--max-pixels`-style option per `ServiceLimits` field, with its default in the help."""
    group = parser.add_argument_group("limits and timeouts (docs/serving.md)")
    for item in fields(ServiceLimits):
        group.add_argument(f"--{item.name.replace('_', '-')}", type=type(item.default), default=item.default,
                           help=f"{item.metadata['help']} (default {item.default})")


def limits_from_args(args: argparse.Namespace) -> ServiceLimits:
    return ServiceLimits(**{item.name: getattr(args, item.name) for item in fields(ServiceLimits)})
