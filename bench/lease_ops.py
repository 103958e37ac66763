#!/usr/bin/env python3
"""Acquire + release of the fstests profile (7 volumes), devpool vs LVM2.

devpool: `lease acquire --profile fstests` (one commit with the owner in LV
tags, plus 7 loop devices) and `lease release` (detach, one commit), alone
(p50/p99) and from 16 concurrent clients (total cycles per second).
LVM2 peer in the same run, on the same kind of loop device: 7 x `lvcreate -an
-Zn` then one `lvremove` of the 7 (metadata only; no device nodes, since this
kernel has no device-mapper, so LVM2 does less work than devpool here).

Prints one JSON object. Usage (root): cargo build --release && bench/lease_ops.py
"""
import argparse, json, os, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import DEVPOOL, sh  # noqa: E402
LVM_CONFIG = ("global{activation=0} backup{backup=0 archive=0} "
              "devices{obtain_device_list_from_udev=0 use_devicesfile=0}")
ROLES = ["test", "pool1", "pool2", "pool3", "pool4", "pool5", "logwrites"]


def ms(fn):
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000.0


def pct(xs, p):
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))], 3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=40, help="acquire+release cycles, single client")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-client", type=int, default=10)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: loop devices and LVM2 need it")
    with tempfile.TemporaryDirectory(prefix="devpool-bench-", dir="/var/tmp") as tmp:
        env = dict(os.environ, DEVPOOL_STATE_DIR=os.path.join(tmp, "state"), LVM_SUPPRESS_FD_WARNINGS="1")
        imgs, devs = [], []
        for name in ("dp", "lvm"):
            img = os.path.join(tmp, f"{name}.img")
            with open(img, "wb") as f:
                f.truncate(64 << 30)
            imgs.append(img)
            devs.append(sh(["losetup", "--find", "--show", img]).strip())
        try:
            pool = f"bench{os.getpid()}"
            sh([DEVPOOL, "pool", "setup", devs[0], "--name", pool, "--yes"], env)
            base = [DEVPOOL, "--pool", pool]
            owner = str(os.getpid())

            def cycle(acq, rel):
                out = {}
                acq.append(ms(lambda: out.update(json.loads(sh(base + [
                    "--json", "lease", "acquire", "--profile", "fstests", "--size", "64M",
                    "--owner-pid", owner], env)))))
                rel.append(ms(lambda: sh(base + ["lease", "release", out["session"]], env)))

            acq, rel = [], []
            for _ in range(a.cycles):
                cycle(acq, rel)

            def client():
                x, y = [], []
                for _ in range(a.per_client):
                    cycle(x, y)
            threads = [threading.Thread(target=client) for _ in range(a.clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            sh([DEVPOOL, "pool", "teardown", pool, "--yes"], env)

            vg = f"lvmbench{os.getpid()}"
            lvm = lambda args: sh(["lvm"] + args + ["--devices", devs[1], "--config", LVM_CONFIG], env)
            lvm(["vgcreate", "-q", vg, devs[1]])
            lvm_acq, lvm_rel = [], []
            for i in range(max(5, a.cycles // 8)):
                names = [f"c{i}-{r}" for r in ROLES]
                lvm_acq.append(ms(lambda: [lvm(["lvcreate", "-an", "-Zn", "-L", "64M", "-n", n, vg]) for n in names]))
                lvm_rel.append(ms(lambda: lvm(["lvremove", "-f"] + [f"{vg}/{n}" for n in names])))
            lvm(["vgremove", "-f", vg])
        finally:
            for d in devs:
                subprocess.run(["losetup", "-d", d])
        total = a.clients * a.per_client
        result = {
            "benchmark": "lease acquire+release, fstests profile (7 volumes)",
            "targets": {"acquire_p50_ms": 2, "cycles_per_s_16_clients": 500},
            "devpool_single": {"acquire_p50_ms": pct(acq, 50), "acquire_p99_ms": pct(acq, 99),
                               "release_p50_ms": pct(rel, 50), "release_p99_ms": pct(rel, 99),
                               "cycles": len(acq)},
            "devpool_16_clients": {"cycles": total, "seconds": round(wall, 3),
                                   "cycles_per_s": round(total / wall, 1)},
            "lvm2_single": {"acquire_p50_ms": pct(lvm_acq, 50), "release_p50_ms": pct(lvm_rel, 50),
                            "cycles": len(lvm_acq)},
        }
        result["speedup_acquire_p50"] = round(result["lvm2_single"]["acquire_p50_ms"] / result["devpool_single"]["acquire_p50_ms"], 2)
        result["speedup_cycle_p50"] = round(
            (result["lvm2_single"]["acquire_p50_ms"] + result["lvm2_single"]["release_p50_ms"]) /
            (result["devpool_single"]["acquire_p50_ms"] + result["devpool_single"]["release_p50_ms"]), 2)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
