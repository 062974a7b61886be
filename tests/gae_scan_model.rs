//! A host model of `kernels/advantages.cu`'s GAE scan: the same affine maps, the same f32
//! fused multiply-adds, the same composition tree (4 positions per thread, Hillis–Steele
//! suffix scan over 32 lanes, warp totals applied right to left, 1024-position chunks: up to 4
//! scanned right to left by one block, each entering with the state the previous one left,
//! beyond that entering with states carried through composed chunk maps). It proves the scan's algebra (the state (A, W, Y), the score on the last
//! valid step, both masked-step conventions) and its documented error bound on every machine,
//! GPU or not; the CUDA tests then hold the kernel itself to the same reference.

mod common;

use common::advantages::{GaeCase, MaskKind};
use rlhf_kernels::{GaeOptions, MaskedSteps, RowShape, gae_error_bound_factor, gae_error_scale, reference};

const ITEMS: usize = 4;
const CHUNK: usize = 1024;
const WARP_SPAN: usize = 128;
const SEQUENCE_CHUNKS: usize = 4;

#[derive(Clone, Copy)]
struct Affine {
    p: f32,
    q: f32,
    s: f32,
    w: f32,
    z: f32,
    c0: f32,
    c1: f32,
    c2: f32,
}

const IDENTITY: Affine = Affine { p: 1.0, q: 0.0, s: 0.0, w: 1.0, z: 1.0, c0: 0.0, c1: 0.0, c2: 0.0 };

/// `f ∘ g`, g being the part to the right (applied first), as the kernel's `compose`.
fn compose(f: Affine, g: Affine) -> Affine {
    Affine {
        p: f.p * g.p,
        q: f.p.mul_add(g.q, f.q * g.w),
        s: f.p.mul_add(g.s, f.s * g.z),
        w: f.w * g.w,
        z: f.z * g.z,
        c0: f.p.mul_add(g.c0, f.q.mul_add(g.c1, f.s.mul_add(g.c2, f.c0))),
        c1: f.w.mul_add(g.c1, f.c1),
        c2: f.z.mul_add(g.c2, f.c2),
    }
}

fn apply(f: Affine, x: [f32; 3]) -> [f32; 3] {
    [
        f.p.mul_add(x[0], f.q.mul_add(x[1], f.s.mul_add(x[2], f.c0))),
        f.w.mul_add(x[1], f.c1),
        f.z.mul_add(x[2], f.c2),
    ]
}

/// One position: its map, whether it is valid, its value.
type Step = (Affine, bool, f32);
/// One thread: its positions and their composed map.
type Thread = ([Step; ITEMS], Affine);

struct Model<'a> {
    c: &'a GaeCase,
    opts: GaeOptions,
}

