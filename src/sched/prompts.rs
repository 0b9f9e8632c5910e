//! The prompts of active requests as one compressed trie of block-key chains (one key per full
//! prompt block, from the first: local or sequence hashes — a path names the prefix either
//! way), shared by every (worker, rank).
//!
//! A decision asks, for every rank, how much of the new prompt's chain the rank's active
//! requests already hold (those blocks add no decode load), and a booking adds a whole chain.
//! Per-rank hash sets made that one probe per block per rank; here a chain is a path of a few
//! edges (contiguous runs of keys), so booking copies only the part no request shares, a
//! free walks parent links, and one walk along the prompt answers for all ranks at once.
//!
//! Each node counts, per rank, the requests whose chain passes through it; a rank holds a
//! block if its count on the block's node is non-zero. Every booking ends on a node boundary
//! (the node is split if needed), so a request is identified by its last node, whose id never
//! changes: a split gives the new id to the upper part.

use rustc_hash::FxHashMap;

use crate::workers::WorkerRank;

/// A node id; the roots' parent is `NONE`.
pub type NodeId = u32;
const NONE: NodeId = u32::MAX;

#[derive(Default)]
struct Node {
    parent: NodeId,
    /// Block keys of this stretch of the chain.
    edge: Vec<u64>,
    /// Next node by the first hash of its edge.
    children: FxHashMap<u64, NodeId>,
    /// Requests through this node, per rank (no zero counts).
    holders: Vec<(WorkerRank, u32)>,
    /// Requests whose chain ends here (a node with none and one child is merged into it).
    ends: u32,
}

#[derive(Default)]
pub struct PromptTrie {
    nodes: Vec<Node>,
    free: Vec<NodeId>,
    roots: FxHashMap<u64, NodeId>,
}

impl PromptTrie {
    /// Books `chain` (non-empty) for `rank`; returns the node it ends on and how many of its
    /// blocks the rank did not hold before.
    pub fn insert(&mut self, rank: WorkerRank, chain: &[u64]) -> (NodeId, u64) {
        debug_assert!(!chain.is_empty());
        let (mut parent, mut pos, mut added) = (NONE, 0, 0);
        while pos < chain.len() {
            let node = match self.child(parent, chain[pos]) {
                None => self.attach(parent, chain[pos..].to_vec()),
                Some(n) => {
                    let edge = &self.nodes[n as usize].edge;
                    let m = edge.iter().zip(&chain[pos..]).take_while(|(a, b)| a == b).count();
                    if m < edge.len() {
                        self.split(n, m)
                    } else {
                        n
                    }
                }
            };
            let n = &mut self.nodes[node as usize];
            pos += n.edge.len();
            match n.holders.iter_mut().find(|(r, _)| *r == rank) {
                Some((_, c)) => *c += 1,
                None => {
                    n.holders.push((rank, 1));
                    added += n.edge.len() as u64;
                }
            }
            parent = node;
        }
        self.nodes[parent as usize].ends += 1;
        (parent, added)
    }

    /// Releases a booking of `rank` that ended on `end`; returns how many blocks the rank no
    /// longer holds.
    pub fn remove(&mut self, rank: WorkerRank, end: NodeId) -> u64 {
        self.nodes[end as usize].ends -= 1;
        let (mut node, mut released) = (end, 0);
        while node != NONE {
            let n = &mut self.nodes[node as usize];
            let parent = n.parent;
            if let Some(i) = n.holders.iter().position(|(r, _)| *r == rank) {
                n.holders[i].1 -= 1;
                if n.holders[i].1 == 0 {
                    n.holders.swap_remove(i);
                    released += n.edge.len() as u64;
                }
            }
            if n.holders.is_empty() {
                // Every request through a child passes through here: the children are gone.
                debug_assert!(n.children.is_empty() && n.ends == 0);
                let first = n.edge[0];
                self.detach(parent, first);
                self.release(node);
            } else if n.ends == 0 && n.children.len() == 1 {
                self.merge_into_child(node);
            }
            node = parent;
        }
        released
    }

