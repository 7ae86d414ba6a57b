//! Writes seed inputs for the fuzz targets: valid inputs made by vstor's own code and by real
//! tools, which the fuzzers then mutate. `fuzz/seeds/make.sh` runs it (after making the tar
//! files and capturing the NBD clients); see `fuzz/README.md`.
//!
//! Usage: `cargo run -p vstor-fuzz --example seeds -- OUT_DIR TAR_DIR OCI_DIR`, where TAR_DIR
//! holds `*.tar` and `*.tar.gz` files made by tar and gzip, and OCI_DIR an image layout made by
//! umoci. Seeds go to `OUT_DIR/<target>/`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use catalog::{Backend, DiskSpec};
use fuse_lazypull::cache::{BlobCache, CacheConfig, RangeSource};
use fuse_lazypull::digest::Digest;
use fuse_lazypull::layer::{LayerIndex, Limits};
use fuse_lazypull::registry::{Descriptor, RegistryError, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST};
use host_ftl::driver::Partition;
use host_ftl::{admin, opcode, Addr, Sqe};
use io_filters::FilterSpec;
use state_store::Store;
use vdisk::{BlockDevice, IoBuf};
use vstor_fuzz::records::encode_record;
use vstor_fuzz::{join, layers, registry};

struct Out(PathBuf);

impl Out {
    fn put(&self, target: &str, name: &str, data: &[u8]) {
        let dir = self.0.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    }
}

/// What makes one group's seeds.
type SeedMaker<'a> = dyn Fn(&Out) + 'a;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (out, tars, oci, only) = match &args[..] {
        [_, out, tars, oci] => (out, tars, oci, None),
        [_, out, tars, oci, only] => (out, tars, oci, Some(only.as_str())),
        _ => panic!("usage: seeds OUT_DIR TAR_DIR OCI_DIR [GROUP]"),
    };
    let out = Out(PathBuf::from(out));
    // GROUP makes one group's seeds alone (say, after its target's input changed).
    let groups: [(&str, &SeedMaker); 8] = [
        ("layers", &|o| layer_seeds(o, Path::new(tars))),
        ("registry", &|o| registry_seeds(o, Path::new(oci))),
        ("ftl_command", &ftl_command_seeds),
        ("catalog", &catalog_seeds),
        ("filters", &filter_seeds),
        ("ftl_checkpoint", &ftl_checkpoint_seeds),
        ("cache_index", &cache_index_seeds),
        ("vhost", &vhost_seeds),
    ];
    for (name, make) in groups {
        if only.is_none_or(|o| o == name) {
            make(&out);
        }
    }
}

fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    v.sort();
    v
}

fn name_of(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// Tar and gzip layers as the tools made them; gzip indexes and eStargz copies as vstor makes
/// them from those.
fn layer_seeds(out: &Out, tars: &Path) {
    for p in files(tars, ".tar") {
        out.put("tar_layer", &name_of(&p), &std::fs::read(&p).unwrap());
    }
    for p in files(tars, ".tar.gz") {
        let name = name_of(&p);
        let blob = std::fs::read(&p).unwrap();
        out.put("gzip_layer", &name, &blob);
        let desc = Descriptor {
            media_type: OCI_LAYER_GZIP.into(),
            digest: Digest::of(&blob),
            size: blob.len() as u64,
            annotations: Default::default(),
        };
        let source = layers::MemBlob::new(blob.clone());
        if let Some(bytes) = LayerIndex::build(&desc, &source, &Limits::DEFAULT).ok().and_then(|i| i.to_bytes().ok()) {
            out.put("gzip_index", &name, &join(&[&bytes, &blob]));
        }
        let mut stargz = Vec::new();
        let Ok(converted) =
            fuse_lazypull::layer::convert_to_estargz(&mut blob.as_slice(), &mut stargz, &[], &Limits::DEFAULT)
        else {
            continue;
        };
        let _ = converted;
        // Raw: the whole blob. Split: the file members and the table of contents.
        let mut raw = vec![0u8];
        raw.extend_from_slice(&stargz);
        out.put("estargz", &format!("{name}.raw"), &raw);
        let footer = &stargz[stargz.len() - 51..];
        let toc_offset = u64::from_str_radix(std::str::from_utf8(&footer[16..32]).unwrap(), 16).unwrap() as usize;
        let mut toc_tar = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(&stargz[toc_offset..stargz.len() - 51]),
            &mut toc_tar,
        )
        .unwrap();
        let size = usize::from_str_radix(
            std::str::from_utf8(&toc_tar[124..135]).unwrap().trim_matches(|c: char| c == '\0' || c == ' '),
            8,
        )
        .unwrap();
        let json = &toc_tar[512..512 + size];
        let mut split = vec![1u8];
        split.extend_from_slice(&join(&[&stargz[..toc_offset], json]));
        out.put("estargz", &format!("{name}.split"), &split);
    }
}

