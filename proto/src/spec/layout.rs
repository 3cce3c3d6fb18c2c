//! How the ranks of a parallel render are arranged: the `cfg × tp × ulysses × ring` layout and
//! its grammar (`cfg=2,ulysses=2`, parsed here and nowhere else), the mapping between a global
//! rank and its coordinates, the communication groups each rank joins, the checks that a layout
//! fits a model, and the helpers that split a token sequence into per-rank shards. Plain
//! arithmetic: the coordinator plans with it, the worker's parallel runtime runs on it.
//!
//! Rank order, from fastest to slowest varying: `tp`, `ulysses`, `ring`, `cfg`:
//!
//! ```text
//! rank = ((cfg · RING + ring) · ULYSSES + ulysses) · TP + tp
//! ```
//!
//! The innermost degree gets consecutive ranks, and consecutive ranks are placed on the same node,
//! so the most talkative group should be innermost. Tensor parallelism all-reduces activations
//! twice per block, Ulysses does two all-to-alls per attention, Ring passes K/V blocks that overlap
//! with compute, and CFG exchanges one noise prediction per step. xDiT orders its process groups
//! the same way for the same reason.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// A parallel layout: how many ways each kind of parallelism splits the work. The world size is
/// the product of the four degrees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    /// Classifier-free guidance: the conditional and unconditional passes on different ranks (1
    /// or 2).
    pub cfg: usize,
    /// Tensor parallelism: attention heads and FFN columns split across ranks.
    pub tp: usize,
    /// Ulysses sequence parallelism: tokens split, exchanged for heads around attention.
    pub ulysses: usize,
    /// Ring attention: tokens split, K/V blocks passed around a ring.
    pub ring: usize,
}

/// A rank's position along each degree of a [`Layout`], each in `0..degree`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Coords {
    pub cfg: usize,
    pub ring: usize,
    pub ulysses: usize,
    pub tp: usize,
}

/// The kinds of communication group a rank belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupKind {
    /// Ranks that differ only in `tp`.
    Tp,
    /// Ranks that differ only in `ulysses`.
    Ulysses,
    /// Ranks that differ only in `ring`.
    Ring,
    /// Ranks that differ in `ulysses` and `ring`: together they hold one sequence (for one `tp`
    /// slice of the heads).
    Sequence,
    /// Ranks that differ only in `cfg`.
    Cfg,
}

impl GroupKind {
    pub const ALL: [GroupKind; 5] = [
        GroupKind::Tp,
        GroupKind::Ulysses,
        GroupKind::Ring,
        GroupKind::Sequence,
        GroupKind::Cfg,
    ];
}

/// The sizes of a model that constrain a layout (the worker's model stack makes one from a
/// transformer's configuration, the coordinator from a worker's `ModelInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayoutLimits {
    /// Attention heads; split by `tp × ulysses`. The model width is `heads · head_dim`, so it is
    /// divisible by `tp` whenever the heads are.
    pub heads: usize,
    /// Hidden width of the feed-forward layers; split by `tp`.
    pub ffn_dim: usize,
    /// Whether the render uses classifier-free guidance; `cfg = 2` needs it.
    pub guidance: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("layout `{text}`: {reason}; expected a form like `cfg=2,tp=1,ulysses=2,ring=1` (missing keys are 1)")]
    Parse { text: String, reason: String },
    #[error("{field} = 0: every degree must be at least 1; try {suggestion}")]
    ZeroDegree {
        field: &'static str,
        suggestion: Layout,
    },
    #[error("cfg = {cfg}: classifier-free guidance runs at most 2 branches (cond, uncond); try {suggestion}")]
    CfgTooLarge { cfg: usize, suggestion: Layout },
    #[error("cfg = 2 needs classifier-free guidance, but this render has none (guidance scale ≤ 1); try {suggestion}")]
    CfgWithoutGuidance { suggestion: Layout },
    #[error("tp × ulysses = {product} does not divide the {heads} attention heads of this model; try {suggestion}")]
    Heads {
        product: usize,
        heads: usize,
        suggestion: Layout,
    },
    #[error("tp = {tp} does not divide ffn_dim = {ffn_dim} of this model; try {suggestion}")]
    FfnDim {
        tp: usize,
        ffn_dim: usize,
        suggestion: Layout,
    },
}

impl Layout {
    /// One process, no parallelism.
    pub const SINGLE: Layout = Layout {
        cfg: 1,
        tp: 1,
        ulysses: 1,
        ring: 1,
    };

    pub fn world_size(&self) -> usize {
        self.cfg * self.tp * self.ulysses * self.ring
    }

