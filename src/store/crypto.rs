//! Keys, ids and sealing.
//!
//! A store has random master keys ([`MasterKeys`]): a 256-bit AES-GCM key, a 256-bit BLAKE3 key
//! that turns content into blob ids (so ids reveal nothing about contents), and the seed of the
//! chunker's gear table (so chunk sizes do not fingerprint files). In an encrypted store they
//! live only inside key files, wrapped by a key derived from a passphrase with Argon2id; in a
//! plaintext store they sit in the config, and sealing only authenticates.
//!
//! "Sealing" is the one envelope every encrypted byte in a store goes through (blobs, pack
//! headers, index and snapshot files): `nonce(12) ‖ AES-256-GCM(payload, aad)`, or for a
//! plaintext store `payload ‖ tag(16)` where the tag is a keyed BLAKE3 over aad and payload.
//! The aad binds a sealed thing to its role (a blob to its id), so nothing can be swapped.

use aes_gcm::aead::{Aead, AeadInOut, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use serde::{Deserialize, Serialize};

use super::error::{Error, Result};

/// A 256-bit blob id: keyed BLAKE3 of the blob's plain content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlobId(pub [u8; 32]);

impl BlobId {
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
    pub fn from_hex(s: &str) -> Option<BlobId> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b).ok()?;
        Some(BlobId(b))
    }
}

impl std::fmt::Debug for BlobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.short())
    }
}

/// The secrets of a store.
#[derive(Clone, Serialize, Deserialize)]
pub struct MasterKeys {
    pub encrypt: [u8; 32],
    pub id: [u8; 32],
    pub chunker_seed: u64,
}

impl std::fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKeys(..)")
    }
}

impl MasterKeys {
    pub fn random() -> Self {
        let mut encrypt = [0u8; 32];
        let mut id = [0u8; 32];
        let mut seed = [0u8; 8];
        fill_random(&mut encrypt);
        fill_random(&mut id);
        fill_random(&mut seed);
        MasterKeys {
            encrypt,
            id,
            chunker_seed: u64::from_le_bytes(seed),
        }
    }
}

pub fn fill_random(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the operating system's random number generator failed");
}

/// Nonces drawn from the operating system's generator at once ([`fresh_nonce`]).
const NONCES_AT_ONCE: usize = 64;

/// A random nonce, never handed out before: nonces are drawn from the operating system's
/// generator [`NONCES_AT_ONCE`] at a time, per thread, and each is used once (a million small
/// files are a million sealed blobs; one `getrandom` call for each was a system call per file
/// of a first backup). kloset never forks a process that seals, so no copy of a thread's
/// unused nonces is ever used twice.
fn fresh_nonce() -> [u8; NONCE_LEN] {
    thread_local! {
        static NONCES: std::cell::RefCell<(usize, [u8; NONCE_LEN * NONCES_AT_ONCE])> =
            const { std::cell::RefCell::new((NONCES_AT_ONCE, [0; NONCE_LEN * NONCES_AT_ONCE])) };
    }
    NONCES.with_borrow_mut(|(next, bytes)| {
        if *next == NONCES_AT_ONCE {
            fill_random(bytes);
            *next = 0;
        }
        let at = *next * NONCE_LEN;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&bytes[at..at + NONCE_LEN]);
        // Not kept once handed out.
        bytes[at..at + NONCE_LEN].fill(0);
        *next += 1;
        nonce
    })
}

pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    fill_random(&mut b);
    hex::encode(b)
}

/// Seals and opens with a store's keys.
#[derive(Clone)]
pub struct Crypto {
    keys: MasterKeys,
    cipher: Option<Aes256Gcm>,
}

pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes a sealed payload grows by.
pub const SEAL_OVERHEAD_ENCRYPTED: usize = NONCE_LEN + TAG_LEN;
pub const SEAL_OVERHEAD_PLAIN: usize = TAG_LEN;

impl Crypto {
    pub fn new(keys: MasterKeys, encrypted: bool) -> Self {
        let cipher = encrypted.then(|| Aes256Gcm::new((&keys.encrypt).into()));
        Crypto { keys, cipher }
    }

    pub fn keys(&self) -> &MasterKeys {
        &self.keys
    }

    pub fn encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    /// The id of a blob with this content.
    pub fn blob_id(&self, data: &[u8]) -> BlobId {
        BlobId(*blake3::keyed_hash(&self.keys.id, data).as_bytes())
    }

    /// The keyed hash used for file names (packs, index, snapshots).
    pub fn file_id(&self, data: &[u8]) -> String {
        blake3::keyed_hash(&self.keys.id, data).to_hex().to_string()
    }