fn json_file(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Registry answers: manifests and an index as umoci writes them, Docker's forms, and the auth
/// challenges Docker Hub, GHCR and the distribution registry send.
fn registry_seeds(out: &Out, oci: &Path) {
    let index = std::fs::read(oci.join("index.json")).unwrap();
    let index_json = json_file(&oci.join("index.json"));
    let manifest_digest = index_json["manifests"][0]["digest"].as_str().unwrap();
    let manifest_path = oci.join("blobs/sha256").join(manifest_digest.trim_start_matches("sha256:"));
    let manifest = std::fs::read(&manifest_path).unwrap();
    let docker_manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 1469,
                   "digest": "sha256:0b8b7e2b3a0b9a9f6a6f3a1a1f1d5d5b5f5e5c5d5c5b5a595857565554535251"},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": 29126484,
                    "digest": "sha256:a2abf6c4d29d43a4bf9fbb769f524d0fb36a2edab49819c1bf3e76f409f953ea"}]
    });
    let docker_manifest = serde_json::to_vec_pretty(&docker_manifest).unwrap();
    let platform_index = |media: &str, manifest_media: &str| {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media,
            "manifests": [
                {"mediaType": manifest_media, "size": 528, "digest": "sha256:1111111111111111111111111111111111111111111111111111111111111111",
                 "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
                {"mediaType": manifest_media, "size": manifest.len(), "digest": registry::DIGEST_MARK,
                 "platform": {"architecture": "amd64", "os": "linux"}},
                {"mediaType": manifest_media, "size": 566, "digest": "sha256:2222222222222222222222222222222222222222222222222222222222222222",
                 "platform": {"architecture": "unknown", "os": "unknown"},
                 "annotations": {"vnd.docker.reference.type": "attestation-manifest"}}
            ]
        }))
        .unwrap()
    };
    let oci_index = platform_index(OCI_INDEX, OCI_MANIFEST);
    let docker_list = platform_index(
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    );
    let bearer = format!(
        "Bearer realm=\"{}/token\",service=\"registry.docker.io\",scope=\"repository:fuzz/image:pull\"",
        registry::SERVER_MARK
    );
    let ghcr = format!(
        "Bearer realm=\"{}/token\",service=\"ghcr.io\",scope=\"repository:fuzz/image:pull\"",
        registry::SERVER_MARK
    );
    let token = br#"{"token":"eyJhbGciOiJSUzI1NiJ9.e30.c2ln","access_token":"eyJhbGciOiJSUzI1NiJ9.e30.c2ln","expires_in":300,"issued_at":"2024-01-01T00:00:00Z"}"#;
    let access_only = br#"{"access_token":"abc.def","expires_in":60}"#;
    let docker_v2 = "application/vnd.docker.distribution.manifest.v2+json";
    // Name, flags, then challenge, token, content type and body by tag, by digest.
    let seeds: Vec<(&str, u8, [&[u8]; 6])> = vec![
        ("oci-manifest", 0, [b"", b"", OCI_MANIFEST.as_bytes(), &manifest, b"", b""]),
        ("oci-manifest-digest-header", 2, [b"", b"", OCI_MANIFEST.as_bytes(), &manifest, b"", b""]),
        ("oci-manifest-no-content-type", 0, [b"", b"", b"", &manifest, b"", b""]),
        ("umoci-index", 2, [b"", b"", OCI_INDEX.as_bytes(), &index, OCI_MANIFEST.as_bytes(), &manifest]),
        ("oci-index", 0, [b"", b"", OCI_INDEX.as_bytes(), &oci_index, OCI_MANIFEST.as_bytes(), &manifest]),
        ("docker-list", 2, [b"", b"", b"", &docker_list, b"", &docker_manifest]),
        ("docker-manifest", 0, [b"", b"", docker_v2.as_bytes(), &docker_manifest, b"", b""]),
        ("bearer", 3, [bearer.as_bytes(), token, OCI_MANIFEST.as_bytes(), &manifest, b"", b""]),
        (
            "bearer-ghcr-index",
            1,
            [ghcr.as_bytes(), access_only, OCI_INDEX.as_bytes(), &oci_index, OCI_MANIFEST.as_bytes(), &manifest],
        ),
        ("basic", 1, [b"Basic realm=\"Registry Realm\"", b"", OCI_MANIFEST.as_bytes(), &manifest, b"", b""]),
    ];
    for (name, flags, parts) in seeds {
        let mut data = vec![flags];
        data.extend_from_slice(&join(&parts));
        out.put("registry", name, &data);
    }
    let digest = Digest::of(&manifest).to_string();
    let refs = [
        "debian".to_owned(),
        "library/debian:12".into(),
        "docker.io/library/debian:bookworm-slim".into(),
        "index.docker.io/library/alpine:3.19".into(),
        "localhost:5000/fuzz/image:v1".into(),
        "127.0.0.1:5000/a/b/c:tag-1.0_x".into(),
        "[::1]:5000/x/y:latest".into(),
        format!("ghcr.io/org/repo@{digest}"),
        format!("registry.example.com:443/team/app:1.2.3@{digest}"),
        digest.clone(),
        "quay.io/podman/hello".into(),
    ];
    for (i, r) in refs.iter().enumerate() {
        out.put("image_reference", &format!("ref-{i}"), r.as_bytes());
    }
}

