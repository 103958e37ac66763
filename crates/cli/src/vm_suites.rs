//! The test suites run in a guest: a kernel module's load/unload test and
//! fstests. Each is a computation that returns its report (used by the CLI
//! and the MCP server alike) and a text rendering of that report.

use crate::args::{Global, VmArgs};
use crate::vm_cmds::{Extras, RunReport, boot, print_report_summary};
use anyhow::{Context, Result, bail};
use devpool_format::units::{Amount, Bytes};
use devpool_pool::spec::{self, VolumeSpec};
use devpool_vm::fstests::{self as ft, Change, Summary, TestResult, TestStatus};
use devpool_vm::guest::{AddFile, Share, disk_name};
use devpool_vm::module_test::{self, ModuleReport, ModuleTest, Status};
use devpool_vm::runner::Ending;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn kmod_binary() -> Option<PathBuf> {
    ["/usr/bin/kmod", "/bin/kmod", "/sbin/kmod"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A module test's outcome: the module's steps and kernel log findings, and
/// the VM run that produced them.
#[derive(Debug, Serialize)]
pub struct ModuleTestResult {
    #[serde(flatten)]
    pub report: ModuleReport,
    pub run: RunReport,
}

impl ModuleTestResult {
    pub fn passed(&self) -> bool {
        self.report.passed && self.run.ending == Ending::Exited
    }

    /// 0 passed, 1 failed, else the run's status (timeout, cancel, death).
    pub fn status(&self) -> i32 {
        match self.run.ending {
            Ending::Exited if self.report.passed => 0,
            Ending::Exited => 1,
            _ => self.run.status(),
        }
    }

    pub fn text(&self) -> String {
        let r = &self.report;
        let mut t = format!(
            "module test of {} on {} ({}): {}\n",
            r.module,
            self.run.kernel_version,
            self.run.accel.to_uppercase(),
            if self.passed() { "PASSED" } else { "FAILED" }
        );
        for s in &r.steps {
            let status = match s.status {
                Status::Pass => "pass",
                Status::Fail => "FAIL",
                Status::Skipped => "skipped",
                Status::Incomplete => "INCOMPLETE",
                Status::NotRun => "not run",
            };
            let _ = writeln!(t, "  {:<8} {:<10} {}", s.name, status, s.detail);
            if s.status == Status::Fail {
                for l in s.output.lines().take(20) {
                    let _ = writeln!(t, "      | {l}");
                }
            }
        }
        if r.findings.is_empty() {
            t.push_str(
                "  kernel log: clean (no BUG, WARNING, Oops, Call Trace, lockdep or KASAN report)\n",
            );
        } else {
            let _ = writeln!(t, "  kernel log: {} report(s)", r.findings.len());
            for f in &r.findings {
                let _ = writeln!(t, "  --- {} ---", f.kind);
                for l in f.excerpt.lines() {
                    let _ = writeln!(t, "      {l}");
                }
            }
        }
        t
    }
}

/// Load `module` in a guest, check it, cycle it `cycles` times with I/O on
/// the first of `specs` (when there is one), unload it, and read the kernel
/// log for reports.
pub fn module_test_run(
    g: &Global,
    vm: &VmArgs,
    module: &Path,
    cycles: u32,
    params: &str,
    specs: &[VolumeSpec],
    mut extras: Extras,
) -> Result<ModuleTestResult> {
    let file = module.display().to_string();
    if !module.is_file() {
        bail!("--module {file}: no such file");
    }
    if !file.ends_with(".ko") {
        bail!("--module {file}: expected a .ko file (decompress .ko.xz/.ko.zst first)");
    }
    if params.contains(['\n', ';', '&', '|', '`', '$']) {
        bail!("--params '{params}': only NAME=VALUE pairs separated by spaces");
    }
    let name = devpool_vm::kernel::module_name(&file);
    let guest_path = format!("/lib/modules/devpool-test/{name}.ko");
    let test = ModuleTest {
        path: guest_path.clone(),
        name: name.clone(),
        params: params.to_string(),
        cycles,
        io_device: (!specs.is_empty()).then(|| disk_name(0)),
    };
    extras.files.push(AddFile {
        src: module.to_path_buf(),
        dst: guest_path,
    });
    // busybox's modinfo looks modules up by name; kmod's reads a file.
    match kmod_binary() {
        Some(k) => extras.files.push(AddFile {
            src: k,
            dst: "/sbin/modinfo".into(),
        }),
        None => eprintln!("devpool: kmod is not installed; the guest uses busybox's modinfo"),
    }
    extras.contents.push((
        "devpool/module-test.sh".into(),
        test.script().into_bytes(),
        0o755,
    ));
    let command = ["sh".to_string(), "/devpool/module-test.sh".into()];
    let (run, outcome) = boot(g, vm, specs, extras, &command, false)?;
    let report = module_test::parse(&name, &outcome.console);
    Ok(ModuleTestResult { report, run })
}

/// `devpool vm module-test`.
pub fn module_test(
    g: &Global,
    vm: &VmArgs,
    module: &Path,
    cycles: u32,
    params: &str,
    volumes: &str,
) -> Result<i32> {
    let specs = if volumes.is_empty() {
        Vec::new()
    } else {
        spec::parse_volumes(volumes)?
    };
    let r = module_test_run(g, vm, module, cycles, params, &specs, Extras::default())?;
    print_suite(g, &r, || r.text(), &r.run)?;
    Ok(r.status())
}

/// A suite's result as JSON or text, then the VM run's summary line.
fn print_suite(
    g: &Global,
    r: &impl Serialize,
    text: impl FnOnce() -> String,
    run: &RunReport,
) -> Result<()> {
    if g.json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        print!("{}", text());
    }
    print_report_summary(run);
    Ok(())
}

/// Host programs fstests needs in the guest, where the host has them.
fn fstests_programs(fstype: &str) -> Vec<&'static str> {
    let mut p = vec![
        "/bin/bash",
        "/usr/bin/xfs_io",
        "/sbin/blkid",
        "/usr/bin/findmnt",
    ];
    p.extend(match fstype {
        "xfs" => &[
            "/sbin/mkfs.xfs",
            "/sbin/xfs_repair",
            "/usr/sbin/xfs_db",
            "/sbin/xfs_admin",
        ][..],
        "btrfs" => &["/bin/btrfs", "/sbin/mkfs.btrfs", "/sbin/fsck.btrfs"][..],
        _ => &[
            "/sbin/mkfs.ext4",
            "/sbin/e2fsck",
            "/sbin/fsck.ext4",
            "/sbin/dumpe2fs",
            "/sbin/tune2fs",
            "/sbin/debugfs",
            "/etc/mke2fs.conf",
        ][..],
    });
    p.into_iter().filter(|f| Path::new(f).exists()).collect()
}

