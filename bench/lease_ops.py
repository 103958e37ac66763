#!/usr/bin/env python3
"""Acquire + release of the fstests profile (7 volumes), devpool vs LVM2.

devpool, three ways, all on one pool: on a sparse image file (`--pool-on
image`, the kind the embedded default pool is) or on a loop device over one
(`--pool-on loop`, like LVM2's here; a loop device backed by another loop
device attaches under the kernel's global loop lock, one at a time):
- cli: `devpool lease acquire --profile fstests` and `lease release`, one
  process each (one commit with the owner in LV tags, 7 loop devices; the
  release detaches them and commits once);
- daemon: the same requests to `devpool daemon` over its socket, from
  client processes that keep a connection (the commits of concurrent
  requests are shared, the loop devices attach while the commit is written);
- daemon, no loop devices: the same, for volumes a VM attaches itself
  (`"loop_devices": false`): the commits alone;
- cli+daemon: the CLI commands while the daemon runs (they go through it);
- mcp: the `device_pool_lease_acquire`/`_release` tool calls of a running
  `devpool mcp` server (what a coding agent uses), once without the daemon
  (the server process does the work) and once while the daemon runs.
Each alone (p50/p99) and from 16 concurrent client processes (cycles/s).
LVM2 peer in the same run, on the same kind of loop device: 7 x `lvcreate -an
-Zn` then one `lvremove` of the 7 (metadata only; no device nodes, since this
kernel has no device-mapper, so LVM2 does less work than devpool here).

Prints one JSON object. Usage (root): cargo build --release && bench/lease_ops.py
"""
import argparse, json, multiprocessing as mp, os, socket, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import DEVPOOL, sh, wait_socket  # noqa: E402
LVM_CONFIG = ("global{activation=0} backup{backup=0 archive=0} "
              "devices{obtain_device_list_from_udev=0 use_devicesfile=0}")
ROLES = ["test", "pool1", "pool2", "pool3", "pool4", "pool5", "logwrites"]


def pct(xs, p):
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))], 3)


class CliClient:
    def __init__(self, env, pool):
        self.env, self.base = env, [DEVPOOL, "--pool", pool]

    def acquire(self):
        return json.loads(sh(self.base + ["--json", "lease", "acquire", "--profile", "fstests",
                                          "--size", "64M"], self.env))["session"]

    def release(self, session):
        sh(self.base + ["lease", "release", session], self.env)


class SocketClient:
    def __init__(self, path, pool, loop_devices=True):
        self.pool, self.loop_devices = pool, loop_devices
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rwb")

    def call(self, req):
        self.f.write((json.dumps(req) + "\n").encode())
        self.f.flush()
        r = json.loads(self.f.readline())
        if not r["ok"]:
            sys.exit(f"daemon: {r['error']}")
        return r["result"]

    def acquire(self):
        return self.call({"op": "acquire", "pool": self.pool, "profile": "fstests",
                          "size": "64M", "loop_devices": self.loop_devices})["session"]

    def release(self, session):
        self.call({"op": "release", "pool": self.pool, "session": session})


