#!/usr/bin/env python3
"""Drive aiocoap 0.4.17's OSCORE code (aiocoap.oscore) on single messages, as
an independent oracle for the Rust implementation (RFC 8613 §5-§8).

Run it with the interop venv's python (target/interop/venv/bin/python, made by
../shared/interop/setup.sh):

    aiocoap_protect.py < op.json            one operation (JSON object) in,
                                            one JSON object out
    aiocoap_protect.py < ops.json           a JSON array of operations in, an
                                            array of answers out (same order;
                                            one interpreter start for many ops)
    aiocoap_protect.py --self-test [--vectors FILE]
                                            reproduce RFC 8613 Appendix C
                                            (../shared/vectors/rfc8613-appendix-c.json)
                                            through the same JSON operations, plus
                                            a round trip over 12 AEADs x 3 hashes

All byte values are lowercase hex strings ("" = zero-length). An operation:

    {"op": "derive" | "protect-request" | "unprotect-request"
           | "protect-response" | "unprotect-response",
     "context": {"secret": HEX, "salt": HEX (default ""),
                 "sender_id": HEX, "recipient_id": HEX,
                 "id_context": HEX or null (default null: no ID Context),
                 "algorithm": settings.json name (default "AES-CCM-16-64-128"),
                 "kdf_hashfun": "sha256" | "sha384" | "sha512" (default
                                "sha256"; "kdf-hashfun" is accepted too),
                 "role": "client" | "server" (optional; if given, requests
                         are protected / responses unprotected only by a
                         client, and the other way round by a server)},
     "message": HEX          a whole CoAP message (header, token, options,
                             payload): plain for protect-*, protected for
                             unprotect-*
     # protect-request
     "sequence_number": N    Sender Sequence Number used as Partial IV
     "kid_context": bool     send the ID Context as kid context (default true;
                             only has an effect when id_context is set)
     # unprotect-request
     "window": N             replay window size (default 32, aiocoap's)
     "replay_window": {"index": I, "bitfield": B} (default fresh, 0/0) or
                      "unknown" (state lost, App. B.1.2; needs echo_recovery)
     "echo_recovery": HEX    the server's Echo value for B.1.2
     # protect-response / unprotect-response
     "request_kid": HEX, "request_piv": HEX   from the request (the answer of
                             protect-request / unprotect-request carries them)
     "request_code": "POST" | "FETCH"   outer code of the request (default POST)
     # protect-response only
     "sequence_number": N    if given, the response carries this own Partial IV
                             (RFC 8613 §8.3); if absent the request nonce is reused
    }

The answer is {"ok": true, "op": ..., ...} with, as applicable:
    message        the protected (protect-*) or unprotected (unprotect-*)
                   CoAP message, MID / token / type kept from the input
    oscore_option  the OSCORE option value of the protected message
    plaintext      the AEAD plaintext (code, Class E options, 0xFF payload)
    ciphertext     the protected message's payload: AEAD ciphertext and tag
                   (protect-*)
    external_aad   the CBOR external_aad array (RFC 8613 §5.4)
    nonce          the AEAD nonce used
    partial_iv     the message's own Partial IV, or null
    kid, kid_context   as carried in the OSCORE option (null if absent)
    request_kid, request_piv   what to pass to the response operations
    replay_window  the window after unprotect-request
    sender_key, recipient_key, common_iv, sender_nonce_piv0,
    recipient_nonce_piv0       (derive)
or {"ok": false, "op": ..., "error": exception class, "detail": text} when
aiocoap refused (e.g. ProtectionInvalid, ReplayError; ReplayErrorWithEcho
also gives "echo", "request_kid", "request_piv"). The exit status is 0 when
every operation was answered (even with ok false), 2 for unusable input, and
for --self-test 0 only if every check passed.
Keys are printed because these are test contexts; never feed it real keys.
"""

import os
import sys

sys.dont_write_bytecode = True
try:
    import cbor2
    from aiocoap import Message, oscore
    from aiocoap.message import Direction
    from aiocoap.numbers import codes
except ImportError as e:  # pragma: no cover - depends on the interpreter
    sys.exit(
        "aiocoap_protect.py: cannot import aiocoap (%s); run it with the interop venv's python "
        "(target/interop/venv/bin/python, made by ../shared/interop/setup.sh)" % e
    )

