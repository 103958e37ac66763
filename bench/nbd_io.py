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
Jobs: 4k randread and randwrite at iodepth 32, 1M sequential read and write
(iodepth 8), each time-based. All servers run for the whole benchmark; each
job runs on the four targets back to back, `--rounds` times, because this
machine's disk speed drifts by half within minutes: a target measured once,
minutes apart from the raw file, says more about the drift than about the
target. Reports each target's median IOPS / MiB/s over the rounds, ratios to
qemu-nbd, nbdkit and raw as medians of the per-round ratios, CPU per I/O of
the server process (utime+stime from /proc), and the server's CPU use while
idle.

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


def cpu_ticks(pid):
    total = 0
    # All threads of the process (the server's workers are threads).
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    total += int(rest[11]) + int(rest[12])
    return total


def fio(target, job, args, runtime, size):
    base = ["fio", "--name", job, "--size", str(size), "--time_based",
            f"--runtime={runtime}", "--ramp_time=1", "--output-format=json",
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
    for _ in range(rounds):
        for job, args in JOBS:
            for name, (target, pid) in targets.items():
                cached = image if name == "nbdkit" else None
                before = cpu_ticks(pid) if pid else 0
                runs[name][job].append(fio(target, job, args, runtime, size))
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
            if pid:
                ios = sum(x["ios"] for x in rs)
                r["server_cpu_s"] = round(cpu[name][job], 2)
                r["server_cpu_us_per_io"] = round(cpu[name][job] * 1e6 / max(ios, 1), 2)
            res[name][job] = r
        if pid:
            before = cpu_ticks(pid)
            time.sleep(2)
            res[name]["idle_cpu_percent"] = round((cpu_ticks(pid) - before) / HZ / 2 * 100, 1)
    return res


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
        }
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
        print(json.dumps({
            "benchmark": "nbd_io",
            "volume_mib": a.size_mib,
            "runtime_s": a.runtime,
            "rounds": a.rounds,
            "cpus": os.cpu_count(),
            "results": results,
            "ratios": ratios,
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
