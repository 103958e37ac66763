//! The module test workflow: a guest script that runs each step between
//! console markers, and the parser that turns the console into a report.
//!
//! Steps: `modinfo` (and the vermagic against the running kernel), `insmod`,
//! `loaded` (lsmod, /proc/modules, /sys/module/NAME), `io` (a write/read-back
//! on a leased volume while the module is loaded), `cycles` (N rmmod/insmod),
//! `rmmod`; then the kernel log since the test began is printed and scanned
//! for BUG, WARNING, Oops, Call Trace, lockdep and KASAN reports.

use serde::Serialize;

const STEP: &str = "@@devpool-step:";
const LOG_BEGIN: &str = "@@devpool-log-begin@@";
const LOG_END: &str = "@@devpool-log-end@@";
/// Written to the kernel log before the first step; the scan starts there.
const KMSG_MARK: &str = "devpool-module-test-begins";

#[derive(Debug, Clone)]
pub struct ModuleTest {
    /// The module file inside the guest.
    pub path: String,
    /// The module's name (as /proc/modules shows it).
    pub name: String,
    pub params: String,
    pub cycles: u32,
    /// Block device for the I/O load (none: the step is skipped).
    pub io_device: Option<String>,
}

impl ModuleTest {
    pub fn script(&self) -> String {
        let q = crate::guest::sh_quote;
        let (path, name, params) = (q(&self.path), q(&self.name), &self.params);
        let mut s = format!(
            "begin() {{ echo \"{STEP}$1:begin@@\"; }}\n\
             end() {{ echo \"{STEP}$1:end:$2:$3@@\"; case $2 in pass|skipped) ;; *) failed=1;; esac; }}\n\
             failed=0\n\
             echo {KMSG_MARK} > /dev/kmsg\n\
             # busybox runs its own applet for a bare name; kmod's modinfo reads a file.\n\
             MODINFO=/sbin/modinfo; [ -x $MODINFO ] || MODINFO=modinfo\n\
             begin modinfo\n\
             $MODINFO {path}; rc=$?\n\
             vm=$($MODINFO -F vermagic {path} 2>/dev/null | cut -d' ' -f1)\n\
             if [ $rc -ne 0 ]; then end modinfo fail \"modinfo exited $rc\"\n\
             elif [ \"$vm\" != \"$(uname -r)\" ]; then end modinfo fail \"vermagic $vm is not the running kernel $(uname -r)\"\n\
             else end modinfo pass \"vermagic $vm\"; fi\n\
             begin insmod\n\
             if insmod {path} {params}; then end insmod pass \"\"; else end insmod fail \"insmod exited $?\"; fi\n\
             loaded() {{ grep -q \"^{n} \" /proc/modules && lsmod | grep -q \"^{n} \" && [ -d /sys/module/{n} ]; }}\n\
             begin loaded\n\
             grep \"^{n} \" /proc/modules; lsmod | grep \"^{n} \"; ls /sys/module/{n} 2>&1 | head -5\n\
             if loaded; then end loaded pass \"in lsmod, /proc/modules and /sys/module/{n}\"; else end loaded fail \"not in lsmod, /proc/modules or /sys/module\"; fi\n",
            n = name,
        );
        match &self.io_device {
            Some(dev) => s.push_str(&format!(
                "begin io\n\
                 dd if=/dev/urandom of=/tmp/io.bin bs=64k count=64 2>/dev/null\n\
                 if dd if=/tmp/io.bin of={d} bs=64k oflag=direct 2>&1 | tail -1 && \
                 dd if={d} of=/tmp/io.back bs=64k count=64 iflag=direct 2>/dev/null && cmp /tmp/io.bin /tmp/io.back; \
                 then end io pass \"4 MiB written to {d} and read back identical\"; \
                 else end io fail \"write/read-back on {d} failed or differed\"; fi\n",
                d = q(dev)
            )),
            None => s.push_str("begin io\nend io skipped \"no volume\"\n"),
        }
        s.push_str(&format!(
            "begin cycles\n\
             i=0; ok=1\n\
             while [ $i -lt {c} ]; do i=$((i+1))\n\
             if ! rmmod {name}; then end cycles fail \"rmmod failed in cycle $i\"; ok=0; break; fi\n\
             if loaded; then end cycles fail \"still loaded after rmmod in cycle $i\"; ok=0; break; fi\n\
             if ! insmod {path} {params}; then end cycles fail \"insmod failed in cycle $i\"; ok=0; break; fi\n\
             if ! loaded; then end cycles fail \"not loaded after insmod in cycle $i\"; ok=0; break; fi\n\
             done\n\
             [ $ok = 1 ] && end cycles pass \"{c} unload/load cycles\"\n\
             begin rmmod\n\
             if rmmod {name} && ! loaded; then end rmmod pass \"\"; else end rmmod fail \"the module did not unload\"; fi\n\
             echo {LOG_BEGIN}\n\
             dmesg | sed -n '/{KMSG_MARK}/,$p'\n\
             echo {LOG_END}\n\
             exit $failed\n",
            c = self.cycles,
        ));
        s
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pass,
    Fail,
    Skipped,
    /// The step began and the guest never finished it (crash, timeout).
    Incomplete,
    /// The guest never got to it.
    NotRun,
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub name: String,
    pub status: Status,
    pub detail: String,
    /// What the step printed.
    pub output: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// BUG, WARNING, Oops, Call Trace, lockdep or KASAN.
    pub kind: String,
    pub line: String,
    /// The report: the matching line and what follows it.
    pub excerpt: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModuleReport {
    pub module: String,
    pub steps: Vec<Step>,
    pub findings: Vec<Finding>,
    /// The kernel log from the start of the test (or the console when the
    /// guest died before printing it).
    pub log: String,
    pub passed: bool,
}

const STEPS: [&str; 6] = ["modinfo", "insmod", "loaded", "io", "cycles", "rmmod"];

/// What a kernel log line reports, if anything.
pub fn classify(line: &str) -> Option<&'static str> {
    // Strip "[    1.234567] " timestamps.
    let text = match line.trim_start().strip_prefix('[') {
        Some(rest) => rest.split_once(']').map(|(_, t)| t).unwrap_or(rest),
        None => line,
    }
    .trim_start();
    if text.contains("KASAN") {
        Some("KASAN")
    } else if text.contains("possible circular locking dependency")
        || text.contains("possible recursive locking")
        || text.contains("inconsistent lock state")
        || text.contains("lockdep")
        || text.contains("suspicious RCU usage")
    {
        Some("lockdep")
    } else if text.starts_with("BUG:") || text.starts_with("kernel BUG at") {
        Some("BUG")
    } else if text.starts_with("WARNING:") {
        Some("WARNING")
    } else if text.starts_with("Oops") || text.contains("] Oops:") {
        Some("Oops")
    } else if text.starts_with("Call Trace:") {
        Some("Call Trace")
    } else {
        None
    }
}

/// Kernel log reports with an excerpt of up to 25 lines each.
pub fn scan(log: &str) -> Vec<Finding> {
    let lines: Vec<&str> = log.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if let Some(kind) = classify(l) {
            // A Call Trace inside a report already found is part of it.
            if kind == "Call Trace"
                && out
                    .iter()
                    .any(|f: &Finding| f.excerpt.lines().any(|x| x == *l))
            {
                continue;
            }
            let end = (i + 25).min(lines.len());
            let stop = lines[i + 1..end]
                .iter()
                .position(|x| x.contains("---[ end trace"))
                .map(|p| i + 2 + p)
                .unwrap_or(end);
            out.push(Finding {
                kind: kind.to_string(),
                line: l.to_string(),
                excerpt: lines[i..stop].join("\n"),
            });
        }
    }
    out
}

