"""Drive `devpool mcp` with the official MCP Python client (the `mcp` package)
over stdio, as an agent would. Usage: client.py DEVPOOL SCENARIO ARGS_JSON.

Each scenario is a list of steps; every tool call's outcome (is_error, the
text summary, the structured content) is recorded in a transcript printed as
JSON on stdout, for the Rust test to assert on. Scenarios may also record
what the host shows (e.g. whether a VG exists) between calls.
"""
import asyncio
import json
import os
import signal
import subprocess
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

DEVPOOL, SCENARIO, ARGS = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
LVM_CONFIG = ARGS.get("lvm_config", "")


def vg_exists(name):
    r = subprocess.run(["vgs", "--noheadings", "-o", "vg_name", "--config", LVM_CONFIG,
                        "--devices", ARGS["device"]],
                       capture_output=True, text=True)
    return name in r.stdout.split()


class Run:
    def __init__(self, session):
        self.s = session
        self.log = []

    async def call(self, step, tool, args, **kw):
        progress = []

        async def on_progress(p, total, message):
            progress.append({"progress": p, "total": total, "message": message})

        try:
            r = await self.s.call_tool(tool, args, progress_callback=on_progress, **kw)
            entry = {"step": step, "tool": tool, "is_error": bool(r.is_error),
                     "text": "\n".join(c.text for c in r.content if hasattr(c, "text")),
                     "structured": r.structured_content, "progress": progress}
        except Exception as e:  # a protocol-level error or a timeout
            entry = {"step": step, "tool": tool, "exception": f"{type(e).__name__}: {e}",
                     "progress": progress}
        self.log.append(entry)
        return entry

    def note(self, step, **values):
        self.log.append({"step": step, **values})


def server(extra_env=None):
    env = dict(os.environ, **(extra_env or {}))
    return StdioServerParameters(command=DEVPOOL, args=["mcp"], env=env)


async def session(run_steps):
    async with stdio_client(server()) as (r, w):
        async with ClientSession(r, w) as s:
            await s.initialize()
            run = Run(s)
            await run_steps(run, s)
            return run.log


async def tools(run, s):
    listed = await s.list_tools()
    run.note("tools", tools=[{"name": t.name, "description": t.description,
                              "input_schema": t.input_schema} for t in listed.tools])


async def lifecycle(run, s):
    dev, pool = ARGS["device"], ARGS["pool"]
    vg = f"devpool-{pool}"
    await run.call("setup-plan", "device_pool_setup", {"device_path": dev, "pool_name": pool})
    run.note("after-plan", vg=vg_exists(vg))
    await run.call("setup", "device_pool_setup",
                   {"device_path": dev, "pool_name": pool, "confirm": True})
    run.note("after-setup", vg=vg_exists(vg))
    await run.call("list", "device_pool_list", {})
    lease = await run.call("acquire", "device_pool_lease_acquire",
                           {"volumes": "test:64M,scratch:64M", "pool_name": pool})
    devices = (lease.get("structured") or {}).get("devices", [])
    lv = {d["role"]: d["lv"] for d in devices}
    await run.call("status", "device_pool_status", {"pool_name": pool})
    await run.call("grow", "device_pool_resize",
                   {"lv_name": lv.get("scratch", "?"), "new_size": "+32M", "pool_name": pool})
    await run.call("shrink-plan", "device_pool_resize",
                   {"lv_name": lv.get("scratch", "?"), "new_size": "-16M", "pool_name": pool})
    await run.call("shrink", "device_pool_resize",
                   {"lv_name": lv.get("scratch", "?"), "new_size": "-16M", "pool_name": pool,
                    "confirm": True})
    await run.call("snap-create", "device_pool_snapshot",
                   {"action": "create", "lv_name": lv.get("test", "?"),
                    "snapshot_name": "before", "size": "16M", "pool_name": pool})
    await run.call("snap-list", "device_pool_snapshot", {"action": "list", "pool_name": pool})
    await run.call("merge-plan", "device_pool_snapshot",
                   {"action": "merge", "snapshot_name": "before", "pool_name": pool})
    await run.call("merge", "device_pool_snapshot",
                   {"action": "merge", "snapshot_name": "before", "pool_name": pool,
                    "confirm": True})
    await run.call("snap-again", "device_pool_snapshot",
                   {"action": "create", "lv_name": lv.get("test", "?"),
                    "snapshot_name": "again", "size": "16M", "pool_name": pool})
    await run.call("release", "device_pool_lease_release",
                   {"session": lease.get("structured", {}).get("session", "?"),
                    "pool_name": pool})
    await run.call("status-after", "device_pool_status", {"pool_name": pool})
    await run.call("trim", "device_pool_trim", {"pool_name": pool})
    await run.call("teardown-plan", "device_pool_teardown", {"pool_name": pool})
    run.note("after-teardown-plan", vg=vg_exists(vg))
    await run.call("teardown", "device_pool_teardown",
                   {"pool_name": pool, "wipe_data": True, "confirm": True})
    run.note("after-teardown", vg=vg_exists(vg))