    fn plain_tag(&self, aad: &[u8], payload: &[u8]) -> [u8; TAG_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.keys.id);
        h.update(&(aad.len() as u64).to_le_bytes());
        h.update(aad);
        h.update(payload);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&h.finalize().as_bytes()[..TAG_LEN]);
        tag
    }

    /// Seal a payload: encrypt and authenticate it, bound to `aad`.
    pub fn seal(&self, aad: &[u8], payload: &[u8]) -> Vec<u8> {
        match &self.cipher {
            Some(c) => {
                let nonce = fresh_nonce();
                let ct = c
                    .encrypt(&Nonce::from(nonce), Payload { msg: payload, aad })
                    .expect("AES-GCM encryption of an in-memory buffer cannot fail");
                let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
                out.extend_from_slice(&nonce);
                out.extend_from_slice(&ct);
                out
            }
            None => {
                let mut out = Vec::with_capacity(payload.len() + TAG_LEN);
                out.extend_from_slice(payload);
                out.extend_from_slice(&self.plain_tag(aad, payload));
                out
            }
        }
    }

    /// Bytes [`Crypto::seal_in_place`] wants reserved before the payload (the nonce).
    pub fn seal_prefix(&self) -> usize {
        if self.encrypted() { NONCE_LEN } else { 0 }
    }

    /// [`Crypto::seal`] without copies: `buf` holds [`Crypto::seal_prefix`] reserved bytes
    /// and then the payload; it is turned into the sealed bytes in place (same result as
    /// `seal`), the tag appended.
    pub fn seal_in_place(&self, aad: &[u8], buf: &mut Vec<u8>) {
        match &self.cipher {
            Some(c) => {
                let nonce = fresh_nonce();
                buf[..NONCE_LEN].copy_from_slice(&nonce);
                let tag = c
                    .encrypt_inout_detached(
                        &Nonce::from(nonce),
                        aad,
                        (&mut buf[NONCE_LEN..]).into(),
                    )
                    .expect("AES-GCM encryption of an in-memory buffer cannot fail");
                buf.extend_from_slice(&tag);
            }
            None => {
                let tag = self.plain_tag(aad, buf);
                buf.extend_from_slice(&tag);
            }
        }
    }

    /// Open a sealed payload; `None` if it fails authentication.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        match &self.cipher {
            Some(c) => {
                if sealed.len() < SEAL_OVERHEAD_ENCRYPTED {
                    return None;
                }
                let (nonce, ct) = sealed.split_at(NONCE_LEN);
                let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
                c.decrypt(&Nonce::from(nonce), Payload { msg: ct, aad })
                    .ok()
            }
            None => {
                if sealed.len() < TAG_LEN {
                    return None;
                }
                let (payload, tag) = sealed.split_at(sealed.len() - TAG_LEN);
                let want = self.plain_tag(aad, payload);
                // Constant-time comparison is not needed: the tag key is public in a plaintext
                // store, the tag only detects damage.
                (want == tag).then(|| payload.to_vec())
            }
        }
    }

    /// [`Crypto::open`] without copies: `sealed` is checked and decrypted in place, and the
    /// payload is returned from inside it.
    pub fn open_in_place<'a>(&self, aad: &[u8], sealed: &'a mut [u8]) -> Option<&'a [u8]> {
        match &self.cipher {
            Some(c) => {
                if sealed.len() < SEAL_OVERHEAD_ENCRYPTED {
                    return None;
                }
                let (nonce, rest) = sealed.split_at_mut(NONCE_LEN);
                let at = rest.len() - TAG_LEN;
                let (ct, tag) = rest.split_at_mut(at);
                let nonce: [u8; NONCE_LEN] = (&*nonce).try_into().ok()?;
                let tag = aes_gcm::Tag::try_from(&*tag).ok()?;
                c.decrypt_inout_detached(&Nonce::from(nonce), aad, (&mut *ct).into(), &tag)
                    .ok()?;
                Some(ct)
            }
            None => {
                if sealed.len() < TAG_LEN {
                    return None;
                }
                let (payload, tag) = sealed.split_at(sealed.len() - TAG_LEN);
                (self.plain_tag(aad, payload) == tag).then_some(payload)
            }
        }
    }

    pub fn overhead(&self) -> usize {
        if self.encrypted() {
            SEAL_OVERHEAD_ENCRYPTED
        } else {
            SEAL_OVERHEAD_PLAIN
        }
    }
}

/// Argon2id parameters of a key file.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Iterations.
    pub t: u32,
    /// Parallelism.
    pub p: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 4 lanes: RFC 9106's "second recommended option", costly for a
    /// guesser, bearable for every command that opens a store. The lanes are filled in
    /// parallel (argon2's `parallel` feature): same work and memory, less wall time.
    fn default() -> Self {
        KdfParams {
            m_kib: 64 * 1024,
            t: 3,
            p: 4,
        }
    }
}