    /// The coordinates of a global rank.
    ///
    /// # Panics
    /// If `rank >= world_size()`; ranks are checked when the world is formed.
    pub fn coords(&self, rank: usize) -> Coords {
        assert!(
            rank < self.world_size(),
            "rank {rank} is outside layout {self} (world size {})",
            self.world_size()
        );
        let tp = rank % self.tp;
        let rest = rank / self.tp;
        let ulysses = rest % self.ulysses;
        let rest = rest / self.ulysses;
        let ring = rest % self.ring;
        let cfg = rest / self.ring;
        Coords {
            cfg,
            ring,
            ulysses,
            tp,
        }
    }

    /// The global rank at `coords`.
    ///
    /// # Panics
    /// If a coordinate is not below its degree.
    pub fn rank_of(&self, c: Coords) -> usize {
        assert!(
            c.cfg < self.cfg && c.ring < self.ring && c.ulysses < self.ulysses && c.tp < self.tp,
            "coordinates {c:?} are outside layout {self}"
        );
        ((c.cfg * self.ring + c.ring) * self.ulysses + c.ulysses) * self.tp + c.tp
    }

    /// The sorted global ranks in `rank`'s group of the given kind (`rank` included).
    pub fn group(&self, kind: GroupKind, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        let mut ranks = Vec::new();
        let (cfgs, rings, ulysses, tps) = match kind {
            GroupKind::Tp => (
                c.cfg..c.cfg + 1,
                c.ring..c.ring + 1,
                c.ulysses..c.ulysses + 1,
                0..self.tp,
            ),
            GroupKind::Ulysses => (
                c.cfg..c.cfg + 1,
                c.ring..c.ring + 1,
                0..self.ulysses,
                c.tp..c.tp + 1,
            ),
            GroupKind::Ring => (
                c.cfg..c.cfg + 1,
                0..self.ring,
                c.ulysses..c.ulysses + 1,
                c.tp..c.tp + 1,
            ),
            GroupKind::Sequence => (
                c.cfg..c.cfg + 1,
                0..self.ring,
                0..self.ulysses,
                c.tp..c.tp + 1,
            ),
            GroupKind::Cfg => (
                0..self.cfg,
                c.ring..c.ring + 1,
                c.ulysses..c.ulysses + 1,
                c.tp..c.tp + 1,
            ),
        };
        // Nested in rank order (cfg outermost, tp innermost), so the result comes out sorted.
        for cfg in cfgs {
            for ring in rings.clone() {
                for u in ulysses.clone() {
                    for tp in tps.clone() {
                        ranks.push(self.rank_of(Coords {
                            cfg,
                            ring,
                            ulysses: u,
                            tp,
                        }));
                    }
                }
            }
        }
        ranks
    }

    pub fn tp_group(&self, rank: usize) -> Vec<usize> {
        self.group(GroupKind::Tp, rank)
    }

    pub fn ulysses_group(&self, rank: usize) -> Vec<usize> {
        self.group(GroupKind::Ulysses, rank)
    }

    pub fn ring_group(&self, rank: usize) -> Vec<usize> {
        self.group(GroupKind::Ring, rank)
    }

    /// The ranks that share one sequence: the `ulysses × ring` ranks with `rank`'s `cfg` and `tp`.
    pub fn sequence_group(&self, rank: usize) -> Vec<usize> {
        self.group(GroupKind::Sequence, rank)
    }

    pub fn cfg_group(&self, rank: usize) -> Vec<usize> {
        self.group(GroupKind::Cfg, rank)
    }

    /// Which of the `ulysses · ring` sequence shards `rank` holds: its index in
    /// [`Self::sequence_group`] (`ring · ULYSSES + ulysses`).
    pub fn sequence_index(&self, rank: usize) -> usize {
        let c = self.coords(rank);
        c.ring * self.ulysses + c.ulysses
    }

    /// Every group of a kind, ordered by lowest rank. The groups partition the world; every rank
    /// computes the same list, so sub-communicators can be created in this order everywhere.
    pub fn all_groups_of_kind(&self, kind: GroupKind) -> Vec<Vec<usize>> {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for rank in 0..self.world_size() {
            let group = self.group(kind, rank);
            // A group's first member is its lowest rank, so each group is taken once, in order.
            if group[0] == rank {
                groups.push(group);
            }
        }
        groups
    }

