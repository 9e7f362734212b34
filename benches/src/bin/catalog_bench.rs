//! The catalog benchmark: per-operation latency of a sandbox create, a
//! lookup by name and by id, and a page of a listing, as the catalog
//! grows to 1,000, 10,000 and 100,000 sandbox records, on `file://` and
//! on an S3 server (moto's). Flat rows mean the catalog does not slow
//! down as it grows.
//!
//! `benches/run-catalog-bench.sh` starts moto and runs this; see the
//! README's "Catalog" section. The figures also go to `--json-out`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use cairn_benches::{machine_state, median, quantile, Table};
use cairn_engine::catalog::{sandbox, NewSandbox, SandboxSource};
use cairn_engine::objstore::{FileStore, ObjectStore, Resilient, RetryPolicy, S3Options, S3Store};
use cairn_engine::ManifestId;
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Catalog sizes to measure at, in sandbox records.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    sizes: Vec<usize>,
    /// Timed operations of each kind at each size.
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// Records in a listed page.
    #[arg(long, default_value_t = 100)]
    page: usize,
    /// Creates in flight while the catalog is filled.
    #[arg(long, default_value_t = 32)]
    fill_concurrency: usize,
    /// Which stores: `file` and/or `s3` (needs --s3-endpoint).
    #[arg(long, value_delimiter = ',', default_value = "file,s3")]
    stores: Vec<String>,
    /// An S3 server (moto's, as benches/run-catalog-bench.sh starts it).
    #[arg(long, env = "CAIRN_TEST_MOTO_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// Where the figures go as JSON.
    #[arg(long, default_value = "target/bench/catalog.json")]
    json_out: PathBuf,
}

const PROJECT: &str = "bench";

fn new_sandbox(i: usize, img: ManifestId) -> NewSandbox {
    NewSandbox {
        project: PROJECT.to_owned(),
        // One in ten named, as a platform's mix might be.
        name: i.is_multiple_of(10).then(|| format!("sb-{i:08}")),
        source: SandboxSource::Image(img),
        host: "bench".to_owned(),
    }
}

async fn fill(
    store: &Arc<dyn ObjectStore>,
    from: usize,
    to: usize,
    img: ManifestId,
    concurrency: usize,
) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for i in from..to {
        if tasks.len() >= concurrency {
            ids.push(tasks.join_next().await.expect("a task")??);
        }
        let store = store.clone();
        tasks.spawn(async move {
            anyhow::Ok(
                sandbox::create(store.as_ref(), new_sandbox(i, img))
                    .await?
                    .id,
            )
        });
    }
    while let Some(t) = tasks.join_next().await {
        ids.push(t??);
    }
    Ok(ids)
}

/// p50 and p99 of latencies in seconds, as whole µs.
fn micros(samples: Vec<f64>) -> [u64; 2] {
    [
        (median(samples.clone()) * 1e6).round() as u64,
        (quantile(samples, 0.99) * 1e6).round() as u64,
    ]
}