import argparse
import json
import traceback

HERE = os.path.dirname(os.path.realpath(__file__))
DEFAULT_VECTORS = os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared", "vectors", "rfc8613-appendix-c.json"))

# The 12 AEAD algorithms usable for (pairwise) OSCORE; A128CBC is Group-only.
AEAD_ALGORITHMS = [
    "AES-CCM-16-64-128",
    "AES-CCM-16-64-256",
    "AES-CCM-64-64-128",
    "AES-CCM-64-64-256",
    "AES-CCM-16-128-128",
    "AES-CCM-16-128-256",
    "AES-CCM-64-128-128",
    "AES-CCM-64-128-256",
    "A128GCM",
    "A192GCM",
    "A256GCM",
    "ChaCha20/Poly1305",
]
HASHFUNS = ["sha256", "sha384", "sha512"]


class UsageError(Exception):
    """The operation object itself is malformed (not an aiocoap refusal)."""


class ToolContext(oscore.CanProtect, oscore.CanUnprotect, oscore.SecurityContextUtils):
    """A security context with explicit parameters and no persistence, built
    the way aiocoap's FilesystemSecurityContext._load builds one. It records
    the plaintext and external AAD of the last operation for the answer."""

    def __init__(self, c, window=oscore.DEFAULT_WINDOWSIZE):
        algorithm = c.get("algorithm", oscore.DEFAULT_ALGORITHM)
        hashfun = c.get("kdf_hashfun", c.get("kdf-hashfun", oscore.DEFAULT_HASHFUNCTION))
        if algorithm not in oscore.algorithms:
            raise UsageError("unknown algorithm %r (known: %s)" % (algorithm, ", ".join(oscore.algorithms)))
        if hashfun not in oscore.hashfunctions:
            raise UsageError("unknown kdf_hashfun %r (known: %s)" % (hashfun, ", ".join(oscore.hashfunctions)))
        self.alg_aead = oscore.algorithms[algorithm]
        self.hashfun = oscore.hashfunctions[hashfun]
        self.sender_id = unhex(c, "sender_id")
        self.recipient_id = unhex(c, "recipient_id")
        self.id_context = unhex(c, "id_context", optional=True)
        # the same ID length limit FilesystemSecurityContext._load applies
        if max(len(self.sender_id), len(self.recipient_id)) > self.alg_aead.iv_bytes - 6:
            raise oscore.FilesystemSecurityContext.LoadError(
                "Sender or Recipient ID too long (maximum length %s for this algorithm)" % (self.alg_aead.iv_bytes - 6)
            )
        salt = unhex(c, "salt", optional=True) or b""
        self.derive_keys(salt, unhex(c, "secret"))
        self.recipient_replay_window = oscore.ReplayWindow(window, lambda: None)
        self.recipient_replay_window.initialize_empty()
        self.echo_recovery = None
        self.sender_sequence_number = 0
        self.role = c.get("role")
        self.last_plaintext = None
        self.last_external_aad = None

    def post_seqnoincrease(self):
        # nothing to persist: the caller chooses every sequence number
        pass

    def _get_sender_key(self, outer_message, aad, plaintext, request_id):
        self.last_plaintext = plaintext
        self.last_external_aad = aad
        return super()._get_sender_key(outer_message, aad, plaintext, request_id)

    def _post_decrypt_checks(self, aad, plaintext, protected_message, request_id):
        self.last_plaintext = plaintext
        self.last_external_aad = aad
        return super()._post_decrypt_checks(aad, plaintext, protected_message, request_id)

    def nonce(self, piv, piv_generator_id):
        return self._construct_nonce(piv, piv_generator_id, self.alg_aead)


def unhex(d, key, optional=False):
    if key not in d or d[key] is None:
        if optional:
            return None
        raise UsageError("missing %r" % key)
    v = d[key]
    if not isinstance(v, str):
        raise UsageError("%r must be a hex string, got %r" % (key, v))
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise UsageError("%r is not hex: %r" % (key, v))


def hx(b):
    return None if b is None else b.hex()


def require_role(ctx, op, wanted):
    if ctx.role is not None and ctx.role != wanted:
        raise UsageError("%s needs a %s context, this one has role %r" % (op, wanted, ctx.role))


