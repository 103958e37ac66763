//! Pool, lease, cleanup, resize, run and fstests-config commands.

use crate::args::{ExportKind, Global, LeaseCmd, PoolCmd, Want};
use crate::parse_bytes;
use anyhow::{Context, Result, anyhow, bail};
use devpool_format::units::{Bytes, SizeArg};
use devpool_pool::owner::{Liveness, Owner};
use devpool_pool::pool::{Acquired, Pools};
use devpool_pool::{PoolError, daemon, spec};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicI32, Ordering};

pub fn pools(g: &Global) -> Result<Pools> {
    let default_size = match std::env::var("DEVPOOL_DEFAULT_POOL_SIZE") {
        Ok(s) => parse_bytes("DEVPOOL_DEFAULT_POOL_SIZE", &s)?,
        Err(_) => Bytes(64 << 30),
    };
    Ok(Pools {
        state_dir: g.state_dir.clone(),
        fstab: std::env::var_os("DEVPOOL_FSTAB")
            .map(Into::into)
            .unwrap_or_else(|| "/etc/fstab".into()),
        default_size,
        prefix: std::env::var("DEVPOOL_PREFIX").unwrap_or_else(|_| "devpool".into()),
        dry_run: g.dry_run,
    })
}

/// `--pool`, else `$DEVPOOL_POOL` (clap reads it), else
/// `$KERNELDEV_DEVICE_POOL`, else `default`.
pub fn pool_name(g: &Global) -> String {
    g.pool
        .clone()
        .or_else(|| std::env::var("KERNELDEV_DEVICE_POOL").ok())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into())
}

/// Where leases are taken: through `devpool daemon` when one answers on
/// the state directory's socket (its commits are shared with concurrent
/// requests), else in this process.
pub struct Leases {
    pools: Pools,
    daemon: Option<std::cell::RefCell<daemon::Client>>,
}

impl Leases {
    pub fn new(g: &Global) -> Result<Leases> {
        Leases::reusing(g, None)
    }

    /// As [`Leases::new`], through `idle` (a daemon connection an earlier
    /// call kept) while it is still open.
    pub fn reusing(g: &Global, idle: Option<daemon::Client>) -> Result<Leases> {
        // A dry run plans here: the daemon would carry the change out.
        let daemon = if g.no_daemon || g.dry_run {
            None
        } else {
            idle.filter(daemon::Client::is_open)
                .or_else(|| daemon::Client::connect(&g.state_dir))
                .map(std::cell::RefCell::new)
        };
        Ok(Leases {
            pools: pools(g)?,
            daemon,
        })
    }

    /// The daemon connection, for the next call to reuse.
    pub fn into_daemon(self) -> Option<daemon::Client> {
        self.daemon.map(std::cell::RefCell::into_inner)
    }

    pub fn acquire(
        &self,
        name: &str,
        w: &Want,
        specs: &[spec::VolumeSpec],
        owner: &Owner,
        keep: bool,
    ) -> Result<Acquired> {
        let Some(d) = &self.daemon else {
            return Ok(self.pools.acquire(name, specs, owner, keep)?);
        };
        let v = d.borrow_mut().call(&daemon::Request::Acquire {
            pool: name.to_string(),
            volumes: w.volumes.clone(),
            profile: w.profile.clone(),
            size: w.size.clone(),
            keep,
            owner_pid: Some(owner.pid),
            chown: devpool_pool::loopdev::sudo_user(),
            loop_devices: true,
            prefix: Some(self.pools.prefix.clone()),
        })?;
        serde_json::from_value(v).context("the daemon's acquire answer")
    }

    pub fn release(&self, name: &str, session: &str) -> Result<Vec<String>> {
        let Some(d) = &self.daemon else {
            return Ok(self.pools.release(name, session)?);
        };
        let v = d.borrow_mut().call(&daemon::Request::Release {
            pool: name.to_string(),
            session: session.to_string(),
        })?;
        let removed = v.get("removed").cloned().unwrap_or_default();
        serde_json::from_value(removed).context("the daemon's release answer")
    }
}

