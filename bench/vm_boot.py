#!/usr/bin/env python3
"""`devpool vm run` timings and guest I/O, raw attachment vs vhost-user-blk.

A pool on a sparse image file; Debian's 6.12 kernel (the one the guest tests
cache in /var/cache/devpool-test, or --kernel/--modules). For each
attachment (`--attach raw`: QEMU's raw driver at the volume's offset;
`--attach vhost-user-blk`: devpool's server):
  - boot-to-command: QEMU start to the command starting in the guest, and
    command-to-report: command end to devpool's report (guest power-off,
    servers stopped, lease released), over --boots runs of `true`;
  - the guest's fio 4k randread (io_uring, O_DIRECT, iodepth 16) on a 256 MiB
    region of the leased volume, written first.
Under TCG absolute numbers are slow; the ratios vhost-user-blk / raw matter.

Prints one JSON object. Usage (root): cargo build --release && bench/vm_boot.py
"""
import argparse, glob, json, os, statistics, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import DEVPOOL  # noqa: E402
CACHE = "/var/cache/devpool-test/kernels"

FIO = ("fio --name=w --filename=$TEST_DEV --rw=write --bs=1M --size=256M --direct=1 "
       "--ioengine=io_uring --iodepth=8 --output=/dev/null && "
       "fio --name=r --filename=$TEST_DEV --rw=randread --bs=4k --size=256M --direct=1 "
       "--ioengine=io_uring --iodepth=16 --time_based --runtime={runtime} --minimal")


def kernel_args(a):
    if a.kernel:
        return ["--kernel", a.kernel] + (["--modules", a.modules] if a.modules else [])
    trees = sorted(glob.glob(f"{CACHE}/linux-image-6.12.*/boot/vmlinuz-*"))
    if not trees:
        sys.exit("no cached Debian kernel: run the guest tests once, or give --kernel")
    image = trees[-1]
    root = os.path.dirname(os.path.dirname(image))
    version = os.path.basename(image)[len("vmlinuz-"):]
    return ["--kernel", image, "--modules", f"{root}/lib/modules/{version}"]


def vm_run(state, img, kargs, attach, command, extra=()):
    args = [DEVPOOL, "--devices", img, "--pool", "bench", "--json", "vm", "run",
            "--mem", "1G", "--cpus", "2", "--attach", attach, "--volumes", "test:1G",
            *kargs, *extra, "--", "sh", "-c", command]
    r = subprocess.run(args, capture_output=True, text=True,
                       env={**os.environ, "DEVPOOL_STATE_DIR": state})
    if r.returncode != 0:
        sys.exit(f"vm run failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout), r.stderr


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kernel")
    p.add_argument("--modules")
    p.add_argument("--boots", type=int, default=3)
    p.add_argument("--runtime", type=int, default=10)
    a = p.parse_args()
    kargs = kernel_args(a)
    fio = subprocess.run(["sh", "-c", "command -v fio"], capture_output=True, text=True).stdout.strip()
    if not fio:
        sys.exit("fio is not installed")
    out = {"bench": "vm_boot", "kernel": kargs[1], "attachments": {}}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        state = os.path.join(tmp, "state")
        img = os.path.join(tmp, "pool.img")
        subprocess.run([DEVPOOL, "--devices", img, "pool", "setup", img, "--name", "bench",
                        "--image-size", "4G", "--yes"], check=True, capture_output=True,
                       env={**os.environ, "DEVPOOL_STATE_DIR": state})
        for attach in ["raw", "vhost-user-blk"]:
            boot, report = [], []
            for _ in range(a.boots):
                r, _ = vm_run(state, img, kargs, attach, "true")
                boot.append(r["timings"]["boot_ms"])
                report.append(r["timings"]["report_ms"])
                accel = r["accel"]
            r, console = vm_run(state, img, kargs, attach, FIO.format(runtime=a.runtime),
                                ["--add", fio])
            terse = [l for l in console.splitlines() if l.startswith("3;fio-")]
            if not terse:
                sys.exit(f"no fio result in the console:\n{console[-3000:]}")
            iops = float(terse[-1].split(";")[7])
            out["accel"] = accel
            out["attachments"][attach] = {
                "boot_to_command_ms_median": statistics.median(boot),
                "command_to_report_ms_median": statistics.median(report),
                "boot_ms": boot,
                "report_ms": report,
                "guest_randread_4k_iops": iops,
            }
    raw, vh = out["attachments"]["raw"], out["attachments"]["vhost-user-blk"]
    out["ratios_vhost_to_raw"] = {
        "boot_to_command": round(vh["boot_to_command_ms_median"] / raw["boot_to_command_ms_median"], 3),
        "command_to_report": round(vh["command_to_report_ms_median"] / max(raw["command_to_report_ms_median"], 1), 3),
        "guest_randread_4k_iops": round(vh["guest_randread_4k_iops"] / raw["guest_randread_4k_iops"], 3),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
