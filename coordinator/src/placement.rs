//! Which dataloaders serve which shards: each shard on two dataloaders when there are two or
//! more (one copy survives a lost dataloader), balanced by tokens. A pure function of the
//! shards' sizes and the dataloaders present, so a restarted coordinator places as before;
//! when dataloaders leave, only the shards they held move (a survivor fetches what it gains,
//! nothing else is fetched again).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use serde::{Deserialize, Serialize};

/// Copies of each shard when enough dataloaders are present.
pub const REPLICAS: usize = 2;

/// Shard `i`'s holders, as indices into the dataloaders the placement was made for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    holders: Vec<Vec<u32>>,
    /// Which dataloader indices hold copies: a departed one holds none until it returns.
    present: Vec<bool>,
    /// Counts changes (1 for a new placement): a dataloader that holds this version has
    /// nothing new to fetch.
    version: u64,
}

impl Placement {
    /// Places `shard_tokens.len()` shards on `loaders` dataloaders: the largest shard first,
    /// each copy on the least-loaded dataloader that does not hold the shard yet (ties to the
    /// lower index), which keeps every two dataloaders' token loads within one shard of each
    /// other.
    pub fn new(shard_tokens: &[u64], loaders: usize) -> Self {
        let mut placement = Placement {
            holders: vec![Vec::new(); shard_tokens.len()],
            present: vec![true; loaders],
            version: 1,
        };
        placement.fill(shard_tokens);
        placement
    }

    /// The placement after the dataloaders `departed` left for good: every copy a survivor
    /// held stays; each copy a departed one held goes to the least-loaded survivor that lacks
    /// the shard. Indices keep their meaning (a departed index holds nothing).
    pub fn without(&self, shard_tokens: &[u64], departed: &[u32]) -> Self {
        let mut next = self.clone();
        for holders in &mut next.holders {
            holders.retain(|h| !departed.contains(h));
        }
        for &d in departed {
            if let Some(p) = next.present.get_mut(d as usize) {
                *p = false;
            }
        }
        next.fill(shard_tokens);
        next.version += 1;
        next
    }

    /// The placement after dataloader `joined` (a departed index, back) returns: it takes
    /// the copies shards lack, then copies move to it from the most-loaded holders while
    /// each move narrows the gap, so it ends about as loaded as the others. Every other copy
    /// stays where it is.
    pub fn with(&self, shard_tokens: &[u64], joined: u32) -> Self {
        let mut next = self.clone();
        let Some(p) = next.present.get_mut(joined as usize) else {
            return next;
        };
        *p = true;
        next.version += 1;
        next.fill(shard_tokens);
        let mut loads = next.loads(shard_tokens);
        let present = next.present.iter().filter(|&&p| p).count().max(1) as u64;
        let fair = loads.iter().sum::<u64>() / present;
        let mut order: Vec<usize> = (0..shard_tokens.len()).collect();
        order.sort_by_key(|&s| (Reverse(shard_tokens[s]), s));
        for s in order {
            let tokens = shard_tokens[s];
            if loads[joined as usize] + tokens > fair || next.holders[s].contains(&joined) {
                continue;
            }
            let giver = next.holders[s]
                .iter()
                .copied()
                .max_by_key(|&h| (loads[h as usize], Reverse(h)));
            let Some(giver) = giver else { continue };
            if loads[giver as usize] < loads[joined as usize] + 2 * tokens {
                continue; // Moving it would not narrow the gap.
            }
            for h in next.holders[s].iter_mut().filter(|h| **h == giver) {
                *h = joined;
            }
            loads[giver as usize] -= tokens;
            loads[joined as usize] += tokens;
        }
        next
    }

    /// Whether dataloader `loader` holds copies (it has not departed).
    pub fn is_present(&self, loader: u32) -> bool {
        self.present.get(loader as usize).copied().unwrap_or(false)
    }

    /// Shards placed.
    pub fn shards(&self) -> usize {
        self.holders.len()
    }

    /// Which change of the placement this is (1 for a new one).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The dataloaders holding shard `shard`.
    pub fn holders(&self, shard: usize) -> &[u32] {
        &self.holders[shard]
    }

    /// The shards dataloader `loader` serves, in shard order.
    pub fn shards_of(&self, loader: u32) -> Vec<usize> {
        (0..self.holders.len())
            .filter(|&s| self.holders[s].contains(&loader))
            .collect()
    }

    /// Tokens each dataloader serves.
    pub fn loads(&self, shard_tokens: &[u64]) -> Vec<u64> {
        let mut loads = vec![0; self.present.len()];
        for (holders, &tokens) in self.holders.iter().zip(shard_tokens) {
            for &h in holders {
                loads[h as usize] += tokens;
            }
        }
        loads
    }

