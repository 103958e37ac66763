//! Who holds a lease, in a form that survives PID reuse and reboots: the PID,
//! the PID's start time (clock ticks since boot, `/proc/PID/stat` field 22),
//! the boot id and the host. An owner is alive only if all of them match.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    pub start_ticks: u64,
    pub boot_id: String,
    pub host: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum Liveness {
    Alive,
    /// Dead, with why we know.
    Dead(String),
    /// Recorded by another host: devpool cannot tell, so it never reaps it.
    OtherHost(String),
}

impl Liveness {
    pub fn is_alive(&self) -> bool {
        !matches!(self, Liveness::Dead(_))
    }
}

pub fn boot_id() -> String {
    // It cannot change while this process runs: read once.
    static BOOT_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT_ID
        .get_or_init(|| {
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        })
        .clone()
}

/// Start time of `pid` in clock ticks since boot, if the process exists.
pub fn start_ticks(pid: u32) -> Option<u64> {
    process_stat(pid).map(|s| s.start_ticks)
}

/// What /proc/PID/stat says of a process that devpool needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcStat {
    /// Field 3: `R`, `S`, `D`, … `Z` for a zombie, `X` for one being removed.
    state: u8,
    /// Field 22: start time in clock ticks since boot.
    start_ticks: u64,
}

impl ProcStat {
    /// A process that has exited but is still listed: a zombie whose parent
    /// has not collected it yet. It holds no descriptors and runs no code,
    /// and it can stay so indefinitely (a parent that never waits, a
    /// container whose first process does not reap orphans).
    fn has_exited(&self) -> bool {
        matches!(self.state, b'Z' | b'X')
    }
}

fn process_stat(pid: u32) -> Option<ProcStat> {
    // One read (a stat line is far shorter than the buffer); read_to_string
    // would stat the file and read it in growing pieces.
    let mut buf = [0u8; 4096];
    let n = std::io::Read::read(
        &mut std::fs::File::open(format!("/proc/{pid}/stat")).ok()?,
        &mut buf,
    )
    .ok()?;
    parse_stat(&buf[..n])
}

/// The state and start time in a /proc/PID/stat line. The command name
/// (field 2) may hold spaces, ')' and bytes that are not UTF-8: the fields
/// resume after the last ')'. Field 3 is the first one after it; field 22 is
/// starttime.
fn parse_stat(stat: &[u8]) -> Option<ProcStat> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    let mut fields = rest.split_whitespace();
    let state = match fields.next()?.as_bytes() {
        [c] => *c,
        _ => return None,
    };
    let start_ticks = fields.nth(18)?.parse().ok()?;
    Some(ProcStat { state, start_ticks })
}

/// LVM2 tags allow `[A-Za-z0-9_+.\-/=!:#&]`; anything else (in a host
/// name) becomes `_`.
pub(crate) fn tag_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+.-/=!:#&".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Owner {
    /// The owner record for a live process on this host, or why `pid` cannot
    /// own a lease ("no such process", or that it has exited).
    pub fn of_pid(pid: u32) -> Result<Owner, String> {
        let stat = process_stat(pid).ok_or_else(|| "no such process".to_string())?;
        if stat.has_exited() {
            return Err(exited(pid));
        }
        Ok(Owner {
            pid,
            start_ticks: stat.start_ticks,
            boot_id: boot_id(),
            host: devpool_engine::engine::hostname(),
        })
    }

    /// The owner record for this process (a lease held for as long as the
    /// command runs: `devpool run`, `vm boot`, the MCP server).
    pub fn of_this_process() -> Result<Owner, String> {
        Owner::of_pid(std::process::id()).map_err(|why| format!("this process as owner: {why}"))
    }

    pub fn liveness(&self) -> Liveness {
        self.liveness_on(&devpool_engine::engine::hostname(), &boot_id())
    }

    /// Liveness as seen from `host` in boot `boot` (read once for many owners).
    pub fn liveness_on(&self, host: &str, boot: &str) -> Liveness {
        // Tags keep LVM2's alphabet: a host called `(none)` (an initramfs)
        // was recorded as `_none_`.
        if tag_safe(&self.host) != tag_safe(host) {
            return Liveness::OtherHost(format!("owner is on host {}", self.host));
        }
        if self.boot_id != boot {
            return Liveness::Dead(format!(
                "recorded in another boot ({}); the machine has rebooted since",
                self.boot_id
            ));
        }
        match process_stat(self.pid) {
            None => Liveness::Dead(format!("PID {} no longer exists", self.pid)),
            Some(s) if s.start_ticks != self.start_ticks => Liveness::Dead(format!(
                "PID {} now belongs to another process (started at tick {}, owner started at {})",
                self.pid, s.start_ticks, self.start_ticks
            )),
            Some(s) if s.has_exited() => Liveness::Dead(exited(self.pid)),
            Some(_) => Liveness::Alive,
        }
    }
}

