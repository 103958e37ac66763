#!/usr/bin/env python3
"""Thin provisioning: create latency, I/O on a thin volume vs a plain volume,
and a pool with 1,000 thin volumes.

Two pools on image files in one run, served by the same devpool NBD server
code: `plainb` (linear leases) and `thinb` (a thin pool). Measured:
  - create latency: `lease acquire` of one volume in the thin pool vs in the
    plain pool (whole CLI each: start-up, scan, commits; the thin one also
    commits dm-thin's metadata)
  - 4k randread (iodepth 32, time-based) on a fully written thin volume vs a
    fully written plain one
  - 4k randwrite first writes: every 4k block once on a fresh thin volume
    (the first write to each 64 KiB block provisions it; mappings commit
    every 100 ms and at the flush) vs a plain volume, each ending with a
    flush (fio end_fsync) so that what is timed is durable; the ratio is of
    the whole run's wall time, flush included
  - 1,000 thin volumes: time to lease them (10 leases of 100), then one more
    lease's latency and `pool status` time with all of them present

Prints one JSON object with ratios (thin / plain). Usage (root):
cargo build --release && bench/thin_io.py
"""
import argparse, json, os, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import DEVPOOL, finish, sh  # noqa: E402
from snapshot_io import Server, timed, fio, median  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=8)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--many", type=int, default=1000)
    ap.add_argument("--latency-runs", type=int, default=9)
    a = ap.parse_args()
    size = a.size_mib << 20
    work = tempfile.mkdtemp(prefix="devpool-bench-", dir="/var/tmp")
    env = dict(os.environ, DEVPOOL_STATE_DIR=os.path.join(work, "state"),
               LVM_SUPPRESS_FD_WARNINGS="1")
    owner = subprocess.Popen(["sleep", "3600"])
    servers = []
    dp = lambda pool, *args: [DEVPOOL, "--pool", pool, *args]
    acquire = lambda pool, vols: json.loads(sh(dp(pool, "--json", "lease", "acquire",
                                                  "--volumes", vols, "--owner-pid",
                                                  str(owner.pid)), env))
    try:
        for pool in ["plainb", "thinb"]:
            sh([DEVPOOL, "pool", "setup", os.path.join(work, f"{pool}.img"), "--name", pool,
                "--image-size", f"{4 * a.size_mib + 2048}M", "--yes"], env)
        sh(dp("thinb", "pool", "thin", "enable", "--data-size", f"{3 * a.size_mib}M"), env)

        # Create latency, alternating pools.
        thin_ms, plain_ms = [], []
        for i in range(a.latency_runs):
            for pool, out in [("plainb", plain_ms), ("thinb", thin_ms)]:
                t = time.perf_counter()
                l = acquire(pool, f"lat:{a.size_mib}M")
                out.append((time.perf_counter() - t) * 1000)
                sh(dp(pool, "lease", "release", l["session"]), env)

        plain = acquire("plainb", f"p:{a.size_mib}M,q:{a.size_mib}M")
        thin = acquire("thinb", f"t:{a.size_mib}M,fresh:{a.size_mib}M")
        pl = {d["role"]: d for d in plain["devices"]}
        th = {d["role"]: d["lv"] for d in thin["devices"]}
        sh(["fio", "--name=fill", "--ioengine=io_uring", "--direct=1",
            f"--filename={pl['p']['device']}", f"--size={size}", "--rw=write", "--bs=1M",
            "--iodepth=8"])
        s = Server(work, env, th["t"], "thinb")
        servers.append(s)
        fio(s.uri, "fill", ["--rw=write", "--bs=1M", "--iodepth=8", f"--size={size}"])
        s.stop()
        servers.remove(s)

        results = {}
        for name, pool, rr_lv, fw_lv in [("plain", "plainb", pl["p"]["lv"], pl["q"]["lv"]),
                                         ("thin", "thinb", th["t"], th["fresh"])]:
            s = Server(work, env, rr_lv, pool)
            servers.append(s)
            r = {"randread_4k": fio(s.uri, "rr", [
                "--rw=randread", "--bs=4k", "--iodepth=32", f"--size={size}",
                "--time_based", f"--runtime={a.runtime}", "--ramp_time=1"])}
            s.stop()
            servers.remove(s)
            s = Server(work, env, fw_lv, pool)
            servers.append(s)
            t = time.perf_counter()
            r["randwrite_4k_first"] = fio(s.uri, "fw", [
                "--rw=randwrite", "--bs=4k", "--iodepth=32", f"--size={size}",
                "--end_fsync=1"])
            r["randwrite_4k_first"]["seconds"] = round(time.perf_counter() - t, 2)
            s.stop()
            servers.remove(s)
            results[name] = r
        st = json.loads(sh(dp("thinb", "--json", "pool", "status"), env))
        thin_usage = st["thin"]["usage"]

        # Many thin volumes.
        t = time.perf_counter()
        per = 100
        for i in range(a.many // per):
            acquire("thinb", ",".join(f"m{i}x{j}:1G" for j in range(per)))
        many_s = time.perf_counter() - t
        last = []
        for _ in range(3):
            t = time.perf_counter()
            l = acquire("thinb", "one:1G")
            last.append((time.perf_counter() - t) * 1000)
            sh(dp("thinb", "lease", "release", l["session"]), env)
        status_ms = timed(dp("thinb", "--json", "pool", "status"), env)

        ratio = lambda job: round(results["thin"][job]["iops"] /
                                  max(results["plain"][job]["iops"], 1), 2)
        print(json.dumps({
            "benchmark": "thin_io",
            "volume_mib": a.size_mib,
            "cpus": os.cpu_count(),
            "create_latency_ms": {
                "thin_lease_median": median(thin_ms),
                "plain_lease_median": median(plain_ms),
                "thin_extra_over_plain": round(median(thin_ms) - median(plain_ms), 2),
                "note": "whole CLI process each (start-up, scan, commits)",
            },
            "results": results,
            "thin_usage_after_io": thin_usage,
            "ratios": {
                "thin_randread_vs_plain": ratio("randread_4k"),
                "thin_first_randwrite_vs_plain": round(
                    results["plain"]["randwrite_4k_first"]["seconds"] /
                    max(results["thin"]["randwrite_4k_first"]["seconds"], 0.001), 2),
            },
            "targets": {"randread": 0.9, "first_randwrite": 0.7},
            "many_thin_volumes": {
                "count": a.many,
                "lease_all_s": round(many_s, 1),
                "one_more_lease_ms": [round(x, 1) for x in last],
                "pool_status_ms": round(status_ms, 1),
            },
        }, indent=2))
    finally:
        finish(servers, ["plainb", "thinb"], env, owner, work)


if __name__ == "__main__":
    main()
