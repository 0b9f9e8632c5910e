//! Dynamo's block hashes (contracts §6): the local hash of one full block of tokens
//! (`tokens_hash`), its LoRA / cache-salt seed, the multimodal variant, and the chained
//! sequence hash that names a whole prefix.
//!
//! Only full blocks are hashed: a prompt of `n` tokens has `n / block_size` blocks.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64_with_seed, Xxh3};

/// Seed of every hash here when no LoRA adapter or cache salt is involved.
pub const XXH3_SEED: u64 = 1337;

/// Hash of one block's tokens (Dynamo's `LocalBlockHash`, the `tokens_hash` of a stored block).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
#[repr(transparent)]
pub struct LocalBlockHash(pub u64);

impl LocalBlockHash {
    /// The hashes as plain integers, without a copy (the active-block keys of a prompt).
    pub fn as_u64s(hashes: &[LocalBlockHash]) -> &[u64] {
        // SAFETY: `LocalBlockHash` is `repr(transparent)` over `u64`: same size, alignment and
        // validity, so the slice may be viewed as `[u64]` for its lifetime.
        unsafe { std::slice::from_raw_parts(hashes.as_ptr().cast::<u64>(), hashes.len()) }
    }
}

/// Hash of a whole prefix up to and including one block (Dynamo's sequence hash).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqHash(pub u64);

/// The seed for a request's block hashes (`compute_salt_hash`): LoRA adapters and tenants never
/// share cache entries. An empty name or salt counts as absent.
pub fn hash_seed(lora_name: Option<&str>, cache_salt: Option<&str>) -> u64 {
    let mut seed = XXH3_SEED;
    if let Some(l) = lora_name.filter(|l| !l.is_empty()) {
        seed = seed.wrapping_add(xxh3_64_with_seed(l.as_bytes(), 0));
    }
    if let Some(s) = cache_salt.filter(|s| !s.is_empty()) {
        seed = seed.wrapping_add(xxh3_64_with_seed(s.as_bytes(), 1));
    }
    seed
}

/// Local hash of one block of tokens.
pub fn block_hash(tokens: &[u32], seed: u64) -> LocalBlockHash {
    let mut scratch = Vec::new();
    LocalBlockHash(xxh3_64_with_seed(le_bytes(tokens, &mut scratch), seed))
}

/// Local hash of one block that holds (parts of) multimodal objects: the tokens as u32 LE,
/// then each object's hash as u64 LE in ascending order.
pub fn block_hash_mm(tokens: &[u32], mm_hashes: &[u64], seed: u64) -> LocalBlockHash {
    let mut scratch = Vec::new();
    let mut h = Xxh3::with_seed(seed);
    h.update(le_bytes(tokens, &mut scratch));
    let mut mm = mm_hashes.to_vec();
    mm.sort_unstable();
    for m in mm {
        h.update(&m.to_le_bytes());
    }
    LocalBlockHash(h.digest())
}

/// Appends the local hash of every full block of `tokens` to `out`, in one pass over the
/// prompt and without allocating per block (a 128k-token prompt is 8k blocks at size 16).
pub fn local_block_hashes_into(tokens: &[u32], block_size: usize, seed: u64, out: &mut Vec<LocalBlockHash>) {
    assert!(block_size > 0, "block size must be at least 1");
    let full = tokens.len() / block_size * block_size;
    let mut scratch = Vec::new();
    let bytes = le_bytes(&tokens[..full], &mut scratch);
    out.reserve(full / block_size);
    out.extend(bytes.chunks_exact(block_size * 4).map(|b| LocalBlockHash(xxh3_64_with_seed(b, seed))));
}

/// The local hashes of every full block of `tokens`.
pub fn local_block_hashes(tokens: &[u32], block_size: usize, seed: u64) -> Vec<LocalBlockHash> {
    let mut out = Vec::new();
    local_block_hashes_into(tokens, block_size, seed, &mut out);
    out
}

/// The next link of the chain: `xxh3(LE64(prev) ‖ LE64(local), 1337)`.
pub fn next_seq_hash(prev: SeqHash, local: LocalBlockHash) -> SeqHash {
    let mut buf = [0u8; 16];
    buf[..8].copy_from_slice(&prev.0.to_le_bytes());
    buf[8..].copy_from_slice(&local.0.to_le_bytes());
    SeqHash(xxh3_64_with_seed(&buf, XXH3_SEED))
}

/// Sequence hashes of a chain of local hashes: the first is the first local hash itself.
pub fn seq_hashes(local: &[LocalBlockHash]) -> Vec<SeqHash> {
    let mut out = Vec::with_capacity(local.len());
    let mut prev = None;
    for &l in local {
        let s = match prev {
            None => SeqHash(l.0),
            Some(p) => next_seq_hash(p, l),
        };
        out.push(s);
        prev = Some(s);
    }
    out
}

