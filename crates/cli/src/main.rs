//! # devpool
//!
//! The command-line front end: parses arguments, turns them into engine
//! operations, runs the plan → verify → confirm → execute flow, and prints
//! tables or JSON.

mod args;
mod mcp;
mod output;
mod pool_cmds;
mod serve_cmds;
mod snapshot_cmds;
mod vm_cmds;
mod vm_suites;

use anyhow::{Context, Result, anyhow, bail};
use args::{Cli, Command, Global, LvCmd, PvArgs, PvCmd, VgCmd, VmCmd};
use clap::Parser;
use devpool_engine::EngineError;
use devpool_engine::engine::{DeviceSource, Engine, Operation, PvOptions};
use devpool_format::units::{Amount, Bytes, SizeArg};
use std::io::{BufRead, IsTerminal, Write};

// Reading a VG with tens of thousands of LVs allocates millions of small
// objects; mimalloc makes that (and freeing them) several times cheaper.
// Version 2, without transparent huge pages: with them every command zeroed
// 2 MiB pages at start (about 1 ms of CPU of a 3 ms command) and `devpool
// daemon` zeroed them again after each purge (a quarter of its CPU). A
// 65,536-volume VG then parses with about 30% more CPU (330 against 250 ms,
// page-faulting 4 KiB at a time) in about the same wall time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // Exit quietly when a reader such as `head` closes the pipe.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let g = cli.global.clone();
    let result = run(cli).or_else(|e| match dry_run_plan(&e) {
        // A dry run of a pool command ends at its first change's plan.
        Some(plan) => output::plan(&g, plan, true),
        None => Err(e),
    });
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("devpool: error: {e:#}");
            1
        }
    };
    exit_now(code)
}

/// The plan a dry run stopped at, wherever in the chain it was reported.
fn dry_run_plan(e: &anyhow::Error) -> Option<&devpool_engine::plan::Plan> {
    e.chain().find_map(|c| {
        let engine = c.downcast_ref::<EngineError>().or_else(|| {
            match c.downcast_ref::<devpool_pool::PoolError>() {
                Some(devpool_pool::PoolError::Engine(inner)) => Some(inner),
                _ => None,
            }
        });
        match engine {
            Some(EngineError::DryRun(plan)) => Some(plan.as_ref()),
            _ => None,
        }
    })
}

/// Leave without the allocator's exit-time work (returning every page to the
/// OS, which the OS is about to reclaim anyway): after a large VG that is a
/// tenth of the command's time. Everything devpool writes is written and
/// flushed by now, and every value with a `Drop` that matters is gone.
fn exit_now(code: i32) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit only ends the process; no Rust state is used afterwards.
    unsafe { libc::_exit(code) }
}

fn engine(g: &Global) -> Engine {
    let src = match &g.devices {
        Some(list) if !list.is_empty() => DeviceSource::List(list.clone()),
        _ => DeviceSource::System,
    };
    Engine::new(src, g.state_dir.clone())
}

fn parse_bytes(what: &str, s: &str) -> Result<Bytes> {
    match SizeArg::parse(s).map_err(|e| anyhow!("{what}: {e}"))? {
        SizeArg {
            sign: None,
            amount: Amount::Bytes(b),
        } => Ok(b),
        _ => bail!("{what}: '{s}' must be a plain size such as 4M"),
    }
}

fn pv_options(p: &PvArgs) -> Result<PvOptions> {
    Ok(PvOptions {
        metadata_size: p
            .metadata_size
            .as_deref()
            .map(|s| parse_bytes("--metadata-size", s))
            .transpose()?,
        metadata_copies: p.metadata_copies,
        image_size: p
            .image_size
            .as_deref()
            .map(|s| parse_bytes("--image-size", s))
            .transpose()?,
    })
}

/// `VG/LV` into its parts.
fn split_lv(s: &str) -> Result<(String, String)> {
    let s = s.strip_prefix("/dev/").unwrap_or(s);
    match s.split_once('/') {
        Some((vg, lv)) if !vg.is_empty() && !lv.is_empty() && !lv.contains('/') => {
            Ok((vg.to_string(), lv.to_string()))
        }
        _ => bail!("'{s}' is not VG/LV"),
    }
}