impl Model<'_> {
    /// The kernel's `step_map`: the map, validity and value of position `t` of `row`.
    fn step(&self, row: usize, t: usize) -> Step {
        if t >= self.c.shape.cols {
            return (IDENTITY, false, 0.0);
        }
        let i = row * self.c.shape.row_stride + t;
        if self.c.mask.as_ref().is_some_and(|m| m[i] == 0) {
            let reset = Affine { p: 0.0, q: 0.0, s: 0.0, w: 0.0, z: 1.0, c0: 0.0, c1: 0.0, c2: 0.0 };
            return (if self.opts.masked == MaskedSteps::Reset { reset } else { IDENTITY }, false, 0.0);
        }
        let mut r = self.c.rewards.as_ref().map_or(0.0, |r| r[i]);
        if let Some(kl) = &self.c.kl {
            r = (-self.c.beta).mul_add(kl[i], r);
        }
        let v = self.c.values.as_ref().map_or(0.0, |v| v[i]);
        let score = self.c.scores.as_ref().map_or(0.0, |s| s[row]);
        let gl = self.opts.gamma * self.opts.lambda;
        (Affine { p: gl, q: self.opts.gamma, s: score, w: 0.0, z: 0.0, c0: r - v, c1: v, c2: 0.0 }, true, v)
    }

    /// Each thread's items and their composition, for `warps` warps from `start`.
    fn threads(&self, row: usize, start: usize, warps: usize) -> Vec<Thread> {
        (0..warps * 32)
            .map(|k| {
                let items: [Step; ITEMS] = std::array::from_fn(|j| self.step(row, start + k * ITEMS + j));
                let total = items[..ITEMS - 1].iter().rev().fold(items[ITEMS - 1].0, |g, f| compose(f.0, g));
                (items, total)
            })
            .collect()
    }

    /// Inclusive Hillis–Steele suffix scan of each warp (lanes read their partner's old value).
    fn warp_scan(totals: &[Affine]) -> Vec<Affine> {
        let mut x = totals.to_vec();
        for warp in x.chunks_mut(32) {
            let mut d = 1;
            while d < 32 {
                let old = warp.to_vec();
                for l in 0..32 - d {
                    warp[l] = compose(old[l], old[l + d]);
                }
                d <<= 1;
            }
        }
        x
    }

    /// `scan_chunk<warps>`: the outputs of one chunk entering with `carry`; returns the state the
    /// chunk leaves at `start` (thread 0's).
    fn scan_chunk(
        &self,
        row: usize,
        start: usize,
        warps: usize,
        carry: [f32; 3],
        adv: &mut [f32],
    ) -> [f32; 3] {
        let threads = self.threads(row, start, warps);
        let totals: Vec<Affine> = threads.iter().map(|t| t.1).collect();
        let incl = Self::warp_scan(&totals);
        let mut left = carry;
        for (k, (items, _)) in threads.iter().enumerate() {
            let (warp, lane) = (k / 32, k % 32);
            let excl = if lane == 31 { IDENTITY } else { incl[k + 1] };
            let mut s = carry;
            for w in (warp + 1..warps).rev() {
                s = apply(incl[w * 32], s);
            }
            s = apply(excl, s);
            for j in (0..ITEMS).rev() {
                s = apply(items[j].0, s);
                let t = start + k * ITEMS + j;
                if t < self.c.shape.cols {
                    adv[t] = if items[j].1 { s[0] } else { 0.0 };
                }
            }
            if k == 0 {
                left = s;
            }
        }
        left
    }

    /// `gae_chunk_maps`: the composed map of chunk `chunk`.
    fn chunk_map(&self, row: usize, chunk: usize) -> Affine {
        let threads = self.threads(row, chunk * CHUNK, 8);
        let incl = Self::warp_scan(&threads.iter().map(|t| t.1).collect::<Vec<_>>());
        (0..7).rev().fold(incl[7 * 32], |g, w| compose(incl[w * 32], g))
    }

    fn row(&self, row: usize) -> Vec<f32> {
        let cols = self.c.shape.cols;
        let mut adv = vec![f32::NAN; cols];
        let end = [0.0, 0.0, 1.0];
        if cols <= WARP_SPAN {
            self.scan_chunk(row, 0, 1, end, &mut adv);
            return adv;
        }
        let chunks = cols.div_ceil(CHUNK);
        if chunks <= SEQUENCE_CHUNKS {
            // `gae_sequence`: one block, chunks right to left.
            (0..chunks)
                .rev()
                .fold(end, |carry, chunk| self.scan_chunk(row, chunk * CHUNK, 8, carry, &mut adv));
            return adv;
        }
        let maps: Vec<Affine> =
            (0..chunks).map(|k| if k == 0 { IDENTITY } else { self.chunk_map(row, k) }).collect();
        for chunk in 0..chunks {
            let carry = (chunk + 1..chunks).rev().fold(end, |s, k| apply(maps[k], s));
            self.scan_chunk(row, chunk * CHUNK, 8, carry, &mut adv);
        }
        adv
    }
}

fn check(c: &GaeCase, opts: GaeOptions) {
    let model = Model { c, opts };
    let expected = reference::gae(&c.inputs(), &opts).unwrap();
    let scale = gae_error_scale(&c.inputs(), &opts).unwrap();
    let k = gae_error_bound_factor(c.shape.cols) * f64::from(f32::EPSILON) / 2.0;
    for row in 0..c.shape.rows {
        let got = model.row(row);
        for (t, &g) in got.iter().enumerate() {
            let j = row * c.shape.cols + t;
            let bound = k * scale[j] + f64::from(f32::MIN_POSITIVE);
            let e = expected.advantages[j];
            assert!(
                (g as f64 - e).abs() <= bound,
                "{:?} {opts:?} row {row} t {t}: {g} vs {e} (bound {bound:e})",
                c.shape
            );
        }
    }
}

#[test]
fn scan_model_matches_the_reference() {
    let mut seed = 500;
    for shape in [
        RowShape::new(3, 1),
        RowShape::new(4, 100),
        RowShape::new(3, 128),
        RowShape::new(3, 129),
        RowShape::new(3, 2500).with_row_stride(2503),
        RowShape::new(2, 4096),
        RowShape::new(2, 4097),
    ] {
        for kind in [MaskKind::None, MaskKind::RightPadded, MaskKind::LeftPadded, MaskKind::Holes] {
            for (gamma, lambda) in [(1.0, 1.0), (0.99, 0.95), (0.0, 0.5), (0.5, 0.0)] {
                for masked in [MaskedSteps::PassThrough, MaskedSteps::Reset] {
                    seed += 1;
                    let c = GaeCase::random(shape, kind, seed);
                    check(&c, GaeOptions::new(gamma, lambda).masked_steps(masked));
                }
            }
        }
    }
}

#[test]
fn scan_model_on_128k_positions() {
    for (i, (gamma, lambda)) in [(1.0, 0.95), (1.0, 1.0)].into_iter().enumerate() {
        let c = GaeCase::random(RowShape::new(1, 131072), MaskKind::Holes, 900 + i as u64);
        check(&c, GaeOptions::new(gamma, lambda));
    }
}
