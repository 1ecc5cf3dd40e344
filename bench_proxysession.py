#!/usr/bin/env python3
"""Side-by-side benchmark of proxysession and what users would use instead.

Every system runs in separate processes on loopback; the callee method is
``echo(x)``, its argument and result pickled on both ends for every system.

Workloads:
  W1  one caller, one call at a time: calls/s, p50 and p99 latency
  W2  one caller, 64 calls in flight: calls/s, and for the brokers (Linux) the
      broker process's own CPU per routed call, steadier than throughput on a
      shared machine where three processes compete for the cores
  W3  4 caller processes, one publisher: aggregate calls/s
  W4  payloads of 64 KiB and 1 MiB: MB/s of payload echoed
  W5  10,000 idle connections: server RSS per connection, and the round trip
      of one listing among them against the same with one connection

Rows:
  proxysession   its own Client and Proxy on both ends, through its server
  server+raw     the proxysession server, with minimal raw-socket callers and callee
  relay floor    a minimal selectors relay written here, same framing, same raw
                 peers: decodes the outer dict, rewrites id/to, re-encodes,
                 forwards; no sessions, checks or flow control. Every ratio is
                 taken against it, in the same run.
  direct         raw-socket ping-pong, no broker
  mp.managers    multiprocessing.managers, for context
  Pyro5, RPyC    when importable, for context (skipped with a note otherwise)

The machine's speed drifts over tens of seconds when it is shared, so cells
are measured side by side: each round runs every row on one cell before the
next cell, rows in a rotating order, and the table shows each cell's median
over the rounds (3 by default).

Usage:  python bench_proxysession.py [--quick] [--seconds S] [--rounds N] [--only ROW,...]
                                   [--workloads W1,...] [--json]
"""

import argparse
import json
import os
import pickle
import platform
import selectors
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

ARG = "x" * 100                 # W1-W3: a 100-byte str
PIPELINE = 64                   # W2: calls in flight
FAN_IN = 4                      # W3: caller processes
SIZES = [64 * 1024, 1024 * 1024]  # W4
IDLE = 10000                    # W5: idle connections
CHUNK = 256 * 1024
ROWS = ["proxysession", "server+raw", "relay floor", "direct", "mp.managers", "Pyro5", "RPyC"]


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


def recv_messages(sock, frames):
    while True:
        data = sock.recv(CHUNK)
        if not data:
            raise EOFError("peer closed")
        bodies = frames.feed(data)
        if bodies:
            return [pickle.loads(body) for body in bodies]


def call_message(msg_id, arg):
    payload = pickle.dumps({"event": "echo", "args": [arg], "kwargs": {}}, 4)
    return frame({"type": "deliver", "id": msg_id, "to": "Echo", "payload": payload})


def raw_callee(address, listen):
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
        sock.sendall(frame({"type": "publish", "id": 1, "payload": pickle.dumps(
            {"session_alias": "Echo", "session_name": "Echo",
             "methods": {"echo": {"signature": "(x)", "doc": None}}}, 4)}))
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
                message = pickle.loads(body)
                call = pickle.loads(message["payload"])
                value = call["args"][0]          # echo
                out.append(frame({"type": "result", "id": message["id"], "success": True,
                                  "payload": pickle.dumps(value, 4)}))
            if out:
                key.fileobj.sendall(b"".join(out))


def raw_caller(address, workload, seconds, size):
    sock = connect(address)
    frames = Frames()
    arg = ARG if size is None else b"x" * size
    if workload != "pipelined":
        def echo(value):
            sock.sendall(call_message(0, value))
            return pickle.loads(recv_messages(sock, frames)[0]["payload"])

        return sequential(echo, seconds, size)
    calls = 0
    start = time.perf_counter()
    end = start + seconds
    for n in range(PIPELINE):
        sock.sendall(call_message(n, arg))
    in_flight = PIPELINE
    while in_flight:
        out = []
        for message in recv_messages(sock, frames):
            assert pickle.loads(message["payload"]) == arg
            calls += 1
            in_flight -= 1
            if time.perf_counter() < end:
                out.append(call_message(calls, arg))
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

def ps_server():
    import proxysession
    server = proxysession.Server(listen_port=0).start()
    print(server.address[1], flush=True)
    proxysession.run()


def ps_callee(address):
    import proxysession

    class Echo:
        @proxysession.proxy_event
        def echo(self, x):
            return x

    client = proxysession.Client("callee", timeout=None)
    client.publish(client.connect(*address), "Echo", Echo())
    print("ready", flush=True)
    proxysession.run()


