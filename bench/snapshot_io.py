#!/usr/bin/env python3
"""Snapshots: create latency, and I/O on a snapshotted origin vs a plain volume.

One pool image file, three leased volumes of the same size: `plain` and
`origin`, filled with data, and `scratch` (for the disk-ceiling run below). Measured in one run, through the same devpool NBD server
code:
  - create latency: `devpool snapshot create` vs `devpool lv create` of an LV
    of the same size (one metadata commit each; the difference is the
    snapshot's own work: COW header, loop device checks)
  - 4k randread (iodepth 32, time-based) on plain vs on origin with a snapshot
  - 4k randwrite first writes: every 4k block of the volume written exactly
    once (fio's random map, not time-based), so on the origin every write
    copies a chunk out first; plain vs origin. The job ends with a flush
    (`end_fsync`), so writes the origin's server answered before their
    copy-out count only once they are on the volume
  - the randread pair and the first-write pair again `--rounds` - 1 more
    times (the origin with a fresh snapshot; the order within a pair
    alternates), so each ratio is the median of pairs run back to back:
    this machine's disk speed drifts by half between runs
  - the disk's own ceiling for first writes, next to each first-write pair:
    fio directly on the image file (no devpool, no NBD, no syncs, no
    exception records) doing only the disk I/O a 4 KiB-chunk first write
    cannot do without (dm-snapshot's format): a random 4k read of the old
    chunk and a random 4k write of the new data, 65,536 of each at iodepth
    256 over the plain volume's range, while a second job writes the
    chunks' copies as 1 MiB sequential writes to a scratch volume (a COW
    store at its cheapest). Its first writes per second bound what any
    copy-on-write origin can reach on this disk; reported per round with
    the plain volume's and the origin's
  - 4k randrw 70/30 on a fresh snapshot (first writes mixed with reads):
    IOPS and read latency, plain vs origin (reads must not wait behind
    copy-outs)
  - 255 snapshots of one origin: time to create them all, the last one's
    latency, and 4k randwrite on the origin with all of them (each first
    write copies out to 255 stores)

Prints one JSON object with ratios (origin / plain). Usage (root):
cargo build --release && bench/snapshot_io.py
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import DEVPOOL, finish, sh, wait_socket  # noqa: E402


def timed(args, env):
    t = time.perf_counter()
    sh(args, env)
    return (time.perf_counter() - t) * 1000


def fio_job(uri, job, args):
    out = sh(["fio", "--name", job, "--ioengine=nbd", f"--uri={uri}",
              "--output-format=json", "--group_reporting"] + args)
    return json.loads(out[out.index("{"):])["jobs"][0]


def fio(uri, job, args):
    j = fio_job(uri, job, args)
    rw = "read" if j["read"]["io_bytes"] > 0 else "write"
    return {"iops": round(j[rw]["iops"]), "ios": j[rw]["total_ios"],
            "clat_p50_us": round(j[rw]["clat_ns"]["percentile"]["50.000000"] / 1000, 1)}


def fio_mixed(uri, size):
    """70/30 random reads and first writes: both IOPS, and read latency."""
    j = fio_job(uri, "mix", ["--rw=randrw", "--rwmixread=70", "--bs=4k", "--iodepth=32",
                             f"--size={size}", f"--io_size={size // 4}", "--end_fsync=1"])
    pct = j["read"]["clat_ns"]["percentile"]
    return {"read_iops": round(j["read"]["iops"]), "write_iops": round(j["write"]["iops"]),
            "read_clat_p50_us": round(pct["50.000000"] / 1000, 1),
            "read_clat_p99_us": round(pct["99.000000"] / 1000, 1)}


class Server:
    def __init__(self, work, env, lv, pool="bench"):
        self.sock = os.path.join(work, f"{lv[-12:]}.sock")
        self.p = subprocess.Popen([DEVPOOL, "--pool", pool, "serve", lv, "--nbd",
                                   f"unix:{self.sock}"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_socket(self.sock, self.p)
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def stop(self):
        self.p.terminate()
        self.p.wait()


def image_offset(loop_dev):
    """Where a leased volume's loop device starts in the pool image."""
    name = os.path.basename(loop_dev)
    with open(f"/sys/block/{name}/loop/offset") as f:
        return int(f.read())


