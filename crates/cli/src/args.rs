//! Command-line grammar.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "devpool",
    version,
    about = "LVM device pools for kernel and filesystem testing",
    long_about = "devpool reads and writes LVM2 volume groups itself (no lvcreate): \
PVs on block devices or sparse image files, VGs, and linear or striped LVs. \
Every change is planned first (--dry-run shows the plan and the metadata diff), \
verified against the disks under LVM2's own locks, committed atomically \
(write, precommit, commit) and journaled. What devpool writes, LVM2 reads.",
    after_help = "Example:\n  devpool vg create demo /var/tmp/demo.img --image-size 64G\n  devpool lv create demo/test --size 10G\n  devpool lv create demo/scratch --size 50%FREE --stripes 2\n  devpool lv list demo"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// `/var/lib/devpool`, or for a user who cannot write there, a directory
/// of that user's (`$XDG_STATE_HOME/devpool`, `~/.local/state/devpool`).
fn default_state_dir() -> PathBuf {
    let system = PathBuf::from("/var/lib/devpool");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return system;
    }
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .map(|d| d.join("devpool"))
        .unwrap_or(system)
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Scan only these devices or image files (comma separated). Default: all
    /// block devices plus the image files devpool created PVs on.
    #[arg(long, global = true, value_delimiter = ',', env = "DEVPOOL_DEVICES")]
    pub devices: Option<Vec<PathBuf>>,
    /// Where devpool keeps its journal and the list of image-file PVs
    /// (without root: $XDG_STATE_HOME/devpool or ~/.local/state/devpool).
    #[arg(
        long,
        global = true,
        env = "DEVPOOL_STATE_DIR",
        default_value_os_t = default_state_dir()
    )]
    pub state_dir: PathBuf,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// Show the plan (steps and metadata diff) and change nothing.
    #[arg(long, global = true)]
    pub dry_run: bool,
    /// Confirm destructive steps without asking.
    #[arg(long, short = 'y', global = true)]
    pub yes: bool,
    /// The pool to use (else $DEVPOOL_POOL, else $KERNELDEV_DEVICE_POOL, else `default`).
    #[arg(long, global = true, env = "DEVPOOL_POOL")]
    pub pool: Option<String>,
    /// Take and give back leases in this process even when `devpool daemon`
    /// runs (by default they go through it: its commits are shared).
    #[arg(
        long,
        global = true,
        env = "DEVPOOL_NO_DAEMON",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub no_daemon: bool,
}

