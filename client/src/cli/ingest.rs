//! `filterdb ingest`: uploads with a progress bar per file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use filterdb_client::json::{error_to_json, ingest_result_to_json, outcome_name};
use filterdb_client::proto::{
    IngestHeader, IngestPhase, IngestProgress, IngestResult, ModelMeta, NameConflict,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::manifest::{ManifestModel, parse_format, read_manifest, split_list};
use super::{Ctx, IngestArgs};

/// One file to upload with its header.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestJob {
    /// The checkpoint.
    pub path: PathBuf,
    /// Labels and options.
    pub header: IngestHeader,
}

fn non_empty(s: &Option<String>) -> Option<String> {
    s.as_ref()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The jobs a command line asks for: one file with `--model`, or a manifest whose entries fall
/// back to the flags for keys they leave out.
pub fn build_jobs(args: &IngestArgs) -> anyhow::Result<Vec<IngestJob>> {
    let cli_format = args.format.map(|f| f.to_proto());
    let conflict = |replace: bool| {
        (if replace {
            NameConflict::Replace
        } else {
            NameConflict::Error
        }) as i32
    };
    let jobs = if let Some(manifest) = &args.manifest {
        read_manifest(manifest)?
            .into_iter()
            .map(|m| job_from_manifest(m, args, cli_format, conflict))
            .collect::<anyhow::Result<Vec<_>>>()?
    } else {
        let name =
            non_empty(&args.model).ok_or_else(|| anyhow::anyhow!("--model NAME is required"))?;
        match args.files.len() {
            0 => bail!("no checkpoint file given"),
            1 => {}
            n => bail!(
                "{n} files were given but one --model name; each model needs its own name, so list them in a \
                 manifest and run `filterdb ingest --manifest FILE.toml` (see `filterdb ingest --help`)"
            ),
        }
        let meta = ModelMeta {
            name,
            training_datasets: split_list(&args.datasets),
            pretraining_datasets: split_list(&args.pretraining_datasets),
            task: non_empty(&args.task).unwrap_or_default(),
            architecture: non_empty(&args.architecture).unwrap_or_default(),
            visual_category: non_empty(&args.visual_category).unwrap_or_default(),
            source_uri: non_empty(&args.source_uri).unwrap_or_default(),
            license: non_empty(&args.license).unwrap_or_default(),
            tags: args
                .tags
                .iter()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect(),
        };
        vec![IngestJob {
            path: args.files[0].clone(),
            header: IngestHeader {
                meta: Some(meta),
                format: cli_format.unwrap_or_default() as i32,
                on_name_conflict: conflict(args.replace),
                ..Default::default()
            },
        }]
    };
    // Check every file before uploading any, so a typo in entry 40 does not strike after 39 uploads.
    let missing: Vec<String> = jobs
        .iter()
        .filter(|j| !j.path.is_file())
        .map(|j| j.path.display().to_string())
        .collect();
    if !missing.is_empty() {
        bail!("checkpoint file(s) not found: {}", missing.join(", "));
    }
    Ok(jobs)
}

fn job_from_manifest(
    m: ManifestModel,
    args: &IngestArgs,
    cli_format: Option<filterdb_client::proto::Format>,
    conflict: impl Fn(bool) -> i32,
) -> anyhow::Result<IngestJob> {
    let or_flag = |v: Option<String>, flag: &Option<String>| {
        non_empty(&v)
            .or_else(|| non_empty(flag))
            .unwrap_or_default()
    };
    let or_flags =
        |v: Vec<String>, flags: &[String]| if v.is_empty() { split_list(flags) } else { v };
    let format = match &m.format {
        Some(f) => parse_format(f)?,
        None => cli_format.unwrap_or_default(),
    };
    let meta = ModelMeta {
        name: m.name.trim().to_string(),
        training_datasets: or_flags(m.datasets, &args.datasets),
        pretraining_datasets: or_flags(m.pretraining_datasets, &args.pretraining_datasets),
        task: or_flag(m.task, &args.task),
        architecture: or_flag(m.architecture, &args.architecture),
        visual_category: or_flag(m.visual_category, &args.visual_category),
        source_uri: or_flag(m.source_uri, &args.source_uri),
        license: or_flag(m.license, &args.license),
        tags: or_flags(m.tags, &args.tags),
    };
    Ok(IngestJob {
        path: m.file,
        header: IngestHeader {
            meta: Some(meta),
            format: format as i32,
            on_name_conflict: conflict(m.replace.unwrap_or(args.replace)),
            ..Default::default()
        },
    })
}

fn style(template: &str) -> ProgressStyle {
    // The templates are constants; the fallback only guards against a typo in them.
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// A progress bar that follows the phases of one ingest.
struct FileBar {
    bar: ProgressBar,
    phase: i32,
}

impl FileBar {
    fn new(prefix: String, total: u64) -> FileBar {
        let bar = ProgressBar::new(total);
        bar.set_style(style(
            "{prefix:.bold} uploading [{wide_bar:.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec}",
        ));
        bar.set_prefix(prefix);
        FileBar {
            bar,
            phase: IngestPhase::Receiving as i32,
        }
    }

    fn update(&mut self, p: &IngestProgress) {
        if p.phase != self.phase {
            self.phase = p.phase;
            match IngestPhase::try_from(p.phase) {
                Ok(IngestPhase::Parsing) => {
                    self.bar
                        .set_style(style("{spinner} {prefix:.bold} parsing {elapsed}"));
                    self.bar.enable_steady_tick(Duration::from_millis(120));
                }
                Ok(IngestPhase::Statistics) | Ok(IngestPhase::Writing) => {
                    let what = if p.phase == IngestPhase::Statistics as i32 {
                        "statistics"
                    } else {
                        "writing"
                    };
                    self.bar.set_style(style(&format!(
                        "{{spinner}} {{prefix:.bold}} {what} [{{wide_bar:.cyan/blue}}] {{pos}}/{{len}} layers"
                    )));
                    self.bar.set_position(0);
                    self.bar.enable_steady_tick(Duration::from_millis(120));
                }
                _ => {}
            }
        }
        match IngestPhase::try_from(p.phase) {
            // Upload progress comes from both ends (bytes sent here, bytes received there);
            // only moving forward keeps the bar from jittering between them.
            Ok(IngestPhase::Receiving) if p.bytes_received > self.bar.position() => {
                self.bar.set_position(p.bytes_received);
            }
            Ok(IngestPhase::Statistics) | Ok(IngestPhase::Writing) if p.layers_total > 0 => {
                self.bar.set_length(p.layers_total as u64);
                self.bar.set_position(p.layers_done as u64);
            }
            _ => {}
        }
    }
}

/// One line describing a stored result.
pub fn result_line(file: &str, r: &IngestResult) -> String {
    let outcome = outcome_name(r.outcome);
    match &r.model {
        Some(m) => format!(
            "{outcome:<9} {file}: model {} `{}`, {} layers, {} filters",
            m.model_id, m.name, m.n_layers, m.n_filters
        ),
        None => format!("{outcome:<9} {file}"),
    }
}

/// Runs `ingest`; exits non-zero when any file failed.
pub async fn run(ctx: &Ctx, args: IngestArgs) -> anyhow::Result<ExitCode> {
    let jobs = build_jobs(&args)?;
    let mut client = ctx.connect().await?;
    let n = jobs.len();
    let mut results = Vec::with_capacity(n);
    let (mut failed, mut counts) = (0usize, std::collections::BTreeMap::<&str, usize>::new());
    for (i, job) in jobs.into_iter().enumerate() {
        let file = job.path.display().to_string();
        let total = std::fs::metadata(&job.path).map(|m| m.len()).unwrap_or(0);
        let short = job
            .path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.clone());
        let prefix = if n > 1 {
            format!("[{}/{n}] {short}", i + 1)
        } else {
            short
        };
        let mut bar = FileBar::new(prefix, total);
        let r = client
            .ingest_file(&job.path, job.header.clone(), |p| bar.update(p))
            .await;
        bar.bar.finish_and_clear();
        match r {
            Ok(res) => {
                *counts.entry(outcome_name(res.outcome)).or_default() += 1;
                if !ctx.json {
                    println!("{}", result_line(&file, &res));
                }
                let mut v = ingest_result_to_json(&res);
                v["file"] = json!(file);
                v["ok"] = json!(true);
                results.push(v);
            }
            Err(e) => {
                failed += 1;
                eprintln!("error: {e}");
                results.push(json!({ "file": file, "ok": false, "error": error_to_json(&e) }));
            }
        }
    }
    if ctx.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({ "results": results, "outcomes": counts, "failed": failed })
            )?
        );
    } else if n > 1 {
        let mut parts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        parts.push(format!("{failed} failed"));
        println!("{n} files: {}", parts.join(", "));
    }
    Ok(if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::super::{Cli, Command};
    use super::*;
    use clap::Parser;
    use filterdb_client::proto::{Format, IngestOutcome, Model};

    fn ingest_args(args: &[&str]) -> IngestArgs {
        let cli = Cli::try_parse_from(
            std::iter::once("filterdb")
                .chain(std::iter::once("ingest"))
                .chain(args.iter().copied()),
        )
        .unwrap();
        match cli.command {
            Command::Ingest(a) => a,
            _ => unreachable!(),
        }
    }

    fn tmp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("filterdb-cli-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn single_file_header() {
        let d = tmp_dir("single");
        let f = d.join("a.onnx");
        std::fs::write(&f, b"x").unwrap();
        let fs = f.to_str().unwrap();
        let a = ingest_args(&[
            fs,
            "--model",
            "m",
            "--dataset",
            "imagenet, cifar10",
            "--task",
            "Classification",
            "--architecture",
            "ResNet-50",
            "--tag",
            "t1",
            "--replace",
            "--format",
            "onnx",
        ]);
        let jobs = build_jobs(&a).unwrap();
        assert_eq!(jobs.len(), 1);
        let h = &jobs[0].header;
        let m = h.meta.as_ref().unwrap();
        assert_eq!(m.name, "m");
        assert_eq!(m.training_datasets, vec!["imagenet", "cifar10"]);
        assert_eq!(m.tags, vec!["t1"]);
        assert_eq!(h.format, Format::Onnx as i32);
        assert_eq!(h.on_name_conflict, NameConflict::Replace as i32);
        assert!(
            h.file_name.is_empty(),
            "filled by the library from the path"
        );

        let a = ingest_args(&[
            fs,
            fs,
            "--model",
            "m",
            "--dataset",
            "d",
            "--task",
            "t",
            "--architecture",
            "a",
        ]);
        let e = build_jobs(&a).unwrap_err().to_string();
        assert!(e.contains("--manifest"), "{e}");

        let a = ingest_args(&[
            "/nonexistent/q.pt",
            "--model",
            "m",
            "--dataset",
            "d",
            "--task",
            "t",
            "--architecture",
            "a",
        ]);
        assert!(
            build_jobs(&a)
                .unwrap_err()
                .to_string()
                .contains("not found")
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn manifest_entries_fall_back_to_flags() {
        let d = tmp_dir("manifest");
        std::fs::write(d.join("a.safetensors"), b"x").unwrap();
        std::fs::write(d.join("b.pt"), b"y").unwrap();
        let manifest = d.join("models.toml");
        std::fs::write(
            &manifest,
            "[[model]]\nfile = \"a.safetensors\"\nname = \"a\"\ndatasets = \"cifar10\"\narchitecture = \"VGG16\"\n\n\
             [[model]]\nfile = \"b.pt\"\nname = \"b\"\ntask = \"Segmentation\"\narchitecture = \"UNet\"\nformat = \"pytorch\"\nreplace = false\n",
        )
        .unwrap();
        let a = ingest_args(&[
            "--manifest",
            manifest.to_str().unwrap(),
            "--task",
            "Classification",
            "--dataset",
            "imagenet",
            "--replace",
        ]);
        let jobs = build_jobs(&a).unwrap();
        assert_eq!(jobs[0].path, d.join("a.safetensors"));
        let m0 = jobs[0].header.meta.as_ref().unwrap();
        assert_eq!(
            (m0.task.as_str(), m0.training_datasets.clone()),
            ("Classification", vec!["cifar10".to_string()])
        );
        assert_eq!(
            jobs[0].header.on_name_conflict,
            NameConflict::Replace as i32
        );
        assert_eq!(jobs[0].header.format, Format::Unspecified as i32);
        let m1 = jobs[1].header.meta.as_ref().unwrap();
        assert_eq!(
            (m1.task.as_str(), m1.training_datasets.clone()),
            ("Segmentation", vec!["imagenet".to_string()])
        );
        assert_eq!(jobs[1].header.on_name_conflict, NameConflict::Error as i32);
        assert_eq!(jobs[1].header.format, Format::Pytorch as i32);

        std::fs::write(
            &manifest,
            "[[model]]\nfile = \"missing.onnx\"\nname = \"c\"\n",
        )
        .unwrap();
        let e = build_jobs(&a).unwrap_err().to_string();
        assert!(e.contains("missing.onnx"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn result_lines() {
        let r = IngestResult {
            outcome: IngestOutcome::Unchanged as i32,
            model: Some(Model {
                model_id: 3,
                name: "tiny".into(),
                n_layers: 4,
                n_filters: 1234,
                ..Default::default()
            }),
        };
        assert_eq!(
            result_line("t.onnx", &r),
            "unchanged t.onnx: model 3 `tiny`, 4 layers, 1234 filters"
        );
    }
}