/// The full diff of a failed test's output against its golden output.
fn golden_diff(tree: &Path, results: &Path, test: &str) -> Option<String> {
    let golden = std::fs::read_to_string(tree.join("tests").join(format!("{test}.out"))).ok()?;
    let bad = std::fs::read_to_string(results.join(format!("{test}.out.bad"))).ok()?;
    Some(
        similar::TextDiff::from_lines(&golden, &bad)
            .unified_diff()
            .header(&format!("tests/{test}.out"), &format!("{test}.out.bad"))
            .to_string(),
    )
}

fn status_word(s: Option<TestStatus>) -> &'static str {
    match s {
        Some(TestStatus::Pass) => "pass",
        Some(TestStatus::Fail) => "FAIL",
        Some(TestStatus::NotRun) => "not run",
        Some(TestStatus::Expunged) => "expunged",
        None => "absent",
    }
}

/// The per-test results of a saved `--json` fstests report.
pub fn load_baseline(path: &Path) -> Result<Vec<TestResult>> {
    let text = std::fs::read(path).with_context(|| format!("--baseline {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_slice(&text).with_context(|| {
        format!(
            "--baseline {}: not a devpool fstests --json report",
            path.display()
        )
    })?;
    serde_json::from_value(v["tests"].clone())
        .with_context(|| format!("--baseline {}: no 'tests' list in it", path.display()))
}

/// Where fstests' devices come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSource {
    /// Volumes leased from the pool (released afterwards unless kept).
    Pool,
    /// Sparse image files made for this run and deleted afterwards.
    ImageFiles,
}