#[derive(Args, Debug, Clone)]
pub struct Want {
    /// Volumes as ROLE:SIZE,… (roles test, scratch, pool1.., logwrites set the
    /// fstests variables; a VM sees them as /dev/vda, /dev/vdb, … in this order).
    #[arg(long, conflicts_with = "profile")]
    pub volumes: Option<String>,
    /// A named set of volumes: `fstests` (test, pool1..pool5, logwrites).
    #[arg(long)]
    pub profile: Option<String>,
    /// Size of every volume of the profile (default 8G).
    #[arg(long, requires = "profile")]
    pub size: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum PoolCmd {
    /// Turn a dedicated disk, partition or image file into a pool (VG devpool-NAME).
    #[command(
        after_help = "Checks first: not mounted (nor a partition or holder), not in fstab, not \
backing / /boot or swap through any stacking, not an md member, LUKS container or other \
LVM PV, not open in any other program (exclusively or not); file systems and partition tables need YES.\n\n\
Example:\n  devpool pool setup /dev/sdb --name fast\n  devpool pool setup /var/tmp/pool.img --name img --image-size 200G"
    )]
    Setup {
        /// The disk, partition or image file the pool takes over whole.
        device: PathBuf,
        /// The pool's name (its VG is devpool-NAME).
        #[arg(long)]
        name: String,
        /// Create the image file with this size when it does not exist (sparse).
        #[arg(long)]
        image_size: Option<String>,
        /// Give the pool a thin pool at once (as `pool thin enable` with its defaults).
        #[arg(long)]
        thin: bool,
    },
    /// Thin provisioning: leases become thin volumes.
    #[command(subcommand)]
    Thin(ThinCmd),
    /// Every pool found on this machine.
    List,
    /// Devices, size, free space, leases with owners, health.
    Status {
        /// The pool (default: --pool, $DEVPOOL_POOL, … or `default`).
        name: Option<String>,
    },
    /// Give the pool's free space back: punch holes over its free extents in
    /// image files (BLKDISCARD on disks). Releases do this as they go; trim
    /// catches up after volumes removed by LVM2 or by older devpool.
    Trim {
        /// The pool (default: --pool, $DEVPOOL_POOL, … or `default`).
        name: Option<String>,
    },
    /// Remove a pool: reap orphans, refuse while live leases exist, remove VG and PV label.
    Teardown {
        /// The pool to remove.
        name: String,
        /// Discard the device afterwards (or zero it where discard is unsupported).
        #[arg(long)]
        wipe: bool,
        /// Remove live and kept leases too.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ThinCmd {
    /// Create the pool's thin pool (dm-thin's format; LVM2's thin-pool LV).
    #[command(
        after_help = "From then on, leases are thin volumes: each has its virtual size and uses \
pool space only where it is written; `snapshot create` on a thin volume makes an instant thin \
snapshot (shared blocks). Thin volumes have no fixed extents, so they get no plain loop device. \
Where the host has device-mapper, each gets a dm-thin device at acquire instead (as LVM2 activates \
it), and the kernel's dm-thin does the thin mapping for every server of it too (`--nbd`, `run \
--export`, VMs; `devpool lv activate`). Elsewhere devpool serves them (`devpool serve VOLUME \
--block-device`, `--nbd`, `run --export`, VMs). \
While dm-thin holds the pool, devpool sends its changes (leases, thin snapshots, releases) to the \
kernel as LVM2 does, as messages.\n\n\
When the data fills up, writes to blocks not yet written fail with ENOSPC and `pool status` says \
so; what was written stays.\n\n\
Example:\n  devpool pool thin enable default --data-size 50G\n  devpool lease acquire --volumes test:100G"
    )]
    Enable {
        /// The pool (default: --pool, $DEVPOOL_POOL, … or `default`).
        name: Option<String>,
        /// Data space (default: 90%FREE). Sizes as for volumes: 50G, 80%FREE.
        #[arg(long)]
        data_size: Option<String>,
        /// dm-thin metadata space (default: 64 bytes per data block, at least 16M).
        #[arg(long)]
        metadata_size: Option<String>,
        /// Data block size: a multiple of 64K from 64K to 1G.
        #[arg(long, default_value = "64K")]
        chunk_size: String,
    },
    /// Data and metadata use of the pool's thin pool.
    Status {
        /// The pool (default: --pool, $DEVPOOL_POOL, … or `default`).
        name: Option<String>,
    },
    /// Grow the thin pool's data space (a full pool takes writes again).
    #[command(
        after_help = "The data LV grows into the VG's free space (add a disk first with \
`devpool vg extend` when there is none), then dm-thin's data space map takes in the new blocks. \
Thin pools only grow. While dm-thin holds the pool (a host with device-mapper), its data \
device and pool device are reloaded after the commit, as LVM2's lvextend does, and the kernel \
takes in the new blocks as the pool resumes; a new disk's extents may be on another PV. Refused \
while devpool serves a thin volume of the pool through its own thin mappings (a host without \
dm-thin): that server holds the pool's size.\n\n\
Example:\n  devpool pool thin extend default --data-size +20G\n  devpool pool thin extend --data-size 100%FREE"
    )]
    Extend {
        /// The pool (default: --pool, $DEVPOOL_POOL, … or `default`).
        name: Option<String>,
        /// The new data size: +20G (grow by), 80G (grow to), or 100%FREE (take the free space).
        #[arg(long)]
        data_size: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Snapshot a pool volume before a risky run (copy-on-write, dm-snapshot's
    /// format; a thin volume gets an instant thin snapshot).
    #[command(
        after_help = "The snapshot belongs to the volume's lease: it is released and reaped with it. \
Its COW store (default size: a fifth of the volume) is a new LV in the pool; when it fills up the \
snapshot becomes invalid (as with dm) and `pool status` says so, while the volume keeps working.\n\n\
A volume with snapshots is copy-on-write, so its plain loop device is detached (refused while it is \
mounted or open) and devpool serves it: `devpool serve VOLUME --block-device` (or --nbd, or a VM). \
When its last snapshot is deleted or merged, a leased volume gets a loop device again.\n\n\
Example:\n  devpool snapshot create devpool-20261121070000-abc123-test --name before\n  \
devpool serve devpool-20261121070000-abc123-test --nbd unix:/tmp/test.sock   # writes copy out\n  \
devpool snapshot merge before --yes   # roll the volume back\n  \
devpool snapshot delete before        # or keep the volume as it is"
    )]
    Create {
        /// The volume's LV name (as `lease list` shows it).
        volume: String,
        /// The snapshot's name (an LV name in the pool).
        #[arg(long)]
        name: String,
        /// COW store size: how much of the volume may change before the
        /// snapshot fills up (default: a fifth of the volume).
        #[arg(long, short = 'L')]
        size: Option<String>,
        /// Copy-on-write chunk size: a power of two from 4K to 512K.
        #[arg(long, default_value = "4K")]
        chunk_size: String,
    },
    /// Snapshots of the pool with origin, lease and how full each is.
    List,
    /// Delete a snapshot; its volume stays as it is now.
    Delete {
        /// The snapshot (as `snapshot list` shows it).
        name: String,
    },
    /// Roll the volume back to the snapshot (as lvconvert --merge), then
    /// delete the snapshot. Asks first (or --yes).
    #[command(
        after_help = "Every chunk the snapshot kept is copied back over the volume; the volume's \
other snapshots get their copy first. Nothing may serve the volume meanwhile. A merge cut short \
leaves the snapshot in place: run it again to finish.\n\n\
A thin snapshot merges in one transaction without copying: the volume takes the snapshot's \
thin device and its own is deleted."
    )]
    Merge {
        /// The snapshot to roll its volume back to.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum LeaseCmd {
    /// Create the volumes of a lease in one commit and attach loop devices.
    Acquire {
        #[command(flatten)]
        want: Want,
        /// Never reap this lease automatically.
        #[arg(long)]
        keep: bool,
        /// The process that owns the lease (default: devpool's parent, e.g. your shell or script).
        #[arg(long)]
        owner_pid: Option<u32>,
    },
    /// Detach and remove a lease's volumes in one commit. Refused while a
    /// volume is still mounted, used as swap, built on (a VG, a dm device)
    /// or open in a program (a dd, a QEMU; a probe that closes it within a
    /// few tenths of a second does not count): its extents would go to the
    /// next lease under a live file system or writer. The error names the
    /// mount or the process.
    Release {
        /// The lease's session id (as `lease acquire` printed it and
        /// `lease list` shows it).
        session: String,
    },
    /// Leases of the pool with their owners and whether each is alive.
    List,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run an MCP server on stdio for coding agents: kerneldev-mcp's
    /// device_pool_* tools, leases (owned by the server, released when the
    /// client disconnects) and VM runs. Configure it in an agent as the
    /// command `devpool mcp`.
    #[command(
        after_help = "Tools: device_pool_setup, device_pool_status, device_pool_list, device_pool_resize, device_pool_snapshot, device_pool_cleanup, device_pool_teardown, device_pool_lease_acquire, device_pool_lease_release, vm_run, vm_module_test, fstests_vm_boot_and_run.\nDestructive calls return their plan unless given confirm: true."
    )]
    Mcp,
    /// Serve lease requests on a Unix socket, sharing commits between
    /// concurrent requests; `lease acquire`, `lease release` and `run` use it
    /// while it runs. Stops on SIGINT/SIGTERM.
    #[command(
        after_help = "The socket is STATE_DIR/daemon.sock (mode 0600). Any program can \
speak to it: one JSON object per line each way, e.g.\n\
\x20 {\"op\":\"acquire\",\"pool\":\"default\",\"profile\":\"fstests\",\"size\":\"10G\"}\n\
\x20 {\"op\":\"acquire\",\"volumes\":\"vda:20G\",\"loop_devices\":false}\n\
\x20 {\"op\":\"release\",\"pool\":\"default\",\"session\":\"SESSION\"}\n\
\x20 {\"op\":\"ping\"}\n\
answered with {\"ok\":true,\"result\":…} or {\"ok\":false,\"error\":\"…\"}. A lease belongs to \
\"owner_pid\", else to the connecting process, and is reaped when that process dies.\n\n\
Example:\n  devpool daemon &\n  devpool lease acquire --profile fstests   # through the daemon\n  devpool daemon --status"
    )]
    Daemon {
        /// Ask the running daemon for its PID and how many requests its
        /// commits carried, and exit.
        #[arg(long)]
        status: bool,
    },
    /// Physical volumes: label devices or image files for LVM2.
    #[command(subcommand)]
    Pv(PvCmd),
    /// Volume groups: pools of extents over one or more PVs.
    #[command(subcommand)]
    Vg(VgCmd),
    /// Logical volumes: carve, resize, rename, tag and remove volumes.
    #[command(subcommand)]
    Lv(LvCmd),
    /// Pools: set up a dedicated device (or image file), list, status, teardown.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Leases: volumes for one test run, owned by a process, given back after.
    #[command(subcommand)]
    Lease(LeaseCmd),
    /// Snapshots of pool volumes: create, list, delete, merge (roll back).
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Remove leases whose owner is dead (PID gone, reused, or rebooted since).
    /// A dead lease whose volumes are still mounted, held or open in a
    /// program is kept, with the reason, until they are let go.
    Cleanup {
        /// Also remove kept leases whose owner is dead.
        #[arg(long)]
        kept: bool,
    },
    /// Resize a leased volume: +20G, -5G or 30G (shrinking asks first).
    Resize {
        /// The volume's LV name (as `lease list` shows it).
        volume: String,
        /// +SIZE grows by SIZE, -SIZE shrinks by it, SIZE sets it (K, M, G, T).
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
    /// Lease volumes, run a command with TEST_DEV/SCRATCH_DEV… set, release.
    #[command(
        after_help = "Example:\n  devpool run --volumes test:1G,scratch:1G -- sh -c 'mkfs.ext4 -q $TEST_DEV'\n  devpool run --profile fstests --size 4G -- ./check -g quick\n  devpool run --volumes test:4G --export nbd -- sh -c 'nbdinfo \"$DEVPOOL_NBD_TEST\"'\n\nThe command's exit status is devpool's. The volumes are released when the command ends, on Ctrl-C and on SIGTERM (unless --keep)."
    )]
    Run {
        #[command(flatten)]
        want: Want,
        /// Keep the volumes after the command (never reaped; `cleanup --kept` removes them).
        #[arg(long)]
        keep: bool,
        /// Also serve every volume for the run: sockets in DEVPOOL_NBD_<ROLE>
        /// (an nbd+unix URI) and DEVPOOL_NBD_SOCKET_<ROLE>, or DEVPOOL_VHOST_<ROLE>.
        #[arg(long, value_enum)]
        export: Option<ExportKind>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Serve a leased volume over NBD (and/or vhost-user-blk) until stopped.
    #[command(
        after_help = "The volume must be leased; serving stops when the lease is released, \
when its owner dies, and on SIGINT/SIGTERM (in-flight requests finish, devices are flushed, \
exit 0). Unix sockets are created mode 0600.\n\n\
Example:\n  devpool serve devpool-20261121070000-abc123-test --nbd unix:/tmp/test.sock\n  \
nbdinfo 'nbd+unix:///?socket=/tmp/test.sock'\n  \
devpool serve VOLUME --nbd tcp:127.0.0.1:10809"
    )]
    Serve {
        /// The volume's LV name (as `lease acquire` and `lease list` show it).
        volume: String,
        /// NBD endpoint: unix:PATH or tcp:HOST:PORT (loopback unless --listen).
        #[arg(long, required_unless_present_any = ["vhost_user_blk", "block_device"])]
        nbd: Option<String>,
        /// Serve vhost-user-blk for QEMU on this Unix socket.
        #[arg(long)]
        vhost_user_blk: Option<PathBuf>,
        /// Allow a TCP address that is not loopback (the address itself).
        #[arg(long)]
        listen: Option<std::net::IpAddr>,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
        /// vhost-user-blk queues (one per guest vCPU is best).
        #[arg(long, default_value_t = 2)]
        queues: usize,
        /// Also give the host a block device for the volume, whatever its
        /// layout: a loop device when it is one range, else the fastest path
        /// the kernel offers: device-mapper (/dev/dm-N, named as LVM2 names
        /// the LV; dm-snapshot for snapshots and their origin, dm-thin for
        /// thin volumes, whose other frontends then serve that device
        /// too), ublk (/dev/ublkbN), the NBD client
        /// (/dev/nbdN), or FUSE + loop. The output names the path taken.
        #[arg(long)]
        block_device: bool,
    },
    /// Boot a kernel in QEMU with leased volumes: run a command, a module test or fstests.
    #[command(subcommand)]
    Vm(Box<VmCmd>),
    /// Write an fstests local.config for a lease.
    FstestsConfig {
        /// The lease whose volumes become TEST_DEV and SCRATCH_DEV_POOL.
        session: String,
        /// Where the file systems get mounted.
        #[arg(long, default_value = "/mnt/devpool")]
        mounts: String,
        /// Write here instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Show the transaction journal.
    Journal {
        /// Only the last N transactions.
        #[arg(long, default_value_t = 20)]
        last: usize,
    },
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportKind {
    Nbd,
    VhostUserBlk,
}

#[derive(Args, Debug, Clone)]
pub struct PvArgs {
    /// Metadata area size (e.g. 128M). Default: 128 MiB on devices of 8 GiB or
    /// more (room for 65,536 volumes), else LVM2's 1020 KiB.
    #[arg(long)]
    pub metadata_size: Option<String>,
    /// Metadata copies: 1 (start of device) or 2 (start and end).
    #[arg(long, default_value_t = 1)]
    pub metadata_copies: u8,
    /// Create missing image files with this size (sparse: costs no space until written).
    #[arg(long)]
    pub image_size: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum PvCmd {
    /// Write an LVM2 PV label and metadata area on devices or image files.
    Create {
        /// Devices or image files (a missing image file is made with --image-size).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        pv: PvArgs,
    },
    /// Remove the PV label from devices that belong to no VG.
    Remove {
        /// Devices or image files that are PVs of no VG.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// List PVs.
    List,
}

#[derive(Subcommand, Debug)]
pub enum VgCmd {
    /// Create a VG; devices that are not PVs yet become PVs.
    Create {
        /// The new VG's name.
        name: String,
        /// Its devices or image files.
        #[arg(required = true)]
        pvs: Vec<PathBuf>,
        /// Extent size: a power of two, 1K to 16G.
        #[arg(long, short = 's', default_value = "4M")]
        extent_size: String,
        /// Keep LVM2 from activating the VG's LVs by itself (at boot, or
        /// when its PVs appear): LVM2's `NOAUTOACTIVATE` flag, as
        /// `vgcreate --setautoactivation n` writes it. Pools always have it.
        #[arg(long)]
        no_autoactivation: bool,
        #[command(flatten)]
        pv: PvArgs,
    },
    /// Remove a VG (its LVs' data is lost: asks for YES when it has LVs).
    Remove {
        /// The VG to remove.
        name: String,
    },
    /// Add devices to a VG.
    Extend {
        /// The VG.
        name: String,
        /// Devices or image files to add.
        #[arg(required = true)]
        pvs: Vec<PathBuf>,
        #[command(flatten)]
        pv: PvArgs,
    },
    /// Remove unused PVs from a VG.
    Reduce {
        /// The VG.
        name: String,
        /// Its PVs to take out (no extent of them in use).
        #[arg(required = true)]
        pvs: Vec<PathBuf>,
    },
    /// Rename a VG.
    Rename {
        /// The VG's name now.
        old: String,
        /// Its new name.
        new: String,
    },
    /// Discard the VG's free extents: punch holes in image files (their
    /// space goes back to the filesystem), BLKDISCARD on block devices.
    Trim {
        /// The VG.
        name: String,
    },
    /// List VGs with size, free space and health.
    List {
        /// Only this VG.
        name: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum LvCmd {
    /// Create an LV. Sizes: 10G, 512M, 4096B, 25e (extents), 50%FREE, 100%VG.
    Create {
        /// VG/NAME
        lv: String,
        /// Size: 10G, 512M, 4096B, 25e (extents), 50%FREE, 100%VG.
        #[arg(long, short = 'L', allow_hyphen_values = true)]
        size: String,
        /// Stripe across this many PVs.
        #[arg(long, short = 'i', default_value_t = 1)]
        stripes: u32,
        /// Stripe size (power of two, 4K up to the extent size).
        #[arg(long, short = 'I', default_value = "64K")]
        stripe_size: String,
        /// Tag the new LV (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Do not zero the first 4 KiB of the new LV.
        #[arg(long)]
        no_wipe: bool,
        /// Create COUNT LVs named NAME-0 … NAME-<COUNT-1> in one commit.
        #[arg(long)]
        count: Option<u32>,
    },
    /// Remove LVs (VG/NAME...).
    Remove {
        /// VG/NAME of each LV.
        #[arg(required = true)]
        lvs: Vec<String>,
    },
    /// Rename an LV: VG/OLD NEW.
    Rename {
        /// VG/OLD
        lv: String,
        /// The new name (in the same VG).
        new: String,
    },
    /// Resize an LV: +20G, -5G or 30G (shrinking asks for YES).
    Resize {
        /// VG/NAME
        lv: String,
        /// +SIZE grows by SIZE, -SIZE shrinks by it, SIZE sets it.
        #[arg(long, short = 'L', allow_hyphen_values = true)]
        size: String,
    },
    /// Add or remove tags.
    Tag {
        /// VG/NAME
        lv: String,
        /// A tag to add (repeatable).
        #[arg(long)]
        add: Vec<String>,
        /// A tag to remove (repeatable).
        #[arg(long)]
        remove: Vec<String>,
    },
    /// Snapshot an LV (copy-on-write, dm-snapshot's format): VG/ORIGIN --name NAME.
    #[command(
        after_help = "The COW store is a new LV named NAME (default size: a fifth of the origin) \
whose header and first exception area devpool writes in dm-snapshot's persistent format; \
LVM2 sees a snapshot of ORIGIN (lvs shows its origin and the 's' attribute) and activates \
it with dm-snapshot.\n\nExample:\n  devpool lv snapshot demo/test --name before-run --size 1G"
    )]
    Snapshot {
        /// VG/ORIGIN
        lv: String,
        /// The snapshot's LV name (in the origin's VG).
        #[arg(long)]
        name: String,
        /// COW store size (default: a fifth of the origin).
        #[arg(long, short = 'L')]
        size: Option<String>,
        /// Copy-on-write chunk size: a power of two from 4K to 512K.
        #[arg(long, default_value = "4K")]
        chunk_size: String,
    },
    /// List LVs (of one VG, or all), with --segments for the extent map.
    List {
        /// Only this VG.
        vg: Option<String>,
        /// One row per segment: type, stripes and PV extent ranges.
        #[arg(long)]
        segments: bool,
    },
    /// Activate an LV with device-mapper, as `lvchange -ay` does (hosts
    /// with dm): a linear or striped LV becomes /dev/dm-N under LVM2's name
    /// (`vg-lv`, so `lvs` sees it active); an origin with snapshots, or a
    /// snapshot, activates its whole family as LVM2 stacks it (dm-snapshot);
    /// a thin volume comes up over its pool's devices (dm-thin), shared
    /// with the pool's other active thin volumes. An image-file PV gets a
    /// loop device under it.
    #[command(
        after_help = "Until `lv deactivate`, devpool will not remove, resize or rename the LV, \
nor serve a snapshot family through its own copy-on-write, or a thin volume through its own thin \
mappings, beside the kernel's. While dm-thin holds a thin pool, its changes (leases, thin \
snapshots, releases) reach the kernel as messages, as LVM2 sends them; the last thin volume's \
deactivation takes the pool's devices with it. The other way round, while a `devpool serve` \
runs a snapshot family's copy-on-write (or a pool's thin mappings) itself, activation is refused, \
naming that process.\n\n\
Example:\n  devpool lv activate vg0/data\n  mkfs.ext4 /dev/mapper/vg0-data   # or the /dev/dm-N printed\n  \
devpool lv deactivate vg0/data"
    )]
    Activate {
        /// VG/NAME
        lv: String,
        /// Make the device read-only.
        #[arg(long)]
        read_only: bool,
    },
    /// Deactivate an LV (and its snapshot family): remove its device-mapper
    /// devices and the loop devices under them, as `lvchange -an` does. A
    /// snapshot family goes whole: while a server, a mount or another
    /// program has one of its devices open, it is refused (a snapshot's
    /// device removed under a written origin would stop its copy-out).
    Deactivate {
        /// VG/NAME
        lv: String,
    },
}

/// Which kernel to boot and how.
#[derive(Args, Debug, Clone)]
pub struct VmArgs {
    /// The kernel image (bzImage). Modules come from --modules, else
    /// /lib/modules/<its version> when that exists.
    #[arg(
        long,
        conflicts_with = "kernel_deb",
        required_unless_present = "kernel_deb"
    )]
    pub kernel: Option<PathBuf>,
    /// A Debian linux-image-*.deb: its vmlinuz and modules (unpacked once
    /// under the state directory).
    #[arg(long)]
    pub kernel_deb: Option<PathBuf>,
    /// The kernel's module tree: lib/modules/<version>, or a root that holds one.
    #[arg(long)]
    pub modules: Option<PathBuf>,
    /// Also load these modules at boot (with their dependencies), e.g. xfs,dm_thin_pool.
    #[arg(long, value_delimiter = ',')]
    pub load_module: Vec<String>,
    /// Copy a host file or directory into the guest: SRC:DST (programs bring
    /// their shared libraries).
    #[arg(long)]
    pub add: Vec<String>,
    /// Guest memory.
    #[arg(long, default_value = "2G")]
    pub mem: String,
    /// Guest vCPUs (vhost-user-blk gets one queue per vCPU).
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Kill the VM after this many seconds (boot included).
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Boot again, up to this many times, when QEMU itself crashes (dies of
    /// SIGABRT, SIGSEGV, ...) before the guest's command starts. The command
    /// never runs twice: a crash after it started is reported, not retried.
    #[arg(long, default_value_t = 2)]
    pub boot_retries: u32,
    /// Keep the volumes afterwards (never reaped; `cleanup --kept` removes them).
    #[arg(long)]
    pub keep: bool,
    /// KVM when a probe guest boots under it, else TCG (auto); or force one.
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: AccelArg,
    /// How volumes reach the guest: auto (raw offset/size for a contiguous
    /// volume, vhost-user-blk otherwise), or one way for all.
    #[arg(long, value_enum, default_value = "auto")]
    pub attach: AttachArg,
    /// Extra kernel command line arguments.
    #[arg(long, default_value = "")]
    pub append: String,
    /// Do not stream the guest console.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachArg {
    Auto,
    Raw,
    VhostUserBlk,
    Nbd,
}

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// Lease volumes, boot the kernel with them attached, run a command in the guest.
    #[command(
        after_help = "The guest runs busybox from an initramfs devpool builds; \
TEST_DEV, SCRATCH_DEV, SCRATCH_DEV_POOL and DEVPOOL_<ROLE> name the guest's disks. \
devpool's exit status is the command's (124 on timeout, 125 when the guest died \
without reporting one). The volumes are released whatever happens, unless --keep.\n\n\
Example:\n  devpool vm run --kernel-deb linux-image-6.12.95+deb12-amd64-unsigned_6.12.95-1~bpo12+1_amd64.deb \\\n    \
--volumes test:1G,scratch:1G --add /sbin/mke2fs:/sbin/mkfs.ext4 -- sh -c 'mkfs.ext4 -q $TEST_DEV && echo ok'\n  \
devpool vm run --kernel arch/x86/boot/bzImage --modules /tmp/mods --volumes test:2G -- cat /proc/version"
    )]
    Run {
        #[command(flatten)]
        vm: VmArgs,
        #[command(flatten)]
        volumes: Want,
        /// Also attach a whole host file or block device (after the volumes).
        #[arg(long)]
        disk: Vec<PathBuf>,
        /// Set KEY=VALUE in the command's environment.
        #[arg(long = "env")]
        env: Vec<String>,
        /// The command and its arguments, run by the guest's sh.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Load, check, cycle and exercise a module in a guest; report what the kernel log says.
    #[command(
        after_help = "Steps: modinfo, insmod, lsmod + /proc/modules + /sys/module/NAME, \
N unload/load cycles, an I/O load on a leased volume while loaded, rmmod, and a kernel \
log scan for BUG, WARNING, Oops, Call Trace, lockdep and KASAN reports. Exit status 0 \
only when every step passed and the log is clean.\n\n\
Example:\n  devpool vm module-test --kernel-deb linux-image-….deb --module ./hello.ko --cycles 10 --json"
    )]
    ModuleTest {
        #[command(flatten)]
        vm: VmArgs,
        /// The module to test (.ko built for this kernel).
        #[arg(long)]
        module: PathBuf,
        /// Unload/load cycles.
        #[arg(long, default_value_t = 10)]
        cycles: u32,
        /// Module parameters for insmod.
        #[arg(long, default_value = "")]
        params: String,
        /// The volume the I/O load runs on.
        #[arg(long, default_value = "test:256M")]
        volumes: String,
    },
    /// Run fstests in a guest on leased volumes; per-test results, optionally against a baseline.
    #[command(
        after_help = "The fstests tree (built: `make` in it) is shared into the guest \
over 9p at /fstests; results come back to RESULTS (default: a directory under the state \
dir). local.config is generated from the lease: TEST_DEV plus SCRATCH_DEV (one scratch \
volume) or SCRATCH_DEV_POOL (pool1..N), never both. Host programs the tests need go in \
with --add.\n\n\
Example:\n  devpool vm fstests --kernel-deb linux-image-….deb --fstests ~/xfstests-dev --fstype ext4 -- -g quick\n  \
devpool vm fstests … --baseline last.json -- generic/001 generic/002"
    )]
    Fstests {
        #[command(flatten)]
        vm: VmArgs,
        /// The fstests (xfstests-dev) tree.
        #[arg(long)]
        fstests: PathBuf,
        /// File system under test: ext4, xfs or btrfs.
        #[arg(long, default_value = "ext4")]
        fstype: String,
        /// Volumes (default: test and scratch, 4G each).
        #[arg(long, default_value = "test:4G,scratch:4G")]
        volumes: String,
        /// Compare with a saved `--json` report and show only what changed.
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// Where the guest writes fstests' results directory.
        #[arg(long)]
        results: Option<PathBuf>,
        /// Arguments for fstests' check: `-g quick`, or test names.
        #[arg(last = true)]
        check_args: Vec<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every argument of every command says what it is in `--help`.
    #[test]
    fn every_argument_has_help() {
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in c.get_arguments() {
                let builtin = matches!(a.get_id().as_str(), "help" | "version");
                if !builtin && !a.is_hide_set() && a.get_help().is_none() {
                    missing.push(format!("{path} {}", a.get_id()));
                }
            }
            for s in c.get_subcommands() {
                walk(s, &format!("{path} {}", s.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "devpool", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:#?}");
    }
}