/// Commands of guest g0 that the driver accepts: writes, reads, copies, resets, flushes, and the
/// admin commands, with their address lists preloaded into the region.
fn ftl_command_seeds(out: &Out) {
    let dev = vstor_fuzz::ftl_command::geometry();
    let part = Partition::new(&dev, &[0, 1], true).unwrap();
    let geo = part.geometry().clone();
    let ppa = |pu: u16, chk: u32, blk: u32| Addr::new(0, pu, chk, blk).to_ppa(&geo).unwrap().0;
    // The region: a list of two blocks at 0x100, another at 0x200 (chunk 1 of PU 1).
    let mut region = vec![0u8; 0x300];
    for (at, list) in [(0x100, [ppa(0, 0, 0), ppa(0, 0, 1)]), (0x200, [ppa(1, 1, 0), ppa(1, 1, 1)])] {
        for (i, a) in list.iter().enumerate() {
            region[at + i * 8..at + i * 8 + 8].copy_from_slice(&a.to_le_bytes());
        }
    }
    let io = |sqe: Sqe| {
        let mut c = vec![0u8];
        c.extend_from_slice(&sqe.to_bytes());
        c
    };
    let adm = |sqe: Sqe| {
        let mut c = vec![1u8];
        c.extend_from_slice(&sqe.to_bytes());
        c
    };
    let write = Sqe::vector(opcode::VECTOR_WRITE, 1, 2, 0x100, 0x1000, 0x2000).unwrap();
    let read = Sqe::vector(opcode::VECTOR_READ, 2, 2, 0x100, 0x3000, 0x4000).unwrap();
    let write1 = Sqe::vector(opcode::VECTOR_WRITE, 3, 2, 0x200, 0x1000, 0x2000).unwrap();
    let copy = Sqe::vector_copy(4, 2, 0x100, 0x200).unwrap();
    let reset = Sqe::vector(opcode::VECTOR_RESET, 5, 1, ppa(0, 0, 0), 0, 0).unwrap();
    let single = Sqe::vector(opcode::VECTOR_READ, 6, 1, ppa(1, 3, 0), 0x5000, 0x5800).unwrap();
    let mut fua = write;
    fua.cdw12 |= host_ftl::command::FUA;
    let seeds: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("write-read", vec![io(write), io(read), io(Sqe::flush(7))]),
        ("copy", vec![io(write), io(copy), io(Sqe::vector(opcode::VECTOR_READ, 8, 2, 0x200, 0x3000, 0x4000).unwrap())]),
        ("reset", vec![io(write), io(reset), io(write1), io(single)]),
        ("fua", vec![io(fua), io(read)]),
        (
            "admin",
            vec![
                adm(Sqe::geometry(9, 0x6000)),
                adm(Sqe::get_log_page(10, admin::LOG_CHUNK_INFO, 0, 256, 0x7000)),
                adm(Sqe::get_log_page(11, admin::LOG_CHUNK_NOTIFICATION, 0, 128, 0x8000)),
            ],
        ),
        ("write-then-log", vec![io(write), adm(Sqe::get_log_page(12, admin::LOG_CHUNK_INFO, 32, 64, 0x7000))]),
    ];
    for (name, cmds) in seeds {
        let mut data = (region.len() as u16).to_le_bytes().to_vec();
        data.extend_from_slice(&region);
        for c in cmds {
            data.extend_from_slice(&c);
        }
        out.put("ftl_command", name, &data);
    }
}

