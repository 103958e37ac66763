//! Group commit for a resident process (`devpool daemon`): lease acquires
//! and releases that arrive on one pool while a commit is running wait for
//! it, then share the next one. With 16 clients this turns 16 commits (each
//! two syncs under the VG's lock) into a handful.
//!
//! The first request to find no commit under way leads: it takes every
//! queued request and runs one commit that removes the released volumes and
//! creates the acquired ones, hands each request its outcome and wakes the
//! others; a request that arrived meanwhile leads the next round. If that
//! commit fails, the releases and the acquires get a commit each; when one
//! of those fails (no space, a lease changed, the pool is gone), nothing was
//! written and each of its requests runs alone through the ordinary path,
//! which reaps orphans when the pool is full and reports its own error.
//!
//! The acquired volumes' loop devices attach on two threads, lease after
//! lease, while their commit is written; the lock is free again once the
//! commit is durable, so the next round commits while they finish. A
//! release detaches its volumes' devices on its own thread before it is
//! queued.

use crate::Result;
use crate::loopdev;
use crate::owner::Owner;
use crate::pool::{self, Acquired, DeviceOptions, Exposed, LeaseRequest, Pools};
use crate::spec::VolumeSpec;
use devpool_engine::NewVolume;
use devpool_engine::engine::{Operation, Overlapped};
use devpool_format::metadata::VgMetadata;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// How many threads attach a round's loop devices while other requests
/// are being served.
const LOADED_ATTACH_THREADS: usize = 2;

/// How many attached loop devices [`LeaseService`] remembers.
const KNOWN_LIMIT: usize = 4096;

/// Leases through group commits; one per resident process.
pub struct LeaseService {
    pools: Pools,
    groups: Mutex<HashMap<String, Arc<Group>>>,
    /// Loop devices this process attached, by LV uuid: released without
    /// a scan of every attached device (each is checked before detaching).
    attached: Mutex<HashMap<String, loopdev::Attached>>,
    /// Each pool's VG as last committed or read here.
    views: Mutex<HashMap<String, Arc<VgMetadata>>>,
    /// Requests being served now (how busy the process is).
    serving: AtomicUsize,
}

/// Counts a request in [`LeaseService::serving`] while it lives.
struct Serving<'a>(&'a AtomicUsize);