fn run(cli: Cli) -> Result<()> {
    let g = cli.global;
    let eng = engine(&g);
    let ops: Vec<Operation> = match cli.command {
        Command::Pool(cmd) => return pool_cmds::pool(&g, cmd),
        Command::Lease(cmd) => return pool_cmds::lease(&g, cmd),
        Command::Cleanup { kept } => return pool_cmds::cleanup(&g, kept),
        Command::Snapshot(cmd) => return snapshot_cmds::snapshot(&g, cmd),
        Command::Resize { volume, size } => return pool_cmds::resize(&g, &volume, &size),
        Command::FstestsConfig {
            session,
            mounts,
            output,
        } => return pool_cmds::fstests_config(&g, &session, &mounts, output.as_deref()),
        Command::Serve {
            volume,
            nbd,
            vhost_user_blk,
            listen,
            read_only,
            queues,
            block_device,
        } => {
            let what = serve_cmds::Exports {
                nbd,
                vhost_user_blk,
                listen,
                read_only,
                queues,
                block_device,
            };
            return serve_cmds::serve(&g, &volume, &what);
        }
        Command::Daemon { status } => return pool_cmds::daemon(&g, status),
        Command::Mcp => {
            let code = mcp::serve(&g)?;
            std::process::exit(code);
        }
        Command::Run {
            want,
            keep,
            export,
            command,
        } => {
            let code = pool_cmds::run(&g, &want, keep, export, &command)?;
            std::process::exit(code);
        }
        Command::Vm(cmd) => match *cmd {
            VmCmd::Run {
                vm,
                volumes,
                disk,
                env,
                command,
            } => {
                let code = vm_cmds::run(&g, &vm, &volumes, &disk, &env, &command)?;
                std::process::exit(code);
            }
            VmCmd::ModuleTest {
                vm,
                module,
                cycles,
                params,
                volumes,
            } => {
                let code = vm_suites::module_test(&g, &vm, &module, cycles, &params, &volumes)?;
                std::process::exit(code);
            }
            VmCmd::Fstests {
                vm,
                fstests,
                fstype,
                volumes,
                baseline,
                results,
                check_args,
            } => {
                let code = vm_suites::fstests(
                    &g,
                    &vm,
                    &fstests,
                    &fstype,
                    &volumes,
                    baseline.as_deref(),
                    results.as_deref(),
                    &check_args,
                )?;
                std::process::exit(code);
            }
        },
        Command::Journal { last } => return output::journal(&g, last),
        Command::Pv(PvCmd::List) => {
            let scan = eng.scan();
            return output::pvs(&g, &scan);
        }
        Command::Vg(VgCmd::List { name }) => {
            let scan = match &name {
                Some(n) => eng.read_vg(n)?.1,
                None => eng.scan(),
            };
            return output::vgs(&g, &scan, name.as_deref());
        }
        Command::Lv(LvCmd::Activate { lv, read_only }) => {
            return activation(&g, &eng, &lv, Some(read_only));
        }
        Command::Lv(LvCmd::Deactivate { lv }) => {
            return activation(&g, &eng, &lv, None);
        }
        Command::Lv(LvCmd::List { vg, segments }) => {
            let scan = match &vg {
                Some(n) => eng.read_vg(n)?.1,
                None => eng.scan(),
            };
            return output::lvs(&g, &scan, vg.as_deref(), segments);
        }
        Command::Pv(PvCmd::Create { paths, pv }) => {
            let options = pv_options(&pv)?;
            paths
                .into_iter()
                .map(|path| Operation::PvCreate { path, options })
                .collect()
        }
        Command::Pv(PvCmd::Remove { paths }) => paths
            .into_iter()
            .map(|path| Operation::PvRemove { path })
            .collect(),
        Command::Vg(VgCmd::Create {
            name,
            pvs,
            extent_size,
            no_autoactivation,
            pv,
        }) => vec![Operation::VgCreate {
            name,
            pvs,
            extent_size: parse_bytes("--extent-size", &extent_size)?,
            pv_options: pv_options(&pv)?,
            autoactivation: !no_autoactivation,
        }],
        Command::Vg(VgCmd::Remove { name }) => vec![Operation::VgRemove { name }],
        Command::Vg(VgCmd::Extend { name, pvs, pv }) => vec![Operation::VgExtend {
            name,
            pvs,
            pv_options: pv_options(&pv)?,
        }],
        Command::Vg(VgCmd::Reduce { name, pvs }) => vec![Operation::VgReduce { name, pvs }],
        Command::Vg(VgCmd::Rename { old, new }) => vec![Operation::VgRename { old, new }],
        Command::Vg(VgCmd::Trim { name }) => vec![Operation::VgTrim { name }],
        Command::Lv(LvCmd::Create {
            lv,
            size,
            stripes,
            stripe_size,
            tags,
            no_wipe,
            count,
        }) => {
            let (vg, name) = split_lv(&lv)?;
            let size = SizeArg::parse(&size).map_err(|e| anyhow!("--size: {e}"))?;
            if size.sign.is_some() {
                bail!("--size: a new LV takes an absolute size, not a +/- change");
            }
            if stripes == 0 {
                bail!("--stripes must be at least 1");
            }
            let stripe_size = parse_bytes("--stripe-size", &stripe_size)?;
            vec![Operation::LvCreate {
                vg,
                name,
                size,
                stripes,
                stripe_size,
                tags,
                wipe: !no_wipe,
                count,
            }]
        }
        Command::Lv(LvCmd::Remove { lvs }) => {
            let mut by_vg: Vec<(String, Vec<String>)> = Vec::new();
            for l in lvs {
                let (vg, name) = split_lv(&l)?;
                match by_vg.iter_mut().find(|(v, _)| *v == vg) {
                    Some((_, names)) => names.push(name),
                    None => by_vg.push((vg, vec![name])),
                }
            }
            by_vg
                .into_iter()
                .map(|(vg, names)| Operation::LvRemove { vg, names })
                .collect()
        }
        Command::Lv(LvCmd::Rename { lv, new }) => {
            let (vg, old) = split_lv(&lv)?;
            let new = match new.split_once('/') {
                Some((v, n)) if v == vg => n.to_string(),
                Some(_) => bail!("an LV cannot move to another VG by renaming"),
                None => new,
            };
            vec![Operation::LvRename { vg, old, new }]
        }
        Command::Lv(LvCmd::Resize { lv, size }) => {
            let (vg, name) = split_lv(&lv)?;
            let size = SizeArg::parse(&size).map_err(|e| anyhow!("--size: {e}"))?;
            vec![Operation::LvResize { vg, name, size }]
        }
        Command::Lv(LvCmd::Snapshot {
            lv,
            name,
            size,
            chunk_size,
        }) => {
            let (vg, origin) = split_lv(&lv)?;
            let size = size
                .map(|s| SizeArg::parse(&s).map_err(|e| anyhow!("--size: {e}")))
                .transpose()?;
            if size.as_ref().is_some_and(|s| s.sign.is_some()) {
                bail!("--size: a snapshot takes an absolute size, not a +/- change");
            }
            vec![Operation::SnapshotCreate {
                vg,
                origin,
                name,
                size,
                chunk_size: parse_bytes("--chunk-size", &chunk_size)?,
            }]
        }
        Command::Lv(LvCmd::Tag { lv, add, remove }) => {
            let (vg, name) = split_lv(&lv)?;
            if add.is_empty() && remove.is_empty() {
                bail!("give --add TAG and/or --remove TAG");
            }
            vec![Operation::LvTags {
                vg,
                name,
                add,
                remove,
            }]
        }
    };
    for op in ops {
        perform(&g, &eng, &op)?;
    }
    Ok(())
}

