//! `devpool vm module-test` on a small out-of-tree module built here against
//! Debian's 6.12 headers: a clean module passes every step (modinfo with the
//! right vermagic, insmod, lsmod + /proc/modules + /sys/module, I/O on a
//! leased volume, load/unload cycles, rmmod) with a clean kernel log; loaded
//! with `warn=1` it hits a WARN_ON and the report must flag it.

mod common;
use common::Lab;
use common::guest::*;
use std::process::Command;

const MODULE_C: &str = r#"
#include <linux/module.h>
#include <linux/init.h>
static bool warn;
module_param(warn, bool, 0444);
static int __init probe_init(void)
{
	WARN_ON(warn);
	pr_info("devpool_probe_mod: loaded\n");
	return 0;
}
static void __exit probe_exit(void) { pr_info("devpool_probe_mod: unloaded\n"); }
module_init(probe_init);
module_exit(probe_exit);
MODULE_LICENSE("GPL");
"#;

#[test]
fn guest_module_test_passes_a_clean_module_and_flags_a_warn_on() {
    let t = "guest_module_test_passes_a_clean_module_and_flags_a_warn_on";
    let Some(kernel) = guest_or_skip(t) else {
        return;
    };
    let headers = match debian_headers(&kernel) {
        Ok(h) => h,
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => panic!("{t}: {e}"),
        Err(e) => return eprintln!("SKIPPED: {t}: {e}"),
    };
    let lab = Lab::new();
    let src = lab.path("mod");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("devpool_probe_mod.c"), MODULE_C).unwrap();
    std::fs::write(src.join("Kbuild"), "obj-m := devpool_probe_mod.o\n").unwrap();
    // No pahole here: skip BTF for the module.
    let out = Command::new("make")
        .arg("-C")
        .arg(&headers)
        .arg(format!("M={}", src.display()))
        .args(["CONFIG_DEBUG_INFO_BTF_MODULES=", "modules"])
        .output()
        .expect("make (apt-get install make gcc-12)");
    assert!(
        out.status.success(),
        "building the module failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ko = src.join("devpool_probe_mod.ko").display().to_string();

    let img = image_pool(&lab, "mt");
    let ka = kernel_args(&kernel);
    let mut k: Vec<&str> = ka.iter().map(String::as_str).collect();
    k.extend(["--module", &ko]);

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