fn dump(store: &Store, ns: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    store.scan_prefix(ns, b"").unwrap().into_iter().collect()
}

/// Catalog records as the catalog writes them: raw and FTL disks, filters, a linked clone.
fn catalog_seeds(out: &Out) {
    let dir = vstor_fuzz::temp_dir();
    let _rt = vstor_fuzz::runtime().enter();
    let store = Store::open(dir.path().join("db")).unwrap();
    let framework = io_filters::FilterFramework::new();
    let catalog = catalog::Catalog::open(store.clone(), &dir.path().join("disks"), framework, None).unwrap();
    let filter = |kind: &str, options: serde_json::Value| FilterSpec {
        kind: kind.into(),
        order: None,
        options: options.as_object().cloned().unwrap_or_default(),
    };
    let spec = |name: &str, size: u64, block_size: u32, filters: Vec<FilterSpec>| DiskSpec {
        name: name.into(),
        size,
        block_size,
        read_only: false,
        backend: Backend::Raw { direct: false },
        filters,
    };
    let gold = spec("gold", 1 << 20, 512, vec![filter("integrity", serde_json::json!({}))]);
    catalog.create(gold.clone()).unwrap();
    catalog
        .create(spec(
            "db-1",
            4 << 20,
            4096,
            vec![filter("throttle", serde_json::json!({"iops": 1000, "burst_ms": 50}))],
        ))
        .unwrap();
    catalog
        .create(
            catalog
                .clone_spec(
                    &gold.name,
                    "vm.clone_1",
                    Backend::Raw { direct: false },
                    true,
                    vec![filter("stats", serde_json::json!({}))],
                )
                .unwrap(),
        )
        .unwrap();
    catalog.create(DiskSpec { read_only: true, ..spec("ro", 64 << 10, 512, Vec::new()) }).unwrap();
    let records = dump(&store, "catalog");
    let ftl = DiskSpec { backend: Backend::Ftl { over_provisioning: 20 }, ..spec("ftl0", 8 << 20, 4096, Vec::new()) };
    let ftl_record = serde_json::json!({"id": "0011223344556677", "created_unix": 1700000000u64});
    let mut ftl_record = ftl_record.as_object().unwrap().clone();
    for (k, v) in serde_json::to_value(&ftl).unwrap().as_object().unwrap() {
        ftl_record.insert(k.clone(), v.clone());
    }
    let ftl_value = serde_json::to_vec(&ftl_record).unwrap();
    let parts: Vec<Vec<u8>> = records.iter().map(|(k, v)| encode_record(1, k, v)).collect();
    let all: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    out.put("catalog_record", "all", &join(&all));
    for (i, p) in parts.iter().enumerate() {
        out.put("catalog_record", &format!("one-{i}"), p);
    }
    out.put("catalog_record", "ftl", &encode_record(0, b"ftl0", &ftl_value));
}

