//! Index-addressed storage with a free list: the prompt trie's nodes and the approximate LRU's
//! block copies live in plain vectors and reuse the slots of what they freed.

/// Puts `item` in a freed slot if there is one, else at the end; returns its index.
pub fn put<T>(items: &mut Vec<T>, free: &mut Vec<u32>, item: T) -> u32 {
    match free.pop() {
        Some(i) => {
            items[i as usize] = item;
            i
        }
        None => {
            items.push(item);
            (items.len() - 1) as u32
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn freed_slots_are_reused_before_the_vector_grows() {
        let (mut items, mut free) = (Vec::new(), Vec::new());
        assert_eq!((super::put(&mut items, &mut free, 'a'), super::put(&mut items, &mut free, 'b')), (0, 1));
        free.push(0);
        assert_eq!(super::put(&mut items, &mut free, 'c'), 0);
        assert_eq!(items, ['c', 'b']);
        assert_eq!(super::put(&mut items, &mut free, 'd'), 2);
    }
}
