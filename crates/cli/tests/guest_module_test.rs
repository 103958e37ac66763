//! `devpool vm module-test` on a small out-of-tree module built here against
//! Debian's 6.12 headers: a clean module passes every step (modinfo with the
//! right vermagic, insmod, lsmod + /proc/modules + /sys/module, I/O on a
//! leased volume, load/unload cycles, rmmod) with a clean kernel log; loaded
//! with `warn=1` it hits a WARN_ON and the report must flag it.

mod common;
use common::Lab;
use common::guest::*;

#[test]
fn guest_module_test_passes_a_clean_module_and_flags_a_warn_on() {
    let t = "guest_module_test_passes_a_clean_module_and_flags_a_warn_on";
    let Some(kernel) = guest_or_skip(t) else {
        return;
    };
    let lab = Lab::new();
    let Some(ko) = probe_module(&lab, &kernel, t) else {
        return;
    };
    let ko = ko.display().to_string();

    let img = image_pool(&lab, "mt");
    let ka = kernel_args(&kernel);
    let mut k: Vec<&str> = ka.iter().map(String::as_str).collect();
    // One vCPU: the module needs no more, and two TCG guests of two vCPUs
    // each on this 2-CPU host (the guest tier runs two tests at once) once
    // starved a guest into RCU stalls and the timeout.
    k.extend(["--module", &ko, "--cpus", "1"]);

    let mut args = k.clone();
    args.extend(["--cycles", "5", "--volumes", "test:16M"]);
    let (code, r, stderr) = vm_json(&lab, &img, "mt", "module-test", &args);
    assert_eq!(code, 0, "{r:#}\n{stderr}");
    assert_eq!(r["passed"], true);
    let steps = r["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["modinfo", "insmod", "loaded", "io", "cycles", "rmmod"]
    );
    for s in steps {
        assert_eq!(s["status"], "pass", "{s}");
    }
    assert!(
        steps[0]["detail"]
            .as_str()
            .unwrap()
            .contains(&kernel.version)
    );
    assert_eq!(steps[4]["detail"], "5 unload/load cycles");
    assert_eq!(r["findings"].as_array().unwrap().len(), 0, "{r:#}");
    assert!(
        r["log"]
            .as_str()
            .unwrap()
            .contains("devpool_probe_mod: unloaded")
    );
    assert_eq!(r["run"]["released"], true);

    let mut args = k.clone();
    args.extend([
        "--cycles",
        "1",
        "--params",
        "warn=1",
        "--volumes",
        "test:16M",
    ]);
    let (code, r, stderr) = vm_json(&lab, &img, "mt", "module-test", &args);
    assert_eq!(code, 1, "{r:#}\n{stderr}");
    assert_eq!(r["passed"], false);
    let findings = r["findings"].as_array().unwrap();
    assert!(!findings.is_empty(), "{r:#}");
    assert_eq!(findings[0]["kind"], "WARNING");
    let ex = findings[0]["excerpt"].as_str().unwrap();
    assert!(ex.contains("devpool_probe_mod.c:"), "{ex}");
    assert!(ex.contains("Call Trace:"), "{ex}");
    // The steps themselves still ran; only the log condemns the module.
    assert_eq!(r["steps"][1]["status"], "pass");
}