/// Bitmap pages of a real linked clone and checksum pages and intent marks of a real integrity
/// filter, after writes (and, for the intent marks, before the flush that clears them).
fn filter_seeds(out: &Out) {
    let dir = vstor_fuzz::temp_dir();
    let rt = vstor_fuzz::runtime();
    let _guard = rt.enter();
    let store = Store::open(dir.path().join("db")).unwrap();
    let framework = io_filters::FilterFramework::new();
    let catalog = catalog::Catalog::open(store.clone(), &dir.path().join("disks"), framework, None).unwrap();
    let integrity = vec![FilterSpec { kind: "integrity".into(), order: None, options: Default::default() }];
    let gold = DiskSpec {
        name: "gold".into(),
        size: 2 << 20,
        block_size: 512,
        read_only: false,
        backend: Backend::Raw { direct: false },
        filters: integrity,
    };
    let gold_entry = catalog.create(gold.clone()).unwrap();
    let g = catalog.disk("gold").unwrap();
    rt.block_on(async {
        for i in 0..8u64 {
            g.write(i * 65536, IoBuf::copy_from(&[i as u8 + 1; 4096]), false).await.unwrap();
        }
        g.flush().await.unwrap();
        // Written after the flush: their pages keep their intent marks.
        g.write((1 << 20) + 512, IoBuf::copy_from(&[0x77; 1024]), false).await.unwrap();
    });
    let ns = gold_entry.record.namespace();
    let integrity_records = dump(&store, &ns);
    let clone_entry = catalog
        .create(catalog.clone_spec(&gold.name, "child", Backend::Raw { direct: false }, false, Vec::new()).unwrap())
        .unwrap();
    let c = catalog.disk("child").unwrap();
    rt.block_on(async {
        for g in [0u64, 1, 2, 100, 255, 511] {
            c.write(g * 4096, IoBuf::copy_from(&[0x42; 4096]), false).await.unwrap();
        }
        c.flush().await.unwrap();
    });
    let clone_records = dump(&store, &clone_entry.record.namespace());
    // Sizes: the disk's size in blocks (integrity) and grains (clone), as the targets read them.
    let size = |n: u64| (n as u16).to_le_bytes().to_vec();
    let mut data = size(4096);
    let parts: Vec<Vec<u8>> = integrity_records
        .iter()
        .map(|(k, v)| {
            let (sel, rest) = match k.strip_prefix(b"integrity/crc/".as_slice()) {
                Some(r) => (0, r),
                None => (1, k.strip_prefix(b"integrity/intent/".as_slice()).unwrap_or(k)),
            };
            encode_record(sel, rest, v)
        })
        .collect();
    data.extend_from_slice(&join(&parts.iter().map(|p| p.as_slice()).collect::<Vec<_>>()));
    out.put("integrity_records", "written", &data);
    for (i, p) in parts.iter().enumerate() {
        let mut one = size(1024 + 300);
        one.extend_from_slice(p);
        out.put("integrity_records", &format!("one-{i}"), &one);
    }
    let mut data = size(256);
    let parts: Vec<Vec<u8>> = clone_records
        .iter()
        .map(|(k, v)| encode_record(0, k.strip_prefix(b"clone/bitmap/".as_slice()).unwrap_or(k), v))
        .collect();
    data.extend_from_slice(&join(&parts.iter().map(|p| p.as_slice()).collect::<Vec<_>>()));
    out.put("clone_bitmap", "written", &data);
    // A clone three pages long, with a bit set in each page.
    let mut data = 49151u16.to_le_bytes().to_vec();
    let page = |n: u8| {
        let mut v = vec![0u8; 4096];
        v[n as usize] = 0x81;
        v
    };
    let pages: Vec<Vec<u8>> = (0..3u8).map(|p| encode_record(0, format!("{p:016x}").as_bytes(), &page(p))).collect();
    data.extend_from_slice(&join(&pages.iter().map(|p| p.as_slice()).collect::<Vec<_>>()));
    out.put("clone_bitmap", "pages", &data);
}

fn ftl_checkpoint_seeds(out: &Out) {
    let records = vstor_fuzz::records::ftl_template_records();
    let parts: Vec<Vec<u8>> =
        records.iter().map(|(k, v)| encode_record(0, k.strip_prefix(b"ftl/".as_slice()).unwrap_or(k), v)).collect();
    out.put("ftl_checkpoint", "template", &join(&parts.iter().map(|p| p.as_slice()).collect::<Vec<_>>()));
    out.put("ftl_checkpoint", "empty", b"");
    for (i, p) in parts.iter().enumerate().take(6) {
        out.put("ftl_checkpoint", &format!("one-{i}"), p);
    }
}

struct Bytes(Vec<u8>);

impl RangeSource for Bytes {
    fn fetch(&self, range: std::ops::Range<u64>) -> Result<Vec<u8>, RegistryError> {
        Ok(self.0[range.start as usize..range.end as usize].to_vec())
    }
}