pub fn json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Run `f(confirmed)`; on a confirmation request, show it and ask for YES.
/// `--dry-run` stops at the plan, even with `--yes`.
pub fn confirmed<T>(g: &Global, f: impl Fn(bool) -> devpool_pool::Result<T>) -> Result<T> {
    match f(g.yes && !g.dry_run) {
        Err(PoolError::NeedsConfirmation { what, reasons }) => {
            ask_to_confirm(g, &what, &reasons)?;
            Ok(f(true)?)
        }
        r => Ok(r?),
    }
}

/// Show what a change does; then stop on `--dry-run`, go on with `--yes`,
/// else ask for YES on the terminal.
pub fn ask_to_confirm(g: &Global, what: &str, reasons: &[String]) -> Result<()> {
    eprintln!("{what}:");
    for r in reasons {
        eprintln!("  - {r}");
    }
    if g.dry_run {
        bail!("dry run: nothing was changed");
    }
    if g.yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!("{what} needs confirmation; rerun with --yes");
    }
    crate::ask_yes()
}

/// What `pool setup` did, in one line (CLI and MCP).
pub fn setup_text(out: &devpool_pool::pool::SetupOutcome) -> String {
    if out.already {
        format!(
            "pool '{}' is already set up on {}",
            out.pool,
            out.device.display()
        )
    } else {
        format!(
            "pool '{}' set up on {} ({}, VG {})",
            out.pool,
            out.device.display(),
            human_size(out.size_bytes),
            out.vg
        )
    }
}

/// A size for people, in the unit that suits it (`232.00 MiB`, `1.50 GiB`);
/// `--json` has the bytes.
pub fn human_size(b: u64) -> String {
    devpool_format::units::format_bytes(devpool_format::units::Bytes(b))
}