/// Turn the console of a module-test run into a report.
pub fn parse(module: &str, console: &str) -> ModuleReport {
    let mut steps: Vec<Step> = STEPS
        .iter()
        .map(|n| Step {
            name: n.to_string(),
            status: Status::NotRun,
            detail: String::new(),
            output: String::new(),
        })
        .collect();
    let mut current: Option<usize> = None;
    let mut log = String::new();
    let mut in_log = false;
    let mut log_seen = false;
    for line in console.lines() {
        if line.contains(LOG_BEGIN) {
            in_log = true;
            log_seen = true;
            continue;
        }
        if line.contains(LOG_END) {
            in_log = false;
            continue;
        }
        if in_log {
            log.push_str(line);
            log.push('\n');
            continue;
        }
        if let Some(rest) = line.find(STEP).map(|i| &line[i + STEP.len()..]) {
            let rest = rest.trim_end().trim_end_matches("@@");
            let mut parts = rest.splitn(4, ':');
            let name = parts.next().unwrap_or("");
            let what = parts.next().unwrap_or("");
            let Some(idx) = steps.iter().position(|s| s.name == name) else {
                continue;
            };
            if what == "begin" {
                steps[idx].status = Status::Incomplete;
                current = Some(idx);
            } else if what == "end" {
                steps[idx].status = match parts.next() {
                    Some("pass") => Status::Pass,
                    Some("skipped") => Status::Skipped,
                    _ => Status::Fail,
                };
                steps[idx].detail = parts.next().unwrap_or("").to_string();
                current = None;
            }
            continue;
        }
        if let Some(i) = current {
            steps[i].output.push_str(line);
            steps[i].output.push('\n');
        }
    }
    if !log_seen {
        // The guest died before printing its log: the console has what the
        // kernel printed (errors and worse).
        log = console.to_string();
    }
    let findings = scan(&log);
    let passed = findings.is_empty()
        && steps
            .iter()
            .all(|s| matches!(s.status, Status::Pass | Status::Skipped));
    ModuleReport {
        module: module.to_string(),
        steps,
        findings,
        log,
        passed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_run_passes_and_a_warning_fails() {
        let mut console = String::new();
        for s in STEPS {
            console.push_str(&format!(
                "{STEP}{s}:begin@@\nout of {s}\n{STEP}{s}:end:pass:fine@@\n"
            ));
        }
        console.push_str(&format!(
            "{LOG_BEGIN}\n[ 1.0] devpool-module-test-begins\n{LOG_END}\n"
        ));
        let r = parse("m", &console);
        assert!(r.passed, "{r:?}");
        assert_eq!(r.steps[0].output, "out of modinfo\n");
        let warned = console.replace(
            "[ 1.0] devpool-module-test-begins\n",
            "[ 1.0] devpool-module-test-begins\n[ 2.0] ------------[ cut here ]------------\n\
             [ 2.0] WARNING: CPU: 0 PID: 1 at m.c:5 init+0x1/0x2 [m]\n[ 2.0] Modules linked in: m\n\
             [ 2.0] Call Trace:\n[ 2.0]  <TASK>\n[ 2.0] ---[ end trace 0000000000000000 ]---\n",
        );
        let r = parse("m", &warned);
        assert!(!r.passed);
        assert_eq!(r.findings.len(), 1, "{:?}", r.findings);
        assert_eq!(r.findings[0].kind, "WARNING");
        assert!(r.findings[0].excerpt.contains("Call Trace:"));
        assert!(
            r.findings[0]
                .excerpt
                .ends_with("---[ end trace 0000000000000000 ]---")
        );
    }

    #[test]
    fn a_guest_that_dies_mid_step_leaves_it_incomplete_and_the_rest_not_run() {
        let console = format!(
            "{STEP}modinfo:begin@@\n{STEP}modinfo:end:pass:v@@\n{STEP}insmod:begin@@\n\
             [ 3.0] BUG: kernel NULL pointer dereference, address: 0000000000000000\n[ 3.0] Oops: 0002 [#1] SMP\n"
        );
        let r = parse("m", &console);
        assert_eq!(r.steps[1].status, Status::Incomplete);
        assert_eq!(r.steps[2].status, Status::NotRun);
        let kinds: Vec<&str> = r.findings.iter().map(|f| f.kind.as_str()).collect();
        assert_eq!(kinds, ["BUG", "Oops"]);
        assert!(!r.passed);
    }

    #[test]
    fn classification_ignores_ordinary_lines() {
        assert_eq!(classify("[ 1.0] hello: loaded"), None);
        assert_eq!(
            classify("[ 1.0] BUG: KASAN: use-after-free in f"),
            Some("KASAN")
        );
        assert_eq!(
            classify("[ 1.0] WARNING: possible circular locking dependency detected"),
            Some("lockdep")
        );
        assert_eq!(classify("[ 1.0] kernel BUG at mm/x.c:1!"), Some("BUG"));
    }
}
