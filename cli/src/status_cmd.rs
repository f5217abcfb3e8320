//! `lillm status`: a distributed job as the coordinator sees it — as text, JSON, or a stream
//! of updates.

use anyhow::Result;
use clap::Args;
use lillm_proto::net;
use lillm_proto::v1 as pb;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Coordinator address (host:port).
    #[arg(long, env = "LILLM_COORDINATOR", default_value = "127.0.0.1:7070")]
    coordinator: String,
    /// Keep printing the job as it changes.
    #[arg(long)]
    watch: bool,
    /// One JSON object per status (per line with --watch), for scripts.
    #[arg(long)]
    json: bool,
    /// List every member (by default a job of thousands shows its summary and the first
    /// members).
    #[arg(long)]
    members: bool,
    /// Only this node's members (a cheap question in a job of thousands).
    #[arg(long, conflicts_with = "watch")]
    node: Option<String>,
    /// CA certificate (PEM) of the coordinator's TLS certificate: dial it over TLS.
    #[arg(long, env = "LILLM_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
}

pub fn status(args: StatusArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let channel = net::connect(
            &args.coordinator,
            &net::ConnectSettings::with_tls_ca(args.tls_ca.clone()),
        )
        .await
        .map_err(|e| anyhow::anyhow!("the coordinator: {e}"))?;
        let mut c = pb::status_client::StatusClient::new(channel);
        let show = |job: &pb::JobStatus| {
            if args.json {
                println!("{}", status_json(job));
            } else {
                if args.watch && crate::interactive() {
                    print!("\x1b[2J\x1b[H");
                }
                print!("{}", status_text(job));
            }
        };
        let member_limit = if args.members { 0 } else { MEMBERS_SHOWN };
        if !args.watch {
            let job = c
                .get_status(pb::StatusRequest {
                    member_limit,
                    node: args.node.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            show(&job);
            return Ok(());
        }
        let mut stream = c
            .watch_status(pb::WatchStatusRequest {
                interval_ms: 1000,
                member_limit,
            })
            .await?
            .into_inner();
        while let Some(job) = stream.message().await? {
            show(&job);
            if !args.json && !crate::interactive() {
                println!();
            }
        }
        Ok(())
    })
}

/// Members listed without `--members`.
const MEMBERS_SHOWN: u32 = 64;

fn role_name(role: i32) -> &'static str {
    match pb::Role::try_from(role) {
        Ok(pb::Role::Trainer) => "trainer",
        Ok(pb::Role::Dataloader) => "dataloader",
        _ => "?",
    }
}

fn member_name(m: &pb::MemberStatus) -> String {
    m.id.as_ref().map_or("?".into(), |id| {
        format!("{}/{}{}", id.node, role_name(id.role), id.local_index)
    })
}

/// The job as a human reads it: its summary first, then the members listed.
pub fn status_text(job: &pb::JobStatus) -> String {
    let Some(summary) = job.summary else {
        // One node's members (--node): no summary of the job.
        return format!("generation {}\n{}", job.generation, members_table(job));
    };
    let mut out = format!(
        "job: generation {} ({}), {}/{} trainers ({} ranked) and {}/{} dataloaders on {} node(s), {} restart(s)\n",
        job.generation,
        job.phase,
        summary.trainers,
        job.expected_trainers,
        summary.ranked_trainers,
        summary.dataloaders,
        job.expected_dataloaders,
        summary.nodes,
        job.restarts
    );
    let fmt_opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_string(), f);
    out += &format!(
        "step {} (slowest trainer {}), loss {}, {:.0} tokens/s, MFU {}, longest silence {:.1}s\n",
        summary.step,
        summary.slowest_step,
        fmt_opt(summary.loss, &|l| format!("{l:.4}")),
        job.tokens_per_s,
        fmt_opt(summary.mfu, &|m| format!("{:.2}%", m * 100.0)),
        summary.oldest_heartbeat_ms as f64 / 1e3,
    );
    if let Some(epochs) = summary.epochs {
        out += &format!(
            "epoch {} ({:.1}% done; every sequence once per epoch)\n",
            epochs.floor() as u64 + 1,
            epochs.fract() * 100.0
        );
    }
    match &job.last_checkpoint {
        Some(c) => {
            out += &format!(
                "last checkpoint: step {} (generation {}, val loss {}) {}\n",
                c.step,
                c.generation,
                fmt_opt(c.val_loss, &|v| format!("{v:.4}")),
                c.path
            );
            for copy in &c.copies {
                out += &format!("  copy on {copy}\n");
            }
        }
        None => out += "last checkpoint: none yet\n",
    }
    if let (Some(step), Some(loss)) = (job.eval_step, job.eval_val_loss) {
        out += &format!("evaluation: step {step} val loss {loss:.4}\n");
    }
    // The group's latest size changes and why (`--json` has all the coordinator keeps).
    for change in job.changes.iter().rev().take(3).rev() {
        out += &format!("change: {change}\n");
    }
    out += &placement_lines(job);
    out += &members_table(job);
    let unlisted = summary.members.saturating_sub(summary.members_listed);
    if unlisted > 0 {
        out += &format!("… and {unlisted} more members (lillm status --members lists all)\n");
    }
    out
}

