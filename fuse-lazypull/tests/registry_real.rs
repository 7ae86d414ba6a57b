//! The registry client and the cache against a real `docker-registry` on loopback, with images
//! built by umoci and pushed by skopeo, and a proxy for auth and faults.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fuse_lazypull::cache::{self, BlobCache, CacheConfig, CacheError};
use fuse_lazypull::digest::Digest;
use fuse_lazypull::reference::ImageRef;
use fuse_lazypull::registry::{
    Credentials, Registry, RegistryConfig, RegistryError, DOCKER_LAYER_GZIP, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST,
    OCI_LAYER_GZIP,
};
use test_support::registry as harness;
use test_support::registry::{Auth, ImageBuilder, Proxy};

fn client() -> Arc<Registry> {
    Registry::new(RegistryConfig { timeout_secs: 5, retries: 2, ..Default::default() }).unwrap()
}

fn client_with(host: &str, user: &str, password: &str) -> Arc<Registry> {
    let mut config = RegistryConfig { timeout_secs: 5, retries: 2, ..Default::default() };
    config
        .credentials
        .insert(host.to_owned(), Credentials { username: user.to_owned(), password: password.to_owned() });
    Registry::new(config).unwrap()
}

fn parse(s: &str) -> ImageRef {
    s.parse().unwrap()
}

/// An image of two layers: small files, then a large file.
fn two_layer_image() -> ImageBuilder {
    let mut b = ImageBuilder::new();
    b.layer(|l| {
        l.file("etc/hostname", b"lazy\n", 0o644).file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755);
    });
    b.layer(|l| {
        l.large_file("data/big", 3 << 20, 1);
    });
    b
}

fn layout_blob(b: &ImageBuilder, d: &Digest) -> Vec<u8> {
    std::fs::read(b.layout().join("blobs/sha256").join(d.hex())).unwrap()
}

fn cache_at(dir: &Path, limit: u64, timeout: Duration) -> Arc<BlobCache> {
    BlobCache::open(dir, CacheConfig { size_limit: limit, fetch_timeout: timeout, gc_grace: Duration::ZERO }).unwrap()
}

#[test]
fn registry_resolves_oci_and_docker_images_and_serves_ranges() {
    let reg = harness::Registry::start();
    let b = two_layer_image();
    for (docker, tag) in [(false, "oci"), (true, "docker")] {
        let reference = b.push_as(&reg.host(), &format!("test/two:{tag}"), docker);
        let client = client();
        let image = client.resolve(&parse(&reference)).unwrap();
        assert_eq!(image.layers.len(), 2);
        let want = if docker { DOCKER_LAYER_GZIP } else { OCI_LAYER_GZIP };
        assert!(image.layers.iter().all(|l| l.media_type == want), "{:?}", image.layers);
        let config = client.fetch_blob(&image.reference, &image.config.digest).unwrap();
        let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
        assert_eq!(config["architecture"], "amd64");
        let big = &image.layers[1];
        let whole = layout_blob(&b, &big.digest);
        assert_eq!(whole.len() as u64, big.size);
        let before = client.bytes_fetched();
        let part = client.fetch_range(&image.reference, &big.digest, 1000..5000).unwrap();
        assert_eq!(part, &whole[1000..5000]);
        assert_eq!(client.bytes_fetched() - before, 4000);
        // By digest too.
        let by_digest = format!("{}@{}", reg.reference("test/two"), image.digest);
        assert_eq!(client.resolve(&parse(&by_digest)).unwrap().layers, image.layers);
    }
}

#[test]
fn registry_chooses_linux_amd64_from_a_manifest_list() {
    let reg = harness::Registry::start();
    let mut b = ImageBuilder::new();
    b.layer(|l| {
        l.file("which", b"arm\n", 0o644);
    });
    let arm = b.push_as(&reg.host(), "test/multi:arm", true);
    b.layer(|l| {
        l.file("which", b"amd\n", 0o644);
    });
    let amd = b.push_as(&reg.host(), "test/multi:amd", true);
    let client = client();
    let arm_m = client.fetch_manifest(&parse(&arm)).unwrap();
    let amd_m = client.fetch_manifest(&parse(&amd)).unwrap();
    assert_eq!(amd_m.media_type, DOCKER_MANIFEST);
    let list = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST_LIST,
        "manifests": [
            {"mediaType": DOCKER_MANIFEST, "digest": arm_m.digest, "size": arm_m.bytes.len(),
             "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"mediaType": DOCKER_MANIFEST, "digest": amd_m.digest, "size": amd_m.bytes.len(),
             "platform": {"os": "linux", "architecture": "amd64"}},
        ]
    });
    let list_ref = parse(&reg.reference("test/multi:list"));
    client.push_manifest(&list_ref, DOCKER_MANIFEST_LIST, &serde_json::to_vec(&list).unwrap()).unwrap();
    let image = client.resolve(&list_ref).unwrap();
    assert_eq!(image.digest, amd_m.digest);
    assert_eq!(image.layers.len(), 2);
}