    /// Per rank, how many leading blocks of `chain` its active requests hold (ranks holding
    /// none are absent).
    pub fn held_prefixes(&self, chain: &[u64]) -> FxHashMap<WorkerRank, u64> {
        let mut held = FxHashMap::default();
        let (mut parent, mut pos) = (NONE, 0);
        if let Some(first) = chain.first().and_then(|&h| self.child(NONE, h)) {
            // The first node's holders are every rank that will be in the answer.
            held.reserve(self.nodes[first as usize].holders.len());
        }
        while pos < chain.len() {
            let Some(node) = self.child(parent, chain[pos]) else { break };
            let n = &self.nodes[node as usize];
            let m = n.edge.iter().zip(&chain[pos..]).take_while(|(a, b)| a == b).count();
            pos += m;
            // A deeper node's holders are a subset of its parent's: the last write is the depth.
            for (r, _) in &n.holders {
                held.insert(*r, pos as u64);
            }
            if m < n.edge.len() {
                break;
            }
            parent = node;
        }
        held
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    fn child(&self, parent: NodeId, first: u64) -> Option<NodeId> {
        let children = if parent == NONE { &self.roots } else { &self.nodes[parent as usize].children };
        children.get(&first).copied()
    }

    fn children_mut(&mut self, parent: NodeId) -> &mut FxHashMap<u64, NodeId> {
        if parent == NONE {
            &mut self.roots
        } else {
            &mut self.nodes[parent as usize].children
        }
    }

    fn attach(&mut self, parent: NodeId, edge: Vec<u64>) -> NodeId {
        let first = edge[0];
        let node = Node { parent, edge, ..Default::default() };
        let id = crate::slab::put(&mut self.nodes, &mut self.free, node);
        self.children_mut(parent).insert(first, id);
        id
    }

    fn detach(&mut self, parent: NodeId, first: u64) {
        self.children_mut(parent).remove(&first);
    }

    fn release(&mut self, id: NodeId) {
        self.nodes[id as usize] = Node::default();
        self.free.push(id);
    }

    /// Cuts `n`'s edge after `at` hashes: a new upper node takes the first part and `n` keeps
    /// the rest (and its id, which bookings ending on it refer to). Returns the upper node.
    fn split(&mut self, n: NodeId, at: usize) -> NodeId {
        let (parent, upper_edge, holders) = {
            let node = &mut self.nodes[n as usize];
            let rest = node.edge.split_off(at);
            (node.parent, std::mem::replace(&mut node.edge, rest), node.holders.clone())
        };
        let upper = self.attach(parent, upper_edge);
        let lower = &mut self.nodes[n as usize];
        lower.parent = upper;
        let first = lower.edge[0];
        let u = &mut self.nodes[upper as usize];
        u.holders = holders;
        u.children.insert(first, n);
        upper
    }

    /// Folds `n` (no request ends on it, one child) into its child, which then holds exactly
    /// the same requests.
    fn merge_into_child(&mut self, n: NodeId) {
        let (parent, mut edge, child) = {
            let node = &mut self.nodes[n as usize];
            let child = node.children.values().next().copied().expect("one child");
            (node.parent, std::mem::take(&mut node.edge), child)
        };
        let first = edge[0];
        let c = &mut self.nodes[child as usize];
        edge.append(&mut c.edge);
        c.edge = edge;
        c.parent = parent;
        self.children_mut(parent).insert(first, child);
        self.release(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashMap, HashSet};


    #[test]
    fn shared_prefixes_are_held_once_and_released_by_the_last_holder() {
        let mut t = PromptTrie::default();
        let (a, added) = t.insert(WorkerRank::rank0(1), &[1, 2, 3, 4]);
        assert_eq!(added, 4);
        let (b, added) = t.insert(WorkerRank::rank0(1), &[1, 2, 5]);
        assert_eq!(added, 1, "blocks 1 and 2 are held already");
        let (c, added) = t.insert(WorkerRank::rank0(2), &[1, 2]);
        assert_eq!(added, 2);
        let held = t.held_prefixes(&[1, 2, 3, 9]);
        assert_eq!(held.get(&WorkerRank::rank0(1)), Some(&3));
        assert_eq!(held.get(&WorkerRank::rank0(2)), Some(&2));
        assert_eq!(t.remove(WorkerRank::rank0(1), a), 2, "3 and 4 were held by request a only");
        assert_eq!(t.held_prefixes(&[1, 2, 3]).get(&WorkerRank::rank0(1)), Some(&2));
        assert_eq!(t.remove(WorkerRank::rank0(2), c), 2);
        assert_eq!(t.remove(WorkerRank::rank0(1), b), 3);
        assert!(t.is_empty());
        assert!(t.held_prefixes(&[1, 2]).is_empty());
    }

    /// A naive model: per rank, the multiset of booked chains.
    fn model_held(books: &BTreeMap<usize, (u64, Vec<u64>)>, chain: &[u64]) -> HashMap<WorkerRank, u64> {
        let mut held = HashMap::new();
        for (rank, c) in books.values() {
            let n = c.iter().zip(chain).take_while(|(a, b)| a == b).count() as u64;
            if n > 0 {
                let e = held.entry(WorkerRank::rank0(*rank)).or_insert(0);
                *e = (*e).max(n);
            }
        }
        held
    }

    fn model_distinct(books: &BTreeMap<usize, (u64, Vec<u64>)>, rank: u64) -> u64 {
        let prefixes: HashSet<&[u64]> =
            books.values().filter(|(r, _)| *r == rank).flat_map(|(_, c)| (1..=c.len()).map(move |i| &c[..i])).collect();
        prefixes.len() as u64
    }

    proptest! {
        // Any interleaving of bookings (chains over a small alphabet so they share and split)
        // and frees agrees with the naive model on held prefixes and distinct blocks, and ends
        // empty.
        #[test]
        fn agrees_with_a_naive_model(ops in proptest::collection::vec((0..3u64, proptest::collection::vec(0..2u64, 1..6), any::<bool>(), 0..8usize), 1..60)) {
            let mut t = PromptTrie::default();
            let mut books: BTreeMap<usize, (u64, Vec<u64>)> = BTreeMap::new();
            let mut ends: HashMap<usize, NodeId> = HashMap::new();
            let mut distinct: HashMap<u64, u64> = HashMap::new();
            for (i, (rank, tail, add, victim)) in ops.into_iter().enumerate() {
                // Keys repeat within and across chains (local hashes do): only the path counts.
                let chain = tail;
                if add {
                    let (end, added) = t.insert(WorkerRank::rank0(rank), &chain);
                    *distinct.entry(rank).or_default() += added;
                    books.insert(i, (rank, chain.clone()));
                    ends.insert(i, end);
                } else if let Some(&k) = books.keys().nth(victim % books.len().max(1)) {
                    let (r, _) = books.remove(&k).unwrap();
                    *distinct.get_mut(&r).unwrap() -= t.remove(WorkerRank::rank0(r), ends.remove(&k).unwrap());
                }
                for r in 0..3 {
                    prop_assert_eq!(distinct.get(&r).copied().unwrap_or(0), model_distinct(&books, r));
                }
                let held: HashMap<WorkerRank, u64> = t.held_prefixes(&chain).into_iter().collect();
                prop_assert_eq!(held, model_held(&books, &chain));
            }
            for (k, (r, _)) in std::mem::take(&mut books) {
                t.remove(WorkerRank::rank0(r), ends[&k]);
            }
            prop_assert!(t.is_empty());
            prop_assert_eq!(t.nodes.len(), t.free.len(), "every node is back on the free list");
        }
    }
}
