//! Export-bundle parser, end to end: the fuzzer's bytes are the bundle's JSON
//! plaintext; they are sealed under a fixed export key with the bundle magic
//! (as `Inventory::export` does) and fed to `Inventory::import` on a scratch
//! store (on /dev/shm when present, so durable commits are cheap).
//! Invariants: never panics; an Err leaves `list("")` unchanged (no
//! half-imported store); an Ok leaves a store that `check()` finds clean,
//! with no key at the top level or directly in clients/ (SPEC's tree).
//! With KEYFS_FUZZ_STRICT=1 an Err must also leave the directory tree unchanged.
#![no_main]
use keyfs::crypto::seal_raw;
use keyfs::inventory::audit::Ctx;
use keyfs::inventory::node::{Ino, ROOT};
use keyfs::inventory::{FType, Inventory, OpenOptions};
use keyfs::secret::{Key32, MasterKey};
use libfuzzer_sys::fuzz_target;
use std::sync::Mutex;

const MAGIC: &[u8] = b"KEYFS-EXPORT-1\n";

struct Scratch {
    inv: Inventory,
    _dir: tempfile::TempDir,
}

/// Remove the scratch stores of fuzz processes that are gone: the static
/// below is never dropped (libFuzzer ends the process with exit()).
fn sweep(base: &std::path::Path) {
    for e in std::fs::read_dir(base).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("keyfs-fuzz-") else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !std::path::Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn scratch() -> Scratch {
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    sweep(&base);
    let dir = tempfile::Builder::new()
        .prefix(&format!("keyfs-fuzz-{}-", std::process::id()))
        .tempdir_in(base)
        .unwrap();
    let master = || MasterKey::from_key(Key32::new([7; 32]));
    let store = dir.path().join("store");
    Inventory::init(&store, &master()).unwrap();
    // sled releases the lock of the handle `init` dropped only when that
    // handle's background thread ends (see tests/model.rs `open`): retry.
    let mut tries = 0;
    let inv = loop {
        match Inventory::open(&store, &master(), OpenOptions::default()) {
            Err(e) if tries < 200 && e.message().contains("could not acquire lock") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => break r.unwrap(),
        }
    };
    Scratch { inv, _dir: dir }
}

/// Every directory path of the tree (what a failed import could leave behind).
fn dirs(inv: &Inventory, ino: Ino, path: &str, out: &mut Vec<String>) {
    for e in inv.readdir(ino).unwrap() {
        if e.ftype == FType::Dir && matches!(e.ino, Ino::Node(_)) {
            let p = format!("{path}/{}", String::from_utf8_lossy(&e.name));
            out.push(p.clone());
            dirs(inv, e.ino, &p, out);
        }
    }
}

fn snapshot(inv: &Inventory) -> (String, Vec<String>) {
    let mut d = Vec::new();
    dirs(inv, Ino::Node(ROOT), "", &mut d);
    (format!("{:?}", inv.list("").unwrap()), d)
}

static STATE: Mutex<Option<Scratch>> = Mutex::new(None);

fuzz_target!(|json: &[u8]| {
    let mut st = STATE.lock().unwrap_or_else(|p| p.into_inner());
    let s = st.get_or_insert_with(scratch);
    let key = Key32::new([9; 32]);
    let mut bundle = MAGIC.to_vec();
    bundle.extend_from_slice(&seal_raw(&key, json, MAGIC));
    let ctx = Ctx {
        uid: 0,
        gid: 0,
        pid: 1,
        comm: "fuzz".into(),
    };
    let before = snapshot(&s.inv);
    let r = s.inv.import(&bundle, &key, "", &ctx);
    let after = snapshot(&s.inv);
    match r {
        Err(_) => {
            assert_eq!(before.0, after.0, "a failed import changed the key listing");
            if std::env::var_os("KEYFS_FUZZ_STRICT").is_some() {
                assert_eq!(before.1, after.1, "a failed import left directories behind");
            }
        }
        Ok(_) => {
            let problems = s.inv.check().unwrap();
            assert!(
                problems.is_empty(),
                "import left a store that check() faults: {problems:?}"
            );
            for k in s.inv.list("").unwrap() {
                let parent = k.path.rsplit_once('/').map_or("", |x| x.0);
                assert!(
                    !matches!(parent, "" | "clients"),
                    "import made key {:?}",
                    k.path
                );
            }
        }
    }
    if before != after {
        *st = Some(scratch()); // start the next input from a fresh store
    }
});
