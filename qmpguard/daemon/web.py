"""HTTP: health, Prometheus metrics, the JSON API and a small status page (no JavaScript).

Every endpoint only reads the ResultStore; none can make the daemon send anything to a VM.
"""

from __future__ import annotations

import hmac
import html
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from qmpguard.daemon.page import vm_page
from qmpguard.daemon.results import ResultStore

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC = frozenset({"/healthz"})


def build_app(
    store: ResultStore, registry: CollectorRegistry, token: str | None
) -> web.Application:
    """The aiohttp application; with `token`, every path but /healthz needs it."""

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is not None and request.path not in PUBLIC:
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return web.json_response(
                    {"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"}
                )
        return await handler(request)

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def vms(_: web.Request) -> web.Response:
        return web.json_response([r.summary() for _, r in sorted(store.vms.items())])

    async def vm(request: web.Request) -> web.Response:
        doc = store.document(request.match_info["name"])
        if doc is None:
            return web.json_response({"error": "no such VM"}, status=404)
        return web.json_response(doc)

    async def page(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in store.vms:
            return web.Response(status=404, text="no such VM\n")
        return web.Response(text=vm_page(name, store.vms[name].result), content_type="text/html")

    async def index(_: web.Request) -> web.Response:
        return web.Response(text=status_page(store), content_type="text/html")

    async def no_server_header(_: web.Request, response: web.StreamResponse) -> None:
        response.headers["Server"] = "qmpguard"

    app = web.Application(middlewares=[auth], client_max_size=64 * 1024)
    app.on_response_prepare.append(no_server_header)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/vms", vms)
    app.router.add_get("/api/v1/vms/{name:.+}", vm)
    app.router.add_get("/vms/{name:.+}", page)
    app.router.add_get("/", index)
    return app


def status_page(store: ResultStore) -> str:
    """A server-rendered page: one row per VM, the worst finding, links to the JSON."""
    rows = []
    for name, record in sorted(store.vms.items()):
        s = record.summary()
        state = "pending" if s["status"] == "pending" else ("up" if s["up"] else "DOWN")
        worst = s["worst"] or "-"
        age = f"{time.time() - s['last_inspection']:.0f}s ago" if s["last_inspection"] else "-"
        detail = html.escape(s["error"] or ", ".join(s["findings"]) or "no findings")
        rows.append(
            f"<tr class='{html.escape(worst)}'><td><a href='/vms/{quote(name, safe='')}'>"
            f"{html.escape(name)}</a></td><td>{state}</td><td>{html.escape(worst)}</td>"
            f"<td>{detail}</td><td>{age}</td></tr>"
        )
    body = "\n".join(rows) or "<tr><td colspan=5>no VMs found yet</td></tr>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qmpguard</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #999; padding: .3em .6em; text-align: left; }}
tr.critical td {{ background: #fdd; font-weight: bold; }} tr.warning td {{ background: #ffd; }}
tr.unknown td {{ background: #eee; }}
</style></head><body>
<h1>qmpguard</h1>
<p>vfio devices whose DMA bypasses the guest's vIOMMU. Severity is also spelled out, so the
page reads without colour. Metrics: <a href="/metrics">/metrics</a>, JSON:
<a href="/api/v1/vms">/api/v1/vms</a>.</p>
<table><tr><th>VM</th><th>state</th><th>worst</th><th>findings / error</th>
<th>inspected</th></tr>
{body}
</table></body></html>
"""
