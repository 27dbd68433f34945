#!/usr/bin/env python3
"""An aiocoap 0.4.17 origin that counts how often it executes requests, for
tests/gateway_messaging.rs (loss between gateway and origin must not make the origin
execute a request twice).

Usage: counter_server.py HOST:PORT SERVER_CREDENTIALS_JSON

Resource /counter, reachable only under OSCORE (server credentials as made by
make_contexts.py, loaded the way aiocoap-fileserver --credentials does):
  POST payload P -> 2.04 with payload b"done:" + P; prints "EXEC <P>" on stdout (one line
                    per execution, flushed), so the test counts executions per request.
  GET            -> 2.05 with the number of executions so far.
Plain requests get 4.01 (the OSCORE site wrapper only lets protected ones through).
Prints "READY" once bound. Runs until killed.
"""

import asyncio
import json
import sys
import warnings

warnings.simplefilter("ignore")

import aiocoap  # noqa: E402
import aiocoap.resource as resource  # noqa: E402
from aiocoap.credentials import CredentialsMap  # noqa: E402
from aiocoap.oscore_sitewrapper import OscoreSiteWrapper  # noqa: E402


class Counter(resource.Resource):
    def __init__(self):
        super().__init__()
        self.count = 0

    async def render_post(self, request):
        self.count += 1
        print("EXEC " + request.payload.decode("utf-8", "replace"), flush=True)
        return aiocoap.Message(code=aiocoap.CHANGED, payload=b"done:" + request.payload)

    async def render_get(self, request):
        return aiocoap.Message(code=aiocoap.CONTENT, payload=str(self.count).encode())


class OnlyProtected(resource.Resource):
    """Wraps Counter: refuses requests that did not arrive under OSCORE."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    async def render(self, request):
        if request.remote.authenticated_claims == []:
            return aiocoap.Message(code=aiocoap.UNAUTHORIZED, payload=b"OSCORE required")
        return await self.inner.render(request)


async def main():
    host, port = sys.argv[1].rsplit(":", 1)
    creds = CredentialsMap()
    with open(sys.argv[2], "rb") as f:
        creds.load_from_dict(json.load(f))
    site = resource.Site()
    site.add_resource(["counter"], OnlyProtected(Counter()))
    site = OscoreSiteWrapper(site, creds)
    await aiocoap.Context.create_server_context(
        site, bind=(host, int(port)), server_credentials=creds
    )
    print("READY", flush=True)
    await asyncio.get_running_loop().create_future()


asyncio.run(main())
