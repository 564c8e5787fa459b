//! The query and maintenance commands: models, model, layers, filters, census, update, delete,
//! vocab, where-help.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};

use anyhow::{Context, bail};
use filterdb_client::json::{
    census_to_json, depth_definition_name, filters_to_json, format_name, layer_to_json,
    model_to_json, vocabularies_to_json,
};
use filterdb_client::proto::expr::{FIELD_NAMES, field_name};
use filterdb_client::proto::{FilterBatch, Label, MetaUpdate, Model, ModelRef, model_ref as mref};
use filterdb_client::{
    ClientError, KERNEL_BYTES, batch_kernels, filter_ids, model_filters, model_ref, selection,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::manifest::split_list;
use super::render::{canonical, canonical_list, kernel_grid, plain_table, table, utc_time};
use super::{
    CensusArgs, Ctx, DeleteArgs, FiltersArgs, LayersArgs, ModelArgs, ModelsArgs, UpdateArgs,
};

/// Writes to stdout, returning broken pipes as errors instead of panicking like `print!`.
fn emit(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// Prints one JSON document.
fn emit_json(v: &Value) -> anyhow::Result<()> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    Ok(emit(&s)?)
}

fn architecture_cell(m: &Model) -> String {
    let meta = m.meta.clone().unwrap_or_default();
    let family = canonical(meta.architecture.as_ref());
    match meta.architecture_variant.as_str() {
        "" => family,
        v => format!("{family} ({v})"),
    }
}

/// `filterdb models`.
pub async fn models(ctx: &Ctx, a: ModelsArgs) -> anyhow::Result<()> {
    let sel = selection(a.where_.as_deref())?;
    let mut c = ctx.connect().await?;
    let models = c.list_models(sel).await?;
    if ctx.json {
        return emit_json(
            &json!({ "models": models.iter().map(model_to_json).collect::<Vec<_>>() }),
        );
    }
    if models.is_empty() {
        return Ok(emit("no models\n")?);
    }
    let mut t = table(
        &[
            "id",
            "name",
            "task",
            "architecture",
            "datasets",
            "visual category",
            "format",
            "layers",
            "filters",
        ],
        &[0, 7, 8],
    );
    let (mut layers, mut filters) = (0u64, 0u64);
    for m in &models {
        let meta = m.meta.clone().unwrap_or_default();
        layers += u64::from(m.n_layers);
        filters += m.n_filters;
        t.add_row(vec![
            m.model_id.to_string(),
            m.name.clone(),
            canonical(meta.task.as_ref()),
            architecture_cell(m),
            canonical_list(&meta.training_datasets),
            canonical(meta.visual_category.as_ref()),
            format_name(m.format).to_string(),
            m.n_layers.to_string(),
            m.n_filters.to_string(),
        ]);
    }
    Ok(emit(&format!(
        "{t}\n{} models, {layers} layers, {filters} filters\n",
        models.len()
    ))?)
}

/// A model's details as text: facts, labels and kernel shapes.
fn model_text(m: &Model) -> String {
    let meta = m.meta.clone().unwrap_or_default();
    let mut out = format!("model {} `{}`\n", m.model_id, m.name);
    let mut facts = plain_table();
    let mut fact = |k: &str, v: String| {
        if !v.is_empty() {
            facts.add_row(vec![k.to_string(), v]);
        }
    };
    fact("format", format_name(m.format).into());
    fact(
        "depth definition",
        depth_definition_name(m.depth_definition).into(),
    );
    fact(
        "size",
        format!(
            "{} ({} bytes)",
            indicatif::HumanBytes(m.size_bytes),
            m.size_bytes
        ),
    );
    fact("sha256", m.content_sha256.clone());
    fact(
        "3x3 layers",
        format!(
            "{} (layer ids {}..{})",
            m.n_layers,
            m.first_layer_id,
            m.first_layer_id + u64::from(m.n_layers)
        ),
    );
    fact(
        "3x3 filters",
        format!(
            "{} (filter ids {}..{})",
            m.n_filters,
            m.first_filter_id,
            m.first_filter_id + m.n_filters
        ),
    );
    fact("producer", m.producer.clone());
    if m.opset != 0 {
        fact("opset", m.opset.to_string());
    }
    if m.ingested_at_unix_ms != 0 {
        fact("ingested", utc_time(m.ingested_at_unix_ms));
    }
    fact("architecture variant", meta.architecture_variant.clone());
    fact("source", meta.source_uri.clone());
    fact("license", meta.license.clone());
    fact("tags", meta.tags.join(", "));
    fact("excluded tensors", m.excluded_tensors.join(", "));
    fact("vocabulary version", meta.vocabulary_version.to_string());
    let _ = writeln!(out, "{facts}");

    let mut labels = table(&["label", "raw", "canonical", "known"], &[]);
    let mut unknown = 0;
    let mut label = |name: &str, l: &Label| {
        if !l.known {
            unknown += 1;
        }
        let known = if l.known {
            "yes"
        } else {
            "NO (not in the vocabulary)"
        };
        labels.add_row(vec![
            name.to_string(),
            l.raw.clone(),
            l.canonical.clone(),
            known.to_string(),
        ]);
    };
    for l in &meta.training_datasets {
        label("training dataset", l);
    }
    for l in &meta.pretraining_datasets {
        label("pretraining dataset", l);
    }
    for (name, l) in [
        ("task", &meta.task),
        ("architecture", &meta.architecture),
        ("visual category", &meta.visual_category),
    ] {
        if let Some(l) = l
            .as_ref()
            .filter(|l| !l.raw.is_empty() || !l.canonical.is_empty())
        {
            label(name, l);
        }
    }
    let _ = writeln!(out, "\nlabels (raw → canonical)\n{labels}");
    if unknown > 0 {
        let _ = writeln!(
            out,
            "{unknown} label(s) unknown to the vocabularies (see `filterdb vocab`)"
        );
    }

    if !m.kernel_shape_counts.is_empty() {
        let mut shapes: Vec<(&String, &u64)> = m.kernel_shape_counts.iter().collect();
        shapes.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let mut t = table(&["kernel shape", "2-D kernels", "stored"], &[1]);
        for (shape, n) in shapes {
            t.add_row(vec![
                shape.clone(),
                n.to_string(),
                if shape == "3x3" { "yes" } else { "no" }.to_string(),
            ]);
        }
        let _ = writeln!(out, "\nkernel shapes (all 4-D conv weights)\n{t}");
    }
    out
}

/// `filterdb model`.
pub async fn model(ctx: &Ctx, a: ModelArgs) -> anyhow::Result<()> {
    let mut c = ctx.connect().await?;
    let m = c.get_model(model_ref(&a.model)).await?;
    if ctx.json {
        return emit_json(&model_to_json(&m));
    }
    Ok(emit(&model_text(&m))?)
}

/// `filterdb layers`.
pub async fn layers(ctx: &Ctx, a: LayersArgs) -> anyhow::Result<()> {
    let sel = selection(a.where_.as_deref())?;
    let mut c = ctx.connect().await?;
    let r = c.list_layers(model_ref(&a.model), sel).await?;
    if ctx.json {
        return emit_json(&json!({
            "model": r.model.as_ref().map(model_to_json).unwrap_or(Value::Null),
            "layers": r.layers.iter().map(layer_to_json).collect::<Vec<_>>(),
        }));
    }
    let mut t = table(
        &[
            "index",
            "layer id",
            "tensor",
            "out",
            "in",
            "groups",
            "conv_depth",
            "conv_depth_norm",
            "filters",
            "first filter id",
        ],
        &[0, 1, 3, 4, 5, 6, 7, 8, 9],
    );
    for l in &r.layers {
        t.add_row(vec![
            l.layer_index.to_string(),
            l.layer_id.to_string(),
            l.tensor_name.clone(),
            l.out_channels.to_string(),
            l.in_channels.to_string(),
            // 0 means the format does not record groups.
            if l.groups == 0 {
                "-".to_string()
            } else {
                l.groups.to_string()
            },
            l.conv_depth.to_string(),
            format!("{:.4}", l.conv_depth_norm),
            l.n_filters.to_string(),
            l.first_filter_id.to_string(),
        ]);
    }
    let head = match &r.model {
        Some(m) => format!(
            "model {} `{}`: {} of {} layers\n",
            m.model_id,
            m.name,
            r.layers.len(),
            m.n_layers
        ),
        None => String::new(),
    };
    Ok(emit(&format!("{head}{t}\n"))?)
}

/// Contiguous filter-id ranges `[start, end)` seen in an export.
#[derive(Debug, Default, PartialEq)]
struct IdRanges(Vec<(u64, u64)>);

impl IdRanges {
    fn add(&mut self, start: u64, count: u64) {
        match self.0.last_mut() {
            Some(last) if last.1 == start => last.1 += count,
            _ => self.0.push((start, start + count)),
        }
    }
}

/// Cuts a batch down to at most `keep` filters.
fn truncate_batch(b: &mut FilterBatch, keep: u64) {
    if u64::from(b.count) > keep {
        b.count = keep as u32;
        b.kernels.truncate(keep as usize * KERNEL_BYTES);
    }
}

/// `filterdb filters`.
pub async fn filters(ctx: &Ctx, a: FiltersArgs) -> anyhow::Result<()> {
    let request = match (a.ids, &a.model) {
        (Some((start, end)), _) => filter_ids(start, end),
        (None, Some(m)) => model_filters(model_ref(m), a.layer, a.channel),
        (None, None) => bail!("give a MODEL or --ids START:END"),
    };
    let mut c = ctx.connect().await?;
    let mut stream = c.filters_stream(request).await?;
    let mut remaining = a.limit.unwrap_or(u64::MAX);

    if let Some(path) = &a.raw {
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        );
        let mut hasher = Sha256::new();
        let mut ranges = IdRanges::default();
        let mut total = 0u64;
        let result: anyhow::Result<()> = async {
            while remaining > 0 {
                let Some(mut b) = stream.message().await.map_err(ClientError::from)? else {
                    break;
                };
                if b.kernels.len() != b.count as usize * KERNEL_BYTES {
                    return Err(ClientError::Protocol(format!(
                        "filter batch at id {} announces {} filters but carries {} bytes",
                        b.first_filter_id,
                        b.count,
                        b.kernels.len()
                    ))
                    .into());
                }
                truncate_batch(&mut b, remaining);
                remaining -= u64::from(b.count);
                total += u64::from(b.count);
                ranges.add(b.first_filter_id, u64::from(b.count));
                hasher.update(&b.kernels);
                file.write_all(&b.kernels)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            file.flush()
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            // A partial export looks like a complete one to numpy; do not leave it behind.
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        let sha = hex::encode(hasher.finalize());
        let bytes = total * KERNEL_BYTES as u64;
        if ctx.json {
            return emit_json(&json!({
                "path": path.display().to_string(),
                "filters": total,
                "bytes": bytes,
                "sha256": sha,
                "id_ranges": ranges.0.iter().map(|(s, e)| json!([s, e])).collect::<Vec<_>>(),
            }));
        }
        let ids: Vec<String> = ranges.0.iter().map(|(s, e)| format!("{s}..{e}")).collect();
        return Ok(emit(&format!(
            "wrote {total} filters ({bytes} bytes, little-endian float32, 9 per filter) to {}\nfilter ids {}\nsha256 {sha}\n",
            path.display(),
            if ids.is_empty() {
                "none".to_string()
            } else {
                ids.join(", ")
            },
        ))?);
    }

    if ctx.json {
        let mut batches = Vec::new();
        while remaining > 0 {
            let Some(mut b) = stream.message().await.map_err(ClientError::from)? else {
                break;
            };
            truncate_batch(&mut b, remaining);
            remaining -= u64::from(b.count);
            batches.push(b);
        }
        return emit_json(&json!({ "filters": filters_to_json(&batches)? }));
    }

    let mut shown = 0u64;
    while remaining > 0 {
        let Some(mut b) = stream.message().await.map_err(ClientError::from)? else {
            break;
        };
        truncate_batch(&mut b, remaining);
        remaining -= u64::from(b.count);
        let mut text = String::new();
        for (i, k) in batch_kernels(&b)?.iter().enumerate() {
            let _ = writeln!(
                text,
                "filter {}  (model {}, layer {}, index {})\n{}",
                b.first_filter_id + i as u64,
                b.model_id,
                b.layer_index,
                b.first_index_in_layer + i as u64,
                kernel_grid(k)
            );
            shown += 1;
        }
        emit(&text)?;
    }
    if shown == 0 {
        emit("no filters\n")?;
    }
    Ok(())
}

/// `filterdb census`.
pub async fn census(ctx: &Ctx, a: CensusArgs) -> anyhow::Result<()> {
    let sel = selection(a.where_.as_deref())?;
    let mut c = ctx.connect().await?;
    let r = c.census(sel, &a.group_by).await?;
    let names: Vec<&str> = a.group_by.iter().map(|f| field_name(*f)).collect();
    if ctx.json {
        return emit_json(&census_to_json(&r, &names));
    }
    let keys = names.len().max(1);
    let mut headers: Vec<&str> = if names.is_empty() {
        vec![""]
    } else {
        names.clone()
    };
    headers.extend(["models", "layers", "filters"]);
    let mut t = table(&headers, &[keys, keys + 1, keys + 2]);
    for g in &r.groups {
        let mut row: Vec<String> = g.key.clone();
        row.resize(keys, String::new());
        row.extend([
            g.models.to_string(),
            g.layers.to_string(),
            g.filters.to_string(),
        ]);
        t.add_row(row);
    }
    if let Some(total) = &r.total {
        let mut row = vec!["total".to_string()];
        row.resize(keys, String::new());
        row.extend([
            total.models.to_string(),
            total.layers.to_string(),
            total.filters.to_string(),
        ]);
        t.add_row(row);
    }
    Ok(emit(&format!("{t}\n"))?)
}

/// The update a command line asks for, or `None` when no flag was given.
fn meta_update(a: &UpdateArgs) -> Option<MetaUpdate> {
    let u = MetaUpdate {
        training_datasets: split_list(&a.datasets),
        set_training_datasets: !a.datasets.is_empty(),
        pretraining_datasets: split_list(&a.pretraining_datasets),
        set_pretraining_datasets: !a.pretraining_datasets.is_empty()
            || a.clear_pretraining_datasets,
        task: a.task.clone(),
        architecture: a.architecture.clone(),
        visual_category: a.visual_category.clone(),
        source_uri: a.source_uri.clone(),
        license: a.license.clone(),
        tags: a
            .tags
            .iter()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect(),
        set_tags: !a.tags.is_empty() || a.clear_tags,
        name: a.name.clone(),
    };
    (u != MetaUpdate::default()).then_some(u)
}

/// `filterdb update`.
pub async fn update(ctx: &Ctx, a: UpdateArgs) -> anyhow::Result<()> {
    let Some(u) = meta_update(&a) else {
        bail!(
            "nothing to update: give at least one of --name, --dataset, --pretraining-dataset, --task, \
             --architecture, --visual-category, --source-uri, --license, --tag, --clear-tags"
        );
    };
    let mut c = ctx.connect().await?;
    let m = c.update_model_meta(model_ref(&a.model), u).await?;
    if ctx.json {
        return emit_json(&model_to_json(&m));
    }
    Ok(emit(&format!("updated {}", model_text(&m)))?)
}

/// `filterdb delete`.
pub async fn delete(ctx: &Ctx, a: DeleteArgs) -> anyhow::Result<()> {
    let interactive = std::io::stdin().is_terminal();
    if !a.yes && !interactive {
        bail!(
            "refusing to delete `{}` without --yes: stdin is not a terminal to confirm on",
            a.model
        );
    }
    let mut c = ctx.connect().await?;
    let mut target = model_ref(&a.model);
    if !a.yes {
        let m = c.get_model(target).await?;
        eprint!(
            "Delete model {} `{}` ({} layers, {} filters)? [y/N] ",
            m.model_id, m.name, m.n_layers, m.n_filters
        );
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
            eprintln!("cancelled; nothing was deleted");
            return Ok(());
        }
        // Delete by id: a rename between the question and the answer must not redirect a name.
        target = ModelRef {
            r#ref: Some(mref::Ref::Id(m.model_id)),
        };
    }
    let m = c.delete_model(target).await?;
    if ctx.json {
        return emit_json(&json!({ "deleted": model_to_json(&m) }));
    }
    Ok(emit(&format!(
        "deleted model {} `{}` ({} layers, {} filters)\n",
        m.model_id, m.name, m.n_layers, m.n_filters
    ))?)
}

/// `filterdb vocab`.
pub async fn vocab(ctx: &Ctx) -> anyhow::Result<()> {
    let mut c = ctx.connect().await?;
    let v = c.get_vocabularies().await?;
    if ctx.json {
        return emit_json(&vocabularies_to_json(&v));
    }
    let mut out = format!("vocabulary version {}\n", v.version);
    for voc in &v.vocabularies {
        let with_category = voc.entries.iter().any(|e| !e.visual_category.is_empty());
        let mut headers = vec!["canonical", "aliases"];
        if with_category {
            headers.push("visual category");
        }
        let mut t = table(&headers, &[]);
        for e in &voc.entries {
            let mut row = vec![e.canonical.clone(), e.aliases.join(", ")];
            if with_category {
                row.push(e.visual_category.clone());
            }
            t.add_row(row);
        }
        let _ = writeln!(out, "\n{} ({} entries)\n{t}", voc.kind, voc.entries.len());
    }
    Ok(emit(&out)?)
}

/// The `--where` syntax, from the grammar in `filterdb_proto::expr`.
pub const WHERE_HELP: &str = r#"--where EXPR selects layers (and so filters and models) by model and layer meta.

Grammar:
  expr    := or
  or      := and ("or" and)*
  and     := unary ("and" unary)*
  unary   := "not" unary | "(" expr ")" | compare
  compare := FIELD ("=" | "!=" | "<" | "<=" | ">" | ">=") VALUE
           | FIELD ["not"] "in" "(" VALUE ("," VALUE)* ")"
           | FIELD "between" NUMBER "and" NUMBER
  VALUE   := bare word (letters, digits, . _ - + / : @) | "double quoted" | 'single quoted'

Keywords (and, or, not, in, between) are case-insensitive; `not` binds tighter than `and`,
which binds tighter than `or`. `between` includes both ends.

Text fields compare canonical labels: values are normalised through the server's vocabularies,
case-insensitively, so `dataset = ILSVRC2012` matches models labelled `imagenet`.
  model                          model name
  dataset, training_dataset      matches if any training dataset matches
  pretraining_dataset
  task
  architecture, arch             family, e.g. ResNet
  variant, architecture_variant  e.g. resnet50
  visual_category, category
  format                         onnx | pytorch | safetensors
  producer
  tag
  license
  depth_definition               graph_longest_path | weight_order

Numeric fields (<, <=, >, >=, between; = and in compare numbers):
  conv_depth, conv_depth_norm, layer_index, in_channels, out_channels,
  n_filters (filters in the layer), model_id, layer_id, opset

Group-by only (census --group-by):
  depth_decile        conv_depth_norm deciles "[0.0, 0.1]", "(0.1, 0.2]", ... "(0.9, 1.0]"
  depth_decile_first  "first" (conv_depth 0), then "(0.0, 0.1]" ... "(0.9, 1.0]"

Examples:
  filterdb models --where 'task = Classification and dataset in (imagenet, cifar10)'
  filterdb layers resnet50 --where 'conv_depth_norm <= 0.5'
  filterdb census --group-by architecture --where 'not architecture = VGG'
  filterdb census --group-by task,depth_decile --where 'format = onnx and in_channels > 1'
  filterdb models --where 'visual_category = "medical xray" or tag = gan'
  filterdb census --where 'layer_index between 0 and 3 and model not in (a, b)'
"#;

/// `filterdb where-help`.
pub fn where_help(ctx: &Ctx) -> anyhow::Result<()> {
    if ctx.json {
        let fields: Vec<&str> = FIELD_NAMES.iter().map(|(n, _)| *n).collect();
        return emit_json(&json!({ "fields": fields, "help": WHERE_HELP }));
    }
    Ok(emit(WHERE_HELP)?)
}

#[cfg(test)]
mod tests {
    use super::super::{Cli, Command};
    use super::*;
    use clap::Parser;

    #[test]
    fn help_names_every_field() {
        for (name, _) in FIELD_NAMES {
            assert!(
                WHERE_HELP.contains(name),
                "where-help does not mention `{name}`"
            );
        }
        // Every example's expression must parse.
        for line in WHERE_HELP.lines().filter(|l| l.contains("--where '")) {
            let expr = line.split('\'').nth(1).unwrap();
            assert!(
                selection(Some(expr)).is_ok(),
                "example does not parse: {expr}"
            );
        }
    }

    #[test]
    fn update_flags() {
        let parse = |args: &[&str]| match Cli::try_parse_from(
            ["filterdb", "update"]
                .iter()
                .copied()
                .chain(args.iter().copied()),
        )
        .unwrap()
        .command
        {
            Command::Update(a) => a,
            _ => unreachable!(),
        };
        assert!(meta_update(&parse(&["m"])).is_none());
        let u = meta_update(&parse(&["m", "--dataset", "a,b", "--task", "Segmentation"])).unwrap();
        assert!(u.set_training_datasets && !u.set_tags && !u.set_pretraining_datasets);
        assert_eq!(u.training_datasets, vec!["a", "b"]);
        assert_eq!(u.task.as_deref(), Some("Segmentation"));
        assert_eq!(u.name, None);
        let u = meta_update(&parse(&["m", "--clear-tags"])).unwrap();
        assert!(u.set_tags && u.tags.is_empty());
        let u = meta_update(&parse(&["m", "--name", "n2", "--tag", "x", "--tag", "y"])).unwrap();
        assert_eq!(
            (u.name.as_deref(), u.tags.clone()),
            (Some("n2"), vec!["x".to_string(), "y".to_string()])
        );
    }

    #[test]
    fn export_helpers() {
        let mut r = IdRanges::default();
        r.add(10, 5);
        r.add(15, 5);
        r.add(30, 1);
        assert_eq!(r.0, vec![(10, 20), (30, 31)]);
        let mut b = FilterBatch {
            count: 4,
            kernels: vec![1u8; 4 * KERNEL_BYTES],
            ..Default::default()
        };
        truncate_batch(&mut b, 10);
        assert_eq!(b.count, 4);
        truncate_batch(&mut b, 3);
        assert_eq!((b.count, b.kernels.len()), (3, 3 * KERNEL_BYTES));
    }

    #[test]
    fn model_details_flag_unknown_labels() {
        let m = Model {
            model_id: 3,
            name: "tiny".into(),
            meta: Some(filterdb_client::proto::NormalizedMeta {
                training_datasets: vec![Label {
                    raw: "mystery".into(),
                    canonical: "mystery".into(),
                    known: false,
                }],
                task: Some(Label {
                    raw: "classification".into(),
                    canonical: "Classification".into(),
                    known: true,
                }),
                ..Default::default()
            }),
            kernel_shape_counts: [("3x3".to_string(), 10u64), ("1x1".to_string(), 20)]
                .into_iter()
                .collect(),
            ..Default::default()
        };
        let s = model_text(&m);
        assert!(s.contains("model 3 `tiny`"), "{s}");
        assert!(s.contains("NO (not in the vocabulary)"), "{s}");
        assert!(s.contains("1 label(s) unknown"), "{s}");
        assert!(s.contains("Classification"), "{s}");
        assert!(s.contains("1x1") && s.contains("kernel shapes"), "{s}");
    }
}
