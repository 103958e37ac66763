//! Loop devices attached side by side: [`loopdev::attach_all`] on several
//! threads, from several threads of one process at once (as the daemon's
//! rounds do), on a real image file. Every device must be bound to exactly
//! its own window, and every device must be detached afterwards.

use devpool_pool::loopdev::{self, Attached, Window};
use std::path::{Path, PathBuf};

/// Why this cannot run here, if it cannot (root and loop devices needed).
fn missing_capability() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (loop devices need root)");
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no /dev/loop-control (loop devices unavailable)");
    }
    None
}

fn skip(test: &str) -> bool {
    let Some(why) = missing_capability() else {
        return false;
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: required real-device test cannot run: {why}");
    }
    eprintln!("SKIPPED: {test}: {why}");
    true
}

/// (backing file, offset, size) of a bound loop device, from sysfs.
fn bound_window(dev: &Path) -> (PathBuf, u64, u64) {
    let name = dev.file_name().unwrap().to_string_lossy().to_string();
    let read = |f: &str| {
        std::fs::read_to_string(format!("/sys/block/{name}/loop/{f}"))
            .unwrap_or_else(|e| panic!("{} is not bound ({f}: {e})", dev.display()))
            .trim()
            .to_string()
    };
    let offset = read("offset").parse().unwrap();
    let sectors: u64 = std::fs::read_to_string(format!("/sys/block/{name}/size"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (PathBuf::from(read("backing_file")), offset, sectors * 512)
}

/// A scratch image file, removed (with every device left on it detached)
/// when dropped.
struct Image(PathBuf);

impl Image {
    fn new(tag: &str, size: u64) -> Image {
        let path = std::env::temp_dir().join(format!("devpool-{tag}-{}.img", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(size).unwrap();
        Image(path)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        for a in loopdev::list() {
            if a.backing == self.0 {
                loopdev::give_back(&a);
            }
        }
        let _ = std::fs::remove_file(&self.0);
    }
}

const MIB: u64 = 1 << 20;

#[test]
fn attaches_side_by_side_get_their_own_windows() {
    if skip("attaches_side_by_side_get_their_own_windows") {
        return;
    }
    let image = Image::new("attach", 256 * MIB);
    let windows_of = |thread: u64| -> Vec<Window> {
        (0..7)
            .map(|i| Window {
                backing: image.0.clone(),
                offset: (thread * 8 + i) * 4 * MIB,
                size: (1 + i) * MIB,
                lv_uuid: format!("test-{thread}-{i}"),
            })
            .collect()
    };
    // Four "rounds" at once, each attaching 7 devices on 4 threads, then
    // detaching them; 5 times over.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let windows = windows_of(t);
            s.spawn(move || {
                for _ in 0..5 {
                    let got: Vec<Attached> = loopdev::attach_all(&windows, 4)
                        .into_iter()
                        .map(|r| r.expect("attach"))
                        .collect();
                    for (w, a) in windows.iter().zip(&got) {
                        let (backing, offset, size) = bound_window(&a.device);
                        assert_eq!(
                            (backing.as_path(), offset, size),
                            (w.backing.as_path(), w.offset, w.size),
                            "{} is bound to another window",
                            a.device.display()
                        );
                        assert_eq!(a.lv_uuid, w.lv_uuid);
                    }
                    for a in &got {
                        assert!(
                            loopdev::give_back(a),
                            "{} was not detached",
                            a.device.display()
                        );
                    }
                }
            });
        }
    });
    assert!(
        loopdev::list().iter().all(|a| a.backing != image.0),
        "a device is still bound to the image"
    );
}

#[test]
fn a_failed_attach_does_not_stop_the_others() {
    if skip("a_failed_attach_does_not_stop_the_others") {
        return;
    }
    let image = Image::new("attach-fail", 64 * MIB);
    let good = |i: u64| Window {
        backing: image.0.clone(),
        offset: i * 8 * MIB,
        size: 4 * MIB,
        lv_uuid: format!("ok-{i}"),
    };
    let missing = Window {
        backing: PathBuf::from("/nonexistent/devpool-test.img"),
        offset: 0,
        size: MIB,
        lv_uuid: "missing".into(),
    };
    let windows = vec![good(0), missing, good(1), good(2)];
    let got = loopdev::attach_all(&windows, 2);
    assert_eq!(got.len(), 4);
    let err = got[1].as_ref().expect_err("the missing backing file fails");
    assert!(
        err.to_string().contains("/nonexistent/devpool-test.img"),
        "{err}"
    );
    for (i, r) in got.iter().enumerate().filter(|(i, _)| *i != 1) {
        let a = r.as_ref().expect("the other attaches succeed");
        assert_eq!(bound_window(&a.device).1, windows[i].offset);
        assert!(loopdev::give_back(a));
    }
}

#[test]
fn detach_unless_used_keeps_a_device_someone_holds_and_gives_a_free_one_back_to_root() {
    if skip("detach_unless_used_keeps_a_device_someone_holds_and_gives_a_free_one_back_to_root") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let image = Image::new("detach-used", 16 * MIB);
    let window = Window {
        backing: image.0.clone(),
        offset: MIB,
        size: 4 * MIB,
        lv_uuid: "held".into(),
    };
    let a = loopdev::attach_all(std::slice::from_ref(&window), 1)
        .pop()
        .unwrap()
        .expect("attach");
    loopdev::chown_to(&a.device, 4242, 4243);
    let sys = format!(
        "/sys/block/{}/loop",
        a.device.file_name().unwrap().to_string_lossy()
    );

    // Open elsewhere: refused, still attached, not marked to go at the
    // holder's last close.
    let holder = std::fs::File::open(&a.device).unwrap();
    match loopdev::detach_unless_used(&a).unwrap() {
        loopdev::Detach::InUse(who) => assert!(!who.is_empty()),
        other => panic!("{} detached while held: {other:?}", a.device.display()),
    }
    drop(holder);
    let autoclear = std::fs::read_to_string(format!("{sys}/autoclear"))
        .unwrap_or_else(|e| panic!("{} went at the holder's close: {e}", a.device.display()));
    assert_eq!(autoclear.trim(), "0");
    assert_eq!(bound_window(&a.device).1, window.offset);

    // Nobody else: detached, and the node is root's again.
    assert_eq!(
        loopdev::detach_unless_used(&a).unwrap(),
        loopdev::Detach::Done
    );
    assert!(
        !Path::new(&sys).exists(),
        "{} is still bound",
        a.device.display()
    );
    let m = std::fs::metadata(&a.device).unwrap();
    assert_eq!(
        (m.uid(), m.gid()),
        (0, 6),
        "{} kept the lease's owner",
        a.device.display()
    );
    // Not this volume's any more.
    assert_eq!(
        loopdev::detach_unless_used(&a).unwrap(),
        loopdev::Detach::Gone
    );
}
