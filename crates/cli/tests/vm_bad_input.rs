//! Bad input to `devpool vm …`: each case fails before anything is leased or
//! booted, with a message that names the argument.

mod common;
use common::Lab;

fn err(lab: &Lab, args: &[&str]) -> String {
    let out = lab.devpool(&[], args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(
            if stderr.contains("error: ") && !stderr.contains("devpool: error") {
                2
            } else {
                1
            }
        ),
        "{args:?}: {stderr}"
    );
    stderr
}

#[test]
fn vm_commands_refuse_bad_arguments_before_leasing_anything() {
    let lab = Lab::new();
    let text = lab.path("not-a-kernel");
    std::fs::write(&text, "hello").unwrap();
    let t = text.display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "vm",
                "run",
                "--kernel",
                "/nonexistent/bzImage",
                "--",
                "true",
            ],
            "/nonexistent/bzImage: no such kernel image",
        ),
        (
            vec!["vm", "run", "--kernel", &t, "--", "true"],
            "not an x86 bzImage",
        ),
        (
            vec![
                "vm",
                "run",
                "--kernel-deb",
                &t,
                "--modules",
                "/tmp",
                "--",
                "true",
            ],
            "--modules: a --kernel-deb brings its own modules",
        ),
        (
            vec![
                "vm",
                "run",
                "--kernel",
                &t,
                "--add",
                "/nonexistent:/x",
                "--",
                "true",
            ],
            "--add /nonexistent: no such file",
        ),
        (
            vec![
                "vm",
                "run",
                "--kernel",
                &t,
                "--add",
                "/etc/hosts:relative",
                "--",
                "true",
            ],
            "must be absolute",
        ),
        (
            vec![
                "vm",
                "run",
                "--kernel",
                &t,
                "--add",
                "/etc/hosts:/init",
                "--",
                "true",
            ],
            "devpool's own guest file",
        ),
        (
            vec!["vm", "run", "--kernel", &t, "--mem", "64M", "--", "true"],
            "--mem 64M: a guest needs at least 128M",
        ),
        (
            vec!["vm", "run", "--kernel", &t, "--mem", "lots", "--", "true"],
            "--mem",
        ),
        (
            vec!["vm", "run", "--kernel", &t, "--cpus", "0", "--", "true"],
            "--cpus 0",
        ),
        (
            vec!["vm", "run", "--kernel", &t, "--env", "1BAD=x", "--", "true"],
            "--env '1BAD=x'",
        ),
        (
            vec![
                "vm",
                "run",
                "--kernel",
                &t,
                "--disk",
                "/nonexistent.img",
                "--",
                "true",
            ],
            "--disk /nonexistent.img",
        ),
        (
            vec![
                "vm",
                "run",
                "--kernel",
                &t,
                "--volumes",
                "test:1G,scratch:1G,pool1:1G",
                "--",
                "true",
            ],
            "SCRATCH_DEV_POOL",
        ),
        (
            vec![
                "vm",
                "module-test",
                "--kernel",
                &t,
                "--module",
                "/etc/hosts",
            ],
            "expected a .ko file",
        ),
        (
            vec![
                "vm",
                "module-test",
                "--kernel",
                &t,
                "--module",
                "/nonexistent.ko",
            ],
            "--module /nonexistent.ko: no such file",
        ),
        (
            vec![
                "vm",
                "fstests",
                "--kernel",
                &t,
                "--fstests",
                "/tmp",
                "--fstype",
                "zfs",
            ],
            "--fstype zfs: one of ext4, xfs, btrfs",
        ),
        (
            vec!["vm", "fstests", "--kernel", &t, "--fstests", "/etc"],
            "not an fstests tree (no ./check",
        ),
        (vec!["vm", "run", "--", "true"], "--kernel"),
    ];
    for (args, want) in cases {
        let e = err(&lab, &args);
        assert!(e.contains(want), "{args:?}: wanted '{want}' in: {e}");
        assert!(!e.contains("panicked"), "{args:?}: {e}");
    }
    // Nothing was leased: no pool was even created.
    assert!(!lab.state_dir().join("images/default.img").exists());
    let pools = lab.state_dir().join("pools");
    assert!(!pools.exists() || std::fs::read_dir(&pools).unwrap().next().is_none());
}
