//! The on-disk records of a store, other than blobs and trees: config, key files, locks,
//! pack headers, index files and snapshots (docs/FORMAT.md gives their bytes).
//!
//! Records readable without keys (config, key files, locks) are framed as
//! `magic(8) ‖ version u32 LE ‖ postcard(record) ‖ BLAKE3(all before)(32)`, so damage is told
//! apart from a wrong passphrase. Records that hold store data (pack headers, index files,
//! snapshots) are sealed with the store's keys (`crypto::Crypto::seal`) after a one-byte codec
//! tag and optional zstd compression.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::crypto::{BlobId, Crypto, KeyFile, MasterKeys};
use super::error::{Error, Result};
use super::tree::Time;

/// The store format version this build writes. Version 2 added maintenance: the `condemned/`
/// files ([`CondemnedFile`]) and the maintenance lock; a store of version 1 is read and
/// written as before (docs/FORMAT.md §14).
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build reads.
pub const MIN_FORMAT_VERSION: u32 = 1;

pub const MAGIC_CONFIG: &[u8; 8] = b"KLOSETCF";
pub const MAGIC_KEY: &[u8; 8] = b"KLOSETKY";
pub const MAGIC_LOCK: &[u8; 8] = b"KLOSETLK";

/// Frame a record readable without keys.
pub fn frame<T: Serialize>(magic: &[u8; 8], rec: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(magic);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&postcard::to_allocvec(rec).expect("serialising a record cannot fail"));
    let h = blake3::hash(&out);
    out.extend_from_slice(h.as_bytes());
    out
}

/// Parse a framed record; `file` names it in errors.
pub fn unframe<T: DeserializeOwned>(magic: &[u8; 8], data: &[u8], file: &str) -> Result<T> {
    if data.len() < 8 + 4 + 32 {
        return Err(Error::damaged(file, "file is truncated"));
    }
    if &data[..8] != magic {
        return Err(Error::damaged(file, "wrong magic bytes"));
    }
    let (body, sum) = data.split_at(data.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(Error::damaged(file, "checksum mismatch"));
    }
    let version = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
    if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(Error::Version(version, FORMAT_VERSION));
    }
    postcard::from_bytes(&body[12..])
        .map_err(|e| Error::damaged(file, format!("cannot parse: {e}")))
}

/// Compression codecs of a blob or sealed record.
pub const CODEC_RAW: u8 = 0;
pub const CODEC_ZSTD: u8 = 1;

/// Chunker parameters (FastCDC 2020, normalisation level 1).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChunkerParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for ChunkerParams {
    /// 512 KiB / 1 MiB / 8 MiB: big enough that a 665 MB tree makes few hundred index entries
    /// per GiB and each range read over SFTP is worth its round trip, small enough that a
    /// change in a large file rewrites about a MiB.
    fn default() -> Self {
        ChunkerParams {
            min: 512 * 1024,
            avg: 1024 * 1024,
            max: 8 * 1024 * 1024,
        }
    }
}

/// The `config` file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// Random store id (16 bytes); also the associated data of key wrapping.
    pub id: [u8; 16],
    pub created_ns: i64,
    pub encrypted: bool,
    /// zstd level, or 0 for no compression.
    pub compression_level: i32,
    pub chunker: ChunkerParams,
    /// Target size of a pack file in bytes.
    pub pack_size: u32,
    /// The master keys of a plaintext store (None when encrypted: they are in key files).
    pub plain_keys: Option<MasterKeys>,
    /// Keyed BLAKE3 (store id key) of this record with `auth` zeroed: a config replaced or
    /// edited by someone without the keys is refused.
    pub auth: [u8; 32],
}

impl Config {
    pub fn id_hex(&self) -> String {
        hex::encode(self.id)
    }

    /// The authenticator of this config under the store's id key.
    pub fn compute_auth(&self, id_key: &[u8; 32]) -> [u8; 32] {
        let mut c = self.clone();
        c.auth = [0; 32];
        let body = postcard::to_allocvec(&c).expect("serialising a config cannot fail");
        *blake3::keyed_hash(id_key, &body).as_bytes()
    }
}

/// Contents of a lock file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockRecord {
    pub exclusive: bool,
    pub host: String,
    pub user: String,
    pub pid: u32,
    /// When it was taken and last refreshed, ns since the epoch.
    pub created_ns: i64,
    pub refreshed_ns: i64,
    pub command: String,
}

/// Is this a data (file content) or a tree blob?
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BlobKind {
    Data,
    Tree,
}

/// One blob inside a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackEntry {
    pub id: BlobId,
    /// Offset of the sealed blob in the pack.
    pub offset: u32,
    /// Length of the sealed blob.
    pub length: u32,
    /// Length of the blob's plain content.
    pub raw_length: u32,
}

/// The header at the end of each pack.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PackHeader {
    pub kind: BlobKind,
    pub entries: Vec<PackEntry>,
}

/// All blobs of one pack, as listed in an index file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexPack {
    pub pack: String,
    pub kind: BlobKind,
    pub entries: Vec<PackEntry>,
}

