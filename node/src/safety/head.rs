//! The trained safety head: multinomial logistic regression over the query's
//! sentence embedding, with one class `safe` and one per harm category. Fitted
//! by `slm-swarm safety-train` on data/safety/train.jsonl (candle's autograd and
//! AdamW); the fitted weights ship in data/safety/head.json and are compiled in.
//! At query time it costs one 384×K product after the embedding.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use super::SafetyError;

/// The shipped head, compiled in so a node needs no data file at run time.
pub const HEAD_JSON: &str = include_str!("../../../data/safety/head.json");
/// The class every unsafe category is weighed against.
pub const SAFE: &str = "safe";
/// Default decision threshold on P(unsafe) = 1 − P(safe): the plain Bayes
/// decision, chosen before measuring (the training mix is not the deployment mix,
/// so a threshold tuned to it would not transfer either).
pub const DEFAULT_THRESHOLD: f32 = 0.5;

/// A fitted head (the JSON form of data/safety/head.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SafetyHead {
    /// Catalog id of the embedder the head was fitted on.
    pub embedder: String,
    pub dim: usize,
    /// `classes[0]` is `safe`; the rest are harm categories.
    pub classes: Vec<String>,
    /// Optional hidden layer (ReLU) between the embedding and the output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<Hidden>,
    /// `classes.len()` rows of `dim` weights (of the hidden width with a hidden layer).
    pub weights: Vec<Vec<f32>>,
    pub bias: Vec<f32>,
    /// Flag when P(unsafe) ≥ this.
    pub threshold: f32,
    /// sha256 of the training file, and how many examples the fit kept.
    pub data_sha256: String,
    pub examples: usize,
    /// L2 weight decay chosen by cross-validation on the training set.
    pub l2: f64,
}

/// A hidden layer: `weights.len()` ReLU units over the embedding.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hidden {
    pub weights: Vec<Vec<f32>>,
    pub bias: Vec<f32>,
}

/// `w·v + b` per row.
fn affine(w: &[Vec<f32>], b: &[f32], v: &[f32]) -> Vec<f32> {
    w.iter()
        .zip(b)
        .map(|(w, b)| w.iter().zip(v).map(|(a, x)| a * x).sum::<f32>() + b)
        .collect()
}

/// The head's reading of one embedding.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeadScore {
    /// 1 − P(safe).
    pub p_unsafe: f32,
    /// The most probable harm category.
    pub category: String,
}

impl SafetyHead {
    /// The compiled-in head.
    pub fn builtin() -> Result<Self, SafetyError> {
        let h: SafetyHead =
            serde_json::from_str(HEAD_JSON).map_err(|e| SafetyError::Head(format!("head.json: {e}")))?;
        h.validate()?;
        Ok(h)
    }

    pub fn validate(&self) -> Result<(), SafetyError> {
        let bad = |m: String| Err(SafetyError::Head(m));
        if self.classes.len() < 2 || self.classes[0] != SAFE {
            return bad("classes must start with `safe` and name at least one category".into());
        }
        if self.weights.len() != self.classes.len() || self.bias.len() != self.classes.len() {
            return bad("one weight row and one bias per class".into());
        }
        let width = match &self.hidden {
            Some(h) => {
                if h.weights.is_empty()
                    || h.weights.len() != h.bias.len()
                    || h.weights.iter().any(|w| w.len() != self.dim)
                {
                    return bad(format!(
                        "the hidden layer needs rows of {} values and one bias each",
                        self.dim
                    ));
                }
                h.weights.len()
            }
            None => self.dim,
        };
        if self.weights.iter().any(|w| w.len() != width) {
            return bad(format!("every weight row must have {width} values"));
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            return bad(format!("threshold {} is not a probability", self.threshold));
        }
        Ok(())
    }

    /// Class probabilities of one embedding (softmax of the logits).
    pub fn probabilities(&self, v: &[f32]) -> Vec<f32> {
        let logits = match &self.hidden {
            Some(h) => {
                let z: Vec<f32> = affine(&h.weights, &h.bias, v)
                    .into_iter()
                    .map(|x| x.max(0.0))
                    .collect();
                affine(&self.weights, &self.bias, &z)
            }
            None => affine(&self.weights, &self.bias, v),
        };
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = logits.iter().map(|l| (l - m).exp()).collect();
        let s: f32 = e.iter().sum();
        e.into_iter().map(|x| x / s).collect()
    }

    pub fn score(&self, v: &[f32]) -> Option<HeadScore> {
        if v.len() != self.dim {
            return None;
        }
        let p = self.probabilities(v);
        let (best, _) =
            p.iter().enumerate().skip(1).fold(
                (1, f32::NEG_INFINITY),
                |(bi, bp), (i, &x)| if x > bp { (i, x) } else { (bi, bp) },
            );
        Some(HeadScore {
            p_unsafe: (1.0 - p[0]).clamp(0.0, 1.0),
            category: self.classes[best].clone(),
        })
    }
}

/// Options of one fit.
#[derive(Debug, Clone, Copy)]
pub struct FitOptions {
    /// Hidden ReLU units; 0 = plain logistic regression.
    pub hidden: usize,
    pub l2: f64,
    pub steps: usize,
    pub learning_rate: f64,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            hidden: 0,
            l2: 1e-3,
            steps: 400,
            learning_rate: 0.05,
        }
    }
}