/// The tokens as u32 little-endian bytes: a view on little-endian machines, else a copy into
/// `scratch` (one allocation per call either way at most).
fn le_bytes<'a>(tokens: &'a [u32], scratch: &'a mut Vec<u8>) -> &'a [u8] {
    #[cfg(target_endian = "little")]
    {
        let _ = scratch;
        // SAFETY: u32 has no padding and every byte pattern is a valid u8; the view borrows
        // `tokens` and covers exactly its bytes.
        unsafe { std::slice::from_raw_parts(tokens.as_ptr().cast::<u8>(), std::mem::size_of_val(tokens)) }
    }
    #[cfg(not(target_endian = "little"))]
    {
        scratch.clear();
        scratch.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
        scratch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn range(a: u32, b: u32) -> Vec<u32> {
        (a..b).collect()
    }

    // Every value below is a reference test vector (contracts §6.1).
    #[test]
    fn local_hash_vectors() {
        assert_eq!(block_hash(&range(0, 16), XXH3_SEED), LocalBlockHash(15310707395893867146));
        assert_eq!(block_hash(&range(16, 32), XXH3_SEED), LocalBlockHash(15292316782987903195));
        assert_eq!(
            local_block_hashes(&range(0, 40), 16, XXH3_SEED),
            vec![LocalBlockHash(15310707395893867146), LocalBlockHash(15292316782987903195)],
            "full blocks only: the 8 trailing tokens are not hashed"
        );
    }

    #[test]
    fn sequence_hash_vector() {
        let s = seq_hashes(&local_block_hashes(&range(0, 32), 16, XXH3_SEED));
        assert_eq!(s, vec![SeqHash(15310707395893867146), SeqHash(13769157705258532664)]);
    }

    #[test]
    fn lora_and_salt_seed_vectors() {
        let lora = hash_seed(Some("my-lora"), None);
        assert_eq!(lora, 12827409268353072861);
        assert_eq!(block_hash(&range(0, 16), lora), LocalBlockHash(7774427462321301335));
        let salt = hash_seed(None, Some("tenant-a"));
        assert_eq!(salt, 1948188790972764086);
        assert_eq!(block_hash(&range(0, 16), salt), LocalBlockHash(2130915519417463704));
        // Empty names are absent; both together add up.
        assert_eq!(hash_seed(Some(""), Some("")), XXH3_SEED);
        assert_eq!(hash_seed(Some("my-lora"), Some("tenant-a")), lora.wrapping_add(salt).wrapping_sub(XXH3_SEED));
    }

    #[test]
    fn multimodal_hash_appends_sorted_object_hashes() {
        let toks = range(0, 16);
        let mut bytes: Vec<u8> = toks.iter().flat_map(|t| t.to_le_bytes()).collect();
        bytes.extend(5u64.to_le_bytes());
        bytes.extend(9u64.to_le_bytes());
        let want = LocalBlockHash(xxh3_64_with_seed(&bytes, XXH3_SEED));
        assert_eq!(block_hash_mm(&toks, &[9, 5], XXH3_SEED), want);
        assert_eq!(block_hash_mm(&toks, &[], XXH3_SEED), block_hash(&toks, XXH3_SEED));
    }

    #[test]
    fn a_128k_prompt_hashes_to_8k_blocks() {
        let toks: Vec<u32> = (0..131_072u32).map(|i| i.wrapping_mul(2654435761) % 151_000).collect();
        let hs = local_block_hashes(&toks, 16, XXH3_SEED);
        assert_eq!(hs.len(), 8192);
        assert_eq!(hs[4000], block_hash(&toks[64000..64016], XXH3_SEED));
    }

    proptest! {
        // A prompt's hashes are a prefix of the hashes of any extension of it.
        #[test]
        fn prefix_stability(a in proptest::collection::vec(any::<u32>(), 0..200),
                            b in proptest::collection::vec(any::<u32>(), 0..200),
                            bs in 1usize..20, seed in any::<u64>()) {
            let mut ab = a.clone();
            ab.extend(&b);
            let ha = local_block_hashes(&a, bs, seed);
            let hab = local_block_hashes(&ab, bs, seed);
            prop_assert_eq!(ha.len(), a.len() / bs);
            prop_assert_eq!(&hab[..ha.len()], &ha[..]);
            let (sa, sab) = (seq_hashes(&ha), seq_hashes(&hab));
            prop_assert_eq!(&sab[..sa.len()], &sa[..]);
        }
    }
}
