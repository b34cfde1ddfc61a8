"""`python -m services.xenstore`: the xenstore service of one host.

Serves the XenStore protocol on the host's Unix socket (``XENSTORED_PATH``,
for Xen's own tools) and over nng on the service endpoint, with state kept
durable in the host's run directory.
"""

from __future__ import annotations

from services.xenstore.domexc import watch_dom_exc
from services.xenstore.server import open_service
from shared.service import ServiceContext, main


async def setup(ctx: ServiceContext) -> None:
    service = open_service(ctx.host.rundir)
    service.attach(ctx.server, ctx.nursery)
    ctx.add_stats("xenstore", service.core.statistics)
    ctx.add_stats("journal", service.journal.statistics)
    ctx.nursery.start_soon(service.syncer)
    if "hypervisor" in ctx.host.services:
        ctx.nursery.start_soon(
            watch_dom_exc, ctx.host, lambda: list(service.core.domains), service.report_shutdown
        )
    await ctx.nursery.start(service.serve_unix, ctx.host.xenstored_path)


if __name__ == "__main__":
    main("xenstore", setup)