impl<'a> Serving<'a> {
    fn new(n: &'a AtomicUsize) -> Serving<'a> {
        n.fetch_add(1, Ordering::Relaxed);
        Serving(n)
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What one queued request needs committed.
enum Job {
    /// A lease: its volumes, and the devices to make while the commit is
    /// written.
    Create {
        volumes: Vec<NewVolume>,
        names: Vec<(String, String)>,
        devices: DeviceOptions,
    },
    Remove(Vec<String>),
}

enum Outcome {
    Created(Exposed),
    Removed,
    /// The shared commit failed, so nothing was written: do it alone.
    Alone,
}

#[derive(Default)]
struct Group {
    state: Mutex<GroupState>,
    wake: Condvar,
}

#[derive(Default)]
struct GroupState {
    next_id: u64,
    queued: Vec<(u64, Job)>,
    leading: bool,
    outcomes: HashMap<u64, Outcome>,
    /// Commits run and requests they carried (for the daemon's stats).
    commits: u64,
    requests: u64,
}

/// Commits and requests so far, over every pool.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct GroupStats {
    pub commits: u64,
    pub requests: u64,
}

impl LeaseService {
    pub fn new(pools: Pools) -> LeaseService {
        LeaseService {
            pools,
            groups: Mutex::new(HashMap::new()),
            attached: Mutex::new(HashMap::new()),
            views: Mutex::new(HashMap::new()),
            serving: AtomicUsize::new(0),
        }
    }

    /// [`Pools::acquire`], its commit shared with concurrent requests;
    /// `prefix` replaces the LV name prefix of the daemon's settings.
    pub fn acquire(
        &self,
        name: &str,
        specs: &[VolumeSpec],
        owner: &Owner,
        keep: bool,
        devices: DeviceOptions,
        prefix: Option<&str>,
    ) -> Result<Acquired> {
        let _serving = Serving::new(&self.serving);
        let req = LeaseRequest {
            specs,
            owner,
            keep,
            devices,
        };
        // The client's LV name prefix, when it has its own.
        let own;
        let pools = match prefix {
            Some(p) if p != self.pools.prefix => {
                own = Pools {
                    prefix: p.to_string(),
                    ..self.pools.clone()
                };
                &own
            }
            _ => &self.pools,
        };
        let lease = pools.new_lease(specs, owner, keep);
        let job = Job::Create {
            volumes: lease.volumes.clone(),
            names: lease.names.clone(),
            devices: req.devices,
        };
        let a = match self.submit(name, job) {
            Outcome::Created(exposed) => pools.finish_acquire(name, lease, &req, exposed)?,
            _ => pools.acquire_request(name, &req)?,
        };
        let mut known = lock(&self.attached);
        // Leases released elsewhere (the CLI, a cleanup) leave entries
        // behind; the map only saves scans, so it is simply started over.
        if known.len() > KNOWN_LIMIT {
            known.clear();
        }
        for d in &a.attached {
            known.insert(d.lv_uuid.clone(), d.clone());
        }
        Ok(a)
    }

    /// [`Pools::release`], its commit shared with concurrent requests. The
    /// lease's volumes are looked up in the VG as this process last
    /// committed or read it: if that view is stale, the shared commit
    /// fails (a volume is gone, or has a snapshot now) and the release
    /// runs alone on a fresh read.
    pub fn release(&self, name: &str, session: &str) -> Result<Vec<String>> {
        let _serving = Serving::new(&self.serving);
        let cached = lock(&self.views).get(name).cloned();
        let found = cached.and_then(|m| {
            let t = pool::release_targets(&m, name, session).ok()?;
            Some((m, t))
        });
        let (meta, targets) = match found {
            Some(x) => x,
            None => {
                let (v, t) = self.pools.with_pool(name, |e, rec| {
                    let (v, _) = e.read_vg(&rec.vg)?;
                    let t = pool::release_targets(&v.meta, name, session)?;
                    Ok((v, t))
                })?;
                self.remember(name, &v.meta);
                (v.meta, t)
            }
        };
        let known: Vec<loopdev::Attached> = {
            let mut known = lock(&self.attached);
            meta.lvs
                .iter()
                .filter(|l| targets.lvs.contains(&l.name))
                .filter_map(|l| known.remove(l.id.raw_str()))
                .collect()
        };
        self.pools.let_go_known(&meta, &targets, &known)?;
        self.pools.give_back(name, &meta, &targets.remove)?;
        match self.submit(name, Job::Remove(targets.remove)) {
            Outcome::Removed => Ok(targets.lvs),
            _ => self.pools.release(name, session),
        }
    }

    /// Keep `meta` as the pool's view if it is newer than the one kept (or
    /// of another VG: the pool was torn down and set up again).
    fn remember(&self, name: &str, meta: &Arc<VgMetadata>) {
        let mut views = lock(&self.views);
        let newer = views
            .get(name)
            .is_none_or(|m| m.id != meta.id || m.seqno < meta.seqno);
        if newer {
            views.insert(name.to_string(), Arc::clone(meta));
        }
    }

    pub fn stats(&self) -> GroupStats {
        let groups = lock(&self.groups);
        let mut s = GroupStats::default();
        for g in groups.values() {
            let st = lock(&g.state);
            s.commits += st.commits;
            s.requests += st.requests;
        }
        s
    }

    fn group(&self, name: &str) -> Arc<Group> {
        Arc::clone(lock(&self.groups).entry(name.to_string()).or_default())
    }

    /// Queue `job` and return once a commit carried it (or failed).
    fn submit(&self, name: &str, job: Job) -> Outcome {
        let g = self.group(name);
        let mut st = lock(&g.state);
        let id = st.next_id;
        st.next_id += 1;
        st.queued.push((id, job));
        loop {
            if let Some(o) = st.outcomes.remove(&id) {
                return o;
            }
            // Lead only a round with something in it: a request already
            // taken by a leader waits for its outcome.
            if !st.leading && !st.queued.is_empty() {
                st.leading = true;
                let round = std::mem::take(&mut st.queued);
                drop(st);
                let outcomes = self.commit_round(name, round);
                st = lock(&g.state);
                st.leading = false;
                st.commits += outcomes.commits;
                st.requests += outcomes.done.len() as u64;
                st.outcomes.extend(outcomes.done);
                g.wake.notify_all();
                if let Some((ids, attaching)) = outcomes.attaching {
                    // The commit is durable and the lock is free: the next
                    // round commits while this one's devices attach.
                    drop(st);
                    let exposed = attaching.join();
                    st = lock(&g.state);
                    st.requests += ids.len() as u64;
                    st.outcomes.extend(
                        ids.into_iter()
                            .zip(exposed.into_iter().map(Outcome::Created)),
                    );
                    g.wake.notify_all();
                }
                continue;
            }
            st = g.wake.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// One commit for the round: its releases' volumes removed, its
    /// acquires' created (removals first: they free the space acquires may
    /// need). The acquires' loop devices attach, one lease after another,
    /// while it is written. If that commit fails, the releases and the
    /// acquires each get a commit of their own, and what fails then runs
    /// alone.
    fn commit_round(&self, name: &str, round: Vec<(u64, Job)>) -> RoundOutcome {
        let mut removes: Vec<(u64, Vec<String>)> = Vec::new();
        let mut creates: Vec<Creation> = Vec::new();
        for (id, job) in round {
            match job {
                Job::Remove(v) => removes.push((id, v)),
                Job::Create {
                    volumes,
                    names,
                    devices,
                } => creates.push(Creation {
                    id,
                    volumes,
                    names,
                    devices,
                }),
            }
        }
        // Two releases of one lease in a round: the commit fails (LV not
        // found) and each runs alone, so one of them says there is no
        // such lease.
        let removed: Vec<String> = removes.iter().flat_map(|(_, n)| n.clone()).collect();
        let mut out = RoundOutcome::default();
        if !removes.is_empty()
            && !creates.is_empty()
            && let Ok(attaching) = self.commit_creations(name, &creates, &removed)
        {
            out.commits += 1;
            out.done
                .extend(removes.iter().map(|(id, _)| (*id, Outcome::Removed)));
            out.attaching = Some((creates.iter().map(|c| c.id).collect(), attaching));
            return out;
        }
        if !removes.is_empty() {
            let done = self.pools.with_pool(name, |e, rec| {
                let op = Operation::LvRemove {
                    vg: rec.vg.clone(),
                    names: removed.clone(),
                };
                Ok(e.apply(&op, true)?)
            });
            if let Some(m) = done
                .as_ref()
                .ok()
                .and_then(|(p, _)| p.new_metadata_shared())
            {
                self.remember(name, &m);
            }
            let ok = done.is_ok();
            out.commits += u64::from(ok);
            out.done.extend(removes.iter().map(|(id, _)| {
                let o = if ok { Outcome::Removed } else { Outcome::Alone };
                (*id, o)
            }));
        }
        if !creates.is_empty() {
            match self.commit_creations(name, &creates, &[]) {
                Ok(attaching) => {
                    out.commits += 1;
                    out.attaching = Some((creates.iter().map(|c| c.id).collect(), attaching));
                }
                Err(_) => out
                    .done
                    .extend(creates.iter().map(|c| (c.id, Outcome::Alone))),
            }
        }
        out
    }

    /// One commit creating `creates`' volumes (after removing `removed`),
    /// their devices attaching beside it.
    fn commit_creations(
        &self,
        name: &str,
        creates: &[Creation],
        removed: &[String],
    ) -> Result<Overlapped<Vec<Exposed>>> {
        let volumes: Vec<NewVolume> = creates.iter().flat_map(|c| c.volumes.clone()).collect();
        // The only request in the process: its devices attach side by side.
        // Under load, two at a time: each attach waits for a flush of the
        // backing file, and two waiting together share it, while other
        // rounds' attaches and commits keep the CPUs busy (16 clients:
        // 5% more cycles/s than one at a time, in 9 of 13 interleaved
        // pairs; four at a time did no better than two).
        let threads = if self.serving.load(Ordering::Relaxed) <= 1 {
            loopdev::ATTACH_THREADS
        } else {
            LOADED_ATTACH_THREADS
        };
        self.pools.with_pool(name, |e, rec| {
            let leases: Vec<(Vec<(String, String)>, DeviceOptions)> = creates
                .iter()
                .map(|c| (c.names.clone(), c.devices))
                .collect();
            let (plan, _, attaching) = e.apply_overlapped(
                &pool::lease_op(&rec.vg, volumes.clone(), removed.to_vec()),
                true,
                move |plan| {
                    leases
                        .iter()
                        .map(|(names, opts)| Exposed::make(plan, names, *opts, threads))
                        .collect::<Vec<_>>()
                },
                |all| all.into_iter().for_each(Exposed::undo),
            )?;
            if let Some(m) = plan.new_metadata_shared() {
                self.remember(name, &m);
            }
            Ok(attaching)
        })
    }
}

/// A queued acquire, taken into a round.
struct Creation {
    id: u64,
    volumes: Vec<NewVolume>,
    names: Vec<(String, String)>,
    devices: DeviceOptions,
}

#[derive(Default)]
struct RoundOutcome {
    done: Vec<(u64, Outcome)>,
    commits: u64,
    /// The acquires committed, and their devices still attaching.
    attaching: Option<(Vec<u64>, Overlapped<Vec<Exposed>>)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking request thread leaves consistent state behind (every
    // change is a whole assignment), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
