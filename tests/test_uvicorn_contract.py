"""The private uvicorn members `service/server.py` relies on, checked by name and signature.

`HeaderTimeoutProtocol` subclasses uvicorn's private `H11Protocol`, which uvicorn may change in any
release. pyproject.toml pins uvicorn below the next minor; when that pin is widened these tests say
exactly which member moved, instead of a slow-client test failing far from the cause (or, worse, the
header timeout silently never firing).
"""
from __future__ import annotations

import inspect
import tomllib
from importlib.metadata import version
from pathlib import Path

import h11
import pytest
from packaging.requirements import Requirement
from uvicorn.protocols.http.h11_impl import H11Protocol

from anomalyvfm.service.server import header_timeout_protocol

UVICORN = version("uvicorn")
ADVICE = (f"uvicorn {UVICORN} changed its private H11Protocol; anomalyvfm.service.server.HeaderTimeoutProtocol "
          "relies on it: adapt server.py to this uvicorn, then move the pin in pyproject.toml ([serve] extra)")

# The methods HeaderTimeoutProtocol overrides and calls through super(), with their parameters.
OVERRIDDEN = {"connection_made": ["self", "transport"], "data_received": ["self", "data"],
              "on_response_complete": ["self"], "connection_lost": ["self", "exc"]}
# Attributes it reads, and the H11Protocol method that must assign each (as `self.<name> = ...`).
ASSIGNED = {"conn": "__init__", "loop": "__init__", "transport": "connection_made", "client": "connection_made"}


def test_installed_uvicorn_is_inside_the_pinned_range():
    """The range in pyproject.toml is the one the suite runs against, so a passing suite vouches for it."""
    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    (pin,) = [Requirement(r) for r in extras["project"]["optional-dependencies"]["serve"]
              if Requirement(r).name == "uvicorn"]
    assert pin.specifier.contains(UVICORN), f"uvicorn {UVICORN} is outside the tested pin {pin}: {ADVICE}"


@pytest.mark.parametrize("name, parameters", OVERRIDDEN.items())
def test_overridden_methods_keep_their_signatures(name, parameters):
    method = getattr(H11Protocol, name, None)
    assert callable(method), f"H11Protocol.{name} is gone: {ADVICE}"
    assert list(inspect.signature(method).parameters) == parameters, \
        f"H11Protocol.{name}{inspect.signature(method)} (expected ({', '.join(parameters)})): {ADVICE}"


@pytest.mark.parametrize("attribute, assigned_in", ASSIGNED.items())
def test_attributes_read_are_still_set_by_h11protocol(attribute, assigned_in):
    source = inspect.getsource(getattr(H11Protocol, assigned_in))
    assert f"self.{attribute} = " in source, f"H11Protocol.{assigned_in} no longer sets self.{attribute}: {ADVICE}"


def test_response_completion_still_reaches_on_response_complete():
    """Keep-alive re-arms the header timer from `on_response_complete`: uvicorn must still call it."""
    assert "on_response=self.on_response_complete" in inspect.getsource(H11Protocol), \
        f"H11Protocol no longer hands on_response_complete to its request cycle: {ADVICE}"
    assert isinstance(h11.IDLE, type) and hasattr(h11.Connection, "their_state"), \
        f"h11 {version('h11')} has no IDLE state or Connection.their_state: {ADVICE}"


def test_the_subclass_overrides_only_what_is_checked_here():
    """A new override in server.py must be added to OVERRIDDEN, so this contract stays complete."""
    protocol = header_timeout_protocol(1.0)
    own = {name for name, value in vars(protocol).items() if callable(value) and not name.startswith("_")}
    assert own == set(OVERRIDDEN), f"update OVERRIDDEN in {__file__}: the subclass overrides {sorted(own)}"
    assert protocol.__mro__[1] is H11Protocol