fn exited(pid: u32) -> String {
    format!("PID {pid} has exited (a zombie its parent has not collected yet)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_a_changed_start_time_is_not() {
        let me = Owner::of_pid(std::process::id()).unwrap();
        assert_eq!(me.liveness(), Liveness::Alive);
        let reused = Owner {
            start_ticks: me.start_ticks + 1,
            ..me.clone()
        };
        assert!(matches!(reused.liveness(), Liveness::Dead(r) if r.contains("another process")));
        let rebooted = Owner {
            boot_id: "00000000-0000-0000-0000-000000000000".into(),
            ..me.clone()
        };
        assert!(matches!(rebooted.liveness(), Liveness::Dead(r) if r.contains("another boot")));
        let elsewhere = Owner {
            host: format!("{}-elsewhere", me.host),
            ..me
        };
        assert!(elsewhere.liveness().is_alive());
    }

    #[test]
    fn a_host_name_outside_the_tag_alphabet_is_still_this_host() {
        let me = Owner::of_pid(std::process::id()).unwrap();
        let recorded = Owner {
            host: tag_safe("(none)"),
            ..me.clone()
        };
        assert_eq!(recorded.host, "_none_");
        assert_eq!(recorded.liveness_on("(none)", &me.boot_id), Liveness::Alive);
        assert!(matches!(
            recorded.liveness_on("other", &me.boot_id),
            Liveness::OtherHost(_)
        ));
    }

    #[test]
    fn start_ticks_survive_odd_command_names() {
        // Our own stat parses; a name with ") (" cannot confuse rfind.
        assert!(start_ticks(std::process::id()).is_some());
        assert!(start_ticks(u32::MAX).is_none());
        // A name with ") (", spaces and a byte that is not UTF-8.
        let fields: Vec<String> = (3..=22).map(|f| f.to_string()).collect();
        let mut line = b"4242 (a) (b \xff c) ".to_vec();
        line.extend_from_slice(fields.join(" ").as_bytes());
        line.extend_from_slice(b" 23 24\n");
        assert_eq!(
            parse_stat(&line),
            Some(ProcStat {
                state: b'3',
                start_ticks: 22
            })
        );
        assert_eq!(parse_stat(b"4242 (no closing paren"), None);
        assert_eq!(parse_stat(b"4242 (x) 3 4"), None);
        assert_eq!(parse_stat(b"4242 (x) SS 4"), None, "a state is one letter");
    }

    #[test]
    fn an_owner_that_exited_is_dead_while_still_a_zombie() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let owner = Owner::of_pid(pid).unwrap();
        assert_eq!(owner.liveness(), Liveness::Alive);
        // Killed and not waited for: a zombie, still in /proc with its start time.
        child.kill().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while process_stat(pid).is_some_and(|s| !s.has_exited()) {
            assert!(
                std::time::Instant::now() < deadline,
                "PID {pid} never became a zombie"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(
            start_ticks(pid),
            Some(owner.start_ticks),
            "a zombie keeps its start time"
        );
        assert!(
            matches!(owner.liveness(), Liveness::Dead(r) if r.contains("has exited")),
            "{:?}",
            owner.liveness()
        );
        assert!(Owner::of_pid(pid).is_err_and(|why| why.contains("has exited")));
        child.wait().unwrap();
        assert!(matches!(owner.liveness(), Liveness::Dead(r) if r.contains("no longer exists")));
        assert_eq!(Owner::of_pid(pid).unwrap_err(), "no such process");
    }
}
