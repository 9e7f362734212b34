//! `cairn sandbox ...`: requests to the daemon, its answers printed.

use std::process::ExitCode;

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use hyper::Method;
use serde_json::{json, Value};

use crate::cli::{Global, MachineArgs, SandboxCommand};
use crate::daemon::client::DaemonClient;
use crate::daemon::default_socket;
use crate::output::emit;

pub fn run(g: &Global, cmd: &SandboxCommand) -> Result<ExitCode> {
    let socket = match &g.daemon {
        Some(s) => s.clone(),
        None => default_socket()?,
    };
    let client = DaemonClient::new(&socket)?;
    let answer = match cmd {
        SandboxCommand::Create {
            name,
            image,
            snapshot,
            queues,
            idle_suspend,
        } => client.call(
            Method::POST,
            "/v1/sandboxes",
            Some(&json!({
                "name": name,
                "image": image,
                "snapshot": snapshot,
                "queues": queues,
                "project": g.project,
                "idle_suspend_ms": idle_suspend.map(|d| d.as_millis() as u64),
            })),
        )?,
        SandboxCommand::Fork {
            snapshot,
            name,
            count,
            queues,
        } => client.call(
            Method::POST,
            &format!("/v1/snapshots/{snapshot}/fork"),
            Some(&json!({ "name": name, "count": count, "queues": queues, "project": g.project })),
        )?,
        SandboxCommand::Suspend { sandbox, machine } => client.call(
            Method::POST,
            &format!("/v1/sandboxes/{sandbox}/suspend"),
            Some(&machine_body(machine)?),
        )?,
        SandboxCommand::Resume { name, queues } => client.call(
            Method::POST,
            &format!("/v1/sandboxes/{name}/resume"),
            Some(&json!({ "queues": queues, "project": g.project })),
        )?,
        SandboxCommand::Migrate {
            sandbox,
            to,
            max_rounds,
            machine,
        } => {
            let mut body = machine_body(machine)?;
            body["to"] =
                json!(std::path::absolute(to)
                    .with_context(|| format!("resolving {}", to.display()))?);
            body["max_rounds"] = json!(max_rounds);
            client.call(
                Method::POST,
                &format!("/v1/sandboxes/{sandbox}/migrate"),
                Some(&body),
            )?
        }
        SandboxCommand::Snapshot { sandbox, machine } => client.call(
            Method::POST,
            &format!("/v1/sandboxes/{sandbox}/snapshot"),
            Some(&machine_body(machine)?),
        )?,
        SandboxCommand::Clone {
            sandbox,
            name,
            machine,
        } => {
            let mut body = machine_body(machine)?;
            body["name"] = json!(name);
            client.call(
                Method::POST,
                &format!("/v1/sandboxes/{sandbox}/clone"),
                Some(&body),
            )?
        }
        SandboxCommand::Ls => client.call(Method::GET, "/v1/sandboxes", None)?,
        SandboxCommand::Describe { sandbox } => {
            client.call(Method::GET, &format!("/v1/sandboxes/{sandbox}"), None)?
        }
        SandboxCommand::Rm { sandbox } => {
            client.call(Method::DELETE, &format!("/v1/sandboxes/{sandbox}"), None)?;
            json!({ "removed": sandbox })
        }
    };
    emit(g.json, &answer, || text(cmd, &answer))?;
    Ok(ExitCode::SUCCESS)
}

/// The VMM's files as the daemon reads them: absolute paths.
fn machine_body(m: &MachineArgs) -> Result<Value> {
    let absolute = |p: &Option<PathBuf>| -> Result<Option<PathBuf>> {
        p.as_ref()
            .map(|p| std::path::absolute(p).with_context(|| format!("resolving {}", p.display())))
            .transpose()
    };
    Ok(json!({
        "memory": absolute(&m.memory)?,
        "memory_diff": m.memory_diff,
        "vm_state": absolute(&m.vm_state)?,
    }))
}

fn line(s: &Value) -> String {
    format!(
        "{:<34} {:<16} {:<9} {:<16} {}\n",
        s["id"].as_str().unwrap_or("-"),
        s["name"].as_str().unwrap_or("-"),
        s["state"].as_str().unwrap_or("-"),
        s["image_name"]
            .as_str()
            .or_else(|| s["image"].as_str().map(|i| &i[..12.min(i.len())]))
            .unwrap_or("-"),
        s["disk_socket"].as_str().unwrap_or("-"),
    )
}

fn text(cmd: &SandboxCommand, answer: &Value) -> String {
    match cmd {
        SandboxCommand::Ls | SandboxCommand::Fork { .. } => {
            let mut out = format!(
                "{:<34} {:<16} {:<9} {:<16} {}\n",
                "ID", "NAME", "STATE", "IMAGE", "DISK SOCKET"
            );
            for s in answer["sandboxes"].as_array().into_iter().flatten() {
                out.push_str(&line(s));
            }
            out
        }
        SandboxCommand::Rm { sandbox } => format!("removed {sandbox}\n"),
        SandboxCommand::Snapshot { sandbox, .. } => format!(
            "snapshot {} of {sandbox}: {} (uploading in the background; see `cairn snapshot describe`)\n",
            answer["id"].as_str().unwrap_or("-"),
            answer["state"].as_str().unwrap_or("-"),
        ),
        SandboxCommand::Describe { .. } => {
            serde_json::to_string_pretty(answer).unwrap_or_default() + "\n"
        }
        SandboxCommand::Suspend { sandbox, .. } => format!(
            "suspended {sandbox} (snapshot {})\n",
            answer["snapshot"].as_str().unwrap_or("-")
        ),
        SandboxCommand::Migrate { sandbox, .. } => {
            let rounds = answer["rounds"].as_array().map_or(0, Vec::len);
            let mib = |v: &Value| v.as_u64().unwrap_or(0) as f64 / (1 << 20) as f64;
            let pre: f64 = answer["rounds"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| mib(&r["bytes"]))
                .sum();
            format!(
                "migrated {sandbox} to {} (generation {})\n\
                 pre-copy: {rounds} rounds, {pre:.1} MiB; last delta {:.1} MiB\n\
                 unserved for {:.3} s\n\
                 disk socket: {}\n",
                answer["to_host"].as_str().unwrap_or("-"),
                answer["generation"],
                mib(&answer["delta_bytes"]),
                answer["unserved_secs"].as_f64().unwrap_or(0.0),
                answer["sandbox"]["disk_socket"].as_str().unwrap_or("-"),
            )
        }
        SandboxCommand::Create { .. }
        | SandboxCommand::Clone { .. }
        | SandboxCommand::Resume { .. } => {
            let mut out = format!(
                "{} {}\ndisk socket: {}\n",
                answer["id"].as_str().unwrap_or("-"),
                answer["name"].as_str().unwrap_or(""),
                answer["disk_socket"].as_str().unwrap_or("-")
            );
            if let Some(m) = answer["memory_socket"].as_str() {
                out += &format!("memory socket: {m}\n");
            }
            if let Some(v) = answer["vm_state"].as_str() {
                out += &format!("vm state: {v}\n");
            }
            out
        }
    }
}