/// Ask on the terminal for a typed YES.
pub fn ask_yes() -> Result<()> {
    eprint!("Type YES to go ahead: ");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the confirmation")?;
    if line.trim() != "YES" {
        bail!("not confirmed; nothing was changed");
    }
    Ok(())
}

/// Refuse to remove, resize or rename LVs (or remove or rename their VG)
/// that device-mapper has active: the kernel would go on mapping the old
/// extents (LVM2 refuses these for open LVs too).
fn refuse_while_dm_active(eng: &Engine, op: &Operation) -> Result<()> {
    use devpool_pool::dmdev;
    let (vg, lvs): (&str, Option<Vec<&str>>) = match op {
        Operation::LvRemove { vg, names } => (vg, Some(names.iter().map(String::as_str).collect())),
        Operation::LvResize { vg, name, .. } => (vg, Some(vec![name])),
        Operation::LvRename { vg, old, .. } => (vg, Some(vec![old])),
        Operation::VgRemove { name } => (name, None),
        Operation::VgRename { old, .. } => (old, None),
        _ => return Ok(()),
    };
    // Hosts without device-mapper (or without LVM2's devices) stop here,
    // before any scan.
    if !dmdev::list().iter().any(|d| d.uuid.starts_with("LVM-")) {
        return Ok(());
    }
    let (v, _) = eng.read_vg(vg)?;
    let uuids = v
        .meta
        .lvs
        .iter()
        .filter(|l| lvs.as_ref().is_none_or(|n| n.contains(&l.name.as_str())))
        .map(|l| l.id.raw_str());
    if let Some(d) = dmdev::active_for_lvs(&v.meta, uuids).first() {
        bail!(
            "{} refused: device-mapper has it active as {} ({}); stop the devpool server that serves it, or deactivate it ('lvchange -an' / 'vgchange -an {vg}')",
            op.describe(),
            d.name,
            d.node().display()
        );
    }
    Ok(())
}