/// One fstests run to do.
pub struct FstestsJob {
    pub tree: PathBuf,
    pub fstype: String,
    /// Roles and sizes: test, and scratch or pool1..N, logwrites.
    pub specs: Vec<VolumeSpec>,
    pub devices: DeviceSource,
    pub baseline: Option<Vec<TestResult>>,
    /// The host directory for check's results (default: one under the state dir).
    pub results: Option<PathBuf>,
    pub check_args: Vec<String>,
}

/// What a fstests run found.
#[derive(Debug, Serialize)]
pub struct FstestsResult {
    pub fstype: String,
    pub results_dir: PathBuf,
    pub summary: Summary,
    pub tests: Vec<TestResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changes: Option<Vec<Change>>,
    pub run: RunReport,
}

impl FstestsResult {
    /// check ran nothing and failed: a setup problem, not a test result.
    fn ran_nothing(&self) -> bool {
        self.run.ending == Ending::Exited && self.tests.is_empty() && self.run.exit_code != Some(0)
    }

    /// 0 no failure (or no regression against the baseline), 1 failures,
    /// else the run's status.
    pub fn status(&self) -> i32 {
        if self.run.ending != Ending::Exited || self.ran_nothing() {
            return self.run.status();
        }
        let bad = match &self.changes {
            Some(c) => c.iter().any(|c| c.regression),
            None => self.summary.failed > 0,
        };
        i32::from(bad)
    }

    pub fn text(&self) -> String {
        let s = &self.summary;
        let mut t = format!(
            "fstests on {} ({}, {}): {} ran, {} passed, {} failed, {} not run\n",
            self.run.kernel_version,
            self.fstype,
            self.run.accel.to_uppercase(),
            s.ran,
            s.passed,
            s.failed,
            s.not_run
        );
        match &self.changes {
            Some(c) => {
                let _ = writeln!(
                    t,
                    "changes since the baseline ({} of {} tests):",
                    c.len(),
                    self.tests.len()
                );
                for ch in c {
                    let _ = writeln!(
                        t,
                        "  {:<14} {} -> {}{}",
                        ch.test,
                        status_word(ch.before),
                        status_word(ch.after),
                        if ch.regression { "  (regression)" } else { "" }
                    );
                }
            }
            None => {
                for x in &self.tests {
                    let extra = match x.status {
                        TestStatus::Pass => x.seconds.map(|s| format!("{s}s")).unwrap_or_default(),
                        _ => x.reason.lines().next().unwrap_or("").to_string(),
                    };
                    let _ = writeln!(
                        t,
                        "  {:<14} {:<9} {extra}",
                        x.name,
                        status_word(Some(x.status))
                    );
                    if x.status == TestStatus::Fail {
                        for l in x.diff.lines().take(40) {
                            let _ = writeln!(t, "      | {l}");
                        }
                    }
                }
            }
        }
        if self.ran_nothing() {
            let _ = writeln!(
                t,
                "check ran no tests (exit status {:?}): see the console output",
                self.run.exit_code
            );
        }
        let _ = writeln!(t, "results: {}", self.results_dir.display());
        t
    }
}

/// Image files for a run that does not use the pool; removed on drop.
struct ImageFiles {
    dir: PathBuf,
}

impl ImageFiles {
    fn create(g: &Global, specs: &[VolumeSpec]) -> Result<(ImageFiles, Vec<PathBuf>)> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = g
            .state_dir
            .join("run")
            .join(format!("files-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let files = ImageFiles { dir };
        let mut paths = Vec::new();
        for s in specs {
            let p = files.dir.join(format!("{}.img", s.role));
            let Amount::Bytes(Bytes(size)) = s.size.amount else {
                bail!("role '{}': an image file needs a size in bytes", s.role);
            };
            let f =
                std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))?;
            f.set_len(size)
                .with_context(|| format!("sizing {} to {size} bytes", p.display()))?;
            paths.push(p);
        }
        Ok((files, paths))
    }
}