def disk_ceiling(image, pairs_at, store_at, size):
    """First writes per second the disk itself allows: fio on the image file
    doing a random 4k read and a random 4k write per first write, 65,536 of
    each over `pairs_at`, while the copies go to `store_at` as 1 MiB
    sequential writes. The pairs' reads per second of their run."""
    common = ["--ioengine=io_uring", "--direct=1", f"--filename={image}",
              "--output-format=json"]
    out = sh(["fio"] + common + [
        "--name=pairs", "--rw=randrw", "--rwmixread=50", "--bs=4k", "--iodepth=256",
        f"--offset={pairs_at}", f"--size={size}", f"--io_size={2 * size}",
        "--name=store", "--rw=write", "--bs=1M", "--iodepth=2", f"--offset={store_at}",
        f"--size={size}"])
    jobs = {j["jobname"]: j for j in json.loads(out[out.index("{"):])["jobs"]}
    p = jobs["pairs"]
    return round(p["read"]["total_ios"] * 1000 / max(p["job_runtime"], 1))


def ratios(pairs):
    """origin / plain for each (plain, origin) pair."""
    return [round(o / max(p, 1), 2) for p, o in pairs]


def pairs_report(pairs, how):
    return {"plain_iops": [p for p, _ in pairs], "origin_iops": [o for _, o in pairs],
            "ratios": ratios(pairs),
            "note": f"each pair back to back (the order alternates), {how}; "
                    "the ratio above is their median"}


