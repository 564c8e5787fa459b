//! Command-line arguments of `filterdb` and the dispatch to the commands.

mod analytics;
mod backup;
mod cnnfdb;
mod commands;
mod export;
mod ingest;
mod jobs;
mod manifest;
mod nearest;
mod search_index;
mod profile;
mod render;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use filterdb_client::proto::{Field, Format};
use filterdb_client::{Client, ClientError, DEFAULT_SERVER};

/// Command-line client for FilterDB, the database of trained CNN 3x3 convolution filters.
#[derive(Debug, Parser)]
#[command(name = "filterdb", version, about, long_about = None)]
pub struct Cli {
    /// FilterDB server address ("http://host:port" or "host:port").
    #[arg(long, global = true, env = "FILTERDB_SERVER", default_value = DEFAULT_SERVER, value_name = "URL")]
    pub server: String,
    /// Machine output: one JSON document per command on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// Bearer token for a server with authentication on.
    #[arg(long, global = true, env = "FILTERDB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA certificate to verify an `https://` server with.
    #[arg(long, global = true, env = "FILTERDB_CA_CERT", value_name = "PEM")]
    pub ca_cert: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Upload checkpoints (ONNX, PyTorch, safetensors) and store their 3x3 filters.
    Ingest(IngestArgs),
    /// List models, optionally only those with layers matching --where.
    Models(ModelsArgs),
    /// Show one model: file facts, labels (raw → canonical) and kernel shape counts.
    Model(ModelArgs),
    /// List a model's 3x3 layers.
    Layers(LayersArgs),
    /// Print or export raw 3x3 kernels of a model, a layer, a channel or a filter-id range.
    Filters(FiltersArgs),
    /// Count models, layers and filters, grouped by meta fields.
    Census(CensusArgs),
    /// Change a model's labels; every flag given replaces the stored value.
    Update(UpdateArgs),
    /// Delete a model with all its layers and filters.
    Delete(DeleteArgs),
    /// Print the label vocabularies the server normalises with.
    Vocab,
    /// Explain the --where expression syntax.
    WhereHelp,
    /// PCA basis (mean, eigenfilters, explained variance) of a selection, optionally per group.
    Basis(analytics::BasisArgs),
    /// Pin the reference basis and recompute every layer's coefficient histograms against it.
    PinBasis(analytics::PinBasisArgs),
    /// Compare the bases of two selections: |cos| matrix, matching, principal angles, EVR.
    CompareBases(analytics::CompareBasesArgs),
    /// Coefficient distributions in the pinned basis, per group; ridge plots with --plot.
    Distributions(analytics::DistributionsArgs),
    /// Drift D (symmetric KL of coefficient distributions) between every pair of groups.
    Drift(analytics::DriftArgs),
    /// Quality metrics per layer (sparsity, entropy, orthogonality, degeneration flags).
    Quality(analytics::QualityArgs),
    /// Models ranked by their degenerate layers.
    Degenerate(analytics::DegenerateArgs),
    /// A quality metric per model and depth bin; boxplots across models with --plot.
    DepthProfile(analytics::DepthProfileArgs),
    /// 2-D density of two coefficient components, plotted on a log colour scale.
    Density(analytics::DensityArgs),
    /// The k stored filters nearest to a kernel or a stored filter (exact scan).
    Nearest(nearest::NearestArgs),
    /// The approximate search index: state, or `rebuild [--retrain]` (admin).
    SearchIndex(search_index::SearchIndexArgs),
    /// Write a point-in-time Parquet snapshot of the whole database (on the server's host).
    Snapshot(export::SnapshotArgs),
    /// Scheduled-ingestion sources and the state of every item they have seen
    Jobs(jobs::JobsArgs),
    /// Profile a checkpoint against the database: per-layer quality and drift to every group
    Profile(profile::ProfileArgs),
    /// Write the layers and filters of a selection as a Parquet dataset (on the server's host).
    Export(export::ExportArgs),
    /// Write an online RocksDB checkpoint (a restorable data directory) on the server's host.
    Backup(backup::BackupArgs),
    /// Import the CNN Filter DB release (HDF5 filters + meta Parquet, on the server's host); resumable.
    ImportCnnfdb(cnnfdb::ImportCnnFdbArgs),
}