/// The fitted layers: the optional hidden layer, then (weights, bias) per class.
pub type Fitted = (Option<Hidden>, Vec<Vec<f32>>, Vec<f32>);

/// Fit softmax regression (or a one-hidden-layer MLP): `x` rows are embeddings,
/// `y` class indices (< `classes`, 0 = safe). Safe and unsafe weigh half each,
/// and within unsafe every category the same, so neither the safe/unsafe mix
/// nor a common category sets the prior.
pub fn fit(x: &[Vec<f32>], y: &[usize], classes: usize, o: FitOptions) -> Result<Fitted, SafetyError> {
    let err = |e: candle_core::Error| SafetyError::Head(format!("fit: {e}"));
    let n = x.len();
    let dim = x.first().map_or(0, Vec::len);
    if n == 0 || y.len() != n || classes < 2 || y.iter().any(|&c| c >= classes) {
        return Err(SafetyError::Head("fit needs labelled rows in range".into()));
    }
    let dev = Device::Cpu;
    let flat: Vec<f32> = x.iter().flatten().copied().collect();
    let xs = Tensor::from_vec(flat, (n, dim), &dev).map_err(err)?;
    let mut freq = vec![0usize; classes];
    for &c in y {
        freq[c] += 1;
    }
    // Per-row weights, normalised to mean 1 over the rows.
    let present = freq.iter().filter(|&&f| f > 0).count() as f32;
    let row_w: Vec<f32> = y.iter().map(|&c| n as f32 / (present * freq[c] as f32)).collect();
    let onehot: Vec<f32> = y
        .iter()
        .flat_map(|&c| (0..classes).map(move |k| if k == c { 1.0 } else { 0.0 }))
        .collect();
    let targets = Tensor::from_vec(onehot, (n, classes), &dev).map_err(err)?;
    let rw = Tensor::from_vec(row_w, (n, 1), &dev).map_err(err)?;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let hid = if o.hidden > 0 {
        Some(candle_nn::linear(dim, o.hidden, vb.pp("hidden")).map_err(err)?)
    } else {
        None
    };
    let lin =
        candle_nn::linear(if o.hidden > 0 { o.hidden } else { dim }, classes, vb.pp("out")).map_err(err)?;
    let mut opt = candle_nn::AdamW::new(
        vm.all_vars(),
        candle_nn::ParamsAdamW {
            lr: o.learning_rate,
            weight_decay: o.l2,
            ..Default::default()
        },
    )
    .map_err(err)?;
    for _ in 0..o.steps {
        let feats = match &hid {
            Some(h) => candle_core::Module::forward(h, &xs)
                .map_err(err)?
                .relu()
                .map_err(err)?,
            None => xs.clone(),
        };
        let logits = candle_core::Module::forward(&lin, &feats).map_err(err)?;
        let logp = candle_nn::ops::log_softmax(&logits, 1).map_err(err)?;
        let loss = ((logp * &targets).map_err(err)?.sum_keepdim(1).map_err(err)? * &rw)
            .map_err(err)?
            .mean_all()
            .map_err(err)?
            .neg()
            .map_err(err)?;
        opt.backward_step(&loss).map_err(err)?;
    }
    let w: Vec<Vec<f32>> = lin.weight().to_vec2().map_err(err)?;
    let b: Vec<f32> = lin
        .bias()
        .ok_or_else(|| SafetyError::Head("fit: linear layer without bias".into()))?
        .to_vec1()
        .map_err(err)?;
    let hidden = match &hid {
        Some(h) => Some(Hidden {
            weights: h.weight().to_vec2().map_err(err)?,
            bias: h
                .bias()
                .ok_or_else(|| SafetyError::Head("fit: hidden layer without bias".into()))?
                .to_vec1()
                .map_err(err)?,
        }),
        None => None,
    };
    Ok((hidden, w, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_head_is_valid() {
        let h = SafetyHead::builtin().expect("head.json");
        assert_eq!(h.classes[0], SAFE);
        assert!(h.examples > 1000, "{}", h.examples);
    }

    #[test]
    fn a_fit_separates_what_it_was_shown() {
        // Three clusters in 4-d: class k lives around axis k.
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..90 {
            let k = i % 3;
            let mut v = vec![0.05 * ((i * 7 % 5) as f32 - 2.0); 4];
            v[k] += 1.0;
            x.push(v);
            y.push(k);
        }
        let (hidden, w, b) = fit(&x, &y, 3, FitOptions::default()).expect("fit");
        let head = SafetyHead {
            embedder: "test".into(),
            dim: 4,
            classes: vec!["safe".into(), "a".into(), "b".into()],
            hidden,
            weights: w,
            bias: b,
            threshold: 0.5,
            data_sha256: String::new(),
            examples: 90,
            l2: 1e-3,
        };
        head.validate().expect("valid");
        let s = head.score(&[1.0, 0.0, 0.0, 0.0]).expect("score");
        assert!(s.p_unsafe < 0.2, "{s:?}");
        let s = head.score(&[0.0, 0.0, 1.0, 0.0]).expect("score");
        assert!(s.p_unsafe > 0.8 && s.category == "b", "{s:?}");
        assert!(
            head.score(&[1.0]).is_none(),
            "a wrong-sized embedding is not scored"
        );
        assert!(fit(&x, &y[..10], 3, FitOptions::default()).is_err());
    }
}
