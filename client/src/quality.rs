//! The `LayerQuality` answer, which the server sends in columns (one packed array per metric,
//! each model and each distinct tensor name once), read back as one row per layer.

use std::collections::HashMap;

use filterdb_proto::LayerQualityResponse;

use crate::ClientError;

/// One layer of a `LayerQuality` answer, borrowing its strings from the answer.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct QualityLayer<'a> {
    /// Layer id.
    pub layer_id: u64,
    /// Id of its model.
    pub model_id: u64,
    /// Name of its model.
    pub model: &'a str,
    /// Index among the model's 3x3 layers.
    pub layer_index: u32,
    /// Tensor name in the checkpoint.
    pub tensor_name: &'a str,
    /// Convolution depth, and normalised to [0, 1].
    pub conv_depth: u32,
    /// `conv_depth` / the model's deepest.
    pub conv_depth_norm: f64,
    /// Filters in the layer.
    pub n: u64,
    /// Share of sparse filters S.
    pub sparsity: f64,
    /// Variance entropy H (log10); NaN if undefined.
    pub entropy: f64,
    /// H / TH(n); NaN if undefined.
    pub entropy_norm: f64,
    /// H of the non-sparse filters; NaN if undefined.
    pub entropy_clean: f64,
    /// H_clean / TH(n′); NaN if undefined.
    pub entropy_clean_norm: f64,
    /// Orthogonality O; NaN when out_channels < 2.
    pub orthogonality: f64,
    /// H above the random-filter threshold.
    pub random_like: bool,
    /// Low entropy.
    pub low_diversity: bool,
    /// Many sparse filters.
    pub sparse_heavy: bool,
    /// The combined degeneration flag.
    pub degenerate: bool,
}

/// The layers of an answer as rows, in the answer's order. Fails with
/// [`ClientError::Protocol`] if its columns differ in length, or a layer names a model or a
/// tensor-name index the answer does not hold.
pub fn layers(r: &LayerQualityResponse) -> Result<Vec<QualityLayer<'_>>, ClientError> {
    let n = r.layer_id.len();
    let lengths = [
        ("model_id", r.model_id.len()),
        ("layer_index", r.layer_index.len()),
        ("tensor_name_index", r.tensor_name_index.len()),
        ("conv_depth", r.conv_depth.len()),
        ("conv_depth_norm", r.conv_depth_norm.len()),
        ("n", r.n.len()),
        ("sparsity", r.sparsity.len()),
        ("entropy", r.entropy.len()),
        ("entropy_norm", r.entropy_norm.len()),
        ("entropy_clean", r.entropy_clean.len()),
        ("entropy_clean_norm", r.entropy_clean_norm.len()),
        ("orthogonality", r.orthogonality.len()),
        ("random_like", r.random_like.len()),
        ("low_diversity", r.low_diversity.len()),
        ("sparse_heavy", r.sparse_heavy.len()),
        ("degenerate", r.degenerate.len()),
    ];
    if let Some((name, len)) = lengths.iter().find(|(_, len)| *len != n) {
        return Err(ClientError::Protocol(format!(
            "LayerQuality answer: column `{name}` holds {len} entries, `layer_id` {n}"
        )));
    }
    let models: HashMap<u64, &str> = r.models.iter().map(|m| (m.model_id, m.name.as_str())).collect();
    (0..n)
        .map(|i| {
            let model_id = r.model_id[i];
            let model = models.get(&model_id).copied().ok_or_else(|| {
                ClientError::Protocol(format!("LayerQuality answer: layer {} names model {model_id}, which it does not list", r.layer_id[i]))
            })?;
            let t = r.tensor_name_index[i];
            let tensor_name = r.tensor_names.get(t as usize).ok_or_else(|| {
                ClientError::Protocol(format!(
                    "LayerQuality answer: layer {} has tensor name {t} of {}",
                    r.layer_id[i],
                    r.tensor_names.len()
                ))
            })?;
            Ok(QualityLayer {
                layer_id: r.layer_id[i],
                model_id,
                model,
                layer_index: r.layer_index[i],
                tensor_name,
                conv_depth: r.conv_depth[i],
                conv_depth_norm: r.conv_depth_norm[i],
                n: r.n[i],
                sparsity: r.sparsity[i],
                entropy: r.entropy[i],
                entropy_norm: r.entropy_norm[i],
                entropy_clean: r.entropy_clean[i],
                entropy_clean_norm: r.entropy_clean_norm[i],
                orthogonality: r.orthogonality[i],
                random_like: r.random_like[i],
                low_diversity: r.low_diversity[i],
                sparse_heavy: r.sparse_heavy[i],
                degenerate: r.degenerate[i],
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use filterdb_proto::LayerQualityModel;

    fn answer() -> LayerQualityResponse {
        LayerQualityResponse {
            models: vec![
                LayerQualityModel { model_id: 7, name: "a".into() },
                LayerQualityModel { model_id: 9, name: "b".into() },
            ],
            tensor_names: vec!["conv1.weight".into(), "conv2.weight".into()],
            layer_id: vec![70, 71, 90],
            model_id: vec![7, 7, 9],
            layer_index: vec![0, 1, 0],
            tensor_name_index: vec![0, 1, 0],
            conv_depth: vec![1, 2, 1],
            conv_depth_norm: vec![0.5, 1.0, 1.0],
            n: vec![27, 64, 27],
            sparsity: vec![0.0, 0.25, 0.5],
            entropy: vec![1.0, f64::NAN, 0.5],
            entropy_norm: vec![0.9; 3],
            entropy_clean: vec![1.0; 3],
            entropy_clean_norm: vec![0.8; 3],
            orthogonality: vec![0.1; 3],
            random_like: vec![false, true, false],
            low_diversity: vec![false; 3],
            sparse_heavy: vec![false, false, true],
            degenerate: vec![false, true, true],
        }
    }

    #[test]
    fn quality_columns_read_back_as_rows() {
        let r = answer();
        let rows = layers(&r).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[1].layer_id, rows[1].model, rows[1].tensor_name, rows[1].n), (71, "a", "conv2.weight", 64));
        assert_eq!((rows[2].model_id, rows[2].model, rows[2].tensor_name), (9, "b", "conv1.weight"));
        assert!(rows[1].entropy.is_nan() && rows[1].random_like && rows[1].degenerate);
        assert_eq!(rows[2].sparsity, 0.5);
        assert!(layers(&LayerQualityResponse::default()).unwrap().is_empty());
    }

    #[test]
    fn quality_malformed_answers_are_protocol_errors() {
        let mut r = answer();
        r.entropy.pop();
        let e = layers(&r).unwrap_err().to_string();
        assert!(e.contains("`entropy` holds 2 entries"), "{e}");
        let mut r = answer();
        r.model_id[2] = 8;
        assert!(layers(&r).unwrap_err().to_string().contains("model 8"));
        let mut r = answer();
        r.tensor_name_index[0] = 5;
        assert!(layers(&r).unwrap_err().to_string().contains("tensor name 5 of 2"));
    }
}