/// Checkpoint container format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// Detect from the file's leading bytes (the default).
    Auto,
    /// ONNX model.
    Onnx,
    /// torch.save output (zip, legacy pickle or tar).
    Pytorch,
    /// safetensors file.
    Safetensors,
}

impl FormatArg {
    /// The proto value.
    pub fn to_proto(self) -> Format {
        match self {
            FormatArg::Auto => Format::Unspecified,
            FormatArg::Onnx => Format::Onnx,
            FormatArg::Pytorch => Format::Pytorch,
            FormatArg::Safetensors => Format::Safetensors,
        }
    }
}

/// Arguments of `ingest`.
#[derive(Debug, Args)]
#[command(
    after_help = "With several files, give each its own name in a manifest:\n\n  \
    [[model]]\n  file = \"resnet50.onnx\"          # relative to the manifest's folder\n  \
    name = \"resnet50_imagenet\"\n  datasets = [\"imagenet\"]         # or \"imagenet, places365\"\n  \
    task = \"Classification\"\n  architecture = \"ResNet-50\"\n  \
    # optional: visual_category, pretraining_datasets, source_uri, license, tags, format, replace\n\n\
    Flags given with --manifest are defaults for entries that leave a key out."
)]
pub struct IngestArgs {
    /// Checkpoint file(s) to upload.
    #[arg(
        value_name = "FILE",
        required_unless_present = "manifest",
        conflicts_with = "manifest"
    )]
    pub files: Vec<PathBuf>,
    /// TOML manifest with one [[model]] table per checkpoint.
    #[arg(long, value_name = "FILE.toml")]
    pub manifest: Option<PathBuf>,
    /// Model name (letters, digits and . _ - + @).
    #[arg(
        long,
        value_name = "NAME",
        required_unless_present = "manifest",
        conflicts_with = "manifest"
    )]
    pub model: Option<String>,
    /// Training dataset(s); repeat the flag or give a comma list.
    #[arg(
        long = "dataset",
        value_name = "D",
        value_delimiter = ',',
        required_unless_present = "manifest"
    )]
    pub datasets: Vec<String>,
    /// Task, e.g. Classification, Segmentation, GAN-Generator.
    #[arg(long, value_name = "T", required_unless_present = "manifest")]
    pub task: Option<String>,
    /// Architecture as published, e.g. ResNet-50, VGG16, UNet.
    #[arg(long, value_name = "A", required_unless_present = "manifest")]
    pub architecture: Option<String>,
    /// Visual category of the training data (default: the first dataset's).
    #[arg(long, value_name = "C")]
    pub visual_category: Option<String>,
    /// Pre-training dataset(s); repeat the flag or give a comma list.
    #[arg(long = "pretraining-dataset", value_name = "P", value_delimiter = ',')]
    pub pretraining_datasets: Vec<String>,
    /// Where the checkpoint came from (URL or path).
    #[arg(long, value_name = "U")]
    pub source_uri: Option<String>,
    /// License of the weights.
    #[arg(long, value_name = "L")]
    pub license: Option<String>,
    /// Free tag; repeatable.
    #[arg(long = "tag", value_name = "T")]
    pub tags: Vec<String>,
    /// Container format; detected from the bytes when not given.
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// Replace an existing model of the same name instead of failing.
    #[arg(long)]
    pub replace: bool,
}

/// Arguments of `models`.
#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// Only models with at least one layer matching this expression (see `filterdb where-help`).
    #[arg(long = "where", value_name = "EXPR")]
    pub where_: Option<String>,
}

/// Arguments of `model`.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Model id or name.
    pub model: String,
}

/// Arguments of `layers`.
#[derive(Debug, Args)]
pub struct LayersArgs {
    /// Model id or name.
    pub model: String,
    /// Only layers matching this expression (see `filterdb where-help`).
    #[arg(long = "where", value_name = "EXPR")]
    pub where_: Option<String>,
}