    /// The rules that need no model: every degree at least 1, at most 2 CFG branches, and CFG
    /// parallelism only for a guided render. The suggestion keeps the other degrees.
    pub fn check_degrees(&self, guidance: bool) -> Result<(), LayoutError> {
        let max_cfg = if guidance { 2 } else { 1 };
        self.degree_rules(guidance, || Layout {
            cfg: self.cfg.clamp(1, max_cfg),
            tp: self.tp.max(1),
            ulysses: self.ulysses.max(1),
            ring: self.ring.max(1),
        })
    }

    fn degree_rules(
        &self,
        guidance: bool,
        suggest: impl Fn() -> Layout,
    ) -> Result<(), LayoutError> {
        for (field, value) in self.fields() {
            if value == 0 {
                return Err(LayoutError::ZeroDegree {
                    field,
                    suggestion: suggest(),
                });
            }
        }
        if self.cfg > 2 {
            return Err(LayoutError::CfgTooLarge {
                cfg: self.cfg,
                suggestion: suggest(),
            });
        }
        if self.cfg == 2 && !guidance {
            return Err(LayoutError::CfgWithoutGuidance {
                suggestion: suggest(),
            });
        }
        Ok(())
    }

    /// Checks that this layout can run `model`, with an error naming the field, the values and a
    /// layout that would work.
    pub fn validate(&self, model: &LayoutLimits) -> Result<(), LayoutError> {
        self.degree_rules(model.guidance, || self.suggest(model))?;
        let product = self.tp * self.ulysses;
        if !model.heads.is_multiple_of(product) {
            return Err(LayoutError::Heads {
                product,
                heads: model.heads,
                suggestion: self.suggest(model),
            });
        }
        if !model.ffn_dim.is_multiple_of(self.tp) {
            return Err(LayoutError::FfnDim {
                tp: self.tp,
                ffn_dim: model.ffn_dim,
                suggestion: self.suggest(model),
            });
        }
        Ok(())
    }

    /// A valid layout close to this one: each degree lowered to the largest value that fits, `tp`
    /// first, then `ulysses` within the heads left to each tensor-parallel rank.
    pub fn suggest(&self, model: &LayoutLimits) -> Layout {
        let max_cfg = if model.guidance { 2 } else { 1 };
        let tp = largest_at_most(self.tp, |t| {
            model.heads.is_multiple_of(t) && model.ffn_dim.is_multiple_of(t)
        });
        let ulysses = largest_at_most(self.ulysses, |u| (model.heads / tp).is_multiple_of(u));
        Layout {
            cfg: self.cfg.clamp(1, max_cfg),
            tp,
            ulysses,
            ring: self.ring.max(1),
        }
    }

    fn fields(&self) -> [(&'static str, usize); 4] {
        [
            ("cfg", self.cfg),
            ("tp", self.tp),
            ("ulysses", self.ulysses),
            ("ring", self.ring),
        ]
    }
}

/// The largest `d` in `1..=max(limit, 1)` with `ok(d)`; 1 always qualifies as a fallback.
fn largest_at_most(limit: usize, ok: impl Fn(usize) -> bool) -> usize {
    (1..=limit.max(1)).rev().find(|&d| ok(d)).unwrap_or(1)
}

impl Default for Layout {
    fn default() -> Self {
        Self::SINGLE
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cfg={},tp={},ulysses={},ring={}",
            self.cfg, self.tp, self.ulysses, self.ring
        )
    }
}

impl FromStr for Layout {
    type Err = LayoutError;

    /// Parses `key=value` pairs separated by commas, in any order; keys not given are 1. Spaces
    /// around keys and values are allowed.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| LayoutError::Parse {
            text: text.to_string(),
            reason,
        };
        let mut layout = Layout::SINGLE;
        let mut seen: Vec<&str> = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((key, value)) = part.split_once('=') else {
                return Err(err(format!("`{part}` is not key=value")));
            };
            let (key, value) = (key.trim(), value.trim());
            let slot = match key {
                "cfg" => &mut layout.cfg,
                "tp" => &mut layout.tp,
                "ulysses" => &mut layout.ulysses,
                "ring" => &mut layout.ring,
                _ => {
                    return Err(err(format!(
                        "unknown key `{key}` (the keys are cfg, tp, ulysses, ring)"
                    )))
                }
            };
            if seen.contains(&key) {
                return Err(err(format!("`{key}` is given twice")));
            }
            seen.push(key);
            let degree: usize = value
                .parse()
                .map_err(|_| err(format!("`{key}={value}`: `{value}` is not a whole number")))?;
            if degree == 0 {
                return Err(err(format!("`{key}=0`: every degree must be at least 1")));
            }
            *slot = degree;
        }
        Ok(layout)
    }
}

