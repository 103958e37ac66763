//! Pools and leases through the real binary, real loop devices and LVM2:
//! lifecycle, data placement, orphans (dead PID, PID reuse, reboot), kept
//! leases, `devpool run` (environment, exit status, SIGTERM, kill -9).

mod common;
use common::*;
use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn pool_cmd(lab: &Lab, pool: &str, args: &[&str]) -> std::process::Output {
    let mut a = vec!["--pool", pool];
    a.extend_from_slice(args);
    lab.devpool(&[], &a)
}

fn ok(o: std::process::Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json_of(o: std::process::Output, what: &str) -> Value {
    serde_json::from_str(&ok(o, what)).expect("JSON")
}

fn setup_pool(lab: &mut Lab, name: &str, mib: u64) -> PathBuf {
    let dev = lab.loop_dev(&format!("{name}.img"), mib);
    let d = dev.display().to_string();
    ok(
        lab.devpool(&[], &["pool", "setup", &d, "--name", name, "--yes"]),
        "pool setup",
    );
    dev
}

/// A process to own leases; killed (by its PID) when dropped.
struct Sleeper(Child);
impl Sleeper {
    fn new() -> Sleeper {
        Sleeper(
            Command::new("sleep")
                .arg("600")
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn sleep"),
        )
    }
    fn pid(&self) -> String {
        self.0.id().to_string()
    }
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
    /// Kill it without collecting it: it stays a zombie (in /proc, with its
    /// start time) until dropped.
    fn kill_leaving_a_zombie(&mut self) {
        let _ = self.0.kill();
        let stat = format!("/proc/{}/stat", self.0.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read_to_string(&stat).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        }) {
            assert!(std::time::Instant::now() < deadline, "no zombie: {stat}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
impl Drop for Sleeper {
    fn drop(&mut self) {
        self.kill();
    }
}

fn acquire(lab: &Lab, pool: &str, volumes: &str, owner: &str, extra: &[&str]) -> Value {
    let mut a = vec![
        "--json",
        "lease",
        "acquire",
        "--volumes",
        volumes,
        "--owner-pid",
        owner,
    ];
    a.extend_from_slice(extra);
    json_of(pool_cmd(lab, pool, &a), "lease acquire")
}

fn free_bytes(lab: &Lab, pool: &str) -> u64 {
    num(&json_of(pool_cmd(lab, pool, &["--json", "pool", "status"]), "status")["free_bytes"])
}

fn lease_count(lab: &Lab, pool: &str) -> usize {
    json_of(
        pool_cmd(lab, pool, &["--json", "lease", "list"]),
        "lease list",
    )
    .as_array()
    .map(|a| a.len())
    .unwrap_or(0)
}

/// devpool-marked loop devices still attached over `backing`.
fn loops_over(backing: &Path) -> Vec<String> {
    let out = Command::new("losetup")
        .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
        .output()
        .expect("losetup");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(&backing.display().to_string()))
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn lease_lifecycle_places_data_where_lvm2_says_and_cleans_up_dead_owners() {
    if skip_unless_real("lease_lifecycle") {
        return;
    }
    let mut lab = Lab::new();
    let pool = format!("t{}", std::process::id());
    let dev = setup_pool(&mut lab, &pool, 512);
    let vg = format!("devpool-{pool}");
    let start_free = free_bytes(&lab, &pool);
    let mut owner = Sleeper::new();
    let a = acquire(&lab, &pool, "test:40M,scratch:24M", &owner.pid(), &[]);
    let session = a["session"].as_str().unwrap().to_string();
    let devices = a["devices"].as_array().unwrap().clone();
    assert_eq!(devices.len(), 2);

    // LVM2 sees the volumes with their lease tags, and the VG passes vgck.
    let (good, why) = vgck(&[&dev], &vg);
    assert!(good, "vgck: {why}");
    // LVM2 never activates a pool by itself (at boot, or when udev sees
    // its PVs): dm-snapshot and dm-thin would then work behind devpool.
    let vgs = lvm_report(&[&dev], "vgs", "vg_name,autoactivation");
    assert_eq!(vgs[0]["vg_autoactivation"], "", "{vgs:?}");
    let lvs = lvm_report(&[&dev], "lvs", "lv_name,lv_size,lv_tags,seg_pe_ranges");
    let pe_start = num(&lvm_report(&[&dev], "pvs", "pe_start")[0]["pe_start"]);
    for d in &devices {
        let lv = d["lv"].as_str().unwrap();
        let row = lvs
            .iter()
            .find(|r| r["lv_name"] == lv)
            .expect("LVM2 lists the LV");
        let tags = row["lv_tags"].as_str().unwrap();
        assert!(tags.contains(&format!("devpool.lease={session}")), "{tags}");
        assert!(
            tags.contains(&format!("devpool.pid={}", owner.pid())),
            "{tags}"
        );
        // Write through the loop device; find the bytes where LVM2 maps the LV.
        let node = d["device"].as_str().unwrap();
        let sentinel = format!("devpool sentinel for {lv}");
        let f = std::fs::OpenOptions::new().write(true).open(node).unwrap();
        f.write_all_at(sentinel.as_bytes(), 4096).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let ranges = row["seg_pe_ranges"].as_str().unwrap();
        let first_pe: u64 = ranges
            .split(':')
            .nth(1)
            .and_then(|r| r.split('-').next())
            .and_then(|n| n.parse().ok())
            .expect("pe range");
        let img = std::fs::File::open(&lab.loops[0].image).unwrap();
        let mut buf = vec![0u8; sentinel.len()];
        img.read_exact_at(&mut buf, pe_start + first_pe * (4 << 20) + 4096)
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&buf), sentinel, "{lv} at {ranges}");
        assert_eq!(num(&d["size_bytes"]), num(&row["lv_size"]));
    }

    // Alive owner: cleanup keeps the lease.
    let report = json_of(pool_cmd(&lab, &pool, &["--json", "cleanup"]), "cleanup");
    assert_eq!(report["removed"].as_array().unwrap().len(), 0);
    assert_eq!(lease_count(&lab, &pool), 1);

    // Dead owner: a dry run shows the plan and touches nothing, its loop
    // devices included; cleanup detaches and removes it, and says why.
    owner.kill();
    let attached = loops_over(&dev);
    assert!(!attached.is_empty());
    let o = pool_cmd(&lab, &pool, &["--dry-run", "cleanup"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let plan = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        plan.contains("lv remove") && plan.contains("nothing was changed"),
        "{plan}"
    );
    assert_eq!(
        loops_over(&dev),
        attached,
        "a dry run detached loop devices"
    );
    assert_eq!(lease_count(&lab, &pool), 1);
    let report = json_of(pool_cmd(&lab, &pool, &["--json", "cleanup"]), "cleanup");
    let removed = report["removed"].as_array().unwrap();
    assert_eq!(removed.len(), 1);
    assert!(
        removed[0]["liveness"]["reason"]
            .as_str()
            .unwrap()
            .contains("no longer exists")
    );
    assert_eq!(lease_count(&lab, &pool), 0);
    assert_eq!(free_bytes(&lab, &pool), start_free);
    for d in &devices {
        let node = d["device"]
            .as_str()
            .unwrap()
            .trim_start_matches("/dev/")
            .to_string();
        // The node may already serve another test's file: only a loop
        // device still over this pool's device counts.
        let backing = std::fs::read_to_string(format!("/sys/block/{node}/loop/backing_file"));
        assert!(
            backing.map_or(true, |b| b.trim() != dev.display().to_string()),
            "{node} is still attached to {}",
            dev.display()
        );
    }
    let (good, why) = vgck(&[&dev], &vg);
    assert!(good, "vgck: {why}");

    // Release of an unknown session is a clear error.
    let e = String::from_utf8_lossy(&pool_cmd(&lab, &pool, &["lease", "release", "nope"]).stderr)
        .to_string();
    assert!(e.contains("no lease 'nope'"), "{e}");
    // A pool LVM2 may autoactivate (set up by an older devpool, or switched
    // on with LVM2's own tool) is reported, with the command that fixes it.
    let health = || {
        json_of(
            pool_cmd(&lab, &pool, &["--json", "pool", "status"]),
            "status",
        )["health"]
            .to_string()
    };
    assert!(!health().contains("setautoactivation"), "{}", health());
    lvm_ok(&[&dev], &["vgchange", "--setautoactivation", "y", &vg]);
    let h = health();
    assert!(
        h.contains(&format!("vgchange --setautoactivation n {vg}")),
        "{h}"
    );
    ok(
        lab.devpool(&[], &["pool", "teardown", &pool, "--yes"]),
        "teardown",
    );
}

#[test]
fn orphans_are_found_through_pid_reuse_and_reboots_but_kept_and_live_leases_stay() {
    if skip_unless_real("orphans") {
        return;
    }
    let mut lab = Lab::new();
    let pool = format!("o{}", std::process::id());
    let dev = setup_pool(&mut lab, &pool, 256);
    let vg = format!("devpool-{pool}");
    let start_free = free_bytes(&lab, &pool);
    let owner = Sleeper::new();
    let live = acquire(&lab, &pool, "test:8M", &owner.pid(), &[]);
    let reused = acquire(&lab, &pool, "test:8M", &owner.pid(), &[]);
    let rebooted = acquire(&lab, &pool, "test:8M", &owner.pid(), &[]);
    let mut dead_owner = Sleeper::new();
    let kept = acquire(&lab, &pool, "test:8M", &dead_owner.pid(), &["--keep"]);
    dead_owner.kill();
    // An owner that exited while its parent never collected it: still listed
    // in /proc with its PID and start time, but gone.
    let mut zombie_owner = Sleeper::new();
    let zombied = acquire(&lab, &pool, "test:8M", &zombie_owner.pid(), &[]);
    zombie_owner.kill_leaving_a_zombie();
    let refused = pool_cmd(
        &lab,
        &pool,
        &[
            "lease",
            "acquire",
            "--volumes",
            "test:8M",
            "--owner-pid",
            &zombie_owner.pid(),
        ],
    );
    assert!(!refused.status.success(), "a zombie was taken as an owner");
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains(&format!("--owner-pid {}: PID", zombie_owner.pid()))
            && why.contains("has exited"),
        "{why}"
    );
    let lv_of = |v: &Value| format!("{vg}/{}", v["devices"][0]["lv"].as_str().unwrap());
    let start = devpool_pool::owner::start_ticks(owner.0.id()).unwrap();

    // PID reuse: same PID, another start time (retagged through devpool itself).
    lab.dp(
        &[&dev],
        &[
            "lv",
            "tag",
            &lv_of(&reused),
            "--remove",
            &format!("devpool.start={start}"),
            "--add",
            &format!("devpool.start={}", start + 1),
        ],
    );
    // A reboot: another boot id.
    let boot = devpool_pool::owner::boot_id();
    lab.dp(
        &[&dev],
        &[
            "lv",
            "tag",
            &lv_of(&rebooted),
            "--remove",
            &format!("devpool.boot={boot}"),
            "--add",
            "devpool.boot=00000000-0000-0000-0000-000000000000",
        ],
    );
    let report = json_of(pool_cmd(&lab, &pool, &["--json", "cleanup"]), "cleanup");
    let removed: Vec<(&str, &str)> = report["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["session"].as_str().unwrap(),
                l["liveness"]["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(removed.len(), 3, "{removed:?}");
    assert!(
        removed
            .iter()
            .any(|(s, r)| *s == zombied["session"] && r.contains("has exited")),
        "{removed:?}"
    );
    assert!(
        removed
            .iter()
            .any(|(s, r)| *s == reused["session"] && r.contains("another process"))
    );
    assert!(
        removed
            .iter()
            .any(|(s, r)| *s == rebooted["session"] && r.contains("another boot"))
    );
    let sessions: Vec<String> =
        json_of(pool_cmd(&lab, &pool, &["--json", "lease", "list"]), "list")
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["session"].as_str().unwrap().to_string())
            .collect();
    assert!(sessions.contains(&live["session"].as_str().unwrap().to_string()));
    assert!(sessions.contains(&kept["session"].as_str().unwrap().to_string()));

    // Kept: never reaped automatically, removed by --kept once its owner is dead.
    let report = json_of(
        pool_cmd(&lab, &pool, &["--json", "cleanup", "--kept"]),
        "cleanup --kept",
    );
    assert_eq!(report["removed"].as_array().unwrap().len(), 1);
    assert_eq!(report["removed"][0]["session"], kept["session"]);

    // A dry run of a forced teardown shows the VG removal with what comes
    // before (the live lease's devices detached) and after it, and changes
    // nothing.
    let plan = json_of(
        lab.devpool(
            &[],
            &["--json", "pool", "teardown", &pool, "--force", "--dry-run"],
        ),
        "teardown --dry-run",
    );
    assert_eq!(plan["dry_run"], true, "{plan}");
    let notes = plan["notes"].to_string();
    let live_dev = live["devices"][0]["device"].as_str().unwrap();
    assert!(notes.contains(&format!("detach {live_dev} ")), "{notes}");
    assert!(notes.contains("remove the PV label of"), "{notes}");
    assert!(notes.contains("no --wipe"), "{notes}");
    assert!(Path::new(live_dev).exists());
    assert_eq!(lease_count(&lab, &pool), 1);
    let (good, why) = vgck(&[&dev], &vg);
    assert!(good, "vgck after the dry run: {why}");

    // Teardown refuses while the live lease exists; --force removes it.
    let e = String::from_utf8_lossy(
        &lab.devpool(&[], &["pool", "teardown", &pool, "--yes"])
            .stderr,
    )
    .to_string();
    assert!(e.contains("live or kept lease"), "{e}");
    ok(
        pool_cmd(
            &lab,
            &pool,
            &["lease", "release", live["session"].as_str().unwrap()],
        ),
        "release",
    );
    assert_eq!(free_bytes(&lab, &pool), start_free);
    ok(
        lab.devpool(&[], &["pool", "teardown", &pool, "--yes"]),
        "teardown",
    );
    let list = lab.dp_json(&[], &["pool", "list"]);
    assert!(
        !list
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["pool"] == pool.as_str())
    );
}

/// A test run that leaves a program behind with its TEST_DEV open (a
/// background `dd`, a forgotten QEMU): `run` still returns the command's
/// status, says why the release was refused (naming the program) and that
/// cleanup reaps the lease, keeps it meanwhile, and cleanup reaps it once
/// the program is gone.
#[test]
fn run_keeps_the_lease_while_a_program_it_left_behind_has_a_volume_open() {
    if skip_unless_real("run_left_behind") {
        return;
    }
    let mut lab = Lab::new();
    let dev = setup_pool(&mut lab, "left", 64);
    let pidfile = lab.path("left.pid");
    // The command opens TEST_DEV, leaves a sleep with it open (its output
    // elsewhere, so that run's pipes close) and exits 3.
    let script = format!(
        "exec 3<$TEST_DEV; sleep 60 >/dev/null 2>&1 & echo $! > {}; exit 3",
        pidfile.display()
    );
    let o = pool_cmd(
        &lab,
        "left",
        &["run", "--volumes", "test:16M", "--", "sh", "-c", &script],
    );
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    struct Kill(i32);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: signalling the sleep this test's command started, by PID.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
    let left = Kill(pid);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("release refused")
            && err.contains(&format!("is open in process {pid} (sleep)"))
            && err.contains("'devpool cleanup' will reap it"),
        "{err}"
    );
    assert_eq!(lease_count(&lab, "left"), 1, "the lease stays");
    assert_eq!(loops_over(&dev).len(), 1, "its loop device stays");
    let report = json_of(pool_cmd(&lab, "left", &["--json", "cleanup"]), "cleanup");
    assert!(
        report["kept"]
            .to_string()
            .contains(&format!("is open in process {pid}")),
        "{report}"
    );
    drop(left);
    // Reaped (the sleep may take a moment to go).
    let t0 = std::time::Instant::now();
    while lease_count(&lab, "left") > 0 && t0.elapsed().as_secs() < 10 {
        pool_cmd(&lab, "left", &["cleanup"]);
    }
    assert_eq!(lease_count(&lab, "left"), 0);
    assert!(loops_over(&dev).is_empty());
}

#[test]
fn run_exports_fstests_variables_returns_the_status_and_releases_on_sigterm() {
    if skip_unless_real("run") {
        return;
    }
    let mut lab = Lab::new();
    let pool = format!("r{}", std::process::id());
    let dev = setup_pool(&mut lab, &pool, 256);
    let start_free = free_bytes(&lab, &pool);
    let envfile = lab.path("env.txt");
    let script = format!(
        "echo TEST_DEV=$TEST_DEV > {0}; echo SCRATCH_DEV_POOL=$SCRATCH_DEV_POOL >> {0}; \
         echo SCRATCH_DEV=$SCRATCH_DEV >> {0}; echo LOGWRITES_DEV=$LOGWRITES_DEV >> {0}; \
         echo DEVPOOL_POOL2=$DEVPOOL_POOL2 >> {0}; mkfs.ext4 -q -F $TEST_DEV || exit 9; exit 7",
        envfile.display()
    );
    let o = pool_cmd(
        &lab,
        &pool,
        &[
            "run",
            "--volumes",
            "test:16M,pool1:8M,pool2:8M,logwrites:8M",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let env = std::fs::read_to_string(&envfile).unwrap();
    let get = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or("")
            .to_string()
    };
    assert!(get("TEST_DEV").starts_with("/dev/loop"), "{env}");
    assert_eq!(get("SCRATCH_DEV_POOL").split(' ').count(), 2, "{env}");
    assert_eq!(get("SCRATCH_DEV"), "", "never both: {env}");
    assert!(get("LOGWRITES_DEV").starts_with("/dev/loop"), "{env}");
    assert_eq!(
        get("DEVPOOL_POOL2"),
        get("SCRATCH_DEV_POOL").split(' ').nth(1).unwrap()
    );
    assert_eq!(lease_count(&lab, &pool), 0);
    assert_eq!(free_bytes(&lab, &pool), start_free);

    // SIGTERM: the command is stopped, the lease released, status 128+15.
    let mut child = devpool_command(&lab.state_dir())
        .args([
            "--pool",
            &pool,
            "run",
            "--volumes",
            "test:8M",
            "--",
            "sleep",
            "60",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while lease_count(&lab, &pool) == 0 && t0.elapsed().as_secs() < 20 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(lease_count(&lab, &pool), 1);
    std::thread::sleep(std::time::Duration::from_millis(200));
    // SAFETY: signalling our own child by its PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(143));
    assert_eq!(lease_count(&lab, &pool), 0);
    assert!(
        loops_over(&dev).is_empty(),
        "loop devices left over {}",
        dev.display()
    );
    ok(
        lab.devpool(&[], &["pool", "teardown", &pool, "--yes"]),
        "teardown",
    );
}

#[test]
fn kill_9_at_random_moments_then_cleanup_restores_the_pool() {
    if skip_unless_real("kill_9") {
        return;
    }
    let mut lab = Lab::new();
    let pool = format!("k{}", std::process::id());
    let dev = setup_pool(&mut lab, &pool, 512);
    let start_free = free_bytes(&lab, &pool);
    let owner = Sleeper::new();
    let live = acquire(&lab, &pool, "test:8M", &owner.pid(), &[]);
    let mut gone = Sleeper::new();
    let kept = acquire(&lab, &pool, "test:8M", &gone.pid(), &["--keep"]);
    gone.kill();
    let with_two = free_bytes(&lab, &pool);
    // Deterministic "random" delays covering acquire, the command and release.
    let mut seed = 0x2545_f491_4f6c_dd1du64 ^ u64::from(std::process::id());
    for round in 0..8 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = seed % 400;
        let mut child = devpool_command(&lab.state_dir())
            .args([
                "--pool",
                &pool,
                "run",
                "--profile",
                "fstests",
                "--size",
                "8M",
                "--",
                "sleep",
                "0.1",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay));
        let _ = child.kill();
        let _ = child.wait();
        let report = json_of(pool_cmd(&lab, &pool, &["--json", "cleanup"]), "cleanup");
        for l in report["removed"].as_array().unwrap() {
            assert_ne!(
                l["session"], live["session"],
                "round {round}: removed the live lease"
            );
            assert_ne!(
                l["session"], kept["session"],
                "round {round}: removed the kept lease"
            );
        }
        assert_eq!(
            free_bytes(&lab, &pool),
            with_two,
            "round {round} (kill after {delay} ms)"
        );
    }
    assert!(lease_count(&lab, &pool) == 2);
    ok(
        pool_cmd(
            &lab,
            &pool,
            &["lease", "release", live["session"].as_str().unwrap()],
        ),
        "release",
    );
    ok(
        pool_cmd(&lab, &pool, &["cleanup", "--kept"]),
        "cleanup --kept",
    );
    assert_eq!(free_bytes(&lab, &pool), start_free);
    // Only the sleeper's loop devices were ever ours; none is left.
    assert!(
        loops_over(&dev).is_empty(),
        "loop devices left over {}",
        dev.display()
    );
    ok(
        lab.devpool(&[], &["pool", "teardown", &pool, "--yes"]),
        "teardown",
    );
}

#[test]
fn newcomer_walk_on_the_embedded_default_pool_leaves_nothing_behind() {
    if skip_unless_real("newcomer_walk") {
        return;
    }
    let lab = Lab::new();
    let o = lab.devpool_env(
        &[],
        &[
            "run",
            "--volumes",
            "test:1G,scratch:1G",
            "--",
            "sh",
            "-c",
            "mkfs.ext4 -q $TEST_DEV && mkfs.ext4 -q $SCRATCH_DEV && test -b $TEST_DEV",
        ],
        &[("DEVPOOL_POOL", ""), ("KERNELDEV_DEVICE_POOL", "")],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = lab.state_dir().join("images/default.img");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 64 << 30);
    let st = json_of(
        lab.devpool(&[], &["--pool", "default", "--json", "pool", "status"]),
        "status",
    );
    assert_eq!(st["volumes"], 0);
    assert_eq!(st["leases"].as_array().unwrap().len(), 0);
    assert!(loops_over(&img).is_empty());
    let plan = json_of(
        lab.devpool(&[], &["--json", "pool", "teardown", "default", "--dry-run"]),
        "teardown --dry-run",
    );
    assert!(
        plan["notes"].to_string().contains("delete the image file"),
        "{plan}"
    );
    assert!(img.exists(), "a dry run deletes nothing");
    ok(
        lab.devpool(&[], &["pool", "teardown", "default", "--yes"]),
        "teardown",
    );
    assert!(!img.exists(), "teardown removes the image devpool made");
}

/// Write `len` bytes of `byte` through a leased volume's loop device.
fn fill(dev: &str, byte: u8, len: usize) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dev)
        .expect("open volume");
    f.write_all_at(&vec![byte; len], 0).expect("write volume");
    f.sync_all().expect("sync volume");
}

#[test]
fn released_and_shrunk_volumes_give_their_space_back_to_the_filesystem_under_the_image() {
    if skip_unless_real(
        "released_and_shrunk_volumes_give_their_space_back_to_the_filesystem_under_the_image",
    ) {
        return;
    }
    let lab = Lab::new();
    let img = lab.image_pool("space.img", "space", "1G", &[]);
    let owner = Sleeper::new();
    let gone = acquire(&lab, "space", "big:64M,small:16M", &owner.pid(), &[]);
    let stays = acquire(&lab, "space", "keep:16M", &owner.pid(), &[]);
    let base = allocated(&img);
    fill(&device_of(&gone, "big"), 0xb1, 48 << 20);
    fill(&device_of(&gone, "small"), 0xb2, 16 << 20);
    let keep_dev = device_of(&stays, "keep");
    fill(&keep_dev, 0x5e, 16 << 20);
    let written = allocated(&img);
    assert!(
        written >= base + (79 << 20),
        "the writes took space: {base} -> {written}"
    );

    // The plan says what it gives back before anything happens.
    let session = gone["session"].as_str().unwrap();
    let plan = ok(
        pool_cmd(&lab, "space", &["lease", "release", session, "--dry-run"]),
        "release --dry-run",
    );
    assert!(
        plan.contains("discard") && plan.contains("-big no longer uses"),
        "{plan}"
    );
    assert_eq!(allocated(&img), written, "a dry run changes nothing");
    assert_eq!(lease_count(&lab, "space"), 2, "the lease is still there");
    assert_eq!(loops_over(&img).len(), 3, "its loop devices too");
    let plan = ok(
        pool_cmd(
            &lab,
            "space",
            &[
                "lease",
                "acquire",
                "--volumes",
                "more:8M",
                "--owner-pid",
                &owner.pid(),
                "--dry-run",
            ],
        ),
        "acquire --dry-run",
    );
    assert!(
        plan.contains("lv create") && plan.contains("-more"),
        "{plan}"
    );
    assert_eq!(
        lease_count(&lab, "space"),
        2,
        "a dry-run acquire takes nothing"
    );
    assert_eq!(loops_over(&img).len(), 3);

    ok(
        pool_cmd(&lab, "space", &["lease", "release", session]),
        "release",
    );
    let after = allocated(&img);
    assert!(
        after + (64 << 20) <= written,
        "releasing 64 MiB of written volumes gave it back: {written} -> {after}"
    );
    // The lease that stays keeps every byte, and LVM2 is content.
    let mut back = vec![0u8; 16 << 20];
    std::fs::File::open(&keep_dev)
        .unwrap()
        .read_exact_at(&mut back, 0)
        .unwrap();
    assert!(back.iter().all(|&b| b == 0x5e), "the other lease's data");
    let vg = "devpool-space";
    {
        // LVM2 reads PVs on block devices only.
        let whole = Loop::attach(&img);
        let (good, out) = vgck(&[&whole.dev], vg);
        assert!(good, "vgck after the release:\n{out}");
    }
    let journal = std::fs::read_to_string(lab.state_dir().join("journal.jsonl")).unwrap();
    let last: Value = serde_json::from_str(journal.lines().last().unwrap()).unwrap();
    let discards: Vec<&Value> = last["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["step"] == "discard_range")
        .collect();
    assert_eq!(discards.len(), 2, "one per released volume: {last}");
    let commit_at = last["steps"]
        .as_array()
        .unwrap()
        .iter()
        .position(|s| s["step"] == "commit_metadata")
        .unwrap();
    assert_eq!(commit_at, 2, "the discards run before the commit: {last}");

    // Shrinking an LV gives back its tail only.
    ok(
        pool_cmd(
            &lab,
            "space",
            &["lease", "release", stays["session"].as_str().unwrap()],
        ),
        "release the second lease",
    );
    let lv = format!("{vg}/tail");
    ok(
        lab.devpool(&[&img], &["lv", "create", &lv, "--size", "32M"]),
        "lv create",
    );
    let lvs = lab.dp_json(&[&img], &["lv", "list", vg]);
    let start = num(&lvs["lvs"][0]["segments"][0]["areas"][0]["offset"]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    f.write_all_at(&vec![0x7au8; 32 << 20], start).unwrap();
    f.sync_all().unwrap();
    let full = allocated(&img);
    ok(
        lab.devpool(&[&img], &["lv", "resize", &lv, "--size", "8M", "--yes"]),
        "lv resize down",
    );
    assert!(
        allocated(&img) + (24 << 20) <= full,
        "the 24 MiB cut off went back"
    );
    let mut head = vec![0u8; 8 << 20];
    f.read_exact_at(&mut head, start).unwrap();
    assert!(head.iter().all(|&b| b == 0x7a), "the part kept is intact");
}

/// A small tmpfs mounted in the lab, unmounted (lazily, so a failed test
/// that left loop devices on it cannot keep it) when dropped.
struct SmallFs(PathBuf);
impl SmallFs {
    fn mount(at: PathBuf, mib: u64) -> SmallFs {
        std::fs::create_dir_all(&at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&at)
            .status()
            .expect("mount");
        assert!(st.success(), "mount tmpfs on {}", at.display());
        SmallFs(at)
    }
    fn free(&self) -> u64 {
        let out = Command::new("stat")
            .args(["-f", "-c", "%a %S"])
            .arg(&self.0)
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&out.stdout);
        let v: Vec<u64> = s.split_whitespace().map(|x| x.parse().unwrap()).collect();
        v[0] * v[1]
    }
}
impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_pool_image_on_a_filling_filesystem_is_reported_and_released_volumes_make_room() {
    if skip_unless_real(
        "a_pool_image_on_a_filling_filesystem_is_reported_and_released_volumes_make_room",
    ) {
        return;
    }
    let lab = Lab::new();
    let fs = SmallFs::mount(lab.path("small"), 48);
    let img = fs.0.join("pool.img");
    let d = img.display().to_string();
    let setup = ok(
        lab.devpool(
            &[],
            &[
                "pool",
                "setup",
                &d,
                "--name",
                "tight",
                "--image-size",
                "1G",
                "--yes",
            ],
        ),
        "pool setup",
    );
    assert!(
        setup.contains("may grow to 1.00 GiB, but its filesystem has"),
        "setup says the image can outgrow its filesystem:\n{setup}"
    );
    let owner = Sleeper::new();
    let first = acquire(&lab, "tight", "big:64M", &owner.pid(), &[]);
    // Fill the filesystem through the volume: the writes past its end fail.
    let dev = device_of(&first, "big");
    let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
    let chunk = vec![0xabu8; 1 << 20];
    let mut failed = None;
    for i in 0..64u64 {
        if let Err(e) = f.write_all_at(&chunk, i << 20).and_then(|()| f.sync_data()) {
            failed = Some(e);
            break;
        }
    }
    drop(f);
    assert!(failed.is_some(), "64 MiB cannot fit in 48");
    assert!(fs.free() < 1 << 20, "the filesystem is full");

    let status = json_of(
        pool_cmd(&lab, "tight", &["--json", "pool", "status"]),
        "status",
    );
    let image = &status["images"][0];
    assert_eq!(image["path"], d.as_str());
    assert!(num(&image["allocated_bytes"]) > 40 << 20, "{image}");
    assert!(num(&image["host_free_bytes"]) < 1 << 20, "{image}");
    let health = status["health"].to_string();
    assert!(
        health.contains("ENOSPC") && health.contains(&d),
        "pool status warns: {health}"
    );
    let text = ok(pool_cmd(&lab, "tight", &["pool", "status"]), "status");
    assert!(text.contains(&format!("image    {d}: ")), "{text}");

    // Releasing the lease gives its space back: the next one can write.
    ok(
        pool_cmd(
            &lab,
            "tight",
            &["lease", "release", first["session"].as_str().unwrap()],
        ),
        "release",
    );
    assert!(
        fs.free() > 40 << 20,
        "the release freed the space: {}",
        fs.free()
    );
    let status = json_of(
        pool_cmd(&lab, "tight", &["--json", "pool", "status"]),
        "status",
    );
    assert!(
        num(&status["images"][0]["host_free_bytes"]) > 40 << 20,
        "{status}"
    );
    let second = acquire(&lab, "tight", "next:24M", &owner.pid(), &[]);
    let dev = device_of(&second, "next");
    fill(&dev, 0xcd, 24 << 20);
    let mut back = vec![0u8; 24 << 20];
    std::fs::File::open(&dev)
        .unwrap()
        .read_exact_at(&mut back, 0)
        .unwrap();
    assert!(back.iter().all(|&b| b == 0xcd));
    ok(
        pool_cmd(
            &lab,
            "tight",
            &["lease", "release", second["session"].as_str().unwrap()],
        ),
        "release",
    );
    ok(
        pool_cmd(&lab, "tight", &["pool", "teardown", "tight", "--yes"]),
        "teardown",
    );
}

#[test]
fn pool_trim_gives_back_the_space_of_volumes_lvm2_removed() {
    if skip_unless_real("pool_trim_gives_back_the_space_of_volumes_lvm2_removed") {
        return;
    }
    let lab = Lab::new();
    let img = lab.image_pool("trim.img", "trim", "512M", &[]);
    let owner = Sleeper::new();
    let lease = acquire(&lab, "trim", "keep:16M", &owner.pid(), &[]);
    let keep = device_of(&lease, "keep");
    fill(&keep, 0x4b, 16 << 20);
    // A volume made by hand, written, then removed by LVM2 (which
    // discards nothing by default): its data stays in the image.
    let vg = "devpool-trim";
    let lv = format!("{vg}/byhand");
    ok(
        lab.devpool(&[&img], &["lv", "create", &lv, "--size", "32M"]),
        "lv create",
    );
    let lvs = lab.dp_json(&[&img], &["lv", "list", vg]);
    let byhand = lvs["lvs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["lv_name"] == "byhand")
        .unwrap();
    let at = num(&byhand["segments"][0]["areas"][0]["offset"]);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&vec![0x42u8; 32 << 20], at).unwrap();
    f.sync_all().unwrap();
    {
        let whole = Loop::attach(&img);
        lvm_ok(&[&whole.dev], &["lvremove", "-y", &lv]);
    }
    let before = allocated(&img);

    let plan = ok(
        pool_cmd(&lab, "trim", &["pool", "trim", "--dry-run"]),
        "trim --dry-run",
    );
    assert!(
        plan.contains("vg trim devpool-trim") && plan.contains("discard"),
        "{plan}"
    );
    assert_eq!(allocated(&img), before, "a dry run punches nothing");

    let r = json_of(pool_cmd(&lab, "trim", &["--json", "pool", "trim"]), "trim");
    assert!(num(&r["discarded_bytes"]) >= 32 << 20, "{r}");
    assert!(
        allocated(&img) + (32 << 20) <= before,
        "the 32 MiB LVM2 left went back: {before} -> {}",
        allocated(&img)
    );
    assert_eq!(num(&r["images"][0]["allocated_bytes"]), allocated(&img));
    // The leased volume keeps its data; the VG is untouched.
    let mut back = vec![0u8; 16 << 20];
    std::fs::File::open(&keep)
        .unwrap()
        .read_exact_at(&mut back, 0)
        .unwrap();
    assert!(back.iter().all(|&b| b == 0x4b), "the leased volume's data");
    let whole = Loop::attach(&img);
    let (good, out) = vgck(&[&whole.dev], vg);
    assert!(good, "{out}");
}

/// Extents under a live file system or writer never go to the next lease:
/// while a lease's volume is mounted, held exclusively by a program (as a
/// mount in another mount namespace holds it) or merely open in one, its
/// release is refused naming the mount and the processes, an orphan cleanup
/// keeps the lease and says why, and teardown is refused; unmounted and let
/// go, the cleanup reaps it.
#[test]
fn volumes_still_mounted_or_held_are_not_released_reaped_or_torn_down() {
    if skip_unless_real("in_use_release") {
        return;
    }
    let mut lab = Lab::new();
    let pool_dev = setup_pool(&mut lab, "inuse", 128);
    let mut owner = Sleeper::new();
    let lease = acquire(
        &lab,
        "inuse",
        "test:32M,scratch:16M,open:16M",
        &owner.pid(),
        &[],
    );
    let session = lease["session"].as_str().unwrap().to_string();
    let (test, scratch) = (device_of(&lease, "test"), device_of(&lease, "scratch"));
    let open = device_of(&lease, "open");
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", &test])
        .status()
        .unwrap();
    assert!(mkfs.success());
    let mnt = lab.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount").arg(&test).arg(&mnt).status().unwrap();
    assert!(mounted.success());
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let mut unmount = Some(Unmount(mnt.clone()));
    // The scratch volume held exclusively by another program, and the
    // third one merely open in another (as a dd or a QEMU has it): no
    // exclusive-open probe sees that one.
    let holder = DeviceHolder::exclusive(&scratch);
    let opener = DeviceHolder::open(&open);

    let o = pool_cmd(&lab, "inuse", &["lease", "release", &session]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "released under a mount: {err}");
    assert!(
        err.contains("release refused")
            && err.contains(&format!("is mounted at {}", mnt.display()))
            && err.contains(&format!(
                "{scratch} is open in process {} (python3)",
                holder.pid()
            )),
        "{err}"
    );
    assert_eq!(lease_count(&lab, "inuse"), 1, "the lease stays");
    let bound = |d: &str| {
        std::fs::read_to_string(format!(
            "/sys/block/{}/loop/offset",
            d.trim_start_matches("/dev/")
        ))
        .is_ok()
    };
    assert!(
        bound(&test) && bound(&scratch) && bound(&open),
        "its loop devices stay"
    );

    // The owner dies: cleanup keeps the lease, and says why.
    owner.kill();
    let report = json_of(pool_cmd(&lab, "inuse", &["--json", "cleanup"]), "cleanup");
    assert!(report["removed"].as_array().unwrap().is_empty(), "{report}");
    let kept = report["kept"].to_string();
    assert!(
        kept.contains(&session) && kept.contains("still in use") && kept.contains("is mounted at"),
        "{report}"
    );
    assert_eq!(lease_count(&lab, "inuse"), 1);

    // Unmounted and the exclusive holder gone, the program that merely has
    // a volume open still keeps the lease: the kernel does not detach a
    // loop device someone else has open, and the process is named.
    drop(unmount.take());
    drop(holder);
    let open_by = format!("{open} is open in process {} (python3)", opener.pid());
    let o = pool_cmd(&lab, "inuse", &["lease", "release", &session]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !o.status.success() && err.contains("release refused") && err.contains(&open_by),
        "{err}"
    );
    let report = json_of(pool_cmd(&lab, "inuse", &["--json", "cleanup"]), "cleanup");
    assert!(report["removed"].as_array().unwrap().is_empty(), "{report}");
    let kept = report["kept"].to_string();
    assert!(kept.contains(&open_by), "{report}");
    let o = lab.devpool(&[], &["pool", "teardown", "inuse", "--force", "--yes"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !o.status.success() && err.contains("teardown refused") && err.contains(&open_by),
        "{err}"
    );
    assert_eq!(lease_count(&lab, "inuse"), 1);
    // Still attached, at the volume's offset (not marked to be cleared at
    // its last close either: it survives the opener).
    assert!(bound(&open), "the open volume's loop device stays");
    let volumes = loops_over(&pool_dev);
    assert_eq!(
        volumes.len(),
        3,
        "every volume keeps a loop device: {volumes:?}"
    );

    // A program that opened it through a device node made outside /dev is
    // named too, with that node.
    drop(opener);
    assert!(bound(&open), "not cleared at the opener's last close");
    let node = lab.dir.path().join("open-node");
    node_outside_dev(Path::new(&open), &node);
    let elsewhere = DeviceHolder::open(node.to_str().unwrap());
    let o = pool_cmd(&lab, "inuse", &["lease", "release", &session]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let open_by = format!(
        "{open} is open in process {} (python3) through {}",
        elsewhere.pid(),
        node.display()
    );
    assert!(!o.status.success() && err.contains(&open_by), "{err}");

    // Let go: the next cleanup reaps it.
    drop(elsewhere);
    std::fs::remove_file(&node).unwrap();
    let report = json_of(pool_cmd(&lab, "inuse", &["--json", "cleanup"]), "cleanup");
    assert_eq!(report["removed"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(lease_count(&lab, "inuse"), 0);
    for d in volumes.iter().chain([&test, &scratch, &open]) {
        assert!(!bound(d), "{d}: its loop devices went");
    }
}

#[test]
fn a_volume_opened_for_a_moment_does_not_stop_its_release() {
    if skip_unless_real("in_use_transient") {
        return;
    }
    let mut lab = Lab::new();
    setup_pool(&mut lab, "blip", 64);
    let owner = Sleeper::new();
    let lease = acquire(&lab, "blip", "test:16M", &owner.pid(), &[]);
    let session = lease["session"].as_str().unwrap().to_string();
    let test = device_of(&lease, "test");
    // Open for 200 ms, as udev's blkid opens a device after a change, then
    // closed by a process that lives on: a release that starts meanwhile
    // sees it open, looks again, and goes ahead once it is closed.
    let mut blip = Command::new("python3")
        .args([
            "-c",
            "import os,sys,time; fd=os.open(sys.argv[1], os.O_RDONLY); print('open', flush=True); time.sleep(0.2); os.close(fd); time.sleep(60)",
            &test,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = [0u8; 4];
    std::io::Read::read_exact(blip.stdout.as_mut().unwrap(), &mut line).unwrap();
    let o = pool_cmd(&lab, "blip", &["lease", "release", &session]);
    let _ = blip.kill();
    let _ = blip.wait();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(lease_count(&lab, "blip"), 0);
}