/// Arguments of `filters`.
#[derive(Debug, Args)]
pub struct FiltersArgs {
    /// Model id or name.
    #[arg(required_unless_present = "ids", conflicts_with = "ids")]
    pub model: Option<String>,
    /// Layer index within the model (0-based).
    #[arg(long, value_name = "L")]
    pub layer: Option<u32>,
    /// Output channel of the layer: its in_channels filters.
    #[arg(long, value_name = "O", requires = "layer")]
    pub channel: Option<u32>,
    /// Filter-id range, end exclusive.
    #[arg(long, value_name = "START:END", value_parser = parse_id_range, conflicts_with_all = ["layer", "channel"])]
    pub ids: Option<(u64, u64)>,
    /// Stop after N filters.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    /// Write the little-endian float32 kernels, exactly as received, to this file.
    #[arg(long, value_name = "OUT.f32")]
    pub raw: Option<PathBuf>,
}

/// Arguments of `census`.
#[derive(Debug, Args)]
pub struct CensusArgs {
    /// Group by this field (repeatable or comma list), e.g. task, architecture, depth_decile.
    #[arg(long = "group-by", value_name = "FIELD", value_parser = parse_field, value_delimiter = ',')]
    pub group_by: Vec<Field>,
    /// Only layers matching this expression (see `filterdb where-help`).
    #[arg(long = "where", value_name = "EXPR")]
    pub where_: Option<String>,
}

/// Arguments of `update`.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Model id or name.
    pub model: String,
    /// New model name.
    #[arg(long, value_name = "N")]
    pub name: Option<String>,
    /// Training datasets (replace the list); repeat the flag or give a comma list.
    #[arg(long = "dataset", value_name = "D", value_delimiter = ',')]
    pub datasets: Vec<String>,
    /// Pre-training datasets (replace the list); repeat the flag or give a comma list.
    #[arg(long = "pretraining-dataset", value_name = "P", value_delimiter = ',')]
    pub pretraining_datasets: Vec<String>,
    /// Clear the pre-training datasets.
    #[arg(long, conflicts_with = "pretraining_datasets")]
    pub clear_pretraining_datasets: bool,
    /// Task.
    #[arg(long, value_name = "T")]
    pub task: Option<String>,
    /// Architecture.
    #[arg(long, value_name = "A")]
    pub architecture: Option<String>,
    /// Visual category.
    #[arg(long, value_name = "C")]
    pub visual_category: Option<String>,
    /// Source URI.
    #[arg(long, value_name = "U")]
    pub source_uri: Option<String>,
    /// License.
    #[arg(long, value_name = "L")]
    pub license: Option<String>,
    /// Tags (replace the list); repeatable.
    #[arg(long = "tag", value_name = "T")]
    pub tags: Vec<String>,
    /// Remove all tags.
    #[arg(long, conflicts_with = "tags")]
    pub clear_tags: bool,
}