#[test]
fn registry_names_the_reference_when_a_tag_or_repository_is_missing() {
    let reg = harness::Registry::start();
    two_layer_image().push(&reg.host(), "test/there:v1");
    let client = client();
    let err = client.resolve(&parse(&reg.reference("test/there:v2"))).unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("test/there:v2") && msg.contains("not found"), "{msg}");
    let err = client.resolve(&parse(&reg.reference("test/nothing:v1"))).unwrap_err();
    assert!(err.to_string().contains("test/nothing:v1"), "{err}");
    // Nothing listens: a connection error after the retries, naming the URL.
    let err = client.resolve(&parse("127.0.0.1:1/x:y")).unwrap_err();
    assert!(matches!(err, RegistryError::Transport { .. }), "{err:?}");
}

#[test]
fn registry_basic_auth_through_the_proxy() {
    let reg = harness::Registry::start();
    two_layer_image().push(&reg.host(), "test/auth:v1");
    let proxy = Proxy::start(&reg, Auth::Basic { user: "alice".into(), password: "s3cret".into() });
    let reference = parse(&proxy.reference("test/auth:v1"));
    let image = client_with(&proxy.host(), "alice", "s3cret").resolve(&reference).unwrap();
    assert_eq!(image.layers.len(), 2);
    let err = client().resolve(&reference).unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err:?}");
    let err = client_with(&proxy.host(), "alice", "wrong").resolve(&reference).unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err:?}");
}

/// Bearer tokens from the realm, cached; blob GETs that redirect.
#[test]
fn registry_bearer_token_auth_through_the_proxy() {
    let reg = harness::Registry::start();
    let b = two_layer_image();
    b.push(&reg.host(), "test/token:v1");
    let proxy = Proxy::start(&reg, Auth::Bearer { user: "bob".into(), password: "pw".into() });
    let reference = parse(&proxy.reference("test/token:v1"));
    let client = client_with(&proxy.host(), "bob", "pw");
    let image = client.resolve(&reference).unwrap();
    let failures = proxy.auth_failures();
    // The token is cached: more requests, no more challenges.
    let layer = &image.layers[0];
    let bytes = client.fetch_range(&reference, &layer.digest, 0..layer.size).unwrap();
    assert_eq!(bytes, layout_blob(&b, &layer.digest));
    client.fetch_blob(&reference, &image.config.digest).unwrap();
    assert_eq!(proxy.auth_failures(), failures);
    // Blob GETs redirected elsewhere (as to a registry's storage) keep their range.
    proxy.set_faults(|f| f.redirect_blobs = true);
    let part = client.fetch_range(&reference, &layer.digest, 10..110).unwrap();
    assert_eq!(part, &bytes[10..110]);
    client.fetch_blob(&reference, &image.config.digest).unwrap();
    let err = client_with(&proxy.host(), "bob", "nope").resolve(&reference).unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err:?}");
}

/// A corrupt blob body is refused and fetched again; a truncated one is retried; a server error
/// is retried.
#[test]
fn registry_corrupt_and_truncated_blobs_are_fetched_again() {
    let reg = harness::Registry::start();
    let b = two_layer_image();
    b.push(&reg.host(), "test/faults:v1");
    let proxy = Proxy::start(&reg, Auth::None);
    let reference = parse(&proxy.reference("test/faults:v1"));
    let client = client();
    let image = client.resolve(&reference).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_at(dir.path(), u64::MAX, Duration::from_secs(20));

    proxy.set_faults(|f| f.corrupt_blobs = 1);
    let blob = cache.blob(&client, &reference, &image.layers[1]).unwrap();
    blob.fetch_all().unwrap();
    assert_eq!(std::fs::read(blob.path().unwrap()).unwrap(), layout_blob(&b, &image.layers[1].digest));

    proxy.set_faults(|f| {
        f.truncate_blobs = 1;
        f.fail_requests = 1;
    });
    let blob = cache.blob(&client, &reference, &image.layers[0]).unwrap();
    blob.fetch_all().unwrap();
    assert_eq!(std::fs::read(blob.path().unwrap()).unwrap(), layout_blob(&b, &image.layers[0].digest));

    // A corrupt config (fetched whole) is refused with a digest error.
    proxy.set_faults(|f| f.corrupt_blobs = 10);
    let err = client.fetch_blob(&reference, &image.config.digest).unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err:?}");
}

