"""The gateway: one sans-IO session core (``session``), its front doors as adapters
(``websocket``), admission and estimates (``admission``), the sessions on the job bus
(``server``), and the whole of it as a service with one shutdown order (``service``)."""

from katydid.gateway.hub import Hub
from katydid.gateway.service import GatewayService

__all__ = ["GatewayService", "Hub"]
