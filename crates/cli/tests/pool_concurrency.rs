//! 16 processes × 50 acquire/release cycles of random profiles against one
//! pool, with real LVM2 creating and removing volumes in the same VG at the
//! same time. Afterwards nothing leaked, no extent is shared, `vgck` passes,
//! and every failure was a clean "not enough free space" with the numbers.

mod common;
use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const CLIENTS: usize = 16;
const CYCLES: usize = 50;

#[test]
fn sixteen_clients_and_lvm2_share_one_pool_without_leaks() {
    if skip_unless_real("pool_concurrency") {
        return;
    }
    let mut lab = Lab::new();
    let pool = format!("c{}", std::process::id());
    let dev = lab.loop_dev("pool.img", 640);
    let d = dev.display().to_string();
    lab.dp(&[], &["pool", "setup", &d, "--name", &pool, "--yes"]);
    let vg = format!("devpool-{pool}");
    let start_free = lab.dp_json(&[], &["--pool", &pool, "pool", "status"])["free_bytes"].clone();
    let me = std::process::id().to_string();
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let successes = Arc::new(Mutex::new(0usize));

    // Real LVM2 works in the same VG throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let lvm_loop = {
        let (stop, dev) = (stop.clone(), dev.clone());
        let vg = vg.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let name = format!("lvm2_{n}");
                let made = lvm(
                    &[&dev],
                    &["lvcreate", "-an", "-Zn", "-L", "4M", "-n", &name, &vg],
                );
                if made.status.success() {
                    lvm_ok(&[&dev], &["lvremove", "-f", &format!("{vg}/{name}")]);
                }
                n += 1;
            }
            n
        })
    };

    let workers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (lab_state, pool, me) = (lab.state_dir(), pool.clone(), me.clone());
            let (failures, successes) = (failures.clone(), successes.clone());
            std::thread::spawn(move || {
                let mut seed = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(c as u64 + 1);
                for _ in 0..CYCLES {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let want: Vec<String> = match seed % 3 {
                        0 => vec![
                            "--profile".into(),
                            "fstests".into(),
                            "--size".into(),
                            "8M".into(),
                        ],
                        1 => vec!["--volumes".into(), "test:12M,scratch:20M".into()],
                        _ => vec!["--volumes".into(), format!("test:{}M", 4 + seed % 60)],
                    };
                    let mut args = vec![
                        "--pool".to_string(),
                        pool.clone(),
                        "--json".into(),
                        "lease".into(),
                        "acquire".into(),
                    ];
                    args.extend(want);
                    args.extend(["--owner-pid".into(), me.clone()]);
                    let o = devpool_command(&lab_state).args(&args).output().unwrap();
                    if !o.status.success() {
                        failures
                            .lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&o.stderr).to_string());
                        continue;
                    }
                    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                    let session = v["session"].as_str().unwrap().to_string();
                    // Each device is there and exactly the volume's size.
                    for dv in v["devices"].as_array().unwrap() {
                        let node = dv["device"].as_str().unwrap();
                        let f = std::fs::File::open(node).unwrap();
                        let size = std::io::Seek::seek(&mut &f, std::io::SeekFrom::End(0)).unwrap();
                        assert_eq!(size, dv["size_bytes"].as_u64().unwrap(), "{node}");
                    }
                    let o = devpool_command(&lab_state)
                        .args(["--pool", &pool, "lease", "release", &session])
                        .output()
                        .unwrap();
                    assert!(
                        o.status.success(),
                        "release: {}",
                        String::from_utf8_lossy(&o.stderr)
                    );
                    *successes.lock().unwrap() += 1;
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    stop.store(true, Ordering::SeqCst);
    let lvm_ops = lvm_loop.join().expect("lvm2 loop");

    let failures = failures.lock().unwrap();
    for f in failures.iter() {
        assert!(
            f.contains("not enough") && f.contains("free space") && f.contains("requested"),
            "unclean failure: {f}"
        );
    }
    let ok = *successes.lock().unwrap();
    eprintln!(
        "{ok} cycles succeeded, {} ran out of space, {lvm_ops} lvcreate/lvremove rounds",
        failures.len()
    );
    assert!(ok > CLIENTS * CYCLES / 2, "too few successes: {ok}");
    assert_eq!(ok + failures.len(), CLIENTS * CYCLES);

    // Nothing leaked: no volumes, all space back, no devpool loop device left.
    assert_nothing_leaked(&lab, &pool, &start_free, &dev);
    lab.dp(&[], &["pool", "teardown", &pool, "--yes"]);
}
