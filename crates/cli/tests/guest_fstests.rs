//! `devpool vm fstests` through the full path: a lease (test + scratch), a
//! generated local.config (SCRATCH_DEV, not SCRATCH_DEV_POOL), the tree and
//! the results directory shared over 9p, TEST_DEV made ext4 in the guest, and
//! `check` run there. fstests itself cannot be built within the CI budget,
//! so the tree is `tests/data/fstests-mimic`: a `check` that reads the same
//! configuration and prints check's format, with three tests that really use
//! TEST_DEV and SCRATCH_DEV (one passes, one is not run, one fails with a
//! diff). A second run against the first as `--baseline` shows only changes.

mod common;
use common::Lab;
use common::guest::*;
use serde_json::Value;

fn statuses(r: &Value) -> Vec<(String, String)> {
    r["tests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn guest_fstests_runs_check_and_reports_per_test_results_and_changes() {
    let t = "guest_fstests_runs_check_and_reports_per_test_results_and_changes";
    let Some(kernel) = guest_or_skip(t) else {
        return;
    };
    let lab = Lab::new();
    let tree = fstests_mimic(&lab);
    let img = image_pool(&lab, "fst");
    let ka = kernel_args(&kernel);
    let tree_s = tree.display().to_string();
    let results = lab.path("results");
    let results_s = results.display().to_string();
    let mut base: Vec<&str> = ka.iter().map(String::as_str).collect();
    base.extend([
        "--fstests",
        &tree_s,
        "--fstype",
        "ext4",
        "--volumes",
        "test:64M,scratch:64M",
        "--results",
        &results_s,
    ]);

    let mut args = base.clone();
    args.extend(["--", "-g", "quick"]);
    let (code, r, stderr) = vm_json(&lab, &img, "fst", "fstests", &args);
    assert_eq!(code, 1, "one test fails:\n{r:#}\n{stderr}");
    assert_eq!(
        statuses(&r),
        [
            ("generic/001".to_string(), "pass".to_string()),
            ("generic/002".into(), "not_run".into()),
            ("generic/003".into(), "fail".into()),
        ]
    );
    assert_eq!(
        r["tests"][1]["reason"],
        "this test requires a valid $SCRATCH_DEV_POOL"
    );
    let diff = r["tests"][2]["diff"].as_str().unwrap();
    assert!(
        diff.contains("-size 4096") && diff.contains("+size 3072"),
        "{diff}"
    );
    assert_eq!(r["summary"]["ran"], 2);
    assert_eq!(r["summary"]["failed"], 1);
    assert_eq!(r["run"]["released"], true);
    // The guest's results landed in the host directory over 9p.
    assert!(results.join("generic/003.out.bad").exists());
    // The console showed the header the mimic printed from local.config.
    assert!(stderr.contains("FSTYP         -- ext4"), "{stderr}");
    let saved = lab.path("baseline.json");
    std::fs::write(&saved, serde_json::to_vec(&r).unwrap()).unwrap();

    // 001's golden output changes (a regression), 003's is fixed.
    std::fs::write(
        tree.join("tests/generic/001.out"),
        "QA output created by 001\nchanged\n",
    )
    .unwrap();
    std::fs::write(
        tree.join("tests/generic/003.out"),
        "QA output created by 003\nsize 3072\n",
    )
    .unwrap();
    let saved_s = saved.display().to_string();
    let mut args = base.clone();
    args.extend(["--baseline", &saved_s, "--", "-g", "quick"]);
    let (code, r, stderr) = vm_json(&lab, &img, "fst", "fstests", &args);
    assert_eq!(code, 1, "a regression:\n{r:#}\n{stderr}");
    let changes = r["changes"].as_array().unwrap();
    let got: Vec<(String, String, String, bool)> = changes
        .iter()
        .map(|c| {
            (
                c["test"].as_str().unwrap().to_string(),
                c["before"].as_str().unwrap_or("absent").to_string(),
                c["after"].as_str().unwrap_or("absent").to_string(),
                c["regression"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "generic/001".to_string(),
                "pass".to_string(),
                "fail".to_string(),
                true
            ),
            ("generic/003".into(), "fail".into(), "pass".into(), false),
        ]
    );
}
