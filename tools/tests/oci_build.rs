//! `cairn image build`: a multi-stage Dockerfile over the `boot` fixture
//! (busybox), RUN in bubblewrap, COPY from the context and from a stage,
//! ENV/ARG substitution; the step cache (a rebuild runs nothing, a changed
//! last RUN reruns only itself); refusals (COPY ../x, FROM $VAR). Needs
//! bubblewrap (tools/dev/setup.sh installs it) and root (the build root's
//! owners and devices).

mod common;
mod oci_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use oci_common::{fixtures, stderr, Env};

trait BuildEnv {
    fn context(&self, name: &str, dockerfile: &str, files: &[(&str, &str)]) -> PathBuf;
    fn cat(&self, image: &str, path: &str) -> String;
}

impl BuildEnv for Env {
    /// A build context `name` with this Dockerfile and files.
    fn context(&self, name: &str, dockerfile: &str, files: &[(&str, &str)]) -> PathBuf {
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("Dockerfile"), dockerfile).unwrap();
        for (f, body) in files {
            std::fs::write(d.join(f), body).unwrap();
        }
        d
    }

    /// A file of the image's disk, read by debugfs.
    fn cat(&self, image: &str, path: &str) -> String {
        let img = self.dir.path().join(format!("{image}.img"));
        let out = self.cairn(&["image", "export", image, img.to_str().unwrap()]);
        assert!(out.status.success());
        let out = common::run_ok(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("cat {path}"))
                .arg(&img),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn dockerfile(base: &Path, last_run: &str) -> String {
    format!(
        r#"# a multi-stage build
FROM oci:{base}:latest AS builder
RUN echo built > /artifact
FROM oci:{base}:latest
ARG GREETING=hi
ENV APP_HOME=/app GREETING=$GREETING
WORKDIR $APP_HOME
COPY hello.txt ./
COPY --from=builder /artifact /app/artifact
ONBUILD RUN echo never
RUN {last_run}
CMD ["/bin/sh", "-c", "cat /app/greeting"]
"#,
        base = base.display()
    )
}

#[test]
fn builds_caches_each_step_and_reruns_only_what_changed() {
    let e = Env::new();
    let base = fixtures().join("boot");
    let run = r#"cat /app/hello.txt > /app/copied && rm /etc/greeting && echo "$GREETING" > /app/greeting"#;
    let ctx = e.context(
        "app",
        &dockerfile(&base, run),
        &[
            ("hello.txt", "from the context\n"),
            ("secret.log", "no\n"),
            (".dockerignore", "*.log\n"),
        ],
    );
    let ctx_s = ctx.to_str().unwrap();
    let v = e.ok_json(&["image", "build", ctx_s, "--build-arg", "GREETING=bonjour"]);
    assert_eq!(
        v["name"], "app",
        "the name defaults to the context folder's"
    );
    assert_eq!(v["steps_run"], 4, "{v}");
    assert!(v["notes"][0].as_str().unwrap().contains("ONBUILD"));
    assert_eq!(e.cat("app", "/app/greeting"), "bonjour\n");
    assert_eq!(e.cat("app", "/app/copied"), "from the context\n");
    assert_eq!(e.cat("app", "/app/artifact"), "built\n");
    let d = e.ok_json(&["image", "describe", "app"]);
    assert_eq!(d["image"]["config"]["WorkingDir"], "/app");
    assert!(d["image"]["dockerfile"]
        .as_str()
        .unwrap()
        .contains("FROM oci:"));

    // Nothing changed: no step runs, the image comes from the cache.
    let again = e.ok_json(&["image", "build", ctx_s, "--build-arg", "GREETING=bonjour"]);
    assert_eq!(again["steps_run"], 0);
    assert_eq!(again["cached"], true);
    assert_eq!(again["id"], v["id"]);

    // Only the last RUN changed: only it runs.
    std::fs::write(
        ctx.join("Dockerfile"),
        dockerfile(&base, &format!("{run} && echo more >> /app/greeting")),
    )
    .unwrap();
    let rebuild = [
        "image",
        "build",
        ctx_s,
        "--build-arg",
        "GREETING=bonjour",
        "--replace",
    ];
    let changed = e.ok_json(&rebuild);
    assert_eq!(changed["steps_run"], 1, "{changed}");
    assert_eq!(e.cat("app", "/app/greeting"), "bonjour\nmore\n");

    // A changed file in the context reruns its COPY and the steps after it
    // (COPY --from and RUN), not the first stage.
    std::fs::write(ctx.join("hello.txt"), "changed\n").unwrap();
    let copied = e.ok_json(&rebuild);
    assert_eq!(copied["steps_run"], 3, "{copied}");
    assert_eq!(e.cat("app", "/app/copied"), "changed\n");

    // Without --replace, a build that makes another image keeps the name
    // where it was.
    std::fs::write(ctx.join("hello.txt"), "changed again\n").unwrap();
    let out = e.cairn(&["image", "build", ctx_s, "--build-arg", "GREETING=bonjour"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("the image name `app` is taken"),
        "a rebuild moved a name without --replace: {}",
        stderr(&out)
    );
    assert_eq!(e.cat("app", "/app/copied"), "changed\n");
}

#[test]
fn refuses_context_escapes_and_variables_in_from() {
    let e = Env::new();
    let base = fixtures().join("boot");
    let ctx = e.context(
        "esc",
        &format!("FROM oci:{}:latest\nCOPY ../outside /x\n", base.display()),
        &[],
    );
    std::fs::write(e.dir.path().join("outside"), "secret").unwrap();
    let out = e.cairn(&["image", "build", ctx.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("../outside") && msg.contains("leaves the build context"),
        "{msg}"
    );

    let ctx = e.context("var", "ARG BASE=x\nFROM $BASE\n", &[]);
    let out = e.cairn(&["image", "build", ctx.to_str().unwrap()]);
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("variables in FROM"), "{msg}");
    let names = e.ok_json(&["image", "ls"]);
    assert_eq!(
        names.as_array().unwrap().len(),
        0,
        "a failed build left a name"
    );
}