pub fn pool(g: &Global, cmd: PoolCmd) -> Result<()> {
    let p = pools(g)?;
    match cmd {
        PoolCmd::Setup {
            device,
            name,
            image_size,
            thin,
        } => {
            let size = image_size
                .as_deref()
                .map(|s| parse_bytes("--image-size", s))
                .transpose()?;
            // A dry run goes through the safety checks (they only read) to
            // the plan, and stops there: nothing to confirm.
            let out = if g.dry_run {
                p.setup(&device, &name, size, true)?
            } else {
                confirmed(g, |ok| p.setup(&device, &name, size, ok))?
            };
            let thin_pool = if thin && !g.dry_run && p.thin_pool_lv(&name)?.is_none() {
                Some(p.thin_enable(&name, None, None, devpool_pool::thin::DEFAULT_THIN_CHUNK)?)
            } else {
                None
            };
            if g.json {
                let mut v = serde_json::to_value(&out)?;
                v["thin"] = serde_json::to_value(&thin_pool)?;
                return json(&v);
            }
            if let Some(t) = &thin_pool {
                print_thin_enabled(t);
            }
            for n in &out.notes {
                println!("note: {n}");
            }
            println!("{}", setup_text(&out));
        }
        PoolCmd::Thin(cmd) => thin(g, &p, cmd)?,
        PoolCmd::List => {
            let list = p.list()?;
            if g.json {
                return json(&list);
            }
            println!(
                "{:<16} {:>9} {:>9} {:>7} {:>7}  DEVICES",
                "POOL", "SIZE", "FREE", "LEASES", "VOLUMES"
            );
            for s in list {
                let devs: Vec<String> = s.devices.iter().map(|d| d.display().to_string()).collect();
                println!(
                    "{:<16} {:>9} {:>9} {:>7} {:>7}  {}",
                    s.pool,
                    human_size(s.size_bytes),
                    human_size(s.free_bytes),
                    s.leases,
                    s.volumes,
                    devs.join(",")
                );
            }
        }
        PoolCmd::Trim { name } => {
            let name = name.unwrap_or_else(|| pool_name(g));
            let r = p.trim(&name)?;
            if g.json {
                return json(&r);
            }
            println!(
                "pool {}: discarded {} of free space ({} range(s))",
                r.pool,
                devpool_format::units::format_bytes(devpool_format::units::Bytes(
                    r.discarded_bytes
                )),
                r.ranges
            );
            for i in &r.images {
                println!("  image    {}", i.describe());
            }
        }
        PoolCmd::Status { name } => {
            let name = name.unwrap_or_else(|| pool_name(g));
            let st = p.status(&name)?;
            if g.json {
                return json(&st);
            }
            let s = &st.summary;
            println!("pool {} (VG {})", s.pool, s.vg);
            for d in &s.devices {
                println!("  device   {}", d.display());
            }
            println!(
                "  size     {} ({} bytes)",
                human_size(s.size_bytes),
                s.size_bytes
            );
            println!(
                "  free     {} ({} bytes)",
                human_size(s.free_bytes),
                s.free_bytes
            );
            for i in &st.images {
                println!("  image    {}", i.describe());
            }
            for d in &st.dm_devices {
                println!(
                    "  dm       {} ({}): {}",
                    d.name,
                    d.device.display(),
                    d.held_by
                        .as_deref()
                        .unwrap_or("held by nothing of devpool's")
                );
            }
            println!(
                "  health   {}",
                if st.health.is_empty() {
                    "ok".to_string()
                } else {
                    st.health.join("; ")
                }
            );
            for l in &st.leases {
                print_lease(&l.lease);
                for d in &l.devices {
                    println!("      {} -> {}", d.role, d.device_name());
                }
            }
            for o in &st.other_volumes {
                println!("  volume {o} (not leased)");
            }
            for sn in &st.snapshots {
                println!("  {}", crate::snapshot_cmds::describe(sn));
            }
            if let Some(t) = &st.thin {
                print_thin_status(t);
            }
            for t in &st.thin_snapshots {
                println!("  {}", crate::snapshot_cmds::describe_thin(t));
            }
        }
        PoolCmd::Teardown { name, wipe, force } => {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "wiping {bar:40} {bytes}/{total_bytes} ({eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let progress = |done: u64, total: u64| {
                bar.set_length(total);
                bar.set_position(done);
            };
            let report = confirmed(g, |ok| p.teardown(&name, force, wipe, ok, &progress))?;
            bar.finish_and_clear();
            if g.json {
                return json(&report);
            }
            for l in &report.removed {
                println!("reaped orphan lease {}", l.session);
            }
            println!("pool '{name}' torn down");
        }
    }
    Ok(())
}

fn print_lease(l: &devpool_pool::lease::Lease) {
    let owner = match &l.owner {
        Some(o) => format!("pid {} on {}", o.pid, o.host),
        None => "unknown owner".into(),
    };
    let state = match &l.liveness {
        Liveness::Alive => "alive".to_string(),
        Liveness::Dead(why) => format!("dead: {why}"),
        Liveness::OtherHost(why) => format!("unknown: {why}"),
    };
    println!(
        "  lease {}  {owner}  {state}{}",
        l.session,
        if l.kept { "  kept" } else { "" }
    );
    for v in &l.volumes {
        println!(
            "    {:<10} {:>8}  {}",
            v.role,
            human_size(v.size_bytes),
            v.lv
        );
    }
}

pub fn want(w: &Want) -> Result<Vec<spec::VolumeSpec>> {
    Ok(match (&w.volumes, &w.profile) {
        (Some(v), _) => spec::parse_volumes(v)?,
        (None, Some(p)) => spec::profile(p, w.size.as_deref())?,
        (None, None) => bail!("give --volumes ROLE:SIZE,… or --profile NAME"),
    })
}

fn print_acquired(g: &Global, a: &Acquired) -> Result<()> {
    if g.json {
        return json(a);
    }
    println!("session {}", a.session);
    for d in &a.devices {
        println!("{} {} {}", d.role, d.device_name(), d.lv);
    }
    for n in &a.notes {
        eprintln!("note: {n}");
    }
    Ok(())
}