async def malformed(run, s):
    await run.call("wrong-type", "device_pool_setup", {"device_path": 42})
    await run.call("missing", "device_pool_resize", {"lv_name": "x"})
    await run.call("unknown-tool", "no_such_tool", {})
    await run.call("huge", "device_pool_status", {"pool_name": "p" * 200_000})
    await run.call("bad-enum", "device_pool_snapshot", {"action": "explode"})
    await run.call("dev-null", "device_pool_setup",
                   {"device_path": "/dev/null", "confirm": True})
    await run.call("regular-file", "device_pool_setup",
                   {"device_path": ARGS["small_file"], "pool_name": "tiny", "confirm": True})
    await run.call("bad-size", "device_pool_lease_acquire", {"volumes": "test:lots"})
    await run.call("vm-bad-timeout", "vm_module_test",
                   {"kernel_path": "/boot", "module_path": "/x.ko", "timeout": "soon"})
    await run.call("vm-kernel-dir", "fstests_vm_boot_and_run",
                   {"kernel_path": ARGS["empty_dir"], "fstests_path": "/nonexistent"})
    await run.call("still-serving", "device_pool_list", {})


async def owned(run, s):
    """A lease of this session; the session then ends (disconnect)."""
    await run.call("acquire", "device_pool_lease_acquire",
                   {"volumes": "test:32M", "pool_name": ARGS["pool"]})


async def killed(run, s):
    """A lease, then the server is killed with SIGKILL (no chance to release)."""
    l = await run.call("acquire", "device_pool_lease_acquire",
                       {"volumes": "test:32M", "pool_name": ARGS["pool"]})
    pid = l["structured"]["owner"]["pid"]
    run.note("server-pid", pid=pid)
    os.kill(pid, signal.SIGKILL)


async def cleanup(run, s):
    await run.call("cleanup", "device_pool_cleanup", {"pool_name": ARGS["pool"]})
    await run.call("status", "device_pool_status", {"pool_name": ARGS["pool"]})


async def vm(run, s):
    vm_args = {"kernel_path": ARGS["kernel"], "modules_path": ARGS["modules"],
               "volumes": "test:64M", "pool_name": ARGS["pool"], "timeout": 240,
               "command": "echo mcp-guest-sees $TEST_DEV; "
                          "printf devpool-mcp | dd of=$TEST_DEV bs=512 seek=8 conv=sync 2>/dev/null; "
                          "exit 3"}
    # Kept, so the guest's data can be read where the volume lies in the
    # image; then released (which discards it).
    r = await run.call("vm-run", "vm_run", dict(vm_args, keep_volumes=True))
    st = r.get("structured") or {}
    disks = st.get("disks") or []
    if disks:
        with open(ARGS["device"], "rb") as f:
            f.seek(disks[0]["extent"]["offset"] + 8 * 512)
            run.note("vm-data", data=f.read(10).decode("latin-1"))
    await run.call("vm-release", "device_pool_lease_release",
                   {"session": st.get("session", "?"), "pool_name": ARGS["pool"]})
    # Cancelled: the client gives up after a while (the SDK then sends
    # notifications/cancelled); the VM is killed and its volumes released.
    long = dict(vm_args, command="sleep 600", timeout=600)
    await run.call("vm-cancel", "vm_run", long, read_timeout_seconds=ARGS["cancel_after"])
    await asyncio.sleep(5)
    await run.call("status-after-cancel", "device_pool_status", {"pool_name": ARGS["pool"]})