def request_code(op):
    name = op.get("request_code", "POST")
    if name not in ("POST", "FETCH"):
        raise UsageError("request_code must be POST or FETCH, got %r" % name)
    return codes.Code[name]


def decode_message(op, direction):
    raw = unhex(op, "message")
    try:
        msg = Message.decode(raw)
    except Exception as e:
        raise UsageError("message is not a CoAP message: %s" % e)
    msg.direction = direction
    return msg


def encode_like(msg, template):
    """Encode msg with the type, MID and token of template (aiocoap's protect
    and unprotect build new messages without them)."""
    msg.mtype = template.mtype
    msg.mid = template.mid
    msg.token = template.token
    msg.direction = Direction.OUTGOING
    return msg.encode()


def option_fields(option_value):
    _, _, unprotected, _ = oscore.CanUnprotect._uncompress(option_value, b"")
    return {
        "partial_iv": hx(unprotected.get(oscore.COSE_PIV)),
        "kid": hx(unprotected.get(oscore.COSE_KID)),
        "kid_context": hx(unprotected.get(oscore.COSE_KID_CONTEXT)),
    }


def op_derive(ctx, op):
    return {
        "sender_key": hx(ctx.sender_key),
        "recipient_key": hx(ctx.recipient_key),
        "common_iv": hx(ctx.common_iv),
        "sender_nonce_piv0": hx(ctx.nonce(b"\0", ctx.sender_id)),
        "recipient_nonce_piv0": hx(ctx.nonce(b"\0", ctx.recipient_id)),
    }


def op_protect_request(ctx, op):
    require_role(ctx, "protect-request", "client")
    msg = decode_message(op, Direction.OUTGOING)
    if not msg.code.is_request():
        raise UsageError("protect-request needs a request, got %s" % msg.code)
    seqno = op.get("sequence_number")
    if not isinstance(seqno, int) or seqno < 0:
        raise UsageError("protect-request needs a non-negative integer sequence_number")
    ctx.sender_sequence_number = seqno
    protected, request_id = ctx.protect(msg, kid_context=bool(op.get("kid_context", True)))
    out = {
        "message": hx(encode_like(protected, msg)),
        "oscore_option": hx(protected.opt.oscore),
        "ciphertext": hx(protected.payload),
        "plaintext": hx(ctx.last_plaintext),
        "external_aad": hx(ctx.last_external_aad),
        "nonce": hx(ctx.nonce(request_id.partial_iv, ctx.sender_id)),
        "request_kid": hx(request_id.kid),
        "request_piv": hx(request_id.partial_iv),
        "sequence_number": seqno,
        "next_sequence_number": ctx.sender_sequence_number,
    }
    out.update(option_fields(protected.opt.oscore))
    return out


def op_unprotect_request(ctx, op):
    require_role(ctx, "unprotect-request", "server")
    window = op.get("window", oscore.DEFAULT_WINDOWSIZE)
    if not isinstance(window, int) or window < 1:
        raise UsageError("window must be a positive integer")
    ctx.recipient_replay_window = oscore.ReplayWindow(window, lambda: None)
    state = op.get("replay_window")
    if state is None:
        ctx.recipient_replay_window.initialize_empty()
    elif state == "unknown":
        ctx.echo_recovery = unhex(op, "echo_recovery")
    else:
        ctx.recipient_replay_window.initialize_from_persisted(state)
    msg = decode_message(op, Direction.INCOMING)
    try:
        plain, request_id = ctx.unprotect(msg)
    except oscore.ReplayErrorWithEcho as e:
        # the server would answer a protected 4.01 + Echo (App. B.1.2)
        return {
            "ok": False,
            "error": type(e).__name__,
            "detail": str(e),
            "echo": hx(e.echo),
            "request_kid": hx(e.request_id.kid),
            "request_piv": hx(e.request_id.partial_iv),
        }
    out = {
        "message": hx(encode_like(plain, msg)),
        "oscore_option": hx(msg.opt.oscore),
        "plaintext": hx(ctx.last_plaintext),
        "external_aad": hx(ctx.last_external_aad),
        "nonce": hx(ctx.nonce(request_id.partial_iv, request_id.kid)),
        "request_kid": hx(request_id.kid),
        "request_piv": hx(request_id.partial_iv),
        "replay_window": ctx.recipient_replay_window.persist(),
    }
    out.update(option_fields(msg.opt.oscore))
    return out


