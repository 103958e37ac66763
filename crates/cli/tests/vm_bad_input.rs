//! Bad input to `devpool vm …`: each case fails before anything is leased or
//! booted, with a message that names the argument.

mod common;
use common::Lab;

#[test]
fn vm_commands_refuse_bad_arguments_before_leasing_anything() {
    let lab = Lab::new();
    let text = lab.path("not-a-kernel");
    std::fs::write(&text, "hello").unwrap();
    let t = text.display().to_string();
    // `vm run --kernel <not a kernel> ARGS -- true`
    let run = |args: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["vm", "run", "--kernel", &t].map(String::from).to_vec();
        a.extend(args.iter().map(|s| s.to_string()));
        a.extend(["--".into(), "true".into()]);
        a
    };
    let sub = |args: &[&str]| -> Vec<String> { args.iter().map(|s| s.to_string()).collect() };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            sub(&[
                "vm",
                "run",
                "--kernel",
                "/nonexistent/bzImage",
                "--",
                "true",
            ]),
            "/nonexistent/bzImage: no such kernel image",
        ),
        (run(&[]), "not an x86 bzImage"),
        (
            sub(&[
                "vm",
                "run",
                "--kernel-deb",
                &t,
                "--modules",
                "/tmp",
                "--",
                "true",
            ]),
            "--modules: a --kernel-deb brings its own modules",
        ),
        (
            run(&["--add", "/nonexistent:/x"]),
            "--add /nonexistent: no such file",
        ),
        (run(&["--add", "/etc/hosts:relative"]), "must be absolute"),
        (
            run(&["--add", "/etc/hosts:/init"]),
            "devpool's own guest file",
        ),
        (
            run(&["--mem", "64M"]),
            "--mem 64M: a guest needs at least 128M",
        ),
        (run(&["--mem", "lots"]), "--mem"),
        (run(&["--cpus", "0"]), "--cpus 0"),
        (run(&["--env", "1BAD=x"]), "--env '1BAD=x'"),
        (
            run(&["--disk", "/nonexistent.img"]),
            "--disk /nonexistent.img",
        ),
        (
            run(&["--volumes", "test:1G,scratch:1G,pool1:1G"]),
            "SCRATCH_DEV_POOL",
        ),
        (
            sub(&[
                "vm",
                "module-test",
                "--kernel",
                &t,
                "--module",
                "/etc/hosts",
            ]),
            "expected a .ko file",
        ),
        (
            sub(&[
                "vm",
                "module-test",
                "--kernel",
                &t,
                "--module",
                "/nonexistent.ko",
            ]),
            "--module /nonexistent.ko: no such file",
        ),
        (
            sub(&[
                "vm",
                "fstests",
                "--kernel",
                &t,
                "--fstests",
                "/tmp",
                "--fstype",
                "zfs",
            ]),
            "--fstype zfs: one of ext4, xfs, btrfs",
        ),
        (
            sub(&["vm", "fstests", "--kernel", &t, "--fstests", "/etc"]),
            "not an fstests tree (no ./check",
        ),
        (sub(&["vm", "run", "--", "true"]), "--kernel"),
    ];
    for (args, want) in cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = lab.devpool(&[], &a);
        let e = String::from_utf8_lossy(&out.stderr).into_owned();
        // 1: devpool refused; 2: clap refused the command line.
        assert!(matches!(out.status.code(), Some(1 | 2)), "{a:?}: {e}");
        assert!(e.contains(want), "{a:?}: wanted '{want}' in: {e}");
        assert!(!e.contains("panicked"), "{a:?}: {e}");
    }
    // Nothing was leased: no pool was even created.
    assert!(!lab.state_dir().join("images/default.img").exists());
    let pools = lab.state_dir().join("pools");
    assert!(!pools.exists() || std::fs::read_dir(&pools).unwrap().next().is_none());
}
