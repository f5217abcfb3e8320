//! Seeded, order-independent choices of data: which documents are held out.

/// Whether document `index` belongs to the validation split: a pure function of the seed.
pub fn is_val_document(seed: u64, index: u64, val_fraction: f64) -> bool {
    let h = splitmix64(seed ^ splitmix64(index));
    ((h >> 11) as f64 / (1u64 << 53) as f64) < val_fraction
}

/// Splits items into (train, val) by [`is_val_document`] of their position; with a positive
/// fraction and at least two items, at least one is held out so evaluation always has data.
pub fn split_by_hash<T>(
    items: impl IntoIterator<Item = T>,
    val_fraction: f64,
    seed: u64,
) -> (Vec<T>, Vec<T>) {
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (i, item) in items.into_iter().enumerate() {
        if is_val_document(seed, i as u64, val_fraction) {
            val.push(item);
        } else {
            train.push(item);
        }
    }
    if val.is_empty() && val_fraction > 0.0 && train.len() > 1 {
        val.push(train.pop().expect("non-empty"));
    }
    (train, val)
}

/// SplitMix64: the hash behind every seeded choice of data (splits, batch order).
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}