impl KdfParams {
    /// The most memory a key file may ask Argon2id for: 2 GiB, RFC 9106's first recommended
    /// option (this build writes 64 MiB).
    pub const MAX_M_KIB: u32 = 2 * 1024 * 1024;
    /// The most passes: 16, five times RFC 9106's second option (this build writes 3).
    pub const MAX_T: u32 = 16;
    /// The most lanes: 64 (this build writes 4).
    pub const MAX_P: u32 = 64;

    /// Are these parameters within what a key file may ask for? A key file is read before
    /// any key is known, from a directory anyone with write access to the store can add
    /// to, and its parameters decide how much memory and time opening the store costs: they
    /// are bounded (at most 2 GiB and 16 passes, tens of seconds) and must be ones Argon2id
    /// accepts, so a planted key file is skipped as damaged instead of costing terabytes or
    /// years, or failing the open of a store whose own key file is good.
    ///
    /// # Errors
    /// What is out of bounds, as a sentence.
    pub fn check(&self) -> std::result::Result<(), String> {
        if !(1..=Self::MAX_T).contains(&self.t) {
            return Err(format!(
                "key derivation asks for {} passes (1 to {} accepted)",
                self.t,
                Self::MAX_T
            ));
        }
        if !(1..=Self::MAX_P).contains(&self.p) {
            return Err(format!(
                "key derivation asks for {} lanes (1 to {} accepted)",
                self.p,
                Self::MAX_P
            ));
        }
        if self.m_kib > Self::MAX_M_KIB {
            return Err(format!(
                "key derivation asks for {} KiB of memory (at most {} accepted)",
                self.m_kib,
                Self::MAX_M_KIB
            ));
        }
        argon2::Params::new(self.m_kib, self.t, self.p, Some(32))
            .map(|_| ())
            .map_err(|e| format!("key derivation parameters refused: {e}"))
    }
}

/// A key file: the master keys, wrapped by a passphrase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyFile {
    pub created_ns: i64,
    pub host: String,
    pub user: String,
    pub kdf: KdfParams,
    pub salt: [u8; 16],
    /// `nonce ‖ AES-256-GCM(postcard(MasterKeys), aad = store id)` under the derived key.
    pub wrapped: Vec<u8>,
}

fn derive(passphrase: &[u8], salt: &[u8], kdf: KdfParams) -> Result<[u8; 32]> {
    kdf.check()
        .map_err(|e| Error::Other(format!("bad key derivation parameters: {e}")))?;
    let params = argon2::Params::new(kdf.m_kib, kdf.t, kdf.p, Some(32))
        .map_err(|e| Error::Other(format!("bad key derivation parameters: {e}")))?;
    let blocks = params.block_count();
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    let mut memory = KdfMemory::new(blocks)?;
    a.hash_password_into_with_memory(passphrase, salt, &mut out, memory.blocks())
        .map_err(|e| Error::Other(format!("key derivation failed: {e}")))?;
    Ok(out)
}

/// Argon2's working memory, mapped fresh from the kernel and backed by huge pages where the
/// system allows them (`madvise` mode of transparent huge pages, Debian's default).
///
/// The crate's own allocation (64-byte aligned, so not `calloc`) zero-fills 64 MiB on one
/// thread before the lanes start, one 4 KiB page fault at a time. A fresh anonymous map is
/// already zero and its pages are first touched by the lanes in parallel, in 2 MiB faults.
/// Measured on `kloset ls` of a remote store: page faults 19.8k -> 3.4k, CPU 277 -> 210 ms,
/// wall 285 -> 238 ms. Like the crate's buffer, it is not wiped: it goes back to the kernel.
struct KdfMemory {
    map: memmap2::MmapMut,
    blocks: usize,
}

impl KdfMemory {
    fn new(blocks: usize) -> Result<KdfMemory> {
        let len = blocks * std::mem::size_of::<argon2::Block>();
        let map = memmap2::MmapOptions::new()
            .len(len.max(1))
            .map_anon()
            .map_err(|e| Error::Other(format!("key derivation: cannot map {len} bytes: {e}")))?;
        #[cfg(target_os = "linux")]
        // Only a hint: without transparent huge pages the map stays in 4 KiB pages.
        let _ = map.advise(memmap2::Advice::HugePage);
        Ok(KdfMemory { map, blocks })
    }

    #[allow(unsafe_code)]
    fn blocks(&mut self) -> &mut [argon2::Block] {
        let p = self.map.as_mut_ptr();
        debug_assert_eq!(p.align_offset(std::mem::align_of::<argon2::Block>()), 0);
        // SAFETY: the map is page-aligned (more than a Block's 64-byte alignment), holds
        // `blocks` Blocks' worth of bytes, is zero-filled by the kernel, and an all-zero Block
        // (128 u64 words) is a valid one; the slice borrows `self`, which owns the map.
        unsafe { std::slice::from_raw_parts_mut(p.cast::<argon2::Block>(), self.blocks) }
    }
}

