#!/usr/bin/env python3
"""An aiocoap 0.4.17 OSCORE client that observes a resource, for
tests/gateway_inbound_observe.rs.

Usage: aiocoap_oscore_observe.py URL CLIENT_CREDENTIALS_JSON COUNT [--no-deregister]

Loads the client credentials like ../shared/interop/aiocoap_oscore_get.py does, sends a
GET with Observe: 0 to URL (aiocoap protects it: outer FETCH, outer Observe) and iterates
`request.observation`. Prints (flushed) "FIRST <payload>" for the first response and
"NOTIFY <payload>" for each later notification, each only once aiocoap verified it with
OSCORE (the script fails otherwise). After COUNT notifications it cancels: the observation
is cancelled locally and, because aiocoap does not deregister by itself (its OSCORE
transport leaves the wire observation alone, and it ignores NON notifications it no longer
wants instead of rejecting them), it sends the RFC 7641 §3.6 deregistration: a new OSCORE
GET with Observe: 1 on the same token (the token manager is made to reuse the
registration's token for that one request). Prints "DEREGISTERED <code> <payload>" with
the verified answer. With --no-deregister it prints "DONE" and waits until killed.

Exit status: 0 on success; 1 on an unverified or failed response; 2 on timeout.
"""

import asyncio
import json
import sys
import warnings

warnings.simplefilter("ignore")

import aiocoap  # noqa: E402
from aiocoap import Message, numbers  # noqa: E402
from aiocoap.tokenmanager import TokenManager  # noqa: E402
from aiocoap.transports.oscore import OSCOREAddress  # noqa: E402


def verified(resp):
    return isinstance(resp.remote, OSCOREAddress)


async def run(url, creds, count, deregister):
    ctx = await aiocoap.Context.create_client_context()
    try:
        with open(creds, "rb") as f:
            ctx.client_credentials.load_from_dict(json.load(f))

        # Remember the tokens the (single) token manager gives out, and let one later
        # request reuse the registration's.
        tokens = []
        reuse = []
        for ri in ctx.request_interfaces:
            if isinstance(ri, TokenManager):
                original = ri.next_token

                def next_token(original=original):
                    t = reuse.pop() if reuse else original()
                    tokens.append(t)
                    return t

                ri.next_token = next_token

        msg = Message(code=numbers.codes.GET, observe=0)
        msg.set_request_uri(url)
        request = ctx.request(msg)
        first = await asyncio.wait_for(request.response, 20)
        if not verified(first) or not first.code.is_successful():
            print("FAIL first response %s oscore=%s" % (first.code, verified(first)), flush=True)
            return 1
        print("FIRST " + first.payload.decode(), flush=True)
        registration_token = tokens[-1]

        seen = 0
        observation = request.observation.__aiter__()
        while seen < count:
            resp = await asyncio.wait_for(observation.__anext__(), 10)
            if not verified(resp) or not resp.code.is_successful():
                print("FAIL notification %s oscore=%s" % (resp.code, verified(resp)), flush=True)
                return 1
            print("NOTIFY " + resp.payload.decode(), flush=True)
            seen += 1
        request.observation.cancel()

        if not deregister:
            print("DONE", flush=True)
            await asyncio.sleep(3600)
            return 0

        reuse.append(registration_token)
        msg = Message(code=numbers.codes.GET, observe=1)
        msg.set_request_uri(url)
        resp = await asyncio.wait_for(ctx.request(msg).response, 20)
        if tokens[-1] != registration_token:
            print("FAIL deregistration did not reuse the token", flush=True)
            return 1
        if not verified(resp):
            print("FAIL deregistration answer not OSCORE-protected", flush=True)
            return 1
        print("DEREGISTERED %s %s" % (resp.code, resp.payload.decode()), flush=True)
        return 0
    except asyncio.TimeoutError:
        print("FAIL timeout", flush=True)
        return 2
    finally:
        await ctx.shutdown()


def main():
    url, creds, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    deregister = "--no-deregister" not in sys.argv[4:]
    sys.exit(asyncio.run(run(url, creds, count, deregister)))


if __name__ == "__main__":
    main()
