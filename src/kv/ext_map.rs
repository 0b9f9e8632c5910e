//! Engine hash → slab slot, the index's largest per-residency cost: an open-addressing table
//! with 12-byte entries that grows by half at 85 % load (a general-purpose map pads the entry
//! to 16 bytes and grows by doubling, so it runs between 44 % and 87 % full).
//!
//! Linear probing over an arbitrary capacity (the hash is mapped onto it by multiplication),
//! deletion by backward shift, so there are no tombstones.

/// Marks an empty entry; never a slot (slots stay below `u32::MAX`).
const EMPTY: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Entry {
    key: [u32; 2],
    value: u32,
}

/// Fuller tables are smaller but their probe runs span more cache lines.
const MAX_LOAD_PERCENT: usize = 85;

const VACANT: Entry = Entry { key: [0, 0], value: EMPTY };

#[derive(Default)]
pub struct ExtMap {
    entries: Vec<Entry>,
    len: usize,
}

fn home(key: u64, cap: usize) -> usize {
    let h = (key ^ (key >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((h as u128 * cap as u128) >> 64) as usize
}

/// Most entries `cap` may hold: `MAX_LOAD_PERCENT` %.
fn over_full(len: usize, cap: usize) -> bool {
    len * 100 > cap * MAX_LOAD_PERCENT
}

fn split(key: u64) -> [u32; 2] {
    [key as u32, (key >> 32) as u32]
}

impl ExtMap {
    pub fn len(&self) -> usize {
        self.len
    }

    /// Bytes allocated for the entries.
    pub fn heap_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Entry>()
    }

    fn find(&self, key: u64) -> Option<usize> {
        let cap = self.entries.len();
        if cap == 0 {
            return None;
        }
        let k = split(key);
        let mut i = home(key, cap);
        loop {
            let e = &self.entries[i];
            if e.value == EMPTY {
                return None;
            }
            if e.key == k {
                return Some(i);
            }
            i = if i + 1 == cap { 0 } else { i + 1 };
        }
    }

    pub fn get(&self, key: u64) -> Option<u32> {
        self.find(key).map(|i| self.entries[i].value)
    }

    /// Inserts or replaces; returns the previous value. One probe run finds the key or the
    /// empty entry it goes into.
    pub fn insert(&mut self, key: u64, value: u32) -> Option<u32> {
        debug_assert_ne!(value, EMPTY);
        if over_full(self.len + 1, self.entries.len()) {
            self.grow();
        }
        let cap = self.entries.len();
        let k = split(key);
        let mut i = home(key, cap);
        loop {
            let e = &mut self.entries[i];
            if e.value == EMPTY {
                *e = Entry { key: k, value };
                self.len += 1;
                return None;
            }
            if e.key == k {
                return Some(std::mem::replace(&mut e.value, value));
            }
            i = if i + 1 == cap { 0 } else { i + 1 };
        }
    }

    /// Makes room for `additional` more keys now, so that nothing moves while they go in
    /// (and entries fetched ahead stay where they were fetched).
    pub fn reserve(&mut self, additional: usize) {
        let need = self.len + additional;
        if over_full(need, self.entries.len()) {
            let mut cap = (self.entries.len() * 3 / 2).max(16);
            while over_full(need, cap) {
                cap = cap * 3 / 2;
            }
            self.resize(cap);
        }
    }

    /// Starts loading the entry where a probe for `key` begins: the tables are far larger
    /// than the caches, so a chain of stores or removals that asks a few keys ahead overlaps
    /// their cache misses instead of waiting for each in turn.
    pub fn prefetch(&self, key: u64) {
        let cap = self.entries.len();
        if cap != 0 {
            let i = home(key, cap);
            prefetch(&self.entries[i]);
            prefetch(&self.entries[(i + 5).min(cap - 1)]);
        }
    }

    pub fn remove(&mut self, key: u64) -> Option<u32> {
        let mut i = self.find(key)?;
        let value = self.entries[i].value;
        let cap = self.entries.len();
        // Backward shift: pull later entries of the probe run into the hole when their home
        // does not lie cyclically after the hole.
        let mut j = i;
        loop {
            j = if j + 1 == cap { 0 } else { j + 1 };
            let e = self.entries[j];
            if e.value == EMPTY {
                break;
            }
            let h = home(e.key[0] as u64 | (e.key[1] as u64) << 32, cap);
            let movable = if i <= j { h <= i || h > j } else { h <= i && h > j };
            if movable {
                self.entries[i] = e;
                i = j;
            }
        }
        self.entries[i] = VACANT;
        self.len -= 1;
        Some(value)
    }

    fn grow(&mut self) {
        self.resize((self.entries.len() * 3 / 2).max(16));
    }

    fn resize(&mut self, cap: usize) {
        let old = std::mem::replace(&mut self.entries, vec![VACANT; cap]);
        // Keys are distinct: each goes into the first empty entry from its home.
        for e in old.into_iter().filter(|e| e.value != EMPTY) {
            let mut i = home(e.key[0] as u64 | (e.key[1] as u64) << 32, cap);
            while self.entries[i].value != EMPTY {
                i = if i + 1 == cap { 0 } else { i + 1 };
            }
            self.entries[i] = e;
        }
    }

    /// Every value (in table order).
    pub fn values(&self) -> impl Iterator<Item = u32> + '_ {
        self.entries.iter().filter(|e| e.value != EMPTY).map(|e| e.value)
    }
}

/// A cache hint, no effect on results.
#[inline(always)]
fn prefetch<T>(x: &T) {
    // SAFETY: a prefetch never faults and changes no memory; SSE is part of x86_64.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>((x as *const T).cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn entries_are_12_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 12);
    }

    proptest! {
        // Behaves exactly like a HashMap under any mix of inserts and removals, with keys
        // drawn from a small range so probe runs collide and wrap.
        #[test]
        fn matches_a_hashmap(ops in proptest::collection::vec((any::<bool>(), 0u64..64, 0u32..1000), 1..400)) {
            let mut m = ExtMap::default();
            let mut r = HashMap::new();
            for (ins, k, v) in ops {
                let key = k.wrapping_mul(0x1000_0000_0000_0001) ^ (k << 7);
                if ins {
                    prop_assert_eq!(m.insert(key, v), r.insert(key, v));
                } else {
                    prop_assert_eq!(m.remove(key), r.remove(&key));
                }
                prop_assert_eq!(m.len(), r.len());
                for (&k2, &v2) in &r {
                    prop_assert_eq!(m.get(k2), Some(v2));
                }
                let mut a: Vec<u32> = m.values().collect();
                let mut b: Vec<u32> = r.values().copied().collect();
                a.sort_unstable();
                b.sort_unstable();
                prop_assert_eq!(a, b);
            }
        }
    }
}