def response_request_id(op, can_reuse_nonce):
    return oscore.RequestIdentifiers(
        unhex(op, "request_kid"),
        unhex(op, "request_piv"),
        can_reuse_nonce=can_reuse_nonce,
        request_code=request_code(op),
    )


def op_protect_response(ctx, op):
    require_role(ctx, "protect-response", "server")
    msg = decode_message(op, Direction.OUTGOING)
    if not msg.code.is_response():
        raise UsageError("protect-response needs a response, got %s" % msg.code)
    seqno = op.get("sequence_number")
    own_piv = seqno is not None
    if own_piv:
        if not isinstance(seqno, int) or seqno < 0:
            raise UsageError("sequence_number must be a non-negative integer")
        ctx.sender_sequence_number = seqno
    request_id = response_request_id(op, can_reuse_nonce=not own_piv)
    protected, _ = ctx.protect(msg, request_id)
    fields = option_fields(protected.opt.oscore)
    if fields["partial_iv"] is None:
        nonce = ctx.nonce(request_id.partial_iv, request_id.kid)
    else:
        nonce = ctx.nonce(bytes.fromhex(fields["partial_iv"]), ctx.sender_id)
    out = {
        "message": hx(encode_like(protected, msg)),
        "oscore_option": hx(protected.opt.oscore),
        "ciphertext": hx(protected.payload),
        "plaintext": hx(ctx.last_plaintext),
        "external_aad": hx(ctx.last_external_aad),
        "nonce": hx(nonce),
        "sequence_number": seqno,
        "next_sequence_number": ctx.sender_sequence_number if own_piv else None,
    }
    out.update(fields)
    return out


def op_unprotect_response(ctx, op):
    require_role(ctx, "unprotect-response", "client")
    msg = decode_message(op, Direction.INCOMING)
    if not msg.code.is_response():
        raise UsageError("unprotect-response needs a response, got %s" % msg.code)
    request_id = response_request_id(op, can_reuse_nonce=True)
    plain, _ = ctx.unprotect(msg, request_id)
    fields = option_fields(msg.opt.oscore)
    if fields["partial_iv"] is None:
        nonce = ctx.nonce(request_id.partial_iv, request_id.kid)
    else:
        nonce = ctx.nonce(bytes.fromhex(fields["partial_iv"]), ctx.recipient_id)
    out = {
        "message": hx(encode_like(plain, msg)),
        "oscore_option": hx(msg.opt.oscore),
        "plaintext": hx(ctx.last_plaintext),
        "external_aad": hx(ctx.last_external_aad),
        "nonce": hx(nonce),
    }
    out.update(fields)
    return out


OPS = {
    "derive": op_derive,
    "protect-request": op_protect_request,
    "unprotect-request": op_unprotect_request,
    "protect-response": op_protect_response,
    "unprotect-response": op_unprotect_response,
}


def run_op(op):
    """One operation object in, one answer object out. UsageError propagates
    (the input is wrong); anything aiocoap raises becomes ok: false."""
    if not isinstance(op, dict):
        raise UsageError("an operation must be a JSON object, got %r" % (op,))
    name = op.get("op")
    if name not in OPS:
        raise UsageError("unknown op %r (known: %s)" % (name, ", ".join(OPS)))
    if not isinstance(op.get("context"), dict):
        raise UsageError("%s needs a context object" % name)
    try:
        ctx = ToolContext(op["context"], op.get("window", oscore.DEFAULT_WINDOWSIZE))
        out = OPS[name](ctx, op)
    except UsageError:
        raise
    except Exception as e:
        return {"ok": False, "op": name, "error": type(e).__name__, "detail": str(e)}
    out.setdefault("ok", True)
    out["op"] = name
    return out


# ---------------------------------------------------------------- self-test


class Checker:
    def __init__(self):
        self.passed = 0
        self.failed = []

    def eq(self, what, got, want):
        if got == want:
            self.passed += 1
        else:
            self.failed.append("%s: got %r, want %r" % (what, got, want))

    def true(self, what, cond, detail=""):
        if cond:
            self.passed += 1
        else:
            self.failed.append("%s %s" % (what, detail))