/// Which train shards each dataloader serves (nothing before the dataset is known).
fn placement_lines(job: &pb::JobStatus) -> String {
    let mut out = String::new();
    for d in &job.placement {
        let listed: Vec<String> = d.first_shards.iter().map(u32::to_string).collect();
        let more = match d.shards as usize > listed.len() {
            true => ", …",
            false => "",
        };
        let at = match d.address.is_empty() {
            true => "absent".to_string(),
            false => d.address.clone(),
        };
        out += &format!(
            "shards on dataloader {} ({at}): {} shard(s), {} tokens: {}{more}\n",
            d.dataloader_index,
            d.shards,
            d.tokens,
            listed.join(",")
        );
    }
    out
}

/// One line per member listed.
fn members_table(job: &pb::JobStatus) -> String {
    let fmt_opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_string(), f);
    let mut out = format!(
        "{:<28} {:>4} {:<22} {:>9} {:>7} {:>8} {:>9}\n",
        "MEMBER", "RANK", "ADDRESS", "HEARTBEAT", "STEP", "LOSS", "TOKENS/S"
    );
    for m in &job.members {
        out += &format!(
            "{:<28} {:>4} {:<22} {:>8.1}s {:>7} {:>8} {:>9}\n",
            member_name(m),
            m.rank.map_or("-".into(), |r| r.to_string()),
            m.address,
            m.heartbeat_age_ms as f64 / 1e3,
            m.step,
            fmt_opt(m.loss, &|l| format!("{l:.4}")),
            fmt_opt(m.tokens_per_s, &|t| format!("{t:.0}")),
        );
    }
    out
}

/// The job as one JSON object.
pub fn status_json(job: &pb::JobStatus) -> serde_json::Value {
    let members: Vec<serde_json::Value> = job
        .members
        .iter()
        .map(|m| {
            let id = m.id.clone().unwrap_or_default();
            serde_json::json!({
                "node": id.node,
                "role": role_name(id.role),
                "local_index": id.local_index,
                "rank": m.rank,
                "address": m.address,
                "heartbeat_age_ms": m.heartbeat_age_ms,
                "step": m.step,
                "loss": m.loss,
                "tokens_per_s": m.tokens_per_s,
                "mfu": m.mfu,
                "dataloader_index": m.dataloader_index,
                "epochs": m.epochs,
            })
        })
        .collect();
    serde_json::json!({
        "generation": job.generation,
        "phase": job.phase,
        "expected_trainers": job.expected_trainers,
        "expected_dataloaders": job.expected_dataloaders,
        "restarts": job.restarts,
        "changes": job.changes,
        "tokens_per_s": job.tokens_per_s,
        "members": members,
        "summary": job.summary.as_ref().map(|s| serde_json::json!({
            "members": s.members, "members_listed": s.members_listed, "trainers": s.trainers,
            "ranked_trainers": s.ranked_trainers, "dataloaders": s.dataloaders, "nodes": s.nodes,
            "step": s.step, "slowest_step": s.slowest_step, "loss": s.loss, "mfu": s.mfu,
            "oldest_heartbeat_ms": s.oldest_heartbeat_ms, "epochs": s.epochs,
        })),
        "last_checkpoint": job.last_checkpoint.as_ref().map(|c| serde_json::json!({
            "step": c.step, "path": c.path, "generation": c.generation, "val_loss": c.val_loss,
            "copies": c.copies,
        })),
        "eval": job.eval_step.map(|step| serde_json::json!({
            "step": step, "val_loss": job.eval_val_loss, "sample": job.eval_sample,
        })),
        "placement": job.placement.iter().map(|d| serde_json::json!({
            "dataloader_index": d.dataloader_index, "address": d.address, "shards": d.shards,
            "tokens": d.tokens, "first_shards": d.first_shards,
        })).collect::<Vec<_>>(),
    })
}
