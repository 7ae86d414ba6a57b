//! `vstor image convert`: writes an eStargz copy of an image to a registry.
//!
//! Each gzip layer is fetched into the cache (verified), rewritten by
//! [`crate::layer::convert_to_estargz`] into a temporary file under the cache, and pushed. The new
//! manifest (OCI media types) names each layer with the annotations stargz-snapshotter reads:
//! the digest of its table of contents and its uncompressed size. The config is the source's with
//! `rootfs.diff_ids` replaced (an eStargz tar holds the TOC entry too, so its diff_id differs).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cache::{BlobCache, CacheError};
use crate::digest::{Digest, Hasher};
use crate::layer::{self, LayerError, Limits};
use crate::reference::ImageRef;
use crate::registry::{
    BlobBody, Descriptor, Registry, RegistryError, DOCKER_LAYER_GZIP, OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST,
};

/// The layer annotation giving the size of an eStargz layer's uncompressed tar.
pub const UNCOMPRESSED_SIZE: &str = "io.containers.estargz.uncompressed-size";

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("converting layer {digest} to eStargz")]
    Layer {
        digest: Digest,
        #[source]
        source: Box<LayerError>,
    },
    #[error("layer {digest} is {media_type}; only gzip tar layers can be converted")]
    NotGzip { digest: Digest, media_type: String },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the image config of {reference}: {detail}")]
    Config { reference: String, detail: String },
    #[error("converted layer {source_layer}: the writer said {said}, the file hashes to {actual}")]
    Digest { source_layer: Digest, said: Digest, actual: Digest },
}

/// Converts `src` to eStargz and pushes it as `dst`; files named in `prefetch` go first in each
/// layer, before the prefetch landmark. Layers are read within `limits`. Returns the new
/// manifest's digest.
pub fn convert(
    registry: &Arc<Registry>,
    cache: &BlobCache,
    src: &ImageRef,
    dst: &ImageRef,
    prefetch: &[PathBuf],
    limits: &Limits,
) -> Result<Digest, ConvertError> {
    let image = registry.resolve(src)?;
    let keys: Vec<Digest> = image.layers.iter().map(|d| d.digest.clone()).collect();
    let _hold = cache.hold(&format!("conversion of {src}"), &keys)?;
    let config = registry.fetch_blob(src, &image.config.digest)?;
    let mut layers = Vec::with_capacity(image.layers.len());
    let mut diff_ids = Vec::with_capacity(image.layers.len());
    for desc in &image.layers {
        if desc.media_type != OCI_LAYER_GZIP && desc.media_type != DOCKER_LAYER_GZIP {
            return Err(ConvertError::NotGzip { digest: desc.digest.clone(), media_type: desc.media_type.clone() });
        }
        let blob = cache.blob(registry, src, desc)?;
        blob.fetch_all()?;
        let input = blob.path().ok_or_else(|| CacheError::BadBlob {
            digest: desc.digest.clone(),
            detail: "complete but without a file".into(),
        })?;
        let out = cache.temp_path("estargz");
        let converted = convert_layer(desc, &input, &out, prefetch, limits);
        let pushed = converted.and_then(|c| {
            registry.push_blob(dst, &c.digest, BlobBody::File(&out))?;
            Ok(c)
        });
        let _ = std::fs::remove_file(&out);
        let c = pushed?;
        tracing::info!(layer = %desc.digest, estargz = %c.digest, size = c.size, "layer converted");
        let annotations = BTreeMap::from([
            (layer::TOC_DIGEST_ANNOTATION.to_owned(), c.toc_digest.to_string()),
            (UNCOMPRESSED_SIZE.to_owned(), c.uncompressed_size.to_string()),
        ]);
        layers.push(Descriptor { media_type: OCI_LAYER_GZIP.to_owned(), digest: c.digest, size: c.size, annotations });
        diff_ids.push(c.diff_id);
    }
    let config = new_config(src, &config, &diff_ids)?;
    let config_desc = Descriptor {
        media_type: OCI_CONFIG.to_owned(),
        digest: Digest::of(&config),
        size: config.len() as u64,
        annotations: BTreeMap::new(),
    };
    registry.push_blob(dst, &config_desc.digest, BlobBody::Bytes(&config))?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_desc,
        "layers": layers,
    });
    let manifest = serde_json::to_vec(&manifest)
        .map_err(|e| ConvertError::Config { reference: dst.to_string(), detail: e.to_string() })?;
    Ok(registry.push_manifest(dst, OCI_MANIFEST, &manifest)?)
}

/// Converts one layer file into `out` and checks the written file against the digest the
/// writer reports.
fn convert_layer(
    desc: &Descriptor,
    input: &Path,
    out: &Path,
    prefetch: &[PathBuf],
    limits: &Limits,
) -> Result<layer::Converted, ConvertError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| ConvertError::Io { what, path, source }
    };
    let mut reader = BufReader::new(File::open(input).map_err(io("opening", input))?);
    let file = File::create(out).map_err(io("creating", out))?;
    let mut writer = BufWriter::new(file);
    let converted = layer::convert_to_estargz(&mut reader, &mut writer, prefetch, limits)
        .map_err(|source| ConvertError::Layer { digest: desc.digest.clone(), source: Box::new(source) })?;
    writer.flush().map_err(io("writing", out))?;
    let mut hasher = Hasher::new();
    let mut written = File::open(out).map_err(io("opening", out))?;
    std::io::copy(&mut written, &mut hasher).map_err(io("reading", out))?;
    let actual = hasher.finish();
    if actual != converted.digest {
        return Err(ConvertError::Digest { source_layer: desc.digest.clone(), said: converted.digest, actual });
    }
    Ok(converted)
}

/// The source config with `rootfs.diff_ids` replaced.
fn new_config(src: &ImageRef, config: &[u8], diff_ids: &[Digest]) -> Result<Vec<u8>, ConvertError> {
    let bad = |detail: String| ConvertError::Config { reference: src.to_string(), detail };
    let mut value: serde_json::Value = serde_json::from_slice(config).map_err(|e| bad(e.to_string()))?;
    let object = value.as_object_mut().ok_or_else(|| bad("not a JSON object".into()))?;
    object.insert(
        "rootfs".into(),
        serde_json::json!({ "type": "layers", "diff_ids": diff_ids.iter().map(Digest::to_string).collect::<Vec<_>>() }),
    );
    serde_json::to_vec(&value).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_config_replaces_only_the_diff_ids() {
        let src: ImageRef = "127.0.0.1:1/a:b".parse().unwrap();
        let old = br#"{"architecture":"amd64","os":"linux","config":{"Env":["A=1"]},"rootfs":{"type":"layers","diff_ids":["sha256:1111111111111111111111111111111111111111111111111111111111111111"]},"history":[{"created_by":"x"}]}"#;
        let d = Digest::of(b"new");
        let new: serde_json::Value =
            serde_json::from_slice(&new_config(&src, old, std::slice::from_ref(&d)).unwrap()).unwrap();
        assert_eq!(new["rootfs"]["diff_ids"][0], d.as_str());
        assert_eq!(new["config"]["Env"][0], "A=1");
        assert_eq!(new["history"][0]["created_by"], "x");
        assert!(new_config(&src, b"[]", &[]).is_err());
    }
}