class McpClient:
    """A `devpool mcp` server on pipes, spoken to as an MCP client does."""

    def __init__(self, env, pool):
        self.pool, self.next_id = pool, 0
        self.p = subprocess.Popen([DEVPOOL, "mcp"], env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.rpc("initialize", {"protocolVersion": "2025-03-26", "capabilities": {},
                                "clientInfo": {"name": "lease_ops", "version": "1"}})
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def send(self, msg):
        self.p.stdin.write((json.dumps(msg) + "\n").encode())
        self.p.stdin.flush()

    def rpc(self, method, params):
        self.next_id += 1
        self.send({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params})
        while True:
            line = self.p.stdout.readline()
            if not line:
                sys.exit("devpool mcp ended")
            r = json.loads(line)
            if r.get("id") == self.next_id:
                if "error" in r:
                    sys.exit(f"devpool mcp: {r['error']}")
                return r["result"]

    def tool(self, name, args):
        r = self.rpc("tools/call", {"name": name, "arguments": args})
        if r.get("isError"):
            sys.exit(f"devpool mcp {name}: {r['content']}")
        return r["structuredContent"]

    def acquire(self):
        return self.tool("device_pool_lease_acquire", {"profile": "fstests", "size": "64M",
                                                       "pool_name": self.pool})["session"]

    def release(self, session):
        self.tool("device_pool_lease_release", {"session": session, "pool_name": self.pool})

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def cycles(client, n):
    acq, rel = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        s = client.acquire()
        t1 = time.perf_counter()
        client.release(s)
        acq.append((t1 - t0) * 1e3)
        rel.append((time.perf_counter() - t1) * 1e3)
    return acq, rel


def worker(make, n, start, out):
    try:
        c = make()
        start.wait()
        out.put(cycles(c, n))
        if hasattr(c, "close"):
            c.close()
    except BaseException as e:  # the parent must hear of it, not wait forever
        out.put(f"a client failed: {e}")


def measure(make, single, clients, per_client):
    """Alone, then from `clients` processes at once."""
    c = make()
    acq, rel = cycles(c, single)
    if hasattr(c, "close"):
        c.close()
    start, out = mp.Event(), mp.Queue()
    procs = [mp.Process(target=worker, args=(make, per_client, start, out)) for _ in range(clients)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    start.set()
    results = [out.get() for _ in procs]
    failed = [r for r in results if isinstance(r, str)]
    if failed:
        for p in procs:
            p.kill()
        sys.exit(failed[0])
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    busy = [x for a, _ in results for x in a]
    return {"single": {"acquire_p50_ms": pct(acq, 50), "acquire_p99_ms": pct(acq, 99),
                       "release_p50_ms": pct(rel, 50), "release_p99_ms": pct(rel, 99),
                       "cycles": len(acq)},
            f"{clients}_clients": {"cycles": clients * per_client, "seconds": round(wall, 3),
                                   "cycles_per_s": round(clients * per_client / wall, 1),
                                   "acquire_p50_ms": pct(busy, 50)}}


class Cli:  # picklable factories for the worker processes
    def __init__(self, env, pool):
        self.env, self.pool = env, pool

    def __call__(self):
        return CliClient(self.env, self.pool)


class Mcp:
    def __init__(self, env, pool):
        self.env, self.pool = env, pool

    def __call__(self):
        return McpClient(self.env, self.pool)


class Sock:
    def __init__(self, path, pool, loop_devices=True):
        self.path, self.pool, self.loop_devices = path, pool, loop_devices

    def __call__(self):
        return SocketClient(self.path, self.pool, self.loop_devices)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=40, help="acquire+release cycles, single client")
    ap.add_argument("--clients", type=int, default=16)
    # 50 each: 800 cycles, over a second of work, so that one stall of this
    # machine's disk does not decide the rate.
    ap.add_argument("--per-client", type=int, default=50)
    ap.add_argument("--pool-on", choices=["loop", "image"], default="image",
                    help="devpool's pool on a loop device (like LVM2's) or on the image file "
                         "itself (the embedded default pool's kind)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: loop devices and LVM2 need it")
    with tempfile.TemporaryDirectory(prefix="devpool-bench-", dir="/var/tmp") as tmp:
        state = os.path.join(tmp, "state")
        env = dict(os.environ, DEVPOOL_STATE_DIR=state, LVM_SUPPRESS_FD_WARNINGS="1")
        imgs, devs = [], []
        for name in ("dp", "lvm"):
            img = os.path.join(tmp, f"{name}.img")
            with open(img, "wb") as f:
                f.truncate(64 << 30)
            imgs.append(img)
            if name == "lvm" or a.pool_on == "loop":
                devs.append(sh(["losetup", "--find", "--show", img]).strip())
            else:
                devs.append(None)
        daemon = None
        result = {"benchmark": "lease acquire+release, fstests profile (7 volumes)",
                  "targets": {"acquire_p50_ms": 2, "cycles_per_s_16_clients": 500}}
        try:
            pool = f"bench{os.getpid()}"
            pv = devs[0] if a.pool_on == "loop" else imgs[0]
            result["devpool_pool_on"] = a.pool_on
            sh([DEVPOOL, "pool", "setup", pv, "--name", pool, "--yes"], env)
            result["devpool_cli"] = measure(Cli(env, pool), a.cycles, a.clients, a.per_client)
            result["devpool_mcp"] = measure(Mcp(env, pool), a.cycles, a.clients, a.per_client)
            daemon = subprocess.Popen([DEVPOOL, "daemon"], env=env, stderr=subprocess.DEVNULL)
            sock = os.path.join(state, "daemon.sock")
            wait_socket(sock, daemon)
            result["devpool_daemon"] = measure(Sock(sock, pool), a.cycles, a.clients, a.per_client)
            result["devpool_daemon_no_loop_devices"] = measure(
                Sock(sock, pool, loop_devices=False), a.cycles, a.clients, a.per_client)
            result["devpool_cli_via_daemon"] = measure(Cli(env, pool), a.cycles, a.clients,
                                                       a.per_client)
            result["devpool_mcp_via_daemon"] = measure(Mcp(env, pool), a.cycles, a.clients,
                                                       a.per_client)
            result["daemon_stats"] = json.loads(sh([DEVPOOL, "--json", "daemon", "--status"], env))
            daemon.terminate()
            daemon.wait()
            daemon = None
            sh([DEVPOOL, "pool", "teardown", pool, "--yes"], env)

            vg = f"lvmbench{os.getpid()}"
            lvm = lambda args: sh(["lvm"] + args + ["--devices", devs[1], "--config", LVM_CONFIG], env)
            lvm(["vgcreate", "-q", vg, devs[1]])
            lvm_acq, lvm_rel = [], []
            for i in range(max(5, a.cycles // 8)):
                names = [f"c{i}-{r}" for r in ROLES]
                t0 = time.perf_counter()
                for n in names:
                    lvm(["lvcreate", "-an", "-Zn", "-L", "64M", "-n", n, vg])
                t1 = time.perf_counter()
                lvm(["lvremove", "-f"] + [f"{vg}/{n}" for n in names])
                lvm_acq.append((t1 - t0) * 1e3)
                lvm_rel.append((time.perf_counter() - t1) * 1e3)
            lvm(["vgremove", "-f", vg])
        finally:
            if daemon:
                daemon.kill()
                daemon.wait()
            for d in devs:
                if d:
                    subprocess.run(["losetup", "-d", d])
        result["lvm2_single"] = {"acquire_p50_ms": pct(lvm_acq, 50),
                                 "release_p50_ms": pct(lvm_rel, 50), "cycles": len(lvm_acq)}
        lvm_cycle = result["lvm2_single"]["acquire_p50_ms"] + result["lvm2_single"]["release_p50_ms"]
        for k in ("devpool_cli", "devpool_mcp", "devpool_daemon", "devpool_daemon_no_loop_devices",
                  "devpool_cli_via_daemon", "devpool_mcp_via_daemon"):
            s = result[k]["single"]
            result[k]["speedup_acquire_p50_vs_lvm2"] = round(
                result["lvm2_single"]["acquire_p50_ms"] / s["acquire_p50_ms"], 1)
            result[k]["speedup_cycle_p50_vs_lvm2"] = round(
                lvm_cycle / (s["acquire_p50_ms"] + s["release_p50_ms"]), 1)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
