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

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Scan only these devices or image files (comma separated). Default: all
    /// block devices plus the image files devpool created PVs on.
    #[arg(long, global = true, value_delimiter = ',', env = "DEVPOOL_DEVICES")]
    pub devices: Option<Vec<PathBuf>>,
    /// Where devpool keeps its journal and the list of image-file PVs.
    #[arg(
        long,
        global = true,
        env = "DEVPOOL_STATE_DIR",
        default_value = "/var/lib/devpool"
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
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Physical volumes: label devices or image files for LVM2.
    #[command(subcommand)]
    Pv(PvCmd),
    /// Volume groups: pools of extents over one or more PVs.
    #[command(subcommand)]
    Vg(VgCmd),
    /// Logical volumes: carve, resize, rename, tag and remove volumes.
    #[command(subcommand)]
    Lv(LvCmd),
    /// Show the transaction journal.
    Journal {
        /// Only the last N transactions.
        #[arg(long, default_value_t = 20)]
        last: usize,
    },
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
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        pv: PvArgs,
    },
    /// Remove the PV label from devices that belong to no VG.
    Remove {
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
        name: String,
        #[arg(required = true)]
        pvs: Vec<PathBuf>,
        /// Extent size: a power of two, 1K to 16G.
        #[arg(long, short = 's', default_value = "4M")]
        extent_size: String,
        #[command(flatten)]
        pv: PvArgs,
    },
    /// Remove a VG (its LVs' data is lost: asks for YES when it has LVs).
    Remove { name: String },
    /// Add devices to a VG.
    Extend {
        name: String,
        #[arg(required = true)]
        pvs: Vec<PathBuf>,
        #[command(flatten)]
        pv: PvArgs,
    },
    /// Remove unused PVs from a VG.
    Reduce {
        name: String,
        #[arg(required = true)]
        pvs: Vec<PathBuf>,
    },
    /// Rename a VG.
    Rename { old: String, new: String },
    /// List VGs with size, free space and health.
    List { name: Option<String> },
}

#[derive(Subcommand, Debug)]
pub enum LvCmd {
    /// Create an LV. Sizes: 10G, 512M, 4096B, 25e (extents), 50%FREE, 100%VG.
    Create {
        /// VG/NAME
        lv: String,
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
        #[arg(required = true)]
        lvs: Vec<String>,
    },
    /// Rename an LV: VG/OLD NEW.
    Rename { lv: String, new: String },
    /// Resize an LV: +20G, -5G or 30G (shrinking asks for YES).
    Resize {
        lv: String,
        #[arg(long, short = 'L', allow_hyphen_values = true)]
        size: String,
    },
    /// Add or remove tags.
    Tag {
        lv: String,
        #[arg(long)]
        add: Vec<String>,
        #[arg(long)]
        remove: Vec<String>,
    },
    /// List LVs (of one VG, or all), with --segments for the extent map.
    List {
        vg: Option<String>,
        #[arg(long)]
        segments: bool,
    },
}