def vector_context(inputs, swap=False, role=None):
    c = {
        "secret": inputs["master_secret"],
        "salt": inputs["master_salt"] or "",
        "sender_id": inputs["recipient_id" if swap else "sender_id"],
        "recipient_id": inputs["sender_id" if swap else "recipient_id"],
        "id_context": inputs["id_context"],
        "algorithm": inputs["aead_algorithm_name"],
        "kdf_hashfun": {"HKDF-SHA-256": "sha256", "HKDF-SHA-384": "sha384", "HKDF-SHA-512": "sha512"}[inputs["kdf"]],
    }
    if role:
        c["role"] = role
    return c


def info_hex(role_id_hex, id_context_hex, alg, kind, length):
    idc = None if id_context_hex is None else bytes.fromhex(id_context_hex)
    return cbor2.dumps([bytes.fromhex(role_id_hex), idc, alg, kind, length]).hex()


def check_vector(chk, v):
    vid, inp, exp = v["id"], v["inputs"], v["expected"]
    before = len(chk.failed)
    alg = oscore.algorithms[inp["aead_algorithm_name"]]
    if v["kind"] == "key_derivation":
        got = run_op({"op": "derive", "context": vector_context(inp)})
        chk.eq(vid + " ok", got["ok"], True)
        for k in ("sender_key", "recipient_key", "common_iv", "sender_nonce_piv0", "recipient_nonce_piv0"):
            chk.eq("%s %s" % (vid, k), got.get(k), exp[k])
        # the HKDF info arrays (RFC 8613 §3.2.1), built the way aiocoap's _kdf builds them
        chk.eq(vid + " info_sender_key", info_hex(inp["sender_id"], inp["id_context"], alg.value, "Key", alg.key_bytes), exp["info_sender_key"])
        chk.eq(vid + " info_recipient_key", info_hex(inp["recipient_id"], inp["id_context"], alg.value, "Key", alg.key_bytes), exp["info_recipient_key"])
        chk.eq(vid + " info_common_iv", info_hex("", inp["id_context"], alg.value, "IV", alg.iv_bytes), exp["info_common_iv"])
    elif v["kind"] == "message_request":
        got = run_op(
            {
                "op": "protect-request",
                "context": vector_context(inp, role="client"),
                "message": inp["unprotected_message"],
                "sequence_number": inp["sender_sequence_number"],
                "kid_context": inp["send_kid_context"],
            }
        )
        if not got["ok"]:
            chk.failed.append("%s protect: %s" % (vid, got))
        else:
            for k, e in (
                ("message", "protected_message"),
                ("oscore_option", "oscore_option_value"),
                ("plaintext", "plaintext"),
                ("external_aad", "aad_array"),
                ("nonce", "aead_nonce"),
                ("partial_iv", "partial_iv"),
                ("kid", "kid"),
                ("kid_context", "kid_context"),
            ):
                chk.eq("%s protect %s" % (vid, k), got[k], exp[e])
            chk.eq(vid + " protect ciphertext", got["ciphertext"], exp["ciphertext"])
        back = run_op(
            {"op": "unprotect-request", "context": vector_context(inp, swap=True, role="server"), "message": exp["protected_message"]}
        )
        if back["ok"]:
            chk.eq(vid + " unprotect plaintext", back["plaintext"], exp["plaintext"])
            chk.eq(vid + " unprotect request_piv", back["request_piv"], exp["partial_iv"])
            chk.eq(vid + " unprotect request_kid", back["request_kid"], exp["kid"])
        else:
            chk.failed.append("%s unprotect: %s" % (vid, back))
    elif v["kind"] == "message_response":
        op = {
            "op": "protect-response",
            "context": vector_context(inp, role="server"),
            "message": inp["unprotected_message"],
            "request_kid": inp["request_kid"],
            "request_piv": inp["request_piv"],
        }
        if inp["response_includes_partial_iv"]:
            op["sequence_number"] = inp["sender_sequence_number"]
        got = run_op(op)
        if got["ok"]:
            for k, e in (
                ("message", "protected_message"),
                ("oscore_option", "oscore_option_value"),
                ("plaintext", "plaintext"),
                ("external_aad", "aad_array"),
                ("nonce", "aead_nonce"),
                ("partial_iv", "partial_iv"),
                ("ciphertext", "ciphertext"),
            ):
                chk.eq("%s protect %s" % (vid, k), got[k], exp[e])
        else:
            chk.failed.append("%s protect: %s" % (vid, got))
        back = run_op(
            {
                "op": "unprotect-response",
                "context": vector_context(inp, swap=True, role="client"),
                "message": exp["protected_message"],
                "request_kid": inp["request_kid"],
                "request_piv": inp["request_piv"],
            }
        )
        if back["ok"]:
            chk.eq(vid + " unprotect plaintext", back["plaintext"], exp["plaintext"])
            chk.eq(vid + " unprotect nonce", back["nonce"], exp["aead_nonce"])
        else:
            chk.failed.append("%s unprotect: %s" % (vid, back))
    else:
        chk.failed.append("%s: unknown vector kind %r" % (vid, v["kind"]))
    return len(chk.failed) == before