def ps_caller(address, workload, seconds, size):
    import proxysession
    client = proxysession.Client("caller", timeout=60)
    echo = client.subscribe(client.connect(*address), "Echo").echo
    if workload != "pipelined":
        return sequential(echo, seconds, size)
    arg = ARG if size is None else b"x" * size
    start = time.perf_counter()
    end = start + seconds
    state = {"calls": 0, "in_flight": PIPELINE}

    def on_result(result):
        assert result.success and result.payload == arg
        state["calls"] += 1
        if time.perf_counter() < end:
            echo.post(arg, callback=on_result)
        else:
            state["in_flight"] -= 1

    for _ in range(PIPELINE):
        echo.post(arg, callback=on_result)
    client.reactor.run_until(lambda: not state["in_flight"])
    return state["calls"], time.perf_counter() - start, []


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
# orchestration: every role is this file in a child process
# ---------------------------------------------------------------------------

class Child:
    def __init__(self, role, *args, stdin=False):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--role", role] + [str(a) for a in args],
            stdout=subprocess.PIPE, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            text=True, cwd=HERE)

    def line(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("child %s exited: %s" % (self.proc.args, self.proc.poll()))
        return line.strip()

    def rss_kib(self):
        with open("/proc/%d/status" % self.proc.pid) as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def cpu_seconds(self):
        """User plus system CPU so far, from /proc (None where there is none)."""
        try:
            with open("/proc/%d/stat" % self.proc.pid) as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def result(self):
        out, _ = self.proc.communicate(timeout=600)
        return json.loads(out.strip().splitlines()[-1])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


SYSTEMS = {
    # row: (server role or None, callee role or None, caller role); the direct
    # floor's callee listens itself, and the peers' servers are their callees
    "proxysession": ("ps-server", "ps-callee", "ps-caller"),
    "server+raw": ("ps-server", "raw-callee", "raw-caller"),
    "relay floor": ("relay", "raw-callee", "raw-caller"),
    "direct": (None, "raw-callee-listen", "raw-caller"),
    "mp.managers": ("mp-server", None, "mp-caller"),
    "Pyro5": ("pyro-server", None, "pyro-caller"),
    "RPyC": ("rpyc-server", None, "rpyc-caller"),
}


def measure(row, workload, seconds, size=None, callers=1):
    """Start the row's processes, run the callers, return the combined figures."""
    server_role, callee_role, caller_role = SYSTEMS[row]
    children = []
    try:
        port = None
        if server_role:
            server = Child(server_role)
            children.append(server)
            port = int(server.line())
        if callee_role:
            callee = Child(callee_role, port or 0)
            children.append(callee)
            reply = callee.line()
            if callee_role == "raw-callee-listen":
                port = int(reply)
        broker = server if server_role in ("ps-server", "relay") else None
        cpu_before = broker.cpu_seconds() if broker else None
        runs = [Child(caller_role, port, workload, seconds, size or 0) for _ in range(callers)]
        children.extend(runs)
        results = [run.result() for run in runs]
        cpu_after = broker.cpu_seconds() if broker else None
    finally:
        for child in children:
            child.stop()
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


def measure_idle(count, rounds):
    server = Child("ps-server")
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
    if role == "relay":
        return relay_floor()
    if role == "mp-server":
        return mp_server()
    if role == "pyro-server":
        return pyro_server()
    if role == "rpyc-server":
        return rpyc_server()
    if role == "ps-callee":
        return ps_callee(("127.0.0.1", int(args[0])))
    if role in ("raw-callee", "raw-callee-listen"):
        return raw_callee(("127.0.0.1", int(args[0])), role == "raw-callee-listen")
    if role == "idle":
        return idle_connections(("127.0.0.1", int(args[0])), int(args[1]))
    if role == "listing-rtt":
        print(json.dumps({"rtt": listing_rtt(("127.0.0.1", int(args[0])), int(args[1]))}))
        return None
    callers = {"ps-caller": ps_caller, "raw-caller": raw_caller, "mp-caller": mp_caller,
               "pyro-caller": pyro_caller, "rpyc-caller": rpyc_caller}
    port, workload, seconds, size = int(args[0]), args[1], float(args[2]), int(args[3]) or None
    calls, elapsed, latencies = callers[role](("127.0.0.1", port), workload, seconds, size)
    if len(latencies) > 20000:           # keep the pipe small: a sorted sample is enough
        step = len(latencies) / 20000
        ordered = sorted(latencies)
        latencies = [ordered[int(i * step)] for i in range(20000)]
    print(json.dumps({"calls": calls, "elapsed": elapsed, "latencies": latencies}))
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--quick", action="store_true",
                        help="short cells and 1,000 idle connections (CI smoke, under a minute)")
    parser.add_argument("--seconds", type=float, help="seconds per cell (default 3, quick 0.3)")
    parser.add_argument("--rounds", type=int,
                        help="rounds; each cell shows its median (default 3, quick 1)")
    parser.add_argument("--only", help="comma-separated rows to run, e.g. 'relay floor,server+raw'")
    parser.add_argument("--workloads", help="comma-separated workloads to run, e.g. 'W1,W2' "
                        "(default all; W4 is both sizes, W5 the idle connections)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--role", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.role:
        return run_role(options.role)
    seconds = options.seconds or (0.3 if options.quick else 3.0)
    rows = ROWS if not options.only else [r.strip() for r in options.only.split(",")]
    unknown = [r for r in rows if r not in SYSTEMS]
    if unknown:
        parser.error("unknown rows %s; known: %s" % (unknown, ", ".join(ROWS)))
    if options.quick:
        rows = [r for r in rows if r in ("proxysession", "server+raw", "relay floor", "direct")]
    notes = []
    for row, module in (("Pyro5", "Pyro5"), ("RPyC", "rpyc")):
        if row in rows and not importable(module):
            rows.remove(row)
            notes.append("%s skipped: not installed (pip install %s)" % (row, module.lower()))
    rounds = options.rounds or (1 if options.quick else 3)
    if rounds < 1 or seconds <= 0:
        parser.error("--rounds and --seconds must be positive")
    cells = [("W1", "sequential", {}), ("W2", "pipelined", {}),
             ("W3", "sequential", {"callers": FAN_IN})]
    cells += [("W4 %d KiB" % (size // 1024), "sequential", {"size": size}) for size in SIZES]
    workloads = {"W1", "W2", "W3", "W4", "W5"}
    if options.workloads:
        workloads = {w.strip().upper() for w in options.workloads.split(",")}
        if not workloads <= {"W1", "W2", "W3", "W4", "W5"}:
            parser.error("unknown workloads in %r; known: W1,W2,W3,W4,W5" % options.workloads)
    cells = [cell for cell in cells if cell[0].split()[0] in workloads]
    samples = {row: {} for row in rows}
    for number in range(rounds):
        order = rows[number % len(rows):] + rows[:number % len(rows)]
        for cell, workload, extra in cells:
            for row in order:
                if cell == "W2" and row in ("mp.managers", "Pyro5", "RPyC"):
                    continue        # their clients have no pipelined call
                figures = measure(row, workload, seconds, **extra)
                samples[row].setdefault(cell, []).append(figures)
        print("  round %d of %d measured" % (number + 1, rounds), file=sys.stderr, flush=True)
    results = {row: {cell: medians(runs) for cell, runs in samples[row].items()} for row in rows}
    idle = None
    if "W5" in workloads:
        idle = measure_idle(1000 if options.quick else IDLE, 200 if options.quick else 2000)
    print_table(results, idle, seconds, rounds, notes)
    if options.json:
        print(json.dumps({"results": results, "idle": idle, "notes": notes}, indent=1))
    return 0


def medians(runs):
    """One cell's figures: the median of each over the rounds."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def print_table(results, idle, seconds, rounds, notes):
    floor = results.get("relay floor")
    print("proxysession benchmark, %s, CPython %s on %s, %d CPUs, %.1f s per cell, "
          "median of %d round%s" % (time.strftime("%Y-%m-%d"), platform.python_version(),
                                    platform.machine(), os.cpu_count(), seconds, rounds,
                                    "" if rounds == 1 else "s"))
    columns = ["W1 calls/s", "W1 p50 us", "W1 p99 us", "W2 calls/s", "W2 broker us",
               "W3 calls/s", "W4 64K MB/s", "W4 1M MB/s"]
    keys = [("W1", "calls_per_s"), ("W1", "p50_us"), ("W1", "p99_us"), ("W2", "calls_per_s"),
            ("W2", "broker_cpu_us"), ("W3", "calls_per_s"), ("W4 64 KiB", "mb_per_s"),
            ("W4 1024 KiB", "mb_per_s")]
    print("%-14s" % "row" + "".join("%14s" % c for c in columns))
    for row, cells in results.items():
        line = "%-14s" % row
        for cell, key in keys:
            value = cells.get(cell, {}).get(key)
            line += "%14s" % ("-" if value is None else "%.0f" % value)
        print(line)
    if floor:
        print("ratio to the relay floor (throughput; higher is better)")
        for row, cells in results.items():
            line = "%-14s" % row
            for cell, key in keys:
                value = cells.get(cell, {}).get(key)
                base = floor.get(cell, {}).get(key)
                if value is None or not base or key.endswith("_us"):
                    line += "%14s" % "-"
                else:
                    line += "%14.2f" % (value / base)
            print(line)
    if idle:
        print("W5: %d idle connections: %.0f bytes of server RSS each; listing round trip "
              "%.0f us among them vs %.0f us alone (%.2fx)" % (
                  idle["connections"], idle["rss_per_conn_bytes"], idle["rtt_among_us"],
                  idle["rtt_alone_us"], idle["rtt_ratio"]))
    for note in notes:
        print("note: " + note)


if __name__ == "__main__":
    sys.exit(main())
