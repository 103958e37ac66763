"""What the benchmark scripts share: the devpool binary, running commands,
waiting for a server's socket, and cleaning up a run."""
import os, shutil, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVPOOL = os.environ.get("DEVPOOL", os.path.join(ROOT, "target/release/devpool"))


def sh(args, env=None):
    """Run a command; its stdout, or exit with its stderr."""
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{r.stderr}")
    return r.stdout


def wait_socket(path, proc, limit=10):
    """Wait for a server's Unix socket (exit if the server died or never made it)."""
    t = time.time()
    while not os.path.exists(path):
        if proc.poll() is not None or time.time() - t > limit:
            sys.exit(f"server for {path} did not start")
        time.sleep(0.02)


def finish(servers, pools, env, owner, work):
    """Stop the run's servers, tear its pools down, end the lease owner,
    remove the work directory."""
    for s in servers:
        s.stop()
    for pool in pools:
        subprocess.run([DEVPOOL, "--pool", pool, "pool", "teardown", pool, "--force",
                        "--yes"], env=env, capture_output=True)
    owner.kill()
    owner.wait()
    shutil.rmtree(work, ignore_errors=True)