pub fn lease(g: &Global, cmd: LeaseCmd) -> Result<()> {
    let name = pool_name(g);
    match cmd {
        LeaseCmd::Acquire {
            want: w,
            keep,
            owner_pid,
        } => {
            let specs = want(&w)?;
            // SAFETY: getppid cannot fail.
            let pid = owner_pid.unwrap_or_else(|| unsafe { libc::getppid() } as u32);
            let owner = Owner::of_pid(pid).map_err(|why| anyhow!("--owner-pid {pid}: {why}"))?;
            let a = Leases::new(g)?.acquire(&name, &w, &specs, &owner, keep)?;
            print_acquired(g, &a)
        }
        LeaseCmd::Release { session } => {
            let lvs = Leases::new(g)?.release(&name, &session)?;
            if g.json {
                return json(
                    &serde_json::json!({"pool": name, "session": session, "removed": lvs}),
                );
            }
            println!("released {session} ({} volumes)", lvs.len());
            Ok(())
        }
        LeaseCmd::List => {
            let leases = pools(g)?.leases(&name)?;
            if g.json {
                return json(&leases);
            }
            for l in &leases {
                print_lease(l);
            }
            Ok(())
        }
    }
}

pub fn cleanup(g: &Global, kept: bool) -> Result<()> {
    let name = pool_name(g);
    let r = pools(g)?.cleanup(&name, kept)?;
    if g.json {
        return json(&r);
    }
    for l in &r.removed {
        let why = match &l.liveness {
            Liveness::Dead(w) => w.as_str(),
            _ => "",
        };
        println!(
            "removed lease {} ({} volumes): {why}",
            l.session,
            l.volumes.len()
        );
    }
    for (s, why) in &r.kept {
        println!("kept lease {s}: {why}");
    }
    if r.removed.is_empty() {
        println!("nothing to clean up in pool '{name}'");
    }
    Ok(())
}

pub fn resize(g: &Global, volume: &str, size: &str) -> Result<()> {
    let name = pool_name(g);
    let size = SizeArg::parse(size).map_err(|e| anyhow!("size: {e}"))?;
    let lv = volume.rsplit('/').next().unwrap_or(volume);
    let p = pools(g)?;
    let bytes = confirmed(g, |ok| p.resize(&name, lv, size, ok))?;
    if g.json {
        return json(&serde_json::json!({"pool": name, "volume": lv, "size_bytes": bytes}));
    }
    println!("{lv}: now {} ({bytes} bytes)", human_size(bytes));
    Ok(())
}

pub fn fstests_config(
    g: &Global,
    session: &str,
    mounts: &str,
    output: Option<&std::path::Path>,
) -> Result<()> {
    let name = pool_name(g);
    let st = pools(g)?.status(&name)?;
    let l = st
        .leases
        .iter()
        .find(|l| l.lease.session == session)
        .ok_or_else(|| anyhow!("no lease '{session}' in pool '{name}'"))?;
    let devs: Vec<(String, String)> = l
        .devices
        .iter()
        .map(|d| (d.role.clone(), d.device_name()))
        .collect();
    let text = spec::fstests_config(&devs, mounts);
    match output {
        Some(p) => std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?,
        None => print!("{text}"),
    }
    Ok(())
}

static CHILD: AtomicI32 = AtomicI32::new(0);
static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    SIGNALLED.store(sig, Ordering::SeqCst);
    let child = CHILD.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe {
            libc::kill(child, sig);
        }
    }
}