/// `lv activate` (`Some(read_only)`) or `lv deactivate` (`None`) of `lv`.
fn activation(g: &Global, eng: &Engine, lv: &str, activate: Option<bool>) -> Result<()> {
    use devpool_pool::{activate, dmdev};
    let (vg, name) = split_lv(lv)?;
    if !dmdev::available() {
        bail!(
            "this kernel has no device-mapper (no dm_mod): LVs cannot be activated here; devpool serves them instead (`devpool serve`)"
        );
    }
    // Under the VG's lock, as LVM2 activates: the LV cannot change meanwhile.
    let _lock = eng.hold_vg_shared(&vg)?;
    let (v, _) = eng.read_vg(&vg)?;
    if v.meta.lv(&name).is_none() {
        bail!("LV {vg}/{name} not found");
    }
    let Some(read_only) = activate else {
        let gone = activate::deactivate_lv(&v.meta, &name)?;
        if g.json {
            println!("{}", serde_json::json!({ "lv": lv, "removed": gone }));
        } else if gone.is_empty() {
            println!("{lv} was not active");
        } else {
            println!("deactivated {lv}: removed {}", gone.join(", "));
        }
        return Ok(());
    };
    let pvs: Vec<(String, std::path::PathBuf)> = v
        .meta
        .pvs
        .iter()
        .filter_map(|p| v.device_of(&p.key).map(|d| (p.key.clone(), d.path.clone())))
        .collect();
    let (node, a) = activate::activate_lv(&g.state_dir, &v.meta, &pvs, &name, read_only)?;
    let names: Vec<&str> = a.devices.iter().map(|d| d.name.as_str()).collect();
    if g.json {
        println!(
            "{}",
            serde_json::json!({ "lv": lv, "device": node, "devices": names, "made": a.made })
        );
    } else if a.made {
        println!(
            "activated {lv} as {} ({})",
            node.display(),
            names.join(", ")
        );
    } else {
        // Someone else's devices, used as they are: say whose, when they
        // go with a devpool server.
        let holder = activate::active_devices(&g.state_dir, &v.meta)
            .into_iter()
            .find(|d| d.device == node)
            .and_then(|d| d.held_by)
            .filter(|h| h.starts_with("server"));
        match holder {
            Some(h) => println!(
                "{lv} is active already as {} ({h}'s: it goes when that server stops)",
                node.display()
            ),
            None => println!("{lv} is active already as {}", node.display()),
        }
    }
    // `a` goes without removing anything: the devices stay after this
    // process, until `lv deactivate`.
    Ok(())
}

/// Plan → (dry run) → confirm → execute.
fn perform(g: &Global, eng: &Engine, op: &Operation) -> Result<()> {
    refuse_while_dm_active(eng, op)?;
    if g.dry_run {
        let plan = eng.plan(op)?;
        return output::plan(g, &plan, true);
    }
    let (plan, done) = match eng.apply(op, g.yes) {
        Ok(r) => r,
        Err(EngineError::NeedsConfirmation(plan)) => {
            output::plan(g, &plan, false)?;
            if !std::io::stdin().is_terminal() {
                bail!(
                    "{} needs confirmation ({}); rerun with --yes",
                    plan.operation,
                    plan.confirm.join("; ")
                );
            }
            ask_yes()?;
            let done = eng.execute(&plan)?;
            (*plan, done)
        }
        Err(e) => return Err(e.into()),
    };
    output::executed(g, &plan, &done)
}