/// Index records as the cache writes them: a blob opened, an image pinned, a hold.
fn cache_index_seeds(out: &Out) {
    let dir = vstor_fuzz::temp_dir();
    let cache = BlobCache::open(dir.path(), CacheConfig::default()).unwrap();
    let blob = vstor_fuzz::records::CACHE_BLOB.to_vec();
    let digest = Digest::of(&blob);
    let desc = Descriptor {
        media_type: OCI_LAYER_GZIP.into(),
        digest: digest.clone(),
        size: blob.len() as u64,
        annotations: Default::default(),
    };
    let b = cache.blob_from(&desc, Arc::new(Bytes(blob))).unwrap();
    b.fetch_all().unwrap();
    let image = "127.0.0.1:5000/fuzz/image:v1".parse().unwrap();
    let other = Digest::of(b"config");
    cache.pin(&image, &[digest.clone(), other]).unwrap();
    let _hold = cache.hold("mount /mnt/x", &[digest]).unwrap();
    let _ = cache.images().unwrap();
    drop(b);
    drop(cache);
    // The rows the cache wrote, as the target's records: blobs (selector 0), pins (1), holds (2).
    let db = rusqlite::Connection::open(dir.path().join("index.db")).unwrap();
    let mut parts: Vec<Vec<u8>> = Vec::new();
    let mut rows = |query: &str, make: &dyn Fn(&rusqlite::Row<'_>) -> Vec<u8>| {
        let mut stmt = db.prepare(query).unwrap();
        let found: Vec<Vec<u8>> = stmt.query_map([], |r| Ok(make(r))).unwrap().map(Result::unwrap).collect();
        parts.extend(found);
    };
    rows("SELECT digest, size, last_use, complete FROM blobs", &|r| {
        let mut value = Vec::new();
        for i in 1..4 {
            value.extend_from_slice(&r.get::<_, i64>(i).unwrap().to_le_bytes());
        }
        encode_record(0, r.get::<_, String>(0).unwrap().as_bytes(), &value)
    });
    rows("SELECT image, digest FROM pins", &|r| {
        encode_record(1, r.get::<_, String>(0).unwrap().as_bytes(), r.get::<_, String>(1).unwrap().as_bytes())
    });
    rows("SELECT holder, digest FROM holds", &|r| {
        encode_record(2, r.get::<_, String>(0).unwrap().as_bytes(), r.get::<_, String>(1).unwrap().as_bytes())
    });
    out.put("cache_index", "all", &join(&parts.iter().map(|p| p.as_slice()).collect::<Vec<_>>()));
    for (i, p) in parts.iter().enumerate() {
        out.put("cache_index", &format!("one-{i}"), p);
    }
}