async def suites(run, s):
    """vm_module_test, then fstests on leased volumes, then on image files
    against the first run as baseline (after 003's golden output is fixed)."""
    guest = {"kernel_path": ARGS["kernel"], "modules_path": ARGS["modules"],
             "pool_name": ARGS["pool"], "memory": "512M", "timeout": 300}
    await run.call("module", "vm_module_test",
                   dict(guest, module_path=ARGS["module"], cycles=2, volumes="test:16M"))
    first = await run.call("fstests-pool", "fstests_vm_boot_and_run",
                           dict(guest, fstests_path=ARGS["fstests"], fstype="ext4",
                                volumes="test:64M,scratch:64M"))
    with open(ARGS["baseline"], "w") as f:
        json.dump(first.get("structured") or {}, f)
    with open(os.path.join(ARGS["fstests"], "tests/generic/003.out"), "w") as f:
        f.write("QA output created by 003\nsize 3072\n")
    await run.call("fstests-files", "fstests_vm_boot_and_run",
                   dict(guest, fstests_path=ARGS["fstests"], use_device_pool=False,
                        tests=["generic/001", "generic/003"],
                        volumes="test:64M,scratch:64M", baseline_path=ARGS["baseline"]))
    await run.call("status-after", "device_pool_status", {"pool_name": ARGS["pool"]})


async def thin(run, s):
    """A thin snapshot of a leased thin volume, merged back (plan first)."""
    pool = ARGS["pool"]
    lease = await run.call("acquire", "device_pool_lease_acquire",
                           {"volumes": "t:64M", "pool_name": pool})
    lv = lease["structured"]["devices"][0]["lv"]
    await run.call("snap", "device_pool_snapshot",
                   {"action": "create", "lv_name": lv, "snapshot_name": "before",
                    "pool_name": pool})
    await run.call("merge-plan", "device_pool_snapshot",
                   {"action": "merge", "snapshot_name": "before", "pool_name": pool})
    await run.call("list-after-plan", "device_pool_snapshot",
                   {"action": "list", "pool_name": pool})
    await run.call("merge", "device_pool_snapshot",
                   {"action": "merge", "snapshot_name": "before", "pool_name": pool,
                    "confirm": True})
    await run.call("list-after", "device_pool_snapshot", {"action": "list", "pool_name": pool})
    await run.call("grow-pool", "device_pool_resize",
                   {"lv_name": "thinpool", "new_size": "+16M", "pool_name": pool})
    await run.call("shrink-pool", "device_pool_resize",
                   {"lv_name": "thinpool", "new_size": "-16M", "pool_name": pool,
                    "confirm": True})
    await run.call("release", "device_pool_lease_release",
                   {"session": lease["structured"]["session"], "pool_name": pool})


SCENARIOS = {"tools": tools, "lifecycle": lifecycle, "malformed": malformed,
             "owned": owned, "cleanup": cleanup, "vm": vm, "suites": suites,
             "thin": thin}


async def main():
    if SCENARIO == "killed":
        # The server dies under the client: the session's end raises.
        log = []
        try:
            async with stdio_client(server()) as (r, w):
                async with ClientSession(r, w) as s:
                    await s.initialize()
                    run = Run(s)
                    try:
                        await killed(run, s)
                    finally:
                        log = run.log
        except BaseException:
            pass
        print(json.dumps(log))
        return
    print(json.dumps(await session(SCENARIOS[SCENARIO])))


asyncio.run(main())
