//! `kandinsky eval shapes`: scores images generated for held-out prompts with the deterministic
//! pixel analyser, and measures the Fréchet distance between generated and real images in a CLIP
//! image-embedding space.
// Dense numeric code over small matrices: index loops read like the formulas.
#![allow(clippy::needless_range_loop)]

use super::analyser::{analyse, Score};
use crate::error::{Error, Result};

/// Accuracy per attribute over a set of images.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Accuracy {
    /// Images scored.
    pub n: usize,
    /// Fractions right: background, object colour, shape, position, size.
    pub background: f64,
    /// Object colour.
    pub colour: f64,
    /// Shape.
    pub shape: f64,
    /// Position.
    pub position: f64,
    /// Size.
    pub size: f64,
}

impl Accuracy {
    /// Aggregates per-image scores.
    pub fn from_scores(scores: &[Score]) -> Self {
        let n = scores.len();
        let frac = |f: &dyn Fn(&Score) -> bool| {
            if n == 0 {
                0.0
            } else {
                scores.iter().filter(|s| f(s)).count() as f64 / n as f64
            }
        };
        Self {
            n,
            background: frac(&|s| s.background),
            colour: frac(&|s| s.colour),
            shape: frac(&|s| s.shape),
            position: frac(&|s| s.position),
            size: frac(&|s| s.size),
        }
    }
}

/// Scores `side × side` RGB8 images against the scenes they should show.
pub fn score(images: &[Vec<u8>], scenes: &[super::shapes::Scene], side: usize) -> Accuracy {
    let scores: Vec<Score> = images
        .iter()
        .zip(scenes)
        .map(|(img, s)| analyse(img, side).score(s))
        .collect();
    Accuracy::from_scores(&scores)
}

/// Mean and covariance (unbiased) of row vectors.
fn moments(x: &[Vec<f64>]) -> Result<(Vec<f64>, Vec<Vec<f64>>)> {
    let n = x.len();
    if n < 2 {
        return Err(Error::InvalidArgument(
            "the Fréchet distance needs at least 2 samples per set".into(),
        ));
    }
    let d = x[0].len();
    let mut mean = vec![0.0; d];
    for r in x {
        for (m, v) in mean.iter_mut().zip(r) {
            *m += v / n as f64;
        }
    }
    let mut cov = vec![vec![0.0; d]; d];
    for r in x {
        for i in 0..d {
            for j in 0..d {
                cov[i][j] += (r[i] - mean[i]) * (r[j] - mean[j]) / (n - 1) as f64;
            }
        }
    }
    Ok((mean, cov))
}

/// Eigen-decomposition of a symmetric matrix (cyclic Jacobi): `(eigenvalues, eigenvectors as
/// columns)`.
pub fn symmetric_eigen(a: &[Vec<f64>]) -> (Vec<f64>, Vec<Vec<f64>>) {
    let n = a.len();
    let mut a: Vec<Vec<f64>> = a.to_vec();
    let mut v = vec![vec![0.0; n]; n];
    for (i, row) in v.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum();
        if off < 1e-22 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum().max(0.0).mul_add(2.0, -1.0)
                    / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k][p], a[k][q]);
                    a[k][p] = c * akp - s * akq;
                    a[k][q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p][k], a[q][k]);
                    a[p][k] = c * apk - s * aqk;
                    a[q][k] = s * apk + c * aqk;
                }
                for row in v.iter_mut() {
                    let (vkp, vkq) = (row[p], row[q]);
                    row[p] = c * vkp - s * vkq;
                    row[q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i][i]).collect(), v)
}

fn matmul(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let (n, m, k) = (a.len(), b[0].len(), b.len());
    let mut c = vec![vec![0.0; m]; n];
    for i in 0..n {
        for l in 0..k {
            for j in 0..m {
                c[i][j] += a[i][l] * b[l][j];
            }
        }
    }
    c
}

/// The Fréchet distance between Gaussians fitted to two sets of feature vectors:
/// `‖μ₁−μ₂‖² + tr(Σ₁) + tr(Σ₂) − 2 tr((Σ₁^½ Σ₂ Σ₁^½)^½)`.
pub fn frechet_distance(a: &[Vec<f64>], b: &[Vec<f64>]) -> Result<f64> {
    let (m1, s1) = moments(a)?;
    let (m2, s2) = moments(b)?;
    let d = m1.len();
    let mean_term: f64 = m1.iter().zip(&m2).map(|(x, y)| (x - y).powi(2)).sum();
    let (w, v) = symmetric_eigen(&s1);
    // Σ₁^½ = V diag(√w) Vᵀ
    let mut sqrt1 = vec![vec![0.0; d]; d];
    for i in 0..d {
        for j in 0..d {
            sqrt1[i][j] = (0..d)
                .map(|k| v[i][k] * w[k].max(0.0).sqrt() * v[j][k])
                .sum();
        }
    }
    let m = matmul(&matmul(&sqrt1, &s2), &sqrt1);
    let (wm, _) = symmetric_eigen(&m);
    let tr_sqrt: f64 = wm.iter().map(|x| x.max(0.0).sqrt()).sum();
    let tr1: f64 = (0..d).map(|i| s1[i][i]).sum();
    let tr2: f64 = (0..d).map(|i| s2[i][i]).sum();
    Ok(mean_term + tr1 + tr2 - 2.0 * tr_sqrt)
}