/// The `index`-th of `parts` balanced contiguous shards of `0..len`: the first `len % parts`
/// shards get one element more than the rest, and the shards cover `0..len` in order.
///
/// # Panics
/// If `parts == 0` or `index >= parts`.
pub fn shard_range(len: usize, parts: usize, index: usize) -> Range<usize> {
    assert!(parts > 0 && index < parts, "shard {index} of {parts} parts");
    let base = len / parts;
    let extra = len % parts;
    let start = index * base + index.min(extra);
    let size = base + usize::from(index < extra);
    start..start + size
}

/// `len` rounded up to a multiple of `parts`. Ulysses' all-to-all needs equal shards, so a token
/// count that does not divide is padded to this length and the padding masked out of attention.
///
/// # Panics
/// If `parts == 0`.
pub fn padded_len(len: usize, parts: usize) -> usize {
    assert!(parts > 0, "padding to a multiple of 0 parts");
    len.div_ceil(parts) * parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(text: &str) -> Layout {
        text.parse().unwrap()
    }

    #[test]
    fn parses_any_order_with_defaults_and_round_trips() {
        let l = layout("ulysses=2, cfg=2");
        assert_eq!(
            l,
            Layout {
                cfg: 2,
                tp: 1,
                ulysses: 2,
                ring: 1
            }
        );
        assert_eq!(l.to_string(), "cfg=2,tp=1,ulysses=2,ring=1");
        assert_eq!(layout(&l.to_string()), l);
        assert_eq!(layout("ring=3,tp=2,ulysses=1,cfg=1").world_size(), 6);
        assert_eq!(layout(""), Layout::SINGLE);
        assert_eq!(Layout::default().world_size(), 1);
    }

    #[test]
    fn parse_errors_name_the_bad_key_or_value() {
        let cases = [
            ("cfg=2,pp=2", "`pp`"),
            ("tp=two", "`two`"),
            ("tp=-1", "`-1`"),
            ("tp", "`tp` is not key=value"),
            ("ring=0", "`ring=0`"),
            ("tp=2,tp=4", "`tp` is given twice"),
        ];
        for (text, needle) in cases {
            let msg = text.parse::<Layout>().unwrap_err().to_string();
            assert!(msg.contains(needle), "{text}: {msg}");
            assert!(msg.contains(text), "{text}: {msg}");
        }
    }

    #[test]
    fn ranks_and_coords_are_inverse_with_tp_innermost() {
        let l = layout("cfg=2,tp=2,ulysses=3,ring=2");
        assert_eq!(l.world_size(), 24);
        for rank in 0..24 {
            assert_eq!(l.rank_of(l.coords(rank)), rank);
        }
        assert_eq!(
            l.coords(1),
            Coords {
                cfg: 0,
                ring: 0,
                ulysses: 0,
                tp: 1
            }
        );
        assert_eq!(l.coords(2).ulysses, 1);
        assert_eq!(l.coords(6).ring, 1);
        assert_eq!(
            l.coords(12),
            Coords {
                cfg: 1,
                ring: 0,
                ulysses: 0,
                tp: 0
            }
        );
        assert_eq!(
            l.coords(23),
            Coords {
                cfg: 1,
                ring: 1,
                ulysses: 2,
                tp: 1
            }
        );
    }

    #[test]
    fn groups_of_a_rank() {
        let l = layout("cfg=2,tp=2,ulysses=2,ring=2");
        // rank 5 = cfg 0, ring 1, ulysses 0, tp 1
        assert_eq!(l.tp_group(5), vec![4, 5]);
        assert_eq!(l.ulysses_group(5), vec![5, 7]);
        assert_eq!(l.ring_group(5), vec![1, 5]);
        assert_eq!(l.sequence_group(5), vec![1, 3, 5, 7]);
        assert_eq!(l.cfg_group(5), vec![5, 13]);
        assert_eq!(l.sequence_group(5)[l.sequence_index(5)], 5);
        for rank in 0..l.world_size() {
            let seq = l.sequence_group(rank);
            assert_eq!(seq[l.sequence_index(rank)], rank);
        }
    }

    #[test]
    fn all_groups_partition_the_world_in_the_same_order() {
        let l = layout("cfg=2,tp=3,ulysses=2,ring=2");
        let sizes = [
            (GroupKind::Tp, 3),
            (GroupKind::Ulysses, 2),
            (GroupKind::Ring, 2),
            (GroupKind::Sequence, 4),
            (GroupKind::Cfg, 2),
        ];
        for (kind, size) in sizes {
            let groups = l.all_groups_of_kind(kind);
            assert_eq!(groups.len(), l.world_size() / size, "{kind:?}");
            let mut all: Vec<usize> = groups.iter().flatten().copied().collect();
            assert!(groups.iter().all(|g| g.len() == size), "{kind:?}");
            assert!(groups.windows(2).all(|w| w[0][0] < w[1][0]), "{kind:?}");
            all.sort();
            assert_eq!(all, (0..l.world_size()).collect::<Vec<_>>(), "{kind:?}");
            for group in &groups {
                for &rank in group {
                    assert_eq!(&l.group(kind, rank), group, "{kind:?}");
                }
            }
        }
        assert_eq!(
            l.all_groups_of_kind(GroupKind::Tp)[..2],
            [vec![0, 1, 2], vec![3, 4, 5]]
        );
    }

    fn limits(heads: usize, ffn_dim: usize, guidance: bool) -> LayoutLimits {
        LayoutLimits {
            heads,
            ffn_dim,
            guidance,
        }
    }

    #[test]
    fn validation_names_field_values_and_an_alternative() {
        let m = limits(4, 64, true);
        assert!(layout("cfg=2,tp=2,ulysses=2,ring=3").validate(&m).is_ok());

        let msg = layout("tp=3,ulysses=2")
            .validate(&m)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("tp × ulysses = 6")
                && msg.contains("4 attention heads")
                && msg.contains("try cfg=1,tp=2,ulysses=2,ring=1"),
            "{msg}"
        );

        let msg = layout("cfg=2")
            .validate(&limits(4, 64, false))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("cfg = 2") && msg.contains("try cfg=1"),
            "{msg}"
        );

        let msg = layout("cfg=3").validate(&m).unwrap_err().to_string();
        assert!(
            msg.contains("cfg = 3") && msg.contains("try cfg=2"),
            "{msg}"
        );

        let msg = layout("tp=4")
            .validate(&limits(8, 30, true))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("tp = 4") && msg.contains("ffn_dim = 30") && msg.contains("tp=2"),
            "{msg}"
        );

        let zero = Layout {
            ulysses: 0,
            ..Layout::SINGLE
        };
        let msg = zero.validate(&m).unwrap_err().to_string();
        assert!(
            msg.contains("ulysses = 0") && msg.contains("ulysses=1"),
            "{msg}"
        );
    }

    #[test]
    fn suggestions_are_valid() {
        for heads in [1, 3, 4, 12, 40] {
            for ffn in [7, 96, 13824] {
                for guidance in [false, true] {
                    let m = limits(heads, ffn, guidance);
                    for cfg in 0..4 {
                        for tp in 0..7 {
                            for ulysses in 0..7 {
                                let l = Layout {
                                    cfg,
                                    tp,
                                    ulysses,
                                    ring: 2,
                                };
                                let s = l.suggest(&m);
                                assert!(s.validate(&m).is_ok(), "{l} for {m:?} → {s}");
                                if l.validate(&m).is_ok() {
                                    assert_eq!(s, l);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn shards_are_balanced_contiguous_and_cover_the_range() {
        for len in 0..40 {
            for parts in 1..9 {
                let shards: Vec<_> = (0..parts).map(|i| shard_range(len, parts, i)).collect();
                assert_eq!(shards[0].start, 0);
                assert_eq!(shards[parts - 1].end, len);
                assert!(shards.windows(2).all(|w| w[0].end == w[1].start));
                let (min, max) = shards.iter().fold((usize::MAX, 0), |(lo, hi), s| {
                    (lo.min(s.len()), hi.max(s.len()))
                });
                assert!(max - min <= 1, "{len} in {parts}: {shards:?}");
            }
        }
        assert_eq!(shard_range(10, 3, 0), 0..4);
        assert_eq!(shard_range(10, 3, 1), 4..7);
        assert_eq!(shard_range(10, 3, 2), 7..10);
    }

    #[test]
    fn padded_len_is_the_next_multiple() {
        assert_eq!(padded_len(10, 4), 12);
        assert_eq!(padded_len(12, 4), 12);
        assert_eq!(padded_len(0, 3), 0);
        assert_eq!(padded_len(7, 1), 7);
        for len in 0..50 {
            for parts in 1..7 {
                let p = padded_len(len, parts);
                assert!(p >= len && p < len + parts && p.is_multiple_of(parts));
                // Equal shards of the padded length, as Ulysses needs.
                let s: Vec<_> = (0..parts).map(|i| shard_range(p, parts, i).len()).collect();
                assert!(s.iter().all(|&n| n == p / parts));
            }
        }
    }
}