impl KeyFile {
    pub fn wrap(
        keys: &MasterKeys,
        passphrase: &[u8],
        store_id: &[u8],
        kdf: KdfParams,
    ) -> Result<KeyFile> {
        let mut salt = [0u8; 16];
        fill_random(&mut salt);
        let kek = derive(passphrase, &salt, kdf)?;
        let plain = postcard::to_allocvec(keys).expect("serialising keys cannot fail");
        let c = Crypto::new(
            MasterKeys {
                encrypt: kek,
                id: [0; 32],
                chunker_seed: 0,
            },
            true,
        );
        Ok(KeyFile {
            created_ns: super::now_ns(),
            host: super::hostname(),
            user: super::username(),
            kdf,
            salt,
            wrapped: c.seal(store_id, &plain),
        })
    }

    /// The master keys, or `None` if the passphrase is wrong.
    pub fn unwrap(&self, passphrase: &[u8], store_id: &[u8]) -> Result<Option<MasterKeys>> {
        let kek = derive(passphrase, &self.salt, self.kdf)?;
        let c = Crypto::new(
            MasterKeys {
                encrypt: kek,
                id: [0; 32],
                chunker_seed: 0,
            },
            true,
        );
        Ok(c.open(store_id, &self.wrapped)
            .and_then(|p| postcard::from_bytes(&p).ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nonces drawn a batch at a time are never handed out twice: across many batches, on
    /// several threads, and as the nonces of sealed blobs.
    #[test]
    fn nonces_are_never_repeated() {
        let per_thread = NONCES_AT_ONCE * 20 + 3;
        let all: Vec<[u8; NONCE_LEN]> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(move || (0..per_thread).map(|_| fresh_nonce()).collect::<Vec<_>>())
                })
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect()
        });
        let distinct: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), all.len());
        assert!(!distinct.contains(&[0u8; NONCE_LEN]));
        let c = Crypto::new(MasterKeys::random(), true);
        let sealed: std::collections::HashSet<Vec<u8>> = (0..NONCES_AT_ONCE * 3)
            .map(|_| c.seal(b"aad", b"same payload")[..NONCE_LEN].to_vec())
            .collect();
        assert_eq!(sealed.len(), NONCES_AT_ONCE * 3);
    }

    #[test]
    fn seal_roundtrip_and_tamper() {
        for enc in [true, false] {
            let c = Crypto::new(MasterKeys::random(), enc);
            let s = c.seal(b"aad", b"hello world");
            let mut in_place = vec![0u8; c.seal_prefix()];
            in_place.extend_from_slice(b"hello world");
            c.seal_in_place(b"aad", &mut in_place);
            assert_eq!(in_place.len(), s.len());
            assert_eq!(c.open(b"aad", &in_place).unwrap(), b"hello world");
            assert_eq!(
                c.open_in_place(b"aad", &mut in_place.clone()).unwrap(),
                b"hello world"
            );
            let mut bad = in_place.clone();
            *bad.last_mut().unwrap() ^= 1;
            assert!(c.open_in_place(b"aad", &mut bad).is_none());
            assert!(c.open_in_place(b"other", &mut in_place.clone()).is_none());
            assert_eq!(c.open(b"aad", &s).unwrap(), b"hello world");
            assert!(c.open(b"other", &s).is_none());
            for i in 0..s.len() {
                let mut t = s.clone();
                t[i] ^= 0x40;
                assert!(c.open(b"aad", &t).is_none(), "flip at {i} enc={enc}");
            }
            assert!(c.open(b"aad", &s[..3]).is_none());
        }
    }

    #[test]
    fn keyfile_wrap_unwrap() {
        let k = MasterKeys::random();
        let kdf = KdfParams {
            m_kib: 256,
            t: 1,
            p: 1,
        };
        let kf = KeyFile::wrap(&k, b"secret", b"store", kdf).unwrap();
        let got = kf.unwrap(b"secret", b"store").unwrap().unwrap();
        assert_eq!(got.id, k.id);
        assert!(kf.unwrap(b"wrong", b"store").unwrap().is_none());
        assert!(kf.unwrap(b"secret", b"other").unwrap().is_none());
    }

    #[test]
    fn ids_are_keyed() {
        let a = Crypto::new(MasterKeys::random(), true);
        let b = Crypto::new(MasterKeys::random(), true);
        assert_ne!(a.blob_id(b"x"), b.blob_id(b"x"));
        assert_eq!(a.blob_id(b"x"), a.blob_id(b"x"));
    }
}