/// An index file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IndexFile {
    pub packs: Vec<IndexPack>,
}

/// A pack that maintenance condemned: no snapshot needed it when it was condemned, at
/// `since_ns` (maintenance's clock). It stays readable until a later maintenance deletes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CondemnedPack {
    pub since_ns: i64,
    /// The pack's entries, as an index file would list them: the old index files that named
    /// the pack are removed once it is condemned.
    pub index: IndexPack,
}

/// A `condemned/` file: packs condemned by one maintenance run (and those of earlier runs
/// still waiting, with their own times).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct CondemnedFile {
    pub packs: Vec<CondemnedPack>,
}

/// A snapshot file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub time: Time,
    pub host: String,
    pub user: String,
    /// What was backed up, as given: an absolute local path or an `sftp://` URL.
    pub source: String,
    /// The absolute path of the backed-up tree inside the snapshot.
    pub path: Vec<u8>,
    pub tags: Vec<String>,
    /// Tree of the snapshot's root `/`.
    pub root: BlobId,
    /// The snapshot this one was made incrementally from.
    pub parent: Option<String>,
    pub stats: SnapshotStats,
    /// Files that could not be read, with the reason.
    pub errors: Vec<(Vec<u8>, String)>,
    /// Duration of the backup in ms.
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SnapshotStats {
    pub files: u64,
    pub dirs: u64,
    pub others: u64,
    /// Sum of file sizes.
    pub bytes: u64,
    /// Bytes read from the source this time (unchanged files are not read).
    pub bytes_read: u64,
    /// New blobs and their sealed bytes added to the store by this backup.
    pub new_blobs: u64,
    pub new_bytes: u64,
}

/// Seal a record: `codec(1) ‖ [zstd](postcard(rec))`, sealed with `aad`.
pub fn seal_record<T: Serialize>(c: &Crypto, aad: &[u8], rec: &T) -> Vec<u8> {
    let raw = postcard::to_allocvec(rec).expect("serialising a record cannot fail");
    let mut payload = Vec::with_capacity(raw.len() / 2 + 1);
    match zstd::bulk::compress(&raw, 3) {
        Ok(z) if z.len() < raw.len() => {
            payload.push(CODEC_ZSTD);
            payload.extend_from_slice(&z);
        }
        _ => {
            payload.push(CODEC_RAW);
            payload.extend_from_slice(&raw);
        }
    }
    c.seal(aad, &payload)
}

/// Largest record or blob we accept to decompress, as a guard against damaged length fields.
const MAX_DECOMPRESSED: usize = 1 << 30;

thread_local! {
    /// One zstd decompression context per thread: creating one per blob allocates and clears
    /// its tables every time.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// The most a zstd frame can decompress to per byte of it: a block produces at most 128 KiB,
/// and the smallest block that produces anything (an RLE block: a 3-byte header and the byte
/// to repeat) is 4 bytes. A content size claimed beyond `len × 32 KiB` cannot be true.
const ZSTD_MAX_RATIO: usize = 32 * 1024;

/// Up to this size, room for a frame's whole content is reserved before decompressing it in
/// one pass (the fast path, and every blob of a default store: chunks are at most 8 MiB).
/// A larger claimed size, from a frame header or an index entry, is reserved only as the
/// frame produces the bytes: a claim alone, true or not, costs no memory.
const RESERVE_AHEAD: usize = 16 << 20;

/// The largest window a frame decompressed in pieces may use: 8 MiB, what RFC 8878 asks
/// every decoder to support and encoders not to exceed (this writer's level 3 uses 2 MiB).
/// The streaming decoder allocates its window as the frame header says.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// Decompress a zstd frame into `out` (cleared first); `raw_len_hint` is its size if known
/// (0: from the frame header). Larger results than the size are refused.
fn decompress_into(body: &[u8], raw_len_hint: usize, out: &mut Vec<u8>) -> Option<()> {
    let cap = if raw_len_hint > 0 {
        raw_len_hint
    } else {
        match zstd::zstd_safe::get_frame_content_size(body) {
            Ok(Some(n)) => usize::try_from(n).unwrap_or(usize::MAX),
            Ok(None) => MAX_DECOMPRESSED,
            // Not a zstd frame header: nothing to decompress.
            Err(_) => return None,
        }
    };
    if cap > MAX_DECOMPRESSED {
        return None;
    }
    // No more than the frame can hold: a larger claim fails below, having cost nothing.
    let cap = cap.min(body.len().saturating_mul(ZSTD_MAX_RATIO));
    out.clear();
    if cap > RESERVE_AHEAD {
        use std::io::Read;
        let mut d = zstd::stream::read::Decoder::with_buffer(body).ok()?;
        d.window_log_max(ZSTD_WINDOW_LOG_MAX).ok()?;
        out.reserve(cap.min(1 << 20));
        d.take(cap as u64 + 1).read_to_end(out).ok()?;
        return (out.len() <= cap).then_some(());
    }
    out.reserve_exact(cap);
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new().ok()?);
        }
        d.as_mut()?.decompress_to_buffer(body, out).ok()
    })?;
    // `out` may have come with more room than `cap` (a reused buffer): the limit still holds.
    (out.len() <= cap).then_some(())
}