/// Measures at each size; returns one JSON object per size.
async fn run(
    name: &str,
    store: Arc<dyn ObjectStore>,
    args: &Args,
) -> Result<Vec<serde_json::Value>> {
    let img = ManifestId::of(b"catalog bench image");
    let mut table = Table::new(&[
        "records",
        "create p50 µs",
        "p99",
        "by name p50",
        "p99",
        "by id p50",
        "p99",
        "page p50",
        "p99",
        "fill s",
    ]);
    let mut have = 0;
    let mut ids: Vec<String> = Vec::new();
    let mut rows = Vec::new();
    for &size in &args.sizes {
        let t = Instant::now();
        ids.extend(fill(&store, have, size, img, args.fill_concurrency).await?);
        let fill_s = t.elapsed().as_secs_f64();
        have = size;
        let s = store.as_ref();
        let mut rng = fastrand::Rng::with_seed(size as u64);
        let (mut create, mut by_name, mut by_id, mut page) = (vec![], vec![], vec![], vec![]);
        for k in 0..args.samples {
            let t = Instant::now();
            let made = sandbox::create(s, new_sandbox(have + k, img)).await?;
            create.push(t.elapsed().as_secs_f64());
            ids.push(made.id);

            let n = rng.usize(..have / 10) * 10;
            let t = Instant::now();
            let found = sandbox::get(s, PROJECT, &format!("sb-{n:08}")).await?;
            by_name.push(t.elapsed().as_secs_f64());
            found.context("a named sandbox is missing")?;

            // Unnamed ones: ids of records that are not named.
            let id = &ids[rng.usize(..ids.len())];
            let t = Instant::now();
            let found = sandbox::get(s, PROJECT, id).await?;
            by_id.push(t.elapsed().as_secs_f64());
            found.context("a sandbox is missing by id")?;

            let start = format!("{:x}", rng.u8(..16));
            let t = Instant::now();
            let (keys, _) = sandbox::list_page(s, PROJECT, Some(&start), args.page).await?;
            page.push(t.elapsed().as_secs_f64());
            anyhow::ensure!(keys.len() == args.page, "a short page: {}", keys.len());
        }
        have += args.samples;
        let ops = [
            ("create", micros(create)),
            ("by_name", micros(by_name)),
            ("by_id", micros(by_id)),
            ("page", micros(page)),
        ];
        let mut cells = vec![size.to_string()];
        cells.extend(ops.iter().flat_map(|(_, q)| q.map(|us| us.to_string())));
        cells.push(format!("{fill_s:.1}"));
        table.row(cells);
        let mut row = serde_json::json!({ "records": size, "fill_s": fill_s });
        for (op, [p50, p99]) in ops {
            row[op] = serde_json::json!({ "p50_us": p50, "p99_us": p99 });
        }
        rows.push(row);
    }
    println!(
        "\n{name}: {} samples per operation per size, pages of {}",
        args.samples, args.page
    );
    table.print();
    Ok(rows)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new()?;
    let mut stores = serde_json::Map::new();
    for which in &args.stores {
        match which.as_str() {
            "file" => {
                let dir = tempfile::tempdir()?;
                let store: Arc<dyn ObjectStore> = Arc::new(FileStore::open(dir.path())?);
                let rows = rt.block_on(run(
                    &format!("file://{}", dir.path().display()),
                    store,
                    &args,
                ))?;
                stores.insert("file".into(), rows.into());
            }
            "s3" => {
                let endpoint = args
                    .s3_endpoint
                    .clone()
                    .context("--s3-endpoint (or CAIRN_TEST_MOTO_ENDPOINT) is needed for s3")?;
                let bucket = format!("catalog-bench-{:08x}", fastrand::u32(..));
                let opts = S3Options {
                    bucket: bucket.clone(),
                    prefix: "store".to_owned(),
                    endpoint: Some(endpoint.clone()),
                    region: Some("us-east-1".to_owned()),
                    path_style: Some(true),
                    part_size: None,
                    static_credentials: Some(("bench".to_owned(), "bench".to_owned())),
                };
                let rows = rt.block_on(async {
                    let s3 = S3Store::connect(&opts).await;
                    s3.ensure_bucket().await?;
                    let store: Arc<dyn ObjectStore> =
                        Arc::new(Resilient::new(Arc::new(s3), RetryPolicy::default(), 64));
                    run(&format!("s3://{bucket}/store at {endpoint}"), store, &args).await
                })?;
                stores.insert("s3".into(), rows.into());
            }
            other => anyhow::bail!("unknown store `{other}`: file or s3"),
        }
    }
    let json = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "samples": args.samples,
        "page": args.page,
        "fill_concurrency": args.fill_concurrency,
        "machine": machine_state(),
        "stores": stores,
    });
    if let Some(dir) = args.json_out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json_out, serde_json::to_vec_pretty(&json)?)?;
    println!("  JSON: {}", args.json_out.display());
    Ok(())
}
