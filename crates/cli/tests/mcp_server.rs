//! `devpool mcp` driven by the official MCP Python client (`mcp` from PyPI,
//! installed by `.ci/run` into /var/cache/devpool-test/mcp-venv) over stdio:
//! the tools and their schemas; a pool set up on a loop device (plan without
//! `confirm`, nothing changed; then for real), leases, resize (shrink only
//! with confirm), snapshot create/merge/list, release, teardown with wipe;
//! malformed calls are tool errors and the server keeps serving; a lease
//! dies with its client's session; a killed server's lease is reaped by
//! cleanup; and (guest) `vm_run` under TCG, with progress, and cancelled;
//! `vm_module_test` on a module built here, `fstests_vm_boot_and_run` on
//! leased volumes and on image files against a baseline.

mod common;
use common::{LVM_CONFIG, Lab, devpool_command, skip_unless_real};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

fn python(test: &str) -> Option<PathBuf> {
    let p = std::env::var_os("DEVPOOL_MCP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/devpool-test/mcp-venv/bin/python".into());
    let ok = Command::new(&p)
        .args(["-c", "import mcp"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(p);
    }
    let why = format!(
        "{} cannot import the MCP client (python3 -m venv /var/cache/devpool-test/mcp-venv && …/bin/pip install mcp; .ci/run does it)",
        p.display()
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: {why}");
    }
    eprintln!("SKIPPED: {test}: {why}");
    None
}

/// Run a scenario of tests/mcp/client.py; its transcript.
fn scenario(py: &Path, lab: &Lab, devices: &[&Path], name: &str, args: Value) -> Vec<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp/client.py");
    let mut args = args;
    args["lvm_config"] = json!(LVM_CONFIG);
    let list: Vec<String> = devices.iter().map(|d| d.display().to_string()).collect();
    let mut c = Command::new(py);
    c.arg(&script)
        .arg(env!("CARGO_BIN_EXE_devpool"))
        .arg(name)
        .arg(args.to_string())
        .env("DEVPOOL_STATE_DIR", lab.state_dir())
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .env_remove("DEVPOOL_POOL")
        .env_remove("DEVPOOL_DEVICES");
    if !list.is_empty() {
        c.env("DEVPOOL_DEVICES", list.join(","));
    }
    let out = c.output().expect("run the MCP client");
    assert!(
        out.status.success(),
        "client {name} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "client {name}: bad transcript ({e}):\n{}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A pool named `prefix<pid>` on a 1 GiB sparse image `file` in the lab;
/// the image and the pool's name.
fn image_pool(lab: &Lab, file: &str, prefix: &str, extra: &[&str]) -> (PathBuf, String) {
    let pool = format!("{prefix}{}", std::process::id());
    (lab.image_pool(file, &pool, "1G", extra), pool)
}

fn step<'a>(log: &'a [Value], name: &str) -> &'a Value {
    log.iter()
        .find(|e| e["step"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {log:#?}"))
}

/// A call that succeeded; its structured content.
fn ok<'a>(log: &'a [Value], name: &str) -> &'a Value {
    let e = step(log, name);
    assert_eq!(e["is_error"], false, "{name} failed: {e:#}");
    assert!(
        e["structured"].is_object(),
        "{name}: no structured content: {e:#}"
    );
    assert!(
        !e["text"].as_str().unwrap_or("").is_empty(),
        "{name}: no summary"
    );
    &e["structured"]
}

/// A call that failed as a tool error (not a protocol error); its text.
fn tool_err<'a>(log: &'a [Value], name: &str) -> &'a str {
    let e = step(log, name);
    assert_eq!(e["is_error"], true, "{name} should be a tool error: {e:#}");
    e["text"].as_str().unwrap_or("")
}

