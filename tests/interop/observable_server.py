#!/usr/bin/env python3
"""An aiocoap 0.4.17 origin with an observable resource, for tests/gateway_observe.rs.

Usage: observable_server.py HOST:PORT SERVER_CREDENTIALS_JSON [--plain]

Resource /tick: its state changes every 0.3 s; GET answers "tick N" and may be observed
(RFC 7641). With SERVER_CREDENTIALS_JSON (server credentials as made by make_contexts.py,
loaded the way aiocoap-fileserver --credentials does) only OSCORE-protected requests are
served; plain ones get 4.01. With --plain (and "-" for the credentials) the resource is a
plain device and answers everyone.

Prints (flushed) "READY" once bound, "NOTIFY tick N" per response rendered for an
observer (the first response and every notification) and "OBSERVERS n" whenever the
number of observers changes. Runs until killed.
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


class Tick(resource.ObservableResource):
    def __init__(self, require_oscore):
        super().__init__()
        self.require_oscore = require_oscore
        self.n = 0

    def update_observation_count(self, count):
        print("OBSERVERS %d" % count, flush=True)

    async def run(self):
        while True:
            await asyncio.sleep(0.3)
            self.n += 1
            self.updated_state()

    async def render_get(self, request):
        if self.require_oscore and request.remote.authenticated_claims == []:
            return aiocoap.Message(code=aiocoap.UNAUTHORIZED, payload=b"OSCORE required")
        payload = ("tick %d" % self.n).encode()
        if request.opt.observe is not None:
            print("NOTIFY " + payload.decode(), flush=True)
        return aiocoap.Message(code=aiocoap.CONTENT, payload=payload)


async def main():
    host, port = sys.argv[1].rsplit(":", 1)
    plain = "--plain" in sys.argv[3:]
    tick = Tick(require_oscore=not plain)
    site = resource.Site()
    site.add_resource(["tick"], tick)
    creds = CredentialsMap()
    if not plain:
        with open(sys.argv[2], "rb") as f:
            creds.load_from_dict(json.load(f))
        site = OscoreSiteWrapper(site, creds)
    await aiocoap.Context.create_server_context(
        site, bind=(host, int(port)), server_credentials=creds
    )
    print("READY", flush=True)
    await tick.run()


asyncio.run(main())