/// `devpool run`: acquire (owned by this process), run, release.
pub fn run(
    g: &Global,
    w: &Want,
    keep: bool,
    export: Option<ExportKind>,
    command: &[String],
) -> Result<i32> {
    let p = pools(g)?;
    let name = pool_name(g);
    let specs = want(w)?;
    let owner = Owner::of_this_process().map_err(anyhow::Error::msg)?;
    // Signals are forwarded to the command; the release happens after it ends.
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing a handler that only touches atomics and calls kill.
        unsafe {
            libc::signal(sig, forward as *const () as libc::sighandler_t);
        }
    }
    if export.is_none() && !devpool_pool::loopdev::usable() {
        bail!("{}", devpool_pool::loopdev::NOT_USABLE);
    }
    let leases = Leases::new(g)?;
    let a = leases.acquire(&name, w, &specs, &owner, keep)?;
    // Volumes without a loop device (a user who may not attach them) are
    // reached through the exports alone.
    let devs: Vec<(String, String)> = a
        .devices
        .iter()
        .filter(|d| d.device.is_some())
        .map(|d| (d.role.clone(), d.device_name()))
        .collect();
    eprintln!(
        "devpool: lease {} in pool '{name}': {}",
        a.session,
        if devs.is_empty() {
            "no loop devices (served only)".to_string()
        } else {
            devs.iter()
                .map(|(r, d)| format!("{r}={d}"))
                .collect::<Vec<_>>()
                .join(" ")
        }
    );
    // Servers for the run's volumes, owned by this process.
    let exports = match export.map(|k| crate::serve_cmds::export_lease(&p, &name, &a, k)) {
        Some(Err(e)) => {
            let _ = leases.release(&name, &a.session);
            return Err(e);
        }
        Some(Ok(x)) => Some(x),
        None => None,
    };
    let export_env = exports.as_ref().map(|x| x.env.clone()).unwrap_or_default();
    let status = if SIGNALLED.load(Ordering::SeqCst) != 0 {
        Err(anyhow!("interrupted before the command started"))
    } else {
        let mut cmd = std::process::Command::new(&command[0]);
        cmd.args(&command[1..])
            .envs(spec::environment(&devs))
            .envs(export_env)
            .env("DEVPOOL_SESSION", &a.session)
            .env("DEVPOOL_POOL", &name);
        match cmd.spawn() {
            Ok(mut child) => {
                CHILD.store(child.id() as i32, Ordering::SeqCst);
                let st = child.wait();
                CHILD.store(0, Ordering::SeqCst);
                st.map_err(|e| anyhow!("waiting for {}: {e}", command[0]))
            }
            Err(e) => Err(anyhow!("cannot run {}: {e}", command[0])),
        }
    };
    if let Some(x) = exports {
        x.stop("the command ended");
    }
    if keep {
        eprintln!(
            "devpool: kept lease {} (release it with 'devpool lease release {}')",
            a.session, a.session
        );
    } else if let Err(e) = leases.release(&name, &a.session) {
        eprintln!(
            "devpool: releasing {} failed: {e}; 'devpool cleanup' will reap it",
            a.session
        );
    }
    let st = status?;
    use std::os::unix::process::ExitStatusExt;
    Ok(st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)))
}

fn print_thin_enabled(t: &devpool_pool::thin::ThinEnabled) {
    println!(
        "thin pool {} in pool '{}': data {} ({} bytes), metadata {} ({} bytes), blocks of {}K",
        t.pool_lv,
        t.pool,
        human_size(t.data_bytes),
        t.data_bytes,
        human_size(t.metadata_bytes),
        t.metadata_bytes,
        t.chunk_bytes / 1024
    );
    println!(
        "leases are thin volumes from now on; serve them with devpool serve VOLUME --block-device"
    );
}

fn print_thin_status(t: &devpool_pool::thin::ThinStatus) {
    match &t.usage {
        Some(u) => {
            let pct = |a: u64, b: u64| (a * 100).checked_div(b).unwrap_or(0);
            println!(
                "  thin pool {}: data {}% used ({} of {} blocks of {}K), metadata {}% ({} of {} blocks), {} thin volumes, transaction {}",
                t.pool_lv,
                pct(u.data_used, u.data_blocks),
                u.data_used,
                u.data_blocks,
                u.chunk_bytes / 1024,
                pct(u.metadata_used, u.metadata_blocks),
                u.metadata_used,
                u.metadata_blocks,
                t.thin_volumes,
                u.transaction_id
            );
            if let Some(d) = &t.held_by_kernel {
                println!(
                    "    dm-thin holds it ({d}): the kernel's figures; changes go to it as messages"
                );
            }
        }
        None => println!(
            "  thin pool {}: unreadable: {}",
            t.pool_lv,
            t.error.as_deref().unwrap_or("?")
        ),
    }
}

