# -*- test-case-name: tests.test_metrics -*-
"""
The C{--metrics} endpoint: Prometheus text at C{/metrics}, over HTTP.

C{prometheus_client} ships a Twisted resource
(C{prometheus_client.twisted.MetricsResource}), but it renders, in a
thread, from a registry of the process it runs in.  With C{--workers N}
most of the numbers are in other processes: each worker keeps its own
(L{pop3srv.server.metrics.PROCESS}), and the parent must ask every one of
them over AMP and add up the answers before it can write anything.  So
L{MetricsResource} asks an asynchronous C{gather} function per scrape
(in the parent of workers, the server view's C{metrics}; in a server of
one process, its own snapshot), and writes the answer with
C{prometheus_client}'s exposition code when it comes
(L{render_prometheus <pop3srv.server.metrics.render_prometheus>}).

Only the parent serves it; a scrape sees the whole server.  Requests are
not logged: a scrape every few seconds would drown the log.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import pages, resource, server

from pop3srv.processes.supervisor import ListeningService
from pop3srv.server.metrics import render_prometheus

#: Returns a Deferred firing with a snapshot of the whole server (the
#: shape of L{pop3srv.core.metrics.ProcessMetrics.snapshot}).
Gather = Callable[[], "defer.Deferred[dict[str, Any]]"]

#: Seconds an idle HTTP connection to the endpoint is kept.
IDLE_TIMEOUT = 60


class MetricsResource(resource.Resource):
    """C{GET /metrics}: the snapshot C{gather} fires with, as Prometheus text."""

    isLeaf = True
    _log = Logger()

    def __init__(self, gather: Gather) -> None:
        super().__init__()
        self.gather = gather

    def render_GET(self, request: server.Request) -> Any:
        if request.postpath:
            return pages.notFound().render(request)
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        d = defer.maybeDeferred(self.gather)

        def answer(snapshot: dict[str, Any]) -> None:
            body = render_prometheus(snapshot)
            if gone:
                return
            request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
            request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            self._log.failure("Cannot gather the metrics", failure)
            if gone:
                return
            request.setResponseCode(500)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            request.write(b"The metrics could not be gathered; see the server's log.\n")
            request.finish()

        d.addCallback(answer).addErrback(failed)
        return server.NOT_DONE_YET


class _Site(server.Site):
    """A site that logs no requests (see the module docstring)."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


class _Root(resource.Resource):
    """Nothing but C{/metrics}: 404 for C{/} (a plain resource answers 405) and the rest."""

    def render(self, request: server.Request) -> bytes:
        return pages.notFound().render(request)

    def getChild(self, path: bytes, request: server.Request) -> resource.IResource:
        return pages.notFound()


def metrics_site(gather: Gather) -> server.Site:
    """The HTTP site: L{MetricsResource} at C{/metrics}, 404 elsewhere."""
    root = _Root()
    root.putChild(b"metrics", MetricsResource(gather))
    return _Site(root, timeout=IDLE_TIMEOUT)


class MetricsListenError(ValueError):
    """The metrics endpoint cannot be used, in one line."""


def listen_metrics(reactor: Any, description: str, gather: Gather) -> ListeningService:
    """
    Listen for scrapes on the endpoint C{description} now (so that a port
    that cannot be bound fails start-up on the terminal, as the POP3
    listeners do), in a service that stops listening when it stops.

    @param description: a Twisted server endpoint, e.g.
        C{tcp:9110:interface=127.0.0.1}.
    @param gather: fires with the snapshot to serve, per scrape.
    @raise MetricsListenError: the description is not an endpoint, or it
        cannot be listened on.
    """
    try:
        endpoint = endpoints.serverFromString(reactor, description)
    except (ValueError, KeyError, TypeError) as e:
        raise MetricsListenError(f"--metrics {description!r} is not an endpoint: {e}") from None
    listening = ListeningService(endpoint, metrics_site(gather), "metrics")
    try:
        listening.bind()
    except CannotListenError as e:
        raise MetricsListenError(f"--metrics: {e}") from None
    except Exception as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise MetricsListenError(f"--metrics: cannot listen on {description!r}: {reason}") from None
    return listening
