//! Run a VM to completion: start QEMU (it dies with devpool: parent-death
//! signal), stream its console line by line, find the guest's ready and exit
//! markers, and kill it when the time limit passes or the caller cancels.

use crate::guest::{EXIT_MARKER, READY_MARKER};
use crate::qemu::Machine;
use crate::{Result, io_err};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// The command ran and its exit status is known.
    Exited,
    /// The time limit passed; QEMU was killed.
    TimedOut,
    /// The caller cancelled (e.g. Ctrl-C); QEMU was killed.
    Cancelled,
    /// QEMU exited without the guest reporting an exit status (kernel panic,
    /// init died, QEMU error).
    Died,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub ending: Ending,
    /// The command's exit status (when `ending` is `Exited`).
    pub exit: Option<i32>,
    /// Console output, `\r` removed.
    pub console: String,
    /// QEMU's own error output.
    pub qemu_stderr: String,
    /// QEMU start to the guest's ready marker.
    pub boot: Option<Duration>,
    /// Ready marker to exit marker.
    pub command: Option<Duration>,
    /// QEMU start to QEMU gone.
    pub total: Duration,
    /// The signal that ended QEMU, if one did.
    pub signal: Option<i32>,
}

/// Signals that mean QEMU itself crashed (a failed assertion aborts; a bad
/// pointer faults), as opposed to being stopped by someone.
const CRASH_SIGNALS: [i32; 5] = [
    libc::SIGABRT,
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
];

/// A signal's name, for reports.
pub fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGBUS => "SIGBUS".into(),
        libc::SIGILL => "SIGILL".into(),
        libc::SIGFPE => "SIGFPE".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGTERM => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}

impl Outcome {
    /// QEMU crashed before the guest's command started: the command never
    /// ran, so booting again cannot run it twice. (Multi-threaded TCG in
    /// QEMU 10.0 sometimes aborts in `iotlb_to_section` while devices set up
    /// their memory regions during boot.)
    pub fn qemu_crashed_before_command(&self) -> bool {
        self.ending == Ending::Died && self.boot.is_none() && self.qemu_crashed()
    }

    /// QEMU died of a signal that means it crashed.
    pub fn qemu_crashed(&self) -> bool {
        self.signal.is_some_and(|s| CRASH_SIGNALS.contains(&s))
    }

    /// The console between the ready and exit markers: the command's output
    /// (with any kernel messages printed meanwhile).
    pub fn command_output(&self) -> &str {
        let start = self
            .console
            .find(READY_MARKER)
            .map(|i| i + READY_MARKER.len())
            .unwrap_or(0);
        let end = self.console[start..]
            .find(EXIT_MARKER)
            .map(|i| start + i)
            .unwrap_or(self.console.len());
        self.console[start..end].trim_matches('\n')
    }
}

/// The exit status in an exit-marker line.
pub fn parse_exit(line: &str) -> Option<i32> {
    let rest = &line[line.find(EXIT_MARKER)? + EXIT_MARKER.len()..];
    rest.split("@@").next()?.trim().parse().ok()
}