/// Arguments of `delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Model id or name.
    pub model: String,
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// Parses `START:END` (end exclusive).
fn parse_id_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}` is not START:END"))?;
    let start = a
        .trim()
        .parse::<u64>()
        .map_err(|_| format!("`{a}` is not a filter id"))?;
    let end = b
        .trim()
        .parse::<u64>()
        .map_err(|_| format!("`{b}` is not a filter id"))?;
    if end < start {
        return Err(format!("the range {start}:{end} ends before it starts"));
    }
    Ok((start, end))
}

/// Parses a field name of the `--where` syntax.
fn parse_field(s: &str) -> Result<Field, String> {
    filterdb_client::proto::expr::field_by_name(s.trim()).ok_or_else(|| {
        let names: Vec<&str> = filterdb_client::proto::expr::FIELD_NAMES
            .iter()
            .map(|(n, _)| *n)
            .collect();
        format!("unknown field `{s}`; fields: {}", names.join(", "))
    })
}

/// What every command needs: where the server is and how to print.
pub struct Ctx {
    /// Server URL as given.
    pub server: String,
    /// JSON output instead of tables.
    pub json: bool,
    /// Bearer token, if any.
    pub token: Option<String>,
    /// CA certificate for TLS, if any.
    pub ca_cert: Option<PathBuf>,
}

impl Ctx {
    /// Connects to the server.
    pub async fn connect(&self) -> Result<Client, ClientError> {
        let tls = match &self.ca_cert {
            Some(p) => {
                let pem = std::fs::read(p).map_err(|e| {
                    ClientError::Status(tonic::Status::invalid_argument(format!("--ca-cert {}: {e}", p.display())))
                })?;
                Some(tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(pem)))
            }
            None => None,
        };
        Client::connect_with(&self.server, self.token.as_deref(), tls).await
    }
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let ctx = Ctx {
        server: cli.server,
        json: cli.json,
        token: cli.token,
        ca_cert: cli.ca_cert,
    };
    match cli.command {
        Command::Ingest(a) => return ingest::run(&ctx, a).await,
        Command::Models(a) => commands::models(&ctx, a).await?,
        Command::Model(a) => commands::model(&ctx, a).await?,
        Command::Layers(a) => commands::layers(&ctx, a).await?,
        Command::Filters(a) => commands::filters(&ctx, a).await?,
        Command::Census(a) => commands::census(&ctx, a).await?,
        Command::Update(a) => commands::update(&ctx, a).await?,
        Command::Delete(a) => commands::delete(&ctx, a).await?,
        Command::Vocab => commands::vocab(&ctx).await?,
        Command::WhereHelp => commands::where_help(&ctx)?,
        Command::Basis(a) => analytics::basis(&ctx, a).await?,
        Command::PinBasis(a) => analytics::pin_basis(&ctx, a).await?,
        Command::CompareBases(a) => analytics::compare_bases(&ctx, a).await?,
        Command::Distributions(a) => analytics::distributions(&ctx, a).await?,
        Command::Drift(a) => analytics::drift(&ctx, a).await?,
        Command::Quality(a) => analytics::quality(&ctx, a).await?,
        Command::Degenerate(a) => analytics::degenerate(&ctx, a).await?,
        Command::DepthProfile(a) => analytics::depth_profile(&ctx, a).await?,
        Command::Density(a) => analytics::density(&ctx, a).await?,
        Command::Nearest(a) => nearest::nearest(&ctx, a).await?,
        Command::SearchIndex(a) => search_index::run(&ctx, a).await?,
        Command::Snapshot(a) => export::snapshot(&ctx, a).await?,
        Command::Jobs(a) => jobs::run(&ctx, a).await?,
        Command::Profile(a) => profile::run(&ctx, a).await?,
        Command::Export(a) => export::export(&ctx, a).await?,
        Command::Backup(a) => backup::run(&ctx, a).await?,
        Command::ImportCnnfdb(a) => cnnfdb::run(&ctx, a).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// An error with its causes joined by `: `, skipping causes whose text is already shown (many
/// errors repeat their source in their own message).
pub fn render_error(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if out.contains(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}

/// True when the error is stdout closing early, which is not a failure of the command.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("filterdb").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn ingest_single_file() {
        let cli = parse(&[
            "ingest",
            "a.onnx",
            "--model",
            "m1",
            "--dataset",
            "imagenet,cifar10",
            "--dataset",
            "places365",
            "--task",
            "Classification",
            "--architecture",
            "ResNet-50",
            "--tag",
            "x",
            "--tag",
            "y",
            "--format",
            "onnx",
            "--replace",
            "--server",
            "10.0.0.1:5",
            "--json",
        ])
        .unwrap();
        assert_eq!(cli.server, "10.0.0.1:5");
        assert!(cli.json);
        let Command::Ingest(a) = cli.command else {
            panic!()
        };
        assert_eq!(a.files, vec![PathBuf::from("a.onnx")]);
        assert_eq!(a.datasets, vec!["imagenet", "cifar10", "places365"]);
        assert_eq!(a.tags, vec!["x", "y"]);
        assert_eq!(a.format, Some(FormatArg::Onnx));
        assert!(a.replace);
    }

    #[test]
    fn ingest_requirements() {
        // Files need the labels.
        assert!(parse(&["ingest", "a.onnx", "--model", "m"]).is_err());
        // A manifest alone is enough, and excludes files and --model.
        assert!(parse(&["ingest", "--manifest", "m.toml"]).is_ok());
        assert!(
            parse(&[
                "ingest",
                "--manifest",
                "m.toml",
                "--task",
                "Classification",
                "--replace"
            ])
            .is_ok()
        );
        assert!(parse(&["ingest", "--manifest", "m.toml", "a.onnx"]).is_err());
        assert!(parse(&["ingest", "--manifest", "m.toml", "--model", "x"]).is_err());
        assert!(
            parse(&[
                "ingest",
                "a",
                "--model",
                "m",
                "--dataset",
                "d",
                "--task",
                "t",
                "--architecture",
                "a",
                "--format",
                "tf"
            ])
            .is_err()
        );
    }

    #[test]
    fn filters_forms() {
        let cli = parse(&["filters", "--ids", "10:20", "--raw", "out.f32"]).unwrap();
        let Command::Filters(a) = cli.command else {
            panic!()
        };
        assert_eq!(a.ids, Some((10, 20)));
        assert_eq!(a.raw, Some(PathBuf::from("out.f32")));
        let cli = parse(&[
            "filters",
            "resnet",
            "--layer",
            "2",
            "--channel",
            "5",
            "--limit",
            "3",
        ])
        .unwrap();
        let Command::Filters(a) = cli.command else {
            panic!()
        };
        assert_eq!(
            (a.model.as_deref(), a.layer, a.channel, a.limit),
            (Some("resnet"), Some(2), Some(5), Some(3))
        );
        assert!(
            parse(&["filters", "m", "--channel", "1"]).is_err(),
            "--channel needs --layer"
        );
        assert!(parse(&["filters", "m", "--ids", "1:2"]).is_err());
        assert!(parse(&["filters"]).is_err());
        assert!(parse(&["filters", "--ids", "5:2"]).is_err());
        assert!(parse(&["filters", "--ids", "5"]).is_err());
    }

    #[test]
    fn census_fields() {
        let cli = parse(&[
            "census",
            "--group-by",
            "task,arch",
            "--group-by",
            "depth_decile",
            "--where",
            "format = onnx",
        ])
        .unwrap();
        let Command::Census(a) = cli.command else {
            panic!()
        };
        assert_eq!(
            a.group_by,
            vec![Field::Task, Field::Architecture, Field::DepthDecile]
        );
        assert_eq!(a.where_.as_deref(), Some("format = onnx"));
        let e = parse(&["census", "--group-by", "colour"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `colour`"), "{e}");
        assert!(parse(&["census", "--group-by", "DEPTH_DECILE_FIRST"]).is_ok());
    }

    #[test]
    fn update_and_delete() {
        let cli = parse(&[
            "update",
            "7",
            "--name",
            "n2",
            "--dataset",
            "a,b",
            "--clear-tags",
        ])
        .unwrap();
        let Command::Update(a) = cli.command else {
            panic!()
        };
        assert_eq!(a.datasets, vec!["a", "b"]);
        assert!(a.clear_tags && a.tags.is_empty());
        assert!(parse(&["update", "7", "--tag", "x", "--clear-tags"]).is_err());
        let cli = parse(&["delete", "m", "-y"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Delete(DeleteArgs { yes: true, .. })
        ));
        assert!(matches!(
            parse(&["where-help"]).unwrap().command,
            Command::WhereHelp
        ));
        assert!(matches!(parse(&["vocab"]).unwrap().command, Command::Vocab));
    }

    #[test]
    fn analytics_commands() {
        let cli = parse(&[
            "basis",
            "--where",
            "task = Classification",
            "--group-by",
            "depth_decile",
            "--raw",
            "--plot",
            "e.png",
            "--json",
        ])
        .unwrap();
        assert!(cli.json);
        let Command::Basis(a) = cli.command else {
            panic!()
        };
        assert_eq!(a.group_by, Some(Field::DepthDecile));
        assert!(a.raw);
        assert_eq!(a.plot, Some(PathBuf::from("e.png")));

        let Command::PinBasis(a) = parse(&["pin-basis"]).unwrap().command else {
            panic!()
        };
        assert_eq!((a.bins, a.where_), (70, None));
        assert!(parse(&["pin-basis", "--bins", "0"]).is_err());

        let Command::CompareBases(a) = parse(&["compare-bases", "--a", "task = x", "--b", ""])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!((a.a.as_str(), a.b.as_str()), ("task = x", ""));
        assert!(parse(&["compare-bases", "--a", "x = 1"]).is_err());

        let Command::Drift(a) = parse(&[
            "drift",
            "--group-by",
            "task",
            "--weights",
            "uniform",
            "--sort",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(a.group_by, Field::Task);
        assert_eq!(a.weights, analytics::WeightsArg::Uniform);
        assert!(a.sort);
        assert!(parse(&["drift"]).is_err(), "--group-by is required");
        let Command::Distributions(a) = parse(&[
            "distributions",
            "--bins",
            "341",
            "--range",
            "-3.3,3.3",
            "--group-by",
            "dataset",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(a.histogram.bins, Some(341));
        assert_eq!(a.histogram.range, Some((-3.3, 3.3)));
        assert_eq!(a.group_by, Some(Field::TrainingDataset));
        assert!(parse(&["drift", "--group-by", "task", "--range=-1,1"]).is_ok());
        assert!(parse(&["drift", "--group-by", "task", "--range", "1,-1"]).is_err());

        let Command::Quality(a) = parse(&["quality", "resnet", "--eps", "0.05", "--non-strict"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(a.model.as_deref(), Some("resnet"));
        assert_eq!(a.quality.eps, 0.05);
        assert!(a.quality.non_strict && !a.quality.scaled);
        assert!(parse(&["quality", "--where", "conv_depth = 0"]).is_ok());
        assert!(parse(&["quality"]).is_err(), "MODEL or --where");

        let Command::Degenerate(a) = parse(&["degenerate", "--by-count", "--limit", "5"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert!(a.by_count);
        assert_eq!(a.limit, Some(5));

        let Command::DepthProfile(a) = parse(&[
            "depth-profile",
            "--metric",
            "entropy-norm",
            "--binning",
            "depth_decile_first",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(a.metric, analytics::MetricArg::EntropyNorm);
        assert_eq!(a.binning, analytics::BinningArg::DepthDecileFirst);
        assert!(parse(&["depth-profile", "--binning", "depth-decile"]).is_ok());

        let Command::Density(a) = parse(&["density", "--i", "2", "--j", "5", "--plot", "d.svg"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!((a.i, a.j), (2, 5));
        assert!(parse(&["density", "--i", "9"]).is_err());
    }

    #[test]
    fn errors_render_once() {
        let e = anyhow::Error::from(ClientError::from(tonic::Status::not_found(
            "no model with id 9",
        )));
        assert_eq!(render_error(&e), "NOT_FOUND: no model with id 9");
        let e =
            anyhow::Error::from(std::io::Error::other("disk full")).context("cannot write out.f32");
        assert_eq!(render_error(&e), "cannot write out.f32: disk full");
        let e = filterdb_client::selection(Some("colour = red")).unwrap_err();
        let text = render_error(&anyhow::Error::from(e));
        assert_eq!(text.matches("unknown field").count(), 1, "{text}");
    }

    #[test]
    fn server_default() {
        // The env var may be set in a developer's shell; only check when it is not.
        if std::env::var_os("FILTERDB_SERVER").is_none() {
            assert_eq!(parse(&["models"]).unwrap().server, DEFAULT_SERVER);
        }
    }
}