fn lease_sessions(lab: &Lab, dev: &Path, pool: &str) -> Vec<String> {
    lab.dp_json(&[dev], &["--pool", pool, "lease", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["session"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn tools_are_listed_with_kerneldev_mcp_names_and_schemas_an_agent_can_act_on() {
    let Some(py) = python("mcp tools") else {
        return;
    };
    let lab = Lab::new();
    let log = scenario(&py, &lab, &[], "tools", json!({}));
    let tools = step(&log, "tools")["tools"].as_array().unwrap().clone();
    let find = |n: &str| {
        tools
            .iter()
            .find(|t| t["name"] == n)
            .unwrap_or_else(|| panic!("tool {n} missing"))
            .clone()
    };
    for (name, args) in [
        (
            "device_pool_setup",
            &["device_path", "pool_name", "confirm"][..],
        ),
        ("device_pool_status", &["pool_name"][..]),
        ("device_pool_trim", &["pool_name"][..]),
        ("device_pool_list", &[][..]),
        (
            "device_pool_resize",
            &["lv_name", "new_size", "confirm"][..],
        ),
        (
            "device_pool_snapshot",
            &["action", "lv_name", "snapshot_name", "confirm"][..],
        ),
        ("device_pool_cleanup", &["pool_name"][..]),
        (
            "device_pool_teardown",
            &["pool_name", "wipe_data", "confirm"][..],
        ),
        (
            "device_pool_lease_acquire",
            &["volumes", "profile", "keep"][..],
        ),
        ("device_pool_lease_release", &["session"][..]),
        (
            "vm_run",
            &["kernel_path", "command", "volumes", "timeout"][..],
        ),
        (
            "vm_module_test",
            &[
                "kernel_path",
                "modules_path",
                "module_path",
                "cycles",
                "params",
                "volumes",
                "timeout",
            ][..],
        ),
        (
            "fstests_vm_boot_and_run",
            &[
                "kernel_path",
                "fstests_path",
                "tests",
                "use_device_pool",
                "keep_volumes",
                "fstype",
                "timeout",
                "baseline_path",
            ][..],
        ),
    ] {
        let t = find(name);
        assert!(
            t["description"].as_str().is_some_and(|d| d.len() > 40),
            "{name}: description"
        );
        let s = &t["input_schema"];
        assert_eq!(s["type"], "object", "{name}: {s}");
        for a in args {
            let p = &s["properties"][a];
            assert!(p.is_object(), "{name}: argument {a} missing from {s}");
            assert!(
                p["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{name}.{a}: no description"
            );
        }
    }
    let setup = find("device_pool_setup");
    assert_eq!(setup["input_schema"]["required"], json!(["device_path"]));
    let resize = find("device_pool_resize");
    let mut req: Vec<String> =
        serde_json::from_value(resize["input_schema"]["required"].clone()).unwrap();
    req.sort();
    assert_eq!(req, ["lv_name", "new_size"]);
    assert_eq!(
        find("vm_module_test")["input_schema"]["required"],
        json!(["module_path"])
    );
    assert_eq!(
        find("fstests_vm_boot_and_run")["input_schema"]["required"],
        json!(["fstests_path"])
    );
    let snap = find("device_pool_snapshot");
    let action = snap["input_schema"].to_string();
    for a in ["create", "delete", "merge"] {
        assert!(
            action.contains(&format!("\"{a}\"")),
            "action {a} not in {action}"
        );
    }
}

#[test]
fn an_agent_sets_up_leases_resizes_snapshots_and_tears_down_a_pool_on_a_loop_device() {
    if skip_unless_real("mcp lifecycle") {
        return;
    }
    let Some(py) = python("mcp lifecycle") else {
        return;
    };
    let mut lab = Lab::new();
    let dev = lab.loop_dev("pool.img", 512);
    let pool = format!("mcp{}", std::process::id());
    let log = scenario(
        &py,
        &lab,
        &[&dev],
        "lifecycle",
        json!({"device": dev, "pool": pool}),
    );
    // Without confirm: the plan, and nothing changed.
    let plan = ok(&log, "setup-plan");
    assert_eq!(plan["confirmed"], false);
    assert!(
        plan["plan"]
            .as_str()
            .unwrap()
            .contains(&dev.display().to_string())
    );
    assert_eq!(
        step(&log, "after-plan")["vg"],
        false,
        "the plan changed the disk"
    );
    assert_eq!(ok(&log, "setup")["confirmed"], true);
    assert_eq!(step(&log, "after-setup")["vg"], true);
    let pools = ok(&log, "list")["pools"].as_array().unwrap().clone();
    assert!(pools.iter().any(|p| p["pool"] == pool.as_str()));
    let lease = ok(&log, "acquire");
    let session = lease["session"].as_str().unwrap();
    assert_eq!(lease["devices"].as_array().unwrap().len(), 2);
    // Owned by the server process (not the client, not the test).
    assert_ne!(lease["owner"]["pid"], json!(std::process::id()));
    let status = ok(&log, "status");
    assert_eq!(status["leases"][0]["session"], session);
    let mib = |v: &Value| v["size_bytes"].as_u64().unwrap() >> 20;
    assert_eq!(mib(ok(&log, "grow")), 96);
    let shrink = ok(&log, "shrink-plan");
    assert_eq!(
        shrink["confirmed"], false,
        "a shrink without confirm must only plan"
    );
    assert_eq!(mib(ok(&log, "shrink")), 80);
    ok(&log, "snap-create");
    let snaps = ok(&log, "snap-list")["snapshots"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(snaps.len(), 1);
    assert_eq!(ok(&log, "merge-plan")["confirmed"], false);
    ok(&log, "merge");
    ok(&log, "snap-again");
    ok(&log, "release");
    let after = ok(&log, "status-after");
    assert_eq!(after["leases"], json!([]));
    assert_eq!(
        after["snapshots"],
        json!([]),
        "the lease's snapshot went with it"
    );
    let trim = ok(&log, "trim");
    assert_eq!(
        trim["discarded_bytes"].as_u64(),
        after["free_bytes"].as_u64(),
        "trim discards all the free space: {trim}"
    );
    assert_eq!(ok(&log, "teardown-plan")["confirmed"], false);
    assert_eq!(step(&log, "after-teardown-plan")["vg"], true);
    ok(&log, "teardown");
    assert_eq!(step(&log, "after-teardown")["vg"], false);
}

#[test]
fn malformed_calls_are_tool_errors_and_the_server_keeps_serving() {
    if skip_unless_real("mcp malformed") {
        return;
    }
    let Some(py) = python("mcp malformed") else {
        return;
    };
    let lab = Lab::new();
    let small = lab.path("notes.txt");
    std::fs::write(&small, "not a pool\n").unwrap();
    let empty = lab.path("kernel-tree");
    std::fs::create_dir_all(&empty).unwrap();
    let log = scenario(
        &py,
        &lab,
        &[],
        "malformed",
        json!({"small_file": small, "empty_dir": empty}),
    );
    assert!(tool_err(&log, "wrong-type").contains("device_path"));
    assert!(tool_err(&log, "missing").contains("new_size"));
    assert!(tool_err(&log, "unknown-tool").contains("no_such_tool"));
    assert!(tool_err(&log, "huge").contains("pool_name"));
    assert!(tool_err(&log, "bad-enum").contains("explode"));
    assert!(tool_err(&log, "dev-null").contains("/dev/null"));
    assert!(tool_err(&log, "regular-file").contains(&small.display().to_string()));
    assert!(tool_err(&log, "bad-size").contains("lots"));
    assert!(tool_err(&log, "vm-bad-timeout").contains("'timeout'"));
    assert!(tool_err(&log, "vm-kernel-dir").contains("arch/x86/boot/bzImage"));
    ok(&log, "still-serving");
    assert_eq!(
        std::fs::read_to_string(&small).unwrap(),
        "not a pool\n",
        "a refused setup changed the file"
    );
}

#[test]
fn an_agent_rolls_a_thin_volume_back_to_its_thin_snapshot_and_grows_the_thin_pool() {
    if skip_unless_real("mcp thin merge") {
        return;
    }
    let Some(py) = python("mcp thin merge") else {
        return;
    };
    let lab = Lab::new();
    let (img, pool) = image_pool(&lab, "thin.img", "mct", &["--thin"]);
    let log = scenario(&py, &lab, &[&img], "thin", json!({"pool": pool}));
    let lv = ok(&log, "acquire")["devices"][0]["lv"]
        .as_str()
        .unwrap()
        .to_string();
    ok(&log, "snap");
    let plan = ok(&log, "merge-plan");
    assert_eq!(plan["confirmed"], false);
    assert!(
        plan["plan"]
            .as_str()
            .unwrap()
            .contains("merge thin snapshot before"),
        "{plan:#}"
    );
    let names = |step_name: &str| -> Vec<String> {
        ok(&log, step_name)["thin_snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        names("list-after-plan"),
        ["before"],
        "the plan changed nothing"
    );
    let merged = ok(&log, "merge");
    assert_eq!(merged["origin"], lv.as_str());
    assert_ne!(merged["device_id"], merged["old_device_id"]);
    assert!(names("list-after").is_empty());
    let grown = ok(&log, "grow-pool");
    assert_eq!(
        grown["data_bytes"].as_u64().unwrap(),
        grown["data_bytes_before"].as_u64().unwrap() + (16 << 20)
    );
    assert!(tool_err(&log, "shrink-pool").contains("only grow"));
    ok(&log, "release");
    lab.dp(&[&img], &["pool", "teardown", &pool, "--yes"]);
}

/// The three messages a client opens with, the last one `tools/list`.
fn opening_messages() -> String {
    [
        common::mcp_initialize(1),
        common::mcp_initialized(),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    ]
    .iter()
    .map(|m| format!("{m}\n"))
    .collect()
}

/// The answers to [`opening_messages`]: the server's name and its tools.
fn check_opening_answers(lines: &[Value]) {
    let init = lines
        .iter()
        .find(|l| l["id"] == 1)
        .expect("initialize answer");
    assert_eq!(init["result"]["serverInfo"]["name"], "devpool", "{init}");
    let list = lines
        .iter()
        .find(|l| l["id"] == 2)
        .expect("tools/list answer");
    let tools = list["result"]["tools"].as_array().expect("tools");
    assert!(
        tools
            .iter()
            .any(|t| t["name"] == "device_pool_lease_acquire"),
        "{list}"
    );
}

#[test]
fn the_server_speaks_over_a_socket_pair_and_into_a_plain_file() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::process::Stdio;
    let lab = Lab::new();
    // Node's clients give a server one end of a socket pair as stdin and stdout.
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let server = devpool_command(&lab.state_dir())
        .arg("mcp")
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(
            theirs.try_clone().unwrap(),
        )))
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start devpool mcp");
    ours.write_all(opening_messages().as_bytes()).unwrap();
    let mut lines = Vec::new();
    let mut input = BufReader::new(ours.try_clone().unwrap());
    while lines.len() < 2 {
        let mut line = String::new();
        assert!(input.read_line(&mut line).unwrap() > 0, "server hung up");
        lines.push(serde_json::from_str::<Value>(&line).expect("JSON-RPC line"));
    }
    check_opening_answers(&lines);
    ours.shutdown(std::net::Shutdown::Both).unwrap();
    let out = server.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Answers into a regular file (the plain, blocking stdout).
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let answers = lab.path("answers.jsonl");
    let server = devpool_command(&lab.state_dir())
        .arg("mcp")
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stdout(std::fs::File::create(&answers).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start devpool mcp");
    ours.write_all(opening_messages().as_bytes()).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let lines = loop {
        let text = std::fs::read_to_string(&answers).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if lines.len() >= 2 {
            break lines;
        }
        assert!(std::time::Instant::now() < deadline, "no answers: {text}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    check_opening_answers(&lines);
    drop(ours);
    let out = server.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn server_leases_are_released_on_disconnect_and_reaped_after_a_kill() {
    if skip_unless_real("mcp lease ownership") {
        return;
    }
    let Some(py) = python("mcp lease ownership") else {
        return;
    };
    let mut lab = Lab::new();
    let dev = lab.loop_dev("pool.img", 256);
    let pool = format!("mco{}", std::process::id());
    lab.dp(
        &[&dev],
        &[
            "pool",
            "setup",
            dev.to_str().unwrap(),
            "--name",
            &pool,
            "--yes",
        ],
    );
    let args = json!({"device": dev, "pool": pool});

    // The client's session ends: the server releases what it leased.
    let log = scenario(&py, &lab, &[&dev], "owned", args.clone());
    let s = ok(&log, "acquire")["session"].as_str().unwrap().to_string();
    assert!(
        !lease_sessions(&lab, &dev, &pool).contains(&s),
        "lease {s} outlived its client"
    );

    // The server is killed: its lease stays, owned by a dead PID, until
    // cleanup (through a new server) reaps it.
    let log = scenario(&py, &lab, &[&dev], "killed", args.clone());
    let s = ok(&log, "acquire")["session"].as_str().unwrap().to_string();
    assert!(lease_sessions(&lab, &dev, &pool).contains(&s));
    let log = scenario(&py, &lab, &[&dev], "cleanup", args);
    let removed = ok(&log, "cleanup")["removed"].as_array().unwrap().clone();
    assert!(
        removed.iter().any(|l| l["session"] == s.as_str()),
        "{removed:?}"
    );
    assert_eq!(ok(&log, "status")["leases"], json!([]));
    lab.dp(&[&dev], &["pool", "teardown", &pool, "--yes"]);
}

#[test]
fn guest_mcp_vm_run_boots_a_kernel_with_a_leased_volume_and_cancels_cleanly() {
    let Some(k) = common::guest::guest_or_skip("mcp vm_run") else {
        return;
    };
    if skip_unless_real("mcp vm_run") {
        return;
    }
    let Some(py) = python("mcp vm_run") else {
        return;
    };
    let lab = Lab::new();
    let (img, pool) = image_pool(&lab, "pool.img", "mcv", &[]);
    let log = scenario(
        &py,
        &lab,
        &[&img],
        "vm",
        json!({"device": img, "pool": pool, "kernel": k.image, "modules": k.modules,
               "cancel_after": 20}),
    );
    let run = ok(&log, "vm-run");
    assert_eq!(run["status"], 3, "{run:#}");
    assert!(
        run["output"]
            .as_str()
            .unwrap()
            .contains("mcp-guest-sees /dev/vda"),
        "{run:#}"
    );
    assert_eq!(run["kept"], true, "{run:#}");
    assert_eq!(run["released"], false);
    // What the guest wrote is on the volume's range of the pool image
    // (read while kept); the release then gave that range back.
    assert_eq!(step(&log, "vm-data")["data"], "devpool-mc");
    ok(&log, "vm-release");
    let d = &run["disks"][0];
    let off = d["extent"]["offset"].as_u64().unwrap() + 8 * 512;
    let data = std::fs::read(&img).unwrap();
    assert!(
        data[off as usize..off as usize + 10]
            .iter()
            .all(|&b| b == 0)
    );
    let progress = step(&log, "vm-run")["progress"].as_array().unwrap().clone();
    assert!(
        progress.iter().any(|p| p["message"]
            .as_str()
            .is_some_and(|m| m.contains("mcp-guest-sees"))),
        "no progress with the console: {progress:?}"
    );
    // The abandoned call: the VM is killed, its lease released.
    assert!(
        step(&log, "vm-cancel").get("exception").is_some(),
        "{:#}",
        step(&log, "vm-cancel")
    );
    assert_eq!(ok(&log, "status-after-cancel")["leases"], json!([]));
    let qemu = Command::new("pgrep")
        .args(["-f", &format!("devpool.*{pool}")])
        .output()
        .unwrap();
    assert!(qemu.stdout.is_empty(), "a VM of this test still runs");
    lab.dp(&[&img], &["pool", "teardown", &pool, "--yes"]);
}

#[test]
fn guest_mcp_module_test_and_fstests_run_in_a_guest_and_release_their_volumes() {
    let t = "mcp vm_module_test and fstests_vm_boot_and_run";
    let Some(k) = common::guest::guest_or_skip(t) else {
        return;
    };
    if skip_unless_real(t) {
        return;
    }
    let Some(py) = python(t) else {
        return;
    };
    let lab = Lab::new();
    let Some(module) = common::guest::probe_module(&lab, &k, t) else {
        return;
    };
    let tree = common::guest::fstests_mimic(&lab);
    let (img, pool) = image_pool(&lab, "pool.img", "mcs", &[]);
    let log = scenario(
        &py,
        &lab,
        &[&img],
        "suites",
        json!({"pool": pool, "kernel": k.image, "modules": k.modules, "module": module,
               "fstests": tree, "baseline": lab.path("baseline.json")}),
    );

    let m = ok(&log, "module");
    assert_eq!(m["passed"], true, "{m:#}");
    assert_eq!(m["status"], 0);
    let steps: Vec<(&str, &str)> = m["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        [
            ("modinfo", "pass"),
            ("insmod", "pass"),
            ("loaded", "pass"),
            ("io", "pass"),
            ("cycles", "pass"),
            ("rmmod", "pass")
        ]
    );
    assert_eq!(m["steps"][4]["detail"], "2 unload/load cycles");
    assert_eq!(m["run"]["released"], true);
    assert!(
        step(&log, "module")["text"]
            .as_str()
            .unwrap()
            .contains("module test of devpool_probe_mod"),
        "{:#}",
        step(&log, "module")
    );
    let progress = step(&log, "module")["progress"].as_array().unwrap();
    assert!(
        progress.iter().any(|p| p["message"]
            .as_str()
            .is_some_and(|m| m.contains("devpool_probe_mod"))),
        "no console progress: {progress:?}"
    );

    let f = ok(&log, "fstests-pool");
    let got: Vec<(&str, &str)> = f["tests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        got,
        [
            ("generic/001", "pass"),
            ("generic/002", "not_run"),
            ("generic/003", "fail")
        ]
    );
    assert_eq!(f["status"], 1, "one test fails");
    assert!(
        f["tests"][2]["diff"]
            .as_str()
            .unwrap()
            .contains("+size 3072")
    );
    assert_eq!(f["run"]["released"], true);
    assert!(f["run"]["session"].is_string(), "leased from the pool");
    let results = Path::new(f["results_dir"].as_str().unwrap());
    assert!(results.join("generic/003.out.bad").exists());

    // Image files instead of the pool, against the first run: 003 is fixed
    // (no regression), 002 was not asked for.
    let f = ok(&log, "fstests-files");
    assert!(f["run"]["session"].is_null(), "no lease: {f:#}");
    let attach: Vec<&str> = f["run"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["attach"].as_str().unwrap())
        .collect();
    assert_eq!(attach, ["raw", "raw"]);
    let changes: Vec<(&str, &str, bool)> = f["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["test"].as_str().unwrap(),
                c["after"].as_str().unwrap_or("absent"),
                c["regression"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        changes,
        [
            ("generic/002", "absent", false),
            ("generic/003", "pass", false)
        ]
    );
    assert_eq!(f["status"], 0, "no regression");
    let run_dir = lab.state_dir().join("run");
    let left: Vec<_> = std::fs::read_dir(&run_dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("files-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "image files left in {}", run_dir.display());

    assert_eq!(ok(&log, "status-after")["leases"], json!([]));
    common::guest::assert_no_qemu_left(&lab);
    lab.dp(&[&img], &["pool", "teardown", &pool, "--yes"]);
}