fn pdeathsig() -> std::io::Result<()> {
    // SAFETY: prctl with constant arguments in the child before exec.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

enum Msg {
    Line(String),
    Eof,
}

/// Boot `machine`, calling `on_line` for every console line (markers
/// included), until QEMU exits, `limit` passes or `cancelled()` is true.
pub fn run(
    machine: &Machine,
    limit: Duration,
    cancelled: &dyn Fn() -> bool,
    on_line: &mut dyn FnMut(&str),
) -> Result<Outcome> {
    let mut cmd = machine.command();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: pdeathsig only calls prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(pdeathsig);
    }
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(io_err(
        "start qemu-system-x86_64 (apt-get install qemu-system-x86)",
    ))?;
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take();
    let reader = std::thread::spawn(move || {
        if let Some(out) = stdout {
            let mut r = BufReader::new(out);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\n', '\r'])
                            .replace('\r', "");
                        if tx.send(Msg::Line(line)).is_err() {
                            break;
                        }
                    }
                }
            }
        }
        let _ = tx.send(Msg::Eof);
    });
    let stderr = child.stderr.take();
    let err_reader = std::thread::spawn(move || {
        // Bytes, shown lossily: read_to_string would drop all of it at the
        // first byte that is not UTF-8.
        let mut b = Vec::new();
        if let Some(mut e) = stderr {
            let _ = e.read_to_end(&mut b);
        }
        String::from_utf8_lossy(&b).into_owned()
    });
    let mut console = String::new();
    let mut boot = None;
    let mut ready_at = None;
    let mut command = None;
    let mut exit = None;
    let mut ending = None;
    let mut eof = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Msg::Line(line)) => {
                if line.contains(READY_MARKER) && ready_at.is_none() {
                    let now = Instant::now();
                    boot = Some(now - start);
                    ready_at = Some(now);
                }
                if let Some(code) = parse_exit(&line).filter(|_| exit.is_none()) {
                    exit = Some(code);
                    command = ready_at.map(|r| r.elapsed());
                }
                on_line(&line);
                console.push_str(&line);
                console.push('\n');
            }
            Ok(Msg::Eof) => eof = true,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => eof = true,
        }
        if eof {
            break;
        }
        if start.elapsed() > limit {
            ending = Some(Ending::TimedOut);
        } else if cancelled() {
            ending = Some(Ending::Cancelled);
        }
        if ending.is_some() {
            let _ = child.kill();
            break;
        }
    }
    let signal = child.wait().ok().and_then(|s| {
        use std::os::unix::process::ExitStatusExt;
        s.signal()
    });
    let total = start.elapsed();
    // Lines still buffered after a kill are part of the record.
    while let Ok(Msg::Line(line)) = rx.recv_timeout(Duration::from_millis(200)) {
        on_line(&line);
        console.push_str(&line);
        console.push('\n');
    }
    let _ = reader.join();
    let qemu_stderr = err_reader.join().unwrap_or_default();
    let ending = ending.unwrap_or(if exit.is_some() {
        Ending::Exited
    } else {
        Ending::Died
    });
    Ok(Outcome {
        ending,
        exit: if ending == Ending::Exited { exit } else { None },
        console,
        qemu_stderr,
        boot,
        command,
        total,
        signal,
    })
}

/// [`run`], booting again up to `retries` times when QEMU crashes before
/// the guest's command starts (see [`Outcome::qemu_crashed_before_command`]);
/// `on_crash` hears of each such boot, with how many came before it. All
/// boots share `limit`.
pub fn run_retrying(
    machine: &Machine,
    limit: Duration,
    retries: u32,
    cancelled: &dyn Fn() -> bool,
    on_line: &mut dyn FnMut(&str),
    on_crash: &mut dyn FnMut(&Outcome, u32),
) -> Result<Outcome> {
    let deadline = Instant::now() + limit;
    let mut crashed = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let o = run(machine, left, cancelled, on_line)?;
        if crashed >= retries || !o.qemu_crashed_before_command() {
            return Ok(o);
        }
        on_crash(&o, crashed);
        crashed += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_markers_parse_even_after_kernel_noise() {
        assert_eq!(parse_exit("@@devpool:exit=0@@"), Some(0));
        assert_eq!(parse_exit("[ 1.2] foo @@devpool:exit=42@@"), Some(42));
        assert_eq!(parse_exit("@@devpool:exit=@@"), None);
        assert_eq!(parse_exit("nothing"), None);
    }

    #[test]
    fn command_output_is_what_lies_between_the_markers() {
        let o = Outcome {
            ending: Ending::Exited,
            exit: Some(0),
            console: "boot\n@@devpool:ready@@\nhello\nworld\n\n@@devpool:exit=0@@\nbye\n".into(),
            qemu_stderr: String::new(),
            boot: None,
            command: None,
            total: Duration::ZERO,
            signal: None,
        };
        assert_eq!(o.command_output(), "hello\nworld");
    }

    #[test]
    fn only_a_qemu_crash_before_the_command_started_counts_as_one() {
        let crashed = Outcome {
            ending: Ending::Died,
            exit: None,
            console: "SeaBIOS\n".into(),
            qemu_stderr: "iotlb_to_section: Assertion failed.".into(),
            boot: None,
            command: None,
            total: Duration::from_secs(4),
            signal: Some(libc::SIGABRT),
        };
        assert!(crashed.qemu_crashed_before_command());
        // The command had started: booting again could run it twice.
        let started = Outcome {
            boot: Some(Duration::from_secs(8)),
            ..crashed.clone()
        };
        assert!(!started.qemu_crashed_before_command());
        // A guest panic ends QEMU normally (-no-reboot), not by a signal.
        let panicked = Outcome {
            signal: None,
            ..crashed.clone()
        };
        assert!(!panicked.qemu_crashed_before_command());
        // Someone stopped QEMU on purpose.
        let terminated = Outcome {
            signal: Some(libc::SIGTERM),
            ..crashed.clone()
        };
        assert!(!terminated.qemu_crashed_before_command());
        let timed_out = Outcome {
            ending: Ending::TimedOut,
            signal: Some(libc::SIGKILL),
            ..crashed
        };
        assert!(!timed_out.qemu_crashed_before_command());
    }
}
