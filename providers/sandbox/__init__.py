"""Loopback sandboxes: real HTTP servers on 127.0.0.1 that emulate vendor APIs for tests.

``with OpenAISandbox() as sb:`` serves OpenAI's Images API at ``sb.base_url``;
``sb.faults.push(Fault.rate_limit(retry_after=2.0))`` makes the next request fail;
``sb.requests`` records what arrived; ``sb.faults.push(Fault.hostile_image("bomb_image"))`` answers
the next request as usual, billed, with a hostile image in it (every vendor).
:class:`SandboxServer` is the vendor-neutral base.
"""

from providers.sandbox._server import (
    HOSTILE_IMAGE_FAULTS,
    Fault,
    FaultPlan,
    RecordedRequest,
    Request,
    Response,
    SandboxServer,
    Upload,
    hostile_image,
)
from providers.sandbox.bfl import BFLSandbox
from providers.sandbox.comfyui import ComfyUISandbox
from providers.sandbox.fal import FalSandbox
from providers.sandbox.google import GoogleSandbox
from providers.sandbox.ideogram import IdeogramSandbox
from providers.sandbox.openai import OpenAISandbox
from providers.sandbox.replicate import ReplicateSandbox
from providers.sandbox.stability import StabilitySandbox
from providers.sandbox.together import TogetherSandbox
from providers.sandbox.xai import XAISandbox

__all__ = [
    "HOSTILE_IMAGE_FAULTS",
    "BFLSandbox",
    "ComfyUISandbox",
    "FalSandbox",
    "Fault",
    "FaultPlan",
    "GoogleSandbox",
    "IdeogramSandbox",
    "OpenAISandbox",
    "RecordedRequest",
    "ReplicateSandbox",
    "Request",
    "Response",
    "SandboxServer",
    "StabilitySandbox",
    "TogetherSandbox",
    "Upload",
    "XAISandbox",
    "hostile_image",
]