def plain_message(code, mtype, mid, token, uri=None, payload=b""):
    """A complete outgoing message (Message() deprecates MID/type arguments)."""
    msg = Message(code=code, payload=payload)
    if uri is not None:
        msg.set_request_uri(uri)
    msg.mtype = mtype
    msg.mid = mid
    msg.token = token
    return msg


def flip_last_byte(hexmsg):
    b = bytearray(bytes.fromhex(hexmsg))
    b[-1] ^= 0x01
    return b.hex()


def check_round_trip(chk, algorithm, hashfun):
    """Client protect -> server unprotect -> server protect (nonce reuse and
    own PIV) -> client unprotect, replay and tamper refusals. Checks that the
    JSON plumbing the Rust tests rely on carries everything across."""
    what = "%s/%s" % (algorithm, hashfun)
    base = {
        "secret": "0102030405060708090a0b0c0d0e0f10" + "1112131415161718191a1b1c1d1e1f20",
        "salt": "9e7ca92223786340",
        "id_context": "37cbf3210017a2d3",
        "algorithm": algorithm,
        "kdf_hashfun": hashfun,
    }
    client = dict(base, sender_id="01", recipient_id="", role="client")
    server = dict(base, sender_id="", recipient_id="01", role="server")
    # CON GET coap://localhost/tv1?x=1, token 4a, MID 0x1234, Accept 0
    get = plain_message(codes.GET, 0, 0x1234, b"\x4a", uri="coap://localhost/tv1?x=1")
    get.opt.accept = 0
    get.opt.uri_port = None
    req = run_op({"op": "protect-request", "context": client, "message": get.encode().hex(), "sequence_number": 258})
    if not req["ok"]:
        chk.failed.append("%s protect-request: %s" % (what, req))
        return
    chk.eq(what + " piv", req["partial_iv"], "0102")
    chk.eq(what + " kid", req["kid"], "01")
    chk.eq(what + " kid_context", req["kid_context"], base["id_context"])
    srv = run_op({"op": "unprotect-request", "context": server, "message": req["message"]})
    if not srv["ok"]:
        chk.failed.append("%s unprotect-request: %s" % (what, srv))
        return
    chk.eq(what + " request plaintext", srv["plaintext"], req["plaintext"])
    chk.eq(what + " window", srv["replay_window"], {"index": 258 - 31, "bitfield": 1 << 31})
    inner = Message.decode(bytes.fromhex(srv["message"]))
    chk.eq(what + " inner path", inner.opt.uri_path, ("tv1",))
    chk.eq(what + " inner Uri-Host is outer only", inner.opt.uri_host, None)
    replay = run_op(
        {"op": "unprotect-request", "context": server, "message": req["message"], "replay_window": srv["replay_window"]}
    )
    chk.eq(what + " replay refused", (replay["ok"], replay.get("error")), (False, "ReplayError"))
    tampered = run_op({"op": "unprotect-request", "context": server, "message": flip_last_byte(req["message"])})
    chk.true(what + " tampered request refused", not tampered["ok"], str(tampered))

    resp = plain_message(codes.CONTENT, 2, 0x1234, b"\x4a", payload=b"hello " * 50)
    resp.opt.content_format = 0
    for own in (None, 7):
        op = {
            "op": "protect-response",
            "context": server,
            "message": resp.encode().hex(),
            "request_kid": srv["request_kid"],
            "request_piv": srv["request_piv"],
        }
        if own is not None:
            op["sequence_number"] = own
        pr = run_op(op)
        if not pr["ok"]:
            chk.failed.append("%s protect-response(%s): %s" % (what, own, pr))
            continue
        chk.eq("%s response piv (%s)" % (what, own), pr["partial_iv"], None if own is None else "07")
        cl = run_op(
            {
                "op": "unprotect-response",
                "context": client,
                "message": pr["message"],
                "request_kid": req["request_kid"],
                "request_piv": req["request_piv"],
            }
        )
        if not cl["ok"]:
            chk.failed.append("%s unprotect-response(%s): %s" % (what, own, cl))
            continue
        got = Message.decode(bytes.fromhex(cl["message"]))
        chk.eq("%s response payload (%s)" % (what, own), got.payload, resp.payload)
        chk.eq("%s response code (%s)" % (what, own), got.code, codes.CONTENT)
        bad = run_op(
            {
                "op": "unprotect-response",
                "context": client,
                "message": flip_last_byte(pr["message"]),
                "request_kid": req["request_kid"],
                "request_piv": req["request_piv"],
            }
        )
        chk.true("%s tampered response refused (%s)" % (what, own), not bad["ok"], str(bad))


