#!/usr/bin/env python3
"""Block I/O through devpool's NBD server vs qemu-nbd, nbdkit and the raw file.

One 1 GiB leased volume on a pool image file (filled with data first). The
same bytes are then read and written by fio:
  - raw:      fio io_uring, O_DIRECT, on the image file at the volume's offset
              (the limit)
  - devpool:  fio's nbd engine -> `devpool serve VOLUME --nbd unix:…`
  - qemu-nbd: fio's nbd engine -> `qemu-nbd --cache=none --aio=io_uring
              --offset … ` on the same image (qemu-nbd has no --size: it
              exports from the offset to the end of the file, the jobs stay in
              the first GiB)
  - nbdkit:   fio's nbd engine -> `nbdkit --filter=offset file …`
  - nbdkit_memory: fio's nbd engine -> `nbdkit memory` (filled first): no
              disk at all, so what this NBD client and an NBD server cost on
              this machine's CPUs alone
Jobs: 4k randread and randwrite at iodepth 32, 1M sequential read and write
(iodepth 8), each time-based. All servers run for the whole benchmark; each
job runs on the five targets back to back, `--rounds` times, because this
machine's disk speed drifts by half within minutes: a target measured once,
minutes apart from the raw file, says more about the drift than about the
target. Reports each target's median IOPS / MiB/s over the rounds, ratios to
qemu-nbd, nbdkit and raw as medians of the per-round ratios, CPU per I/O of
the server process (utime+stime from /proc), and the server's CPU use while
idle. CPU per I/O counts the I/O of fio's ramp-up too (fio reports only the
measured part; the ramp's share is estimated at the measured rate).

The whole machine's busy CPU time per I/O (client, server, kernel,
interrupts; from /proc/stat) shows what the raw-file target asks of this
machine's CPUs: every I/O through an NBD server costs at least the
client's CPU (fio's nbd engine, measured against `nbdkit memory`) plus the
kernel's path for the raw file's I/O (its busy time per I/O minus fio's
own user time). `cpu_floor` reports that sum, the share of all CPUs it
fills at 0.9x the raw file's IOPS, and devpool's measured share.

Prints one JSON object. Usage (root): cargo build --release && bench/nbd_io.py
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import DEVPOOL, sh, wait_socket  # noqa: E402
HZ = os.sysconf("SC_CLK_TCK")
JOBS = [
    ("randread_4k", ["--rw=randread", "--bs=4k", "--iodepth=32"]),
    ("randwrite_4k", ["--rw=randwrite", "--bs=4k", "--iodepth=32"]),
    ("seqread_1m", ["--rw=read", "--bs=1M", "--iodepth=8"]),
    ("seqwrite_1m", ["--rw=write", "--bs=1M", "--iodepth=8"]),
]


RAMP_S = 1


def machine_busy_ticks():
    """Busy CPU time of the whole machine: everything but idle, iowait and
    steal (first line of /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest is in user).
    return sum(v[:8]) - v[3] - v[4] - v[7]


def cpu_ticks(pid):
    total = 0
    # All threads of the process (the server's workers are threads).
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    total += int(rest[11]) + int(rest[12])
    return total