def median(xs):
    xs = sorted(xs)
    return round(xs[len(xs) // 2], 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=8)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--many", type=int, default=255)
    ap.add_argument("--latency-runs", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    if not shutil.which("fio"):
        sys.exit("fio is not installed")
    size = a.size_mib << 20
    work = tempfile.mkdtemp(prefix="devpool-bench-", dir="/var/tmp")
    env = dict(os.environ, DEVPOOL_STATE_DIR=os.path.join(work, "state"),
               LVM_SUPPRESS_FD_WARNINGS="1")
    image = os.path.join(work, "pool.img")
    owner = subprocess.Popen(["sleep", "3600"])
    servers = []
    try:
        image_mib = 4 * a.size_mib + a.many * 4 + 1024
        sh([DEVPOOL, "pool", "setup", image, "--name", "bench", "--image-size",
            f"{image_mib}M", "--yes"], env)
        lease = json.loads(sh([DEVPOOL, "--pool", "bench", "--json", "lease", "acquire",
                               "--volumes",
                               f"plain:{a.size_mib}M,origin:{a.size_mib}M,scratch:{a.size_mib}M",
                               "--owner-pid", str(owner.pid)], env))
        lvs = {d["role"]: d["lv"] for d in lease["devices"]}
        offsets = {d["role"]: image_offset(d["device"]) for d in lease["devices"]}
        for d in lease["devices"]:
            if d["role"] == "scratch":
                continue
            sh(["fio", "--name=fill", "--ioengine=io_uring", "--direct=1",
                f"--filename={d['device']}", f"--size={size}", "--rw=write", "--bs=1M",
                "--iodepth=8"])
        vg = "devpool-bench"

        # Create latency: snapshot vs plain LV of the same size, alternating.
        snap_ms, lv_ms = [], []
        for i in range(a.latency_runs):
            lv_ms.append(timed([DEVPOOL, "lv", "create", f"{vg}/peer{i}", "--size",
                                f"{a.size_mib}M", "--no-wipe"], env))
            snap_ms.append(timed([DEVPOOL, "--pool", "bench", "snapshot", "create",
                                  lvs["origin"], "--name", f"lat{i}", "--size",
                                  f"{a.size_mib}M"], env))
            sh([DEVPOOL, "--pool", "bench", "snapshot", "delete", f"lat{i}"], env)
            sh([DEVPOOL, "lv", "remove", f"{vg}/peer{i}", "--yes"], env)
        # The volume gets its loop device back after the last delete; the
        # real snapshot for the I/O runs:
        sh([DEVPOOL, "--pool", "bench", "snapshot", "create", lvs["origin"], "--name",
            "snap", "--size", f"{a.size_mib + 16}M"], env)

        results, copied = {}, None
        for role in ["plain", "origin"]:
            s = Server(work, env, lvs[role])
            servers.append(s)
            r = {"randread_4k": fio(s.uri, "rr", [
                "--rw=randread", "--bs=4k", "--iodepth=32", f"--size={size}",
                "--time_based", f"--runtime={a.runtime}", "--ramp_time=1"])}
            # Every block once: on the origin, every write is a first write.
            t = time.perf_counter()
            r["randwrite_4k_first"] = fio(s.uri, "fw", [
                "--rw=randwrite", "--bs=4k", "--iodepth=32", f"--size={size}",
                "--end_fsync=1"])
            r["randwrite_4k_first"]["seconds"] = round(time.perf_counter() - t, 2)
            s.stop()
            servers.remove(s)
            if role == "origin":
                st = json.loads(sh([DEVPOOL, "--pool", "bench", "--json", "snapshot",
                                    "list"], env))
                copied = st[0]["usage"]["used_chunks"] if st and st[0].get("usage") else None
                # A fresh snapshot, so the mixed run's writes are first writes.
                sh([DEVPOOL, "--pool", "bench", "snapshot", "delete", "snap"], env)
                sh([DEVPOOL, "--pool", "bench", "snapshot", "create", lvs["origin"],
                    "--name", "snap", "--size", f"{a.size_mib + 16}M"], env)
            s = Server(work, env, lvs[role])
            servers.append(s)
            r["randrw_4k_70_30_first"] = fio_mixed(s.uri, size)
            s.stop()
            servers.remove(s)
            results[role] = r

        # More first-write pairs, each back to back, on a fresh snapshot.
        def first_writes(role):
            s = Server(work, env, lvs[role])
            servers.append(s)
            r = fio(s.uri, "fw", ["--rw=randwrite", "--bs=4k", "--iodepth=32",
                                  f"--size={size}", "--end_fsync=1"])
            s.stop()
            servers.remove(s)
            return r["iops"]

        def reads(role):
            s = Server(work, env, lvs[role])
            servers.append(s)
            r = fio(s.uri, "rr", ["--rw=randread", "--bs=4k", "--iodepth=32",
                                  f"--size={size}", "--time_based",
                                  f"--runtime={max(2, a.runtime // 2)}", "--ramp_time=1"])
            s.stop()
            servers.remove(s)
            return r["iops"]

        def ceiling(_role=None):
            return disk_ceiling(image, offsets["plain"], offsets["scratch"], size)

        # Pairs back to back, in alternating order (plain first, then the
        # origin first) so that a drift within a pair favours neither.
        def pair(measure, i):
            if i % 2 == 0:
                p = measure("plain")
                return p, measure("origin")
            o = measure("origin")
            return measure("plain"), o

        # The ceiling right beside each first-write pair (after it, then
        # before it).
        ceilings = []

        def first_write_pair(i):
            if i % 2 == 1:
                ceilings.append(ceiling())
            p = pair(first_writes, i)
            if i % 2 == 0:
                ceilings.append(ceiling())
            return p

        pairs = [(results["plain"]["randwrite_4k_first"]["iops"],
                  results["origin"]["randwrite_4k_first"]["iops"])]
        ceilings.append(ceiling())
        read_pairs = [(results["plain"]["randread_4k"]["iops"],
                       results["origin"]["randread_4k"]["iops"])]
        for i in range(1, a.rounds):
            sh([DEVPOOL, "--pool", "bench", "snapshot", "delete", "snap"], env)
            sh([DEVPOOL, "--pool", "bench", "snapshot", "create", lvs["origin"],
                "--name", "snap", "--size", f"{a.size_mib + 16}M"], env)
            # Reads first: they leave the fresh snapshot untouched.
            read_pairs.append(pair(reads, i))
            pairs.append(first_write_pair(i))
        pair_ratios = ratios(pairs)
        read_ratios = ratios(read_pairs)

        # Many snapshots of one origin.
        sh([DEVPOOL, "--pool", "bench", "snapshot", "delete", "snap"], env)
        t = time.perf_counter()
        last = []
        for i in range(a.many):
            ms = timed([DEVPOOL, "--pool", "bench", "snapshot", "create", lvs["origin"],
                        "--name", f"m{i}", "--size", "4M"], env)
            if i >= a.many - 5:
                last.append(ms)
        many_s = time.perf_counter() - t
        s = Server(work, env, lvs["origin"])
        servers.append(s)
        # 1000 first writes: fewer than each 4 MiB store holds (1019 chunks),
        # so every one copies out to every snapshot.
        many_w = fio(s.uri, "many", ["--rw=randwrite", "--bs=4k", "--iodepth=32",
                                      f"--size={size}", "--io_size=4000k", "--end_fsync=1"])
        s.stop()
        servers.remove(s)

        ratio = lambda job, k="iops": round(results["origin"][job][k] /
                                           max(results["plain"][job][k], 1), 2)
        print(json.dumps({
            "benchmark": "snapshot_io",
            "volume_mib": a.size_mib,
            "cpus": os.cpu_count(),
            "create_latency_ms": {
                "snapshot_create_median": median(snap_ms),
                "lv_create_same_size_median": median(lv_ms),
                "snapshot_extra_over_lv_create": round(median(snap_ms) - median(lv_ms), 2),
                "note": "whole CLI process each (start-up, scan, one commit)",
            },
            "results": results,
            "chunks_copied_out": copied,
            "ratios": {
                "origin_randread_vs_plain": median(read_ratios),
                "origin_first_randwrite_vs_plain": median(pair_ratios),
                "origin_mixed_read_iops_vs_plain": ratio("randrw_4k_70_30_first", "read_iops"),
                "origin_mixed_read_p50_latency_vs_plain":
                    ratio("randrw_4k_70_30_first", "read_clat_p50_us"),
            },
            "randread_pairs": pairs_report(read_pairs, "with the snapshot"),
            "first_randwrite_pairs": pairs_report(pairs, "the origin on a fresh snapshot"),
            "first_randwrite_disk_ceiling": {
                "first_writes_per_s": ceilings,
                "ceiling_vs_plain": [round(c / max(p, 1), 2) for (p, _), c in zip(pairs, ceilings)],
                "origin_vs_ceiling": [round(o / max(c, 1), 2) for (_, o), c in zip(pairs, ceilings)],
                "ceiling_vs_plain_median": median([c / max(p, 1) for (p, _), c in zip(pairs, ceilings)]),
                "origin_vs_ceiling_median": median([o / max(c, 1) for (_, o), c in zip(pairs, ceilings)]),
                "note": "fio on the image file doing only the disk I/O 4 KiB-chunk first writes "
                        "need (see the docstring), measured beside each pair: an upper bound "
                        "for the origin",
            },
            "targets": {"randread": 0.9, "first_randwrite": 0.7},
            "many_snapshots": {
                "count": a.many,
                "create_all_s": round(many_s, 1),
                "last_five_create_ms": [round(x, 1) for x in last],
                "origin_randwrite_4k_iops_with_all": many_w["iops"],
            },
        }, indent=2))
    finally:
        finish(servers, ["bench"], env, owner, work)


if __name__ == "__main__":
    main()