    /// Gives every shard its copies on the present dataloaders, largest shard first.
    fn fill(&mut self, shard_tokens: &[u64]) {
        let present: Vec<u32> = (0..self.present.len() as u32)
            .filter(|&l| self.present[l as usize])
            .collect();
        let want = REPLICAS.min(present.len());
        let loads = self.loads(shard_tokens);
        // Least-loaded first; ties to the lower index, so the result is one function of
        // the inputs.
        let mut heap: BinaryHeap<Reverse<(u64, u32)>> = present
            .iter()
            .map(|&l| Reverse((loads[l as usize], l)))
            .collect();
        let mut order: Vec<usize> = (0..shard_tokens.len()).collect();
        order.sort_by_key(|&s| (Reverse(shard_tokens[s]), s));
        let mut skipped = Vec::with_capacity(REPLICAS);
        for s in order {
            while self.holders[s].len() < want {
                let Some(Reverse((load, l))) = heap.pop() else {
                    break;
                };
                if self.holders[s].contains(&l) {
                    skipped.push(Reverse((load, l)));
                    continue;
                }
                self.holders[s].push(l);
                heap.push(Reverse((load + shard_tokens[s], l)));
            }
            heap.extend(skipped.drain(..));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shard sizes that vary as a real corpus's do (a few large, a tail of small ones).
    fn corpus(n: usize) -> Vec<u64> {
        (0..n as u64).map(|i| 1_000 + (i * 7_919) % 5_000).collect()
    }

    fn spread(loads: &[u64], present: impl Fn(usize) -> bool) -> u64 {
        let live: Vec<u64> = (0..loads.len())
            .filter(|&l| present(l))
            .map(|l| loads[l])
            .collect();
        live.iter().max().unwrap() - live.iter().min().unwrap()
    }

    #[test]
    fn every_shard_is_on_two_distinct_dataloaders_balanced_by_tokens() {
        let tokens = corpus(500);
        let largest = *tokens.iter().max().unwrap();
        for loaders in [2, 3, 7, 40] {
            let p = Placement::new(&tokens, loaders);
            for s in 0..tokens.len() {
                let h = p.holders(s);
                assert_eq!(h.len(), 2, "shard {s} on {h:?}");
                assert_ne!(h[0], h[1]);
            }
            let loads = p.loads(&tokens);
            assert_eq!(loads.iter().sum::<u64>(), 2 * tokens.iter().sum::<u64>());
            assert!(spread(&loads, |_| true) <= largest, "{loaders}: {loads:?}");
        }
    }

    #[test]
    fn one_dataloader_holds_everything_once() {
        let tokens = corpus(10);
        let p = Placement::new(&tokens, 1);
        assert!((0..10).all(|s| p.holders(s) == [0]));
        assert_eq!(p.shards_of(0), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn the_same_inputs_place_the_same_way() {
        let tokens = corpus(300);
        assert_eq!(Placement::new(&tokens, 9), Placement::new(&tokens, 9));
    }

    #[test]
    fn when_dataloaders_leave_only_their_copies_move_and_the_rest_stays_balanced() {
        let tokens = corpus(600);
        let largest = *tokens.iter().max().unwrap();
        let before = Placement::new(&tokens, 10);
        let departed = [3, 7];
        let after = before.without(&tokens, &departed);
        for s in 0..tokens.len() {
            let (was, now) = (before.holders(s), after.holders(s));
            assert_eq!(now.len(), 2, "shard {s} keeps two copies: {now:?}");
            assert!(now.iter().all(|h| !departed.contains(h)));
            // A survivor's copy never moves.
            for h in was.iter().filter(|h| !departed.contains(h)) {
                assert!(now.contains(h), "shard {s}: {was:?} -> {now:?}");
            }
        }
        let loads = after.loads(&tokens);
        assert!(departed.iter().all(|&d| loads[d as usize] == 0));
        let present = |l: usize| !departed.contains(&(l as u32));
        assert!(spread(&loads, present) <= 2 * largest, "{loads:?}");
    }

    #[test]
    fn departures_one_after_another_never_place_on_a_departed_dataloader() {
        let tokens = corpus(200);
        let p = Placement::new(&tokens, 5)
            .without(&tokens, &[1])
            .without(&tokens, &[3]);
        for s in 0..tokens.len() {
            assert_eq!(p.holders(s).len(), 2);
            assert!(p.holders(s).iter().all(|h| ![1, 3].contains(h)), "{s}");
        }
        assert!(!p.is_present(1) && !p.is_present(3) && p.is_present(0));
    }

    #[test]
    fn a_returning_dataloader_takes_a_fair_share_and_the_rest_stays() {
        let tokens = corpus(400);
        let largest = *tokens.iter().max().unwrap();
        let gone = Placement::new(&tokens, 4).without(&tokens, &[2]);
        let back = gone.with(&tokens, 2);
        let loads = back.loads(&tokens);
        assert!(spread(&loads, |_| true) <= 2 * largest, "{loads:?}");
        for s in 0..tokens.len() {
            let (was, now) = (gone.holders(s), back.holders(s));
            assert_eq!(now.len(), 2);
            assert_ne!(now[0], now[1]);
            // A copy either stays or moves to the returning dataloader.
            for h in now.iter().filter(|&&h| h != 2) {
                assert!(was.contains(h), "shard {s}: {was:?} -> {now:?}");
            }
        }
        // From one dataloader to two: the second copies go to the one that came back.
        let single = Placement::new(&tokens, 2)
            .without(&tokens, &[1])
            .with(&tokens, 1);
        assert!((0..tokens.len()).all(|s| single.holders(s).len() == 2));
    }

    #[test]
    fn down_to_one_dataloader_every_shard_is_still_served() {
        let tokens = corpus(20);
        let p = Placement::new(&tokens, 2).without(&tokens, &[0]);
        assert!((0..20).all(|s| p.holders(s) == [1]));
    }
}
