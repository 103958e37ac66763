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

    // Dead owner: cleanup detaches and removes it, and says why.
    owner.kill();
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
    assert_eq!(removed.len(), 2, "{removed:?}");
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
    ok(
        lab.devpool(&[], &["pool", "teardown", "default", "--yes"]),
        "teardown",
    );
    assert!(!img.exists(), "teardown removes the image devpool made");
}