impl Drop for ImageFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Run fstests' `check` in a guest on the job's devices and collect
/// per-test results (with golden-output diffs of the failures) and, given
/// a baseline, what changed.
pub fn fstests_run(
    g: &Global,
    vm: &VmArgs,
    job: FstestsJob,
    mut extras: Extras,
    stream: bool,
) -> Result<FstestsResult> {
    let fstype = job.fstype.as_str();
    if !ft::FSTYPES.contains(&fstype) {
        bail!("--fstype {fstype}: one of {}", ft::FSTYPES.join(", "));
    }
    let tree = std::fs::canonicalize(&job.tree)
        .with_context(|| format!("--fstests {}", job.tree.display()))?;
    if !tree.join("check").is_file() {
        bail!(
            "--fstests {}: not an fstests tree (no ./check; build xfstests-dev with make first)",
            tree.display()
        );
    }
    let specs = job.specs;
    if !specs.iter().any(|s| s.role == "test") {
        let roles: Vec<&str> = specs.iter().map(|s| s.role.as_str()).collect();
        bail!(
            "--volumes {}: fstests needs a 'test' volume (TEST_DEV)",
            roles.join(",")
        );
    }
    let results = match job.results {
        Some(r) => r,
        None => g.state_dir.join("fstests").join(format!(
            "{}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            std::process::id()
        )),
    };
    std::fs::create_dir_all(&results).with_context(|| format!("creating {}", results.display()))?;
    let results = std::fs::canonicalize(&results)?;

    // local.config from the guest device names: the leased volumes (or the
    // image files) are attached in role order.
    let devs: Vec<(String, String)> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| (s.role.clone(), disk_name(i)))
        .collect();
    let mut config = spec::fstests_config(&devs, "/mnt");
    config.push_str(&format!(
        "export FSTYP=\"{fstype}\"\nexport RESULT_BASE=\"{}\"\n",
        ft::GUEST_RESULTS
    ));
    for p in fstests_programs(fstype) {
        extras.files.push(AddFile {
            src: PathBuf::from(p),
            dst: p.to_string(),
        });
    }
    extras.contents.extend([
        (
            ft::GUEST_CONFIG.trim_start_matches('/').to_string(),
            config.into_bytes(),
            0o644,
        ),
        (
            "devpool/fstests.sh".into(),
            ft::script(fstype).into_bytes(),
            0o755,
        ),
    ]);
    extras
        .modules
        .extend([fstype.to_string(), "9pnet_virtio".into(), "9p".into()]);
    extras.shares.extend([
        Share {
            tag: "fstests".into(),
            host: tree.clone(),
            guest: ft::GUEST_TREE.into(),
            read_only: false,
        },
        Share {
            tag: "results".into(),
            host: results.clone(),
            guest: ft::GUEST_RESULTS.into(),
            read_only: false,
        },
    ]);
    extras.workdir = Some(ft::GUEST_TREE.into());
    let (_files, leased) = match job.devices {
        DeviceSource::Pool => (None, specs.as_slice()),
        DeviceSource::ImageFiles => {
            if !extras.disks.is_empty() {
                bail!("fstests on image files takes no other disks");
            }
            let (files, paths) = ImageFiles::create(g, &specs)?;
            extras.disks = paths;
            (Some(files), &[][..])
        }
    };
    let mut command = vec!["sh".to_string(), "/devpool/fstests.sh".into()];
    command.extend(job.check_args);
    let (run, outcome) = boot(g, vm, leased, extras, &command, stream)?;
    let mut tests = ft::parse_check(outcome.command_output());
    for t in &mut tests {
        if t.status == TestStatus::Fail
            && let Some(d) = golden_diff(&tree, &results, &t.name)
        {
            t.diff = d;
        }
    }
    let summary = ft::summarize(&tests);
    let changes = job.baseline.as_ref().map(|b| ft::compare(b, &tests));
    Ok(FstestsResult {
        fstype: fstype.to_string(),
        results_dir: results,
        summary,
        tests,
        changes,
        run,
    })
}

/// `devpool vm fstests`.
#[allow(clippy::too_many_arguments)]
pub fn fstests(
    g: &Global,
    vm: &VmArgs,
    tree: &Path,
    fstype: &str,
    volumes: &str,
    baseline: Option<&Path>,
    results: Option<&Path>,
    check_args: &[String],
) -> Result<i32> {
    let job = FstestsJob {
        tree: tree.to_path_buf(),
        fstype: fstype.to_string(),
        specs: spec::parse_volumes(volumes)?,
        devices: DeviceSource::Pool,
        baseline: baseline.map(load_baseline).transpose()?,
        results: results.map(Path::to_path_buf),
        check_args: check_args.to_vec(),
    };
    let r = fstests_run(g, vm, job, Extras::default(), true)?;
    print_suite(g, &r, || r.text(), &r.run)?;
    Ok(r.status())
}
