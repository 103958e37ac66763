//! fstests in a guest: the script that makes the test file system and runs
//! `check`, the parser for `check`'s output, and the comparison with a saved
//! run.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const FSTYPES: [&str; 3] = ["ext4", "xfs", "btrfs"];

/// Where the fstests tree and the results directory appear in the guest.
pub const GUEST_TREE: &str = "/fstests";
pub const GUEST_RESULTS: &str = "/results";
pub const GUEST_CONFIG: &str = "/devpool/local.config";

/// The guest side: make `FSTYP` on TEST_DEV (fstests expects one there),
/// then run `check` with the run's arguments ("$@").
pub fn script(fstype: &str) -> String {
    let mkfs = match fstype {
        "xfs" => "mkfs.xfs -f -q",
        "btrfs" => "mkfs.btrfs -f -q",
        _ => "mkfs.ext4 -F -q",
    };
    format!(
        ". {GUEST_CONFIG}\n\
         export HOST_OPTIONS={GUEST_CONFIG}\n\
         mkdir -p \"$TEST_DIR\" \"$SCRATCH_MNT\"\n\
         # A bare mkfs.* name would run busybox's applet; use the host's.\n\
         mkfs=\"\"; for d in /sbin /usr/sbin; do [ -x $d/{prog} ] && mkfs=\"$d/{mkfs}\" && break; done\n\
         [ -n \"$mkfs\" ] || {{ echo \"devpool: {prog} is not in the guest (is it installed on the host?)\"; exit 90; }}\n\
         echo \"devpool: making {fstype} on TEST_DEV $TEST_DEV\"\n\
         $mkfs \"$TEST_DEV\" || {{ echo \"devpool: mkfs on $TEST_DEV failed\"; exit 90; }}\n\
         cd {GUEST_TREE} || exit 91\n\
         ./check \"$@\"\n",
        prog = mkfs.split(' ').next().unwrap_or("mkfs"),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TestStatus {
    Pass,
    Fail,
    NotRun,
    Expunged,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestResult {
    pub name: String,
    pub status: TestStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<u64>,
    /// Why it did not run, or how it failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// For a failure: the diff of the output against the golden output.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub diff: String,
}

/// `generic/001`, `xfs/123`, `ext4/1001`: a test name at the start of a line.
fn test_name(line: &str) -> Option<&str> {
    let word = line.split_whitespace().next()?;
    let (dir, num) = word.split_once('/')?;
    let ok = !dir.is_empty()
        && dir
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !num.is_empty()
        && num.bytes().all(|b| b.is_ascii_digit());
    (ok && line.starts_with(word)).then_some(word)
}

fn seconds_of(rest: &str) -> Option<u64> {
    rest.split_whitespace()
        .rev()
        .find_map(|w| w.strip_suffix('s').and_then(|n| n.parse().ok()))
}

/// Per-test results from `check`'s output. The summary lines (`Failures:`,
/// `Not run:`) settle what a test line alone leaves open, e.g. a file system
/// check that failed after the test's own output matched.
pub fn parse_check(output: &str) -> Vec<TestResult> {
    let mut out: Vec<TestResult> = Vec::new();
    let mut last: Option<usize> = None;
    let mut failures: Vec<String> = Vec::new();
    let mut not_run: Vec<String> = Vec::new();
    for line in output.lines() {
        if let Some(list) = line.strip_prefix("Failures:") {
            failures.extend(list.split_whitespace().map(str::to_string));
            last = None;
            continue;
        }
        if let Some(list) = line.strip_prefix("Not run:") {
            not_run.extend(list.split_whitespace().map(str::to_string));
            last = None;
            continue;
        }
        if let Some(name) = test_name(line) {
            let rest = line[name.len()..].trim();
            let (status, reason) = if let Some(r) = rest.split_once("[not run]") {
                (TestStatus::NotRun, r.1.trim().to_string())
            } else if rest.contains("[expunged]") {
                (TestStatus::Expunged, String::new())
            } else if rest.contains("output mismatch") || rest.contains("[failed") {
                (TestStatus::Fail, rest.trim_start_matches("- ").to_string())
            } else {
                (TestStatus::Pass, String::new())
            };
            let r = TestResult {
                name: name.to_string(),
                status,
                seconds: if status == TestStatus::Pass {
                    seconds_of(rest)
                } else {
                    None
                },
                reason,
                diff: String::new(),
            };
            match out.iter().position(|t| t.name == name) {
                Some(i) => {
                    out[i] = r;
                    last = Some(i);
                }
                None => {
                    out.push(r);
                    last = Some(out.len() - 1);
                }
            }
            continue;
        }
        // Indented lines after a failed test are its diff; other lines after
        // a test (a file system check's complaint) explain a failure.
        if let Some(i) = last {
            let t = &mut out[i];
            if let Some(d) = line.strip_prefix("    ") {
                if t.status == TestStatus::Fail {
                    t.diff.push_str(d);
                    t.diff.push('\n');
                }
            } else if !line.trim().is_empty()
                && !line.starts_with("Ran:")
                && !line.starts_with("Passed all")
                && !line.starts_with("Failed ")
            {
                if !t.reason.is_empty() {
                    t.reason.push('\n');
                }
                t.reason.push_str(line.trim());
            }
        }
    }
    for t in &mut out {
        if failures.contains(&t.name) {
            t.status = TestStatus::Fail;
            t.seconds = None;
        } else if not_run.contains(&t.name) && t.status != TestStatus::NotRun {
            t.status = TestStatus::NotRun;
        } else if t.status == TestStatus::Pass {
            // A pass needs no explanation; anything printed after it was noise.
            t.reason.clear();
        }
    }
    out
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub ran: usize,
    pub passed: usize,
    pub failed: usize,
    pub not_run: usize,
}

pub fn summarize(tests: &[TestResult]) -> Summary {
    let mut s = Summary::default();
    for t in tests {
        match t.status {
            TestStatus::Pass => s.passed += 1,
            TestStatus::Fail => s.failed += 1,
            TestStatus::NotRun | TestStatus::Expunged => s.not_run += 1,
        }
    }
    s.ran = s.passed + s.failed;
    s
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub test: String,
    /// `None`: the test is not in that run.
    pub before: Option<TestStatus>,
    pub after: Option<TestStatus>,
    /// A test that passed (or was absent) and now fails.
    pub regression: bool,
}

/// What changed between a saved run and this one, by test name.
pub fn compare(baseline: &[TestResult], now: &[TestResult]) -> Vec<Change> {
    let before: BTreeMap<&str, TestStatus> = baseline
        .iter()
        .map(|t| (t.name.as_str(), t.status))
        .collect();
    let after: BTreeMap<&str, TestStatus> =
        now.iter().map(|t| (t.name.as_str(), t.status)).collect();
    let mut names: Vec<&str> = before.keys().chain(after.keys()).copied().collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter_map(|n| {
            let (b, a) = (before.get(n).copied(), after.get(n).copied());
            (b != a).then(|| Change {
                test: n.to_string(),
                before: b,
                after: a,
                regression: a == Some(TestStatus::Fail),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHECK: &str = "\
FSTYP         -- ext4
PLATFORM      -- Linux/x86_64 guest 6.12.95+deb12-amd64
MKFS_OPTIONS  -- /dev/vdb
MOUNT_OPTIONS -- -o acl,user_xattr /dev/vdb /mnt/scratch

generic/001 3s ...  2s
generic/002       [not run] this test requires a valid $SCRATCH_DEV
generic/003 - output mismatch (see /results/generic/003.out.bad)
    --- tests/generic/003.out\t2024-01-01
    +++ /results/generic/003.out.bad\t2024-01-01
    @@ -1,2 +1,2 @@
     QA output created by 003
    -Silence is golden
    +Oops
    ...
    (Run 'diff -u /fstests/tests/generic/003.out /results/generic/003.out.bad'  to see the entire diff)
generic/004 1s ...  1s
_check_generic_filesystem: filesystem on /dev/vdb is inconsistent
(see /results/generic/004.full for details)
generic/005       [expunged]
Ran: generic/001 generic/003 generic/004
Not run: generic/002
Failures: generic/003 generic/004
Failed 2 of 3 tests
";

    #[test]
    fn check_output_becomes_per_test_results() {
        let r = parse_check(CHECK);
        let st: Vec<(&str, TestStatus)> = r.iter().map(|t| (t.name.as_str(), t.status)).collect();
        assert_eq!(
            st,
            [
                ("generic/001", TestStatus::Pass),
                ("generic/002", TestStatus::NotRun),
                ("generic/003", TestStatus::Fail),
                ("generic/004", TestStatus::Fail),
                ("generic/005", TestStatus::Expunged),
            ]
        );
        assert_eq!(r[0].seconds, Some(2));
        assert_eq!(r[1].reason, "this test requires a valid $SCRATCH_DEV");
        assert!(r[2].diff.contains("+Oops"));
        assert!(r[3].reason.contains("is inconsistent"));
        assert_eq!(
            summarize(&r),
            Summary {
                ran: 3,
                passed: 1,
                failed: 2,
                not_run: 2
            }
        );
    }

    #[test]
    fn only_changes_are_reported_against_a_baseline() {
        let base = parse_check(CHECK);
        let mut now = base.clone();
        now[0].status = TestStatus::Fail; // regression
        now[2].status = TestStatus::Pass; // fixed
        now.remove(4); // gone
        now[1].diff = "irrelevant".into(); // same status: not a change
        let c = compare(&base, &now);
        let names: Vec<&str> = c.iter().map(|c| c.test.as_str()).collect();
        assert_eq!(names, ["generic/001", "generic/003", "generic/005"]);
        assert!(c[0].regression);
        assert!(!c[1].regression);
        assert_eq!(c[2].after, None);
    }

    #[test]
    fn test_names_are_dir_slash_number_at_line_start() {
        assert_eq!(test_name("generic/001 3s ... 2s"), Some("generic/001"));
        assert_eq!(test_name("ext4/1001 [not run] x"), Some("ext4/1001"));
        assert_eq!(test_name("  generic/001"), None);
        assert_eq!(test_name("Ran: generic/001"), None);
        assert_eq!(test_name("/dev/vdb is inconsistent"), None);
    }
}
