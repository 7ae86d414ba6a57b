use super::*;
use vdisk::IoBuf;

pub(crate) fn spec(name: &str, size: u64) -> DiskSpec {
    DiskSpec {
        name: name.into(),
        size,
        block_size: 512,
        read_only: false,
        backend: Backend::default(),
        filters: Vec::new(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn open(store: &Arc<Store>, disks: &Path) -> Catalog {
    Catalog::open(store.clone(), disks, FilterFramework::new(), None).unwrap()
}

#[test]
fn create_survives_reopen_and_delete_removes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let _guard = rt.enter();
    let id = {
        let store = Store::open(dir.path().join("db")).unwrap();
        let cat = open(&store, &dir.path().join("disks"));
        let entry = cat.create(spec("vm0", 1 << 20)).unwrap();
        let disk = cat.disk("vm0").unwrap();
        rt.block_on(disk.write(0, IoBuf::copy_from(&[7; 512]), true)).unwrap();
        assert!(matches!(cat.create(spec("vm0", 1 << 20)), Err(CatalogError::NameTaken(_))));
        entry.record.id
    };
    let store = Store::open(dir.path().join("db")).unwrap();
    let cat = open(&store, &dir.path().join("disks"));
    let disk = cat.disk("vm0").unwrap();
    assert_eq!(disk.id(), id);
    let back = rt.block_on(disk.read(0, IoBuf::zeroed(512))).unwrap();
    assert_eq!(back.as_slice(), &[7; 512]);
    {
        let _user = disk.acquire();
        assert!(matches!(cat.delete("vm0"), Err(CatalogError::InUse { .. })));
    }
    cat.delete("vm0").unwrap();
    assert!(matches!(cat.disk("vm0"), Err(CatalogError::NotFound(_))));
    assert!(!store.has_namespace(&format!("disk-{id}")));
    assert!(!dir.path().join(format!("disks/{id}.raw")).exists());
}

#[test]
fn leftovers_of_an_interrupted_create_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let _guard = rt.enter();
    let store = Store::open(dir.path().join("db")).unwrap();
    let disks = dir.path().join("disks");
    std::fs::create_dir_all(&disks).unwrap();
    // A crash after the file and namespace were made but before the record was written.
    RawFile::create(&disks.join("00112233aabbccdd.raw"), 4096).unwrap();
    store.create_namespace("disk-00112233aabbccdd").unwrap();
    std::fs::write(disks.join("not-ours.txt"), b"keep").unwrap();
    let cat = open(&store, &disks);
    assert!(cat.entries().is_empty());
    assert!(!store.has_namespace("disk-00112233aabbccdd"));
    assert!(!disks.join("00112233aabbccdd.raw").exists());
    assert!(disks.join("not-ours.txt").exists());
}

#[test]
fn a_missing_file_leaves_the_disk_listed_but_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let _guard = rt.enter();
    let store = Store::open(dir.path().join("db")).unwrap();
    let disks = dir.path().join("disks");
    let path = {
        let cat = open(&store, &disks);
        cat.create(spec("a", 4096)).unwrap();
        cat.create(spec("b", 4096)).unwrap().path
    };
    std::fs::remove_file(&path).unwrap();
    let cat = open(&store, &disks);
    assert!(cat.disk("a").is_ok());
    let err = cat.disk("b").err().unwrap();
    assert!(matches!(err, CatalogError::Unavailable { .. }), "{err}");
    assert!(error_chain(&err).contains("No such file"), "{}", error_chain(&err));
}

/// Writes `record` as the catalog would, with a file and a namespace of its own.
fn plant(store: &Store, disks: &Path, record: &DiskRecord) {
    if is_id(&record.id) {
        let _ = RawFile::create(&disks.join(format!("{}.raw", record.id)), record.spec.size);
        let _ = store.create_namespace(&record.namespace());
    }
    let mut batch = Batch::new();
    batch.put(CATALOG_NS, record_key(&record.spec.name), record.to_json());
    store.commit(batch).unwrap();
}

#[test]
fn damaged_records_leave_their_disk_unavailable_and_the_rest_working() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let _guard = rt.enter();
    let store = Store::open(dir.path().join("db")).unwrap();
    let disks = dir.path().join("disks");
    let (good, zero_block) = {
        let cat = open(&store, &disks);
        (cat.create(spec("good", 4096)).unwrap(), cat.create(spec("zero-block", 4096)).unwrap())
    };
    // Records as a damaged store or another tool could leave them: a block size the disk file
    // cannot be divided by, a size past every bound, an id that walks out of the disk directory,
    // and a linked clone of itself (create refuses the cycle; its copy-on-read reads would wait
    // on their own grain locks).
    let mut zero = zero_block.record.clone();
    zero.spec.block_size = 0;
    plant(&store, &disks, &zero);
    let huge = DiskRecord {
        id: "0011223344556677".into(),
        spec: DiskSpec { size: u64::MAX - 511, ..spec("huge", 0) },
        ..good.record.clone()
    };
    plant(&store, &disks, &huge);
    let escape = DiskRecord { id: "../../etc/passwd".into(), spec: spec("escape", 4096), ..good.record.clone() };
    plant(&store, &disks, &escape);
    let mut own = spec("loop", 4096);
    own.filters = io_filters::clone_filters("loop", true, Vec::new());
    let looped = DiskRecord { id: "8899aabbccddeeff".into(), spec: own, ..good.record.clone() };
    plant(&store, &disks, &looped);

    let cat = open(&store, &disks);
    assert!(cat.disk("good").is_ok());
    for name in ["zero-block", "huge", "escape", "loop"] {
        let err = cat.disk(name).err().unwrap();
        assert!(error_chain(&err).contains("invalid catalog record"), "{name}: {}", error_chain(&err));
    }
    // The damaged disk's data stays where it is until someone deletes it, and deleting the one
    // with a foreign id touches nothing outside the catalog.
    assert!(zero_block.path.exists());
    assert!(store.has_namespace(&zero_block.record.namespace()));
    cat.delete("escape").unwrap();
    assert!(good.path.exists());
}

#[test]
fn parents_come_before_their_clones_and_cycles_last() {
    let rec = |name: &str, parent: Option<&str>| {
        let mut s = spec(name, 4096);
        if let Some(p) = parent {
            s.filters = io_filters::clone_filters(p, false, Vec::new());
        }
        (name.to_owned(), DiskRecord { id: "0011223344556677".into(), spec: s, created_unix: 0 })
    };
    let records: BTreeMap<String, DiskRecord> =
        [rec("a", Some("c")), rec("b", None), rec("c", Some("b")), rec("x", Some("y")), rec("y", Some("x"))]
            .into_iter()
            .collect();
    let order = parents_first(&records);
    let at = |n: &str| order.iter().position(|o| o == n).unwrap();
    assert_eq!(order.len(), 5);
    assert!(at("b") < at("c") && at("c") < at("a"));
}
