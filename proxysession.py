#!/usr/bin/env python3
"""proxysession: publish Python objects on a broker and call them from anywhere.

A proxysession server is a small network broker. Programs connect to it,
*publish* objects under an alias, and other programs *list* the aliases,
*subscribe* to get a proxy, and *call* the published methods; the server
routes every call to the publisher's connection and routes the answer back.
It is the Python heir of Perl's POEx::ProxySession ("an IKC-like remote
session proxifier"), in one standard-library file.

Run a server::

    python proxysession.py --listen 127.0.0.1:56789

Publish an object, and call it (here both in one process)::

    import proxysession

    class Greeter:
        @proxysession.proxy_event
        def hello(self, name):
            return "hello, " + name

    with proxysession.Client() as client:
        conn = client.connect("127.0.0.1", 56789)
        client.publish(conn, "Greeter", Greeter())
        greeter = client.subscribe(conn, "Greeter")
        print(greeter.hello("world"))          # -> hello, world

The wire format (PROTOCOL.md, beside this file in the repository, has it
whole): each frame is ``<decimal length>\\0<body>`` as POE::Filter::Reference
writes it; a body is one pickled dict ``{type, id, to, success, payload}``
whose ``payload`` is pickled separately, so the server routes calls without
ever decoding what callers pass or what methods return. Peers that both offer
it send calls and answers in a compact envelope instead, a 17-byte binary
header before the payload, which the server routes without unpickling even
the envelope. The server unpickles with no globals at all; clients unpickle
with an allow-list of plain value classes. A Client may connect to a NATS
server or cluster instead (``connect("nats://HOST:PORT")``): the same API,
each publication a NATS service.

Contents, in the order the data flows:

- errors            ProxyError and its family
- peer values       the one place a peer's value becomes text or a key
- serializers       pickle, restricted on the way in: cost bounded per byte,
                    keys crafted to share a hash refused; a Client's payload
                    loader; compact envelopes
- filter            ReferenceFilter: bytes <-> frames
- reactor           Reactor: a selectors loop with timers; which thread runs it
- wheel             Wheel: one connection, its buffers, TLS and authkey
- statistics        what the server counts of calls, per alias and connection
- server            the server's own messages, written from one place; the
                    router: calls in flight (shared sessions: to the least
                    busy member; compact calls and answers passed on from
                    their header; deadlines and cancel); the grace window
                    (resumption); subscribes that wait; and Server:
                    listening, sessions, connections ending
- monitor           the server's statistics over HTTP: JSON, Prometheus, a page
- threads           worker pools, futures (cancel() takes a call back), and
                    current_call(): calls that run off the loop
- message layer     a Client's connections: each request numbered, encoded
                    once in the envelope its server takes, sized against its
                    limit, sent or queued, timed out, answered; the link:
                    reconnection, heartbeats, resumption, calls that wait
                    for their alias after a reconnection; connecting
- nats              the same over a NATS server or cluster: its protocol,
                    publications as ADR-32 services, calls as requests
- client            what a Client published and subscribed (made again on a
                    new link), the calls it serves; and Client: the requests
                    users make
- proxy             Proxy, proxy_event
- asyncio           AsyncClient: the Client on the running asyncio loop, its
                    requests and calls awaited, async def methods published
- command line      main()
"""

import argparse
import bisect
import collections
import concurrent.futures
import contextvars
import copyreg
import datetime
import errno
import hashlib
import hmac
import heapq
import html
import inspect
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import pickle
import pickletools
import queue
import re
import reprlib
import secrets
import selectors
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import traceback
import types
import urllib.parse
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

__version__ = "1.0.0"
__license__ = "MIT"

__all__ = [
    "ProxyError", "ProtocolError", "AuthenticationError", "RemoteError",
    "CallTimeout", "ConnectError", "FrameTooLarge",
    "ReferenceFilter", "Reactor", "Wheel", "Server", "Client", "Proxy",
    "Result", "proxy_event", "get_reactor", "run", "run_in_thread", "main",
    "CallContext", "current_call", "AsyncClient",
    "DEFAULT_HOST", "DEFAULT_PORT", "MAX_FRAME",
]

log = logging.getLogger("proxysession")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 56789

# Limits. Each is a default that Server/Client take as an argument.
MAX_FRAME = 16 * 1024 * 1024      # a body larger than this closes the connection (PROTOCOL.md 1)
MAX_HEADER = 20                   # a NUL must arrive within this many header bytes (PROTOCOL.md 1)
READ_CHUNK = 256 * 1024           # one recv per connection per pass: large enough to carry many
                                  # frames, small enough that one busy peer cannot starve the rest
LOOP_READ_CHUNK = 64 * 1024       # ... and per turn of an asyncio loop (AsyncClient): what one
                                  # read brings is handled in that turn, which must stay short
                                  # (about 600 answers of 100 bytes: a few ms) for the loop's
                                  # other tasks
SEND_COALESCE = 64 * 1024         # a piece this large goes out as it is, never copied; smaller
                                  # ones are joined (while the socket has output queued, into
                                  # pieces of about this size)
EARLY_SEND = 8 * 1024             # a pass that has written this much to one socket sends it at
                                  # once, as the next frame joins it, not at the pass's end: the
                                  # peer starts on it while the pass goes on, so the stages of a
                                  # pipeline (caller, server, publisher) overlap on more than one
                                  # core instead of taking turns (64 calls in flight, W2: 1.21x
                                  # the calls/s of one send per pass; bench_proxysession.py,
                                  # 2026-12-05). A lone frame waits for the end, where it leaves
                                  # alone anyway: frames of 8 KiB and more go in twos (W2 with
                                  # 16 KiB arguments: 1.10x in twos, 0.90x each alone)
DIRECT_READ = 64 * 1024           # a frame this large, once a quarter of it is in, gets a buffer
                                  # of its own that the socket reads straight into (see the filter)
HIGH_WATER = 1024 * 1024          # output queued to a connection above which its feeders pause
LOW_WATER = HIGH_WATER // 2       # ... and below which they resume (PROTOCOL.md 8)
MAX_WRITE_BUFFER = 64 * 1024 * 1024  # a peer that lets this much pile up is not reading: close it
HELD_PER_PUBLISHER = 2            # calls held for a publisher away (grace window) take at most
                                  # max_write_buffer / this: they must fit its connection at once
HELD_PER_CALLER = 2               # ... one caller's held calls, max_write_buffer / this,
HELD_IN_TOTAL = 2                 # and all of them, max_write_buffer * this (128 MiB)
MAX_WAITING_CALLS = 10000         # calls one connection may leave waiting for answers: bounds
                                  # what a caller can make the server hold (~250 bytes each)
MAX_SUBSCRIBE_WAIT = 3600.0       # seconds a subscribe may wait for its alias (PROTOCOL.md 7.5):
                                  # an hour; a longer wait is a mistake, or a peer hoarding timers
SERIAL_CALL_NOTICE = 0.5          # seconds a call may hold the reactor's thread (workers=0)
                                  # before the log says, once, that the others wait for it
SUBSCRIBE_WAIT_MARGIN = 5.0       # seconds past its wait that a Client gives the answer
MAX_CALL_TIMEOUT_MS = 30 * 86400 * 1000   # the longest timeout a call carries, in ms (30 days,
                                  # PROTOCOL.md 7.7); a Client with a longer one sends none (it
                                  # keeps its own). An int, not float seconds: a float in a
                                  # message takes the exact walk of the pickle check (5x slower)
DEADLINE_SWEEP = 0.25             # seconds between the server's looks for calls past their
                                  # deadline: how late, at most, it answers one (PROTOCOL.md 7.7)
SWEEP_RATE = 400000               # ... and calls it looks at per second at most (~2% of a core):
                                  # with more in flight than SWEEP_RATE * DEADLINE_SWEEP it looks
                                  # less often, so that the sweep's cost stays a small share
MAX_WAITING_SUBSCRIBES = 256      # subscribes one connection may leave waiting: a client waits
                                  # for the few aliases it needs, not thousands
TIMER_COMPACT_FLOOR = 1024        # timers in a reactor's heap before cancelled ones are dropped
HANDSHAKE_TIMEOUT = 10.0          # seconds a peer gets to finish TLS and the authkey handshake
CHALLENGE_PROBE = 1.0             # seconds a keyed Client waits for the server's challenge before
                                  # asking, on a second connection, why none came (connect())
PROBE_TIMEOUT = 2.0               # ... and each step of that second connection may take
MAX_HANDSHAKE_FRAME = 256         # a handshake frame is a challenge or a digest: tiny
MAX_ACCEPTS_PER_WAKEUP = 128      # accept in batches so a connect storm cannot starve the others
ACCEPT_RETRY_DELAY = 1.0          # seconds to stop accepting after EMFILE/ENFILE
DEFAULT_TIMEOUT = 30.0            # seconds a blocking request waits for its answer
RECONNECT_FIRST = 0.5             # a lost connection's first reconnection try comes within this,
RECONNECT_CAP = 5.0               # and the waits double up to this: a server in a crash loop
                                  # costs a client one try per few seconds
HEARTBEAT = 15.0                  # a Client looks at each connection this often: one silent
                                  # since the last look gets a ping, one silent since the ping
                                  # is taken as lost (so within two to three periods)
KEEPALIVE_IDLE = 60               # TCP keepalive: idle seconds before the first probe,
KEEPALIVE_INTERVAL = 10           # seconds between probes,
KEEPALIVE_COUNT = 3               # and unanswered probes before the kernel drops the peer
PICKLE_PROTOCOL = 4               # the protocol every CPython >= 3.4 reads
PROTOCOL_VERSION = 2              # PROTOCOL.md: the seed's version 1, plus section 7
MAX_FIELDS = 64                   # keys in one message, a small flat dict (PROTOCOL.md 3.1)
MAX_NAME = 256                    # characters in an alias, a session name or a method name
MAX_METHODS = 4096                # entries in a published method table
MAX_DESCRIPTION = 65536           # characters in one method's signature or doc
ID_RANGE = 2 ** 63                # an id is an int in [-ID_RANGE, ID_RANGE)
REENCODED_GROWTH = 128            # bytes a routed message may grow by when the server encodes
                                  # it again (beside its new name, of up to 4 bytes a character
                                  # in UTF-8): a compact envelope that goes
                                  # on pickled grows by 80 at most; more means a crafted pickle
DECODE_COST_FACTOR = 64           # a pickle may build objects of at most this many times its size
DECODE_COST_BASE = 1024 * 1024    # ... plus this: CPython objects are 50-230 bytes each, so
                                  # small containers of small values legitimately cost ~40x
MAX_QUOTE = 256                   # characters of a peer's value quoted back in an error
MAX_NESTED_CALLS = 32             # blocking calls nested inside published methods, per reactor:
                                  # each level costs ~15 interpreter frames of the 1000 allowed
HANDOFF_GRACE = 1.0               # seconds past its own timeout that a thread waits for a call
                                  # handed to the reactor's thread: only a loop blocked by user
                                  # code (whose sweep cannot run) makes it wait that long


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------

class ProxyError(Exception):
    """Base of every proxysession error; a failed request carries the server's words."""


class ProtocolError(ProxyError):
    """The peer broke the wire protocol (bad frame, bad message)."""


class AuthenticationError(ProxyError):
    """The authkey handshake failed; the message says which side and why."""


class RemoteError(ProxyError):
    """A published method raised: ``error`` is the remote class name, ``message``
    its text, ``traceback`` the remote traceback as text."""

    def __init__(self, error: str, message: str, traceback: str = ""):
        super().__init__("%s: %s" % (error, message))
        self.error = error
        self.message = message
        self.traceback = traceback


class CallTimeout(ProxyError, TimeoutError):
    """No answer came within the request's timeout."""


class ConnectError(ProxyError, ConnectionError):
    """``connect()`` could not reach the server, or it did not speak the protocol."""


class FrameTooLarge(ProxyError):
    """A request (or a published method's answer) would make a frame larger
    than the server accepts: it fails alone, and nothing is sent. ``size``
    and ``limit`` are in bytes."""

    def __init__(self, what: str, size: int, limit: int):
        super().__init__("%s of %d bytes exceeds the server's max_frame (%d bytes)"
                         % (what, size, limit))
        self.size = size
        self.limit = limit


# ---------------------------------------------------------------------------
# peer values
# ---------------------------------------------------------------------------
# Whatever a peer sends is data, and data the allow-list admits can make the
# plainest operations raise: str() of an int of more than 4,300 digits
# (ValueError), hash() of Decimal('sNaN') or of a list, repr() of a list nested
# past the recursion limit (RecursionError). So a peer's value becomes text only
# through _text, _show or _quote, and a dict key only through _name: these never
# raise, and _show looks at no more of a value than it shows.

def _text(value: Any, limit: Optional[int] = MAX_QUOTE) -> str:
    """``str(value)``, cut to ``limit`` characters (None: whole), for a message
    or a log line; a value whose str() raises is described by its type."""
    try:
        text = value if type(value) is str else str(value)
    except Exception:
        return _unshowable(value)
    return text if limit is None or len(text) <= limit else text[:limit] + "..."


def _show(value: Any, limit: Optional[int] = MAX_QUOTE) -> str:
    """``repr(value)``, cut and guarded as _text does it, and with a limit
    bounded in what it looks at (reprlib: four levels, ``limit`` characters
    of a str), since a repr in full of a peer's value can cost far more than
    its size. None: in full, for a value a user asked to see."""
    try:
        return _text(repr(value) if limit is None else _SHORT_REPR.repr(value), limit)
    except Exception:
        return _unshowable(value)


def _short_repr() -> reprlib.Repr:
    shown = reprlib.Repr()
    shown.maxlevel = 4
    shown.maxstring = shown.maxother = shown.maxlong = MAX_QUOTE
    return shown


_SHORT_REPR = _short_repr()


def _unshowable(value: Any) -> str:
    bits = " of %d bits" % value.bit_length() if isinstance(value, int) else ""
    return "<%s%s that cannot be shown>" % (type(value).__name__, bits)


def _quote(value: Any) -> str:
    """A peer's value as a message may quote it: a str cut to MAX_QUOTE
    characters; of anything else only its type, which costs nothing to format."""
    if type(value) is str:
        return _text(value)
    return "<%s>" % type(value).__name__


_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _printable(value: Any, limit: Optional[int] = MAX_QUOTE) -> str:
    """A peer's value as a log line or a terminal shows it: as _quote, with
    control characters, line separators and lone surrogates escaped as repr
    escapes them, so that a name cannot forge a log line, move a terminal's
    cursor, or fail to encode."""
    return _UNPRINTABLE.sub(lambda found: repr(found.group())[1:-1], _quote(value)
                            if limit == MAX_QUOTE else _text(value, limit))


def _name(value: Any) -> Optional[str]:
    """``value`` if it can be looked up as a name (a str: its hash cannot
    fail or be made to collide), else None."""
    return value if type(value) is str else None


# ---------------------------------------------------------------------------
# serializers
# ---------------------------------------------------------------------------
# pickle is code execution unless find_class says otherwise. The server only
# ever needs plain containers, so it refuses every global; a client needs a
# few value classes as well, so it takes an allow-list (PROTOCOL.md 3).

def _dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, PICKLE_PROTOCOL)


class _GlobalRefused(pickle.UnpicklingError):
    """A pickle named a class or function where only plain values may be."""


class _PlainUnpickler(pickle.Unpickler):
    """Builds only str, int, float, bool, None, bytes, list, tuple, dict, set."""

    def find_class(self, module, name):
        raise _GlobalRefused("global '%s.%s' is forbidden" % (module, name))


def _loads_with_unpickler(data) -> Any:
    return _PlainUnpickler(io.BytesIO(data)).load()


# The same refusal at half the cost, and decoding is most of what routing a
# call costs (measured: 0.9 against 1.7 us for a 220-byte call message, since
# no Unpickler and BytesIO are built per message). CPython's C pickle looks a
# global's module up through PyImport_Import, which calls the __import__ of the
# builtins of the *calling frame's* globals: run pickle.loads from a function
# whose globals hold an __import__ that refuses, and no global can be built.
# That is an implementation detail, so it is proved on this interpreter at
# import, with real globals, and the subclass above is used where it fails.

def _refuse_import(module, *args, **kwargs):
    raise _GlobalRefused("global from module '%s' is forbidden" % (module,))


def _loads_template(data):
    return pickle_loads(data)       # noqa: F821 -- resolved in the globals below


_loads_without_imports = types.FunctionType(
    _loads_template.__code__,
    {"__builtins__": {"__import__": _refuse_import}, "pickle_loads": pickle.loads},
    "_loads_without_imports")
_loads_without_imports.__qualname__ = "_loads_without_imports"


def _refuses_every_global(loads: Callable) -> bool:
    probes = [pickle.dumps(os.getcwd, protocol) for protocol in (0, 2, 4)]  # GLOBAL, STACK_GLOBAL
    probes.append(b"(ios\ngetcwd\n.")                                      # INST
    for probe in probes:
        try:
            loads(probe)
        except _GlobalRefused:
            continue
        except Exception:
            return False        # it failed some other way: no proof of refusal
        return False            # it built the global
    return True


_loads_plain = (_loads_without_imports if _refuses_every_global(_loads_without_imports)
                else _loads_with_unpickler)


# Cost bounded by size. pickle.loads, even refusing every global, trusts the
# opcodes it is given: a memo index is a size to allocate (an 11-byte
# LONG_BINPUT frame made CPython allocate and clear 2 GiB), and every one-byte
# container opcode builds a 56-232 byte object. So every pickle from the
# network is walked first, opcode by opcode, without building anything: a memo
# index larger than the pickle, an opcode not allowed in that place, or objects
# that would cost more than DECODE_COST_FACTOR times the bytes read so far (plus
# DECODE_COST_BASE) refuse it before the decoder sees it, at the first opcode
# past that budget: each byte earns its allowance as it is read, so junk is
# refused where it turns costly, not after a walk to its end. It is the price of a
# server that no 11-byte frame can take down, paid twice per routed call in each
# of the three processes; so it is paid at C speed where it can be (the skim,
# below), and in Python only for what the skim does not know.

class _Refused(ProtocolError, pickle.UnpicklingError):
    """A pickle that may not be decoded here; the message says why."""


_LINE, _PAIR, _LEN1, _LEN4S, _LEN4, _LEN8, _MEMO4, _MEMO_LINE, _STOP = range(-1, -10, -1)
_ARGUMENT_WIDTHS = {-1: _LINE, -2: _LEN1, -3: _LEN4S, -4: _LEN4, -5: _LEN8}
_NEWLINE = re.compile(b"\n")     # re searches bytes and memoryviews alike

# What decoding each opcode may allocate, in bytes, beyond the pickle's own
# bytes: a new container, a stack or memo slot, an object of an allowed class.
_CONTAINER_COSTS = {"EMPTY_SET": 232, "FROZENSET": 232, "EMPTY_DICT": 232, "DICT": 232,
                    "EMPTY_LIST": 72, "LIST": 72, "TUPLE": 64, "TUPLE1": 64, "TUPLE2": 64,
                    "TUPLE3": 64, "MARK": 64, "REDUCE": 640, "NEWOBJ": 640, "NEWOBJ_EX": 640,
                    "OBJ": 640, "INST": 640, "BUILD": 64}
_SLOT_COST = 16


class _Opcodes(list):
    """An opcode table: a list indexed by opcode byte, of None (refused) or
    (argument width, cost); and for the skim, ``steps``, a regex stepping over
    its plain opcodes, each of which costs at most ``plain_cost`` per byte;
    ``prone`` marks the ``not_plain``
    opcodes, which the walk reports (see hash collisions). For the walk, where the cost is
    counted in bytes, ``cheap`` marks the opcodes of a fixed width whose cost
    is at most _CHEAP_COST, and ``cheap_steps`` steps over runs of them. Each
    byte read earns ``earn`` of allowance (DECODE_COST_FACTOR for payloads, 0
    for messages, whose budget is in pushes); an entry's cost is net of what
    its opcode and fixed-width argument earn, and ``plain_cost`` is not."""

    __slots__ = ("steps", "plain_cost", "cheap", "cheap_steps", "earn", "prone")


def _opcode_table(allowed: Optional[Iterable[str]], costs: Optional[dict] = None,
                  not_plain: Iterable[str] = ()) -> _Opcodes:
    """The table of ``allowed`` opcodes (None: all), with the cost of each
    (default: what it allocates, counted against the bytes read; else in
    pushes); ``not_plain`` ones are left to the walk."""
    table = _Opcodes([None] * 256)
    table.earn = DECODE_COST_FACTOR if costs is None else 0
    not_plain = set(not_plain)
    left_to_the_walk = set()
    for opcode in pickletools.opcodes:
        if allowed is not None and opcode.name not in allowed:
            continue
        if opcode.name in ("NEXT_BUFFER", "READONLY_BUFFER", "PERSID", "BINPERSID"):
            continue             # out-of-band data and persistent ids are never used here
        width = opcode.arg.n if opcode.arg is not None else 0
        if width < 0:
            width = _ARGUMENT_WIDTHS[width]
        if opcode.name in ("GLOBAL", "INST"):
            width = _PAIR        # two lines: module and name
        elif opcode.name == "LONG_BINPUT":
            width = _MEMO4
        elif opcode.name == "PUT":
            width = _MEMO_LINE
        elif opcode.name == "STOP":
            width = _STOP
        if costs is None:
            cost = _CONTAINER_COSTS.get(opcode.name, _SLOT_COST)
        else:
            cost = costs.get(opcode.name, 0)
        op = ord(opcode.code.encode("latin-1"))
        table[op] = (width, cost)
        if opcode.name in not_plain:
            left_to_the_walk.add(op)
    _plain_steps(table, left_to_the_walk)
    _cheap_steps(table, left_to_the_walk, costs is None)
    table.prone = bytes(op in left_to_the_walk for op in range(256))
    for op, entry in enumerate(table):
        if entry is not None:
            table[op] = (entry[0], entry[1] - table.earn * (1 + max(entry[0], 0)))
    return table


# The skim: most pickles that reach us hold only opcodes of a fixed width or a
# one-byte length (what pickle.dumps writes for small dicts, lists, str, bytes
# and ints), and a regex steps over those in C, where the walk below takes a
# Python loop turn for each. Each opcode byte starts exactly one branch, and a
# one-byte length has one branch per value, so the regex reads the opcodes as
# pickle does; it stops at the first other opcode. Measured side by side with
# timeit on CPython 3.11 (median of 15 rounds): a 202-byte deliver is checked
# in 0.61 of the time of the inline walk this replaced, and its 111-byte
# payload in 0.48 of the time of the walk below.
_PLAIN_COST = 232                # an opcode of more cost (REDUCE, NEWOBJ) is never plain
_BINBYTES, _BINUNICODE, _STOP_OP = 0x42, 0x58, 0x2e
# One branch per length byte; taken whole, never backtracked into: the branches
# are disjoint by their first byte, but sre does not know it, and a failed
# match used to try the other 255 of them for each one-byte-length opcode
# before it (a message with a 256-byte payload took 14 us to check, not 3). An
# atomic group says so from 3.11 on; before, a lookahead does (it is never
# backtracked into), at ~0.3 us more per message.
_SHORT_LENGTHS = b"|".join(re.escape(bytes([length])) + b".{%d}" % length
                           for length in range(256))
_SHORT_LENGTH = b"(?>" + _SHORT_LENGTHS + b")" if sys.version_info >= (3, 11) else \
    b"(?=(?P<short>" + _SHORT_LENGTHS + b"))(?P=short)"


def _plain_steps(table: _Opcodes, not_plain: set) -> None:
    by_width: Dict[int, List[int]] = collections.defaultdict(list)
    table.plain_cost = 1
    for op, entry in enumerate(table):
        if entry is None or op in not_plain or entry[1] > _PLAIN_COST or \
                entry[0] not in (0, 1, 2, 4, 8, _LEN1):
            continue
        by_width[entry[0]].append(op)
        table.plain_cost = max(table.plain_cost, entry[1])

    def ops(width):
        return b"[" + b"".join(re.escape(bytes([op])) for op in by_width[width]) + b"]"
    singles = ops(0) + b"*"
    steps = [ops(_LEN1) + _SHORT_LENGTH] if by_width[_LEN1] else []   # the most common first
    steps += [ops(width) + b"." * width for width in (1, 4, 2, 8) if by_width[width]]
    table.steps = re.compile(singles + b"(?:(?:" + b"|".join(steps) + b")" + singles + b")*",
                             re.DOTALL)


# Cheap runs. Where the budget is counted in bytes (payloads), an opcode of a
# fixed width that allocates at most _CHEAP_COST bytes (a scalar, a memo slot,
# a mark, a tuple) can never take a pickle past DECODE_COST_FACTOR per byte on
# its own, so the walk steps over a run of them with one regex match, charging
# _CHEAP_COST per byte, and a frame of millions of such opcodes costs
# milliseconds of C instead of seconds of Python.
_CHEAP_COST = DECODE_COST_FACTOR


def _cheap_steps(table: _Opcodes, not_plain: set, by_bytes: bool) -> None:
    cheap = [by_bytes and entry is not None and op not in not_plain and
             entry[0] in (0, 1, 2, 4, 8, _LEN1) and entry[1] <= _CHEAP_COST
             for op, entry in enumerate(table)]
    table.cheap = bytes(cheap)
    by_width: Dict[int, List[int]] = collections.defaultdict(list)
    for op, is_cheap in enumerate(cheap):
        if is_cheap:
            by_width[table[op][0]].append(op)
    table.cheap_steps = re.compile(b"(?:" + b"|".join(
        b"[" + b"".join(re.escape(bytes([op])) for op in ops) + b"]" +
        (_SHORT_LENGTH if width == _LEN1 else b"." * width)
        for width, ops in sorted(by_width.items(), reverse=True)) + b")*",
        re.DOTALL) if by_width else None


_SKIM_STRINGS = 16               # four-byte-length strings a skim steps over, in Python
_SKIM_SPAN = 8192                # plain bytes one skim match may step over: more than any
                                 # budget clears at the largest plain cost (6 KiB), and sre
                                 # keeps 44 (3.11) to 140 (3.8) bytes of state per byte


def _skim(body, table: _Opcodes, pos: int, budget: int) -> bool:
    """True when every opcode of ``body`` from ``pos`` to its STOP is a plain
    one of ``table`` or one of a few four-byte-length strings, and decoding it
    stays within ``budget`` (as the walk counts it); False when the walk must
    decide. A plain byte costs at most ``plain_cost`` less what it earns, so
    the skim needs no count: each match ends where that bound would pass the
    budget, and within _SKIM_SPAN (unbounded, one 16 MiB frame of plain
    opcodes cost 1.4 GiB of sre's state to skim)."""
    net = table.plain_cost - table.earn
    earn = table.earn
    steps = table.steps
    size = len(body)
    budget -= table[_STOP_OP][1]
    for _ in range(_SKIM_STRINGS + 1):
        span = _SKIM_SPAN
        if net > 0:
            span = budget // net
            if span < 0:
                return False
            if span > _SKIM_SPAN:
                span = _SKIM_SPAN
        # (not one regex with STOP at its end: where that fails, at a long
        # string, sre first backtracks through every opcode before it)
        end = steps.match(body, pos, pos + span).end()
        budget -= (end - pos) * net          # a match ends only between opcodes
        if end >= size:
            return False                     # truncated: the walk says so
        op = body[end]
        if op == _STOP_OP:
            return True                      # within budget, as every span was
        if op != _BINBYTES and op != _BINUNICODE or table[op] is None:
            return False
        length = int.from_bytes(body[end + 1:end + 5], "little")
        budget -= table[op][1] - earn * length
        pos = end + 5 + length
    return False


def _check_pickle(body, opcodes: list, budget: int, start: int = 0,
                  too_costly: str = "") -> bool:
    """Walk ``body``'s opcodes from ``start`` to STOP, building nothing;
    raise ``_Refused`` for what ``opcodes`` refuses, or ``too_costly`` when it
    costs over ``budget``. True when no opcode was ``prone``."""
    size = len(body)
    pos = start
    prone = opcodes.prone
    found = 0
    cheap = opcodes.cheap
    cheap_steps = opcodes.cheap_steps
    earn = opcodes.earn
    try:
        while True:
            op = body[pos]
            if cheap[op]:        # (earn >= _CHEAP_COST: a run never takes from the budget)
                end = cheap_steps.match(body, pos, pos + _SKIM_SPAN).end()
                if end > pos:    # (not when the opcode's argument runs past the span)
                    budget += (end - pos) * (earn - _CHEAP_COST)
                    pos = end
                    continue
            entry = opcodes[op]
            if entry is None:
                raise _Refused("opcode %s is forbidden here"
                              % (_OPCODE_NAMES.get(op) or "0x%02x, which is none," % op,))
            width, cost = entry
            found |= prone[op]
            budget -= cost
            if budget < 0:       # refused at the first opcode past it, not after the rest
                break
            pos += 1
            if width >= 0:
                pos += width
            elif width == _LEN1:
                budget += earn * (1 + body[pos])
                pos += 1 + body[pos]
            elif width == _STOP:
                break
            elif width == _LEN4 or width == _LEN4S or width == _LEN8:
                count = 8 if width == _LEN8 else 4
                length = int.from_bytes(body[pos:pos + count], "little", signed=width == _LEN4S)
                if length < 0:
                    raise _Refused("negative length")
                budget += earn * (count + length)
                pos += count + length
            elif width == _MEMO4:
                index = int.from_bytes(body[pos:pos + 4], "little")
                if index >= size:
                    raise _Refused("memo index %d in a pickle of %d bytes" % (index, size))
                pos += 4
            else:                # _LINE, _PAIR, _MEMO_LINE: arguments that end at a newline
                end = _NEWLINE.search(body, pos)
                if end is None:
                    raise _Refused("truncated pickle")
                if width == _MEMO_LINE:
                    digits = bytes(body[pos:end.start()]).strip()
                    if not digits.isdigit() or len(digits) > 20 or int(digits) >= size:
                        raise _Refused("memo index %.20r in a pickle of %d bytes" % (digits, size))
                elif width == _PAIR:
                    end = _NEWLINE.search(body, end.end())
                    if end is None:
                        raise _Refused("truncated pickle")
                budget += earn * (end.end() - pos)
                pos = end.end()
    except IndexError:
        raise _Refused("truncated pickle") from None
    if budget < 0:
        raise _Refused(too_costly or "a pickle of %d bytes would build objects of more than "
                       "%d times the %d bytes before its opcode at %d, plus %d"
                       % (size, DECODE_COST_FACTOR, pos, pos, DECODE_COST_BASE))
    return not found


_OPCODE_NAMES = {ord(opcode.code.encode("latin-1")): opcode.name
                 for opcode in pickletools.opcodes}
_SCALARS = ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING",
            "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
            "NONE", "NEWTRUE", "NEWFALSE", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE",
            "BINUNICODE8", "FLOAT", "BINFLOAT")
_MEMO = ("GET", "BINGET", "LONG_BINGET", "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE")
# What can make a dict key or set member whose hash a peer chooses: ints past
# 2**61 (hash(n) is n mod 2**61-1), tuples and frozensets (their hash mixes
# their items' by a known rule), and instances of allowed classes (Decimal,
# Fraction, UUID hash as numbers). str and bytes hash with a per-process secret;
# ints below 2**61 hash to themselves, all different; floats share a hash only
# in classes of at most a few hundred (m * 2**e with e alike modulo 61: 202
# found for one hash), a bounded cost.
_PRONE = ("INT", "LONG", "LONG1", "LONG4", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "FROZENSET",
          "GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD",
          "EXT1", "EXT2", "EXT4")
if sys.version_info < (3, 10):      # every NaN hashes to 0 there (since, as its object's id)
    _PRONE += ("BINFLOAT", "FLOAT")
_PUSHES = _SCALARS + ("GET", "BINGET", "LONG_BINGET", "DUP", "MARK")

# A message (PROTOCOL.md 3.1): one flat dict of scalars, at most MAX_FIELDS keys.
# Its cost is counted in pushed values, which also bounds what hash collisions
# among its keys can cost. The skim bounds pushes by plain bytes, several times
# over, so it clears up to _PLAIN_MESSAGE_PUSHES: as many small values cost
# little to decode, and _decode_message counts the fields exactly. It leaves
# big ints and floats to the walk: only they could be crafted to collide.
# Every opcode but STOP costs one, the ones that push nothing too: at no cost,
# 16 MiB of POPs (or SETITEMS, or empty FRAMEs) took the walk 3 s of the
# server's one thread before the decoder refused them.
_MESSAGE_STEPS = ("MARK", "SETITEM", "SETITEMS", "POP", "DUP", "FRAME")
_MESSAGE_OPCODES = _opcode_table(_SCALARS + _MEMO + _MESSAGE_STEPS + ("STOP",),
                                 {name: 1 for name in _SCALARS + _MEMO + _MESSAGE_STEPS},
                                 ("LONG1", "BINFLOAT"))
_MESSAGE_PUSHES = 5 * MAX_FIELDS + 16    # a key, a value, two memo slots and a SETITEM
                                         # for each (protocol 0), and a few steps more
_PLAIN_MESSAGE_PUSHES = 4096
# What the server decodes of a payload (a publish or rescind): dicts, lists,
# str, bytes, small ints, bools, None. No big ints, floats, tuples or sets, so
# no crafted hash collisions among a method table's keys.
_TREE_OPCODES = _opcode_table(
    [name for name in _SCALARS if name not in ("INT", "LONG", "LONG1", "LONG4", "FLOAT",
                                                "BINFLOAT")]
    + list(_MEMO) + ["MARK", "SETITEM", "SETITEMS", "EMPTY_DICT", "DICT", "EMPTY_LIST", "LIST",
                     "APPEND", "APPENDS", "POP", "POP_MARK", "DUP", "PROTO", "FRAME", "STOP"])
# A payload a client decodes: any opcode; the decoder refuses what it must.
# The prone ones are left to the walk, which reports them (hash collisions).
_VALUE_OPCODES = _opcode_table(None, not_plain=_PRONE)


# PROTO, FRAME, then EMPTY_DICT, or MARK DICT as protocols 0 and 1 write it
_MESSAGE_START = re.compile(b"(?:\x80.)?(?:\x95.{8})?(?:}|\\(d)", re.DOTALL)
# ... and the skim of a message's plain opcodes, in the same call: for most
# messages, all of them to STOP, about 1 us less per message than
# _MESSAGE_START then the skim's loop (side by side in one process, 6 runs)
_PLAIN_MESSAGE = re.compile(_MESSAGE_START.pattern + _MESSAGE_OPCODES.steps.pattern, re.DOTALL)


def _check_message(body) -> None:
    """Refuse a message body that is not a flat dict of scalars (PROTOCOL.md 3.1)."""
    plain = _PLAIN_MESSAGE.match(body, 0, _PLAIN_MESSAGE_PUSHES)
    if plain is None:
        raise _Refused("a message must be a pickled dict")
    end = plain.end()
    op = body[end:end + 1]
    if op == b".":
        return                   # plain to its STOP: most messages
    # a long payload (a four-byte length) stopped the match: on from past it,
    # with what is left of the budget (a message's cost in pushes is at most
    # its plain bytes, and the match and the payload used ``end + 1``)
    if op == b"B" or op == b"X":
        after = end + 5 + int.from_bytes(body[end + 1:end + 5], "little")
        if _skim(body, _MESSAGE_OPCODES, after, _PLAIN_MESSAGE_PUSHES - end - 1):
            return
    _check_pickle(body, _MESSAGE_OPCODES, _MESSAGE_PUSHES, _MESSAGE_START.match(body).end(),
                  "a message has at most %d fields" % MAX_FIELDS)


def _check_payload(payload, opcodes: _Opcodes = _VALUE_OPCODES) -> None:
    """Refuse a payload whose decoding could cost more than its size allows
    (``ProtocolError``); _check_value is the Client's."""
    if not _skim(payload, opcodes, 0, DECODE_COST_BASE):
        _check_pickle(payload, opcodes, DECODE_COST_BASE)


# Hash collisions. A dict or set whose keys share one hash costs time
# quadratic in their number to build: 63 KB of crafted keys took 7.5 s to
# decode. C's decoder cannot be watched while it builds, so C decodes a
# payload only when no dict or set in it can get more than COLLIDABLE_KEYS
# keys of a prone kind (64 keys sharing a hash cost ~2,000 comparisons): when
# it holds no prone opcode at all (what the skim or the walk of _VALUE_OPCODES
# tells: most payloads), or else when a simulation on a stack of what each value could
# be (a prone key, a dict or set with its count of prone keys, anything
# else) says so. Otherwise, and for every payload that
# names a class, the pure-Python decoder builds it, counting the keys of each
# dict and set by hash as they come, and refuses more than COLLIDABLE_KEYS
# alike: linear in the payload either way.

COLLIDABLE_KEYS = 64             # keys of one dict or set that may share a hash: a few dozen
                                 # floats do by nature (2.0**61 == 1.0 as hashes), more only
                                 # by design (or by a choice of floats: hundreds at most)

(_PUSH, _PUSH_PRONE, _PUSH_LONG1, _PUSH_COUNTER, _MARK_OP, _TUPLE_N, _TUPLE_MARK, _LIST_MARK,
 _APPEND, _APPENDS, _DICT_MARK, _SETITEM, _SETITEMS, _ADDITEMS, _FROZENSET, _POP, _POP_MARK,
 _DUP, _PUT, _MEMOIZE_OP, _GET, _SKIP, _STOP_SIM, _CLASS, _CALL, _BUILD_OP,
 _CALL_MARK) = range(27)
_SIMULATED = {"TUPLE1": (_TUPLE_N, 1), "TUPLE2": (_TUPLE_N, 2), "TUPLE3": (_TUPLE_N, 3),
              "STACK_GLOBAL": (_CLASS, 2), "REDUCE": (_CALL, 2), "NEWOBJ": (_CALL, 2),
              "NEWOBJ_EX": (_CALL, 3)}
_SIMULATED.update((name, (_PUSH, 0)) for name in (
    "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "STRING", "BINSTRING",
    "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "BINBYTES",
    "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "EMPTY_TUPLE", "EMPTY_LIST"))
_SIMULATED.update((name, (action, 0)) for action, names in (
    (_PUSH_PRONE, ("INT", "LONG", "LONG4")), (_PUSH_LONG1, ("LONG1",)),
    (_PUSH if "BINFLOAT" not in _PRONE else _PUSH_PRONE, ("BINFLOAT", "FLOAT")),
    (_PUSH_COUNTER, ("EMPTY_DICT", "EMPTY_SET")), (_MARK_OP, ("MARK",)),
    (_TUPLE_MARK, ("TUPLE",)), (_LIST_MARK, ("LIST",)), (_APPEND, ("APPEND",)),
    (_APPENDS, ("APPENDS",)), (_DICT_MARK, ("DICT",)), (_SETITEM, ("SETITEM",)),
    (_SETITEMS, ("SETITEMS",)), (_ADDITEMS, ("ADDITEMS",)), (_FROZENSET, ("FROZENSET",)),
    (_POP, ("POP",)), (_POP_MARK, ("POP_MARK",)), (_DUP, ("DUP",)),
    (_PUT, ("PUT", "BINPUT", "LONG_BINPUT")), (_MEMOIZE_OP, ("MEMOIZE",)),
    (_GET, ("GET", "BINGET", "LONG_BINGET")), (_SKIP, ("PROTO", "FRAME")),
    (_STOP_SIM, ("STOP",)), (_CLASS, ("GLOBAL", "EXT1", "EXT2", "EXT4")),
    (_BUILD_OP, ("BUILD",)), (_CALL_MARK, ("INST", "OBJ"))) for name in names)
_SIMULATION = [_SIMULATED[_OPCODE_NAMES[op]] + (_VALUE_OPCODES[op][0],)
               if _OPCODE_NAMES.get(op) in _SIMULATED and _VALUE_OPCODES[op] is not None
               else None for op in range(256)]
MAX_TUPLE_DEPTH = 1000           # tuples in tuples: hashing one recurses in C, and 150,000
                                 # levels (a 150 KB payload) overflow its stack


def _tuple_of(items: list, budget: int) -> tuple:
    """The (size, depth) of a tuple or frozenset of ``items``: its size
    counts a shared item each time (what hashing or printing it costs)."""
    size = depth = 1
    for item in items:
        if type(item) is tuple:
            size += item[0]
            depth = max(depth, item[1] + 1)
        else:
            size += 1
    if depth > MAX_TUPLE_DEPTH or size > budget:
        raise _Refused("a tuple nested %d deep, or of %d items counting shared ones, is "
                       "refused: hashing or showing it could cost far more than its payload's "
                       "size allows" % (depth, size))
    return size, depth


def _check_value(payload) -> bool:
    """_check_payload for a value a Client decodes: True when it holds no
    prone opcode, so that no keys of it can collide."""
    return _skim(payload, _VALUE_OPCODES, 0, DECODE_COST_BASE) or \
        _check_pickle(payload, _VALUE_OPCODES, DECODE_COST_BASE)


def _keys_may_collide(body) -> bool:
    """False when decoding ``body`` in C gives no dict or set more than
    COLLIDABLE_KEYS keys whose hash a peer could choose; True when it might,
    or when ``body`` names a class. Raises ``_Refused`` for a tuple nested
    past MAX_TUPLE_DEPTH, or whose items, counted each time they are shared,
    outnumber what the payload's size allows (a 128-byte tuple of tuples that
    share their items took 2**30 steps to hash), or keys whose hashing adds up
    to that. ``body`` passed _check_payload."""
    budget = DECODE_COST_FACTOR * len(body) + DECODE_COST_BASE
    stack: list = []     # 0: no prone key; 1: a prone scalar or an object; (size, depth): a
    marks: list = []     # tuple or frozenset; [count]: a dict or set and its prone keys
    memo: dict = {}
    names_class = False
    hashing = 0                        # what hashing every key costs, as tuple sizes
    pos = 0
    try:
        while True:
            op = body[pos]
            action, arg, width = _SIMULATION[op]
            pos += 1
            argument = pos
            if width >= 0:
                pos += width
            elif width == _LEN1:
                pos += 1 + body[pos]
            elif width == _LEN4 or width == _LEN4S or width == _LEN8:
                count = 8 if width == _LEN8 else 4
                pos += count + int.from_bytes(body[pos:pos + count], "little")
            elif width == _MEMO4:
                pos += 4
            elif width == _PAIR:               # GLOBAL and INST: module, then name
                pos = body.index(b"\n", body.index(b"\n", pos) + 1) + 1
            elif width != _STOP:               # an argument that ends at a newline
                pos = body.index(b"\n", pos) + 1
            if action == _PUSH:
                stack.append(0)
            elif action == _MEMOIZE_OP:
                memo[len(memo)] = stack[-1]
            elif action == _SETITEMS or action == _ADDITEMS or action == _SETITEM or \
                    action == _FROZENSET or action == _DICT_MARK:
                if action == _SETITEM:
                    keys = stack[-2:-1]
                    del stack[-2:]
                else:
                    mark = marks.pop()
                    keys = stack[mark::2] if action == _SETITEMS or action == _DICT_MARK \
                        else stack[mark:]
                    if action == _FROZENSET:
                        stack.append(_tuple_of(stack[mark:], budget))
                    elif action == _DICT_MARK:
                        stack.append([0])
                    del stack[mark:len(stack) - (action == _FROZENSET or action == _DICT_MARK)]
                hashing += sum(key[0] if type(key) is tuple else 1 for key in keys)
                if hashing > budget:
                    raise _Refused("hashing the keys of this payload would cost far more "
                                   "than its %d bytes" % len(body))
                prone = len(keys) - keys.count(0)
                if prone and action != _FROZENSET:
                    counter = stack[-1]
                    counter[0] += prone
                    if counter[0] > COLLIDABLE_KEYS:
                        return True
                elif prone > COLLIDABLE_KEYS:
                    return True
            elif action == _MARK_OP:
                marks.append(len(stack))
            elif action == _APPENDS or action == _LIST_MARK:
                del stack[marks.pop():]
                if action == _LIST_MARK:
                    stack.append(0)
            elif action == _TUPLE_MARK:
                mark = marks.pop()
                entry = _tuple_of(stack[mark:], budget)
                del stack[mark:]
                stack.append(entry)
            elif action == _TUPLE_N:
                entry = _tuple_of(stack[-arg:], budget)
                del stack[-arg:]
                stack.append(entry)
            elif action == _APPEND:
                stack.pop()
            elif action == _PUSH_COUNTER:
                stack.append([0])
            elif action == _PUSH_PRONE:
                stack.append(1)
            elif action == _PUSH_LONG1:
                stack.append(1 if body[argument] > 7 else 0)     # 7 bytes: below 2**55
            elif action == _PUT:
                memo[int(body[argument:pos].strip() or b"0") if width == _MEMO_LINE
                     else int.from_bytes(body[argument:pos], "little")] = stack[-1]
            elif action == _GET:
                stack.append(memo[int(body[argument:pos].strip()) if width == _LINE
                                  else int.from_bytes(body[argument:pos], "little")])
            elif action == _POP:
                if stack and (not marks or marks[-1] < len(stack)):
                    stack.pop()
                else:
                    marks.pop()
            elif action == _POP_MARK:
                del stack[marks.pop():]
            elif action == _DUP:
                stack.append(stack[-1])
            elif action == _CLASS or action == _CALL or action == _CALL_MARK:
                names_class = True             # the pure-Python decoder checks what it builds
                if action == _CALL_MARK:
                    del stack[marks.pop():]
                elif arg:
                    del stack[-arg:]
                stack.append(1 if action != _CLASS else 0)
            elif action == _BUILD_OP:
                stack.pop()
            elif action == _STOP_SIM:
                return names_class
    except (TypeError, IndexError, KeyError, ValueError, AttributeError):
        return True        # a shape C would refuse: the pure-Python decoder says why


# (module, name) pairs a client rebuilds from a payload (PROTOCOL.md 3).
SAFE_CLASSES = frozenset([
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"),
    ("builtins", "bytearray"),
    ("datetime", "date"), ("datetime", "time"), ("datetime", "datetime"),
    ("datetime", "timedelta"), ("datetime", "timezone"),
    ("decimal", "Decimal"), ("fractions", "Fraction"),
    ("uuid", "UUID"), ("uuid", "SafeUUID"),
    ("collections", "OrderedDict"), ("collections", "deque"),
    # protocol 2+ rebuilds some of the above through these two helpers, which
    # only call the class they are given: that class passed find_class first.
    ("copyreg", "_reconstructor"), ("copyreg", "__newobj__"),
])


class _AllowListUnpickler(pickle._Unpickler):
    """Decodes a payload that names classes or may hold colliding keys; each
    Client makes a subclass with its own ``allowed`` set of (module, name).

    It admits values, not power. pickle's BUILD sets attributes on whatever is
    on the stack, a class included (57 bytes once broke ``Fraction(1, 2) + 1``
    for a whole process), and an allowed constructor can be made to compute
    or allocate far beyond the payload (``Fraction('1e10000000')``,
    ``bytearray(2**30)``). So BUILD only sets the state of an instance of an
    allowed class, and constructor arguments are checked first. And each dict
    and set counts its keys by hash as they come (hash collisions). This is
    the pure-Python unpickler, whose dispatch table can be extended; it runs
    only for the payloads C's decoder is not given."""

    allowed: frozenset = SAFE_CLASSES
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return super().find_class(module, name)
        if module == "__main__":
            raise pickle.UnpicklingError(
                "global '__main__.%s' is refused: a class defined in a script is __main__.%s "
                "on one side and missing on the other; move it into a module both sides "
                "import, and allow it with Client(allow_classes=['module.%s']) on the side "
                "that decodes it (the publisher for arguments, the caller for results)"
                % (name, name, name))
        raise pickle.UnpicklingError(
            "global '%s.%s' is not on the allow-list of the client that decodes it (the "
            "publisher for arguments, the caller for results): allow it there with "
            "Client(allow_classes=['%s.%s']); the class must live in a module that both "
            "sides import" % (module, name, module, name))

    def _check_instance(self, target) -> None:
        kind = type(target)
        if (kind.__module__, kind.__qualname__) not in self.allowed:
            raise pickle.UnpicklingError("BUILD may only set the state of an instance of an "
                                         "allowed class, not of %s" % (kind.__qualname__,))

    def _check_call(self, cls, args) -> None:
        if not isinstance(cls, type) and (getattr(cls, "__module__", None), getattr(
                cls, "__qualname__", None)) not in self.allowed:
            raise pickle.UnpicklingError("cannot call %s" % _show(cls))
        if not isinstance(args, tuple):
            raise pickle.UnpicklingError("arguments must be a tuple")
        if cls is copyreg.__newobj__ and args:          # calls args[0].__new__(*args)
            return self._check_call(args[0], args[1:])
        if cls is copyreg._reconstructor and len(args) == 3:   # calls base(state)
            return self._check_call(args[1], args[2:])
        if cls is bytearray and args and isinstance(args[0], int):
            raise pickle.UnpicklingError("bytearray(int) is refused: it allocates what it is told")
        if getattr(cls, "__module__", None) == "fractions":
            # only what Fraction pickles as: ints, or a str n or n/d. Built
            # from a Decimal, 60 bytes made it compute for seconds
            for arg in args:
                if not (type(arg) is str and _PLAIN_RATIONAL.match(arg) or
                        type(arg) is int and arg.bit_length() <= 65536):
                    raise pickle.UnpicklingError("Fraction(%s) is refused: only n or n/d "
                                                 "of bounded size" % _show(arg, 40))
        if (cls is set or cls is frozenset) and args:
            self._count_keys(None, args[0])
        elif isinstance(cls, type) and issubclass(cls, dict) and args and \
                isinstance(args[0], (list, tuple)):      # OrderedDict([(key, value), ...])
            self._count_keys(None, [pair[0] for pair in args[0]
                                    if isinstance(pair, (list, tuple)) and pair])

    def load_build(self):
        self._check_instance(self.stack[-2])
        pickle._Unpickler.load_build(self)
    dispatch[pickle.BUILD[0]] = load_build

    def _count_keys(self, target: Any, keys) -> dict:
        """Count ``keys``, about to go into ``target`` (None: a new one), by
        hash; refuse more than COLLIDABLE_KEYS alike in one dict or set.
        Returns the counts, for a new target to keep (_keep_counts)."""
        if target is None:
            counts: dict = {}
        else:
            hashes = self.__dict__.setdefault("_hashes", {})
            kept = hashes.get(id(target))
            if kept is None:               # (the target is kept too: its id stays its own)
                kept = hashes[id(target)] = (target, {})
            counts = kept[1]
        for key in keys:
            key_hash = hash(key)
            alike = counts.get(key_hash, 0) + 1
            if alike > COLLIDABLE_KEYS:
                raise pickle.UnpicklingError(
                    "more than %d keys of one dict or set share a hash: a crafted collision, "
                    "whose decoding would take time quadratic in its size" % COLLIDABLE_KEYS)
            counts[key_hash] = alike
        return counts

    # with a mark, self.stack holds the items, and the target is below the mark

    def load_setitem(self):
        self._count_keys(self.stack[-3], self.stack[-2:-1])
        pickle._Unpickler.load_setitem(self)
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        self._count_keys(self.metastack[-1][-1], self.stack[::2])
        pickle._Unpickler.load_setitems(self)
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_additems(self):
        self._count_keys(self.metastack[-1][-1], self.stack)
        pickle._Unpickler.load_additems(self)
    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_frozenset(self):
        self._count_keys(None, self.stack)
        pickle._Unpickler.load_frozenset(self)
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def load_dict(self):
        counts = self._count_keys(None, self.stack[::2])
        pickle._Unpickler.load_dict(self)
        # SETITEMS may add to it: they count on from these
        self.__dict__.setdefault("_hashes", {})[id(self.stack[-1])] = (self.stack[-1], counts)
    dispatch[pickle.DICT[0]] = load_dict

    def load_reduce(self):
        self._check_call(self.stack[-2], self.stack[-1])
        pickle._Unpickler.load_reduce(self)
    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self):
        self._check_call(self.stack[-2], self.stack[-1])
        pickle._Unpickler.load_newobj(self)
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        self._check_call(self.stack[-3], self.stack[-2])
        pickle._Unpickler.load_newobj_ex(self)
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass, args):
        self._check_call(klass, tuple(args))
        return pickle._Unpickler._instantiate(self, klass, args)


_PLAIN_RATIONAL = re.compile(r"\s*[-+]?\d{1,4300}(/\d{1,4300})?\s*\Z")


def _class_pairs(names: Iterable[str]) -> frozenset:
    pairs = set()
    for full in names:
        module, _, name = full.rpartition(".")
        if not module or not name:
            raise ValueError("allow_classes wants 'module.Name', got %r" % (full,))
        pairs.add((module, name))
    return frozenset(pairs)


class _PayloadLoader:
    """How a Client unpickles what peers send it (PROTOCOL.md 3): pickle's C
    decoder where the checks above let it (what it builds are plain values),
    else the allow-list's unpickler; with ``unsafe``, anything (for a network
    where every peer is trusted)."""

    __slots__ = ("unpickler", "unsafe")

    def __init__(self, allow_classes: Iterable[str], unsafe: bool):
        self.unpickler = type("_ClientUnpickler", (_AllowListUnpickler,),
                              {"allowed": SAFE_CLASSES | _class_pairs(allow_classes)})
        self.unsafe = unsafe

    def loads(self, data: bytes) -> Any:
        if self.unsafe:
            return pickle.loads(data)
        # what decoding it may cost, and whether C may build it
        if _check_value(data) or not _keys_may_collide(data):
            try:
                return _loads_plain(data)
            except _GlobalRefused:          # it names a class: only the allow-list builds it
                pass
        return self.unpickler(io.BytesIO(data)).load()


# Large payloads. pickle.dumps copies a message's payload into a fresh output
# buffer and pickle.loads copies it out again, and every fresh megabyte costs
# about 256 page faults (0.7 ms here): most of what a 1 MiB call cost. So a
# message whose payload is LARGE_PAYLOAD or more goes out as the pickle of its
# other fields followed by the payload where it lies, and comes in by walking
# the opcodes of its outer dict, leaving the payload in the frame as a
# memoryview. The walker knows only the opcodes of a flat dict of str, bytes,
# int, bool and None (what _encode and pickle.dumps write for a message); for anything
# else it gives up and the frame is decoded whole, so it decides no outcome
# that pickle.loads would decide differently.

LARGE_PAYLOAD = SEND_COALESCE    # below this, pickle in C beats walking opcodes in Python
_PAYLOAD_TYPES = (bytes, memoryview)   # a payload as it comes in: memoryview when large
_PAYLOAD_OPCODES = b"\x8c\x07payload\x8e"    # SHORT_BINUNICODE 'payload', BINBYTES8
_FRAME, _MEMOIZE = 0x95, 0x94


def _encode(message: dict):
    """A message's body: bytes, or for a large payload the pieces
    ``[fields, payload, tail]`` that write_frame sends without joining."""
    payload = message.get("payload")
    if payload is None or len(payload) < LARGE_PAYLOAD:
        return _dumps(message)
    head = _dumps({key: value for key, value in message.items() if key != "payload"})
    if head[2] == _FRAME:
        head = head[:2] + head[11:]     # a frame must hold whole opcodes: go unframed
    # the fields' dict stays on the stack where STOP was; SETITEM adds the payload to it
    return [head[:-1] + _PAYLOAD_OPCODES + len(payload).to_bytes(8, "little"), payload, b"s."]


_MARK = object()
_TEXT_WIDTHS = {0x8c: 1, 0x58: 4, 0x8d: 8}       # SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
_BYTES_WIDTHS = {0x43: 1, 0x42: 4, 0x8e: 8}      # SHORT_BINBYTES, BINBYTES, BINBYTES8
_CONSTANTS = {0x88: True, 0x89: False, 0x4e: None}   # NEWTRUE, NEWFALSE, NONE


def _decode_large(body) -> Any:
    """The message in a large frame with its large bytes values left in
    ``body`` as memoryviews; None when the walker does not know the body."""
    view = memoryview(body)
    stack: list = []
    marks: list = []            # where each MARK stands in the stack, so SETITEMS is O(items)
    memo: list = []
    pos = 0
    frame_end = None            # where the current FRAME ends: no opcode may cross it
    try:
        for _ in range(_MESSAGE_PUSHES):    # (an opcode is one step, as _check_message counts)
            if frame_end is not None and pos >= frame_end:
                if pos > frame_end:
                    return None     # (CPython's C decoder lets it pass, Python's refuses)
                frame_end = None
            op = body[pos]
            pos += 1
            if op in _TEXT_WIDTHS or op in _BYTES_WIDTHS:
                width = _TEXT_WIDTHS.get(op) or _BYTES_WIDTHS[op]
                size = int.from_bytes(body[pos:pos + width], "little")
                pos += width
                if pos + size > len(body):
                    return None
                if op in _TEXT_WIDTHS:
                    stack.append(str(view[pos:pos + size], "utf-8", "surrogatepass"))
                elif size >= LARGE_PAYLOAD:
                    stack.append(view[pos:pos + size])
                else:
                    stack.append(view[pos:pos + size].tobytes())
                pos += size
            elif op == _MEMOIZE:
                if stack[-1] is _MARK:  # pickle memoizes the object under a mark
                    return None
                memo.append(stack[-1])
            elif op == _FRAME:          # pickle.loads wants the frame's bytes to be there
                if frame_end is not None:
                    return None     # a frame within a frame: Python's decoder refuses it
                frame_end = pos + 8 + int.from_bytes(body[pos:pos + 8], "little")
                if frame_end > len(body):
                    return None
                pos += 8
            elif op == 0x80:            # PROTO
                if body[pos] > pickle.HIGHEST_PROTOCOL:
                    return None
                pos += 1
            elif op == 0x7d:            # EMPTY_DICT: the message itself, nothing nested
                if stack:
                    return None
                stack.append({})
            elif op == 0x28:            # MARK
                marks.append(len(stack))
                stack.append(_MARK)
            elif op == 0x4b:            # BININT1
                stack.append(body[pos])
                pos += 1
            elif op == 0x4d:            # BININT2
                stack.append(int.from_bytes(body[pos:pos + 2], "little"))
                pos += 2
            elif op == 0x4a:            # BININT
                stack.append(int.from_bytes(body[pos:pos + 4], "little", signed=True))
                pos += 4
            elif op == 0x8a:            # LONG1
                size = body[pos]
                stack.append(int.from_bytes(body[pos + 1:pos + 1 + size], "little", signed=True))
                pos += 1 + size
            elif op in _CONSTANTS:
                stack.append(_CONSTANTS[op])
            elif op == 0x68 or op == 0x6a:    # BINGET, LONG_BINGET
                width = 1 if op == 0x68 else 4
                value = memo[int.from_bytes(body[pos:pos + width], "little")]
                if type(value) is memoryview:   # a large value twice: the plain decoder
                    return None                 # shares it where this would copy it
                stack.append(value)
                pos += width
            elif op == 0x73:            # SETITEM
                value = stack.pop()
                key = stack.pop()
                _set_items(stack[-1], [key, value])
            elif op == 0x75:            # SETITEMS
                mark = marks.pop()
                items = stack[mark + 1:]
                del stack[mark:]
                _set_items(stack[-1], items)
            elif op == 0x2e:            # STOP
                break
            else:
                return None
        else:
            return None         # no flat dict of MAX_FIELDS: stop here, not at the end
    except (IndexError, KeyError, TypeError, ValueError):   # ValueError covers bad UTF-8
        return None
    if frame_end is not None and pos > frame_end or \
            pos != len(body) or len(stack) != 1 or type(stack[0]) is not dict:
        return None
    message = stack[0]
    for key, value in message.items():
        if type(value) is memoryview and key != "payload":
            message[key] = value.tobytes()      # extra keys pass through as they came
    return message


def _set_items(target, items: list) -> None:
    if type(target) is not dict or len(items) % 2 or _MARK in items or \
            len(target) + len(items) // 2 > MAX_FIELDS:
        raise TypeError("not a small flat dict")
    for index in range(0, len(items), 2):
        target[items[index]] = items[index + 1]


def _decode_message(body) -> Any:
    """A message as the plain decoder gives it; large ones by the walker when it
    can. Raises ``ProtocolError`` for a body that is not a small flat dict."""
    message = _decode_large(body) if len(body) >= LARGE_PAYLOAD else None
    if message is None:
        _check_message(body)
        message = _loads_plain(body)
    if type(message) is dict and len(message) > MAX_FIELDS:
        # the walk bounds what decoding costs, with some slack; this is the rule
        raise _Refused("a message has at most %d fields" % MAX_FIELDS)
    return message


# Compact envelopes (PROTOCOL.md 7.8). A call and its answer are most of the
# traffic, and the server only routes them: in a compact envelope their few
# fields are a fixed binary header, read with one struct call, and the
# payload follows as it lies, so the server neither checks nor unpickles an
# envelope nor pickles one again. Used only between peers that both offered
# it in info; the wheel holds which encoder its peer takes (Wheel.encode).

COMPACT_VERSION = 1               # what info offers ("compact": 1) and this module speaks
_COMPACT = 0xFF                   # a compact body's first byte: no pickle starts with it
_COMPACT_HEAD = struct.Struct("<BBBHqI")   # magic, kind, flags, name bytes, id, timeout_ms
_HEAD_SIZE = _COMPACT_HEAD.size   # 17 bytes, then the name, then the payload
_COMPACT_DELIVER, _COMPACT_RESULT = 1, 2
_SUCCESS, _HAS_PAYLOAD, _HAS_TIMEOUT = 1, 2, 4       # the flag bits
_MAX_NAME_BYTES = 4 * MAX_NAME    # a name of MAX_NAME characters, in UTF-8


def _offers_compact(value: Any) -> bool:
    """Whether an info's ``compact`` offers this module's version: the int 1
    (not True, nor 1.0, which a peer may mean otherwise)."""
    return type(value) is int and value == COMPACT_VERSION


def _encode_compact(message: dict):
    """A deliver or result in a compact envelope (bytes, or for a large
    payload [head, payload], never joined); any other message, or one with
    fields the envelope has no place for, as _encode writes it."""
    kind = message["type"]
    payload = message.get("payload")
    msg_id = message.get("id")
    fields = len(message) if payload is None else len(message) - 1
    if payload is not None and type(payload) is not bytes and type(payload) is not memoryview \
            or type(msg_id) is not int or not -ID_RANGE <= msg_id < ID_RANGE:
        return _encode(message)
    if kind == "result":
        success = message.get("success")
        if fields != 3 or type(success) is not bool:
            return _encode(message)
        head = _COMPACT_HEAD.pack(_COMPACT, _COMPACT_RESULT, success | (payload is not None) << 1,
                                  0, msg_id, 0)
    elif kind == "deliver":
        name = message.get("to")
        timeout = message.get("timeout_ms")
        if fields != (3 if timeout is None else 4) or type(name) is not str or \
                timeout is not None and not (type(timeout) is int and 0 < timeout < 1 << 32):
            return _encode(message)
        try:
            name = name.encode()
        except UnicodeEncodeError:     # (a lone surrogate: pickled, as the peer sent it)
            return _encode(message)
        if not 0 < len(name) <= _MAX_NAME_BYTES:    # ("": pickled, to be refused by name)
            return _encode(message)
        head = _COMPACT_HEAD.pack(_COMPACT, _COMPACT_DELIVER, (payload is not None) << 1 |
                                  (timeout is not None) << 2, len(name), msg_id,
                                  timeout or 0) + name
    else:
        return _encode(message)
    if payload is None:
        return head
    return head + payload if len(payload) < LARGE_PAYLOAD else [head, payload]


def _payload_at(body, start: int):
    """A compact body's payload, from ``start``: a large one stays in the
    frame's buffer, uncopied; a small one is bytes, as _decode_large makes
    it (the body of a frame read in place is a bytearray)."""
    if len(body) - start >= LARGE_PAYLOAD:
        return memoryview(body)[start:]
    return body[start:] if type(body) is bytes else bytes(memoryview(body)[start:])


def _decode_envelope(body) -> Any:
    """A message from a peer that may send compact envelopes: compact or
    pickled. Raises ``ProtocolError`` for a header out of its bounds."""
    if body[:1] != b"\xff":
        return _decode_message(body)
    size = len(body)
    if size < _HEAD_SIZE:
        raise _Refused("a compact envelope has a header of %d bytes, not %d" % (_HEAD_SIZE, size))
    _, kind, flags, name_size, msg_id, timeout = _COMPACT_HEAD.unpack_from(body)
    start = _HEAD_SIZE + name_size
    if kind == _COMPACT_DELIVER:
        if flags & ~(_HAS_PAYLOAD | _HAS_TIMEOUT) or not 0 < name_size <= _MAX_NAME_BYTES or \
                start > size or timeout and not flags & _HAS_TIMEOUT:
            raise _Refused("a compact deliver with flags 0x%02x, a name of %d bytes (1 to %d, "
                           "within its %d bytes) and timeout_ms %d (0 without flag 0x04)"
                           % (flags, name_size, _MAX_NAME_BYTES, size, timeout))
        try:
            name = str(body[_HEAD_SIZE:start], "utf-8")
        except UnicodeDecodeError:
            raise _Refused("a compact deliver's name is not UTF-8") from None
        message = {"type": "deliver", "id": msg_id, "to": name}
        if flags & _HAS_TIMEOUT:
            message["timeout_ms"] = timeout
    elif kind == _COMPACT_RESULT:
        if flags > (_SUCCESS | _HAS_PAYLOAD) or name_size or timeout:
            raise _Refused("a compact result with flags 0x%02x, a name of %d bytes and "
                           "timeout_ms %d (it has no name or timeout)"
                           % (flags, name_size, timeout))
        message = {"type": "result", "id": msg_id, "success": flags & _SUCCESS == _SUCCESS}
    else:
        raise _Refused("a compact envelope of kind %d: 1 (deliver) and 2 (result) are known"
                       % kind)
    if flags & _HAS_PAYLOAD:
        message["payload"] = _payload_at(body, start)
    elif size > start:
        raise _Refused("a compact %s without flag 0x02 has %d bytes of payload"
                       % (message["type"], size - start))
    return message


# ---------------------------------------------------------------------------
# filter
# ---------------------------------------------------------------------------

class ReferenceFilter:
    """Frames as POE::Filter::Reference writes them: ``<length>\\0<body>``.

    ``get_one_start(data)`` buffers bytes; ``get_one()`` returns a list with
    the next decoded message, or an empty list; ``put(obj)`` returns the frame
    of one message. ``get_frames()`` is the raw form that the wheels use: every
    whole body buffered, as bytes. A bad header or a frame over ``max_frame``
    (judged on the header alone, before the body is buffered) raises
    ``ProtocolError``; when whole frames precede it, they are returned first
    and ``broken`` holds the error.

    A large frame is not reassembled by appending to the buffer: that grows
    it piece by piece, then copies the body out, and every megabyte of fresh
    memory costs hundreds of page faults (measured: about 12 MiB of fresh pages
    per 1 MiB call across the three parties, most of its time). Once a quarter
    of a frame of DIRECT_READ bytes or more is in, the filter gives it a
    buffer of its full size, and ``body_space()`` offers the rest for the
    socket to read straight into; that body is returned as a bytearray. The
    quarter bounds what a peer can make us commit to four times what it sent.
    """

    __slots__ = ("max_frame", "handshake_frames", "broken", "missing", "_buffer", "_parsed",
                 "_loads", "_body", "_body_filled")

    def __init__(self, max_frame: int = MAX_FRAME, loads: Callable = _loads_plain):
        self.max_frame = max_frame
        self.handshake_frames = 0          # the next this many frames may hold MAX_HANDSHAKE_FRAME
        self.broken: Optional[ProtocolError] = None
        self.missing = 0                   # bytes still to come for a frame begun
        self._buffer = bytearray()
        self._parsed: list = []            # get_one's bodies not yet returned
        self._loads = loads
        self._body: Optional[bytearray] = None   # a large frame's own buffer, being filled
        self._body_filled = 0

    def put(self, obj: Any) -> bytes:
        return _frame(_dumps(obj))

    def get_one_start(self, data) -> None:
        """Buffer ``data`` (any bytes-like object; it is copied)."""
        if self._body is not None:
            data = memoryview(data)
            taken = min(len(data), len(self._body) - self._body_filled)
            self._body[self._body_filled:self._body_filled + taken] = data[:taken]
            self.body_received(taken)
            data = data[taken:]
        self._buffer += data

    def body_space(self) -> Optional[memoryview]:
        """Where the rest of a large frame begun should be read to, if one is."""
        if self._body is None or self._body_filled == len(self._body):
            return None
        return memoryview(self._body)[self._body_filled:]

    def body_received(self, count: int) -> None:
        """``count`` bytes were written into ``body_space()``."""
        self._body_filled += count
        self.missing -= count

    def get_one(self) -> List[Any]:
        if not self._parsed:
            self._parsed = self.get_frames()
            if not self._parsed:
                if self.broken is not None:
                    raise self.broken
                return []
        return [self._loads(self._parsed.pop(0))]

    def buffered(self) -> int:
        """Bytes received and not yet returned as a frame."""
        begun = self._body_filled if self._body is not None else 0
        return len(self._buffer) + begun + sum(len(body) for body in self._parsed)

    def get_frames(self) -> List[bytes]:
        """Every whole frame's body, parsed in place: one pass over the buffer,
        one copy per body, one compaction at the end."""
        if self.broken is not None:
            raise self.broken
        bodies = []
        if self._body is not None:
            if self._body_filled < len(self._body):
                return bodies
            bodies.append(self._body)
            self._body = None
        buffer = self._buffer
        size = len(buffer)
        pos = 0
        self.missing = 0
        handshake_frames = self.handshake_frames
        limit = MAX_HANDSHAKE_FRAME if handshake_frames else self.max_frame
        with memoryview(buffer) as view:
            while pos < size:
                nul = buffer.find(b"\0", pos, pos + MAX_HEADER)
                if nul < 0:
                    if not buffer[pos:pos + MAX_HEADER].isdigit():
                        self._fail("frame header holds a non-digit: %r"
                                   % bytes(buffer[pos:pos + MAX_HEADER]), bodies)
                    elif size - pos >= MAX_HEADER:
                        self._fail("no NUL within the first %d header bytes" % MAX_HEADER,
                                   bodies)
                    break
                header = buffer[pos:nul]
                if not header.isdigit():
                    self._fail("frame header holds a non-digit: %r" % bytes(header)
                               if header else "frame header is empty", bodies)
                    break
                length = int(header)
                if length > limit:
                    self._fail("handshake frame of %d bytes exceeds %d" % (length, limit)
                               if handshake_frames else "frame of %d bytes exceeds max_frame (%d)"
                               % (length, limit), bodies)
                    break
                end = nul + 1 + length
                if end > size:
                    self.missing = end - size
                    arrived = size - nul - 1
                    if length >= DIRECT_READ and arrived * 4 >= length:
                        self._body = bytearray(length)
                        self._body[:arrived] = view[nul + 1:size]
                        self._body_filled = arrived
                        pos = size
                    break
                bodies.append(view[nul + 1:end].tobytes())
                pos = end
                if handshake_frames:
                    handshake_frames -= 1
                    if not handshake_frames:
                        limit = self.max_frame
        self.handshake_frames = handshake_frames
        if pos:
            del buffer[:pos]
        return bodies

    def clear(self) -> None:
        """Let go of everything buffered (the connection is gone), and of the
        error that broke it: its traceback holds the frames of its wheel."""
        self._buffer = bytearray()
        self._parsed = []
        self._body = None
        self._body_filled = self.missing = 0
        self.broken = None

    def _fail(self, reason: str, bodies: list) -> None:
        self.broken = ProtocolError(reason)
        if not bodies:
            raise self.broken


def _frame(body: bytes) -> bytes:
    return b"%d\0%s" % (len(body), body)


# ---------------------------------------------------------------------------
# reactor
# ---------------------------------------------------------------------------

class _Timer:
    """A pending ``call_later``; ``cancel()`` flags it, the heap skips it."""

    __slots__ = ("when", "callback", "args", "cancelled")

    def __init__(self, when, callback, args):
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        """Flag it, and let go of what it would call: a cancelled timer stays in
        the heap until its time, and must not keep a closed wheel alive that long."""
        self.cancelled = True
        self.callback = self.args = None


class Reactor:
    """The event loop, after POE::Kernel: sockets, timers and a ready queue.

    For the caller: ``run()``, ``run_once(timeout)``, ``run_until(done,
    timeout)``, ``stop()``, ``call_later(delay, fn, *args)``,
    ``call_soon(fn, *args)``, ``call_soon_threadsafe(fn, *args)``.
    For wheels: ``register/modify/unregister(sock, events, handler)`` where
    ``handler(mask)`` is called when the socket is ready, and ``schedule_flush``.

    Writes are coalesced: a wheel asks for a flush and the reactor runs every
    asked-for flush once, at the end of the pass, so whatever one pass of the
    loop produced for a socket leaves in one ``send`` (in sends of EARLY_SEND
    bytes, once a pass has written that much to it). A write made while no
    pass runs is flushed at once.

    Threads: one thread at a time runs passes, the *driver*: the one in
    ``run()`` (``run_in_thread()`` starts one), or else whichever thread is
    waiting in ``run_until`` and found the loop free. Everything the reactor
    and its wheels hold is touched only by the driver. Another thread hands
    work over with ``call_in_loop(fn, *args)`` (and waits for its value) or
    ``call_soon_threadsafe``, and waits in ``run_until``, taking over the loop
    if the driver lets it go first.
    """

    def __init__(self):
        self._selector = selectors.DefaultSelector()
        self._timers: list = []
        self._compact_at = TIMER_COMPACT_FLOOR     # heap size that makes it drop cancelled ones
        self._sequence = itertools.count()   # ties in the heap never compare timers
        self._ready: collections.deque = collections.deque()
        self._flushes: list = []
        self._stopping = False
        self.in_pass = 0               # how many run_once calls are handling events now
        # when the pass under way woke (time.monotonic()): when what it reads
        # arrived, as far as its handlers can tell (a call's deadline counts
        # from then, not from when its turn came behind others of the batch)
        self.woke = time.monotonic()
        self._scratch = memoryview(bytearray(READ_CHUNK))
        self._wakeup_recv, self._wakeup_send = socket.socketpair()
        self._wakeup_recv.setblocking(False)
        self._wakeup_send.setblocking(False)
        self.register(self._wakeup_recv, selectors.EVENT_READ, self._drain_wakeup)
        # {"driver": thread ident} while a thread runs passes. Taken with one
        # setdefault and let go with one pop: no signal (a KeyboardInterrupt)
        # can land between taking the loop and recording who has it, and a
        # try/finally that asks "is it mine now?" cannot leak it.
        self._owner: Dict[str, int] = {}
        self._runner: Optional[int] = None   # the thread in run(), which keeps the role
        # Threads waiting for something the driver will do; it wakes them at the
        # end of each pass and when it lets the loop go. An RLock, since stop()
        # may notify from a signal handler that interrupted a waiter.
        self._changed = threading.Condition(threading.RLock())
        self._waiters = 0

    def __repr__(self):
        return "<Reactor sockets=%d timers=%d>" % (len(self._selector.get_map()),
                                                   len(self._timers))

    # sockets

    def register(self, sock, events: int, handler: Callable[[int], None]) -> None:
        self._selector.register(sock, events, handler)

    def modify(self, sock, events: int, handler: Callable[[int], None]) -> None:
        self._selector.modify(sock, events, handler)

    def unregister(self, sock) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def schedule_flush(self, flush: Callable[[], None]) -> None:
        """Run ``flush`` at the end of the current pass, or now when no pass is
        running: then nobody may run the loop soon, and it must leave at once."""
        if self.in_pass:
            self._flushes.append(flush)
        else:
            flush()

    def read_buffer(self) -> memoryview:
        """READ_CHUNK bytes of scratch space for one ``recv_into``. A fresh
        buffer per recv costs far more than the copy out of this one (measured:
        about 5x for 200 KB reads); one is enough, since a wheel copies what it
        read into its filter before any handler can run a nested loop. (The
        rest of a large frame skips it: the filter gives it a buffer of its own.)"""
        return self._scratch

    # callbacks and timers

    def call_soon(self, callback: Callable, *args) -> None:
        self._ready.append((callback, args))

    def call_soon_threadsafe(self, callback: Callable, *args) -> None:
        """``call_soon`` from another thread: wakes the loop up."""
        self._ready.append((callback, args))
        try:
            self._wakeup_send.send(b"\0")
        except OSError:        # the pipe is full: the loop is awake anyway
            pass

    def call_later(self, delay: float, callback: Callable, *args) -> _Timer:
        timer = _Timer(time.monotonic() + delay, callback, args)
        timers = self._timers
        heapq.heappush(timers, (timer.when, next(self._sequence), timer))
        if len(timers) > self._compact_at:
            self._compact_timers()
        return timer

    def _compact_timers(self) -> None:
        """A cancelled timer stays in the heap until its time (an hour, for a
        subscribe's wait): each time the heap has doubled since the last look,
        drop the cancelled ones, in place (a pass may be popping from it). The
        heap stays within twice the live timers, at O(1) amortised per timer."""
        timers = self._timers
        timers[:] = [entry for entry in timers if not entry[2].cancelled]
        heapq.heapify(timers)
        self._compact_at = max(TIMER_COMPACT_FLOOR, 2 * len(timers))

    def _drain_wakeup(self, mask):
        try:
            while self._wakeup_recv.recv(4096):
                pass
        except OSError:
            pass

    # running

    def run_once(self, timeout: Optional[float] = None) -> None:
        """Wait up to ``timeout`` (None: until something happens), handle
        whatever is ready, and flush what the handlers wrote. Raises
        ``RuntimeError`` while another thread runs this reactor."""
        me = threading.get_ident()
        mine = self._owner.get("driver") == me
        try:
            if not mine and not self._claim(me):
                raise RuntimeError(self._busy_message())
            self._pass(timeout)
        finally:
            if not mine:
                self._let_go(me)

    def _pass(self, timeout: Optional[float]) -> None:
        if self._flushes:
            # a nested loop (a handler making a blocking call) must first send
            # what the outer pass wrote, its own request among it
            self._flush_all()
        if self._ready:
            timeout = 0
        elif self._timers:
            delay = max(0.0, self._timers[0][0] - time.monotonic())
            timeout = delay if timeout is None else min(timeout, delay)
        events = self._selector.select(timeout)
        outer_woke, self.woke = self.woke, time.monotonic()
        self.in_pass += 1
        try:
            for key, mask in events:
                try:
                    key.data(mask)
                except Exception:
                    self._handler_failed(key.data)
            timers = self._timers
            if timers:
                now = time.monotonic()
                while timers and timers[0][0] <= now:
                    timer = heapq.heappop(timers)[2]
                    if not timer.cancelled:
                        callback, args = timer.callback, timer.args
                        timer.cancel()         # (which lets go of them)
                        self._call(callback, args)
            ready = self._ready
            if ready:
                for _ in range(len(ready)):    # only what was queued before this pass
                    self._call(*ready.popleft())
        finally:
            self.in_pass -= 1
            if self.in_pass:           # a nested pass: the outer one's frames came then
                self.woke = outer_woke
        if self._flushes:
            self._flush_all()
        if self._waiters:
            self._wake_waiters()

    def _call(self, callback: Callable, args) -> None:
        """Run a timer's or a queued callback (a socket's handler is called
        inline in _pass, the hot path); a failure is _handler_failed's."""
        try:
            callback(*args)
        except Exception:
            self._handler_failed(callback)

    def _handler_failed(self, handler) -> None:
        """The loop survives its handlers: a bug in one is logged, with the
        object it belongs to, and every other connection is served on."""
        log.exception("error in %r of %r; the loop goes on", getattr(handler, "__name__", handler),
                      getattr(handler, "__self__", None))

    def _flush_all(self) -> None:
        """One send per socket for everything a pass wrote to it; a flush may
        close a wheel whose owner then writes elsewhere, so loop until quiet."""
        flushes = self._flushes
        while flushes:
            self._flushes = []
            for index, flush in enumerate(flushes):
                try:
                    flush()
                except Exception:
                    self._handler_failed(flush)
                except BaseException:      # a KeyboardInterrupt: what is left stays due
                    self._flushes = flushes[index:] + self._flushes
                    raise
            flushes = self._flushes

    def run_until(self, done: Callable[[], bool], timeout: Optional[float] = None) -> bool:
        """Run until ``done()`` is true (returns True) or ``timeout`` seconds
        pass (returns False). From a thread other than the driver's, wait
        for the driver to make it true, or drive the loop once it is free."""
        deadline = None if timeout is None else time.monotonic() + timeout
        me = threading.get_ident()
        mine = self._owner.get("driver") == me
        try:
            if not mine and not self._claim(me):
                return self._wait_until(done, deadline)
            return self._drive(done, deadline)
        finally:
            if not mine:
                self._let_go(me)

    def drive(self, fn: Callable, args: tuple, done: Optional[Callable[[], bool]]) -> bool:
        """Run ``fn(*args)`` and then, if ``done`` is given, the loop until
        ``done()``, holding the loop throughout, when this thread runs it or
        may take it: True. False, having run nothing, while another thread
        runs it. (A request's send and its wait, taking the loop once.)"""
        me = threading.get_ident()
        mine = self._owner.get("driver") == me
        try:
            if not mine and not self._claim(me):
                return False
            fn(*args)
            if done is not None:
                self._drive(done, None)
            return True
        finally:
            if not mine:
                self._let_go(me)

    def _drive(self, done: Callable[[], bool], deadline: Optional[float]) -> bool:
        while not done():
            if deadline is None:
                self._pass(None)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._pass(remaining)
        return True

    def run(self) -> None:
        """Run until ``stop()``; a stop asked for before (a signal during
        start-up) makes it return at once rather than being lost. Raises
        ``RuntimeError`` if another thread is in ``run()``."""
        self._claim_runner()
        self._run_claimed()

    def _run_claimed(self) -> None:
        try:
            self.run_until(lambda: self._stopping)
        finally:
            self._stopping = False
            self._runner = None

    def stop(self) -> None:
        """Make ``run()`` return after the current pass (safe from signal handlers and threads)."""
        self._stopping = True
        try:
            self._wakeup_send.send(b"\0")
        except OSError:
            pass
        if self._waiters:          # run() may be waiting for the loop
            self._wake_waiters()

    # threads: who runs the loop (see the class docstring)

    def run_in_thread(self, name: str = "proxysession-reactor") -> threading.Thread:
        """Start a daemon thread that runs this reactor until ``stop()``, and
        return it (started; a second runner is refused from now on)."""
        self._claim_runner()           # raises here, in the caller, if one runs already

        def run_here():
            self._runner = threading.get_ident()
            self._run_claimed()

        thread = threading.Thread(target=run_here, name=name, daemon=True)
        thread.start()
        return thread

    def call_in_loop(self, fn: Callable, *args, timeout: Optional[float] = None) -> Any:
        """Run ``fn(*args)`` on the thread that runs this reactor and return
        its value or raise its exception: at once if this thread runs it or
        nobody does, else handed to the driver and waited for, for at most
        ``timeout`` seconds (then ``TimeoutError``, and it will not run)."""
        me = threading.get_ident()
        mine = self._owner.get("driver") == me
        if mine:
            return fn(*args)
        try:
            if self._claim(me):
                return fn(*args)
        finally:
            self._let_go(me)
        outcome: list = []

        def run_and_keep():
            if outcome:                # given up on: too late
                return
            try:
                outcome.append((True, fn(*args)))
            except BaseException as exc:
                outcome.append((False, exc))

        self.call_soon_threadsafe(run_and_keep)
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._wait_until(outcome.__len__, deadline):
            outcome.append((False, TimeoutError("the reactor's thread did not run it within "
                                                "%.3g s" % timeout)))
        ok, value = outcome[0]
        if ok:
            return value
        raise value

    def hand_over(self, fn: Callable, *args) -> None:
        """Have ``fn(*args)`` run on the loop's thread soon, without waiting;
        here and now if the loop is free (its driver may have let go
        meanwhile: _let_go looks at the queue after letting go, this after
        queueing, so one of the two runs it)."""
        self.call_soon_threadsafe(fn, *args)
        if "driver" not in self._owner:
            me = threading.get_ident()
            try:
                self._claim(me)
            finally:
                self._let_go(me)

    def depth(self) -> int:
        """How many passes this thread is inside (nested calls); 0 off the loop."""
        return self.in_pass if self._owner.get("driver") == threading.get_ident() else 0

    # Taking the loop: ``mine = owner is me`` first, then ``_claim(me)`` inside a
    # try whose finally calls ``_let_go(me)`` unless it was mine before; wherever
    # an exception lands, the loop is let go exactly when this level took it.

    def _claim(self, me: int) -> bool:
        """Become the driver if nobody is; True if this thread is it now."""
        return self._owner.setdefault("driver", me) == me

    def _let_go(self, me: int) -> None:
        """Stop being the driver, if this thread is it. Work handed over as it
        lets go would wait for the next driver, and there may be none: it
        runs that first, and wakes the threads waiting for the loop."""
        try:
            while self._owner.get("driver") == me:
                try:
                    if self._ready:
                        self._pass(0)
                finally:
                    self._owner.pop("driver", None)
                    if self._waiters:
                        self._wake_waiters()
                if not self._ready or not self._claim(me):
                    return
        except BaseException:          # even one landing just after the claim above
            if self._owner.get("driver") == me:
                self._owner.pop("driver", None)
            raise

    def _wake_waiters(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _claim_runner(self) -> None:
        with self._changed:
            if self._runner is not None:
                raise RuntimeError("this reactor is already running in thread %s; one reactor "
                                   "runs in one thread at a time" % _thread_name(self._runner))
            self._runner = threading.get_ident()

    def _busy_message(self) -> str:
        return ("this reactor is being run by thread %s: from other threads use call_in_loop(), "
                "call_soon_threadsafe() or run_until()" % _thread_name(self._owner.get("driver")))

    def _wait_until(self, done: Callable[[], bool], deadline: Optional[float]) -> bool:
        """run_until for a thread that is not the driver: sleep until the
        driver wakes us, and drive the loop ourselves whenever it is free."""
        me = threading.get_ident()
        changed = self._changed
        with changed:
            self._waiters += 1
        try:
            while not done():
                try:
                    if self._claim(me):
                        return self._drive(done, deadline)
                finally:
                    self._let_go(me)
                with changed:
                    if done():
                        return True
                    if "driver" not in self._owner:
                        continue           # let go meanwhile: try to take it
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    changed.wait(remaining)
            return True
        finally:
            with changed:
                self._waiters -= 1

    def close(self) -> None:
        self.unregister(self._wakeup_recv)
        self._wakeup_recv.close()
        self._wakeup_send.close()
        self._selector.close()


def _thread_name(ident: Optional[int]) -> str:
    for thread in threading.enumerate():
        if thread.ident == ident:
            return repr(thread.name)
    return str(ident)


_default_reactor: Optional[Reactor] = None
_default_reactor_lock = threading.Lock()


def get_reactor() -> Reactor:
    """The module's default reactor, made on first use, like POE::Kernel."""
    global _default_reactor
    if _default_reactor is None:
        with _default_reactor_lock:
            if _default_reactor is None:
                _default_reactor = Reactor()
    return _default_reactor


def run() -> None:
    """Run the default reactor until ``get_reactor().stop()``."""
    get_reactor().run()


def run_in_thread() -> threading.Thread:
    """Run the default reactor in a daemon thread (``get_reactor().stop()`` ends it)."""
    return get_reactor().run_in_thread()


# ---------------------------------------------------------------------------
# wheel
# ---------------------------------------------------------------------------
# The authkey handshake of PROTOCOL.md section 4, as multiprocessing.connection does it
# since 3.12, written as generators: each ``yield`` waits for the peer's next
# raw frame, so the wheel can drive them from its read handler.

CHALLENGE = b"#CHALLENGE#"
WELCOME = b"#WELCOME#"
FAILURE = b"#FAILURE#"
DIGEST_NAME = b"{sha256}"
MESSAGE_LENGTH = 40


def _authkey_bytes(authkey: Any) -> Optional[bytes]:
    """An ``authkey=`` as the handshake uses it: bytes as they are, str as UTF-8."""
    if authkey is None or type(authkey) is bytes:
        return authkey
    if isinstance(authkey, str):
        return authkey.encode("utf-8")
    if isinstance(authkey, (bytearray, memoryview)):
        return bytes(authkey)
    raise TypeError("authkey must be bytes or str, not %s" % type(authkey).__name__)


def _digest(authkey: bytes, message: bytes) -> bytes:
    return DIGEST_NAME + hmac.new(authkey, message, hashlib.sha256).digest()


def deliver_challenge(send: Callable[[bytes], None], authkey: bytes):
    """Challenge the peer to prove it holds ``authkey``."""
    message = CHALLENGE + DIGEST_NAME + os.urandom(MESSAGE_LENGTH)
    send(message)
    response = yield
    if not hmac.compare_digest(response, _digest(authkey, message)):
        send(FAILURE)
        if response.startswith(DIGEST_NAME):
            raise AuthenticationError("peer's digest is wrong: its authkey differs")
        raise AuthenticationError("peer answered the challenge with no digest: it has no authkey")
    send(WELCOME)


def answer_challenge(send: Callable[[bytes], None], authkey: bytes):
    """Prove to the peer that we hold ``authkey``."""
    message = yield
    if not message.startswith(CHALLENGE + DIGEST_NAME):
        raise AuthenticationError("expected an authentication challenge, got something else: "
                                  "the peer has no authkey")
    send(_digest(authkey, message))
    response = yield
    if response == FAILURE:
        raise AuthenticationError("peer rejected our digest: the authkeys differ")
    if response != WELCOME:
        raise AuthenticationError("peer sent neither welcome nor failure")


def _server_handshake(send, authkey):
    yield from deliver_challenge(send, authkey)
    yield from answer_challenge(send, authkey)


def _client_handshake(send, authkey):
    yield from answer_challenge(send, authkey)
    yield from deliver_challenge(send, authkey)


def _configure_socket(sock: socket.socket) -> None:
    """No Nagle (a call is a small frame that must leave now), keepalive so a
    peer whose machine vanished is noticed (PROTOCOL.md 8)."""
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:            # not TCP (a socketpair in tests): nothing to tune
        return
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                        ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


_CONNECTING, _TLS, _AUTH, _OPEN, _CLOSED = "connecting", "tls", "auth", "open", "closed"
_EVENT_READ = selectors.EVENT_READ
_EVENT_WRITE = selectors.EVENT_WRITE
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Wheel:
    """One connection, after POE::Wheel::ReadWrite.

    It moves through phases: TCP connect (client side), TLS handshake (with
    ``ssl_context``), authkey handshake (with ``authkey``), then open, when it
    passes every whole frame body to ``on_frame(body, wheel)``; ``on_open(wheel)``
    and ``on_close(wheel, reason, error)`` mark the ends (``error`` is the
    exception behind the close, or None). ``write_frame(body)`` queues
    a frame (``body`` is bytes, or the list of pieces ``_encode`` makes of a
    large message); the reactor flushes the queue once per pass (at once
    outside a pass).

    Flow control: ``pause_reading()`` / ``resume_reading()``; a wheel whose
    queue is above ``high_water`` can be asked, by ``wait_for_drain(other)``,
    to resume ``other`` once it drains below half of it.
    """

    __slots__ = ("reactor", "sock", "wheel_id", "peer", "filter", "encode", "decode", "reads",
                 "phase", "paused", "out_size", "max_write_buffer", "low_water", "on_frame",
                 "on_open", "on_close", "context", "_out", "_batch", "_batch_size", "_events",
                 "_tls", "_handshake", "_handshake_timer", "_drain_waiters", "_ssl_context",
                 "_inbox", "_server_hostname", "_server_side", "_authkey", "_scratch",
                 "__weakref__")

    def __init__(self, reactor: Reactor, sock: socket.socket, wheel_id: int, *,
                 on_frame: Callable, on_close: Callable, on_open: Optional[Callable] = None,
                 peer: str = "?", server_side: bool = True, connecting: bool = False,
                 max_frame: int = MAX_FRAME, max_write_buffer: int = MAX_WRITE_BUFFER,
                 low_water: int = LOW_WATER, ssl_context: Optional[ssl.SSLContext] = None,
                 server_hostname: Optional[str] = None, authkey: Optional[bytes] = None,
                 handshake_timeout: Optional[float] = HANDSHAKE_TIMEOUT,
                 framing: Any = None):
        self.reactor = reactor
        self.sock = sock
        self.wheel_id = wheel_id
        self.peer = peer
        # bytes -> frames: POE::Filter::Reference's, or another protocol's
        # (``framing``, with the same methods: the NATS transport's)
        self.filter = ReferenceFilter(max_frame) if framing is None else framing
        # the envelopes the peer takes and may send: pickled (version 1) until
        # both ends have offered compact ones in info (PROTOCOL.md 7.8)
        self.encode: Callable[[dict], Any] = _encode
        self.decode: Callable[[Any], Any] = _decode_message
        self.reads = 0                 # recvs that got bytes: what a heartbeat looks at
        self.paused = False
        self.out_size = 0
        self.max_write_buffer = max_write_buffer
        self.low_water = low_water
        self.on_frame = on_frame
        self.on_open = on_open
        self.on_close = on_close
        self.context: Any = None       # whatever the owner keeps per connection
        self._out: collections.deque = collections.deque()   # chunks ready to send, in order
        self._batch: Optional[list] = None   # small frames of this pass; a flush is due if set
        self._batch_size = 0
        self._events = 0
        self._tls = False
        self._handshake = None
        self._handshake_timer = None
        self._drain_waiters: Optional[list] = None
        self._inbox: Optional[collections.deque] = None   # whole frames not yet handed on
        self._scratch = reactor.read_buffer()   # what a recv reads into, the reactor's
        self._ssl_context = ssl_context
        self._server_hostname = server_hostname
        self._server_side = server_side
        self._authkey = authkey
        if handshake_timeout is not None and (connecting or ssl_context or authkey):
            self._handshake_timer = reactor.call_later(handshake_timeout, self._handshake_expired,
                                                       handshake_timeout)
        self.phase = _CONNECTING
        if connecting:
            self._set_events(_EVENT_WRITE)
        else:
            self._connected()

    def __repr__(self):
        try:
            fd = self.sock.fileno()
        except OSError:
            fd = -1
        return "<Wheel %d fd=%d peer=%s %s%s queued=%d>" % (
            self.wheel_id, fd, self.peer, self.phase, " paused" if self.paused else "",
            self.out_size)

    # phases

    def _connected(self):
        _configure_socket(self.sock)
        if self._ssl_context is not None:
            self._start_tls()
        else:
            self._start_auth()

    def _start_tls(self):
        self.phase = _TLS
        self._tls = True
        self.sock = self._ssl_context.wrap_socket(
            self.sock, server_side=self._server_side, do_handshake_on_connect=False,
            server_hostname=None if self._server_side else self._server_hostname)
        self._set_events(_EVENT_READ | _EVENT_WRITE)
        self._tls_handshake()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: Optional[str],
                  timeout: Optional[float], on_open: Callable) -> None:
        """Upgrade an open connection to TLS, for a protocol that first
        speaks in the clear (NATS sends its INFO so): once the handshake is
        done, ``on_open(wheel)``; past ``timeout`` seconds, it closes."""
        self._ssl_context = ssl_context
        self._server_hostname = server_hostname
        self.on_open = on_open
        if self._inbox:                # what came in the clear after it is not to be trusted
            self._inbox.clear()
        self.filter.clear()
        if timeout is not None:
            self._handshake_timer = self.reactor.call_later(timeout, self._handshake_expired,
                                                            timeout)
        self._start_tls()

    def _tls_handshake(self):
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._set_events(_EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._set_events(_EVENT_READ | _EVENT_WRITE)
            return
        except (ssl.SSLError, ssl.CertificateError) as exc:
            self.close("TLS handshake failed: %s" % (exc,), error=exc)
            return
        except OSError as exc:
            self.close("TLS handshake failed: %s" % (exc,), error=exc)
            return
        self._start_auth()
        # the handshake's last read may have pulled in application data too
        self.reactor.call_soon(self._read_pending)

    def _start_auth(self):
        self._set_events(_EVENT_READ)
        if self._authkey is None:
            self._open()
            return
        self.phase = _AUTH
        # each side receives three handshake frames (PROTOCOL.md 4), limited at their
        # header: before it proves its key, a peer can make us buffer 256 bytes
        self.filter.handshake_frames = 3
        steps = _server_handshake if self._server_side else _client_handshake
        self._handshake = steps(self.write_frame, self._authkey)
        self._step_handshake(None)

    def _step_handshake(self, body):
        try:
            self._handshake.send(body)
        except StopIteration:
            self._handshake = None
            self._open()
        except AuthenticationError as exc:
            self.close("authentication failed: %s" % (exc,), error=exc)

    def _open(self):
        self.phase = _OPEN
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if self.on_open is not None:
            self.on_open(self)

    def _handshake_expired(self, timeout):
        self._handshake_timer = None
        if self.phase in (_CONNECTING, _TLS):
            self.close("no connection within %.1f s" % timeout,
                       error=socket.timeout("timed out after %.1f s" % timeout))
        elif self.phase == _AUTH:
            exc = AuthenticationError(
                "no authkey handshake within %.1f s%s" % (
                    timeout, "" if self._server_side else
                    ": the server sent no challenge, so it has no authkey but this client "
                    "has one"))
            self.close(str(exc), error=exc)

    @property
    def closed(self) -> bool:
        return self.phase is _CLOSED

    @property
    def is_open(self) -> bool:
        return self.phase is _OPEN

    # events

    def _set_events(self, events: int) -> None:
        if events == self._events or self.phase is _CLOSED:
            return
        if not self._events:
            self.reactor.register(self.sock, events, self._on_event)
        elif not events:
            self.reactor.unregister(self.sock)
        else:
            self.reactor.modify(self.sock, events, self._on_event)
        self._events = events

    def _update_events(self) -> None:
        self._set_events((0 if self.paused else _EVENT_READ) | (_EVENT_WRITE if self._out else 0))

    def _on_event(self, mask: int) -> None:
        try:
            phase = self.phase
            if phase is _OPEN or phase is _AUTH:
                if mask & _EVENT_WRITE:
                    self.flush()
                if mask & _EVENT_READ and not self.paused and self.phase is not _CLOSED:
                    self._read()
            elif phase is _TLS:
                self._tls_handshake()
            elif phase is _CONNECTING:
                error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    exc = OSError(error, os.strerror(error))
                    self.close("connect failed: %s" % (exc,), error=exc)
                else:
                    self._connected()
        except Exception as exc:       # a handler's bug closes this connection only
            log.exception("%r: error in handler; closing it", self)
            self.close("internal error: %r" % (exc,), error=exc)

    def _read(self) -> None:
        body_space = self.filter.body_space()
        try:
            if body_space is not None:
                received = self.sock.recv_into(body_space)
            else:
                scratch = self._scratch
                received = self.sock.recv_into(scratch)     # (its size: the reactor's chunk)
        except _WOULD_BLOCK:
            return
        except OSError as exc:
            self.close("read failed: %s" % (exc,), error=exc)
            return
        if not received:
            self.close("closed by peer")
            return
        self.reads += 1
        if body_space is not None:
            body_space.release()
            self.filter.body_received(received)
        else:
            self.filter.get_one_start(scratch[:received])
        if self._tls and self.sock.pending():
            # TLS may hold decrypted bytes that the selector cannot see: read them next pass
            self.reactor.call_soon(self._read_pending)
        self._process_frames()

    def _read_pending(self) -> None:
        if self.phase is not _CLOSED and not self.paused:
            self._on_event(_EVENT_READ)

    def _process_frames(self) -> None:
        """Hand on every whole frame received. A handler may run a nested loop
        that reads this same wheel again: the inner level queues its frames
        behind the outer level's and hands them all on in order, so nothing is
        reordered or handled twice."""
        try:
            bodies = self.filter.get_frames()
        except ProtocolError as exc:
            self.close("protocol error: %s" % (exc,), error=exc)
            return
        inbox = self._inbox
        if inbox is None:
            if not bodies:
                return
            inbox = self._inbox = collections.deque(bodies)
        elif bodies:
            inbox.extend(bodies)
        popleft = inbox.popleft
        try:
            while inbox and self.phase is _AUTH:
                self._step_handshake(popleft())
            on_frame = self.on_frame
            while inbox and self.phase is _OPEN and not self.paused:
                on_frame(popleft(), self)
        except ProtocolError as exc:
            self.close("protocol error: %s" % (exc,), error=exc)
        except Exception as exc:       # a handler's bug closes this connection only
            log.exception("%r: error in handler; closing it", self)
            self.close("internal error: %r" % (exc,), error=exc)
        if not inbox and self._inbox is inbox:
            self._inbox = None
            broken = self.filter.broken
            if broken is not None:
                self.close("protocol error: %s" % (broken,), error=broken)

    # writing

    def write_frame(self, body) -> None:
        """Queue one frame, ``<length>\\0<body>`` (PROTOCOL.md 1)."""
        self.write(b"%d\0" % (len(body) if type(body) is not list else sum(map(len, body))),
                   body)

    def write(self, header: bytes, body) -> None:
        """Queue ``header`` then ``body`` (bytes, or a large message's list of
        pieces, which is never joined). Small frames gather in a batch that
        one join turns into one send at the end of the pass (or once it holds
        EARLY_SEND bytes as a frame joins it, if the socket has nothing
        queued); a large body is
        never copied and goes out at once, since joining it gains nothing and
        leaving it queued would count against the high-water mark until the
        pass ends."""
        if self.phase is _CLOSED:
            return
        if type(body) is list:          # a large message's pieces (_encode): never joined
            pieces = body
            size = sum(map(len, pieces))
        else:
            pieces = None
            size = len(body)
        if size < SEND_COALESCE:       # (never pieces: their payload alone is LARGE_PAYLOAD)
            # header and body go in as they are: the join at the end of the pass
            # copies each once, where building the frame here would copy it twice
            size += len(header)
            self.out_size += size
            batch = self._batch
            in_pass = self.reactor.in_pass
            if batch is None:              # the first frame of this pass
                if in_pass:
                    # due before the batch exists: an interrupt between the two
                    # leaves a flush with nothing to do, never a batch unflushed
                    self.reactor.schedule_flush(self.flush)
                self._batch = [header, body]
                self._batch_size = size
            else:                          # (a frame that joins a batch: a pass has one
                batch.append(header)       # only; a lone frame leaves at its end anyway)
                batch.append(body)
                self._batch_size += size
                if self._out:              # the socket is full: bounded joins meanwhile
                    if self._batch_size >= SEND_COALESCE:
                        self._seal_batch()
                elif self._batch_size >= EARLY_SEND:     # the peer starts on it while this
                    self.flush()                         # pass goes on
            if not in_pass:                # nobody may run the loop soon: it leaves now
                self.flush()
        else:
            self._seal_batch()
            # (never an empty piece: an SSL socket's send of b"" fails on OpenSSL 1.1)
            if header:
                self._out.append(header)
            if pieces is None:
                self._out.append(body)
            else:
                self._out.extend(piece for piece in pieces if piece)
            self.out_size += len(header) + size
            self.flush()
        if self.out_size > self.max_write_buffer:
            self.close("peer is not reading: %d bytes queued exceeds max_write_buffer (%d)"
                       % (self.out_size, self.max_write_buffer))

    def _seal_batch(self) -> None:
        batch = self._batch
        if batch:
            self._out.append(b"".join(batch))
            batch.clear()
            self._batch_size = 0

    def flush(self) -> None:
        """Send what is queued, as far as the socket takes it, without blocking."""
        if self._batch is not None:
            self._seal_batch()
            self._batch = None
        phase = self.phase
        if phase is not _OPEN and phase is not _AUTH:
            return
        out = self._out
        sock = self.sock
        while out:
            data = out[0]
            try:
                sent = sock.send(data)
            except _WOULD_BLOCK:
                break
            except OSError as exc:
                self.close("write failed: %s" % (exc,), error=exc)
                return
            self.out_size -= sent
            if sent < len(data):
                out[0] = memoryview(data)[sent:]
                break
            out.popleft()
        if bool(out) is not bool(self._events & _EVENT_WRITE):
            self._update_events()       # only whether we wait to write can have changed
        if self._drain_waiters is not None and self.out_size <= self.low_water:
            self._release_drain_waiters()

    # flow control

    def pause_reading(self) -> None:
        if not self.paused:
            self.paused = True
            self._update_events()

    def resume_reading(self) -> None:
        if self.paused and self.phase is not _CLOSED:
            self.paused = False
            self._update_events()
            if self._inbox:
                self.reactor.call_soon(self._process_frames)

    def wait_for_drain(self, other: "Wheel") -> None:
        """Pause ``other`` until this wheel's queue drains below ``low_water``."""
        other.pause_reading()
        if self._drain_waiters is None:
            self._drain_waiters = []
        self._drain_waiters.append(other)

    def _release_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, None
        for other in waiters:
            other.resume_reading()

    # closing

    def close(self, reason: str = "closed", error: Optional[BaseException] = None) -> None:
        """Close now: one last non-blocking try to send what is queued, then
        tell the owner through ``on_close(wheel, reason)``."""
        if self.phase is _CLOSED:
            return
        self._seal_batch()
        if self._out and (self.phase is _OPEN or self.phase is _AUTH):
            try:
                while self._out:
                    sent = self.sock.send(self._out[0])
                    if sent < len(self._out[0]):
                        break
                    self._out.popleft()
            except (OSError, ValueError):
                pass
        self.reactor.unregister(self.sock)
        self.phase = _CLOSED
        self._events = 0
        self._out.clear()
        self._batch = None
        self.out_size = 0
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if self._handshake is not None:
            self._handshake.close()     # it holds write_frame: a cycle through this wheel
            self._handshake = None
        self.filter.clear()             # a dropped peer's buffers go now, not at the next gc
        self._inbox = None
        try:
            self.sock.close()
        except OSError:
            pass
        if self._drain_waiters is not None:
            self._release_drain_waiters()
        self.on_close(self, reason, error)


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------

# The upper bounds, in seconds, of the call-duration histogram (Prometheus'
# "le" buckets): from a call on loopback to the Client's default timeout.
# Fixed, so that counting a call is one bisect and a few adds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0)
_bucket_of = bisect.bisect_left   # the bucket of a duration: the first bound >= it
SAMPLE_INTERVAL = 5.0             # seconds between the samples that rates are made of,
SAMPLES_KEPT = 72                 # ... and how many the server keeps: six minutes of history
MAX_LISTED = 1024                 # aliases, or connections, one answer lists: 10,000 connections
                                  # would make a megabyte-sized answer on every scrape; the
                                  # totals still count every one


class _Calls:
    """The counts of one alias's calls, kept by the server where it routes a
    call and where it settles one: settled (failures included), failed, in
    flight, their durations as a histogram, the bytes each way, and the rates
    of the last sample. The server's totals are summed from these when they
    are read (_ServerStats), so that a routed call counts once, here."""

    __slots__ = ("failures", "in_flight", "buckets", "seconds", "bytes_in",
                 "bytes_out", "sampled", "calls_per_s", "failures_per_s")

    def __init__(self):
        self.failures = 0
        self.in_flight = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)    # the last: slower than every bound
        self.seconds = 0.0             # the durations' sum
        self.bytes_in = 0              # of calls routed to the publisher
        self.bytes_out = 0             # of answers routed back
        self.sampled = (0, 0)          # calls and failures at the last sample
        self.calls_per_s = 0.0
        self.failures_per_s = 0.0

    @property
    def calls(self) -> int:
        """Calls settled: each is in one bucket, which is all that settling
        it need count."""
        return sum(self.buckets)

    def settle(self, success: bool, seconds: float) -> None:
        """Count a call that ended."""
        self.in_flight -= 1
        self.buckets[_bucket_of(LATENCY_BUCKETS, seconds)] += 1
        self.seconds += seconds
        if not success:
            self.failures += 1

    def sample(self, interval: float) -> None:
        calls, failures = self.sampled
        now_calls = self.calls
        self.calls_per_s = (now_calls - calls) / interval
        self.failures_per_s = (self.failures - failures) / interval
        self.sampled = (now_calls, self.failures)

    def quantile(self, fraction: float) -> Optional[float]:
        """The duration, in seconds, under which ``fraction`` of the calls
        settled, interpolated inside its bucket as Prometheus'
        histogram_quantile does; None before the first call."""
        total = sum(self.buckets)
        if not total:
            return None
        rank = fraction * total
        below = 0
        for index, count in enumerate(self.buckets):
            if count and below + count >= rank:
                if index == len(LATENCY_BUCKETS):      # slower than every bound
                    return LATENCY_BUCKETS[-1]
                low = LATENCY_BUCKETS[index - 1] if index else 0.0
                return low + (LATENCY_BUCKETS[index] - low) * (rank - below) / count
            below += count
        return LATENCY_BUCKETS[-1]

    def summary(self) -> dict:
        """What ``/aliasz`` and ``server_stats`` show of these counts."""
        latency = {}
        for name, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            seconds = self.quantile(fraction)
            latency[name] = None if seconds is None else round(seconds * 1000, 3)
        cumulative = list(itertools.accumulate(self.buckets))
        return {"calls": self.calls, "failures": self.failures, "in_flight": self.in_flight,
                "latency_ms": latency, "calls_per_s": round(self.calls_per_s, 3),
                "failures_per_s": round(self.failures_per_s, 3), "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "duration_s": {"le": list(LATENCY_BUCKETS), "counts": cumulative[:-1],
                               "count": cumulative[-1], "sum": self.seconds}}


class _ServerStats:
    """A server's own counts: what it has done since it started, and the
    history of its call rate (for the monitor's page). Calls are counted by
    their alias's _Calls; these hold the rest: calls refused for want of an
    alias, and the counts of aliases that went (``retire``). And what watches
    them: the sampler's timer, the monitor's address and the monitor.
"""

    __slots__ = ("started", "started_wall", "messages", "calls", "failures", "retiring",
                 "history", "sampled", "sampled_at", "sampler", "monitor_at", "monitor")

    def __init__(self, monitor_at: Optional[Tuple[str, int]]):
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.messages = 0              # messages received, of every type
        self.calls = 0                 # calls settled, failures included, that no live
        self.failures = 0              # alias counts
        self.retiring: List[_Calls] = []    # of aliases gone with calls still in flight
        self.history: collections.deque = collections.deque(maxlen=SAMPLES_KEPT)
        self.sampled = (0, 0)
        self.sampled_at = self.started
        self.sampler: Optional[_Timer] = None
        self.monitor_at = monitor_at           # (host, port) to serve the monitor on, if any
        self.monitor: Optional["_Monitor"] = None

    def retire(self, calls: _Calls) -> None:
        """An alias went: its counts join these, once its last call has settled."""
        if calls.in_flight:
            self.retiring.append(calls)
        else:
            self.calls += calls.calls
            self.failures += calls.failures

    def count(self, live: Iterable[_Calls]) -> Tuple[int, int]:
        """(calls, failures) settled since the start, ``live`` being the
        counts of the aliases there are."""
        retiring, self.retiring = self.retiring, []
        for calls in retiring:
            self.retire(calls)
        every = list(live) + self.retiring
        return (self.calls + sum(calls.calls for calls in every),
                self.failures + sum(calls.failures for calls in every))

    def sample(self, now: float, counted: Tuple[int, int]) -> float:
        """Record the rates since the last sample; returns its interval."""
        interval = max(now - self.sampled_at, 1e-3)
        (calls, failures), (then_calls, then_failures) = counted, self.sampled
        self.history.append((round(time.time(), 3), round((calls - then_calls) / interval, 3),
                             round((failures - then_failures) / interval, 3)))
        self.sampled = counted
        self.sampled_at = now
        return interval


def _event_name(payload: Any) -> str:
    """The method a deliver's payload calls, read off its first opcodes
    (``{"event": NAME, ...}``) without decoding the rest: for the trace,
    which must not cost what the call's arguments would."""
    try:
        opcodes = pickletools.genops(io.BytesIO(bytes(payload[:2 * MAX_NAME + 64])))
        after_key = False
        for _, argument, _ in itertools.islice(opcodes, 12):
            if type(argument) is str:
                if after_key:
                    return _printable(argument)
                after_key = argument == "event"
    except Exception:                  # a peer's bytes: whatever they are, the trace goes on
        pass
    return "?"


def _failure_words(payload: Any) -> str:
    """The first words of a failure result's payload, for the trace: a
    server's reason (a str) or a publisher's exception (a dict of str). Only
    a str is shown whole; anything else by _show, bounded in what it looks
    at (a list that holds itself twice, 24 deep, would take hours to str())."""
    try:
        if payload is None:
            return "no reason given"
        if type(payload) in _PAYLOAD_TYPES:
            _check_payload(payload, _TREE_OPCODES)
            payload = _loads_plain(payload)
        if type(payload) is dict:
            error, message = payload.get("error"), payload.get("message")
            if type(error) is str and type(message) is str:
                payload = "%s: %s" % (error[:MAX_NAME], message[:200])
        text = payload if type(payload) is str else _show(payload, 80)
        return _printable(text.split("\n", 1)[0], 80)
    except Exception:
        return "(an undecodable failure)"


def _host_port(host: str, port: int) -> str:
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def _ms(value: Optional[float]) -> str:
    """A latency in milliseconds, or "-" before there is one."""
    return "-" if value is None else "%.3g" % value


def _aliases(count: int) -> str:
    return "1 alias" if count == 1 else "%d aliases" % count


def _duration(seconds: float) -> str:
    """Seconds as a person reads them: 42 s, 3 min 20 s, 5 h 07 min, 2 d 3 h."""
    seconds = int(seconds)
    if seconds < 60:
        return "%d s" % seconds
    if seconds < 3600:
        return "%d min %02d s" % divmod(seconds, 60)
    if seconds < 86400:
        return "%d h %02d min" % (seconds // 3600, seconds % 3600 // 60)
    return "%d d %d h" % (seconds // 86400, seconds % 86400 // 3600)


# ---------------------------------------------------------------------------
# server
# ---------------------------------------------------------------------------

class _Session:
    """One published session: the alias callers use, the publisher's own name
    for it, its method table, its publisher's wheel and who subscribed. A
    shared one (PROTOCOL.md 7.6) has ``members``, the wheels that publish it
    in the order they joined; its ``wheel_id`` is the first of them."""

    __slots__ = ("alias", "name", "methods", "wheel_id", "subscribers", "calls", "members",
                 "turn")

    def __init__(self, alias, name, methods, wheel_id, shared=False):
        self.alias = alias
        self.name = name
        self.methods = methods
        self.wheel_id = wheel_id
        self.members: Optional[List[int]] = [wheel_id] if shared else None
        self.turn = 0                  # ties between members go in turn
        self.subscribers = set()
        self.calls = _Calls()          # a publisher that resumes or restarts keeps them


class _Peer:
    """What the server holds for one connection, indexed so that its end costs
    what it held and nothing more: the aliases it published and subscribed to,
    the fresh ids of its calls still waiting and of the calls waiting on it.
    Each set is made on first use: most connections never need most of them.
    And what the statistics show of it: since when, and how many calls it
    sent and answered."""

    __slots__ = ("published", "subscribed", "calls_made", "calls_served", "token",
                 "held_bytes", "since", "calls_sent", "calls_answered", "awaiting",
                 "max_frame", "calls_by_id", "timed_out")

    def __init__(self):
        self.published: Optional[set] = None
        self.subscribed: Optional[set] = None
        self.calls_made: Optional[set] = None
        self.calls_served: Optional[set] = None
        self.token: Optional[str] = None    # its resume token, if it asked for one
        self.held_bytes = 0            # of its calls held for parked publishers
        self.since = time.monotonic()
        self.calls_sent = 0
        self.calls_answered = 0
        self.awaiting: Optional[Dict[int, str]] = None   # request id -> alias it waits for
        self.max_frame: Optional[int] = None   # its own frame limit, if it said (info)
        # for a peer that said it speaks deadlines and cancel (info, PROTOCOL.md 7.7):
        # its request id -> the fresh id, of each of its calls still waiting
        self.calls_by_id: Optional[Dict[int, int]] = None
        self.timed_out = 0             # calls it has that timed out, unanswered (TIMED_OUT)


class _Parked:
    """The sessions of a publisher whose connection ended without a goodbye,
    kept for the grace window (resumption): calls to them wait in ``held``
    (fresh id -> frame, in the order they came) until it resumes with its
    token or the window ends."""

    __slots__ = ("wheel_id", "token", "published", "held", "held_bytes", "timer")

    def __init__(self, wheel_id, token, published, timer):
        self.wheel_id = wheel_id       # of the connection that ended: its sessions still name it
        self.token = token
        self.published: set = published
        self.held: Dict[int, Any] = {}
        self.held_bytes = 0            # bounded, so that they fit the resuming connection
        self.timer = timer


# A routed call waiting for its result, stored under the server's fresh id as
# (caller_wheel_id, caller_id, publisher_wheel_id, alias, calls, started,
# deadline): ``calls`` the _Calls of its alias, ``started`` when it was routed
# and ``deadline`` when it is failed if still unanswered (time.monotonic();
# None: never; TIMED_OUT: it was, and its publisher's answer is still to
# come). A plain tuple, since one is made for every call.

# A call failed at its deadline stays in the store, and on its publisher's
# books (its load, its ``timed_out``), until the publisher answers (the
# answer is then dropped) or goes: the publisher still has it. A publisher
# with max_waiting_calls of them is refused new calls, or callers whose calls
# time out could pile up calls at a stuck publisher without bound; the
# callers' own max_waiting_calls no longer counts them, so one stuck
# publisher does not cut its callers off from every other alias.
TIMED_OUT = float("inf")


def _call_over(caller: "_Peer", fresh_id: int, caller_id: int) -> None:
    """A call of ``caller``'s is no longer waiting for its answer here."""
    caller.calls_made.discard(fresh_id)
    if caller.calls_by_id is not None and caller.calls_by_id.get(caller_id) == fresh_id:
        del caller.calls_by_id[caller_id]


def _drop_member(session: "_Session", wheel_id: int) -> bool:
    """Take a member out of a shared session; True if it was the last."""
    session.members.remove(wheel_id)
    if session.members:
        session.wheel_id = session.members[0]
    return not session.members


def _is_name(value: Any) -> bool:
    return type(value) is str and 0 < len(value) <= MAX_NAME


def _alias_fault(alias: Any, missing: str) -> Optional[str]:
    """Why ``alias`` cannot name a session (``missing`` in the seed's words when
    there is none), or None."""
    if not alias:
        return missing
    if type(alias) is not str:
        return "Session alias must be a str, not %s" % type(alias).__name__
    if len(alias) > MAX_NAME:
        return "Session alias is longer than %d characters" % MAX_NAME
    return None


def _add(peer: "_Peer", field: str, item: Any) -> None:
    """Add ``item`` to one of ``peer``'s sets, made on first use."""
    items = getattr(peer, field)
    if items is None:
        setattr(peer, field, {item})
    else:
        items.add(item)


def _plural(count: int, noun: str) -> str:
    return "%d %s%s" % (count, noun, "" if count == 1 else "s")


def _method_table_fault(methods: Any) -> Optional[str]:
    """Why a published method table is not one (PROTOCOL.md 3.1), or None."""
    if type(methods) is not dict:
        return "want a dict of method descriptions, got %s" % _quote(methods)
    if len(methods) > MAX_METHODS:
        return "%d methods, the most is %d" % (len(methods), MAX_METHODS)
    for name, description in methods.items():
        if not _is_name(name) or not name.isidentifier():
            return "method name %s is not an identifier of at most %d characters" % (
                _quote(name), MAX_NAME)
        if type(description) is not dict or len(description) > 16:
            return "the description of '%s' is not a dict of at most 16 fields" % name
        for key, text in description.items():
            if not _is_name(key) or not (text is None or type(text) is str and
                                         len(text) <= MAX_DESCRIPTION):
                return "the description of '%s' holds %s: want str keys and values that " \
                       "are None or str of at most %d characters" % (name, _quote(key),
                                                                     MAX_DESCRIPTION)
    return None


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A non-blocking socket listening on ``host:port`` (``[v6]`` or v4)."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                             socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host.strip("[]"), port))
        listener.listen(backlog)
        listener.setblocking(False)
    except OSError:
        listener.close()
        raise
    return listener


def _accept_some(reactor: Reactor, listener: socket.socket,
                 on_accept: Callable[[socket.socket, Any], None],
                 resume: Callable[[], None]) -> Optional[OSError]:
    """Accept up to MAX_ACCEPTS_PER_WAKEUP connections (in batches, so that a
    connect storm cannot starve the others), handing each to ``on_accept``.
    An accept that fails other than by finding none (out of descriptors, most
    often) stops accepting for ACCEPT_RETRY_DELAY, then ``resume()``: the
    pending connection would otherwise wake the loop again at once, forever.
    Returns that failure, for the caller to log."""
    for _ in range(MAX_ACCEPTS_PER_WAKEUP):
        try:
            sock, address = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None
        except OSError as exc:
            reactor.unregister(listener)
            reactor.call_later(ACCEPT_RETRY_DELAY, resume)
            return exc
        on_accept(sock, address)
    return None


def _raise_file_limit() -> None:
    """Thousands of connections need thousands of descriptors (PROTOCOL.md 8)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = max(soft, 1 << 20)
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError) as exc:
        log.debug("could not raise the file limit: %s", exc)


def _send_own(wheel: Wheel, message: dict) -> int:
    """Write a message of the server's own (an answer, a notice) in the
    envelope ``wheel`` takes, unless it exceeds the frame limit its peer said
    it takes: then nothing is written and its size is returned (0 when
    written). Calls and results are routed by _Router instead, which sizes
    them against what came in."""
    body = wheel.encode(message)       # a large payload is sent as it lies, not copied
    limit = wheel.context.max_frame
    if limit is not None:
        size = len(body) if type(body) is bytes else sum(map(len, body))
        if size > limit:
            return size
    wheel.write_frame(body)
    return 0


def _answer(wheel: Wheel, msg_id: int, success: bool, payload: Any = None,
            pickled: bool = False) -> None:
    """A result from the server itself (``pickled``: ``payload`` is so
    already). Never larger than the peer said it takes (PROTOCOL.md 7.1): a
    method table or a listing too large for it fails that request alone."""
    message = {"type": "result", "id": msg_id, "success": success}
    if payload is not None:
        message["payload"] = payload if pickled else _dumps(payload)
    size = _send_own(wheel, message)
    if size:
        _send_own(wheel, {"type": "result", "id": msg_id, "success": False,
                          "payload": _dumps("Answer of %d bytes exceeds this connection's "
                                            "max_frame (%d bytes)"
                                            % (size, wheel.context.max_frame))})


class _Router:
    """A server's calls in flight: each routed to its publisher under a fresh
    id (to the least busy member of a shared session; held, while its
    publisher is away, by the grace window), its answer routed back under
    the caller's id, and what the server keeps of it meanwhile, in ``store``
    (the server's ``delivered_store``): its statistics, its deadline, its
    cancel, and the cleanup of either end. Calls and answers in compact
    envelopes are passed on from their header (``pass_on``).

    The server hands it what it routes (``deliver``, ``answered``,
    ``cancel``), sets ``frame_size`` to the size of each message it hands
    over, and tells it when a connection or a session ends."""

    # Slots: the routing reads a few of these per call (see Server's)
    __slots__ = ("server", "sessions", "wheels", "store", "stats", "reactor", "away", "traced",
                 "frame_size", "_ids", "_deadline_timer")

    def __init__(self, server: "Server"):
        # its limits and send_result are read from the server as they are used
        # (a subclass may set them after Server.__init__); its stores are the
        # server's own, shared
        self.server = server
        self.sessions: Dict[str, _Session] = server.sessions
        self.wheels: Dict[int, Wheel] = server.wheels
        self.store: Dict[int, tuple] = {}  # fresh id -> its delivery (see TIMED_OUT)
        self.stats: _ServerStats = server.stats
        self.reactor = server.reactor
        self.away = _GraceWindow(server, self)  # publishers away, and the calls held for them
        # tracing: a line per settled call (and per message, at debug level),
        # and meanwhile fresh id -> the method the call is for; None: off
        self.traced: Optional[Dict[int, str]] = {} if server.options.get("trace") else None
        self.frame_size = 0            # of the message being handled: what _forward may send on
        self._ids = itertools.count(1)
        self._deadline_timer: Optional[_Timer] = None   # the next look for calls past deadline

    def deliver(self, data: dict, wheel_id: int) -> None:
        """Route a call to the publisher of ``to`` under a fresh id; its
        payload goes through untouched."""
        alias = data.get("to")
        session = self.sessions.get(alias) if type(alias) is str else None
        caller_id = data["id"]
        caller = self.wheels[wheel_id]
        peer = caller.context
        peer.calls_sent += 1
        event = None if self.traced is None else _event_name(data.get("payload"))
        if session is None:
            return self.refused(wheel_id, caller_id, alias, None, event,
                                "Session '%s' doesn't exist" % _quote(alias))
        if type(data.get("payload")) not in _PAYLOAD_TYPES:
            return self.refused(wheel_id, caller_id, alias, session.calls, event,
                                "Malformed message: deliver wants a bytes payload")
        timeout = data.get("timeout_ms")
        if timeout is not None and (type(timeout) is not int or
                                    not 0 < timeout <= MAX_CALL_TIMEOUT_MS):
            return self.refused(wheel_id, caller_id, alias, session.calls, event,
                                "Malformed message: timeout_ms must be an int of milliseconds "
                                "from 1 to %d, not %s" % (MAX_CALL_TIMEOUT_MS, _show(timeout)))
        made = peer.calls_made
        limit = self.server.max_waiting_calls
        if made is None:
            made = peer.calls_made = set()
        elif len(made) >= limit:
            return self.refused(wheel_id, caller_id, alias, session.calls, event,
                                "Too many calls waiting: connection %d has %d calls waiting "
                                "for answers (max_waiting_calls)" % (wheel_id, limit))
        fresh_id = next(self._ids)
        calls = session.calls
        publisher_id = session.wheel_id if session.members is None else \
            self._least_busy(session)
        publisher = self.wheels.get(publisher_id)
        if publisher is not None and publisher.context.timed_out >= limit:
            return self.refused(wheel_id, caller_id, alias, calls, event,
                                "Session '%s' is not answering: %d of its calls timed out and "
                                "still wait for its answers (max_waiting_calls)"
                                % (alias, publisher.context.timed_out))
        data["to"] = session.name
        data["id"] = fresh_id
        if timeout is not None and (publisher is None or publisher.context.calls_by_id is None):
            del data["timeout_ms"]     # a version-1 publisher sees the seed's deliver
        body = self._forward(data, wheel_id, caller_id, alias, publisher)
        if body is None:               # refused, and answered, by _forward
            return self.refused(wheel_id, caller_id, alias, calls, event,
                                "too large to forward", answer=False)
        now = time.monotonic()
        delivery = (wheel_id, caller_id, publisher_id, alias, calls, now,
                    None if timeout is None else now + timeout / 1000)
        if timeout is not None and self._deadline_timer is None:
            self._deadline_timer = self.reactor.call_later(DEADLINE_SWEEP, self._expire)
        if publisher is None:          # its publisher is away, within its grace window
            refusal = self.away.hold(session.wheel_id, fresh_id, body, peer, alias)
            if refusal:
                return self.refused(wheel_id, caller_id, alias, calls, event, refusal)
        self._in_flight(fresh_id, delivery, peer, None if publisher is None else publisher.context)
        if event is not None:
            self.traced[fresh_id] = event
        if publisher is not None:
            self._route_out(publisher, caller, body)

    def _route_out(self, receiver: Wheel, feeder: Wheel, body,
                   header: Optional[bytes] = None) -> None:
        """Write a routed call or answer to ``receiver`` (``header``: its
        frame header and, passed on from a compact one, its envelope's; else
        write_frame's). Once the receiver lags past the high-water mark,
        ``feeder`` stops being read until it drains (PROTOCOL.md 8): a caller
        that feeds a publisher that lags, or one that does not read its own
        answers (a publisher is never paused on a caller's account)."""
        if header is None:
            receiver.write_frame(body)
        else:
            receiver.write(header, body)
        if receiver.out_size > self.server.high_water:
            receiver.wait_for_drain(feeder)

    def _in_flight(self, fresh_id: int, delivery: tuple, caller: _Peer,
                   publisher: Optional[_Peer]) -> None:
        """A call goes to its publisher (None: held for it, away): what the
        server keeps of it until its answer (its statistics, its deadline,
        its cancel, and the cleanup of either end)."""
        calls = delivery[4]
        calls.in_flight += 1
        calls.bytes_in += self.frame_size
        self.store[fresh_id] = delivery
        caller.calls_made.add(fresh_id)
        if caller.calls_by_id is not None:
            caller.calls_by_id[delivery[1]] = fresh_id
        if publisher is not None:
            _add(publisher, "calls_served", fresh_id)

    def _least_busy(self, session: _Session) -> int:
        """The member of a shared session with the fewest calls in flight (its
        connection's, to every alias it serves); ties in turn. Only members
        that take a frame of this call's size count, while there is one: a
        member with a small max_frame must not draw, and fail, every call
        that others could take."""
        wheels = self.wheels
        size = self.frame_size + 4 * len(session.name) + REENCODED_GROWTH  # _forward's most
        peers = [wheels[member].context for member in session.members]
        fitting = [(member, peer) for member, peer in zip(session.members, peers)
                   if peer.max_frame is None or peer.max_frame >= size] or \
            list(zip(session.members, peers))
        loads = [len(peer.calls_served or ()) for _, peer in fitting]
        fewest = min(loads)
        tied = [member for (member, _), load in zip(fitting, loads) if load == fewest]
        session.turn += 1
        return tied[session.turn % len(tied)]

    def refused(self, wheel_id: int, caller_id: int, alias: Any, calls: Optional[_Calls],
                event: Optional[str], reason: str, answer: bool = True) -> None:
        """A call that is never routed: counted as settled and failed at once
        (for its alias too, if it exists), and answered with ``reason``.
        ``event``: the method it calls, when tracing."""
        if calls is not None:
            calls.in_flight += 1
            calls.settle(False, 0.0)
        else:                          # no such alias: the server's totals alone
            self.stats.calls += 1
            self.stats.failures += 1
        if self.traced is not None:
            log.info("call '%s'.%s from connection %d: refused (%s)", _printable(alias),
                     event or "?", wheel_id, _printable(reason))
        if answer:
            _answer(self.wheels[wheel_id], caller_id, False, reason)

    def settled(self, fresh_id: int, delivery: tuple, success: bool, failure: str) -> None:
        """Count a routed call that ends, however it ends (answered, failed
        here, or left by its caller): the one place where calls are settled.
        One that timed out was counted then (TIMED_OUT)."""
        if delivery[6] is TIMED_OUT:
            delivery[4].in_flight -= 1  # (it stayed in flight: its publisher had it)
            return
        seconds = time.monotonic() - delivery[5]
        delivery[4].settle(success, seconds)
        if self.traced is not None:
            self._trace_settled(fresh_id, delivery, success, failure, seconds)

    def _trace_settled(self, fresh_id: int, delivery: tuple, success: bool, failure: str,
                       seconds: float) -> None:
        log.info("call '%s'.%s from connection %d to connection %d: %s in %.3f ms",
                 _printable(delivery[3]), self.traced.pop(fresh_id, "?"), delivery[0], delivery[2],
                 "ok" if success else "failed (%s)" % failure, seconds * 1000)

    def _forward(self, data: dict, wheel_id: int, answer_id: int, alias: str,
                 receiver: Optional[Wheel]):
        """``data`` encoded to be passed on to ``receiver``, or None after
        answering ``answer_id`` on ``wheel_id``: what the server sends on is
        never much larger than what it received (a hostile message could
        otherwise grow on re-encoding, past the frame limit of the connection
        it goes to), nor larger than the receiver said it takes (it would
        close its connection, failing everyone's calls on it). It goes in the
        envelope the receiver takes; a call held for a publisher away, pickled
        (whatever connection it comes back on takes that)."""
        body = _encode(data) if receiver is None else receiver.encode(data)
        size = len(body) if type(body) is bytes else sum(map(len, body))
        if size > self.frame_size + 4 * len(data.get("to") or "") + REENCODED_GROWTH:
            _answer(self.wheels[wheel_id], answer_id, False, "Malformed message: it would "
                    "be forwarded as %d bytes, much more than it came as" % size)
            return None
        limit = receiver.context.max_frame if receiver is not None else None
        if limit is not None and size > limit:
            _answer(self.wheels[wheel_id], answer_id, False, "%s of %d bytes exceeds the "
                    "max_frame of %s (%d bytes)" % (
                        "Call" if data["type"] == "deliver" else "Result", size,
                        "the publisher of '%s'" % alias if data["type"] == "deliver"
                        else "its caller", limit))
            return None
        return body

    def answered(self, data: dict, wheel_id: int) -> None:
        """Route a publisher's result back to the caller, under the caller's id."""
        fresh_id = data["id"]
        delivery = self.store.get(fresh_id)
        if delivery is None or delivery[2] != wheel_id:
            # (one that came after its call's deadline, or its cancel, is no news)
            log.log(logging.WARNING if delivery else logging.DEBUG,
                    "connection %d sent a result for %s call %d: dropped", wheel_id,
                    "someone else's" if delivery else "no waiting", fresh_id)
            return
        publisher = self.wheels[wheel_id].context
        self._answer_came(fresh_id, delivery, publisher)
        caller_wheel_id, caller_id, _, alias, calls, started, deadline = delivery
        if deadline is TIMED_OUT:      # its caller has had its answer: this one is late
            publisher.timed_out -= 1
            calls.in_flight -= 1
            return
        caller = self.wheels.get(caller_wheel_id)
        if caller is None:             # (a caller that leaves takes its calls with it)
            return self.settled(fresh_id, delivery, False, "its caller left")
        _call_over(caller.context, fresh_id, caller_id)
        success = data.get("success")
        if type(success) is not bool or type(data.get("payload", b"")) not in _PAYLOAD_TYPES:
            log.warning("connection %d sent a malformed result for '%s'", wheel_id, alias)
            failure = "Session '%s' sent a malformed result" % alias
            self.settled(fresh_id, delivery, False, failure)
            _answer(caller, caller_id, False, failure)
            return
        data["id"] = caller_id
        body = self._forward(data, caller_wheel_id, caller_id, alias, caller)
        if body is None:
            self.settled(fresh_id, delivery, False, "(too large)")
            return
        seconds = time.monotonic() - started
        calls.settle(success, seconds)
        if self.traced is not None:
            self._trace_settled(fresh_id, delivery, success, "" if success else
                                _failure_words(data.get("payload")), seconds)
        self._route_out(caller, caller, body)

    def _answer_came(self, fresh_id: int, delivery: tuple, publisher: _Peer) -> None:
        """A publisher answered a call routed to it: the call is no longer its."""
        del self.store[fresh_id]
        publisher.calls_served.discard(fresh_id)
        publisher.calls_answered += 1
        delivery[4].bytes_out += self.frame_size

    # Compact routing (PROTOCOL.md 7.8): a call or an answer in a compact
    # envelope, between two peers that both take them, is passed on from its
    # 17-byte header: the header is written anew (the publisher's name and a
    # fresh id, or the caller's id) and the payload follows as it lies, never
    # made into a message nor encoded again (about 3 us of the 9 us a routed
    # call cost the server; helper-14's profile, 2026-12-05). The bookkeeping
    # is deliver's and answered's own (_in_flight,
    # _answer_came, _call_over, _Calls.settle). Anything else goes their
    # general way, which checks, refuses and answers it: a header out of its
    # bounds, an alias that is shared or has no publisher connected, a
    # version-1 peer at the other end, a limit reached, or a trace.

    def pass_on(self, body, wheel: Wheel) -> bool:
        """Route a compact call or answer from its header; False, having
        changed nothing, leaves it to the general way."""
        size = len(body)
        if size < _HEAD_SIZE:
            return False
        _, kind, flags, name_size, msg_id, timeout = _COMPACT_HEAD.unpack_from(body)
        if kind == _COMPACT_RESULT:
            return flags <= _SUCCESS | _HAS_PAYLOAD and not name_size and not timeout and \
                (flags & _HAS_PAYLOAD or size == _HEAD_SIZE) and \
                self._pass_answer(body, size, wheel, flags, msg_id)
        start = _HEAD_SIZE + name_size
        if kind != _COMPACT_DELIVER or flags & ~_HAS_TIMEOUT != _HAS_PAYLOAD or \
                not 0 < name_size <= _MAX_NAME_BYTES or start > size or \
                not (0 < timeout <= MAX_CALL_TIMEOUT_MS if flags & _HAS_TIMEOUT else not timeout):
            return False
        try:
            alias = str(body[_HEAD_SIZE:start], "utf-8")
        except UnicodeDecodeError:
            return False
        session = self.sessions.get(alias)
        if session is None or session.members is not None:
            return False
        publisher = self.wheels.get(session.wheel_id)
        caller = wheel.context
        made = caller.calls_made
        limit = self.server.max_waiting_calls
        if publisher is None or publisher.encode is not _encode_compact or made is None or \
                len(made) >= limit:
            return False
        served = publisher.context
        try:
            name = session.name.encode()
        except UnicodeEncodeError:     # (a lone surrogate: the general way sends it pickled)
            return False
        out_size = size - name_size + len(name)
        if served.timed_out >= limit or len(name) > _MAX_NAME_BYTES or \
                served.max_frame is not None and out_size > served.max_frame:
            return False
        # taken: from here on, as deliver does it
        self.frame_size = size
        self.stats.messages += 1
        caller.calls_sent += 1
        fresh_id = next(self._ids)
        now = time.monotonic()
        if not flags & _HAS_TIMEOUT:
            deadline = None
        else:
            deadline = now + timeout / 1000
            if self._deadline_timer is None:
                self._deadline_timer = self.reactor.call_later(DEADLINE_SWEEP,
                                                               self._expire)
            if served.calls_by_id is None:      # (a publisher that takes no deadlines)
                flags, timeout = _HAS_PAYLOAD, 0
        self._in_flight(fresh_id, (wheel.wheel_id, msg_id, session.wheel_id, alias,
                                   session.calls, now, deadline), caller, served)
        self._route_out(publisher, wheel, memoryview(body)[start:], b"%d\0" % out_size +
                        _COMPACT_HEAD.pack(_COMPACT, _COMPACT_DELIVER, flags, len(name), fresh_id,
                                           timeout) + name)
        return True

    def _pass_answer(self, body, size: int, wheel: Wheel, flags: int, fresh_id: int) -> bool:
        """pass_on's answer to a call: back to its caller, under its id."""
        delivery = self.store.get(fresh_id)
        if delivery is None or delivery[2] != wheel.wheel_id or delivery[6] is TIMED_OUT:
            return False
        caller = self.wheels.get(delivery[0])
        if caller is None or caller.encode is not _encode_compact or \
                caller.context.max_frame is not None and size > caller.context.max_frame:
            return False
        # taken: from here on, as answered does it
        self.frame_size = size
        self.stats.messages += 1
        self._answer_came(fresh_id, delivery, wheel.context)
        caller_id = delivery[1]
        _call_over(caller.context, fresh_id, caller_id)
        delivery[4].settle(flags & _SUCCESS == _SUCCESS, time.monotonic() - delivery[5])
        self._route_out(caller, caller, memoryview(body)[_HEAD_SIZE:], b"%d\0" % size +
                        _COMPACT_HEAD.pack(_COMPACT, _COMPACT_RESULT, flags, 0, caller_id, 0))
        return True

    # deadlines and cancel (PROTOCOL.md 7.7): a call's timeout travels with it,
    # and a caller may take a call back. A call's deadline is kept in its
    # delivery, and a sweep looks for the calls past theirs a few times a
    # second while any are waiting: a timer per call would cost every call
    # a heap entry, and a heap of deadlines a push per call and a rebuild
    # for the answered ones.

    def _expire(self) -> None:
        """Fail every call past its deadline: its caller is answered as its own
        Client would time it out (a CallTimeout), and a late answer from its
        publisher is dropped. A call the publisher is still working on keeps
        its worker busy: the publisher is not told (it knows the deadline,
        and does not start a call past it)."""
        now = time.monotonic()
        store = self.store
        expired = [(fresh_id, delivery) for fresh_id, delivery in store.items()
                   if delivery[6] is not None and delivery[6] <= now]   # (TIMED_OUT never is)
        for fresh_id, delivery in expired:
            if store.get(fresh_id) is not delivery:
                continue               # answered meanwhile (an answer may close a peer)
            caller = self.wheels.get(delivery[0])
            publisher = self.wheels.get(delivery[2])
            if publisher is not None:  # it stays, its publisher's (see TIMED_OUT)
                store[fresh_id] = delivery[:6] + (TIMED_OUT,)
                publisher.context.timed_out += 1
            else:                      # held for a parked publisher: it goes now
                del store[fresh_id]
                self.away.release(delivery[2], fresh_id, caller and caller.context)
            if caller is not None:
                _call_over(caller.context, fresh_id, delivery[1])
            self.settled(fresh_id, delivery, False, "timed out")
            if publisher is not None:
                delivery[4].in_flight += 1   # settled, yet still at its publisher
            if caller is not None:
                _answer(caller, delivery[1], False, _dumps({
                    "error": "CallTimeout", "traceback": "",
                    "message": "no answer within %.3g s (the call's timeout)"
                               % (delivery[6] - delivery[5])}), pickled=True)
        self._deadline_timer = None
        if any(delivery[6] is not None and delivery[6] is not TIMED_OUT
               for delivery in store.values()):
            self._deadline_timer = self.reactor.call_later(
                max(DEADLINE_SWEEP, len(store) / SWEEP_RATE), self._expire)

    def cancel(self, data: dict, wheel_id: int) -> None:
        """A caller takes back its call ``call`` (its own request id). A call
        held for a parked publisher is failed here; one that its publisher
        has is forwarded as a ``cancel`` notice, if the publisher takes them,
        and the publisher answers it (at once, if it had not started it).
        Success payload: True if the call will not start (as far as this
        server can know), False if its publisher cannot be told."""
        peer: _Peer = self.wheels[wheel_id].context
        call_id = data.get("call")
        if peer.calls_by_id is None:
            return self.server.send_result(False, data, wheel_id, "Malformed message: cancel "
                                           "needs info with deadlines first")
        fresh_id = peer.calls_by_id.get(call_id) if type(call_id) is int else None
        delivery = self.store.get(fresh_id)
        if delivery is None or delivery[0] != wheel_id or delivery[1] != call_id:
            return self.server.send_result(False, data, wheel_id, "No call %s of this "
                                           "connection is waiting to be cancelled"
                                           % _show(call_id))
        publisher = self.wheels.get(delivery[2])
        if publisher is None:          # held: it goes now, and is answered as cancelled
            del self.store[fresh_id]
            self.away.release(delivery[2], fresh_id, peer)
            _call_over(peer, fresh_id, call_id)
            self.settled(fresh_id, delivery, False, "cancelled")
            _answer(self.wheels[wheel_id], call_id, False,
                    "Call cancelled by its caller before it started")
            return self.server.send_result(True, data, wheel_id, True)
        # one notice per call: the call is no longer the caller's to cancel (a
        # flood of cancels of one call would otherwise flood its publisher)
        del peer.calls_by_id[call_id]
        told = publisher.context.calls_by_id is not None
        if told:
            _send_own(publisher, {"type": "cancel", "call": fresh_id})
        self.server.send_result(True, data, wheel_id, told)

    def went_away(self, fresh_id: int, delivery: tuple) -> None:
        """A call its publisher will never answer, taken from the store: its
        caller, if still here, is told."""
        failure = "Session '%s' went away before answering" % delivery[3]
        self.settled(fresh_id, delivery, False, failure)
        caller = self.wheels.get(delivery[0])
        if caller is not None:
            _call_over(caller.context, fresh_id, delivery[1])
            if delivery[6] is not TIMED_OUT:    # (answered at its deadline)
                _answer(caller, delivery[1], False, failure)

    def session_gone(self, session: _Session) -> None:
        """A session left the store: its counts join the totals, and its
        subscribers get a ``rescinded`` notice."""
        self.stats.retire(session.calls)
        notice = {"type": "rescinded", "id": -1, "to": session.alias}
        for subscriber_id in list(session.subscribers):    # a write may close a subscriber
            subscriber = self.wheels.get(subscriber_id)
            if subscriber is not None and _send_own(subscriber, notice):
                log.warning("the rescinded notice of '%s' exceeds the max_frame of connection "
                            "%d: not sent (its calls will fail as 'doesn't exist')",
                            _printable(session.alias), subscriber_id)

    # calls held for a publisher away (_GraceWindow)

    def hand_over(self, fresh_id: int, wheel_id: int, publisher: _Peer) -> None:
        """A held call goes to connection ``wheel_id``, which took its session over."""
        delivery = self.store[fresh_id]
        self.store[fresh_id] = delivery[:2] + (wheel_id,) + delivery[3:]
        _add(publisher, "calls_served", fresh_id)

    def forget(self, fresh_id: int, caller: _Peer) -> None:
        """A held call leaves the store unsent, to be settled and answered."""
        _call_over(caller, fresh_id, self.store.pop(fresh_id)[1])

    # the ends of connections and of the server

    def connection_ended(self, wheel_id: int, peer: _Peer) -> None:
        """A connection ended: the calls it made leave the store (settled;
        one held for a publisher away takes its bytes with it), and so do the
        calls it had, whose callers are told. Its sessions must have left
        the store first (Server._on_wheel_closed): telling a caller may close
        it, and its own cleanup must find nothing half removed."""
        store = self.store
        unanswered = []
        for fresh_id in peer.calls_served or ():
            delivery = store.pop(fresh_id, None)
            if delivery is not None:
                unanswered.append((fresh_id, delivery))
        for fresh_id in peer.calls_made or ():
            delivery = store.pop(fresh_id, None)
            if delivery is not None:
                self.settled(fresh_id, delivery, False, "its caller left")
                publisher = self.wheels.get(delivery[2])
                if publisher is not None:
                    publisher.context.calls_served.discard(fresh_id)
                else:                  # held for a parked publisher: it goes, and its bytes
                    self.away.release(delivery[2], fresh_id, peer)
        for fresh_id, delivery in unanswered:
            self.went_away(fresh_id, delivery)

    def stop(self) -> None:
        """The server stops: every waiting call fails. Every answer is
        written before any connection closes: a write may close its
        connection, whose cleanup must find no call left to answer."""
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        waiting, self.store = self.store, {}
        for fresh_id, delivery in waiting.items():
            self.settled(fresh_id, delivery, False, "Server is shutting down")
            caller = self.wheels.get(delivery[0])
            if caller is not None and delivery[6] is not TIMED_OUT:
                _answer(caller, delivery[1], False, "Server is shutting down")


class _GraceWindow:
    """Resumption (PROTOCOL.md 7.3): a publisher's sessions outlive its
    connection for the grace window. A connection that asked for a resume
    token and ends without a goodbye is parked: its sessions stay, calls to
    them are held (``hold``) until it resumes with its token, or a publisher
    publishes them again with the same name and method table, and both take
    them over with the calls held; or until the window ends, and they go.
    Peers that never ask for a token are not affected."""

    __slots__ = ("server", "router", "wheels", "sessions", "reactor", "tokens", "parked",
                 "parked_wheels", "held_bytes")

    def __init__(self, server: "Server", router: _Router):
        self.server = server           # its grace, limits and send_result, read as used
        self.router = router           # whose store holds the held calls' deliveries
        self.wheels: Dict[int, Wheel] = server.wheels
        self.sessions: Dict[str, _Session] = server.sessions
        self.reactor = server.reactor
        self.tokens: Dict[str, int] = {}          # resume token -> its live connection
        self.parked: Dict[str, _Parked] = {}      # resume token -> a departed publisher's state
        self.parked_wheels: Dict[int, _Parked] = {}   # ... the same, by its old connection
        self.held_bytes = 0            # of the calls held for every parked publisher

    def resume(self, data: dict, wheel_id: int) -> None:
        """Without a token: make this connection resumable and give it one.
        With one: take over the sessions of the departed connection it was
        given to, and the calls held for them; a new token comes back."""
        if self.server.grace <= 0:
            return self.server.send_result(False, data, wheel_id, "Resume is off: this server "
                                           "has no grace window (Server(grace=...), --grace)")
        peer: _Peer = self.wheels[wheel_id].context
        token = data.get("token")
        resumed: list = []
        held: list = []
        if token is not None:
            if type(token) is not str or (token not in self.parked and token not in
                                          self.tokens) or self.tokens.get(token) == wheel_id:
                return self.server.send_result(False, data, wheel_id,
                                               "Unknown or expired resume token")
            old = self.wheels.get(self.tokens.get(token))
            if old is not None:
                # its old connection is still open here (half-open: the publisher
                # saw it die first): the token proves whose it is, so it goes,
                # parking what it published for this one to take over
                old.close("replaced by connection %d, which resumed it" % wheel_id)
            parked = self.parked.get(token)
            if parked is not None:
                resumed = sorted(parked.published)
                held = self._take_over(parked, wheel_id, resumed)
                log.info("connection %d resumed %s of connection %d", wheel_id,
                         _plural(len(resumed), "session"), parked.wheel_id)
        if peer.token is not None:
            del self.tokens[peer.token]
        # A token stays its publisher's across resumptions: if this answer is
        # lost with the connection, the same token resumes on the next one.
        peer.token = token or secrets.token_urlsafe(24)
        self.tokens[peer.token] = wheel_id
        self._send_held(wheel_id, held, lambda: self.server.send_result(
            True, data, wheel_id, {"token": peer.token, "grace": self.server.grace,
                                   "resumed": resumed}))

    def published_again(self, parked: _Parked, alias: str, data: dict, wheel_id: int) -> None:
        """A publish of a parked session with its name and method table: a
        restarted publisher (or the same one, whose resume token was lost
        with an answer) takes it over at once, with the calls held for it."""
        log.info("connection %d published '%s' again: it takes it over from connection %d, "
                 "which is away", wheel_id, alias, parked.wheel_id)
        self._send_held(wheel_id, self._take_over(parked, wheel_id, [alias]),
                        lambda: self.server.send_result(True, data, wheel_id, alias))

    def _send_held(self, wheel_id: int, held: list, answer: Callable[[], None]) -> None:
        """Answer the request that took sessions over, then send the calls
        held for them, in the order they came."""
        answer()
        wheel = self.wheels[wheel_id]
        for body in held:
            if not wheel.is_open:
                break                  # its cleanup has answered the rest
            wheel.write_frame(body)

    def hold(self, wheel_id: int, fresh_id: int, body, caller: _Peer, alias: str
             ) -> Optional[str]:
        """Keep a call to a session of parked connection ``wheel_id`` for its
        publisher's return; or say why not. What is held is bounded three
        ways (a live publisher's callers are paused; a parked one cannot
        drain, so calls past a bound fail instead): for one publisher, by
        what fits its resuming connection's output at once; for one caller,
        so that it cannot take the room of everyone else; and for the whole
        server."""
        parked = self.parked_wheels[wheel_id]
        size = len(body) if type(body) is bytes else sum(map(len, body))
        room = self.server.max_write_buffer
        for held, limit, whose in (
                (parked.held_bytes, room // HELD_PER_PUBLISHER, "wait for it"),
                (caller.held_bytes, room // HELD_PER_CALLER,
                 "of this connection wait for publishers that are away"),
                (self.held_bytes, room * HELD_IN_TOTAL,
                 "wait for publishers that are away")):
            if held + size > limit:
                return "Session '%s' is away, and %d bytes of calls already %s (at most %d)" % (
                    alias, held, whose, limit)
        parked.held_bytes += size
        caller.held_bytes += size
        self.held_bytes += size
        parked.held[fresh_id] = body
        return None

    def release(self, wheel_id: int, fresh_id: int, caller: Optional[_Peer]) -> None:
        """A call held for parked connection ``wheel_id`` goes (failed,
        cancelled, or its caller left): its bytes with it."""
        self._release(self.parked_wheels.get(wheel_id), fresh_id, caller)

    def _release(self, parked: Optional[_Parked], fresh_id: int,
                 caller: Optional[_Peer]) -> Any:
        """Take a held call out of what is counted; returns its frame (None if
        it was not held)."""
        body = parked.held.pop(fresh_id, None) if parked is not None else None
        if body is not None:
            size = len(body) if type(body) is bytes else sum(map(len, body))
            parked.held_bytes -= size
            self.held_bytes -= size
            if caller is not None:
                caller.held_bytes -= size
        return body

    def _take_over(self, parked: _Parked, wheel_id: int, aliases: list) -> list:
        """Give ``aliases``, sessions of a parked publisher, and the calls held
        for them, to connection ``wheel_id``; returns the frames to send it. A
        parked publisher left with no session is forgotten."""
        peer = self.wheels[wheel_id].context
        for alias in aliases:
            parked.published.remove(alias)
            self.sessions[alias].wheel_id = wheel_id
            _add(peer, "published", alias)
        frames = []
        too_large = []
        for fresh_id in list(parked.held):
            delivery = self.router.store[fresh_id]   # (a caller that left took its own)
            if delivery[3] in aliases:
                caller = self.wheels.get(delivery[0])
                frame = self._release(parked, fresh_id, caller and caller.context)
                size = len(frame) if type(frame) is bytes else sum(map(len, frame))
                if peer.max_frame is not None and size > peer.max_frame:
                    self.router.forget(fresh_id, caller.context)   # too large for it
                    too_large.append((fresh_id, delivery, size))
                    continue
                frames.append(frame)
                self.router.hand_over(fresh_id, wheel_id, peer)
        if not parked.published:
            parked.timer.cancel()
            del self.parked_wheels[parked.wheel_id]
            del self.parked[parked.token]
        for fresh_id, delivery, size in too_large:     # told once the stores agree
            failure = "Call of %d bytes exceeds the max_frame of the publisher of '%s' " \
                      "(%d bytes)" % (size, delivery[3], peer.max_frame)
            self.router.settled(fresh_id, delivery, False, failure)
            caller = self.wheels.get(delivery[0])
            if caller is not None:
                _answer(caller, delivery[1], False, failure)
        return frames

    def parked_for(self, wheel_id: int) -> Optional[_Parked]:
        """What is kept of connection ``wheel_id``, if it is away."""
        return self.parked_wheels.get(wheel_id)

    def goodbye(self, peer: _Peer) -> None:
        """The peer is leaving on purpose: its sessions go with its connection."""
        if peer.token is not None:
            del self.tokens[peer.token]
            peer.token = None

    def left(self, wheel_id: int, peer: _Peer) -> None:
        """A connection ended: one that was given a token parks what it
        published (which leaves ``peer.published``: it stays in the
        server's sessions)."""
        if peer.token is not None:
            del self.tokens[peer.token]
            if peer.published:
                self._park(wheel_id, peer)
                peer.published = None

    def _park(self, wheel_id: int, peer: _Peer) -> None:
        """Keep a departed publisher's sessions for the grace window (its
        ``published`` are all its own: a connection publishes only free aliases)."""
        published = set(peer.published)
        timer = self.reactor.call_later(self.server.grace, self._ended, peer.token)
        parked = _Parked(wheel_id, peer.token, published, timer)
        self.parked[peer.token] = parked
        self.parked_wheels[wheel_id] = parked
        log.info("connection %d left without a goodbye: its %s wait %.3g s for it to resume",
                 wheel_id, _plural(len(published), "session"), self.server.grace)

    def _ended(self, token: str) -> None:
        """Nobody resumed: everything proceeds as if the connection had just ended."""
        parked = self.parked.pop(token, None)
        if parked is None:
            return
        del self.parked_wheels[parked.wheel_id]
        gone = [self.sessions.pop(alias) for alias in parked.published]
        for fresh_id in list(parked.held):
            delivery = self.router.store.pop(fresh_id, None)
            if delivery is None:       # its caller left meanwhile (an answer, written, may
                self._release(parked, fresh_id, None)   # close one): it took its calls
                continue
            caller = self.wheels.get(delivery[0])
            self._release(parked, fresh_id, caller and caller.context)
            self.router.went_away(fresh_id, delivery)
        for session in gone:
            log.info("session '%s' went away: connection %d did not resume within %.3g s",
                     session.alias, parked.wheel_id, self.server.grace)
            self.router.session_gone(session)


class _Waits:
    """Subscribes that wait for their alias (PROTOCOL.md 7.5): each one is
    answered with success when the alias is published (``published``), or
    with the usual failure when its wait ends, each wait a timer."""

    __slots__ = ("sessions", "wheels", "reactor", "awaited")

    def __init__(self, server: "Server"):
        self.sessions: Dict[str, _Session] = server.sessions
        self.wheels: Dict[int, Wheel] = server.wheels
        self.reactor = server.reactor
        # alias -> {(connection, request id): its timer}: subscribes waiting for it
        self.awaited: Dict[str, Dict[Tuple[int, int], _Timer]] = {}

    def wait(self, alias: str, msg_id: int, wheel_id: int, wait: float) -> None:
        """Subscribe ``msg_id`` of connection ``wheel_id`` waits ``wait`` seconds."""
        peer: _Peer = self.wheels[wheel_id].context
        awaiting = peer.awaiting
        if awaiting is None:
            awaiting = peer.awaiting = {}
        if msg_id in awaiting or len(awaiting) >= MAX_WAITING_SUBSCRIBES:
            return _answer(self.wheels[wheel_id], msg_id, False, (
                "Malformed message: a subscribe with id %d already waits" % msg_id
                if msg_id in awaiting else "Too many subscribes waiting: connection %d has %d "
                "(MAX_WAITING_SUBSCRIBES)" % (wheel_id, MAX_WAITING_SUBSCRIBES)))
        key = (wheel_id, msg_id)
        self.awaited.setdefault(alias, {})[key] = self.reactor.call_later(
            wait, self._ended, alias, key)
        awaiting[msg_id] = alias

    def _ended(self, alias: str, key: Tuple[int, int]) -> None:
        """The wait passed with no publish: the answer a subscribe gets at once."""
        self.stop(alias, key)
        _answer(self.wheels[key[0]], key[1], False, "Session '%s' doesn't exist" % alias)

    def stop(self, alias: str, key: Tuple[int, int]) -> None:
        """The subscribe ``key`` (connection, request id) waits no more."""
        waiting = self.awaited[alias]
        waiting.pop(key).cancel()
        if not waiting:
            del self.awaited[alias]
        wheel = self.wheels.get(key[0])
        if wheel is not None:
            del wheel.context.awaiting[key[1]]

    def connection_ended(self, wheel_id: int, peer: _Peer) -> None:
        """A connection ended: its subscribes wait no more."""
        for msg_id, alias in list((peer.awaiting or {}).items()):
            self.stop(alias, (wheel_id, msg_id))

    def cancel(self, wheel_id: int, call_id: Any) -> bool:
        """Cancel a waiting subscribe (PROTOCOL.md 7.7), answered as
        cancelled; False if ``call_id`` is none of this connection's."""
        awaiting = self.wheels[wheel_id].context.awaiting
        if type(call_id) is not int or not awaiting or call_id not in awaiting:
            return False
        self.stop(awaiting[call_id], (wheel_id, call_id))
        _answer(self.wheels[wheel_id], call_id, False, "Subscribe cancelled by its caller")
        return True

    def published(self, session: _Session,
                  subscribed: Callable[[_Session, int, int, bytes], None]) -> None:
        """An alias was published: the subscribes waiting for it succeed,
        each made a subscriber by ``subscribed``."""
        alias = session.alias
        if alias not in self.awaited:
            return
        methods = _dumps({"session": alias, "methods": session.methods})   # once for all
        for key in list(self.awaited[alias]):
            # a write may close a waiter (its cleanup takes its own waits), or
            # the publisher itself, and its session with it
            if self.sessions.get(alias) is not session:
                break
            if key in self.awaited.get(alias, ()):
                self.stop(alias, key)
                subscribed(session, *key, methods)


class Server:
    """Hosts published sessions and routes proxied messages, after
    POEx::ProxySession::Server.

    For the caller: ``start()`` binds and listens (``listen_port=0`` picks a
    free port, read it back from ``address``), ``stop()`` closes everything,
    failing every waiting call. The reactor (``reactor=``, default the
    module's) runs it: ``proxysession.run()``.

    May be overridden: the handlers, named after the original's events:
    ``handle_inbound_data`` dispatches a decoded message to
    ``publish_session``, ``rescind_session``, ``get_listing``,
    ``subscribe_session``, ``deliver_message`` and ``handle_delivered``,
    and the extensions ``get_info``, ``answer_ping``, ``get_stats`` and
    ``cancel_call`` (PROTOCOL.md 7);
    ``send_result`` answers a request.

    The stores: ``sessions`` (alias -> session) and ``delivered_store``
    (fresh id -> waiting call), with the original's accessors
    (``get_session`` ... ``has_session``, ``get_delivered`` ... ``has_delivered``).
    Its parts: the calls in flight are routed by a _Router, which keeps the
    ``delivered_store``; resumption is its _GraceWindow's; subscribes that
    wait for their alias are _Waits'.

    What it has done: ``statistics()`` (statistics); ``monitor=(host, port)``
    serves them over HTTP as well (monitor), on the same reactor.
    """

    # Slots, because every handler reads a few of these per message: CPython
    # specialises attribute reads of an instance whose attributes fit a small
    # shared table (fewer than 30), and past that each costs a dict lookup
    # (measured: 5% of a routed call). ``__dict__`` keeps a subclass, or a
    # user, free to add attributes of their own.
    __slots__ = ("listen_ip", "listen_port", "alias", "options", "reactor", "authkey",
                 "ssl_context", "max_frame", "max_write_buffer", "high_water",
                 "handshake_timeout", "insecure_no_auth", "max_waiting_calls", "grace", "stats",
                 "sessions", "wheels", "address", "_listener", "_wheel_ids", "_router", "_grace",
                 "_at_file_limit", "_handlers", "_pass_on", "_waits", "__dict__",
                 "__weakref__")

    def __init__(self, listen_ip: str = DEFAULT_HOST, listen_port: int = DEFAULT_PORT,
                 alias: str = "Server", options: Optional[dict] = None,
                 reactor: Optional[Reactor] = None, authkey: Optional[bytes] = None,
                 ssl_context: Optional[ssl.SSLContext] = None, max_frame: int = MAX_FRAME,
                 max_write_buffer: int = MAX_WRITE_BUFFER, high_water: int = HIGH_WATER,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, insecure_no_auth: bool = False,
                 max_waiting_calls: int = MAX_WAITING_CALLS, grace: float = 0.0,
                 monitor: Optional[Tuple[str, int]] = None):
        authkey = _authkey_bytes(authkey)
        self.listen_ip = listen_ip
        self.listen_port = listen_port
        self.alias = alias
        self.options = dict(options or {})
        self.reactor = reactor or get_reactor()
        self.authkey = authkey
        self.ssl_context = ssl_context
        self.max_frame = max_frame
        self.max_write_buffer = max_write_buffer
        self.high_water = high_water
        self.handshake_timeout = handshake_timeout
        self.insecure_no_auth = insecure_no_auth
        self.max_waiting_calls = max_waiting_calls
        if not isinstance(grace, (int, float)) or isinstance(grace, bool) or \
                not 0 <= grace < float("inf"):
            raise ValueError("grace must be a finite number of seconds >= 0, not %r" % (grace,))
        self.grace = float(grace)
        if monitor is not None and not (isinstance(monitor, tuple) and len(monitor) == 2 and
                                        type(monitor[0]) is str and type(monitor[1]) is int):
            raise ValueError("monitor must be a (host, port) tuple, not %r" % (monitor,))
        self.stats = _ServerStats(monitor)
        self.sessions: Dict[str, _Session] = {}
        self.wheels: Dict[int, Wheel] = {}
        self.address: Optional[Tuple[str, int]] = None
        self._listener: Optional[socket.socket] = None
        self._wheel_ids = itertools.count(1)
        self._at_file_limit = False
        self._router = _Router(self)   # the calls in flight
        self._grace = self._router.away   # and the publishers away, with calls held for them
        self._waits = _Waits(self)     # subscribes that wait for their alias
        self._handlers = {
            "publish": self.publish_session,
            "rescind": self.rescind_session,
            "listing": self.get_listing,
            "subscribe": self.subscribe_session,
            "deliver": self.deliver_message,
            "result": self.handle_delivered,
            "info": self.get_info,
            "ping": self.answer_ping,
            "stats": self.get_stats,
            "resume": self.resume_session,
            "goodbye": self.say_goodbye,
            "cancel": self.cancel_call,
        }
        # Where a subclass keeps the handlers of calls and answers, the router's
        # own are called (a call less per message), and compact ones are passed
        # on from their header (_Router.pass_on) unless a trace asks to see
        # each; a subclass that handles them itself sees every one.
        own = type(self)
        routes = (own.deliver_message, own.handle_delivered,
                  own.handle_inbound_data) == _SERVER_ROUTING
        if routes:
            self._handlers["deliver"] = self._router.deliver
            self._handlers["result"] = self._router.answered
        self._pass_on = self._router.pass_on if routes and self._router.traced is None else None

    def __repr__(self):
        return "<Server %s at %s sessions=%d connections=%d waiting=%d>" % (
            self.alias, self.address, len(self.sessions), len(self.wheels),
            len(self.delivered_store))

    # the stores, under the original's accessor names

    @property
    def delivered_store(self) -> Dict[int, tuple]:
        """Fresh id -> a routed call waiting for its answer (see TIMED_OUT)."""
        return self._router.store

    @delivered_store.setter
    def delivered_store(self, store: Dict[int, tuple]) -> None:
        self._router.store = store

    def get_session(self, alias): return self.sessions.get(alias)
    def set_session(self, alias, session): self.sessions[alias] = session
    def delete_session(self, alias): return self.sessions.pop(alias, None)
    def count_sessions(self): return len(self.sessions)
    def all_session_names(self): return list(self.sessions)
    def has_session(self, alias): return alias in self.sessions

    def get_delivered(self, key): return self.delivered_store.get(key)
    def set_delivered(self, key, value): self.delivered_store[key] = value
    def delete_delivered(self, key): return self.delivered_store.pop(key, None)
    def count_delivereds(self): return len(self.delivered_store)
    def all_delivered_keys(self): return list(self.delivered_store)
    def all_delivered_values(self): return list(self.delivered_store.values())
    def has_delivered(self, key): return key in self.delivered_store

    # listening

    def start(self) -> "Server":
        """Bind and listen now, and serve the monitor if asked to. Raises
        ``ProxyError`` when protected mode refuses an address, ``OSError``
        (with the address in its text) when one cannot be bound."""
        host = self.listen_ip
        self._check_protected(host, "listen", "anyone who can reach the port could publish "
                              "and call sessions")
        if self.stats.monitor_at is not None:
            self._check_protected(self.stats.monitor_at[0], "serve the monitor", "anyone who "
                                  "can reach it could read the aliases and the addresses of the "
                                  "peers (the monitor asks for no key even when the broker has "
                                  "one: with a key set, firewall the monitor's port)")
        _raise_file_limit()
        listener = _listening_socket(host, self.listen_port, socket.SOMAXCONN)
        self._listener = listener
        self.address = listener.getsockname()[:2]
        self.listen_port = self.address[1]
        if self.stats.monitor_at is not None:
            try:
                self.stats.monitor = _Monitor(self, *self.stats.monitor_at)
            except OSError:
                self._listener = None
                listener.close()
                raise
        self.reactor.register(listener, _EVENT_READ, self._on_acceptable)
        self.stats.sampler = self.reactor.call_later(SAMPLE_INTERVAL, self._sample)
        log.info("%s listening on %s:%d%s%s", self.alias, self.address[0], self.address[1],
                 " with TLS" if self.ssl_context else "",
                 " with authkey" if self.authkey else "")
        return self

    def _check_protected(self, host: str, what: str, why: str) -> None:
        """Protected mode: no address but loopback without an authkey."""
        if not _is_loopback(host) and self.authkey is None and not self.insecure_no_auth:
            raise ProxyError(
                "refusing to %s on %s without an authkey (protected mode): %s. Set a key with "
                "--authkey-file PATH or the PROXYSESSION_AUTHKEY variable (authkey= in "
                "Python), or use 127.0.0.1; --insecure-no-auth (insecure_no_auth=True) turns "
                "this check off." % (what, host or "every address", why))

    def _on_acceptable(self, mask) -> None:
        failed = _accept_some(self.reactor, self._listener, self._accepted,
                              self._resume_accepting)
        if failed is None:
            return
        if failed.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            log.error("accept failed (%s): not accepting for %.1f s", failed, ACCEPT_RETRY_DELAY)
        elif not self._at_file_limit:
            log.error("at the open file limit with %d connections (%s): not accepting for "
                      "%.1f s", len(self.wheels), failed, ACCEPT_RETRY_DELAY)
            self._at_file_limit = True

    def _accepted(self, sock: socket.socket, address) -> None:
        self._at_file_limit = False
        wheel_id = next(self._wheel_ids)
        peer = "%s:%d" % address[:2]
        wheel = Wheel(self.reactor, sock, wheel_id, on_frame=self._on_frame,
                      on_close=self._on_wheel_closed, on_open=self._on_wheel_open,
                      peer=peer, server_side=True, max_frame=self.max_frame,
                      max_write_buffer=self.max_write_buffer,
                      low_water=self.high_water // 2, ssl_context=self.ssl_context,
                      authkey=self.authkey, handshake_timeout=self.handshake_timeout)
        if not wheel.closed:
            wheel.context = _Peer()
            self.wheels[wheel_id] = wheel
            log.debug("connection %d from %s", wheel_id, peer)

    def _resume_accepting(self) -> None:
        if self._listener is not None:
            self.reactor.register(self._listener, _EVENT_READ, self._on_acceptable)

    def _on_wheel_open(self, wheel: Wheel) -> None:
        if self.authkey is not None or self.ssl_context is not None:
            log.debug("connection %d from %s is through its handshake", wheel.wheel_id, wheel.peer)

    def stop(self) -> None:
        """Stop accepting, answer every waiting call with a failure, close."""
        if self._listener is not None:
            self.reactor.unregister(self._listener)
            self._listener.close()
            self._listener = None
        stats = self.stats
        if stats.sampler is not None:
            stats.sampler.cancel()
            stats.sampler = None
        if stats.monitor is not None:
            stats.monitor.close()
            stats.monitor = None
        self._router.stop()            # every waiting call answered, before any closes
        for session in self.sessions.values():
            # nothing was rescinded: its subscribers lose their connection, and
            # their Clients subscribe again, and wait, once a server is back
            session.subscribers.clear()
        for wheel in list(self.wheels.values()):
            wheel.close("server is shutting down")
        log.info("%s stopped", self.alias)

    # inbound

    def _on_frame(self, body: bytes, wheel: Wheel) -> None:
        """A frame from a connection: a compact call or answer is passed on
        from its header (_Router.pass_on), anything else is decoded and
        handled. Either way, a connection whose own output lags past the
        high-water mark stops being read: it is not reading its answers."""
        pass_on = self._pass_on
        if pass_on is None or body[:1] != b"\xff" or wheel.decode is not _decode_envelope or \
                not pass_on(body, wheel):
            try:
                message = wheel.decode(body)
            except Exception as exc:   # whatever a hostile body raises: answer, stay open
                log.warning("connection %d from %s sent an undecodable message: %s",
                            wheel.wheel_id, wheel.peer, exc)
                _answer(wheel, -1, False, "Malformed message: %s" % (exc,))
            else:
                msg_id = message.get("id") if type(message) is dict else None
                if type(msg_id) is int and -ID_RANGE <= msg_id < ID_RANGE and \
                        type(message.get("type")) is str:
                    self._router.frame_size = len(body)
                    self.stats.messages += 1
                    self.handle_inbound_data(message, wheel.wheel_id)
                else:
                    _answer(wheel, msg_id if type(msg_id) is int and -ID_RANGE <= msg_id <
                            ID_RANGE else -1, False, "Malformed message: want a dict with a "
                            "str 'type' and an int 'id' in [-2**63, 2**63)")
        if wheel.out_size > self.high_water and not wheel.closed:
            wheel.wait_for_drain(wheel)

    def handle_inbound_data(self, data: dict, wheel_id: int) -> None:
        """Dispatch one message by its type."""
        if self._router.traced is not None:
            log.debug("connection %d: %s id=%d to=%s", wheel_id, _quote(data["type"]),
                      data["id"], _quote(data.get("to")))
        handler = self._handlers.get(data["type"])
        if handler is None:
            self.send_result(False, data, wheel_id,
                             "Unknown message type '%s'" % _quote(data["type"]))
        else:
            handler(data, wheel_id)

    def send_result(self, success: bool, original: dict, wheel_id: int,
                    payload: Any = None) -> None:
        """Answer ``original`` on connection ``wheel_id``."""
        wheel = self.wheels.get(wheel_id)
        if wheel is not None:
            _answer(wheel, original["id"], success, payload)

    def _payload(self, data: dict, wheel_id: int) -> Optional[dict]:
        """The decoded dict payload of a publish or rescind, or None after
        answering with the reason."""
        payload = data.get("payload")
        try:
            if type(payload) in _PAYLOAD_TYPES:
                _check_payload(payload, _TREE_OPCODES)
                value = _loads_plain(payload)
            else:
                value = None
        except Exception as exc:
            self.send_result(False, data, wheel_id, "Malformed payload: %s" % (exc,))
            return None
        if type(value) is not dict:
            self.send_result(False, data, wheel_id, "Malformed payload: want a pickled dict")
            return None
        return value

    def publish_session(self, data: dict, wheel_id: int) -> None:
        """Publish a session; success payload: its alias."""
        payload = self._payload(data, wheel_id)
        if payload is None:
            return
        alias = payload.get("session_alias")
        name = payload.get("session_name")
        methods = payload.get("methods")
        shared = payload.get("shared", False)
        fault = _alias_fault(alias, "Session alias must be defined")
        if fault:
            return self.send_result(False, data, wheel_id, fault)
        if type(shared) is not bool:
            return self.send_result(False, data, wheel_id, "Malformed payload: shared must be "
                                    "True or False, not %s" % _show(shared))
        session = self.sessions.get(alias)
        if session is not None and shared:
            return self._join_shared(session, name, methods, data, wheel_id)
        if session is not None:
            parked = self._grace.parked_for(session.wheel_id)
            if parked is None or name != session.name or methods != session.methods:
                return self.send_result(False, data, wheel_id,
                                        "Session '%s' already exists" % alias)
            return self._grace.published_again(parked, alias, data, wheel_id)
        if not _is_name(name):
            return self.send_result(False, data, wheel_id, "Session name is required"
                                    if not name else "Session name must be a str of at most "
                                    "%d characters" % MAX_NAME)
        fault = _method_table_fault(methods)
        if fault:
            return self.send_result(False, data, wheel_id, "Malformed method table: " + fault)
        session = self.sessions[alias] = _Session(alias, name, methods, wheel_id, shared)
        _add(self.wheels[wheel_id].context, "published", alias)
        log.info("connection %d published '%s' (%s%s)", wheel_id, alias,
                 _plural(len(methods), "method"), ", shared" if shared else "")
        self.send_result(True, data, wheel_id, alias)
        self._waits.published(session, self._subscribed)

    def _join_shared(self, session: _Session, name: Any, methods: Any, data: dict,
                     wheel_id: int) -> None:
        """A shared publish of an alias there is: the connection joins it as
        a member if the session is shared, with the same name and method
        table, and not its member yet."""
        members = session.members
        if members is None or wheel_id in members or name != session.name or \
                methods != session.methods:
            return self.send_result(False, data, wheel_id,
                                    "Session '%s' already exists" % session.alias)
        members.append(wheel_id)
        _add(self.wheels[wheel_id].context, "published", session.alias)
        log.info("connection %d joined '%s' (%s)", wheel_id, session.alias,
                 _plural(len(members), "member"))
        self.send_result(True, data, wheel_id, session.alias)

    def _leave_shared(self, session: _Session, wheel_id: int, why: str) -> None:
        """A member rescinds a shared session: no new calls go to it; the
        calls it has are its own. The last one to leave takes the session
        with it. (A member whose connection goes is taken out by
        _on_wheel_closed, which tells the others only once its stores agree.)"""
        if _drop_member(session, wheel_id):
            self._remove_session(session, why)
        else:
            log.info("connection %d left '%s' (%s): %s left", wheel_id, session.alias, why,
                     _plural(len(session.members), "member"))

    def rescind_session(self, data: dict, wheel_id: int) -> None:
        """Rescind a session this connection published; no payload on success."""
        payload = self._payload(data, wheel_id)
        if payload is None:
            return
        alias = payload.get("session_alias")
        fault = _alias_fault(alias, "Session alias is required")
        if fault:
            return self.send_result(False, data, wheel_id, fault)
        session = self.sessions.get(alias)
        if session is None:
            return self.send_result(False, data, wheel_id, "Session '%s' doesn't exist" % alias)
        if (wheel_id not in session.members) if session.members else session.wheel_id != wheel_id:
            return self.send_result(False, data, wheel_id,
                                    "Session '%s' was published by another connection" % alias)
        if session.members:            # drains: its calls in flight are still answered
            self.wheels[wheel_id].context.published.discard(alias)
            self._leave_shared(session, wheel_id, "rescinded")
        else:
            self._remove_session(session, "rescinded")
        self.send_result(True, data, wheel_id)

    def _remove_session(self, session: _Session, why: str) -> None:
        if self.sessions.get(session.alias) is session:
            del self.sessions[session.alias]
        publisher = self.wheels.get(session.wheel_id)
        if publisher is not None and publisher.context.published:
            publisher.context.published.discard(session.alias)
        log.info("session '%s' of connection %d %s", session.alias, session.wheel_id, why)
        self._router.session_gone(session)

    def get_listing(self, data: dict, wheel_id: int) -> None:
        """List the published aliases, sorted; never fails."""
        self.send_result(True, data, wheel_id, sorted(self.sessions))

    def subscribe_session(self, data: dict, wheel_id: int) -> None:
        """Subscribe to ``to``; success payload: ``{session, methods}``. With
        ``wait`` (PROTOCOL.md 7.5), a subscribe to an alias not published yet
        is answered when it is, or with the usual failure once the wait ends."""
        alias = data.get("to")
        wait = data.get("wait")
        if wait is not None and (type(wait) not in (int, float) or
                                 not 0 <= wait <= MAX_SUBSCRIBE_WAIT):
            return self.send_result(False, data, wheel_id, "Malformed message: wait must be "
                                    "a number of seconds from 0 to %g, not %s"
                                    % (MAX_SUBSCRIBE_WAIT, _show(wait)))
        session = self.sessions.get(alias) if type(alias) is str else None
        if session is None:
            if wait and _is_name(alias):
                return self._waits.wait(alias, data["id"], wheel_id, wait)
            return self.send_result(False, data, wheel_id,
                                    "Session '%s' doesn't exist" % _quote(alias))
        self._subscribed(session, wheel_id, data["id"])

    def _subscribed(self, session: _Session, wheel_id: int, msg_id: int,
                    answer: Optional[bytes] = None) -> None:
        """Make the connection a subscriber and say so; ``answer``: the
        success payload already pickled (one publish answers many waiters)."""
        session.subscribers.add(wheel_id)
        wheel = self.wheels[wheel_id]
        _add(wheel.context, "subscribed", session.alias)
        _answer(wheel, msg_id, True, answer if answer is not None else _dumps(
            {"session": session.alias, "methods": session.methods}), pickled=True)

    # calls: the router's

    def deliver_message(self, data: dict, wheel_id: int) -> None:
        """Route a call to the publisher of ``to`` under a fresh id; its
        payload goes through untouched (_Router.deliver)."""
        self._router.deliver(data, wheel_id)

    def handle_delivered(self, data: dict, wheel_id: int) -> None:
        """Route a publisher's result back to the caller, under the caller's
        id (_Router.answered)."""
        self._router.answered(data, wheel_id)

    def cancel_call(self, data: dict, wheel_id: int) -> None:
        """A caller takes back its call ``call`` (its own request id): a
        subscribe that waits for its alias stops here; a call goes to the
        router (_Router.cancel)."""
        if self.wheels[wheel_id].context.calls_by_id is not None and \
                self._waits.cancel(wheel_id, data.get("call")):
            return self.send_result(True, data, wheel_id, True)
        self._router.cancel(data, wheel_id)

    def get_info(self, data: dict, wheel_id: int) -> None:
        """What a client needs to know of this server (PROTOCOL.md 7.1); and,
        if it says, the client's own frame limit."""
        max_frame = data.get("max_frame")
        if max_frame is not None:
            if type(max_frame) is not int or not MAX_HANDSHAKE_FRAME <= max_frame < ID_RANGE:
                return self.send_result(False, data, wheel_id, "Malformed message: max_frame "
                                        "must be an int of bytes from %d to 2**63 - 1, not %s"
                                        % (MAX_HANDSHAKE_FRAME, _show(max_frame)))
            self.wheels[wheel_id].context.max_frame = max_frame
        if data.get("deadlines") is True:
            peer = self.wheels[wheel_id].context
            if peer.calls_by_id is None:
                peer.calls_by_id = {}
        if _offers_compact(data.get("compact")):      # both offered: from this answer on
            wheel = self.wheels[wheel_id]
            wheel.encode, wheel.decode = _encode_compact, _decode_envelope
        self.send_result(True, data, wheel_id, {
            "server": "proxysession", "version": __version__, "protocol": PROTOCOL_VERSION,
            "max_frame": self.max_frame, "max_waiting_calls": self.max_waiting_calls,
            "max_name": MAX_NAME, "grace": self.grace, "deadlines": True,
            "compact": COMPACT_VERSION})

    def answer_ping(self, data: dict, wheel_id: int) -> None:
        """A liveness check (PROTOCOL.md 7.2): success, no payload."""
        self.send_result(True, data, wheel_id)

    def get_stats(self, data: dict, wheel_id: int) -> None:
        """What this server has done (PROTOCOL.md 7.4): ``statistics()``."""
        self.send_result(True, data, wheel_id, self.statistics())

    # statistics: counted where calls are routed and settled (above); read here

    @property
    def monitor_address(self) -> Optional[Tuple[str, int]]:
        """The (ip, port) the monitor serves on, once started with one."""
        monitor = self.stats.monitor
        return None if monitor is None else monitor.address

    def _counted(self) -> Tuple[int, int]:
        return self.stats.count(session.calls for session in self.sessions.values())

    def statistics(self) -> dict:
        """What the server has done since it started: the totals (the
        monitor's ``/varz``), ``aliases`` (``/aliasz``) and
        ``connection_list`` (``/connz``), each list sorted and at most
        MAX_LISTED long; ``history``: (time, calls/s, failures/s) samples."""
        now = time.monotonic()
        stats = self.stats
        calls, failures = self._counted()
        aliases = []
        for alias in sorted(self.sessions)[:MAX_LISTED]:
            session = self.sessions[alias]
            entry = {"alias": alias, "publishers": list(session.members or [session.wheel_id]),
                     "shared": session.members is not None,
                     "away": self._grace.parked_for(session.wheel_id) is not None,
                     "subscribers": len(session.subscribers)}
            entry.update(session.calls.summary())
            aliases.append(entry)
        connections = []
        for wheel_id in sorted(self.wheels)[:MAX_LISTED]:
            wheel = self.wheels[wheel_id]
            peer: _Peer = wheel.context
            connections.append({
                "id": wheel_id, "address": wheel.peer, "age_s": round(now - peer.since, 3),
                "publications": sorted(peer.published or ()),
                "subscriptions": sorted(peer.subscribed or ()),
                "calls": peer.calls_sent, "answered": peer.calls_answered,
                "in_flight": len(peer.calls_made or ()), "queued_bytes": wheel.out_size})
        return {
            "server": "proxysession", "version": __version__, "name": self.alias,
            "address": _host_port(*self.address) if self.address else None,
            "started": stats.started_wall, "uptime_s": round(now - stats.started, 3),
            "connections": len(self.wheels), "sessions": len(self.sessions),
            "messages": stats.messages, "calls": calls, "failures": failures,
            "in_flight": len(self.delivered_store),
            "calls_per_s": stats.history[-1][1] if stats.history else 0.0,
            "aliases": aliases, "connection_list": connections,
            "history": [list(sample) for sample in stats.history]}

    def _sample(self) -> None:
        """Every SAMPLE_INTERVAL: the rates since the last sample."""
        interval = self.stats.sample(time.monotonic(), self._counted())
        for session in self.sessions.values():
            session.calls.sample(interval)
        self.stats.sampler = self.reactor.call_later(SAMPLE_INTERVAL, self._sample)

    def log_statistics(self) -> None:
        """Write the totals and one line per alias to the log (SIGUSR1)."""
        stats = self.statistics()
        log.info("%s: up %.0f s, %s, %s, %d calls (%d failed), %d in flight, %d messages",
                 self.alias, stats["uptime_s"], _plural(stats["connections"], "connection"),
                 _plural(stats["sessions"], "session"), stats["calls"], stats["failures"],
                 stats["in_flight"], stats["messages"])
        for entry in stats["aliases"]:
            log.info("  '%s': %d calls (%d failed), %d in flight, p50 %s ms, p99 %s ms, "
                     "published by connection %s", _printable(entry["alias"]), entry["calls"],
                     entry["failures"], entry["in_flight"], _ms(entry["latency_ms"]["p50"]),
                     _ms(entry["latency_ms"]["p99"]), entry["publishers"][0])

    # connections ending

    def _on_wheel_closed(self, wheel: Wheel, reason: str, error=None) -> None:
        """A connection ended (PROTOCOL.md 6.3). First everything it held leaves
        the stores, then the others are told: telling one may close it, and its
        own cleanup, run inside this one, must find nothing half removed."""
        wheel_id = wheel.wheel_id
        if self.wheels.pop(wheel_id, None) is None:
            log.debug("connection from %s closed before it was set up: %s", wheel.peer, reason)
            return
        level = logging.WARNING if reason.startswith(("protocol", "peer is not", "auth")) \
            else logging.DEBUG
        log.log(level, "connection %d from %s closed: %s", wheel_id, wheel.peer, reason)
        peer: _Peer = wheel.context
        gone = []
        for alias in [alias for alias in peer.published or ()
                      if self.sessions[alias].members is not None]:
            session = self.sessions[alias]     # shared: its member goes, not parked
            peer.published.discard(alias)
            if _drop_member(session, wheel_id):
                gone.append(self.sessions.pop(alias))
        self._grace.left(wheel_id, peer)    # (parked: its sessions stay in self.sessions)
        gone += [self.sessions.pop(alias) for alias in peer.published or ()
                 if alias in self.sessions]
        for alias in peer.subscribed or ():
            session = self.sessions.get(alias)
            if session is not None:
                session.subscribers.discard(wheel_id)
        self._waits.connection_ended(wheel_id, peer)
        self._router.connection_ended(wheel_id, peer)
        for session in gone:
            log.info("session '%s' of connection %d went away with its connection",
                     session.alias, wheel_id)
            self._router.session_gone(session)

    # resumption (PROTOCOL.md 7.3): the grace window's

    def resume_session(self, data: dict, wheel_id: int) -> None:
        """Make this connection resumable and give it a token; with a token,
        take over the sessions of the departed connection it was given to
        (_GraceWindow.resume)."""
        self._grace.resume(data, wheel_id)

    def say_goodbye(self, data: dict, wheel_id: int) -> None:
        """The peer is leaving on purpose: its sessions go with its connection."""
        self._grace.goodbye(self.wheels[wheel_id].context)
        self.send_result(True, data, wheel_id)


# Server's own handlers of calls and answers: a server whose class (a subclass,
# or Server patched) has others does not bypass them (Server.__init__)
_SERVER_ROUTING = (Server.deliver_message, Server.handle_delivered, Server.handle_inbound_data)


# ---------------------------------------------------------------------------
# monitor
# ---------------------------------------------------------------------------

MONITOR_MAX_REQUEST = 8192        # bytes of request line and headers: a browser's or a
                                  # scraper's take a few hundred; more is refused (431)
MONITOR_MAX_CONNECTIONS = 64      # HTTP connections at once; more are closed as they come,
                                  # so that idle ones cost a bounded few descriptors
MONITOR_TIMEOUT = 5.0             # seconds one HTTP connection has to send its request and
                                  # read the answer: a stalled one is closed, costing only itself
MONITOR_REFRESH = 5               # seconds between the page's reloads
MONITOR_COST_SHARE = 20           # the statistics are made again at most once per this many
                                  # times what making them took: scrapers in a loop get at most
                                  # 1/20 of the loop (listing 1,024 aliases takes tens of ms),
                                  # a small server's answers are fresh
_REQUEST_LINE = re.compile(rb"([A-Za-z]{1,16}) (\S{1,2048}) HTTP/1\.[01]")
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}
_PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Exchange:
    """One HTTP connection to the monitor: one request in, one answer out.
    ``answer`` is None while the request comes, the rest of the answer while
    it goes, and empty once it went: then what the client still sends is
    read and dropped until it closes (a close with unread input would reset
    the connection, losing the answer; nginx's "lingering close")."""

    __slots__ = ("sock", "handler", "received", "answer", "timer")

    def __init__(self, sock):
        self.sock = sock
        self.handler: Optional[Callable[[int], None]] = None
        self.received = bytearray()
        self.answer: Optional[memoryview] = None
        self.timer: Optional[_Timer] = None


class _Monitor:
    """A Server's statistics over HTTP GET, served by the server's reactor:
    JSON for programs (``/healthz``, ``/varz``, ``/connz``, ``/aliasz``),
    Prometheus' text format for scrapers (``/metrics``) and a page for people
    (``/``). Reading what the server counted is all it does: no request can
    change routing state, and every socket is non-blocking, so a slow or
    hostile HTTP client costs only its own connection."""

    def __init__(self, server: "Server", host: str, port: int):
        self.server = server
        self.reactor = server.reactor
        try:
            listener = _listening_socket(host, port, MONITOR_MAX_CONNECTIONS)
        except OSError as exc:
            raise OSError(exc.errno, "cannot serve the monitor on %s:%d: %s"
                          % (host, port, exc.strerror or exc)) from None
        self._listener = listener
        self.address = listener.getsockname()[:2]
        self._exchanges: Dict[_Exchange, None] = {}     # oldest first
        self.reactor.register(listener, _EVENT_READ, self._on_acceptable)
        log.info("%s serves its monitor on http://%s/", server.alias, _host_port(*self.address))
        self._pages = {"/healthz": None, "/varz": _varz, "/connz": _connz,
                       "/aliasz": _aliasz, "/metrics": _metrics, "/": _page}
        self._rendered: Dict[str, tuple] = {}   # path -> (the statistics, what they made)
        self._shown: Tuple[float, Optional[dict]] = (0.0, None)   # (fresh until, statistics)

    def close(self) -> None:
        self.reactor.unregister(self._listener)
        self._listener.close()
        for exchange in list(self._exchanges):
            self._end(exchange)

    def _on_acceptable(self, mask) -> None:
        failed = _accept_some(self.reactor, self._listener, self._accepted, self._accept_again)
        if failed is not None:
            log.warning("monitor: accept failed (%s): not accepting for %.1f s", failed,
                        ACCEPT_RETRY_DELAY)

    def _accepted(self, sock: socket.socket, address) -> None:
        if len(self._exchanges) >= MONITOR_MAX_CONNECTIONS and not self._evict():
            sock.close()
            return
        sock.setblocking(False)
        exchange = _Exchange(sock)
        exchange.handler = lambda mask, exchange=exchange: self._on_event(exchange)
        exchange.timer = self.reactor.call_later(MONITOR_TIMEOUT, self._end, exchange)
        self._exchanges[exchange] = None
        self.reactor.register(sock, _EVENT_READ, exchange.handler)

    def _accept_again(self) -> None:
        if self._listener.fileno() >= 0:
            self.reactor.register(self._listener, _EVENT_READ, self._on_acceptable)

    def _evict(self) -> bool:
        """Make room: close the oldest connection still sending its request
        (or done with its answer). A
        request of ours takes a round trip; one that dawdles gives its place
        to the newcomer, so that connections that never finish (slowloris)
        cannot keep a health check out."""
        for exchange in self._exchanges:
            if not exchange.answer:        # still sending its request, or done
                self._end(exchange)
                return True
        return False

    def _on_event(self, exchange: _Exchange) -> None:
        if exchange.answer is not None:
            return self._write(exchange) if exchange.answer else self._drain(exchange)
        try:
            data = exchange.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self._end(exchange)
        if not data:
            return self._end(exchange)
        exchange.received += data
        end = exchange.received.find(b"\r\n\r\n")
        if end < 0:
            end = exchange.received.find(b"\n\n")
        if end > MONITOR_MAX_REQUEST or end < 0 and len(exchange.received) > MONITOR_MAX_REQUEST:
            return self._answer(exchange, 431, "text/plain", b"the request is over %d bytes\n"
                                % MONITOR_MAX_REQUEST)
        if end >= 0:
            self._answer(exchange, *self._respond(bytes(exchange.received[:end])))

    def _respond(self, head: bytes) -> tuple:
        """(status, content type, body[, head only, extra headers]) for a request head."""
        line = _REQUEST_LINE.fullmatch(head.split(b"\n", 1)[0].rstrip(b"\r"))
        if line is None:
            return 400, "text/plain", b"want a request line: GET PATH HTTP/1.1\n"
        method, target = line.group(1).decode("ascii"), line.group(2).decode("utf-8", "replace")
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n", False, "Allow: GET, HEAD\r\n"
        if path == "/healthz":         # costs nothing: a health check never waits
            return 200, "application/json", b'{"status": "ok"}\n', method == "HEAD"
        page = self._pages.get(path)
        if page is None:
            return 404, "text/plain", ("no page %s here: try %s\n" % (
                _printable(target), ", ".join(sorted(self._pages)))).encode("utf-8", "replace"), \
                method == "HEAD"
        stats = self._statistics()
        rendered = self._rendered.get(path)
        if rendered is None or rendered[0] is not stats:
            rendered = self._rendered[path] = (stats, page(stats))
        content_type, body = rendered[1]
        return 200, content_type, body, method == "HEAD"

    def _answer(self, exchange: _Exchange, status: int, content_type: str, body: bytes,
                head_only: bool = False, extra: str = "") -> None:
        head = ("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n%s\r\n"
                % (status, _REASONS[status], content_type, len(body), extra)).encode("ascii")
        exchange.answer = memoryview(head if head_only else head + body)
        self.reactor.modify(exchange.sock, _EVENT_WRITE, exchange.handler)
        self._write(exchange)

    def _statistics(self) -> dict:
        """The server's statistics, the same dict until made again (at most
        once per MONITOR_COST_SHARE times what making them took)."""
        now = time.monotonic()
        fresh_until, stats = self._shown
        if stats is None or now >= fresh_until:
            stats = self.server.statistics()
            self._shown = (now + (time.monotonic() - now) * MONITOR_COST_SHARE, stats)
        return stats

    def _write(self, exchange: _Exchange) -> None:
        try:
            sent = exchange.sock.send(exchange.answer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self._end(exchange)
        exchange.answer = exchange.answer[sent:]
        if not exchange.answer:
            try:
                exchange.sock.shutdown(socket.SHUT_WR)
            except OSError:
                return self._end(exchange)
            self.reactor.modify(exchange.sock, _EVENT_READ, exchange.handler)

    def _drain(self, exchange: _Exchange) -> None:
        try:
            if exchange.sock.recv(65536):
                return                 # dropped; the timer bounds how long this goes on
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._end(exchange)

    def _end(self, exchange: _Exchange) -> None:
        if exchange in self._exchanges:
            del self._exchanges[exchange]
            exchange.timer.cancel()
            self.reactor.unregister(exchange.sock)
            exchange.sock.close()


# the pages: each makes (content type, body) of the server's statistics()

def _varz(stats: dict) -> tuple:
    return "application/json", _json_bytes({
        key: value for key, value in stats.items()
        if key not in ("aliases", "connection_list", "history")})


def _connz(stats: dict) -> tuple:
    return "application/json", _json_bytes({"connections": stats["connection_list"],
                                            "total": stats["connections"]})


def _aliasz(stats: dict) -> tuple:
    return "application/json", _json_bytes({"aliases": stats["aliases"],
                                            "total": stats["sessions"]})


def _metrics(stats: dict) -> tuple:
    # a lone surrogate in an alias (a str may hold one) becomes "?"
    return _PROMETHEUS_TYPE, _prometheus_text(stats).encode("utf-8", "replace")


def _page(stats: dict) -> tuple:
    return "text/html; charset=utf-8", _monitor_page(stats).encode("utf-8", "replace")


def _json_bytes(value: Any) -> bytes:
    # no indent: json encodes in C only without one (4x faster for /aliasz);
    # browsers and jq lay it out
    return (json.dumps(value) + "\n").encode("utf-8")


def _label(value: Any) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return _text(value, None).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _prometheus_text(stats: dict) -> str:
    """The statistics in Prometheus' text exposition format 0.0.4: a HELP and a
    TYPE line before each family's samples, one family after the other."""
    lines: List[str] = []

    def family(name: str, kind: str, help_text: str, samples: Iterable[tuple]) -> None:
        lines.append("# HELP %s %s" % (name, help_text))
        lines.append("# TYPE %s %s" % (name, kind))
        for suffix, labels, value in samples:
            labelled = ",".join('%s="%s"' % (key, _label(text)) for key, text in labels)
            lines.append("%s%s%s %r" % (name, suffix, "{%s}" % labelled if labels else "",
                                        value))

    aliases = stats["aliases"]
    family("proxysession_info", "gauge", "The server's version, as a label.",
           [("", [("version", stats["version"])], 1)])
    family("proxysession_uptime_seconds", "gauge", "Seconds since the server started.",
           [("", [], stats["uptime_s"])])
    family("proxysession_connections", "gauge", "Connections open now.",
           [("", [], stats["connections"])])
    family("proxysession_sessions", "gauge", "Aliases published now.",
           [("", [], stats["sessions"])])
    family("proxysession_messages_total", "counter", "Messages received, of every type.",
           [("", [], stats["messages"])])
    family("proxysession_server_calls_total", "counter",
           "Calls settled, failures included, to any alias (also those that do not exist).",
           [("", [], stats["calls"])])
    family("proxysession_server_call_failures_total", "counter",
           "Calls that failed, to any alias.", [("", [], stats["failures"])])
    family("proxysession_calls_total", "counter",
           "Calls to an alias settled, failures included.",
           [("", [("alias", entry["alias"])], entry["calls"]) for entry in aliases])
    family("proxysession_call_failures_total", "counter", "Calls to an alias that failed.",
           [("", [("alias", entry["alias"])], entry["failures"]) for entry in aliases])
    family("proxysession_calls_in_flight", "gauge",
           "Calls to an alias routed and not yet answered.",
           [("", [("alias", entry["alias"])], entry["in_flight"]) for entry in aliases])
    family("proxysession_call_bytes_total", "counter",
           "Bytes of calls routed to an alias's publisher (in) and of answers back (out).",
           [("", [("alias", entry["alias"]), ("direction", direction)], entry["bytes_" + direction])
            for entry in aliases for direction in ("in", "out")])
    durations = []
    for entry in aliases:
        histogram = entry["duration_s"]
        for bound, count in zip(histogram["le"], histogram["counts"]):
            durations.append(("_bucket", [("alias", entry["alias"]), ("le", repr(bound))], count))
        durations.append(("_bucket", [("alias", entry["alias"]), ("le", "+Inf")],
                          histogram["count"]))
        durations.append(("_sum", [("alias", entry["alias"])], histogram["sum"]))
        durations.append(("_count", [("alias", entry["alias"])], histogram["count"]))
    family("proxysession_call_duration_seconds", "histogram",
           "Seconds from routing a call to settling it.", durations)
    return "\n".join(lines) + "\n"


def _monitor_page(stats: dict) -> str:
    """One self-contained HTML page (no scripts, no external assets) that
    reloads itself: the totals, a chart of calls per second, the aliases and
    the connections."""
    escape = html.escape

    def table(headings: List[str], rows: List[list], empty: str) -> str:
        if not rows:
            return "<p class=none>%s</p>" % escape(empty)
        return "<table><tr>%s</tr>%s</table>" % (
            "".join("<th>%s</th>" % escape(heading) for heading in headings),
            "".join("<tr>%s</tr>" % "".join("<td>%s</td>" % escape(_text(cell, None))
                                             for cell in row) for row in rows))

    ms = _ms
    aliases = table(
        ["alias", "publisher", "subscribers", "calls", "failures", "calls/s", "failures/s",
         "p50 ms", "p90 ms", "p99 ms", "in flight"],
        [[entry["alias"], ", ".join(map(str, entry["publishers"])) +
          (" (away)" if entry["away"] else ""), entry["subscribers"], entry["calls"],
          entry["failures"], entry["calls_per_s"], entry["failures_per_s"],
          ms(entry["latency_ms"]["p50"]), ms(entry["latency_ms"]["p90"]),
          ms(entry["latency_ms"]["p99"]), entry["in_flight"]] for entry in stats["aliases"]],
        "Nothing is published.")
    connections = table(
        ["id", "address", "age", "publishes", "subscribes to", "calls", "answered",
         "in flight", "queued bytes"],
        [[entry["id"], entry["address"], _duration(entry["age_s"]),
          ", ".join(entry["publications"]), ", ".join(entry["subscriptions"]), entry["calls"],
          entry["answered"], entry["in_flight"], entry["queued_bytes"]]
         for entry in stats["connection_list"]],
        "No connections.")
    return """<!DOCTYPE html>
<html lang=en><head><meta charset=utf-8>
<meta http-equiv=refresh content=%(refresh)d>
<title>proxysession %(name)s</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse}td,th{padding:.2em .7em;border-bottom:1px solid #ddd;text-align:left}
th{background:#f4f4f4}.none{color:#777}svg{background:#fafafa;border:1px solid #ddd}
</style></head><body>
<h1>proxysession %(name)s at %(address)s</h1>
<p>version %(version)s, up %(uptime)s &middot; %(connections)s &middot;
%(sessions)s &middot; %(calls)d calls, %(failures)d failed &middot;
%(in_flight)d in flight &middot; this page reloads every %(refresh)d s</p>
<h2>Calls per second</h2>
%(chart)s
<h2>Aliases</h2>
%(aliases)s
<h2>Connections</h2>
%(connections_table)s
</body></html>
""" % {"refresh": MONITOR_REFRESH, "name": escape(_text(stats["name"])),
       "address": escape(_text(stats["address"])), "version": escape(stats["version"]),
       "uptime": _duration(stats["uptime_s"]),
       "connections": _plural(stats["connections"], "connection"),
       "sessions": _aliases(stats["sessions"]), "calls": stats["calls"], "failures": stats["failures"],
       "in_flight": stats["in_flight"], "chart": _rate_chart(stats["history"]),
       "aliases": aliases, "connections_table": connections}


def _rate_chart(history: List[list]) -> str:
    """Calls (and failures) per second over the kept samples, as inline SVG."""
    if len(history) < 2:
        return "<p class=none>The chart starts after two samples (one every %g s).</p>" % (
            SAMPLE_INTERVAL)
    width, height = 600, 120
    top = max(max(sample[1] for sample in history), 1.0)
    step = width / (SAMPLES_KEPT - 1)
    offset = width - step * (len(history) - 1)

    def points(column: int) -> str:
        return " ".join("%.1f,%.1f" % (offset + index * step,
                                       height - sample[column] / top * (height - 10))
                        for index, sample in enumerate(history))

    return ('<svg width=%d height=%d viewBox="0 0 %d %d" role=img aria-label="calls per second">'
            '<polyline fill=none stroke="#2a6" stroke-width=2 points="%s"/>'
            '<polyline fill=none stroke="#c33" stroke-width=2 points="%s"/>'
            '<text x=4 y=12 font-size=11>%.4g calls/s</text>'
            '<text x=4 y=%d font-size=11>0</text></svg>'
            '<p class=none>the last %s; green: calls, red: failures</p>'
            % (width, height, width, height, points(1), points(2), top, height - 3,
               _duration(SAMPLE_INTERVAL * (len(history) - 1))))


# ---------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------
# What lets a program's own threads use a Client (every Client method hands
# its state changes to the reactor's thread with Reactor.call_in_loop and
# waits in run_until), lets a published method run off the loop (workers=N)
# or answer later (a future), and lets a caller get a future, or await one.


class _Workers:
    """The worker threads of one publication (``publish(..., workers=N)``):
    up to N of its calls run at once. Daemon threads, one more for each of the
    first N calls, so that a method that never returns cannot keep the
    process from exiting."""

    def __init__(self, count: int, name: str):
        self._count = count
        self._name = name
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self._threads: List[threading.Thread] = []

    def submit(self, job: Callable, *args) -> None:
        self._jobs.put((job, args))
        if len(self._threads) < self._count:
            thread = threading.Thread(target=self._work, daemon=True,
                                      name="%s-worker-%d" % (self._name, len(self._threads) + 1))
            self._threads.append(thread)
            thread.start()

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, args = item
            try:
                job(*args)
            except BaseException:      # never ends the thread: others wait on it
                log.exception("%s: a worker's job raised", self._name)

    def stop(self) -> None:
        """Let each thread end after the jobs queued before this."""
        for _ in self._threads:
            self._jobs.put(None)


def _check_workers(workers: Any) -> int:
    if type(workers) is not int or workers < 0:
        raise ValueError("workers must be an int >= 0 (0: calls run on the reactor's thread), "
                         "not %r" % (workers,))
    return workers


def _is_future(value: Any) -> bool:
    """A concurrent.futures.Future, or an asyncio one (which every asyncio
    future marks with this attribute: asyncio.isfuture, without importing asyncio)."""
    return isinstance(value, concurrent.futures.Future) or \
        getattr(value, "_asyncio_future_blocking", None) is not None


def _when_done(future: Any, callback: Callable[[Any], None]) -> None:
    """``future.add_done_callback(callback)``, from any thread: an asyncio
    future's callbacks may only be added on its own loop's thread."""
    if isinstance(future, concurrent.futures.Future):
        future.add_done_callback(callback)
    else:
        future.get_loop().call_soon_threadsafe(future.add_done_callback, callback)


def _interrupts(exc: BaseException) -> bool:
    """True for the one exception user code may pass up through us: Ctrl-C
    on the main thread. Anything else a published method or a callback
    raises (SystemExit, asyncio.CancelledError included) is its caller's
    failure, or logged, and never ends the thread that serves the others."""
    return isinstance(exc, KeyboardInterrupt) and \
        threading.current_thread() is threading.main_thread()


class CallContext:
    """What a published method may learn of the call it runs for, from
    ``proxysession.current_call()``: the ``alias`` it was called through,
    its ``deadline`` (a ``time.monotonic()`` time, or None) and whether its
    caller ``cancelled`` it (PROTOCOL.md 7.7). A method that works long may
    look now and then, and give up: its caller has stopped waiting."""

    __slots__ = ("alias", "deadline", "cancelled", "task")

    def __init__(self, alias: Any, deadline: Optional[float]):
        self.alias = alias
        self.deadline = deadline
        self.cancelled = False
        self.task = None               # the task of an async def method's call (AsyncClient)

    def __repr__(self):
        return "<CallContext %s%s%s>" % (_show(self.alias), " cancelled" if self.cancelled else "",
                                         "" if self.deadline is None else
                                         " %.3g s left" % self.remaining())

    def remaining(self) -> Optional[float]:
        """Seconds until the deadline (negative once past it), or None."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    @property
    def expired(self) -> bool:
        """The deadline has passed: the caller has had its CallTimeout."""
        return self.deadline is not None and time.monotonic() >= self.deadline

    def cancel(self) -> None:
        """Its caller cancelled it, or can no longer be answered: one not yet
        started never starts, and an async def method's task is cancelled
        (asyncio's own way)."""
        self.cancelled = True
        if self.task is not None:
            self.task.cancel()

    def why_not_start(self) -> Optional[dict]:
        """The failure to answer instead of starting, if the call was
        cancelled or is past its deadline; None to start it."""
        if self.cancelled:
            return {"error": "CancelledError", "traceback": "",
                    "message": "Call cancelled by its caller before it started"}
        if self.expired:
            return {"error": "CallTimeout", "traceback": "",
                    "message": "Call's deadline passed before it started"}
        return None


# the CallContext of the call being served: a context variable, so that each
# thread has its own, and so does each task of an async method (AsyncClient)
_current = contextvars.ContextVar("proxysession_current_call", default=None)


def current_call() -> Optional[CallContext]:
    """The CallContext of the call that the published method running here
    (on this thread, or in this task for an ``async def`` method of an
    AsyncClient) serves; None outside of one. (A method that answers with a
    future has it only until it returns that.)"""
    return _current.get()


def _run_published(method: Callable, args, kwargs,
                   call: Optional[CallContext] = None) -> Tuple[bool, Any]:
    """Run a published method: (True, its value), or (False, the pickled
    failure its exception makes). ``current_call()`` is ``call`` meanwhile
    (and the outer call's again after it: a call may run nested in another's
    blocking wait)."""
    token = _current.set(call)
    try:
        return True, method(*args, **kwargs)
    except BaseException as exc:
        if _interrupts(exc):
            raise
        return False, _dumps(_error_answer(exc))
    finally:
        _current.reset(token)


def _error_answer(exc: BaseException, what: str = "") -> dict:
    """A published method's exception as the payload of a failure result. Its
    text may hold a caller's value, whose str() can raise (peer values)."""
    if type(exc) is _MethodExit:
        exc = exc.original
    try:
        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:
        trace = ""
    return {"error": type(exc).__name__, "message": what + _text(exc, None), "traceback": trace}


def _answer_body(value: Any) -> Tuple[bool, bytes]:
    """A method's value, pickled for its result; one that cannot be pickled
    becomes a failure naming its type."""
    try:
        return True, _dumps(value)
    except BaseException as exc:
        if _interrupts(exc):
            raise
        return False, _dumps(_error_answer(
            exc, "cannot send a result of type %s: " % type(value).__qualname__))


class _CallFuture(concurrent.futures.Future):
    """What ``proxy.method.future(...)`` returns: a concurrent.futures.Future
    whose ``result()`` and ``exception()`` drive the reactor when no thread
    runs it, and which asyncio code may ``await`` (with the reactor running
    in a thread of its own: ``run_in_thread()``). It is the callback of its
    call's request; ``cancel()`` takes the call back (PROTOCOL.md 7.7): it
    returns True until the answer came, and a call its publisher has not
    started then never runs."""

    def __init__(self, reactor: Reactor):
        super().__init__()
        self._reactor = reactor
        self._client: Optional["Client"] = None
        self._request: Optional["_Request"] = None

    def sent_as(self, client: "Client", request: "_Request") -> None:
        self._client = client
        self._request = request

    def __call__(self, result: "Result") -> None:
        """The answer (on the reactor's thread); one that comes after a cancel
        is dropped."""
        try:
            if result.success:
                self.set_result(result.payload)
            else:
                self.set_exception(_error_from_payload(result.payload))
        except concurrent.futures.InvalidStateError:
            pass                       # cancelled meanwhile

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        if self._request is not None:
            self._client.cancel_request(self._request)
        return True

    def result(self, timeout: Optional[float] = None) -> Any:
        self._reactor.run_until(self.done, timeout)
        return super().result(0)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        self._reactor.run_until(self.done, timeout)
        return super().exception(0)

    def __await__(self):
        if not self.done() and self._reactor._runner is None:
            raise RuntimeError("awaiting a call needs the reactor running in a thread of its "
                               "own: call proxysession.run_in_thread() (or "
                               "reactor.run_in_thread()) first")
        import asyncio                 # only for programs that await
        return asyncio.wrap_future(self).__await__()


# ---------------------------------------------------------------------------
# message layer
# ---------------------------------------------------------------------------
# What a Client's requests become on the wire and back, one _Connection per
# connection between its wheel and the Client: the Client hands it a request
# and gets a Result; the connection numbers, encodes, sizes, sends or queues,
# times out and settles, and makes itself again when its wheel is lost; and
# _Connector, which makes one for connect(). (The server keeps its own
# per-connection state, _Peer, beside its routing.)

class Result:
    """What a ``callback=`` receives, like the original's return events:
    ``success``, ``payload`` (the value, or the error: a str, or a dict
    ``{error, message, traceback}``), ``connection_id`` and ``tag``."""

    __slots__ = ("success", "payload", "connection_id", "tag")

    def __init__(self, success: bool, payload: Any, connection_id: Optional[int], tag: Any = None):
        self.success = success
        self.payload = payload
        self.connection_id = connection_id
        self.tag = tag

    def __repr__(self):
        return "Result(success=%r, payload=%s, connection_id=%r, tag=%s)" % (
            self.success, _show(self.payload), self.connection_id, _show(self.tag))

    def value(self) -> Any:
        """The payload, or the error raised as an exception."""
        if self.success:
            return self.payload
        raise _error_from_payload(self.payload)


def _error_from_payload(payload: Any) -> ProxyError:
    """The exception a failure's payload stands for: the payload came from a
    peer, so it is shown only through _text and _show (peer values)."""
    if isinstance(payload, BaseException):
        return payload if isinstance(payload, ProxyError) else ProxyError(_text(payload, None))
    if type(payload) is dict and payload.get("error") == "CallTimeout" and \
            not payload.get("traceback"):      # the server's, or a publisher's (PROTOCOL.md 7.7)
        return CallTimeout(_text(payload.get("message", ""), None))
    if type(payload) is dict and "error" in payload:
        return RemoteError(_text(payload.get("error")), _text(payload.get("message", ""), None),
                           _text(payload.get("traceback", ""), None))
    return ProxyError(payload if type(payload) is str else _show(payload))


class _ClientTimeout:
    """The default ``timeout`` of a request: the Client's own ``timeout``."""

    __slots__ = ()

    def __repr__(self):
        return "CLIENT_TIMEOUT"


CLIENT_TIMEOUT = _ClientTimeout()


class _Request:
    """A request waiting for its result."""

    __slots__ = ("connection_id", "on_result", "callback", "tag", "timeout", "deadline", "result",
                 "undo", "id")

    def __init__(self, connection_id, on_result, callback, tag, timeout, undo=None):
        self.id: Optional[int] = None  # given when it is sent
        self.connection_id = connection_id
        self.on_result = on_result     # turns the success payload into the return value
        self.callback = callback
        self.tag = tag
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.result: Optional[Result] = None
        self.undo = undo               # what to take back if the request fails



    def settled(self) -> bool:
        return self.result is not None

    def finish(self, result: Result, owner: str) -> None:
        """Settle it: what a failure takes back, then its waiter or its callback."""
        if not result.success and self.undo is not None:
            self.undo()
        if self.callback is None:
            self.result = result
        else:
            _call_user(owner, self.callback, result)


def _call_user(owner: str, callback: Callable, *args) -> None:
    """Run a user's callback: its bug is logged (as ``owner``'s), never
    allowed to break a connection."""
    try:
        callback(*args)
    except BaseException as exc:
        if _interrupts(exc):
            raise
        log.exception("%s: callback %r raised", owner, callback)


def _no_answer_needed(result: Result) -> None:
    """A ping's answer: that it came is all a heartbeat needs."""


def _parse_host_port(text: str) -> Tuple[str, Optional[int]]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``HOST``: the host (default 127.0.0.1)
    and the port, or None where there is none. Raises ``ValueError``."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if not port:
        return host or DEFAULT_HOST, None
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("bad port in %r: want HOST:PORT with PORT 0..65535" % text)
    return host or DEFAULT_HOST, int(port)


def _address_and_port(address: str, port: Optional[int]) -> Tuple[str, int]:
    """``connect()``'s address: a host and a port, or one "host:port" string."""
    if not isinstance(address, str):
        raise TypeError("the address must be a str, not %s" % type(address).__name__)
    if address.startswith("[") or address.count(":") == 1:
        host, parsed_port = _parse_host_port(address)
        if parsed_port is not None:
            if port is not None and port != parsed_port:
                raise ValueError("the port is given twice: %r and %r" % (address, port))
            return host, parsed_port
        address = host
    return address, DEFAULT_PORT if port is None else port


def _limits_from_info(info: Any) -> Tuple[int, float]:
    """The server's frame limit and grace window from its answer to ``info``
    (PROTOCOL.md 7.1), or from the failure of a version-1 server, which does
    not know the message and has the seed's default limit and no grace."""
    if isinstance(info, ProxyError):
        if str(info) == "Unknown message type 'info'":
            return MAX_FRAME, 0.0
        raise info
    limit = info.get("max_frame") if type(info) is dict else None
    if type(limit) is not int or not 0 < limit < 1 << 63:
        raise ProtocolError("the server's info holds no max_frame: %s" % _show(info, 100))
    grace = info.get("grace", 0.0)
    seconds = float(grace) if type(grace) is float or type(grace) is int and \
        grace.bit_length() < 64 else -1.0
    if not 0 <= seconds < float("inf"):
        raise ProtocolError("the server's info holds a grace that is no number of seconds: %s"
                            % _show(grace, 100))
    return limit, seconds


def _resume_answer(payload: Any) -> Tuple[str, list]:
    """The token and the resumed aliases in a success answer to ``resume``
    (PROTOCOL.md 7.3). Raises ``ProtocolError``."""
    token = payload.get("token") if type(payload) is dict else None
    resumed = payload.get("resumed", []) if type(payload) is dict else None
    if type(token) is not str or type(resumed) is not list or \
            not all(type(alias) is str for alias in resumed):
        raise ProtocolError("malformed answer to resume: %s" % _show(payload, 100))
    return token, resumed


def _dial(address: str, port: int) -> Tuple[socket.socket, int, Any]:
    """A non-blocking socket whose connect to ``address:port`` has begun, its
    address family and the address it goes to. Raises ``OSError``."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(address, port, 0,
                                                          socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    try:
        sock.connect(sockaddr)
    except (BlockingIOError, InterruptedError):
        pass
    except OSError:
        sock.close()
        raise
    return sock, family, sockaddr


class _Timeouts:
    """When the waiting requests time out: a heap of (deadline, request id)
    and one timer, for its earliest deadline. A request's own timer would be
    cancelled by its answer yet stay in the reactor's heap until it expired;
    here an answered request's entry is skipped when it comes up, and once
    such entries outnumber the waiting requests the heap is rebuilt without
    them, so each request costs O(log n), and the memory follows the requests
    still waiting (``waiting``: request id -> request). ``due(request_id)``
    is called for each one still waiting at its deadline."""

    __slots__ = ("reactor", "waiting", "due", "heap", "timer", "at")

    def __init__(self, reactor: Reactor, waiting: dict, due: Callable[[int], None]):
        self.reactor = reactor
        self.waiting = waiting
        self.due = due
        self.heap: List[Tuple[float, int]] = []
        self.timer: Optional[_Timer] = None
        self.at: Optional[float] = None        # when the timer fires

    def add(self, deadline: float, request_id: int) -> None:
        heap = self.heap
        heapq.heappush(heap, (deadline, request_id))
        if len(heap) > 2 * len(self.waiting) + 64:
            waiting = self.waiting
            heap[:] = [entry for entry in heap if entry[1] in waiting]
            heapq.heapify(heap)
        if self.at is None or deadline < self.at:
            self._arm(deadline)

    def _arm(self, deadline: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.at = deadline
        self.timer = self.reactor.call_later(deadline - time.monotonic(), self._sweep)

    def stop(self) -> None:
        """No more timeouts: the timer goes (the requests are settled otherwise)."""
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.at = None
        self.heap.clear()

    def _sweep(self) -> None:
        self.timer = self.at = None
        now = time.monotonic()
        heap = self.heap
        while heap and heap[0][0] <= now:
            request_id = heapq.heappop(heap)[1]
            if request_id in self.waiting:     # (else answered meanwhile)
                self.due(request_id)
        if heap:
            self._arm(heap[0][0])


def _info_request(max_frame: int) -> dict:
    """``info``, telling the server this client's own frame limit, so that
    a call or answer too large for it fails alone at the server instead of
    closing the connection (PROTOCOL.md 7.1), that it takes the deadlines
    and cancels of 7.7, and that it speaks compact envelopes (7.8)."""
    return {"type": "info", "max_frame": max_frame, "deadlines": True,
            "compact": COMPACT_VERSION}


class _Hooks:
    """What a Client's connections hand back to it: each message that is no
    result (``message(message, connection)``), a wheel's end (``closed(wheel,
    reason, error)``), a payload to unpickle (``loads``), a new socket for a
    connection that is down (``redial(connection)``), and, once a new one is
    set up, its publications and subscriptions to make again
    (``restore(connection, resumed aliases)``)."""

    __slots__ = ("message", "closed", "loads", "redial", "restore", "trace")

    def __init__(self, message, closed, loads, redial, restore, trace):
        self.trace = trace             # log.debug each message's type (options={"trace": True})
        self.message = message
        self.closed = closed
        self.loads = loads
        self.redial = redial
        self.restore = restore


class _Link:
    """What every kind of connection of a Client is (a _Connection to a
    proxysession server, a _NatsConnection to NATS): the requests waiting on
    it, with their timeouts, and the link that makes it again when its wheel
    is lost. Then calls in flight fail (they ran at most once, and nobody can
    know if they did), requests made meanwhile are queued, and it tries again
    after a jittered, doubling wait (``hooks.redial``, then ``open_wheel``
    and ``rejoin``, or ``try_failed``). Every heartbeat (``beat``), one
    silent since the last gets a ping, and one silent since the ping is
    taken as lost.

    What the Client calls, beside: ``request(request, message)``,
    ``call_message(alias, event, payload, timeout)``, ``answer(wheel,
    call id, success, payload)`` for a call served here, ``restored``, and
    ``deadlines`` (whether a call's timeout goes with it)."""

    __slots__ = ("client", "hooks", "connection_id", "address", "port", "server_hostname",
                 "timeout", "wheel", "state", "opening", "attempt", "timer", "token", "ids",
                 "pending", "timeouts", "queued", "restoring", "deadlines", "seen", "pinged")

    def __init__(self, client: "Client", hooks: _Hooks, connection_id: int, address: str,
                 port: int, server_hostname: Optional[str], timeout: Optional[float]):
        self.client = client           # its settings: reactor, alias, limits, TLS, authkey
        self.hooks = hooks
        self.connection_id = connection_id
        self.address = address
        self.port = port
        self.server_hostname = server_hostname
        self.timeout = timeout         # for each step of making it, and its first requests
        self.wheel: Optional[Wheel] = None
        self.state = "connecting"      # then "up"; "down" while it is made again; "closed"
        self.opening: Optional[list] = None  # while connect() waits: why the wheel closed
        self.attempt = 0               # reconnection tries since it went down
        self.timer: Optional[_Timer] = None
        self.token: Optional[str] = None     # the server's resume token, if it has a grace window
        self.ids = itertools.count(1)
        self.pending: Dict[int, _Request] = {}     # request id -> request waiting for its result
        self.timeouts = _Timeouts(client.reactor, self.pending, self._timed_out)
        # request id -> what to send once it is back up: made while down
        self.queued: Dict[int, Any] = {}
        self.restoring: set = set()    # aliases whose calls wait for their publisher (held)
        self.deadlines = False         # whether a call's timeout goes with it (PROTOCOL.md 7.7)
        self.seen = 0                  # the wheel's reads at the last heartbeat
        self.pinged = False

    def __repr__(self):
        return "<%s %d to %s:%s %s, %d waiting>" % (
            type(self).__name__, self.connection_id, self.address, self.port, self.state,
            len(self.pending))

    # what the kinds do their own way

    def _take_back(self, request_id: int) -> bool:
        """Forget a request not sent yet; True if it was not."""
        return self.queued.pop(request_id, None) is not None

    def _tell_cancel(self, request_id: int) -> None:
        """A call that went out is cancelled: tell the other end, if it listens."""

    def _ping(self) -> None:
        raise NotImplementedError

    def _forget(self) -> None:
        """It is lost (or over): what is its own of the last wheel goes."""

    def next_server(self) -> None:
        """A try failed: where the next goes (the same server, but for NATS)."""

    def _goodbye(self) -> None:
        """The Client closes: what this kind says first, if anything."""

    # requests

    def _timed_out(self, request_id: int) -> None:
        request = self.pending.pop(request_id)
        self._take_back(request_id)    # (never sent: its frame goes now)
        self._timed_out_now(request)

    def _timed_out_now(self, request: _Request) -> None:
        request.finish(Result(False, CallTimeout("no answer within %.3g s" % request.timeout),
                              self.connection_id, request.tag), self.client.alias)

    def cancel(self, request: _Request, tell_server: bool) -> None:
        """Take a request back: it fails no more, and is answered no more.
        For a call (``tell_server``) that went out, the other end is told,
        if it listens."""
        request_id = request.id
        if request_id is None or self.pending.get(request_id) is not request:
            return                     # answered, failed or timed out meanwhile
        del self.pending[request_id]
        if not self._take_back(request_id) and tell_server:
            self._tell_cancel(request_id)

    def _settle(self, request: _Request, success: bool, value: Any,
                pickled: bool = False) -> None:
        """A request is answered: its value (unpickled here if ``pickled``,
        then turned by its on_result), or its failure."""
        try:
            if pickled and value is not None:
                value = self.hooks.loads(value)
            if success and request.on_result is not None:
                value = request.on_result(value)
        except Exception as exc:
            success, value = False, ProxyError("result could not be decoded: %s" % (exc,))
        request.finish(Result(success, value, self.connection_id, request.tag),
                       self.client.alias)

    def fail_all(self, failure: ProxyError, spare=()) -> None:
        """Fail the requests waiting here (but those in ``spare``)."""
        for request_id, request in list(self.pending.items()):
            if request_id not in spare:
                del self.pending[request_id]
                request.finish(Result(False, failure, self.connection_id, request.tag),
                               self.client.alias)

    # the link

    def up(self) -> bool:
        """connect() has set it up; False if it was closed meanwhile."""
        if self.state != "connecting":
            return False
        self.state = "up"
        self.opening = None
        self.seen = self.wheel.reads
        return True

    def beat(self, heartbeat: float) -> None:
        """A heartbeat: ping the server if it was silent since the last one,
        and take it as lost if it stayed silent since the ping."""
        wheel = self.wheel
        if self.state != "up" or wheel is None:
            return
        if wheel.reads != self.seen:
            self.seen = wheel.reads
            self.pinged = False
        elif not self.pinged:
            self.pinged = True
            self._ping()
        else:
            wheel.close("no answer to a heartbeat ping within %.3g s" % heartbeat)

    def lost(self, reason: str) -> ProxyError:
        """Its wheel is lost, and it is made again: calls in flight fail, and
        what has not been sent waits for the next wheel. Returns the failure."""
        failure = ProxyError("Connection %d to %s was lost: %s" % (
            self.connection_id, self.wheel.peer, reason))
        log.warning("%s: connection %d to %s lost: %s; reconnecting", self.client.alias,
                    self.connection_id, self.wheel.peer, reason)
        self.wheel = None
        self.state = "down"
        self.attempt = 0
        self.pinged = False
        self._forget()
        self.fail_all(failure, spare=self.queued)
        self._schedule_try()
        return failure

    def end(self, failure: ProxyError) -> None:
        """It is over for good: every request waiting here fails."""
        self.state = "closed"
        self.wheel = None
        if self.timer is not None:
            self.timer.cancel()
        self._forget()
        self.queued.clear()            # (their requests fail with the rest)
        self.timeouts.stop()           # (its timer would hold this, and the Client, till then)
        self.fail_all(failure)

    def close(self) -> bool:
        """The Client closes (after a goodbye, if this kind says one). False
        if it had no wheel left to close (it was down)."""
        self._goodbye()
        wheel = self.wheel
        self.state = "closed"
        if wheel is None:
            return False
        wheel.close("client closed")
        return True

    def _schedule_try(self) -> None:
        wait = min(RECONNECT_CAP, RECONNECT_FIRST * 2 ** min(self.attempt, 16))
        self.attempt += 1
        self.timer = self.client.reactor.call_later(
            wait * (0.5 + secrets.randbelow(500) / 1000), self._try_again)

    def _try_again(self) -> None:
        self.timer = None
        if self.state == "down":
            self.hooks.redial(self)    # then open_wheel(sock, rejoin), or try_failed

    def try_failed(self, reason: str) -> None:
        """A reconnection try failed: another comes later."""
        self.wheel = None
        # the first failure says why (a changed authkey, TLS, ...); the rest are
        # the same story, one every few seconds
        log.log(logging.WARNING if self.attempt == 1 else logging.DEBUG,
                "%s: reconnecting connection %d, try %d failed: %s%s", self.client.alias,
                self.connection_id, self.attempt, reason,
                "; trying again every few seconds" if self.attempt == 1 else "")
        self.next_server()
        self._schedule_try()


class _Connection(_Link):
    """A Client's connection to a proxysession server: the message layer
    between its wheel and the Client.

    ``request`` numbers a request, keeps it waiting (with its timeout) for
    the result that ``answered`` settles, encodes it once in the envelope
    this server takes, checks its size against the server's frame limit, and
    writes it; ``answer`` answers a call served here; the server's ``info``
    (``learn_info``) says the limit, the envelope, and whether it takes
    deadlines. Every frame this side writes goes out through ``_send``,
    but for a compact answer, which ``answer`` writes from its header.

    Once a new wheel is open after a loss it asks for info, resumes (if the
    server gave a token), has the Client make its publications and
    subscriptions again, then sends what was queued. A call to an alias
    that waits for its publisher after a reconnection is held until the
    alias is back (``restored``)."""

    __slots__ = ("held", "rejoining", "max_frame")

    def __init__(self, *args):
        super().__init__(*args)
        # calls to an alias subscribed again (after a server restart, say) that
        # waits for its publisher: request id -> (alias, message), sent once it
        # is back (the queued ones: (alias or None, message))
        self.held: Dict[int, Tuple[str, dict]] = {}
        self.rejoining: set = set()    # ids of the requests that set a new connection up
        self.max_frame = MAX_FRAME     # the largest frame the server takes, as its info said

    def _take_back(self, request_id: int) -> bool:
        return bool(self.queued.pop(request_id, None) or self.held.pop(request_id, None))

    def _tell_cancel(self, request_id: int) -> None:
        if self.deadlines and self.state == "up":       # (PROTOCOL.md 7.7)
            self.request(_Request(self.connection_id, None, _no_answer_needed, None,
                                  self.client.timeout), {"type": "cancel", "call": request_id})

    def _ping(self) -> None:
        self.set_up({"type": "ping"}, _no_answer_needed, None)

    def _forget(self) -> None:
        self.queued.update(self.held)  # never sent: they wait for the next connection
        self.held.clear()
        self.restoring.clear()

    def next_server(self) -> None:
        # (the requests of the try that failed: they fail with their wheel)
        for request_id in self.rejoining:
            self.pending.pop(request_id, None)
        self.rejoining.clear()

    def call_message(self, alias: str, event: str, payload: bytes,
                     timeout: Optional[float]) -> dict:
        """A call's deliver; its timeout goes only to a server that takes it."""
        message = {"type": "deliver", "to": alias, "payload": payload}
        if timeout is not None and self.deadlines and 0 < timeout <= MAX_CALL_TIMEOUT_MS / 1000:
            message["timeout_ms"] = math.ceil(timeout * 1000)   # (so never before the caller's)
        return message

    # its wheel

    def open_wheel(self, sock: socket.socket, on_open: Callable) -> Wheel:
        """A wheel for this connection on a socket that is connecting."""
        client = self.client
        self.wheel = wheel = Wheel(
            client.reactor, sock, self.connection_id, on_frame=self.on_frame,
            on_close=self.hooks.closed, on_open=on_open, peer="%s:%s" % (self.address, self.port),
            server_side=False, connecting=True, max_frame=client.max_frame,
            max_write_buffer=client.max_write_buffer, ssl_context=client.ssl_context,
            server_hostname=self.server_hostname or self.address, authkey=client.authkey,
            handshake_timeout=self.timeout)
        wheel.decode = _decode_envelope     # (this client offers compact envelopes in info)
        wheel.context = self
        return wheel

    def learn_info(self, info: Any) -> float:
        """What the server said in its answer to info (or a version-1 server's
        failure, which does not know it): its frame limit, whether it takes a
        call's timeout and cancels (PROTOCOL.md 7.7, only then sent), and
        compact envelopes (7.8, only then used). Returns its grace window.
        Raises ``ProtocolError``."""
        self.max_frame, grace = _limits_from_info(info)
        said = info if type(info) is dict else {}
        self.deadlines = said.get("deadlines") is True
        if self.wheel is not None:
            self.wheel.encode = _encode_compact if _offers_compact(said.get("compact")) \
                else _encode
        return grace

    # messages out

    def _send(self, message: dict, what: Optional[str] = None) -> None:
        """Encode a message in this server's envelope and write it. Raises
        ``FrameTooLarge`` (and writes nothing) past the server's limit."""
        wheel = self.wheel
        body = wheel.encode(message)
        size = len(body) if type(body) is bytes else sum(map(len, body))
        if size > self.max_frame:
            raise FrameTooLarge(what or "a %s request" % message.get("type"), size,
                                self.max_frame)
        wheel.write_frame(body)

    def request(self, request: _Request, message: dict) -> None:
        """Number a request, keep it waiting for its answer, and send it (on
        the reactor's thread); while the connection is down, queue it.
        Raises ``FrameTooLarge`` past the server's limit: nothing is sent,
        and the request's undo has run."""
        if self.state == "closed":
            raise ProxyError("connection %d is closed" % self.connection_id)
        request_id = message["id"] = request.id = next(self.ids)
        self.pending[request_id] = request
        try:
            if self.state == "down":   # (a copy: the caller's dict may be used again)
                self._check_size(message)
                self.queued[request_id] = (message["to"] if message["type"] == "deliver"
                                           else None, dict(message))
            elif self.restoring and message["type"] == "deliver" and \
                    message["to"] in self.restoring:
                self._check_size(message)
                self.held[request_id] = (message["to"], dict(message))
            else:
                self._send(message)
        except FrameTooLarge:
            del self.pending[request_id]
            if request.undo is not None:
                request.undo()
            raise
        if request.deadline is not None:
            self.timeouts.add(request.deadline, request_id)

    def _check_size(self, message: dict) -> None:
        """A request kept to send later must fit the server's limit: in this
        wheel's envelope, or pickled while down (the envelope the next server
        takes is not known yet; it is encoded again for it when sent)."""
        body = _encode(message) if self.wheel is None else self.wheel.encode(message)
        size = len(body) if type(body) is bytes else sum(map(len, body))
        if size > self.max_frame:
            raise FrameTooLarge("a %s request" % message["type"], size, self.max_frame)

    def set_up(self, message: dict, then: Callable[[Result], None],
               timeout: Any = CLIENT_TIMEOUT) -> None:
        """A request of the connection's own (info, resume, a publication
        made again, a ping): it goes now, ahead of what is queued. If
        ``then`` cannot use the answer, the connection is closed, and the
        link tries again as after any failed try: it never stays down on an
        open socket."""
        wheel = self.wheel

        def step(result):
            try:
                then(result)
            except Exception as exc:
                wheel.close("reconnected, but could not set the connection up again: %s"
                            % _text(exc), error=exc)

        request = _Request(self.connection_id, None, step, None,
                           self.timeout if timeout is CLIENT_TIMEOUT else timeout)
        request_id = message["id"] = request.id = next(self.ids)
        self.pending[request_id] = request
        if self.state == "down":
            self.rejoining.add(request_id)
        if request.deadline is not None:
            self.timeouts.add(request.deadline, request_id)
        self._send(message)

    def _send_late(self, request_id: int, message: dict) -> None:
        """Send a request that waited here (queued, held): a call's
        timeout_ms is what is left of it now, and goes only to a server that
        takes it, in the envelope this server takes (it may not be the one
        the call was made for); one past its deadline, or too large for this
        server, fails here instead."""
        request = self.pending.get(request_id)
        if request is None:
            return                     # failed meanwhile
        try:
            if "timeout_ms" in message:
                left = None if request.deadline is None else request.deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise CallTimeout("no answer within %.3g s" % request.timeout)
                if left is None or not self.deadlines:
                    del message["timeout_ms"]
                else:
                    message["timeout_ms"] = max(1, math.ceil(left * 1000))
            self._send(message)
        except (CallTimeout, FrameTooLarge) as failure:
            del self.pending[request_id]
            request.finish(Result(False, failure, self.connection_id, request.tag),
                           self.client.alias)

    def answer(self, wheel: Wheel, call_id: Any, success: bool, payload: bytes) -> None:
        """Answer a call that came by ``wheel`` (one since lost is answered no
        more: its caller was told). An answer over the server's limit would
        make it close this connection, taking every session on it down for
        one caller: that caller gets a failure instead."""
        if wheel is not self.wheel:
            return
        if wheel.encode is _encode_compact and type(call_id) is int and type(success) is bool \
                and type(payload) is bytes and -ID_RANGE <= call_id < ID_RANGE and \
                _HEAD_SIZE + len(payload) <= self.max_frame:
            # what _send would write, without making the message first (the hot path;
            # what the compact header cannot carry goes the general way, pickled)
            wheel.write(b"%d\0" % (_HEAD_SIZE + len(payload)) + _COMPACT_HEAD.pack(
                _COMPACT, _COMPACT_RESULT, success | _HAS_PAYLOAD, 0, call_id, 0), payload)
            return
        try:
            self._send({"type": "result", "id": call_id, "success": success,
                        "payload": payload}, "Result")
        except FrameTooLarge as error:
            log.warning("%s: %s", self.client.alias, error)
            self._send({"type": "result", "id": call_id, "success": False,
                        "payload": _dumps(str(error))})

    # answers

    def answered(self, message: dict) -> None:
        """A result: it settles the request it answers."""
        self._answered(message.get("id"), message.get("success") is True, message.get("payload"))

    def _answered(self, request_id: Any, success: bool, payload: Any) -> None:
        request = self.pending.pop(request_id, None) if type(request_id) is int else None
        if request is None:
            log.debug("%s: dropped a result for no waiting request: %s", self.client.alias,
                      _show(request_id))
            return
        if request.deadline is not None and time.monotonic() >= request.deadline:
            # past its deadline, in the pass that would have timed it out: a
            # publisher that stops a call at its deadline answers just then,
            # and the caller gets what its timer says, whichever is read first
            return self._timed_out_now(request)
        self._settle(request, success, payload, True)

    # messages in

    def on_frame(self, body: Any, wheel: Wheel) -> None:
        """A frame from the server: decoded once here; a result settles its
        request, and the Client gets every other message. A compact result
        settles it from its header, without making a message (the hot path;
        a header out of its bounds goes on to _decode_envelope, which says why)."""
        if body[:2] == b"\xff\x02" and len(body) >= _HEAD_SIZE and not self.hooks.trace:
            _, _, flags, name_size, msg_id, timeout = _COMPACT_HEAD.unpack_from(body)
            if flags <= _SUCCESS | _HAS_PAYLOAD and not name_size and not timeout:
                if flags & _HAS_PAYLOAD:
                    return self._answered(msg_id, flags & _SUCCESS == _SUCCESS,
                                          _payload_at(body, _HEAD_SIZE))
                if len(body) == _HEAD_SIZE:
                    return self._answered(msg_id, flags & _SUCCESS == _SUCCESS, None)
        try:
            message = wheel.decode(body)
        except Exception as exc:
            if body.startswith(CHALLENGE):
                error = AuthenticationError(
                    "the server at %s requires an authkey, but this client has none" % wheel.peer)
                wheel.close(str(error), error=error)
            else:
                log.warning("%s: connection %d sent a frame that does not decode: %s",
                            self.client.alias, self.connection_id, exc)
            return
        if self.hooks.trace:
            log.debug("%s connection %d: %s", self.client.alias, self.connection_id,
                      _show(message.get("type") if type(message) is dict else message, 40))
        if type(message) is dict and message.get("type") == "result":
            self.answered(message)
        else:
            self.hooks.message(message, self)

    # the link

    def _goodbye(self) -> None:
        """The Client closes: with a resume token it says goodbye first, so
        that its sessions go at once."""
        if self.token is not None and self.state == "up" and self.wheel is not None:
            self._send({"type": "goodbye", "id": next(self.ids)})

    def rejoin(self, wheel: Wheel) -> None:
        """A reconnection is open: learn the server's limits, resume if it
        may, then restore."""
        if self.state != "down":
            return wheel.close("client closed")

        def got_info(result):
            grace = self.learn_info(result.payload if result.success
                                    else _error_from_payload(result.payload))
            if self.token is not None and grace > 0:
                self.set_up({"type": "resume", "token": self.token},
                            lambda result: resumed(result, grace))
            else:
                self.token = None
                self._restore((), grace)

        def resumed(result, grace):
            if result.success:
                self.token, aliases = _resume_answer(result.payload)
                return self._restore(aliases, grace)
            if isinstance(result.payload, ProxyError):
                # no answer (a timeout): the server may have taken the token's
                # sessions over; it is the same token next time, so keep it
                raise result.payload
            log.info("%s: connection %d could not resume (%s): publishing again",
                     self.client.alias, self.connection_id, _text(result.payload))
            self.token = None
            self._restore((), grace)

        self.set_up(_info_request(self.client.max_frame), got_info)

    def _restore(self, resumed: list, grace: float) -> None:
        """Make the server's state this client's again, whatever requests the
        last connection lost: the Client's publications and subscriptions
        (``hooks.restore``), a resume token if the server has a grace window,
        then the queued requests: the server handles them in that order."""
        self.hooks.restore(self, resumed)
        if grace > 0 and self.token is None and self.client.reconnect:
            def got_token(result):
                if result.success:
                    self.token = _resume_answer(result.payload)[0]

            self.set_up({"type": "resume"}, got_token)
        wheel = self.wheel
        self.state = "up"
        self.attempt = 0
        self.seen = wheel.reads
        self.pinged = False
        self.rejoining.clear()
        for request_id in list(self.queued):
            if wheel.closed:           # lost again: the rest wait for the next one
                break
            item = self.queued.pop(request_id, None)
            if item is None:           # failed meanwhile
                continue
            if item[0] in self.restoring:
                self.held[request_id] = item
            else:
                self._send_late(request_id, item[1])
        log.info("%s: connection %d to %s:%s is back", self.client.alias, self.connection_id,
                 self.address, self.port)
        if self.client.reconnected_event is not None:
            _call_user(self.client.alias, self.client.reconnected_event, self.connection_id)

    def hold_calls_to(self, alias: str) -> None:
        """Calls to ``alias`` wait here until it is back (``restored``)."""
        self.restoring.add(alias)

    def restored(self, alias: str, failure: Optional[str]) -> None:
        """An alias subscribed again is back (``failure`` None), or is not: the
        calls that waited for it go, in order, or fail."""
        self.restoring.discard(alias)
        waited = [request_id for request_id, item in self.held.items() if item[0] == alias]
        wheel = self.wheel
        for request_id in waited:
            item = self.held.pop(request_id, None)
            if item is None or wheel is not None and wheel.closed:
                continue               # (lost again meanwhile: it waits in queued)
            if failure is None and wheel is not None:
                self._send_late(request_id, item[1])
            else:
                request = self.pending.pop(request_id, None)
                if request is not None:
                    request.finish(Result(False, ProxyError(
                        failure or "Connection %d is closed" % self.connection_id),
                        self.connection_id, request.tag), self.client.alias)

class _Connector:
    """What connect() does, for the Client (blocking) and the AsyncClient
    (awaited) alike: a new connection, numbered; its wheel, the connection
    in the Client's table from then on; a proxysession server checked by a
    first round trip (a keyed client that hears no challenge asks why on a
    second connection, made off the loop), a NATS server tried after
    another; and a failure reported once (connect_error_event, then raised,
    the connection gone from the table)."""

    __slots__ = ("client", "hooks", "connections", "ids", "connected")

    def __init__(self, client: "Client", hooks: _Hooks, connections: Dict[int, _Link],
                 connected: Callable[[_Link], bool]):
        self.client = client
        self.hooks = hooks
        self.connections = connections     # the Client's: connection id -> _Link
        self.ids = itertools.count(1)
        self.connected = connected         # the Client's: the link is up (its heartbeat)

    def connection(self, address: str, port: int, server_hostname: Optional[str],
                   timeout: Optional[float]) -> "_Connection":
        return _Connection(self.client, self.hooks, next(self.ids), address, port,
                           server_hostname, timeout)

    def open(self, connection: _Link, sock: socket.socket, on_open: Callable) -> Wheel:
        """On the reactor's thread: the connection's wheel, and its place in the table."""
        self.connections[connection.connection_id] = connection
        return connection.open_wheel(sock, on_open)

    def forget(self, connection: _Link) -> None:
        if self.connections.get(connection.connection_id) is connection:
            del self.connections[connection.connection_id]

    def failed(self, address, port, error):
        """Report a failed connect(): ``connect_error_event``, then raise."""
        client = self.client
        if client.connect_error_event is not None:
            client.connect_error_event(address, port, error)
        if isinstance(error, ProxyError) and not isinstance(error, CallTimeout):
            raise error
        raise ConnectError("cannot connect to %s:%s: %s" % (address, port, error)) from error

    def why_no_challenge(self, connection: "_Connection", sockaddr,
                         family) -> Optional[ProxyError]:
        """A keyed connect() got no challenge: ask on a plain blocking probe
        connection. A server that answers a listing without a challenge has
        no authkey; one that drops a connection that speaks no TLS wants TLS.
        None when the probe learns nothing (a slow server: keep waiting)."""
        ssl_context = self.client.ssl_context
        peer = "%s:%s" % (connection.address, connection.port)
        probe = socket.socket(family, socket.SOCK_STREAM)
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(sockaddr)
            if ssl_context is not None:
                probe = ssl_context.wrap_socket(
                    probe, server_hostname=connection.server_hostname or connection.address)
            probe.sendall(_frame(_dumps({"type": "listing", "id": 0})))
            answer = probe.recv(64)
        except socket.timeout:
            return None                # slow, not silent by design: the handshake decides
        except (OSError, ssl.SSLError):
            answer = b""
        finally:
            probe.close()
        if answer.split(b"\0", 1)[-1].startswith(CHALLENGE):
            return None                # keyed after all, and slow
        if ssl_context is None and (not answer or answer[0] in (0x15, 0x16)):
            # closed, or a TLS record (an alert, a handshake): it speaks TLS
            return ConnectError("the server at %s sent no challenge, and closed a second "
                                "connection that spoke no TLS at once: it probably expects "
                                "TLS (Client(ssl_context=...), --tls-ca)" % peer)
        if answer[:1].isdigit():
            return AuthenticationError("the server at %s has no authkey, but this client has "
                                       "one: it answered a request without a challenge" % peer)
        return None

    def why_first_request_failed(self, exc: ProxyError,
                                 connection: "_Connection") -> ProxyError:
        """What to tell connect()'s caller when the first request failed."""
        if self.client.ssl_context is None and " was lost: " in str(exc):
            # a TLS server drops a peer whose first bytes are not TLS
            return ConnectError("the server at %s:%s closed the connection at its first "
                                "request: it probably expects TLS (Client(ssl_context=...), "
                                "--tls-ca); %s" % (connection.address, connection.port, exc))
        return exc

    def connect(self, address: str, port: Optional[int], timeout: Optional[float],
                server_hostname: Optional[str]) -> int:
        """Client.connect to a proxysession server."""
        client, reactor = self.client, self.client.reactor
        address, port = _address_and_port(address, port)
        connection = self.connection(address, port, server_hostname, timeout)
        connection_id = connection.connection_id
        try:
            sock, family, sockaddr = _dial(address, port)
        except OSError as exc:
            return self.failed(address, port, exc)
        outcome: list = []

        def open_wheel():
            connection.opening = outcome    # _on_wheel_closed puts the error here
            return self.open(connection, sock, lambda wheel: outcome.append(None))

        def opened(wheel) -> bool:
            if wheel.is_open:
                connection.opening = None
                return True
            # it may have opened and closed in one pass: the error is what counts
            self.forget(connection)
            return False

        wheel = reactor.call_in_loop(open_wheel)
        if client.authkey is not None and timeout is not None and timeout > CHALLENGE_PROBE and \
                not reactor.run_until(outcome.__len__, CHALLENGE_PROBE) and wheel.reads == 0:
            # no challenge yet: a keyless server, or a TLS one, says nothing and
            # waits as we do; a second connection finds out which, at once. It
            # blocks, so it runs on a thread of its own while this one runs the loop
            verdict: list = []
            threading.Thread(target=lambda: reactor.call_soon_threadsafe(
                verdict.append, self.why_no_challenge(connection, sockaddr, family)),
                name="proxysession-probe", daemon=True).start()
            reactor.run_until(lambda: verdict or outcome, None)
            why = verdict[0] if verdict else None
            if why is not None:
                reactor.call_in_loop(wheel.close, "connect check failed")
                return self.failed(address, port, why)
        reactor.run_until(outcome.__len__, None)
        if not reactor.call_in_loop(opened, wheel):
            errors = [error for error in outcome if error is not None]
            return self.failed(address, port, errors[0] if errors else
                               ConnectionError("connection closed during the handshake"))
        # One round trip makes connect() the place where a keyed server met
        # without a key (it challenges first, and a keyless client learns it
        # only from the next frame), or a peer that does not speak the
        # protocol, is reported; and it tells us the server's limits.
        try:
            info = client.send_message(connection_id, _info_request(client.max_frame),
                                       timeout=timeout)
        except ProxyError as exc:
            info = exc
        try:
            grace = reactor.call_in_loop(connection.learn_info, info)
            if grace > 0 and client.reconnect:  # a publisher here may resume if its link drops
                connection.token = _resume_answer(client.send_message(
                    connection_id, {"type": "resume"}, timeout=timeout))[0]
        except ProxyError as exc:
            reactor.call_in_loop(wheel.close, "connect check failed")
            return self.failed(address, port, self.why_first_request_failed(exc, connection))
        reactor.call_in_loop(self.connected, connection)
        log.debug("%s connected to %s:%s as connection %d", client.alias, address, port,
                  connection_id)
        return connection_id

    # NATS (the nats section)

    def connect_nats(self, urls: str, timeout: Optional[float]) -> int:
        """Client.connect to the first of ``urls`` whose NATS server takes us:
        it answers our CONNECT's PING within ``timeout``."""
        servers, credentials, tls_first = self.nats_servers(urls)
        reactor = self.client.reactor
        connection_id = next(self.ids)
        failures: List[str] = []
        for at in range(len(servers)):
            outcome: list = []         # a PONG puts None here, a failure its error
            connection = self.nats_try(connection_id, servers, at, credentials, tls_first,
                                       timeout, outcome)
            try:
                sock = _dial(connection.address, connection.port)[0]
            except OSError as exc:
                failures.append("nats://%s:%s: %s" % (connection.address, connection.port, exc))
                continue
            wheel = reactor.call_in_loop(self.open, connection, sock, _no_answer_needed)
            if not reactor.run_until(outcome.__len__, timeout):
                outcome.append(ConnectError("no answer within %.3g s: is it a NATS server?"
                                            % timeout))
            if reactor.call_in_loop(self.nats_opened, connection, wheel, outcome, failures):
                return connection_id
        return self.failed(_nats_urls(servers), None, ConnectError(
            "cannot connect to NATS: %s" % "; ".join(failures)))

    def nats_servers(self, urls: str) -> Tuple[List[Tuple[str, int]], dict, bool]:
        """connect()'s NATS URLs (``_nats_servers``); tls:// ones need an ssl_context."""
        servers, credentials, tls_first = _nats_servers(urls)
        if tls_first and self.client.ssl_context is None:
            raise ValueError("tls:// addresses (TLS first) need Client(ssl_context=...)")
        return servers, credentials, tls_first

    def nats_try(self, connection_id: int, servers: List[Tuple[str, int]], at: int,
                 credentials: dict, tls_first: bool, timeout: Optional[float],
                 outcome: list) -> "_NatsConnection":
        """connect()'s try of the server ``at`` (the others after it, to
        reconnect to); ``outcome`` says how the opening went."""
        connection = _NatsConnection(self.client, self.hooks, connection_id,
                                     servers[at:] + servers[:at], credentials, timeout)
        connection.tls_first = tls_first
        connection.opening = outcome
        return connection

    def nats_opened(self, connection: "_NatsConnection", wheel: Wheel, outcome: list,
                    failures: List[str]) -> bool:
        """After a try: True if the connection is up; else it is closed, and
        why is among ``failures`` (an authentication error is raised: the
        next server would say the same)."""
        if outcome[0] is None and self.connected(connection):
            return True
        wheel.close("connect check failed")
        self.forget(connection)
        why = next((error for error in outcome if error is not None),
                   ConnectError("the connection closed as it opened"))
        if isinstance(why, AuthenticationError):
            self.failed(connection.address, connection.port, why)
        failures.append("nats://%s:%s: %s" % (connection.address, connection.port, why))
        return False


# ---------------------------------------------------------------------------
# nats
# ---------------------------------------------------------------------------
# The message layer over a NATS server (PROTOCOL.md 10), for a Client that
# connects to "nats://HOST:PORT[,nats://HOST:PORT...]": the Client and its
# proxies are unchanged; a _NatsConnection stands where a _Connection would.
# Each publication is a NATS service (ADR-32, "micro"): its alias is the
# service's name, each method an endpoint on the subject ALIAS.METHOD in
# queue group "q", and it answers $SRV.PING, $SRV.INFO and $SRV.STATS. A
# call is one request whose body is the payload a deliver carries, and whose
# reply is the payload a result carries; a failure carries the
# Nats-Service-Error headers too. It speaks the NATS client protocol itself,
# on the Client's own reactor and wheels (its framing: _NatsFilter).

NATS_MAX_LINE = 64 * 1024         # bytes in one control line from a NATS server: an INFO
                                  # lists the cluster's URLs, a MSG line two subjects
NATS_MAX_HEADERS = 64 * 1024      # bytes in one message's header block
NATS_SCHEMES = ("nats://", "tls://")    # a connect() address that goes to NATS (tls://: TLS
                                  # from the first byte, for a server with handshake_first)
NATS_MAX_SERVERS = 64             # servers a cluster's INFO may add to the ones given: a
                                  # hostile one must not make reconnecting walk thousands
NATS_MAX_PAYLOAD = 64 * 1024 * 1024   # a server's max_payload above this is taken as this:
                                  # what one message may make this client hold
NATS_DISCOVERY = 0.25             # seconds a listing gathers $SRV.PING answers after the
                                  # last one came (at most NATS_DISCOVERY_MAX in all):
NATS_DISCOVERY_MAX = 2.0          # services answer at once, so a quiet spell means all did
NATS_ERR_LOG_EVERY = 10.0         # seconds between the log's lines for the publishes a NATS
                                  # server refuses (-ERR) past the first: a client refused a
                                  # subject on every call must not write a line per call
NATS_WAIT_POLL = 0.1              # seconds before a subscribe that waits for its alias looks
NATS_WAIT_POLL_CAP = 1.0          # again, doubling up to this: an hour's wait asks 3,600 times,
                                  # not 36,000, and an alias published meanwhile is seen within
                                  # a second
NATS_SHARE = 2                    # a publication's calls waiting at a Client take at most
                                  # this share of the room of its connection (calls and bytes):
                                  # one stuck method leaves the other publications the rest
NATS_QUEUE_GROUP = "q"            # the queue group of every endpoint (ADR-32's default)
NATS_TIMEOUT_HEADER = "Proxysession-Timeout-Ms"   # a call's timeout (PROTOCOL.md 10.3)

_NATS_NAME = re.compile(r"[A-Za-z0-9_-]{1,%d}\Z" % MAX_NAME)   # a service's name (ADR-32)
_NATS_TOKEN = _NATS_NAME          # ... and a method's, one token of its endpoint's subject
# a publish the server refused (the connection stays): nats-server's words
_NATS_PUBLISH_REFUSED = re.compile(r'Permissions Violation for Publish to "([^"]+)"')
_NATS_OPS = {b"MSG", b"HMSG", b"PING", b"PONG", b"+OK", b"-ERR", b"INFO"}


def _nats_servers(text: str) -> Tuple[List[Tuple[str, int]], dict, bool]:
    """``nats://[USER:PASSWORD@|TOKEN@]HOST:PORT[,nats://...]``: the (host,
    port) of each (the port defaults to NATS's 4222), the CONNECT fields of
    the credentials the first of them with any gives (percent-escapes
    undone), and whether they are ``tls://`` URLs instead: servers that take
    the TLS handshake first (``handshake_first``). Raises ``ValueError``,
    which never quotes a credential."""
    servers, credentials = [], {}
    urls = text.split(",")
    scheme = "tls://" if text.strip().startswith("tls://") else "nats://"
    for number, url in enumerate(urls, 1):
        url = url.strip()
        userinfo, _, where = url[len(scheme):].rpartition("@")
        try:
            if not url.startswith(scheme):
                raise ValueError("not all %s" % scheme)
            host, port = _parse_host_port(where)
        except ValueError:             # (its words may quote a password: not these)
            raise ValueError("NATS address %d of %d is not %s[USER:PASSWORD@]HOST:PORT (a ',' "
                             "in a password is written %%2C; one list is all nats:// or all "
                             "tls://)" % (number, len(urls), scheme)) from None
        servers.append((host, 4222 if port is None else port))
        if userinfo and not credentials:
            user, colon, password = userinfo.partition(":")
            credentials = {"user": urllib.parse.unquote(user),
                           "pass": urllib.parse.unquote(password)} if colon else \
                {"auth_token": urllib.parse.unquote(userinfo)}
    return servers, credentials, scheme == "tls://"


def _nats_urls(servers: List[Tuple[str, int]]) -> str:
    """Servers as URLs, for a message (never with the credentials)."""
    return ",".join("nats://%s:%d" % server for server in servers)


def _nats_header_block(block: bytes) -> Tuple[Optional[int], Dict[str, str]]:
    """A message's header block (``NATS/1.0[ STATUS[ DESCRIPTION]]``, then
    ``Name: value`` lines, then an empty one): its status, and its headers
    (the first of each name). Raises ``ProtocolError``."""
    lines = block.decode("utf-8", "replace").split("\r\n")
    if not lines[0].startswith("NATS/1.0") or len(lines) < 3 or lines[-2:] != ["", ""]:
        raise ProtocolError("a NATS header block without its NATS/1.0 line or its end: %s"
                            % _show(block[:64]))
    status_line = lines[0][len("NATS/1.0"):].strip()
    code = status_line.split(" ", 1)[0]
    headers: Dict[str, str] = {}
    for line in lines[1:-2]:
        name, colon, value = line.partition(":")
        if not colon:
            raise ProtocolError("a NATS header without a colon: %s" % _show(line[:64]))
        headers.setdefault(name.strip(), value.strip())
    return (int(code) if code.isascii() and code.isdigit() and len(code) == 3 else None), \
        headers


class _NatsFilter:
    """Bytes from a NATS server -> its operations, for a Wheel (``framing``):
    ``("MSG", subject, sid, reply, status, headers, payload)`` for MSG and
    HMSG (status and headers None for MSG), ``("INFO", dict)``, ``("PING",)``,
    ``("PONG",)``, ``("+OK",)``, ``("-ERR", text)``. A message whose header
    block is malformed (any NATS client can send one: the server passes it
    on) is ``("BAD", subject, sid, reply, why)``. A control line longer than
    NATS_MAX_LINE, a payload longer than the server's max_payload or without
    its CRLF, or anything else malformed in the server's own framing sets
    ``broken`` (the wheel closes); parsing costs one pass over the bytes."""

    __slots__ = ("buffer", "scanned", "needed", "broken", "max_payload", "handshake_frames")

    def __init__(self):
        self.buffer = bytearray()
        self.scanned = 0               # bytes of an unfinished line already looked through
        self.needed = 0                # bytes the message begun at the buffer's start takes
        self.broken: Optional[ProtocolError] = None
        self.max_payload = NATS_MAX_PAYLOAD      # until INFO says
        self.handshake_frames = 0                # (the Wheel's authkey handshake: none here)

    def body_space(self) -> None:
        return None                    # (no frame is read in place: every read is appended)

    def get_one_start(self, data) -> None:
        self.buffer += data

    def clear(self) -> None:
        self.buffer = bytearray()

    def get_frames(self) -> list:
        if self.broken is not None:    # (handed on with what came before it: now the end)
            raise self.broken
        buffer = self.buffer
        if len(buffer) < self.needed:  # (a payload still coming is not parsed again)
            return []
        self.needed = 0
        ops: list = []
        at = 0
        try:
            while self.broken is None:
                # (a line that comes a byte at a time is looked through once)
                end = buffer.find(b"\r\n", at + max(self.scanned - 1, 0),
                                  at + NATS_MAX_LINE + 2)
                if end < 0:
                    if len(buffer) - at > NATS_MAX_LINE:
                        raise ProtocolError("a NATS control line longer than %d bytes"
                                            % NATS_MAX_LINE)
                    self.scanned = len(buffer) - at
                    break
                self.scanned = 0
                line = bytes(buffer[at:end])
                verb, _, rest = line.partition(b" ")
                verb = verb.upper()
                if verb == b"MSG" or verb == b"HMSG":
                    op = self._message(verb, rest, buffer, end + 2)
                    if type(op) is int:
                        self.needed = op - at   # its payload is not all in yet
                        break
                    ops.append(op[0])
                    at = op[1]
                    continue
                if verb == b"PING" or verb == b"PONG" or verb == b"+OK":
                    ops.append((verb.decode(),))
                elif verb == b"-ERR":
                    ops.append(("-ERR", rest.decode("utf-8", "replace").strip().strip("'")))
                elif verb == b"INFO":
                    info = json.loads(rest.decode("utf-8"))
                    if type(info) is not dict:
                        raise ValueError("not an object")
                    limit = info.get("max_payload")
                    if type(limit) is int and 0 < limit:     # what it may send us, too
                        self.max_payload = min(limit, NATS_MAX_PAYLOAD)
                    ops.append(("INFO", info))
                else:
                    raise ProtocolError("an unknown NATS operation: %s" % _show(line[:64]))
                at = end + 2
        except ProtocolError as exc:
            self.broken = exc
        except ValueError as exc:      # (json's errors, a count that is no number)
            self.broken = ProtocolError("a malformed NATS control line: %s" % (exc,))
        del buffer[:at]
        if self.broken is not None and not ops:
            raise self.broken
        return ops

    def _message(self, verb: bytes, rest: bytes, buffer: bytearray, start: int):
        """A MSG or HMSG whose line ends before ``start``: (op, where the next
        begins), or None while its payload is not all in."""
        fields = rest.split()
        headed = verb == b"HMSG"
        if len(fields) not in ((4, 5) if headed else (3, 4)):
            raise ProtocolError("a malformed NATS %s line: %s" % (verb.decode(),
                                                                _show(rest[:128])))
        sizes = fields[-2:] if headed else fields[-1:]
        if not all(size.isdigit() and len(size) <= 12 for size in sizes):
            raise ProtocolError("a NATS %s with a bad byte count: %s" % (verb.decode(),
                                                                         _show(rest[:128])))
        total = int(sizes[-1])
        header_size = int(sizes[0]) if headed else 0
        if total > self.max_payload or header_size > min(total, NATS_MAX_HEADERS):
            raise ProtocolError("a NATS %s of %d bytes (headers %d) exceeds the server's "
                                "max_payload (%d bytes)" % (verb.decode(), total, header_size,
                                                            self.max_payload))
        end = start + total
        if len(buffer) < end + 2:
            return end + 2             # where it will end
        if buffer[end:end + 2] != b"\r\n":
            raise ProtocolError("a NATS %s longer than announced (%d bytes)"
                                % (verb.decode(), total))
        subject = fields[0].decode("utf-8", "replace")
        reply = fields[2].decode("utf-8", "replace") if len(fields) == len(sizes) + 3 else None
        status = headers = None
        if headed:
            try:
                status, headers = _nats_header_block(bytes(buffer[start:start + header_size]))
            except ProtocolError as exc:       # its sender's, not the server's: this one goes
                return ("BAD", subject, fields[1], reply, str(exc)), end + 2
        return ("MSG", subject, fields[1], reply, status, headers,
                bytes(buffer[start + header_size:end])), end + 2


def _nats_headers(headers: Dict[str, str], status: str = "") -> bytes:
    """A header block to send."""
    return ("NATS/1.0%s\r\n%s\r\n" % (status, "".join(
        "%s: %s\r\n" % (name, " ".join(str(value).split())) for name, value in
        headers.items()))).encode("utf-8")


def _nats_time(seconds: float) -> str:
    """An RFC 3339 time in UTC, as ADR-32's stats have it."""
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")


def _json_object(data: bytes) -> Optional[dict]:
    """A JSON object a NATS peer sent, or None."""
    try:
        value = json.loads(data.decode("utf-8"))
    except ValueError:                 # (UnicodeDecodeError is one)
        return None
    return value if type(value) is dict else None


def _nats_method_table(info: dict) -> dict:
    """A subscribe's answer, ``{"methods": {name: {signature, doc}}}``, from a
    service's answer to $SRV.INFO: its endpoints, their metadata."""
    methods = {}
    endpoints = info.get("endpoints")
    for endpoint in endpoints if type(endpoints) is list else ():
        name = endpoint.get("name") if type(endpoint) is dict else None
        if type(name) is str:
            metadata = endpoint.get("metadata")
            metadata = metadata if type(metadata) is dict else {}
            methods[name] = {"signature": metadata.get("signature"),
                             "doc": metadata.get("doc") or None}
    return {"methods": methods}


def _nats_failure(payload: bytes, loads: Callable[[bytes], Any]) -> Tuple[int, str]:
    """A failure's Nats-Service-Error-Code and Nats-Service-Error (one line,
    at most MAX_QUOTE characters): 400 for a refusal, a str ("Unable to post
    ...", "Malformed call: ..."), which the caller must mend; 500 for what a
    method raised, a dict (PROTOCOL.md 10.3)."""
    try:
        value = loads(payload)
    except Exception:
        value = None
    code = 400 if type(value) is str else 500
    if type(value) is dict and "error" in value:
        value = "%s: %s" % (_text(value.get("error")), _text(value.get("message", ""), None))
    text = " ".join((value if type(value) is str else _show(value)).split())
    return code, text[:MAX_QUOTE] or "the call failed"


class _NatsService:
    """One publication as a NATS service (ADR-32): its instance id, its
    endpoints' counts, and the subscriptions that carry it."""

    __slots__ = ("alias", "id", "methods", "shared", "started", "sids", "stats", "waiting",
                 "waiting_bytes")

    def __init__(self, alias: str, methods: dict, shared: bool, instance: Optional[str] = None):
        self.alias = alias
        self.id = instance or secrets.token_hex(11)     # (kept when published again)
        self.methods = methods
        self.shared = shared
        self.started = time.time()
        self.sids: List[bytes] = []
        # method -> [requests, errors, nanoseconds, last error]
        self.stats: Dict[str, list] = {method: [0, 0, 0, ""] for method in methods}
        self.waiting = 0               # its calls not answered yet (_NatsServed),
        self.waiting_bytes = 0         # and their payloads' bytes

    def answer(self, kind: str) -> dict:
        """Its answer to $SRV.<kind> (ping, info or stats), as ADR-32 has it."""
        answer = {"type": "io.nats.micro.v1.%s_response" % kind, "name": self.alias,
                  "id": self.id, "version": __version__,
                  "metadata": {"proxysession": "1", "shared": "true" if self.shared else "false"}}
        if kind == "info":
            answer["description"] = "proxysession publication '%s'" % self.alias
            answer["endpoints"] = [
                {"name": method, "subject": "%s.%s" % (self.alias, method),
                 "queue_group": NATS_QUEUE_GROUP,
                 "metadata": {"signature": str(description.get("signature") or "(...)"),
                              "doc": str(description.get("doc") or "")}}
                for method, description in self.methods.items()]
        elif kind == "stats":
            answer["started"] = _nats_time(self.started)
            answer["endpoints"] = [
                {"name": method, "subject": "%s.%s" % (self.alias, method),
                 "queue_group": NATS_QUEUE_GROUP, "num_requests": counts[0],
                 "num_errors": counts[1], "last_error": counts[3],
                 "processing_time": counts[2],
                 "average_processing_time": counts[2] // counts[0] if counts[0] else 0,
                 "data": None}
                for method, counts in self.stats.items()]
        return answer


class _NatsServed:
    """A NATS connection's publications as services (PROTOCOL.md 10.2), and
    the calls they serve: each made a deliver for the Client, within bounds
    on the calls waiting here, and answered with ADR-32's error headers."""

    __slots__ = ("connection", "services", "former", "serving", "serving_bytes", "call_ids")

    def __init__(self, connection: "_NatsConnection"):
        self.connection = connection
        self.services: Dict[str, _NatsService] = {}
        self.former: Dict[str, str] = {}   # alias -> its instance, while published again
        # call id -> (reply subject, service, method, when it came, payload size)
        self.serving: Dict[int, Tuple[str, _NatsService, str, float, int]] = {}
        self.serving_bytes = 0         # the payloads of those calls
        self.call_ids = itertools.count(1)

    def start(self, alias: str, methods: dict, shared: bool, former: Optional[str]) -> None:
        """Serve ``alias`` (its check passed): one subscription for every
        endpoint (a call of a method not published comes too, and is
        answered "Unable to post", as the server answers it), one for the
        calls of proxies pinned to this instance, and ADR-32's nine."""
        connection = self.connection
        self.former.pop(alias, None)
        service = self.services[alias] = _NatsService(alias, methods, shared, former)
        service.sids.append(connection.subscribe("%s.*" % alias, NATS_QUEUE_GROUP,
                                                 lambda op: self.on_call(service, op)))
        service.sids.append(connection.subscribe("%s.%s.*" % (alias, service.id), None,
                                                 lambda op: self.on_call(service, op)))
        for kind in ("PING", "INFO", "STATS"):
            for subject in ("$SRV.%s" % kind, "$SRV.%s.%s" % (kind, alias),
                            "$SRV.%s.%s.%s" % (kind, alias, service.id)):
                service.sids.append(connection.subscribe(subject, None, lambda op, kind=kind: (
                    op[3] and connection.reply(op[3], json.dumps(service.answer(
                        kind.lower())).encode("utf-8")))))

    def stop(self, alias: str) -> bool:
        """Rescind ``alias``; False if it is not served here."""
        self.former.pop(alias, None)
        service = self.services.pop(alias, None)
        if service is None:
            return False
        for sid in service.sids:
            self.connection.unsubscribe(sid)
        return True

    def forget(self) -> None:
        """The connection is lost: its services and calls go with the server
        that carried them. Once back, the Client publishes them again (its
        restore), each under the instance id it had (its proxies' pins stay
        good), checked as any publish."""
        for service in self.services.values():
            for sid in service.sids:
                self.connection.unsubscribe(sid)     # (no wheel: nothing is written)
            self.former[service.alias] = service.id
        self.services.clear()
        self.serving.clear()           # (their callers were told nothing: they time out)
        self.serving_bytes = 0

    def on_call(self, service: _NatsService, op: tuple) -> None:
        """A request to an endpoint ALIAS.METHOD: the Client serves it as a
        deliver of METHOD (a payload that names another fails), within
        bounds on the calls waiting here (MAX_WAITING_CALLS, and
        max_write_buffer bytes of their payloads; for one publication,
        1 / NATS_SHARE of each)."""
        _, subject, _, reply, _, headers, payload = op
        if reply is None:
            return                     # (nobody to answer)
        method = subject[len(service.alias) + 1:]
        if method.startswith(service.id + "."):     # (a call pinned to this instance)
            method = method[len(service.id) + 1:]
        if self.services.get(service.alias) is not service:     # rescinded meanwhile
            return self.refuse(reply, "Session '%s' doesn't exist" % service.alias, 503)
        room = self.connection.client.max_write_buffer
        if len(self.serving) >= MAX_WAITING_CALLS or self.serving_bytes + len(payload) > room:
            return self.refuse(reply, "Session '%s' is busy: its publisher holds %s"
                                % (service.alias, _plural(len(self.serving), "call")), 503)
        if service.waiting and (service.waiting >= MAX_WAITING_CALLS // NATS_SHARE or
                                service.waiting_bytes + len(payload) > room // NATS_SHARE):
            # (its share: a publication with none waiting takes what fits the room)
            return self.refuse(reply, "Session '%s' is busy: %s wait%s for it"
                                % (service.alias, _plural(service.waiting, "call"),
                                   "s" if service.waiting == 1 else ""), 503)
        call_id = next(self.call_ids)
        self.serving[call_id] = (reply, service, method, time.monotonic(), len(payload))
        self.serving_bytes += len(payload)
        service.waiting += 1
        service.waiting_bytes += len(payload)
        if method in service.stats:
            service.stats[method][0] += 1
        message = {"type": "deliver", "id": call_id, "to": service.alias, "payload": payload,
                   "event": method}
        timeout_ms = (headers or {}).get(NATS_TIMEOUT_HEADER, "")
        if timeout_ms.isascii() and timeout_ms.isdigit() and len(timeout_ms) < 12:
            message["timeout_ms"] = int(timeout_ms)
        self.connection.hooks.message(message, self.connection)

    def refuse(self, reply: str, why: str, code: int) -> None:
        """Answer a call that is not served here, with why."""
        self.connection.reply(reply, _dumps(why), _nats_headers(
            {"Nats-Service-Error": why, "Nats-Service-Error-Code": code}))

    def answer(self, wheel: Wheel, call_id: Any, success: bool, payload: bytes) -> None:
        """Answer a call served here: the result's payload, and a failure's
        Nats-Service-Error headers (ADR-32). One over the server's
        max_payload fails the call instead, with the sizes."""
        serving = self.serving.pop(call_id, None)
        if serving is None or wheel is not self.connection.wheel:
            return
        reply, service, method, started, size = serving
        self.serving_bytes -= size
        service.waiting -= 1
        service.waiting_bytes -= size
        counts = service.stats.get(method) or [0, 0, 0, ""]    # (a method not published)
        counts[2] += int((time.monotonic() - started) * 1e9)
        if success and len(payload) <= self.connection.max_payload:
            return self.connection.reply(reply, payload)
        if success:
            success, payload = False, _dumps(
                "Result of %d bytes exceeds the max_payload of the NATS server (%d bytes)"
                % (len(payload), self.connection.max_payload))
        code, counts[3] = _nats_failure(payload, self.connection.hooks.loads)
        counts[1] += 1
        headers = _nats_headers({"Nats-Service-Error": counts[3], "Nats-Service-Error-Code": code})
        if len(payload) + len(headers) > self.connection.max_payload:     # (a failure as large)
            payload = _dumps("Result of %d bytes exceeds the max_payload of the NATS server "
                             "(%d bytes)" % (len(payload), self.connection.max_payload))
        self.connection.reply(reply, payload, headers)


class _NatsConnection(_Link):
    """A Client's connection to a NATS server or cluster: what a _Connection
    is to a proxysession server (the Client calls the same methods), over
    NATS's request-reply. Replies come to one inbox subscription; a request
    to a subject nobody serves is answered at once by the server's 503, which
    is "doesn't exist" here. Lost, it reconnects (as every _Link) to the next
    of the servers it knows, those the cluster told it of (connect_urls)
    among them, subscribes again, then sends what was queued."""

    __slots__ = ("given", "servers", "credentials", "inbox", "sids", "subscriptions",
                 "served", "asked", "max_payload", "greeted", "pongs", "pins", "tls_first",
                 "restoring_ids", "errors_logged_at", "errors_unlogged")

    def __init__(self, client: "Client", hooks: _Hooks, connection_id: int,
                 servers: List[Tuple[str, int]], credentials: dict, timeout: Optional[float]):
        super().__init__(client, hooks, connection_id, servers[0][0], servers[0][1], None,
                         timeout)
        self.given = list(servers)     # (host, port) of the URLs connect() was given,
        self.servers = servers         # ... and those the cluster told of: tried in turn
        self.credentials = credentials  # CONNECT's user and pass, or auth_token
        self.deadlines = True          # a call's timeout travels as a header
        self.inbox = "_INBOX.%s" % secrets.token_hex(11)
        self.sids = itertools.count(1)
        # sid -> (subject, queue group or None, handler(op)): made again on each wheel
        self.subscriptions: Dict[bytes, Tuple[str, Optional[str], Callable]] = {}
        self.served = _NatsServed(self)          # its publications, the calls they serve
        self.asked: Dict[int, Tuple[str, Any]] = {}     # request id -> (its kind, its state)
        self.max_payload = NATS_MAX_PAYLOAD      # until INFO says
        self.greeted: Optional[Wheel] = None     # the wheel our CONNECT went on
        # what to do at the PONG of each PING sent since the wheel is up (None:
        # a heartbeat's): the server answers in order, so a PONG says it has
        # handled all that went before
        self.pongs: collections.deque = collections.deque()
        self.pins: Dict[str, str] = {}     # alias -> the instance an exclusive one's calls go to
        self.tls_first = False         # TLS from the first byte (tls:// URLs, handshake_first)
        self.restoring_ids: set = set()    # the publishes again that the queue waits for
        self.errors_logged_at = -NATS_ERR_LOG_EVERY   # a refused publish the log said last
        self.errors_unlogged = 0       # ... and those since that it did not
        self.subscribe(self.inbox + ".*", None, self._on_reply)

    # its wheel

    def open_wheel(self, sock: socket.socket, on_open: Callable) -> Wheel:
        """A wheel on a socket that is connecting; the server speaks first
        (INFO), and the connection is open once it answers our CONNECT's PING."""
        client = self.client
        self.wheel = wheel = Wheel(
            client.reactor, sock, self.connection_id, on_frame=self.on_frame,
            on_close=self.hooks.closed, on_open=on_open,
            peer="nats://%s:%s" % (self.address, self.port),
            server_side=False, connecting=True, max_write_buffer=client.max_write_buffer,
            handshake_timeout=self.timeout, framing=_NatsFilter(),
            ssl_context=client.ssl_context if self.tls_first else None,
            server_hostname=self.tls_name())
        wheel.context = self
        return wheel

    def _write(self, line: str, payload: bytes = b"", headers: bytes = b"") -> None:
        """One operation to the server: its line, then the header block and
        the payload, if any (PUB and HPUB)."""
        if line.startswith(("PUB", "HPUB")):
            body = headers + payload
            if len(body) >= SEND_COALESCE:
                self.wheel.write(line.encode("utf-8") + b"\r\n", [headers, payload, b"\r\n"])
            else:
                self.wheel.write(line.encode("utf-8") + b"\r\n", body + b"\r\n")
        else:
            self.wheel.write(b"", line.encode("utf-8") + b"\r\n")

    def _publish(self, subject: str, payload: bytes, reply: Optional[str] = None,
                 headers: Optional[bytes] = None) -> None:
        """PUB or HPUB. Raises ``FrameTooLarge`` past the server's max_payload:
        the server would close the connection, failing every call on it."""
        size = len(payload) + (len(headers) if headers else 0)
        if size > self.max_payload:
            raise FrameTooLarge("a message to %s" % subject, size, self.max_payload)
        target = subject if reply is None else "%s %s" % (subject, reply)
        if headers:
            self._write("HPUB %s %d %d" % (target, len(headers), size), payload, headers)
        else:
            self._write("PUB %s %d" % (target, len(payload)), payload)

    def subscribe(self, subject: str, queue: Optional[str], handler: Callable) -> bytes:
        sid = str(next(self.sids)).encode()
        self.subscriptions[sid] = (subject, queue, handler)
        if self.wheel is not None and self.greeted is self.wheel:
            self._write_sub(sid)       # (else it goes with the next CONNECT)
        return sid

    def _write_sub(self, sid: bytes) -> None:
        subject, queue, _ = self.subscriptions[sid]
        self._write("SUB %s %s%s" % (subject, "" if queue is None else queue + " ",
                                     sid.decode()))

    def unsubscribe(self, sid: bytes) -> None:
        if self.subscriptions.pop(sid, None) is not None and self.wheel is not None and \
                self.greeted is self.wheel:
            self._write("UNSUB %s" % sid.decode())

    # messages in

    def on_frame(self, op: tuple, wheel: Wheel) -> None:
        kind = op[0]
        if kind == "MSG":
            subscription = self.subscriptions.get(op[2])
            if subscription is not None:
                subscription[2](op)
        elif kind == "BAD":            # (one message, from whichever client sent it)
            log.debug("%s: dropped a NATS message on %s: %s", self.client.alias,
                      _show(op[1], 100), op[4])
        elif kind == "PING":
            self._write("PONG")
        elif kind == "PONG":
            if self.state == "connecting" and self.opening is not None:
                self.opening.append(None)          # connect() goes on
            elif self.state == "down":
                self._back()
            elif self.pongs:
                then = self.pongs.popleft()
                if then is not None:
                    then()
        elif kind == "INFO":
            self._learn(op[1])
        elif kind == "-ERR":
            self._server_error(op[1], wheel)
            if self.opening is not None:
                refused = AuthenticationError if "authori" in op[1].lower() or \
                    "authenti" in op[1].lower() else ConnectError
                self.opening.append(refused("the NATS server at %s refused the connection: "
                                            "%s" % (wheel.peer, _printable(op[1]))))

    def _server_error(self, words: str, wheel: Wheel) -> None:
        """The server's -ERR, which the log says (its words cut and escaped:
        a peer's). A publish it refused (a permissions violation: the
        connection stays) fails the requests sent to that subject now, not at
        their timeout; those the log says once per NATS_ERR_LOG_EVERY seconds,
        with the count since, since a refused subject may be called again
        and again. Every other -ERR (an authorization error, a stale
        connection: why a link ends) is said each time."""
        refused = _NATS_PUBLISH_REFUSED.match(words)
        words = _printable(words)
        now = time.monotonic()
        if refused is None or now - self.errors_logged_at >= NATS_ERR_LOG_EVERY:
            log.warning("%s: NATS server %s: -ERR '%s'%s", self.client.alias, wheel.peer,
                        words, " (and %d more refused publishes since the last)"
                        % self.errors_unlogged if refused and self.errors_unlogged else "")
            if refused is not None:
                self.errors_logged_at, self.errors_unlogged = now, 0
        else:
            self.errors_unlogged += 1
        if refused is None:
            return
        subject = refused.group(1)
        for request_id, (kind, state) in list(self.asked.items()):
            if subject == (state[2] if kind == "deliver" else "$SRV.PING" if kind == "listing"
                           else "$SRV.INFO.%s" % state[0]):
                self._answered(request_id, False, "the NATS server at %s refused this "
                               "client's publish to '%s': %s" % (wheel.peer, subject, words))

    def _learn(self, info: dict) -> None:
        """The server's INFO: its limits and the cluster's other servers; the
        first INFO on a wheel is answered with CONNECT, our subscriptions,
        and a PING whose PONG says the server took them all."""
        limit = info.get("max_payload")
        if type(limit) is int and 0 < limit:
            self.max_payload = min(limit, NATS_MAX_PAYLOAD)
        urls = info.get("connect_urls")
        if self.client.ssl_context is not None and not self.tls_first and \
                self.greeted is not self.wheel:
            urls = None                # (said in the clear, before TLS: not to be trusted)
        if type(urls) is list:         # the cluster now: it replaces what it said before
            known = set(self.given)
            told = []
            for url in urls[:NATS_MAX_SERVERS]:
                try:
                    server = _nats_servers("nats://" + url.split("://")[-1])[0][0]   # (host, port)
                except (ValueError, AttributeError):
                    continue           # (not a str, or not host:port: not ours to use)
                if server not in known:
                    known.add(server)
                    told.append(server)
            self.servers = self.given + told
        if info.get("ldm") is True and (self.address, self.port) in self.servers:
            # it will close its clients soon: the next connection goes elsewhere
            log.info("%s: NATS server %s is entering lame duck mode", self.client.alias,
                     self.wheel.peer)
            self.servers.remove((self.address, self.port))
            self.servers.append((self.address, self.port))
        wheel = self.wheel
        if self.greeted is wheel or not wheel.is_open:
            return                     # an update (the cluster changed): nothing to answer
        if info.get("headers") is not True:
            return wheel.close("the NATS server at %s does not take headers (NATS 2.2 or "
                               "newer does)" % wheel.peer)
        if self.tls_first:             # (in TLS already)
            return self._greet(wheel)
        context = self.client.ssl_context
        offers_tls = info.get("tls_required") is True or info.get("tls_available") is True
        if context is None and info.get("tls_required") is True:
            error = ConnectError("the NATS server at %s requires TLS: give the Client an "
                                 "ssl_context" % wheel.peer)
            return wheel.close(str(error), error=error)
        if context is not None and not offers_tls:
            error = ConnectError("the NATS server at %s offers no TLS, and this Client has an "
                                 "ssl_context: it will not speak in the clear" % wheel.peer)
            return wheel.close(str(error), error=error)
        if context is not None:        # TLS now, then CONNECT inside it
            return wheel.start_tls(context, self.tls_name(), self.timeout, self._greet)
        self._greet(wheel)

    def tls_name(self) -> str:
        """The name its certificate must carry: a server the cluster told of
        (an address, usually) is checked against the first one given."""
        return self.address if (self.address, self.port) in self.given else self.given[0][0]

    def _greet(self, wheel: Wheel) -> None:
        """CONNECT, our subscriptions, and the PING whose PONG says the
        server took them all."""
        self.greeted = wheel           # (from now on a new subscription goes at once)
        connect = {"verbose": False, "pedantic": False,
                   "tls_required": self.client.ssl_context is not None,
                   "name": self.client.alias, "lang": "python-proxysession",
                   "version": __version__, "protocol": 1, "headers": True,
                   "no_responders": True}
        connect.update(self.credentials)
        self._write("CONNECT " + json.dumps(connect, separators=(",", ":")))
        for sid in self.subscriptions:
            self._write_sub(sid)
        self._write("PING")

    def _on_reply(self, op: tuple) -> None:
        """A reply in our inbox: it settles the request it answers."""
        _, subject, _, _, status, headers, payload = op
        token = subject[len(self.inbox) + 1:]
        request_id = int(token) if token.isascii() and token.isdigit() and len(token) < 19 \
            else None
        asked = self.asked.get(request_id)
        request = self.pending.get(request_id)
        if asked is None or request is None:
            return                     # (late, or a second answer to a listing's ping: below)
        kind, state = asked
        if kind == "listing":
            return self._gathered(request_id, payload)
        if kind == "publish":
            answer = _json_object(payload)
            if state[2] is not None and status != 503 and answer is not None and \
                    answer.get("id") == state[2]:
                return                 # (its own old instance: the spell decides)
            del self.pending[request_id], self.asked[request_id]
            return self._published(request, state, status == 503, answer)
        if status == 503:              # nobody serves that subject
            if kind == "deliver" and state[1] is not None and \
                    self.pins.get(state[0]) == state[1]:
                del self.pins[state[0]]    # (the instance the proxy was pinned to went)
            if kind == "subscribe" and state[1] is not None and \
                    time.monotonic() < state[1]:
                return self._ask_again(request_id, state)
            return self._answered(request_id, False, "Session '%s' doesn't exist" % state[0])
        if status is not None and status >= 400 or headers and \
                "Nats-Service-Error-Code" in headers:
            return self._answered(request_id, False, self._failure(payload, headers, status))
        if kind == "deliver":
            return self._answered(request_id, True, payload, pickled=True)
        answer = _json_object(payload)
        if answer is None:
            return self._answered(request_id, False, "a malformed answer to $SRV.INFO.%s: %s"
                                % (state[0], _show(payload[:100])))
        self._answered(request_id, True, answer)

    def _failure(self, payload: bytes, headers: Optional[dict], status: Optional[int]) -> Any:
        """A failure's payload: the one a proxysession publisher pickled, or
        the text of the Nats-Service-Error header of any other service."""
        if payload:
            try:
                return self.hooks.loads(payload)
            except Exception:
                pass
        return (headers or {}).get("Nats-Service-Error") or \
            "the NATS service answered status %s" % status

    def _answered(self, request_id: int, success: bool, value: Any,
                  pickled: bool = False) -> None:
        """The request ``request_id`` is answered (_Link._settle): a call's
        payload is unpickled there, a subscribe's answer becomes its method
        table here."""
        request = self.pending.pop(request_id, None)
        kind, state = self.asked.pop(request_id, (None, None))
        if request is None:
            return
        if kind == "subscribe" and success:
            self._pin(state[0], value)
            value = _nats_method_table(value)
        self._settle(request, success, value or None if pickled else value, pickled)

    def _pin(self, alias: str, info: dict) -> None:
        """A subscribe's answer: an exclusive publication's calls go to the
        instance that answered (ALIAS.ID.METHOD), a shared one's to any
        member (ALIAS.METHOD, the queue group's pick)."""
        metadata = info.get("metadata")
        instance = info.get("id")
        if type(metadata) is dict and metadata.get("shared") == "false" and \
                type(instance) is str and _NATS_TOKEN.match(instance):
            self.pins[alias] = instance
        else:
            self.pins.pop(alias, None)

    # messages out

    def request(self, request: _Request, message: dict) -> None:
        """What a _Connection's request is, over NATS: a call, a subscribe, a
        publish, a rescind or a listing, each as its NATS equivalent. Raises
        ``FrameTooLarge`` past the server's max_payload, ``ProxyError`` for
        what NATS cannot do."""
        if self.state == "closed":
            raise ProxyError("connection %d is closed" % self.connection_id)
        kind = message["type"]
        if kind not in ("deliver", "subscribe", "publish", "rescind", "listing", "cancel"):
            raise ProxyError("a %s request does not go over NATS" % kind)
        request_id = message["id"] = request.id = next(self.ids)
        self.pending[request_id] = request
        try:
            if self.state == "down" or self.restoring_ids and not message.get("again"):
                # (while down, or back while its publications are made again)
                if kind == "deliver" and len(message["payload"]) > self.max_payload:
                    raise FrameTooLarge("a call", len(message["payload"]), self.max_payload)
                self.queued[request_id] = message
            else:
                self._send(request_id, message)
        except ProxyError:
            self.pending.pop(request_id, None)
            self.asked.pop(request_id, None)
            if request.undo is not None:
                request.undo()
            raise
        if request.deadline is not None:
            self.timeouts.add(request.deadline, request_id)

    def _send(self, request_id: int, message: dict) -> None:
        kind = message["type"]
        reply = "%s.%d" % (self.inbox, request_id)
        if kind == "deliver":
            alias = message["to"]
            subject = "%s.%s" % (alias, message["event"]) if "instance" not in message else \
                "%s.%s.%s" % (alias, message["instance"], message["event"])
            self.asked[request_id] = ("deliver", (alias, message.get("instance"), subject))
            timeout_ms = message.get("timeout_ms")
            headers = None if timeout_ms is None else _nats_headers(
                {NATS_TIMEOUT_HEADER: timeout_ms})
            if not _NATS_NAME.match(alias):
                return self._answered(request_id, False, "Session '%s' doesn't exist" % alias)
            return self._publish(subject, message["payload"], reply, headers)
        if kind == "subscribe":
            alias = message["to"]
            wait = message.get("wait")
            state = (alias, None if wait is None else time.monotonic() + wait, NATS_WAIT_POLL)
            if not _NATS_NAME.match(alias):
                return self._answered(request_id, False, "Session '%s' doesn't exist" % alias)
            self.asked[request_id] = ("subscribe", state)
            return self._publish("$SRV.INFO.%s" % alias, b"", reply)
        if kind == "listing":
            self.asked[request_id] = ("listing", (set(), time.monotonic(), None))
            self._publish("$SRV.PING", b"", reply)
            return self._quiet(request_id)
        publication = pickle.loads(message["payload"]) if kind in ("publish", "rescind") \
            else None                  # (our own bytes: Publication.message, Client.rescind)
        if kind == "publish":
            alias = publication["session_alias"]
            if not _NATS_NAME.match(alias):
                raise ProxyError("cannot publish '%s' over NATS: a service name is 1 to %d "
                                 "letters, digits, '-' or '_'" % (alias, MAX_NAME))
            if alias in self.served.services:
                raise ProxyError("Session '%s' already exists" % alias)
            former = self.served.former.get(alias)
            self.asked[request_id] = ("publish", (alias, publication, former))
            # whoever serves the alias already answers this (and an exclusive
            # publication may not join it); nobody does: the server's 503
            self._publish("$SRV.INFO.%s" % alias, b"", reply)
            if former is not None:
                # published again after a lost link: the server may still hold
                # the old connection's subscriptions, which take the request
                # and never answer; another instance answers within the spell
                self.client.reactor.call_later(NATS_DISCOVERY, self._taken, request_id, True)
            elif publication.get("shared") is not True:
                # no 503 before the PONG: someone serves it (busy, maybe)
                self._ping(lambda: self._taken(request_id))
            return None
        if kind == "rescind":
            if not self.served.stop(publication["session_alias"]):
                return self._answered(request_id, False, "Session '%s' is not published here"
                                    % publication["session_alias"])
            # done once the server has taken the UNSUBs: no call comes after that
            return self._ping(lambda: self._answered(request_id, True, None))
        self._answered(request_id, True, None)      # a cancel: NATS has none to pass on

    def _ask_again(self, request_id: int, state: tuple) -> None:
        """A subscribe that waits for its alias looks again, a while later
        each time (and once at the end of its wait)."""
        alias, deadline, delay = state
        self.asked[request_id] = ("subscribe", (alias, deadline,
                                                min(2 * delay, NATS_WAIT_POLL_CAP)))

        def again():
            if request_id in self.pending and self.state == "up":
                self._publish("$SRV.INFO.%s" % alias, b"", "%s.%d" % (self.inbox, request_id))
        self.client.reactor.call_later(min(delay, max(0.0, deadline - time.monotonic())), again)

    def _quiet(self, request_id: int) -> None:
        """A listing gathers until no answer came for NATS_DISCOVERY seconds."""
        asked = self.asked.get(request_id)
        if asked is None:
            return
        names, started, last = asked[1]
        now = time.monotonic()
        if now - (last or started) >= NATS_DISCOVERY or now - started >= NATS_DISCOVERY_MAX:
            request = self.pending.pop(request_id, None)
            del self.asked[request_id]
            if request is not None:
                request.finish(Result(True, sorted(names), self.connection_id, request.tag),
                               self.client.alias)
            return
        self.client.reactor.call_later(NATS_DISCOVERY / 5, self._quiet, request_id)

    def _gathered(self, request_id: int, payload: bytes) -> None:
        names, started, _ = self.asked[request_id][1]
        try:
            answer = json.loads(payload.decode("utf-8"))
            name = answer.get("name") if type(answer) is dict else None
        except ValueError:
            name = None
        if type(name) is str:
            names.add(name)
        self.asked[request_id] = ("listing", (names, started, time.monotonic()))

    def _taken(self, request_id: int, free: bool = False) -> None:
        """An exclusive publish whose alias someone serves: it exists; or a
        publish again that no other instance answered: it is free."""
        if self.asked.get(request_id, ("",))[0] != "publish":
            return                     # (decided meanwhile)
        asked = self.asked.pop(request_id)
        request = self.pending.pop(request_id, None)
        if request is not None:
            self._published(request, asked[1], free, None)

    def _published(self, request: _Request, state: tuple, free: bool,
                   answer: Optional[dict]) -> None:
        """A publish's look at who serves its alias: nobody (``free``), or
        members of a shared service with the same methods that this one
        joins; else it exists already."""
        alias, publication, former = state
        methods = publication["methods"]
        shared = publication.get("shared") is True
        if not free:
            metadata = answer.get("metadata") if answer is not None else None
            joins = shared and type(metadata) is dict and metadata.get("shared") == "true" \
                and sorted(_nats_method_table(answer)["methods"]) == sorted(methods)
            if not joins:
                return request.finish(Result(False, "Session '%s' already exists" % alias,
                                             self.connection_id, request.tag),
                                      self.client.alias)
        self.served.start(alias, methods, shared, former)
        value = alias
        if request.on_result is not None:
            value = request.on_result(value)
        request.finish(Result(True, value, self.connection_id, request.tag), self.client.alias)

    def reply(self, reply: str, payload: bytes, headers: Optional[bytes] = None) -> None:
        """An answer (a call's, a $SRV request's) to a reply subject; one over
        the server's max_payload is logged and dropped (sent, the server
        would close the connection): its asker times out."""
        try:
            self._publish(reply, payload, None, headers)
        except FrameTooLarge as error:
            log.warning("%s: an answer not sent over NATS: %s", self.client.alias, error)

    def answer(self, wheel: Wheel, call_id: Any, success: bool, payload: bytes) -> None:
        """Answer a call served here (_NatsServed.answer)."""
        self.served.answer(wheel, call_id, success, payload)

    # what a Client asks of any connection

    def call_message(self, alias: str, event: str, payload: bytes,
                     timeout: Optional[float]) -> dict:
        """A call: its endpoint is ALIAS.EVENT; its timeout goes as a header.
        Raises ``ProxyError`` for a method name no subject token can carry."""
        if type(event) is not str or not _NATS_TOKEN.match(event):
            raise ProxyError("Unable to post '%s' to '%s': over NATS a method's name is "
                             "letters, digits, '-' and '_'" % (_quote(event), _quote(alias)))
        message = {"type": "deliver", "to": alias, "event": event, "payload": payload}
        instance = self.pins.get(alias)
        if instance is not None:
            message["instance"] = instance
        if timeout is not None and 0 < timeout <= MAX_CALL_TIMEOUT_MS / 1000:
            message["timeout_ms"] = math.ceil(timeout * 1000)
        return message

    def _take_back(self, request_id: int) -> bool:
        self.asked.pop(request_id, None)
        return self.queued.pop(request_id, None) is not None

    def _ping(self, then: Optional[Callable[[], None]] = None) -> None:
        self.pongs.append(then)
        self._write("PING")

    def _forget(self) -> None:
        self.pongs.clear()
        self.asked.clear()             # (their requests fail: the replies would not come)
        self.served.forget()

    def lost(self, reason: str) -> ProxyError:
        failure = super().lost(reason)
        self.next_server()             # (the server just lost is the last to try again)
        return failure

    def next_server(self) -> None:
        at = self.servers.index((self.address, self.port)) \
            if (self.address, self.port) in self.servers else -1
        self.address, self.port = self.servers[(at + 1) % len(self.servers)]

    def rejoin(self, wheel: Wheel) -> None:
        """A reconnection is open: the server's INFO comes first (_learn),
        then the PONG that says it took our subscriptions (_back)."""
        if self.state != "down":
            return wheel.close("client closed")
        if self.timeout is not None:   # (a server that takes TCP and never answers)
            self.timer = self.client.reactor.call_later(self.timeout, self._silent, wheel)

    def _silent(self, wheel: Wheel) -> None:
        self.timer = None
        if self.wheel is wheel and self.state == "down":
            wheel.close("no answer from the NATS server within %.3g s" % self.timeout)

    def _back(self) -> None:
        """Made again: the Client publishes and subscribes again (each
        publish checked, 10.2, as any), then what was queued meanwhile goes,
        in order."""
        self.state = "up"
        self.attempt = 0
        self.seen = self.wheel.reads
        self.pinged = False
        if self.timer is not None:     # (rejoin's bound)
            self.timer.cancel()
            self.timer = None
        self.restoring_ids.clear()
        self.hooks.restore(self, [])   # its publishes again go first (set_up) ...
        if not self.restoring_ids:     # ... and the queue once they are done
            self._ready()

    def _ready(self) -> None:
        """Back, with its publications made again: what was queued goes."""
        self._send_queued()
        if self.state != "up":
            return
        log.info("%s: connection %d to nats://%s:%s is back", self.client.alias,
                 self.connection_id, self.address, self.port)
        if self.client.reconnected_event is not None:
            _call_user(self.client.alias, self.client.reconnected_event, self.connection_id)

    def _send_queued(self) -> None:
        """Send what was queued while down, in order, as long as it stays up."""
        while self.queued and self.state == "up":
            request_id = next(iter(self.queued))
            message = self.queued.pop(request_id)
            if request_id not in self.pending:
                continue               # failed meanwhile
            try:
                self._send(request_id, message)
            except ProxyError as failure:
                request = self.pending.pop(request_id)
                self.asked.pop(request_id, None)
                request.finish(Result(False, failure, self.connection_id, request.tag),
                               self.client.alias)

    def restored(self, alias: str, failure: Optional[str]) -> None:
        """(Nothing waits for an alias over NATS: a call to one nobody serves
        fails at once, as "doesn't exist".)"""

    def hold_calls_to(self, alias: str) -> None:
        """(As restored.)"""

    def set_up(self, message: dict, then: Callable[[Result], None],
               timeout: Any = CLIENT_TIMEOUT) -> None:
        """A request of the Client's restore (a publication made again): sent
        now, ``then(result)`` with its answer."""
        def step(result):
            self.restoring_ids.discard(request.id)
            try:
                then(result)
            finally:
                if not self.restoring_ids:
                    self._ready()

        request = _Request(self.connection_id, None, step, None, self.timeout
                           if timeout is CLIENT_TIMEOUT else timeout)
        message["again"] = True        # (it goes ahead of the queue)
        try:
            self.request(request, message)
        except ProxyError as exc:
            return then(Result(False, exc, self.connection_id))
        if request.id in self.pending:             # (not settled at once)
            self.restoring_ids.add(request.id)


# ---------------------------------------------------------------------------
# client
# ---------------------------------------------------------------------------

class _Subscription:
    """What a Client and the Proxy it made share of one subscription: where
    its calls go, and why they fail fast, if they do (``gone``). The Client
    changes it; the Proxy and its methods only read it."""

    __slots__ = ("client", "connection_id", "alias", "gone", "proxy")

    def __init__(self, client: "Client", connection_id: int, alias: str):
        self.client = client
        self.connection_id = connection_id
        self.alias = alias
        self.gone: Optional[str] = None
        self.proxy: Optional["Proxy"] = None


class _Publication:
    __slots__ = ("connection_id", "alias", "obj", "methods", "workers", "confirmed", "shared",
                 "told_serial")

    def __init__(self, connection_id, alias, obj, methods, workers, shared):
        self.connection_id = connection_id
        self.alias = alias
        self.obj = obj
        self.methods = methods
        self.workers = workers         # a _Workers, or None: calls run on the reactor's thread
        self.confirmed = False         # the server said yes: a reconnection publishes it again
        self.shared = shared           # one member of a shared publication (PROTOCOL.md 7.6)
        self.told_serial = False       # the log said once that its calls wait for each other

    def message(self) -> dict:
        """The publish request for it; ``shared`` only when it is, so that an
        exclusive publish is the seed's bytes."""
        payload = {"session_alias": self.alias, "session_name": self.alias,
                   "methods": self.methods}
        if self.shared:
            payload["shared"] = True
        return {"type": "publish", "payload": _dumps(payload)}


class _Sessions:
    """What a Client has published and subscribed, per connection: each
    publication and subscription kept to be made again on a new link
    (``restore``), dropped with its connection for good (``drop``), and a
    subscription told when its session went (``rescinded``) or came back
    (``revive``)."""

    __slots__ = ("client", "publications", "subscriptions")

    def __init__(self, client: "Client"):
        self.client = client
        self.publications: Dict[Tuple[int, str], _Publication] = {}
        self.subscriptions: Dict[Tuple[int, str], _Subscription] = {}

    # publications

    def add_publication(self, publication: _Publication) -> None:
        """Before its publish goes: a call may arrive before the answer does."""
        key = (publication.connection_id, publication.alias)
        if key in self.publications:
            raise ProxyError("Session '%s' is already published on connection %d"
                             % (publication.alias, publication.connection_id))
        self.publications[key] = publication

    def drop_publication(self, publication: _Publication) -> None:
        """Its publish failed, or its rescind succeeded: it serves no more."""
        key = (publication.connection_id, publication.alias)
        if self.publications.get(key) is publication:
            del self.publications[key]
            if publication.workers is not None:
                publication.workers.stop()

    def publication_of(self, obj_or_alias: Any, connection_id: Optional[int]) -> _Publication:
        """The one publication named by its alias or its object (rescind)."""
        matches = [p for p in list(self.publications.values())
                   if (p.alias == obj_or_alias if isinstance(obj_or_alias, str)
                       else p.obj is obj_or_alias)
                   and (connection_id is None or p.connection_id == connection_id)]
        if not matches:
            raise ProxyError("nothing published as %r" % (obj_or_alias,))
        if len(matches) > 1:
            raise ProxyError("%r is published on several connections: pass connection_id"
                             % (obj_or_alias,))
        return matches[0]

    # subscriptions

    def add_subscription(self, subscription: _Subscription, methods: dict) -> "Proxy":
        """A subscribe's answer: the proxy of its methods."""
        subscription.proxy = Proxy(subscription, methods)
        self.subscriptions[(subscription.connection_id, subscription.alias)] = subscription
        return subscription.proxy

    def unsubscribe(self, alias_or_proxy: Any, connection_id: Optional[int]) -> None:
        keys = [key for key, subscription in self.subscriptions.items()
                if (subscription.proxy is alias_or_proxy or key[1] == alias_or_proxy)
                and (connection_id is None or key[0] == connection_id)]
        if not keys:
            raise ProxyError("not subscribed to %r" % (alias_or_proxy,))
        for key in keys:
            self.subscriptions.pop(key).gone = "unsubscribed from '%s'" % key[1]

    def rescinded(self, alias: str, connection_id: int) -> None:
        """The server says the session went: its proxy fails fast; with
        reconnection on, it stays, to work again if its session comes back."""
        key = (connection_id, alias)
        subscription = self.subscriptions.get(key) if self.client.reconnect else \
            self.subscriptions.pop(key, None)
        if subscription is not None:
            subscription.gone = "Session '%s' was rescinded" % (alias,)

    def may_revive(self, subscription: _Subscription) -> bool:
        """Whether a subscription whose session went may subscribe again:
        not once unsubscribed, or once its connection ended for good."""
        return self.client.reconnect and self.subscriptions.get(
            (subscription.connection_id, subscription.alias)) is subscription

    # connections

    def drop(self, connection_id: int, failure: ProxyError) -> None:
        """A connection is over for good: its publications and proxies go."""
        for key in [key for key in self.publications if key[0] == connection_id]:
            self.drop_publication(self.publications[key])
        for key in [key for key in self.subscriptions if key[0] == connection_id]:
            self.subscriptions.pop(key).gone = str(failure)

    def restore(self, connection: _Link, resumed: list) -> None:
        """Make a new connection's server state this client's again: publish
        again what the server confirmed once and did not resume (a publish
        still queued goes with the queue), rescind what it resumed that this
        client no longer has (a publish whose answer was lost), subscribe
        again."""
        connection_id = connection.connection_id
        for key, publication in list(self.publications.items()):
            if key[0] == connection_id and publication.confirmed and \
                    publication.alias not in resumed:
                connection.set_up(publication.message(), lambda result, publication=publication:
                                  self._republished(publication, result))
        for alias in resumed:
            if (connection_id, alias) not in self.publications:
                log.info("%s: connection %d rescinds '%s', which the server kept for it but "
                         "it no longer publishes", self.client.alias, connection_id, alias)
                connection.set_up({"type": "rescind", "payload": _dumps(
                    {"session_alias": alias})}, _no_answer_needed)
        waits = MAX_WAITING_SUBSCRIBES     # what the server lets one connection leave waiting
        for key, subscription in list(self.subscriptions.items()):
            if key[0] == connection_id:
                self._resubscribe(connection, subscription, waits > 0)
                waits -= 1

    def _republished(self, publication: _Publication, result: Result) -> None:
        if result.success or isinstance(result.payload, BaseException):
            return                     # lost with its connection: the next one publishes again
        key = (publication.connection_id, publication.alias)
        if self.publications.get(key) is not publication:
            return
        self.drop_publication(publication)
        client = self.client
        error = _error_from_payload(result.payload)
        log.warning("%s: could not publish '%s' again on connection %d: %s", client.alias,
                    key[1], key[0], error)
        if client.republish_error_event is not None:
            _call_user(client.alias, client.republish_error_event, key[1], key[0], error)

    def _resubscribe(self, connection: _Link, subscription: _Subscription,
                     wait: bool) -> None:
        """Subscribe again on a new connection. A server that takes waits
        (PROTOCOL.md 7.5, 7.7) answers once the alias is back (its publisher
        may be reconnecting too, or restarting), within the Client's timeout;
        calls through the proxy wait meanwhile (held), each within its own
        timeout. If the alias is not back by then, the proxy fails fast, and
        tries again at its next call (Client.revive). (Past the server's
        limit of subscribes waiting, ``wait`` is False: those do not wait.)"""
        alias = subscription.alias
        message = {"type": "subscribe", "to": alias}
        timeout = self.client.timeout
        if wait and connection.deadlines:
            wait = MAX_SUBSCRIBE_WAIT if timeout is None else min(timeout, MAX_SUBSCRIBE_WAIT)
            message["wait"] = wait
            timeout = wait + SUBSCRIBE_WAIT_MARGIN
            connection.hold_calls_to(alias)
            subscription.gone = None   # (rescinded before the break?) its calls wait, too

        def subscribed(result):
            # what this server says, not what the last one did
            subscription.gone = None if result.success else str(
                _error_from_payload(result.payload))
            if alias in connection.restoring:
                connection.restored(alias, subscription.gone)

        connection.request(_Request(subscription.connection_id, None, subscribed, None, timeout),
                           message)


class _Served:
    """The calls a Client serves for its publications: each decoded, run
    (on the reactor's thread, or a publication's workers), and answered on
    the wheel it came by; a cancel from its caller, or the loss of its
    connection, marks it cancelled (current_call() says so, and one not yet
    started never runs)."""

    __slots__ = ("owner", "reactor", "loads", "publications", "awaitable", "calls")

    def __init__(self, owner: str, reactor: Reactor, loads: Callable[[bytes], Any],
                 publications: Dict[Tuple[int, str], _Publication],
                 awaitable: Callable[[Any, CallContext], Any]):
        self.owner = owner             # the Client's alias, for the log
        self.reactor = reactor
        self.loads = loads
        self.publications = publications
        self.awaitable = awaitable     # a future for what a method returned (a coroutine: a task)
        # wheel -> call id -> the CallContext of each call not answered yet: by
        # wheel, since a connection made again (its id kept) numbers calls anew
        # (a dict per wheel, not one keyed by pairs: a call waiting for a worker
        # should hold little more than the bytes that came)
        self.calls: Dict[Wheel, Dict[int, CallContext]] = {}

    def deliver(self, message: dict, connection: "_Connection") -> None:
        """Run a published method for a caller; only what was published runs.
        With workers, the call is decoded on the worker's thread as well: the
        calls waiting for a worker hold only the bytes that came (threads)."""
        wheel = connection.wheel
        publication = self.publications.get((connection.connection_id,
                                              _name(message.get("to"))))
        timeout_ms = message.get("timeout_ms")
        # (a peer's value: a timeout that is not a sane number is no deadline)
        call = CallContext(message.get("to"), None if type(timeout_ms) is not int or not
                           0 < timeout_ms <= MAX_CALL_TIMEOUT_MS
                           else self.reactor.woke + timeout_ms / 1000)
        if type(message.get("id")) is int:     # so that a cancel finds it (PROTOCOL.md 7.7)
            calls = self.calls.get(wheel)
            if calls is None:
                calls = self.calls[wheel] = {}
            calls[message["id"]] = call
        if publication is not None and publication.workers is not None:
            return publication.workers.submit(self._serve, wheel, message, publication, True,
                                              call)
        self._serve(wheel, message, publication, False, call)

    def cancel(self, message: dict, connection: "_Connection") -> None:
        """The server passes on a caller's cancel of a call served here: if it
        has not started, it never will; if it runs, current_call() says so."""
        call_id = message.get("call")
        call = self.calls.get(connection.wheel, {}).get(call_id) \
            if type(call_id) is int else None
        if call is not None:
            call.cancel()

    def stop(self, connection_id: Optional[int] = None) -> None:
        """A connection is lost (None: every one): the calls it brought can no
        longer be answered (their callers have been told), so they are as
        cancelled."""
        for wheel in [wheel for wheel in self.calls
                      if connection_id is None or wheel.wheel_id == connection_id]:
            for call in self.calls.pop(wheel).values():
                call.cancel()

    def _serve(self, wheel: Wheel, message: dict, publication: Optional[_Publication],
               on_worker: bool, call: CallContext) -> None:
        """Decode a call, run it and answer it; from a worker's thread, the
        answer is handed to the reactor's thread to send."""
        started = time.monotonic()
        answer = self._run(wheel, message, publication, call)
        if not on_worker and publication is not None and not publication.told_serial and \
                time.monotonic() - started > SERIAL_CALL_NOTICE:
            self._tell_serial(publication, time.monotonic() - started)
        if answer is None:             # a future answers it later
            return
        if on_worker:
            self.reactor.call_soon_threadsafe(self.answer, wheel, message.get("id"), *answer)
        else:
            self.answer(wheel, message.get("id"), *answer)

    def _tell_serial(self, publication: _Publication, seconds: float) -> None:
        """Once per publication: a call that held the reactor's thread (the
        default, workers=0) held every other call and answer of this Client."""
        publication.told_serial = True
        log.warning("%s: a call to '%s' took %.2f s on the reactor's thread, and every other "
                    "call and answer of this Client waited for it: with workers=0 (the "
                    "default) its calls run there one at a time, in order; publish(..., "
                    "workers=N) runs up to N at once on threads of their own", self.owner,
                    publication.alias, seconds)

    def _run(self, wheel: Wheel, message: dict, publication: Optional[_Publication],
             call: CallContext) -> Optional[Tuple[bool, bytes]]:
        """The answer to a call, as (success, pickled payload); None when the
        method returned a future, which answers when it is done. A call
        cancelled, or past its deadline, before it starts is answered so."""
        try:
            decoded = self.loads(message["payload"])
            event = decoded["event"]
            args = decoded.get("args") or ()
            kwargs = decoded.get("kwargs") or {}
            if type(event) is not str:
                raise TypeError("event must be a str, not %s" % type(event).__name__)
            if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
                raise TypeError("args must be a list and kwargs a dict")
        except Exception as exc:
            return False, _dumps("Malformed call: %s" % _text(exc, None))
        if "event" in message and message["event"] != event:     # (over NATS: the subject's)
            return False, _dumps("Malformed call: sent to the endpoint of '%s', it calls '%s'"
                                 % (_quote(message["event"]), _quote(event)))
        if publication is None or event not in publication.methods:
            return False, _dumps("Unable to post '%s' to '%s'" % (_quote(event),
                                                                  _quote(message.get("to"))))
        if call.cancelled or call.deadline is not None and time.monotonic() >= call.deadline:
            return False, _dumps(call.why_not_start())
        ran, value = _run_published(getattr(publication.obj, event), args, kwargs, call)
        if not ran:
            return False, value
        if _is_future(value) or type(value) is types.CoroutineType:
            self._answer_when_done(wheel, message.get("id"), self.awaitable(value, call))
            return None
        return _answer_body(value)

    def _answer_when_done(self, wheel: Wheel, call_id: int, future: Any) -> None:
        """A method answered with a future: the result goes when it is done
        (on whatever thread completes it), and the loop serves others meanwhile."""
        def done(future):
            try:
                if future.cancelled():
                    answer = False, _dumps("the call's future was cancelled")
                elif future.exception() is not None:
                    answer = False, _dumps(_error_answer(future.exception()))
                else:
                    answer = _answer_body(future.result())
            except BaseException as exc:
                if _interrupts(exc):
                    raise
                answer = False, _dumps(_error_answer(exc))
            self.reactor.call_soon_threadsafe(self.answer, wheel, call_id, *answer)

        _when_done(future, done)

    def answer(self, wheel: Wheel, call_id: Any, success: bool, payload: bytes) -> None:
        """On the reactor's thread: the call is over; its connection sends the answer."""
        if type(call_id) is int:
            calls = self.calls.get(wheel)
            if calls is not None:
                calls.pop(call_id, None)
        wheel.context.answer(wheel, call_id, success, payload)


class Client:
    """Connections to proxysession servers, after POEx::ProxySession::Client.

    For the caller: ``connect`` (to a proxysession server, or to a NATS
    server or cluster: ``"nats://HOST:PORT[,...]"``), ``publish``,
    ``rescind``, ``subscribe``, ``unsubscribe``, ``server_listing``,
    ``close``; each request blocks until
    its answer (driving the reactor meanwhile) and returns the payload or
    raises, or, given ``callback=``, returns at once and calls
    ``callback(Result)`` later. A request's ``timeout=`` is in seconds (None:
    no limit); its default, ``CLIENT_TIMEOUT``, stands for the Client's own
    ``timeout``. Every method may be called from any thread.

    Callbacks (keyword arguments): ``unknown_message_event(data,
    connection_id)``, ``socket_error_event(connection_id, error)``,
    ``connect_error_event(remote_address, remote_port, error)``,
    ``rescinded_event(alias, connection_id)``, and for reconnection
    ``disconnected_event(connection_id, error)``,
    ``reconnected_event(connection_id)``,
    ``republish_error_event(alias, connection_id, error)`` (a publication
    could not be made again: another connection has its alias).

    A lost connection is made again (``reconnect=True``, the default) to the
    same address, with the same id, its publications and subscriptions:
    calls in flight fail, calls made meanwhile wait for it. Every
    ``heartbeat`` seconds a connection silent since the last look gets a
    ping, and one silent since the ping is taken as lost (None: never).

    Payloads are unpickled with an allow-list (PROTOCOL.md 3): extend it with
    ``allow_classes=["module.Name", ...]``; ``unsafe_unpickle_anything=True``
    turns it off, which lets any peer run code here: only for a network
    where every peer is trusted.
    """

    proxy_method_class: type = None    # what a Proxy's methods are: _ProxyMethod (set below)
    _runs_coroutines = False           # whether async def methods may be published

    # Slots, as the Server's (there: why): it has more attributes than
    # CPython specialises the reads of, and its handlers read them per message.
    __slots__ = ("alias", "reactor", "timeout", "authkey", "ssl_context", "max_frame",
                 "max_write_buffer", "handshake_timeout", "options", "unknown_message_event",
                 "socket_error_event", "connect_error_event", "rescinded_event", "reconnect",
                 "heartbeat", "disconnected_event", "reconnected_event", "republish_error_event",
                 "_heartbeat_timer", "_loads", "_connections", "_hooks",
                 "_sessions", "_connector", "_handlers",
                 "_served", "__dict__", "__weakref__")

    def __init__(self, alias: str = "Client", *, reactor: Optional[Reactor] = None,
                 timeout: Optional[float] = DEFAULT_TIMEOUT, authkey: Optional[bytes] = None,
                 ssl_context: Optional[ssl.SSLContext] = None, max_frame: int = MAX_FRAME,
                 max_write_buffer: int = MAX_WRITE_BUFFER,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 allow_classes: Iterable[str] = (), unsafe_unpickle_anything: bool = False,
                 options: Optional[dict] = None,
                 unknown_message_event: Optional[Callable] = None,
                 socket_error_event: Optional[Callable] = None,
                 connect_error_event: Optional[Callable] = None,
                 rescinded_event: Optional[Callable] = None,
                 reconnect: bool = True, heartbeat: Optional[float] = HEARTBEAT,
                 disconnected_event: Optional[Callable] = None,
                 reconnected_event: Optional[Callable] = None,
                 republish_error_event: Optional[Callable] = None):
        authkey = _authkey_bytes(authkey)
        self.alias = alias
        self.reactor = reactor or get_reactor()
        self.timeout = timeout
        self.authkey = authkey
        self.ssl_context = ssl_context
        self.max_frame = max_frame
        self.max_write_buffer = max_write_buffer
        self.handshake_timeout = handshake_timeout
        self.options = dict(options or {})
        self.unknown_message_event = unknown_message_event
        self.socket_error_event = socket_error_event
        self.connect_error_event = connect_error_event
        self.rescinded_event = rescinded_event
        if heartbeat is not None and not (isinstance(heartbeat, (int, float))
                                          and not isinstance(heartbeat, bool) and heartbeat > 0):
            raise ValueError("heartbeat must be a number of seconds > 0, or None, not %r"
                             % (heartbeat,))
        self.reconnect = bool(reconnect)
        self.heartbeat = heartbeat
        self.disconnected_event = disconnected_event
        self.reconnected_event = reconnected_event
        self.republish_error_event = republish_error_event
        self._heartbeat_timer: Optional[_Timer] = None
        self._loads = _PayloadLoader(allow_classes, unsafe_unpickle_anything).loads
        self._connections: Dict[int, _Connection] = {}
        self._sessions = _Sessions(self)
        self._hooks = _Hooks(self._on_message, self._on_wheel_closed, self._loads, self._redial,
                             self._sessions.restore, bool(self.options.get("trace")))
        self._connector = _Connector(self, self._hooks, self._connections, self._connected)
        self._served = _Served(alias, self.reactor, self._loads, self._sessions.publications,
                               self._awaitable)
        self._handlers = {
            "deliver": self._served.deliver,
            "rescinded": self.handle_on_rescinded,
            "cancel": self._served.cancel,
        }

    def __repr__(self):
        return "<Client %s connections=%d pending=%d>" % (
            self.alias, len(self._connections),
            sum(len(connection.pending) for connection in list(self._connections.values())))

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # connections

    def connect(self, remote_address: str = DEFAULT_HOST, remote_port: Optional[int] = None,
                timeout: Optional[float] = None, server_hostname: Optional[str] = None) -> int:
        """Connect to a server and return the connection id. The address is a
        host and a port (default 56789), or one ``"host:port"`` string; or
        ``"nats://HOST:PORT[,nats://HOST:PORT...]"``, a NATS server or
        cluster (the nats section, PROTOCOL.md 10). Raises ``ConnectError``
        (a ``ConnectionError`` too) or ``AuthenticationError``, after calling
        ``connect_error_event`` when set."""
        timeout = self.handshake_timeout if timeout is None else timeout
        if isinstance(remote_address, str) and remote_address.startswith(NATS_SCHEMES):
            return self._connector.connect_nats(remote_address, timeout)
        return self._connector.connect(remote_address, remote_port, timeout, server_hostname)

    def close(self) -> None:
        """Close every connection; waiting requests fail. A connection with a
        resume token says goodbye first, so that its sessions go at once."""
        self.reactor.call_in_loop(self._close_all)

    def _close_all(self) -> None:
        for connection in list(self._connections.values()):
            if not connection.close():          # no wheel to close: end it here
                self._end(connection, None, "client closed")

    def _connected(self, connection: _Link) -> bool:
        """connect() is done: the connection is up, and the heartbeat looks at
        it; False if it was closed meanwhile."""
        if not connection.up():
            return False
        if self.heartbeat is not None and self._heartbeat_timer is None:
            self._heartbeat_timer = self.reactor.call_later(self.heartbeat, self._beat)
        return True

    def _on_wheel_closed(self, wheel: Wheel, reason: str, error=None) -> None:
        connection: _Connection = wheel.context
        connection_id = connection.connection_id
        if connection.opening is not None:      # still connecting: connect() reports it
            connection.opening.append(error if isinstance(error, ProxyError) else
                                      ConnectionError(reason))
            connection.end(ProxyError(reason))     # (nothing was sent on it yet)
            if self._connections.get(connection_id) is connection:
                del self._connections[connection_id]
            return
        if connection.wheel is not wheel:
            return
        if connection.state == "down":          # a reconnection try failed
            return connection.try_failed(reason)
        if connection.state == "up" and self.reconnect and reason != "client closed":
            failure = connection.lost(reason)
            self._served.stop(connection_id)
            if self.disconnected_event is not None:
                _call_user(self.alias, self.disconnected_event, connection_id, failure)
            if self.socket_error_event is not None:
                _call_user(self.alias, self.socket_error_event, connection_id, failure)
            return
        log.info("%s: connection %d to %s closed: %s", self.alias, connection_id, wheel.peer,
                 reason)
        failure = error if isinstance(error, AuthenticationError) else ProxyError(
            "Connection %d to %s was lost: %s" % (connection_id, wheel.peer, reason))
        self._end(connection, failure, reason)

    def _end(self, connection: _Connection, failure: Optional[ProxyError], reason: str) -> None:
        """A connection is over for good: its requests fail, its publications
        and proxies go."""
        connection_id = connection.connection_id
        if self._connections.get(connection_id) is connection:
            del self._connections[connection_id]
        if failure is None:
            failure = ProxyError("Connection %d was lost: %s" % (connection_id, reason))
        connection.end(failure)
        self._served.stop(connection_id)
        self._sessions.drop(connection_id, failure)
        if self.socket_error_event is not None and reason != "client closed":
            _call_user(self.alias, self.socket_error_event, connection_id, failure)

    # links (the connections make themselves again, and hand back here what
    # only the Client knows: its publications and subscriptions)

    def _redial(self, connection: _Connection) -> None:
        """A new socket for a connection that is down."""
        try:
            sock = _dial(connection.address, connection.port)[0]
        except OSError as exc:
            return connection.try_failed(str(exc))
        connection.open_wheel(sock, connection.rejoin)

    def revive(self, subscription: _Subscription) -> bool:
        """For a proxy's methods: a subscription whose session went
        (rescinded, or not back after a reconnection) works again once its
        session is back; True if it is."""
        if not self._sessions.may_revive(subscription):
            return False
        try:
            self.send_message(subscription.connection_id,
                              {"type": "subscribe", "to": subscription.alias})
        except ProxyError:
            return False
        subscription.gone = None
        return True

    def _beat(self) -> None:
        """Every heartbeat: each connection looks at its server (_Connection.beat)."""
        self._heartbeat_timer = None
        for connection in list(self._connections.values()):
            connection.beat(self.heartbeat)
        if self._connections:
            self._heartbeat_timer = self.reactor.call_later(self.heartbeat, self._beat)

    # sending requests (MessageSender)

    def send_message(self, connection_id: int, message: dict,
                     on_result: Optional[Callable] = None, callback: Optional[Callable] = None,
                     tag: Any = None, timeout: Any = CLIENT_TIMEOUT,
                     prepare: Optional[Callable[[], None]] = None,
                     undo: Optional[Callable[[], None]] = None) -> Any:
        """Send a request and wait for its result (or, given ``callback``,
        return at once). ``on_result(payload)`` turns the success payload into
        the return value. From any thread: the sending is done on the
        reactor's thread, the waiting on this one; a request with a callback
        handed to another thread's loop is not waited for, and its errors
        reach the callback. ``prepare()`` runs on the reactor's thread just
        before the send, ``undo()`` if the request fails."""
        reactor = self.reactor
        if callback is None and reactor.depth() >= MAX_NESTED_CALLS:
            # each nested wait is a pass of the loop inside a published method
            # inside a pass: past this depth the interpreter's stack runs out,
            # and a RecursionError would close the connection instead of this call
            raise ProxyError("a blocking call nested %d deep exceeds MAX_NESTED_CALLS (%d)"
                             % (reactor.depth(), MAX_NESTED_CALLS))
        request = _Request(connection_id, on_result, callback, tag,
                           self.timeout if timeout is CLIENT_TIMEOUT else timeout, undo)
        if type(callback) in _TAKES_BACK:
            callback.sent_as(self, request)    # so that cancelling it cancels the call
        # the loop taken once for the send and the wait: call_in_loop then
        # run_until would take it twice, measured at 0.7 us more per call for
        # a pipelining caller (9.3 -> 10.0)
        if not reactor.drive(self._send_request, (request, message, prepare),
                             None if callback is not None else request.settled):
            return self._send_from_another_thread(request, message, prepare)
        return None if callback is not None else request.result.value()

    def _send_from_another_thread(self, request: _Request, message: dict,
                                  prepare: Optional[Callable[[], None]]) -> Any:
        """send_message while another thread runs the loop (threads)."""
        reactor = self.reactor
        if request.callback is not None:
            # an asyncio program, or a thread posting many calls, must not wait
            # a thread switch for each
            return reactor.hand_over(self._send_or_fail, request, message, prepare)
        bound = None if request.timeout is None else request.timeout + HANDOFF_GRACE
        try:
            reactor.call_in_loop(self._send_request, request, message, prepare, timeout=bound)
        except TimeoutError:
            bound = 0              # not sent: say why below
        if not reactor.run_until(lambda: request.result is not None, bound):
            raise CallTimeout("no answer within %.3g s, and the reactor's thread has not run "
                              "for %.3g s more: is a callback or method on it blocked?"
                              % (request.timeout, HANDOFF_GRACE))
        return request.result.value()

    def _send_or_fail(self, request: _Request, message: dict,
                      prepare: Optional[Callable[[], None]]) -> None:
        try:
            self._send_request(request, message, prepare)
        except Exception as exc:
            request.finish(Result(False, exc, request.connection_id, request.tag), self.alias)

    def _send_request(self, request: _Request, message: dict,
                      prepare: Optional[Callable[[], None]]) -> None:
        """On the reactor's thread: its connection sends it (or, while the
        connection is being made again, queues it)."""
        connection = self._connections.get(request.connection_id)
        if connection is None:
            raise ProxyError("no open connection %r" % (request.connection_id,))
        if prepare is not None:
            prepare()
        connection.request(request, message)

    def cancel_request(self, request: _Request, tell_server: bool = True) -> None:
        """Take a request back, from any thread (a future's cancel): it fails
        no more, and is answered no more. For a call (``tell_server``), the
        server is asked to cancel it, if it takes cancels (PROTOCOL.md 7.7),
        unless it was never sent."""
        self.reactor.hand_over(self._cancel, request, tell_server)

    def _cancel(self, request: _Request, tell_server: bool) -> None:
        connection = self._connections.get(request.connection_id)
        if connection is not None:     # (else it failed with its connection)
            connection.cancel(request, tell_server)

    # inbound

    def _on_message(self, message: Any, connection: _Connection) -> None:
        """A message from a server that is no result (its connection settles those)."""
        kind = message.get("type") if type(message) is dict else None
        handler = self._handlers.get(kind) if type(kind) is str else None
        if handler is None:
            self.handle_inbound_data(message, connection.connection_id)
        else:
            handler(message, connection)

    def handle_inbound_data(self, data: Any, connection_id: int) -> None:
        """A message of a type this client does not know: ``unknown_message_event``
        gets it, if set; otherwise it is logged and ignored."""
        if self.unknown_message_event is not None:
            _call_user(self.alias, self.unknown_message_event, data, connection_id)
        else:
            log.warning("%s: connection %d sent a message this client does not handle: %s",
                        self.alias, connection_id, _show(data, 200))

    def handle_on_rescinded(self, message: dict, connection: _Connection) -> None:
        alias = _name(message.get("to"))
        connection_id = connection.connection_id
        if alias is None:
            log.warning("%s: connection %d sent a rescinded notice for %s", self.alias,
                        connection_id, _quote(message.get("to")))
            return
        self._sessions.rescinded(alias, connection_id)
        if self.rescinded_event is not None:
            _call_user(self.alias, self.rescinded_event, alias, connection_id)

    def handle_on_result(self, message: dict, connection: _Connection) -> None:
        """A result settles its request (_Connection.answered)."""
        connection.answered(message)

    def handle_on_deliver(self, message: dict, connection: _Connection) -> None:
        """Run a published method for a caller (_Served.deliver)."""
        self._served.deliver(message, connection)

    def handle_on_cancel(self, message: dict, connection: _Connection) -> None:
        """A caller cancels a call served here (_Served.cancel)."""
        self._served.cancel(message, connection)

    def _awaitable(self, value: Any, call: CallContext) -> Any:
        """A future to answer a call with, for what its method returned: a
        future as it is; a coroutine needs an AsyncClient (there it becomes a
        task), and here is a failure."""
        if type(value) is not types.CoroutineType:
            return value
        value.close()
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_exception(TypeError("the method returned a coroutine: only an AsyncClient "
                                       "runs them"))
        return future

    def send_result(self, wheel: Wheel, original: dict, success: bool, payload: Any) -> None:
        """Answer a delivered call (MessageSender's send_result)."""
        self._served.answer(wheel, original.get("id"), success, _dumps(payload))

    def return_to_sender(self, wheel: Wheel, message_id: int, success: bool,
                         payload: bytes) -> None:
        """Answer a call that came by ``wheel`` (MessageSender's)."""
        self._served.answer(wheel, message_id, success, payload)

    # the requests

    def publish(self, connection_id: int, alias: str, obj: Any,
                methods: Optional[Iterable[str]] = None, callback: Optional[Callable] = None,
                tag: Any = None, timeout: Any = CLIENT_TIMEOUT, workers: int = 0,
                shared: bool = False) -> str:
        """Publish ``obj`` under ``alias``: the methods marked ``@proxy_event``,
        or those named in ``methods``. Returns the alias. With ``workers=N``,
        up to N calls to it run at once on worker threads of its own; with 0,
        on the reactor's thread, one after another. A method may return a
        ``concurrent.futures.Future`` (or an asyncio one): the caller gets its
        result when it is done. ``shared=True``: join the publishers of
        ``alias`` that said the same; each call goes to the one with the
        fewest calls in flight (PROTOCOL.md 7.6)."""
        if type(shared) is not bool:
            raise ValueError("shared must be True or False, not %r" % (shared,))
        table = _method_table(obj, methods)
        workers = _check_workers(workers)
        for name in table:
            if inspect.iscoroutinefunction(getattr(obj, name)):
                if not self._runs_coroutines:
                    raise ValueError("cannot publish %r: it is an async def method, and only "
                                     "an AsyncClient (on a running asyncio loop) runs those"
                                     % (name,))
                if workers:
                    raise ValueError("cannot publish %r with workers=%r: an async def "
                                     "method's calls are tasks on the loop (they overlap "
                                     "already); publish it with workers=0" % (name, workers))
        publication = _Publication(connection_id, alias, obj, table, _Workers(
            workers, "%s:%s" % (self.alias, alias)) if workers else None, shared)

        def confirmed(value):
            publication.confirmed = True
            return value

        sessions = self._sessions
        return self.send_message(connection_id, publication.message(), confirmed, callback, tag,
                                 timeout, lambda: sessions.add_publication(publication),
                                 lambda: sessions.drop_publication(publication))

    def rescind(self, obj_or_alias: Any, connection_id: Optional[int] = None,
                callback: Optional[Callable] = None, tag: Any = None,
                timeout: Any = CLIENT_TIMEOUT) -> None:
        """Rescind a publication, named by its alias or by the published object."""
        publication = self._sessions.publication_of(obj_or_alias, connection_id)

        def on_result(value):
            self._sessions.drop_publication(publication)
            return value

        payload = _dumps({"session_alias": publication.alias})
        return self.send_message(publication.connection_id, {"type": "rescind",
                                 "payload": payload}, on_result, callback, tag, timeout)

    def server_listing(self, connection_id: int, callback: Optional[Callable] = None,
                       tag: Any = None, timeout: Any = CLIENT_TIMEOUT) -> List[str]:
        """The aliases published on that server, sorted."""
        return self.send_message(connection_id, {"type": "listing"}, None, callback, tag,
                                 timeout)

    def server_stats(self, connection_id: int, callback: Optional[Callable] = None,
                     tag: Any = None, timeout: Any = CLIENT_TIMEOUT) -> dict:
        """What the server has done (PROTOCOL.md 7.4): its totals, as the
        monitor's ``/varz``, with ``aliases`` as in ``/aliasz`` and
        ``connection_list`` as in ``/connz``. Raises ``ProxyError`` from a
        server older than this request."""
        def on_result(value):
            if type(value) is not dict or type(value.get("aliases")) is not list:
                raise ProtocolError("malformed stats answer: %s" % _show(value, 200))
            return value

        return self.send_message(connection_id, {"type": "stats"}, on_result, callback, tag,
                                 timeout)

    def subscribe(self, connection_id: int, alias: str, callback: Optional[Callable] = None,
                  tag: Any = None, timeout: Any = CLIENT_TIMEOUT,
                  wait: Optional[float] = None) -> "Proxy":
        """Subscribe to ``alias``; returns its ``Proxy``. ``wait=SECONDS``: if
        nothing is published as ``alias`` yet, wait up to that long for it
        (the server answers when it is published); the request's timeout
        grows to cover the wait."""
        message = {"type": "subscribe", "to": alias}
        if wait is not None:
            if not isinstance(wait, (int, float)) or isinstance(wait, bool) or \
                    not 0 <= wait <= MAX_SUBSCRIBE_WAIT:
                raise ValueError("wait must be a number of seconds from 0 to %g, not %r"
                                 % (MAX_SUBSCRIBE_WAIT, wait))
            message["wait"] = float(wait)
            timeout = self.timeout if timeout is CLIENT_TIMEOUT else timeout
            if timeout is not None:
                timeout = max(timeout, wait + SUBSCRIBE_WAIT_MARGIN)

        def on_result(value):
            if not isinstance(value, dict) or not isinstance(value.get("methods"), dict):
                raise ProtocolError("malformed subscribe answer: %s" % _show(value, 200))
            return self._sessions.add_subscription(_Subscription(self, connection_id, alias),
                                                   value["methods"])

        return self.send_message(connection_id, message, on_result, callback, tag, timeout)

    def unsubscribe(self, alias_or_proxy: Any, connection_id: Optional[int] = None) -> None:
        """Forget a subscription; its proxy then fails fast."""
        self.reactor.call_in_loop(self._sessions.unsubscribe, alias_or_proxy, connection_id)

    def deliver(self, connection_id: int, alias: str, event: str, args=(), kwargs=None,
                callback: Optional[Callable] = None, tag: Any = None,
                timeout: Any = CLIENT_TIMEOUT) -> Any:
        """Call ``event`` on the session ``alias``: what a proxy method does.
        Its timeout goes with it to a server that takes it (PROTOCOL.md 7.7):
        the server fails the call then, and its publisher does not start it
        after that."""
        try:
            payload = _dumps({"event": event, "args": list(args), "kwargs": kwargs or {}})
        except Exception as exc:       # (pickle's own errors are AttributeError, TypeError, ...)
            raise ProxyError("cannot send the arguments of '%s': %s: %s" % (
                event, type(exc).__name__, _text(exc, None))) from exc
        if timeout is CLIENT_TIMEOUT:
            timeout = self.timeout
        connection = self._connections.get(connection_id)
        message = {"type": "deliver", "to": alias, "payload": payload} if connection is None \
            else connection.call_message(alias, event, payload, timeout)
        return self.send_message(connection_id, message, None, callback, tag, timeout)


# ---------------------------------------------------------------------------
# proxy
# ---------------------------------------------------------------------------

def proxy_event(method: Callable) -> Callable:
    """Mark a method as published, after POEx::Role::ProxyEvent."""
    method._proxysession_event = True
    return method


def _method_table(obj: Any, names: Optional[Iterable[str]]) -> Dict[str, dict]:
    if names is None:
        names = [name for name, _ in inspect.getmembers(type(obj))
                 if getattr(getattr(obj, name, None), "_proxysession_event", False)]
        if not names:
            raise ValueError("%r has no method marked @proxy_event, and no methods=[...] "
                             "was given" % (obj,))
    table = {}
    for name in names:
        if not isinstance(name, str) or name.startswith("_"):
            raise ValueError("cannot publish %r: names starting with '_' stay private" % (name,))
        method = getattr(obj, name, None)
        if not callable(method):
            raise ValueError("cannot publish %r: %r has no such method" % (name, obj))
        try:
            signature = str(inspect.signature(method))
        except (TypeError, ValueError):
            signature = "(...)"
        table[name] = {"signature": signature, "doc": inspect.getdoc(method)}
    return table


class _ProxyMethod:
    """One published method: call it to block, ``.post(...)`` not to,
    ``.future(...)`` for a future (which asyncio code may await),
    ``.call(args, kwargs, ...)`` for the explicit form. From any thread."""

    def __init__(self, subscription: _Subscription, name: str, description: dict):
        self._subscription = subscription
        self._name = name
        self._client = subscription.client
        self._connection_id = subscription.connection_id
        self._alias = subscription.alias
        self.__doc__ = description.get("doc") if isinstance(description, dict) else None
        self.signature = description.get("signature") if isinstance(description, dict) else None

    def __repr__(self):
        return "<remote method %s.%s%s>" % (self._alias, self._name,
                                            self.signature or "")

    def __call__(self, *args, **kwargs):
        return self.call(args, kwargs)

    def post(self, *args, callback: Optional[Callable] = None, tag: Any = None, **kwargs):
        """Call without waiting; ``callback(Result)`` gets the answer."""
        return self.call(args, kwargs, callback=callback or _ignore_result, tag=tag)

    def future(self, *args, **kwargs) -> concurrent.futures.Future:
        """Call without waiting; the future gets the value or the exception.
        ``future.result()`` runs the reactor if no thread does; ``await
        future`` in asyncio needs ``run_in_thread()``."""
        future = _CallFuture(self._client.reactor)
        self.call(args, kwargs, callback=future)
        return future

    def call(self, args: Iterable = (), kwargs: Optional[dict] = None,
             timeout: Any = CLIENT_TIMEOUT, callback: Optional[Callable] = None, tag: Any = None):
        """The explicit form: the method's ``args`` and ``kwargs``, this call's
        own ``timeout`` (seconds, None: none), and ``callback``/``tag`` not to
        block. A proxy that was rescinded subscribes again first (reconnect)."""
        gone = self._subscription.gone
        if gone is not None and not self._client.revive(self._subscription):
            raise ProxyError(gone)
        return self._client.deliver(self._connection_id, self._alias, self._name,
                                    args, kwargs, callback, tag, timeout)


Client.proxy_method_class = _ProxyMethod


def _ignore_result(result: Result) -> None:
    if not result.success:
        log.warning("a posted call failed with nobody to tell: %s", _show(result.payload))


class Proxy:
    """The local stand-in for a subscribed session, after
    POEx::ProxySession::Proxy: one attribute per published method and
    nothing else public, so every published name stays callable."""

    def __init__(self, subscription: _Subscription, methods: dict):
        self.__subscription = subscription
        method_class = subscription.client.proxy_method_class   # awaited, for an AsyncClient
        for name, description in methods.items():
            if isinstance(name, str) and name.isidentifier() and not name.startswith("_"):
                setattr(self, name, method_class(subscription, name, description))

    def __repr__(self):
        subscription = self.__subscription
        return "<Proxy %s on connection %d%s>" % (
            subscription.alias, subscription.connection_id,
            " (gone)" if subscription.gone else "")


# ---------------------------------------------------------------------------
# asyncio
# ---------------------------------------------------------------------------
# AsyncClient: the Client for asyncio programs, on the running event loop
# itself. Its reactor is a facade over that loop (its add_reader and
# add_writer, call_soon and call_later), so the wheels, timers and links of
# the Client run unchanged, with no thread of their own; every request is
# sent with a callback that settles what the coroutine awaits. Nothing here
# may block: a request that would wait in run_until raises instead, naming
# the coroutine to await.

def _running_loop(what: str):
    import asyncio                     # only for programs that use it
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError("%s needs a running asyncio event loop: make it, and await its "
                           "methods, inside a coroutine (asyncio.run(main()))" % what) from None


class _LoopReactor(Reactor):
    """A Reactor whose sockets, timers and callbacks an asyncio event loop
    serves. Each ready socket is a pass of its own: its handler runs, then
    the flushes it asked for, so what one read produced for a socket still
    leaves in one send."""

    def __init__(self, loop):
        # none of Reactor's own loop: no selector, no wakeup pipe, no timer heap
        self.loop = loop
        self.thread = threading.get_ident()
        self._owner = {"driver": self.thread}     # the loop's thread drives, always
        self._runner = self.thread
        self._flushes: list = []
        # fd -> the events registered for it: by number, since a wheel swaps its
        # socket for its TLS wrapper (same fd) between register and unregister
        self._fds: Dict[int, int] = {}
        self.in_pass = 0
        self.woke = time.monotonic()
        self._scratch = memoryview(bytearray(LOOP_READ_CHUNK))

    def __repr__(self):
        return "<_LoopReactor on %r>" % (self.loop,)

    def _event(self, handler: Callable[[int], None], mask: int) -> None:
        self.woke = time.monotonic()
        self._run(handler, (mask,))

    def _run(self, callback: Callable, args) -> None:
        self.in_pass += 1
        try:
            self._call(callback, args)
        finally:
            self.in_pass -= 1
        if self._flushes and not self.in_pass:
            self._flush_all()

    def register(self, sock, events: int, handler: Callable[[int], None]) -> None:
        self._fds[sock.fileno()] = 0
        self.modify(sock, events, handler)

    def modify(self, sock, events: int, handler: Callable[[int], None]) -> None:
        fd = sock.fileno()
        had = self._fds[fd]
        loop = self.loop
        if events & selectors.EVENT_READ:
            loop.add_reader(fd, self._event, handler, selectors.EVENT_READ)
        elif had & selectors.EVENT_READ:
            loop.remove_reader(fd)
        if events & selectors.EVENT_WRITE:
            loop.add_writer(fd, self._event, handler, selectors.EVENT_WRITE)
        elif had & selectors.EVENT_WRITE:
            loop.remove_writer(fd)
        self._fds[fd] = events

    def unregister(self, sock) -> None:
        fd = sock.fileno()             # (-1 once closed: a wheel unregisters first)
        had = self._fds.pop(fd, 0)
        if had & selectors.EVENT_READ:
            self.loop.remove_reader(fd)
        if had & selectors.EVENT_WRITE:
            self.loop.remove_writer(fd)

    def call_soon(self, callback: Callable, *args) -> None:
        self.loop.call_soon(self._run, callback, args)

    def call_soon_threadsafe(self, callback: Callable, *args) -> None:
        self.loop.call_soon_threadsafe(self._run, callback, args)

    def call_later(self, delay: float, callback: Callable, *args):
        return self.loop.call_later(delay, self._run, callback, args)   # has cancel()

    def hand_over(self, fn: Callable, *args) -> None:
        if threading.get_ident() == self.thread:
            self.call_soon(fn, *args)
        else:
            self.call_soon_threadsafe(fn, *args)

    def call_in_loop(self, fn: Callable, *args, timeout: Optional[float] = None) -> Any:
        if threading.get_ident() == self.thread:
            return fn(*args)
        box: concurrent.futures.Future = concurrent.futures.Future()

        def run_and_keep():
            if box.set_running_or_notify_cancel():
                try:
                    box.set_result(fn(*args))
                except BaseException as exc:
                    box.set_exception(exc)

        self.call_soon_threadsafe(run_and_keep)
        try:
            return box.result(timeout)
        except concurrent.futures.TimeoutError:
            if box.cancel():
                raise TimeoutError("the event loop did not run it within %.3g s" % timeout)
            return box.result()

    def drive(self, fn: Callable, args: tuple, done: Optional[Callable[[], bool]]) -> bool:
        if done is not None:           # refused before anything is sent
            self.run_until(lambda: False)
        if threading.get_ident() != self.thread:
            return False
        fn(*args)
        return True

    def run_until(self, done: Callable[[], bool], timeout: Optional[float] = None) -> bool:
        if done():
            return True
        raise RuntimeError("this would block the asyncio event loop: an AsyncClient's "
                           "requests and calls are awaited (await client.subscribe(...), "
                           "await proxy.method(...))")

    def depth(self) -> int:
        return 0

    def _claim(self, me: int) -> bool:
        return me == self.thread

    def _let_go(self, me: int) -> None:
        pass

    def run(self) -> None:
        raise RuntimeError("an AsyncClient's reactor is its asyncio event loop: run that")

    run_once = run_in_thread = run

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Answer:
    """What a coroutine of an AsyncClient awaits: the callback of its
    request, settling an asyncio future with the Result. Cancelling the
    awaiting task takes back a request that ``takes_back`` (a call, or a
    subscribe that waits: a cancel goes to the server, PROTOCOL.md 7.7);
    any other (a publish, say) goes on, answered to nobody, so that this
    Client and the server still agree on what it did."""

    __slots__ = ("future", "client", "request", "takes_back")

    def __init__(self, client: "AsyncClient", takes_back: bool = False):
        self.future = client.reactor.loop.create_future()
        self.client = client
        self.request: Optional[_Request] = None
        self.takes_back = takes_back

    def sent_as(self, client: "Client", request: "_Request") -> None:
        self.request = request

    def __call__(self, result: "Result") -> None:
        if not self.future.done():
            self.future.set_result(result)

    def __await__(self):
        try:
            result = yield from self.future.__await__()
        except BaseException:          # cancelled: nobody waits for the answer
            if self.request is not None and self.takes_back:
                self.client.cancel_request(self.request)
            raise
        return result.value()


class _AsyncProxyMethod(_ProxyMethod):
    """A method of an AsyncClient's proxy: ``await proxy.method(...)``, and
    ``await proxy.method.call(args, kwargs, timeout=...)`` for a timeout of
    the call's own. The call is sent when the method is called; awaiting
    gets its answer, and cancelling what awaits it takes the call back."""

    def __call__(self, *args, **kwargs):
        return self.call(args, kwargs)

    def call(self, args: Iterable = (), kwargs: Optional[dict] = None,
             timeout: Any = CLIENT_TIMEOUT, callback: Optional[Callable] = None, tag: Any = None):
        if callback is not None:       # post(): nothing to await
            return super().call(args, kwargs, timeout, callback, tag)
        return self._client.call_method(self._subscription, self._name, args, kwargs, timeout)

    def future(self, *args, **kwargs):
        """An asyncio future of the call (a task that awaits it)."""
        import asyncio
        self._client.here("future()")
        return asyncio.ensure_future(self.call(args, kwargs))


class AsyncClient(Client):
    """The Client for asyncio programs, driven by the running event loop
    itself: no thread of its own, and nothing that blocks the loop.

    Made inside a coroutine; its requests are coroutines with the Client's
    names and arguments (``await client.connect(...)``, ``publish``,
    ``rescind``, ``subscribe``, ``unsubscribe``, ``server_listing``,
    ``server_stats``, ``close``; ``async with``), and its proxies' methods
    are awaited (``await calc.add(1, 2)``; ``calc.add.call(args, kwargs,
    timeout=2)`` for a call's own timeout). ``async def`` methods may be
    published: each call is a task of its own, so calls overlap; plain
    methods run on the loop as with ``workers=0`` (give a slow one
    ``workers=N``). Cancelling a task that awaits a call (``task.cancel()``,
    ``asyncio.wait_for``) takes the call back (PROTOCOL.md 7.7), and a call
    its publisher has not started never runs; a cancel that reaches a
    running ``async def`` call cancels its task. Reconnection, heartbeats
    and resumption are the Client's. Use it on the loop it was made on.
    """

    proxy_method_class = _AsyncProxyMethod
    _runs_coroutines = True

    def __init__(self, alias: str = "AsyncClient", **options):
        if "reactor" in options:
            raise TypeError("an AsyncClient runs on the running asyncio event loop: it takes "
                            "no reactor")
        super().__init__(alias, reactor=_LoopReactor(_running_loop("AsyncClient()")), **options)

    def here(self, what: str) -> None:
        """Raise unless on the loop this AsyncClient was made on."""
        loop = _running_loop(what)
        if loop is not self.reactor.loop:
            raise RuntimeError("%s: this AsyncClient belongs to another event loop; make one "
                               "AsyncClient per loop" % what)

    def __enter__(self):
        raise TypeError("an AsyncClient is closed by awaiting: use 'async with'")

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    def send_message(self, connection_id: int, message: dict, on_result=None, callback=None,
                     *args, **kwargs) -> Any:
        if callback is None:           # refused before anything is sent
            raise RuntimeError("this would block the asyncio event loop: an AsyncClient's "
                               "requests and calls are awaited (await client.subscribe(...), "
                               "await proxy.method(...))")
        return super().send_message(connection_id, message, on_result, callback, *args, **kwargs)

    async def _asked(self, send: Callable[[_Answer], Any], takes_back: bool = False) -> Any:
        answer = _Answer(self, takes_back)
        send(answer)
        return await answer

    async def connect(self, remote_address: str = DEFAULT_HOST,
                      remote_port: Optional[int] = None, timeout: Optional[float] = None,
                      server_hostname: Optional[str] = None) -> int:
        """``Client.connect``, awaited: the name is resolved by the loop, and
        every step waits without blocking it. Cancelled, it leaves nothing."""
        self.here("connect()")
        timeout = self.handshake_timeout if timeout is None else timeout
        if isinstance(remote_address, str) and remote_address.startswith(NATS_SCHEMES):
            return await self._connect_nats(remote_address, timeout)
        remote_address, remote_port = _address_and_port(remote_address, remote_port)
        connector = self._connector
        connection = connector.connection(remote_address, remote_port, server_hostname, timeout)
        try:
            sock, family, sockaddr = await self._dial(remote_address, remote_port)
        except OSError as exc:
            return connector.failed(remote_address, remote_port, exc)
        wheel = None
        try:
            wheel, failure = await self._open(connection, sock, family, sockaddr)
            if failure is None:
                failure = await self._set_up(connection)
        except BaseException:          # cancelled: the connection goes, with what it holds
            if wheel is not None:
                wheel.close("connect() was cancelled")
            connector.forget(connection)
            raise
        if failure is not None:
            wheel.close("connect check failed")
            connector.forget(connection)
            return connector.failed(remote_address, remote_port, failure)
        self._connected(connection)
        return connection.connection_id

    async def _connect_nats(self, urls: str, timeout: Optional[float]) -> int:
        """Client._connect_nats, awaited."""
        import asyncio
        connector = self._connector
        servers, credentials, tls_first = connector.nats_servers(urls)
        connection_id = next(connector.ids)
        failures: List[str] = []
        for at in range(len(servers)):
            opened = self.reactor.loop.create_future()
            outcome = _Outcome(lambda: opened.done() or opened.set_result(None))
            connection = connector.nats_try(connection_id, servers, at, credentials, tls_first,
                                        timeout, outcome)
            try:
                sock = (await self._dial(connection.address, connection.port))[0]
            except OSError as exc:
                failures.append("nats://%s:%s: %s" % (connection.address, connection.port, exc))
                continue
            wheel = connector.open(connection, sock, _no_answer_needed)
            try:
                await asyncio.wait_for(opened, timeout)
            except asyncio.TimeoutError:
                outcome.append(ConnectError("no answer within %.3g s: is it a NATS server?"
                                            % timeout))
            except BaseException:      # cancelled: the connection goes
                wheel.close("connect() was cancelled")
                connector.forget(connection)
                raise
            if connector.nats_opened(connection, wheel, outcome, failures):
                return connection_id
        return connector.failed(_nats_urls(servers), None, ConnectError(
            "cannot connect to NATS: %s" % "; ".join(failures)))

    async def _dial(self, address: str, port: int) -> Tuple[socket.socket, int, Any]:
        """_dial, with the name resolved by the loop (a lookup may take seconds)."""
        found = await self.reactor.loop.getaddrinfo(address, port, type=socket.SOCK_STREAM)
        return _dial(found[0][4][0], port)    # a numeric address now: no lookup

    async def _open(self, connection: _Connection, sock: socket.socket, family: int,
                    sockaddr: Any) -> Tuple[Wheel, Optional[BaseException]]:
        """The new wheel once open (TLS, authkey), or why it is not. A keyed
        client that hears no challenge asks, on a second connection made off
        the loop, why (Client.connect does the same)."""
        loop = self.reactor.loop
        opened = loop.create_future()

        def settle(*_):
            if not opened.done():
                opened.set_result(None)

        connection.opening = outcome = _Outcome(settle)   # _on_wheel_closed puts the error here
        wheel = self._connector.open(connection, sock, settle)
        if self.authkey is not None and connection.timeout is not None and \
                connection.timeout > CHALLENGE_PROBE:
            import asyncio
            await asyncio.wait({opened}, timeout=CHALLENGE_PROBE)
            if not opened.done() and wheel.reads == 0:
                why = await loop.run_in_executor(
                    None, self._connector.why_no_challenge, connection, sockaddr, family)
                if why is not None:
                    return wheel, why
        await opened
        if wheel.is_open:
            connection.opening = None
            return wheel, None
        errors = [error for error in outcome if error is not None]
        return wheel, errors[0] if errors else ConnectionError(
            "connection closed during the handshake")

    async def _set_up(self, connection: _Connection) -> Optional[ProxyError]:
        """The first round trips on a new connection (Client.connect's):
        the server's limits, and a resume token if it has a grace window."""
        connection_id, timeout = connection.connection_id, connection.timeout
        try:
            try:
                info = await self._asked(lambda answer: self.send_message(
                    connection_id, _info_request(self.max_frame), callback=answer,
                    timeout=timeout))
            except ProxyError as exc:
                info = exc
            grace = connection.learn_info(info)
            if grace > 0 and self.reconnect:
                connection.token = _resume_answer(await self._asked(
                    lambda answer: self.send_message(connection_id, {"type": "resume"},
                                                     callback=answer, timeout=timeout)))[0]
        except ProxyError as exc:
            return self._connector.why_first_request_failed(exc, connection)
        return None

    def _redial(self, connection: _Connection) -> None:
        """A reconnection try (Client's), its name resolved by the loop."""
        self.reactor.loop.create_task(self._redial_on_loop(connection))

    async def _redial_on_loop(self, connection: _Connection) -> None:
        try:
            sock = (await self._dial(connection.address, connection.port))[0]
        except OSError as exc:
            if connection.state == "down":
                connection.try_failed(str(exc))
            return
        if connection.state != "down" or connection.wheel is not None:
            sock.close()               # closed, or back, meanwhile
            return
        connection.open_wheel(sock, connection.rejoin)

    async def publish(self, connection_id: int, alias: str, obj: Any,
                      methods: Optional[Iterable[str]] = None, timeout: Any = CLIENT_TIMEOUT,
                      workers: int = 0, shared: bool = False) -> str:
        self.here("publish()")
        return await self._asked(lambda answer: Client.publish(
            self, connection_id, alias, obj, methods, answer, None, timeout, workers, shared))

    async def rescind(self, obj_or_alias: Any, connection_id: Optional[int] = None,
                      timeout: Any = CLIENT_TIMEOUT) -> None:
        self.here("rescind()")
        return await self._asked(lambda answer: Client.rescind(
            self, obj_or_alias, connection_id, answer, None, timeout))

    async def subscribe(self, connection_id: int, alias: str, timeout: Any = CLIENT_TIMEOUT,
                        wait: Optional[float] = None) -> Proxy:
        self.here("subscribe()")
        return await self._asked(lambda answer: Client.subscribe(
            self, connection_id, alias, answer, None, timeout, wait), takes_back=bool(wait))

    async def unsubscribe(self, alias_or_proxy: Any, connection_id: Optional[int] = None) -> None:
        self.here("unsubscribe()")
        Client.unsubscribe(self, alias_or_proxy, connection_id)

    async def server_listing(self, connection_id: int,
                             timeout: Any = CLIENT_TIMEOUT) -> List[str]:
        self.here("server_listing()")
        return await self._asked(lambda answer: Client.server_listing(
            self, connection_id, answer, None, timeout))

    async def server_stats(self, connection_id: int, timeout: Any = CLIENT_TIMEOUT) -> dict:
        self.here("server_stats()")
        return await self._asked(lambda answer: Client.server_stats(
            self, connection_id, answer, None, timeout))

    async def close(self) -> None:
        self.here("close()")
        self._served.stop()            # its async calls end with it
        Client.close(self)

    def call_method(self, subscription: _Subscription, name: str, args, kwargs,
                    timeout: Any) -> Any:
        """A proxy method's call, sent now; what it returns is awaited for the
        answer. A call waits to be sent while its connection has more than
        HIGH_WATER of output queued (awaited calls are written in one task
        step each: without this, a gather of large calls would pile up past
        max_write_buffer, which closes the connection)."""
        self.here("a call")
        if subscription.gone is not None:
            return self.revive_then_call(subscription, name, args, kwargs, timeout)
        connection = self._connections.get(subscription.connection_id)
        wheel = None if connection is None else connection.wheel
        if wheel is not None and wheel.out_size > HIGH_WATER:
            return self._call_when_drained(wheel, subscription, name, args, kwargs, timeout)
        answer = _Answer(self, takes_back=True)
        self.deliver(subscription.connection_id, subscription.alias, name, args, kwargs, answer,
                     None, timeout)
        return answer

    async def _call_when_drained(self, wheel: Wheel, subscription: _Subscription, name: str,
                                 args, kwargs, timeout: Any) -> Any:
        while wheel.out_size > HIGH_WATER and not wheel.closed:
            drained = _Drained(self.reactor.loop)
            wheel.wait_for_drain(drained)
            await drained.future
        return await self.call_method(subscription, name, args, kwargs, timeout)

    async def revive_then_call(self, subscription: _Subscription, name: str, args, kwargs,
                               timeout: Any) -> Any:
        """A proxy whose session went (rescinded, or not back after a
        reconnection) subscribes again, then calls (as Client.revive)."""
        key = (subscription.connection_id, subscription.alias)
        if not self._sessions.may_revive(subscription):
            raise ProxyError(subscription.gone)
        try:
            await self._asked(lambda answer: self.send_message(
                key[0], {"type": "subscribe", "to": key[1]}, callback=answer))
        except ProxyError:
            raise ProxyError(subscription.gone) from None
        subscription.gone = None
        return await self._asked(lambda answer: self.deliver(
            key[0], key[1], name, args, kwargs, answer, None, timeout), takes_back=True)

    def _awaitable(self, value: Any, call: CallContext) -> Any:
        """An async def method's call is a task of its own, which sees its
        call as current_call(); a cancel of the call cancels the task."""
        if type(value) is not types.CoroutineType:
            return value
        loop = self.reactor.loop
        call.task = task = loop.create_task(_serving_call(value, call))
        if call.deadline is not None:  # its caller stops waiting then: so does it
            timer = loop.call_at(loop.time() + call.deadline - time.monotonic(), task.cancel)
            task.add_done_callback(lambda _: timer.cancel())
        return task


async def _serving_call(coroutine, call: CallContext) -> Any:
    _current.set(call)                 # in this task's own context
    try:
        return await coroutine
    except (Exception, _CancelledError()):
        raise
    except BaseException as exc:       # SystemExit and the like: asyncio would end the
        if _interrupts(exc):           # loop with them; here they fail that call alone
            raise
        raise _MethodExit(exc) from exc


def _CancelledError() -> type:
    import asyncio
    return asyncio.CancelledError


class _MethodExit(Exception):
    """A BaseException an async def method raised, carried as an Exception so
    that its task ends with it instead of the event loop; its caller is told
    of the original (_error_answer)."""

    def __init__(self, original: BaseException):
        super().__init__(original)
        self.original = original


class _Drained:
    """What a call waiting for its connection's output to drain gives
    Wheel.wait_for_drain, which pauses and resumes it as it would a wheel."""

    __slots__ = ("future",)

    def __init__(self, loop):
        self.future = loop.create_future()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


class _Outcome(list):
    """How a connect() in progress learns that its wheel opened or closed:
    what _on_wheel_closed appends to it (see Client.connect), told at once."""

    def __init__(self, told: Callable[[], None]):
        super().__init__()
        self.told = told

    def append(self, item) -> None:
        super().append(item)
        self.told()


_TAKES_BACK = (_CallFuture, _Answer)   # callbacks that a cancel takes their request back by


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------

AUTHKEY_VARIABLE = "PROXYSESSION_AUTHKEY"


class _UsageError(Exception):
    pass


def _parse_address(text: str) -> Tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``HOST`` (the default port)."""
    try:
        host, port = _parse_host_port(text)
    except ValueError as exc:
        raise _UsageError(str(exc))
    return host, DEFAULT_PORT if port is None else port


def _parse_monitor(text: str) -> Tuple[str, int]:
    """``--monitor``: ``HOST:PORT``, or a ``PORT`` alone on loopback."""
    if text.isdigit():
        text = ":" + text
    try:
        host, port = _parse_host_port(text)
    except ValueError as exc:
        raise _UsageError("--monitor: %s" % exc)
    if port is None:
        raise _UsageError("--monitor wants HOST:PORT or a PORT (on 127.0.0.1), not %r" % text)
    return host, port


def _read_authkey(path: Optional[str]) -> Optional[bytes]:
    if path:
        try:
            with open(path, "rb") as handle:
                key = handle.read().strip()
        except OSError as exc:
            raise _UsageError("cannot read the authkey file: %s" % exc)
        if not key:
            raise _UsageError("the authkey file %s is empty" % path)
        return key
    key = os.environ.get(AUTHKEY_VARIABLE)
    return key.encode() if key else None


def _make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxysession",
        description="A proxysession server (the default), or a client for people at a shell.",
        epilog="examples:\n"
               "  proxysession --listen 127.0.0.1:56789\n"
               "  proxysession list 127.0.0.1:56789\n"
               "  proxysession call 127.0.0.1:56789 Greeter hello \"'world'\"\n"
               "  proxysession stats 127.0.0.1:56789 --watch 2\n"
               "  proxysession --listen 127.0.0.1:56789 --monitor 127.0.0.1:8222\n\n"
               "signals: SIGINT and SIGTERM stop the server (every waiting call is answered "
               "with a\nfailure first); SIGUSR1 writes its statistics to the log; SIGHUP is "
               "logged and\nignored (there is no configuration file to reload).\n\n"
               "The authkey comes from --authkey-file or the %s variable, never "
               "from a flag that ps would show." % AUTHKEY_VARIABLE,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    parser.add_argument("--listen", default="%s:%d" % (DEFAULT_HOST, DEFAULT_PORT),
                        metavar="HOST:PORT",
                        help="address to serve on (default %(default)s; port 0 picks one)")
    parser.add_argument("--monitor", metavar="HOST:PORT",
                        help="also serve statistics over HTTP there: /healthz, /varz, /connz, "
                             "/aliasz, /metrics (Prometheus) and a page at / (a PORT alone: "
                             "on 127.0.0.1; port 0 picks one)")
    parser.add_argument("--trace", action="store_true",
                        help="log one line per call: alias, method, caller and publisher "
                             "connections, ok or the failure, milliseconds")
    parser.add_argument("--debug", action="store_true", help="log at debug level")
    parser.add_argument("--log-json", action="store_true",
                        help="write each log line as one JSON object (for log shippers)")
    parser.add_argument("--max-frame", type=int, default=MAX_FRAME, metavar="BYTES",
                        help="largest frame body accepted (default %(default)s)")
    parser.add_argument("--grace", type=float, default=0.0, metavar="SECONDS",
                        help="keep the sessions of a publisher whose connection drops (without "
                             "a goodbye) this long, holding calls to them, so that it can "
                             "resume (default 0: they go at once)")
    parser.add_argument("--authkey-file", metavar="PATH",
                        help="file holding the shared key (else $%s)" % AUTHKEY_VARIABLE)
    parser.add_argument("--tls-cert", metavar="PEM", help="server certificate (enables TLS)")
    parser.add_argument("--tls-key", metavar="PEM", help="server private key")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="UNSAFE: allow a non-loopback --listen without an authkey")
    commands = parser.add_subparsers(dest="command", metavar="{list,call,stats}")
    client_options = argparse.ArgumentParser(add_help=False)
    client_options.add_argument("--tls-ca", metavar="PEM",
                                help="use TLS, trusting this CA file (host name checked)")
    client_options.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                                metavar="SECONDS", help="give up after (default %(default)s)")
    client_options.add_argument("--authkey-file", metavar="PATH",
                                help="file holding the shared key (else $%s)" % AUTHKEY_VARIABLE)
    listing = commands.add_parser("list", parents=[client_options],
                                  help="print the published aliases")
    listing.add_argument("address", metavar="HOST:PORT",
                         help="the server; or nats://HOST:PORT[,nats://...], a NATS server "
                              "or cluster")
    call = commands.add_parser("call", parents=[client_options],
                               help="call ALIAS.METHOD and print what it returns")
    call.add_argument("address", metavar="HOST:PORT",
                      help="the server; or nats://HOST:PORT[,nats://...], a NATS server or "
                           "cluster")
    call.add_argument("alias", metavar="ALIAS")
    call.add_argument("method", metavar="METHOD")
    call.add_argument("args", nargs="*", metavar="ARG",
                      help="Python literals (ast.literal_eval), else strings; NAME=VALUE is "
                           "a keyword argument (\"punctuation='?'\"); text that opens with a "
                           "quote or a bracket must parse")
    stats = commands.add_parser("stats", parents=[client_options],
                                help="print what the server has done: aliases with their "
                                     "calls, failures and latency; connections")
    stats.add_argument("address", metavar="HOST:PORT")
    stats.add_argument("--json", action="store_true", help="print it as JSON")
    stats.add_argument("--watch", type=float, metavar="SECONDS",
                       help="print it again every SECONDS, in place, until Ctrl-C")
    return parser


_KEYWORD_ARGUMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.S)


def _literal(text: str) -> Any:
    """A Python literal; a word that is none is the str it spells, but text
    that opens like one (a quote or a bracket) and does not parse is a mistake
    the user should hear of, not a str."""
    import ast
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        if text[:1] in ("'", '"', "[", "(", "{"):
            raise _UsageError("argument %.60r is not a Python literal (%s); the str it spells "
                              "is the literal %.70s" % (text, getattr(exc, "msg", exc),
                                                        repr(text)))
        return text


def _call_arguments(words: List[str]) -> Tuple[list, dict]:
    """``call``'s ARGs: NAME=VALUE is a keyword argument, anything else positional."""
    args: list = []
    kwargs: dict = {}
    for word in words:
        keyword = _KEYWORD_ARGUMENT.fullmatch(word)
        if keyword is None:
            if kwargs:
                raise _UsageError("positional argument %.60r after a keyword argument" % word)
            args.append(_literal(word))
        else:
            kwargs[keyword.group(1)] = _literal(keyword.group(2))
    return args, kwargs


def _run_client_command(options) -> int:
    if options.address.startswith(NATS_SCHEMES):   # a NATS server or cluster (PROTOCOL.md 10)
        try:
            _nats_servers(options.address)
        except ValueError as exc:
            raise _UsageError(str(exc))
        host, port = options.address, None
    else:
        host, port = _parse_address(options.address)
    context = None
    if options.tls_ca:
        try:
            context = ssl.create_default_context(cafile=options.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise _UsageError("cannot load the CA file: %s" % exc)
    authkey = _read_authkey(options.authkey_file)
    arguments = _call_arguments(options.args) if options.command == "call" else None
    # a one-shot command fails at once rather than wait for a server to come back
    client = Client("proxysession-cli", reactor=Reactor(), timeout=options.timeout,
                    authkey=authkey, ssl_context=context, reconnect=False, heartbeat=None)
    try:
        try:
            connection = client.connect(host, port, timeout=options.timeout)
        except (OSError, ProxyError) as exc:
            print("proxysession: %s" % (exc,), file=sys.stderr)
            return 2
        try:
            if options.command == "list":
                for alias in client.server_listing(connection):
                    print(alias)
            elif options.command == "stats":
                return _print_stats(client, connection, options)
            else:
                value = client.deliver(connection, options.alias, options.method, *arguments)
                print(_show(value, None))
        except RemoteError as exc:
            print("proxysession: remote %s" % (exc,), file=sys.stderr)
            return 1
        except AuthenticationError as exc:
            print("proxysession: %s" % (exc,), file=sys.stderr)
            return 2
        except ProxyError as exc:
            print("proxysession: %s" % (exc,), file=sys.stderr)
            return 1
        return 0
    finally:
        client.close()


def _print_stats(client: "Client", connection: int, options) -> int:
    """``stats``: once, or every ``--watch`` seconds in place until Ctrl-C."""
    watch = options.watch
    if watch is not None and not 0 < watch < float("inf"):
        raise _UsageError("--watch wants a number of seconds > 0, not %s" % watch)
    if watch is None:
        stats = client.server_stats(connection)
        print(json.dumps(stats, indent=1) if options.json else _stats_text(stats))
        return 0
    try:
        while True:
            stats = client.server_stats(connection)
            text = json.dumps(stats, indent=1) if options.json else _stats_text(stats)
            # home, clear to the end: the table is redrawn where it was, like top
            sys.stdout.write("\x1b[H\x1b[J%s\n(every %g s; Ctrl-C ends)\n" % (text, watch))
            sys.stdout.flush()
            time.sleep(watch)
    except KeyboardInterrupt:          # how --watch ends, wherever it lands
        return 0


def _stats_text(stats: dict) -> str:
    """The ``stats`` answer as tables a person reads at a terminal."""
    def columns(headings: List[str], rows: List[list]) -> List[str]:
        cells = [headings] + [[_printable(cell, 60) for cell in row] for row in rows]
        widths = [max(len(row[index]) for row in cells) for index in range(len(headings))]
        return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                for row in cells]

    ms = _ms
    lines = ["proxysession %s at %s: up %s, %s, %s, %d calls (%d failed), %d in flight" % (
        _printable(stats.get("version")), _printable(stats.get("address")), _duration(stats.get("uptime_s") or 0),
        _plural(stats.get("connections", 0), "connection"),
        _aliases(stats.get("sessions", 0)),
        stats.get("calls", 0), stats.get("failures", 0), stats.get("in_flight", 0)), ""]
    aliases = stats.get("aliases") or []
    if aliases:
        lines += columns(
            ["ALIAS", "PUBLISHER", "CALLS", "FAILED", "CALLS/S", "P50 MS", "P99 MS",
             "IN FLIGHT"],
            [[entry["alias"], ",".join(map(str, entry["publishers"])) +
              (" (away)" if entry.get("away") else ""), entry["calls"], entry["failures"],
              entry["calls_per_s"], ms(entry["latency_ms"]["p50"]),
              ms(entry["latency_ms"]["p99"]), entry["in_flight"]] for entry in aliases])
    else:
        lines.append("Nothing is published.")
    lines.append("")
    lines += columns(
        ["CONN", "ADDRESS", "AGE", "PUBLISHES", "SUBSCRIBES", "CALLS", "ANSWERED"],
        [[entry["id"], entry["address"], _duration(entry["age_s"]),
          ",".join(entry["publications"]) or "-", ",".join(entry["subscriptions"]) or "-",
          entry["calls"], entry["answered"]] for entry in stats.get("connection_list") or []])
    return "\n".join(lines)


def _run_server(options) -> int:
    host, port = _parse_address(options.listen)
    context = None
    if options.tls_cert or options.tls_key:
        if not (options.tls_cert and options.tls_key):
            raise _UsageError("--tls-cert and --tls-key go together")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(options.tls_cert, options.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise _UsageError("cannot load the TLS certificate or key: %s" % exc)
    monitor = _parse_monitor(options.monitor) if options.monitor else None
    reactor = Reactor()
    try:
        server = Server(host, port, options={"trace": options.trace, "debug": options.debug},
                        reactor=reactor, authkey=_read_authkey(options.authkey_file),
                        ssl_context=context, max_frame=options.max_frame,
                        insecure_no_auth=options.insecure_no_auth, grace=options.grace,
                        monitor=monitor)
    except ValueError as exc:          # an option the Server refuses (--grace)
        raise _UsageError("--%s" % exc)

    def on_signal(signum, frame):
        log.info("signal %d: stopping", signum)
        reactor.stop()

    def on_status_signal(signum, frame):
        # the handler runs between two bytecodes of the loop: it only asks the
        # loop to log, at the end of its pass, where the counts are consistent
        reactor.call_soon_threadsafe(server.log_statistics)

    def on_hangup(signum, frame):
        reactor.call_soon_threadsafe(log.info, "SIGHUP: nothing to reload (proxysession has "
                                     "no configuration file); still serving")

    # before start(): whoever waits for "listening" may signal the moment it is logged
    handlers = {signal.SIGINT: on_signal, signal.SIGTERM: on_signal}
    if hasattr(signal, "SIGUSR1"):     # not on Windows
        handlers.update({signal.SIGUSR1: on_status_signal, signal.SIGHUP: on_hangup})
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        try:
            server.start()
        except ProxyError as exc:
            print("proxysession: %s" % (exc,), file=sys.stderr)
            return 2
        except OSError as exc:
            if exc.strerror and exc.strerror.startswith("cannot serve the monitor"):
                print("proxysession: %s" % exc.strerror, file=sys.stderr)
            else:
                print("proxysession: cannot listen on %s:%d: %s"
                      % (host, port, exc.strerror or exc), file=sys.stderr)
            return 2
        try:
            reactor.run()
        finally:
            server.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


class _JsonFormatter(logging.Formatter):
    """``--log-json``: each record as one line of JSON, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
                 .isoformat(timespec="milliseconds"), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; returns the exit status."""
    parser = _make_parser()
    options = parser.parse_args(argv)
    if options.max_frame <= 0:
        parser.error("--max-frame must be positive")
    level = logging.DEBUG if options.debug else logging.INFO
    if options.command:
        level = logging.DEBUG if options.debug else logging.WARNING
    if getattr(options, "log_json", False):
        handler = logging.StreamHandler()
        handler.setFormatter(_JsonFormatter())
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if options.command:
            return _run_client_command(options)
        return _run_server(options)
    except KeyboardInterrupt:          # Ctrl-C on a client command: one line, like the rest
        print("proxysession: interrupted", file=sys.stderr)
        return 130
    except _UsageError as exc:
        parser.print_usage(sys.stderr)
        print("proxysession: error: %s" % exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run the module imported under its own name, so that classes pickled here
    # are proxysession.X, not __main__.X (bottle does the same).
    import importlib
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(importlib.import_module("proxysession").main())