fn thin(g: &Global, p: &Pools, cmd: crate::args::ThinCmd) -> Result<()> {
    use crate::args::ThinCmd;
    match cmd {
        ThinCmd::Enable {
            name,
            data_size,
            metadata_size,
            chunk_size,
        } => {
            let name = name.unwrap_or_else(|| pool_name(g));
            let parse = |flag: &str, v: Option<String>| -> Result<Option<SizeArg>> {
                let Some(v) = v else { return Ok(None) };
                let s = SizeArg::parse(&v).map_err(|e| anyhow!("{flag}: {e}"))?;
                if s.sign.is_some() {
                    bail!("{flag}: an absolute size, not a +/- change");
                }
                Ok(Some(s))
            };
            let data = parse("--data-size", data_size)?;
            let meta = parse("--metadata-size", metadata_size)?;
            let chunk = parse_bytes("--chunk-size", &chunk_size)?;
            let t = p.thin_enable(&name, data, meta, chunk)?;
            if g.json {
                return json(&t);
            }
            print_thin_enabled(&t);
        }
        ThinCmd::Extend { name, data_size } => {
            let name = name.unwrap_or_else(|| pool_name(g));
            let size = SizeArg::parse(&data_size).map_err(|e| anyhow!("--data-size: {e}"))?;
            if matches!(size.sign, Some(devpool_format::units::Sign::Minus)) {
                bail!("--data-size {data_size}: thin pools only grow");
            }
            let t = p.thin_extend(&name, size)?;
            if g.json {
                return json(&t);
            }
            println!(
                "thin pool {} of pool '{name}': data {} -> {} ({} blocks)",
                t.pool_lv,
                human_size(t.data_bytes_before),
                human_size(t.data_bytes),
                t.data_blocks.map_or("?".into(), |b| b.to_string())
            );
        }
        ThinCmd::Status { name } => {
            let name = name.unwrap_or_else(|| pool_name(g));
            let t = p.thin_status(&name)?;
            if g.json {
                return json(&t);
            }
            match &t {
                Some(t) => print_thin_status(t),
                None => {
                    println!("pool '{name}' has no thin pool (devpool pool thin enable {name})")
                }
            }
        }
    }
    Ok(())
}

/// `devpool daemon`: serve lease requests until SIGINT/SIGTERM; with
/// `--status`, ask the running one.
pub fn daemon(g: &Global, status: bool) -> Result<()> {
    use devpool_serve::lifetime::{self, Stopper};
    use std::os::fd::AsRawFd;
    let path = daemon::socket_path(&g.state_dir);
    if status {
        let mut c = daemon::Client::connect(&g.state_dir)
            .ok_or_else(|| anyhow!("no daemon answers on {}", path.display()))?;
        let v = c.call(&daemon::Request::Ping)?;
        let info: daemon::DaemonInfo = serde_json::from_value(v)?;
        if g.json {
            return json(&info);
        }
        println!(
            "devpool daemon {} (PID {}) on {}: {} lease requests in {} commits",
            info.version,
            info.pid,
            path.display(),
            info.stats.requests,
            info.stats.commits
        );
        return Ok(());
    }
    let stopper = Stopper::new()?;
    lifetime::stop_on_signals(stopper.clone())?;
    let listener = daemon::bind(&path)?;
    stopper.shutdown_on_stop(listener.as_raw_fd());
    // Resident: VG texts parsed or committed here are not read and parsed
    // again while the area headers still name them.
    devpool_engine::scan::keep_parsed_metadata();
    let service = std::sync::Arc::new(devpool_pool::group::LeaseService::new(pools(g)?));
    eprintln!(
        "devpool daemon: PID {} listening on {}",
        std::process::id(),
        path.display()
    );
    let served = daemon::serve(&listener, service, &|| stopper.is_stopped());
    let _ = std::fs::remove_file(&path);
    served?;
    eprintln!(
        "devpool daemon: stopped ({})",
        stopper.reason().unwrap_or_default()
    );
    Ok(())
}