def fio(target, job, args, runtime, size):
    base = ["fio", "--name", job, "--size", str(size), "--time_based",
            f"--runtime={runtime}", f"--ramp_time={RAMP_S}", "--output-format=json",
            "--group_reporting"]
    if target[0] == "file":
        base += ["--ioengine=io_uring", "--direct=1", f"--filename={target[1]}",
                 f"--offset={target[2]}"]
    else:
        base += ["--ioengine=nbd", f"--uri={target[1]}"]
    out = sh(base + args)
    j = json.loads(out[out.index("{"):])["jobs"][0]
    rw = "read" if j["read"]["io_bytes"] > 0 else "write"
    return {
        "iops": round(j[rw]["iops"]),
        "mib_s": round(j[rw]["bw_bytes"] / 2**20, 1),
        "ios": j[rw]["total_ios"],
        # The I/O CPU time was spent on: the measured part and the ramp.
        "ios_with_ramp": j[rw]["total_ios"] + round(j[rw]["iops"] * RAMP_S),
        "clat_p50_us": round(j[rw]["clat_ns"]["percentile"]["50.000000"] / 1000, 1),
        "fio_cpu_usr_sys": [round(j["usr_cpu"], 1), round(j["sys_cpu"], 1)],
    }


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def measure_rounds(targets, runtime, size, rounds, image):
    """targets: name -> (fio target, server pid or None). Every job on every
    target, back to back, `rounds` times. Per target and job: the median
    round (by IOPS) with the server's CPU over all rounds; and the rounds'
    IOPS."""
    runs = {name: {job: [] for job, _ in JOBS} for name in targets}
    cpu = {name: {job: 0.0 for job, _ in JOBS} for name in targets}
    busy = {name: {job: 0.0 for job, _ in JOBS} for name in targets}
    for _ in range(rounds):
        for job, args in JOBS:
            for name, (target, pid) in targets.items():
                cached = image if name == "nbdkit" else None
                before = cpu_ticks(pid) if pid else 0
                machine_before = machine_busy_ticks()
                runs[name][job].append(fio(target, job, args, runtime, size))
                busy[name][job] += (machine_busy_ticks() - machine_before) / HZ
                if pid:
                    cpu[name][job] += (cpu_ticks(pid) - before) / HZ
                if cached:
                    # nbdkit writes through the page cache: leave no dirty
                    # or cached pages for the next target's run.
                    os.sync()
                    fd = os.open(cached, os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
    res = {}
    for name, (_, pid) in targets.items():
        res[name] = {}
        for job, _ in JOBS:
            rs = runs[name][job]
            r = dict(sorted(rs, key=lambda x: x["iops"])[len(rs) // 2])
            r["rounds_iops"] = [x["iops"] for x in rs]
            ios = sum(x["ios_with_ramp"] for x in rs)
            r["machine_cpu_us_per_io"] = round(busy[name][job] * 1e6 / max(ios, 1), 2)
            if pid:
                r["server_cpu_s"] = round(cpu[name][job], 2)
                r["server_cpu_us_per_io"] = round(cpu[name][job] * 1e6 / max(ios, 1), 2)
            res[name][job] = r
        if pid:
            before = cpu_ticks(pid)
            time.sleep(2)
            res[name]["idle_cpu_percent"] = round((cpu_ticks(pid) - before) / HZ / 2 * 100, 1)
    return res


def cpu_floor(results, job, cpus):
    """What any NBD server doing this job's disk I/O must leave to the rest
    of the machine (see the docstring): the client's CPU per I/O (fio's
    user+system time against `nbdkit memory`, where no disk slows it) plus
    the raw file's kernel path (the machine's busy time per raw I/O minus
    fio's own user time). The server's own socket and request work comes on
    top, so 0.9x raw needs at least `cpu_share_at_raw_target` of every CPU
    even from a server that costs nothing."""
    raw, mem = results["raw"][job], results["nbdkit_memory"][job]

    def fio_us(r, usr_and_sys):
        pct = sum(r["fio_cpu_usr_sys"]) if usr_and_sys else r["fio_cpu_usr_sys"][0]
        return pct / 100 * 1e6 / max(r["iops"], 1)

    client_us = fio_us(mem, True)
    kernel_us = raw["machine_cpu_us_per_io"] - fio_us(raw, False)
    floor_us = client_us + kernel_us
    target = 0.9 * raw["iops"]
    dev = results["devpool"][job]
    return {
        "nbd_client_us_per_io": round(client_us, 2),
        "raw_kernel_path_us_per_io": round(kernel_us, 2),
        "floor_us_per_io": round(floor_us, 2),
        "raw_target_iops": round(target),
        "cpu_share_at_raw_target": round(target * floor_us / 1e6 / cpus, 2),
        "devpool_iops": dev["iops"],
        "devpool_machine_us_per_io": dev["machine_cpu_us_per_io"],
        "devpool_cpu_share": round(dev["iops"] * dev["machine_cpu_us_per_io"] / 1e6 / cpus, 2),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=1024)
    a = ap.parse_args()
    for tool in ["fio", "qemu-nbd", "nbdkit"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed")
    size = a.size_mib << 20
    work = tempfile.mkdtemp(prefix="devpool-bench-", dir="/var/tmp")
    state = os.path.join(work, "state")
    env = dict(os.environ, DEVPOOL_STATE_DIR=state, LVM_SUPPRESS_FD_WARNINGS="1")
    image = os.path.join(work, "pool.img")
    procs = []
    owner = subprocess.Popen(["sleep", "3600"])
    try:
        sh([DEVPOOL, "pool", "setup", image, "--name", "bench", "--image-size",
            f"{a.size_mib + 256}M", "--yes"], env)
        lease = json.loads(sh([DEVPOOL, "--pool", "bench", "--json", "lease", "acquire",
                               "--volumes", f"vol:{a.size_mib}M", "--owner-pid",
                               str(owner.pid)], env))
        dev = lease["devices"][0]
        loop = os.path.basename(dev["device"])
        offset = int(open(f"/sys/block/{loop}/loop/offset").read())
        # Fill the volume so reads hit real blocks, not holes.
        sh(["fio", "--name=fill", "--ioengine=io_uring", "--direct=1", f"--filename={image}",
            f"--offset={offset}", f"--size={size}", "--rw=write", "--bs=1M",
            "--iodepth=8"])
        def serve(argv, sock, env=None):
            p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            procs.append(p)
            wait_socket(sock, p)
            return (("nbd", f"nbd+unix:///?socket={sock}"), p.pid)

        sock = os.path.join(work, "devpool.sock")
        qsock = os.path.join(work, "qemu.sock")
        ksock = os.path.join(work, "nbdkit.sock")
        msock = os.path.join(work, "memory.sock")
        targets = {
            "raw": (("file", image, offset), None),
            "devpool": serve([DEVPOOL, "--pool", "bench", "serve", dev["lv"], "--nbd",
                              f"unix:{sock}"], sock, env),
            "qemu_nbd": serve([
                "qemu-nbd", "--cache=none", "--aio=io_uring", "-f", "raw", "--offset",
                str(offset), "--shared=8", "--persistent", "--socket", qsock, image], qsock),
            "nbdkit": serve([
                "nbdkit", "-f", "-U", ksock, "--filter=offset", "file", f"file={image}",
                f"offset={offset}", f"range={size}"], ksock),
            "nbdkit_memory": serve(["nbdkit", "-f", "-U", msock, "memory", str(size)], msock),
        }
        # Real data in memory too (a sparse page reads faster than a held one).
        sh(["fio", "--name=fill", "--ioengine=nbd", f"--uri={targets['nbdkit_memory'][0][1]}",
            f"--size={size}", "--rw=write", "--bs=1M", "--iodepth=8"])
        results = measure_rounds(targets, a.runtime, size, a.rounds, image)

        def ratio(job, peer):
            d, p = results["devpool"][job]["rounds_iops"], results[peer][job]["rounds_iops"]
            return round(median([x / max(y, 1) for x, y in zip(d, p)]), 2)

        ratios = {}
        for job, _ in JOBS:
            ratios[job] = {
                "devpool_vs_qemu_nbd": ratio(job, "qemu_nbd"),
                "devpool_vs_nbdkit": ratio(job, "nbdkit"),
                "devpool_vs_raw": ratio(job, "raw"),
            }
        cpus = os.cpu_count() or 1
        floors = {job: cpu_floor(results, job, cpus) for job, _ in JOBS[:2]}
        print(json.dumps({
            "benchmark": "nbd_io",
            "volume_mib": a.size_mib,
            "runtime_s": a.runtime,
            "rounds": a.rounds,
            "cpus": os.cpu_count(),
            "results": results,
            "ratios": ratios,
            "cpu_floor": floors,
            "targets": {"randread_vs_qemu_nbd": 1.5, "randwrite_vs_qemu_nbd": 2.0,
                        "vs_raw": 0.9},
        }, indent=2))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill(); p.wait()
        subprocess.run([DEVPOOL, "--pool", "bench", "pool", "teardown", "bench", "--force",
                        "--yes"], env=env, capture_output=True)
        owner.kill(); owner.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