/// Chains a Linux guest sends (read, write, flush, get-id, discard, write-zeroes; a header split
/// over two descriptors; an indirect table; buffers in the second memory region), and chains a
/// hostile one does (past guest memory, a loop, a head outside the queue).
fn vhost_seeds(out: &Out) {
    use vstor_fuzz::vhost::{RawDesc, DATA, FUZZ_DESCS};
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    let high = vstor_fuzz::vhost::REGIONS[1].0;
    // Guest memory from DATA: headers at +0x0 (32 bytes apart), segments at +0x400, the
    // indirect table at +0x800, status bytes at +0xc00, buffers from +0x1000.
    struct Seed {
        body: Vec<u8>,
        descs: Vec<RawDesc>,
        heads: Vec<u16>,
    }
    impl Seed {
        fn new() -> Seed {
            Seed { body: vec![0u8; 0x1000], descs: Vec::new(), heads: Vec::new() }
        }
        fn put(&mut self, at: u64, bytes: &[u8]) {
            let at = at as usize;
            self.body[at..at + bytes.len()].copy_from_slice(bytes);
        }
        fn header(&mut self, n: u64, kind: u32, sector: u64) -> u64 {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&kind.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            self.put(n * 32, &h);
            DATA + n * 32
        }
        /// A chain of (address, length, device-writable) in the table, made available.
        fn chain(&mut self, parts: &[(u64, u32, bool)]) {
            let first = self.descs.len() as u16;
            self.heads.push(first);
            for (i, &(addr, len, write)) in parts.iter().enumerate() {
                let last = i + 1 == parts.len();
                let flags = if write { WRITE } else { 0 } | if last { 0 } else { NEXT };
                let next = if last { 0 } else { first + i as u16 + 1 };
                self.descs.push(RawDesc { addr, len, flags, next });
            }
        }
        fn bytes(&self) -> Vec<u8> {
            let mut out = (self.heads.len() as u16).to_le_bytes().to_vec();
            for i in 0..FUZZ_DESCS {
                out.extend_from_slice(&self.heads.get(i).copied().unwrap_or(0).to_le_bytes());
            }
            for i in 0..FUZZ_DESCS {
                let d = self.descs.get(i).copied().unwrap_or(RawDesc { addr: 0, len: 0, flags: 0, next: 0 });
                out.extend_from_slice(&d.to_bytes());
            }
            out.extend_from_slice(&self.body);
            out
        }
    }
    let status = |n: u64| (DATA + 0xc00 + n, 1, true);
    let buf = |off: u64| DATA + 0x1000 + off;

    let mut s = Seed::new();
    let h = s.header(0, 0, 0);
    s.chain(&[(h, 16, false), (buf(0), 4096, true), status(0)]);
    let h = s.header(1, 1, 8);
    s.chain(&[(h, 16, false), (buf(0x1000), 512, false), status(1)]);
    let h = s.header(2, 4, 0);
    s.chain(&[(h, 16, false), status(2)]);
    s.body.resize(0x2400, 0x5a);
    out.put("vhost_chain", "read-write-flush", &s.bytes());

    let mut s = Seed::new();
    let h = s.header(0, 8, 0);
    s.chain(&[(h, 16, false), (buf(0), 20, true), status(0)]);
    let h = s.header(1, 11, 0);
    let mut seg = 16u64.to_le_bytes().to_vec();
    seg.extend_from_slice(&8u32.to_le_bytes());
    seg.extend_from_slice(&0u32.to_le_bytes());
    s.put(0x400, &seg);
    s.chain(&[(h, 16, false), (DATA + 0x400, 16, false), status(1)]);
    let h = s.header(2, 13, 0);
    seg[12..].copy_from_slice(&1u32.to_le_bytes());
    s.put(0x410, &seg);
    s.chain(&[(h, 16, false), (DATA + 0x410, 16, false), status(2)]);
    out.put("vhost_chain", "id-discard-write-zeroes", &s.bytes());

    let mut s = Seed::new();
    let h = s.header(0, 0, 2);
    // The header split in two; the data in the second region; the status after the data in the
    // same descriptor.
    s.chain(&[(h, 8, false), (h + 8, 8, false), (high, 1024, true), (high + 0x1000, 513, true)]);
    let h = s.header(1, 1, 4);
    s.put(32 + 16, &[0x77; 512]);
    s.chain(&[(h, 16 + 512, false), (high + 0x2000, 1, true)]);
    out.put("vhost_chain", "split-and-shared", &s.bytes());

    let mut s = Seed::new();
    let h = s.header(0, 0, 1);
    let table: Vec<u8> = [
        RawDesc { addr: h, len: 16, flags: NEXT, next: 1 },
        RawDesc { addr: buf(0), len: 2048, flags: WRITE | NEXT, next: 2 },
        RawDesc { addr: DATA + 0xc00, len: 1, flags: WRITE, next: 0 },
    ]
    .iter()
    .flat_map(|d| d.to_bytes())
    .collect();
    s.put(0x800, &table);
    s.heads.push(0);
    s.descs.push(RawDesc { addr: DATA + 0x800, len: 48, flags: INDIRECT, next: 0 });
    out.put("vhost_chain", "indirect", &s.bytes());

    let mut s = Seed::new();
    let h = s.header(0, 0, 0);
    s.chain(&[(h, 16, false), (0xff00, 0x200, true), status(0)]);
    let h = s.header(1, 0, 0);
    s.chain(&[(h, 16, false), (buf(0), 512, true), status(1)]);
    let looped = s.descs.len() - 1;
    s.descs[looped].flags |= NEXT;
    s.descs[looped].next = looped as u16 - 1;
    s.heads.push(40);
    let h = s.header(2, 4, 0);
    s.chain(&[(h, 16, false), status(2)]);
    out.put("vhost_chain", "hostile", &s.bytes());
}