def check_echo(chk):
    """App. B.1.2 through the JSON interface: lost window -> ReplayErrorWithEcho;
    the same request with the right Echo initialises the window."""
    ctxs = {"secret": "00112233445566778899aabbccddeeff", "algorithm": "AES-CCM-16-64-128"}
    client = dict(ctxs, sender_id="01", recipient_id="66696c65", role="client")
    server = dict(ctxs, sender_id="66696c65", recipient_id="01", role="server")
    get = plain_message(codes.GET, 0, 1, b"", uri="coap://localhost/hello.txt")
    get.opt.uri_port = None
    echo = "0102030405060708"
    first = run_op({"op": "protect-request", "context": client, "message": get.encode().hex(), "sequence_number": 40})
    srv = run_op(
        {"op": "unprotect-request", "context": server, "message": first["message"], "replay_window": "unknown", "echo_recovery": echo}
    )
    chk.eq("echo: first request answered with Echo", (srv["ok"], srv.get("error"), srv.get("echo")), (False, "ReplayErrorWithEcho", echo))
    get.opt.echo = bytes.fromhex(echo)
    second = run_op({"op": "protect-request", "context": client, "message": get.encode().hex(), "sequence_number": 41})
    srv2 = run_op(
        {"op": "unprotect-request", "context": server, "message": second["message"], "replay_window": "unknown", "echo_recovery": echo}
    )
    chk.eq("echo: retry accepted", srv2["ok"], True)
    chk.eq("echo: window starts at the retry", srv2.get("replay_window"), {"index": 41, "bitfield": 1})


def self_test(vectors_path):
    with open(vectors_path) as f:
        vectors = json.load(f)["vectors"]
    chk = Checker()
    ids = []
    for v in vectors:
        ok = check_vector(chk, v)
        ids.append(v["id"])
        print("%s %s" % ("PASS" if ok else "FAIL", v["id"]))
    for a in AEAD_ALGORITHMS:
        for h in HASHFUNS:
            before = len(chk.failed)
            check_round_trip(chk, a, h)
            print("%s round-trip %s %s" % ("PASS" if len(chk.failed) == before else "FAIL", a, h))
    before = len(chk.failed)
    check_echo(chk)
    print("%s echo-recovery" % ("PASS" if len(chk.failed) == before else "FAIL"))
    for f in chk.failed:
        print("  failed: " + f)
    print("self-test: %d vectors (%s), %d checks passed, %d failed" % (len(ids), " ".join(ids), chk.passed, len(chk.failed)))
    return 0 if not chk.failed else 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--self-test", action="store_true", help="check against RFC 8613 Appendix C and round trips")
    p.add_argument("--vectors", default=DEFAULT_VECTORS, help="vector file for --self-test (default %(default)s)")
    a = p.parse_args()
    if a.self_test:
        sys.exit(self_test(a.vectors))
    try:
        data = json.load(sys.stdin)
        if isinstance(data, list):
            out = [run_op(op) for op in data]
        else:
            out = run_op(data)
    except (UsageError, json.JSONDecodeError) as e:
        print("aiocoap_protect.py: bad input: %s" % e, file=sys.stderr)
        sys.exit(2)
    except Exception:
        traceback.print_exc()
        sys.exit(2)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