/// Decode a codec-tagged payload.
pub fn decode_payload(payload: &[u8], raw_len_hint: usize) -> Option<Vec<u8>> {
    let (&codec, body) = payload.split_first()?;
    match codec {
        CODEC_RAW => Some(body.to_vec()),
        CODEC_ZSTD => {
            let mut out = Vec::new();
            decompress_into(body, raw_len_hint, &mut out)?;
            Some(out)
        }
        _ => None,
    }
}

/// [`decode_payload`] into a reused buffer: the body itself if stored raw, else decompressed
/// into `out`.
pub fn decode_payload_ref<'a>(
    payload: &'a [u8],
    raw_len_hint: usize,
    out: &'a mut Vec<u8>,
) -> Option<&'a [u8]> {
    let (&codec, body) = payload.split_first()?;
    match codec {
        CODEC_RAW => Some(body),
        CODEC_ZSTD => {
            decompress_into(body, raw_len_hint, out)?;
            Some(out)
        }
        _ => None,
    }
}

/// Open a sealed record; `file` names it in errors.
pub fn open_record<T: DeserializeOwned>(
    c: &Crypto,
    aad: &[u8],
    data: &[u8],
    file: &str,
) -> Result<T> {
    let payload = c
        .open(aad, data)
        .ok_or_else(|| Error::damaged(file, "authentication failed"))?;
    decode_record(&payload, file)
}

/// The second half of [`open_record`]: decode the payload of a sealed record once it is
/// opened (codec byte, zstd, postcard). Whoever holds the keys writes these bytes, so they
/// are checked like any others; the fuzz targets and `tests/fuzzed_parsers.rs` reach this
/// decoder directly, past the authentication a fuzzer cannot forge.
pub fn decode_record<T: DeserializeOwned>(payload: &[u8], file: &str) -> Result<T> {
    let raw =
        decode_payload(payload, 0).ok_or_else(|| Error::damaged(file, "cannot decompress"))?;
    postcard::from_bytes(&raw).map_err(|e| Error::damaged(file, format!("cannot parse: {e}")))
}

/// Associated data of the sealed records.
pub const AAD_INDEX: &[u8] = b"kloset index v1";
pub const AAD_SNAPSHOT: &[u8] = b"kloset snapshot v1";
pub const AAD_PACK_HEADER: &[u8] = b"kloset pack header v1";
pub const AAD_CONDEMNED: &[u8] = b"kloset condemned v1";

/// Parse a key file. One whose key-derivation parameters are out of bounds
/// ([`KdfParams::check`](super::crypto::KdfParams::check)) is damaged: it is skipped like any
/// other damaged key file, never handed to Argon2id.
pub fn parse_key_file(data: &[u8], name: &str) -> Result<KeyFile> {
    let file = format!("keys/{name}");
    let k: KeyFile = unframe(MAGIC_KEY, data, &file)?;
    k.kdf.check().map_err(|e| Error::damaged(&file, e))?;
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_detects_every_flip() {
        let rec = LockRecord {
            exclusive: false,
            host: "h".into(),
            user: "u".into(),
            pid: 1,
            created_ns: 2,
            refreshed_ns: 3,
            command: "backup".into(),
        };
        let f = frame(MAGIC_LOCK, &rec);
        let back: LockRecord = unframe(MAGIC_LOCK, &f, "x").unwrap();
        assert_eq!(back.host, "h");
        for i in 0..f.len() {
            let mut t = f.clone();
            t[i] ^= 1;
            assert!(unframe::<LockRecord>(MAGIC_LOCK, &t, "x").is_err());
        }
    }

    /// A frame that decompresses to more than the size the index gives is refused, also into
    /// a reused buffer that has room for more.
    #[test]
    fn decompressed_size_is_bounded_even_in_a_larger_buffer() {
        let data = vec![7u8; 100_000];
        let body = zstd::bulk::compress(&data, 3).unwrap();
        let mut out = Vec::with_capacity(1 << 20);
        assert!(decompress_into(&body, 100_000, &mut out).is_some());
        assert_eq!(out, data);
        let mut out = Vec::with_capacity(1 << 20);
        assert!(decompress_into(&body, 99_999, &mut out).is_none());
        let mut out = Vec::new();
        assert!(decompress_into(&body, 99_999, &mut out).is_none());
    }

    #[test]
    fn sealed_record_roundtrip() {
        let c = Crypto::new(MasterKeys::random(), true);
        let idx = IndexFile {
            packs: vec![IndexPack {
                pack: "ab".into(),
                kind: BlobKind::Data,
                entries: vec![],
            }],
        };
        let s = seal_record(&c, AAD_INDEX, &idx);
        let back: IndexFile = open_record(&c, AAD_INDEX, &s, "i").unwrap();
        assert_eq!(back.packs[0].pack, "ab");
        assert!(open_record::<IndexFile>(&c, AAD_SNAPSHOT, &s, "i").is_err());
    }
}