/// A stalled registry makes a read of missing data fail after the cache's timeout.
#[test]
fn registry_stall_gives_a_read_timeout() {
    let reg = harness::Registry::start();
    two_layer_image().push(&reg.host(), "test/stall:v1");
    let proxy = Proxy::start(&reg, Auth::None);
    let reference = parse(&proxy.reference("test/stall:v1"));
    let client = client();
    let image = client.resolve(&reference).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_at(dir.path(), u64::MAX, Duration::from_millis(500));
    let blob = cache.blob(&client, &reference, &image.layers[1]).unwrap();
    proxy.set_faults(|f| f.stall = true);
    let mut buf = vec![0; 4096];
    let err = blob.read_at(10_000, &mut buf).unwrap_err();
    assert!(matches!(err, CacheError::Timeout { .. }), "{err:?}");
    proxy.set_faults(|f| f.stall = false);
    blob.read_at(10_000, &mut buf).unwrap();
}

/// Two images sharing a base layer: prefetching the second fetches only what it adds. Then gc
/// under a size limit keeps what images reference and drops what they no longer do.
#[test]
fn cache_shared_base_layer_is_fetched_once_and_gc_keeps_referenced_images() {
    let reg = harness::Registry::start();
    let mut b = ImageBuilder::new();
    b.layer(|l| {
        l.large_file("usr/lib/base.so", 2 << 20, 7);
    });
    b.push(&reg.host(), "test/app1:v1");
    b.layer(|l| {
        l.file("app/two", b"second app\n", 0o755);
    });
    b.push(&reg.host(), "test/app2:v1");
    let proxy = Proxy::start(&reg, Auth::None);
    let client = client();
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_at(dir.path(), u64::MAX, Duration::from_secs(20));

    let app1 = parse(&proxy.reference("test/app1:v1"));
    let one = cache::prefetch(&cache, &client, &app1).unwrap();
    let first = proxy.blob_bytes();
    assert_eq!(first, one.config.size + one.layers[0].size);
    let app2 = parse(&proxy.reference("test/app2:v1"));
    let two = cache::prefetch(&cache, &client, &app2).unwrap();
    assert_eq!(two.layers[0], one.layers[0], "the base layer is shared");
    assert_eq!(proxy.blob_bytes() - first, two.config.size + two.layers[1].size, "the base layer was fetched again");
    // Prefetching again fetches nothing.
    let again = proxy.blob_bytes();
    cache::prefetch(&cache, &client, &app2).unwrap();
    assert_eq!(proxy.blob_bytes(), again);

    // Both images are referenced: nothing goes, whatever the limit.
    let tight = cache_at(dir.path(), 0, Duration::from_secs(20));
    assert!(tight.gc().unwrap().removed.is_empty());
    // Dropping app1 frees only its config: the base layer is still app2's.
    tight.remove_image(&app1).unwrap();
    assert_eq!(tight.gc().unwrap().removed, vec![one.config.digest.clone()]);
    tight.remove_image(&app2).unwrap();
    let report = tight.gc().unwrap();
    assert_eq!(report.removed.len(), 3);
    assert_eq!(report.total_bytes, 0);
}

/// A registry that ignores `Range` (answers 200 with the whole blob) still gives the range.
#[test]
fn registry_range_ignored_by_the_server_still_gives_the_range() {
    let reg = harness::Registry::start();
    let b = two_layer_image();
    b.push(&reg.host(), "test/norange:v1");
    let proxy = Proxy::start(&reg, Auth::None);
    proxy.set_faults(|f| f.ignore_range = true);
    let reference = parse(&proxy.reference("test/norange:v1"));
    let client = client();
    let image = client.resolve(&reference).unwrap();
    let big = &image.layers[1];
    let whole = layout_blob(&b, &big.digest);
    let part = client.fetch_range(&reference, &big.digest, 1000..5000).unwrap();
    assert_eq!(part, &whole[1000..5000]);
    // Only the bytes up to the range's end were read.
    assert!(client.bytes_fetched() <= 5000, "{}", client.bytes_fetched());
}

/// HTTPS with rustls/ring: a registry whose certificate a configured CA signed is reached; without
/// that CA the certificate is refused.
#[test]
fn registry_https_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let tls = harness::TlsFiles::make(dir.path());
    let reg = harness::Registry::start_tls(&tls);
    two_layer_image().push(&reg.host(), "test/tls:v1");
    let reference = parse(&reg.reference("test/tls:v1"));
    let config = RegistryConfig { https: vec![reg.host()], ca_files: vec![tls.ca.clone()], ..Default::default() };
    let client = Registry::new(config).unwrap();
    let image = client.resolve(&reference).unwrap();
    assert_eq!(image.layers.len(), 2);
    let part = client.fetch_range(&reference, &image.layers[1].digest, 0..100).unwrap();
    assert_eq!(part.len(), 100);

    let untrusting =
        Registry::new(RegistryConfig { https: vec![reg.host()], retries: 0, ..Default::default() }).unwrap();
    let err = untrusting.resolve(&reference).unwrap_err();
    let msg = fuse_lazypull::error::chain(&err);
    assert!(msg.to_lowercase().contains("certificate"), "{msg}");
}
