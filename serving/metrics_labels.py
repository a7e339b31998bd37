"""BentoML's HTTP metrics labelled by route, not by raw path: every path no route serves counts as one.

BentoML 1.4's `RunnerTrafficMetricsMiddleware` (the outermost middleware of a 1.4 service's app, before any
`add_asgi_middleware` one) labels each request's Prometheus series with its raw path, 404s included: each made-up
path is a new histogram in every worker, for good (issue 24: 5,000 GETs to random paths took /metrics from 100 KB
to 21 MB and the API worker from 197 to 540 MB). No BentoML option bounds it and no upstream issue names it (1.4.40).
serving/service.py installs `RouteLabelledMetrics` in its place with `install()`; tests/test_service.py's
`test_bentoml_still_labels_metrics_with_the_raw_path` fails once BentoML stops doing so, and this can go.
"""

from __future__ import annotations

from bentoml._internal.server.http import instruments
from starlette.routing import Match, Mount

UNKNOWN_PATH = "/{unknown}"  # the label of every path no route serves
ORIGINAL_PATH = "dogscats.original_path"  # the scope key that carries the real path past BentoML's instrument


def route_label(routes, scope) -> str | None:
    """The route that serves this path, as Starlette picks it (the first full match, else the first for another
    method: a 405), as a template: "/classify", a mount's "/static_content/{path}"; None if no route serves it."""
    partial = None
    for route in routes:
        match, child = route.matches(scope)
        if match == Match.FULL:
            return template(route, {**scope, **child})
        if match == Match.PARTIAL and partial is None:
            partial = template(route, {**scope, **child})
    return partial


def template(route, scope) -> str:
    if isinstance(route, Mount):  # BentoML's PassiveMount of the page app too: its own routes name the path
        inner = getattr(route.app, "routes", None)
        return route.path + ((route_label(inner, scope) if inner is not None else None) or "/{path}")
    return getattr(route, "path", UNKNOWN_PATH)


class RouteLabelledMetrics(instruments.RunnerTrafficMetricsMiddleware):
    """BentoML's metrics middleware, shown the route's template (UNKNOWN_PATH where no route serves the path); the
    app behind it, the access log and the 404 see the real path."""

    def __init__(self, app, **kwargs):
        async def real_path(scope, receive, send):
            if ORIGINAL_PATH in scope:
                scope["path"] = scope.pop(ORIGINAL_PATH)
            await app(scope, receive, send)

        super().__init__(real_path, **kwargs)

    async def __call__(self, scope, receive, send):
        routes = getattr(scope.get("app"), "routes", None)  # the Starlette app, set before its middleware runs
        if scope["type"] == "http" and routes is not None:
            label = route_label(routes, scope) or UNKNOWN_PATH
            if label != scope["path"]:  # BentoML reads scope["path"] once, before it calls the app
                scope[ORIGINAL_PATH], scope["path"] = scope["path"], label
        await super().__call__(scope, receive, send)


def install() -> None:
    """Put RouteLabelledMetrics where BentoML's app factory looks for its metrics middleware (it imports the name
    from `instruments` when it builds the app, after the service module is imported)."""
    instruments.RunnerTrafficMetricsMiddleware = RouteLabelledMetrics
